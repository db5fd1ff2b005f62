"""Weights that stay quantized: 4-bit planes with a scale and a zero per 32 values, and their matmul.

A one-token decode step reads every weight once, so on a CPU its speed is the bytes it reads: dequantized to
float32, a 4-bit GGUF model is read at 4× its size. Here a matrix is repacked at load into one or two 4-bit
*planes* in the layout of PyTorch's CPU weight-only kernel (`torch._weight_int4pack_mm_for_cpu`: bfloat16
activations, a bfloat16 scale and zero per 32 values of a row, w = (u − 8)·scale + zero for a code u):

- 4-bit block types (Q4_0, Q4_1, Q4_K) hold per 32 values an integer code 0..15 on an affine grid
  (quants.affine_blocks), which is one plane, exactly: ≈ the file's bytes are read per token.
- Q8_0's codes (0..255 after an offset of 128) split into a high and a low nibble: two planes, exact.
- Every other type (Q5_*, Q6_K, Q2_K, Q3_K, …) is dequantized, then requantized per 32 values to 8 bits on the
  group's own [min, max] (255 steps; at most range/510 off per value) and split the same way.

What is not exact: the scales and zeros are rounded to bfloat16, and the activations are rounded to bfloat16
on their way in (the kernel's input type). Measured on SmolLM2-135M: logits cosine 0.9999 against the
dequantized float32 path; tests/test_fast_paths.py holds every bundled model to ≥ 0.999 and the same argmax
wherever the exact path's top two are not a near-tie. Measured on a 2-core EPYC for one token against an 8192×8192 weight: float32 12.4 ms, one plane 2.7 ms.

On CUDA (compute capability ≥ 8) the planes are packed for PyTorch's CUDA int4 kernel (`_weight_int4pack_mm`,
bfloat16 activations, the same w = (u − 8)·scale + zero), so a model that does not fit dequantized still reads
4 bits a weight. Shapes that kernel does not take, and other devices, keep their codes one per byte and widen
them to float per call (a memory saving, not a speed-up).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from workbench.quants import AFFINE_BITS, affine_blocks, dequantize

GROUP = 32  # values per scale/zero pair


class QuantMatrix:
    """A weight used as x @ W with W [in, out], held as 4-bit planes (see the module doc). `planes` is a list
    of (codes, scales_and_zeros [in/32, out, 2] bfloat16): codes packed by PyTorch for the CPU kernel, or
    uint8 [out, in] elsewhere."""

    __slots__ = ("planes", "n_in", "n_out")

    def __init__(self, planes: list[tuple[torch.Tensor, torch.Tensor]], n_in: int, n_out: int) -> None:
        self.planes, self.n_in, self.n_out = planes, n_in, n_out

    @classmethod
    def from_grids(cls, grids: list[Grid]) -> QuantMatrix:
        """Grids of GGUF matrices [out_i, in] (see `grid`), stacked along the rows (Q, K, V; gate, up) → one
        matrix on their device. A 4-bit part next to an 8-bit one is widened to the 8-bit form (its high
        plane is zero)."""
        n_in = grids[0][0].shape[-1]
        if n_in % GROUP:
            raise ValueError(f"rows of {n_in} values are not whole groups of {GROUP}")
        bits = max(g[3] for g in grids)
        codes, scale, offset = (torch.cat([g[i] for g in grids]) for i in range(3))
        return cls(_planes(codes, scale, offset, bits), n_in, codes.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [t for plane in self.planes for t in plane]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ W → [T, out] in x's dtype (on the CPU through the int4 kernel, in bfloat16)."""
        xb = x.to(torch.bfloat16)
        out = None
        for codes, sz in self.planes:
            if codes.device.type == "cpu":
                y = torch._weight_int4pack_mm_for_cpu(xb, codes, GROUP, sz).float()
            elif codes.dtype == torch.int32:  # packed for the CUDA int4 kernel
                y = torch._weight_int4pack_mm(xb, codes, GROUP, sz).float()
            else:
                y = x.float() @ _widen(codes, sz).t()
            out = y if out is None else out + y
        if out.shape[-1] != self.n_out:  # rows padded to a multiple of 16 for the CPU packing
            out = out[..., : self.n_out]
        return out.to(x.dtype)


class QuantExperts:
    """A stack of E experts' quantized matrices, each plane's codes and scales stacked along a leading expert
    dim, so that an expert chosen on the device (a 0-d tensor) is selected on the device too: no host sync,
    and a CUDA graph can hold the MoE step. `experts[e]` (an int) gives the expert's QuantMatrix as views."""

    __slots__ = ("planes", "n_in", "n_out")

    def __init__(self, matrices: list[QuantMatrix]) -> None:
        first = matrices[0]
        self.n_in, self.n_out = first.n_in, first.n_out
        self.planes = [
            (torch.stack([m.planes[p][0] for m in matrices]), torch.stack([m.planes[p][1] for m in matrices]))
            for p in range(len(first.planes))
        ]

    def __len__(self) -> int:
        return self.planes[0][0].shape[0]

    def __getitem__(self, expert: int | torch.Tensor) -> QuantMatrix:
        """Expert `expert`: an int gives views; a 0-d device tensor gives an on-device copy of its planes
        (index_select: indexing with the 0-d tensor itself would read it back to the host)."""
        if isinstance(expert, torch.Tensor):
            if expert.dim() != 0:
                raise TypeError(f"QuantExperts takes one expert id (an int or a 0-d tensor), not a {list(expert.shape)} tensor")
            at = expert.reshape(1)
            planes = [(codes.index_select(0, at)[0], sz.index_select(0, at)[0]) for codes, sz in self.planes]
        else:
            planes = [(codes[expert], sz[expert]) for codes, sz in self.planes]
        return QuantMatrix(planes, self.n_in, self.n_out)

    def tensors(self) -> list[torch.Tensor]:
        return [t for plane in self.planes for t in plane]


Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # codes [out, in], scale, offset [out, in/32], bits


def grid(raw: torch.Tensor, qtype: GGMLQuantizationType, n_in: int) -> Grid:
    """One GGUF matrix, raw bytes [out, bytes per row] → codes, scale, offset, bits with value = scale·code +
    offset per 32 values: exact for the affine types, requantized to 8 bits otherwise."""
    if qtype in AFFINE_BITS:
        return (*affine_blocks(raw, qtype), AFFINE_BITS[qtype])
    return (*_requantize8(dequantize(raw, qtype).reshape(raw.shape[0], n_in)), 8)


def _requantize8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [out, in] → codes 0..255 on each group's own [min, max] grid, scale and offset per group."""
    g = values.float().unflatten(-1, (-1, GROUP))
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 255).to(torch.uint8)
    return codes.flatten(-2), scale, lo


_PACK_ROWS = 8192  # rows packed at a time: bounds the int32 copy the packing op wants (a multiple of 16)


def _planes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Codes [out, in] with value = scale·code + offset per group → planes with w = (u − 8)·s + z each.

    PyTorch's CPU packing wants the rows in multiples of 16: other counts are padded with zero rows (their
    outputs are cut off in `apply`). Rows are split and packed _PACK_ROWS at a time, which bounds the
    temporary copies (the packing op takes int32 codes)."""
    n_out = codes.shape[0]
    if bits == 4:
        parts = [(lambda c: c, scale, 8 * scale + offset)]
    else:  # code = 16·high + low
        parts = [(lambda c: c >> 4, 16 * scale, 128 * scale + offset), (lambda c: c & 15, scale, 8 * scale)]
    planes = []
    for split, s, z in parts:
        sz = torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16)  # [in/32, out, 2]
        if codes.device.type == "cuda" and _cuda_int4(codes.shape[1], n_out, codes.device):
            u = split(codes)
            packed = torch._convert_weight_to_int4pack(((u[:, ::2] << 4) | u[:, 1::2]).contiguous(), _INNER_K_TILES)
            planes.append((packed, sz.contiguous()))
            continue
        if codes.device.type != "cpu":
            planes.append((split(codes).contiguous(), sz.contiguous()))
            continue
        pad = -n_out % 16
        padded = torch.cat((codes, codes.new_zeros(pad, codes.shape[1]))) if pad else codes
        if pad:
            sz = torch.cat((sz, sz.new_zeros(sz.shape[0], pad, 2)), dim=1)
        packed = torch.cat([
            torch._convert_weight_to_int4pack_for_cpu(split(padded[i : i + _PACK_ROWS]).to(torch.int32), 1)
            for i in range(0, padded.shape[0], _PACK_ROWS)
        ])
        planes.append((packed, sz.contiguous()))
    return planes


_INNER_K_TILES = 8  # the CUDA int4 kernel's K tiling: rows of a multiple of 8·16 values


def _cuda_int4(n_in: int, n_out: int, device: torch.device) -> bool:
    """Whether PyTorch's CUDA int4 kernel (tinygemm: bf16, compute capability ≥ 8) takes this shape."""
    return (hasattr(torch, "_weight_int4pack_mm") and torch.cuda.get_device_capability(device)[0] >= 8
            and n_in % (_INNER_K_TILES * 16) == 0 and n_out % 8 == 0)


def _widen(codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] and scales/zeros [in/32, out, 2] → float32 [out, in]."""
    s, z = sz[..., 0].t().float(), sz[..., 1].t().float()  # [out, in/32]
    u = codes.float().unflatten(-1, (-1, GROUP))
    return ((u - 8) * s[..., None] + z[..., None]).flatten(-2)


def expert(stack, e: int | torch.Tensor):
    """Expert e's matrix from a stack in any form (dense [E, in, out], QuantExperts, blocks.BlockExperts); e is
    an int or a 0-d device tensor, which selects on the device (index_select: indexing with the tensor would sync)."""
    if not isinstance(stack, torch.Tensor):
        return stack[e]
    if isinstance(e, torch.Tensor):
        return stack.index_select(0, e.reshape(1))[0]
    return stack[e]


def matmul(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., in] @ W [in, out] → [..., out] in x's dtype, for a dense weight, a QuantMatrix or a BlockMatrix."""
    if not isinstance(w, torch.Tensor):
        return w.apply(x)
    return x @ w
