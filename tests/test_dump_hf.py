"""transformers as a second engine at our capture points (workbench/hf.py): its dump of a prompt and three cached
steps agrees with ours point by point (float32 on both sides, relative L2 ≤ 1e-4, expert ids equal), every point
the adapter maps is present for every layer and step (a hook that stops firing fails here), and a file it
cannot load ends in one ReferenceFailed sentence.

Gemma3-270M is left out for time: transformers' GGUF loader takes ~50 s on it here (it agreed to 6e-6 at every
point when measured); the tiny gemma3 covers the arch, its window of 8 crossed by the last steps."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import load_model

from workbench import hf
from workbench.dump import ID_POINTS, Dump, ours, split_capture
from workbench.errors import ReferenceFailed
from workbench.tiny import copy_gguf

pytest.importorskip("transformers")

ATTN = ("attn_norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.pattern", "attn.out")
FFN = ("resid_mid", "ffn_norm", "ffn_out", "resid_post")
QK_NORM = ("attn.q_normed", "attn.k_normed")
MOE = ("moe.router_logits", "moe.topk_ids", "moe.topk_weights")
MAPPED = {  # per arch: the block points transformers_dump must deliver, every layer, every step
    "llama": ATTN + FFN,
    "qwen2": ATTN + FFN,
    "qwen3": ATTN + QK_NORM + FFN,
    "qwen3moe": ATTN + QK_NORM + MOE + FFN,
    "gemma3": ATTN + QK_NORM + FFN,
    "qwen2moe": ATTN + MOE + ("moe.shared_gate",) + FFN,
}
TOKENS = [1, 17, 99, 250, 3, 411, 42, 7, 300, 12]


def _run(arch: str, path, n_prompt: int) -> tuple[Dump, Dump]:
    tokens = TOKENS[: n_prompt + 3]
    return hf.transformers_dump(path, tokens, n_prompt), ours(load_model(path), tokens, n_prompt)


def _check(arch: str, theirs: Dump, mine: Dump, n_layers: int) -> None:
    points = {f"blocks.{i}.{p}" for i in range(n_layers) for p in MAPPED[arch]} | {"final_norm", "logits"}
    assert set(theirs.tensors) == {(s, c) for s in range(theirs.n_steps) for c in points}
    assert set(theirs.tensors) <= set(mine.tensors)
    assert theirs.engine.startswith("transformers ") and theirs.engine.endswith("(float32)")
    worst: dict[str, float] = {}
    for key, t in theirs.tensors.items():
        m = mine.tensors[key]
        assert t.shape == m.shape, (key, t.shape, m.shape)
        point = split_capture(key[1])[1]
        if point in ID_POINTS:
            assert t.dtype == torch.int64 and torch.equal(t, m), key
            continue
        assert t.dtype == torch.float32
        rel = float((t - m).norm() / m.norm().clamp_min(1e-30))
        worst[point] = max(worst.get(point, 0.0), rel)
    assert max(worst.values()) <= 1e-4, {p: f"{r:.1e}" for p, r in worst.items() if r > 1e-4}


@pytest.mark.parametrize("arch", list(MAPPED))
def test_tiny_dump_matches_ours(arch, tiny_paths):
    """5 prompt tokens, then 3 cached steps; gemma3 7, so that its steps at positions 7-9 pass its window of 8
    (transformers' sliding cache then holds fewer keys: the pattern comes padded to all positions)."""
    n_prompt = 7 if arch == "gemma3" else 5
    theirs, mine = _run(arch, tiny_paths[arch], n_prompt)
    _check(arch, theirs, mine, load_model(tiny_paths[arch]).config.n_layers)
    if arch == "gemma3":
        assert theirs.tensors[(3, "blocks.0.attn.pattern")][0, :, :2].abs().max() == 0  # outside the window


def test_smollm2_dump_matches_ours(smollm2_path):
    theirs, mine = _run("llama", smollm2_path, 5)
    _check("llama", theirs, mine, load_model(smollm2_path).config.n_layers)


def test_names_keep_only_the_matching_points_and_the_module_is_restored(tiny_paths):
    import transformers.models.qwen3.modeling_qwen3 as modeling

    original = modeling.eager_attention_forward
    dump = hf.transformers_dump(tiny_paths["qwen3"], TOKENS[:4], 3, names=["blocks.1.attn.*_rope", "logits"])
    assert set(dump.tensors) == {(s, c) for s in (0, 1) for c in ("blocks.1.attn.q_rope", "blocks.1.attn.k_rope", "logits")}
    assert modeling.eager_attention_forward is original


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text and text.endswith(".")
    return text


def test_head_dim_missizing_is_reference_failed(tiny_paths, monkeypatch):
    """Without the head_dim the adapter passes, transformers sizes qwen3's heads as hidden / heads (64, the file: 96)."""
    monkeypatch.setattr(hf, "config_overrides", lambda config: {})
    with pytest.raises(ReferenceFailed) as exc:
        hf.transformers_dump(tiny_paths["qwen3"], TOKENS[:4], 3)
    assert "tiny-qwen3.gguf" in _one_sentence(exc) and "but the file holds [" in str(exc.value)


def test_missing_weights_are_reference_failed(tiny_paths, tmp_path):
    """transformers would initialise a weight the file lacks at random and run anyway."""
    bad = copy_gguf(tiny_paths["llama"], tmp_path / "no-ffn-down.gguf",
                    tensor=lambda name, data, qtype: None if name == "blk.1.ffn_down.weight" else (data, qtype))
    with pytest.raises(ReferenceFailed) as exc:
        hf.transformers_dump(bad, TOKENS[:4], 3)
    assert "model.layers.1.mlp.down_proj.weight" in _one_sentence(exc)


def test_unreadable_file_and_missing_transformers_are_reference_failed(tiny_paths, tmp_path, monkeypatch):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_paths["llama"].read_bytes()[:5000])
    with pytest.raises(ReferenceFailed) as exc:
        hf.transformers_dump(cut, TOKENS[:4], 3)
    assert "cut.gguf" in _one_sentence(exc)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    with pytest.raises(ReferenceFailed) as exc:
        hf.transformers_dump(tiny_paths["llama"], TOKENS[:4], 3)
    assert "pip install transformers" in _one_sentence(exc)
