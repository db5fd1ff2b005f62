"""llama.cpp's dumps (reference.llama_cpp_dump, through its eval callback) against our own (dump.ours), point by
point: on its F32 copy with an F32 KV cache ("llama.cpp-f32") every capture point agrees to float32 rounding
(measured ≤ 2.5e-6 relative L2 on the tiny models, ≤ 6.6e-6 on SmolLM2), ids exactly, except where llama.cpp's
CPU GELU reads its float16 table (gemma3: from blocks.0.ffn_out on, ~4e-4); on the file as it is ("llama.cpp",
activations quantized to 8 bits in its matmuls) cosines ≥ 0.99. Each arch's set of mapped points is listed, so
a mapping that silently vanishes (a node renamed in a new llama.cpp) fails here. Last, llama-eval-callback's text
(reference.read_eval_callback_text): its lines for a real run's nodes read back as the same points' statistics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS, load_model

from workbench.dump import Dump, order_key, ours, split_capture
from workbench.errors import ReferenceFailed
from workbench.reference import LLAMA_CPP_NODES, llama_cpp_dump, node_table
from workbench.tiny import TINY_KINDS

pytest.importorskip("llama_cpp")

PROMPT = [1, 17, 99, 250, 3]
TOKENS = PROMPT + [411, 42, 7]  # the prompt as one batch, then 3 steps
# gemma3's tiny model slides a window of 8: two steps more, so that its local layers mask keys in the pattern
LONG = TOKENS + [300, 12]

DENSE = {"attn_norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.pattern", "attn.out",
         "resid_mid", "ffn_norm", "ffn_out", "resid_post", "final_norm", "logits"}
QK_NORM = {"attn.q_normed", "attn.k_normed"}
MOE = {"moe.router_logits", "moe.topk_ids", "moe.topk_weights"}
EXPECTED = {"llama": DENSE, "qwen2": DENSE, "qwen3": DENSE | QK_NORM, "qwen3moe": DENSE | QK_NORM | MOE,
            "gemma3": DENSE | QK_NORM, "llama-moe": DENSE | MOE,  # llama-moe: a llama file with experts (Mixtral)
            "qwen2moe": DENSE | MOE | {"moe.shared_gate"}, "olmoe": DENSE | QK_NORM | MOE}
# deepseek2: latent attention's points instead of per-head K/V; its three tables differ in the routing weights' node
MLA = DENSE - {"attn.k", "attn.v", "attn.q_rope", "attn.k_rope"} | {"attn.q_pe", "attn.kv_latent", "attn.k_pe"}
EXPECTED |= {table: MLA | MOE for table in ("deepseek2", "deepseek2-norm", "deepseek2-plain")} | {"gpt-oss": DENSE | MOE}
# An older deepseek2 file (one attn_kv_b) runs llama.cpp's MHA graph, which turns the whole reshaped q (one ROPE node
# named Qcur) rather than a q_pe view: no q_pe node to read there.
NOT_IN_MHA_GRAPH = {"attn.q_pe"}
EXACT = 2e-5  # relative L2, float32 against float32
GELU_TABLE = {"tiny": 2e-3, "real": 2e-2}  # measured worst 8e-4 (tiny gemma3) and 6.3e-3 (Gemma-3-270M pattern)


@pytest.fixture
def tiny_cache(tmp_path_factory, monkeypatch):
    """The tiny models' F32 copies in a cache of the test run's own (the real models' stay in the model cache)."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "f32-cache"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def _check_points(theirs: Dump, mine: Dump, table: str, missing: frozenset[str] = frozenset()) -> None:
    """Both dumps hold the same (step, capture) keys, and those are every layer and step of EXPECTED[table] (but
    `missing`, nodes this graph lacks), each layer's as ours has them (deepseek2's leading dense layer: no MoE)."""
    points = {split_capture(c)[1] for _, c in theirs.tensors}
    assert points == EXPECTED[table] - missing, f"llama.cpp gave {sorted(points)}"
    assert set(theirs.tensors) == {k for k in mine.tensors if split_capture(k[1])[1] not in missing}
    for (step, capture), t in theirs.tensors.items():
        assert t.shape == mine.tensors[(step, capture)].shape, (step, capture)
        assert t.dtype == (torch.int64 if capture.endswith("topk_ids") else torch.float32)


def _worst(theirs: Dump, mine: Dump, measure) -> dict[str, float]:
    """measure(ours, theirs) per (step, capture), the worst over steps, in forward order of the capture."""
    worst: dict[str, float] = {}
    for (step, capture), t in theirs.tensors.items():
        m = mine.tensors[(step, capture)]
        if t.dtype == torch.int64:
            assert torch.equal(t, m), (step, capture, t, m)
            continue
        value = measure(m, t)
        worst[capture] = value if capture not in worst else max(worst[capture], value)
    return dict(sorted(worst.items(), key=lambda kv: order_key(0, kv[0])))


def _check_exact(theirs: Dump, mine: Dump, arch: str, gelu_bound: float) -> None:
    """Every point to EXACT; on gemma3, from the first GELU (blocks.0.ffn_out) on, to gelu_bound."""
    worst = _worst(theirs, mine, _rel)
    first_gelu = order_key(0, "blocks.0.ffn_out")
    for capture, value in worst.items():
        bound = gelu_bound if arch == "gemma3" and order_key(0, capture) >= first_gelu else EXACT
        assert value <= bound, f"{capture}: relative L2 {value:.2e} > {bound:.0e} (all: {worst})"


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_dump_equals_ours(kind, tiny_paths, tiny_cache):
    tokens = LONG if kind == "gemma3" else TOKENS
    model = load_model(tiny_paths[kind])
    theirs = llama_cpp_dump(model, tokens, len(PROMPT), engine="llama.cpp-f32")
    assert theirs.engine.startswith("llama.cpp 0.3.") and theirs.engine.endswith("(F32 copy, F32 KV cache)")
    assert (theirs.tokens, theirs.n_prompt) == (tokens, len(PROMPT))
    mine = ours(model, tokens, len(PROMPT))
    older_mla = model.config.is_mla and "blk.0.attn_kv_b.weight" in model.gguf.tensors
    missing = (NOT_IN_MHA_GRAPH if older_mla else set()) | ({"attn.sink_share"} if model.config.attn_sinks else set())
    _check_points(theirs, mine, node_table(model.config), frozenset(missing))  # no node holds the sinks' share
    _check_exact(theirs, mine, model.config.arch, GELU_TABLE["tiny"])


def test_table_covers_every_arch():
    assert set(LLAMA_CPP_NODES) == set(ARCHS) - {"deepseek2"} | {"llama-moe", "deepseek2", "deepseek2-norm", "deepseek2-plain"}
    for arch, table in LLAMA_CPP_NODES.items():
        assert set(table) == EXPECTED[arch]


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_path):
    return ours(load_model(smollm2_path), TOKENS, len(PROMPT))


def test_smollm2_dump_equals_ours_on_the_f32_copy(smollm2_path, smollm2_ours):
    theirs = llama_cpp_dump(load_model(smollm2_path), TOKENS, len(PROMPT), engine="llama.cpp-f32")
    _check_points(theirs, smollm2_ours, "llama")
    _check_exact(theirs, smollm2_ours, "llama", 0.0)


def test_smollm2_dump_of_the_quantized_file(smollm2_path, smollm2_ours):
    """llama.cpp on the Q4_1 file as it is, against our exact float32: cosine ≥ 0.99 at every point (measured
    ≥ 0.996: relative L2 ≤ 0.085)."""
    theirs = llama_cpp_dump(load_model(smollm2_path), TOKENS, len(PROMPT))
    assert theirs.engine.endswith("(the file as is, F16 KV cache)")
    _check_points(theirs, smollm2_ours, "llama")
    worst = _worst(theirs, smollm2_ours, lambda m, t: 1 - _cos(m, t))
    assert max(worst.values()) <= 0.01, {c: f"{1 - v:.4f}" for c, v in worst.items() if v > 0.01}


def test_gemma3_dump_equals_ours_on_the_f32_copy(gemma3_path):
    """Gemma-3-270M, its first and last blocks and the head: exact up to the first GELU, then the float16 table."""
    model = load_model(gemma3_path)
    last = model.config.n_layers - 1
    names = ["blocks.0.*", f"blocks.{last}.*", "final_norm", "logits"]
    theirs = llama_cpp_dump(model, TOKENS, len(PROMPT), engine="llama.cpp-f32", names=names)
    mine = ours(model, TOKENS, len(PROMPT), names=names)
    _check_points(theirs, mine, "gemma3")
    assert {split_capture(c)[0] for _, c in theirs.tensors} == {0, last, None}
    _check_exact(theirs, mine, "gemma3", GELU_TABLE["real"])


def test_names_and_the_byte_bound(tiny_paths, tiny_cache):
    """`names` keeps only the matching points; a dump past max_bytes is one sentence, and the engine goes on."""
    from workbench.reference import ReferenceEngine

    model = load_model(tiny_paths["qwen3"])
    with ReferenceEngine("llama.cpp-f32", model, len(TOKENS)) as engine:
        dump = engine.dump(TOKENS, len(PROMPT), names=["blocks.1.attn.q*", "logits"])
        points = {"blocks.1.attn.q", "blocks.1.attn.q_normed", "blocks.1.attn.q_rope", "logits"}
        assert set(dump.tensors) == {(s, c) for s in range(4) for c in points}
        with pytest.raises(ReferenceFailed, match=r"could not dump .*outgrew its 0.0625 MiB at step 0; ask for fewer"):
            engine.dump(TOKENS, len(PROMPT), max_bytes=1 << 16)
        again = engine.dump(TOKENS, len(PROMPT), names=["logits"])
    torch.testing.assert_close(again.tensors[(3, "logits")], dump.tensors[(3, "logits")], rtol=0, atol=0)


def test_refused_file_is_reference_failed(tiny_paths, tmp_path):
    """llama.cpp refuses a file of an architecture it does not know: one ReferenceFailed sentence, no dump."""
    model = load_model(tiny_paths["llama"])
    data = Path(tiny_paths["llama"]).read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8  # value type u32, string length u64
    bad = tmp_path / "bogus.gguf"
    bad.write_bytes(data[:at] + b"bogus" + data[at + 5 :])
    stand_in = SimpleNamespace(gguf=SimpleNamespace(path=bad), config=model.config)
    with pytest.raises(ReferenceFailed, match=r"llama.cpp refused .*bogus.gguf: .*unknown model architecture: 'bogus'"):
        llama_cpp_dump(stand_in, TOKENS, len(PROMPT))


# --- llama-eval-callback's text: the tool's lines (common/debug.cpp) printed from a real run's nodes -----------

EMIT = r'''
import ctypes, sys
import numpy as np
import llama_cpp
from workbench.reference import _GgmlTensor, _collect_errors, _ggml_functions, _read_node
llama_cpp.llama_log_set(_collect_errors, ctypes.c_void_p(0))
path, n_prompt, tokens = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")]
lib = _ggml_functions(llama_cpp)
lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
ne_str = lambda t: ", ".join(str(n) for n in _GgmlTensor.from_address(t).ne)
src_str = lambda t: f"{lib.ggml_get_name(t).decode()}{{{ne_str(t)}}}" if t else ""
corners = lambda n: list(range(n)) if n <= 6 else [0, 1, 2, None, n - 3, n - 2, n - 1]

@llama_cpp.ggml_backend_sched_eval_callback
def callback(t, ask, _user):  # as common_debug_cb_eval: every node, its header, its corners, its sum
    if ask:
        return True
    s = _GgmlTensor.from_address(t)
    print(f"common_debug_cb_eval: {lib.ggml_get_name(t).decode():>24} = ({lib.ggml_type_name(s.type).decode()}) "
          f"{lib.ggml_op_desc(t).decode():>10}({src_str(s.src[0])}, {src_str(s.src[1])}}}) = {{{ne_str(t)}}}")
    a = _read_node(lib, t).astype(np.float64)
    for i3 in range(a.shape[0]):
        print("    [")
        for i2 in corners(a.shape[1]):
            if i2 is None:
                print("        ..., ")
                continue
            print("        [")
            for i1 in corners(a.shape[2]):
                if i1 is None:
                    print("            ..., ")
                    continue
                row = ["..." if i0 is None else f"{a[i3, i2, i1, i0]:12.4f}" for i0 in corners(a.shape[3])]
                print("            [" + ", ".join(row) + "  ],")
            print("        ],")
        print("    ]")
        print(f"    sum = {a.sum():f}")
    return True

params = llama_cpp.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads = len(tokens), n_prompt, n_prompt, 1
params.flash_attn_type, params.swa_full, params.type_k, params.type_v = 0, True, 0, 0
params.cb_eval = callback
model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
ctx = llama_cpp.llama_init_from_model(model, params)
batch = llama_cpp.llama_batch_init(n_prompt, 0, 1)
for start, n in [(0, n_prompt)] + [(p, 1) for p in range(n_prompt, len(tokens))]:
    batch.n_tokens = n
    for j in range(n):
        batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tokens[start + j], start + j, 1, 1
        batch.seq_id[j][0] = 0
    print("decode: ", llama_cpp.llama_decode(ctx, batch))  # a line of another kind, which the reader skips
'''


def test_eval_callback_text_gives_the_dumps_statistics(tiny_paths, tiny_cache):
    """The text the tool prints for a real run (qwen3moe: QK-norm, MoE ids, several steps) read back as
    statistics: the same (step, capture) keys as llama_cpp_dump's tensors of the same run, count = their
    elements, sum = theirs (to %f's 6 decimals), no sum of squares (NaN)."""
    import os
    import subprocess
    import sys

    from workbench.dump import DumpError
    from workbench.reference import exact_copy, read_eval_callback_text

    model = load_model(tiny_paths["qwen3moe"])
    live = llama_cpp_dump(model, TOKENS, len(PROMPT), engine="llama.cpp-f32")
    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", EMIT, str(exact_copy(model.gguf)), str(len(PROMPT)),
                          ",".join(map(str, TOKENS))], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": root, "OMP_WAIT_POLICY": "passive"})
    stats = read_eval_callback_text(run.stdout, TOKENS, len(PROMPT))
    assert not stats.tensors and set(stats.stats) == set(live.tensors)
    for key, (count, total, squares) in stats.stats.items():
        t = live.tensors[key].double()
        assert count == t.numel() and torch.isnan(squares), key
        assert abs(total - t.sum()) <= 1e-5 + 1e-6 * t.abs().sum(), (key, float(total), float(t.sum()))
    with pytest.raises(DumpError, match="more graphs than the 2 steps"):
        read_eval_callback_text(run.stdout, TOKENS[:6], len(PROMPT))
    with pytest.raises(DumpError, match="none of the llama.cpp graph nodes"):
        read_eval_callback_text("llama_model_loader: loaded meta data\n", TOKENS, len(PROMPT))
