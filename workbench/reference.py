"""llama.cpp beside our engine: the same GGUF, the same tokens, its logits per step (optional dependency).

llama.cpp is the reference implementation of GGUF. Feeding it exactly the tokens our forward saw lets a user
see at which step the two engines part ways. Two engines (ENGINES):
- "llama.cpp": the file as it is. Its CPU matmuls quantize activations to 8 bits, so cosines of 0.99-0.9999
  are normal on real models; what matters is where they fall and whether top-1 agrees.
- "llama.cpp-f32": an exact reference. llama.cpp runs on an F32 copy of the file (every tensor dequantized by
  gguf-py, written back with GGUFWriter; made once into the model cache) with an F32 KV cache, so both
  engines do float32 arithmetic on the same weights: with our dequantized float32 path the logits agree to a
  cosine of ≥ 0.999999, and any larger difference is a bug on one side. One exception is llama.cpp's own:
  its CPU GELU reads a float16 table (ggml-cpu's GGML_GELU_FP16), so on GELU models (gemma3) its "exact"
  logits sit ~4e-4 of max |logit| from ours, while ours sit 1.4e-6 from HF transformers in float32 (measured
  on Gemma-3-270M); SiLU models agree to ~3e-6.

llama.cpp runs in a worker process, because a crash there must cost the reference, not pytest or the app: a
llama-cpp-python built with native CPU flags segfaults in every decode on some CPUs (Intel Xeons with AMX), and
a file it half-understands can abort it. The worker is `python -m workbench.reference` started by subprocess,
talking over an inherited socket wrapped in multiprocessing's Connection, which frames and pickles requests
and logits for us and turns the worker's death into EOF at once. Not multiprocessing's "spawn" Process: it
re-runs the parent's main script in the child (seconds of torch imports under the CLI, a crash for a script
without a __main__ guard); and not fork, which is unsafe in a process holding torch's threads. The worker
imports numpy and llama_cpp, never torch: this module imports torch only where the engine uses it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from workbench.errors import InputError, ReferenceFailed

if TYPE_CHECKING:
    import torch

ENGINES = ("llama.cpp", "llama.cpp-f32")
GGML_TYPE_F32 = 0  # ggml.h's enum ggml_type: the KV cache type of the exact reference
POLL_S = 0.2  # how often a wait for the worker checks that it is still alive
STALL_S = 300.0  # a live worker silent this long is stuck, not slow (a 250 MB model loads in seconds on 2 cores)
GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (llama_cpp/_logger.py's copy of it is out of date)
NATIVE_BUILD_HINT = (
    "; a llama-cpp-python built with native CPU flags does this on some CPUs: rebuild it portable with "
    "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36"
)


_LLAMA_ERRORS: list[str] = []  # what llama.cpp logged at error level, in the worker


# Module-level, so that it outlives the Llama: freeing one logs, and a freed callback would crash the worker.
@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)  # llama_cpp.llama_log_callback
def _collect_errors(level: int, text: bytes, _user) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        _LLAMA_ERRORS.append(text.decode(errors="replace").strip())


def f32_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write `src` with every tensor dequantized to F32 by gguf-py (the reference dequantizer) to `dst`; the
    metadata is copied as it is, except the file type, which says all-F32."""
    from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
    from gguf.quants import dequantize

    from workbench.tiny import copy_gguf

    return copy_gguf(Path(src), Path(dst),
                     tensor=lambda name, data, qtype: (dequantize(data, qtype).astype(np.float32), GGMLQuantizationType.F32),
                     add={"general.file_type": (int(LlamaFileType.ALL_F32), GGUFValueType.UINT32)})


def exact_copy(gguf) -> Path:
    """The F32 copy of a GGUFFile for the exact reference, made once into the model cache (atomically, named by
    the source's sha256, so a changed file gets a new copy)."""
    from workbench.gguf_file import GGUFFile
    from workbench.models import cache_dir, cached_file

    def check(path: Path) -> None:
        if any(t.ggml_type.name != "F32" for t in GGUFFile(path).tensors.values()):
            raise ReferenceFailed(f"{path} is not an all-F32 copy.")

    target = cache_dir() / f"{Path(gguf.path).stem}-{gguf.sha256()[:16]}-f32.gguf"
    return cached_file(target, lambda tmp: f32_copy(gguf.path, tmp), check)


def _serve(conn: Connection, path: str, capacity: int, threads: int, kv_f32: bool = False) -> None:
    """The worker: load the file once, then answer each list of ids with the logits after it, evaluating only
    the tokens it has not seen. Replies are (kind, value): ok, refused (llama.cpp's reason) or failed."""
    try:
        import llama_cpp

        # Replaces llama-cpp-python's printer: stderr stays quiet, and a refusal keeps llama.cpp's reason.
        llama_cpp.llama_log_set(_collect_errors, ctypes.c_void_p(0))
        try:
            kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
            llm = llama_cpp.Llama(model_path=path, n_ctx=capacity, n_threads=threads, logits_all=False, verbose=False, **kv)
        except ValueError as exc:
            reason = _LLAMA_ERRORS[0].split("error loading model: ")[-1] if _LLAMA_ERRORS else str(exc)
            conn.send(("refused", reason))
            return
        n_vocab = llm.n_vocab()
        conn.send(("ok", n_vocab))
        fed: list[int] = []
        while (ids := conn.recv()) is not None:
            common = 0
            while common < min(len(ids), len(fed)) and ids[common] == fed[common]:
                common += 1
            if common == len(ids):  # nothing new: re-run the last token to get its logits again
                common -= 1
            llm.n_tokens = common  # eval() drops llama.cpp's cache past n_tokens
            _LLAMA_ERRORS.clear()
            try:
                llm.eval(ids[common:])
            except RuntimeError as exc:  # llama_decode said no: its log says why
                conn.send(("failed", _LLAMA_ERRORS[0] if _LLAMA_ERRORS else str(exc)))
                return
            fed = ids
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            conn.send(("ok", np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()))
    except (EOFError, ConnectionError):  # the engine is gone
        pass
    except Exception as exc:  # the process boundary: whatever went wrong travels back as one sentence
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))


class ReferenceEngine:
    """llama.cpp on the model's file, in a worker process that keeps its own incremental state. Any failure
    (not installed, file refused, crash) raises ReferenceFailed and closes the engine for good."""

    def __init__(self, engine: str, model, capacity: int) -> None:
        import torch

        self._worker: subprocess.Popen | None = None
        self._failure: str | None = None
        if engine not in ENGINES:
            raise InputError(f"unknown reference engine '{engine}'; available: {', '.join(ENGINES)}.")
        # Only looked up here, not imported: a build for another CPU can die in its library's start-up code.
        if importlib.util.find_spec("llama_cpp") is None:
            raise ReferenceFailed(
                "the llama.cpp reference needs llama-cpp-python: pip install llama-cpp-python "
                "(or the project's 'reference' extra)."
            )
        self.engine = engine
        self.path = Path(model.gguf.path)
        changed = getattr(model.gguf, "changed_on_disk", None)
        if changed is not None and changed():  # llama.cpp reads the file itself: it would run another model
            raise ReferenceFailed(f"{self.path} changed on disk since the model was loaded; reload it to compare with llama.cpp.")
        exact = engine == "llama.cpp-f32"
        if exact:
            try:
                self.path = exact_copy(model.gguf)
            except (OSError, ValueError, NotImplementedError) as exc:  # disk full; a type gguf-py cannot decode
                raise ReferenceFailed(f"the F32 copy of {self.path.name} for the exact reference could not be made ({exc}).") from None
        self._conn, theirs = Pipe()
        # PYTHONPATH: the worker imports this same copy of workbench, installed or not.
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "workbench.reference", str(theirs.fileno()), str(self.path), str(capacity),
                 str(torch.get_num_threads()), "f32" if exact else "file"],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        except OSError as exc:  # no process to be had (out of memory, too many processes)
            raise ReferenceFailed(f"the llama.cpp worker process did not start: {exc}.") from None
        finally:
            theirs.close()  # the worker holds the only copy: its death reads as EOF here
        self.worker_pid = self._worker.pid
        self.n_vocab = self._reply(f"loading {self.path.name}")
        if self.n_vocab != model.config.vocab_size:
            self._fail(f"llama.cpp reads {self.n_vocab} tokens of vocabulary from {self.path.name} where we read "
                       f"{model.config.vocab_size}, so their logits cannot be compared.")

    def logits_after(self, ids: list[int]) -> torch.Tensor:
        """llama.cpp's next-token logits [vocab], float32, after `ids`."""
        import torch

        if self._failure is not None:
            raise ReferenceFailed(self._failure)
        try:
            self._conn.send([int(i) for i in ids])
        except ConnectionError:  # the worker is already gone: _reply says how
            pass
        return torch.from_numpy(self._reply(f"evaluating {len(ids)} tokens of {self.path.name}"))

    def _reply(self, doing: str):
        """The worker's next answer; its death, its silence or its error closes the engine with one sentence."""
        try:
            answer = self._next_answer()
        except (EOFError, ConnectionError):
            code = self._worker.wait(timeout=10)
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            hint = NATIVE_BUILD_HINT if code in (-signal.SIGSEGV, -signal.SIGILL) else ""
            self._fail(f"llama.cpp crashed ({how}) while {doing}{hint}.")
        except BaseException:  # interrupted (Ctrl-C, a stopped cell): its answer would go to the next request
            self.close()
            raise
        if answer is None:
            self._fail(f"llama.cpp gave no answer in {STALL_S:.0f} s while {doing}, so it was stopped.")
        kind, value = answer
        if kind == "refused":
            self._fail(f"llama.cpp refused {self.path}: {value.rstrip('.')}.")
        if kind == "failed":
            self._fail(f"llama.cpp failed while {doing}: {value.rstrip('.')}.")
        return value

    def _next_answer(self) -> tuple[str, object] | None:
        """(kind, value) from the worker, EOFError once it is dead, None if it is alive but silent for STALL_S."""
        deadline = time.monotonic() + STALL_S
        while not self._conn.poll(POLL_S):
            # Dead with nothing left to read: no EOF to wait for if a fork elsewhere holds a copy of its socket.
            if self._worker.poll() is not None and not self._conn.poll(0):
                raise EOFError
            if time.monotonic() > deadline:
                return None
        return self._conn.recv()

    def _fail(self, sentence: str) -> NoReturn:
        self.close()
        self._failure = sentence
        raise ReferenceFailed(sentence)

    def close(self) -> None:
        """Stop the worker (asked, then killed); later calls raise ReferenceFailed."""
        self._failure = self._failure or "the llama.cpp reference engine is closed."
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if worker.poll() is None:
            try:
                self._conn.send(None)
                worker.wait(timeout=5)
            except (ConnectionError, subprocess.TimeoutExpired):
                worker.kill()
                worker.wait()
        self._conn.close()

    def __enter__(self) -> ReferenceEngine:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


if __name__ == "__main__":  # the worker; Ctrl-C is for the engine, which stops it by closing the socket
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "f32")
