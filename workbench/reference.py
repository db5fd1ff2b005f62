"""llama.cpp beside our engine: the same GGUF, the same tokens, its logits per step (optional dependency).

llama.cpp is the reference implementation of GGUF. Feeding it exactly the tokens our forward saw lets a user
see at which step the two engines part ways. Two engines (ENGINES):
- "llama.cpp": the file as it is. Its CPU matmuls quantize activations to 8 bits, so cosines of 0.99-0.9999
  are normal on real models; what matters is where they fall and whether top-1 agrees.
- "llama.cpp-f32": an exact reference. llama.cpp runs on an F32 copy of the file (every tensor dequantized by
  gguf-py, written back with GGUFWriter; made once into the model cache) with an F32 KV cache, so both
  engines do float32 arithmetic on the same weights: with our dequantized float32 path the logits agree to a
  cosine of ≥ 0.999999, and any larger difference is a bug on one side. One exception is llama.cpp's own:
  its CPU GELU reads a float16 table (ggml-cpu's GGML_GELU_FP16), so on GELU models (gemma3) its "exact"
  logits sit ~4e-4 of max |logit| from ours, while ours sit 1.4e-6 from HF transformers in float32 (measured
  on Gemma-3-270M); SiLU models agree to ~3e-6.

llama.cpp runs in a worker process, because a crash there must cost the reference, not pytest or the app: a
llama-cpp-python built with native CPU flags segfaults in every decode on some CPUs (Intel Xeons with AMX), and
a file it half-understands can abort it. The worker is `python -m workbench.reference` started by subprocess,
talking over an inherited socket wrapped in multiprocessing's Connection, which frames and pickles requests
and logits for us and turns the worker's death into EOF at once. Not multiprocessing's "spawn" Process: it
re-runs the parent's main script in the child (seconds of torch imports under the CLI, a crash for a script
without a __main__ guard); and not fork, which is unsafe in a process holding torch's threads. The worker
imports numpy and llama_cpp, never torch: this module imports torch only where the engine uses it.

`llama_cpp_dump` (ReferenceEngine.dump) records llama.cpp's own tensors at our capture points, as a
workbench.dump.Dump: the worker opens a second context on the loaded model with an eval callback
(llama_context_params.cb_eval: the Llama constructor builds its context at once and passes none) and flash
attention off (its fused kernel has no kq_soft_max node), feeds the prompt as one llama_decode and then one
token per decode, and copies out only the graph nodes LLAMA_CPP_NODES maps to our points, strides and all.
`read_eval_callback_text` reads the same nodes' statistics (count, sum) from the text llama.cpp's
llama-eval-callback tool prints.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from workbench.errors import InputError, ReferenceFailed

if TYPE_CHECKING:
    import torch

    from workbench.dump import Dump

ENGINES = ("llama.cpp", "llama.cpp-f32")
GGML_TYPE_F32 = 0  # ggml.h's enum ggml_type: the KV cache type of the exact reference
POLL_S = 0.2  # how often a wait for the worker checks that it is still alive
STALL_S = 300.0  # a live worker silent this long is stuck, not slow (a 250 MB model loads in seconds on 2 cores)
GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (llama_cpp/_logger.py's copy of it is out of date)
NATIVE_BUILD_HINT = (
    "; a llama-cpp-python built with native CPU flags does this on some CPUs: rebuild it portable with "
    "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36"
)


_LLAMA_ERRORS: list[str] = []  # what llama.cpp logged at error level, in the worker


# Module-level, so that it outlives the Llama: freeing one logs, and a freed callback would crash the worker.
@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)  # llama_cpp.llama_log_callback
def _collect_errors(level: int, text: bytes, _user) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        _LLAMA_ERRORS.append(text.decode(errors="replace").strip())


def f32_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write `src` with every tensor dequantized to F32 by gguf-py (the reference dequantizer) to `dst`; the
    metadata is copied as it is, except the file type, which says all-F32."""
    from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
    from gguf.quants import dequantize

    from workbench.tiny import copy_gguf

    return copy_gguf(Path(src), Path(dst),
                     tensor=lambda name, data, qtype: (dequantize(data, qtype).astype(np.float32), GGMLQuantizationType.F32),
                     add={"general.file_type": (int(LlamaFileType.ALL_F32), GGUFValueType.UINT32)})


def exact_copy(gguf) -> Path:
    """The F32 copy of a GGUFFile for the exact reference, made once into the model cache (atomically, named by
    the source's sha256, so a changed file gets a new copy)."""
    from workbench.gguf_file import GGUFFile
    from workbench.models import cache_dir, cached_file

    def check(path: Path) -> None:
        if any(t.ggml_type.name != "F32" for t in GGUFFile(path).tensors.values()):
            raise ReferenceFailed(f"{path} is not an all-F32 copy.")

    target = cache_dir() / f"{Path(gguf.path).stem}-{gguf.sha256()[:16]}-f32.gguf"
    return cached_file(target, lambda tmp: f32_copy(gguf.path, tmp), check)


# --- llama.cpp's graph at our capture points ---------------------------------------------------------------
# Our capture point → (llama.cpp graph node, which node of that name), per architecture, as llama.cpp
# 0.3.36 builds its graphs (src/models/*.cpp; checked against every node's name, op and shape in real runs).
# Block nodes are named "{name}-{layer}" (llm_graph_context::cb), result_norm and result_output have no layer.
# One name can label several nodes of a layer; the selector says which one is ours:
#   "last":     the last node of that name (a later one is a reshape of the same data: Vcur MUL_MAT → RESHAPE)
#   "pre-rope": the last node of that name whose op is not ROPE (Qcur MUL_MAT → [ADD bias] → RESHAPE → ROPE)
#   "rope":     the node of that name whose op is ROPE
# Layouts (ggml order, ne0 fastest, so numpy's shape is reversed): block points are [features…, T], rows
# last; kq_soft_max is [n_kv, T, n_head] over the whole KV cache (n_kv cells, padded to 256), of which the
# first n_keys are positions 0..n_keys-1 in a fresh context (the SWA cache too, with swa_full), the rest
# masked to exactly 0; ffn_moe_topk is an int32 view of the argsort, [k, T] with the row stride of n_expert.
_DENSE = {
    "attn_norm": ("attn_norm", "last"),  # RMS_NORM → MUL: the MUL carries the name
    "attn.q": ("Qcur", "pre-rope"),
    "attn.k": ("Kcur", "pre-rope"),
    "attn.v": ("Vcur", "last"),
    "attn.q_rope": ("Qcur", "rope"),
    "attn.k_rope": ("Kcur", "rope"),
    "attn.pattern": ("kq_soft_max", "last"),
    "attn.out": ("kqv_out", "last"),  # the CONT of the permuted kqv, before the output projection (attn_out)
    "resid_mid": ("ffn_inp", "last"),
    "ffn_norm": ("ffn_norm", "last"),
    "ffn_out": ("ffn_out", "last"),  # the down projection's MUL_MAT
    "resid_post": ("l_out", "last"),
    "final_norm": ("result_norm", "last"),
    "logits": ("result_output", "last"),
}
_QK_NORM = {"attn.q_normed": ("Qcur_normed", "last"), "attn.k_normed": ("Kcur_normed", "last")}
# MoE: the router's MUL_MAT is ffn_moe_logits-L [n_expert, T]; ffn_moe_topk-L the argsort view [k, T]; with
# renormalisation (build_moe_ffn norm_w) the weights are ffn_moe_weights_norm-L [k, T] (without it,
# ffn_moe_weights-L, [1, k, T]); the weighted sum of the experts is ffn_moe_out-L, and there is no ffn_out-L node.
_MOE = {
    "moe.router_logits": ("ffn_moe_logits", "last"),
    "moe.topk_ids": ("ffn_moe_topk", "last"),
    "moe.topk_weights": ("ffn_moe_weights_norm", "last"),
    "ffn_out": ("ffn_moe_out", "last"),
}
# MLA: no per-head K/V (its Kcur-L / Vcur-L are the latent rows), its own points instead.
_MLA = {p: n for p, n in _DENSE.items() if p not in ("attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope")} | {
    "attn.q": ("q", "last"), "attn.q_pe": ("q_pe", "rope"), "attn.kv_latent": ("kv_cmpr", "last"),
    "attn.k_pe": ("k_pe", "rope")}
LLAMA_CPP_NODES: dict[str, dict[str, tuple[str, str]]] = {
    "llama": _DENSE,
    # Q/K/V biases: Qcur-L is the MUL_MAT, then the ADD of the bias (ours: "after projection + bias"), then
    # the RESHAPE to heads (the same data), all three named Qcur-L; "pre-rope" takes the reshape.
    "qwen2": _DENSE,
    # QK-norm: Qcur-L RESHAPE → RMS_NORM (norm-L) → MUL named Qcur_normed-L → ROPE named Qcur-L again.
    "qwen3": _DENSE | _QK_NORM,
    # qwen3moe always renormalises (build_moe_ffn norm_w).
    "qwen3moe": _DENSE | _QK_NORM | _MOE,
    # qwen2moe: no renormalisation (norm_w false), so the weights are ffn_moe_weights-L; the shared expert is
    # added to ffn_moe_out-L, and that sum is ffn_out-L (ours: the FFN's whole output). Q/K/V biases as qwen2.
    # Its shared gate: ffn_shexp_gate_inp-L (the MUL_MAT x·g) → silu(x)/x, named ffn_shexp_gate-L (a sigmoid).
    "qwen2moe": _DENSE | _MOE | {"moe.topk_weights": ("ffn_moe_weights", "last"), "ffn_out": ("ffn_out", "last"),
                                 "moe.shared_gate": ("ffn_shexp_gate", "last")},
    # olmoe: Qcur-L (MUL_MAT [n_embd, T]) → Qcur_normed-L (the RMS norm over the whole projection, its MUL) →
    # an unnamed reshape → ROPE named Qcur-L; no renormalisation (ffn_moe_weights-L), no ffn_out-L node.
    "olmoe": _DENSE | _QK_NORM | _MOE | {"moe.topk_weights": ("ffn_moe_weights", "last")},
    # deepseek2 (MLA): "q"-L is the q projection (after the LoRA's q_b, where there is one); "q_pe"-L and "k_pe"-L
    # whose op is ROPE are the rotated parts; the last "kv_cmpr"-L the normed latent; "kqv_out"-L the value heads
    # after attn_v_b. The weights: ffn_moe_weights-L, then _norm-L (expert_weights_norm), then _scaled-L (× a
    # scale ≠ 1): the last of them is ours, so the table follows the file (node_table).
    "deepseek2": _MLA | _MOE | {"moe.topk_weights": ("ffn_moe_weights_scaled", "last"),
                                         "ffn_out": ("ffn_out", "last")},
    "deepseek2-norm": _MLA | _MOE | {"ffn_out": ("ffn_out", "last")},
    "deepseek2-plain": _MLA | _MOE | {"moe.topk_weights": ("ffn_moe_weights", "last"),
                                               "ffn_out": ("ffn_out", "last")},
    # gpt-oss: its FFN norm is attn_post_norm-L; the router's bias is added in ffn_moe_probs-L (its gating takes
    # the logits as they are), the softmax over the chosen k is ffn_moe_weights_softmax-L (a view of it); the
    # pattern kq_soft_max-L already leaves the sink's column out, as ours. No node holds the sinks' share.
    "gpt-oss": _DENSE | _MOE | {"ffn_norm": ("attn_post_norm", "last"), "moe.router_logits": ("ffn_moe_probs", "last"),
                                "moe.topk_weights": ("ffn_moe_weights_softmax", "last")},
    # llama with experts (Mixtral): llm_build_llama's build_moe_ffn renormalises too (norm_w), the same nodes.
    "llama-moe": _DENSE | _MOE,
    # Post norms: kqv_out-L → attn_out MUL_MAT → attn_post_norm-L → sa_out-L (the residual after attention:
    # there is no ffn_inp-L); ffn_out-L is the down projection BEFORE ffn_post_norm-L, as ours is; l_out-L
    # after the post norm and the residual. Q is scaled by 1/sqrt(query_pre_attn_scalar) after the ROPE node
    # (an unnamed SCALE), so q_rope is unscaled as ours is. Its CPU GELU reads a float16 table.
    "gemma3": _DENSE | _QK_NORM | {"resid_mid": ("sa_out", "last")},
}

_CLASHING_TABLES = frozenset({"gpt-oss"})  # node names that mean another point in other archs' graphs


def node_table(config) -> str:
    """The LLAMA_CPP_NODES key of a model: its arch, "llama-moe" for a llama file with experts (Mixtral), and
    for deepseek2 the variant whose routing weights node is the file's last (scaled, renormalised or plain)."""
    if config.arch == "deepseek2":
        return "deepseek2" if config.routed_scale != 1.0 else "deepseek2-norm" if config.norm_topk else "deepseek2-plain"
    return "llama-moe" if config.arch == "llama" and config.is_moe else config.arch


# ggml.h's enum ggml_type → numpy, for the types a graph node we map can have (bf16 is read as its bits)
_GGML_NUMPY = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64,
               30: np.uint16}
GGML_TYPE_BF16 = 30
_NODE_NAME = re.compile(r"(.+)-(\d+)")


class _GgmlTensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor up to its name (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64): the fields the dump reads (type, ne, nb); checked against ggml's own functions once."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _ggml_functions(llama_cpp):
    """ggml's C functions the eval callback needs, typed (llama_cpp loads ggml but binds none of them)."""
    from llama_cpp._ggml import libggml as lib

    for name, res, args in (
        ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_op_desc", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
        ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
        ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class _DumpFailed(Exception):
    """A dump the worker could not make: its message is the sentence that travels back."""


def _read_node(lib, t: int) -> np.ndarray:
    """A computed graph node as a numpy array in ggml's layout reversed (numpy shape = ne[3], ne[2], ne[1],
    ne[0]), floats as float32 and ids as int64: ggml_backend_tensor_get copies its ggml_nbytes (for a view
    or a permutation, the span from its first to its last element), which numpy then reads with its strides."""
    s = _GgmlTensor.from_address(t)
    if s.type not in _GGML_NUMPY:
        raise _DumpFailed(f"node {lib.ggml_get_name(t).decode(errors='replace')} holds ggml type {s.type}, "
                          "which the dump cannot read")
    nbytes = lib.ggml_nbytes(t)
    raw = np.empty(nbytes, dtype=np.uint8)
    lib.ggml_backend_tensor_get(t, raw.ctypes.data, 0, nbytes)
    dtype = np.dtype(_GGML_NUMPY[s.type])
    shape, strides = tuple(reversed(list(s.ne))), tuple(reversed(list(s.nb)))
    a = np.ndarray(shape, dtype=dtype, buffer=raw, strides=strides)
    if s.type == GGML_TYPE_BF16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32 if dtype.kind == "f" else np.int64)  # a contiguous copy


def _check_layout(lib, t: int) -> None:
    """_GgmlTensor against ggml itself: another layout would read garbage shapes (or crash on them)."""
    s = _GgmlTensor.from_address(t)
    if s.name != lib.ggml_get_name(t) or int(np.prod(list(s.ne))) != lib.ggml_nelements(t):
        raise _DumpFailed("this llama.cpp's struct ggml_tensor is not laid out as ggml.h of llama-cpp-python "
                          "0.3.36 has it, so its graph nodes cannot be read")


def _nodes_by_name(archs: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """llama.cpp node name → [(our point, selector)] over these archs' LLAMA_CPP_NODES (no name means two
    different points across archs; two names can mean one point: ffn_out and ffn_moe_out)."""
    by_name: dict[str, list[tuple[str, str]]] = {}
    for arch in archs:
        for point, (node, selector) in LLAMA_CPP_NODES[arch].items():
            if (point, selector) not in by_name.setdefault(node, []):
                by_name[node].append((point, selector))
    return by_name


def _captures(by_name: dict[str, list[tuple[str, str]]], name: str, op: str, patterns: list[str] | None) -> list[str]:
    """Our capture names that the graph node `name` (e.g. "Qcur-3") of ggml op `op` gives, those matching the
    fnmatch `patterns` (None: all); a node of a selector "last" or "pre-rope" may be replaced by a later one."""
    m = _NODE_NAME.fullmatch(name)
    base, layer = (m[1], int(m[2])) if m else (name, None)
    out = []
    for point, selector in by_name.get(base, ()):
        if (selector == "rope") != (op == "ROPE") or (layer is None) != (point in ("final_norm", "logits")):
            continue
        capture = point if layer is None else f"blocks.{layer}.{point}"
        if patterns is None or any(fnmatchcase(capture, p) for p in patterns):
            out.append(capture)
    return out


def _llama_dump(llama_cpp, model, request: tuple, threads: int, kv_f32: bool) -> dict:
    """The worker's half of a dump: a fresh context on `model` with the eval callback, the prompt as one
    llama_decode, then one token per decode. Returns {"nodes": {(step, capture): array in ggml layout
    reversed}, "version": the engine's name}; _DumpFailed with a sentence."""
    _, tokens, n_prompt, arch, patterns, max_bytes = request
    lib = _ggml_functions(llama_cpp)
    by_name = _nodes_by_name([arch])
    got: dict[tuple[int, str], np.ndarray] = {}
    state = {"step": 0, "bytes": 0, "checked": False, "error": None}
    asked: dict[int, list[str]] = {}  # node address → our captures it gives, between its ask and its data call

    def captures_of(t: int) -> list[str]:
        name = lib.ggml_get_name(t).decode(errors="replace")
        return _captures(by_name, name, lib.ggml_op_desc(t).decode(errors="replace"), patterns)

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(t, ask, _user):
        # An exception must not cross into C (ctypes would print it and return false, which stops the graph).
        if state["error"] is not None:
            return not ask  # the data phase returns true: false there stops computing the rest of the graph
        try:
            if not state["checked"]:
                _check_layout(lib, t)
                state["checked"] = True
            if ask:
                wanted = captures_of(t)
                if wanted:
                    asked[t] = wanted
                return bool(wanted)
            a = _read_node(lib, t)
            state["bytes"] += a.nbytes
            if state["bytes"] > max_bytes:
                raise _DumpFailed(f"the dump outgrew its {max_bytes / 2**20:.3g} MiB at step {state['step']}; "
                                  "ask for fewer capture points (names)")
            for capture in asked.pop(t, ()):  # "last" and "pre-rope": a later node of the name replaces it
                old = got.get((state["step"], capture))
                if old is not None:
                    state["bytes"] -= old.nbytes
                got[(state["step"], capture)] = a
        except Exception as exc:  # noqa: BLE001 - anything: it is raised after llama_decode returns
            state["error"] = exc
        return not ask

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = len(tokens)
    params.n_batch = params.n_ubatch = n_prompt  # the prompt in one graph
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.swa_full = True  # a sliding-window cache as long as the context: cell i holds position i
    params.no_perf = True
    params.cb_eval = callback
    params.cb_eval_user_data = None
    if kv_f32:
        params.type_k = params.type_v = GGML_TYPE_F32
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise _DumpFailed(_LLAMA_ERRORS[-1] if _LLAMA_ERRORS else "llama.cpp could not make a context for the dump")
    batch = llama_cpp.llama_batch_init(n_prompt, 0, 1)
    try:
        for step in range(len(tokens) - n_prompt + 1):
            start, n = (0, n_prompt) if step == 0 else (n_prompt + step - 1, 1)
            batch.n_tokens = n
            for j in range(n):
                batch.token[j], batch.pos[j] = tokens[start + j], start + j
                batch.n_seq_id[j], batch.seq_id[j][0] = 1, 0
                batch.logits[j] = True  # every row an output: the last layer keeps all its rows
            state["step"] = step
            _LLAMA_ERRORS.clear()
            rc = llama_cpp.llama_decode(ctx, batch)
            if state["error"] is not None:
                err = state["error"]
                raise err if isinstance(err, _DumpFailed) else _DumpFailed(f"{type(err).__name__}: {err}")
            if rc != 0:
                why = _LLAMA_ERRORS[0] if _LLAMA_ERRORS else f"llama_decode returned {rc}"
                raise _DumpFailed(f"step {step} (position {start}): {why}")
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    kv = "F32 copy, F32 KV cache" if kv_f32 else "the file as is, F16 KV cache"
    return {"nodes": got, "version": f"llama.cpp {llama_cpp.__version__} ({kv})"}


def _serve(conn: Connection, path: str, capacity: int, threads: int, kv_f32: bool = False) -> None:
    """The worker: load the file once, then answer each list of ids with the logits after it, evaluating only
    the tokens it has not seen, and each ("dump", …) request (ReferenceEngine.dump) with llama.cpp's nodes at
    our capture points, from a context of its own. Replies are (kind, value): ok, refused (llama.cpp's
    reason) or failed."""
    try:
        import llama_cpp

        # Replaces llama-cpp-python's printer: stderr stays quiet, and a refusal keeps llama.cpp's reason.
        llama_cpp.llama_log_set(_collect_errors, ctypes.c_void_p(0))
        try:
            kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
            llm = llama_cpp.Llama(model_path=path, n_ctx=capacity, n_threads=threads, logits_all=False, verbose=False, **kv)
        except ValueError as exc:
            reason = _LLAMA_ERRORS[0].split("error loading model: ")[-1] if _LLAMA_ERRORS else str(exc)
            conn.send(("refused", reason))
            return
        n_vocab = llm.n_vocab()
        conn.send(("ok", n_vocab))
        fed: list[int] = []
        while (ids := conn.recv()) is not None:
            if isinstance(ids, tuple) and ids[0] == "dump":
                try:
                    conn.send(("ok", _llama_dump(llama_cpp, llm.model, ids, threads, kv_f32)))
                except _DumpFailed as exc:  # this dump only: the worker and its logits go on
                    conn.send(("dump failed", str(exc)))
                continue
            common = 0
            while common < min(len(ids), len(fed)) and ids[common] == fed[common]:
                common += 1
            if common == len(ids):  # nothing new: re-run the last token to get its logits again
                common -= 1
            llm.n_tokens = common  # eval() drops llama.cpp's cache past n_tokens
            _LLAMA_ERRORS.clear()
            try:
                llm.eval(ids[common:])
            except RuntimeError as exc:  # llama_decode said no: its log says why
                conn.send(("failed", _LLAMA_ERRORS[0] if _LLAMA_ERRORS else str(exc)))
                return
            fed = ids
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            conn.send(("ok", np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()))
    except (EOFError, ConnectionError):  # the engine is gone
        pass
    except Exception as exc:  # the process boundary: whatever went wrong travels back as one sentence
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))


class ReferenceEngine:
    """llama.cpp on the model's file, in a worker process that keeps its own incremental state. Any failure
    (not installed, file refused, crash) raises ReferenceFailed and closes the engine for good."""

    def __init__(self, engine: str, model, capacity: int) -> None:
        import torch

        self._worker: subprocess.Popen | None = None
        self._failure: str | None = None
        if engine not in ENGINES:
            raise InputError(f"unknown reference engine '{engine}'; available: {', '.join(ENGINES)}.")
        # Only looked up here, not imported: a build for another CPU can die in its library's start-up code.
        if importlib.util.find_spec("llama_cpp") is None:
            raise ReferenceFailed(
                "the llama.cpp reference needs llama-cpp-python: pip install llama-cpp-python "
                "(or the project's 'reference' extra)."
            )
        self.engine = engine
        self.config = model.config
        self.path = Path(model.gguf.path)
        changed = getattr(model.gguf, "changed_on_disk", None)
        if changed is not None and changed():  # llama.cpp reads the file itself: it would run another model
            raise ReferenceFailed(f"{self.path} changed on disk since the model was loaded; reload it to compare with llama.cpp.")
        exact = engine == "llama.cpp-f32"
        if exact:
            try:
                self.path = exact_copy(model.gguf)
            except (OSError, ValueError, NotImplementedError) as exc:  # disk full; a type gguf-py cannot decode
                raise ReferenceFailed(f"the F32 copy of {self.path.name} for the exact reference could not be made ({exc}).") from None
        self._conn, theirs = Pipe()
        # PYTHONPATH: the worker imports this same copy of workbench, installed or not. OMP_WAIT_POLICY: ggml-cpu
        # runs each graph computation as one OpenMP region, whose idle threads spin for a while after it by
        # default; a dump's eval callback cuts a decode into hundreds of regions with Python in between, and on
        # a busy 2-core machine those spinning threads made a SmolLM2 dump 15-40x slower (0.3 s → 4-13 s).
        root = str(Path(__file__).resolve().parents[1])
        env = {"OMP_WAIT_POLICY": "passive", **os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "workbench.reference", str(theirs.fileno()), str(self.path), str(capacity),
                 str(torch.get_num_threads()), "f32" if exact else "file"],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        except OSError as exc:  # no process to be had (out of memory, too many processes)
            raise ReferenceFailed(f"the llama.cpp worker process did not start: {exc}.") from None
        finally:
            theirs.close()  # the worker holds the only copy: its death reads as EOF here
        self.worker_pid = self._worker.pid
        self.n_vocab = self._reply(f"loading {self.path.name}")
        if self.n_vocab != model.config.vocab_size:
            self._fail(f"llama.cpp reads {self.n_vocab} tokens of vocabulary from {self.path.name} where we read "
                       f"{model.config.vocab_size}, so their logits cannot be compared.")

    def logits_after(self, ids: list[int]) -> torch.Tensor:
        """llama.cpp's next-token logits [vocab], float32, after `ids`."""
        import torch

        if self._failure is not None:
            raise ReferenceFailed(self._failure)
        try:
            self._conn.send([int(i) for i in ids])
        except ConnectionError:  # the worker is already gone: _reply says how
            pass
        return torch.from_numpy(self._reply(f"evaluating {len(ids)} tokens of {self.path.name}"))

    def dump(self, tokens: Iterable[int], n_prompt: int, names: Iterable[str] | None = None,
             max_bytes: int = 1 << 30) -> Dump:
        """llama.cpp's tensors at our capture points (those matching the fnmatch patterns `names`; None: all it
        has) over `tokens`, the first n_prompt as one llama_decode, then one token per decode, as a Dump:
        float32 values, int64 ids, in our shapes (_to_ours). A context of its own, so the logits' state is
        untouched. ReferenceFailed with one sentence if llama.cpp cannot; only a crash closes the engine."""
        import torch

        from workbench.dump import Dump

        if self._failure is not None:
            raise ReferenceFailed(self._failure)
        dump = Dump(list(tokens), n_prompt)  # DumpError for a run that is not one
        nodes = node_table(self.config)
        if nodes not in LLAMA_CPP_NODES:
            raise ReferenceFailed(f"llama.cpp dumps know no graph nodes for architecture '{self.config.arch}'.")
        if any(not 0 <= t < self.n_vocab for t in dump.tokens):
            raise InputError(f"token ids must be in 0..{self.n_vocab - 1} for {self.path.name}.")
        patterns = None if names is None else [str(n) for n in names]
        request = ("dump", dump.tokens, dump.n_prompt, nodes, patterns, int(max_bytes))
        try:
            self._conn.send(request)
        except ConnectionError:  # the worker is already gone: _reply says how
            pass
        answer = self._reply(f"dumping {len(dump.tokens)} tokens of {self.path.name}")
        dump.engine = answer["version"]
        for (step, capture), array in answer["nodes"].items():
            ours = _to_ours(self.config, dump, step, capture, array)
            if ours is not None:
                dump.tensors[(step, capture)] = torch.from_numpy(ours)
        return dump

    def _reply(self, doing: str):
        """The worker's next answer; its death, its silence or its error closes the engine with one sentence."""
        try:
            answer = self._next_answer()
        except (EOFError, ConnectionError):
            code = self._worker.wait(timeout=10)
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            hint = NATIVE_BUILD_HINT if code in (-signal.SIGSEGV, -signal.SIGILL) else ""
            self._fail(f"llama.cpp crashed ({how}) while {doing}{hint}.")
        except BaseException:  # interrupted (Ctrl-C, a stopped cell): its answer would go to the next request
            self.close()
            raise
        if answer is None:
            self._fail(f"llama.cpp gave no answer in {STALL_S:.0f} s while {doing}, so it was stopped.")
        kind, value = answer
        if kind == "refused":
            self._fail(f"llama.cpp refused {self.path}: {value.rstrip('.')}.")
        if kind == "failed":
            self._fail(f"llama.cpp failed while {doing}: {value.rstrip('.')}.")
        if kind == "dump failed":  # that request only: the engine stays open
            raise ReferenceFailed(f"llama.cpp could not dump while {doing}: {value.rstrip('.')}.")
        return value

    def _next_answer(self) -> tuple[str, object] | None:
        """(kind, value) from the worker, EOFError once it is dead, None if it is alive but silent for STALL_S."""
        deadline = time.monotonic() + STALL_S
        while not self._conn.poll(POLL_S):
            # Dead with nothing left to read: no EOF to wait for if a fork elsewhere holds a copy of its socket.
            if self._worker.poll() is not None and not self._conn.poll(0):
                raise EOFError
            if time.monotonic() > deadline:
                return None
        return self._conn.recv()

    def _fail(self, sentence: str) -> NoReturn:
        self.close()
        self._failure = sentence
        raise ReferenceFailed(sentence)

    def close(self) -> None:
        """Stop the worker (asked, then killed); later calls raise ReferenceFailed."""
        self._failure = self._failure or "the llama.cpp reference engine is closed."
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if worker.poll() is None:
            try:
                self._conn.send(None)
                worker.wait(timeout=5)
            except (ConnectionError, subprocess.TimeoutExpired):
                worker.kill()
                worker.wait()
        self._conn.close()

    def __enter__(self) -> ReferenceEngine:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _to_ours(config, dump: Dump, step: int, capture: str, array: np.ndarray) -> np.ndarray | None:
    """One node's array (ggml's layout reversed: rows outermost, features innermost) in our point's shape:
    [rows, *features] for every point but the pattern, whose [n_head, T, n_kv] over the KV cache becomes
    [T, n_head, n_keys] over positions 0..n_keys-1 (None, so not dumped, if a cell past them holds weight:
    then cells are not positions)."""
    from workbench.dump import point_shape, split_capture

    _, point = split_capture(capture)
    c = config
    if point == "attn.pattern":
        n_head, rows, n_kv = array.shape[-3:]
        pattern = array.reshape(n_head, rows, n_kv).transpose(1, 0, 2)
        n_keys = dump.first_position(step) + dump.rows(step)
        if n_keys > n_kv or np.abs(pattern[..., n_keys:]).max(initial=0.0) > 0:
            return None
        return np.ascontiguousarray(pattern[..., :n_keys])
    features = point_shape(c, point, 0)
    size = int(np.prod(features))
    if array.size % size or not 1 <= array.size // size <= dump.rows(step):
        raise ReferenceFailed(f"llama.cpp's node for {capture} at step {step} has shape {list(array.shape)[::-1]} "
                              f"(ggml order), which is not rows of {list(features)}.")
    return array.reshape(-1, *features)


def llama_cpp_dump(model, tokens: Iterable[int], n_prompt: int, engine: str = "llama.cpp",
                   names: Iterable[str] | None = None, max_bytes: int = 1 << 30) -> Dump:
    """llama.cpp's dump of `tokens` (the first n_prompt as one batch, then one token per step) at every capture
    point it has (LLAMA_CPP_NODES), or those matching the fnmatch patterns `names`; `engine` is one of
    ENGINES ("llama.cpp-f32": the exact reference). Runs in a worker process of its own, like ReferenceEngine:
    any failure there is ReferenceFailed with one sentence."""
    tokens = [int(t) for t in tokens]
    with ReferenceEngine(engine, model, max(len(tokens), 1)) as reference:
        return reference.dump(tokens, n_prompt, names, max_bytes)


# --- llama-eval-callback's text -----------------------------------------------------------------------------
# What llama.cpp's llama-eval-callback prints per graph node (common/debug.cpp, common_debug_cb_eval; the older
# examples/eval-callback/eval-callback.cpp, ggml_debug, prints the same lines):
#   "{func}: {name:>24} = ({type}) {op:>10}({src0}{{ne}}, {src1}{{ne}}}) = {{ne0, ne1, ne2, ne3}}"
# then the corner values (3 per dimension) in nested brackets, then "    sum = %f" once per ne3 slice.
# A log prefix (timestamp, level) before the function's name is allowed.
_TEXT_HEADER = re.compile(r"^(?:.*?\b(?:common_debug_cb_eval|ggml_debug): +)?(?P<name>.*?) = \((?P<type>\w+)\) +"
                          r"(?P<op>\S+)\(.*\) = \{(?P<ne>\d+(?:, \d+)*)\}\s*$")
_TEXT_SUM = re.compile(r"(?:^|\s)sum = (?P<sum>\S+)\s*$")


def read_eval_callback_text(text: str, tokens: Iterable[int], n_prompt: int, arch: str | None = None) -> Dump:
    """A statistics-only Dump from the text of llama.cpp's llama-eval-callback run on `tokens` (the first
    n_prompt as one batch, as the tool feeds its prompt; one decode per later token): Dump.stats[(step,
    capture)] = [count, sum, NaN] for each node LLAMA_CPP_NODES maps (`arch`'s table; None: every arch's
    whose names do not clash — not gpt-oss's, whose attn_post_norm and ffn_moe_probs mean other things in gemma3's
    and qwen3moe's graphs: read its text with arch="gpt-oss"), by the same selectors as llama_cpp_dump. The tool prints no sum of squares
    (NaN); count is the node's element count, the pattern's over its n_keys real keys (its other cells hold
    0, so its sum is theirs). A graph ends at its result_output node, so a text filtered without it is read
    as one step. Only builds that sum every element (common/debug.cpp) give whole-tensor sums: the older
    eval-callback summed only the corners it printed. DumpError for text that holds none of these nodes or
    more graphs than the tokens make."""
    import torch

    from workbench.dump import Dump, DumpError, split_capture

    dump = Dump(list(tokens), n_prompt)
    if arch is not None and arch not in LLAMA_CPP_NODES:
        raise DumpError(f"no llama.cpp node table for architecture '{arch}'; there is one for {', '.join(LLAMA_CPP_NODES)}.")
    by_name = _nodes_by_name([arch] if arch else [a for a in LLAMA_CPP_NODES if a not in _CLASHING_TABLES])
    step, ended, found = 0, False, 0
    current: tuple[list[str], list[int]] | None = None  # the captures and ne of the node whose sum comes next
    for line in text.splitlines():
        if (m := _TEXT_HEADER.match(line)) is not None:
            name = m["name"].strip()
            if ended:  # the node after a result_output: the next graph, one more token
                step, ended = step + 1, False
            if name == "result_output":
                ended = True
            captures = _captures(by_name, name, m["op"], None)
            current = (captures, [int(n) for n in m["ne"].split(",")]) if captures else None
            if captures and step >= dump.n_steps:
                raise DumpError(f"the text holds more graphs than the {dump.n_steps} steps of its "
                                f"{len(dump.tokens)} tokens with n_prompt = {n_prompt}.")
        elif current is not None and (m := _TEXT_SUM.search(line)) is not None:
            captures, ne = current
            count = float(np.prod(ne))
            try:
                total = float(m["sum"])
            except ValueError:
                raise DumpError(f"'{line.strip()}' is not a sum llama.cpp prints.") from None
            for capture in captures:  # the last sum line of a node, and the last node of a name, win
                if split_capture(capture)[1] == "attn.pattern" and len(ne) >= 3:
                    count = float(ne[1] * ne[2] * (dump.first_position(step) + dump.rows(step)))
                dump.stats[(step, capture)] = torch.tensor([count, total, float("nan")], dtype=torch.float64)
                found += 1
    if not found:
        raise DumpError("the text holds none of the llama.cpp graph nodes a dump maps (attn_norm-0, Qcur-0, "
                        "l_out-0, result_output, …) with a 'sum = ' line after it.")
    dump.engine = "llama.cpp llama-eval-callback (statistics)"
    return dump


if __name__ == "__main__":  # the worker; Ctrl-C is for the engine, which stops it by closing the socket
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "f32")
