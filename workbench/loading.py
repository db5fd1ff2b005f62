"""Load policy: which device, dtype, weights form and thread count a model gets, and the loading itself
(file → config → tokenizer → weights on the device). model.py holds the forward pass; this module decides
what it runs on, and says in words what that means for the numbers (describe_weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.config import ModelConfig
from workbench.errors import InputError, ModelError, ResourceError
from workbench.gguf_file import GGUFFile
from workbench.models import resolve
from workbench import blocks
from workbench.blocks import BlockExperts, BlockMatrix
from workbench.qmatmul import QuantExperts, QuantMatrix
from workbench.tokenizer import Tokenizer
from workbench.weights import WEIGHT_MODES, ExpertStacks, Weights, load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """auto → cuda, else mps, else cpu; an explicit device must exist on this machine."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise InputError(f"unknown device '{device}'; choose auto, cpu, cuda or mps.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for, but this machine has no CUDA GPU (or torch is a CPU build).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for, but Metal is not available here.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto → float32 on CPU and MPS, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# The share of the free memory (RAM for a CPU, VRAM for a GPU) that dequantized matrices may take before
# weights="auto" keeps them quantized instead: the rest is left for the KV cache, activations and the system.
DEQUANTIZED_MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.9}


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (RAM available to this process on a CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


# The weights modes whose numbers are the exact path's in float32 (up to the order of summation).
EXACT_MODES = ("dequantized", "blocks")


def resolve_weights(mode: str, device: torch.device, n_params: int, dtype: torch.dtype) -> str:
    """auto → an exact form: on a CPU the file's own blocks (blocks.py: about the file's bytes per token, the
    dequantized float32 numbers up to summation order) when the block kernels build here; else dequantized
    matrices in the compute dtype wherever they fit in DEQUANTIZED_MEMORY_SHARE of the free memory; else
    quantized (4-bit planes, bfloat16 activations: not exact, see qmatmul.py). An explicit mode is taken as
    asked; "blocks" runs on a CPU only, and says in one sentence why not where its kernels cannot be built."""
    if mode not in (*WEIGHT_MODES, "auto"):
        raise InputError(f"unknown weights mode '{mode}'; choose auto, {', '.join(WEIGHT_MODES)}.")
    if mode == "blocks":
        if device.type != "cpu":
            raise InputError(f"weights 'blocks' run on the CPU only; on {device.type} choose dequantized or quantized.")
        reason = blocks.available()
        if reason is not None:
            raise InputError(f"weights 'blocks' are not available here: {reason}; choose dequantized or quantized.")
        return mode
    if mode in WEIGHT_MODES:
        return mode
    if device.type == "cpu" and blocks.available() is None:
        return "blocks"
    free = free_memory(device)
    if free is None:
        return "dequantized"
    share = DEQUANTIZED_MEMORY_SHARE.get(device.type, 0.5)
    return "dequantized" if n_params * dtype.itemsize <= share * free else "quantized"


def out_of_memory(exc: RuntimeError) -> bool:
    """torch's OutOfMemoryError (CUDA), or a CPU allocation failure, which torch raises as a plain RuntimeError."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "not enough memory" in text


def describe_weights(mode: str, dtype: torch.dtype) -> str:
    """What a weights mode means for the numbers, in words (CLI, model card, trace metadata)."""
    name = str(dtype).removeprefix("torch.")
    if mode == "dequantized":
        exact = "exact" if dtype == torch.float32 else f"{name} rounding"
        return f"dequantized: {name} matrices, {name} activations ({exact})"
    if mode == "blocks":
        exact = "exact up to summation order" if dtype == torch.float32 else f"{name} rounding between the matmuls"
        return f"blocks: the file's GGUF blocks with float32 activations ({exact})"
    return "quantized: 4-bit planes with bfloat16 activations (fast, not exact: ~1e-2 of max |logit|)"


def default_threads() -> int:
    """Threads for torch's CPU kernels when none are asked for: one fewer than the cores this process may
    use (at least one). torch's OpenMP threads spin waiting for each other: when a browser or a second job
    takes one core of two, two threads decode several times slower than one (SmolLM2, 2-core EPYC: 7.1 vs
    20.9 tok/s; 1.7 vs 62 was seen on a Xeon). The price on a quiet 2-core machine: one thread decodes
    1.25× (dequantized) to 1.7× (quantized) slower than two there; ask for more with --threads."""
    try:
        n_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n_cores = os.cpu_count() or 1
    return max(1, n_cores - 1)


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU thread count to `n`, or to default_threads() when None; returns it. With torch's OpenMP
    build the count belongs to the calling OS thread (a new thread starts from the last count set anywhere), so
    code that runs on several threads (the app's tabs) sets it before each load and step."""
    if n is None:
        n = default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise InputError(f"threads must be a whole number from 1 to 1024, not {n!r}.")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@dataclass
class LoadInfo:
    seconds: float
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int  # bytes of the tensors on the device
    weights: str = "dequantized"  # the form of the matrices: one of WEIGHT_MODES


def equivalence_tolerance(dtype: torch.dtype, weights: str) -> float:
    """How far (max |Δlogit| / max |logit|) the cached and uncached paths may drift apart with correct code:
    float32 arithmetic throughout keeps them within 1e-4; bfloat16 on the way rounds differently for a one-row
    step and a whole-sequence pass: quantized matmuls (bf16 activations, float32 elsewhere) measured up to
    1.6e-2 on the bundled models, a bf16/fp16 compute dtype more."""
    if dtype != torch.float32:
        return 1e-1  # bf16/fp16 activations through every layer: 4.9e-2 measured on a 48-layer MoE (H200)
    return 1e-4 if weights in EXACT_MODES else 4e-2


def load_parts(
    model: str | Path, device: str = "auto", dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None, weights: str = "auto",
) -> tuple[GGUFFile, ModelConfig, Tokenizer, Weights, LoadInfo]:
    """A bundled name or a path → what a Model is made of, on the device. Raises WorkbenchError subclasses on
    bad input. `progress(done, total)` follows the weights as they load (layer by layer)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    gguf = GGUFFile(resolve(model))
    config = ModelConfig.from_gguf(gguf)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(
            f"{gguf.path.name}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {config.vocab_size} rows."
        )
    mode = resolve_weights(weights, dev, gguf.n_params, dt)
    try:
        loaded = load_weights(gguf, config, dev, dt, progress, mode)
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        raise ResourceError(
            f"{gguf.path.name} does not fit in the memory of {dev} as {mode} {str(dt).removeprefix('torch.')} "
            "weights; try weights quantized, a smaller dtype or another device."
        ) from None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    n_bytes = sum(t.numel() * t.element_size() for t in unique_tensors(loaded))
    return gguf, config, tokenizer, loaded, LoadInfo(0.0, dev, dt, n_bytes, mode)


def unique_tensors(weights: Weights) -> list[torch.Tensor]:
    """Every weight tensor once (a tensor shared by two fields counts once; a quantized matrix is its planes)."""
    fields = [weights.token_embd, weights.output_norm, weights.output, weights.rope_freqs]
    if weights.embd_raw is not None:
        fields.append(weights.embd_raw[0])
    for layer in weights.layers:
        fields += list(vars(layer).values())
    tensors = []
    for t in fields:
        if isinstance(t, (QuantMatrix, QuantExperts, ExpertStacks, BlockMatrix, BlockExperts)):
            tensors += t.tensors()
        elif t is not None:
            tensors.append(t)
    return list({t.data_ptr(): t for t in tensors}.values())
