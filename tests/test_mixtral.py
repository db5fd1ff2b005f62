"""Mixtral's layout — a llama file whose every FFN is routed experts — read, decoded and checked (issue 15, first
family): llama.cpp runs it through llm_build_llama's build_moe_ffn (softmax → top-k → renormalise), and so must we.

The tiny file (workbench.tiny, family "mixtral": arch llama, 8 experts, top-2, mixed quant types) is checked
against llama.cpp on an F32 copy with an F32 KV cache in test_reference (exact arithmetic on both sides: cosine
≥ 0.999999 at every position) and step by step in test_equivalence, as every arch; here: its reading, cached ≡
uncached, and `compare` on llama.cpp's dump of its capture points, MoE nodes included.
"""

from __future__ import annotations

import polars as pl
import pytest

from workbench import tiny
from workbench.compare import compare
from workbench.config import ModelConfig
from workbench.errors import UnsupportedError
from workbench.gguf_file import GGUFFile
from workbench.model import Model, breaks_that_apply
from workbench.session import Session

IDS = [1, 17, 99, 250, 3, 411, 42, 7, 300, 12, 5, 6]


@pytest.fixture(scope="module")
def mixtral_path(tiny_paths):
    return tiny_paths["mixtral"]  # (the static step ≡ eager step check is test_equivalence's, over every tiny kind)


@pytest.fixture(scope="module")
def model(mixtral_path):
    return Model.load(mixtral_path, device="cpu", dtype="float32", weights="dequantized")


def test_the_file_is_a_llama_file_with_experts_and_reads_as_one(mixtral_path, model):
    gguf = GGUFFile(mixtral_path)
    assert gguf.arch == "llama" and gguf.metadata["llama.expert_count"] == 8
    assert "llama.expert_feed_forward_length" not in gguf.metadata  # Mixtral files state none
    assert "blk.0.ffn_gate_exps.weight" in gguf.tensors and "blk.0.ffn_gate.weight" not in gguf.tensors
    c = model.config
    assert (c.arch, c.is_moe, c.n_experts, c.n_experts_used) == ("llama", True, 8, 2)
    assert c.expert_ffn_hidden == gguf.metadata["llama.feed_forward_length"] == 128  # llama.cpp's n_ff per expert
    assert c.norm_topk and c.rope_style == "normal" and not c.qk_norm
    assert {"moe-as-dense", "no-topk-renorm"} <= set(breaks_that_apply(c)) and "skip-qk-norm" not in breaks_that_apply(c)


def test_another_arch_with_experts_is_still_refused(tmp_path):
    src = tiny.write_tiny("qwen3", tmp_path / "q.gguf")
    dst = tmp_path / "q-experts.gguf"
    tiny.copy_gguf(src, dst, add={"qwen3.expert_count": 8})
    with pytest.raises(UnsupportedError, match="qwen3 with experts is not supported"):
        ModelConfig.from_gguf(GGUFFile(dst))


def test_cached_equals_uncached_and_routing_is_renormalised(model):
    s = Session(model, IDS, path="both", probes=True, context=64)
    for _ in range(12):
        s.step()
    t = s.trace()
    assert float((t.equiv["max_abs_diff"] / t.equiv["max_abs_logit"]).max()) <= 1e-4 and t.equiv["argmax_equal"].all()
    sums = t.routing.group_by("step", "path", "position", "layer").agg(pl.col("weight").sum().alias("s"), pl.len().alias("k"))
    assert (sums["k"] == 2).all() and float((sums["s"] - 1).abs().max()) < 1e-5
    assert t.routing["expert"].n_unique() > 2  # the router spreads tokens over the experts


def test_compare_finds_no_divergence_in_llama_cpps_dump_and_the_moe_points_are_there(model, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from workbench.reference import llama_cpp_dump

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    dump = llama_cpp_dump(model, IDS[:10], 6, engine="llama.cpp-f32")
    points = {capture for _, capture in dump.tensors}
    assert {"blocks.0.moe.router_logits", "blocks.0.moe.topk_ids", "blocks.0.moe.topk_weights", "blocks.1.ffn_out"} <= points
    result = compare(model, dump)
    assert result.first_divergence is None, result.table()


@pytest.mark.parametrize("bug, point", [("no-topk-renorm", "moe.topk_weights"), ("moe-as-dense", "moe.topk_ids")])
def test_compare_names_the_moe_porting_bugs(model, bug, point):
    """The two MoE bugs a Mixtral port makes (weights not renormalised, the router ignored), dumped by our engine
    with the switch on: compare's first divergence is the router's output at layer 0."""
    from workbench.dump import ours

    result = compare(model, ours(model, IDS[:10], 6, breaks=frozenset({bug})))
    fd = result.first_divergence
    assert fd is not None and fd.layer == 0 and fd.capture == f"blocks.0.{point}", result.table()


def test_transformers_is_not_a_reference_for_it_and_says_so(mixtral_path):
    """transformers' GGUF loader has no Mixtral mapping: it reads the file as a dense Llama with no MLP weights,
    which the adapter refuses in one sentence rather than compare against random weights."""
    pytest.importorskip("transformers")
    from workbench.errors import ReferenceFailed
    from workbench.hf import transformers_dump

    with pytest.raises(ReferenceFailed, match="finds no weights for model.layers.0.mlp"):
        transformers_dump(mixtral_path, IDS[:5], 3)

