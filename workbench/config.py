"""ModelConfig: every hyperparameter of a supported architecture, read from GGUF metadata, nothing derived
that the file states. Where a key is missing, the value is the default llama.cpp uses for that architecture,
and the key's name is recorded in `defaulted` so `workbench inspect` can show it.

Architecture differences live here as data (flags, norms, scales); model.py has one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench.errors import ModelError, UnsupportedError
from workbench.gguf_file import GGUFFile

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "qwen2moe", "olmoe", "deepseek2", "gpt-oss")

# RoPE styles as llama.cpp names them. GGUF llama files were converted with Q/K rows permuted so that
# rotation pairs are adjacent (x[2i], x[2i+1]): "normal". The others rotate x[i] with x[i + d/2]: "neox".
ROPE_STYLE = {"llama": "normal", "qwen2": "neox", "qwen3": "neox", "qwen3moe": "neox", "gemma3": "neox", "qwen2moe": "neox",
              "olmoe": "neox", "deepseek2": "normal", "gpt-oss": "neox"}

_MISSING = object()
# The keys llama.cpp reads with get_key_or_arr (one value per layer allowed); every other key is a scalar.
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"an array ({value!r:.40})"
    return f"{type(value).__name__} {value!r:.40}"


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling as llama.cpp's ggml_rope_yarn computes it: each pair's angle blends interpolation
    (÷ factor) and extrapolation by a ramp between the pairs that turn beta_fast and beta_slow times over the
    original context, and cos/sin are scaled by `mscale`."""

    factor: float
    original_context: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0
    mscale: float = 1.0  # the magnitude cos and sin are multiplied by
    log_mul: float = 0.0  # yarn_log_multiplier (deepseek2's ÷ 0.1): its q·k scale's mscale_all_dim

    def inv_freq_factors(self, base: float, rot: int) -> list[float]:
        """Per pair i of `rot` dims: what its inverse frequency base^(-2i/rot) is multiplied by,
        (1 − mix)/factor + mix with mix = ramp(i) × ext_factor (1: extrapolate, as unscaled; 0: interpolate)."""
        def corr_dim(rotations: float) -> float:
            return rot * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(0.0, math.floor(corr_dim(self.beta_fast)))
        high = min(rot - 1.0, math.ceil(corr_dim(self.beta_slow)))
        out = []
        for i in range(rot // 2):
            ramp = 1.0 - min(1.0, max(0.0, (i - low) / max(0.001, high - low)))
            mix = ramp * self.ext_factor
            out.append((1.0 - mix) / self.factor + mix)
        return out


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # attention.key_length: Qwen3 and Gemma3 have head_dim != hidden / n_heads
    v_head_dim: int
    ffn_hidden: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_style: str  # "normal" (adjacent pairs) | "neox" (split halves)
    rope_dim: int  # how many leading dims of each head are rotated
    rope_scale: float  # linear RoPE scaling: positions are multiplied by this (1 / scaling factor)
    attn_scale: float  # multiplies q·k
    qk_norm: bool  # RMSNorm of q and k before RoPE: per head, or (qk_norm_whole) over the whole projection
    post_norms: bool  # gemma3: RMSNorm on the attention and FFN outputs before the residual add
    ffn_act: str  # "silu" | "gelu_tanh" | "swiglu_oai" (gpt-oss's clamped SwiGLU), gated, all
    embed_scale: float  # token embeddings are multiplied by this (gemma3: sqrt(hidden))
    tied_output: bool  # no output.weight: the head reuses token_embd
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_hidden: int = 0
    norm_topk: bool = False  # renormalise the top-k router weights to sum to 1
    shared_ffn_hidden: int = 0  # qwen2moe: the shared expert's width (0: no shared expert)
    qk_norm_whole: bool = False  # olmoe: q and k are normed as whole projections ([n_heads·head_dim] weights)
    shared_gate: bool = False  # qwen2moe: the shared expert's output is scaled by sigmoid(x · ffn_gate_inp_shexp)
    # deepseek2: multi-head latent attention (MLA) and its routing. kv_lora_rank > 0 marks MLA: K and V come from a
    # shared latent of kv_lora_rank values (normed) plus one shared RoPE key of rope_dim values, which is what the
    # cache holds; head_dim (q·k) is nope + rope_dim, v_head_dim the value heads'.
    q_lora_rank: int = 0  # 0: q = x @ attn_q; else x @ attn_q_a → RMSNorm → @ attn_q_b
    kv_lora_rank: int = 0
    n_dense_lead: int = 0  # the first layers' FFN is dense (feed_forward_length wide), the rest MoE
    gating: str = "softmax"  # router scores: "softmax" | "sigmoid" (V3) | "softmax_topk" (gpt-oss: top-k of the logits,
    # then a softmax over those k)
    n_expert_groups: int = 1  # group-limited top-k: experts are chosen within the n_groups_used best groups
    n_groups_used: int = 1
    routed_scale: float = 1.0  # the routed experts' weights are multiplied by this (routed_scaling_factor)
    has_probs_bias: bool = False  # V3's exp_probs_b: added to the scores to choose, not to weigh
    rope_yarn: Yarn | None = None  # YaRN RoPE scaling (then rope_scale is 1)
    attn_sinks: bool = False  # gpt-oss: a learned logit per head joins every softmax, and takes its share away
    sliding_window: int | None = None  # gemma3 local layers attend to the last `sliding_window` positions
    swa_pattern: int | None = None  # every swa_pattern-th layer is global, the rest are local
    rope_base_local: float | None = None
    defaulted: tuple[str, ...] = field(default=())

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_local_layer(self, layer: int) -> bool:
        """llama.cpp's gemma3 pattern: with pattern 6, layers 5, 11, 17, … are global, the rest sliding."""
        return self.swa_pattern is not None and layer % self.swa_pattern < self.swa_pattern - 1

    def layer_rope_base(self, layer: int) -> float:
        if self.is_local_layer(layer) and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base

    def layer_rope_scale(self, layer: int) -> float:
        return 1.0 if self.is_local_layer(layer) else self.rope_scale

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.is_local_layer(layer) else None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_dense_lead

    def kv_bytes_per_token(self, element_size: int) -> int:
        """What the cache holds per position: K and V per KV head, or (MLA) one latent row plus the RoPE key."""
        if self.is_mla:
            return self.n_layers * (self.kv_lora_rank + self.rope_dim) * element_size
        return self.n_layers * self.n_kv_heads * (self.head_dim + self.v_head_dim) * element_size

    def mha_bytes_per_token(self, element_size: int) -> int:
        """An MHA cache of the same model: every query head's K (head_dim) and V (v_head_dim)."""
        return self.n_layers * self.n_heads * (self.head_dim + self.v_head_dim) * element_size

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> ModelConfig:
        return _Reader(gguf).config()


class _Reader:
    """Typed metadata lookups for one file, recording which keys fell back to a default."""

    def __init__(self, gguf: GGUFFile) -> None:
        self.gguf = gguf
        self.arch = gguf.arch
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedError(
                f"{gguf.path.name}: architecture '{self.arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHS)}."
            )
        self.defaulted: list[str] = []

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """`arch.key` as `kind` (int, float, str or bool), else a ModelError naming the key: a bool is not a
        number, an int is accepted as a float, a float must be finite (NaN RoPE bases load and decode NaN)."""
        full = f"{self.arch}.{key}"
        value = self.gguf.metadata.get(full, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ModelError(f"{self.gguf.path.name}: required metadata key '{full}' is missing.")
            self.defaulted.append(full)
            return default
        if isinstance(value, list) and key in _PER_LAYER_KEYS and value and all(map(_is_int, value)):
            # One value per layer: all layers must agree here.
            if len(set(value)) != 1:
                raise UnsupportedError(f"{self.gguf.path.name}: '{full}' varies per layer ({value[:4]}…), which is not supported.")
            value = value[0]
        if kind is int:
            ok = _is_int(value)
        elif kind is float:
            ok = _is_int(value) or isinstance(value, float)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ModelError(
                f"{self.gguf.path.name}: metadata '{full}' should be {_KIND_NAMES[kind]} but is {_describe(value)}."
            )
        if kind is int and value < 0:  # counts and sizes: never negative
            raise ModelError(f"{self.gguf.path.name}: metadata '{full}' is negative ({value}).")
        if kind is float and not math.isfinite(value):
            raise ModelError(f"{self.gguf.path.name}: metadata '{full}' is {value}, not a finite number.")
        return kind(value)

    def positive(self, key: str, default: Any = _MISSING, limit: int = 1 << 24) -> int:
        value = self.get(key, int, default)
        if not 0 < value <= limit:
            raise ModelError(f"{self.gguf.path.name}: metadata '{self.arch}.{key}' = {value} is out of range (1..{limit}).")
        return value

    def count(self, key: str, limit: int) -> int:
        """An optional count: 0 when absent, else 0..limit."""
        value = self.get(key, int, 0)
        if value > limit:
            raise ModelError(f"{self.gguf.path.name}: metadata '{self.arch}.{key}' = {value} is out of range (0..{limit}).")
        return value

    def positive_float(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, float, default)
        if value <= 0:
            raise ModelError(f"{self.gguf.path.name}: metadata '{self.arch}.{key}' = {value} must be positive.")
        return value

    def config(self) -> ModelConfig:
        arch, gguf = self.arch, self.gguf
        n_layers = self.positive("block_count", limit=4096)
        hidden = self.positive("embedding_length")
        n_heads = self.positive("attention.head_count", limit=4096)
        n_kv_heads = self.positive("attention.head_count_kv", n_heads, limit=4096)
        if n_heads % n_kv_heads:
            raise ModelError(f"{gguf.path.name}: {n_heads} query heads cannot be grouped over {n_kv_heads} KV heads.")
        head_dim = self.positive("attention.key_length", hidden // n_heads or 1, limit=65536)
        v_head_dim = self.positive("attention.value_length", hidden // n_heads or 1, limit=65536)
        mla = self._mla() if arch == "deepseek2" else {}
        if mla:  # the q/k and v head sizes of the decompressed heads (key_length_mla, value_length_mla)
            head_dim, v_head_dim = mla.pop("head_dim"), mla.pop("v_head_dim")
        if arch == "olmoe" and n_kv_heads != n_heads:  # llama.cpp sizes its attn_k_norm [n_embd]: no GQA
            raise UnsupportedError(f"{gguf.path.name}: olmoe with {n_kv_heads} KV heads for {n_heads} query heads is "
                                   "not supported (llama.cpp's olmoe normalises k over n_embd values).")
        if v_head_dim != head_dim and not mla:
            raise UnsupportedError(f"{gguf.path.name}: value heads of {v_head_dim} != key heads of {head_dim} are not supported.")
        token_embd = gguf.tensors.get("token_embd.weight")
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        vocab_default = token_embd.shape[0] if token_embd else (len(tokens) if isinstance(tokens, list) else _MISSING)
        vocab_size = self.positive("vocab_size", vocab_default, limit=1 << 22)
        context_length = self.positive("context_length", limit=1 << 24)
        rms_eps = self.get("attention.layer_norm_rms_epsilon", float)
        if not 0 < rms_eps < 1:
            raise ModelError(
                f"{gguf.path.name}: metadata '{arch}.attention.layer_norm_rms_epsilon' = {rms_eps} is out of range (0..1)."
            )
        rope_base = self.positive_float("rope.freq_base", 10000.0)
        rope_dim = self.positive("rope.dimension_count", head_dim, limit=head_dim - 1 if mla else head_dim)
        if rope_dim % 2:
            raise ModelError(f"{gguf.path.name}: rope.dimension_count {rope_dim} is odd.")
        rope_scale, yarn = self._rope_scale()
        n_experts = self.count("expert_count", 4096)
        n_experts_used = self.count("expert_used_count", 4096)
        # Mixture of experts: qwen3moe, qwen2moe and olmoe always; llama when the file has experts (Mixtral's layout:
        # every layer's FFN is routed experts, softmax → top-k → renormalise, as llama.cpp's llm_build_llama calls
        # build_moe_ffn). qwen2moe and olmoe do not renormalise; qwen2moe adds a shared expert (Model.moe).
        moe = arch in ("qwen3moe", "qwen2moe", "olmoe", "deepseek2", "gpt-oss") or (arch == "llama" and n_experts > 0)
        if moe:
            if not (0 < n_experts_used <= n_experts <= 4096):
                raise ModelError(f"{gguf.path.name}: expert_used_count {n_experts_used} / expert_count {n_experts} are invalid.")
        elif n_experts:
            raise UnsupportedError(f"{gguf.path.name}: {arch} with experts is not supported (qwen3moe, qwen2moe, olmoe "
                                   "and llama (Mixtral) are the MoE architectures here).")
        routed_only = arch in ("qwen3moe", "qwen2moe", "gpt-oss")  # their feed_forward_length is no dense FFN's
        ffn_hidden = self.count("feed_forward_length", 1 << 24) if routed_only else self.positive("feed_forward_length")
        routing = self._deepseek2_routing(n_layers, n_experts, n_experts_used) if arch == "deepseek2" else {}
        expert_ffn_hidden = shared_ffn_hidden = 0
        if arch == "gpt-oss":  # llama.cpp: n_ff_exp required; its feed_forward_length is no dense FFN's
            expert_ffn_hidden = self.positive("expert_feed_forward_length")
            routing = {"gating": "softmax_topk", "routed_scale": self.get("expert_weights_scale", float, 1.0) or 1.0,
                       "norm_topk": False}
        elif arch == "deepseek2":  # llama.cpp reads expert_feed_forward_length as required; shared experts × n_ff_exp
            expert_ffn_hidden = self.positive("expert_feed_forward_length")
            shared_ffn_hidden = expert_ffn_hidden * self.count("expert_shared_count", 4096)
        elif routed_only:
            # llama.cpp: n_ff_exp = expert_feed_forward_length, else feed_forward_length / expert_used_count.
            fallback = ffn_hidden // n_experts_used if ffn_hidden else _MISSING
            expert_ffn_hidden = self.positive("expert_feed_forward_length", fallback)
        elif moe:  # llama (Mixtral), olmoe: each expert is a feed_forward_length-wide SwiGLU (llama.cpp's n_ff)
            expert_ffn_hidden = ffn_hidden
        if arch == "qwen2moe":  # llama.cpp: n_ff_shexp = expert_shared_feed_forward_length, else feed_forward_length
            shared_ffn_hidden = self.positive("expert_shared_feed_forward_length", ffn_hidden or _MISSING)
        gemma = arch == "gemma3"
        sliding_window = swa_pattern = rope_base_local = None
        if gemma or arch == "gpt-oss":  # llama.cpp's patterns: gemma3 every 6th layer global, gpt-oss every 2nd
            sliding_window = self.positive("attention.sliding_window")
            swa_pattern = self.positive("attention.sliding_window_pattern", 6 if gemma else 2, limit=n_layers + 1)
            rope_base_local = self.positive_float("rope.freq_base_swa", 10000.0 if gemma else rope_base)
        # llama.cpp scales Gemma3-27B (62 layers) queries by 1/sqrt(hidden/heads), every other size by 1/sqrt(head_dim)
        # (deepseek2: of the decompressed q·k head, nope + rope).
        attn_scale = 1.0 / math.sqrt(hidden / n_heads if gemma and n_layers == 62 else head_dim)
        if yarn is not None and arch == "deepseek2":
            attn_scale *= self._deepseek2_yarn_scale(yarn) ** 2
        return ModelConfig(
            arch=arch,
            n_layers=n_layers,
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            v_head_dim=v_head_dim,
            ffn_hidden=ffn_hidden,
            vocab_size=vocab_size,
            context_length=context_length,
            rms_eps=rms_eps,
            rope_base=rope_base,
            rope_style=ROPE_STYLE[arch],
            rope_dim=rope_dim,
            rope_scale=rope_scale,
            rope_yarn=yarn,
            attn_scale=attn_scale,
            qk_norm=arch in ("qwen3", "qwen3moe", "gemma3", "olmoe"),
            qk_norm_whole=arch == "olmoe",
            post_norms=gemma,
            ffn_act="gelu_tanh" if gemma else "swiglu_oai" if arch == "gpt-oss" else "silu",
            embed_scale=math.sqrt(hidden) if gemma else 1.0,
            tied_output="output.weight" not in gguf.tensors,
            n_experts=n_experts if moe else 0,
            n_experts_used=n_experts_used if moe else 0,
            expert_ffn_hidden=expert_ffn_hidden,
            norm_topk=routing.pop("norm_topk") if routing else moe and arch not in ("qwen2moe", "olmoe"),  # norm_w
            shared_ffn_hidden=shared_ffn_hidden,
            shared_gate=arch == "qwen2moe",
            attn_sinks=arch == "gpt-oss",
            sliding_window=sliding_window,
            swa_pattern=swa_pattern,
            rope_base_local=rope_base_local,
            **mla,
            **routing,
            defaulted=tuple(self.defaulted),
        )

    def _mla(self) -> dict[str, int]:
        """deepseek2's attention sizes. Files converted with the split attn_k_b / attn_v_b state the decompressed
        head sizes as key_length_mla / value_length_mla (their key_length is the latent row the cache holds, and
        head_count_kv 1); older files with one attn_kv_b state them as key_length / value_length (llama.cpp:
        n_embd_head_k_mla() falls back to n_embd_head_k)."""
        kv_lora = self.positive("attention.kv_lora_rank", limit=65536)
        q_lora = self.get("attention.q_lora_rank", int, 0)
        key = self.positive("attention.key_length_mla", self.positive("attention.key_length", limit=65536), limit=65536)
        value = self.positive("attention.value_length_mla", self.positive("attention.value_length", limit=65536),
                              limit=65536)
        return {"head_dim": key, "v_head_dim": value, "kv_lora_rank": kv_lora, "q_lora_rank": q_lora}

    def _deepseek2_routing(self, n_layers: int, n_experts: int, n_used: int) -> dict[str, Any]:
        """deepseek2's router, with llama.cpp's defaults: softmax scores (V2) unless expert_gating_func is 2
        (sigmoid, V3); group-limited top-k over expert_group_count groups; weights renormalised when
        expert_weights_norm, then × expert_weights_scale; exp_probs_b (a tensor) biases the choice."""
        gating = {0: "softmax", 1: "softmax", 2: "sigmoid"}.get(self.get("expert_gating_func", int, 1))
        if gating is None:
            raise UnsupportedError(f"{self.gguf.path.name}: {self.arch}.expert_gating_func "
                                   f"{self.gguf.metadata[self.arch + '.expert_gating_func']} is not supported (1 softmax, 2 sigmoid).")
        groups = self.get("expert_group_count", int, 1) or 1
        used = self.get("expert_group_used_count", int, 1) or 1
        if n_experts % groups or not 0 < used <= groups or used * (n_experts // groups) < n_used:
            raise ModelError(f"{self.gguf.path.name}: {groups} expert groups ({used} used) cannot hold {n_used} of "
                             f"{n_experts} experts.")
        n_dense = self.count("leading_dense_block_count", n_layers)
        scale = self.get("expert_weights_scale", float, 1.0) or 1.0  # llama.cpp: 0 (absent) means no scaling
        return {"gating": gating, "n_expert_groups": groups, "n_groups_used": used, "n_dense_lead": n_dense,
                "routed_scale": scale, "norm_topk": self.get("expert_weights_norm", bool, False),
                "has_probs_bias": any(n.endswith("exp_probs_b.bias") for n in self.gguf.tensors)}

    def _rope_scale(self) -> tuple[float, Yarn | None]:
        """(1 / rope.scaling.factor for linear scaling, YaRN's parameters for yarn), as llama.cpp, whose default
        type is "linear". The factor is checked whatever the type: a NaN or zero there is a damaged file even
        where it goes unused."""
        kind = self.get("rope.scaling.type", str, "linear")
        if f"{self.arch}.rope.scaling.factor" not in self.gguf.metadata:
            return 1.0, None
        factor = self.positive_float("rope.scaling.factor")
        if kind == "none" or factor == 1.0:
            return 1.0, None
        if kind == "linear":
            return 1.0 / factor, None
        if kind == "yarn":
            return 1.0, self._yarn(factor)
        raise UnsupportedError(f"{self.gguf.path.name}: RoPE scaling '{kind}' (factor {factor}) is not supported; "
                               "linear and yarn are.")

    def _yarn(self, factor: float) -> Yarn:
        """YaRN's parameters as llama.cpp sets them up (llama_context): ext_factor 1; cos/sin end up scaled by
        get_mscale(factor, 1) = 1 + 0.1·ln(factor), or with a yarn_log_multiplier m by get_mscale(factor, m') /
        get_mscale(factor, m) (m' = 1, but m itself for deepseek2, whose ratio is then 1), × rope.scaling.attn_factor.
        deepseek2's file states m × 0.1 (its converter's factor), which llama.cpp divides out."""
        log_mul = self.get("rope.scaling.yarn_log_multiplier", float, 0.0)
        if self.arch == "deepseek2":
            log_mul /= 0.1
        attn_factor = self.positive_float("rope.scaling.attn_factor", 1.0)
        ext = self.get("rope.scaling.yarn_ext_factor", float, 1.0)

        def get_mscale(m: float) -> float:
            return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0

        if log_mul != 0.0:
            m = log_mul if self.arch == "deepseek2" and log_mul != 1.0 else 1.0
            mscale = get_mscale(m) / get_mscale(log_mul)
        else:
            mscale = get_mscale(1.0)
        if ext == 0.0:  # no ramp, no magnitude correction: ggml multiplies by attn_factor alone
            mscale = 1.0
        return Yarn(factor=factor, original_context=self.positive("rope.scaling.original_context_length",
                                                                  self.positive("context_length", limit=1 << 24), limit=1 << 24),
                    beta_fast=self.positive_float("rope.scaling.yarn_beta_fast", 32.0),
                    beta_slow=self.positive_float("rope.scaling.yarn_beta_slow", 1.0),
                    ext_factor=ext, mscale=mscale * attn_factor, log_mul=log_mul)

    @staticmethod
    def _deepseek2_yarn_scale(yarn: Yarn) -> float:
        """deepseek2 scales q·k by mscale² on top of 1/√head_dim (llama.cpp's graph: the rope magnitude ×
        (1 + 0.1·m·ln factor), m the yarn_log_multiplier; HF: yarn_get_mscale(factor, mscale_all_dim)²)."""
        return yarn.mscale * (1.0 + 0.1 * yarn.log_mul * math.log(yarn.factor))
