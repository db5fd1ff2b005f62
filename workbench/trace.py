"""Traces: the probe records of a session as polars frames (long format, one row per observation, typed
columns), plus run metadata; one Parquet file round-trips them; `diff` finds where two runs part ways.

Frames (DESIGN.md, with a `path` column wherever both decode paths can fill the same frame):
- tokens:    step, position, token_id, piece, path, seconds, tokens_per_s, n_tokens, prefill, top_ids, top_probs
- kv:        step, path, layer, length, k_bytes, v_bytes, capacity_bytes
- qk:        step, path, layer, head, tensor (q|k), stage (pre|post), rms, max_abs
- routing:   step, path, position, layer, rank, expert, weight, router_entropy
- layers:    step, path, layer, resid_rms, resid_max_abs, nan, inf
- equiv:     step, position, max_abs_diff, max_abs_logit, cosine, argmax_equal   (cached vs uncached)
- reference: step, position, engine, cosine, top1_equal, ours_top5, ref_top5     (ours vs llama.cpp)
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.errors import InputError

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
}
# The columns that identify an observation (for joining two traces); the rest are measurements.
KEYS = {
    "tokens": ["step", "path"], "kv": ["step", "path", "layer"], "qk": ["step", "path", "layer", "head", "tensor", "stage"],
    "routing": ["step", "path", "position", "layer", "rank"], "layers": ["step", "path", "layer"],
    "equiv": ["step"], "reference": ["step", "engine"],
}
FRAMES = tuple(SCHEMAS)


def empty(name: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[name])


@dataclass
class Trace:
    frames: dict[str, pl.DataFrame]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pl.DataFrame:
        if name in SCHEMAS:
            return self.frames[name]
        raise AttributeError(name)

    @classmethod
    def from_session(cls, session, extra: dict[str, Any]) -> Trace:
        frames = {name: pl.DataFrame(getattr(session.records, name), schema=SCHEMAS[name], orient="row")
                  if getattr(session.records, name) else empty(name) for name in FRAMES}
        return cls(frames, run_meta(session) | extra)

    def first_bad_layer(self) -> pl.DataFrame:
        """Per step and path, the first layer whose residual stream holds a NaN or Inf (none: no row)."""
        bad = self.frames["layers"].filter((pl.col("nan") > 0) | (pl.col("inf") > 0))
        return bad.group_by("step", "path").agg(pl.col("layer").min().alias("first_bad_layer")).sort("step", "path")

    def write(self, path: str | Path | BinaryIO) -> str | Path | BinaryIO:
        """One Parquet file (a path or a binary file object): the frames stacked with a `frame` column, the
        metadata in the file's key-value store."""
        stacked = pl.concat(
            [df.with_columns(pl.lit(name).alias("frame")).select("frame", *df.columns) for name, df in self.frames.items()],
            how="diagonal_relaxed",
        )
        table = stacked.to_arrow()
        table = table.replace_schema_metadata({b"workbench.meta": json.dumps(self.meta, default=str).encode(),
                                               b"workbench.frames": json.dumps(list(self.frames)).encode()})
        pq.write_table(table, path)
        return path

    @classmethod
    def read(cls, path: str | Path | BinaryIO) -> Trace:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path} is not a readable trace file ({exc}).") from None
        metadata = table.schema.metadata or {}
        if b"workbench.meta" not in metadata:
            raise InputError(f"{path} is a Parquet file but not a workbench trace (no workbench metadata).")
        meta = json.loads(metadata[b"workbench.meta"])
        stacked = pl.from_arrow(table)
        frames = {}
        for name, schema in SCHEMAS.items():
            part = stacked.filter(pl.col("frame") == name)
            frames[name] = part.select([pl.col(c).cast(t) for c, t in schema.items()]) if part.height else empty(name)
        return cls(frames, meta)


def run_meta(session) -> dict[str, Any]:
    import numpy
    import torch

    import workbench

    m = session.model
    return {
        "model_file": str(m.gguf.path), "model_sha256": m.gguf.sha256(), "arch": m.config.arch,
        "config": m.config.as_dict(), "device": str(m.device), "dtype": str(m.dtype).removeprefix("torch."),
        "weights": m.info.weights, "equiv_tolerance": m.equivalence_tolerance,
        "prompt_ids": list(session.prompt_ids), "prompt_pieces": [m.tokenizer.piece(t) for t in session.prompt_ids],
        "path": session.path, "breaks": sorted(session.breaks),
        "sampling": {"temperature": session.sampling.temperature, "top_k": session.sampling.top_k,
                     "top_p": session.sampling.top_p, "seed": session.sampling.seed},
        "versions": {"workbench": getattr(workbench, "__version__", "0"), "torch": torch.__version__,
                     "numpy": numpy.__version__, "polars": pl.__version__, "python": platform.python_version()},
    }


@dataclass
class FrameDiff:
    frame: str
    rows_compared: int
    first: dict[str, Any] | None  # the first (step, layer, …) beyond tolerance, with the column and values
    largest: pl.DataFrame  # the largest differences, one row per measured column


def diff(a: Trace, b: Trace, rtol: float = 1e-3, atol: float = 1e-6) -> list[FrameDiff]:
    """Per frame: join the two traces on the identifying columns, compare every measured column, and report
    the first row (in step, then layer order) where |a − b| > atol + rtol·|b|, plus the largest differences.
    Timing columns (seconds, tokens_per_s) are left out: they differ between any two runs."""
    out = []
    for name in FRAMES:
        fa, fb = a.frames[name], b.frames[name]
        if fa.is_empty() and fb.is_empty():
            continue
        keys = KEYS[name]
        joined = fa.join(fb, on=keys, how="inner", suffix="_b")
        numeric = [c for c, t in SCHEMAS[name].items()
                   if c not in keys and c not in ("seconds", "tokens_per_s") and t in (pl.Int32, pl.Int64, pl.Float64, pl.Boolean)]
        exact = [c for c, t in SCHEMAS[name].items() if c not in keys and t in (pl.String, pl.List(pl.Int64))]
        first: dict[str, Any] | None = None
        largest_rows = []
        for col in numeric:
            va, vb = pl.col(col).cast(pl.Float64), pl.col(f"{col}_b").cast(pl.Float64)
            d = joined.with_columns((va - vb).abs().alias("_d"), vb.abs().alias("_ref"))
            d = d.with_columns(pl.when(pl.col("_d").is_nan()).then(float("inf")).otherwise(pl.col("_d")).alias("_d"))
            bad = d.filter(pl.col("_d") > atol + rtol * pl.col("_ref")).sort(keys)
            if bad.height:
                row = bad.row(0, named=True)
                cand = {**{k: row[k] for k in keys}, "column": col, "a": row[col], "b": row[f"{col}_b"]}
                if first is None or _order(cand, keys) < _order(first, keys):
                    first = cand
            if d.height:
                worst = d.sort("_d", descending=True).row(0, named=True)
                largest_rows.append({"column": col, "max_abs_diff": worst["_d"],
                                     "at": ", ".join(f"{k}={worst[k]}" for k in keys)})
        for col in exact:
            bad = joined.filter(pl.col(col) != pl.col(f"{col}_b")).sort(keys)
            if bad.height:
                row = bad.row(0, named=True)
                cand = {**{k: row[k] for k in keys}, "column": col, "a": row[col], "b": row[f"{col}_b"]}
                if first is None or _order(cand, keys) < _order(first, keys):
                    first = cand
        largest = pl.DataFrame(largest_rows, schema={"column": pl.String, "max_abs_diff": pl.Float64, "at": pl.String})
        out.append(FrameDiff(name, joined.height, first, largest))
    return out


def _order(row: dict[str, Any], keys: list[str]) -> tuple:
    return tuple((row[k] if not isinstance(row[k], float) or not math.isnan(row[k]) else 0) for k in keys if k != "path")
