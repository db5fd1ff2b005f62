"""Load a GGUF file's tensors onto a device in a dtype. GGUF names (`blk.N.attn_q.weight`) are mapped to
ours here, once, and every shape is checked against the ModelConfig before anything is computed.

Quantized tensors travel to the device as raw block bytes and are dequantized there (quants.py), so a CUDA
load moves the file's bytes, not 4× them. Norm weights stay float32: the norms are computed in float32.

Matrices come in one of three forms (WEIGHT_MODES): "dequantized" (a dense [in, out] tensor in the compute
dtype, the exact path), "blocks" (a BlockMatrix, blocks.py: the file's own blocks, multiplied with float32
activations by a C++ kernel; the same numbers up to summation order, at about the file's bytes per token; CPU
only) or "quantized" (a QuantMatrix, qmatmul.py: 4-bit planes read by PyTorch's weight-only int4 matmul with
bfloat16 activations: fast, not exact). Only matrices stored block-quantized in the file are kept in blocks or
quantized: float matrices (F32/F16/BF16), the MoE router and the norms are always dense. A quantized model's token embeddings stay as
the file's raw rows (Weights.embed dequantizes the rows it is asked for). A MoE layer's expert stacks take
their forms one by one (ExpertStacks), which also runs the chosen experts, with one gated FFN (`gated`) for
them and the dense FFN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType

from workbench import blocks
from workbench.blocks import BlockExperts, BlockMatrix
from workbench.config import ModelConfig
from workbench.errors import ModelError, UnsupportedError
from workbench.gguf_file import GGUFFile
from workbench.qmatmul import Grid, QuantExperts, QuantMatrix, expert, grid, matmul
from workbench.quants import dequantize

Matrix = torch.Tensor | QuantMatrix | BlockMatrix
Experts = torch.Tensor | QuantExperts | BlockExperts  # a stack [E, in, out], or the experts' blocks or planes
WEIGHT_MODES = ("dequantized", "blocks", "quantized")
_FLOAT_FILE_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.F64})


@dataclass
class LayerWeights:
    """One block. Matrices are stored [in, out] (transposed from GGUF's [out, in]) and used as x @ W: a
    one-row matmul reads a [in, out] matrix ~1.6× faster than F.linear reads [out, in] on this CPU."""

    attn_norm: torch.Tensor
    wqkv: Matrix  # [hidden, (n_heads + 2·n_kv_heads)·head_dim]: Q, K, V fused into one matmul (MLA: see below)
    wo: Matrix  # [n_heads·v_head_dim, hidden]
    ffn_norm: torch.Tensor
    bqkv: torch.Tensor | None = None  # qwen2 attention biases, fused like wqkv
    q_norm: torch.Tensor | None = None  # [head_dim], per-head QK-norm; olmoe: [n_heads·head_dim], the whole q
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # gemma3
    post_ffn_norm: torch.Tensor | None = None
    w_gate_up: Matrix | None = None  # dense FFN [hidden, 2·ffn]: gate then up
    w_down: Matrix | None = None  # [ffn, hidden]
    router: torch.Tensor | None = None  # MoE [hidden, n_experts]
    experts: ExpertStacks | None = None  # MoE: the expert stacks, and how the chosen experts run
    shared_gate: torch.Tensor | None = None  # qwen2moe's shared expert: its gate vector [hidden] (sigmoid(x·g))
    shared_gate_up: Matrix | None = None  # [hidden, 2·shared ffn]
    shared_down: Matrix | None = None  # [shared ffn, hidden]
    # deepseek2's MLA: wqkv is x's one matmul [hidden, q part + kv_lora_rank + rope_dim], the q part being q itself
    # (n_heads·head_dim) or, with a q LoRA, its q_lora_rank-wide down projection (→ q_a_norm → wq_b).
    q_a_norm: torch.Tensor | None = None  # [q_lora_rank]
    wq_b: Matrix | None = None  # [q_lora_rank, n_heads·head_dim]
    kv_a_norm: torch.Tensor | None = None  # [kv_lora_rank]: the latent's RMSNorm
    wk_b: torch.Tensor | None = None  # [n_heads, kv_lora_rank, nope]: q_nope → latent space (absorbed K decompression)
    wv_b: torch.Tensor | None = None  # [n_heads, v_head_dim, kv_lora_rank]: latent attention output → value heads
    probs_bias: torch.Tensor | None = None  # [n_experts] float32: V3's exp_probs_b, added to choose experts
    bo: torch.Tensor | None = None  # [hidden]: the attention output projection's bias (gpt-oss)
    sinks: torch.Tensor | None = None  # [n_heads] float32: gpt-oss's attention sink logits
    router_bias: torch.Tensor | None = None  # [n_experts] float32 (gpt-oss)


GLU = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate·x, up·x) → the hidden activation


def gated(x: torch.Tensor, w_gate_up: Matrix, w_down: Matrix, glu: GLU,
          b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None) -> torch.Tensor:
    """down(glu(gate·x, up·x)), the gated FFN (SwiGLU: silu(gate) ⊙ up), with gate and up fused: w_gate_up is
    [hidden, 2·ffn], and their biases (gpt-oss's experts) fused the same way. Dense weights may carry a leading
    batch dim (x [k, T, hidden] against k experts' stacks)."""
    gate_up = matmul(x, w_gate_up)
    if b_gate_up is not None:
        gate_up = gate_up + b_gate_up
    gate, up = gate_up.chunk(2, dim=-1)
    out = matmul(glu(gate, up), w_down)
    return out if b_down is None else out + b_down


@dataclass
class ExpertStacks:
    """A MoE layer's experts as the file stores them: gate and up fused [E, hidden, 2·expert_ffn] and down
    [E, expert_ffn, hidden], each stack dense or quantized in its own right (a file may store gate/up as F16
    and down as Q4_0). Calling it runs each row's chosen experts; how depends on both stacks' forms, here only."""

    gate_up: Experts
    down: Experts
    gate_up_bias: torch.Tensor | None = None  # [E, 2·expert_ffn] (gpt-oss)
    down_bias: torch.Tensor | None = None  # [E, hidden]

    def _biases(self, e) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert e's biases (an int, a 0-d or a [k] index tensor; None where the file has none)."""
        return (None if self.gate_up_bias is None else self.gate_up_bias[e],
                None if self.down_bias is None else self.down_bias[e])

    @property
    def dense(self) -> bool:
        """Both stacks are dense tensors: the only case batched gathers and grouped matmuls may be used."""
        return isinstance(self.gate_up, torch.Tensor) and isinstance(self.down, torch.Tensor)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, glu: GLU,
                 grouped_mm: bool = False) -> torch.Tensor:
        """Σ over each row's chosen experts of weight × expert(x): x [T, hidden], ids and weights [T, k]."""
        if x.shape[0] == 1 and self.dense and grouped_mm and self.gate_up_bias is None and self.down_bias is None:
            # One token on a Hopper-class GPU: a grouped matmul over the whole expert stack, whose groups are
            # the chosen experts (one row each, rows sorted by expert; `offs` ends each expert's rows), so
            # only the chosen experts' matrices are read, and nothing waits for the host.
            chosen = ids[0]
            order = chosen.argsort()
            every = torch.arange(self.gate_up.shape[0], device=x.device)
            offs = (chosen[None, :] <= every[:, None]).sum(1, dtype=torch.int32)  # [E]
            rows = x.expand(chosen.shape[0], -1).contiguous()
            gate, up = torch._grouped_mm(rows, self.gate_up, offs=offs).chunk(2, dim=-1)
            y = torch._grouped_mm(glu(gate, up).contiguous(), self.down, offs=offs)  # [k, hidden], by expert
            return (y * weights[0, order, None].to(x.dtype)).sum(0, keepdim=True)
        if x.shape[0] == 1 and self.dense:
            # One token: gather the k chosen experts' matrices by index and batch them, with no host sync
            # (so a CUDA graph can hold the step).
            chosen = ids[0]
            b_gate_up, b_down = self._biases(chosen)  # [k, …]: one row per expert, broadcast over its one token
            y = gated(x.expand(chosen.shape[0], 1, -1), self.gate_up[chosen], self.down[chosen], glu,
                      None if b_gate_up is None else b_gate_up[:, None], None if b_down is None else b_down[:, None])
            return (y[:, 0] * weights[0, :, None].to(x.dtype)).sum(0, keepdim=True)
        if x.shape[0] == 1:
            # One token, the k chosen experts in turn. On a GPU each expert is selected on the device by its id
            # (a 0-d tensor), so nothing waits for the host and a CUDA graph can hold the step; on the CPU
            # reading the ids back costs nothing and an int selects views, no copies.
            out = torch.zeros_like(x)
            on_host = x.device.type == "cpu"
            for slot in range(ids.shape[1]):
                e = int(ids[0, slot]) if on_host else ids[0, slot]
                out += gated(x, expert(self.gate_up, e), expert(self.down, e), glu, *self._biases(e)) * weights[0, slot].to(x.dtype)
            return out
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            token_idx, slot = (ids == e).nonzero(as_tuple=True)
            ye = gated(x[token_idx], expert(self.gate_up, e), expert(self.down, e), glu, *self._biases(e))
            out.index_add_(0, token_idx, ye * weights[token_idx, slot, None].to(x.dtype))
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [t for stack in (self.gate_up, self.down)
                for t in (stack.tensors() if isinstance(stack, (QuantExperts, BlockExperts)) else [stack])]


@dataclass
class Weights:
    token_embd: torch.Tensor | None  # [vocab, hidden]; None when rows are read from `output` or `embd_raw`
    output_norm: torch.Tensor
    output: Matrix  # [hidden, vocab], transposed for x @ W
    layers: list[LayerWeights]
    rope_freqs: torch.Tensor | None  # llama3-style per-frequency divisors, when the file has them
    dtype: torch.dtype = torch.float32  # the compute dtype
    embd_raw: tuple[torch.Tensor, GGMLQuantizationType] | None = None  # quantized mode: GGUF rows [vocab, bytes]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings [T, hidden]. A tied model keeps one copy of the matrix, in the head's orientation."""
        if self.token_embd is not None:
            return self.token_embd[tokens]
        if self.embd_raw is not None:
            raw, qtype = self.embd_raw
            return dequantize(raw[tokens], qtype).to(self.dtype)
        return self.output[:, tokens].t().contiguous()


class _Loader:
    def __init__(self, gguf: GGUFFile, device: torch.device, dtype: torch.dtype, mode: str) -> None:
        self.gguf, self.device, self.dtype, self.mode = gguf, device, dtype, mode

    def raw(self, name: str, shape: tuple[int, ...], required: bool = True) -> torch.Tensor | None:
        """The tensor's bytes on the device, [rows, bytes per row], once its shape is checked against `shape`."""
        info = self.gguf.tensors.get(name)
        if info is None:
            if required:
                raise ModelError(f"{self.gguf.path.name}: tensor '{name}' is missing.")
            return None
        if info.shape != shape:
            raise ModelError(
                f"{self.gguf.path.name}: tensor '{name}' has shape {list(info.shape)}, but the metadata implies {list(shape)}."
            )
        # Always a copy (on a CPU too): a loaded model owns its numbers and never reads the mapped file again,
        # so truncating or rewriting the file afterwards neither crashes it nor changes it.
        return self.gguf.raw(name).to(self.device, copy=True)

    def tensor(
        self, name: str, shape: tuple[int, ...], *, norm: bool = False, required: bool = True,
    ) -> torch.Tensor | None:
        raw = self.raw(name, shape, required)
        if raw is None:
            return None
        info = self.gguf.tensors[name]
        try:
            values = dequantize(raw, info.ggml_type)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{self.gguf.path.name}: tensor '{name}': {exc}") from None
        values = values.reshape(shape)
        return values.to(torch.float32 if norm else self.dtype)

    def grids(self, name: str, shape: tuple[int, ...]) -> Grid | list[Grid]:
        """A block-quantized matrix [out, in] (or stack [E, out, in]) as qmatmul grids, on the device."""
        raw = self.raw(name, shape).reshape(*shape[:-1], -1)
        qtype = self.gguf.tensors[name].ggml_type
        try:
            if len(shape) == 2:
                return grid(raw, qtype, shape[-1])
            return [grid(raw[e], qtype, shape[-1]) for e in range(shape[0])]
        except UnsupportedError as exc:
            raise UnsupportedError(f"{self.gguf.path.name}: tensor '{name}': {exc}") from None

    def block_part(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, GGMLQuantizationType]:
        """A matrix [out, in] (or stack [E, out, in]) as a part of a BlockMatrix (blocks.part), on the device."""
        raw = self.raw(name, shape).reshape(*shape[:-1], -1)
        try:
            return blocks.part(raw, self.gguf.tensors[name].ggml_type)
        except UnsupportedError as exc:
            raise UnsupportedError(f"{self.gguf.path.name}: tensor '{name}': {exc}") from None

    def matrix(self, names: list[str], shapes: list[tuple[int, ...]]) -> Matrix | QuantExperts:
        """GGUF matrices [..., out, in] stacked along the out rows (Q, K, V; gate, up) → one matrix used as
        x @ W: dense [..., in, out] in the compute dtype; in blocks mode, where some part is block-quantized
        in the file, a BlockMatrix (BlockExperts for a stack [E, out, in]) of every part; in quantized mode,
        every part block-quantized in the file, a QuantMatrix (QuantExperts for a stack)."""
        types = [self.gguf.tensors[n].ggml_type if n in self.gguf.tensors else None for n in names]
        if self.mode == "blocks" and any(t is not None and t not in _FLOAT_FILE_TYPES for t in types) and all(
            t is not None and blocks.kernel_reads(blocks.part_type(t), s[-1]) for t, s in zip(types, shapes)
        ):  # some part is block-quantized: every part goes to the kernel, as stored (or dequantized, see part)
            parts = [self.block_part(n, s) for n, s in zip(names, shapes)]
            return BlockMatrix.of(parts, shapes[0][-1]) if len(shapes[0]) == 2 else BlockExperts.of(parts, shapes[0][-1])
        if self.mode == "quantized" and all(t is not None and t not in _FLOAT_FILE_TYPES for t in types):
            grids = [self.grids(n, s) for n, s in zip(names, shapes)]  # per part: one grid, or one per expert
            if len(shapes[0]) == 2:
                return QuantMatrix.from_grids(grids)
            return QuantExperts([QuantMatrix.from_grids([g[e] for g in grids]) for e in range(shapes[0][0])])
        parts = [self.tensor(n, s) for n, s in zip(names, shapes)]
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
        del parts
        return rows.transpose(-1, -2).contiguous()


def _name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """The GGUF tensor name, from gguf-py's map: (ATTN_Q, 3) → 'blk.3.attn_q.weight'."""
    base = TENSOR_NAMES[kind] if layer is None else TENSOR_NAMES[kind].format(bid=layer)
    return f"{base}.{suffix}"


def _load_ffn(ld: _Loader, c: ModelConfig, i: int, layer: LayerWeights) -> None:
    """Layer i's feed-forward: the routed experts (and a shared expert, gated or not), or a dense FFN."""
    E = MODEL_TENSOR
    if c.is_moe_layer(i):
        e, f = c.n_experts, c.expert_ffn_hidden
        layer.router = ld.tensor(_name(E.FFN_GATE_INP, i), (e, c.hidden)).t().contiguous()
        layer.router_bias = ld.tensor(_name(E.FFN_GATE_INP, i, "bias"), (e,), norm=True, required=False)
        gate_b, up_b = (ld.tensor(_name(kind, i, "bias"), (e, f), required=False) for kind in (E.FFN_GATE_EXP, E.FFN_UP_EXP))
        layer.experts = ExpertStacks(
            gate_up=ld.matrix([_name(E.FFN_GATE_EXP, i), _name(E.FFN_UP_EXP, i)], [(e, f, c.hidden)] * 2),
            down=ld.matrix([_name(E.FFN_DOWN_EXP, i)], [(e, c.hidden, f)]),
            gate_up_bias=None if gate_b is None else torch.cat((gate_b, up_b), -1),
            down_bias=ld.tensor(_name(E.FFN_DOWN_EXP, i, "bias"), (e, c.hidden), required=False),
        )
        if c.has_probs_bias:
            layer.probs_bias = ld.tensor(_name(E.FFN_EXP_PROBS_B, i, "bias"), (e,), norm=True)
        if c.shared_ffn_hidden:
            sf = c.shared_ffn_hidden
            if c.shared_gate:
                layer.shared_gate = ld.tensor(_name(E.FFN_GATE_INP_SHEXP, i), (c.hidden,))
            layer.shared_gate_up = ld.matrix([_name(E.FFN_GATE_SHEXP, i), _name(E.FFN_UP_SHEXP, i)], [(sf, c.hidden)] * 2)
            layer.shared_down = ld.matrix([_name(E.FFN_DOWN_SHEXP, i)], [(c.hidden, sf)])
    else:
        layer.w_gate_up = ld.matrix([_name(E.FFN_GATE, i), _name(E.FFN_UP, i)], [(c.ffn_hidden, c.hidden)] * 2)
        layer.w_down = ld.matrix([_name(E.FFN_DOWN, i)], [(c.hidden, c.ffn_hidden)])


def _mla_layer(ld: _Loader, c: ModelConfig, i: int) -> LayerWeights:
    """A deepseek2 block: the q (LoRA or plain) and kv_a projections fused, the latent's norm, the per-head K and
    V decompressions (attn_k_b / attn_v_b, or cut out of an older file's single attn_kv_b), then the FFN."""
    E = MODEL_TENSOR
    H, nope, rope, v, lora = c.n_heads, c.head_dim - c.rope_dim, c.rope_dim, c.v_head_dim, c.kv_lora_rank
    q_rows = c.q_lora_rank or H * c.head_dim
    q_name = _name(E.ATTN_Q_A if c.q_lora_rank else E.ATTN_Q, i)
    layer = LayerWeights(
        attn_norm=ld.tensor(_name(E.ATTN_NORM, i), (c.hidden,), norm=True),
        wqkv=ld.matrix([q_name, _name(E.ATTN_KV_A_MQA, i)], [(q_rows, c.hidden), (lora + rope, c.hidden)]),
        wo=ld.matrix([_name(E.ATTN_OUT, i)], [(c.hidden, H * v)]),
        ffn_norm=ld.tensor(_name(E.FFN_NORM, i), (c.hidden,), norm=True),
        kv_a_norm=ld.tensor(_name(E.ATTN_KV_A_NORM, i), (lora,), norm=True),
    )
    if c.q_lora_rank:
        layer.q_a_norm = ld.tensor(_name(E.ATTN_Q_A_NORM, i), (c.q_lora_rank,), norm=True)
        layer.wq_b = ld.matrix([_name(E.ATTN_Q_B, i)], [(H * c.head_dim, c.q_lora_rank)])
    if _name(E.ATTN_KV_B, i) in ld.gguf.tensors:  # older files: per head [nope K rows; v V rows] over the latent
        kv_b = ld.tensor(_name(E.ATTN_KV_B, i), (H * (nope + v), lora)).view(H, nope + v, lora)
        layer.wk_b, layer.wv_b = kv_b[:, :nope].transpose(1, 2).contiguous(), kv_b[:, nope:].contiguous()
    else:
        layer.wk_b = ld.tensor(_name(E.ATTN_K_B, i), (H, lora, nope))
        layer.wv_b = ld.tensor(_name(E.ATTN_V_B, i), (H, v, lora))
    _load_ffn(ld, c, i, layer)
    return layer


def load_weights(
    gguf: GGUFFile, config: ModelConfig, device: torch.device, dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None, mode: str = "dequantized",
) -> Weights:
    """Every tensor, checked against the config, on `device` in `dtype`, matrices in `mode` (WEIGHT_MODES).
    `progress(done, total)` is called after each layer (and once more for the embeddings and head)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights mode {mode!r} is not one of {WEIGHT_MODES}")
    c, ld = config, _Loader(gguf, device, dtype, mode)
    E = MODEL_TENSOR  # gguf-py's tensor kinds; _name gives each its name in the file
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = []
    for i in range(c.n_layers):
        if c.is_mla:
            layers.append(_mla_layer(ld, c, i))
            if progress is not None:
                progress(i + 1, c.n_layers + 1)
            continue
        biases = [ld.tensor(_name(kind, i, "bias"), (n,), required=False)
                  for kind, n in ((E.ATTN_Q, q_dim), (E.ATTN_K, kv_dim), (E.ATTN_V, kv_dim))]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            raise ModelError(f"{gguf.path.name}: layer {i} has biases on some of Q, K, V but not all.")
        layer = LayerWeights(
            attn_norm=ld.tensor(_name(E.ATTN_NORM, i), (c.hidden,), norm=True),
            wqkv=ld.matrix([_name(E.ATTN_Q, i), _name(E.ATTN_K, i), _name(E.ATTN_V, i)],
                           [(q_dim, c.hidden), (kv_dim, c.hidden), (kv_dim, c.hidden)]),
            wo=ld.matrix([_name(E.ATTN_OUT, i)], [(c.hidden, q_dim)]),
            # gpt-oss names the norm before its FFN post_attention_norm (the GGUF name of HF's post_attention_layernorm)
            ffn_norm=ld.tensor(_name(E.ATTN_POST_NORM if c.arch == "gpt-oss" else E.FFN_NORM, i), (c.hidden,), norm=True),
            bqkv=torch.cat(biases) if biases[0] is not None else None,
            bo=ld.tensor(_name(E.ATTN_OUT, i, "bias"), (c.hidden,), required=False),
        )
        if c.attn_sinks:
            layer.sinks = ld.tensor(_name(E.ATTN_SINKS, i), (c.n_heads,), norm=True)
        if c.qk_norm:  # one weight per head dim, or (olmoe) per value of the whole projection
            q_n, k_n = (q_dim, kv_dim) if c.qk_norm_whole else (c.head_dim, c.head_dim)
            layer.q_norm = ld.tensor(_name(E.ATTN_Q_NORM, i), (q_n,), norm=True)
            layer.k_norm = ld.tensor(_name(E.ATTN_K_NORM, i), (k_n,), norm=True)
        if c.post_norms:
            layer.post_attn_norm = ld.tensor(_name(E.ATTN_POST_NORM, i), (c.hidden,), norm=True)
            layer.post_ffn_norm = ld.tensor(_name(E.FFN_POST_NORM, i), (c.hidden,), norm=True)
        _load_ffn(ld, c, i, layer)
        layers.append(layer)
        if progress is not None:
            progress(i + 1, c.n_layers + 1)
    embd, embd_shape, embd_raw = _name(E.TOKEN_EMBD), (c.vocab_size, c.hidden), None
    output = ld.matrix([_name(E.TOKEN_EMBD if c.tied_output else E.OUTPUT)], [embd_shape])
    embd_type = gguf.tensors[embd].ggml_type if embd in gguf.tensors else None
    if (c.tied_output and isinstance(output, BlockMatrix) and len(output.parts) == 1
            and output.types[0] == int(embd_type)):  # the head's own blocks give the embedding rows: one copy
        embd_raw, token_embd = (output.parts[0], embd_type), None
    elif mode != "dequantized" and embd_type is not None and embd_type not in _FLOAT_FILE_TYPES:
        embd_raw, token_embd = (ld.raw(embd, embd_shape), embd_type), None
    elif c.tied_output and isinstance(output, torch.Tensor):
        token_embd = None  # rows are read from the (dense) head
    else:  # untied, or (not seen in the wild) a float embedding under a quantized head: dense rows
        token_embd = ld.tensor(embd, embd_shape)
    if progress is not None:
        progress(c.n_layers + 1, c.n_layers + 1)
    return Weights(
        token_embd=token_embd,
        output_norm=ld.tensor(_name(E.OUTPUT_NORM), (c.hidden,), norm=True),
        output=output,
        layers=layers,
        rope_freqs=ld.tensor(_name(E.ROPE_FREQS), (c.rope_dim // 2,), norm=True, required=False),
        dtype=dtype,
        embd_raw=embd_raw,
    )
