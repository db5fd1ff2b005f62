"""Our GGUF parser against gguf-py's GGUFReader (the reference): same metadata, same tensor table, same bytes.
And ModelConfig on the real files: values read, not derived (head_dim from key_length), defaults marked."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from workbench.config import SUPPORTED_ARCHS, ModelConfig
from workbench.gguf_file import GGUFFile


def _same_as_gguf_py(path) -> None:
    ours = GGUFFile(path)
    reader = GGUFReader(path)
    ref_meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == ref_meta
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.n_bytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_parser_matches_gguf_py_on_tiny(arch, tiny_paths):
    _same_as_gguf_py(tiny_paths[arch])


def test_parser_matches_gguf_py_on_smollm2(smollm2_path):
    _same_as_gguf_py(smollm2_path)


def test_smollm2_config(smollm2_path):
    c = ModelConfig.from_gguf(GGUFFile(smollm2_path))
    assert (c.arch, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert c.rope_style == "normal" and c.rope_base == 100000.0 and c.tied_output and not c.qk_norm
    assert "llama.attention.key_length" in c.defaulted  # llama files omit it: hidden / heads, as llama.cpp does


def test_gemma3_config(gemma3_path):
    c = ModelConfig.from_gguf(GGUFFile(gemma3_path))
    # head_dim 256 comes from attention.key_length; hidden / heads would give 160
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == (18, 640, 4, 1, 256)
    assert c.rope_style == "neox" and c.qk_norm and c.post_norms and c.ffn_act == "gelu_tanh"
    assert c.sliding_window == 512 and c.rope_base == 1e6 and c.rope_base_local == 10000.0
    assert [i for i in range(c.n_layers) if not c.is_local_layer(i)] == [5, 11, 17]
    assert abs(c.embed_scale - 640**0.5) < 1e-9 and abs(c.attn_scale - 256**-0.5) < 1e-12
    assert "gemma3.attention.sliding_window_pattern" in c.defaulted and "gemma3.attention.key_length" not in c.defaulted
