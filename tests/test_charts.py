"""Every chart builder on a real trace: it returns an Altair chart whose data has rows, and the app's notebook
runs headless as a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import altair as alt
import pytest

from conftest import load_model
from workbench import charts
from workbench.session import Session

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trace(tiny_paths):
    model = load_model(tiny_paths["qwen3moe"])
    session = Session(model, model.tokenizer.encode("def add(a, b):"), path="both", probes=True, context=64)
    for _ in range(6):
        session.step()
    return session.trace()


def _rows(chart) -> int:
    spec = chart.to_dict()
    datasets = spec.get("datasets", {})
    return sum(len(v) for v in datasets.values())


def test_every_chart_has_data(trace):
    n_experts = trace.meta["config"]["n_experts"]
    built = [
        charts.kv_growth(trace.kv), charts.kv_positions(trace.kv),
        charts.qk_heatmap(trace.qk, 5, "q", alt.selection_point(fields=["layer", "head"])), charts.qk_over_steps(trace.qk, 1, 2),
        charts.routing_histogram(trace.routing, 1, n_experts), charts.routing_heatmap(trace.routing),
        charts.routing_last_token(trace.routing), charts.step_latency(trace.tokens), charts.tokens_per_s(trace.tokens),
        charts.equivalence(trace.equiv, trace.meta["equiv_tolerance"]), charts.layer_health(trace.layers),
    ]
    for chart in built:
        assert _rows(chart) > 0, chart


def test_empty_frames_give_a_message_not_an_error(trace):
    assert _rows(charts.reference(trace.reference)) == 1  # the "switch it on" message
    assert _rows(charts.equivalence(trace.equiv.clear(), trace.meta["equiv_tolerance"])) == 1


def test_token_html_shows_every_token_with_its_alternatives(trace):
    html = charts.token_html(trace.meta["prompt_pieces"], trace.meta["prompt_ids"], trace.tokens)
    assert html.count('class="tok"') == len(trace.meta["prompt_ids"])
    assert html.count('class="tok gen"') == 6
    assert "top-k:" in html


def test_speedup_and_kv_arithmetic(trace):
    assert charts.speedup(trace.tokens) > 0
    cfg = trace.meta["config"]
    text = charts.kv_arithmetic(trace.meta, 10)
    per_token = cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * 2 * 4
    assert f"{per_token:,} bytes per token" in text


def test_notebook_runs_headless():
    proc = subprocess.run([sys.executable, str(ROOT / "notebooks" / "workbench.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
