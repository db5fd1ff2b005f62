"""The tiny random models: laid out like real GGUF files, deterministic, and accepted by gguf-py, llama.cpp and
(where its GGUF loader can express the architecture) transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: never try the network

from pathlib import Path

import numpy as np
import pytest
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from workbench.config import SUPPORTED_ARCHS, ModelConfig
from workbench.errors import InputError
from workbench.gguf_file import GGUFFile
from workbench.tiny import (
    CONTEXT_LENGTH,
    EMBED_STD,
    FFN,
    HIDDEN,
    PROJ_STD,
    TINY_SPECS,
    VOCAB_SIZE,
    write_tiny,
)

T = GGMLQuantizationType
ALL_TYPES = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}

# Keys ModelConfig may fill in with a default: exactly those that real converted files of the arch omit too.
OMITTED_BY_REAL_FILES = {
    "llama": {"attention.key_length", "attention.value_length", "rope.scaling.type", "expert_count", "expert_used_count"},
    "qwen2": {"attention.key_length", "attention.value_length", "vocab_size", "rope.dimension_count",
              "rope.scaling.type", "expert_count", "expert_used_count"},
    "qwen3": {"vocab_size", "rope.dimension_count", "rope.scaling.type", "expert_count", "expert_used_count"},
    "qwen3moe": {"vocab_size", "rope.dimension_count", "rope.scaling.type"},
    "gemma3": {"vocab_size", "rope.dimension_count", "rope.scaling.type", "expert_count", "expert_used_count",
               "attention.sliding_window_pattern", "rope.freq_base_swa"},
    "qwen2moe": {"attention.key_length", "attention.value_length", "vocab_size", "rope.dimension_count",
                 "rope.scaling.type"},
    "olmoe": {"attention.key_length", "attention.value_length", "vocab_size", "rope.dimension_count",
              "rope.scaling.type"},
    # V3's layout with YaRN: its converter writes factor, original context and log multiplier, no betas or factors
    "gpt-oss": {"vocab_size", "rope.dimension_count", "rope.scaling.yarn_log_multiplier", "rope.scaling.attn_factor",
                "rope.scaling.yarn_ext_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
                "expert_weights_scale", "attention.sliding_window_pattern", "rope.freq_base_swa"},
    "deepseek2": {"rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
                  "rope.scaling.yarn_ext_factor"},
}
PRE_TOKENIZER = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "qwen3moe": "qwen2", "gemma3": "default",
                 "qwen2moe": "qwen2", "olmoe": "olmo", "deepseek2": "default", "gpt-oss": "default"}
PROMPT = b"def forward(self, tokens):\n    return the model of the tokens"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    for arch in SUPPORTED_ARCHS:
        write_tiny(arch, folder / f"tiny-{arch}.gguf")
    return folder


def tiny_path(folder: Path, arch: str) -> Path:
    return folder / f"tiny-{arch}.gguf"


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_config_has_the_intended_values(tiny_dir: Path, arch: str) -> None:
    spec = TINY_SPECS[arch]
    config = ModelConfig.from_gguf(GGUFFile(tiny_path(tiny_dir, arch)))
    assert (config.arch, config.n_layers, config.hidden, config.n_heads, config.n_kv_heads) == (
        arch, spec.n_layers, HIDDEN, spec.n_heads, spec.n_kv_heads,
    )
    assert config.head_dim == spec.head_dim
    assert config.v_head_dim == (spec.mla.v_head_dim if spec.mla else spec.head_dim)
    assert (config.ffn_hidden, config.vocab_size, config.context_length) == (spec.ffn, VOCAB_SIZE, CONTEXT_LENGTH)
    assert config.rms_eps == pytest.approx(spec.rms_eps) and config.rope_base == spec.rope_base
    assert config.tied_output == spec.tied_output
    assert (config.n_experts, config.n_experts_used, config.expert_ffn_hidden) == (
        spec.n_experts, spec.n_experts_used, spec.expert_ffn,
    )
    assert config.sliding_window == spec.sliding_window
    assert {key.removeprefix(f"{arch}.") for key in config.defaulted} <= OMITTED_BY_REAL_FILES[arch]


def test_arch_specific_values() -> None:
    assert TINY_SPECS["qwen3"].head_dim == TINY_SPECS["qwen3moe"].head_dim == 96 != HIDDEN // 4
    assert (TINY_SPECS["qwen3moe"].n_experts, TINY_SPECS["qwen3moe"].n_experts_used) == (8, 2)
    assert [TINY_SPECS[a].tied_output for a in SUPPORTED_ARCHS] == [False, False, True, False, True, False, False, False, False]
    assert (TINY_SPECS["qwen2moe"].n_experts, TINY_SPECS["qwen2moe"].shared_ffn) == (8, 256)


def test_gemma3_has_local_and_global_layers(tiny_dir: Path) -> None:
    config = ModelConfig.from_gguf(GGUFFile(tiny_path(tiny_dir, "gemma3")))
    assert [config.is_local_layer(i) for i in range(config.n_layers)] == [True] * 5 + [False]


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_tensor_table_matches_gguf_reader_and_llama_cpp_names(tiny_dir: Path, arch: str) -> None:
    path = tiny_path(tiny_dir, arch)
    ours = GGUFFile(path)
    reader = GGUFReader(path)
    theirs = {t.name: (t.tensor_type, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    assert {n: (t.ggml_type, t.shape, t.offset, t.n_bytes) for n, t in ours.tensors.items()} == theirs

    spec = TINY_SPECS[arch]
    arch_enum = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    known = {
        f"{TENSOR_NAMES[kind].format(bid=i)}.{suffix}"
        for kind in MODEL_TENSORS[arch_enum] for i in range(spec.n_layers) for suffix in ("weight", "bias")
    }
    assert set(ours.tensors) <= known, "every tensor name is one gguf-py lists for this arch"
    assert ("output.weight" in ours.tensors) == (not spec.tied_output)

    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shapes = {n: t.shape for n, t in ours.tensors.items()}
    assert shapes["token_embd.weight"] == (VOCAB_SIZE, HIDDEN)
    if spec.mla is not None:  # deepseek2: latent attention, a leading dense layer, then routed + shared experts
        m, H = spec.mla, spec.n_heads
        assert shapes["blk.0.attn_q_a.weight"] == (m.q_lora, HIDDEN) and shapes["blk.0.attn_q_b.weight"] == (q_dim, m.q_lora)
        assert shapes["blk.0.attn_kv_a_mqa.weight"] == (m.kv_lora + m.rope, HIDDEN)
        assert shapes["blk.0.attn_k_b.weight"] == (H, m.kv_lora, m.nope)
        assert shapes["blk.0.attn_v_b.weight"] == (H, m.v_head_dim, m.kv_lora)
        assert shapes["blk.0.attn_output.weight"] == (HIDDEN, H * m.v_head_dim)
        assert "blk.0.ffn_gate.weight" in shapes and "blk.0.ffn_gate_inp.weight" not in shapes
        assert shapes["blk.1.ffn_gate_exps.weight"] == (spec.n_experts, spec.expert_ffn, HIDDEN)
        assert shapes["blk.1.exp_probs_b.bias"] == (spec.n_experts,) and "blk.1.ffn_gate.weight" not in shapes
        assert shapes["blk.1.ffn_gate_shexp.weight"] == (spec.expert_ffn * m.n_shared, HIDDEN)
        return
    if arch == "gpt-oss":  # biases everywhere, a sink per head, the FFN norm stored as post_attention_norm
        assert shapes["blk.0.attn_q.bias"] == (q_dim,) and shapes["blk.0.attn_output.bias"] == (HIDDEN,)
        assert shapes["blk.0.attn_sinks.weight"] == (spec.n_heads,) and "blk.0.post_attention_norm.weight" in shapes
        assert shapes["blk.0.ffn_gate_inp.bias"] == (spec.n_experts,)
        assert shapes["blk.0.ffn_up_exps.bias"] == (spec.n_experts, spec.expert_ffn)
        assert shapes["blk.0.ffn_down_exps.bias"] == (spec.n_experts, HIDDEN)
        assert ours.tensors["blk.0.ffn_gate_exps.weight"].ggml_type == T.MXFP4
        return
    assert shapes["blk.0.attn_q.weight"] == (q_dim, HIDDEN)
    assert shapes["blk.0.attn_k.weight"] == shapes["blk.0.attn_v.weight"] == (kv_dim, HIDDEN)
    assert shapes["blk.0.attn_output.weight"] == (HIDDEN, q_dim)
    has_qk_norm = arch in ("qwen3", "qwen3moe", "gemma3", "olmoe")
    assert has_qk_norm == ("blk.0.attn_q_norm.weight" in shapes)
    if arch == "olmoe":  # over the whole projection
        assert (shapes["blk.0.attn_q_norm.weight"], shapes["blk.0.attn_k_norm.weight"]) == ((q_dim,), (kv_dim,))
    elif has_qk_norm:
        assert shapes["blk.0.attn_q_norm.weight"] == shapes["blk.0.attn_k_norm.weight"] == (spec.head_dim,)
    has_bias = arch in ("qwen2", "qwen2moe")
    assert has_bias == ("blk.0.attn_q.bias" in shapes)
    if has_bias:
        assert (shapes["blk.1.attn_q.bias"], shapes["blk.1.attn_k.bias"], shapes["blk.1.attn_v.bias"]) == ((q_dim,), (kv_dim,), (kv_dim,))
    assert (arch == "gemma3") == ("blk.0.post_attention_norm.weight" in shapes) == ("blk.0.post_ffw_norm.weight" in shapes)
    if spec.n_experts:
        n, f = spec.n_experts, spec.expert_ffn
        assert shapes["blk.0.ffn_gate_inp.weight"] == (n, HIDDEN)
        assert shapes["blk.0.ffn_gate_exps.weight"] == shapes["blk.0.ffn_up_exps.weight"] == (n, f, HIDDEN)
        assert shapes["blk.0.ffn_down_exps.weight"] == (n, HIDDEN, f)
        assert "blk.0.ffn_gate.weight" not in shapes
        assert (arch == "qwen2moe") == ("blk.0.ffn_gate_inp_shexp.weight" in shapes)
        if arch == "qwen2moe":  # the shared expert: a gate vector and a SwiGLU of its own width
            sf = spec.shared_ffn
            assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (HIDDEN,)
            assert shapes["blk.0.ffn_gate_shexp.weight"] == shapes["blk.0.ffn_up_shexp.weight"] == (sf, HIDDEN)
            assert shapes["blk.0.ffn_down_shexp.weight"] == (HIDDEN, sf)
    else:
        assert shapes["blk.0.ffn_gate.weight"] == shapes["blk.0.ffn_up.weight"] == (FFN, HIDDEN)
        assert shapes["blk.0.ffn_down.weight"] == (HIDDEN, FFN)
    for name, info in ours.tensors.items():
        if len(info.shape) == 1 or "ffn_gate_inp" in name:
            assert info.ggml_type == T.F32, f"{name}: norms, biases and the router stay F32"
    assert ours.tensors["token_embd.weight"].ggml_type in (T.F16, T.Q8_0)


def test_every_quant_type_appears(tiny_dir: Path) -> None:
    seen = {t.ggml_type for arch in SUPPORTED_ARCHS for t in GGUFFile(tiny_path(tiny_dir, arch)).tensors.values()}
    assert ALL_TYPES <= seen, f"missing: {sorted(t.name for t in ALL_TYPES - seen)}"


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_weights_have_sane_scales(tiny_dir: Path, arch: str) -> None:
    gguf = GGUFFile(tiny_path(tiny_dir, arch))
    for name, info in gguf.tensors.items():
        values = dequantize(gguf.raw(name).numpy(), info.ggml_type)
        assert np.isfinite(values).all(), name
        if len(info.shape) == 1 and name.endswith(".weight") and not any(s in name for s in ("ffn_gate_inp_shexp", "attn_sinks")):
            assert abs(values.mean() - 1) < 0.05, name  # norms
        elif len(info.shape) > 1 and name.endswith(".weight") and "ffn_gate_inp" not in name:
            std = EMBED_STD if name.startswith(("token_embd", "output")) else PROJ_STD
            assert values.std() == pytest.approx(std, rel=0.1), f"{name} ({info.type_name})"
            assert abs(values.mean()) < 0.1 * std, f"{name} ({info.type_name})"


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_vocabulary(tiny_dir: Path, arch: str) -> None:
    meta = GGUFFile(tiny_path(tiny_dir, arch)).metadata
    tokens, types, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.merges"]
    assert len(tokens) == len(set(tokens)) == len(types) == VOCAB_SIZE
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", PRE_TOKENIZER[arch])
    control = [t for t, kind in zip(tokens, types) if kind == 3]
    assert control == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert set(types) == {1, 3}
    eos = tokens.index("<|endoftext|>")
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == eos
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ"
    vocab = set(tokens)
    for merge in merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= vocab, merge


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir: Path, tmp_path: Path, arch: str) -> None:
    again = write_tiny(arch, tmp_path / "again.gguf", seed=0)
    assert again.read_bytes() == tiny_path(tiny_dir, arch).read_bytes()
    first, other = GGUFFile(again), GGUFFile(write_tiny(arch, tmp_path / "other.gguf", seed=1))
    assert other.metadata == first.metadata
    assert {n: (t.ggml_type, t.shape) for n, t in other.tensors.items()} == {n: (t.ggml_type, t.shape) for n, t in first.tensors.items()}
    for name in first.tensors:
        assert not np.array_equal(first.raw(name).numpy(), other.raw(name).numpy()), name


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="qwen3moe"):
        write_tiny("mistral", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_llama_cpp_runs_the_file(tiny_dir: Path, arch: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_path(tiny_dir, arch)), n_ctx=64, logits_all=True, verbose=False)
    try:
        assert llm.n_vocab() == VOCAB_SIZE
        tokens = llm.tokenize(PROMPT, add_bos=False)
        assert llm.detokenize(tokens) == PROMPT
        assert len(tokens) > 10, "longer than the gemma3 sliding window"
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)])
        assert logits.shape == (len(tokens), VOCAB_SIZE)
        assert np.isfinite(logits).all() and logits.std() > 0.1
    finally:
        llm.close()


# transformers maps neither qwen3's attention.key_length nor qwen3moe's expert_feed_forward_length to its config
# (integrations/ggml.py), so it builds those models with its default sizes and refuses the tensors: only the
# architectures with head_dim = hidden / heads and a dense FFN are loaded here.
HF_ARCHS = ("llama", "qwen2", "gemma3")


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_transformers_loads_the_file(tiny_dir: Path, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), gguf_file=f"tiny-{arch}.gguf", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 300, 400, 509]])).logits
    assert logits.shape == (1, 5, VOCAB_SIZE) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_transformers_and_llama_cpp_agree(tiny_dir: Path, arch: str) -> None:
    """Both reference implementations read the tiny file the same way (so it is a valid reference for ours).

    llama.cpp rounds activations to 8 bits before quantized matmuls, hence the tolerance. transformers has no
    GGUF key for Gemma3's query_pre_attn_scalar and assumes 256 (right for real Gemma-3, whose head_dim is
    256); llama.cpp scales by 1/sqrt(head_dim), so the tiny model (head_dim 64) needs it set explicitly.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tiny_path(tiny_dir, arch)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT, add_bos=False)
        llm.eval(tokens)
        expected = np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()
    extra = {"query_pre_attn_scalar": TINY_SPECS[arch].head_dim} if arch == "gemma3" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), gguf_file=path.name, dtype=torch.float32, **extra)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(logits - expected).max() < 0.25
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_synthetic_qwen3_30b_a3b_layout_scaled_down(tmp_path):
    """The synthetic writer (benchmarks/gpu_moe.py) at a CPU-sized scale: the real model's layout and keys,
    a loadable model whose cached and uncached paths agree, and a parameter count the config confirms."""
    from workbench.model import Model
    from workbench.session import Session
    from workbench.synthetic import SHAPES, write_synthetic

    shape = SHAPES["qwen3-30b-a3b"].scaled(n_layers=2, n_experts=8, n_experts_used=2, vocab=1024)
    path = write_synthetic(shape, tmp_path / "syn.gguf")
    model = Model.load(path, device="cpu", weights="dequantized")
    c = model.config
    assert (c.arch, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == ("qwen3moe", 2, 2048, 32, 4, 128)
    assert (c.n_experts, c.n_experts_used, c.expert_ffn_hidden, c.vocab_size) == (8, 2, 768, 1024)
    assert model.n_params == shape.n_params
    assert {t.ggml_type.name for t in model.gguf.tensors.values()} == {"Q4_K", "F32"}
    s = Session(model, [1, 2, 3], path="both", context=12)
    for _ in range(4):
        s.step()
    assert all(e["max_abs_diff"] <= 1e-4 * e["max_abs_logit"] for e in s.records.equiv)
    assert SHAPES["qwen3-30b-a3b"].n_params == pytest.approx(30.5e9, rel=0.01)  # Qwen3-30B-A3B: 30.5 B
