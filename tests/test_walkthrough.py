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
        "breaks": {name: {k: r[k] for k in ("alarm frame", "alarm step", "first frame", "first step")} for name, r in report.items()},
        "all_breaks": sorted(defs["BREAKS"]),
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
