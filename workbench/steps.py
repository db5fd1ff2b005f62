"""Static-shape decode steps: one cached decode step with every shape fixed by the cache, replayed from a CUDA
graph (DecodeGraph) or compiled by torch.compile (CompiledStep), and the choice between them and the eager
forward (`fast_step`). model.py computes the step (`Model.compute(..., pos=)`); this module only runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workbench.cache import KVCache, context_full
from workbench.errors import UnsupportedError
from workbench.model import Model

FAST_STEPS = ("graph", "compile")  # what a plain cached decode step may run as, besides the eager forward


def fast_step(model: Model, cache: KVCache, position: int, cuda_graphs: bool, compile: bool) -> StaticStep | None:
    """The static step a session's plain cached decode steps run on, or None for the eager forward: on CUDA a
    captured graph (of the compiled step with `compile`) unless `cuda_graphs` is off; on a CPU the compiled step
    when `compile` is asked for. Built at `position`, the next position the cache will be written at."""
    if model.device.type == "cuda":
        return DecodeGraph(model, cache, position, compiled=compile) if cuda_graphs else None
    return CompiledStep(model, cache, position) if compile else None


class StaticStep:
    """What DecodeGraph and CompiledStep share: the static-shape step's inputs as device tensors (token and
    position, filled in per step), the RoPE tables grown to the whole cache before anything captures them, and
    the per-step bookkeeping. Subclasses set `self._run`, which returns the logits [1, vocab]."""

    def __init__(self, model: Model, cache: KVCache, position: int) -> None:
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        self.pos = torch.full((1,), position, dtype=torch.long, device=model.device)
        self._tables = model.rope_tables_for(cache.capacity)  # a graph reads these very tensors: keep them alive

    def _eager(self) -> torch.Tensor:
        return self.model.forward(self.token, 0, self.cache, last_only=True, pos=self.pos)

    def _compiled(self, options: dict | None = None) -> Callable[[], torch.Tensor]:
        """The step through torch.compile (call it under torch.no_grad: inference_mode cannot be traced)."""
        model, cache = self.model, self.cache
        # A new cache means new tensors to guard on: start from a clean slate rather than pile up recompiles
        # (the compiled code itself comes back from inductor's disk cache).
        torch.compiler.reset()
        return torch.compile(lambda: model.compute(self.token, 0, cache, last_only=True, pos=self.pos),
                             dynamic=False, options=options or {})

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, vocab] after `token` at `position` (a buffer the next step overwrites: copy to keep)."""
        if position >= self.cache.capacity:
            raise context_full(position, self.cache.capacity)
        self.model.check_token_ids([token])
        self.token.fill_(token)
        self.pos.fill_(position)
        logits = self._run()
        self.cache.mark_filled(position + 1)
        return logits


class DecodeGraph(StaticStep):
    """One cached decode step captured as a CUDA graph and replayed per token.

    Eager PyTorch launches a few dozen kernels per layer from Python; for a 48-layer MoE on an H100 that
    launch time, not the GPU, bounds tokens/s. The static-shape step (`Model.forward(..., pos=)`) is captured
    once per cache; each `step` copies the token and position into the graph's inputs and replays it.
    Probes and breaks run the eager forward (they are Python at every capture point); a session uses this
    only for the plain cached path on CUDA.
    """

    def __init__(self, model: Model, cache: KVCache, position: int, compiled: bool = False) -> None:
        """Capture at `position`, the next position the cache will be written at (the capture's own writes
        land there and are overwritten by the first real step). `compiled`: capture the torch.compile'd step
        (inductor fuses the small elementwise kernels: fewer launches per token; compiling takes a minute)."""
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        super().__init__(model, cache, position)
        run, grad_mode = (self._compiled(), torch.no_grad) if compiled else (self._eager, torch.inference_mode)
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side), grad_mode():
            for _ in range(2):  # warm-up (and compilation): allocator and kernel selection outside the capture
                run()
        torch.cuda.current_stream(model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), grad_mode():
            self.logits = run()

    def _run(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class CompiledStep(StaticStep):
    """One cached decode step compiled by torch.compile, for the CPU (inductor with its C++ wrapper).

    Eager PyTorch spends about half of a small model's CPU decode step dispatching small ops from Python;
    the compiled static-shape step (`Model.forward(..., pos=)`) runs them from generated C++. Compiling takes
    about a minute the first time on 2 cores and seconds afterwards (inductor caches the result on disk).
    Only the plain cached path uses it (probes and breaks run eagerly). In float32 its logits equal the eager
    step's to float32 rounding (tested); with quantized weights, whose activations pass through bfloat16, the
    fused kernels' other summation order moves them by bf16-sized steps (the bound cached vs uncached has).
    """

    def __init__(self, model: Model, cache: KVCache, position: int) -> None:
        super().__init__(model, cache, position)
        self._fn = self._compiled({"cpp_wrapper": True} if model.device.type == "cpu" else None)
        try:
            with torch.no_grad():
                self._fn()  # compiles; writes position `position`, which the next step rewrites
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported op, …: one sentence, not a trace
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(f"torch.compile could not build the decode step ({first}); run without compile.") from exc

    def _run(self) -> torch.Tensor:
        with torch.no_grad():
            return self._fn()
