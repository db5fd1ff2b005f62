"""Bad input: one clear sentence in a typed exception (API) or `error: …` and exit 1 (CLI), never a
traceback, never zeros loaded from a truncated file. A hypothesis test mutates a tiny GGUF's bytes and checks
that only the project's own error types come out."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import GGUFError, InputError, ModelError, UnsupportedError, WorkbenchError
from workbench.gguf_file import GGUFFile
from workbench.model import Model
from workbench.session import Sampling, Session

from conftest import load_model
from workbench.tiny import copy_gguf


def rewrite(src: Path, dst: Path, meta=lambda key, value: value, drop_tensor: str | None = None,
            retype: tuple[str, GGMLQuantizationType, int] | None = None) -> Path:
    """Copy a GGUF through gguf-py, editing metadata values (meta returns None to drop a key) or tensors;
    retype: (tensor, new type, bytes per row), its data zeroed."""
    def tensor(name, data, qtype):
        if name == drop_tensor:
            return None
        if retype and retype[0] == name:
            return np.zeros((data.shape[0], retype[2]), dtype=np.uint8), retype[1]
        return data, qtype

    return copy_gguf(src, dst, meta=meta, tensor=tensor)


def cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- files that are not GGUF models ---

def test_missing_file(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, "inspect", str(tmp_path / "nope.gguf"))


def test_directory(tmp_path, capsys):
    assert "directory" in cli_error(capsys, "inspect", str(tmp_path))


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "empty" in cli_error(capsys, "inspect", str(tmp_path / "empty.gguf"))


def test_bad_magic(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(100))
    assert "not a GGUF file" in cli_error(capsys, "inspect", str(tmp_path / "x.gguf"))


def test_unsupported_version(tmp_path, tiny_paths, capsys):
    data = bytearray(tiny_paths["llama"].read_bytes())
    data[4:8] = struct.pack("<I", 7)
    (tmp_path / "v7.gguf").write_bytes(bytes(data))
    assert "version 7" in cli_error(capsys, "inspect", str(tmp_path / "v7.gguf"))


@pytest.mark.parametrize("keep", [10, 200, 3000, -1])
def test_truncated_file_never_loads_zeros(tmp_path, tiny_paths, keep):
    data = tiny_paths["qwen3"].read_bytes()
    cut = len(data) - 1 if keep == -1 else keep
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(GGUFError, match="truncated|ends in the middle"):
        GGUFFile(path)


def test_absurd_counts(tmp_path, tiny_paths):
    data = bytearray(tiny_paths["llama"].read_bytes())
    data[8:16] = struct.pack("<Q", 2**60)  # tensor count
    (tmp_path / "a.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="more than"):
        GGUFFile(tmp_path / "a.gguf")


def test_absurd_string_length(tmp_path, tiny_paths):
    data = bytearray(tiny_paths["llama"].read_bytes())
    data[24:32] = struct.pack("<Q", 2**62)  # length of the first key
    (tmp_path / "s.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError):
        GGUFFile(tmp_path / "s.gguf")


# --- valid GGUF, wrong model ---

def test_unsupported_arch(tmp_path, tiny_paths, capsys):
    path = rewrite(tiny_paths["llama"], tmp_path / "m.gguf", meta=lambda k, v: "mamba" if k == "general.architecture" else v)
    err = cli_error(capsys, "inspect", str(path))
    assert "mamba" in err and "qwen3moe" in err


def test_metadata_of_wrong_type(tmp_path, tiny_paths):
    path = rewrite(tiny_paths["qwen3"], tmp_path / "t.gguf", meta=lambda k, v: "many" if k == "qwen3.block_count" else v)
    with pytest.raises(ModelError, match="qwen3.block_count"):
        ModelConfig.from_gguf(GGUFFile(path))


def test_missing_required_key(tmp_path, tiny_paths):
    path = rewrite(tiny_paths["qwen3"], tmp_path / "k.gguf", meta=lambda k, v: None if k == "qwen3.embedding_length" else v)
    with pytest.raises(ModelError, match="embedding_length"):
        ModelConfig.from_gguf(GGUFFile(path))


def test_missing_tensor(tmp_path, tiny_paths, capsys):
    path = rewrite(tiny_paths["qwen3moe"], tmp_path / "d.gguf", drop_tensor="blk.1.ffn_up_exps.weight")
    assert "blk.1.ffn_up_exps.weight" in cli_error(capsys, "generate", str(path), "--prompt", "hi", "--steps", "1")


def test_shape_disagrees_with_config(tmp_path, tiny_paths):
    cfg = ModelConfig.from_gguf(GGUFFile(tiny_paths["llama"]))
    path = rewrite(tiny_paths["llama"], tmp_path / "s.gguf",
                   meta=lambda k, v: cfg.ffn_hidden * 2 if k == "llama.feed_forward_length" else v)
    with pytest.raises(ModelError, match="ffn_.*shape"):
        Model.load(path, device="cpu")


def test_unsupported_quant_type_names_the_tensor(tmp_path, tiny_paths):
    info = GGUFFile(tiny_paths["llama"]).tensors["blk.0.attn_q.weight"]
    row_bytes = info.shape[-1] // 256 * 292  # Q8_K: 256 values in 292 bytes, and gguf-py cannot dequantize it
    path = rewrite(tiny_paths["llama"], tmp_path / "q.gguf", retype=(info.name, GGMLQuantizationType.Q8_K, row_bytes))
    with pytest.raises(UnsupportedError, match="blk.0.attn_q.weight.*Q8_K"):
        Model.load(path, device="cpu")


# --- bad requests ---

def test_token_ids_out_of_range(tiny_paths, capsys, tmp_path):
    model = load_model(tiny_paths["llama"])
    with pytest.raises(InputError, match="outside the vocabulary"):
        Session(model, [1, model.config.vocab_size])
    with pytest.raises(InputError, match="outside the vocabulary"):
        Session(model, [-1])
    err = cli_error(capsys, "logits", str(tiny_paths["llama"]), "--tokens", f"1,{model.config.vocab_size}",
                    "--out", str(tmp_path / "x.npy"))
    assert "outside the vocabulary" in err


def test_empty_prompt(tiny_paths, gemma3_path, capsys):
    model = load_model(tiny_paths["llama"])  # gpt2-style vocab: no BOS, so an empty prompt has no tokens
    assert model.tokenizer.encode("") == []
    assert "empty" in cli_error(capsys, "generate", str(tiny_paths["llama"]), "--prompt", "", "--steps", "1")
    gemma = load_model(gemma3_path)  # adds BOS: an empty prompt is one token, and that is fine
    assert gemma.tokenizer.encode("") == [gemma.tokenizer.bos_id]
    Session(gemma, gemma.tokenizer.encode("")).step()


def test_prompt_longer_than_context(tiny_paths, capsys):
    model = load_model(tiny_paths["llama"])
    n = model.config.context_length
    with pytest.raises(InputError, match="context"):
        Session(model, [5] * n, context=n)
    err = cli_error(capsys, "logits", str(tiny_paths["llama"]), "--tokens", ",".join(["5"] * (n + 1)), "--out", "/tmp/x.npy")
    assert "context" in err


def test_context_full_is_reported(tiny_paths):
    model = load_model(tiny_paths["llama"])
    session = Session(model, [5, 6], context=4)
    results = list(session.generate(10))
    assert len(results) == 2 and results[-1].stop in ("context", "eos")
    with pytest.raises(InputError, match="full"):
        session.step()


@pytest.mark.parametrize("flag,value", [("--device", "tpu"), ("--dtype", "int3"), ("--temperature", "-1"),
                                        ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-2")])
def test_bad_device_dtype_sampling(flag, value, tiny_paths, capsys):
    cli_error(capsys, "generate", str(tiny_paths["llama"]), "--prompt", "hi", "--steps", "1", flag, value)


def test_cuda_without_gpu(tiny_paths, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "CUDA" in cli_error(capsys, "generate", str(tiny_paths["llama"]), "--prompt", "hi", "--device", "cuda")


def test_sampling_rejects_nan():
    with pytest.raises(InputError):
        Sampling(temperature=float("nan"))


# --- fuzz: any mutation of a valid file gives a model or one of our errors ---

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_only_raises_our_errors(data, tiny_paths, tmp_path):
    original = tiny_paths["qwen3moe"].read_bytes()
    header_end = GGUFFile(tiny_paths["qwen3moe"]).data_offset
    raw = bytearray(original)
    n_edits = data.draw(st.integers(1, 8))
    for _ in range(n_edits):
        # Mostly the header (where structure lives), sometimes anywhere.
        limit = header_end if data.draw(st.booleans()) else len(raw)
        pos = data.draw(st.integers(0, limit - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        model = Model.load(path, device="cpu")
        ids = model.tokenizer.encode("def f(x):") or [0]
        Session(model, ids, context=len(ids) + 2).step()
    except WorkbenchError:
        pass
