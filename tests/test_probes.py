"""Probes and traces, checked with independent arithmetic and invariants, and every `--break` switch caught
by the probe signal it is meant to show."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from conftest import load_model
from workbench.errors import NumericError
from workbench.model import APPLIES, BREAKS, Model
from workbench.session import Session
from workbench.trace import Trace, diff

PROMPT = [1, 50, 60, 70, 80, 90, 100, 110]


def run(model, steps=8, path="both", **kw) -> Trace:
    session = Session(model, PROMPT, path=path, probes=True, context=len(PROMPT) + steps, **kw)
    for _ in range(steps):
        session.step()
    return session.trace()


@pytest.fixture(scope="module")
def moe(tiny_paths):
    return load_model(tiny_paths["qwen3moe"])


@pytest.fixture(scope="module")
def moe_trace(moe) -> Trace:
    return run(moe)


def test_kv_bytes_arithmetic(moe, moe_trace):
    c = moe.config
    kv = moe_trace.kv
    per_position = c.n_kv_heads * c.head_dim * 4  # float32
    assert (kv["k_bytes"] == kv["length"] * per_position).all()
    assert (kv["v_bytes"] == kv["k_bytes"]).all()
    cached = kv.filter(pl.col("path") == "cached").sort("step", "layer")
    assert cached.filter(pl.col("layer") == 0)["length"].to_list() == [len(PROMPT) + i for i in range(8)]
    assert (cached["capacity_bytes"] == (len(PROMPT) + 8) * per_position * 2).all()


def test_routing_counts_and_renormalised_weights(moe, moe_trace):
    k = moe.config.n_experts_used
    routing = moe_trace.routing
    for (step, path), group in routing.group_by("step", "path"):
        n_tokens = len(PROMPT) if step == 0 else 1
        counts = group.group_by("layer").len()
        assert (counts["len"] == n_tokens * k).all(), (step, path)
    sums = routing.group_by("step", "path", "position", "layer").agg(pl.col("weight").sum())
    assert ((sums["weight"] - 1).abs() < 1e-5).all()
    assert routing["expert"].is_between(0, moe.config.n_experts - 1).all()


def test_paths_record_the_same_rows(moe_trace):
    """The uncached path recomputes everything but records only the new rows: same numbers as cached."""
    for name in ("qk", "routing", "layers"):
        df = moe_trace.frames[name]
        keys = [c for c in df.columns if c not in ("path", "rms", "max_abs", "weight", "router_entropy", "resid_rms", "resid_max_abs")]
        a = df.filter(pl.col("path") == "cached").drop("path").sort(keys)
        b = df.filter(pl.col("path") == "uncached").drop("path").sort(keys)
        assert a.height == b.height > 0
        for col in set(a.columns) - set(keys):
            assert ((a[col] - b[col]).abs() <= 1e-4 * (1 + b[col].abs())).all(), (name, col)


def test_unit_norm_weights_give_unit_post_norm_rms(tiny_paths):
    model = Model.load(tiny_paths["qwen3"], device="cpu", weights="dequantized")  # a private copy: its weights get edited
    for layer in model.weights.layers:
        layer.q_norm.fill_(1.0)
        layer.k_norm.fill_(1.0)
    qk = run(model, steps=3, path="cached").qk
    post = qk.filter(pl.col("stage") == "post")
    assert post.height == 3 * model.config.n_layers * (model.config.n_heads + model.config.n_kv_heads)
    assert ((post["rms"] - 1).abs() < 1e-3).all()
    pre = qk.filter(pl.col("stage") == "pre")
    assert ((pre["rms"] - 1).abs() > 1e-2).any()  # before the norm the heads are not at unit RMS


def test_nan_stops_the_step_naming_the_layer_it_appears(tiny_paths):
    model = Model.load(tiny_paths["llama"], device="cpu", weights="dequantized")
    model.weights.layers[1].w_down[0, 0] = float("nan")  # layer 1's FFN output turns NaN
    session = Session(model, model.tokenizer.encode("def add(a, b):"), probes=True)
    with pytest.raises(NumericError, match=r"blocks\.1\.ffn_out \(layer 1\)"):  # the FFN output, where it began
        session.step()
    assert session.n_steps == 0 and not session.records.tokens and not session.records.layers  # as before the step
    model.weights.layers[1].w_down[0, 0] = 0.0
    assert session.step().step == 0  # the next step works


def test_parquet_round_trip(moe_trace, tmp_path):
    path = moe_trace.write(tmp_path / "run.parquet")
    back = Trace.read(path)
    for name, df in moe_trace.frames.items():
        assert back.frames[name].equals(df), name
        assert back.frames[name].schema == df.schema
    assert back.meta["arch"] == "qwen3moe" and back.meta["model_sha256"] == moe_trace.meta["model_sha256"]


def test_diff_of_a_trace_with_itself_is_clean(moe_trace):
    assert all(d.first is None for d in diff(moe_trace, moe_trace))


def test_top_candidates_are_probabilities(moe_trace):
    tokens = moe_trace.tokens
    for ids, probs, token in zip(tokens["top_ids"].to_list(), tokens["top_probs"].to_list(), tokens["token_id"]):
        assert len(ids) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert ids[0] == token  # greedy


# --- every break switch, and the signal that catches it ----------------------------------------------------

def _layers(trace, path="cached"):
    return trace.layers.filter(pl.col("path") == path).sort("step", "layer")


def test_skip_qk_norm_shows_in_post_norm_rms(tiny_paths):
    model = load_model(tiny_paths["qwen3"])
    good, bad = run(model, path="cached"), run(model, path="cached", breaks={"skip-qk-norm"})
    post = lambda t: t.qk.filter((pl.col("stage") == "post") & (pl.col("step") == 0)).sort("layer", "head", "tensor")["rms"]
    pre = lambda t: t.qk.filter((pl.col("stage") == "pre") & (pl.col("step") == 0)).sort("layer", "head", "tensor")["rms"]
    assert ((post(good) - post(bad)).abs() > 0.05).any()
    assert ((post(bad) - pre(bad)).abs() < 1e-6).all()  # "post" equals "pre": nothing normalised them


@pytest.mark.parametrize("name", ["rope-style-swap", "rope-base-10k"])
def test_rope_breaks_change_attention_but_not_position_0(name, tiny_paths):
    """RoPE at position 0 is the identity: a wrong RoPE leaves the first token alone and changes the rest."""
    model = load_model(tiny_paths["qwen2"])
    ids = torch.tensor(PROMPT)
    good = model.forward(ids, 0, model.new_cache(len(ids)))
    bad = model.forward(ids, 0, model.new_cache(len(ids)), breaks=frozenset({name}))
    assert torch.allclose(good[0], bad[0], atol=1e-5)
    assert (good[1:] - bad[1:]).abs().amax() > 1e-2
    # cached ≡ uncached still holds: both paths share the bug, so only a reference or a diff shows it
    equiv = run(model, breaks={name}).equiv
    assert (equiv["max_abs_diff"] <= 1e-4 * equiv["max_abs_logit"]).all()


def test_no_topk_renorm_shows_in_routing_weights(moe, moe_trace):
    def deficits(trace):
        return 1 - trace.routing.group_by("step", "path", "position", "layer").agg(pl.col("weight").sum())["weight"]

    assert deficits(moe_trace).abs().max() < 1e-5
    broken = deficits(run(moe, path="cached", breaks={"no-topk-renorm"}))
    assert broken.min() > -1e-6 and broken.mean() > 1e-3  # the top-k mass, short of 1 by what the rest got


def test_moe_as_dense_collapses_routing_to_one_expert(moe, moe_trace):
    routing = run(moe, path="cached", breaks={"moe-as-dense"}).routing
    assert routing["expert"].unique().to_list() == [0]
    assert moe_trace.routing["expert"].n_unique() > 1


def test_cache_off_by_one_breaks_equivalence_from_step_1(moe):
    equiv = run(moe, breaks={"cache-off-by-one"}).equiv.sort("step")
    rel = equiv["max_abs_diff"] / equiv["max_abs_logit"]
    assert rel[0] <= 1e-4  # the prefill does not read the cache one short
    assert (rel[1:] > 1e-3).all()


def test_head_dim_from_hidden_matters_only_where_they_differ(tiny_paths):
    ids = torch.tensor(PROMPT)
    for arch, differs in (("qwen3", True), ("llama", False)):
        model = load_model(tiny_paths[arch])
        c = model.config
        assert (c.head_dim != c.hidden // c.n_heads) == differs
        good = model.forward(ids, 0, model.new_cache(len(ids)))
        bad = model.forward(ids, 0, model.new_cache(len(ids)), breaks=frozenset({"head-dim-from-hidden"}))
        assert ((good - bad).abs().amax() > 1e-2) == differs, arch


def test_every_break_has_a_test():
    tested = {"skip-qk-norm", "rope-style-swap", "rope-base-10k", "no-topk-renorm", "moe-as-dense",
              "cache-off-by-one", "head-dim-from-hidden",
              "topk-renorm-anyway", "shared-expert-dropped", "shared-expert-ungated",  # these three: test_qwen2moe
              "qk-norm-per-head",  # test_olmoe
              "skip-kv-a-norm", "probs-bias-in-weights", "no-group-limit", "no-routed-scaling", "yarn-ignored",  # test_deepseek2
              "sinks-dropped", "softmax-before-topk", "swiglu-unclamped", "no-sliding-window"}  # test_gpt_oss
    assert tested == set(BREAKS) == set(APPLIES)  # and every break says where it applies


# --- the reference engine ----------------------------------------------------------------------------------

def test_llama_cpp_reference_frame(smollm2_path):
    pytest.importorskip("llama_cpp")
    model = load_model(smollm2_path)
    session = Session(model, model.tokenizer.encode("The capital of France is"), reference="llama.cpp", context=64)
    for _ in range(6):
        session.step()
    ref = session.trace().reference
    assert ref.height == 6 and (ref["cosine"] > 0.99).all()
    # llama.cpp's 8-bit activations can swap near-tied candidates: each engine's top-1 is in the other's top 2
    for ours, theirs in zip(ref["ours_top5"].to_list(), ref["ref_top5"].to_list()):
        assert len(ours) == len(theirs) == 5 and ours[0] in theirs[:2] and theirs[0] in ours[:2]
    assert ref["top1_equal"].sum() >= 4
