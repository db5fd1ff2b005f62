"""Decode-speed benchmark: workbench (cached and uncached paths) against HF transformers and llama.cpp, each
path's speed beside how exact it is.

    python benchmarks/decode.py [--models smollm2-135m,gemma3-270m] [--prompt-tokens 64] [--steps 32]
                                [--weights default,quantized,dequantized] [--paths cached,uncached]
                                [--baselines transformers,llama.cpp] [--threads 2] [--repeats 1] [--json]

For every model, in one process, on the same prompt ids (a fixed English paragraph, repeated, tokenized with
the model's own GGUF tokenizer and cut to exactly --prompt-tokens; BOS included when the model adds one):

* workbench           once per --weights mode (float32 activations unless said otherwise):
                        default          "workbench": weights=auto, what a user gets (on a CPU: blocks); the
                                         summary names the form it took
                        blocks           "workbench-blocks": the matrices stay in their GGUF blocks, multiplied
                                         by the C++ kernel (exact weights, equal to dequantized up to summation
                                         order)
                        blocks-compiled  "workbench-blocks-compiled": blocks with the decode step torch.compile'd
                        quantized        "workbench-quant": 4-bit planes read by PyTorch's int4 kernel, bfloat16
                                         activations (qmatmul.py): fast, not exact
                        dequantized      "workbench-deq": dense float32 matrices, the exact path
                        compiled         "workbench-compiled": quantized with the decode step torch.compile'd
                      A compiled mode (Session(compile=True)) runs the cached path only; its compilation (~1 minute
                      the first time, seconds from inductor's disk cache) happens in the warm-up.
* workbench cached    one untimed warm-up session, then a timed one: the prefill of the prompt (one batched
                      forward, which also yields the first token), then --steps single-token decode steps.
* workbench uncached  the same --steps tokens, each step re-running the whole sequence (prompt + generated so
                      far) through the model with a fresh cache. Its first forward (the bare prompt, which is
                      the prefill's computation) is reported as its prefill and not counted in tokens/s.
                      --paths cached skips it (and transformers' uncached run): it is the slow part.
* transformers        fp32, loaded from the same GGUF file (it dequantizes to float32). Cached: a manual loop,
                      prefill forward with use_cache=True, then --steps forwards of one token that pass the
                      returned cache back (`cache=` in transformers 5.x, `past_key_values=` before). Uncached:
                      a first forward over the prompt (its prefill), then --steps forwards of the full
                      sequence with use_cache=False.
                      Both with logits_to_keep=1 where the model supports it (what generate() passes; the
                      workbench computes only the last position's logits too).
* llama.cpp           llama_cpp.Llama (its own quantized kernels, n_threads = --threads): eval of the prompt,
                      then --steps evals of one token, each followed by an argmax over the last logits (copied
                      after the step's timing, for the exactness column). When
                      llama_cpp is not importable, the script installs llama-cpp-python==0.3.36 with pip (a
                      wheel from ../shared/wheels where there is one, else pip builds llama.cpp from source,
                      ~8 minutes); --no-install skips that.

Every engine decodes greedily (argmax) and ignores EOS, so all of them time the same number of steps.
tokens/s = --steps / (sum of the timed steps' wall seconds); a step's time includes its argmax. The "agree"
column counts how many leading generated tokens (prefill token included) equal workbench cached's (the first
--weights mode's). torch.set_num_threads(--threads) applies to both torch engines. With --repeats N each timed
measurement runs N times and the fastest is kept.

The "Δ vs exact" column: every row keeps the logits that chose each of its tokens (the prefill's, then each
step's; copied outside the step's timing; with --repeats, the kept run's). After all engines of a model have
run, a dequantized float32 model of the same file is loaded and teacher-forced on each row's own tokens (prompt
+ its tokens but the last, one forward), and the column gives the max over the row's steps of max |Δlogit| /
max |reference logit| (uncached rows and transformers' too; "-" where a row has no logits); --json adds
min_cos, the smallest cosine similarity. The exact paths (dequantized, blocks, transformers fp32) differ from
it by float32 summation order only; quantized arithmetic (workbench-quant, llama.cpp's kernels, which quantize
the activations too) by orders of magnitude more. The summary gives, per model, each workbench mode's cached
tokens/s over llama.cpp's, the load times, and that exactness per cached engine.

The machine may be shared: for every timed stretch the table shows this process's CPU use ("cpu %") and the
cores other processes kept busy meanwhile ("others", from /proc/stat), and the report warns when that was
high. With every core taken, a multi-threaded torch op waits for its descheduled thread, so numbers measured
on a busy machine are inflated, most for torch with --threads equal to the core count.

Progress goes to stderr; the table (or with --json, the rows as a JSON list) to stdout.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

# The transformers baseline reads a local GGUF file; nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from workbench.bench import bench_prompt, cpu_name  # noqa: E402  (the same prompt as `workbench bench`)
from workbench.model import Model  # noqa: E402
from workbench.session import Session  # noqa: E402

ENGINES = ("transformers", "llama.cpp")


@dataclass
class Row:
    model: str
    engine: str
    path: str  # cached | uncached
    prompt_tokens: int
    generated: int = 0  # timed single-token steps
    load_s: float | None = None
    prefill_s: float | None = None
    tokens_per_s: float | None = None
    ms_per_token: float | None = None  # mean over the timed steps
    p50_ms: float | None = None  # median step: less sensitive to a noisy, shared machine
    cpu_pct: float | None = None  # this process's CPU time / wall time over the timed steps, in %
    other_cores: float | None = None  # cores busy outside this process meanwhile: > ~0.2 means a noisy number
    agree: str = ""  # leading generated tokens equal to workbench cached's, "n/m"
    max_rel: float | None = None  # max over the steps of max |Δlogit| / max |logit| against the exact reference
    min_cos: float | None = None  # min over the steps of the logits' cosine similarity to the exact reference
    weights: str = ""  # workbench: the form its matrices took (model.info.weights), e.g. auto → "blocks"
    note: str = ""
    tokens: list[int] = field(default_factory=list, repr=False)  # prefill token + decoded tokens
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)  # float32 [vocab] per token, until scored

    def record(self, m: Measure) -> None:
        self.prefill_s, self.tokens, self.cpu_pct, self.other_cores = m.prefill_s, m.tokens, 100 * m.cpu, m.others
        self.logits = m.logits
        seconds = m.seconds
        self.generated = len(seconds)
        total = sum(seconds)
        self.tokens_per_s = len(seconds) / total if total > 0 else None
        self.ms_per_token = 1000 * total / len(seconds) if seconds else None
        self.p50_ms = 1000 * statistics.median(seconds) if seconds else None


@dataclass
class Measure:
    prefill_s: float
    seconds: list[float]  # one per timed single-token step
    tokens: list[int]  # the prefill's token, then one per step
    cpu: float  # this process's CPU seconds / wall seconds over the timed steps
    others: float | None  # cores kept busy by everything else on the machine meanwhile (None: no /proc/stat)
    logits: list[torch.Tensor] = field(default_factory=list)  # float32 [vocab] that chose each of `tokens`


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine (every core, every process, steal included) has spent not idle."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall time, this process's CPU time and the rest of the machine's CPU time over a stretch of code.
    The machine is shared: `others` (cores busy outside this process) says whether a number was measured
    on a quiet machine. /proc/stat counts in clock ticks (10 ms): on stretches under 0.25 s it says nothing."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), _busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        busy = _busy_seconds()
        self.ratio = cpu / wall if wall > 0 else 0.0
        self.others = None
        if busy is not None and self.busy is not None and wall >= 0.25:
            self.others = max(0.0, (busy - self.busy - cpu) / wall)


def best_of(run: Callable[[], Measure], repeats: int) -> Measure:
    """The fastest of `repeats` runs (by total step time); its prefill is the fastest prefill seen."""
    runs = [run() for _ in range(repeats)]
    best = min(runs, key=lambda m: sum(m.seconds))
    best.prefill_s = min(m.prefill_s for m in runs)
    return best


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def first_line(exc: BaseException, limit: int = 140) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict[str, str]:
    cpu = cpu_name()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info = {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()})",
        "threads": str(threads),
    }
    # Versions from the installed metadata: importing the baselines here would load their native libraries
    # (and threads) before the workbench is measured; each baseline is imported when its turn comes.
    for label, dist in (("transformers", "transformers"), ("llama_cpp", "llama-cpp-python")):
        try:
            info[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[label] = "not installed"
    if hasattr(os, "getloadavg"):
        info["loadavg at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


# --------------------------------------------------------------------------------------------- prompt


def agreement(tokens: list[int], reference: list[int]) -> str:
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return f"{n}/{min(len(tokens), len(reference))}"


# --------------------------------------------------------------------------------------------- workbench


def workbench_run(model: Model, ids: list[int], steps: int, context: int, path: str, compiled: bool = False) -> Measure:
    """One session: its first step (cached: the prefill; uncached: the first full forward over the bare prompt,
    the same computation), then `steps` timed steps. Step seconds are Session's own (forward + argmax; a
    compiled step's one-off compilation is not in them). Each step's logits are kept (a copy, outside the
    step's seconds) for the comparison with the exact reference."""
    session = Session(model, ids, path=path, context=context, compile=compiled)
    first = session.step()  # EOS is ignored so that every run times the same number of steps
    assert first.prefill == (path == "cached")
    seconds, logits = [], [first.logits.to("cpu", torch.float32, copy=True)]
    with Clock() as clock:
        for _ in range(steps):
            result = session.step()
            seconds.append(result.seconds)
            logits.append(result.logits.to("cpu", torch.float32, copy=True))
    return Measure(first.seconds, seconds, session.ids[len(ids) :], clock.ratio, clock.others, logits)


# --weights modes: engine label, Model.load weights, Session(compile=)
WEIGHT_ENGINES = {
    "default": ("workbench", "auto", False),
    "blocks": ("workbench-blocks", "blocks", False),
    "blocks-compiled": ("workbench-blocks-compiled", "blocks", True),
    "quantized": ("workbench-quant", "quantized", False),
    "dequantized": ("workbench-deq", "dequantized", False),
    "compiled": ("workbench-compiled", "quantized", True),
}


def bench_workbench(
    name: str, steps: int, prompt_tokens: int, repeats: int, mode: str = "default",
    paths: tuple[str, ...] = ("cached", "uncached"),
) -> tuple[list[Row], list[int], Model | None]:
    """The rows of one --weights mode (a compiled step: cached only), the prompt ids, and the model (None when
    it could not load or run)."""
    engine, weights, compiled = WEIGHT_ENGINES[mode]
    paths = ("cached",) if compiled else paths
    log(f"[{name}] {engine}: loading ({weights} weights{', compiled step' if compiled else ''})")
    try:
        Model.load(name, device="cpu", dtype="float32", weights=weights)  # untimed: pages the file in, as llama.cpp's warm-up does
        model = Model.load(name, device="cpu", dtype="float32", weights=weights)
    except Exception as e:  # noqa: BLE001 - report, don't crash the whole run
        note = f"load failed: {first_line(e)}"
        return [Row(name, engine, p, prompt_tokens, note=note) for p in paths], [], None
    ids = bench_prompt(model, prompt_tokens)
    context = prompt_tokens + steps + 2
    if context > model.config.context_length:
        note = f"prompt + steps ({context}) exceed the model's context of {model.config.context_length}"
        return [Row(name, engine, p, prompt_tokens, note=note) for p in paths], [], None
    load_s = model.info.seconds
    log(f"[{name}] {engine}: loaded in {load_s:.2f} s ({model.n_params / 1e6:.1f} M params, "
        f"GGUF {model.gguf.size / 1e6:.1f} MB); warm-up")
    t0 = time.perf_counter()
    workbench_run(model, ids, min(steps, 4), context, "cached", compiled)  # warm-up: allocator, rope tables, first calls
    if compiled:
        log(f"[{name}] {engine}: warm-up with compilation took {time.perf_counter() - t0:.1f} s")

    rows = []
    for path in paths:
        log(f"[{name}] {engine}: {path}, {steps} steps" + (f", best of {repeats}" if repeats > 1 else ""))
        row = Row(name, engine, path, prompt_tokens, load_s=load_s, weights=model.info.weights)
        row.record(best_of(lambda: workbench_run(model, ids, steps, context, path, compiled), repeats))
        rows.append(row)
    return rows, ids, model


# --------------------------------------------------------------------------------------------- transformers


def bench_transformers(
    name: str, model: Model, ids: list[int], steps: int, repeats: int, paths: tuple[str, ...] = ("cached", "uncached")
) -> list[Row]:
    P = len(ids)
    rows = [Row(name, "transformers", p, P) for p in paths]

    def fail(note: str) -> list[Row]:
        for r in rows:
            r.note = note
        return rows

    try:
        import transformers
    except Exception as e:  # noqa: BLE001
        return fail(f"skipped: transformers not importable ({first_line(e)})")

    path = model.gguf.path
    extra = {}
    if model.config.arch == "gemma3":
        # transformers has no GGUF key for query_pre_attn_scalar and assumes 256 (real Gemma-3's head_dim);
        # the workbench and llama.cpp scale by 1/sqrt(head_dim). Same value for gemma3-270m, needed for tiny-gemma3.
        extra["query_pre_attn_scalar"] = model.config.head_dim
    log(f"[{name}] transformers: loading {path.name} (dequantizes to float32)")
    t0 = time.perf_counter()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra
        )
        hf.eval()
    except Exception as e:  # noqa: BLE001 - e.g. tiny-qwen3moe: its GGUF loader ignores key_length
        if "ignore_mismatched_sizes" in str(e):
            # transformers logs the per-tensor report; the exception itself only points at it.
            return fail("load failed: the file's tensor shapes don't match the config transformers derives from"
                        " its GGUF metadata (size mismatch; e.g. head_dim != hidden/heads, MoE expert sizes)")
        return fail(f"load failed: {first_line(e)}")
    load_s = time.perf_counter() - t0
    for r in rows:
        r.load_s = load_s

    params = inspect.signature(hf.forward).parameters
    kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if not kw:
        for r in rows:
            r.note = "no logits_to_keep: logits over all positions"
    # transformers 5.x renamed past_key_values to cache (the old name still works, with a deprecation warning).
    cache_name = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def cached(n: int) -> Measure:
        t0 = time.perf_counter()
        out = hf(input_ids=torch.tensor([ids]), use_cache=True, **kw)
        tok = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - t0
        past, tokens, seconds, logits = getattr(out, cache_name), [tok], [], [out.logits[0, -1].float().clone()]
        with Clock() as clock:
            for _ in range(n):
                t0 = time.perf_counter()
                out = hf(input_ids=torch.tensor([[tok]]), use_cache=True, **{cache_name: past}, **kw)
                past = getattr(out, cache_name)
                tok = int(out.logits[0, -1].argmax())
                seconds.append(time.perf_counter() - t0)
                tokens.append(tok)
                logits.append(out.logits[0, -1].float().clone())
        return Measure(prefill, seconds, tokens, clock.ratio, clock.others, logits)

    @torch.inference_mode()
    def uncached(n: int) -> Measure:
        seq, tokens, timed, logits = list(ids), [], [], []

        def forward() -> None:
            t0 = time.perf_counter()
            out = hf(input_ids=torch.tensor([seq]), use_cache=False, **kw)
            tok = int(out.logits[0, -1].argmax())
            timed.append(time.perf_counter() - t0)
            seq.append(tok)
            tokens.append(tok)
            logits.append(out.logits[0, -1].float().clone())

        forward()  # the first forward is over the bare prompt: the prefill's computation, reported as such
        with Clock() as clock:
            for _ in range(n):
                forward()
        return Measure(timed[0], timed[1:], tokens, clock.ratio, clock.others, logits)

    try:
        log(f"[{name}] transformers: loaded in {load_s:.2f} s; warm-up")
        cached(min(steps, 4))
        for row in rows:
            run = cached if row.path == "cached" else uncached
            log(f"[{name}] transformers: {row.path}, {steps} steps" + (f", best of {repeats}" if repeats > 1 else ""))
            row.record(best_of(lambda: run(steps), repeats))
    except Exception as e:  # noqa: BLE001
        for r in rows:
            if not r.generated:
                r.note = f"run failed: {first_line(e)}"
    finally:
        del hf
        gc.collect()
    return rows


# --------------------------------------------------------------------------------------------- llama.cpp


def bench_llama_cpp(name: str, model: Model, ids: list[int], steps: int, threads: int, repeats: int) -> list[Row]:
    P = len(ids)
    row = Row(name, "llama.cpp", "cached", P)
    try:
        import llama_cpp
        import numpy as np
    except Exception as e:  # noqa: BLE001
        row.note = f"skipped: llama_cpp not importable ({first_line(e)})"
        return [row]
    log(f"[{name}] llama.cpp: llama-cpp-python {importlib.metadata.version('llama-cpp-python')}")

    n_ctx = max(256, P + steps + 16)
    log(f"[{name}] llama.cpp: loading {model.gguf.path.name}")
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(
            model_path=str(model.gguf.path),
            n_ctx=n_ctx,
            n_batch=max(512, P),
            n_ubatch=max(512, P),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001
        row.note = f"load failed: {first_line(e)}"
        return [row]
    row.load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # Llama.eval with logits_all=False keeps no scores: read the last output row from the context (a view of
        # its buffer, which the next eval overwrites).
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def run(n: int) -> Measure:
        llm.reset()  # n_tokens = 0; the next eval drops the KV cells past it
        t0 = time.perf_counter()
        llm.eval(ids)
        out = last_logits()
        tok = int(out.argmax())
        prefill = time.perf_counter() - t0
        tokens, seconds, logits = [tok], [], [torch.tensor(out, dtype=torch.float32)]  # copies, after the timing
        with Clock() as clock:
            for _ in range(n):
                t0 = time.perf_counter()
                llm.eval([tok])
                out = last_logits()
                tok = int(out.argmax())
                seconds.append(time.perf_counter() - t0)
                tokens.append(tok)
                logits.append(torch.tensor(out, dtype=torch.float32))
        return Measure(prefill, seconds, tokens, clock.ratio, clock.others, logits)

    try:
        log(f"[{name}] llama.cpp: loaded in {row.load_s:.2f} s (mmap); warm-up")
        run(min(steps, 4))  # also pages the mmapped weights in
        log(f"[{name}] llama.cpp: cached, {steps} steps" + (f", best of {repeats}" if repeats > 1 else ""))
        row.record(best_of(lambda: run(steps), repeats))
    except Exception as e:  # noqa: BLE001
        row.note = f"run failed: {first_line(e)}"
    finally:
        llm.close()
    return [row]


# --------------------------------------------------------------------------------------------- exactness


def score_exactness(name: str, rows: list[Row], ids: list[int]) -> None:
    """Fill max_rel and min_cos of `name`'s rows that kept logits, then drop those logits. The reference is a
    dequantized float32 model of the same file (the exact path), teacher-forced on each row's own tokens: an
    engine whose tokens part from the others' after a near-tie is still compared position by position. It is
    loaded after every timed run of the model, so that it disturbs none of them, and freed at the end."""
    scored = [r for r in rows if r.model == name and r.logits]
    if not scored:
        return
    log(f"[{name}] exact reference: loading dequantized float32 weights, teacher-forcing {len(scored)} rows")
    try:
        exact = Model.load(name, device="cpu", dtype="float32", weights="dequantized")
    except Exception as e:  # noqa: BLE001 - the speeds stand without it
        log(f"[{name}] exact reference: load failed ({first_line(e)}); no Δ vs exact")
        exact = None
    P, refs = len(ids), {}
    try:
        for r in scored if exact is not None else ():
            key = tuple(r.tokens)
            if key not in refs:  # rows that agree share one forward
                seq = ids + r.tokens[:-1]
                # row P-1+k holds the logits that chose tokens[k] (k = 0: the prefill's token)
                refs[key] = exact.forward(torch.tensor(seq), 0, exact.new_cache(len(seq)))[P - 1 :].float().clone()
            ref, ours = refs[key], torch.stack(r.logits)
            assert ours.shape[0] == ref.shape[0], (r.engine, r.path, ours.shape, ref.shape)
            n = min(ours.shape[1], ref.shape[1])  # llama.cpp's n_vocab may leave out padded output rows
            ours, ref = ours[:, :n].double(), ref[:, :n].double()
            r.max_rel = float(((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max())
            r.min_cos = float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min())
    finally:
        for r in scored:
            r.logits = []
        del exact, refs
        gc.collect()


# --------------------------------------------------------------------------------------------- report

COLUMNS = [
    ("model", "model", "{}"),
    ("engine", "engine", "{}"),
    ("path", "path", "{}"),
    ("prompt_tokens", "prompt", "{}"),
    ("generated", "gen", "{}"),
    ("load_s", "load s", "{:.2f}"),
    ("prefill_s", "prefill s", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("ms_per_token", "ms/tok", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("cpu_pct", "cpu %", "{:.0f}"),
    ("other_cores", "others", "{:.1f}"),
    ("agree", "agree", "{}"),
    ("max_rel", "Δ vs exact", "{:.1e}"),
    ("note", "note", "{}"),
]


def format_table(rows: list[Row]) -> str:
    cells = [[head for _, head, _ in COLUMNS]]
    for r in rows:
        line = []
        for key, _, fmt in COLUMNS:
            v = getattr(r, key)
            line.append("-" if v is None or (key == "generated" and not v) else fmt.format(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    numeric = {"prompt_tokens", "generated", "load_s", "prefill_s", "tokens_per_s", "ms_per_token", "p50_ms", "cpu_pct", "other_cores", "agree", "max_rel"}
    out = []
    for n, line in enumerate(cells):
        parts = [
            c.rjust(w) if COLUMNS[i][0] in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths))
        ]
        out.append("  ".join(parts).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def ensure_llama_cpp() -> None:
    """Install llama-cpp-python==0.3.36 into this interpreter when it is missing: from ../shared/wheels when a
    wheel is there, else pip builds llama.cpp from source (CMake, ~8 minutes on 2 cores)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    cmd = [sys.executable, "-m", "pip", "install", "llama-cpp-python==0.3.36"]
    wheels = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "wheels")
    if os.path.isdir(wheels):
        cmd += ["--find-links", wheels]
    log("llama.cpp: not installed; running " + " ".join(cmd) + " (a source build takes minutes)")
    subprocess.run(cmd, check=False)
    importlib.invalidate_caches()


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3g}x" if a and b else "n/a"


def summary(name: str, rows: list[Row]) -> list[str]:
    def get(engine: str, path: str) -> Row | None:
        return next((r for r in rows if r.model == name and r.engine == engine and r.path == path and r.generated), None)

    def ran(engine: str, path: str = "cached") -> bool:  # the engine was asked for, whether or not it ran
        return any(r.model == name and r.engine == engine and r.path == path for r in rows)

    wc, wu = get("workbench", "cached"), get("workbench", "uncached")
    hc, hu, lc = get("transformers", "cached"), get("transformers", "uncached"), get("llama.cpp", "cached")
    tps = lambda r: r.tokens_per_s if r else None  # noqa: E731
    ratios: list[tuple[str, str]] = []  # (what, value), aligned below
    for mode, (engine, _, _) in WEIGHT_ENGINES.items():
        r = get(engine, "cached")
        if r and ran("llama.cpp"):
            what = f"default path ({engine}, auto → {r.weights})" if mode == "default" else f"{mode} ({engine})"
            ratios.append((f"{what} / llama.cpp (tok/s)", ratio(tps(r), tps(lc))))
    wq, wd = get("workbench-quant", "cached"), get("workbench-deq", "cached")
    if wq and wd:
        ratios.append(("workbench cached, quantized / dequantized (tok/s)", ratio(tps(wq), tps(wd))))
    if ran("transformers"):
        ratios.append(("workbench cached / transformers cached (tok/s)", ratio(tps(wc), tps(hc))))
    if hc and hu:
        ratios.append(("transformers cached / uncached speedup", ratio(tps(hc), tps(hu))))
    width = max((len(what) for what, _ in ratios), default=0) + 1
    lines = [f"{name}:"] + [f"  {(what + ':').ljust(width)} {value}" for what, value in ratios]
    if wc and lc and wc.load_s and lc.load_s:
        lines.append(f"  load: workbench {wc.load_s:.2f} s, llama.cpp {lc.load_s:.2f} s ({wc.load_s / lc.load_s:.2f}x)")
    exact = [r for r in rows if r.model == name and r.path == "cached" and r.max_rel is not None]
    if exact:
        lines.append("  exactness (max |Δlogit| / max |logit| vs dequantized float32, cached): "
                     + ", ".join(f"{r.engine} {r.max_rel:.1e}" for r in exact))
    if not ran("workbench", "uncached"):
        return lines
    if not (wc and wu):
        lines.append("  workbench cached / uncached speedup: n/a")
        return lines
    P, n = wc.prompt_tokens, wu.generated
    mean_tokens = P + (n + 1) / 2  # uncached timed step k (1..n) runs P + k tokens
    # Both paths ran one forward over the bare prompt (cached: the prefill; uncached: its first step): take the
    # faster as the prefill rate, one outlier on a shared machine would otherwise decide the expectation.
    prefill = min(wc.prefill_s, wu.prefill_s)
    per_token_prefill = prefill / P
    predicted_uncached = per_token_prefill * mean_tokens
    cached_step = 1 / wc.tokens_per_s
    expected = predicted_uncached / cached_step
    measured = wc.tokens_per_s / wu.tokens_per_s
    lines.append(f"  workbench cached / uncached speedup: measured {measured:.2f}x, expected {expected:.2f}x")
    lines.append(
        f"    expected = (prefill {prefill * 1000:.1f} ms / {P} tok) x {mean_tokens:.1f} tok per uncached step"
        f" = {predicted_uncached * 1000:.1f} ms, / {cached_step * 1000:.1f} ms per cached token; measured uncached"
        f" {1000 / wu.tokens_per_s:.1f} ms/step."
    )
    lines.append(
        "    An uncached step is a prefill of the whole sequence (mean P + (steps+1)/2 tokens), a cached step one token;"
        " batched prefill costs far less per token than a single-token step, so the speedup is well below the token count."
    )
    if P > 1 and prefill > cached_step:
        # A forward costs roughly fixed + per-token × T: the fixed part (reading every weight once, the Python
        # per-layer overhead) is about one cached step. The linear estimate above spreads it over the P tokens.
        slope = (prefill - cached_step) / (P - 1)
        affine = cached_step + slope * (mean_tokens - 1)
        lines.append(
            f"    affine estimate (cost ≈ one cached step + {slope * 1000:.2f} ms per extra token, fitted to the same"
            f" prefill): {affine * 1000:.1f} ms per uncached step, expected speedup {affine / cached_step:.2f}x."
        )
    return lines


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated bundled names or GGUF paths "
                    "(default smollm2-135m; gemma3-270m is opt-in: transformers alone takes ~35 s to load it)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--baselines", default="transformers,llama.cpp",
                    help="comma-separated subset of transformers,llama.cpp; empty for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each measurement this many times and keep the fastest (a shared machine is noisy)")
    ap.add_argument("--weights", default="default,quantized,dequantized",
                    help=f"comma-separated workbench modes to time, the first is the agree column's reference"
                         f" ({', '.join(WEIGHT_ENGINES)}; default: default,quantized,dequantized)")
    ap.add_argument("--paths", default="cached,uncached",
                    help="cached,uncached (default) or cached: the uncached runs (workbench, transformers) are slow")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install llama-cpp-python when it is missing")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of the table")
    args = ap.parse_args(argv)
    modes = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not modes or any(w not in WEIGHT_ENGINES for w in modes):
        ap.error(f"--weights takes a comma-separated subset of {', '.join(WEIGHT_ENGINES)}")
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if paths not in (("cached",), ("cached", "uncached"), ("uncached", "cached")):
        ap.error("--paths takes cached,uncached or cached (the cached runs are every comparison's reference)")
    paths = ("cached", "uncached") if len(paths) == 2 else paths

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in ENGINES]
    if unknown:
        ap.error(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if min(args.prompt_tokens, args.steps, args.threads, args.repeats) < 1:
        ap.error("--prompt-tokens, --steps, --threads and --repeats must be ≥ 1")

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    header = ["# decode benchmark"] + [f"# {k}: {v}" for k, v in info.items()]
    header.append(
        f"# prompt {args.prompt_tokens} tokens, {args.steps} timed decode steps (greedy, EOS ignored),"
        f" best of {args.repeats}, paths: {', '.join(paths)}, baselines: {', '.join(baselines) or 'none'}"
    )
    log("\n".join(header))

    if "llama.cpp" in baselines and not args.no_install:
        ensure_llama_cpp()
    rows: list[Row] = []
    for name in models:
        wb_rows, ids, model = bench_workbench(name, args.steps, args.prompt_tokens, args.repeats, modes[0], paths)
        rows += wb_rows
        for mode in modes[1:]:
            more, _, other = bench_workbench(name, args.steps, args.prompt_tokens, args.repeats, mode, paths)
            rows += more
            del other
        if model is None:
            for engine in baselines:
                rows.append(Row(name, engine, "cached", args.prompt_tokens, note="skipped: workbench could not load the model"))
            continue
        reference = wb_rows[0].tokens
        if "transformers" in baselines:
            rows += bench_transformers(name, model, ids, args.steps, args.repeats, paths)
        if "llama.cpp" in baselines:
            rows += bench_llama_cpp(name, model, ids, args.steps, args.threads, args.repeats)
        for r in rows:
            if r.model == name and r.tokens and reference:
                r.agree = agreement(r.tokens, reference)
        del model
        gc.collect()
        score_exactness(name, rows, ids)  # after every timed run of this model

    if hasattr(os, "getloadavg"):
        header.append("# loadavg at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))

    if args.json:
        skip = ("tokens", "logits")
        print(json.dumps([{f.name: getattr(r, f.name) for f in fields(r) if f.name not in skip} for r in rows], indent=2))
        return 0

    print("\n".join(header))
    print()
    print(format_table(rows))
    print()
    print("tok/s and ms/tok: mean over the timed single-token steps; p50 ms: their median. prefill s: the prompt's"
          " forward (uncached: its first full-sequence forward).\ncpu %: this process's CPU time / wall time over the"
          " timed steps. others: cores kept busy by other processes meanwhile (from /proc/stat).\nagree: leading"
          " generated tokens (the prefill's included) equal to workbench cached's.\nΔ vs exact: max over the"
          " row's logits (the prefill's and each step's) of max |Δlogit| / max |logit| against a dequantized float32"
          " model of the same file,\nteacher-forced on the row's own tokens (--json adds min_cos, the smallest cosine"
          " similarity).")
    busy = [r for r in rows if r.other_cores is not None and r.other_cores > 0.2]
    if busy:
        worst = max(r.other_cores for r in busy)
        print(f"WARNING: other processes kept up to {worst:.1f} of {os.cpu_count()} cores busy during {len(busy)} of the"
              " measurements above: those numbers are inflated, and more so with more torch/llama.cpp threads (a"
              " parallel region waits for its slowest, descheduled thread). Rerun on a quiet machine, with --repeats 3,"
              " or with --threads 1.")
    print()
    for name in models:
        print("\n".join(summary(name, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
