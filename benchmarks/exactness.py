"""How exact is each weights form? Per model: cached vs uncached, and against llama.cpp on the file and on an
F32 copy of it (the exact reference: every tensor dequantized by gguf-py, an F32 KV cache).

For each model and weights form (the default `auto`, and `quantized` for contrast) a greedy session on the
`both` path decodes --steps tokens after a fixed prompt; the worst cached-vs-uncached max |Δlogit| / max
|logit| over the steps is reported. Then every prefix of the resulting sequence is fed to both llama.cpp
engines (teacher-forced, so a near-tie cannot make the sequences part), and the table gives the smallest
per-position logit cosine, the largest max |Δ| / max |logit|, and the share of positions with the same argmax.

    .venv/bin/python benchmarks/exactness.py                                  # smollm2-135m, gemma3-270m, tiny-qwen3moe
    .venv/bin/python benchmarks/exactness.py --models my.gguf --steps 64 --json

Needs the test environment (llama-cpp-python). F32 copies are made once into the model cache (~4× the file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import polars as pl
import torch

from workbench.bench import cpu_name
from workbench.loading import describe_weights, set_threads
from workbench.model import Model
from workbench.reference import ReferenceEngine
from workbench.session import Session

PROMPT = "The capital of France is Paris, and the capital of Germany is"




def against(engine: str, model: Model, ids: list[int], ours: torch.Tensor) -> dict:
    """Teacher-forced comparison of our logits [T, vocab] (after each prefix of ids) with `engine`'s."""
    t0 = time.perf_counter()
    with ReferenceEngine(engine, model, len(ids) + 8) as ref_engine:
        ref = torch.stack([ref_engine.logits_after(ids[: i + 1]) for i in range(len(ids))])
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    rel = (ours - ref).abs().amax(-1) / ref.abs().amax(-1)
    return {f"{engine} min cosine": float(cos.min()), f"{engine} max rel": float(rel.max()),
            f"{engine} top-1": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
            f"{engine} seconds": time.perf_counter() - t0}


def measure(name: str, weights: str, steps: int) -> dict:
    model = Model.load(name, device="cpu", dtype="float32", weights=weights)
    session = Session(model, model.tokenizer.encode(PROMPT), path="both")
    for _ in session.generate(steps):
        pass
    worst = max(e["max_abs_diff"] / e["max_abs_logit"] for e in session.records.equiv)
    ids = session.ids
    ours = model.forward(torch.tensor(ids), 0, model.new_cache(len(ids))).float()  # uncached, every position
    row = {"model": name, "weights": f"{weights} → {model.info.weights}", "arithmetic": describe_weights(model.info.weights, model.dtype),
           "positions": len(ids), "cached vs uncached": worst, "allowed": model.equivalence_tolerance}
    for engine in ("llama.cpp-f32", "llama.cpp"):
        row |= against(engine, model, ids, ours)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m,tiny-qwen3moe")
    parser.add_argument("--weights", default="auto,quantized")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    rows = [measure(name, weights, args.steps) for name in args.models.split(",") for weights in args.weights.split(",")]
    if args.json:
        print(json.dumps({"cpu": cpu_name(), "threads": threads, "torch": torch.__version__, "rows": rows}))
        return
    print(f"# {cpu_name()}, torch {torch.__version__}, {threads} threads; prompt {PROMPT!r}, {args.steps} greedy steps")
    frame = pl.DataFrame(rows).drop([c for c in rows[0] if c.endswith("seconds")] + ["arithmetic"])
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, fmt_str_lengths=40, float_precision=7):
        print(frame)
    for row in rows:
        print(f"{row['model']}, {row['weights']}: {row['arithmetic']}")


if __name__ == "__main__":
    sys.exit(main())
