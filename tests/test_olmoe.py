"""OLMoE (issue 15, third family): QK-norm over the whole projected q and k — one RMS over every head of a row,
with weights of n_heads·head_dim values — instead of per head, and routed experts whose top-k weights are not
renormalised. The arch-wide tests (test_reference against llama.cpp on an F32 copy, test_equivalence,
test_capture, test_compare, test_dump_llama, test_compare_engines) run on the tiny file like every arch's; this
file checks what is its own."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from gguf.quants import dequantize

from conftest import load_model
from workbench import tiny
from workbench.config import ModelConfig
from workbench.errors import ReferenceFailed, UnsupportedError
from workbench.gguf_file import GGUFFile
from workbench.model import breaks_that_apply
from workbench.session import Session

IDS = [1, 17, 99, 250, 3, 411, 42, 7, 300, 12, 5, 6]


def _tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    info = gguf.tensors[name]
    return torch.from_numpy(np.ascontiguousarray(dequantize(gguf.raw(name).numpy(), info.ggml_type).reshape(info.shape),
                                                 dtype=np.float32))


def test_config_norms_the_whole_projection_and_keeps_the_weights(tiny_paths):
    c = load_model(tiny_paths["olmoe"]).config
    assert c.qk_norm and c.qk_norm_whole and not c.norm_topk
    assert (c.n_experts, c.n_experts_used, c.expert_ffn_hidden) == (8, 2, c.ffn_hidden)  # each expert is n_ff wide
    assert GGUFFile(tiny_paths["olmoe"]).tensors["blk.0.attn_q_norm.weight"].shape == (c.n_heads * c.head_dim,)
    assert {"skip-qk-norm", "qk-norm-per-head", "topk-renorm-anyway", "moe-as-dense"} <= set(breaks_that_apply(c))
    assert "no-topk-renorm" not in breaks_that_apply(c)


def test_grouped_kv_heads_are_refused_in_one_sentence(tmp_path):
    """llama.cpp sizes olmoe's k norm [n_embd]: a file with fewer KV heads than query heads is not one it runs."""
    dst = tiny.copy_gguf(tiny.write_tiny("olmoe", tmp_path / "o.gguf"), tmp_path / "o-gqa.gguf",
                         add={"olmoe.attention.head_count_kv": 2})
    with pytest.raises(UnsupportedError, match="olmoe with 2 KV heads for 4 query heads is not supported"):
        ModelConfig.from_gguf(GGUFFile(dst))


def test_q_and_k_are_normed_over_the_whole_row(tiny_paths):
    """q_normed = q / RMS(all heads of the row) × the file's weight, recomputed from gguf-py's tensor; a per-head
    norm (the qk-norm-per-head break) gives other numbers, and its heads' RMS is each 1 before the weight."""
    model = load_model(tiny_paths["olmoe"])
    gguf, c = GGUFFile(tiny_paths["olmoe"]), model.config
    for breaks in (frozenset(), frozenset({"qk-norm-per-head"})):
        seen: dict[str, torch.Tensor] = {}
        model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), lambda n, t: seen.__setitem__(n, t.clone()),
                      breaks=breaks)
        for i in range(c.n_layers):
            for t in ("q", "k"):
                x, got = seen[f"blocks.{i}.attn.{t}"].double(), seen[f"blocks.{i}.attn.{t}_normed"].double()
                w = _tensor(gguf, f"blk.{i}.attn_{t}_norm.weight").double().view(x.shape[1:])
                whole = x / x.pow(2).mean(dim=(1, 2), keepdim=True).add(c.rms_eps).sqrt() * w
                per_head = x / x.pow(2).mean(dim=2, keepdim=True).add(c.rms_eps).sqrt() * w
                expected, other = (whole, per_head) if not breaks else (per_head, whole)
                assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (breaks, i, t)
                assert (got - other).abs().max() > 1e-2 * expected.abs().max(), (breaks, i, t)


def test_cached_equals_uncached_and_weights_are_unnormalised(tiny_paths):
    s = Session(load_model(tiny_paths["olmoe"]), IDS, path="both", probes=True, context=32)
    for _ in range(6):
        s.step()
    t = s.trace()
    rel = t.equiv["max_abs_diff"] / t.equiv["max_abs_logit"]
    assert float(rel.max()) <= 1e-4
    sums = t.routing.group_by("step", "path", "position", "layer").agg(pl.col("weight").sum().alias("s"))
    assert float(sums["s"].min()) < 0.99 and float(sums["s"].max()) <= 1 + 1e-6  # softmax's top-2, as they are
    assert t.qk.filter(pl.col("stage") == "post").height > 0  # the QK-norm panel has its post-norm heads


def test_transformers_is_not_a_reference_for_it_and_says_so(tiny_paths):
    """transformers' GGUF loader has no olmoe mapping: the adapter says so in one sentence."""
    pytest.importorskip("transformers")
    from workbench.hf import transformers_dump

    with pytest.raises(ReferenceFailed) as exc:
        transformers_dump(tiny_paths["olmoe"], IDS[:5], 3)
    text = str(exc.value)
    assert "olmoe" in text and "\n" not in text and text.endswith("."), text
