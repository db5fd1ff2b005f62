"""`compare` on other engines' dumps (issue 12): llama.cpp (its eval callback, out of process) and HF transformers
(hooks). Clean dumps give no divergence — llama.cpp's 8-bit activations and float16 KV cache included — and a
bug planted in *their* copy of the file (one weight tensor or one metadata value changed; our engine keeps the
original) is named at the capture point where the change first acts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from conftest import ARCHS, load_model
from workbench.compare import compare
from workbench.dump import split_capture
from workbench.model import Model
from workbench.tiny import copy_gguf

pytest.importorskip("llama_cpp")
TOKENS = [1, 17, 99, 250, 3, 411, 42, 7, 8, 9]
N_PROMPT = 6


@pytest.fixture(autouse=True)
def f32_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "f32-cache"))


def llama_dump(path: Path, engine: str = "llama.cpp", tokens=TOKENS, n_prompt=N_PROMPT):
    from workbench.reference import llama_cpp_dump

    carrier = Model.load(path, device="cpu", dtype="float32", weights="dequantized")  # llama.cpp reads its file
    return llama_cpp_dump(carrier, tokens, n_prompt, engine=engine)


def planted(src: Path, dst: Path, tensor: str | None = None, change=None, meta: dict | None = None) -> Path:
    """A copy of src with one tensor changed (dequantized, changed, written as F32) or metadata values replaced."""

    def edit_tensor(name, data, qtype):
        if name != tensor:
            return data, qtype
        values = dequantize(data, qtype).astype(np.float32)
        return change(values.copy()).astype(np.float32), GGMLQuantizationType.F32

    meta = meta or {}
    return copy_gguf(src, dst, meta=lambda k, v: meta.get(k, v), tensor=edit_tensor)


def scale_rows(lo: int, hi: int, factor: float):
    def change(w):  # w: [rows = outputs, inputs] in numpy order
        w[lo:hi] *= factor
        return w
    return change


def swap_experts(a: int, b: int):
    def change(w):  # [experts, rows, inputs]
        w[[a, b]] = w[[b, a]]
        return w
    return change


# (arch, what is planted, tensor, change, metadata, expected capture point without its layer, layer)
PLANTS = [
    ("qwen3", "one KV head's K projection ×1.5", "blk.1.attn_k.weight", scale_rows(96, 192, 1.5), None, "attn.k", 1),
    ("qwen3", "the K-norm weight of layer 0", "blk.0.attn_k_norm.weight", lambda w: w * 1.3, None, "attn.k_normed", 0),
    ("llama", "the RoPE base", None, None, {"llama.rope.freq_base": 500000.0}, "attn.q_rope", 0),
    ("llama", "the RMSNorm epsilon", None, None, {"llama.attention.layer_norm_rms_epsilon": 0.5}, "attn_norm", 0),
    ("llama", "layer 1's attention output projection", "blk.1.attn_output.weight", lambda w: -w, None, "resid_mid", 1),
    ("qwen3moe", "layer 1's router", "blk.1.ffn_gate_inp.weight", lambda w: w[::-1].copy(), None, "moe.router_logits", 1),
    ("qwen3moe", "two experts' down projections swapped", "blk.0.ffn_down_exps.weight", swap_experts(0, 1), None, "ffn_out", 0),
    ("qwen3moe", "experts used per token", None, None, {"qwen3moe.expert_used_count": 3}, "moe.topk_ids", 0),
    ("gemma3", "the sliding window", None, None, {"gemma3.attention.sliding_window": 3}, "attn.pattern", 0),
    ("gemma3", "layer 2's FFN norm weight", "blk.2.ffn_norm.weight", lambda w: w * 2.0, None, "ffn_norm", 2),
    ("gemma3", "the output norm", "output_norm.weight", lambda w: w + 1.0, None, "final_norm", None),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_clean_llama_cpp_dumps_give_no_divergence(arch, tiny_paths):
    m = load_model(tiny_paths[arch])
    for engine in ("llama.cpp", "llama.cpp-f32"):
        result = compare(m, llama_dump(tiny_paths[arch], engine), suspects=False)
        assert result.first_divergence is None, (engine, result.first_divergence)
        if engine == "llama.cpp-f32":  # an exact reference: every local error at float32 rounding, but for
            # ggml-cpu's GELU, which reads a float16 table (gemma3's feed-forward: ~4e-4)
            gelu = {p.local_error for p in result.points if arch == "gemma3" and p.capture.endswith("ffn_out")}
            worst = max(p.local_error for p in result.points if not p.capture.endswith("topk_ids") and p.local_error not in gelu)
            assert worst < 1e-4 and max(gelu, default=0) < 1e-3, (worst, max(gelu, default=0))


@pytest.mark.parametrize("arch, what, tensor, change, meta, point, layer", PLANTS, ids=[p[1] for p in PLANTS])
def test_a_bug_planted_in_llama_cpp_is_named_where_it_acts(arch, what, tensor, change, meta, point, layer, tiny_paths, tmp_path):
    m = load_model(tiny_paths[arch])
    theirs = llama_dump(planted(tiny_paths[arch], tmp_path / "planted.gguf", tensor, change, meta))
    fd = compare(m, theirs, suspects=False).first_divergence
    assert fd is not None, what
    assert (split_capture(fd.capture)[1], fd.layer, fd.step) == (point, layer, 0), (what, fd)
    if point == "attn.k":
        assert fd.head == 1  # rows 96..192 of K are KV head 1


def test_a_planted_rope_base_ranks_its_break_first(tiny_paths, tmp_path):
    m = load_model(tiny_paths["qwen3"])
    theirs = llama_dump(planted(tiny_paths["qwen3"], tmp_path / "p.gguf", meta={"qwen3.rope.freq_base": 10000.0}), "llama.cpp-f32")
    result = compare(m, theirs)
    assert split_capture(result.first_divergence.capture)[1] == "attn.q_rope" and result.suspects[0] == "rope-base-10k"


def test_smollm2_llama_cpp_dump_is_clean_and_a_planted_head_found(smollm2_path, tmp_path):
    m = load_model(smollm2_path)
    tokens = m.tokenizer.encode("The capital of France is")
    tokens, n_prompt = tokens + [12095, 30, 378], len(tokens)
    result = compare(m, llama_dump(smollm2_path, tokens=tokens, n_prompt=n_prompt), suspects=False)
    assert result.first_divergence is None, result.first_divergence
    # Q projection of layer 5, query head 4 (rows 256..320) flipped, in llama.cpp's copy only.
    broken = planted(smollm2_path, tmp_path / "s.gguf", "blk.5.attn_q.weight", scale_rows(256, 320, -1.0))
    fd = compare(m, llama_dump(broken, tokens=tokens, n_prompt=n_prompt), suspects=False).first_divergence
    assert (fd.capture, fd.step, fd.head) == ("blocks.5.attn.q", 0, 4), fd


@pytest.mark.parametrize("arch, what, tensor, change, meta, point, layer", [
    ("llama", "the RoPE base", None, None, {"llama.rope.freq_base": 500000.0}, "attn.q_rope", 0),
    ("qwen3moe", "layer 1's router", "blk.1.ffn_gate_inp.weight", lambda w: w[::-1].copy(), None, "moe.router_logits", 1),
    ("gemma3", "layer 2's FFN norm weight", "blk.2.ffn_norm.weight", lambda w: w * 2.0, None, "ffn_norm", 2),
], ids=["rope-base", "router", "ffn-norm"])
def test_transformers_clean_and_planted(arch, what, tensor, change, meta, point, layer, tiny_paths, tmp_path):
    pytest.importorskip("transformers")
    from workbench.hf import transformers_dump

    m = load_model(tiny_paths[arch])
    assert compare(m, transformers_dump(tiny_paths[arch], TOKENS, N_PROMPT), suspects=False).first_divergence is None
    theirs = transformers_dump(planted(tiny_paths[arch], tmp_path / "planted.gguf", tensor, change, meta), TOKENS, N_PROMPT)
    fd = compare(m, theirs, suspects=False).first_divergence
    assert (split_capture(fd.capture)[1], fd.layer, fd.step) == (point, layer, 0), (what, fd)
