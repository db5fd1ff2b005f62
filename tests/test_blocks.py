"""The "blocks" weights (blocks.py, blocks.cpp) against the exact path they stand in for.

The kernel decodes each block to gguf-py's float32 values and sums in float32: multiplied by the identity its
output is gguf-py's dequantization bit for bit, and against any x it is the float64 product up to float32
summation order. A model in blocks gives the dequantized float32 path's logits to ≤ 1e-5 relative, and its
cached and uncached paths agree to the exact bound (1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from conftest import ARCHS, load_model
from workbench import blocks
from workbench.errors import InputError

pytestmark = pytest.mark.skipif(blocks.available() is not None, reason=f"no block kernels here: {blocks.available()}")

TYPES = sorted(blocks.BLOCK_TYPES, key=lambda t: t.name)
# Byte offsets of every f16 scale in a block of each type (the rest of a block is codes: any bytes are valid).
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.MXFP4: (), Q.IQ4_NL: (0,)}


def random_blocks(qtype: Q, rows: int, n_in: int, seed: int, *, wild: bool = False) -> np.ndarray:
    """Random bytes for rows × n_in values of `qtype`, its scales finite: moderate (±0.05) or, with `wild`,
    any finite f16 bit pattern (subnormals, huge, both signs)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, n_in // block * size), dtype=np.uint8)
    b = raw.reshape(-1, size)
    for offset in F16_FIELDS[qtype]:
        if wild:
            bits = rng.integers(0, 0x7C00, size=b.shape[0], dtype=np.uint16) | (rng.integers(0, 2, size=b.shape[0], dtype=np.uint16) << 15)
            b[:, offset : offset + 2] = bits.view(np.uint8).reshape(-1, 2)
        else:
            b[:, offset : offset + 2] = np.float16(rng.uniform(-0.05, 0.05, size=b.shape[0])).view(np.uint8).reshape(-1, 2)
    if qtype == Q.MXFP4:  # E8M0 exponents: any whose weights stay finite when wild, else near 2^0
        b[:, 0] = rng.integers(0, 250, size=b.shape[0]) if wild else rng.integers(118, 130, size=b.shape[0])
    return raw


def _dense(raw: np.ndarray, qtype: Q, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gq.dequantize(raw, qtype), dtype=np.float32)).reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_identity_gives_gguf_py_values_bit_for_bit(qtype):
    """x = I: each output is one weight times 1 plus zeros, so the kernel's decoded weights show exactly."""
    rows, n_in = 37, 512
    raw = random_blocks(qtype, rows, n_in, seed=1, wild=True)
    want = _dense(raw, qtype, rows)
    got = blocks.BlockMatrix.of([(torch.from_numpy(raw), qtype)], n_in).apply(torch.eye(n_in))  # [n_in, rows] = Wᵀ
    assert torch.equal(got.t(), want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])
def test_product_equals_float64_up_to_summation_order(qtype, tokens):
    rows, n_in = 45, 768
    raw = random_blocks(qtype, rows, n_in, seed=2)
    w = _dense(raw, qtype, rows).double()
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((tokens, n_in)).astype(np.float32))
    got = blocks.BlockMatrix.of([(torch.from_numpy(raw), qtype)], n_in).apply(x)
    want = x.double() @ w.t()
    assert got.dtype == torch.float32 and got.shape == (tokens, rows)
    assert float((got.double() - want).norm() / want.norm()) < 1e-6


def test_fused_parts_of_mixed_types_and_an_unsupported_type():
    """Q, K, V stored in different types (Q5_0, Q8_0, F16, and IQ4_NL, which is dequantized at load into a
    float32 part): one call, the parts' outputs side by side."""
    n_in, rng = 256, np.random.default_rng(4)
    parts, dense = [], []
    for seed, (qtype, rows) in enumerate(((Q.Q5_0, 40), (Q.Q8_0, 24), (Q.F16, 8), (Q.IQ4_NL, 16))):
        if qtype == Q.F16:
            raw = gq.quantize(rng.standard_normal((rows, n_in)).astype(np.float32), qtype).view(np.uint8)
        else:
            raw = random_blocks(qtype, rows, n_in, seed=10 + seed)
        parts.append(blocks.part(torch.from_numpy(raw), qtype))
        dense.append(_dense(raw, qtype, rows))
    assert parts[-1][1] == Q.F32  # no IQ4_NL kernel: held dequantized
    x = torch.from_numpy(rng.standard_normal((3, n_in)).astype(np.float32))
    got = blocks.BlockMatrix.of(parts, n_in).apply(x)
    want = x.double() @ torch.cat(dense).double().t()
    assert got.shape == (3, 88) and float((got.double() - want).norm() / want.norm()) < 1e-6


def test_expert_stacks_select_views():
    n_in, rows, E = 256, 32, 4
    raw = torch.from_numpy(random_blocks(Q.Q4_K, E * rows, n_in, seed=5)).view(E, rows, -1)
    experts = blocks.BlockExperts.of([(raw, Q.Q4_K)], n_in)
    x = torch.randn(2, n_in)
    for e in (0, 3, torch.tensor(2)):
        want = x.double() @ _dense(raw[int(e)].numpy(), Q.Q4_K, rows).double().t()
        got = experts[e].apply(x)
        assert experts[e].parts[0].data_ptr() == experts.stack.parts[0][int(e)].data_ptr()  # a view, no copy
        assert float((got.double() - want).norm() / want.norm()) < 1e-6


def test_rows_that_do_not_hold_the_values_are_refused():
    raw = torch.zeros(4, 18 * 8, dtype=torch.uint8)  # 8 Q4_0 blocks = 256 values per row
    with pytest.raises(ValueError, match="do not hold 512 values"):
        blocks.BlockMatrix.of([(raw, Q.Q4_0)], 512)
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.workbench_blocks.block_mm(torch.randn(1, 512), [raw], [int(Q.Q4_0)])


def test_rms_norm_and_decode_attention_match_torch():
    ops = blocks.ops
    x, w = torch.randn(5, 3, 100), torch.randn(100)
    got, want = ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (100,), w, 1e-6)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6
    for H, Hkv, S, d in ((8, 2, 1, 64), (9, 3, 77, 64), (4, 4, 300, 40)):
        q, cache_k, cache_v = torch.randn(H, d), torch.randn(Hkv, S + 5, d), torch.randn(Hkv, S + 5, d)
        k, v = cache_k[:, :S], cache_v[:, :S]  # the cache's filled prefix: a strided view
        got = ops.decode_attention(q, k, v, d ** -0.5)
        want = F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], scale=d ** -0.5, enable_gqa=True)[0, :, 0]
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_in_blocks_equals_the_dequantized_path(arch, tiny_paths):
    """Every arch and every block type of the tiny files' mix: prefill and decode logits ≤ 1e-5 relative."""
    exact, fast = load_model(tiny_paths[arch]), load_model(tiny_paths[arch], weights="blocks")
    assert fast.info.weights == "blocks" and fast.info.weight_bytes < exact.info.weight_bytes
    ids = [1, 50, 60, 70, 80, 90, 100, 7, 3]
    want = exact.forward(torch.tensor(ids), 0, exact.new_cache(len(ids)))
    got_prefill = fast.forward(torch.tensor(ids), 0, fast.new_cache(len(ids)))
    cache = fast.new_cache(len(ids))
    fast.forward(torch.tensor(ids[:4]), 0, cache)
    steps = torch.cat([fast.forward(torch.tensor([t]), 4 + j, cache) for j, t in enumerate(ids[4:])])
    assert _rel(got_prefill, want) <= 1e-5
    assert _rel(steps, want[4:]) <= 1e-5


def test_blocks_session_cached_equals_uncached(tiny_paths):
    from workbench.session import Session

    model = load_model(tiny_paths["qwen3moe"], weights="blocks")
    assert model.equivalence_tolerance == 1e-4
    s = Session(model, [1, 50, 60], path="both", context=40)
    for _ in range(20):
        s.step()
    assert max(e["max_abs_diff"] / e["max_abs_logit"] for e in s.records.equiv) <= 1e-4


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_model_in_blocks_equals_the_dequantized_path(name, request):
    path = request.getfixturevalue(f"{name}_path")
    exact, fast = load_model(path), load_model(path, weights="blocks")
    ids = exact.tokenizer.encode("The history of the printing press begins in the fifteenth century, when")
    want = exact.forward(torch.tensor(ids), 0, exact.new_cache(len(ids)))
    cache = fast.new_cache(len(ids))
    fast.forward(torch.tensor(ids[:6]), 0, cache)
    got = torch.cat([fast.forward(torch.tensor([t]), 6 + j, cache) for j, t in enumerate(ids[6:])])
    assert _rel(got, want[6:]) <= 1e-5
    assert torch.equal(got.argmax(-1), want[6:].argmax(-1))


def test_auto_picks_blocks_on_a_cpu_and_explicit_blocks_elsewhere_is_refused(tiny_paths, monkeypatch):
    from workbench.loading import resolve_weights

    cpu = torch.device("cpu")
    assert resolve_weights("auto", cpu, 10**6, torch.float32) == "blocks"
    with pytest.raises(InputError, match="CPU only"):
        resolve_weights("blocks", torch.device("cuda"), 10**6, torch.float32)
    monkeypatch.setattr(blocks, "available", lambda: "no C++ compiler was found to build the block kernels")
    assert resolve_weights("auto", cpu, 10**6, torch.float32) == "dequantized"
    with pytest.raises(InputError, match="not available here: no C\\+\\+ compiler"):
        resolve_weights("blocks", cpu, 10**6, torch.float32)


def test_a_failed_build_says_why_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(blocks.KernelsUnavailable, match="building the block kernels with false failed"):
        blocks._build(tmp_path / "x.so")
    assert not list(tmp_path.iterdir())  # nothing half-written is left to be loaded later
    monkeypatch.setattr(blocks, "_compiler", lambda: None)
    with pytest.raises(blocks.KernelsUnavailable, match="no C\\+\\+ compiler"):
        blocks._build(tmp_path / "y.so")


def test_rope_matches_its_torch_form():
    from workbench import model as M

    ops = blocks.ops
    for style, rot, d in (("normal", 64, 64), ("neox", 64, 64), ("neox", 32, 96), ("normal", 16, 48)):
        x = torch.randn(3, 5, d)
        cos, sin = torch.randn(3, rot), torch.randn(3, rot)
        got = ops.rope(x, cos, sin, style == "neox")
        saved, blocks.ops = blocks.ops, None  # the torch form of the same function
        try:
            want = M.apply_rope(x, cos, sin, style)
        finally:
            blocks.ops = saved
        assert float((got - want).abs().max()) < 1e-5
