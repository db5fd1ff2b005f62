"""One qwen3moe block computed by hand in numpy, straight from the GGUF through gguf-py (its reader and its
dequantizers), against the engine's `blocks.0.resid_post`. This covers what transformers cannot load:
head_dim (96) ≠ hidden / heads (64), per-head QK-norm, split-half RoPE, GQA and the MoE router."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import load_model


def _tensors(path) -> dict[str, np.ndarray]:
    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float64)
    return out


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def hand_block0(path, ids: list[int]) -> np.ndarray:
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    n_heads = meta["qwen3moe.attention.head_count"]
    n_kv = meta["qwen3moe.attention.head_count_kv"]
    d = meta["qwen3moe.attention.key_length"]
    eps = meta["qwen3moe.attention.layer_norm_rms_epsilon"]
    base = meta["qwen3moe.rope.freq_base"]
    top_k = meta["qwen3moe.expert_used_count"]
    w = _tensors(path)
    p = "blk.0."
    T = len(ids)
    x = w["token_embd.weight"][ids]  # [T, hidden]
    h = _rms(x, w[p + "attn_norm.weight"], eps)
    q = (h @ w[p + "attn_q.weight"].T).reshape(T, n_heads, d)
    k = (h @ w[p + "attn_k.weight"].T).reshape(T, n_kv, d)
    v = (h @ w[p + "attn_v.weight"].T).reshape(T, n_kv, d)
    q = _rms(q, w[p + "attn_q_norm.weight"], eps)
    k = _rms(k, w[p + "attn_k_norm.weight"], eps)
    # RoPE, split halves: dim i pairs with i + d/2, angle = position × base^(-2i/d)
    half = d // 2
    angle = np.arange(T)[:, None] * base ** (-2 * np.arange(half) / d)[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def rope(t):
        a, b = t[..., :half], t[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    q, k = rope(q), rope(k)
    attn = np.zeros((T, n_heads, d))
    group = n_heads // n_kv
    for head in range(n_heads):
        kv = head // group  # consecutive query heads share a KV head
        scores = q[:, head] @ k[:, kv].T / np.sqrt(d)  # [T, T]
        scores = np.where(np.tril(np.ones((T, T))) > 0, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn[:, head] = probs @ v[:, kv]
    x = x + attn.reshape(T, n_heads * d) @ w[p + "attn_output.weight"].T
    h = _rms(x, w[p + "ffn_norm.weight"], eps)
    logits = h @ w[p + "ffn_gate_inp.weight"].T  # [T, experts]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(T):
        chosen = np.argsort(-probs[t])[:top_k]
        weights = probs[t, chosen] / probs[t, chosen].sum()
        for e, wt in zip(chosen, weights):
            gate = w[p + "ffn_gate_exps.weight"][e] @ h[t]
            up = w[p + "ffn_up_exps.weight"][e] @ h[t]
            out[t] += wt * (w[p + "ffn_down_exps.weight"][e] @ (_silu(gate) * up))
    return x + out


def test_qwen3moe_block0_by_hand(tiny_paths):
    path = tiny_paths["qwen3moe"]
    model = load_model(path)
    assert model.config.head_dim * model.config.n_heads != model.config.hidden
    ids = [5, 300, 17, 42, 256, 7, 99]
    captured = {}

    def probe(name, tensor):
        captured[name] = tensor.clone()

    model.forward(torch.tensor(ids), 0, model.new_cache(len(ids)), probe=probe)
    ours = captured["blocks.0.resid_post"].double().numpy()
    ref = hand_block0(path, ids)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_probe_names_follow_the_design(tiny_paths):
    model = load_model(tiny_paths["qwen3moe"])
    names = []
    model.forward(torch.tensor([1, 2, 3]), 0, model.new_cache(3), probe=lambda n, t: names.append(n))
    for suffix in ("attn.q", "attn.q_normed", "attn.k", "attn.k_normed", "moe.router_logits", "moe.topk_ids",
                   "moe.topk_weights", "resid_post"):
        assert f"blocks.1.{suffix}" in names
