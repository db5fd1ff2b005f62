"""gpt-oss (issue 15, fifth family): attention sinks, sliding-window layers alternating with full ones, Q/K/V/O
biases, a router bias, expert biases, top-k of the router's logits then a softmax over those k, the clamped
SwiGLU, MXFP4 experts and YaRN. The arch-wide tests (llama.cpp on an F32 copy, cached ≡ uncached, the static
step, compare's breaks, llama.cpp's dumps) run on the tiny file like every arch's; this file writes each piece
out from gguf-py's tensors (MXFP4 dequantized by gguf-py), the slow way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from conftest import load_model
from workbench.gguf_file import GGUFFile
from workbench.model import breaks_that_apply
from workbench.probes import Capture

IDS = [1, 17, 99, 250, 3, 411, 42, 7, 300, 12]


def _tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    info = gguf.tensors[name]
    values = dequantize(gguf.raw(name).numpy(), info.ggml_type).reshape(info.shape)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))


def _captured(model, breaks=frozenset()) -> dict[str, torch.Tensor]:
    cap = Capture()
    model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), cap, breaks=breaks)
    return {k: v.double() if v.is_floating_point() else v for k, v in cap.tensors.items()}


@pytest.fixture(scope="module")
def model(tiny_paths):
    return load_model(tiny_paths["gpt-oss"])


@pytest.fixture(scope="module")
def gguf(tiny_paths):
    return GGUFFile(tiny_paths["gpt-oss"])


def test_config(model, gguf):
    c = model.config
    assert c.attn_sinks and c.gating == "softmax_topk" and c.ffn_act == "swiglu_oai" and not c.norm_topk
    assert (c.sliding_window, c.swa_pattern) == (4, 2) and [c.is_local_layer(i) for i in range(4)] == [True, False] * 2
    assert c.rope_style == "neox" and c.rope_yarn.factor == 32 and c.rope_yarn.mscale == pytest.approx(1 + 0.1 * math.log(32))
    assert c.attn_scale == pytest.approx(64 ** -0.5) and c.expert_ffn_hidden == 128
    assert gguf.tensors["blk.0.ffn_gate_exps.weight"].type_name == "MXFP4"
    assert {"sinks-dropped", "softmax-before-topk", "swiglu-unclamped", "no-sliding-window", "yarn-ignored"} <= set(
        breaks_that_apply(c))
    assert "topk-renorm-anyway" not in breaks_that_apply(c)  # the softmax over the chosen k sums to 1 already


def test_attention_with_sinks_and_windows_written_out(model, gguf):
    """Per layer, from the captured q_rope, k_rope, v: scores q·k/8 over keys 0..t, keys ≥ 4 back masked on the
    even (sliding) layers, each head's sink logit joining the softmax and its column dropped, Σ p·v; then the
    output projection and its bias: pattern, sink_share, attn.out and resid_mid as the engine's."""
    c, t = model.config, _captured(model)
    T, group = len(IDS), c.n_heads // c.n_kv_heads
    for i in range(c.n_layers):
        b = f"blocks.{i}."
        q, k, v = t[b + "attn.q_rope"], t[b + "attn.k_rope"], t[b + "attn.v"]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [T, heads, d]
        scores = torch.einsum("thd,shd->hts", q, k) / 8
        delta = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # query − key position
        allowed = (delta >= 0) & ((delta < 4) if i % 2 == 0 else True)
        scores = scores.masked_fill(~allowed, -math.inf)
        sinks = _tensor(gguf, f"blk.{i}.attn_sinks.weight")[:, None, None].expand(-1, T, 1)
        full = torch.softmax(torch.cat((scores, sinks), -1), -1)  # [heads, T, T + 1]
        pattern, share = full[..., :-1].transpose(0, 1), full[..., -1].T  # [T, heads, T], [T, heads]
        out = torch.einsum("ths,shd->thd", pattern, v).reshape(T, -1)
        w_o, b_o = _tensor(gguf, f"blk.{i}.attn_output.weight"), _tensor(gguf, f"blk.{i}.attn_output.bias")
        x_in = t[f"blocks.{i - 1}.resid_post"] if i else None
        for name, expected in (("attn.pattern", pattern), ("attn.sink_share", share), ("attn.out", out)):
            assert (t[b + name] - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max())), (i, name)
        if x_in is not None:
            resid = x_in + t[b + "attn.out"] @ w_o.T + b_o
            assert (t[b + "resid_mid"] - resid).abs().max() <= 1e-5 * float(resid.abs().max()), i
        assert float(share.min()) > 0.01  # the sinks take a visible share


def test_experts_written_out(model, gguf):
    """Per layer, from the captured post-attention norm: logits = x·W + b; the 2 largest logits; a softmax over
    those 2; each expert (MXFP4, dequantized by gguf-py) gate/up with their biases, the clamped SwiGLU
    min(g, 7)·σ(1.702·min(g, 7))·(clamp(u, ±7) + 1), down with its bias; the weighted sum."""
    c, t = model.config, _captured(model)
    for i in range(c.n_layers):
        w = lambda name, part="weight": _tensor(gguf, f"blk.{i}.{name}.{part}")  # noqa: E731
        x = t[f"blocks.{i}.ffn_norm"]
        logits = x @ w("ffn_gate_inp").T + w("ffn_gate_inp", "bias")
        top, ids = logits.topk(2, -1)
        weights = torch.softmax(top, -1)
        assert torch.allclose(t[f"blocks.{i}.moe.router_logits"], logits, atol=1e-4)
        assert torch.equal(t[f"blocks.{i}.moe.topk_ids"].sort(-1).values, ids.sort(-1).values)
        assert torch.allclose(t[f"blocks.{i}.moe.topk_weights"].sort(-1).values, weights.sort(-1).values, atol=1e-5)
        out = torch.zeros_like(x)
        for r in range(len(IDS)):
            for wt, e in zip(weights[r].tolist(), ids[r].tolist()):
                g = (x[r] @ w("ffn_gate_exps")[e].T + w("ffn_gate_exps", "bias")[e]).clamp(max=7)
                u = (x[r] @ w("ffn_up_exps")[e].T + w("ffn_up_exps", "bias")[e]).clamp(-7, 7)
                h = g * torch.sigmoid(1.702 * g) * (u + 1)
                out[r] += wt * (h @ w("ffn_down_exps")[e].T + w("ffn_down_exps", "bias")[e])
        assert (t[f"blocks.{i}.ffn_out"] - out).abs().max() <= 1e-5 * float(out.abs().max()), i


def test_yarn_scales_the_rope_tables(model):
    """cos/sin at magnitude 1 + 0.1·ln 32 (get_mscale of the factor), angles blended by YaRN's ramp."""
    c = model.config
    cos, sin = model.rope_table(c.rope_base, 1.0, 8, c.rope_style, yarn=c.rope_yarn)
    radius = (cos**2 + sin**2).sqrt()
    assert torch.allclose(radius, torch.full_like(radius, 1 + 0.1 * math.log(32)), atol=1e-5)
    plain_cos, _ = model.rope_table(c.rope_base, 1.0, 8, c.rope_style)
    assert not torch.allclose(cos / radius, plain_cos, atol=1e-3)


@pytest.mark.parametrize("bug, point", [("sinks-dropped", "attn.pattern"), ("swiglu-unclamped", "ffn_out"),
                                        ("softmax-before-topk", "moe.topk_weights"), ("no-sliding-window", "attn.pattern")])
def test_each_porting_bug_changes_its_point(model, bug, point):
    clean, broken = _captured(model), _captured(model, frozenset({bug}))
    assert (clean[f"blocks.0.{point}"] - broken[f"blocks.0.{point}"]).abs().max() > 1e-3, bug
    assert torch.equal(clean["blocks.0.attn.q_rope"], broken["blocks.0.attn.q_rope"])  # nothing before it moves
    if bug == "sinks-dropped":
        assert torch.allclose(broken["blocks.0.attn.pattern"].sum(-1), torch.ones(len(IDS), model.config.n_heads, dtype=torch.float64))


def test_transformers_is_not_a_reference_for_it_and_says_so(tiny_paths):
    """transformers 5.24 maps gpt_oss, but its GGUF reader takes each rope.scaling.* field's first part (the key
    length) for the value and fails on YaRN files (every released one): the adapter says so in one sentence."""
    pytest.importorskip("transformers")
    from workbench.errors import ReferenceFailed
    from workbench.hf import transformers_dump

    with pytest.raises(ReferenceFailed) as exc:
        transformers_dump(tiny_paths["gpt-oss"], IDS[:5], 3)
    assert "gpt-oss" in str(exc.value) and "\n" not in str(exc.value)
