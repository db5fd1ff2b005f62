"""`compare` on dumps of our own engine (issue 12): every break switch is found where it acts and ranked first
among the suspects, a clean dump (also rounded to bfloat16, also partial) gives none; the dump format
round-trips, and a malformed dump or one that does not fit the model gets one sentence."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHS, load_model
from workbench.cli import main
from workbench.compare import applicable_breaks, compare
from workbench.dump import FORMAT, Dump, DumpError, ours
from workbench.model import BREAKS

TOKENS = [1, 17, 99, 250, 3, 411, 42, 7, 8, 9]  # 6 prompt tokens, then steps 1..4
N_PROMPT = 6
# Where each break acts: the capture point (without its layer) and the step its first divergence must be at.
ACTS_AT = {
    "skip-qk-norm": ("attn.q_normed", 0),
    "rope-style-swap": ("attn.q_rope", 0),
    "rope-base-10k": ("attn.q_rope", 0),
    "no-topk-renorm": ("moe.topk_weights", 0),
    "moe-as-dense": ("moe.topk_ids", 0),
    "cache-off-by-one": ("attn.pattern", 1),
    "head-dim-from-hidden": ("attn.q_rope", 0),
    "topk-renorm-anyway": ("moe.topk_weights", 0),
    "shared-expert-dropped": ("ffn_out", 0),  # no gate is computed, so the dump has no shared_gate to show it
    "shared-expert-ungated": ("moe.shared_gate", 0),
    "qk-norm-per-head": ("attn.q_normed", 0),
    "skip-kv-a-norm": ("attn.kv_latent", 0),
    "probs-bias-in-weights": ("moe.topk_weights", 0),
    "no-group-limit": ("moe.topk_ids", 0),
    "no-routed-scaling": ("moe.topk_weights", 0),
    "yarn-ignored": ("attn.q_rope", 0),
    "sinks-dropped": ("attn.pattern", 0),
    "softmax-before-topk": ("moe.topk_weights", 0),
    "swiglu-unclamped": ("ffn_out", 0),
    "no-sliding-window": ("attn.pattern", None),  # the first step whose keys reach past the window
}


def point_of(capture: str) -> str:
    return capture.split(".", 2)[2] if capture.startswith("blocks.") else capture


@pytest.mark.parametrize("arch", ARCHS)
def test_each_break_is_found_where_it_acts_and_ranked_first(arch, tiny_paths):
    m = load_model(tiny_paths[arch])
    clean = compare(m, ours(m, TOKENS, N_PROMPT))
    assert clean.first_divergence is None and clean.suspects == []
    assert all(p.local_error == pytest.approx(0, abs=1e-6) and p.end_to_end_error == 0 for p in clean.points)
    breaks = applicable_breaks(m, clean_dump := ours(m, TOKENS, N_PROMPT))
    assert breaks, arch
    for name in breaks:
        result = compare(m, ours(m, TOKENS, N_PROMPT, breaks=frozenset({name})))
        fd = result.first_divergence
        assert fd is not None, name
        point, step = ACTS_AT[name]
        if step is None:  # the step of the first position a sliding window leaves a key out of
            step = next(s for s in range(len(TOKENS) - N_PROMPT + 1) if N_PROMPT + s > m.config.sliding_window)
        if m.config.is_mla and point == "attn.q_rope":  # latent attention turns q's rope dims alone: attn.q_pe;
            point = "attn.pattern" if name == "head-dim-from-hidden" else "attn.q_pe"  # that one only scales
        assert (point_of(fd.capture), fd.step) == (point, step), (name, fd)
        assert fd.local_error > fd.threshold and result.suspects[0] == name, (name, result.suspects)
        if name == "rope-base-10k" and m.config.rope_base_local == 10000.0:  # gemma3: only its global layers change
            assert not m.config.is_local_layer(fd.layer)
    assert set(BREAKS) - set(breaks) == {b for b in BREAKS if compare(m, ours(m, TOKENS, N_PROMPT, breaks=frozenset({b})),
                                                                      suspects=False).first_divergence is None}
    del clean_dump


def test_a_rounded_dump_is_clean_and_a_rounded_bug_still_found(tiny_paths):
    m = load_model(tiny_paths["qwen3moe"])
    for dtype in (torch.bfloat16, torch.float16):
        rounded = ours(m, TOKENS, N_PROMPT)
        rounded.tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in rounded.tensors.items()}
        assert compare(m, rounded).first_divergence is None, dtype
    broken = ours(m, TOKENS, N_PROMPT, breaks=frozenset({"skip-qk-norm"}))
    broken.tensors = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in broken.tensors.items()}
    result = compare(m, broken)
    assert point_of(result.first_divergence.capture) == "attn.q_normed" and result.suspects[0] == "skip-qk-norm"


def test_partial_dumps(tiny_paths, tmp_path):
    m = load_model(tiny_paths["qwen3"])
    # Layer outputs only: each layer's whole block is one local step; the planted bug shows at the first layer.
    only = ours(m, TOKENS, N_PROMPT, names=["blocks.*.resid_post"], breaks=frozenset({"rope-base-10k"}))
    result = compare(m, only)
    assert result.first_divergence.capture == "blocks.0.resid_post" and result.suspects[0] == "rope-base-10k"
    # No attention pattern: a cache that misses its own key shows in the attention output of step 1.
    no_pattern = ours(m, TOKENS, N_PROMPT, names=["*.attn.out", "*.attn.q_rope"], breaks=frozenset({"cache-off-by-one"}))
    fd = compare(m, no_pattern).first_divergence
    assert (fd.capture, fd.step) == ("blocks.0.attn.out", 1)
    # A few steps and layers, and last rows only (as llama.cpp computes its last layer).
    full = ours(m, TOKENS, N_PROMPT, breaks=frozenset({"cache-off-by-one"}))
    # (The first layer: a later one would inherit what the missing layers did, and its attn_norm would show it.)
    some = Dump(TOKENS, N_PROMPT, {k: t[-1:] for k, t in full.tensors.items() if k[0] >= 2 and "blocks.0." in k[1]})
    fd = compare(m, some).first_divergence
    assert fd.step == 2 and fd.capture == "blocks.0.attn.pattern"
    assert compare(m, Dump(TOKENS, N_PROMPT, {k: t[-2:] for k, t in ours(m, TOKENS, N_PROMPT).tensors.items()})).first_divergence is None


def test_statistics_only_dump(tiny_paths):
    m = load_model(tiny_paths["llama"])
    clean, broken = ours(m, TOKENS, N_PROMPT), ours(m, TOKENS, N_PROMPT, breaks=frozenset({"cache-off-by-one"}))

    def stats(d: Dump) -> Dump:
        s = {k: torch.tensor([t.numel(), float(t.double().sum()), float(t.double().pow(2).sum())], dtype=torch.float64)
             for k, t in d.tensors.items() if t.is_floating_point()}
        return Dump(d.tokens, d.n_prompt, stats=s)

    assert compare(m, stats(clean)).first_divergence is None
    fd = compare(m, stats(broken)).first_divergence
    assert fd.step == 1 and fd.local_error is None and fd.layer == 0


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_the_format_round_trips(tiny_paths, tmp_path, suffix):
    m = load_model(tiny_paths["qwen3moe"])
    d = ours(m, TOKENS, N_PROMPT)
    d.stats[(1, "logits")] = torch.tensor([3.0, 1.5, float("nan")], dtype=torch.float64)
    back = Dump.read(d.save(tmp_path / f"d{suffix}"))
    assert (back.tokens, back.n_prompt, back.engine, back.keys()) == (d.tokens, d.n_prompt, d.engine, d.keys())
    assert all(torch.equal(back.tensors[k], t) for k, t in d.tensors.items())
    assert back.tensors[(0, "blocks.0.moe.topk_ids")].dtype == torch.int64
    assert torch.equal(back.stats[(1, "logits")].nan_to_num(-1), d.stats[(1, "logits")].nan_to_num(-1))


def _write(path, tensors, **meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": FORMAT, "tokens": "[1, 2, 3]", "n_prompt": "2", **meta})
    return path


@pytest.mark.parametrize("tensors, meta, says", [
    ({"0/logits": torch.zeros(2, 4)}, {"format": "other/1"}, "not a workbench dump"),
    ({"0/logits": torch.zeros(2, 4)}, {"tokens": "[1, 2"}, "tokens"),
    ({"0/logits": torch.zeros(2, 4)}, {"n_prompt": "9"}, "n_prompt"),
    ({"0/blocks.0.attn_q": torch.zeros(2, 4)}, {}, "is not a capture point"),
    ({"logits": torch.zeros(2, 4)}, {}, "is not named"),
    ({"5/logits": torch.zeros(1, 4)}, {}, "steps 0..1"),
    ({"1/logits": torch.zeros(2, 4)}, {}, "rows"),
    ({"0/logits": torch.zeros(2, 4, dtype=torch.int32)}, {}, "must hold float32"),
    ({"0/blocks.0.moe.topk_ids": torch.zeros(2, 2)}, {}, "int32 or int64"),
    ({"0/logits:stats": torch.zeros(4, dtype=torch.float64)}, {}, "3 floats"),
])
def test_a_malformed_dump_gets_one_sentence(tmp_path, tensors, meta, says):
    with pytest.raises(DumpError, match=says):
        Dump.read(_write(tmp_path / "d.safetensors", tensors, **meta))


def test_not_a_dump_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DumpError, match="not a safetensors file"):
        Dump.read(tmp_path / "x.safetensors")
    import numpy as np

    np.savez(tmp_path / "y.npz", a=np.zeros(3))
    with pytest.raises(DumpError, match="__metadata__"):
        Dump.read(tmp_path / "y.npz")


def test_a_dump_that_does_not_fit_the_model(tiny_paths, tmp_path):
    m = load_model(tiny_paths["llama"])
    cases = [({"0/blocks.9.resid_post": torch.zeros(2, m.config.hidden)}, "layers 0..1"),
             ({"0/blocks.0.attn.q_normed": torch.zeros(2, 4, 64)}, "no QK-norm"),
             ({"0/blocks.0.moe.topk_ids": torch.zeros(2, 2, dtype=torch.int64)}, "not a mixture of experts"),
             ({"0/blocks.0.attn.k": torch.zeros(2, 7)}, "values per row")]
    for tensors, says in cases:
        with pytest.raises(DumpError, match=says):
            compare(m, Dump.read(_write(tmp_path / "d.safetensors", tensors)))
    with pytest.raises(DumpError, match="vocabulary"):
        compare(m, Dump([1, m.config.vocab_size + 5], 1, {(0, "logits"): torch.zeros(1, m.config.vocab_size)}))


def test_cli_dump_and_compare(tiny_paths, tmp_path, capsys):
    model = str(tiny_paths["qwen3moe"])
    out = tmp_path / "broken.safetensors"
    assert main(["dump", model, "--prompt", "hello there", "--steps", "3", "--out", str(out),
                 "--break", "moe-as-dense", "--device", "cpu", "--dtype", "float32", "--weights", "dequantized"]) == 0
    capsys.readouterr()
    assert main(["compare", model, str(out), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["first_divergence"]["capture"] == "blocks.0.moe.topk_ids" and got["suspects"][0] == "moe-as-dense"
    assert {"step", "capture", "local_error", "end_to_end_error"} <= set(got["points"][0])
    assert main(["compare", model, str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "first divergence: step 0, blocks.0.moe.topk_ids" in text and "suspects: moe-as-dense" in text
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 16)
    assert main(["compare", model, str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["compare", str(tiny_paths["llama"]), str(out), "--device", "cpu"]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_their_nan_and_impossible_expert_ids_are_named_not_run(tiny_paths):
    m = load_model(tiny_paths["qwen3moe"])
    d = ours(m, TOKENS, N_PROMPT)
    d.tensors[(1, "blocks.1.moe.topk_ids")] = torch.full_like(d.tensors[(1, "blocks.1.moe.topk_ids")], m.config.n_experts + 3)
    fd = compare(m, d).first_divergence
    assert (fd.step, fd.capture, fd.local_error) == (1, "blocks.1.moe.topk_ids", 1.0)
    d = ours(m, TOKENS, N_PROMPT)
    d.tensors[(2, "blocks.0.attn.v")][0, 1, 3] = float("nan")
    fd = compare(m, d, suspects=False).first_divergence
    assert (fd.step, fd.capture, fd.head) == (2, "blocks.0.attn.v", 1) and fd.local_error == float("inf")
