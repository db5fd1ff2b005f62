"""Altair charts from trace frames: one function per chart, frames in, chart out (no engine calls here).

Every builder takes the polars frames of a Trace (trace.py) and returns an `alt.Chart` (or a small layered /
concatenated chart); what a chart needs from the run (the primary path, the equivalence tolerance, the KV
sizes) it takes from the trace's metadata, where the session wrote it once. The app and the walkthrough only arrange what these return.
"""

from __future__ import annotations

import html
import math

import altair as alt
import polars as pl

from workbench.frames import PATHS

WIDTH = 320
HEIGHT = 180
PATH_COLORS = alt.Scale(domain=list(PATHS), range=["#1f77b4", "#ff7f0e"])


def _count_x(field: str) -> alt.X:
    """An x axis of steps or positions: whole numbers only."""
    return alt.X(f"{field}:Q", axis=alt.Axis(tickMinStep=1, format="d"), title=field)


def primary_path(meta: dict | None, frame: pl.DataFrame | None = None) -> str:
    """The path whose rows a single-path chart shows: the one the session recorded (meta["primary_path"]).
    A trace written before that key existed: cached when the frame has it, else the path it has."""
    if meta and meta.get("primary_path"):
        return meta["primary_path"]
    paths = set(frame["path"].unique().to_list()) if frame is not None and "path" in frame.columns and frame.height else set()
    return "cached" if "cached" in paths or not paths else sorted(paths)[0]


def _one_path(frame: pl.DataFrame, path: str | None) -> pl.DataFrame:
    if not frame.height:
        return frame
    return frame.filter(pl.col("path") == (path or primary_path(None, frame)))


def empty_chart(message: str) -> alt.Chart:
    return alt.Chart(pl.DataFrame({"text": [message]})).mark_text(size=13, color="#666").encode(
        text=alt.Text("text:N")).properties(width=WIDTH, height=60)


# --- generated text ---------------------------------------------------------------------------------------

def token_html(prompt_pieces: list[str], prompt_ids: list[int], tokens: pl.DataFrame, path: str | None = None) -> str:
    """The prompt and the generated tokens with visible boundaries; hovering a generated token shows its id,
    position, probability and the top-k alternatives (from the tokens frame's candidates)."""
    style = ("<style>#token-view{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9}"
             "#token-view .tok{border:1px solid #bbb;border-radius:3px;padding:0 1px;margin:0 1px}"
             "#token-view .gen{background:#e8f1fb;border-color:#7aa7d6}"
             "#token-view .eos{background:#fde2e2}</style>")
    spans = [f'<span class="tok" title="{html.escape(f"prompt token {i} · id {t}")}">{_visible(p)}</span>'
             for i, (p, t) in enumerate(zip(prompt_pieces, prompt_ids))]
    for row in _one_path(tokens, path).sort("step").iter_rows(named=True):
        tip = f"id {row['token_id']} · position {row['position']}"
        if row["top_ids"]:
            ids, probs = list(row["top_ids"]), list(row["top_probs"])
            chosen = probs[ids.index(row["token_id"])] if row["token_id"] in ids else None
            tip += f" · p = {chosen:.3f}" if chosen is not None else ""
            tip += "\ntop-k: " + ", ".join(f"{i} ({p:.3f})" for i, p in zip(ids, probs))
        spans.append(f'<span class="tok gen" title="{html.escape(tip)}">{_visible(row["piece"])}</span>')
    return style + '<div id="token-view">' + "".join(spans) + "</div>"


def _visible(piece: str) -> str:
    text = html.escape(piece)
    return text.replace("\n", "↵\n") if text.strip() else (text.replace(" ", "·").replace("\n", "↵\n") or "∅")


# --- KV cache -----------------------------------------------------------------------------------------------

def kv_growth(kv: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """Bytes held per layer over steps (stacked), with the cache's capacity as a rule."""
    df = _one_path(kv, path)
    if df.is_empty():
        return empty_chart("no steps yet")
    df = df.with_columns(((pl.col("k_bytes") + pl.col("v_bytes")) / 2**20).alias("MiB"))
    capacity = df.group_by("step").agg((pl.col("capacity_bytes").sum() / 2**20).alias("capacity MiB"))
    area = alt.Chart(df).mark_area(opacity=0.85).encode(
        x=_count_x("step"),
        y=alt.Y("sum(MiB):Q", title="K + V MiB", stack="zero"),
        color=alt.Color("layer:O", legend=None, scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("layer"), alt.Tooltip("length"), alt.Tooltip("k_bytes"), alt.Tooltip("v_bytes")],
    )
    rule = alt.Chart(capacity).mark_line(strokeDash=[4, 3], color="#c00").encode(
        x=alt.X("step:Q"), y=alt.Y("capacity MiB:Q"), tooltip=[alt.Tooltip("step"), alt.Tooltip("capacity MiB")])
    return (area + rule).properties(width=WIDTH, height=HEIGHT, title="KV bytes per layer (stacked) vs capacity (dashed)")


def kv_positions(kv: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """Positions filled per layer at the latest step: every layer should hold the same number."""
    df = _one_path(kv, path)
    if df.is_empty():
        return empty_chart("no steps yet")
    last = df.filter(pl.col("step") == df["step"].max())
    return alt.Chart(last).mark_bar().encode(
        x=alt.X("layer:O"), y=alt.Y("length:Q", title="positions"), tooltip=[alt.Tooltip("layer"), alt.Tooltip("length"), alt.Tooltip("k_bytes"), alt.Tooltip("v_bytes")],
    ).properties(width=WIDTH, height=HEIGHT, title="positions cached per layer (latest step)")


# --- QK norm --------------------------------------------------------------------------------------------------

def qk_heatmap(qk: pl.DataFrame, step: int, tensor: str, selection: alt.Parameter | None = None,
               path: str | None = None) -> alt.Chart:
    """layer × head RMS of q or k, before and after the per-head norm, at one step."""
    df = _one_path(qk, path).filter((pl.col("step") == step) & (pl.col("tensor") == tensor))
    if df.is_empty():
        return empty_chart("no QK statistics at this step")
    chart = alt.Chart(df).mark_rect().encode(
        x=alt.X("head:O"),
        y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("rms:Q", scale=alt.Scale(scheme="magma", type="log"), title=f"{tensor} RMS"),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("head"), alt.Tooltip("stage"), alt.Tooltip("rms:Q", format=".4f"), alt.Tooltip("max_abs:Q", format=".3f")],
    ).properties(width=WIDTH // 2, height=HEIGHT)
    if selection is not None:
        chart = chart.add_params(selection).encode(opacity=alt.condition(selection, alt.value(1.0), alt.value(0.35)))
    return chart.facet(column=alt.Column("stage:N", sort=["pre", "post"], title=None)).properties(
        title=f"{tensor}: RMS per layer × head at step {step} (click a cell)")


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

def routing_histogram(routing: pl.DataFrame, layer: int, n_experts: int, path: str | None = None) -> alt.Chart:
    """How often each expert was picked at one layer, over all tokens so far."""
    df = _one_path(routing, path).filter(pl.col("layer") == layer)
    counts = pl.DataFrame({"expert": list(range(n_experts))}).join(
        df.group_by("expert").len("picks"), on="expert", how="left").fill_null(0)
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("expert:O"), y=alt.Y("picks:Q"), tooltip=[alt.Tooltip("expert"), alt.Tooltip("picks")],
    ).properties(width=WIDTH, height=HEIGHT, title=f"expert picks at layer {layer}")


def routing_heatmap(routing: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """layer × expert pick counts over every step so far."""
    df = _one_path(routing, path).group_by("layer", "expert").len("picks")
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("expert:O"), y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("picks:Q", scale=alt.Scale(scheme="blues")), tooltip=[alt.Tooltip("layer"), alt.Tooltip("expert"), alt.Tooltip("picks")],
    ).properties(width=WIDTH, height=HEIGHT, title="picks per layer × expert (all steps)")


def routing_last_token(routing: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """The top-k experts and their (renormalised) weights for the newest token, per layer."""
    df = _one_path(routing, path)
    last = df.filter(pl.col("step") == df["step"].max())
    last = last.filter(pl.col("position") == last["position"].max())
    return alt.Chart(last).mark_bar().encode(
        y=alt.Y("layer:O", sort="descending"), x=alt.X("weight:Q", stack="zero", title="router weight"),
        color=alt.Color("expert:N", scale=alt.Scale(scheme="tableau20")),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("rank"), alt.Tooltip("expert"), alt.Tooltip("weight:Q", format=".3f"), alt.Tooltip("router_entropy:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title="top-k weights of the newest token")


# --- Tokens/s ---------------------------------------------------------------------------------------------------

def step_latency(tokens: pl.DataFrame) -> alt.Chart:
    """ms per generated token over position for each path; the prefill is drawn apart (hollow diamond)."""
    if tokens.is_empty():
        return empty_chart("no steps yet")
    df = tokens.with_columns((pl.col("seconds") * 1000).alias("ms"))
    decode = alt.Chart(df.filter(~pl.col("prefill"))).mark_line(point=True).encode(
        x=_count_x("position"), y=alt.Y("ms:Q", title="ms per step"),
        color=alt.Color("path:N", scale=PATH_COLORS),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("position"), alt.Tooltip("path"), alt.Tooltip("ms:Q", format=".2f"), alt.Tooltip("tokens_per_s:Q", format=".1f")],
    )
    prefill = alt.Chart(df.filter(pl.col("prefill"))).mark_point(shape="diamond", size=120, filled=False, color="#555").encode(
        x=alt.X("position:Q"), y=alt.Y("ms:Q"), tooltip=[alt.Tooltip("n_tokens"), alt.Tooltip("ms:Q", format=".2f")])
    return (decode + prefill).properties(width=WIDTH, height=HEIGHT, title="latency per step (◇ = prefill)")


def tokens_per_s(tokens: pl.DataFrame) -> alt.Chart:
    if tokens.is_empty():
        return empty_chart("no steps yet")
    df = tokens.filter(~pl.col("prefill"))
    return alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("position"), y=alt.Y("tokens_per_s:Q", title="tokens/s"), color=alt.Color("path:N", scale=PATH_COLORS),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("position"), alt.Tooltip("path"), alt.Tooltip("tokens_per_s:Q", format=".1f")],
    ).properties(width=WIDTH, height=HEIGHT, title="tokens/s per decode step")


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
    None (a trace written before it was recorded): no rule."""
    if equiv.is_empty():
        return empty_chart("run with path 'both' to compare the paths")
    df = equiv.with_columns(
        (pl.col("max_abs_diff") / pl.col("max_abs_logit")).clip(lower_bound=1e-9).alias("relative"),
        pl.when(pl.col("argmax_equal")).then(pl.lit("same")).otherwise(pl.lit("different")).alias("argmax"),
    )
    points = alt.Chart(df).mark_line(point=True, color="#888").encode(
        x=_count_x("step"), y=alt.Y("relative:Q", scale=alt.Scale(type="log"), title="max |Δlogit| / max |logit|"),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("max_abs_diff:Q", format=".2e"), alt.Tooltip("cosine:Q", format=".6f"), alt.Tooltip("argmax")],
    )
    marks = alt.Chart(df).mark_point(filled=True, size=60).encode(
        x=alt.X("step:Q"), y=alt.Y("relative:Q"),
        color=alt.Color("argmax:N", scale=alt.Scale(domain=["same", "different"], range=["#2a9d8f", "#d62828"])))
    layers = points + marks
    if threshold is not None:
        layers += alt.Chart(pl.DataFrame({"threshold": [threshold]})).mark_rule(strokeDash=[4, 3], color="#c00").encode(y=alt.Y("threshold:Q"))
    return layers.properties(width=WIDTH, height=HEIGHT, title="cached vs uncached logits per step")


def layer_health(layers: pl.DataFrame, path: str | None = None) -> alt.Chart:
    """Residual RMS per layer per step; a red cross where a layer's output first holds NaN/Inf."""
    df = _one_path(layers, path)
    if df.is_empty():
        return empty_chart("no steps yet")
    df = df.with_columns(((pl.col("nan") + pl.col("inf")) > 0).alias("bad"),
                         pl.when(pl.col("resid_rms").is_finite()).then(pl.col("resid_rms")).otherwise(None).alias("rms"))
    heat = alt.Chart(df).mark_rect().encode(
        x=alt.X("step:O"), y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("rms:Q", scale=alt.Scale(scheme="viridis", type="log"), title="residual RMS"),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("layer"), alt.Tooltip("resid_rms:Q", format=".3f"), alt.Tooltip("resid_max_abs:Q", format=".3f"), alt.Tooltip("nan"), alt.Tooltip("inf")],
    )
    first_bad = df.filter(pl.col("bad")).group_by("step").agg(pl.col("layer").min())
    cross = alt.Chart(first_bad).mark_text(text="✕", color="red", size=16).encode(x=alt.X("step:O"), y=alt.Y("layer:O", sort="descending"))
    return (heat + cross).properties(width=WIDTH, height=HEIGHT, title="residual stream RMS (✕ = first NaN/Inf)")


def reference(ref: pl.DataFrame) -> alt.Chart:
    if ref.is_empty():
        return empty_chart("choose a reference (llama.cpp, or llama.cpp-f32: exact) to compare")
    df = ref.with_columns(pl.when(pl.col("top1_equal")).then(pl.lit("same")).otherwise(pl.lit("different")).alias("top-1"))
    return alt.Chart(df).mark_line(point=True).encode(
        x=_count_x("step"), y=alt.Y("cosine:Q", scale=alt.Scale(zero=False), title="cosine(ours, llama.cpp)"),
        color=alt.Color("top-1:N", scale=alt.Scale(domain=["same", "different"], range=["#2a9d8f", "#d62828"])),
        tooltip=[alt.Tooltip("step"), alt.Tooltip("position"), alt.Tooltip("cosine:Q", format=".5f"), alt.Tooltip("top-1")],
    ).properties(width=WIDTH, height=HEIGHT, title="logits vs llama.cpp on the same tokens")


def kv_arithmetic(meta: dict, length: int) -> str:
    """The memory arithmetic behind the KV chart, written out (markdown), from what the trace recorded: the
    config's layer and head counts, meta["kv_element_size"] and meta["kv_bytes_per_token"] (the session takes
    both from the model: ModelConfig.kv_bytes_per_token of its compute dtype)."""
    config, element_size, per_token = meta["config"], meta.get("kv_element_size"), meta.get("kv_bytes_per_token")
    if element_size is None or per_token is None:  # a trace written before the session recorded them
        return (f"{config['n_layers']} layers × {config['n_kv_heads']} KV heads per token; bytes per token: "
                f"not recorded in this trace; {length} positions cached")
    return (f"{config['n_layers']} layers × {config['n_kv_heads']} KV heads × {config['head_dim']} head_dim × 2 (K and V) "
            f"× {element_size} bytes = **{per_token:,} bytes per token**; × {length} positions = "
            f"**{per_token * length / 2**20:.2f} MiB**")


def fmt_speedup(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.1f}×"
