"""Shared fixtures: bundled real models (skipped when their packages are absent) and tiny models per arch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from workbench.config import SUPPORTED_ARCHS as ARCHS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.tiny import TINY_KINDS, write_tiny

    d = tmp_path_factory.mktemp("tiny")
    for kind in TINY_KINDS:  # every arch, then the families (mixtral: a llama file with experts)
        write_tiny(kind, d / f"tiny-{kind}.gguf", seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_paths(tiny_dir: Path) -> dict[str, Path]:
    from workbench.tiny import TINY_KINDS

    return {kind: tiny_dir / f"tiny-{kind}.gguf" for kind in TINY_KINDS}


def _bundled(name: str) -> Path:
    from workbench.errors import InputError
    from workbench.models import resolve

    try:
        return resolve(name)
    except InputError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _bundled("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _bundled("gemma3-270m")


_models: dict[str, object] = {}


def load_model(path: Path, dtype: str = "float32", weights: str = "dequantized"):
    """One loaded copy per (file, dtype, weights) for the whole run: loading is cheap, but not free. The
    dequantized (exact) form by default: the references are held to it; tests/test_fast_paths.py holds the
    quantized form to it in turn."""
    from workbench.model import Model

    key = f"{path}:{dtype}:{weights}"
    if key not in _models:
        _models[key] = Model.load(path, device="cpu", dtype=dtype, weights=weights)
    return _models[key]
