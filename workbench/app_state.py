"""What the app's browser tabs share: the loaded model, kept once per server process.

`marimo run` serves every tab (marimo session) from the one server process, each tab's kernel a thread
in it (run mode; edit mode and multi-notebook runs with `isolate_apps` use processes instead). So a module
the notebook imports is imported once and seen by every tab: MODELS below is that one place. The decode
state (`Session`) stays per tab; a `Model` is only read while decoding, so tabs can share it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.loading import set_threads


def model_key(source: str, device: str, dtype: str, weights: str) -> tuple:
    """What makes two loads the same model: the file (a path resolved, with its size and mtime, so a rewritten
    file loads again; a bundled model by its name), the device, the dtype and the weights mode, as asked."""
    path = Path(source).expanduser()
    try:
        st = path.stat()
        if path.is_file():
            return (str(path.resolve()), st.st_size, st.st_mtime_ns), device, dtype, weights
    except (OSError, ValueError):
        pass
    return source, device, dtype, weights


class ModelShelf:
    """Loaded models by key, shared by every tab of the app; loads run one at a time under a lock.

    The shelf holds at most `cap` models (one by default); loading another lets the oldest go. The one
    before stays held until the new load succeeds, so a failed load loses nothing (and for that moment two
    are in memory). A tab that still shows a model the shelf let go keeps it alive until it loads another or
    is closed (marimo ends a tab's session `--session-ttl`, 120 s, after it disconnects); while any tab holds
    a model, asking for its key again returns that same object, so there is never a second copy of a model.
    """

    def __init__(self, cap: int = 1) -> None:
        if cap < 1:
            raise ValueError("the shelf must hold at least one model")
        self.cap = cap
        self.loads = 0  # how many times load() ran: a model shared by tabs is loaded once
        self._lock = threading.Lock()
        self._held: OrderedDict[Hashable, object] = OrderedDict()  # newest last
        self._alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # every model some tab still uses

    def get(self, key: Hashable, load: Callable[[], object]):
        """The model for `key`, calling `load()` only when no tab has it; load's exceptions propagate."""
        with self._lock:
            model = self._held.get(key)
            if model is None:
                model = self._alive.get(key)
            if model is None:
                model = load()
                self.loads += 1
                self._alive[key] = model
            self._held[key] = model
            self._held.move_to_end(key)
            while len(self._held) > self.cap:
                self._held.popitem(last=False)
            return model

    def held(self) -> int:
        """Models the shelf itself keeps (at most `cap`)."""
        return len(self._held)

    def alive(self) -> int:
        """Models still in memory because the shelf or some tab holds them."""
        return len(self._alive)


MODELS = ModelShelf(cap=1)

_ACCELERATOR = threading.RLock()


def device_turn(device) -> AbstractContextManager:
    """Hold this around whatever a tab runs or allocates on `device` (a load, a new session, a step): on an
    accelerator one tab at a time, since a CUDA graph being captured (model.DecodeGraph, the first plain step
    of a session) is broken by work another thread launches meanwhile; on the CPU nothing (tabs share the
    cores). `device` as asked ("auto" counts as an accelerator) or a torch.device."""
    return nullcontext() if str(device) == "cpu" else _ACCELERATOR


def describe_error(exc: BaseException) -> str:
    """One sentence for a callout: a WorkbenchError's own message (written for the user), anything else as
    "TypeName: first line of its message"."""
    text = str(exc).strip()
    if isinstance(exc, WorkbenchError) and text:
        return text
    first = text.splitlines()[0].strip() if text else "(no message)"
    if len(first) > 400:
        first = first[:400] + "…"
    return f"{type(exc).__name__}: {first}"


def advance(session, n: int, threads: int, progress: Callable[[object], None],
            turn: Callable[[], AbstractContextManager] | None = None, stop: threading.Event | None = None) -> tuple[str | None, str | None]:
    """Up to `n` steps of one tab's session, `progress(session)` after each: (why it stopped early, "eos" or
    "context", else None; what failed, as one sentence, else None). A failed step leaves the session as it
    was before it (Session.step), so the steps before it stay and the next one goes on from there. Each step
    runs inside `turn()` when given (a lock's turn); a set `stop` event ends the loop before the next step."""
    set_threads(threads)  # torch keeps the count per OS thread: each tab's kernel thread sets its own
    try:
        for _ in range(n):
            if stop is not None and stop.is_set():
                return None, None
            with turn() if turn else nullcontext(), device_turn(session.model.device):  # on a GPU one tab's step at a time
                result = session.step()
            progress(session)
            if result.stop:
                return result.stop, None
    except Exception as exc:  # anything at all, not only WorkbenchError
        return None, describe_error(exc)
    return None, None


class StepLock:
    """The lock between a run's steps and the tab's redraws. `with lock:` (a redraw reading the session) goes
    before any step still to start: `with lock.step():` waits while a reader waits. threading.Lock is not fair,
    and a run of fast steps that releases and re-takes it in a loop can starve a redraw until the run ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turn = threading.Condition()
        self._readers = 0  # waiting for or holding the lock

    def __enter__(self) -> StepLock:
        with self._turn:
            self._readers += 1
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        with self._turn:
            self._readers -= 1
            self._turn.notify_all()

    @contextmanager
    def step(self):
        with self._turn:
            self._turn.wait_for(lambda: self._readers == 0)
        with self._lock:
            yield


class Runner:
    """One tab's decoding in the background. Step ×8 and Run hand their steps to a thread of their own, so the
    tab's kernel stays free while it decodes: Stop and Reset are clicks it can take, and the panels redraw
    from `trace()` as the steps land (the app polls with mo.ui.refresh). A plain thread, not mo.Thread: the
    cell that starts it re-runs on every redraw, and a mo.Thread is told to exit when its cell re-runs.

    Each step runs under `lock` (a StepLock), and `trace()` takes the same lock, so a redraw never reads a step
    half done, and never waits for more than the step in progress.
    A failed step leaves the session as it was (Session.step) and ends the run; `outcome` then says why it
    ended: (stop reason — "eos", "context" or "stopped" — or None, failure sentence or None).
    """

    def __init__(self) -> None:
        self.lock = StepLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.session = None
        self.outcome: tuple[str | None, str | None] = (None, None)
        self.goal = 0  # steps asked for by the current (or last) run
        self.done = 0  # of those, steps taken
        self._clicks: dict[str, int] = {}

    def clicked(self, **counts: int) -> set[str]:
        """The buttons clicked since the last call, from their click counters (a True counts as one click):
        the app's step cell re-runs on every redraw, and only a new click may start anything."""
        new = {name for name, n in counts.items() if int(n or 0) > self._clicks.get(name, 0)}
        self._clicks.update({name: int(n or 0) for name, n in counts.items()})
        return new

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, session, n: int, threads: int) -> bool:
        """Decode up to `n` steps of `session` in the background; False (and nothing started) while a run is on."""
        if self.running:
            return False
        self._stop.clear()
        self.session, self.goal, self.done, self.outcome = session, n, 0, (None, None)

        def work() -> None:
            set_threads(threads)  # torch keeps the count per OS thread

            def progress(_session) -> None:
                self.done += 1

            outcome = advance(session, n, threads, progress, turn=self.lock.step, stop=self._stop)
            self.outcome = ("stopped", None) if self._stop.is_set() and outcome == (None, None) else outcome

        self._thread = threading.Thread(target=work, name="workbench-run", daemon=True)
        self._thread.start()
        return True

    def step_here(self, session, threads: int) -> None:
        """One step of `session` in the calling thread (Step: no thread is worth starting for it), under the
        same lock, its outcome kept as a run's is."""
        self.session = session
        self.outcome = advance(session, 1, threads, lambda s: None, turn=self.lock.step)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the run to end after the step it is in, and wait for that (at most `timeout` s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def trace(self, session, **meta):
        """session.trace(), never in the middle of one of this runner's steps."""
        with self.lock:
            return session.trace(meta or None)


_EXACT: dict[tuple, object] = {}  # the exact copy compare runs on, per file (one at a time)


def exact_model(model):
    """`model` itself when it runs an exact path (float32, dequantized or blocks), else a CPU float32 dequantized
    copy of its file, loaded once: compare holds other engines to the exact path."""
    import torch

    from workbench.loading import EXACT_MODES
    from workbench.model import Model

    if model.dtype == torch.float32 and model.info.weights in EXACT_MODES:
        return model
    key = (str(model.gguf.path), model.gguf.size)
    if key not in _EXACT:
        _EXACT.clear()
        _EXACT[key] = Model.load(model.gguf.path, device="cpu", dtype="float32", weights="dequantized")
    return _EXACT[key]


COMPARE_SOURCES = ("our engine with a break", "llama.cpp", "llama.cpp-f32", "transformers", "a dump file")


def compare_with(model, tokens: list[int], n_prompt: int, source: str, break_name: str | None = None,
                 dump_file: tuple[str, bytes] | None = None):
    """(their Dump, the Comparison against our exact path, the exact model) for the app's Compare panel: the
    dump of `source` on `tokens` (a built-in engine) or the uploaded file (name, bytes). Anything that goes wrong
    is a WorkbenchError with one sentence (dump.DumpError, ReferenceFailed, InputError)."""
    import tempfile

    from workbench.compare import compare
    from workbench.dump import Dump, ours
    from workbench.errors import InputError

    exact = exact_model(model)
    if source == "a dump file":
        if dump_file is None:
            raise InputError("choose a dump file (.safetensors or .npz) first.")
        name, data = dump_file
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_bytes(data)
            dump = Dump.read(path)
    elif source == "our engine with a break":
        if not break_name:
            raise InputError("choose the break to dump our engine with.")
        dump = ours(exact, tokens, n_prompt, breaks=frozenset({break_name}))
    elif source == "transformers":
        from workbench.hf import transformers_dump

        dump = transformers_dump(model.gguf.path, tokens, n_prompt)
    elif source in ("llama.cpp", "llama.cpp-f32"):
        from workbench.reference import llama_cpp_dump

        dump = llama_cpp_dump(exact, tokens, n_prompt, engine=source)
    else:
        raise InputError(f"unknown source '{source}'; choose one of: {', '.join(COMPARE_SOURCES)}.")
    return dump, compare(exact, dump), exact


def compare_sentence(result) -> str:
    """The first divergence in one sentence, and the suspects."""
    fd = result.first_divergence
    engine = result.engine or "the dump"
    if fd is None:
        return (f"No divergence: at every capture point {engine} introduces no more than its kind of operation does "
                "elsewhere in the same dump.")
    where = ", ".join(x for x in (f"layer {fd.layer}" if fd.layer is not None else "",
                                  f"head {fd.head}" if fd.head is not None else "",
                                  f"position {fd.row}" if fd.row is not None else "") if x)
    local = "—" if fd.local_error is None else f"{fd.local_error:.2e}"
    suspects = (f" Likeliest cause: {', '.join(result.suspects)}." if result.suspects
                else " None of the break switches reproduces it.")
    return (f"{engine} first diverges at step {fd.step}, {fd.capture} ({where}): it introduces a local error of {local} "
            f"where this kind of operation ({fd.kind}) stays under {fd.threshold:.1e}; end to end {fd.end_to_end_error:.2e}."
            + suspects)


def our_tensor(exact, dump, step: int, capture: str):
    """Our clean tensor at one point of a dump's run (its last rows, as many as theirs): what the Compare panel
    shows beside theirs."""
    from workbench.dump import ours

    mine = ours(exact, dump.tokens[: dump.first_position(step) + dump.rows(step)], dump.n_prompt, names=[capture])
    return mine.tensors[(step, capture)][-dump.tensors[(step, capture)].shape[0]:]


AB_KINDS = ("break", "weights", "dtype", "file")  # what run B changes against run A
_B_MODELS: dict[tuple, object] = {}  # the other model of an A/B run, one at a time (A's stays on the shelf)


def ab_runs(model, prompt_ids: list[int], sampling, steps: int, kind: str, value: str, breaks: frozenset[str] = frozenset(),
            threads: int = 1, device: str = "auto"):
    """Two runs of `steps` steps side by side, both paths, probes on: A as the sidebar has it, B with one thing
    changed (`kind` in AB_KINDS: a break switched on, another weights mode, another dtype, another file: e.g. a
    second quantization of the same model). → (trace A, trace B, trace.diff of the two). Errors are one
    sentence (InputError, or what loading B raised)."""
    from workbench.errors import InputError
    from workbench.model import BREAKS, Model
    from workbench.session import Session
    from workbench.trace import diff

    if kind not in AB_KINDS:
        raise InputError(f"unknown A/B change '{kind}'; choose one of: {', '.join(AB_KINDS)}.")
    if not isinstance(steps, int) or not 1 <= steps <= 256:
        raise InputError(f"the A/B run takes 1 to 256 steps, not {steps}.")
    model_b, breaks_b = model, set(breaks)
    if kind == "break":
        if value not in BREAKS:
            raise InputError(f"unknown break '{value}'; choose from: {', '.join(BREAKS)}.")
        breaks_b.add(value)
    else:
        source = value.strip() if kind == "file" else str(model.gguf.path)
        if not source:
            raise InputError("give the path of the other GGUF file for run B.")
        dtype = value if kind == "dtype" else str(model.dtype).removeprefix("torch.")
        weights = value if kind == "weights" else model.info.weights
        key = (source, str(model.device), dtype, weights)
        if key not in _B_MODELS:
            _B_MODELS.clear()
            _B_MODELS[key] = Model.load(source, device=str(model.device) if device == "auto" else device, dtype=dtype,
                                        weights=weights)
        model_b = _B_MODELS[key]
    traces = []
    set_threads(threads)
    for m, br, label in ((model, frozenset(breaks), "A"), (model_b, frozenset(breaks_b), "B")):
        with device_turn(m.device):
            session = Session(m, list(prompt_ids), path="both", sampling=sampling, probes=True,
                              context=min(m.config.context_length, len(prompt_ids) + steps + 1), breaks=br)
            for result in session.generate(steps):
                if result.stop:
                    break
        traces.append(session.trace({"ab_run": label}))
    return traces[0], traces[1], diff(traces[0], traces[1])


def ab_table(diffs) -> "pl.DataFrame":
    """trace.diff's result as one row per frame: where A and B first part ways, and the largest difference."""
    import polars as pl

    rows = []
    for d in diffs:
        worst = d.largest.sort("max_abs_diff", descending=True).row(0, named=True) if d.largest.height else None
        first = d.first
        rows.append({
            "frame": d.frame, "rows compared": d.rows_compared,
            "first difference": "none within tolerance" if first is None else
            ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("column", "a", "b")) + f": {first['column']} "
            f"{_short(first['a'])} (A) vs {_short(first['b'])} (B)",
            "largest |Δ|": None if worst is None else f"{worst['max_abs_diff']:.3g} ({worst['column']} at {worst['at']})",
        })
    return pl.DataFrame(rows, schema={"frame": pl.String, "rows compared": pl.Int64, "first difference": pl.String,
                                      "largest |Δ|": pl.String})


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"
