"""The dump writers docs/compare.md gives other engines (docs/writers/): what they write reads back as the
dump they mean. The C++ one is compiled when a compiler is at hand; the Rust one needs the safetensors crate
(no crate registry here), so it is only held to the same demo by eye."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.dump import Dump

WRITERS = Path(__file__).resolve().parents[1] / "docs" / "writers"
HIDDEN = 8


def expected_demo(d: Dump) -> None:
    assert (d.tokens, d.n_prompt) == ([1, 5, 9, 4], 3)
    assert d.keys() == [(0, "blocks.0.attn_norm"), (1, "blocks.0.moe.topk_ids"), (1, "blocks.0.resid_post")]
    assert torch.equal(d.tensors[(0, "blocks.0.attn_norm")], 0.25 * torch.arange(3 * HIDDEN, dtype=torch.float32).view(3, HIDDEN) - 1)
    assert torch.equal(d.tensors[(1, "blocks.0.resid_post")], -0.5 * torch.arange(HIDDEN, dtype=torch.float32)[None])
    assert d.tensors[(1, "blocks.0.moe.topk_ids")].tolist() == [[3, 1]]


def test_python_writer(tmp_path):
    out = tmp_path / "py.safetensors"
    subprocess.run([sys.executable, str(WRITERS / "write_dump.py"), str(out)], check=True)
    d = Dump.read(out)
    expected_demo(d)
    assert d.engine == "python demo"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_writer(tmp_path):
    exe, out = tmp_path / "write_dump", tmp_path / "cpp.safetensors"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-DDUMP_DEMO",
                    str(WRITERS / "write_dump.cpp"), "-o", str(exe)], check=True)
    subprocess.run([str(exe), str(out)], check=True)
    d = Dump.read(out)
    expected_demo(d)
    assert d.engine == "c++ demo"
    assert int.from_bytes(out.read_bytes()[:8], "little") % 8 == 0  # the header is padded to 8 bytes
