"""Load a GGUF file's tensors onto a device in a dtype. GGUF names (`blk.N.attn_q.weight`) are mapped to
ours here, once, and every shape is checked against the ModelConfig before anything is computed.

Quantized tensors travel to the device as raw block bytes and are dequantized there (quants.py), so a CUDA
load moves the file's bytes, not 4× them. Norm weights stay float32: the norms are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.config import ModelConfig
from workbench.errors import ModelError, UnsupportedError
from workbench.gguf_file import GGUFFile
from workbench.quants import dequantize


@dataclass
class LayerWeights:
    """One block. Matrices are stored [in, out] (transposed from GGUF's [out, in]) and used as x @ W: a
    one-row matmul reads a [in, out] matrix ~1.6× faster than F.linear reads [out, in] on this CPU."""

    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # [hidden, (n_heads + 2·n_kv_heads)·head_dim]: Q, K, V fused into one matmul
    wo: torch.Tensor  # [n_heads·head_dim, hidden]
    ffn_norm: torch.Tensor
    bqkv: torch.Tensor | None = None  # qwen2 attention biases, fused like wqkv
    q_norm: torch.Tensor | None = None  # [head_dim], per-head QK-norm
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # gemma3
    post_ffn_norm: torch.Tensor | None = None
    w_gate_up: torch.Tensor | None = None  # dense FFN [hidden, 2·ffn]: gate then up
    w_down: torch.Tensor | None = None  # [ffn, hidden]
    router: torch.Tensor | None = None  # MoE [hidden, n_experts]
    gate_up_exps: torch.Tensor | None = None  # [n_experts, hidden, 2·expert_ffn]
    down_exps: torch.Tensor | None = None  # [n_experts, expert_ffn, hidden]


@dataclass
class Weights:
    token_embd: torch.Tensor | None  # [vocab, hidden]; None when tied: rows are then read from `output`
    output_norm: torch.Tensor
    output: torch.Tensor  # [hidden, vocab], transposed for x @ W
    layers: list[LayerWeights]
    rope_freqs: torch.Tensor | None  # llama3-style per-frequency divisors, when the file has them

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, hidden]. A tied model keeps one copy of the matrix, in the head's orientation."""
        if self.token_embd is not None:
            return self.token_embd[tokens]
        return self.output[:, tokens].t().contiguous()


class _Loader:
    def __init__(self, gguf: GGUFFile, device: torch.device, dtype: torch.dtype) -> None:
        self.gguf, self.device, self.dtype = gguf, device, dtype

    def tensor(self, name: str, shape: tuple[int, ...], *, norm: bool = False, required: bool = True) -> torch.Tensor | None:
        info = self.gguf.tensors.get(name)
        if info is None:
            if required:
                raise ModelError(f"{self.gguf.path.name}: tensor '{name}' is missing.")
            return None
        if info.shape != shape:
            raise ModelError(
                f"{self.gguf.path.name}: tensor '{name}' has shape {list(info.shape)}, but the metadata implies {list(shape)}."
            )
        raw = self.gguf.raw(name).to(self.device)
        try:
            values = dequantize(raw, info.ggml_type)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{self.gguf.path.name}: tensor '{name}': {exc}") from None
        values = values.reshape(shape)
        return values.to(torch.float32 if norm else self.dtype)


def load_weights(
    gguf: GGUFFile, config: ModelConfig, device: torch.device, dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> Weights:
    """Every tensor, checked against the config, on `device` in `dtype`. `progress(done, total)` is called
    after each layer (and once more for the embeddings and head)."""
    c, ld = config, _Loader(gguf, device, dtype)
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        wq = ld.tensor(p + "attn_q.weight", (q_dim, c.hidden))
        wk = ld.tensor(p + "attn_k.weight", (kv_dim, c.hidden))
        wv = ld.tensor(p + "attn_v.weight", (kv_dim, c.hidden))
        biases = [ld.tensor(p + f"attn_{x}.bias", (n,), required=False) for x, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            raise ModelError(f"{gguf.path.name}: layer {i} has biases on some of Q, K, V but not all.")
        layer = LayerWeights(
            attn_norm=ld.tensor(p + "attn_norm.weight", (c.hidden,), norm=True),
            wqkv=torch.cat((wq, wk, wv)).t().contiguous(),
            wo=ld.tensor(p + "attn_output.weight", (c.hidden, q_dim)).t().contiguous(),
            ffn_norm=ld.tensor(p + "ffn_norm.weight", (c.hidden,), norm=True),
            bqkv=torch.cat(biases) if biases[0] is not None else None,
        )
        del wq, wk, wv
        if c.qk_norm:
            layer.q_norm = ld.tensor(p + "attn_q_norm.weight", (c.head_dim,), norm=True)
            layer.k_norm = ld.tensor(p + "attn_k_norm.weight", (c.head_dim,), norm=True)
        if c.post_norms:
            layer.post_attn_norm = ld.tensor(p + "post_attention_norm.weight", (c.hidden,), norm=True)
            layer.post_ffn_norm = ld.tensor(p + "post_ffw_norm.weight", (c.hidden,), norm=True)
        if c.is_moe:
            e, f = c.n_experts, c.expert_ffn_hidden
            layer.router = ld.tensor(p + "ffn_gate_inp.weight", (e, c.hidden)).t().contiguous()
            gate = ld.tensor(p + "ffn_gate_exps.weight", (e, f, c.hidden))
            up = ld.tensor(p + "ffn_up_exps.weight", (e, f, c.hidden))
            layer.gate_up_exps = torch.cat((gate, up), dim=1).transpose(1, 2).contiguous()
            layer.down_exps = ld.tensor(p + "ffn_down_exps.weight", (e, c.hidden, f)).transpose(1, 2).contiguous()
            del gate, up
        else:
            gate = ld.tensor(p + "ffn_gate.weight", (c.ffn_hidden, c.hidden))
            up = ld.tensor(p + "ffn_up.weight", (c.ffn_hidden, c.hidden))
            layer.w_gate_up = torch.cat((gate, up)).t().contiguous()
            layer.w_down = ld.tensor(p + "ffn_down.weight", (c.hidden, c.ffn_hidden)).t().contiguous()
            del gate, up
        layers.append(layer)
        if progress is not None:
            progress(i + 1, c.n_layers + 1)
    token_embd = ld.tensor("token_embd.weight", (c.vocab_size, c.hidden))
    if c.tied_output:
        output, token_embd = token_embd.t().contiguous(), None
    else:
        output = ld.tensor("output.weight", (c.vocab_size, c.hidden)).t().contiguous()
    if progress is not None:
        progress(c.n_layers + 1, c.n_layers + 1)
    return Weights(
        token_embd=token_embd,
        output_norm=ld.tensor("output_norm.weight", (c.hidden,), norm=True),
        output=output,
        layers=layers,
        rope_freqs=ld.tensor("rope_freqs.weight", (c.rope_dim // 2,), norm=True, required=False),
    )
