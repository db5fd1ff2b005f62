"""The trace frames' columns, declared once: their names and polars types (SCHEMAS), the columns that identify an
observation (KEYS), the path names a row can hold, and the row types the engine side builds (row_type).

A column added here is part of every row type built from it, so the code that fills a frame fails loudly until
it gives the new column a value (rows are built with keywords), and trace.Recorder checks every row against the
same declaration. Pure data: polars only, no torch, so both the engine (cache, probes) and the charts import it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import polars as pl

PATHS = ("cached", "uncached")  # the values a row's `path` column can hold (session.PATHS adds "both")
SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "tokens": {"step": pl.Int32, "position": pl.Int32, "token_id": pl.Int64, "piece": pl.String, "path": pl.String,
               "seconds": pl.Float64, "tokens_per_s": pl.Float64, "n_tokens": pl.Int32, "prefill": pl.Boolean,
               "top_ids": pl.List(pl.Int64), "top_probs": pl.List(pl.Float64)},
    "kv": {"step": pl.Int32, "path": pl.String, "layer": pl.Int32, "length": pl.Int32, "k_bytes": pl.Int64,
           "v_bytes": pl.Int64, "capacity_bytes": pl.Int64},
    "qk": {"step": pl.Int32, "path": pl.String, "layer": pl.Int32, "head": pl.Int32, "tensor": pl.String,
           "stage": pl.String, "rms": pl.Float64, "max_abs": pl.Float64},
    "routing": {"step": pl.Int32, "path": pl.String, "position": pl.Int32, "layer": pl.Int32, "rank": pl.Int32,
                "expert": pl.Int32, "weight": pl.Float64, "router_entropy": pl.Float64},
    "layers": {"step": pl.Int32, "path": pl.String, "layer": pl.Int32, "resid_rms": pl.Float64,
               "resid_max_abs": pl.Float64, "nan": pl.Int64, "inf": pl.Int64},
    "equiv": {"step": pl.Int32, "position": pl.Int32, "max_abs_diff": pl.Float64, "max_abs_logit": pl.Float64,
              "cosine": pl.Float64, "argmax_equal": pl.Boolean},
    "reference": {"step": pl.Int32, "position": pl.Int32, "engine": pl.String, "cosine": pl.Float64,
                  "top1_equal": pl.Boolean, "ours_top5": pl.List(pl.Int64), "ref_top5": pl.List(pl.Int64)},
    # A gated shared expert (qwen2moe): the sigmoid gate its output is scaled by, per position and layer.
    "shared": {"step": pl.Int32, "path": pl.String, "position": pl.Int32, "layer": pl.Int32, "gate": pl.Float64},
    # The newest token's attention pattern: every key position 0..its own, masked ones (a sliding window) at 0.
    "attention": {"step": pl.Int32, "path": pl.String, "layer": pl.Int32, "head": pl.Int32, "key": pl.Int32,
                  "weight": pl.Float64},
    # The logit lens: each layer's newest residual through the final norm and the head; kl_to_final is
    # KL(final ‖ layer) in nats.
    "lens": {"step": pl.Int32, "path": pl.String, "layer": pl.Int32, "token_id": pl.Int64, "prob": pl.Float64,
             "entropy": pl.Float64, "kl_to_final": pl.Float64},
}
# The columns that identify an observation (for joining two traces); the rest are measurements.
KEYS = {
    "tokens": ["step", "path"], "kv": ["step", "path", "layer"], "qk": ["step", "path", "layer", "head", "tensor", "stage"],
    "routing": ["step", "path", "position", "layer", "rank"], "layers": ["step", "path", "layer"],
    "equiv": ["step"], "reference": ["step", "engine"], "attention": ["step", "path", "layer", "head", "key"],
    "lens": ["step", "path", "layer"], "shared": ["step", "path", "position", "layer"],
}
FRAMES = tuple(SCHEMAS)


def row_type(frame: str, leading: tuple[str, ...] = ("step", "path")) -> type[tuple]:
    """A NamedTuple of `frame`'s columns after the `leading` ones (which the recorder adds): what the engine
    builds a row of (probes.QKRow, cache.LayerStats, …)."""
    columns = [c for c in SCHEMAS[frame] if c not in leading]
    return NamedTuple(f"{frame.title()}Row", [(c, Any) for c in columns])
