"""Capture points along the whole chain of a block (issue 12, item 1): every point, in forward order, with its
shape, and each one what its name says — checked against the points around it by the operation between them,
in float32 on the exact path."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, load_model
from workbench.compare import expected_shape
from workbench.dump import BLOCK_CHAIN
from workbench.errors import ResourceError
from workbench.model import apply_rope, rms_norm
from workbench.probes import Capture, StepProbe

CHAIN = ["attn_norm", "attn.q", "attn.q_pe", "attn.kv_latent", "attn.k_pe", "attn.k", "attn.v", "attn.q_normed",
         "attn.k_normed", "attn.q_rope", "attn.k_rope", "attn.pattern", "attn.sink_share", "attn.out", "resid_mid", "ffn_norm",
         "moe.router_logits", "moe.topk_ids", "moe.topk_weights", "moe.shared_gate", "ffn_out", "resid_post"]
IDS = [1, 17, 99, 250, 3, 411, 42, 7]


def captured(model, ids=IDS, start=0, cache=None, **kw):
    cap = Capture(**kw)
    cache = cache if cache is not None else model.new_cache(len(ids) + start + 4)
    model.forward(torch.tensor(ids), start, cache, cap)
    return cap.tensors, cache


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_point_in_forward_order_with_its_shape(arch, tiny_paths):
    m = load_model(tiny_paths[arch])
    c = m.config
    t, _ = captured(m)
    T, keys = len(IDS), len(IDS)
    assert CHAIN == list(BLOCK_CHAIN)
    names = list(t)
    for i in range(c.n_layers):
        # the points compare expects of this layer (dump.point_shape, unless expected_shape says it has none)
        expected = [p for p in CHAIN if not isinstance(expected_shape(m, f"blocks.{i}.{p}", keys), str)]
        assert [n.split(".", 2)[2] for n in names if n.startswith(f"blocks.{i}.")] == expected, i
        assert all(tuple(t[f"blocks.{i}.{p}"].shape) == (T, *expected_shape(m, f"blocks.{i}.{p}", keys)) for p in expected
                   if p not in ("moe.topk_ids", "moe.topk_weights")), i
    assert names[-2:] == ["final_norm", "logits"]
    L = f"blocks.{c.n_dense_lead}."  # the first MoE layer of a MoE model (deepseek2 leads with dense ones)
    shapes = {"attn_norm": (T, c.hidden), "attn.q": (T, c.n_heads, c.head_dim), "attn.pattern": (T, c.n_heads, keys),
              "attn.out": (T, c.n_heads * c.v_head_dim), "resid_mid": (T, c.hidden), "ffn_norm": (T, c.hidden),
              "ffn_out": (T, c.hidden), "resid_post": (T, c.hidden)}
    if c.is_mla:  # one latent row and one RoPE key per position, the rotated part of every q head
        shapes |= {"attn.kv_latent": (T, c.kv_lora_rank), "attn.k_pe": (T, c.rope_dim), "attn.q_pe": (T, c.n_heads, c.rope_dim)}
    else:
        shapes |= {"attn.k": (T, c.n_kv_heads, c.head_dim), "attn.v": (T, c.n_kv_heads, c.head_dim),
                   "attn.q_rope": (T, c.n_heads, c.head_dim)}
    if c.is_moe:
        shapes |= {"moe.router_logits": (T, c.n_experts), "moe.topk_ids": (T, c.n_experts_used)}
    if c.shared_gate:
        shapes["moe.shared_gate"] = (T, 1)
    for point, shape in shapes.items():
        assert tuple(t[L + point].shape) == shape, point
    assert t[L + "moe.topk_ids"].dtype == torch.int64 if c.is_moe else True
    assert tuple(t["logits"].shape) == (T, c.vocab_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_point_is_what_its_name_says(arch, tiny_paths):
    m = load_model(tiny_paths[arch])
    c, w = m.config, m.weights
    if c.is_mla:
        pytest.skip("latent attention's points are checked against MHA written out in tests/test_deepseek2.py")
    t, cache = captured(m)
    for i, layer in enumerate(w.layers):
        p = f"blocks.{i}."
        pre = t[p + "attn.q_normed"] if c.qk_norm else t[p + "attn.q"]
        cos, sin = m.rope_table(c.layer_rope_base(i), c.layer_rope_scale(i), len(IDS), c.rope_style, yarn=c.rope_yarn)
        assert close(apply_rope(pre, cos[: len(IDS)], sin[: len(IDS)], c.rope_style), t[p + "attn.q_rope"])
        if c.qk_norm:  # per head, or (olmoe) over the whole projection of each row
            k = t[p + "attn.k"]
            expected = rms_norm(k.flatten(1), layer.k_norm, c.rms_eps).view_as(k) if c.qk_norm_whole else rms_norm(k, layer.k_norm, c.rms_eps)
            assert close(expected, t[p + "attn.k_normed"])
        pattern = t[p + "attn.pattern"]  # [T, heads, keys]: probabilities, causal
        sink = t[p + "attn.sink_share"] if c.attn_sinks else 0  # gpt-oss: the sink takes its share of each softmax
        assert close(pattern.sum(-1) + sink, torch.ones(pattern.shape[:2]))
        assert float(pattern.transpose(0, 1).triu(1).abs().max()) == 0.0  # [heads, T, keys]: no key after its query
        group = c.n_heads // c.n_kv_heads
        values = t[p + "attn.v"].repeat_interleave(group, dim=1)  # [T, heads, d]: V of every position
        out = torch.einsum("ths,shd->thd", pattern, values).reshape(len(IDS), -1)
        assert close(out, t[p + "attn.out"])  # the pattern is what weighs the values
        if not c.post_norms:
            assert close(t[p + "resid_mid"] + t[p + "ffn_out"], t[p + "resid_post"])
        assert close(rms_norm(t[p + "resid_mid"], layer.ffn_norm, c.rms_eps), t[p + "ffn_norm"])
    last = f"blocks.{c.n_layers - 1}.resid_post"
    assert close(rms_norm(t[last], w.output_norm, c.rms_eps), t["final_norm"])
    assert close(m.forward(torch.tensor(IDS), 0, m.new_cache(len(IDS))), t["logits"])


def test_the_cached_step_pattern_and_cache_off_by_one(tiny_paths):
    """One decode step after a prefill: its pattern spans every cached position; with cache-off-by-one its own
    position gets no weight (the bug, seen where it acts)."""
    m = load_model(tiny_paths["qwen3"])
    _, cache = captured(m)
    step, _ = captured(m, ids=[5], start=len(IDS), cache=cache, names=["*.attn.pattern"])
    pattern = step["blocks.0.attn.pattern"]
    assert tuple(pattern.shape) == (1, m.config.n_heads, len(IDS) + 1) and float(pattern[0, :, -1].min()) > 0
    cap = Capture(names=["*.attn.pattern"])
    m.forward(torch.tensor([5]), len(IDS), cache, cap, breaks=frozenset({"cache-off-by-one"}))
    assert float(cap.tensors["blocks.0.attn.pattern"][0, :, -1].abs().max()) == 0.0


def test_capture_is_bounded_and_probes_stay_cheap(tiny_paths):
    m = load_model(tiny_paths["llama"])
    with pytest.raises(ResourceError, match="capture bound"):
        captured(m, max_bytes=10_000)
    probe = StepProbe(slice(None))
    m.forward(torch.tensor(IDS), 0, m.new_cache(len(IDS)), probe)
    assert not probe.wants("blocks.0.attn.pattern") and not probe.wants("final_norm")  # never computed for it
    record = probe.collect()
    assert record.qk and record.layers and not record.routing
