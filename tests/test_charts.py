"""Every chart builder on a real trace or compare result (tiny models): it returns an Altair chart whose spec holds
the data and encodings it claims (zeros kept, forward order, formats on axes and legends), and the app's notebook
runs headless as a script."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import altair as alt
import numpy as np
import polars as pl
import pytest
import torch
from conftest import load_model

from workbench import charts
from workbench.compare import compare
from workbench.dump import BLOCK_CHAIN, FINAL_CHAIN, ours
from workbench.errors import InputError
from workbench.probes import Capture
from workbench.session import Session
from workbench.trace import empty

ROOT = Path(__file__).resolve().parent.parent
GEMMA_PROMPT = "def add(a, b): return a + b"  # 13 tokens: past the tiny gemma3's sliding window of 8
# Columns that hold whole numbers: a tooltip may print them as they are.
COUNTS = {"step", "layer", "head", "position", "key", "index", "length", "n_tokens", "picks", "expert", "rank",
          "token_id", "nan", "inf", "row"}


@pytest.fixture(scope="module")
def trace(tiny_paths):
    model = load_model(tiny_paths["qwen3moe"])
    session = Session(model, model.tokenizer.encode("def add(a, b):"), path="both", probes=True, context=64)
    for _ in range(6):
        session.step()
    return session.trace()


@pytest.fixture(scope="module")
def gemma(tiny_paths):
    return load_model(tiny_paths["gemma3"])


@pytest.fixture(scope="module")
def gemma_trace(gemma):
    session = Session(gemma, gemma.tokenizer.encode(GEMMA_PROMPT), path="cached", probes=True, attention=True,
                      lens=True, context=64)
    for _ in range(3):
        session.step()
    return session.trace()


@pytest.fixture(scope="module")
def comparison(gemma):
    """Our engine against a dump of itself with the RoPE base planted wrong: it acts only in the global layer
    (5; the sliding ones have their own base), so most local errors are exactly 0 and two stand out."""
    ids = gemma.tokenizer.encode(GEMMA_PROMPT)
    dump = ours(gemma, ids, len(ids) - 1, breaks=frozenset({"rope-base-10k"}))
    return dump, compare(gemma, dump, suspects=False)


def _rows(chart) -> int:
    spec = chart.to_dict()
    datasets = spec.get("datasets", {})
    return sum(len(v) for v in datasets.values())


def _views(spec: dict) -> list[dict]:
    """Every single view of a spec (layers and concatenations opened), each with its rows under "rows"."""
    datasets = spec.get("datasets", {})
    found = []

    def walk(node: dict, data: dict | None) -> None:
        data = node.get("data", data)
        for key in ("layer", "hconcat", "vconcat"):
            for child in node.get(key, []):
                walk(child, data)
        if "spec" in node:
            walk(node["spec"], data)
        if "mark" in node:
            found.append({**node, "rows": datasets.get((data or {}).get("name"), [])})

    walk(spec, None)
    return found


def _titles(spec: dict) -> str:
    title = spec.get("title", "")
    if isinstance(title, dict):
        sub = title.get("subtitle", [])
        return " ".join([title.get("text", ""), *([sub] if isinstance(sub, str) else sub)])
    return title


def _tooltips(view: dict) -> list[dict]:
    tips = view.get("encoding", {}).get("tooltip", [])
    return tips if isinstance(tips, list) else [tips]


# --- every chart ----------------------------------------------------------------------------------------------

def _every_chart(trace, gemma_trace, comparison):
    n_experts = trace.meta["config"]["n_experts"]
    pieces = charts.sequence_pieces(gemma_trace.meta, gemma_trace.tokens)
    dump, result = comparison
    key = (0, "blocks.5.attn.q_rope")
    return [
        charts.kv_growth(trace.kv), charts.kv_positions(trace.kv),
        charts.qk_heatmap(trace.qk, 5, "q", alt.selection_point(fields=["layer", "head"])), charts.qk_over_steps(trace.qk, 1, 2),
        charts.routing_histogram(trace.routing, 1, n_experts), charts.routing_heatmap(trace.routing),
        charts.routing_last_token(trace.routing), charts.step_latency(trace.tokens), charts.tokens_per_s(trace.tokens),
        charts.equivalence(trace.equiv, trace.meta["equiv_tolerance"]), charts.layer_health(trace.layers),
        charts.attention_over_keys(gemma_trace.attention, 2, 0, 0, pieces), charts.attention_heads(gemma_trace.attention, 2, 0),
        charts.lens_grid(gemma_trace.lens, "prob"), charts.compare_heatmap(result.table(), 0, "local_error"),
        charts.compare_values(dump.tensors[key], dump.tensors[key] * 1.01),
    ]


def test_every_chart_has_data(trace, gemma_trace, comparison):
    for chart in _every_chart(trace, gemma_trace, comparison):
        assert _rows(chart) > 0, chart


def test_numbers_are_formatted_in_tooltips_and_legends(trace, gemma_trace, comparison):
    """No legend or tooltip prints a raw float (2.98359417915): quantitative colour legends and tooltips of
    measured (non-count) fields carry a format."""
    for chart in _every_chart(trace, gemma_trace, comparison):
        for view in _views(chart.to_dict()):
            for tip in _tooltips(view):
                if tip.get("type") == "quantitative" and tip["field"] not in COUNTS:
                    assert "format" in tip, (view.get("title"), tip)
            color = view.get("encoding", {}).get("color", {})
            color = color.get("condition", color) if "field" not in color else color
            if color.get("type") == "quantitative" and color.get("legend", {}) is not None:
                assert "format" in color.get("legend", {}) or "labelExpr" in color.get("legend", {}), color


def test_empty_frames_give_a_message_not_an_error(trace):
    assert _rows(charts.reference(trace.reference)) == 1  # the "switch it on" message
    assert _rows(charts.equivalence(trace.equiv.clear(), trace.meta["equiv_tolerance"])) == 1
    assert _rows(charts.attention_over_keys(empty("attention"), 0, 0, 0, [])) == 1
    assert _rows(charts.attention_heads(empty("attention"), 0, 0)) == 1
    assert _rows(charts.lens_grid(empty("lens"), "entropy")) == 1


# --- the new panels -------------------------------------------------------------------------------------------

def test_attention_over_keys_keeps_the_sliding_windows_zeros(gemma_trace):
    """At step 2 the newest token sits at position 14: a sliding layer (0) sees keys 7..14 only, the global
    layer (5) every key. Masked keys are in the data (as a grey column each), labelled with visible pieces."""
    pieces = charts.sequence_pieces(gemma_trace.meta, gemma_trace.tokens)
    n_prompt = len(gemma_trace.meta["prompt_ids"])
    newest = n_prompt + 2 - 1
    assert len(pieces) >= newest + 1
    spec = charts.attention_over_keys(gemma_trace.attention, 2, 0, 0, pieces).to_dict()
    masked, bars = _views(spec)
    assert [r["key"] for r in bars["rows"]] == list(range(newest + 1))
    window = gemma_trace.meta["config"]["sliding_window"]
    zeros = [r["key"] for r in bars["rows"] if r["weight"] == 0]
    assert zeros == list(range(newest + 1 - window))
    assert [r["key"] for r in masked["rows"]] == zeros and masked["mark"]["color"] == charts.ZERO_FILL
    assert {r["weight_text"] for r in masked["rows"]} == {"0 (masked)"}
    labels = bars["encoding"]["x"]["sort"]
    assert labels[0] == "0 def" and pieces[1].startswith(" ") and labels[1].startswith("1 ·")  # the space made visible
    assert {t["field"] for t in _tooltips(bars)} >= {"key", "piece", "weight_text"}
    assert "exactly 0" in spec["title"]

    (bars,) = _views(charts.attention_over_keys(gemma_trace.attention, 2, 5, 0, pieces).to_dict())
    weights = [r["weight"] for r in bars["rows"]]
    assert len(weights) == newest + 1 and min(weights) > 0 and math.isclose(sum(weights), 1.0, rel_tol=1e-4)


def test_attention_heads_is_heads_by_keys_with_zeros_grey(gemma_trace):
    cfg = gemma_trace.meta["config"]
    spec = charts.attention_heads(gemma_trace.attention, 2, 0).to_dict()
    (view,) = _views(spec)
    n_keys = len(gemma_trace.meta["prompt_ids"]) + 2
    assert len(view["rows"]) == cfg["n_heads"] * n_keys
    assert any(r["weight"] == 0 for r in view["rows"])
    enc = view["encoding"]
    assert enc["x"]["field"] == "key" and enc["y"]["field"] == "head"
    assert enc["color"]["value"] == charts.ZERO_FILL and enc["color"]["condition"]["test"] == "datum.weight > 0"


def test_lens_grid_draws_the_top_token_and_each_value_on_its_scale(gemma, gemma_trace):
    cfg = gemma_trace.meta["config"]
    for value, kind in [("prob", "linear"), ("entropy", "linear"), ("kl_to_final", "symlog")]:
        spec = charts.lens_grid(gemma_trace.lens, value, gemma.tokenizer.piece).to_dict()
        cells, text = _views(spec)
        assert len(cells["rows"]) == 3 * cfg["n_layers"]
        color = cells["encoding"]["color"]
        assert color["field"] == value and color["scale"]["type"] == kind and color["scale"]["domain"][0] == 0
        assert {t["field"] for t in _tooltips(cells)} >= {"prob", "entropy", "kl_to_final", "piece", "token_id"}
        row = text["rows"][0]
        assert row["cell"] == charts.chart_piece(gemma.tokenizer.piece(row["token_id"]), 6)
    assert _views(charts.lens_grid(gemma_trace.lens, "prob").to_dict())[0]["encoding"]["color"]["scale"]["domain"] == [0, 1.0]
    by_dict = _views(charts.lens_grid(gemma_trace.lens, "prob", {101: "hi"}).to_dict())[1]["rows"]
    assert {r["cell"] for r in by_dict if r["token_id"] == 101} <= {"hi"}
    with pytest.raises(InputError):
        charts.lens_grid(gemma_trace.lens, "logit")


def test_compare_heatmap_keeps_zeros_in_forward_order(comparison):
    _, result = comparison
    table = result.table()
    for error in ("local_error", "end_to_end_error"):
        spec = charts.compare_heatmap(table, 0, error).to_dict()
        (view,) = _views(spec)
        rows = view["rows"]
        assert len(rows) == table.filter(pl.col("step") == 0).height  # nothing dropped
        enc = view["encoding"]
        held = {r["point"] for r in rows}
        assert enc["x"]["sort"] == [p for p in (*BLOCK_CHAIN, *FINAL_CHAIN) if p in held]
        assert enc["x"]["sort"][:2] == ["attn_norm", "attn.q"] and enc["x"]["sort"][-2:] == ["final_norm", "logits"]
        assert enc["y"]["sort"][0] == "0" and enc["y"]["sort"][-1] == "final"
        floor = enc["color"]["condition"]["scale"]["domain"][0]
        zeros = [r for r in rows if r[error] == 0]
        assert zeros and all(r["log10"] == floor for r in zeros)
        assert all(r["local" if error == "local_error" else "end to end"] == "0" for r in zeros)
        assert "'0'" in enc["color"]["condition"]["legend"]["labelExpr"]
        out = [r["capture"] for r in rows if r["stands_out"]]
        assert sorted(out) == ["blocks.5.attn.k_rope", "blocks.5.attn.q_rope"] and rows[-len(out):] == [r for r in rows if r["stands_out"]]
        assert enc["stroke"]["condition"]["test"] == "datum.stands_out"
        assert {t["field"] for t in _tooltips(view)} >= {"local", "end to end", "cosine", "max_abs", "head", "row",
                                                          "local threshold", "stands_out", "kind"}
        (param,) = spec["params"]
        assert param["name"] == charts.COMPARE_SELECTION and param["select"] == {"type": "point", "fields": ["capture"]}
    mine = alt.selection_point(name="mine", fields=["capture"])
    assert charts.compare_heatmap(table, 1, "end_to_end", mine).to_dict()["params"][0]["name"] == "mine"
    with pytest.raises(InputError):
        charts.compare_heatmap(table, 0, "cosine")


def test_compare_values_shows_both_and_keeps_the_worst(comparison):
    dump, _ = comparison
    theirs = dump.tensors[(0, "blocks.5.attn.q_rope")].flatten()
    ours_values = theirs.clone()
    ours_values[123] += 5.0
    spec = charts.compare_values(theirs, ours_values, max_points=200).to_dict()
    diagonal, scatter, difference = _views(spec)
    assert len(scatter["rows"]) == 200 and 123 in {r["index"] for r in scatter["rows"]}
    assert scatter["encoding"]["x"]["field"] == "theirs" and scatter["encoding"]["y"]["field"] == "ours"
    assert diagonal["rows"][0]["theirs"] == diagonal["rows"][0]["ours"]  # the y = x line
    assert difference["encoding"]["y"]["field"] == "ours − theirs"
    assert f"200 of {theirs.numel():,}" in _titles(spec)
    small = charts.compare_values(np.arange(5.0), np.arange(5.0))
    assert len(_views(small.to_dict())[1]["rows"]) == 5
    with pytest.raises(InputError):
        charts.compare_values(np.zeros(3), np.zeros(4))


# --- polish of the existing charts ------------------------------------------------------------------------------

def test_prefill_is_off_the_decode_axes(trace):
    for chart in (charts.step_latency(trace.tokens), charts.tokens_per_s(trace.tokens)):
        spec = chart.to_dict()
        assert all(not r["prefill"] for v in _views(spec) for r in v["rows"])
        assert "prefill (cached)" in _titles(spec) and "not on this axis" in _titles(spec)


def test_equivalence_log_axis_is_one_style_and_labels_exact_zeros(trace):
    equiv = trace.equiv.with_columns(pl.when(pl.col("step") == 0).then(0.0).otherwise(pl.col("max_abs_diff")).alias("max_abs_diff"))
    spec = charts.equivalence(equiv, trace.meta["equiv_tolerance"]).to_dict()
    line = _views(spec)[0]
    axis = line["encoding"]["y"]["axis"]
    assert axis["format"] == "~e" and "'0'" in axis["labelExpr"]
    values = axis["values"]
    assert all(math.isclose(math.log10(v), round(math.log10(v))) for v in values)  # decades only: no crowding
    zero = next(r for r in line["rows"] if r["step"] == 0)
    assert zero["exact"] and zero["relative difference"] == "0" and zero["plotted"] == values[0]
    assert line["encoding"]["y"]["scale"]["domain"][0] < values[0]  # the zero's mark sits inside the plot


def test_step_axes_thin_their_labels_past_40_steps(trace):
    layers = pl.concat([trace.layers.with_columns(pl.col("step") + 6 * k) for k in range(10)])  # 60 steps
    heat = _views(charts.layer_health(layers).to_dict())[0]
    values = heat["encoding"]["x"]["axis"]["values"]
    assert len(values) <= 12 and values[:2] == [0, 5]
    assert charts._thinned(range(8)) == list(range(8))


def test_expert_colours_differ_between_neighbours(trace):
    n = trace.meta["config"]["n_experts"]
    scale = _views(charts.routing_last_token(trace.routing, n_experts=n).to_dict())[0]["encoding"]["color"]["scale"]
    assert scale["domain"] == list(range(n))

    def rgb(c: str) -> np.ndarray:
        return np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)

    colours = charts.EXPERT_COLORS
    assert len(set(colours)) == 20
    assert min(np.linalg.norm(rgb(a) - rgb(b)) for a, b in itertools.pairwise(colours)) > 90


def test_shared_gate_is_one_cell_per_position_and_layer(tiny_paths, trace):
    """tiny-qwen2moe, both paths: the heat map holds each (position, layer) the path computed once (the uncached
    path's latest step, which recomputes them all), gates in (0, 1) on a fixed 0..1 scale, the newest position's
    token in the tooltip; a model without a shared expert gets the message."""
    model = load_model(tiny_paths["qwen2moe"])
    session = Session(model, model.tokenizer.encode("def add(a, b):"), path="both", probes=True, context=64)
    for _ in range(3):
        session.step()
    t = session.trace()
    n_layers, n_positions = model.config.n_layers, len(session.ids) - 1  # the newest token is not fed yet
    pieces = charts.sequence_pieces(t.meta, t.tokens)
    for path in ("cached", "uncached"):
        (view,) = _views(charts.shared_gate(t.shared, path, pieces).to_dict())
        rows = view["rows"]
        assert sorted((r["position"], r["layer"]) for r in rows) == [(p, i) for p in range(n_positions) for i in range(n_layers)]
        assert all(0 < r["gate"] < 1 for r in rows)
        assert {r["path"] for r in rows} == {path}
        assert rows[-1]["piece"] == charts.chart_piece(pieces[rows[-1]["position"]])
        color = view["encoding"]["color"]
        assert color["scale"]["domain"] == [0, 1] and "format" in color["legend"]
        assert all("format" in tip for tip in _tooltips(view) if tip.get("type") == "quantitative" and tip["field"] not in COUNTS)
    cached = {(r["position"], r["layer"]): r["gate"] for r in _views(charts.shared_gate(t.shared, "cached").to_dict())[0]["rows"]}
    uncached = {(r["position"], r["layer"]): r["gate"] for r in _views(charts.shared_gate(t.shared, "uncached").to_dict())[0]["rows"]}
    assert cached.keys() == uncached.keys() and all(math.isclose(cached[k], uncached[k], abs_tol=1e-5) for k in cached)
    assert trace.shared.is_empty() and _rows(charts.shared_gate(trace.shared)) == 1  # tiny-qwen3moe: no shared expert

def test_kv_growth_and_arithmetic_set_an_mla_cache_beside_mha(tiny_paths, trace):
    """tiny-deepseek2, both paths: the chart adds what an MHA cache of the same model would hold at every step
    (positions × mha_bytes_per_token: n_heads × (head_dim + v) against the latent's kv_lora_rank + rope, 8× the
    cached bytes on the tiny file), and the arithmetic says it in numbers from the config; a model without MLA keeps
    its two layers and its K-and-V sentence."""
    model = load_model(tiny_paths["deepseek2"])
    c = model.config
    session = Session(model, model.tokenizer.encode("def add(a, b):"), path="both", probes=True, context=64)
    for _ in range(3):
        session.step()
    t = session.trace()
    mha = t.meta["mha_bytes_per_token"]
    assert mha == c.n_layers * c.n_heads * (c.head_dim + c.v_head_dim) * 4
    assert t.meta["kv_bytes_per_token"] == c.n_layers * (c.kv_lora_rank + c.rope_dim) * 4
    ratio = mha / t.meta["kv_bytes_per_token"]
    for path in ("cached", "uncached"):
        kv = t.kv.filter(pl.col("path") == path)
        area, capacity, line = _views(charts.kv_growth(t.kv, path, mha).to_dict())
        assert {r["step"] for r in area["rows"]} == {r["step"] for r in line["rows"]} == set(kv["step"].to_list())
        for r in line["rows"]:
            held = kv.filter(pl.col("step") == r["step"])
            assert r["MHA MiB"] == pytest.approx(int(held["length"].max()) * mha / 2**20)
            assert r["MHA MiB"] == pytest.approx(ratio * int((held["k_bytes"] + held["v_bytes"]).sum()) / 2**20)
        assert all("format" in tip for tip in _tooltips(line) if tip["field"] not in COUNTS)
        assert "MHA" in _titles(charts.kv_growth(t.kv, path, mha).to_dict())
    assert len(_views(charts.kv_growth(t.kv, "cached").to_dict())) == 2
    length = int(t.kv.filter(pl.col("path") == "cached")["length"].max())
    text = charts.kv_arithmetic(t.meta, length)
    layer_bytes = (c.kv_lora_rank + c.rope_dim) * 4
    for part in (f"one latent of {c.kv_lora_rank} + a RoPE key of {c.rope_dim}", f"**{layer_bytes:,} B** per position and layer",
                 f"{c.n_heads} heads × ({c.head_dim} + {c.v_head_dim}) × 4 bytes = {mha // c.n_layers:,} B", f"({ratio:.3g}× more)",
                 f"**{c.n_layers * layer_bytes:,} bytes per token**", f"{length * mha / 2**20:.2f} MiB here"):
        assert part in text, (part, text)
    assert "MLA" not in charts.kv_arithmetic(trace.meta, 10) and len(_views(charts.kv_growth(trace.kv).to_dict())) == 2


def test_sink_shares_are_one_minus_each_heads_weights(tiny_paths, gemma_trace):
    """tiny-gpt-oss with the attention frame on: at the latest step the heat map holds every (layer, head) once, its
    share 1 − the frame's Σ weights = the engine's attn.sink_share for that token (a forward of its own), in (0, 1)
    on a fixed 0..1 scale with the value written in each cell; the sliding (even) layers count the keys past the
    window of 4 as masked, the full ones none. With sinks-dropped every share is 0, and so (to rounding) on a model
    without sinks."""
    model = load_model(tiny_paths["gpt-oss"])
    c = model.config
    ids = model.tokenizer.encode(GEMMA_PROMPT)
    assert len(ids) > c.sliding_window
    session = Session(model, ids, path="cached", attention=True, context=64)
    for _ in range(3):
        session.step()
    t = session.trace()
    newest = len(ids) + 1  # step 2's newest token: the prompt's last position + 2
    cells, text = _views(charts.sink_shares(t.attention, 2).to_dict())
    rows = cells["rows"]
    assert sorted((r["layer"], r["head"]) for r in rows) == [(i, h) for i in range(c.n_layers) for h in range(c.n_heads)]
    cap = Capture(["*.attn.sink_share"])
    model.forward(torch.tensor(session.ids[: newest + 1]), 0, model.new_cache(newest + 1), cap)
    step = t.attention.filter(pl.col("step") == 2)
    for r in rows:
        weights = step.filter((pl.col("layer") == r["layer"]) & (pl.col("head") == r["head"]))["weight"]
        assert r["sink share"] == pytest.approx(1 - weights.sum(), abs=1e-9) and 0 < r["sink share"] < 1
        assert r["sink share"] == pytest.approx(float(cap.tensors[f"blocks.{r['layer']}.attn.sink_share"][newest, r["head"]]),
                                                abs=1e-5)
        assert r["keys"] == newest + 1
        assert r["keys masked"] == (newest + 1 - c.sliding_window if r["layer"] % 2 == 0 else 0)
    assert len(text["rows"]) == len(rows) and text["encoding"]["text"]["format"] == ".2f"
    color = cells["encoding"]["color"]
    assert color["scale"]["domain"] == [0, 1] and "format" in color["legend"]
    assert all("format" in tip for tip in _tooltips(cells) if tip.get("type") == "quantitative" and tip["field"] not in COUNTS)
    broken = Session(model, ids, path="cached", attention=True, context=64, breaks=frozenset({"sinks-dropped"}))
    broken.step()
    for frame in (broken.trace().attention, gemma_trace.attention):
        shares = [r["sink share"] for r in _views(charts.sink_shares(frame, 0).to_dict())[0]["rows"]]
        assert shares and max(abs(s) for s in shares) < 1e-5
    assert _rows(charts.sink_shares(empty("attention"), 0)) == 1


def test_layer_health_scales_colour_on_decode_steps(trace):
    spec = charts.layer_health(trace.layers, "cached").to_dict()
    heat = _views(spec)[0]
    scale = heat["encoding"]["color"]["scale"]
    decode = trace.layers.filter((pl.col("path") == "cached") & (pl.col("step") > 0))["resid_rms"]
    assert scale["domain"] == [decode.min(), decode.max()] and scale["clamp"] is True
    assert "decode steps" in _titles(spec)
    assert {r["colour"] for r in heat["rows"] if r["step"] == 0} <= {"prompt: within the decode scale", "prompt: clamped to the decode scale"}


# --- text -----------------------------------------------------------------------------------------------------

def test_token_html_shows_every_token_with_its_alternatives(trace):
    html = charts.token_html(trace.meta["prompt_pieces"], trace.meta["prompt_ids"], trace.tokens)
    assert html.count('class="tok"') + html.count('class="tok byte"') == len(trace.meta["prompt_ids"])
    assert html.count('class="tok gen') == 6  # "tok gen", or "tok gen byte" for a raw byte
    assert "top-k:" in html


def test_raw_bytes_show_as_hex_and_say_what_they_make(trace, tiny_paths):
    """Byte pieces (Tokenizer.piece spells a byte that is not UTF-8 alone "<0xE2>") are drawn as hex digits, and
    the hover of each says what its run of bytes decodes to: "—" for E2 80 94, "�" for a lone FF."""
    from workbench.model import Model

    tok = Model.load(tiny_paths["qwen3moe"]).tokenizer
    ids = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] in (0xE2, 0x80, 0x94, 0xFF)]
    by_byte = {tok.token_bytes(i)[0]: i for i in ids}
    pieces = [tok.piece(by_byte[b]) for b in (0xE2, 0x80, 0x94)] + ["x", tok.piece(by_byte[0xFF])]
    assert pieces[0] == "<0xE2>" and pieces[4] == "<0xFF>"
    html = charts.token_html(pieces, [by_byte[b] for b in (0xE2, 0x80, 0x94)] + [0, by_byte[0xFF]], trace.tokens.clear())
    assert html.count('class="tok byte"') == 4 and ">E2</span>" in html and "&lt;0xE2&gt;</span>" not in html
    assert html.count("beside it: &#x27;—&#x27;") == 3 and "beside it: &#x27;�&#x27;" in html


def test_chart_piece_makes_whitespace_visible():
    assert charts.chart_piece(" a\n\t") == "·a↵⇥" and charts.chart_piece("") == "∅" and charts.chart_piece("\x01") == "\\x01"
    assert charts.chart_piece("abcdefghij", 6) == "abcde…"


def test_speedup_and_kv_arithmetic(trace):
    assert charts.speedup(trace.tokens) > 0
    cfg = trace.meta["config"]
    text = charts.kv_arithmetic(trace.meta, 10)
    per_token = cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * 2 * 4
    assert f"{per_token:,} bytes per token" in text


def test_notebook_runs_headless():
    proc = subprocess.run([sys.executable, str(ROOT / "notebooks" / "workbench.py")], capture_output=True, text=True, check=False,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
