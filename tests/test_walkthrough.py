"""The teaching notebook (notebooks/walkthrough.py) runs top to bottom headless, and what it computes holds.

1. `python notebooks/walkthrough.py` — the way CI and a reader run it — exits 0. marimo's script mode re-raises
   the first exception of any cell, so a broken cell fails this test (checked in test_a_failing_cell_fails).
2. The notebook's definitions, from `app.run()` in a fresh interpreter (the notebook sets torch's thread count,
   which must not leak into this test process): the by-hand decode step matches the engine, the KV arithmetic,
   cached ≡ uncached, and each break is caught where the README says it is.

The notebook cannot be imported by name: its folder also holds notebooks/workbench.py, which would shadow the
`workbench` package. It is loaded from its path with importlib instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.py"
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not NOTEBOOK.exists(), reason="notebooks/walkthrough.py does not exist")


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_script_mode_exits_zero():
    proc = _run([str(NOTEBOOK.relative_to(ROOT))])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    # The headless summary line the last cell prints (silent in the editor).
    assert "walkthrough: by-hand vs engine" in proc.stdout, proc.stdout[-3000:]


def test_a_failing_cell_fails(tmp_path: Path):
    """The premise of the test above: in script mode an exception in any cell makes the process exit non-zero."""
    nb = tmp_path / "failing.py"
    nb.write_text(textwrap.dedent('''
        import marimo
        app = marimo.App()

        @app.cell
        def _():
            x = 1
            return (x,)

        @app.cell
        def _(x):
            raise ValueError("a cell failed")
            return

        if __name__ == "__main__":
            app.run()
    '''))
    proc = _run([str(nb)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "a cell failed" in proc.stderr


_FACTS = textwrap.dedent('''
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("walkthrough_notebook", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outputs, defs = module.app.run()
    cfg = defs["cfg"]
    import torch
    from workbench.model import breaks_that_apply
    model, ids, by_hand = defs["model"], defs["ids"], defs["decode_by_hand"]
    pos = len(ids) - 1
    broken_steps = {}
    clean = by_hand(pos)[2]
    for name in defs["BREAKS"]:
        hand = by_hand(pos, frozenset({name}))[2]
        cache = model.new_cache(pos + 1)
        model.forward(torch.tensor(ids[:pos]), 0, cache, last_only=True, breaks=frozenset({name}))
        engine = model.forward(torch.tensor(ids[pos:]), pos, cache, breaks=frozenset({name}))[-1]
        broken_steps[name] = {"vs engine": float((hand - engine).abs().max()), "vs clean": float((hand - clean).abs().max()),
                              "applies": name in breaks_that_apply(cfg)}
    from workbench import lessons
    signatures = {name: lessons.rope_difference_by_position(model, ids, frozenset({name}))["relative difference"].to_list()
                  for name in ("rope-style-swap", "rope-base-10k")}
    group = cfg.n_heads // cfg.n_kv_heads
    entropy = {}
    for label, breaks in (("clean", frozenset()), ("broken", frozenset({"head-dim-from-hidden"}))):
        layers, _, _, c = by_hand(pos, breaks)
        pattern = lessons.attention_pattern(layers[0], group, c.attn_scale, defs["pieces"])[0]
        entropy[label] = float(lessons.attention_entropy(pattern)["entropy"].mean())
    report = {r["break"]: r for r in defs["break_report"].iter_rows(named=True)}
    print("FACTS " + json.dumps({
        "by_hand_max_diff": defs["by_hand_max_diff"],
        "by_hand_vs_cached": defs["by_hand_vs_cached"],
        "same_next_token": defs["same_next_token"],
        "probe_max_diff": defs["probe_check"]["max |by hand − engine|"].max(),
        "kv_bytes_per_token": defs["kv_bytes_per_token"],
        "kv_expected": cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * 4,
        "kv_formula_holds": defs["kv_formula_holds"],
        "qwen3_30b_kv_bytes_32k": defs["qwen3_30b_kv_bytes_32k"],
        "equiv_worst": defs["equiv_worst"],
        "equiv_argmax_all": defs["equiv_argmax_all"],
        "speed_steps": defs["speed_trace"].tokens.filter(defs["speed_trace"].tokens["path"] == "uncached").height,
        "speed_positions": [int(defs["speed_trace"].tokens["position"].min()), int(defs["speed_trace"].tokens["position"].max())],
        "speed_warmup": defs["SPEED_WARMUP"],
        "speed_growth": {r["path"]: r for r in defs["speed_growth"].iter_rows(named=True)},
        "by_hand_relative": defs["by_hand_relative"],
        "qk_spread": {f"{r['tensor']} {r['stage']}": r for r in defs["qk_spread"].iter_rows(named=True)},
        "specialisation": defs["specialisation"].to_dicts(),
        "specialisation_gap": defs["specialisation_gap"],
        "rope_total": defs["rope_total"].to_dicts(),
        "rope_relative": defs["rope_relative"].to_dicts(),
        "attention_shares": defs["attention_shares"].to_dicts(),
        "answer_layers": defs["answer_layers"].to_dicts(),
        "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "broken_steps": broken_steps,
        "window_facts": defs["window_facts"],
        "rope_signatures": signatures, "head_dim_entropy": entropy,
        "breaks": {name: {k: r[k] for k in ("alarm frame", "alarm step", "first frame", "first step", "invariant that fires")}
                   for name, r in report.items()},
        "all_breaks": sorted(breaks_that_apply(cfg)),
        "shared_gates": defs["shared_trace"].shared["gate"].to_list(),
        "shared_share": defs["shared_share"].to_dicts(),
        "shared_breaks": {r["break"]: r for r in defs["shared_breaks"].iter_rows(named=True)},
        "shared_layers": defs["qwen2moe"].config.n_layers, "shared_tokens": len(defs["shared_ids"]) + defs["SHARED_STEPS"],
        "olmoe_summary": {r["norm"]: r for r in defs["olmoe_summary"].iter_rows(named=True)},
        "olmoe_breaks": {r["break"]: r for r in defs["olmoe_breaks"].iter_rows(named=True)},
        "olmoe_rows": defs["olmoe_heads"].height,
        "olmoe_shape": [defs["olmoe"].config.n_layers, len(defs["olmoe_ids"]), defs["olmoe"].config.n_heads],
        "mla_config": {k: getattr(defs["deepseek"].config, k)
                       for k in ("n_layers", "n_heads", "kv_lora_rank", "rope_dim", "head_dim", "v_head_dim")},
        "mla_cache": defs["mla_cache"].to_dicts(), "mla_tokens": len(defs["mla_ids"]) + defs["MLA_STEPS"],
        "mla_forms": defs["mla_forms"].to_dicts(),
        "mla_breaks": {r["break"]: r for r in defs["mla_breaks"].iter_rows(named=True)},
        "v3_sizes": defs["V3"], "v3_kv_bytes": defs["v3_kv_bytes"],
        "v3_changes": defs["v3_changes"].to_dicts(), "v3_token": defs["v3_token"].to_dicts(),
        "v3_breaks": {r["break"]: r for r in defs["v3_breaks"].iter_rows(named=True)},
        "sink_frame": defs["sink_frame"].to_dicts(), "sink_summary": defs["sink_summary"].to_dicts(),
        "sink_breaks": {r["break"]: r for r in defs["sink_breaks"].iter_rows(named=True)},
        "sink_recorded_gap": defs["sink_recorded_gap"],
        "sink_shape": [defs["gptoss"].config.n_layers, defs["gptoss"].config.n_heads, defs["gptoss"].config.sliding_window,
                       defs["SINK_STEPS"], defs["sink_first"]],
    }))
''')


@pytest.fixture(scope="module")
def facts() -> dict:
    proc = _run(["-c", _FACTS, str(NOTEBOOK)])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    line = next(line for line in proc.stdout.splitlines() if line.startswith("FACTS "))
    return json.loads(line.removeprefix("FACTS "))


def test_by_hand_step_matches_the_engine(facts):
    assert facts["by_hand_max_diff"] < 1e-4
    assert facts["by_hand_vs_cached"] < 1e-4
    assert facts["same_next_token"]
    assert facts["probe_max_diff"] < 1e-4  # every capture point, and Model.moe on the same input


def test_kv_cache_arithmetic(facts):
    assert facts["kv_bytes_per_token"] == facts["kv_expected"]
    assert facts["kv_formula_holds"]
    assert facts["qwen3_30b_kv_bytes_32k"] == 48 * 4 * 128 * 2 * 2 * 32768 == 3 * 2**30


def test_cached_equals_uncached(facts):
    assert facts["speed_steps"] >= 8
    assert facts["equiv_worst"] <= 1e-4
    assert facts["equiv_argmax_all"]


def test_section_5_claim_holds_on_what_it_measured(facts):
    """Section 5 says the uncached cost per token rises with the position and the cached one stays about flat: on
    a run long enough (≥ 128 positions) for the rise to stand well above noise, warm-up steps left out. The
    figures it states are the run's own (lessons.cost_growth); this holds the run to the claim its text makes."""
    low, high = facts["speed_positions"]
    assert high - low + 1 >= 128 and facts["speed_warmup"] >= 1  # decode steps at positions low … high
    growth = facts["speed_growth"]
    assert growth["uncached"]["position late"] >= 4 * growth["uncached"]["position early"]
    # measured here: uncached 2.6–2.7×, cached 1.0–1.3× (positions ~20 → ~140, best of 3 per step, 1 thread)
    assert growth["uncached"]["ratio"] > 1.8 and growth["uncached"]["ratio"] > 1.5 * growth["cached"]["ratio"], growth


def test_the_by_hand_difference_is_float32_rounding(facts):
    """Section 3 calls the by-hand vs engine difference float32 rounding: it states it relative to the largest logit."""
    assert facts["by_hand_relative"] < 1e-5


def test_the_renorm_alarm_names_a_fixed_row(facts):
    """no-topk-renorm's "weights sum to X" named an arbitrary row (group_by's order) and changed on every load."""
    said = facts["breaks"]["no-topk-renorm"]["invariant that fires"]
    assert "position 0, layer 0" in said, said


def test_every_break_is_caught(facts):
    breaks = facts["breaks"]
    assert sorted(breaks) == facts["all_breaks"]
    for name, row in breaks.items():
        assert row["first frame"] is not None, f"{name}: no difference from the clean run"
    assert breaks["cache-off-by-one"]["alarm frame"] == "equiv" and breaks["cache-off-by-one"]["alarm step"] == 1
    assert breaks["cache-off-by-one"]["first step"] == 1  # the prefill is right; the first cached step is not
    assert breaks["moe-as-dense"]["alarm frame"] == "routing"
    assert breaks["no-topk-renorm"]["alarm frame"] == "routing"
    assert breaks["skip-qk-norm"]["alarm frame"] == "qk" and breaks["skip-qk-norm"]["first frame"] == "qk"
    for name in ("rope-style-swap", "rope-base-10k", "head-dim-from-hidden"):
        assert breaks[name]["alarm frame"] is None, f"{name}: both paths share it, no invariant should fire"


def test_qk_norm_makes_head_sizes_independent_of_the_input(facts):
    """Section 3, across positions: before the norm a head's size varies with the input; after it, only the
    learned weight is left (the issue measured 1.1–4.2 before, 0.9–1.3 after on this model)."""
    spread = facts["qk_spread"]
    for t in ("q", "k"):
        assert spread[f"{t} post"]["spread"] < 0.5 * spread[f"{t} pre"]["spread"], spread
        assert spread[f"{t} post"]["max"] < spread[f"{t} pre"]["max"]


def test_rope_angles_unwrapped_and_relative(facts):
    """Section 3: every pair's unwrapped angle is the formula's (the fast pairs too, which went round more than
    once), and q·k depends on the offset only."""
    rows = facts["rope_total"]
    assert max(r["formula"] for r in rows) > 2 * 3.15  # at least one pair has gone round: unwrapping is tested
    assert all(abs(r["measured"] - r["formula"]) < 1e-3 for r in rows)
    by_offset = {}
    for r in facts["rope_relative"]:
        by_offset.setdefault(r["offset"], []).append(r["dot"])
    for dots in by_offset.values():
        assert max(dots) - min(dots) <= 1e-4 * max(1.0, max(abs(d) for d in dots))


def test_expert_specialisation_is_stated_against_its_controls(facts):
    """Section 6: code vs prose usage distance stands above the same-kind baseline, and the page compares that
    gap with a random router's (the text says which is larger: both figures are the run's own)."""
    for row in facts["specialisation"]:
        assert all(0 <= v <= 1 for k, v in row.items() if k != "layer")
        assert row["across kinds"] > row["within a kind"] + 0.1
    gap = facts["specialisation_gap"]
    assert gap["trained"] > 0.1 and gap["random"] >= 0


def test_attention_and_lens_sections_state_their_own_numbers(facts):
    """Section 7: the shares it quotes are weights of a softmax (each ≤ 1, heads counted within the layer's), and
    the logit lens's "answer from layer L" is a layer of the model, the last one's top-1 being the output."""
    for row in facts["attention_shares"]:
        assert all(0 <= row[k] <= 1 for k in ("on key 0", "on itself", "on the previous token"))
        counted = row["heads reading key 0 most"] + row["heads reading the previous token most"] + row["heads reading itself most"]
        assert 0 <= counted <= facts["n_heads"]
    assert facts["answer_layers"] and all(0 <= r["from layer"] < facts["n_layers"] for r in facts["answer_layers"])


def test_each_bug_written_into_the_hand_step_is_the_engines(facts):
    """Section 3's "put a bug into this step": with each break on, the step written out by hand equals the
    engine's cached step with the same switch (so what the page shows is that bug), and differs from the clean
    step wherever the break applies to this model."""
    for name, row in facts["broken_steps"].items():
        assert row["vs engine"] < 1e-4, (name, row)
        if row["applies"]:
            assert row["vs clean"] > 1e-3, (name, row)


def test_the_bugs_no_invariant_catches_have_their_own_signature(facts):
    """Section 8: a RoPE bug is exactly 0 at position 0; the style swap is large from position 1 on, the base
    bug starts small and grows; head-dim-from-hidden sharpens attention (a larger score scale)."""
    swap, base = facts["rope_signatures"]["rope-style-swap"], facts["rope_signatures"]["rope-base-10k"]
    assert swap[0] < 1e-6 and base[0] < 1e-6
    assert swap[1] > 0.1 and base[1] < 0.5 * swap[1]
    assert base[-1] > 3 * base[1]
    assert facts["head_dim_entropy"]["broken"] < facts["head_dim_entropy"]["clean"]


def test_the_sliding_window_section_counts_the_masked_keys(facts):
    """Section 7 on tiny-gemma3: a local layer's newest token sees exactly the last `window` positions (itself
    included: llama.cpp masks a key once query − key ≥ window), a global layer sees them all."""
    w = facts["window_facts"]
    assert w["keys"] > w["window"]  # long enough for the window to bite
    assert w["zeros"][str(w["local"])] == w["keys"] - w["window"]
    assert w["zeros"][str(w["global"])] == 0


def test_the_shared_expert_lesson_states_its_own_numbers(facts):
    """Section 6 on tiny-qwen2moe: every gate and share lies in (0, 1), the two parts add up to the engine's ffn_out,
    the clean run against itself moves nothing, and either porting bug moves the logits and the top tokens."""
    assert facts["shared_gates"] and all(0 < g < 1 for g in facts["shared_gates"])
    rows = facts["shared_share"]
    assert len(rows) == facts["shared_layers"] * facts["shared_tokens"]
    assert all(0 < r["shared share"] < 1 and r["max |gated shared + routed − ffn_out|"] < 1e-5 for r in rows)
    breaks = facts["shared_breaks"]
    assert sorted(breaks) == ["clean", "shared-expert-dropped", "shared-expert-ungated"]
    assert breaks["clean"]["relative max |Δlogit|"] == 0 and breaks["clean"]["tokens differ from step"] is None
    for name in ("shared-expert-dropped", "shared-expert-ungated"):
        assert breaks[name]["relative max |Δlogit|"] > 0.05 and breaks[name]["top token changes at"] > 0, breaks[name]
    # dropping takes gate·shared away, ungating adds (1 − gate)·shared: with a mean gate above ½ (0.69), dropping
    # moves the logits more (measured: 0.64 vs 0.28 of the largest logit)
    assert sum(r["gate"] for r in rows) / len(rows) > 0.5
    assert breaks["shared-expert-dropped"]["relative max |Δlogit|"] > breaks["shared-expert-ungated"]["relative max |Δlogit|"]


def test_the_whole_projection_qk_norm_lesson_states_its_own_numbers(facts):
    """Section 3 on tiny-olmoe: normed as OLMoE norms it, heads keep their relative sizes and only the row's combined
    RMS ÷ weight is 1; normed head by head, every head is forced to 1; the per-head port moves the logits."""
    n_layers, n_positions, n_heads = facts["olmoe_shape"]
    assert facts["olmoe_rows"] == 2 * n_layers * n_positions * n_heads
    whole, per_head = facts["olmoe_summary"]["whole"], facts["olmoe_summary"]["per head"]
    relative = "max change of the heads' relative sizes"
    assert whole[relative] < 1e-5 and per_head[relative] > 0.05  # measured: 3e-08 and 0.48
    assert whole["max |row RMS ÷ weight − 1|"] < 1e-4 and per_head["max |row RMS ÷ weight − 1|"] < 1e-4
    assert whole["head RMS ÷ weight, min"] < 0.95 and whole["head RMS ÷ weight, max"] > 1.05  # measured: 0.77–1.20
    assert abs(per_head["head RMS ÷ weight, min"] - 1) < 1e-4 and abs(per_head["head RMS ÷ weight, max"] - 1) < 1e-4
    breaks = facts["olmoe_breaks"]
    assert sorted(breaks) == ["clean", "qk-norm-per-head"] and breaks["clean"]["relative max |Δlogit|"] == 0
    assert breaks["qk-norm-per-head"]["relative max |Δlogit|"] > 0.01  # measured: 0.18


def test_the_latent_attention_lesson_states_its_own_numbers(facts):
    """Section 4 on tiny-deepseek2: the kv frame's bytes per position and layer are the latent + RoPE key's
    ((128 + 32) × 4 = 640 B), an MHA cache's n_heads × (96 + 64) × 4 (5,120 B with the tiny file's 8 heads);
    DeepSeek-V3's sizes give 576 against 40,960 values per layer and token; absorbed attention is MHA with
    decompressed K/V; skip-kv-a-norm moves the logits."""
    c = facts["mla_config"]
    assert (c["kv_lora_rank"], c["rope_dim"], c["head_dim"], c["v_head_dim"]) == (128, 32, 96, 64)
    latent, mha = (c["kv_lora_rank"] + c["rope_dim"]) * 4, c["n_heads"] * (c["head_dim"] + c["v_head_dim"]) * 4
    rows = facts["mla_cache"]
    assert rows[-1]["positions"] == facts["mla_tokens"] - 1  # the newest token is not fed yet
    for r in rows:
        assert r["bytes per position and layer"] == latent == 640 and r["MHA bytes per position and layer"] == mha
        assert r["cache bytes"] == r["positions"] * c["n_layers"] * latent
        assert r["MHA bytes"] * latent == r["cache bytes"] * mha
    v3 = facts["v3_sizes"]
    assert v3 == {"n_layers": 61, "n_heads": 128, "kv_lora_rank": 512, "rope_dim": 64, "head_dim": 192, "v_head_dim": 128}
    assert facts["v3_kv_bytes"] == {"MLA": 61 * (512 + 64) * 2, "MHA": 61 * 128 * (192 + 128) * 2}
    assert 71 < facts["v3_kv_bytes"]["MHA"] / facts["v3_kv_bytes"]["MLA"] < 71.2
    assert len(facts["mla_forms"]) == c["n_layers"]
    assert all(v < 1e-5 for r in facts["mla_forms"] for k, v in r.items() if k != "layer")  # measured: ≤ 6e-07
    breaks = facts["mla_breaks"]
    assert breaks["clean"]["relative max |Δlogit|"] == 0 and breaks["skip-kv-a-norm"]["relative max |Δlogit|"] > 0.01  # 0.84


def test_the_v3_routing_lesson_states_its_own_numbers(facts):
    """Section 6 on tiny-deepseek2: the example token's two chosen experts lie in its two surviving groups, their
    weights (unbiased, renormalised, × 2.5) are the engine's and sum to 2.5; the bias and the groups change the
    choice at some tokens; each of the three routing bugs moves the logits."""
    token = facts["v3_token"]
    assert len(token) == 8 and len({(r["layer"], r["position"]) for r in token}) == 1
    chosen = [r for r in token if r["chosen"]]
    assert len(chosen) == 2 and all(r["group kept"] for r in chosen)
    assert len({r["group"] for r in token if r["group kept"]}) == 2
    assert abs(sum(r["weight"] for r in chosen) - 2.5) < 1e-9
    assert all(abs(r["weight"] - r["engine weight"]) < 1e-5 for r in token)
    changes = facts["v3_changes"]
    assert all(r["max |weight − engine's|"] < 1e-5 for r in changes)
    # measured over the 32 (position, layer) pairs: the bias changes the choice at 12, the groups at 1, in all 13
    assert all(sum(r[k] for r in changes) > 0 for k in ("chosen ≠ plain top-k", "the bias changes it", "the groups change it"))
    # so the example is a token the group limit changes: an expert of the biased top-2 is out with its group
    assert any(r["biased top-k"] and not r["group kept"] for r in token)
    for name in ("probs-bias-in-weights", "no-group-limit", "no-routed-scaling"):  # measured: 0.05, 0.24, 0.32
        assert facts["v3_breaks"][name]["relative max |Δlogit|"] > 0.01, name


def test_the_sink_lesson_states_its_own_numbers(facts):
    """Section 7 on tiny-gpt-oss: at every step, layer and head the pattern plus the written-out sink share is 1, and
    that share is the engine's capture point and the attention frame's 1 − Σ weights; the sliding (even) layers
    give the keys past the window exactly 0, the full (odd) ones weight; both porting bugs move the logits."""
    n_layers, n_heads, window, steps, first = facts["sink_shape"]
    assert window == 4
    rows = facts["sink_frame"]
    assert len(rows) == n_layers * n_heads * steps
    assert sorted({r["position"] for r in rows}) == list(range(first, first + steps))
    for r in rows:
        assert abs(r["Σ pattern"] + r["sink share, written out"] - 1) < 1e-6, r
        assert abs(r["sink share"] - r["sink share, written out"]) < 1e-6 and 0 < r["sink share"] < 1, r
        assert r["layer kind"] == ("sliding" if r["layer"] % 2 == 0 else "full"), r
        if r["layer kind"] == "sliding":
            assert r["keys masked"] == r["keys"] - window and r["weight beyond the window"] == 0, r
        else:
            assert r["keys masked"] == 0 and r["weight beyond the window"] > 0, r
    assert facts["sink_recorded_gap"] < 1e-5  # the cached session's frame against the uncached capture
    assert [r["layer"] for r in facts["sink_summary"]] == list(range(n_layers))
    breaks = facts["sink_breaks"]
    assert sorted(breaks) == ["clean", "no-sliding-window", "sinks-dropped"]
    assert breaks["clean"]["relative max |Δlogit|"] == 0 and breaks["clean"]["tokens differ from step"] is None
    for name in ("sinks-dropped", "no-sliding-window"):
        assert breaks[name]["relative max |Δlogit|"] > 0.01, breaks[name]
