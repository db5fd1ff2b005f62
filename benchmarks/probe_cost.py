"""What the probes cost: seconds per cached decode step with probes off, on, and on with the teaching frames.

    .venv/bin/python benchmarks/probe_cost.py [--models tiny-qwen3moe,smollm2-135m] [--prompt-tokens 64]
                                              [--steps 16] [--repeats 5] [--threads N] [--device cpu]

Per model (loaded once, weights and dtype `auto`), five settings of the session: off; probes (Session(probes=
True): Q/K statistics, routing, layer health, candidates); probes + attention (the newest token's pattern,
a second attention per layer); probes + lens (every layer through the final norm and the head, one
vocabulary-sized matmul per layer); probes + both. Each repeat runs every setting once, in turn, so that a
busy spell on a shared machine falls on all of them alike: a fresh session on the same prompt ids (a fixed
paragraph, cut to --prompt-tokens), its prefill untimed, then --steps cached decode steps, each timed from
`step()` in to `step()` out (the forward, the probe's reductions and host transfer, the rows). The table gives
the median over every timed step of every repeat, the median of the forward alone (the session's own
timing, which ends before the rows are built), and the ratio of the step to probes-off's. `rows` is how many
probe rows a step records (qk, routing, layers, attention, lens) at the last step.

Progress goes to stderr, the table to stdout, with the CPU and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import polars as pl
import torch

from workbench.bench import cpu_name
from workbench.loading import set_threads
from workbench.model import Model
from workbench.session import Session

TEXT = ("The workbench reads a GGUF file, builds the model on a device and decodes one token per step, on a "
        "cached path that keeps every key and value it has computed and on an uncached path that computes the "
        "whole sequence again at every step, so that any difference between the two is a bug in the cache. ")
SETTINGS = {
    "off": {},
    "probes": {"probes": True},
    "probes + attention": {"probes": True, "attention": True},
    "probes + lens": {"probes": True, "lens": True},
    "probes + both": {"probes": True, "attention": True, "lens": True},
}
PROBE_FRAMES = ("qk", "routing", "layers", "attention", "lens")




def prompt_ids(model: Model, n: int) -> list[int]:
    ids = model.tokenizer.encode(TEXT)
    while len(ids) < n:
        ids = ids + model.tokenizer.encode(TEXT)
    return ids[:n]


def one_run(model: Model, ids: list[int], steps: int, options: dict) -> tuple[list[float], list[float], int]:
    """Wall seconds of each decode step, the session's forward seconds of each, probe rows at the last step."""
    session = Session(model, ids, context=len(ids) + steps + 1, **options)
    session.step()  # the prefill: not a decode step
    walls = []
    for _ in range(steps):
        before = {f: len(getattr(session.records, f)) for f in PROBE_FRAMES}
        t0 = time.perf_counter()
        session.step()
        walls.append(time.perf_counter() - t0)
    forwards = [row["seconds"] for row in session.records.tokens[1:]]
    rows = sum(len(getattr(session.records, f)) - before[f] for f in PROBE_FRAMES)
    return walls, forwards, rows


def measure(name: str, device: str, prompt_tokens: int, steps: int, repeats: int) -> list[dict]:
    model = Model.load(name, device=device)
    ids = prompt_ids(model, prompt_tokens)
    walls: dict[str, list[float]] = {s: [] for s in SETTINGS}
    forwards: dict[str, list[float]] = {s: [] for s in SETTINGS}
    rows: dict[str, int] = {}
    one_run(model, ids, 2, SETTINGS["probes + both"])  # warm-up: first allocations of every shape
    for r in range(repeats):
        print(f"{name}: repeat {r + 1}/{repeats}", file=sys.stderr)
        for setting, options in SETTINGS.items():
            w, f, rows[setting] = one_run(model, ids, steps, options)
            walls[setting] += w
            forwards[setting] += f
    off = statistics.median(walls["off"])
    c = model.config
    return [{"model": name, "weights": model.info.weights, "dtype": str(model.dtype).removeprefix("torch."),
             "layers×heads×vocab": f"{c.n_layers}×{c.n_heads}×{c.vocab_size}", "setting": setting,
             "ms/step": 1e3 * statistics.median(walls[setting]),
             "forward ms": 1e3 * statistics.median(forwards[setting]),
             "× off": statistics.median(walls[setting]) / off, "rows": rows[setting]} for setting in SETTINGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-qwen3moe,smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = [row for name in args.models.split(",")
            for row in measure(name, args.device, args.prompt_tokens, args.steps, args.repeats)]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"# {device} ({os.cpu_count()} cores), torch {torch.__version__}, {threads} threads; prompt "
          f"{args.prompt_tokens} tokens, {args.steps} cached decode steps × {args.repeats} repeats (medians); "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=2, tbl_hide_dataframe_shape=True):
        print(pl.DataFrame(rows))


if __name__ == "__main__":
    sys.exit(main())
