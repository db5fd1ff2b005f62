"""cached ≡ uncached: the two decode paths run the same forward over the same weights, so their logits must
agree at every step (max |Δ| ≤ 1e-4 × max |logit|, fp32) and greedy decoding must pick the same tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, load_model
from workbench.session import Session
from workbench.tiny import TINY_KINDS

STEPS = 64


def _run(model, prompt_ids, path, steps):
    session = Session(model, prompt_ids, path=path, context=len(prompt_ids) + steps)
    results = []
    for _ in range(steps):  # not generate(): keep going past EOS, the invariant holds for every token
        results.append(session.step())
    return session.ids[len(prompt_ids):], torch.stack([r.logits for r in results])


def _check(model, prompt_ids, steps=STEPS):
    cached_ids, cached = _run(model, prompt_ids, "cached", steps)
    uncached_ids, uncached = _run(model, prompt_ids, "uncached", steps)
    assert cached_ids == uncached_ids
    scale = uncached.abs().amax(-1)
    diff = (cached - uncached).abs().amax(-1)
    assert (diff <= 1e-4 * scale).all(), f"worst step {int((diff / scale).argmax())}: {float((diff / scale).max()):.2e}"


@pytest.mark.parametrize("arch", TINY_KINDS)
def test_tiny_cached_equals_uncached(arch, tiny_paths):
    model = load_model(tiny_paths[arch])
    _check(model, [1, 50, 60, 70, 80, 90, 100])


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_tiny_sliding_windows_are_crossed(arch, tiny_paths):
    """The tiny gemma3's window is 8 positions, gpt-oss's 4 (with its sinks): 64 steps cross them many times on
    the local layers."""
    model = load_model(tiny_paths[arch])
    assert model.config.sliding_window is not None and model.config.sliding_window < STEPS
    _check(model, [1, 2, 3])


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_cached_equals_uncached(name, smollm2_path, gemma3_path):
    path = {"smollm2": smollm2_path, "gemma3": gemma3_path}[name]
    model = load_model(path)
    _check(model, model.tokenizer.encode("Once upon a time, in a small village by the sea,"))


@pytest.mark.parametrize("arch", TINY_KINDS)
def test_static_step_equals_eager_step(arch, tiny_paths):
    """The static-shape decode step (position as a tensor, attention over the whole cache under a mask: what
    a CUDA graph captures) gives the eager step's logits and writes the same cache, here on the CPU."""
    model = load_model(tiny_paths[arch])
    prompt = [1, 50, 60, 70, 80, 90, 100]
    capacity = 24  # gemma3's window is 8: positions past it exercise the window mask
    eager, static = model.new_cache(capacity), model.new_cache(capacity)
    model.forward(torch.tensor(prompt), 0, eager, last_only=True)
    model.forward(torch.tensor(prompt), 0, static, last_only=True)
    token = 5
    for position in range(len(prompt), capacity):
        a = model.forward(torch.tensor([token]), position, eager)[-1]
        b = model.forward(torch.tensor([token]), 0, static, pos=torch.tensor([position]))[-1]
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), position
        token = int(a.argmax())
    for k_eager, k_static in zip(eager.keys, static.keys):  # both attend in float32, summing in other orders
        assert (k_eager - k_static).abs().max() <= 1e-5 * k_eager.abs().max()


def test_compiled_step_equals_eager_step(tiny_paths):
    """Session(compile=True): the torch.compile'd static step (C++ wrapper on the CPU) gives the eager cached
    path's tokens and logits (same kernels, fused elementwise ops: float32 rounding apart)."""
    model = load_model(tiny_paths["qwen3"])
    prompt = [1, 50, 60, 70]
    compiled = Session(model, prompt, path="cached", context=24, compile=True)
    eager = Session(model, prompt, path="cached", context=24)
    a = torch.stack([compiled.step().logits for _ in range(12)])
    b = torch.stack([eager.step().logits for _ in range(12)])
    assert compiled.static_step is not None and compiled.ids == eager.ids
    assert ((a - b).abs().amax(-1) <= 1e-5 * b.abs().amax(-1)).all()


def test_compile_failure_is_one_sentence(tiny_paths, monkeypatch):
    """Without a working compiler (here: inductor's C++ compiler pointed at a missing program), asking for
    the compiled step gives a typed error with one sentence, and the session can go on without it."""
    import torch._inductor.config as inductor_config

    from workbench.errors import UnsupportedError

    model = load_model(tiny_paths["llama"])
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    session = Session(model, [1, 50, 60], path="cached", context=12, compile=True)
    session.step()  # the prefill is eager
    with pytest.raises(UnsupportedError, match="torch.compile could not build the decode step"):
        session.step()
    session.compile = False
    assert session.step().token_id >= 0  # the eager path still runs


def test_timing_repeats_change_only_the_timing(tiny_paths):
    """Best-of-N step timing reruns a decode step's forward: the tokens, the frames' numbers and the cache are
    those of a session that times each step once."""
    from conftest import load_model
    from workbench.session import Session

    m = load_model(tiny_paths["qwen3moe"])
    runs = []
    for repeats in (1, 3):
        s = Session(m, [1, 17, 99, 250], path="both", probes=True, attention=True, lens=True, context=32, timing_repeats=repeats)
        for _ in range(5):
            s.step()
        runs.append((s.ids, s.trace()))
    (ids_1, t1), (ids_3, t3) = runs
    assert ids_1 == ids_3
    for name in ("qk", "routing", "layers", "equiv", "attention", "lens", "kv"):
        assert t1.frames[name].equals(t3.frames[name]), name
    assert t3.tokens.drop("seconds", "tokens_per_s").equals(t1.tokens.drop("seconds", "tokens_per_s"))
