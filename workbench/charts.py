"""Altair charts from trace frames: one function per chart, frames in, chart out (no engine calls here).

Every builder takes the polars frames of a Trace (trace.py) and returns an `alt.Chart` (or a small layered /
concatenated chart); what a chart needs from the run (the primary path, the equivalence tolerance, the KV
sizes) it takes from the trace's metadata, where the session wrote it once. The app and the walkthrough only arrange what these return.
The compare charts take a `Comparison.table()` (compare.py) and two tensors' values the same way.

Numbers in legends and tooltips are formatted (NUMBER: three significant digits); exact zeros on a log scale are
drawn at the scale's floor and labelled "0", never dropped.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from workbench.dump import BLOCK_CHAIN, FINAL_CHAIN
from workbench.errors import InputError
from workbench.frames import PATHS

WIDTH = 320
HEIGHT = 180
MAX_WIDTH = 1100  # the widest a chart grows with its number of steps or keys
NUMBER = ".3~g"  # legends and tooltips: three significant digits, no trailing zeros
PATH_COLORS = alt.Scale(domain=list(PATHS), range=["#1f77b4", "#ff7f0e"])
# Vega's tableau20, reordered: its dark tones, then its light ones, each in an order where neighbouring experts'
# colours lie far apart (≥ 90 in RGB; tableau20 itself pairs each dark tone with its light one, so experts 0 and 1
# looked alike). Repeats past 20.
EXPERT_COLORS = ["#4c78a8", "#b79a20", "#d67195", "#54a24b", "#b279a2", "#439894", "#e45756", "#79706e", "#f58518",
                 "#9e765f", "#bab0ac", "#f2cf5b", "#fcbfd2", "#9ecae9", "#ff9d98", "#83bcb6", "#ffbf79", "#d6a5c9",
                 "#88d27a", "#d8b5a5"]
ZERO_FILL = "#e6e6e6"  # a cell or column whose value is exactly 0 (a masked key) where a colour scale cannot say so
COMPARE_SELECTION = "compare_cell"  # the name of compare_heatmap's point selection (one cell: its capture name)


def _count_x(field: str) -> alt.X:
    """An x axis of steps or positions: whole numbers only."""
    return alt.X(f"{field}:Q", axis=alt.Axis(tickMinStep=1, format="d"), title=field)


def _thinned(values: Sequence[int], most: int = 12) -> list[int]:
    """The values an ordinal axis labels: every 1st, 2nd, 5th, 10th, 20th, … so that at most `most` remain."""
    values = sorted(set(values))
    stride = 1
    while len(values) / stride > most:
        stride = stride * 5 // 2 if str(stride)[0] == "2" else stride * 2  # 1, 2, 5, 10, 20, 50, …
    return [v for v in values if v % stride == 0]


def _ordinal_axis(values: Sequence[int], title: str | None = None) -> alt.Axis:
    """An axis over bands of steps, layers or keys that stays readable past ~40 of them (thinned labels)."""
    return alt.Axis(values=_thinned(values), labelAngle=0, title=title)


def _layer_y(frame: pl.DataFrame) -> alt.Y:
    """Layers upwards (the last on top), labels thinned for deep models (30 layers in 180 pixels overlap)."""
    return alt.Y("layer:O", sort="descending", axis=_ordinal_axis(frame["layer"].unique().to_list(), "layer"))


def _number_text(value: float | None, spec: str = ".3g") -> str:
    """A tooltip's text for a measured number: "0" for an exact zero, "—" for none, nan/inf as such."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    return str(value) if not math.isfinite(value) else format(value, spec)


def _texts(values: pl.Series, spec: str = ".3g") -> pl.Series:
    return pl.Series([_number_text(v, spec) for v in values.to_list()], dtype=pl.String)


def _decades(low: float, high: float) -> list[float]:
    """Tick values for a log axis: one per power of ten from `low` to `high`, so labels never crowd."""
    return [10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]


def chart_piece(piece: str, limit: int = 12) -> str:
    """A token's text as a chart label: spaces as ·, newlines ↵, tabs ⇥, other control characters escaped,
    the empty piece ∅; cut to `limit` characters with …."""
    shown = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}
    text = "".join(shown.get(c, c if c.isprintable() else c.encode("unicode_escape").decode()) for c in piece) or "∅"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sequence_pieces(meta: dict, tokens: pl.DataFrame, path: str | None = None) -> list[str]:
    """The token at every position 0..: the prompt's pieces (meta["prompt_pieces"]), then each generated token
    of one path in position order. What attention_over_keys labels key positions with."""
    pieces = list(meta["prompt_pieces"])
    for row in _one_path(tokens, path or primary_path(meta, tokens)).sort("position").iter_rows(named=True):
        if row["position"] == len(pieces):
            pieces.append(row["piece"])
    return pieces


def primary_path(meta: dict | None, frame: pl.DataFrame | None = None) -> str:
    """The path whose rows a single-path chart shows: the one the session recorded (meta["primary_path"]).
    A trace written before that key existed: cached when the frame has it, else the path it has."""
    if meta and meta.get("primary_path"):
        return meta["primary_path"]
    paths = set(frame["path"].unique().to_list()) if frame is not None and "path" in frame.columns and frame.height else set()
    return "cached" if "cached" in paths or not paths else min(paths)


def _one_path(frame: pl.DataFrame, path: str | None) -> pl.DataFrame:
    if not frame.height:
        return frame
    return frame.filter(pl.col("path") == (path or primary_path(None, frame)))


def empty_chart(message: str) -> alt.Chart:
    return alt.Chart(pl.DataFrame({"text": [message]})).mark_text(size=13, color="#666").encode(
        text=alt.Text("text:N")).properties(width=WIDTH, height=60)


# --- generated text ---------------------------------------------------------------------------------------

def token_html(prompt_pieces: list[str], prompt_ids: list[int], tokens: pl.DataFrame, path: str | None = None,
               piece_of: Callable[[int], str] | None = None, element_id: str = "token-view") -> str:
    """The prompt and the generated tokens with visible boundaries; hovering a generated token shows its id,
    position, probability and the top-k alternatives (from the tokens frame's candidates), each with its text
    when `piece_of` (token id → piece, e.g. Tokenizer.piece) is given. `element_id` names the block (one page
    may show several: the A/B panel's two runs beside the live text). A raw byte (a byte-fallback token that is
    not UTF-8 on its own, "<0xE2>") is drawn dashed as its hex digits, and its hover says what it makes with the
    bytes beside it: a character, or "�" where they are not UTF-8 (a random model's output is mostly that)."""
    v = f"#{element_id}"
    style = (f"<style>{v}{{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9}}"
             f"{v} .tok{{border:1px solid #bbb;border-radius:3px;padding:0 1px;margin:0 1px}}"
             f"{v} .gen{{background:#e8f1fb;border-color:#7aa7d6}}"
             f"{v} .byte{{border-style:dashed;color:#777;font-size:0.8em}}"
             f"{v} .eos{{background:#fde2e2}}</style>")
    rows = list(_one_path(tokens, path).sort("step").iter_rows(named=True))
    pieces = list(prompt_pieces) + [row["piece"] for row in rows]
    bytes_note = _byte_runs(pieces)
    spans = []
    for i, (p, t) in enumerate(zip(prompt_pieces, prompt_ids)):
        tip = f"prompt token {i} · id {t}" + bytes_note.get(i, "")
        spans.append(f'<span class="tok{" byte" if i in bytes_note else ""}" title="{html.escape(tip)}">{_visible(p)}</span>')
    for k, row in enumerate(rows, start=len(prompt_pieces)):
        tip = f"id {row['token_id']} · position {row['position']}" + bytes_note.get(k, "")
        if row["top_ids"]:
            ids, probs = list(row["top_ids"]), list(row["top_probs"])
            chosen = probs[ids.index(row["token_id"])] if row["token_id"] in ids else None
            tip += f" · p = {chosen:.3f}" if chosen is not None else ""
            named = (lambda i: f"{i} {chart_piece(piece_of(i), 16)!r}") if piece_of is not None else str
            tip += "\ntop-k: " + ", ".join(f"{named(i)} ({p:.3f})" for i, p in zip(ids, probs))
        byte = " byte" if k in bytes_note else ""
        spans.append(f'<span class="tok gen{byte}" title="{html.escape(tip)}">{_visible(row["piece"])}</span>')
    return style + f'<div id="{element_id}">' + "".join(spans) + "</div>"


_BYTE_PIECE = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


def _byte_runs(pieces: list[str]) -> dict[int, str]:
    """For each piece that is raw bytes ("<0xE2>", Tokenizer.piece's spelling of bytes that are not UTF-8 on
    their own): a hover line saying what the run of byte pieces it belongs to decodes to."""
    notes: dict[int, str] = {}
    i = 0
    while i < len(pieces):
        if not _BYTE_PIECE.fullmatch(pieces[i]):
            i += 1
            continue
        j = i
        while j < len(pieces) and _BYTE_PIECE.fullmatch(pieces[j]):
            j += 1
        run = bytes(int(h, 16) for p in pieces[i:j] for h in re.findall(r"<0x([0-9A-Fa-f]{2})>", p))
        text = run.decode("utf-8", errors="replace")
        said = (f"with the byte(s) beside it: {text!r}" if "\ufffd" not in text else
                f"with the byte(s) beside it: {text!r} (� where the bytes are not UTF-8)")
        for k in range(i, j):
            notes[k] = f" · raw byte(s) {pieces[k]}, {said}"
        i = j
    return notes


def _visible(piece: str) -> str:
    if _BYTE_PIECE.fullmatch(piece):  # raw bytes: their hex digits ("E2 80"), drawn dashed (token_html)
        return " ".join(re.findall(r"<0x([0-9A-Fa-f]{2})>", piece))
    text = html.escape(piece)
    return text.replace("\n", "↵\n") if text.strip() else (text.replace(" ", "·").replace("\n", "↵\n") or "∅")


# --- KV cache -----------------------------------------------------------------------------------------------

def kv_growth(kv: pl.DataFrame, path: str | None = None, mha_bytes_per_token: int | None = None) -> alt.Chart:
    """Bytes held per layer over steps (stacked), with the cache's capacity as a rule. With mha_bytes_per_token (an
    MLA model: the trace's meta), also what an MHA cache of the same model would hold for as many positions."""
    df = _one_path(kv, path)
    if df.is_empty():
        return empty_chart("no steps yet")
    df = df.with_columns(((pl.col("k_bytes") + pl.col("v_bytes")) / 2**20).alias("MiB"))
    capacity = df.group_by("step").agg((pl.col("capacity_bytes").sum() / 2**20).alias("capacity MiB"))
    area = alt.Chart(df).mark_area(opacity=0.85).encode(
        x=_count_x("step"),
        y=alt.Y("sum(MiB):Q", title="K + V MiB", stack="zero"),
        color=alt.Color("layer:O", legend=None, scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("layer"), alt.Tooltip("length"), alt.Tooltip("k_bytes:Q", format=","),
                 alt.Tooltip("v_bytes:Q", format=","), alt.Tooltip("MiB:Q", format=".3f", title="K + V MiB")],
    )
    rule = alt.Chart(capacity).mark_line(strokeDash=[4, 3], color="#c00").encode(
        x=alt.X("step:Q"), y=alt.Y("capacity MiB:Q"), tooltip=[alt.Tooltip("step"), alt.Tooltip("capacity MiB:Q", format=".3f")])
    if mha_bytes_per_token is None:
        return (area + rule).properties(width=WIDTH, height=HEIGHT, title="KV bytes per layer (stacked) vs capacity (dashed)")
    mha = df.group_by("step").agg(pl.col("length").max()).with_columns(
        (pl.col("length") * mha_bytes_per_token / 2**20).alias("MHA MiB")).sort("step")
    line = alt.Chart(mha).mark_line(color="#555", strokeDash=[1, 2], strokeWidth=2).encode(
        x=alt.X("step:Q"), y=alt.Y("MHA MiB:Q"),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("length"), alt.Tooltip("MHA MiB:Q", format=".3f", title="MHA would hold, MiB")])
    return (area + rule + line).properties(width=WIDTH, height=HEIGHT, title=alt.TitleParams(
        "MLA latent cache per layer (stacked) vs capacity (dashed)", subtitle="grey dotted: what an MHA cache of the same model would hold",
        subtitleColor="#555", subtitleFontSize=10))


def kv_positions(kv: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """Positions filled per layer at the latest step: every layer should hold the same number."""
    df = _one_path(kv, path)
    if df.is_empty():
        return empty_chart("no steps yet")
    last = df.filter(pl.col("step") == df["step"].max())
    return alt.Chart(last).mark_bar().encode(
        x=alt.X("layer:O", axis=_ordinal_axis(last["layer"].to_list(), "layer")), y=alt.Y("length:Q", title="positions"),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("length"), alt.Tooltip("k_bytes:Q", format=","), alt.Tooltip("v_bytes:Q", format=",")],
    ).properties(width=WIDTH, height=HEIGHT, title="positions cached per layer (latest step)")


# --- QK norm --------------------------------------------------------------------------------------------------

def _heads_by_stage(df: pl.DataFrame) -> tuple[pl.DataFrame, alt.X]:
    """`df` (rows per layer, head and stage) with a "column" of "stage head", and the x axis that lays the
    pre-norm heads out, then the post-norm ones, labelled by head: one view, where a facet per stage would hide
    a selection from marimo (vega logs "Unrecognized signal name" at every redraw)."""
    heads = sorted(df["head"].unique().to_list())
    stages = [s for s in ("pre", "post") if s in set(df["stage"].to_list())]
    df = df.with_columns((pl.col("stage") + " " + pl.col("head").cast(pl.Utf8)).alias("column"))
    x = alt.X("column:O", sort=[f"{s} {h}" for s in stages for h in heads],
              axis=alt.Axis(labelExpr="split(datum.label, ' ')[1]", labelAngle=0, labelOverlap=True),
              title="head: " + " | ".join(f"{s}-norm" for s in stages))
    return df, x


def qk_heatmap(qk: pl.DataFrame, step: int, tensor: str, selection: alt.Parameter | None = None,
               path: str | None = None) -> alt.Chart:
    """layer × head RMS of q or k, before and after the per-head norm, at one step."""
    df = _one_path(qk, path).filter((pl.col("step") == step) & (pl.col("tensor") == tensor))
    if df.is_empty():  # with the selection all the same: a chart that gains or loses a signal between redraws
        empty = empty_chart("no QK statistics at this step")  # makes vega log "Unrecognized signal name"
        return empty.add_params(selection) if selection is not None else empty
    df, x = _heads_by_stage(df)
    chart = alt.Chart(df).mark_rect().encode(
        x=x,
        y=_layer_y(df),
        color=alt.Color("rms:Q", scale=alt.Scale(scheme="magma", type="log"), title=f"{tensor} RMS", legend=alt.Legend(format=NUMBER)),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("head"), alt.Tooltip("stage"), alt.Tooltip("rms:Q", format=".4f"), alt.Tooltip("max_abs:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title=f"{tensor}: RMS per layer × head at step {step}"
                                                   + (" (click a cell)" if selection is not None else ""))
    if selection is not None:
        chart = chart.add_params(selection).encode(opacity=alt.condition(selection, alt.value(1.0), alt.value(0.35)))
    return chart


def qk_over_steps(qk: pl.DataFrame, layer: int, head: int, path: str | None = None) -> alt.Chart:
    df = _one_path(qk, path).filter((pl.col("layer") == layer) & (pl.col("head") == head))
    if df.is_empty():
        return empty_chart(f"layer {layer}, head {head}: no data")
    df = df.with_columns((pl.col("tensor") + " " + pl.col("stage")).alias("series"))
    return alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("step"), y=alt.Y("rms:Q", title="RMS"), color=alt.Color("series:N", title=None),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("series"), alt.Tooltip("rms:Q", format=".4f"), alt.Tooltip("max_abs:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title=f"layer {layer}, head {head} over steps")


# --- Expert routing -------------------------------------------------------------------------------------------

def expert_scale(n_experts: int) -> alt.Scale:
    """Expert e's colour, the same in every chart whichever experts a frame holds: EXPERT_COLORS[e % 20]."""
    return alt.Scale(domain=list(range(n_experts)), range=[EXPERT_COLORS[e % len(EXPERT_COLORS)] for e in range(n_experts)])


def routing_histogram(routing: pl.DataFrame, layer: int, n_experts: int, path: str | None = None) -> alt.Chart:
    """How often each expert was picked at one layer, over all tokens so far."""
    df = _one_path(routing, path).filter(pl.col("layer") == layer)
    counts = pl.DataFrame({"expert": list(range(n_experts))}).join(
        df.group_by("expert").len("picks"), on="expert", how="left").fill_null(0)
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("expert:O", axis=_ordinal_axis(range(n_experts), "expert")), y=alt.Y("picks:Q"),
        color=alt.Color("expert:N", scale=expert_scale(n_experts), legend=None),
        tooltip=[alt.Tooltip("expert"), alt.Tooltip("picks")],
    ).properties(width=WIDTH, height=HEIGHT, title=f"expert picks at layer {layer}")


def routing_heatmap(routing: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """layer × expert pick counts over every step so far."""
    df = _one_path(routing, path).group_by("layer", "expert").len("picks")
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("expert:O"), y=_layer_y(df),
        color=alt.Color("picks:Q", scale=alt.Scale(scheme="blues"), legend=alt.Legend(format="d")),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("expert"), alt.Tooltip("picks")],
    ).properties(width=WIDTH, height=HEIGHT, title="picks per layer × expert (all steps)")


def routing_last_token(routing: pl.DataFrame, path: str | None = None, n_experts: int | None = None) -> alt.Chart:
    """The top-k experts and their (renormalised) weights for the newest token, per layer, each expert in its own
    colour (expert_scale; n_experts: the model's count, else the largest expert id seen + 1)."""
    df = _one_path(routing, path)
    if df.is_empty():
        return empty_chart("no routing recorded (a mixture-of-experts model records it)")
    last = df.filter(pl.col("step") == df["step"].max())
    last = last.filter(pl.col("position") == last["position"].max())
    return alt.Chart(last).mark_bar().encode(
        y=_layer_y(last), x=alt.X("weight:Q", stack="zero", title="router weight"),
        color=alt.Color("expert:N", scale=expert_scale(n_experts or int(df["expert"].max()) + 1)),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("rank"), alt.Tooltip("expert"), alt.Tooltip("weight:Q", format=".3f"), alt.Tooltip("router_entropy:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title="top-k weights of the newest token")


def shared_gate(shared: pl.DataFrame, path: str | None = None, pieces: Sequence[str] | None = None) -> alt.Chart:
    """layer × position heat map of a gated shared expert's gate σ(x·g) (the `shared` frame) on a fixed 0 … 1
    colour scale: how much of the shared expert each token gets. Each (position, layer) once, from the latest
    step that computed it (the uncached path recomputes every position at every step). pieces adds each
    position's token to the tooltip."""
    df = _one_path(shared, path)
    if df.is_empty():
        return empty_chart("no shared-expert gate recorded (a model with a gated shared expert records it)")
    df = df.sort("step").group_by("position", "layer").last().sort("layer", "position")
    if pieces is not None:
        df = df.with_columns(pl.Series("piece", [chart_piece(pieces[p]) if p < len(pieces) else "?" for p in df["position"].to_list()]))
    positions = df["position"].unique().to_list()
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("position:O", axis=_ordinal_axis(positions, "position")),
        y=_layer_y(df),
        color=alt.Color("gate:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]), title="gate",
                        legend=alt.Legend(format=".1f", values=[0, 0.5, 1])),
        tooltip=[alt.Tooltip("position"), *([alt.Tooltip("piece:N")] if pieces is not None else []), alt.Tooltip("layer"),
                 alt.Tooltip("step"), alt.Tooltip("gate:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title="shared expert's gate σ(x·g) per layer × position")


# --- Tokens/s ---------------------------------------------------------------------------------------------------

def _prefill_note(tokens: pl.DataFrame) -> list[str]:
    """The prefill written out, one line per path that ran one: it is kept off the decode charts' y axes (one
    batched forward over the whole prompt would flatten every decode step against it)."""
    return [f"prefill ({row['path']}): {row['n_tokens']} prompt tokens in {row['seconds'] * 1000:.4g} ms "
            f"= {row['n_tokens'] / row['seconds']:.4g} tokens/s (not on this axis)"
            for row in tokens.filter(pl.col("prefill")).sort("path").iter_rows(named=True) if row["seconds"] > 0]


def _title(text: str, notes: list[str]) -> alt.TitleParams | str:
    return alt.TitleParams(text, subtitle=notes, subtitleColor="#555", subtitleFontSize=10) if notes else text


def step_latency(tokens: pl.DataFrame) -> alt.Chart:
    """ms per generated token over position for each path. The cached path's prefill is written in the subtitle,
    off the y axis, so the decode steps use the whole axis."""
    if tokens.is_empty():
        return empty_chart("no steps yet")
    df = tokens.filter(~pl.col("prefill")).with_columns((pl.col("seconds") * 1000).alias("ms"))
    chart = alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("position"), y=alt.Y("ms:Q", title="ms per step"),
        color=alt.Color("path:N", scale=PATH_COLORS),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("position"), alt.Tooltip("path"), alt.Tooltip("n_tokens"),
                 alt.Tooltip("ms:Q", format=".2f"), alt.Tooltip("tokens_per_s:Q", format=".1f")],
    )
    return chart.properties(width=WIDTH, height=HEIGHT, title=_title("latency per decode step", _prefill_note(tokens)))


def tokens_per_s(tokens: pl.DataFrame) -> alt.Chart:
    """tokens/s of each decode step for each path; the prefill in the subtitle, off the axis (step_latency)."""
    if tokens.is_empty():
        return empty_chart("no steps yet")
    df = tokens.filter(~pl.col("prefill"))
    return alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("position"), y=alt.Y("tokens_per_s:Q", title="tokens/s"),
        color=alt.Color("path:N", scale=PATH_COLORS),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("position"), alt.Tooltip("path"), alt.Tooltip("tokens_per_s:Q", format=".1f")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title("tokens/s per decode step", _prefill_note(tokens)))


def speedup(tokens: pl.DataFrame, last: int = 8) -> float | None:
    """cached / uncached tokens/s over the last `last` decode steps both paths ran."""
    df = tokens.filter(~pl.col("prefill"))
    if df.is_empty() or df["path"].n_unique() < 2:
        return None
    recent = df.filter(pl.col("step") > df["step"].max() - last)
    rate = recent.group_by("path").agg(pl.col("tokens_per_s").mean())
    by_path = dict(zip(rate["path"], rate["tokens_per_s"]))
    if not by_path.get("uncached"):
        return None
    return by_path["cached"] / by_path["uncached"]


# --- Equivalence, layers, reference -----------------------------------------------------------------------------

def equivalence(equiv: pl.DataFrame, threshold: float | None) -> alt.Chart:
    """max |Δlogit| / max |logit| per step (log scale), cached vs uncached, with the threshold the model's
    arithmetic allows as a dashed rule: the trace's meta["equiv_tolerance"] (workbench.loading.equivalence_tolerance);
    None (a trace written before it was recorded): no rule. A step whose logits agree exactly is drawn as ▼ on
    the axis's floor (a decade below the smallest difference), which is labelled "0"."""
    if equiv.is_empty():
        return empty_chart("run with path 'both' to compare the paths")
    df = equiv.with_columns((pl.col("max_abs_diff") / pl.col("max_abs_logit")).alias("relative"))
    nonzero = df.filter(pl.col("relative") > 0)["relative"]
    smallest = min([*nonzero.to_list(), *([threshold] if threshold else [])], default=1e-6)
    floor = 10.0 ** (math.floor(math.log10(smallest)) - 1)
    top = max([*nonzero.to_list(), *([threshold] if threshold else []), floor * 10])
    df = df.with_columns(
        pl.when(pl.col("relative") > 0).then(pl.col("relative")).otherwise(floor).alias("plotted"),
        (pl.col("relative") == 0).alias("exact"),
        pl.when(pl.col("argmax_equal")).then(pl.lit("same")).otherwise(pl.lit("different")).alias("argmax"),
        _texts(df["relative"]).alias("relative difference"), _texts(df["max_abs_diff"]).alias("max |Δlogit|"),
    )
    y_axis = alt.Axis(values=_decades(floor, top), format="~e", labelExpr=f"datum.value <= {floor * 1.5!r} ? '0' : datum.label")
    points = alt.Chart(df).mark_line(color="#888").encode(
        # The domain reaches a little past the floor and the top decade, so no mark sits half outside the plot.
        x=_count_x("step"), y=alt.Y("plotted:Q", scale=alt.Scale(type="log", domain=[floor / 2, _decades(floor, top)[-1] * 2]),
                                    axis=y_axis, title="max |Δlogit| / max |logit|"),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("relative difference:N"), alt.Tooltip("max |Δlogit|:N"),
                 alt.Tooltip("cosine:Q", format=".6f"), alt.Tooltip("argmax")],
    )
    marks = alt.Chart(df).mark_point(filled=True, size=70, opacity=1).encode(
        x=alt.X("step:Q"), y=alt.Y("plotted:Q"),
        color=alt.Color("argmax:N", scale=alt.Scale(domain=["same", "different"], range=["#2a9d8f", "#d62828"])),
        shape=alt.Shape("exact:N", scale=alt.Scale(domain=[False, True], range=["circle", "triangle-down"]),
                        legend=alt.Legend(title="exactly equal", labelExpr="datum.value ? 'yes (at 0)' : 'no'")),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("relative difference:N"), alt.Tooltip("max |Δlogit|:N"),
                 alt.Tooltip("cosine:Q", format=".6f"), alt.Tooltip("argmax")],
    )
    layers = points + marks
    if threshold is not None:
        layers += alt.Chart(pl.DataFrame({"threshold": [threshold]})).mark_rule(strokeDash=[4, 3], color="#c00").encode(
            y=alt.Y("threshold:Q"), tooltip=[alt.Tooltip("threshold:Q", format=".2e")])
    return layers.properties(width=WIDTH, height=HEIGHT, title="cached vs uncached logits per step (▼ on 0 = exactly equal)")


def layer_health(layers: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """Residual RMS per layer per step; a red cross where a layer's output first holds NaN/Inf. The colour scale
    spans the decode steps only (step ≥ 1, one row each): step 0 is the whole prompt, whose first positions'
    large residuals would wash the scale out, so its cells are clamped to the decode range (the tooltip says so).
    With only the prompt run so far, the scale spans it."""
    df = _one_path(layers, path)
    if df.is_empty():
        return empty_chart("no steps yet")
    df = df.with_columns(((pl.col("nan") + pl.col("inf")) > 0).alias("bad"),
                         pl.when(pl.col("resid_rms").is_finite() & (pl.col("resid_rms") > 0)).then(pl.col("resid_rms")).otherwise(None).alias("rms"))
    decode = df.filter(pl.col("step") > 0)["rms"].drop_nulls()
    scaled_on = decode if decode.len() else df["rms"].drop_nulls()
    low, high = (scaled_on.min(), scaled_on.max()) if scaled_on.len() else (1.0, 10.0)
    high = high if high > low else low * 1.01
    df = df.with_columns(
        pl.when(pl.col("step") > 0).then(pl.lit("decode step (on the scale)"))
        .when(pl.col("rms").is_between(low, high)).then(pl.lit("prompt: within the decode scale"))
        .otherwise(pl.lit("prompt: clamped to the decode scale")).alias("colour"))
    steps = df["step"].unique().to_list()
    x = alt.X("step:O", axis=_ordinal_axis(steps, "step"))
    heat = alt.Chart(df).mark_rect().encode(
        x=x, y=_layer_y(df),
        color=alt.Color("rms:Q", scale=alt.Scale(scheme="viridis", type="log", domain=[low, high], clamp=True),
                        title="residual RMS", legend=alt.Legend(format=NUMBER, values=[low, math.sqrt(low * high), high])),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("layer"), alt.Tooltip("resid_rms:Q", format=".3f"), alt.Tooltip("resid_max_abs:Q", format=".3f"),
                 alt.Tooltip("nan"), alt.Tooltip("inf"), alt.Tooltip("colour:N")],
    )
    first_bad = df.filter(pl.col("bad")).group_by("step").agg(pl.col("layer").min())
    cross = alt.Chart(first_bad).mark_text(text="✕", color="red", size=16).encode(x=x, y=_layer_y(df))
    notes = ["colour scaled on the decode steps; step 0 (the prompt) clamped to them" if decode.len() else
             "colour scaled on the prompt (no decode steps yet)", "✕ = first layer holding NaN/Inf"]
    return (heat + cross).properties(width=WIDTH, height=HEIGHT, title=_title("residual stream RMS", notes))


def reference(ref: pl.DataFrame) -> alt.Chart:
    if ref.is_empty():
        return empty_chart("choose a reference (llama.cpp, or llama.cpp-f32: exact) to compare")
    df = ref.with_columns(pl.when(pl.col("top1_equal")).then(pl.lit("same")).otherwise(pl.lit("different")).alias("top-1"))
    return alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("step"), y=alt.Y("cosine:Q", scale=alt.Scale(zero=False), title="cosine(ours, llama.cpp)"),
        color=alt.Color("top-1:N", scale=alt.Scale(domain=["same", "different"], range=["#2a9d8f", "#d62828"])),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("position"), alt.Tooltip("cosine:Q", format=".5f"), alt.Tooltip("top-1")],
    ).properties(width=WIDTH, height=HEIGHT, title="logits vs llama.cpp on the same tokens")


# --- Attention and the logit lens (the attention and lens frames) ----------------------------------------------

def _attention_rows(attention: pl.DataFrame, step: int, layer: int, path: str | None) -> pl.DataFrame:
    df = _one_path(attention, path).filter((pl.col("step") == step) & (pl.col("layer") == layer))
    return df.with_columns(_texts(df["weight"], ".4g").replace("0", "0 (masked)").alias("weight_text"),
                           (pl.col("weight") == 0).alias("zero"))


def attention_over_keys(attention: pl.DataFrame, step: int, layer: int, head: int, pieces: Sequence[str] | None = None,
                        path: str | None = None) -> alt.LayerChart | alt.Chart:
    """The newest token's attention weights over key positions 0..its own, for one layer and head at one step:
    a bar per key, labelled "position piece" (pieces: the token at each position, e.g. sequence_pieces; None:
    positions only). A key whose weight is exactly 0 (masked: outside a sliding window) is a grey column, so a
    window reads as a grey run and an attention sink as a tall bar at its start."""
    df = _attention_rows(attention, step, layer, path).filter(pl.col("head") == head).sort("key")
    if df.is_empty():
        return empty_chart(f"no attention pattern at step {step}, layer {layer}, head {head} (run with attention on)")
    keys = df["key"].to_list()
    shown = [chart_piece(pieces[k]) if pieces is not None and k < len(pieces) else "?" for k in keys]
    labels = [f"{k} {p}" if pieces is not None else str(k) for k, p in zip(keys, shown)]
    df = df.with_columns(pl.Series("label", labels), pl.Series("piece", shown))
    width = min(MAX_WIDTH, max(WIDTH, 14 * len(keys)))
    x = alt.X("label:N", sort=labels, title="key position · token",
              axis=alt.Axis(labelAngle=-60, labelLimit=90, labels=width / len(keys) >= 9))
    tooltip = [alt.Tooltip("key:Q", title="key position"), alt.Tooltip("piece:N"), alt.Tooltip("weight_text:N", title="weight")]
    masked = alt.Chart(df.filter(pl.col("zero"))).mark_rect(color=ZERO_FILL).encode(
        x=x, y=alt.value(0), y2=alt.value(HEIGHT), tooltip=tooltip)
    bars = alt.Chart(df).mark_bar(color="#4c78a8").encode(
        x=x, y=alt.Y("weight:Q", title="attention weight"), tooltip=tooltip)
    zeros = int(df["zero"].sum())
    note = f"; grey = exactly 0 ({zeros} masked keys)" if zeros else ""
    return (masked + bars if zeros else bars).properties(
        width=width, height=HEIGHT, title=f"layer {layer}, head {head}, step {step}: newest token's attention{note}")


def attention_heads(attention: pl.DataFrame, step: int, layer: int, path: str | None = None,
                    pieces: Sequence[str] | None = None, selection: alt.Parameter | None = None) -> alt.Chart:
    """heads × key positions of one layer at one step: the newest token's weight on each key (sqrt colour scale,
    so small weights show); exact zeros (masked keys) grey. pieces adds each key's token to the tooltip;
    `selection` (a point selection on "head") lets a click pick a head."""
    df = _attention_rows(attention, step, layer, path).sort("head", "key")
    if df.is_empty():
        empty = empty_chart(f"no attention pattern at step {step}, layer {layer} (run with attention on)")
        return empty.add_params(selection) if selection is not None else empty  # the same signals at every redraw
    keys = sorted(df["key"].unique().to_list())
    if pieces is not None:
        df = df.with_columns(pl.Series("piece", [chart_piece(pieces[k]) if k < len(pieces) else "?" for k in df["key"].to_list()]))
    n_heads = df["head"].n_unique()
    top = float(df["weight"].max()) or 1.0
    tooltip = [alt.Tooltip("head"), alt.Tooltip("key:Q", title="key position"),
               *([alt.Tooltip("piece:N")] if pieces is not None else []), alt.Tooltip("weight_text:N", title="weight")]
    chart = alt.Chart(df).mark_rect().encode(
        x=alt.X("key:O", axis=_ordinal_axis(keys, "key position")),
        y=alt.Y("head:O"),
        color=alt.condition("datum.weight > 0", alt.Color("weight:Q", scale=alt.Scale(scheme="viridis", type="sqrt", domain=[0, top]),
                                                          title="weight", legend=alt.Legend(format=".2~f")), alt.value(ZERO_FILL)),
        tooltip=tooltip,
    ).properties(width=min(MAX_WIDTH, max(WIDTH, 8 * len(keys))), height=max(60, 16 * n_heads),
                 title=f"layer {layer} at step {step}: each head's attention over keys (grey = exactly 0: masked)"
                       + ("; click a head" if selection is not None else ""))
    if selection is not None:
        chart = chart.add_params(selection)
    return chart


def sink_share_table(attention: pl.DataFrame, path: str | None = None) -> pl.DataFrame:
    """Per step, layer and head of an `attention` frame (the newest token's weights over keys 0..its own): the
    weights' sum, the share an attention sink took, 1 − that sum (gpt-oss: each head's learned sink logit joins
    the softmax and weighs no value; without sinks 0 up to rounding), and how many of its keys have weight
    exactly 0 (masked: outside a sliding window)."""
    return _one_path(attention, path).group_by("step", "path", "layer", "head").agg(
        pl.col("weight").sum().alias("Σ weights"), (pl.col("weight") == 0).sum().cast(pl.Int64).alias("keys masked"),
        pl.len().cast(pl.Int64).alias("keys"),
    ).with_columns((1 - pl.col("Σ weights")).alias("sink share")).sort("step", "path", "layer", "head")


def sink_shares(attention: pl.DataFrame, step: int, path: str | None = None) -> alt.LayerChart | alt.Chart:
    """layer × head heat map of the share each head's attention sink takes of the newest token's softmax at one
    step (sink_share_table: 1 − Σ weights) on a fixed 0 … 1 colour scale, each cell's value written in it when
    there are at most 16 heads; the tooltip adds the keys the layer masked (a sliding window's, once the
    sequence is longer than it)."""
    df = sink_share_table(attention, path).filter(pl.col("step") == step)
    if df.is_empty():
        return empty_chart(f"no attention pattern at step {step} (run with attention on)")
    heads = df["head"].unique().to_list()
    x, y = alt.X("head:O", axis=_ordinal_axis(heads, "head")), _layer_y(df)
    tooltip = [alt.Tooltip("layer"), alt.Tooltip("head"), alt.Tooltip("step"), alt.Tooltip("sink share:Q", format=".3f"),
               alt.Tooltip("Σ weights:Q", format=".3f", title="Σ weights over keys"),
               alt.Tooltip("keys:Q", format="d"), alt.Tooltip("keys masked:Q", format="d")]
    cells = alt.Chart(df).mark_rect().encode(
        x=x, y=y, tooltip=tooltip,
        color=alt.Color("sink share:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1], clamp=True), title="sink share",
                        legend=alt.Legend(format=".1f", values=[0, 0.5, 1])))
    chart = cells
    if len(heads) <= 16:
        chart = cells + alt.Chart(df).mark_text(fontSize=9).encode(
            x=x, y=y, tooltip=tooltip, text=alt.Text("sink share:Q", format=".2f"),
            color=alt.condition("datum['sink share'] < 0.5", alt.value("white"), alt.value("black")))
    return chart.properties(width=min(MAX_WIDTH, max(WIDTH // 2, 28 * len(heads))), height=max(60, 22 * df["layer"].n_unique()),
                            title=f"step {step}: the sink's share of each head's attention (1 − Σ weights)")


# What each lens value is drawn with: a scale and a title (entropy's domain ends at the largest entropy drawn).
LENS_VALUES = {
    "prob": ("top-1 probability", "blues", "linear"),
    "entropy": ("entropy (nats)", "oranges", "linear"),
    "kl_to_final": ("KL(final ‖ layer), nats", "purples", "symlog"),
}


def lens_grid(lens: pl.DataFrame, value: str = "prob",
              piece_of: Callable[[int], str] | Mapping[int, str] | None = None, path: str | None = None) -> alt.LayerChart | alt.Chart:
    """The logit lens, layers × steps: each cell is a layer's top-1 next token (its piece, from piece_of: a
    function of the token id such as Tokenizer.piece, or a dict; None: the id), coloured by `value`:
    "prob" (0..1), "entropy" (nats, 0..the largest drawn) or "kl_to_final" (KL(final ‖ layer) in nats, symlog
    so the last layer's 0 and large early KLs both read). The tooltip holds all three. Past 32 steps the cells
    are too narrow for text: colour and tooltip only."""
    if value not in LENS_VALUES:
        raise InputError(f"lens_grid value {value!r}: choose one of {', '.join(LENS_VALUES)}.")
    df = _one_path(lens, path)
    if df.is_empty():
        return empty_chart("no logit lens recorded (run with lens on)")
    lookup = piece_of.get if isinstance(piece_of, Mapping) else piece_of
    ids = df["token_id"].to_list()
    names = {t: lookup(t) if lookup is not None else None for t in set(ids)}  # each id decoded once
    pieces = [str(t) if names[t] is None else names[t] for t in ids]
    title, scheme, kind = LENS_VALUES[value]
    top = float(df[value].max()) if value != "prob" else 1.0
    top = top if top > 0 else 1.0
    # How far along its scale each cell's colour is, to write dark cells' text in white.
    along = (pl.col(value) / top) if kind == "linear" else (pl.col(value).log1p() / math.log1p(top))
    df = df.with_columns(pl.Series("piece", [chart_piece(p) for p in pieces]), pl.Series("cell", [chart_piece(p, 6) for p in pieces]),
                         (along > 0.6).alias("dark"))
    steps = df["step"].unique().to_list()
    show_text = len(steps) <= 32
    width = min(MAX_WIDTH, max(WIDTH, (38 if show_text else 12) * len(steps)))
    x = alt.X("step:O", axis=_ordinal_axis(steps, "step"))
    y = alt.Y("layer:O", sort="descending")
    tooltip = [alt.Tooltip("step"), alt.Tooltip("layer"), alt.Tooltip("token_id"), alt.Tooltip("piece:N"),
               alt.Tooltip("prob:Q", format=".3f"), alt.Tooltip("entropy:Q", format=".3f", title="entropy (nats)"),
               alt.Tooltip("kl_to_final:Q", format=".3~g", title="KL to final (nats)")]
    cells = alt.Chart(df).mark_rect().encode(
        x=x, y=y, tooltip=tooltip,
        color=alt.Color(f"{value}:Q", title=title, scale=alt.Scale(scheme=scheme, type=kind, domain=[0, top]),
                        legend=alt.Legend(format=".2~f" if value == "prob" else NUMBER)))
    chart = cells
    if show_text:
        chart = cells + alt.Chart(df).mark_text(fontSize=9).encode(
            x=x, y=y, text=alt.Text("cell:N"), tooltip=tooltip,
            color=alt.condition("datum.dark", alt.value("white"), alt.value("black")))
    return chart.properties(width=width, height=max(HEIGHT // 2, 18 * df["layer"].n_unique()),
                            title=f"logit lens: each layer's top-1 next token, colour = {title}")


# --- Compare (a Comparison's table, compare.py) --------------------------------------------------------------

ERRORS = {"local_error": "local error", "end_to_end_error": "end-to-end error"}


def compare_selection() -> alt.Parameter:
    """The point selection compare_heatmap adds when none is passed: one cell, by its capture name, which holds
    the layer ("blocks.3.attn.q"). Not by the layer column too: final_norm and logits have none (null), and a
    null matches nothing when marimo filters the chart's rows by the selection."""
    return alt.selection_point(name=COMPARE_SELECTION, fields=["capture"])


def compare_heatmap(table: pl.DataFrame, step: int, error: str = "local_error",
                    selection: alt.Parameter | None = None) -> alt.Chart:
    """log10 of one error ("local_error" or "end_to_end_error"; "local" / "end_to_end" too) per layer × capture
    point at one step of a Comparison.table(): columns in forward order (dump.BLOCK_CHAIN, the points the table
    holds), rows layer 0 down to the last, then a "final" row holding final_norm and logits at the right end.
    An exact 0 is drawn at the colour scale's floor (a decade below the smallest error, labelled "0"; the tooltip
    says "0"); nan and inf at the top; a point not measured (statistics only: no local error) is grey; a point
    that stands out is outlined red. A point selection named COMPARE_SELECTION (compare_selection(); or the
    `selection` passed) picks a cell: mo.ui.altair_chart's value is then that cell's row (the table's columns
    and the chart's own: point, block, log10, the error texts)."""
    column = error if error in ERRORS else f"{error}_error"
    if column not in ERRORS:
        raise InputError(f"compare_heatmap error {error!r}: choose local_error or end_to_end_error.")
    df = table.filter(pl.col("step") == step)
    if df.is_empty():
        return empty_chart(f"no compared points at step {step}")
    df = df.with_columns(pl.col("capture").str.replace(r"^blocks\.\d+\.", "").alias("point"),
                         pl.when(pl.col("layer").is_null()).then(pl.lit("final")).otherwise(pl.col("layer").cast(pl.String)).alias("block"))
    held = set(df["point"].to_list())
    points = [p for p in (*BLOCK_CHAIN, *FINAL_CHAIN) if p in held]
    rows = [str(layer) for layer in sorted(df["layer"].drop_nulls().unique().to_list())] + (["final"] if "final" in df["block"].to_list() else [])
    v = pl.col(column)
    finite = df.filter(v.is_finite() & (v > 0))[column]
    floor = math.floor(math.log10(finite.min())) - 1 if finite.len() else -9
    top = max(math.ceil(math.log10(finite.max())) if finite.len() else floor + 1, floor + 1)
    # Every cell gets a number (Vega-Lite drops a mark whose colour field is null): nan and inf at the top,
    # an exact 0 at the floor; a point not measured is painted grey by `measured` instead.
    df = df.with_columns(
        pl.when(v.is_null()).then(floor).when(v.is_nan() | v.is_infinite()).then(top).when(v <= 0).then(floor)
        .otherwise(v.log10()).cast(pl.Float64).alias("log10"),
        v.is_not_null().alias("measured"),
        _texts(df["local_error"]).alias("local"), _texts(df["end_to_end_error"]).alias("end to end"),
        _texts(df["threshold"]).alias("local threshold"),
    ).sort("stands_out")  # outlined cells drawn last, so their neighbours do not cover the outline
    selection = selection if selection is not None else compare_selection()
    legend = alt.Legend(values=list(range(floor, top + 1)), labelExpr=f"datum.value <= {floor} ? '0' : '1e' + datum.value")
    chart = alt.Chart(df).mark_rect().encode(
        x=alt.X("point:N", sort=points, title="capture point (forward order)", axis=alt.Axis(labelAngle=-50)),
        y=alt.Y("block:N", sort=rows, title="layer"),
        color=alt.condition("datum.measured", alt.Color("log10:Q", title=f"log10 {ERRORS[column]}", legend=legend,
                                                              scale=alt.Scale(scheme="viridis", domain=[floor, top])),
                            alt.value(ZERO_FILL)),
        stroke=alt.condition("datum.stands_out", alt.value("#e4002b"), alt.value(None)),
        strokeWidth=alt.condition("datum.stands_out", alt.value(3), alt.value(0)),
        opacity=alt.condition(selection, alt.value(1.0), alt.value(0.4)),
        tooltip=[alt.Tooltip("capture:N"), alt.Tooltip("kind:N"), alt.Tooltip("step"), alt.Tooltip("layer"),
                 alt.Tooltip("local:N", title="local error"), alt.Tooltip("end to end:N", title="end-to-end error"),
                 alt.Tooltip("local threshold:N"), alt.Tooltip("stands_out:N", title="stands out"),
                 alt.Tooltip("cosine:Q", format=".6f"), alt.Tooltip("max_abs:Q", format=NUMBER, title="max |Δ|"),
                 alt.Tooltip("head"), alt.Tooltip("row", title="sequence row")],
    ).add_params(selection)
    return chart.properties(width=max(WIDTH, 22 * len(points)), height=max(HEIGHT // 2, 18 * len(rows)),
                            title=f"log10 {ERRORS[column]} at step {step} (red outline = stands out; click a cell)")


def _values(x: Any) -> np.ndarray:
    """One tensor's values, flattened, as float64: a numpy array, a list, or a torch tensor of any dtype."""
    if hasattr(x, "detach"):  # torch; bfloat16 has no numpy dtype, so through float32
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def compare_values(theirs: Any, ours: Any, max_points: int = 2000) -> alt.HConcatChart | alt.Chart:
    """One tensor's numbers side by side (their engine's and ours, flattened in the same order): left, ours
    against theirs with the y = x line (agreement lies on it, a bug leaves it); right, ours − theirs over the flat
    index (where in the tensor: which heads, which rows). Past max_points values: evenly spaced ones plus the
    quarter of the budget with the largest |ours − theirs|, so the worst are always drawn. Non-finite values
    cannot be drawn: the subtitle counts them."""
    a, b = _values(theirs), _values(ours)
    if a.shape != b.shape:
        raise InputError(f"compare_values: theirs has {a.size} values and ours {b.size}; give one tensor's values from each.")
    if a.size == 0:
        return empty_chart("no values")
    n = a.size
    diff = b - a
    index = np.arange(n)
    if n > max_points:
        size = np.where(np.isfinite(diff), np.abs(diff), np.inf)
        worst = np.argsort(-size, kind="stable")[: max_points // 4]
        rest = np.setdiff1d(np.arange(n), worst)
        index = np.union1d(worst, rest[np.linspace(0, rest.size - 1, max_points - worst.size).round().astype(np.int64)])
    bad = ~(np.isfinite(a) & np.isfinite(b))
    keep = index[~bad[index]]
    df = pl.DataFrame({"index": keep, "theirs": a[keep], "ours": b[keep], "ours − theirs": diff[keep]})
    ok = ~bad
    scale = float(np.linalg.norm(a[ok])) if ok.any() else 0.0
    rel = float(np.linalg.norm(diff[ok])) / scale if scale > 0 else (0.0 if not np.any(diff[ok]) else math.inf)
    notes = [f"{keep.size:,} of {n:,} values drawn" + (" (evenly spaced + the largest differences)" if n > max_points else ""),
             (f"max |ours − theirs| = {_number_text(float(np.abs(diff[ok]).max()) if ok.any() else None)}, "
              f"relative L2 = {_number_text(rel)}")]
    if bad.any():
        notes.append(f"{int(bad.sum()):,} non-finite values not drawn (first at index {int(np.argmax(bad))})")
    tooltip = [alt.Tooltip("index:Q"), alt.Tooltip("theirs:Q", format=".6~g"), alt.Tooltip("ours:Q", format=".6~g"),
               alt.Tooltip("ours − theirs:Q", format=".3~e")]
    if df.is_empty():
        return empty_chart(notes[-1])
    low, high = float(min(df["theirs"].min(), df["ours"].min())), float(max(df["theirs"].max(), df["ours"].max()))
    diagonal = alt.Chart(pl.DataFrame({"theirs": [low, high], "ours": [low, high]})).mark_line(
        strokeDash=[4, 3], color="#c00").encode(x="theirs:Q", y="ours:Q")
    scatter = alt.Chart(df).mark_circle(size=14, opacity=0.6, color="#4c78a8").encode(
        x=alt.X("theirs:Q"), y=alt.Y("ours:Q"), tooltip=tooltip)
    difference = alt.Chart(df).mark_circle(size=10, color="#e45756").encode(
        x=alt.X("index:Q", title="flat index", axis=alt.Axis(format="d")),
        y=alt.Y("ours − theirs:Q", axis=alt.Axis(format="~e") if float(df["ours − theirs"].abs().max()) < 1e-3 else alt.Axis()),
        tooltip=tooltip)
    return alt.hconcat((diagonal + scatter).properties(width=HEIGHT + 40, height=HEIGHT + 40, title="ours vs theirs (dashed: y = x)"),
                       difference.properties(width=WIDTH, height=HEIGHT + 40, title="ours − theirs by position in the tensor")
                       ).properties(title=alt.TitleParams("one tensor's values side by side", subtitle=notes,
                                                         subtitleColor="#555", subtitleFontSize=10))


def kv_arithmetic(meta: dict, length: int) -> str:
    """The memory arithmetic behind the KV chart, written out (markdown), from what the trace recorded: the
    config's layer and head counts, meta["kv_element_size"] and meta["kv_bytes_per_token"] (the session takes
    both from the model: ModelConfig.kv_bytes_per_token of its compute dtype). An MLA model (kv_lora_rank > 0)
    caches a latent and a RoPE key instead of per-head K and V: set beside meta["mha_bytes_per_token"], what MHA
    would hold."""
    config, element_size, per_token = meta["config"], meta.get("kv_element_size"), meta.get("kv_bytes_per_token")
    if element_size is None or per_token is None:  # a trace written before the session recorded them
        return (f"{config['n_layers']} layers × {config['n_kv_heads']} KV heads per token; bytes per token: "
                f"not recorded in this trace; {length} positions cached")
    total = f"**{per_token:,} bytes per token**; × {length} positions = **{per_token * length / 2**20:.2f} MiB**"
    if not config.get("kv_lora_rank"):
        return (f"{config['n_layers']} layers × {config['n_kv_heads']} KV heads × {config['head_dim']} head_dim × 2 (K and V) "
                f"× {element_size} bytes = {total}")
    n_layers, lora, rope = config["n_layers"], config["kv_lora_rank"], config["rope_dim"]
    layer_bytes = per_token // n_layers
    text = (f"MLA caches one latent of {lora} + a RoPE key of {rope} values per position and layer: ({lora} + {rope}) × "
            f"{element_size} bytes = **{layer_bytes:,} B** per position and layer; {n_layers} layers = {total}")
    mha = meta.get("mha_bytes_per_token")
    if mha is None:
        return text
    return (text + f". MHA would hold {config['n_heads']} heads × ({config['head_dim']} + {config['v_head_dim']}) × "
            f"{element_size} bytes = {mha // n_layers:,} B per position and layer ({mha / per_token:.3g}× more): "
            f"{mha * length / 2**20:.2f} MiB here")


def fmt_speedup(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.1f}×"


# --- A/B: what B changes, per panel ----------------------------------------------------------------------------
# Each takes the same frame of run A and run B (app_state.ab_runs: the same prompt and sampling, one thing changed)
# and draws B against A on the rows both hold: a ratio or a count, so that "no difference" reads as 1 or 0.

def ab_qk_ratio(qk_a: pl.DataFrame, qk_b: pl.DataFrame, step: int, tensor: str = "q", path: str = "cached") -> alt.Chart:
    """B's q (or k) RMS over A's per layer × head, before and after the norm, at one step: 1 where B changes nothing."""
    key = ["layer", "head", "stage"]

    def one(qk, name):
        return _one_path(qk, path).filter((pl.col("step") == step) & (pl.col("tensor") == tensor)).select(
            *key, pl.col("rms").alias(name))

    df = one(qk_a, "rms A").join(one(qk_b, "rms B"), on=key)
    if df.is_empty():
        return empty_chart(f"no QK statistics that both runs hold at step {step}")
    df, x = _heads_by_stage(df.with_columns((pl.col("rms B") / pl.col("rms A")).alias("B / A")))
    top = float(max(df["B / A"].max(), 1 / max(df["B / A"].min(), 1e-30), 1.01))  # symmetric about 1 on a log scale
    return alt.Chart(df).mark_rect().encode(
        x=x,
        y=_layer_y(df),
        color=alt.Color("B / A:Q", scale=alt.Scale(type="log", scheme="redblue", reverse=True, domain=[1 / top, top]),
                        legend=alt.Legend(format=NUMBER)),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("head"), alt.Tooltip("stage"), alt.Tooltip("rms A:Q", format=".4f"),
                 alt.Tooltip("rms B:Q", format=".4f"), alt.Tooltip("B / A:Q", format=".4f")],
    ).properties(width=WIDTH, height=HEIGHT, title=f"B / A: {tensor} RMS at step {step} (1 = the same)")


def ab_routing_changes(routing_a: pl.DataFrame, routing_b: pl.DataFrame, path: str = "cached") -> alt.Chart:
    """Per step × layer, how many of the top-k experts B picks that A did not (the mean over the step's positions):
    0 where both runs route alike."""
    key = ["step", "position", "layer"]

    def sets(routing, name):
        return _one_path(routing, path).group_by(key).agg(pl.col("expert").alias(name))

    df = sets(routing_a, "A").join(sets(routing_b, "B"), on=key)
    if df.is_empty():
        return empty_chart("no routing that both runs hold (a mixture-of-experts model records it)")
    k = int(df["A"].list.len().max())
    df = (df.with_columns(pl.col("B").list.set_difference("A").list.len().alias("changed"))
          .group_by("step", "layer").agg(pl.col("changed").mean(), pl.len().alias("positions")))
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("step:O", axis=_ordinal_axis(df["step"].unique().to_list(), "step")), y=_layer_y(df),
        color=alt.Color("changed:Q", scale=alt.Scale(scheme="orangered", domain=[0, k]),
                        title=f"experts of {k} changed", legend=alt.Legend(format=NUMBER)),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("layer"), alt.Tooltip("changed:Q", format=".2f", title=f"experts of {k} B changed"),
                 alt.Tooltip("positions")],
    ).properties(width=WIDTH, height=HEIGHT, title="experts B picks that A did not, per step × layer")


def ab_latency_ratio(tokens_a: pl.DataFrame, tokens_b: pl.DataFrame) -> alt.Chart:
    """B's time per decode step over A's, per path: below 1 where B is faster."""
    key = ["step", "path"]

    def one(tokens, name):
        return tokens.filter(~pl.col("prefill")).select(*key, "position", pl.col("seconds").alias(name))

    df = one(tokens_a, "A s").join(one(tokens_b, "B s").drop("position"), on=key)
    if df.is_empty():
        return empty_chart("no decode steps that both runs hold")
    df = df.with_columns((pl.col("B s") / pl.col("A s")).alias("B / A"))
    line = alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("position"), y=alt.Y("B / A:Q", scale=alt.Scale(type="log"), title="B / A time per step"),
        color=alt.Color("path:N", scale=PATH_COLORS),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("path"), alt.Tooltip("A s:Q", format=".4f"), alt.Tooltip("B s:Q", format=".4f"),
                 alt.Tooltip("B / A:Q", format=".3f")],
    )
    one_line = alt.Chart(pl.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[4, 3], color="#666").encode(y="y:Q")
    return (line + one_line).properties(width=WIDTH, height=HEIGHT, title="B / A: time per decode step (1 = as fast)")


def ab_kv_bytes(kv_a: pl.DataFrame, kv_b: pl.DataFrame, path: str = "cached") -> alt.Chart:
    """K + V bytes held per step, A and B on one axis (a dtype or a cache bug changes them)."""
    def one(kv, run):
        return (_one_path(kv, path).group_by("step").agg(((pl.col("k_bytes") + pl.col("v_bytes")).sum() / 2**20).alias("MiB"))
                .with_columns(pl.lit(run).alias("run")))

    df = pl.concat([one(kv_a, "A"), one(kv_b, "B")])
    if df.is_empty():
        return empty_chart("no KV cache recorded")
    return alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("step"), y=alt.Y("MiB:Q", title="K + V MiB"),
        color=alt.Color("run:N", scale=alt.Scale(domain=["A", "B"], range=["#4c78a8", "#e45756"])),
        strokeDash=alt.StrokeDash("run:N", legend=None),
        tooltip=[alt.Tooltip("run"), alt.Tooltip("step"), alt.Tooltip("MiB:Q", format=".4f")],
    ).properties(width=WIDTH, height=HEIGHT, title="KV bytes held: A and B")


def ab_token_probs(tokens_a: pl.DataFrame, tokens_b: pl.DataFrame, path: str = "cached") -> alt.Chart:
    """The probability each run gave the token it chose, per step; a cross where B chose another token than A."""
    def one(tokens, run):
        df = tokens.filter((pl.col("path") == path) & ~pl.col("prefill"))
        return df.select("step", "token_id", "piece", pl.struct("token_id", "top_ids", "top_probs").map_elements(
            lambda r: r["top_probs"][r["top_ids"].index(r["token_id"])] if r["token_id"] in r["top_ids"] else None,
            return_dtype=pl.Float64).alias("p"), pl.lit(run).alias("run"))

    a, b = one(tokens_a, "A"), one(tokens_b, "B")
    if a.is_empty() or b.is_empty():
        return empty_chart("no decode steps in both runs")
    same = a.select("step", pl.col("token_id").alias("a_id")).join(b.select("step", pl.col("token_id").alias("b_id")), on="step")
    same = same.with_columns((pl.col("a_id") == pl.col("b_id")).alias("same token")).select("step", "same token")
    df = pl.concat([a, b]).join(same, on="step", how="left").with_columns(
        pl.when(pl.col("same token")).then(pl.lit("same token")).otherwise(pl.lit("B chose another")).alias("tokens"))
    return alt.Chart(df).mark_point(filled=True, size=45).encode(
        x=_count_x("step"), y=alt.Y("p:Q", title="p(chosen token)", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("run:N", scale=alt.Scale(domain=["A", "B"], range=["#4c78a8", "#e45756"])),
        shape=alt.Shape("tokens:N", scale=alt.Scale(domain=["same token", "B chose another"], range=["circle", "cross"]), title=None),
        tooltip=[alt.Tooltip("run"), alt.Tooltip("step"), alt.Tooltip("token_id"), alt.Tooltip("piece"), alt.Tooltip("p:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title="the chosen token's probability: A and B")
