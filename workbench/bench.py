"""Cached vs uncached tokens/s: the table `workbench bench` prints, in the manner of llama-bench.

A prompt of exactly P tokens, one warm-up, then `steps` greedy decode steps per path. The cached path's
first step is the prefill (timed apart); each later step is one token. The uncached path recomputes the
whole sequence at every step, so its cost grows with the position.

The expected speedup comes from arithmetic on measured numbers, not from a model of the hardware: an
uncached step over L tokens costs what a prefill of L tokens costs, so at the measured prefill rate r
(tokens/s) the uncached steps cost on average (P + (steps − 1)/2) / r seconds, against the cached path's
measured seconds per token.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass

import torch

from workbench.errors import InputError
from workbench.loading import describe_weights
from workbench.model import Model
from workbench.session import Session


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows: every figure names its machine."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"

TEXT = (
    "The workbench decodes one token at a time. Each step reads the weights of every layer, attends over the "
    "keys and values of the tokens before it, and picks the next token from the logits. Without a cache, "
    "every step recomputes the keys and values of the whole sequence, so its cost grows with the position. "
)


def bench_prompt(model: Model, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of fixed English text (BOS first when the model adds one)."""
    if n_tokens < 1:
        raise InputError(f"--prompt-tokens must be ≥ 1, not {n_tokens}.")
    ids = model.tokenizer.encode(TEXT)
    body = ids[1:] if model.tokenizer.add_bos and ids and ids[0] == model.tokenizer.bos_id else ids
    if not body:
        raise InputError("the benchmark text encodes to no tokens with this model's tokenizer; it cannot build a prompt.")
    while len(ids) < n_tokens:
        ids += body
    return ids[:n_tokens]


@dataclass
class BenchRow:
    path: str
    prompt_tokens: int
    steps: int
    tokens_per_s: float
    ms_per_token: float
    probes: bool
    prefill_seconds: float | None  # cached path only


def _measure(model: Model, prompt: list[int], steps: int, path: str, probes: bool, compile: bool = False) -> BenchRow:
    compiled = compile and path == "cached" and not probes
    session = Session(model, prompt, path=path, context=len(prompt) + steps + 2, probes=probes, compile=compiled)
    prefill = None
    decode_seconds, n = 0.0, 0
    if compiled:  # the prefill, then the first decode step, which compiles it: neither is timed as decode
        t0 = time.perf_counter()
        session.step()
        prefill = time.perf_counter() - t0
        session.step()
    for _ in range(steps + (1 if path == "cached" and not compiled else 0)):  # the cached path's extra first step is the prefill
        # The whole step: forward, sampling, and (probes on) the reductions and their host transfer.
        t0 = time.perf_counter()
        result = session.step()
        seconds = time.perf_counter() - t0
        if result.prefill:
            prefill = seconds
        else:
            decode_seconds += seconds
            n += 1
    tps = n / decode_seconds if decode_seconds > 0 else 0.0
    return BenchRow(path, len(prompt), n, tps, 1000 * decode_seconds / max(n, 1), probes, prefill)


def run(model: Model, prompt_tokens: int = 256, steps: int = 32, paths: tuple[str, ...] = ("cached", "uncached"),
        probes: tuple[bool, ...] = (False,), warmup: bool = True, compile: bool = False) -> list[BenchRow]:
    """Rows per (probes, path). `compile`: the probe-free cached path runs the torch.compile'd step
    (Session(compile=True)); its compilation is left out of the timing."""
    if steps < 1:
        raise InputError(f"--steps must be ≥ 1, not {steps}.")
    for p in paths:
        if p not in ("cached", "uncached"):
            raise InputError(f"unknown path '{p}' in --paths; choose cached and/or uncached.")
    prompt = bench_prompt(model, prompt_tokens)
    if len(prompt) + steps + 2 > model.config.context_length:
        raise InputError(f"{prompt_tokens} prompt tokens + {steps} steps exceed the model's context of {model.config.context_length}.")
    if warmup:
        _measure(model, prompt[: min(16, len(prompt))], 2, "cached", False)
    return [_measure(model, prompt, steps, path, p, compile) for p in probes for path in paths]


def speedup(rows: list[BenchRow]) -> tuple[float | None, float | None]:
    """(measured, expected) cached/uncached speedup, from the probe-free rows when present."""
    by_path = {r.path: r for r in rows if not r.probes} or {r.path: r for r in rows}
    cached, uncached = by_path.get("cached"), by_path.get("uncached")
    if not cached or not uncached or not cached.tokens_per_s or not uncached.tokens_per_s:
        return None, None
    measured = cached.tokens_per_s / uncached.tokens_per_s
    expected = None
    if cached.prefill_seconds:
        rate = cached.prompt_tokens / cached.prefill_seconds
        mean_len = cached.prompt_tokens + (uncached.steps - 1) / 2
        expected = (mean_len / rate) / (cached.ms_per_token / 1000)
    return measured, expected


def table(model: Model, rows: list[BenchRow]) -> str:
    size_mib = model.gguf.size / 2**20
    params = model.n_params / 1e6
    dev, dtype, weights = str(model.device), str(model.dtype).removeprefix("torch."), model.info.weights
    threads = torch.get_num_threads()
    header = (f"| {'model':<22} | {'size':>9} | {'params':>8} | {'device':<6} | {'dtype':<8} | {'weights':<11} | {'threads':>7} | {'path':<8} | "
              f"{'probes':<6} | {'prompt':>6} | {'gen':>4} | {'tokens/s':>9} | {'ms/token':>9} |")
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    name = model.gguf.path.name[:22]
    for r in rows:
        lines.append(f"| {name:<22} | {size_mib:>5.1f} MiB | {params:>7.1f}M | {dev:<6} | {dtype:<8} | {weights:<11} | {threads:>7} | {r.path:<8} | "
                     f"{'on' if r.probes else 'off':<6} | {r.prompt_tokens:>6} | {r.steps:>4} | {r.tokens_per_s:>9.2f} | {r.ms_per_token:>9.2f} |")
    measured, expected = speedup(rows)
    if measured is not None:
        lines.append(f"\ncached / uncached speedup: {measured:.2f}× measured"
                     + (f", {expected:.2f}× expected (an uncached step over P+i tokens costs a prefill of that length, "
                        f"at the measured prefill rate)" if expected else ""))
    with_probes = [r for r in rows if r.probes and r.path == "cached"]
    without = [r for r in rows if not r.probes and r.path == "cached"]
    if with_probes and without and without[0].tokens_per_s:
        lines.append(f"probe cost: cached tokens/s with probes = {with_probes[0].tokens_per_s / without[0].tokens_per_s:.2f} × without")
    lines.append(f"weights: {describe_weights(model.info.weights, model.dtype)}")
    return "\n".join(lines)


def as_json(rows: list[BenchRow]) -> dict:
    measured, expected = speedup(rows)
    return {"rows": [asdict(r) for r in rows], "speedup": measured, "expected_speedup": expected,
            "threads": torch.get_num_threads()}
