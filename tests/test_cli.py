"""The CLI contract (other tools build on it): commands, JSON keys, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from workbench.cli import main
from workbench.gguf_file import GGUFFile


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_json(tiny_paths, capsys):
    code, out, _ = run(capsys, "inspect", str(tiny_paths["qwen3moe"]), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["arch"] == "qwen3moe"
    assert info["config"]["head_dim"] == 96 and info["config"]["n_experts"] == 8
    assert {"name", "type", "shape", "bytes"} <= set(info["tensors"][0])
    assert info["totals"]["bytes"] == sum(t["bytes"] for t in info["tensors"])


def test_inspect_text_marks_defaults(tiny_paths, capsys):
    code, out, _ = run(capsys, "inspect", str(tiny_paths["gemma3"]))
    assert code == 0
    assert "* swa_pattern" in out and "  head_dim" in out  # defaulted vs read from the file
    assert "blk.0.attn_q.weight" in out


def test_tokenize_json_adds_bos_like_generate(gemma3_path, capsys):
    code, out, _ = run(capsys, "tokenize", str(gemma3_path), "--text", "Hello world", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["ids"][0] == 2 and len(result["ids"]) == len(result["pieces"])  # <bos> first
    assert "".join(result["pieces"][1:]) == "Hello world"


@pytest.mark.parametrize("path", ["cached", "uncached"])
def test_generate_json(tiny_paths, capsys, path):
    code, out, _ = run(capsys, "generate", str(tiny_paths["qwen3"]), "--prompt", "def add(a, b):", "--steps", "8",
                       "--path", path, "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("model", "arch", "device", "dtype", "path", "prompt_ids", "ids", "text", "prefill_seconds",
                "decode_seconds", "decode_tokens_per_s"):
        assert key in result
    assert result["path"] == path and result["device"] == "cpu" and result["dtype"] == "float32"
    assert 1 <= len(result["ids"]) <= 8


def test_generate_paths_agree_and_sampling_is_seeded(tiny_paths, capsys):
    def ids(*extra):
        code, out, _ = run(capsys, "generate", str(tiny_paths["llama"]), "--prompt", "hello", "--steps", "12", "--json", *extra)
        assert code == 0
        return json.loads(out)["ids"]

    assert ids("--path", "cached") == ids("--path", "uncached")
    sampled = ("--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "7")
    assert ids(*sampled) == ids(*sampled)
    assert ids(*sampled) != ids(*sampled[:-1], "8") or ids(*sampled) != ids()


def test_logits_rows(tiny_paths, capsys, tmp_path):
    out_c, out_u = tmp_path / "c.npy", tmp_path / "u.npy"
    args = ["logits", str(tiny_paths["gemma3"]), "--tokens", "1,2,3,4,5,6,7,8,9,10,11", "--weights", "dequantized"]
    assert run(capsys, *args, "--out", str(out_c))[0] == 0
    assert run(capsys, *args, "--out", str(out_u), "--path", "uncached")[0] == 0
    cached, uncached = np.load(out_c), np.load(out_u)
    assert cached.shape == (11, 512) and cached.dtype == np.float32
    np.testing.assert_allclose(cached, uncached, atol=1e-4 * np.abs(uncached).max())


def test_make_tiny(tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert run(capsys, "make-tiny", "--arch", "qwen2", "--out", str(out), "--seed", "3")[0] == 0
    code, text, _ = run(capsys, "inspect", str(out), "--json")
    assert json.loads(text)["arch"] == "qwen2"


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate"])
    assert exc.value.code == 2


def test_python_dash_m(tiny_paths):
    proc = subprocess.run([sys.executable, "-m", "workbench", "inspect", str(tiny_paths["llama"]), "--json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["arch"] == "llama"
    proc = subprocess.run([sys.executable, "-m", "workbench", "inspect", "/nonexistent.gguf"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_trace_and_diff(tiny_paths, capsys, tmp_path):
    from workbench.trace import Trace

    model = str(tiny_paths["qwen3moe"])
    base = ["trace", model, "--prompt", "def add(a, b):", "--steps", "6", "--path", "both"]
    assert run(capsys, *base, "--out", str(tmp_path / "a.parquet"))[0] == 0
    assert run(capsys, *base, "--out", str(tmp_path / "a2.parquet"))[0] == 0
    assert run(capsys, *base, "--break", "cache-off-by-one", "--out", str(tmp_path / "b.parquet"))[0] == 0
    trace = Trace.read(tmp_path / "a.parquet")
    assert trace.tokens.height == 12 and trace.equiv.height == 6 and trace.routing.height > 0
    assert trace.frames["attention"].height == 0 and trace.frames["lens"].height == 0  # opt-in
    assert run(capsys, *base, "--attention", "--lens", "--out", str(tmp_path / "c.parquet"))[0] == 0
    frames = Trace.read(tmp_path / "c.parquet").frames
    n_layers = GGUFFile(tiny_paths["qwen3moe"]).metadata["qwen3moe.block_count"]
    assert frames["lens"].height == 12 * n_layers and frames["attention"].height > 0
    code, out, _ = run(capsys, "diff", str(tmp_path / "a.parquet"), str(tmp_path / "a2.parquet"))
    assert code == 0 and "first differs" not in out  # two runs of the same engine agree (timings aside)
    code, out, _ = run(capsys, "diff", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "--json")
    equiv = next(d for d in json.loads(out) if d["frame"] == "equiv")
    assert equiv["first"]["step"] == 1  # the off-by-one cache shows from the first cached decode step


def test_generate_both_reports_equivalence(tiny_paths, capsys):
    code, out, err = run(capsys, "generate", str(tiny_paths["gemma3"]), "--prompt", "hello", "--steps", "10", "--path", "both")
    assert code == 0 and "cached vs uncached: max |Δlogit|" in err and "argmax equal 10/10" in err
    code, out, _ = run(capsys, "generate", str(tiny_paths["gemma3"]), "--prompt", "hello", "--steps", "4", "--path", "both",
                       "--break", "rope-base-10k", "--json")
    result = json.loads(out)
    assert result["breaks"] == ["rope-base-10k"] and len(result["equiv"]) == 4


def test_unknown_break_is_bad_input(tiny_paths, capsys):
    code, _, err = run(capsys, "generate", str(tiny_paths["llama"]), "--prompt", "hi", "--break", "swap-everything")
    assert code == 1 and "skip-qk-norm" in err


def test_bench_json_uncached_cost_grows_with_position(smollm2_path, capsys):
    def bench(prompt_tokens):
        code, out, _ = run(capsys, "bench", str(smollm2_path), "--prompt-tokens", str(prompt_tokens), "--steps", "3", "--json")
        assert code == 0
        return json.loads(out)

    short, long = bench(16), bench(256)
    for result in (short, long):
        assert {"path", "prompt_tokens", "steps", "tokens_per_s", "ms_per_token", "probes"} <= set(result["rows"][0])
    uncached = lambda r: next(row for row in r["rows"] if row["path"] == "uncached")["ms_per_token"]
    # 16× the tokens per uncached step: ~8× the cost on a quiet machine; 2× leaves room for a busy one
    assert uncached(long) > 2 * uncached(short)
    assert long["speedup"] > 1
