"""The teaching frames (issue 12, item 5): the newest token's attention pattern and the logit lens, taken at the
same capture points as the other probes, each checked against an independent computation from captured tensors
(probes.Capture) in float64 on the exact path; both paths give the same frames; off by default."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from conftest import ARCHS, load_model
from workbench.frames import KEYS
from workbench.probes import Capture, StepProbe
from workbench.session import Session
from workbench.trace import Recorder, Trace, diff

PROMPT = [1, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]  # longer than gemma3 tiny's window of 8
STEPS = 4


def teaching_trace(model, path="cached", **kw) -> tuple[Trace, Session]:
    session = Session(model, PROMPT, path=path, attention=True, lens=True, context=len(PROMPT) + STEPS, **kw)
    for _ in range(STEPS):
        session.step()
    return session.trace(), session


@pytest.fixture(scope="module")
def traces(tiny_paths) -> dict[str, tuple[Trace, Session]]:
    return {arch: teaching_trace(load_model(tiny_paths[arch]), path="both", probes=True) for arch in ARCHS}


def captured(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """q_rope, k_rope (MLA: q, q_pe, kv_latent, k_pe) and resid_post of every position, and the logits, from
    one uncached forward."""
    cap = Capture(names=["*.attn.q_rope", "*.attn.k_rope", "*.attn.q", "*.attn.q_pe", "*.attn.kv_latent", "*.attn.k_pe",
                         "*.resid_post", "logits"])
    model.forward(torch.tensor(ids), 0, model.new_cache(len(ids)), cap)
    return cap.tensors


def by_hand_pattern(model, t: dict[str, torch.Tensor], layer: int, position: int) -> torch.Tensor:
    """softmax(q·k · scale) of the query at `position` over keys 0..position, within the layer's window:
    [heads, position + 1], float64."""
    c = model.config
    if c.is_mla:  # decompressed, as MHA: k_h = [attn_k_b(latent) of head h | the shared k_pe], q_h = [q_nope | q_pe]
        b, nope = f"blocks.{layer}.attn.", c.head_dim - c.rope_dim
        q = torch.cat((t[b + "q"][position, :, :nope], t[b + "q_pe"][position]), -1).double()
        k_nope = torch.einsum("sl,hln->shn", t[b + "kv_latent"][: position + 1], model.weights.layers[layer].wk_b)
        k_pe = t[b + "k_pe"][: position + 1, None].expand(-1, c.n_heads, -1)
        k, group = torch.cat((k_nope, k_pe), -1).double(), 1  # [keys, heads, d]
    else:
        q = t[f"blocks.{layer}.attn.q_rope"][position].double()  # [heads, d]
        k = t[f"blocks.{layer}.attn.k_rope"][: position + 1].double()  # [keys, kv_heads, d]
        group = c.n_heads // c.n_kv_heads
    scores = torch.stack([k[:, h // group] @ q[h] for h in range(c.n_heads)]) * c.attn_scale  # [heads, keys]
    window = c.layer_window(layer)
    if window is not None:
        scores[:, : max(0, position + 1 - window)] = -math.inf  # keys `window` or more positions back
    if c.attn_sinks:  # gpt-oss: each head's sink logit joins the softmax, and its column is dropped
        sinks = model.weights.layers[layer].sinks.double()[:, None]
        return torch.softmax(torch.cat((scores, sinks), -1), -1)[:, :-1]
    return torch.softmax(scores, -1)


def by_hand_lens(model, resid: torch.Tensor, final: torch.Tensor) -> dict[str, torch.Tensor]:
    """RMSNorm with the final norm's weight, the head, then top-1, entropy and KL(final ‖ layer), float64."""
    w, eps = model.weights, model.config.rms_eps
    x = resid.double()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.output_norm.double()
    logp = torch.log_softmax(x @ w.output.double(), -1)  # [layers, vocab]
    final_logp = torch.log_softmax(final.double(), -1)
    return {"token_id": logp.argmax(-1), "prob": logp.max(-1).values.exp(), "entropy": -(logp.exp() * logp).sum(-1),
            "kl_to_final": (final_logp.exp() * (final_logp - logp)).sum(-1)}


def rows(frame: pl.DataFrame, path: str, step: int) -> pl.DataFrame:
    return frame.filter((pl.col("path") == path) & (pl.col("step") == step))


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_is_softmax_of_the_captured_q_and_k(arch, traces):
    trace, session = traces[arch]
    model = session.model
    c = model.config
    t = captured(model, session.ids)
    for path in ("cached", "uncached"):
        for step in range(STEPS):
            position = len(PROMPT) - 1 + step  # the newest token: the last prompt row at step 0
            got = rows(trace.attention, path, step).sort("layer", "head", "key")
            assert got.height == c.n_layers * c.n_heads * (position + 1)
            weights = torch.tensor(got["weight"].to_numpy()).view(c.n_layers, c.n_heads, position + 1)
            for layer in range(c.n_layers):
                expected = by_hand_pattern(model, t, layer, position)
                assert (weights[layer] - expected).abs().max() < 1e-5, (path, step, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_rows_are_causal_probabilities(arch, traces):
    trace, _ = traces[arch]
    per_head = trace.attention.group_by("step", "path", "layer", "head").agg(
        pl.col("weight").sum(), pl.col("key").max().alias("last"), pl.len(), pl.col("weight").min().alias("min"))
    if traces[arch][1].model.config.attn_sinks:  # gpt-oss: the sinks take a share (the pattern test checks how much)
        assert ((per_head["weight"] > 0) & (per_head["weight"] < 1)).all()
    else:
        assert ((per_head["weight"] - 1).abs() < 1e-5).all()
    assert (per_head["last"] == len(PROMPT) - 1 + per_head["step"]).all()  # no key after the newest token
    assert (per_head["len"] == per_head["last"] + 1).all() and (per_head["min"] >= 0).all()


def test_gemma3_local_layers_read_only_their_window(traces):
    trace, session = traces["gemma3"]
    c = session.model.config
    assert c.sliding_window == 8 and len(PROMPT) > c.sliding_window
    df = trace.attention.with_columns(back=len(PROMPT) - 1 + pl.col("step") - pl.col("key"))  # positions back
    for layer in range(c.n_layers):
        mine = df.filter(pl.col("layer") == layer)
        outside = mine.filter(pl.col("back") >= c.sliding_window)["weight"]
        inside = mine.filter(pl.col("back") < c.sliding_window)["weight"]
        assert outside.len() > 0 and inside.min() > 0
        if c.is_local_layer(layer):
            assert outside.abs().max() == 0.0, layer
        else:  # the global layer reads every position
            assert outside.min() > 0, layer


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_is_each_layer_through_the_final_norm_and_head(arch, traces):
    trace, session = traces[arch]
    model = session.model
    c = model.config
    t = captured(model, session.ids)
    for step in range(STEPS):
        position = len(PROMPT) - 1 + step
        resid = torch.stack([t[f"blocks.{i}.resid_post"][position] for i in range(c.n_layers)])  # [layers, hidden]
        expected = by_hand_lens(model, resid, t["logits"][position])
        for path in ("cached", "uncached"):
            got = rows(trace.lens, path, step).sort("layer")
            assert got["layer"].to_list() == list(range(c.n_layers))
            assert got["token_id"].to_list() == expected["token_id"].tolist(), (path, step)
            for col in ("prob", "entropy", "kl_to_final"):
                assert (torch.tensor(got[col].to_numpy()) - expected[col]).abs().max() < 1e-4, (path, step, col)


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_at_the_last_layer_is_the_models_output(arch, traces):
    trace, session = traces[arch]
    last = trace.lens.filter(pl.col("layer") == session.model.config.n_layers - 1).sort("step", "path")
    tokens = trace.tokens.sort("step", "path")
    assert last.height == tokens.height == 2 * STEPS
    assert last["token_id"].to_list() == [ids[0] for ids in tokens["top_ids"].to_list()]
    assert all(abs(p - probs[0]) < 1e-5 for p, probs in zip(last["prob"], tokens["top_probs"].to_list()))
    assert (last["kl_to_final"].abs() < 1e-5).all()
    assert (trace.lens["kl_to_final"] > -1e-6).all() and (trace.lens["entropy"] >= 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_and_uncached_give_the_same_frames(arch, traces):
    trace, _ = traces[arch]
    for name in ("attention", "lens"):
        df = trace.frames[name]
        keys = [k for k in KEYS[name] if k != "path"]
        a = df.filter(pl.col("path") == "cached").drop("path").sort(keys)
        b = df.filter(pl.col("path") == "uncached").drop("path").sort(keys)
        assert a.height == b.height > 0 and a.select(keys).equals(b.select(keys))
        for col in set(a.columns) - set(keys):
            assert ((a[col] - b[col]).abs() <= 1e-4 * (1 + b[col].abs())).all(), (name, col)


def test_both_frames_round_trip_through_parquet(traces, tmp_path):
    trace, _ = traces["qwen3moe"]
    back = Trace.read(trace.write(tmp_path / "run.parquet"))
    for name in ("attention", "lens"):
        assert back.frames[name].height > 0 and back.frames[name].equals(trace.frames[name])
        assert back.frames[name].schema == trace.frames[name].schema
    assert all(d.first is None for d in diff(trace, back))
    assert back.meta["attention"] is True and back.meta["lens"] is True


def test_off_by_default(tiny_paths):
    model = load_model(tiny_paths["qwen3moe"])
    session = Session(model, PROMPT, probes=True, context=len(PROMPT) + 2)
    assert not session.attention and not session.lens
    session.step()
    trace = session.trace()
    assert trace.attention.is_empty() and trace.lens.is_empty() and trace.qk.height > 0
    probe = StepProbe(slice(None))
    assert not probe.wants("blocks.0.attn.pattern")  # the second attention is never computed for it


def test_each_frame_on_its_own(tiny_paths):
    """attention or lens alone takes only what it needs: no statistics rows, no candidates."""
    model = load_model(tiny_paths["qwen3moe"])
    probe = StepProbe(slice(None), statistics=False, attention=True)
    assert probe.wants("blocks.1.attn.pattern") and not probe.wants("blocks.1.resid_post")
    assert not probe.wants("blocks.1.attn.q") and not probe.wants("blocks.1.moe.topk_ids")
    for option, filled, empty in (("attention", "attention", "lens"), ("lens", "lens", "attention")):
        session = Session(model, PROMPT, context=len(PROMPT) + 2, **{option: True})
        session.step()
        session.step()
        trace = session.trace()
        assert trace.frames[filled].height > 0 and trace.frames[empty].is_empty(), option
        assert trace.qk.is_empty() and trace.layers.is_empty() and trace.routing.is_empty()
        assert trace.tokens["top_ids"].is_null().all()


def test_a_real_model(smollm2_path):
    """SmolLM2-135M: 30 layers × 9 heads; the lens ends on the model's own answer."""
    model = load_model(smollm2_path)
    c = model.config
    session = Session(model, model.tokenizer.encode("The capital of France is"), attention=True, lens=True, context=32)
    results = [session.step() for _ in range(2)]
    trace = session.trace()
    n_keys = len(session.prompt_ids)
    assert trace.attention.filter(pl.col("step") == 0).height == c.n_layers * c.n_heads * n_keys
    sums = trace.attention.group_by("step", "layer", "head").agg(pl.col("weight").sum())["weight"]
    assert ((sums - 1).abs() < 1e-5).all()
    last = trace.lens.filter(pl.col("layer") == c.n_layers - 1).sort("step")
    assert last["token_id"].to_list() == [r.token_id for r in results]
    assert (last["kl_to_final"].abs() < 1e-4).all()
    assert (trace.lens["kl_to_final"].head(c.n_layers - 1) > 0.1).all()  # early layers guess something else


def test_columns_are_checked_like_rows():
    records = Recorder()
    records.extend_columns("attention", {"layer": [0, 0], "head": [1, 1], "key": [0, 1], "weight": [0.25, 0.75]},
                           step=3, path="cached")
    assert records.attention == [(3, "cached", 0, 1, 0, 0.25), (3, "cached", 0, 1, 1, 0.75)]
    with pytest.raises(ValueError, match="in order"):
        records.extend_columns("attention", {"layer": [0], "key": [0], "head": [0], "weight": [1.0]}, step=0, path="cached")
    with pytest.raises(ValueError, match="different lengths"):
        records.extend_columns("attention", {"layer": [0], "head": [0], "key": [0, 1], "weight": [1.0]}, step=0, path="cached")
