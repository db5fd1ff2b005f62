"""workbench.quants must reproduce gguf-py's numpy dequantizers bit for bit."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import GGUFError, UnsupportedError
from workbench.quants import TORCH_TYPES, dequantize

T = GGMLQuantizationType
TYPES = sorted(TORCH_TYPES, key=lambda t: t.name)

# Byte offsets (within one block) of every f16 scale field, per quantized type.
F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
# Plain float types: (unsigned int of the same width, exponent bit mask).
FLOAT_BITS = {T.F32: (np.uint32, 0x7F800000), T.F16: (np.uint16, 0x7C00), T.BF16: (np.uint16, 0x7F80)}


def random_raw(qtype: GGMLQuantizationType, shape: tuple[int, ...], seed: int, *, finite: bool = True) -> np.ndarray:
    """Random bytes for ``shape[-1]`` blocks per row; with ``finite`` every float field is made finite.

    Finite floats are random bit patterns with the exponent kept below all-ones, so subnormals,
    tiny and huge magnitudes and both signs all occur.
    """
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] * type_size), dtype=np.uint8)
    if not finite:
        return raw
    if qtype in FLOAT_BITS:
        dtype, exponent = FLOAT_BITS[qtype]
        bits = raw.view(dtype)
        top_exponent_bit = dtype(1 << (8 * bits.itemsize - 2))
        bits[(bits & exponent) == exponent] ^= top_exponent_bit  # Inf/NaN -> an ordinary finite value
        return raw
    blocks = raw.reshape(-1, type_size)
    for offset in F16_FIELDS[qtype]:
        magnitude = rng.integers(0, 0x7C00, size=blocks.shape[0], dtype=np.uint16)
        field = magnitude | (rng.integers(0, 2, size=blocks.shape[0], dtype=np.uint16) << 15)
        blocks[:, offset : offset + 2] = field.view(np.uint8).reshape(-1, 2)
    return raw


def reference(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def ours(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    out = dequantize(torch.from_numpy(raw), qtype)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    return out.numpy()


def assert_bit_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_torch_types_cover_the_brief() -> None:
    assert TORCH_TYPES == frozenset(F16_FIELDS) | frozenset(FLOAT_BITS)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bit_identical_with_finite_scales(qtype: GGMLQuantizationType) -> None:
    raw = random_raw(qtype, (5, 13), seed=1234)
    block_size = GGML_QUANT_SIZES[qtype][0]
    got, want = ours(raw, qtype), reference(raw, qtype)
    assert got.shape == (5, 13 * block_size)
    assert_bit_identical(got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_raw_random_bytes_match_including_nan_and_inf(qtype: GGMLQuantizationType) -> None:
    # NaN payload bits may differ (torch canonicalises NaNs): NaN only has to meet NaN.
    raw = random_raw(qtype, (4, 256), seed=99, finite=False)
    want = reference(raw, qtype)
    assert not np.isfinite(want).all()  # the test does exercise non-finite values
    np.testing.assert_array_equal(ours(raw, qtype), want)


def test_every_f16_bit_pattern() -> None:
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    got, want = ours(raw, T.F16), reference(raw, T.F16)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[finite], want.view(np.uint32)[finite])
    np.testing.assert_array_equal(np.isnan(got), ~finite)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_shapes_and_layouts(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    flat = random_raw(qtype, (7,), seed=5)
    got = ours(flat, qtype)
    assert got.shape == (7 * block_size,)
    assert_bit_identical(got, reference(flat, qtype))
    cube = random_raw(qtype, (2, 3, 4), seed=6)
    got = ours(cube, qtype)
    assert got.shape == (2, 3, 4 * block_size)
    assert_bit_identical(got, reference(cube, qtype))
    empty = dequantize(torch.zeros((3, 0), dtype=torch.uint8), qtype)
    assert empty.shape == (3, 0) and empty.dtype == torch.float32
    # A misaligned, non-contiguous view (odd byte offset, every other row) must still decode.
    buffer = torch.from_numpy(random_raw(qtype, (6, 4), seed=7, finite=False))
    view = buffer[::2, 1 : 1 + 3 * type_size]
    np.testing.assert_array_equal(dequantize(view, qtype).numpy(), reference(view.contiguous().numpy(), qtype))


def test_output_never_aliases_raw() -> None:
    raw = torch.from_numpy(random_raw(T.F32, (4,), seed=8))
    out = dequantize(raw, T.F32)
    out.zero_()
    assert raw.any()


@settings(max_examples=30, deadline=None)
@given(
    qtype=st.sampled_from(TYPES),
    n_rows=st.integers(1, 4),
    n_blocks=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_property(qtype: GGMLQuantizationType, n_rows: int, n_blocks: int, seed: int) -> None:
    raw = random_raw(qtype, (n_rows, n_blocks), seed=seed)
    assert_bit_identical(ours(raw, qtype), reference(raw, qtype))


def test_fallback_to_gguf_py() -> None:
    qtype = T.IQ4_NL
    assert qtype not in TORCH_TYPES
    raw = np.random.default_rng(3).integers(0, 256, size=(3, 4 * GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    got = dequantize(torch.from_numpy(raw), qtype)
    assert got.dtype == torch.float32 and got.shape == (3, 4 * GGML_QUANT_SIZES[qtype][0])
    np.testing.assert_array_equal(got.numpy(), reference(raw, qtype))


@pytest.mark.parametrize("qtype", [T.Q8_K, T.I8], ids=lambda t: t.name)
def test_types_gguf_py_cannot_decode_are_unsupported(qtype: GGMLQuantizationType) -> None:
    with pytest.raises(UnsupportedError, match=qtype.name):
        dequantize(torch.zeros(GGML_QUANT_SIZES[qtype][1], dtype=torch.uint8), qtype)


@pytest.mark.parametrize(("qtype", "n_bytes"), [(T.Q4_K, 143), (T.Q8_0, 35), (T.F32, 6), (T.IQ4_NL, 17)])
def test_partial_block_raises(qtype: GGMLQuantizationType, n_bytes: int) -> None:
    with pytest.raises(GGUFError, match=qtype.name):
        dequantize(torch.zeros((2, n_bytes), dtype=torch.uint8), qtype)


def test_non_uint8_input_is_rejected() -> None:
    with pytest.raises(TypeError):
        dequantize(torch.zeros(4, dtype=torch.float32), T.F32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", [*TYPES, T.IQ4_NL], ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype: GGMLQuantizationType) -> None:
    raw = random_raw(qtype, (3, 9), seed=11, finite=qtype in TORCH_TYPES)
    got = dequantize(torch.from_numpy(raw).cuda(), qtype)
    assert got.device.type == "cuda"
    np.testing.assert_array_equal(got.cpu().numpy(), reference(raw, qtype))
