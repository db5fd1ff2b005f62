"""Qwen2-MoE (issue 15, second family): routed experts whose top-k weights are NOT renormalised, plus a shared
expert every token goes through, gated by sigmoid(x · ffn_gate_inp_shexp), and Q/K/V biases. The arch-wide tests
(test_reference against llama.cpp on an F32 copy and transformers' qwen2_moe, test_equivalence, test_capture,
test_compare, test_dump_llama) run on the tiny file like every arch's; this file checks what is its own."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from gguf.quants import dequantize

from conftest import load_model
from workbench.gguf_file import GGUFFile
from workbench.model import breaks_that_apply
from workbench.session import Session

IDS = [1, 17, 99, 250, 3, 411, 42, 7, 300, 12, 5, 6]


def _tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    info = gguf.tensors[name]
    values = dequantize(gguf.raw(name).numpy(), info.ggml_type).reshape(info.shape)  # torch order [.., out, in]
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def test_config_reads_both_expert_widths_and_no_renormalisation(tiny_paths):
    c = load_model(tiny_paths["qwen2moe"]).config
    meta = GGUFFile(tiny_paths["qwen2moe"]).metadata
    assert (c.n_experts, c.n_experts_used) == (8, 2) and not c.norm_topk and not c.qk_norm
    assert c.expert_ffn_hidden == meta["qwen2moe.expert_feed_forward_length"] == 128
    assert c.shared_ffn_hidden == meta["qwen2moe.expert_shared_feed_forward_length"] == 256
    assert "no-topk-renorm" not in breaks_that_apply(c)  # there is nothing to renormalise


def test_the_ffn_is_routed_experts_plus_the_gated_shared_expert(tiny_paths):
    """Model.moe on a few rows against the FFN written out from gguf-py's dequantized tensors: softmax → top-2
    (weights as they are) → Σ weight × SwiGLU_e(x), + sigmoid(x·g) × SwiGLU_shared(x)."""
    model = load_model(tiny_paths["qwen2moe"])
    gguf = GGUFFile(tiny_paths["qwen2moe"])
    x = torch.randn(5, model.config.hidden, generator=torch.Generator().manual_seed(0))
    for i in range(model.config.n_layers):
        t = lambda name: _tensor(gguf, f"blk.{i}.{name}.weight")  # noqa: E731
        router, gate_e, up_e, down_e = t("ffn_gate_inp"), t("ffn_gate_exps"), t("ffn_up_exps"), t("ffn_down_exps")
        probs = torch.softmax(x @ router.T, -1)
        weights, ids = probs.topk(2, -1)
        routed = torch.stack([sum(w * (F.silu(x[r] @ gate_e[e].T) * (x[r] @ up_e[e].T)) @ down_e[e].T
                                  for w, e in zip(weights[r].tolist(), ids[r].tolist())) for r in range(len(x))])
        shared = (F.silu(x @ t("ffn_gate_shexp").T) * (x @ t("ffn_up_shexp").T)) @ t("ffn_down_shexp").T
        expected = routed + torch.sigmoid(x @ t("ffn_gate_inp_shexp"))[:, None] * shared
        got = model.moe(x, i, model.weights.layers[i], None)
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), i


def test_the_routed_weights_are_the_chosen_probabilities_unnormalised(tiny_paths):
    s = Session(load_model(tiny_paths["qwen2moe"]), IDS, path="cached", probes=True, context=32)
    for _ in range(4):
        s.step()
    sums = s.trace().routing.group_by("step", "position", "layer").agg(pl.col("weight").sum().alias("s"))
    # top-2 of 8 softmax probabilities, as they are: a share of 1 (near 1 where the router is sure), never more
    assert float(sums["s"].min()) < 0.99 and float(sums["s"].max()) <= 1 + 1e-6
