"""DeepSeek-V2/V3 (issue 15, fourth family): multi-head latent attention (MLA), leading dense layers, shared
experts and V3's routing. Two tiny layouts: `deepseek2` (V3's: q through a LoRA, the split attn_k_b / attn_v_b,
sigmoid scores + exp_probs_b, group-limited top-k, renormalised and scaled weights) and `deepseek2-lite`
(V2-Lite's: plain attn_q, the older single attn_kv_b, softmax over all experts, weights as they are). The
arch-wide tests (llama.cpp on an F32 copy, cached ≡ uncached, the static step, compare's breaks, llama.cpp's
dumps) run on both like every arch's; this file writes each piece out from gguf-py's tensors, the slow way:
attention as plain MHA with every head's K and V decompressed, the router step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize

from conftest import load_model
from workbench.compare import compare
from workbench.dump import ours
from workbench.errors import ReferenceFailed
from workbench.gguf_file import GGUFFile
from workbench.model import breaks_that_apply
from workbench.probes import Capture
from workbench.session import Session

KINDS = ("deepseek2", "deepseek2-lite")
IDS = [1, 17, 99, 250, 3, 411, 42, 7, 300, 12]


def _tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    info = gguf.tensors[name]
    values = dequantize(gguf.raw(name).numpy(), info.ggml_type).reshape(info.shape)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))


def _captured(model, ids=IDS, breaks=frozenset()) -> dict[str, torch.Tensor]:
    cap = Capture()
    model.forward(torch.tensor(ids), 0, model.new_cache(len(ids)), cap, breaks=breaks)
    return {k: v.double() if v.is_floating_point() else v for k, v in cap.tensors.items()}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _inv_freq(c) -> torch.Tensor:
    """Each RoPE pair's inverse frequency 1/f, f = base^(2i/rot); under YaRN (HF's _compute_yarn_parameters,
    written out) a blend of 1/(factor·f) and 1/f by a linear ramp between the correction dims of beta_fast and
    beta_slow over the original context."""
    rot, base = c.rope_dim, c.rope_base
    freq = base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    y = c.rope_yarn
    if y is None:
        return 1 / freq
    correction = lambda turns: rot * math.log(y.original_context / (turns * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = max(math.floor(correction(y.beta_fast)), 0), min(math.ceil(correction(y.beta_slow)), rot - 1)
    ramp = ((torch.arange(rot // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return 1 / (y.factor * freq) * ramp + 1 / freq * (1 - ramp)


def _rope_adjacent(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (2i, 2i+1) of x [T, ..., d] at positions 0..T-1, as complex numbers."""
    T, d = x.shape[0], x.shape[-1]
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    turn = torch.polar(torch.ones_like(angles), angles).reshape(T, *([1] * (x.dim() - 2)), d // 2)
    return torch.view_as_real(z * turn).reshape(x.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_config_reads_each_layout(kind, tiny_paths):
    c = load_model(tiny_paths[kind]).config
    assert c.is_mla and (c.kv_lora_rank, c.rope_dim, c.head_dim, c.v_head_dim) == (128, 32, 96, 64)
    yarn_mscale = 1 + 0.1 * 0.707 * math.log(8) if kind == "deepseek2" else 1.0  # V3's tiny file has YaRN
    assert c.attn_scale == pytest.approx(yarn_mscale**2 * 96 ** -0.5) and c.n_dense_lead == 1 and c.is_moe_layer(1) and not c.is_moe_layer(0)
    if kind == "deepseek2":
        assert (c.q_lora_rank, c.gating, c.n_expert_groups, c.n_groups_used) == (96, "sigmoid", 4, 2)
        assert c.norm_topk and c.routed_scale == 2.5 and c.has_probs_bias and c.shared_ffn_hidden == 128
    else:
        assert (c.q_lora_rank, c.gating, c.n_expert_groups) == (0, "softmax", 1)
        assert not c.norm_topk and c.routed_scale == 1.0 and not c.has_probs_bias and c.shared_ffn_hidden == 256


@pytest.mark.parametrize("kind", KINDS)
def test_latent_attention_equals_mha_written_out(kind, tiny_paths):
    """Every layer's attention, from its captured input: q (LoRA or plain), the normed latent and the shared RoPE
    key from attn_kv_a_mqa, every head's K and V decompressed (attn_k_b / attn_v_b, or attn_kv_b), RoPE on the
    last rope dims of q and on k_pe (YaRN's frequencies in V3's file), softmax(q·k × the file's scale) causal,
    Σ p·v: our absorbed path's pattern, attn.out and the points on the way agree to float32 rounding."""
    model = load_model(tiny_paths[kind])
    gguf, c = GGUFFile(tiny_paths[kind]), model.config
    t = _captured(model)
    H, nope, rope, v_dim, lora = c.n_heads, c.head_dim - c.rope_dim, c.rope_dim, c.v_head_dim, c.kv_lora_rank
    T = len(IDS)
    for i in range(c.n_layers):
        w = lambda name: _tensor(gguf, f"blk.{i}.{name}.weight")  # noqa: E731
        x = t[f"blocks.{i}.attn_norm"]
        if c.q_lora_rank:
            q = _rms(x @ w("attn_q_a").T, w("attn_q_a_norm"), c.rms_eps) @ w("attn_q_b").T
        else:
            q = x @ w("attn_q").T
        q = q.view(T, H, nope + rope)
        kv_a = x @ w("attn_kv_a_mqa").T
        latent = _rms(kv_a[:, :lora], w("attn_kv_a_norm"), c.rms_eps)
        k_pe = _rope_adjacent(kv_a[:, lora:], _inv_freq(c))
        if f"blk.{i}.attn_kv_b.weight" in gguf.tensors:
            kv = (latent @ w("attn_kv_b").T).view(T, H, nope + v_dim)
            k_nope, v = kv[..., :nope], kv[..., nope:]
        else:
            k_nope = torch.einsum("tl,hln->thn", latent, w("attn_k_b"))
            v = torch.einsum("hvl,tl->thv", w("attn_v_b"), latent)
        q_full = torch.cat((q[..., :nope], _rope_adjacent(q[..., nope:], _inv_freq(c))), -1)
        k_full = torch.cat((k_nope, k_pe[:, None].expand(T, H, rope)), -1)
        scale = (1 + 0.1 * 0.707 * math.log(8)) ** 2 if c.rope_yarn else 1.0  # YaRN's mscale², deepseek2's way
        scores = torch.einsum("thd,shd->ths", q_full, k_full) * scale / math.sqrt(nope + rope)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[:, None], -math.inf)
        pattern = torch.softmax(scores, -1)
        out = torch.einsum("ths,shv->thv", pattern, v).reshape(T, H * v_dim)
        b = f"blocks.{i}.attn."
        for name, expected in (("q", q), ("q_pe", q_full[..., nope:]), ("kv_latent", latent), ("k_pe", k_pe),
                               ("pattern", pattern), ("out", out)):
            got = t[b + name]
            assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max())), (kind, i, name)


def test_v3_routing_written_out(tiny_paths):
    """V3's router at every MoE layer, from the captured ffn_norm: sigmoid scores; + exp_probs_b to choose; the 2
    best of 4 groups (a group's score: its 2 best); top-2 experts within them; their *unbiased* scores as weights,
    renormalised, × 2.5; the FFN = Σ weight·SwiGLU_e + the shared expert, ungated."""
    model = load_model(tiny_paths["deepseek2"])
    gguf, c = GGUFFile(tiny_paths["deepseek2"]), model.config
    t = _captured(model)
    differs = 0
    for i in range(c.n_dense_lead, c.n_layers):
        w = lambda name: _tensor(gguf, f"blk.{i}.{name}.weight")  # noqa: E731
        x = t[f"blocks.{i}.ffn_norm"]
        scores = torch.sigmoid(x @ w("ffn_gate_inp").T)  # [T, 8]
        biased = scores + _tensor(gguf, f"blk.{i}.exp_probs_b.bias")
        groups = biased.view(len(IDS), 4, 2)
        best = groups.topk(2, -1).values.sum(-1).topk(2, -1).indices  # [T, 2 groups]
        allowed = torch.zeros(len(IDS), 4, dtype=torch.bool).scatter_(1, best, True).repeat_interleave(2, 1)
        ids = biased.masked_fill(~allowed, -math.inf).topk(2, -1).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * 2.5
        assert torch.equal(t[f"blocks.{i}.moe.topk_ids"].sort(-1).values, ids.sort(-1).values), i
        assert torch.allclose(t[f"blocks.{i}.moe.topk_weights"], weights, atol=1e-5), i
        differs += int((ids.sort(-1).values != scores.topk(2, -1).indices.sort(-1).values).any(-1).sum())
        gate_e, up_e, down_e = w("ffn_gate_exps"), w("ffn_up_exps"), w("ffn_down_exps")
        routed = torch.stack([sum(wt * (F.silu(x[r] @ gate_e[e].T) * (x[r] @ up_e[e].T)) @ down_e[e].T
                                  for wt, e in zip(weights[r].tolist(), ids[r].tolist())) for r in range(len(IDS))])
        shared = (F.silu(x @ w("ffn_gate_shexp").T) * (x @ w("ffn_up_shexp").T)) @ w("ffn_down_shexp").T
        expected = routed + shared
        assert (t[f"blocks.{i}.ffn_out"] - expected).abs().max() <= 1e-5 * expected.abs().max(), i
    assert differs > 0  # the bias and the groups choose other experts than the plain top-2 somewhere


def test_leading_dense_layer_has_no_router(tiny_paths):
    model = load_model(tiny_paths["deepseek2"])
    gguf = GGUFFile(tiny_paths["deepseek2"])
    t = _captured(model)
    assert not any(k.startswith("blocks.0.moe.") for k in t) and "blocks.1.moe.topk_ids" in t
    w = lambda name: _tensor(gguf, f"blk.0.{name}.weight")  # noqa: E731
    x = t["blocks.0.ffn_norm"]
    expected = (F.silu(x @ w("ffn_gate").T) * (x @ w("ffn_up").T)) @ w("ffn_down").T
    assert (t["blocks.0.ffn_out"] - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_the_cache_holds_the_latent_and_the_rope_key(kind, tiny_paths):
    """Per position and layer the cache holds kv_lora_rank + rope values (128 + 32), where an MHA cache of the
    same model would hold n_heads × (K 96 + V 64): n_heads × less here (8 heads, 4 in the lite file), 71× on
    DeepSeek-V3 (512 + 64 values vs 128 heads × (192 + 128))."""
    model = load_model(tiny_paths[kind])
    c = model.config
    s = Session(model, IDS[:6], path="both", probes=True, context=32)
    for _ in range(3):
        s.step()
    kv = s.trace().kv.filter(s.trace().kv["path"] == "cached")
    last = kv.filter(kv["step"] == kv["step"].max())
    assert (last["length"] == 8).all() and (last["v_bytes"] == 0).all()  # V is a view of the latent
    assert int(last["k_bytes"].sum()) == 8 * c.kv_bytes_per_token(4) == 8 * c.n_layers * (128 + 32) * 4
    assert c.mha_bytes_per_token(4) == c.n_layers * c.n_heads * (96 + 64) * 4 == c.n_heads * c.kv_bytes_per_token(4)
    rel = s.trace().equiv["max_abs_diff"] / s.trace().equiv["max_abs_logit"]
    assert float(rel.max()) <= 1e-4  # cached ≡ uncached


def test_deepseek_breaks_apply_where_they_should_and_compare_names_them(tiny_paths):
    v3, lite = (load_model(tiny_paths[k]) for k in KINDS)
    assert {"skip-kv-a-norm", "probs-bias-in-weights", "no-group-limit", "no-routed-scaling", "no-topk-renorm",
            "shared-expert-dropped"} <= set(breaks_that_apply(v3.config))
    applies = set(breaks_that_apply(lite.config))
    assert "skip-kv-a-norm" in applies and "topk-renorm-anyway" in applies
    assert not applies & {"probs-bias-in-weights", "no-group-limit", "no-routed-scaling", "shared-expert-ungated"}
    for name, point in (("skip-kv-a-norm", "attn.kv_latent"), ("shared-expert-dropped", "ffn_out"),
                        ("topk-renorm-anyway", "moe.topk_weights"), ("rope-style-swap", "attn.q_pe")):
        result = compare(lite, ours(lite, IDS, 6, breaks=frozenset({name})))
        fd = result.first_divergence
        assert fd is not None and fd.capture.split(".", 2)[2] == point and result.suspects[0] == name, (name, fd)


def test_transformers_is_not_a_reference_for_it_and_says_so(tiny_paths):
    pytest.importorskip("transformers")
    from workbench.hf import transformers_dump

    with pytest.raises(ReferenceFailed) as exc:
        transformers_dump(tiny_paths["deepseek2"], IDS[:5], 3)
    assert "deepseek2" in str(exc.value) and "\n" not in str(exc.value)


def test_yarn_rope_and_attention_scale_written_out(tiny_paths):
    """The V3 tiny file's YaRN (factor 8 over an original context of 64, mscale_all_dim 0.707, stored as 0.0707):
    each pair's inverse frequency blends 1/(factor·f) and 1/f by a linear ramp between the correction dims of
    beta_fast 32 and beta_slow 1 (HF's _compute_yarn_parameters, written out here); cos/sin keep magnitude 1
    (deepseek2's mscale / mscale_all_dim ratio); q·k is scaled by (1 + 0.1·0.707·ln 8)² / √96."""
    model = load_model(tiny_paths["deepseek2"])
    c = model.config
    assert c.rope_yarn is not None and c.rope_yarn.factor == 8.0 and c.rope_yarn.original_context == 64
    assert c.attn_scale == pytest.approx((1 + 0.1 * 0.707 * math.log(8)) ** 2 / math.sqrt(96), rel=1e-6)
    t = _captured(model)
    nope = c.head_dim - c.rope_dim
    inv_freq = _inv_freq(c)
    assert not torch.allclose(inv_freq, c.rope_base ** (-torch.arange(0, c.rope_dim, 2, dtype=torch.float64) / c.rope_dim))
    for i in range(c.n_layers):
        expected, got = _rope_adjacent(t[f"blocks.{i}.attn.q"][..., nope:], inv_freq), t[f"blocks.{i}.attn.q_pe"]
        assert (got - expected).abs().max() <= 1e-5 * float(expected.abs().max()), i
    assert "yarn-ignored" in breaks_that_apply(c)
    plain = _captured(model, breaks=frozenset({"yarn-ignored"}))
    assert (plain["blocks.0.attn.q_pe"] - t["blocks.0.attn.q_pe"]).abs().max() > 1e-3  # which changes the angles
