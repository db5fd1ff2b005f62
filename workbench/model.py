"""The forward pass: embed → blocks (attention, feed-forward | MoE) → norm → head.

One forward serves prefill, one cached decode step and the uncached path (the whole sequence, fresh cache):
`Model.forward(tokens, start, cache)` computes positions start..start+T, writes their K/V into the cache and
attends over everything the cache holds up to them. Architecture differences are ModelConfig data.

Capture points: when `probe` is given, it is called with a TransformerLens-style name and the tensor at that
point (and the forward goes on with the tensor it returns, if any: `seen`), in forward order per layer i: `blocks.{i}.attn_norm` → `.attn.q`, `.attn.k`, `.attn.v` (after the
projection and its bias) → `.attn.q_normed`, `.attn.k_normed` (archs with QK-norm) → `.attn.q_rope`,
`.attn.k_rope` (deepseek2's latent attention instead: `.attn.q_pe`, `.attn.kv_latent`, `.attn.k_pe`) →
`.attn.pattern` (only for a probe that wants it: it costs a second attention), `.attn.sink_share` (gpt-oss) → `.attn.out`
(before the output projection) → `blocks.{i}.resid_mid` → `.ffn_norm` → `.moe.router_logits`, `.moe.topk_ids`,
`.moe.topk_weights` → `.moe.shared_gate` (qwen2moe: the shared expert's sigmoid gate, [T, 1]) → `.ffn_out` → `blocks.{i}.resid_post`; then `final_norm` and `logits`. Without a probe
nothing extra is computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench import blocks
from workbench.cache import KVCache
from workbench.config import ModelConfig, Yarn
from workbench.errors import InputError
from workbench.gguf_file import GGUFFile
from workbench.loading import LoadInfo, equivalence_tolerance, load_parts
from workbench.qmatmul import matmul
from workbench.tokenizer import Tokenizer
from workbench.weights import LayerWeights, Weights, gated

Probe = Callable[[str, torch.Tensor], "torch.Tensor | None"]

# "Break it on purpose": each switch is one named deviation at one place in the forward pass, reproducing a
# bug class that real engines shipped. Sessions pass a set of these names to forward().
BREAKS = {
    "skip-qk-norm": "skip the per-head Q/K RMSNorm (archs that have it)",
    "rope-style-swap": "rotate adjacent pairs where the arch uses split halves, and vice versa",
    "rope-base-10k": "use RoPE base 10000 on every layer instead of the file's",
    "no-topk-renorm": "do not renormalise the top-k router weights to sum to 1",
    "moe-as-dense": "ignore the router: every token goes to expert 0 with weight 1",
    "cache-off-by-one": "a cached decode step attends to one position too few (its own key is missed)",
    "head-dim-from-hidden": "derive head_dim as hidden / heads for the attention scale and RoPE width",
    "topk-renorm-anyway": "renormalise the top-k router weights where the arch keeps them as they are (qwen2moe, olmoe)",
    "shared-expert-dropped": "leave the shared expert(s) out of the MoE output (qwen2moe, deepseek2)",
    "shared-expert-ungated": "add the shared expert with weight 1 instead of its sigmoid gate (qwen2moe)",
    "qk-norm-per-head": "normalise q and k head by head where the arch normalises the whole projection (olmoe)",
    "skip-kv-a-norm": "leave MLA's latent KV unnormalised (attn_kv_a_norm skipped; deepseek2)",
    "probs-bias-in-weights": "weigh the experts by the bias-corrected scores meant only for choosing them (V3)",
    "no-group-limit": "choose the top-k experts among all of them, ignoring the expert groups (V3)",
    "no-routed-scaling": "leave out the routed scaling factor (expert_weights_scale) of the experts' weights",
    "yarn-ignored": "ignore the file's YaRN RoPE scaling: plain RoPE, no magnitude or attention-scale correction",
    "sinks-dropped": "leave gpt-oss's attention sinks out of the softmax",
    "softmax-before-topk": "softmax over every expert's logit, then top-k, where gpt-oss takes the top-k logits, "
                           "then a softmax over those k",
    "swiglu-unclamped": "the plain SwiGLU instead of gpt-oss's clamped one (σ(1.702·g), up + 1, limits ±7)",
    "no-sliding-window": "let every layer attend to every position, the sliding-window layers too",
}


# Where each break changes something: on a model of another config it is a no-op (skip-qk-norm without QK-norm,
# the routing ones on a dense model, head-dim-from-hidden where head_dim is hidden / heads, …).
APPLIES: dict[str, Callable[[ModelConfig], bool]] = {
    "skip-qk-norm": lambda c: c.qk_norm,
    "rope-style-swap": lambda c: True,
    "rope-base-10k": lambda c: not (c.rope_base == 10000.0 and c.rope_base_local in (None, 10000.0)),
    "no-topk-renorm": lambda c: c.is_moe and c.norm_topk,
    "moe-as-dense": lambda c: c.is_moe,
    "cache-off-by-one": lambda c: True,  # from the first decode step on
    "head-dim-from-hidden": lambda c: c.head_dim != c.hidden // c.n_heads,
    # gpt-oss's softmax over the chosen k sums to 1 already
    "topk-renorm-anyway": lambda c: c.is_moe and not c.norm_topk and c.gating != "softmax_topk",
    "shared-expert-dropped": lambda c: c.shared_ffn_hidden > 0,
    "shared-expert-ungated": lambda c: c.shared_gate,
    "qk-norm-per-head": lambda c: c.qk_norm and c.qk_norm_whole,
    "skip-kv-a-norm": lambda c: c.is_mla,
    "probs-bias-in-weights": lambda c: c.has_probs_bias,
    "no-group-limit": lambda c: c.n_groups_used < c.n_expert_groups,
    "no-routed-scaling": lambda c: c.routed_scale != 1.0,
    "yarn-ignored": lambda c: c.rope_yarn is not None,
    "sinks-dropped": lambda c: c.attn_sinks,
    "softmax-before-topk": lambda c: c.gating == "softmax_topk",
    "swiglu-unclamped": lambda c: c.ffn_act == "swiglu_oai",
    "no-sliding-window": lambda c: c.sliding_window is not None,
}


def breaks_that_apply(config: ModelConfig) -> list[str]:
    """The break switches that change something on a model of this config (APPLIES), in BREAKS' order."""
    return [name for name in BREAKS if APPLIES[name](config)]


def break_config(config: ModelConfig, breaks: frozenset[str]) -> ModelConfig:
    """The config a forward with `breaks` runs on: the correct one with the config-shaped bugs written in. The
    others are not a hyperparameter and stay named hooks in the forward pass: cache-off-by-one (Span.mask),
    skip-kv-a-norm (Model.latent_attention), moe-as-dense, the shared-expert ones, probs-bias-in-weights and
    no-group-limit (Model.moe)."""
    changes: dict = {}
    if "skip-qk-norm" in breaks:
        changes["qk_norm"] = False
    if "rope-style-swap" in breaks:
        changes["rope_style"] = "normal" if config.rope_style == "neox" else "neox"
    if "rope-base-10k" in breaks:
        changes["rope_base"] = 10000.0
        changes["rope_base_local"] = 10000.0 if config.rope_base_local is not None else None
    if "no-topk-renorm" in breaks:
        changes["norm_topk"] = False
    if "topk-renorm-anyway" in breaks:
        changes["norm_topk"] = True
    if "qk-norm-per-head" in breaks:
        changes["qk_norm_whole"] = False
    if "no-routed-scaling" in breaks:
        changes["routed_scale"] = 1.0
    if "sinks-dropped" in breaks:
        changes["attn_sinks"] = False
    if "softmax-before-topk" in breaks and config.gating == "softmax_topk":
        changes["gating"] = "softmax"
    if "swiglu-unclamped" in breaks and config.ffn_act == "swiglu_oai":
        changes["ffn_act"] = "silu"
    if "no-sliding-window" in breaks:
        changes["sliding_window"] = None
    if "yarn-ignored" in breaks and config.rope_yarn is not None:
        changes["rope_yarn"] = None
        if config.is_mla:  # deepseek2's q·k scale carries YaRN's mscale²
            changes["attn_scale"] = config.head_dim**-0.5
    if "head-dim-from-hidden" in breaks:  # for the attention scale and the RoPE width; the tensors keep their shapes
        derived = config.hidden // config.n_heads
        changes["attn_scale"] = derived**-0.5
        if not config.is_mla:  # MLA's RoPE width is its own (rope.dimension_count), not a share of head_dim
            changes["rope_dim"] = min(derived, config.rope_dim)
    return replace(config, **changes) if changes else config


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU (llama.cpp's ggml_swiglu_oai): g = min(gate, 7), u = clamp(up, ±7),
    g · σ(1.702 g) · (u + 1)."""
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


GLUS = {  # ModelConfig.ffn_act → (gate·x, up·x) → the FFN's hidden activation
    "silu": lambda gate, up: F.silu(gate) * up,
    "gelu_tanh": lambda gate, up: F.gelu(gate, approximate="tanh") * up,
    "swiglu_oai": swiglu_oai,
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, returned in x's dtype (on a CPU with the block kernels
    loaded, blocks.cpp's one-pass version: F.rms_norm costs ~4× as much on a one-token row)."""
    if x.dtype == torch.float32:
        if blocks.ops is not None and x.device.type == "cpu" and weight.dtype == torch.float32:
            return blocks.ops.rms_norm(x, weight, eps)
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(x.dtype)


def qk_norm(x: torch.Tensor, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """QK-norm of x [T, heads, head_dim]: each head on its own (qwen3, gemma3: weight [head_dim]) or the whole
    projection at once (olmoe: weight [heads·head_dim], one RMS over every head of a row)."""
    if config.qk_norm_whole:
        return rms_norm(x.flatten(1), weight, config.rms_eps).view_as(x)
    if weight.numel() == x.shape[-1]:
        return rms_norm(x, weight, config.rms_eps)
    # a whole-projection weight normed head by head (the qk-norm-per-head break): each head's slice of it
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, config.rms_eps) * weight.float().view(x.shape[1:])
    return normed.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first `rot` dims of x [T, heads, head_dim] by position; cos, sin are rope_table rows [T, rot].

    Each rotated dim is x·cos + partner·sin, where the partner is the other member of its pair: x[i + rot/2]
    (neox, split halves) or x[i ± 1] (normal, adjacent pairs). rope_table lays cos and sin out per style,
    with the sign of sin folded in, so both styles cost the same few ops.
    """
    if blocks.ops is not None and x.device.type == "cpu" and x.dtype == cos.dtype == torch.float32 and x.dim() == 3:
        return blocks.ops.rope(x, cos, sin, style == "neox")  # the same sums, one op instead of ~8
    rot = cos.shape[-1]
    head_dim = x.shape[-1]
    xr = x if rot == head_dim else x[..., :rot]
    if style == "neox":
        partner = torch.roll(xr, rot // 2, dims=-1)  # [x2, x1]
    else:
        partner = xr.unflatten(-1, (rot // 2, 2)).flip(-1).flatten(-2)  # [x1, x0, x3, x2, …]
    out = (xr * cos[:, None, :] + partner * sin[:, None, :]).to(x.dtype)
    return out if rot == head_dim else torch.cat((out, x[..., rot:]), dim=-1)


def grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of q [T, n_heads, d] over keys, values [n_kv_heads, S, d] → [T, n_heads, d].

    Grouped-query attention without copying K/V per query head: the n_heads / n_kv_heads query heads that
    share a KV head are consecutive (as llama.cpp and HF group them), so query head h reads KV head
    h // (n_heads / n_kv_heads). `mask` [T, S] is True where a query may attend (None: everywhere). One fused
    PyTorch kernel (scaled_dot_product_attention with enable_gqa), which accumulates in float32; the
    walkthrough writes the same computation out op by op.

    `sinks` [n_heads] (gpt-oss): one more logit per head in every softmax, that weighs no value. It is a key
    of zeros (score 0) whose mask adds the head's sink logit, with a value of zeros: exact, in the same kernel.
    """
    if (sinks is None and mask is None and q.shape[0] == 1 and blocks.ops is not None and q.device.type == "cpu"
            and q.dtype == keys.dtype == values.dtype == torch.float32 and keys.stride(-1) == values.stride(-1) == 1):
        # one query row, nothing masked (a plain decode step): blocks.cpp's loop, ~2.5× cheaper than SDPA's
        return blocks.ops.decode_attention(q[0], keys, values, scale)[None]
    if sinks is not None:
        keys, values, mask = _with_sink(keys, values, mask, sinks, q.shape[0], q.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
    )  # [1, n_heads, T, d]
    return out[0].transpose(0, 1)


def attention_pattern(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax probabilities grouped_attention weighs the values by: [T, n_heads, keys], float32, written out
    (the fused kernel does not return them). Query head h reads KV head h // (n_heads / n_kv_heads). With
    `sinks`, each head's sink logit joins the softmax and its column is dropped: rows sum to 1 − the sink's share."""
    k = keys.repeat_interleave(q.shape[1] // keys.shape[0], dim=0).float()  # [n_heads, keys, d]
    scores = torch.einsum("thd,hsd->ths", q.float(), k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.float()[None, :, None].expand(scores.shape[0], -1, 1)
    return torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]


def _with_sink(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, sinks: torch.Tensor, T: int,
               n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys, values with one key and value of zeros appended, and the additive float mask [n_heads, T, keys + 1]
    that hides what `mask` hides and gives the new key each head's sink logit."""
    n_kv, S = keys.shape[0], keys.shape[1]
    keys = torch.cat((keys, keys.new_zeros(n_kv, 1, keys.shape[2])), dim=1)
    values = torch.cat((values, values.new_zeros(n_kv, 1, values.shape[2])), dim=1)
    additive = torch.zeros(T, S, dtype=keys.dtype, device=keys.device)
    if mask is not None:
        additive = additive.masked_fill(~mask, float("-inf"))
    sink = sinks.to(keys.dtype)[:, None, None].expand(n_heads, T, 1)
    return keys, values, torch.cat((additive.expand(n_heads, T, S), sink), dim=-1)


def _fused_decode(span: Span, c: ModelConfig, i: int, layer: LayerWeights, qkv: torch.Tensor) -> bool:
    """Whether layer i's attention this step may run as blocks.cpp's decode_step: one token, no probe, no break,
    nothing masked, no sinks, float32 on the CPU, QK-norm (if any) per head, a cache of its own K and V."""
    cache = span.cache
    return (blocks.ops is not None and qkv.shape[0] == 1 and not span.static and not span.breaks
            and qkv.device.type == "cpu" and qkv.dtype == torch.float32 and not cache.shared_values
            and cache.keys[i].dtype == torch.float32 and not c.attn_sinks
            and (not c.qk_norm or (not c.qk_norm_whole and layer.q_norm is not None and layer.q_norm.numel() == c.head_dim
                                   and layer.q_norm.dtype == layer.k_norm.dtype == torch.float32))
            and span.mask(c.layer_window(i)) is None)


def seen(probe: Probe | None, name: str, x: torch.Tensor) -> torch.Tensor:
    """Show x to the probe at capture point `name`; the forward goes on with what the probe returns in its place
    (compare's teacher-forced run puts another engine's tensor there), or with x when it returns None."""
    if probe is None:
        return x
    y = probe(name, x)
    return x if y is None else y


def weigh_values(pattern: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention's output from its probabilities: pattern [T, n_heads, keys] over values [n_kv_heads, keys, d] →
    [T, n_heads, d], query head h reading KV head h // (n_heads / n_kv_heads)."""
    v = values.repeat_interleave(pattern.shape[1] // values.shape[0], dim=0)  # [n_heads, keys, d]
    return torch.einsum("ths,hsd->thd", pattern, v)


def wants(probe: Probe, name: str) -> bool:
    """Whether `probe` takes the capture point `name`: every point, unless it has a `wants(name)` method that
    says otherwise. Points that cost work of their own (the attention pattern) are computed only when wanted."""
    ask = getattr(probe, "wants", None)
    return True if ask is None else bool(ask(name))


class Span:
    """The positions one forward computes over a cache, and what every layer derives from them, made once per
    forward: RoPE rows per (base, scale, style, dims) and attention masks per window.

    A dynamic span (`start` given) covers positions start..start+T and attends over the cache's first start+T
    positions. The static step (`pos`, a [1] long device tensor; start None) holds its position as data and
    attends over the whole cache under a mask: no shape depends on the position and nothing waits for the
    device, so a CUDA graph can capture it (steps.DecodeGraph)."""

    def __init__(self, model: Model, cache: KVCache, config: ModelConfig, breaks: frozenset[str], n_tokens: int,
                 start: int | None, pos: torch.Tensor | None = None) -> None:
        self.model, self.cache, self.config, self.breaks = model, cache, config, breaks
        self.static = start is None
        if self.static:
            self.positions, self.n_keys = pos, None  # [1]; the whole cache
        else:
            self.positions = torch.arange(start, start + n_tokens, device=model.device)  # [T]
            self.n_keys = start + n_tokens
        # cache-off-by-one: a cached decode step (one token after others) does not see its own key
        self.skip_own = "cache-off-by-one" in breaks and not self.static and n_tokens == 1 and start > 0
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def rope(self, base: float, scale: float, style: str, rot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows [T, rot] of these positions (Model.rope_table)."""
        key = (base, scale, style, rot)  # one YaRN per config
        if key not in self._rope:
            n = self.cache.capacity if self.static else self.n_keys
            cos, sin = self.model.rope_table(base, scale, n, style, rot, self.config.rope_yarn)
            if self.static:
                self._rope[key] = cos.index_select(0, self.positions), sin.index_select(0, self.positions)
            else:
                first = self.n_keys - self.positions.shape[0]
                self._rope[key] = cos[first : self.n_keys], sin[first : self.n_keys]
        return self._rope[key]

    def mask(self, window: int | None) -> torch.Tensor | None:
        """[T, keys], True where a query may attend: causal, within `window` positions when the layer slides,
        its own key hidden under cache-off-by-one. None (attend everywhere) for the common one-token step."""
        if window not in self._masks:
            T = self.positions.shape[0]
            if not self.static and T == 1 and not self.skip_own and (window is None or self.n_keys <= window):
                self._masks[window] = None
            else:
                keys = self.cache.positions if self.static else self.cache.positions[: self.n_keys]
                delta = self.positions[:, None] - keys[None, :]  # [T, keys]: query position − key position
                mask = delta >= (1 if self.skip_own else 0)
                self._masks[window] = mask & (delta < window) if window is not None else mask
        return self._masks[window]


class Model:
    """A loaded GGUF model: config, tokenizer, weights on a device, and the forward pass."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig, tokenizer: Tokenizer, weights: Weights, info: LoadInfo) -> None:
        self.gguf, self.config, self.tokenizer, self.weights, self.info = gguf, config, tokenizer, weights, info
        self.device, self.dtype = info.device, info.dtype
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (base, scale, style, rot, yarn)
        # A public option: one-token MoE steps through torch._grouped_mm, on by default where its fast kernel is
        # (bf16, CUDA compute capability ≥ 9); tests and benchmarks switch it off to compare with the gather.
        self.grouped_mm = (
            config.is_moe and self.device.type == "cuda" and self.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(self.device)[0] >= 9
        )
        self._configs: dict[frozenset[str], ModelConfig] = {}

    @classmethod
    def load(
        cls, model: str | Path, device: str = "auto", dtype: str = "auto",
        progress: Callable[[int, int], None] | None = None, weights: str = "auto",
    ) -> Model:
        """A bundled name or a path → a model on the device, warmed up (the policy: workbench/loading.py).
        `weights`: auto, blocks (GGUF blocks, float32 activations: exact, blocks.py), dequantized (exact) or
        quantized (4-bit planes, bfloat16 activations, qmatmul.py)."""
        t0 = time.perf_counter()
        model = cls(*load_parts(model, device, dtype, progress, weights))
        model.warm_up()
        model.info.seconds = time.perf_counter() - t0
        return model

    def warm_up(self) -> None:
        """One short prefill and one decode step into a scratch cache, so that the first steps a user times
        are not the ones paying for kernel selection and first allocations."""
        cache = self.new_cache(4)
        self.forward(torch.zeros(2, dtype=torch.long, device=self.device), 0, cache, last_only=True)
        self.forward(torch.zeros(1, dtype=torch.long, device=self.device), 2, cache, last_only=True)

    @property
    def equivalence_tolerance(self) -> float:
        """The cached-vs-uncached bound for this model's arithmetic (loading.equivalence_tolerance)."""
        return equivalence_tolerance(self.dtype, self.info.weights)

    @property
    def n_params(self) -> int:
        """Parameters in the file (the same whichever form the weights take on the device)."""
        return self.gguf.n_params

    def check_token_ids(self, ids: torch.Tensor | Sequence[int]) -> None:
        """InputError naming the first id outside the vocabulary (a list is checked in Python, so that ids
        too large for int64 get the same sentence)."""
        vocab = self.config.vocab_size
        if isinstance(ids, torch.Tensor):
            if not ids.numel():
                return
            ids = ids[(ids < 0) | (ids >= vocab)].tolist()
        for t in ids:
            if not 0 <= t < vocab:
                raise InputError(f"token id {t} is outside the vocabulary (0..{vocab - 1}).")

    def locate_non_finite(self, ids: Sequence[int], breaks: frozenset[str] = frozenset()) -> str | None:
        """The first capture point, in forward order, whose tensor holds NaN or Inf when `ids` run through a
        fresh cache ("logits" when only the head's output does; None when everything is finite). A diagnosis
        for a step whose logits came out non-finite: it costs one uncached forward, and a sync per point."""
        found: list[str] = []

        def probe(name: str, tensor: torch.Tensor) -> None:
            if not found and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                found.append(name)

        tokens = torch.tensor(list(ids), device=self.device)
        logits = self.forward(tokens, 0, self.new_cache(len(ids)), probe, last_only=True, breaks=breaks)
        if found:
            return found[0]
        return None if bool(torch.isfinite(logits).all()) else "logits"

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        if c.is_mla:  # one row per position: the normed latent, then the shared RoPE key
            return KVCache(c.n_layers, 1, c.kv_lora_rank + c.rope_dim, capacity, self.dtype, self.device,
                           values_in_keys=c.kv_lora_rank)
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    def rope_table(
        self, base: float, scale: float, n_positions: int, style: str, rot: int | None = None, yarn: Yarn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n_positions, rot] (rot defaults to rope_dim) for apply_rope in `style`, grown on demand.

        Pair i turns by position × scale × base^(-2i/rot) (÷ rope_freqs[i] when the file has them; with `yarn`,
        × its per-pair blend of interpolation and extrapolation, and cos, sin × its mscale). The sin table
        carries the sign: −sin on a pair's first member, +sin on its second.
        """
        rot = rot or self.config.rope_dim
        key = (base, scale, style, rot, yarn)
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < n_positions:
            n = max(n_positions, 2 * table[0].shape[0] if table else 256)
            half = rot // 2
            # Angles in float64: position × base^(-2i/rot) loses digits in float32 at long positions.
            inv_freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rot)
            if self.weights.rope_freqs is not None and rot == self.config.rope_dim:
                inv_freq = inv_freq / self.weights.rope_freqs.double().cpu()
            if yarn is not None:
                inv_freq = inv_freq * torch.tensor(yarn.inv_freq_factors(base, rot), dtype=torch.float64)
            angles = torch.outer(torch.arange(n, dtype=torch.float64) * scale, inv_freq)  # [n, half]
            cos, sin = angles.cos(), angles.sin()
            if yarn is not None:
                cos, sin = cos * yarn.mscale, sin * yarn.mscale
            if style == "neox":  # dims (i, i + half) form pair i
                cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
            else:  # dims (2i, 2i + 1) form pair i
                cos, sin = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
            table = (cos.float().to(self.device), sin.float().to(self.device))
            self._rope_tables[key] = table
        return table

    def config_with(self, breaks: frozenset[str]) -> ModelConfig:
        """The config a forward with these breaks runs on (break_config, made once per set of breaks)."""
        if not breaks:
            return self.config
        key = frozenset(breaks)
        if key not in self._configs:
            self._configs[key] = break_config(self.config, key)
        return self._configs[key]

    def rope_tables_for(self, capacity: int) -> list[torch.Tensor]:
        """Grow every layer's RoPE table to `capacity` positions now and return the tables: a captured or compiled
        static step reads these very tensors, so they must exist before it and not be replaced after."""
        c = self.config
        for i in range(c.n_layers):
            self.rope_table(c.layer_rope_base(i), c.layer_rope_scale(i), capacity, c.rope_style, yarn=c.rope_yarn)
        return [t for table in self._rope_tables.values() for t in table]

    @torch.inference_mode()
    def forward(self, *args, **kwargs) -> torch.Tensor:
        """`compute` under inference mode: what every caller but a tracer uses (same arguments)."""
        return self.compute(*args, **kwargs)

    def compute(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: KVCache,
        probe: Probe | None = None,
        last_only: bool = False,
        breaks: frozenset[str] = frozenset(),
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward pass: logits [T, vocab] (float32) after each of tokens [T] at positions start..start+T-1,
        under the caller's grad mode (torch.compile traces this; inference_mode cannot be traced).

        With last_only, only the last position's logits are computed ([1, vocab]): prefill needs no more.
        `breaks` switches on deviations from BREAKS (empty: the correct forward).

        `pos` (a [1] long tensor on the device; `start` is then ignored) runs one decode step with static
        shapes: the position is data, attention spans the whole cache under a mask, and nothing waits for
        the device, so a CUDA graph can capture the step (DecodeGraph). Token ids are not checked then.
        """
        c, w = self.config, self.weights
        if pos is None:
            self.check_token_ids(tokens)
        span = Span(self, cache, self.config_with(breaks), breaks, tokens.shape[0], start if pos is None else None, pos)
        x = w.embed(tokens)
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        for i, layer in enumerate(w.layers):
            h = seen(probe, f"blocks.{i}.attn_norm", rms_norm(x, layer.attn_norm, c.rms_eps))  # [T, hidden]
            a = self.attention(h, i, layer, span, probe)
            if layer.post_attn_norm is not None:
                a = rms_norm(a, layer.post_attn_norm, c.rms_eps)
            x = seen(probe, f"blocks.{i}.resid_mid", x + a)  # [T, hidden]: the residual after attention
            h = seen(probe, f"blocks.{i}.ffn_norm", rms_norm(x, layer.ffn_norm, c.rms_eps))
            f = self.moe(h, i, layer, probe, breaks) if layer.router is not None else self.feed_forward(h, layer)
            f = seen(probe, f"blocks.{i}.ffn_out", f)  # [T, hidden]: the FFN or MoE output (before gemma3's post norm)
            if layer.post_ffn_norm is not None:
                f = rms_norm(f, layer.post_ffn_norm, c.rms_eps)
            x = seen(probe, f"blocks.{i}.resid_post", x + f)
        if last_only:
            x = x[-1:]
        x = seen(probe, "final_norm", self.final_norm(x))  # [T, hidden] (the last row only with last_only)
        return seen(probe, "logits", self.unembed(x))  # [T, vocab]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The RMSNorm after the last block (the logit lens puts every layer's residual through it too)."""
        return rms_norm(x, self.weights.output_norm, self.config.rms_eps)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Normed rows [n, hidden] → logits [n, vocab], float32: the output head."""
        return matmul(x, self.weights.output).float()

    def attention(self, x: torch.Tensor, i: int, layer: LayerWeights, span: Span, probe: Probe | None) -> torch.Tensor:
        """One block's attention over x [T, hidden]: Q, K, V → QK-norm → RoPE → the cache → GQA → output."""
        c = span.config  # the model's config, with the config-shaped breaks applied
        if c.is_mla:
            return self.latent_attention(x, i, layer, span, probe)
        T = x.shape[0]
        qkv = matmul(x, layer.wqkv)
        if layer.bqkv is not None:
            qkv = qkv + layer.bqkv
        if probe is None and _fused_decode(span, c, i, layer, qkv):
            # a plain one-token step on the CPU: QK-norm, RoPE, the cache write and attention in one blocks.cpp op
            # (the same arithmetic as the lines below; tests/test_blocks.py holds the two to each other)
            cos, sin = span.rope(c.layer_rope_base(i), c.layer_rope_scale(i), c.rope_style, c.rope_dim)
            keys, values = span.cache.reserve(i, span.n_keys)
            q_norm, k_norm = (layer.q_norm, layer.k_norm) if c.qk_norm else (None, None)
            out = blocks.ops.decode_step(qkv, q_norm, k_norm, c.rms_eps, cos, sin, c.rope_style == "neox", keys, values,
                                         span.n_keys, c.n_heads, c.attn_scale)
            out = matmul(out, layer.wo)
            return out if layer.bo is None else out + layer.bo
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q = qkv[:, :q_dim].view(T, c.n_heads, c.head_dim)  # [T, n_heads, head_dim]
        k = qkv[:, q_dim : q_dim + kv_dim].view(T, c.n_kv_heads, c.head_dim)  # [T, n_kv_heads, head_dim]
        v = qkv[:, q_dim + kv_dim :].view(T, c.n_kv_heads, c.head_dim)
        if probe is not None:
            q, k, v = (seen(probe, f"blocks.{i}.attn.{n}", t) for n, t in (("q", q), ("k", k), ("v", v)))
        if layer.q_norm is not None:
            if c.qk_norm:
                q, k = qk_norm(q, layer.q_norm, c), qk_norm(k, layer.k_norm, c)
            # with the norm skipped, "normed" shows what the next stage really gets
            q, k = seen(probe, f"blocks.{i}.attn.q_normed", q), seen(probe, f"blocks.{i}.attn.k_normed", k)
        cos, sin = span.rope(c.layer_rope_base(i), c.layer_rope_scale(i), c.rope_style, c.rope_dim)
        qk = apply_rope(torch.cat((q, k), dim=1), cos, sin, c.rope_style)  # Q and K turn by the same angles
        q, k = qk[:, : c.n_heads], qk[:, c.n_heads :]
        q, k = seen(probe, f"blocks.{i}.attn.q_rope", q), seen(probe, f"blocks.{i}.attn.k_rope", k)
        keys, values = span.cache.update(i, span.positions, k, v, span.n_keys)  # [n_kv_heads, keys, head_dim]
        out = self._attend(q, keys, values, i, span, probe, layer.sinks if c.attn_sinks else None)
        out = seen(probe, f"blocks.{i}.attn.out", out.reshape(T, c.n_heads * c.head_dim))  # before the output projection
        out = matmul(out, layer.wo)
        return out if layer.bo is None else out + layer.bo

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, i: int, span: Span,
                probe: Probe | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, n_heads, d] over the cache's keys and values → [T, n_heads, d_v], under the layer's mask (and
        gpt-oss's sinks); the pattern, and the share of attention the sinks take, are capture points for a
        probe that wants them (another engine's pattern can stand in)."""
        c = span.config
        mask = span.mask(c.layer_window(i))
        given = None
        want_pattern = probe is not None and wants(probe, f"blocks.{i}.attn.pattern")  # a second attention: on request
        want_share = sinks is not None and probe is not None and wants(probe, f"blocks.{i}.attn.sink_share")
        if want_pattern or want_share:
            pattern = attention_pattern(q, keys, mask, c.attn_scale, sinks)
            if want_pattern:
                given = probe(f"blocks.{i}.attn.pattern", pattern)
            if want_share:  # [T, n_heads]: what the sink takes of each head's softmax (ours)
                seen(probe, f"blocks.{i}.attn.sink_share", 1 - pattern.sum(-1))
        if given is None:
            return grouped_attention(q, keys, values, mask, c.attn_scale, sinks)
        return weigh_values(given.to(values.dtype), values)  # their probabilities (compare's teacher-forced run)

    def latent_attention(self, x: torch.Tensor, i: int, layer: LayerWeights, span: Span, probe: Probe | None) -> torch.Tensor:
        """deepseek2's multi-head latent attention over x [T, hidden]. Each head's q is [nope | rope] (from x, or
        through the q LoRA); K and V of every head come from one latent row of kv_lora_rank values (normed) that
        the cache holds with one shared RoPE key. Attention runs in the latent space ("absorbed", as llama.cpp
        runs files with attn_k_b): q_nope goes through attn_k_b into the latent, scores are q_latent · latent +
        q_pe · k_pe, and the latent output goes through attn_v_b to each value head. RoPE turns only the rope dims,
        adjacent pairs."""
        c = span.config
        T, H, lora, rope = x.shape[0], c.n_heads, c.kv_lora_rank, c.rope_dim
        nope = c.head_dim - rope
        proj = matmul(x, layer.wqkv)
        q_rows = c.q_lora_rank or H * c.head_dim
        q = proj[:, :q_rows]
        if layer.wq_b is not None:
            q = matmul(rms_norm(q, layer.q_a_norm, c.rms_eps), layer.wq_b)
        q = seen(probe, f"blocks.{i}.attn.q", q.reshape(T, H, c.head_dim))  # [T, n_heads, nope + rope]
        cos, sin = span.rope(c.layer_rope_base(i), c.layer_rope_scale(i), c.rope_style, rope)
        q_pe = seen(probe, f"blocks.{i}.attn.q_pe", apply_rope(q[..., nope:], cos, sin, c.rope_style))  # [T, H, rope]
        latent = proj[:, q_rows : q_rows + lora]
        if "skip-kv-a-norm" not in span.breaks:
            latent = rms_norm(latent, layer.kv_a_norm, c.rms_eps)
        latent = seen(probe, f"blocks.{i}.attn.kv_latent", latent)  # [T, kv_lora_rank]
        k_pe = apply_rope(proj[:, None, q_rows + lora :], cos, sin, c.rope_style)[:, 0]
        k_pe = seen(probe, f"blocks.{i}.attn.k_pe", k_pe)  # [T, rope]: one RoPE key shared by every head
        keys, values = span.cache.update(i, span.positions, torch.cat((latent, k_pe), -1)[:, None], None, span.n_keys)
        q_latent = torch.einsum("thn,hln->thl", q[..., :nope], layer.wk_b)  # [T, H, kv_lora_rank]
        out = self._attend(torch.cat((q_latent, q_pe), -1), keys, values, i, span, probe)  # [T, H, kv_lora_rank]
        out = torch.einsum("thl,hvl->thv", out, layer.wv_b).reshape(T, H * c.v_head_dim)
        return matmul(seen(probe, f"blocks.{i}.attn.out", out), layer.wo)

    def feed_forward(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """Gated FFN: SwiGLU, or GELU-tanh gated for gemma3."""
        return gated(x, layer.w_gate_up, layer.w_down, GLUS[self.config.ffn_act])

    def moe(
        self, x: torch.Tensor, i: int, layer: LayerWeights, probe: Probe | None, breaks: frozenset[str] = frozenset()
    ) -> torch.Tensor:
        """Router scores (softmax, or deepseek2 V3's sigmoid) → top-k (biased, group-limited where the arch says)
        → the chosen scores as weights, renormalised and scaled where the arch says → each chosen expert's SwiGLU
        → weighted sum, + a shared expert (gated by a sigmoid in qwen2moe)."""
        c = self.config_with(breaks)
        logits = (x @ layer.router).float()
        if layer.router_bias is not None:
            logits = logits + layer.router_bias
        router_logits = seen(probe, f"blocks.{i}.moe.router_logits", logits)  # [T, n_experts]
        if c.gating == "softmax_topk":  # gpt-oss: the k best logits, then a softmax over those k alone
            probs = router_logits
        else:
            probs = torch.sigmoid(router_logits) if c.gating == "sigmoid" else torch.softmax(router_logits, dim=-1)
        ids = self._choose(probs, layer, c, breaks)  # [T, k]
        if "probs-bias-in-weights" in breaks and layer.probs_bias is not None:  # the choosing bias leaks into weights
            probs = probs + layer.probs_bias

        def weigh(chosen: torch.Tensor) -> torch.Tensor:  # the chosen experts' weights [T, k]
            picked = probs.gather(-1, chosen)
            return torch.softmax(picked, dim=-1) if c.gating == "softmax_topk" else picked

        weights = weigh(ids)
        if "moe-as-dense" in breaks:
            ids, weights = torch.zeros_like(ids[:, :1]), torch.ones_like(weights[:, :1])
        if probe is not None:
            given = seen(probe, f"blocks.{i}.moe.topk_ids", ids)
            if given is not ids:  # another engine's choice: the weights our router gives those experts
                ids, weights = given, (torch.ones_like(given, dtype=probs.dtype) if "moe-as-dense" in breaks
                                       else weigh(given))
        if c.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        if c.routed_scale != 1.0:
            weights = weights * c.routed_scale
        weights = seen(probe, f"blocks.{i}.moe.topk_weights", weights)
        out = layer.experts(x, ids, weights, GLUS[c.ffn_act], self.grouped_mm)  # Σ weight × expert(x)
        if layer.shared_gate_up is None or "shared-expert-dropped" in breaks:
            return out
        shared = gated(x, layer.shared_gate_up, layer.shared_down, GLUS[c.ffn_act])  # every token, as is (deepseek2)
        if layer.shared_gate is not None:  # qwen2moe: scaled by sigmoid(x·g)
            gate = torch.sigmoid((x @ layer.shared_gate[:, None]).float())  # [T, 1]
            if "shared-expert-ungated" in breaks:
                gate = torch.ones_like(gate)
            shared = seen(probe, f"blocks.{i}.moe.shared_gate", gate).to(x.dtype) * shared
        return out + shared

    @staticmethod
    def _choose(probs: torch.Tensor, layer: LayerWeights, c: ModelConfig, breaks: frozenset[str]) -> torch.Tensor:
        """The top-k expert ids [T, k] by the router's scores, plus V3's choice bias, within the best groups
        where experts are grouped (llama.cpp: a group scores the sum of its 2 best; the other groups are out)."""
        choose = probs if layer.probs_bias is None else probs + layer.probs_bias
        if c.n_expert_groups > 1 and "no-group-limit" not in breaks:
            grouped = choose.unflatten(-1, (c.n_expert_groups, -1))  # [T, groups, experts per group]
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, groups]
            best = group_scores.topk(c.n_groups_used, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best, True)
            choose = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        return torch.topk(choose, c.n_experts_used, dim=-1).indices


