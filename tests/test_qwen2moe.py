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


def test_the_shared_gate_is_captured_as_the_sigmoid_the_ffn_uses(tiny_paths):
    """moe.shared_gate [T, 1] = sigmoid(ffn_norm · ffn_gate_inp_shexp), the value the shared expert is scaled by,
    recomputed here from the captured ffn_norm and gguf-py's tensor."""
    model = load_model(tiny_paths["qwen2moe"])
    gguf = GGUFFile(tiny_paths["qwen2moe"])
    seen: dict[str, torch.Tensor] = {}
    model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), lambda name, t: seen.__setitem__(name, t.clone()))
    for i in range(model.config.n_layers):
        gate = seen[f"blocks.{i}.moe.shared_gate"]
        expected = torch.sigmoid(seen[f"blocks.{i}.ffn_norm"] @ _tensor(gguf, f"blk.{i}.ffn_gate_inp_shexp.weight"))
        assert gate.shape == (len(IDS), 1) and torch.allclose(gate[:, 0], expected, atol=1e-6), i
        assert 0.01 < float(gate.min()) and float(gate.max()) < 0.99  # not saturated: ungating it is a change


def test_shared_expert_breaks_do_what_they_say(tiny_paths):
    """Each qwen2moe porting bug, against the FFN written from its parts: dropped = routed experts only; ungated =
    routed + the shared expert at weight 1; renormalised anyway = the top-2 weights scaled to sum to 1."""
    model = load_model(tiny_paths["qwen2moe"])
    c, layer = model.config, model.weights.layers[0]
    assert {"topk-renorm-anyway", "shared-expert-dropped", "shared-expert-ungated"} <= set(breaks_that_apply(c))
    x = torch.randn(4, c.hidden, generator=torch.Generator().manual_seed(1))
    w: dict[str, torch.Tensor] = {}
    model.moe(x, 0, layer, lambda name, t: w.__setitem__(name.split(".")[-1], t.clone()))
    shared = w["shared_gate"] * (model.moe(x, 0, layer, None) - model.moe(x, 0, layer, None, frozenset({"shared-expert-dropped"})))
    ungated = model.moe(x, 0, layer, None, frozenset({"shared-expert-ungated"})) - model.moe(x, 0, layer, None, frozenset({"shared-expert-dropped"}))
    assert torch.allclose(shared, w["shared_gate"] ** 2 * ungated, atol=1e-5)  # gate·(gate·S) = gate²·(1·S)
    renormed: dict[str, torch.Tensor] = {}
    model.moe(x, 0, layer, lambda name, t: renormed.__setitem__(name.split(".")[-1], t.clone()), frozenset({"topk-renorm-anyway"}))
    assert torch.allclose(renormed["topk_weights"], w["topk_weights"] / w["topk_weights"].sum(-1, keepdim=True))
    assert float(w["topk_weights"].sum(-1).min()) < 0.9  # which is a change: the top-2 do not always hold it all
    assert torch.equal(renormed["shared_gate"], w["shared_gate"])


def test_the_session_records_the_shared_gate_per_position_and_layer(tiny_paths):
    """The `shared` frame: one row per (step, path, position, layer), the captured gate, both paths alike."""
    model = load_model(tiny_paths["qwen2moe"])
    s = Session(model, IDS[:6], path="both", probes=True, context=32)
    for _ in range(3):
        s.step()
    shared = s.trace().shared
    assert shared.height == 2 * (6 + 2) * model.config.n_layers  # the prompt's rows at step 0, one row a step after
    paths = shared.pivot(on="path", index=["step", "position", "layer"], values="gate")
    assert (paths["cached"] - paths["uncached"]).abs().max() <= 1e-5
    seen: dict[str, torch.Tensor] = {}
    ids = s.ids[:8]
    model.forward(torch.tensor(ids), 0, model.new_cache(8), lambda name, t: seen.__setitem__(name, t.clone()))
    row = shared.filter((pl.col("path") == "cached") & (pl.col("position") == 7) & (pl.col("layer") == 1))
    assert abs(float(row["gate"][0]) - float(seen["blocks.1.moe.shared_gate"][7, 0])) <= 1e-5
    other = Session(load_model(tiny_paths["qwen3moe"]), IDS[:4], probes=True)
    other.step()
    assert other.trace().shared.is_empty() and not other.trace().routing.is_empty()  # no shared expert there
