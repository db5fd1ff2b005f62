"""Matrices kept in their GGUF blocks, multiplied with float32 activations: exact and fast on a CPU.

A one-token decode step reads every weight once, so on a CPU its speed is the bytes it reads. The "blocks"
weights mode keeps each matrix as the file's own bytes (one copy in RAM, never the mapped file) and multiplies
it with blocks.cpp, a small C++ kernel compiled on first use for this machine (`-O3 -march=native`) and loaded
as a PyTorch operator (`torch.ops.workbench_blocks.block_mm`): each 32-value group of a block is decoded in
registers to exactly the float32 values gguf-py's dequantize gives, and multiplied into float32 accumulators.
So the product equals the dequantized float32 one up to the order of summation (the exact path's numbers, at
about the file's bytes per token), for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and MXFP4.
A matrix of another type is dequantized at load and held as a float32 part beside the others (`part`); F32,
F16 and BF16 parts are read as stored. The same library holds the small ops of a decode step (rms_norm, rope,
decode_attention, and decode_step, which runs a plain step's attention in one call), used by model.py.

The compiled library is cached under the workbench cache (`kernels/`), keyed by the source, the compiler's
flags, torch's version and this CPU's instruction sets, and written under a temporary name then renamed, so
concurrent first uses and a changed machine never load a stale or half-written file. Where no C++ compiler is
found or the build fails, `available()` says why in one sentence and weights="auto" keeps the dense float32
matrices instead (the same numbers, ~4× the bytes a step reads).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import threading
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from workbench.errors import UnsupportedError
from workbench.quants import dequantize

SOURCE = Path(__file__).with_name("blocks.cpp")
BLOCK_TYPES = frozenset(GGMLQuantizationType[n] for n in (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"))
# Float types the kernel also reads, for the float parts of a fused matrix whose other parts are blocks.
FLOAT_PART_TYPES = frozenset((GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16))
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
ops = None  # torch.ops.workbench_blocks once loaded: block_mm, rms_norm, rope, decode_attention, decode_step
_block_mm = None
_state: dict[str, object] = {}  # "ok": True once loaded, or "error": the sentence why not


class KernelsUnavailable(UnsupportedError):
    """The block kernels could not be built or loaded on this machine (no compiler, a failed build)."""


def _cpu_features() -> str:
    """This CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _command(cxx: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, f"-I{sysconfig.get_paths()['include']}",
            str(SOURCE), "-o", str(out), *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
            "-lc10", "-ltorch_cpu"]


def library_path() -> Path:
    """Where this machine's build of blocks.cpp lives (it may not exist yet)."""
    from workbench.models import cache_dir

    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_FLAGS), torch.__version__, _cpu_features(),
                                    _compiler() or ""]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"blocks-{key}.so"


def _build(target: Path) -> None:
    cxx = _compiler()
    if cxx is None:
        raise KernelsUnavailable("no C++ compiler (c++, g++ or clang++) was found to build the block kernels")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    try:
        done = subprocess.run(_command(cxx, tmp), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            first = next((ln for ln in lines if "error" in ln), lines[-1]).strip()
            raise KernelsUnavailable(f"building the block kernels with {cxx} failed: {first}")
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelsUnavailable(f"building the block kernels with {cxx} failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load() -> None:
    """Build (first use on this machine) and load the kernels; raise KernelsUnavailable with the reason."""
    with _lock:
        if "ok" in _state:
            return
        if "error" in _state:
            raise KernelsUnavailable(str(_state["error"]))
        try:
            target = library_path()
            if not target.exists():
                _build(target)
            torch.ops.load_library(str(target))
        except KernelsUnavailable as exc:
            _state["error"] = str(exc)
            raise
        except (OSError, RuntimeError) as exc:
            _state["error"] = f"loading the block kernels failed: {exc}"
            raise KernelsUnavailable(str(_state["error"])) from None
        _state["ok"] = True
        global ops, _block_mm
        ops = torch.ops.workbench_blocks
        _block_mm = ops.block_mm.default  # the overload itself: skips overload resolution on every call


def available() -> str | None:
    """None when the kernels are built and loaded, else the sentence why they are not."""
    try:
        load()
    except KernelsUnavailable as exc:
        return str(exc)
    return None


def part_type(qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a matrix stored as `qtype` is held in as a part: its own where the kernel reads it, else F32."""
    return qtype if qtype in BLOCK_TYPES or qtype in FLOAT_PART_TYPES else GGMLQuantizationType.F32


def part(raw: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, GGMLQuantizationType]:
    """One GGUF matrix's bytes [..., rows, bytes per row] as a part the kernel reads: as stored for a type it
    reads, else dequantized (quants.dequantize, as gguf-py) and held as float32 bytes."""
    if part_type(qtype) == qtype:
        return raw, qtype
    values = dequantize(raw, qtype)
    return values.view(torch.uint8).reshape(*values.shape[:-1], -1), GGMLQuantizationType.F32


def kernel_reads(qtype: GGMLQuantizationType, n_in: int) -> bool:
    """Whether a matrix with rows of n_in values in this type can be a part (float parts: whole 32-value groups)."""
    return n_in % GGML_QUANT_SIZES[qtype][0] == 0 and (qtype not in FLOAT_PART_TYPES or n_in % 32 == 0)


class BlockMatrix:
    """A weight used as x @ W with W [in, out], held as the GGUF matrices' bytes stacked along their rows (Q,
    K, V; gate, up), each part in its own type: uint8 [rows, bytes per row] per part, `types` their GGML ids."""

    __slots__ = ("parts", "types", "n_in", "n_out")

    def __init__(self, parts: list[torch.Tensor], types: list[int], n_in: int, n_out: int) -> None:
        self.parts, self.types, self.n_in, self.n_out = parts, types, n_in, n_out

    @classmethod
    def of(cls, parts: list[tuple[torch.Tensor, GGMLQuantizationType]], n_in: int) -> BlockMatrix:
        """Parts (raw [rows, bytes], type), each a block or float type the kernel reads (see `part`)."""
        for raw, qtype in parts:
            if part_type(qtype) != qtype:
                raise UnsupportedError(f"{qtype.name} has no block kernel")
            block, size = GGML_QUANT_SIZES[qtype]
            if raw.dim() != 2 or not kernel_reads(qtype, n_in) or raw.shape[1] != n_in // block * size:
                raise ValueError(f"{qtype.name} rows of {raw.shape[-1]} bytes do not hold {n_in} values")
        return cls([raw.contiguous() for raw, _ in parts], [int(q) for _, q in parts], n_in,
                   sum(raw.shape[0] for raw, _ in parts))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W → [..., out] in x's dtype (computed in float32)."""
        if x.dim() == 2 and x.dtype == torch.float32:  # a decode step's [T, in]: no reshapes, no casts
            return _block_mm(x, self.parts, self.types)
        y = _block_mm(x.reshape(-1, self.n_in).float(), self.parts, self.types)
        return y.reshape(*x.shape[:-1], self.n_out).to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts)


class BlockExperts:
    """A MoE layer's E experts as block matrices: per part one uint8 stack [E, rows, bytes]; `experts[e]` (an int,
    or a 0-d CPU tensor) is expert e's BlockMatrix of views, no copies."""

    __slots__ = ("stack",)

    def __init__(self, stack: BlockMatrix) -> None:
        self.stack = stack  # parts [E, rows, bytes]; n_out per expert

    @classmethod
    def of(cls, parts: list[tuple[torch.Tensor, GGMLQuantizationType]], n_in: int) -> BlockExperts:
        first = BlockMatrix.of([(raw[0], q) for raw, q in parts], n_in)  # checks one expert's shapes
        return cls(BlockMatrix([raw.contiguous() for raw, _ in parts], first.types, n_in, first.n_out))

    def __len__(self) -> int:
        return self.stack.parts[0].shape[0]

    def __getitem__(self, expert: int | torch.Tensor) -> BlockMatrix:
        e = int(expert)
        s = self.stack
        return BlockMatrix([raw[e] for raw in s.parts], s.types, s.n_in, s.n_out)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.stack.parts)


def main() -> None:
    """`python -m workbench.blocks`: build the kernels for this machine now (what `make run` does once)."""
    reason = available()
    print(f"block kernels: {reason}" if reason else f"block kernels: ready ({library_path().name})")


if __name__ == "__main__":
    main()
