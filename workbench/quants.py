"""Torch dequantizers for GGML block formats.

A GGUF tensor stored in a quantized type is a sequence of fixed-size *blocks*: each block
encodes ``block_size`` consecutive values of a row in ``type_size`` bytes (both from
``gguf.GGML_QUANT_SIZES``), usually as one or more f16 scales followed by packed small
integers. The "K-quants" (Q2_K .. Q6_K) use 256-value super-blocks whose 8 or 16 sub-blocks
each carry their own (quantized) scale and sometimes a minimum.

``dequantize`` turns the raw bytes back into float32 with plain torch ops, so it runs on the
device the bytes live on. The results are bit-identical to gguf-py's numpy reference
(``gguf.quants.dequantize``) for every finite input: each formula below performs the same
float32 operations in the same order (products of small integers with an f16 scale are exact,
so what matters is where the single rounding subtraction or addition of a minimum happens).
NaN inputs give NaN outputs, though not necessarily with the same NaN payload bits.
Types without a torch kernel here fall back to gguf-py on the CPU.
"""

from collections.abc import Callable
from functools import lru_cache

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from workbench.errors import GGUFError, UnsupportedError

# Roughly how many output values one pass of a block kernel produces: it keeps the uint8/float32
# intermediates small (cache-sized on CPU) whatever the tensor size.
_CHUNK_VALUES = {"cpu": 1 << 20, "cuda": 1 << 24}
_QK_K = 256  # values per K-quant super-block

Kernel = Callable[[torch.Tensor, torch.Tensor], None]


@lru_cache(maxsize=None)
def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A (len(values), 1) uint8 column of shift amounts, cached per device."""
    return torch.tensor(values, dtype=torch.uint8, device=device).view(-1, 1)


def _bit_fields(packed: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Unpack bit fields: (..., k) uint8 -> (..., len(shifts), k), field i = (byte >> shifts[i]) & mask."""
    return (packed.unsqueeze(-2) >> _shifts(shifts, packed.device)) & mask


def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor holding raw's bytes read as ``dtype`` along the last dim (any strides/alignment)."""
    out = torch.empty((*raw.shape[:-1], raw.shape[-1] // dtype.itemsize), dtype=dtype, device=raw.device)
    out.view(torch.uint8).copy_(raw)
    return out


def _f16(field: torch.Tensor) -> torch.Tensor:
    """An (n, 2) byte column holding one f16 per block -> (n, 1) float32."""
    return _reinterpret(field, torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k) 4-bit values: the k low nibbles, then the k high nibbles."""
    return _bit_fields(qs, (0, 4), 0x0F).flatten(-2)


def _high_bits(qh: torch.Tensor, n_bits: int, shift: int) -> torch.Tensor:
    """(n, k) bytes -> (n, n_bits, k): bit i of every byte, moved to bit position ``shift``."""
    return _bit_fields(qh, tuple(range(n_bits)), 1) << shift


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 6-bit scales and 8 6-bit mins, (n, 8) uint8 each.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high).
    """
    sc, mn, lo = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((sc & 0x3F, (lo & 0x0F) | ((sc >> 2) & 0x30)), dim=-1)
    mins = torch.cat((mn & 0x3F, (lo >> 4) | ((mn >> 2) & 0x30)), dim=-1)
    return scales, mins


# Each kernel reads blocks (n, type_size) uint8 and writes out (n, block_size) float32.


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # 34 bytes: f16 d | 32 x int8 q.  x = q * d
    torch.mul(b[:, 2:].view(torch.int8), _f16(b[:, 0:2]), out=out)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # 18 bytes: f16 d | 16 bytes of nibbles (values 0-15 low nibbles, 16-31 high).  x = d * (q - 8)
    q = _nibbles(b[:, 2:]).view(torch.int8) - 8
    torch.mul(_f16(b[:, 0:2]), q, out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # 20 bytes: f16 d | f16 m | 16 bytes of nibbles.  x = d * q + m
    torch.mul(_f16(b[:, 0:2]), _nibbles(b[:, 4:]), out=out)
    out.add_(_f16(b[:, 2:4]))


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit values: bit j of the little-endian u32 ``qh`` is bit 4 of value j."""
    return _nibbles(qs) | _high_bits(qh, 8, 4).transpose(-1, -2).flatten(-2)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # 22 bytes: f16 d | 4 bytes qh (high bits) | 16 bytes of nibbles.  x = d * (q - 16)
    q = _q5_values(b[:, 2:6], b[:, 6:]).view(torch.int8) - 16
    torch.mul(_f16(b[:, 0:2]), q, out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # 24 bytes: f16 d | f16 m | 4 bytes qh | 16 bytes of nibbles.  x = d * q + m
    torch.mul(_f16(b[:, 0:2]), _q5_values(b[:, 4:8], b[:, 8:]), out=out)
    out.add_(_f16(b[:, 2:4]))


def _two_bit_values(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K: 64 bytes -> 256 2-bit values; each 32-byte half gives 4 runs of 32 (shift 0, 2, 4, 6)."""
    return _bit_fields(qs.unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).flatten(-3)


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # 84 bytes: 16 scale bytes (low nibble scale, high nibble min, per 16 values) | 64 bytes of
    # 2-bit q | f16 d | f16 dmin.  x = (d * scale) * q - (dmin * min)
    n, scales = b.shape[0], b[:, 0:16]
    dl = (_f16(b[:, 80:82]) * (scales & 0x0F)).unsqueeze(-1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4)).unsqueeze(-1)
    out3 = out.view(n, 16, 16)
    torch.mul(dl, _two_bit_values(b[:, 16:80]).view(n, 16, 16), out=out3)
    out3.sub_(ml)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # 110 bytes: 32 bytes hmask (bit i of byte l: high bit of value 32*i + l) | 64 bytes of 2-bit
    # low q | 12 bytes of 16 6-bit scales | f16 d.  x = (d * (scale - 32)) * (q - 4 * (1 - hbit))
    n, packed = b.shape[0], b[:, 96:108]
    # scale j: low 4 bits from nibble j//8 of byte j%8, high 2 bits from bits 2*(j//4) of byte 8 + j%4
    low = _bit_fields(packed[:, 0:8], (0, 4), 0x0F).flatten(-2)
    high = _bit_fields(packed[:, 8:12], (0, 2, 4, 6), 0x03).flatten(-2)
    scales = (low | (high << 4)).view(torch.int8) - 32
    dl = (_f16(b[:, 108:110]) * scales).unsqueeze(-1)
    q = (_two_bit_values(b[:, 32:96]) | _high_bits(b[:, 0:32], 8, 2).flatten(-2)).view(torch.int8) - 4
    torch.mul(dl, q.view(n, 16, 16), out=out.view(n, 16, 16))


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # 144 bytes: f16 d | f16 dmin | 12 bytes of 8 6-bit scales + mins | 128 bytes of nibbles (each
    # 32-byte run: low nibbles are one 32-value sub-block, high nibbles the next).
    # x = (d * scale) * q - (dmin * min)
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    dl = (_f16(b[:, 0:2]) * scales).unsqueeze(-1)
    ml = (_f16(b[:, 2:4]) * mins).unsqueeze(-1)
    q = _bit_fields(b[:, 16:144].unflatten(-1, (4, 32)), (0, 4), 0x0F).view(n, 8, 32)
    out3 = out.view(n, 8, 32)
    torch.mul(dl, q, out=out3)
    out3.sub_(ml)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # 176 bytes: f16 d | f16 dmin | 12 bytes of scales + mins | 32 bytes qh (bit i of byte l: high
    # bit of value 32*i + l) | 128 bytes of nibbles laid out as Q4_K.  x = (d * scale) * q - (dmin * min)
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    dl = (_f16(b[:, 0:2]) * scales).unsqueeze(-1)
    ml = (_f16(b[:, 2:4]) * mins).unsqueeze(-1)
    low = _bit_fields(b[:, 48:176].unflatten(-1, (4, 32)), (0, 4), 0x0F).view(n, 8, 32)
    out3 = out.view(n, 8, 32)
    torch.mul(dl, low | _high_bits(b[:, 16:48], 8, 4), out=out3)
    out3.sub_(ml)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # 210 bytes: 128 bytes ql (low 4 bits; per 64-byte half: low nibbles then high nibbles) | 64 bytes
    # qh (2 high bits; per 32-byte half: shifts 0, 2, 4, 6) | 16 int8 scales | f16 d.
    # x = (d * scale) * (q - 32), one scale per 16 values
    n = b.shape[0]
    dl = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8)).unsqueeze(-1)
    low = _bit_fields(b[:, 0:128].unflatten(-1, (2, 64)), (0, 4), 0x0F).view(n, 256)
    high = _two_bit_values(b[:, 128:192])
    q = (low | (high << 4)).view(torch.int8) - 32
    torch.mul(dl, q.view(n, 16, 16), out=out.view(n, 16, 16))


_KERNELS: dict[GGMLQuantizationType, Kernel] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q2_K: _q2_k,
    GGMLQuantizationType.Q3_K: _q3_k,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

TORCH_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS) | frozenset(_FLOAT_TYPES)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Decode raw GGML bytes (uint8, last dim a whole number of blocks) into float32 on raw's device.

    The output has shape ``raw.shape[:-1] + (n_blocks_per_row * block_size,)`` and never shares
    memory with ``raw``.
    """
    if raw.dtype != torch.uint8 or raw.dim() == 0:
        raise TypeError(f"dequantize expects a uint8 tensor with a last dim, got {raw.dtype} {tuple(raw.shape)}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if raw.shape[-1] % type_size != 0:
        raise GGUFError(
            f"{qtype.name} data has {raw.shape[-1]} bytes per row, "
            f"which is not a multiple of its {type_size}-byte block."
        )
    if qtype in _FLOAT_TYPES:
        return _reinterpret(raw, _FLOAT_TYPES[qtype]).float()
    out_shape = (*raw.shape[:-1], raw.shape[-1] // type_size * block_size)
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        return _dequantize_numpy(raw, qtype).reshape(out_shape)
    n_blocks = raw.numel() // type_size
    blocks = raw.reshape(n_blocks, type_size)
    out = torch.empty((n_blocks, block_size), dtype=torch.float32, device=raw.device)
    step = max(1, _CHUNK_VALUES.get(raw.device.type, _CHUNK_VALUES["cpu"]) // block_size)
    for start in range(0, n_blocks, step):
        kernel(blocks[start : start + step], out[start : start + step])
    return out.reshape(out_shape)


def _dequantize_numpy(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """gguf-py's numpy dequantizer for the types without a torch kernel (IQ*, TQ*, MXFP4, ...)."""
    try:
        values = gguf.quants.dequantize(raw.cpu().numpy(), qtype)
    except NotImplementedError:
        message = f"Quantization type {qtype.name} cannot be dequantized (neither here nor by gguf-py)."
        raise UnsupportedError(message) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(raw.device)


# Affine views of the block types that hold integer codes on a grid per 32 values: value = scale · code +
# offset, code an integer in 0..15 (4-bit types) or 0..255 (Q8_0). qmatmul.py repacks these exactly.
AFFINE_BITS = {
    GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q4_K: 4,
    GGMLQuantizationType.Q8_0: 8,
}


def affine_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [rows, bytes] of an AFFINE_BITS type → codes uint8 [rows, K], scale and offset float32
    [rows, K/32] such that value = scale · code + offset, bit for bit what `dequantize` gives up to the
    order of one float32 rounding."""
    rows = raw.shape[0]
    _, type_size = GGML_QUANT_SIZES[qtype]
    b = raw.reshape(-1, type_size)
    n = b.shape[0]
    if qtype == GGMLQuantizationType.Q8_0:
        codes = b[:, 2:] ^ 0x80  # int8 q → uint8 q + 128 (two's complement: flip the top bit)
        d = _f16(b[:, 0:2])
        scale, offset = d, -128.0 * d
    elif qtype == GGMLQuantizationType.Q4_0:
        codes, d = _nibbles(b[:, 2:]), _f16(b[:, 0:2])
        scale, offset = d, -8.0 * d
    elif qtype == GGMLQuantizationType.Q4_1:
        codes, scale, offset = _nibbles(b[:, 4:]), _f16(b[:, 0:2]), _f16(b[:, 2:4])
    elif qtype == GGMLQuantizationType.Q4_K:
        sc, mn = _k_scales_mins(b[:, 4:16])
        scale, offset = _f16(b[:, 0:2]) * sc, -(_f16(b[:, 2:4]) * mn)  # [n, 8]: one per 32-value sub-block
        codes = _bit_fields(b[:, 16:144].unflatten(-1, (4, 32)), (0, 4), 0x0F).reshape(n, 256)
    else:
        raise UnsupportedError(f"{qtype.name} has no affine 32-value block view.")
    return codes.reshape(rows, -1), scale.reshape(rows, -1), offset.reshape(rows, -1)
