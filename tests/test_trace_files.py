"""Trace files and `workbench diff` on bad input: every bad file is one InputError sentence naming it, and diff
compares both ways alike, sees NaN on either side, checks its tolerances and says when step counts differ."""

from __future__ import annotations

import io
import json
import math
import os
import signal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workbench.cli import main
from workbench.errors import InputError
from workbench.trace import FRAMES, SCHEMAS, Trace, diff, empty


@pytest.fixture(scope="module")
def session_traces(tmp_path_factory):
    """A real short run on a tiny model, traced after 3 steps and after 2 (the shorter one a prefix)."""
    from workbench.model import Model
    from workbench.session import Session
    from workbench.tiny import write_tiny

    d = tmp_path_factory.mktemp("traces")
    model = Model.load(write_tiny("llama", d / "t.gguf", seed=0), device="cpu", dtype="float32", weights="dequantized")
    session = Session(model, model.tokenizer.encode("hi"), probes=True)
    for _ in range(2):
        session.step()
    short = session.trace()
    session.step()
    long = session.trace()
    long.write(d / "long.parquet")
    short.write(d / "short.parquet")
    return long, d / "long.parquet", d / "short.parquet"


def _trace(**frames: list[dict]) -> Trace:
    return Trace({name: pl.DataFrame(frames[name], schema=SCHEMAS[name]) if name in frames else empty(name)
                  for name in FRAMES})


def _qk(*rms: float, step: int = 0) -> list[dict]:
    return [dict(step=step, path="cached", layer=i, head=0, tensor="q", stage="pre", rms=r, max_abs=1.0)
            for i, r in enumerate(rms)]


def _refused(source, label: str, name: str | None = None) -> str:
    with pytest.raises(InputError) as info:
        Trace.read(source, name) if name is not None else Trace.read(source)
    msg = str(info.value)
    assert label in msg and "<_io" not in msg and "\n" not in msg, msg
    assert msg.endswith(".") and ". " not in msg.replace(label, "FILE"), msg  # one sentence
    return msg


def _rewrite(good, out, table=None, **meta: bytes | None):
    """The good trace file's table (or `table`), its workbench metadata changed as given (None: left out)."""
    table = pq.read_table(good) if table is None else table
    md = dict(pq.read_schema(good).metadata)
    for key, value in meta.items():
        md.pop(f"workbench.{key}".encode(), None)
        if value is not None:
            md[f"workbench.{key}".encode()] = value
    pq.write_table(table.replace_schema_metadata(md), out)
    return out


def test_a_trace_round_trips_through_a_path_and_a_file_object(session_traces):
    trace, path, _ = session_traces
    buf = io.BytesIO()
    trace.write(buf)
    buf.seek(0)
    for back in (Trace.read(path), Trace.read(str(path)), Trace.read(buf, "upload.parquet")):
        assert back.meta == json.loads(json.dumps(trace.meta, default=str))
        for name in FRAMES:
            assert back.frames[name].equals(trace.frames[name]), name


def test_paths_that_are_not_files_are_refused(tmp_path):
    assert "does not exist" in _refused(tmp_path / "missing.parquet", "missing.parquet")
    assert "directory" in _refused(tmp_path, str(tmp_path))
    assert "not a regular file" in _refused("/dev/null", "/dev/null")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def hung(*_):
        raise AssertionError("Trace.read opened a FIFO and waited for a writer")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        assert "not a regular file" in _refused(fifo, str(fifo))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_files_that_are_not_parquet_are_refused(tmp_path, session_traces):
    (tmp_path / "notes.txt").write_text("not a trace\n")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "cut.parquet").write_bytes(session_traces[1].read_bytes()[:-100])
    for f in ("notes.txt", "empty.parquet", "cut.parquet"):
        _refused(tmp_path / f, f)
    _refused(io.BytesIO(b"garbage"), "the uploaded file")
    _refused(io.BytesIO(b"garbage"), "mine.parquet", name="mine.parquet")


@pytest.mark.parametrize("meta", [
    {"meta": None},  # a Parquet file, but not ours
    {"meta": b"{not json"}, {"meta": b"\xff\xfe"}, {"meta": b"[1, 2]"}, {"meta": b"3"},
    {"frames": b"\"qk\""}, {"frames": b"{}"}, {"frames": b"[1]"}, {"frames": b"nope"},
])
def test_bad_workbench_metadata_is_refused(tmp_path, session_traces, meta):
    _refused(_rewrite(session_traces[1], tmp_path / "bad.parquet", **meta), "bad.parquet")
    buf = io.BytesIO((tmp_path / "bad.parquet").read_bytes())
    _refused(buf, "the uploaded file")


def test_bad_frames_are_refused(tmp_path, session_traces):
    good = session_traces[1]
    table = pq.read_table(good)
    i = table.schema.get_field_index("rms")
    as_strings = pa.array(["x" if v is not None else None for v in table["rms"].to_pylist()], pa.string())
    bad = {
        "no-frame.parquet": table.drop_columns(["frame"]),
        "int-frame.parquet": table.set_column(0, "frame", pa.array(range(table.num_rows))),
        "dropped.parquet": table.drop_columns(["rms"]),
        "renamed.parquet": table.rename_columns([("RMS" if c == "rms" else c) for c in table.column_names]),
        "strings.parquet": table.set_column(i, "rms", as_strings),
        "old.parquet": table.drop_columns(["capacity_bytes"]),  # an older trace without an optional column
    }
    for f, t in bad.items():
        msg = _refused(_rewrite(good, tmp_path / f, table=t), f)
        if f in ("dropped.parquet", "renamed.parquet", "strings.parquet"):
            assert "qk" in msg and "rms" in msg, msg
    assert "kv" in msg and "capacity_bytes" in msg


def test_diff_is_symmetric():
    a = _trace(qk=_qk(1.0, 1.0, 5.0, 2.0))
    b = _trace(qk=_qk(1.0, 0.6, 5.0, 0.5))
    # layer 1: |Δ| 0.4 is within 0.5·max(1, 0.6) but not within 0.5·0.6; layer 3 differs either way
    for x, y in ((a, b), (b, a)):
        (qk,) = diff(x, y, rtol=0.5, atol=0.0)
        assert qk.first["layer"] == 3 and qk.first["column"] == "rms"
        assert qk.largest.filter(pl.col("column") == "rms").row(0, named=True)["at"].endswith("layer=3, head=0, tensor=q, stage=pre")
    assert diff(a, b, rtol=0.5, atol=0.0)[0].largest.equals(diff(b, a, rtol=0.5, atol=0.0)[0].largest)


@pytest.mark.parametrize("x,y,differs", [
    (1.0, math.nan, True), (math.inf, 1.0, True), (-math.inf, math.inf, True),
    (math.nan, math.nan, False), (math.inf, math.inf, False),
])
def test_diff_sees_nan_and_inf_on_either_side(x, y, differs):
    a, b = _trace(qk=_qk(1.0, x)), _trace(qk=_qk(1.0, y))
    for p, q in ((a, b), (b, a)):
        (qk,) = diff(p, q)
        assert (qk.first is not None) == differs, (x, y)
        if differs:
            assert qk.first["layer"] == 1 and qk.largest.filter(pl.col("column") == "rms")["max_abs_diff"][0] == math.inf


@pytest.mark.parametrize("tol", [{"rtol": math.nan}, {"rtol": -1e-3}, {"rtol": math.inf}, {"atol": math.nan},
                                 {"atol": -1.0}, {"atol": math.inf}])
def test_diff_checks_its_tolerances(tol):
    a = _trace(qk=_qk(1.0))
    with pytest.raises(InputError, match=next(iter(tol))):
        diff(a, a, **tol)


def test_diff_leaves_out_the_cache_capacity():
    row = dict(step=0, path="cached", layer=0, length=3, k_bytes=96, v_bytes=96)
    a, b = _trace(kv=[row | {"capacity_bytes": 4096}]), _trace(kv=[row | {"capacity_bytes": 8192}])
    (kv,) = diff(a, b)
    assert kv.first is None and "capacity_bytes" not in kv.largest["column"].to_list()


def test_diff_counts_the_steps_of_each_trace():
    a = _trace(qk=_qk(1.0, step=0) + _qk(1.0, step=1) + _qk(1.0, step=2))
    b = _trace(qk=_qk(1.0, step=0) + _qk(1.0, step=1))
    (qk,) = diff(a, b)
    assert (qk.steps_a, qk.steps_b, qk.steps_both, qk.rows_compared) == (3, 2, 2, 2)
    (qk,) = diff(b, a)
    assert (qk.steps_a, qk.steps_b, qk.steps_both) == (2, 3, 2)


def test_cli_diff_says_when_step_counts_differ(session_traces, capsys):
    _, long, short = session_traces
    assert main(["diff", str(long), str(short)]) == 0
    out = capsys.readouterr().out
    assert "A has 3 steps, B has 2: compared the 2 steps both have" in out and "first differs" not in out
    assert main(["diff", str(long), str(short), "--json"]) == 0
    tokens = next(d for d in json.loads(capsys.readouterr().out) if d["frame"] == "tokens")
    assert (tokens["steps_a"], tokens["steps_b"], tokens["steps_both"]) == (3, 2, 2)
    assert main(["diff", str(long), str(long)]) == 0
    assert "steps both have" not in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--rtol", "nan"], ["--atol", "-1"], ["--rtol", "inf"]])
def test_cli_diff_refuses_bad_tolerances_in_one_line(session_traces, capsys, extra):
    _, long, short = session_traces
    assert main(["diff", str(long), str(short), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_diff_refuses_a_bad_file_in_one_line(session_traces, capsys, tmp_path):
    _, long, _ = session_traces
    (tmp_path / "x.parquet").write_text("nope")
    for bad in (tmp_path / "x.parquet", tmp_path / "missing.parquet", tmp_path):
        assert main(["diff", str(long), str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err, err


def test_frames_built_step_by_step_equal_a_fresh_build(tiny_paths, monkeypatch):
    """Session.trace() converts only the rows added since its last call (Recorder.frame): after every step, and
    after a failed step took its rows back, its frames equal frames built from all the rows at once."""
    from conftest import load_model
    from workbench.frames import FRAMES
    from workbench.session import Sampling, Session
    from workbench.trace import Recorder, Trace

    def fresh(session):
        r = Recorder()
        for name in FRAMES:
            setattr(r, name, list(getattr(session.records, name)))
        return Trace.from_records(r, {})

    m = load_model(tiny_paths["qwen3moe"])
    s = Session(m, [1, 17, 99, 250], path="both", probes=True, attention=True, lens=True, context=32)
    for i in range(6):
        if i == 3:  # a step that fails after both paths recorded their rows: they are taken back
            real = Sampling.choose
            monkeypatch.setattr(Sampling, "choose", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
            with pytest.raises(RuntimeError):
                s.step()
            monkeypatch.setattr(Sampling, "choose", real)
        else:
            s.step()
        built, whole = s.trace(), fresh(s)
        for name in FRAMES:
            assert built.frames[name].equals(whole.frames[name]), (i, name)
