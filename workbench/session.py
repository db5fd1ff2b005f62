"""Session: a prompt, then one token per `step()`, on the cached or the uncached path over the same weights.

- cached: prefill the prompt in one batched forward, then each step feeds only the newest token and reads
  the K/V of everything before it from the cache.
- uncached: each step runs the whole sequence from scratch with a fresh cache, the way an engine without a
  KV cache works. It is the same forward pass, so any difference between the paths is a cache bug.
- both: the cached path chooses the token; the uncached path is run on the same tokens (teacher-forced), and
  every step records how far their logits are apart (the `equiv` frame).

A session always records the token and KV-cache rows of each step (host-side bookkeeping, no device work).
With `probes=True` it also records the per-head Q/K statistics, routing and layer health of each forward
(probes.py) and the top-k next-token candidates. Two teaching frames are opt-in on their own, since each costs
forward work: `attention=True` the newest token's attention pattern per layer and head (a second attention
per layer), `lens=True` the logit lens (one vocabulary-sized matmul per layer). Any of the three runs the
step eagerly through a StepProbe. `trace()` turns the records into polars frames.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from workbench.cache import context_full
from workbench.errors import GGUFError, InputError, NumericError, ReferenceFailed, ResourceError
from workbench.frames import FRAMES
from workbench.frames import PATHS as ROW_PATHS
from workbench.loading import describe_weights, free_memory, out_of_memory
from workbench.model import BREAKS, Model
from workbench.probes import StepProbe, unembed
from workbench.steps import StaticStep, fast_step
from workbench.trace import Recorder, Trace, versions

PATHS = (*ROW_PATHS, "both")  # what a session can run: one path, or both side by side
TOP_CANDIDATES = 5
MAX_SEED = 2**63 - 1  # torch.Generator takes 64-bit seeds; int64's range is what every tool agrees on
KV_MEMORY_SHARE = 0.8  # the share of the free memory a session's KV caches may take
TIMING_BUDGET_S = 0.05  # at most this long spent repeating one step's forward for its timing (timing_repeats)


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (the default); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            0 <= self.temperature < float("inf")
        ):
            raise InputError(f"temperature must be a finite number ≥ 0, not {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top-k must be a whole number ≥ 0 (0 switches it off), not {self.top_k}.")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], not {self.top_p}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"the seed must be a whole number from 0 to {MAX_SEED}, not {self.seed}.")

    def choose(self, logits: torch.Tensor, generator: torch.Generator, n_valid: int | None = None) -> int:
        """The next token from logits [vocab]. Only ids below `n_valid` (the tokenizer's size, when the
        embedding has more rows) can win. NaN never wins; +inf wins outright; no temperature overflows
        (scores are taken relative to the largest one before dividing, in float64)."""
        logits = logits.double()
        if n_valid is not None and n_valid < logits.numel():
            logits = logits[:n_valid]
        logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        top = logits.max()
        if self.temperature == 0 or not torch.isfinite(top):
            return int(torch.argmax(logits))  # greedy; also +inf (it wins) and all -inf (nothing to weigh)
        scores = (logits - top) / self.temperature  # ≤ 0, the best is exactly 0: exp never overflows
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, -1)
            # Drop a token when the tokens before it already reach top_p; the first token always stays.
            drop = probs.cumsum(-1) - probs >= self.top_p
            scores = scores.index_put((order[drop],), torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
        probs = torch.softmax(scores, -1).cpu()
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class PathRun:
    """One path's forward at one step."""

    logits: torch.Tensor  # [vocab] float32, on the model's device
    seconds: float
    n_tokens: int  # rows the forward computed (prompt at prefill, 1 cached, the whole sequence uncached)


@dataclass
class StepResult:
    step: int
    token_id: int
    position: int  # where the new token sits in the sequence
    prefill: bool  # the cached path ran the prompt's prefill at this step
    runs: dict[str, PathRun]
    stop: str | None = None  # "eos" | "context" when generation should end after this token
    warning: str | None = None  # something that went wrong beside the step (the reference engine failed)

    @property
    def primary(self) -> PathRun:
        return self.runs["cached"] if "cached" in self.runs else self.runs["uncached"]

    @property
    def logits(self) -> torch.Tensor:
        return self.primary.logits

    @property
    def seconds(self) -> float:
        return self.primary.seconds


@dataclass
class Session:
    model: Model
    prompt_ids: list[int]
    path: str = "cached"
    sampling: Sampling = field(default_factory=Sampling)
    context: int | None = None  # positions the session may fill; default: the model's context, capped at 4096
    probes: bool = False
    attention: bool = False  # the `attention` frame: the newest token's pattern (a second attention per layer)
    lens: bool = False  # the `lens` frame: every layer through the final norm and head (a vocab matmul per layer)
    breaks: frozenset[str] = frozenset()
    reference: str | None = None  # "llama.cpp" | "llama.cpp-f32" (reference.ENGINES): run it beside ours on the same tokens
    cuda_graphs: bool = True  # plain cached decode steps on CUDA replay a captured graph (steps.DecodeGraph)
    compile: bool = False  # plain cached decode steps run torch.compile'd (CPU: steps.CompiledStep, ~1 min once;
    # CUDA: the compiled step inside the graph)
    timing_repeats: int = 1  # a decode step's recorded time: the best of this many runs of its forward (it is
    # idempotent: the same K/V rewritten at the same position, or a fresh cache), within TIMING_BUDGET_S of repeats

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise InputError(f"unknown path '{self.path}'; choose one of: {', '.join(PATHS)}.")
        self.breaks = frozenset(self.breaks)
        unknown = sorted(self.breaks - BREAKS.keys())
        if unknown:
            raise InputError(f"unknown break '{unknown[0]}'; choose from: {', '.join(BREAKS)}.")
        cfg = self.model.config
        if not self.prompt_ids:
            raise InputError("the prompt is empty and this model adds no BOS token: give at least one token.")
        self.model.check_token_ids(self.prompt_ids)
        n_tokens = self.model.tokenizer.vocab_size  # may be fewer than the embedding's rows
        beyond = [t for t in self.prompt_ids if t >= n_tokens]
        if beyond:
            raise InputError(f"token id {beyond[0]} has an embedding row but no token in the tokenizer (0..{n_tokens - 1}).")
        capacity = self.context or min(cfg.context_length, 4096)
        if capacity > cfg.context_length:
            raise InputError(f"a context of {capacity} exceeds the model's {cfg.context_length} positions.")
        if len(self.prompt_ids) >= capacity:
            raise InputError(
                f"the prompt has {len(self.prompt_ids)} tokens, which leaves no room to generate in a context of {capacity}."
            )
        self.capacity = capacity
        self.ids: list[int] = list(self.prompt_ids)
        self.paths = ROW_PATHS if self.path == "both" else (self.path,)
        self._check_kv_memory(capacity)
        self.cache = self.model.new_cache(capacity) if "cached" in self.paths else None
        self.n_fed = 0  # how many of self.ids the cached path has run through the model
        self.generator = torch.Generator().manual_seed(self.sampling.seed)
        self.records = Recorder()  # the trace frames' rows (trace.SCHEMAS)
        self.n_steps = 0
        self.reference_engine = None
        self.static_step: StaticStep | None = None  # the graph or compiled step plain cached steps run on, once built
        self.reference_error: str | None = None  # why the reference engine stopped, once it has
        if self.reference is not None:
            from workbench.reference import ReferenceEngine

            try:
                self.reference_engine = ReferenceEngine(self.reference, self.model, capacity)
            except ReferenceFailed as exc:  # llama.cpp refused the file or crashed: decode on without it
                self.reference_error = str(exc)

    def _check_kv_memory(self, capacity: int) -> None:
        """ResourceError when the KV caches of this context would not fit in KV_MEMORY_SHARE of the free memory
        (the uncached path builds a second cache, of the sequence, at every step)."""
        m = self.model
        per_token = m.config.kv_bytes_per_token(m.dtype.itemsize)
        need = capacity * per_token * len(self.paths)
        free = free_memory(m.device)
        if free is not None and need > KV_MEMORY_SHARE * free:
            raise ResourceError(
                f"a context of {capacity} positions needs {need / 2**30:.1f} GiB of KV cache "
                f"({per_token} bytes per position), more than {KV_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free "
                f"on {m.device}; ask for a shorter context (fewer steps)."
            )

    @property
    def n_generated(self) -> int:
        return len(self.ids) - len(self.prompt_ids)

    def _run(self, path: str) -> tuple[PathRun, StepProbe | None, int]:
        """One forward of `path` over what it has not seen yet; returns its logits and its probe."""
        m = self.model
        if path == "cached":
            start, new = self.n_fed, self.ids[self.n_fed :]
            cache = self.cache
            rows = slice(None)
        else:
            start, new = 0, self.ids
            cache = m.new_cache(len(self.ids))
            rows = slice(None) if self.n_steps == 0 else slice(-1, None)
        first_row = start if rows.start is None else len(self.ids) - 1
        probe = self._new_probe(rows)
        t0 = time.perf_counter()
        static = path == "cached" and len(new) == 1 and probe is None and not self.breaks  # probes, breaks: eager
        if static and self.static_step is None:
            self.static_step = fast_step(m, cache, start, self.cuda_graphs, self.compile)
            t0 = time.perf_counter()  # a capture or compilation is a one-off, not this step's time
        if static and self.static_step is not None:
            logits = self.static_step.step(new[0], start)[-1].clone()
        else:
            logits = m.forward(torch.tensor(new, device=m.device), start, cache, probe, last_only=True, breaks=self.breaks)[-1]
        if m.device.type == "cuda":
            torch.cuda.synchronize(m.device)
        seconds = time.perf_counter() - t0
        if self.timing_repeats > 1 and self.n_steps > 0:  # a decode step (not the prefill): one sample is noise on a
            # busy machine, so the best of a few
            seconds = min(seconds, self._repeat_timing(path, new, start, cache, static, rows, seconds))
        if path == "cached":
            self.n_fed = len(self.ids)
        self._record_kv(path, cache)
        return PathRun(logits, seconds, len(new)), probe, first_row

    def _new_probe(self, rows: slice) -> StepProbe | None:
        """The probe one forward records through (None: a forward with nothing recorded)."""
        if not (self.probes or self.attention or self.lens):
            return None
        m = self.model
        return StepProbe(rows, min(TOP_CANDIDATES, m.config.vocab_size), statistics=self.probes,
                         attention=self.attention, lens=unembed(m) if self.lens else None)

    def _repeat_timing(self, path: str, new: list[int], start: int, cache, static: bool, rows: slice, spent: float) -> float:
        """The best time of up to timing_repeats − 1 more runs of this decode step's forward, as it ran (the same
        cache position rewritten with the same K/V, or a fresh cache; a probe of the same kind, thrown away),
        stopping once TIMING_BUDGET_S has been spent."""
        m, best = self.model, float("inf")
        tokens = torch.tensor(new, device=m.device)
        for _ in range(self.timing_repeats - 1):
            if spent > TIMING_BUDGET_S:
                break
            probe = self._new_probe(rows)
            fresh = cache if path == "cached" else m.new_cache(len(self.ids))
            t0 = time.perf_counter()
            if static and self.static_step is not None:
                self.static_step.step(new[0], start)
            else:
                m.forward(tokens, start, fresh, probe, last_only=True, breaks=self.breaks)
            if m.device.type == "cuda":
                torch.cuda.synchronize(m.device)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
        return best

    def step(self) -> StepResult:
        """Choose and append one token. All or nothing: if anything fails inside (sampling, non-finite logits,
        an interrupt, memory), the session is put back as it was before the step and the error re-raised, so
        the next step works. Raises InputError when the context is already full, NumericError when the logits
        are not finite (naming where NaN/Inf first appeared), ResourceError when memory runs out."""
        if len(self.ids) >= self.capacity:
            raise context_full(len(self.ids), self.capacity)
        saved = self._snapshot()
        try:
            return self._step()
        except BaseException as exc:
            self._restore(saved)
            if isinstance(exc, RuntimeError) and out_of_memory(exc):
                raise ResourceError(
                    f"{self.model.device} ran out of memory during step {saved['n_steps']}; the session is as it was "
                    "before it (try a shorter context, path cached, or a smaller dtype)."
                ) from None
            raise

    def _snapshot(self) -> dict:
        """What a step changes: restored by _restore when the step fails (the cache's bytes past its lengths
        are rewritten by the next step, so its lengths are all that needs keeping)."""
        return {"n_ids": len(self.ids), "fed": self.n_fed, "n_steps": self.n_steps, "rng": self.generator.get_state(),
                "records": {name: len(getattr(self.records, name)) for name in FRAMES},
                "cache": list(self.cache.lengths) if self.cache is not None else None, "static_step": self.static_step}

    def _restore(self, saved: dict) -> None:
        del self.ids[saved["n_ids"]:]
        self.n_fed, self.n_steps, self.static_step = saved["fed"], saved["n_steps"], saved["static_step"]
        self.generator.set_state(saved["rng"])
        for name, n in saved["records"].items():
            del getattr(self.records, name)[n:]
        if self.cache is not None:
            self.cache.lengths = list(saved["cache"])

    def _step(self) -> StepResult:
        step, position = self.n_steps, len(self.ids)
        prefill = "cached" in self.paths and self.n_fed == 0
        runs: dict[str, PathRun] = {}
        probes: dict[str, tuple[StepProbe, int]] = {}
        for path in self.paths:
            runs[path], probe, first_row = self._run(path)
            if probe is not None:
                probes[path] = (probe, first_row)
        for path, run in runs.items():
            if not bool(torch.isfinite(run.logits).all()):
                raise NumericError(self._non_finite_message(step, path))
        primary = runs[self.paths[0]]
        token = self.sampling.choose(primary.logits, self.generator, self.model.tokenizer.vocab_size)
        self.ids.append(token)
        self.n_steps += 1
        stop = None
        if token in self.model.tokenizer.eos_ids:
            stop = "eos"
        elif len(self.ids) >= self.capacity:
            stop = "context"
        result = StepResult(step, token, position, prefill, runs, stop)
        self._record(result, probes)
        return result

    def _non_finite_message(self, step: int, path: str) -> str:
        """Where NaN/Inf first appear, found by an uncached forward over the tokens this step fed."""
        m = self.model
        where = m.locate_non_finite(self.ids, self.breaks)
        if where is None:
            found = "an uncached forward over the same tokens is finite, so the cached path's state is at fault"
        elif where == "logits":
            found = "every layer is finite: they first appear in the output head's logits"
        else:
            found = f"they first appear at {where} (layer {where.split('.')[1]})" if where.startswith("blocks.") else f"they first appear at {where}"
        hint = "; float16 overflows on this model: try dtype bfloat16 or float32" if m.dtype == torch.float16 else ""
        return (f"step {step}: the {path} path's logits hold NaN or Inf; {found}{hint}. "
                "Generation stops here; the session is as it was before this step.")

    def generate(self, steps: int) -> Iterator[StepResult]:
        """Up to `steps` tokens; stops after EOS or when the context is full (the last result says which)."""
        if steps < 0:
            raise InputError(f"steps must be ≥ 0, not {steps}.")
        for _ in range(steps):
            result = self.step()
            yield result
            if result.stop:
                return

    # --- records -------------------------------------------------------------------------------------------

    def _record_kv(self, path: str, cache) -> None:
        self.records.extend("kv", cache.layer_stats(), step=self.n_steps, path=path)

    def _record(self, result: StepResult, probes: dict[str, tuple[StepProbe, int]]) -> None:
        r, tok = self.records, self.model.tokenizer
        piece = tok.piece(result.token_id)
        collected = {}
        for path, (probe, first_row) in probes.items():
            probe.candidates(result.runs[path].logits)
            collected[path] = probe.collect(first_row)  # the step's one device → host transfer for this path
        for path, run in result.runs.items():
            rec = collected.get(path)
            r.add("tokens", step=result.step, position=result.position, token_id=result.token_id, piece=piece,
                  path=path, seconds=run.seconds, tokens_per_s=1.0 / run.seconds if run.seconds > 0 else 0.0,
                  n_tokens=run.n_tokens, prefill=result.prefill and path == "cached",
                  top_ids=rec.top_ids if rec and self.probes else None,
                  top_probs=rec.top_probs if rec and self.probes else None)
        for path, rec in collected.items():
            for frame in ("qk", "routing", "shared", "layers", "lens"):
                r.extend(frame, getattr(rec, frame), step=result.step, path=path)
            if rec.attention:
                r.extend_columns("attention", rec.attention, step=result.step, path=path)
        if len(result.runs) == 2:
            a, b = result.runs["cached"].logits, result.runs["uncached"].logits
            diff = (a - b).abs().max()
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
            r.add("equiv", step=result.step, position=result.position, max_abs_diff=float(diff),
                  max_abs_logit=float(b.abs().max()), cosine=float(cosine), argmax_equal=bool(a.argmax() == b.argmax()))
        if self.reference_engine is not None:
            fed = self.ids[:-1]  # the reference sees the same tokens our forward saw at this step
            try:
                ref = self.reference_engine.logits_after(fed)
            except ReferenceFailed as exc:  # it crashed or refused: our step stands, the reference is off
                self.reference_engine, self.reference_error = None, str(exc)
                result.warning = f"the {self.reference} reference is off: {exc}"
                return
            ours = result.logits.float().cpu()
            k = min(5, ours.numel(), ref.numel())
            r.add("reference", step=result.step, position=result.position, engine=self.reference,
                  cosine=float(torch.nn.functional.cosine_similarity(ours, ref, dim=0)),
                  top1_equal=bool(ours.argmax() == ref.argmax()),
                  ours_top5=ours.topk(k).indices.tolist(), ref_top5=ref.topk(k).indices.tolist())

    def trace(self, meta: dict | None = None) -> Trace:
        """The records as frames, with the run metadata (`meta` adds to it)."""
        return Trace.from_records(self.records, self.run_meta() | (meta or {}))

    def run_meta(self) -> dict:
        """Everything a chart or a reader of the trace needs besides the frames."""
        m = self.model
        return {
            "model_file": str(m.gguf.path), "model_sha256": _sha256_or_none(m.gguf), "arch": m.config.arch,
            "config": m.config.as_dict(), "device": str(m.device), "dtype": str(m.dtype).removeprefix("torch."),
            "weights": m.info.weights, "arithmetic": describe_weights(m.info.weights, m.dtype),
            "equiv_tolerance": m.equivalence_tolerance, "threads": torch.get_num_threads(),
            "kv_element_size": m.dtype.itemsize, "kv_bytes_per_token": m.config.kv_bytes_per_token(m.dtype.itemsize),
            # what an MHA cache of the same model would hold (every query head's K and V): MLA's lesson
            "mha_bytes_per_token": m.config.mha_bytes_per_token(m.dtype.itemsize),
            "reference": self.reference, "reference_error": self.reference_error,
            "prompt_ids": list(self.prompt_ids), "prompt_pieces": [m.tokenizer.piece(t) for t in self.prompt_ids],
            "path": self.path, "primary_path": self.paths[0], "breaks": sorted(self.breaks),
            "probes": self.probes, "attention": self.attention, "lens": self.lens,  # which frames were taken
            "sampling": {"temperature": self.sampling.temperature, "top_k": self.sampling.top_k,
                         "top_p": self.sampling.top_p, "seed": self.sampling.seed},
            "versions": versions(),
        }


def _sha256_or_none(gguf) -> str | None:
    """The loaded file's sha256, or None once the file changed on disk (the model keeps what it read)."""
    try:
        return gguf.sha256()
    except GGUFError:
        return None
