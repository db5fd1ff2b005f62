"""What each kind of operation introduces, per engine: the local errors `workbench compare` measures on clean
dumps of other engines (and of our own quantized path) against our exact path, as a table — median and
worst per kind of operation — with the first divergence (none expected: every dump here is of a correct
engine) and the time each dump and comparison took.

    .venv/bin/python benchmarks/compare_levels.py                          # SmolLM2, 8 prompt tokens + 8 steps
    .venv/bin/python benchmarks/compare_levels.py --models smollm2-135m,gemma3-270m --engines llama.cpp,llama.cpp-f32
"""

from __future__ import annotations

import argparse
import statistics
import time

import polars as pl
import torch

from workbench.bench import cpu_name
from workbench.compare import compare
from workbench.dump import ours
from workbench.model import Model
from workbench.session import Session

ENGINES = ("llama.cpp", "llama.cpp-f32", "transformers", "workbench-quantized")




def dump_of(engine: str, name: str, model: Model, tokens: list[int], n_prompt: int):
    if engine in ("llama.cpp", "llama.cpp-f32"):
        from workbench.reference import llama_cpp_dump

        return llama_cpp_dump(model, tokens, n_prompt, engine=engine)
    if engine == "transformers":
        from workbench.hf import transformers_dump

        return transformers_dump(model.gguf.path, tokens, n_prompt)
    quantized = Model.load(name, device="cpu", dtype="bfloat16", weights="quantized")
    return ours(quantized, tokens, n_prompt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--prompt", default="The capital of France is Paris, and the capital of")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print(f"# {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    rows = []
    for name in args.models.split(","):
        model = Model.load(name, device="cpu", dtype="float32", weights="dequantized")
        session = Session(model, model.tokenizer.encode(args.prompt), context=256)
        for _ in range(args.steps):
            session.step()
        tokens, n_prompt = session.ids[: len(session.prompt_ids) + args.steps], len(session.prompt_ids)
        for engine in args.engines.split(","):
            t0 = time.perf_counter()
            try:
                dump = dump_of(engine, name, model, tokens, n_prompt)
            except Exception as exc:  # a baseline that cannot run gets a note, not a crash
                rows.append({"model": name, "engine": engine, "kind": f"not run: {exc}"})
                continue
            t1 = time.perf_counter()
            result = compare(model, dump, suspects=False)
            t2 = time.perf_counter()
            fd = result.first_divergence
            for kind in sorted({p.kind for p in result.points}):
                errs = [p.local_error for p in result.points if p.kind == kind and p.local_error is not None
                        and not p.capture.endswith("topk_ids")]
                if not errs:
                    continue
                rows.append({"model": name, "engine": engine, "kind": kind, "points": len(errs),
                             "median_local": statistics.median(errs), "max_local": max(errs),
                             "threshold": result.thresholds[kind],
                             "first_divergence": "none" if fd is None else f"{fd.step}/{fd.capture}",
                             "dump_s": round(t1 - t0, 2), "compare_s": round(t2 - t1, 2)})
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=60, float_precision=None):
        print(pl.DataFrame(rows))


if __name__ == "__main__":
    main()
