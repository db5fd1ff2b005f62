"""Synthetic GGUF models with the exact shapes of real ones and random weights, for benchmarks.

No real Qwen3-30B-A3B file can be fetched here, and its speed does not depend on what its weights say: only
on its shapes and types. `write_synthetic("qwen3-30b-a3b", path)` writes a qwen3moe file with the shapes
of Qwen3-30B-A3B (48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128 experts of 768, top-8, a
151,936-token vocabulary) with every matrix in Q4_K (≈ 17 GB), in well under a minute: the quantized blocks are
slices of one pool of random blocks (random 4-bit codes, fixed sub-block scales and minimums that centre
each sub-block on zero, and f16 scales chosen for a standard deviation of 1/√in), the norms are ones, the
router is Gaussian. The tokenizer is tiny.py's byte-level BPE padded with unused tokens to the full
vocabulary, so token ids, embeddings and the head have the real sizes.

`SHAPES[name].scaled(...)` gives the same layout at a size the tests can run on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import MODEL_TENSOR, GGMLQuantizationType, GGUFWriter, LlamaFileType

from workbench.errors import InputError
from workbench.tiny import TinySpec, tensor_plan, tiny_vocab, write_metadata

Q4_K = GGMLQuantizationType.Q4_K
_Q4_K_BYTES = 144  # per 256 values
# Q4_K's 12 scale/min bytes with all 8 sub-block scales and minimums = 32 (6-bit fields; see quants._k_scales_mins)
_SCALES_32 = np.array([160] * 8 + [0] * 4, dtype=np.uint8)
_CODE_STD = 32 * float(np.arange(16).std())  # std of 32·(q − 7.5) for uniform 4-bit q, in units of d
_POOL_BLOCKS = 1 << 21  # 2M blocks (288 MiB) of random codes, sliced at random offsets for every matrix


@dataclass(frozen=True)
class SyntheticShape:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    expert_ffn: int
    vocab: int
    context: int
    rope_base: float
    rms_eps: float = 1e-6
    ffn: int = 6144  # the dense FFN size Qwen3-30B-A3B's config states (unused by its MoE)

    def scaled(self, **sizes: int) -> SyntheticShape:
        """The same layout with some sizes replaced (n_layers=2, n_experts=8, vocab=1024, …)."""
        return replace(self, **sizes)

    @property
    def spec(self) -> TinySpec:
        """The shape as the TinySpec that tiny.write_metadata writes the keys of."""
        return TinySpec(
            self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.rope_base, self.rms_eps,
            tied_output=False, n_experts=self.n_experts, n_experts_used=self.n_experts_used,
            expert_ffn=self.expert_ffn, hidden=self.hidden, ffn=self.ffn, vocab_size=self.vocab, context=self.context,
        )

    @property
    def n_params(self) -> int:
        q, kv, h = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden
        per_layer = h * (q + 2 * kv) + q * h + 2 * self.head_dim + 2 * h
        per_layer += self.n_experts * h + self.n_experts * 3 * self.expert_ffn * h
        return self.n_layers * per_layer + 2 * self.vocab * h + h


SHAPES = {
    # Qwen3-30B-A3B's config.json (and Qwen3-Coder-30B-A3B's, whose context is longer)
    "qwen3-30b-a3b": SyntheticShape(
        arch="qwen3moe", n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
        n_experts=128, n_experts_used=8, expert_ffn=768, vocab=151936, context=40960, rope_base=1e6,
    ),
}


def _tensors(s: SyntheticShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, shape in torch order [.., out, in], kind) in llama.cpp's order: tiny.py's qwen3moe plan."""
    return [
        (name, shape, "router" if kind == MODEL_TENSOR.FFN_GATE_INP else "norm" if len(shape) == 1 else "matrix")
        for name, shape, kind, _layer in tensor_plan(s.arch, s.spec)
    ]


def _block_pool(rng: np.random.Generator) -> np.ndarray:
    pool = rng.integers(0, 256, size=(_POOL_BLOCKS, _Q4_K_BYTES), dtype=np.uint8)
    pool[:, 4:16] = _SCALES_32
    return pool


def _q4_k(pool: np.ndarray, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_K blocks for a [.., out, in] matrix: a slice of the pool with d and dmin set for std 1/√in."""
    n_blocks = int(np.prod(shape)) // 256
    if n_blocks <= len(pool):
        start = int(rng.integers(0, len(pool) - n_blocks + 1))
        blocks = pool[start : start + n_blocks].copy()
    else:
        blocks = np.resize(pool, (n_blocks, _Q4_K_BYTES))
    d = (shape[-1] ** -0.5) / _CODE_STD
    blocks[:, 0:2] = np.array([d], dtype=np.float16).view(np.uint8)
    blocks[:, 2:4] = np.array([7.5 * d], dtype=np.float16).view(np.uint8)  # dmin·32 = 7.5·d·32: centred
    return blocks.reshape(*shape[:-1], shape[-1] // 256 * _Q4_K_BYTES)


def write_synthetic(shape: str | SyntheticShape, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a random model with `shape` (a SHAPES name or a SyntheticShape) to `path`; returns the path."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise InputError(f"no synthetic shape '{shape}'; choose one of: {', '.join(SHAPES)}.")
        name, s = shape, SHAPES[shape]
    else:
        name, s = "synthetic", shape
    if s.hidden % 256 or s.expert_ffn % 256 or (s.n_heads * s.head_dim) % 256:
        raise InputError("Q4_K needs every row length (hidden, expert FFN, heads × head_dim) to be a multiple of 256.")
    path = Path(path)
    rng = np.random.default_rng(seed)
    pool = _block_pool(rng)
    w = GGUFWriter(path, s.arch)
    vocab = replace(tiny_vocab("qwen2", s.vocab), pad_id=None)  # synthetic files state no pad id
    write_metadata(w, s.arch, s.spec, vocab, name, LlamaFileType.MOSTLY_Q4_K_M)

    plan = _tensors(s)
    for tname, tshape, kind in plan:
        if kind == "matrix":
            nbytes = int(np.prod(tshape)) // 256 * _Q4_K_BYTES
            byte_shape = (*tshape[:-1], tshape[-1] // 256 * _Q4_K_BYTES)
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=Q4_K)
        else:
            w.add_tensor_info(tname, tshape, np.dtype(np.float32), int(np.prod(tshape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for tname, tshape, kind in plan:
        if kind == "matrix":
            data = _q4_k(pool, rng, tshape)
        elif kind == "router":
            data = rng.normal(0.0, 1.0, size=tshape).astype(np.float32) * np.float32(s.hidden**-0.5)
        else:
            data = np.ones(tshape, dtype=np.float32)
        w.write_tensor_data(data)
    w.close()
    return path
