"""Truth first: the default path is the exact one, every mix of tensor types decodes on every path, a loaded
model owns its numbers, a step is all or nothing, and non-finite numbers stop generation with a sentence."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCHS
from gguf import MODEL_TENSOR as E
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from workbench import blocks, loading, tiny
from workbench.cli import main
from workbench.errors import InputError, NumericError, ResourceError
from workbench.frames import FRAMES
from workbench.model import Model
from workbench.session import Sampling, Session
from workbench.tiny import copy_gguf

PROMPT = "def add(a, b):\n    return"


def close_to_exact(fast: torch.Tensor, exact: torch.Tensor, median: float = 0.99) -> bool:
    """The quantized form (bfloat16 activations) against the exact logits [T, vocab]: a wrong dispatch gives
    garbage (cosine ~0). Rows are not all ≥ 0.999 as on the bundled models (tests/test_fast_paths.py): on random
    tiny weights bf16 rounding flips near-tie router choices (measured down to 0.971 with every expert F32),
    and 8-bit requantized Q2_K rows drift with position (0.9885 after 11 tokens)."""
    cos = torch.nn.functional.cosine_similarity(fast, exact, dim=-1)
    return bool(cos.median() > median and cos.min() > 0.95)


def decode(model: Model, path: str, steps: int = 6, **kw) -> tuple[list[int], list[torch.Tensor]]:
    session = Session(model, model.tokenizer.encode(PROMPT), path=path, **kw)
    results = list(session.generate(steps))
    return [r.token_id for r in results], [r.logits.float().cpu() for r in results]


def teacher_forced(model: Model, ids: list[int], path: str, probe=None) -> torch.Tensor:
    """Next-token logits after every prefix of ids, on the cached path (one token per forward) or uncached."""
    cache = model.new_cache(len(ids))
    tokens = torch.tensor(ids)
    if path == "uncached":
        return model.forward(tokens, 0, cache, probe).float()
    return torch.cat([model.forward(tokens[i : i + 1], i, cache) for i in range(len(ids))]).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- every mix of tensor types ------------------------------------------------------------------------------

BLOCK_32 = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
FLOATS = (T.F32, T.F16, T.BF16)


def write_mixed(arch: str, path: Path, seed: int, monkeypatch) -> Path:
    """The tiny `arch` model with every matrix (each expert stack on its own) given a type drawn per layer from
    floats, 32-value block types and K-quants (where its rows are a multiple of 256)."""
    rng = random.Random(seed)
    spec = tiny.TINY_SPECS[arch]
    types = {}
    rows = {kind: shape[-1] for name, shape, kind, _ in tiny.tensor_plan(tiny.tiny_arch(arch), spec) if name.endswith(".weight")}
    for kind in tiny.QUANT_TYPES[arch]:
        pool = FLOATS + BLOCK_32 + (K_TYPES if rows[kind] % 256 == 0 else ())
        types[kind] = tuple(rng.choice(pool) for _ in range(spec.n_layers))
    monkeypatch.setattr(tiny, "QUANT_TYPES", {**tiny.QUANT_TYPES, arch: types})
    return tiny.write_tiny(arch, path, seed=seed)


def test_mixed_expert_stacks_decode_in_every_mode(tmp_path, monkeypatch):
    """The file of the issue: gate and up F16, down Q4_0 (main crashed in quantized mode: 'shape [1] is
    invalid for input of size 2'), and the reverse."""
    for n, (gate_up, down) in enumerate(((T.F16, T.Q4_0), (T.Q4_K, T.F32), (T.Q8_0, T.Q4_0))):
        types = {**tiny.QUANT_TYPES["qwen3moe"], E.FFN_GATE_EXP: (gate_up,), E.FFN_UP_EXP: (T.F16 if n == 1 else gate_up,),
                 E.FFN_DOWN_EXP: (down,)}
        monkeypatch.setattr(tiny, "QUANT_TYPES", {**tiny.QUANT_TYPES, "qwen3moe": types})
        path = tiny.write_tiny("qwen3moe", tmp_path / f"mixed{n}.gguf", seed=n)
        exact = Model.load(path, device="cpu", weights="dequantized")
        ids, _ = decode(exact, "both")  # cached and uncached side by side, prefill and decode steps
        ids = exact.tokenizer.encode(PROMPT) + ids
        ref = teacher_forced(exact, ids, "uncached")
        assert rel(teacher_forced(exact, ids, "cached"), ref) < 1e-4
        fast = Model.load(path, device="cpu", weights="quantized")
        decode(fast, "both")
        fast_logits = teacher_forced(fast, ids, "cached")
        assert rel(fast_logits, teacher_forced(fast, ids, "uncached")) < fast.equivalence_tolerance
        assert close_to_exact(fast_logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mix_of_types_on_every_path(arch, tmp_path, monkeypatch):
    """Random mixes per matrix, per expert stack and per layer: cached ≡ uncached in every weight mode, the
    blocks form equal to the exact one (1e-5), the quantized form close to it, the static-shape step ≡ the
    eager step."""
    for seed in (1, 2):
        path = write_mixed(arch, tmp_path / f"{arch}-{seed}.gguf", seed, monkeypatch)
        exact = Model.load(path, device="cpu", weights="dequantized")
        ids = exact.tokenizer.encode(PROMPT)[:12]
        ref = teacher_forced(exact, ids, "uncached")
        assert rel(teacher_forced(exact, ids, "cached"), ref) < 1e-4
        fast = Model.load(path, device="cpu", weights="quantized")
        fast_uncached = teacher_forced(fast, ids, "uncached")
        assert rel(teacher_forced(fast, ids, "cached"), fast_uncached) < fast.equivalence_tolerance
        if exact.config.gating == "sigmoid":
            # deepseek2 V3: sigmoid scores sit close together and whole expert groups are in or out, so bf16
            # rounding flips choices (measured min cosine 0.91 at one position); with the exact run's experts
            # the quantized arithmetic is what is measured.
            chosen = {}
            exact.forward(torch.tensor(ids), 0, exact.new_cache(len(ids)),
                          lambda name, t: chosen.setdefault(name, t.clone()) if name.endswith("topk_ids") else None)
            fast_uncached = teacher_forced(fast, ids, "uncached", lambda name, t: chosen.get(name))
        # MLA chains five matmuls per attention (q_a, q_b, kv_a, the latent's K and V heads) where others have two:
        # seed 1's mix, with the exact run's experts, has a median cosine of 0.9899 (its Q2_K/Q3_K rows drift)
        assert close_to_exact(fast_uncached, ref, 0.985 if exact.config.is_mla else 0.99)
        models = [exact, fast]
        if blocks.available() is None:  # the file's own blocks: the exact path's numbers, every type of the mix
            kept = Model.load(path, device="cpu", weights="blocks")
            kept_uncached = teacher_forced(kept, ids, "uncached")
            assert rel(kept_uncached, ref) < 1e-5 and rel(teacher_forced(kept, ids, "cached"), kept_uncached) < 1e-4
            models.append(kept)
        for m in models:  # the static step (what CUDA graphs and torch.compile run) at the last position
            cache = m.new_cache(len(ids))
            m.forward(torch.tensor(ids[:-1]), 0, cache)
            static = m.forward(torch.tensor(ids[-1:]), 0, cache, last_only=True, pos=torch.tensor([len(ids) - 1]))
            assert rel(static.float()[0], teacher_forced(m, ids, "uncached")[-1]) < m.equivalence_tolerance


# --- exact by default ----------------------------------------------------------------------------------------

def test_auto_is_the_exact_path_where_it_fits(tiny_paths, monkeypatch):
    m = Model.load(tiny_paths["qwen3moe"], device="cpu")
    if blocks.available() is None:  # the block kernels built here: the exact path at the file's bytes
        assert m.info.weights == "blocks" and m.equivalence_tolerance == 1e-4
        monkeypatch.setattr(blocks, "available", lambda: "no C++ compiler was found")
    m = Model.load(tiny_paths["qwen3moe"], device="cpu")
    assert m.info.weights == "dequantized" and m.equivalence_tolerance == 1e-4
    monkeypatch.setattr(loading, "free_memory", lambda device: 1 << 20)  # 1 MiB free: does not fit
    assert Model.load(tiny_paths["qwen3moe"], device="cpu").info.weights == "quantized"


def test_cli_names_the_arithmetic(tiny_paths, capsys):
    assert main(["generate", str(tiny_paths["qwen3"]), "--prompt", "hi", "--steps", "2", "--threads", "1",
                 "--weights", "dequantized"]) == 0
    err = capsys.readouterr().err
    assert "dequantized: float32 matrices, float32 activations (exact)" in err and "1 threads" in err
    assert main(["generate", str(tiny_paths["qwen3"]), "--prompt", "hi", "--steps", "2", "--weights", "blocks"]) == 0
    assert "blocks: the file's GGUF blocks with float32 activations (exact up to summation order)" in capsys.readouterr().err
    assert main(["generate", str(tiny_paths["qwen3"]), "--prompt", "hi", "--steps", "2", "--weights", "quantized"]) == 0
    assert "bfloat16 activations" in capsys.readouterr().err


# --- a loaded model owns its numbers ---------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["dequantized", "blocks", "quantized"])
def test_changing_the_file_after_load_changes_nothing(tiny_paths, tmp_path, weights):
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_paths["qwen3moe"], path)
    m = Model.load(path, device="cpu", weights=weights)
    ids = m.tokenizer.encode(PROMPT)
    before = teacher_forced(m, ids, "uncached")
    tiny.write_tiny("qwen3moe", path, seed=7)  # rewritten in place (same layout, other numbers)
    assert torch.equal(teacher_forced(m, ids, "uncached"), before)
    with open(path, "r+b") as fh:  # truncated: reading a mapped page past the end would be a bus error
        fh.truncate(100)
    assert torch.equal(teacher_forced(m, ids, "uncached"), before)


# --- a step is all or nothing -----------------------------------------------------------------------------

def state(session: Session) -> tuple:
    return (list(session.ids), session.n_fed, session.n_steps, {k: len(getattr(session.records, k)) for k in FRAMES},
            list(session.cache.lengths) if session.cache else None)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_a_failed_step_leaves_the_session_as_it_was(tiny_paths, failure):
    m = Model.load(tiny_paths["qwen3moe"], device="cpu")
    clean, _ = decode(m, "both", steps=5, probes=True, sampling=Sampling(temperature=0.8, seed=3))

    session = Session(m, m.tokenizer.encode(PROMPT), path="both", probes=True, sampling=Sampling(temperature=0.8, seed=3))
    session.step(), session.step()
    before = state(session)
    forward = m.forward

    def failing(tokens, *args, **kwargs):  # the uncached forward (the whole sequence) fails, as an interrupt would
        if tokens.shape[0] > 1:
            raise failure
        return forward(tokens, *args, **kwargs)

    m.forward = failing
    try:
        with pytest.raises(KeyboardInterrupt if failure is KeyboardInterrupt else ResourceError):
            session.step()
    finally:
        del m.forward
    assert state(session) == before
    for _ in range(3):
        session.step()
    assert session.ids[len(session.prompt_ids):] == clean  # the same tokens as a run that never failed


def test_sampling_survives_extreme_temperatures_and_infinities():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert Sampling(temperature=1e-40).choose(logits, g) == 1  # main: multinomial on inf scores
    assert Sampling(temperature=1e-320).choose(logits, g) == 1
    assert Sampling(temperature=1.0).choose(torch.tensor([0.0, float("inf"), 1.0]), g) == 1
    assert Sampling(temperature=1.0).choose(torch.tensor([0.0, 1.0, 50.0, 60.0]), g, n_valid=3) == 2
    for bad in (dict(seed=-1), dict(seed=2**64), dict(seed=1.5), dict(top_k=2.5), dict(temperature=float("nan"))):
        with pytest.raises(InputError):
            Sampling(**bad)


def test_cli_seed_outside_int64_is_one_sentence(tiny_paths, capsys):
    assert main(["generate", str(tiny_paths["llama"]), "--prompt", "hi", "--temperature", "1", "--seed", str(2**64)]) == 1
    assert capsys.readouterr().err.startswith("error: the seed must be")


# --- non-finite numbers stop generation, naming where they began ------------------------------------------

def rewrite_tensor(src: Path, dst: Path, name: str, edit) -> Path:
    """Copy a GGUF, storing tensor `name` as F32 after edit(values) (every other tensor as it was)."""
    def tensor(n, data, qtype):
        return (edit(dequantize(data, qtype).astype(np.float32)), T.F32) if n == name else (data, qtype)

    return copy_gguf(src, dst, tensor=tensor)


def poison(values: np.ndarray) -> np.ndarray:
    values[0, 0] = np.inf
    values[1, 1] = np.nan
    return values


def test_an_inf_in_the_output_head_stops_generation(tiny_paths, tmp_path, capsys):
    path = rewrite_tensor(tiny_paths["llama"], tmp_path / "inf-head.gguf", "output.weight", poison)
    assert main(["generate", str(path), "--prompt", "hi", "--temperature", "1", "--steps", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 0: the cached path's logits hold NaN or Inf") and "output head" in err


def test_a_nan_weight_is_named_by_its_layer(tiny_paths, tmp_path):
    path = rewrite_tensor(tiny_paths["qwen3moe"], tmp_path / "nan-layer.gguf", "blk.1.attn_k.weight", poison)
    m = Model.load(path, device="cpu")
    session = Session(m, m.tokenizer.encode(PROMPT), path="both")
    with pytest.raises(NumericError, match=r"blocks\.1\.attn\.k \(layer 1\)"):
        session.step()
    assert session.n_steps == 0 and session.ids == session.prompt_ids


def test_gemma3_float16_overflow_is_a_sentence_not_pad_tokens(gemma3_path):
    m = Model.load(gemma3_path, device="cpu", dtype="float16")
    session = Session(m, m.tokenizer.encode("The capital of France is"))
    with pytest.raises(NumericError, match="float16 overflows"):
        for _ in range(8):
            session.step()


# --- bounds ------------------------------------------------------------------------------------------------

def test_kv_cache_bounded_by_free_memory(tiny_paths, tmp_path, capsys):
    path = copy_gguf(tiny_paths["llama"], tmp_path / "long.gguf",
                   meta=lambda key, value: 1 << 24 if key == "llama.context_length" else value)
    assert main(["generate", str(path), "--prompt", "hi", "--steps", str((1 << 24) - 8)]) == 1  # main: a failed 64 GiB allocation
    assert "of KV cache" in capsys.readouterr().err


def test_a_four_token_vocabulary_decodes(tiny_paths, tmp_path):
    """Fewer tokens than the top-5 candidates the probes and the reference record (main: topk(5) failed)."""
    def meta(key, value):
        if key == "tokenizer.ggml.tokens":
            return ["a", "b", "ab", "c"]
        if key == "tokenizer.ggml.token_type":
            return value[:4]
        if key == "tokenizer.ggml.merges":
            return ["a b"]
        if key.endswith("_token_id"):
            return 3
        return {"llama.vocab_size": 4}.get(key, value)

    heads = ("token_embd.weight", "output.weight")  # the embedding and head keep their first 4 rows
    path = copy_gguf(tiny_paths["llama"], tmp_path / "v4.gguf", meta=meta,
                     tensor=lambda name, data, qtype: (data[:4] if name in heads else data, qtype))
    m = Model.load(path, device="cpu")
    session = Session(m, [1, 2, 3], path="both", probes=True)
    for _ in range(3):
        session.step()
    assert session.trace().tokens["top_ids"].list.len().to_list() == [4] * 6


def test_bench_prompt_that_encodes_to_nothing_is_refused(tiny_paths, monkeypatch):
    from workbench.bench import bench_prompt

    m = Model.load(tiny_paths["llama"], device="cpu")
    monkeypatch.setattr(m.tokenizer, "encode", lambda text: [])
    with pytest.raises(InputError, match="encodes to no tokens"):
        bench_prompt(m, 16)  # main: looped forever


def test_non_utf8_stdout(tiny_paths):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    run = subprocess.run([sys.executable, "-m", "workbench", "generate", str(tiny_paths["llama"]), "--prompt", "héllo wörld",
                          "--steps", "4"], capture_output=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-500:]
    assert b"Traceback" not in run.stderr and run.stdout.startswith(b"h\\xe9llo")


# --- the reference engine fails: the session goes on and says why ----------------------------------------

@pytest.mark.parametrize("engine", ["llama.cpp", "llama.cpp-f32"])
def test_reference_on_a_file_changed_since_load_is_refused_and_the_session_runs(engine, tiny_paths, tmp_path, monkeypatch):
    """llama.cpp reads the file itself: once it changed on disk it would run another model than ours (which
    kept what it read), so the reference says so and stays off; the session decodes on, its trace has no hash."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_paths["llama"], path)
    m = Model.load(path, device="cpu")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    session = Session(m, m.tokenizer.encode(PROMPT), reference=engine)
    assert "changed on disk" in session.reference_error
    assert session.step().token_id >= 0 and not session.records.reference
    assert session.trace().meta["model_sha256"] is None


def test_reference_crash_mid_session_turns_it_off(tiny_paths, capsys):
    pytest.importorskip("llama_cpp")
    import signal

    m = Model.load(tiny_paths["llama"], device="cpu")
    session = Session(m, m.tokenizer.encode(PROMPT), reference="llama.cpp")
    session.step()
    os.kill(session.reference_engine.worker_pid, signal.SIGKILL)
    result = session.step()
    assert "crashed" in result.warning and "crashed" in session.reference_error
    session.step()
    assert session.n_steps == 3 and len(session.records.reference) == 1
    assert main(["generate", str(tiny_paths["llama"]), "--prompt", "hi", "--steps", "2", "--reference", "llama.cpp"]) == 0
    assert "vs llama.cpp: min cosine" in capsys.readouterr().err
