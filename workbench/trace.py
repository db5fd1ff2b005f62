"""Traces: the probe records of a session as polars frames (long format, one row per observation, typed
columns), plus run metadata; one Parquet file round-trips them; `diff` finds where two runs part ways.

Frames (DESIGN.md, with a `path` column wherever both decode paths can fill the same frame):
- tokens:    step, position, token_id, piece, path, seconds, tokens_per_s, n_tokens, prefill, top_ids, top_probs
- kv:        step, path, layer, length, k_bytes, v_bytes, capacity_bytes
- qk:        step, path, layer, head, tensor (q|k), stage (pre|post), rms, max_abs
- routing:   step, path, position, layer, rank, expert, weight, router_entropy
- layers:    step, path, layer, resid_rms, resid_max_abs, nan, inf
- shared:    step, path, position, layer, gate   (a gated shared expert's sigmoid gate: qwen2moe)
- equiv:     step, position, max_abs_diff, max_abs_logit, cosine, argmax_equal   (cached vs uncached)
- reference: step, position, engine, cosine, top1_equal, ours_top5, ref_top5     (ours vs llama.cpp)
- attention: step, path, layer, head, key, weight   (opt-in: the newest token's pattern over keys 0..its position)
- lens:      step, path, layer, token_id, prob, entropy, kl_to_final   (opt-in: the logit lens, KL(final ‖ layer))

The attention frame keeps the zero weights: every (step, path, layer, head) has one row per key 0..position,
so a sliding window shows as zeros rather than as a gap a chart cannot tell from "not recorded", and two paths
or two traces join row for row (dropping zeros would drop a different set wherever a tiny weight underflows
on one side and not the other). It is layers × heads × (position + 1) rows a step.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.errors import InputError
from workbench.frames import FRAMES, KEYS, SCHEMAS  # the frames' columns, declared once


def empty(name: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[name])


class Recorder:
    """The rows of every frame, appended step by step: one list per frame (an attribute named for it), each
    row named by the frame's columns, which are checked against SCHEMAS as rows arrive."""

    def __init__(self) -> None:
        for name in FRAMES:
            setattr(self, name, [])
        self._built: dict[str, tuple[int, pl.DataFrame]] = {}  # frame → (rows built, their DataFrame)

    def frame(self, name: str) -> pl.DataFrame:
        """The frame's rows so far as a DataFrame, built incrementally: only the rows added since the last call
        are converted (a redraw after every step then costs one step's rows, not the whole run's). Rows taken
        back (a failed step's, Session._restore) make it build afresh."""
        rows = getattr(self, name)
        done, df = self._built.get(name, (0, None))
        if df is None or done > len(rows):
            done, df = 0, empty(name)
        if done < len(rows):
            df = pl.concat([df, pl.DataFrame(rows[done:], schema=SCHEMAS[name], orient="row")], rechunk=False)
            self._built[name] = (len(rows), df)
        return df

    def add(self, frame: str, **row: Any) -> None:
        """One row, as a dict of every column."""
        if row.keys() != SCHEMAS[frame].keys():
            raise ValueError(f"a `{frame}` row needs the columns {list(SCHEMAS[frame])}, not {list(row)}.")
        getattr(self, frame).append(row)

    def extend(self, frame: str, rows: Sequence[tuple], **leading: Any) -> None:
        """Many rows of the large frames: NamedTuples of the columns after the `leading` ones (the same for
        every row, e.g. step and path), checked once; stored as plain tuples in the schema's column order."""
        if not rows:
            return
        names = [*leading, *rows[0]._fields]
        if names != list(SCHEMAS[frame]):
            raise ValueError(f"`{frame}` rows need the columns {list(SCHEMAS[frame])} in order, not {names}.")
        first = tuple(leading.values())
        getattr(self, frame).extend((*first, *row) for row in rows)

    def extend_columns(self, frame: str, columns: dict[str, list], **leading: Any) -> None:
        """Many rows given as columns (the columns after the `leading` ones, by name, as lists of one length):
        for frames of tens of thousands of rows a step (attention), zipped into rows without a Python loop."""
        names = [*leading, *columns]
        if names != list(SCHEMAS[frame]):
            raise ValueError(f"`{frame}` columns need to be {list(SCHEMAS[frame])} in order, not {names}.")
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"`{frame}` columns of different lengths: {sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        getattr(self, frame).extend(zip(*(repeat(value, n) for value in leading.values()), *columns.values()))


@dataclass
class Trace:
    frames: dict[str, pl.DataFrame]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pl.DataFrame:
        if name in SCHEMAS:
            return self.frames[name]
        raise AttributeError(name)

    @classmethod
    def from_records(cls, records: Recorder, meta: dict[str, Any]) -> Trace:
        """The recorded rows as frames, with the run metadata the session wrote (Session.trace)."""
        return cls({name: records.frame(name) for name in FRAMES}, meta)

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
    def read(cls, source: str | Path | BinaryIO, name: str | None = None) -> Trace:
        """A trace written by `write`, from a path or a binary file object (an upload, `name` its file name).
        A trace is a file a user picked, so anything else is one InputError sentence naming it."""
        label = name or (str(source) if isinstance(source, (str, Path)) else "the uploaded file")
        fh = _open_regular(Path(source), label) if isinstance(source, (str, Path)) else source
        try:
            table = pq.read_table(fh)
        except (OSError, ValueError, TypeError, pa.ArrowException):
            raise InputError(f"{label} is not a readable Parquet file, so not a trace.") from None
        finally:
            if fh is not source:
                fh.close()
        meta, listed = _workbench_metadata(table, label)
        try:
            stacked = pl.from_arrow(table)
        except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError):
            raise InputError(f"{label} holds columns of types no trace has.") from None
        if stacked.schema.get("frame") != pl.String:
            raise InputError(f"{label} has no `frame` column of frame names, so it is not a workbench trace.")
        frames = {}
        for frame in SCHEMAS:
            part = stacked.filter(pl.col("frame") == frame) if frame in listed else stacked.clear()
            frames[frame] = _cast(part, frame, label) if part.height else empty(frame)
        return cls(frames, meta)


def _open_regular(path: Path, label: str) -> BinaryIO:
    """The file, opened only once `stat` says it is a regular one: opening a FIFO would wait for a writer."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{label} does not exist.") from None
    except OSError as exc:
        raise InputError(f"{label} cannot be read ({exc.strerror or exc}).") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{label} is a directory, not a trace file.")
    if not stat.S_ISREG(mode):
        raise InputError(f"{label} is not a regular file, so not a trace file.")
    try:
        return path.open("rb")
    except OSError as exc:
        raise InputError(f"{label} cannot be read ({exc.strerror or exc}).") from None


def _workbench_metadata(table: pa.Table, label: str) -> tuple[dict[str, Any], list[str]]:
    """The run metadata and the names of the frames `write` stored, checked for the shape `write` gives them."""
    stored = table.schema.metadata or {}
    if b"workbench.meta" not in stored or b"workbench.frames" not in stored:
        raise InputError(f"{label} is a Parquet file but not a workbench trace (no workbench metadata).")
    try:
        meta, listed = json.loads(stored[b"workbench.meta"]), json.loads(stored[b"workbench.frames"])
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{label} has workbench metadata that is not valid JSON.") from None
    if not isinstance(meta, dict):
        raise InputError(f"{label} has workbench metadata that is not a JSON object.")
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        raise InputError(f"{label} has a workbench.frames entry that is not a list of frame names.")
    return meta, listed


def _cast(part: pl.DataFrame, frame: str, label: str) -> pl.DataFrame:
    """One frame's rows with its schema's columns and types; a missing or ill-typed column is named."""
    columns = []
    for col, dtype in SCHEMAS[frame].items():
        if col not in part.columns:
            raise InputError(f"{label} has no `{col}` column in its `{frame}` frame (written by an older "
                             f"workbench, or edited), so trace the run again.")
        try:
            columns.append(part[col].cast(dtype))
        except pl.exceptions.PolarsError:
            raise InputError(f"{label} has a `{col}` column in its `{frame}` frame that does not hold "
                             f"{dtype} values.") from None
    return pl.DataFrame(columns)


def versions() -> dict[str, str]:
    """The versions of what computed a trace, for its metadata."""
    import numpy
    import torch

    import workbench

    return {"workbench": getattr(workbench, "__version__", "0"), "torch": torch.__version__,
            "numpy": numpy.__version__, "polars": pl.__version__, "python": platform.python_version()}


# Columns diff leaves out: timings differ between any two runs, and the cache's capacity is its preallocated
# size (set by the context length), not a number the forward pass computed.
UNCOMPARED = ("seconds", "tokens_per_s", "capacity_bytes")


@dataclass
class FrameDiff:
    frame: str
    rows_compared: int
    first: dict[str, Any] | None  # the first (step, layer, …) beyond tolerance, with the column and values
    largest: pl.DataFrame  # the largest differences, one row per measured column
    steps_a: int  # distinct steps in each trace's frame, and in both: rows are compared only where both have them
    steps_b: int
    steps_both: int


def diff(a: Trace, b: Trace, rtol: float = 1e-3, atol: float = 1e-6) -> list[FrameDiff]:
    """Per frame: join the two traces on the identifying columns, compare every measured column, and report
    the first row (in step, then layer order) where |a − b| > atol + rtol·max(|a|, |b|), plus the largest
    differences. The tolerance is symmetric, so diff(a, b) and diff(b, a) agree. NaN or ±inf on one side is a
    difference of inf (a run that broke); the same NaN or ±inf on both sides counts as equal (both broke
    the same way). The UNCOMPARED columns are left out."""
    for label, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
            raise InputError(f"{label} must be a finite number ≥ 0, not {tol!r}.")
    out = []
    for name in FRAMES:
        fa, fb = a.frames[name], b.frames[name]
        if fa.is_empty() and fb.is_empty():
            continue
        keys = KEYS[name]
        joined = fa.join(fb, on=keys, how="inner", suffix="_b")
        numeric = [c for c, t in SCHEMAS[name].items()
                   if c not in keys and c not in UNCOMPARED and t in (pl.Int32, pl.Int64, pl.Float64, pl.Boolean)]
        exact = [c for c, t in SCHEMAS[name].items() if c not in keys and t in (pl.String, pl.List(pl.Int64))]
        first: dict[str, Any] | None = None
        largest_rows = []
        for col in numeric:
            va, vb = pl.col(col).cast(pl.Float64), pl.col(f"{col}_b").cast(pl.Float64)
            finite = va.is_finite() & vb.is_finite()
            d = joined.with_columns(
                pl.when(va.eq_missing(vb)).then(0.0).when(finite).then((va - vb).abs()).otherwise(math.inf).alias("_d"),
                pl.when(finite).then(pl.max_horizontal(va.abs(), vb.abs())).otherwise(0.0).alias("_ref"))
            bad = d.filter(pl.col("_d") > atol + rtol * pl.col("_ref")).sort(keys)
            if bad.height:
                row = bad.row(0, named=True)
                cand = {**{k: row[k] for k in keys}, "column": col, "a": row[col], "b": row[f"{col}_b"]}
                if first is None or _order(cand, keys) < _order(first, keys):
                    first = cand
            if d.height:
                worst = d.sort(["_d", *keys], descending=[True] + [False] * len(keys)).row(0, named=True)
                largest_rows.append({"column": col, "max_abs_diff": worst["_d"],
                                     "at": ", ".join(f"{k}={worst[k]}" for k in keys)})
        for col in exact:
            bad = joined.filter(~pl.col(col).eq_missing(pl.col(f"{col}_b"))).sort(keys)
            if bad.height:
                row = bad.row(0, named=True)
                cand = {**{k: row[k] for k in keys}, "column": col, "a": row[col], "b": row[f"{col}_b"]}
                if first is None or _order(cand, keys) < _order(first, keys):
                    first = cand
        largest = pl.DataFrame(largest_rows, schema={"column": pl.String, "max_abs_diff": pl.Float64, "at": pl.String})
        steps_a, steps_b = set(fa["step"].drop_nulls()), set(fb["step"].drop_nulls())
        out.append(FrameDiff(name, joined.height, first, largest, len(steps_a), len(steps_b), len(steps_a & steps_b)))
    return out


def _order(row: dict[str, Any], keys: list[str]) -> tuple:
    return tuple((row[k] if not isinstance(row[k], float) or not math.isnan(row[k]) else 0) for k in keys if k != "path")
