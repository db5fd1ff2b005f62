"""The forward pass: embed → blocks (attention, feed-forward | MoE) → norm → head.

One forward serves prefill, one cached decode step and the uncached path (the whole sequence, fresh cache):
`Model.forward(tokens, start, cache)` computes positions start..start+T, writes their K/V into the cache and
attends over everything the cache holds up to them. Architecture differences are ModelConfig data.

Capture points: when `probe` is given, it is called with a TransformerLens-style name and the tensor at that
point (`blocks.{i}.attn.q`, `.q_normed`, `.k`, `.k_normed`, `blocks.{i}.moe.router_logits`, `.topk_ids`,
`.topk_weights`, `blocks.{i}.resid_post`). Without a probe nothing extra is computed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.cache import KVCache
from workbench.config import ModelConfig
from workbench.errors import InputError, ModelError, ResourceError, UnsupportedError
from workbench.gguf_file import GGUFFile
from workbench.models import resolve
from workbench.qmatmul import QuantExperts, QuantMatrix, expert, matmul
from workbench.tokenizer import Tokenizer
from workbench.weights import WEIGHT_MODES, LayerWeights, Matrix, Weights, load_weights

Probe = Callable[[str, torch.Tensor], None]

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
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """auto → cuda, else mps, else cpu; an explicit device must exist on this machine."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise InputError(f"unknown device '{device}'; choose auto, cpu, cuda or mps.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for, but this machine has no CUDA GPU (or torch is a CPU build).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for, but Metal is not available here.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto → float32 on CPU and MPS, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# The share of the free memory (RAM for a CPU, VRAM for a GPU) that dequantized matrices may take before
# weights="auto" keeps them quantized instead: the rest is left for the KV cache, activations and the system.
DEQUANTIZED_MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.9}


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (RAM available to this process on a CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def resolve_weights(mode: str, device: torch.device, n_params: int, dtype: torch.dtype) -> str:
    """auto → the exact form, dequantized matrices in the compute dtype, wherever they fit in
    DEQUANTIZED_MEMORY_SHARE of the free memory; else quantized (4-bit planes, bfloat16 activations: faster
    on a CPU but not exact, see qmatmul.py). An explicit mode is taken as asked."""
    if mode in WEIGHT_MODES:
        return mode
    if mode != "auto":
        raise InputError(f"unknown weights mode '{mode}'; choose auto, {', '.join(WEIGHT_MODES)}.")
    free = free_memory(device)
    if free is None:
        return "dequantized"
    share = DEQUANTIZED_MEMORY_SHARE.get(device.type, 0.5)
    return "dequantized" if n_params * dtype.itemsize <= share * free else "quantized"


def describe_weights(mode: str, dtype: torch.dtype) -> str:
    """What a weights mode means for the numbers, in words (CLI, model card, trace metadata)."""
    name = str(dtype).removeprefix("torch.")
    if mode == "dequantized":
        exact = "exact" if dtype == torch.float32 else f"{name} rounding"
        return f"dequantized: {name} matrices, {name} activations ({exact})"
    return "quantized: 4-bit planes with bfloat16 activations (fast, not exact: ~1e-2 of max |logit|)"


def default_threads() -> int:
    """Threads for torch's CPU kernels when none are asked for: one fewer than the cores this process may
    use (at least one). torch's OpenMP threads spin waiting for each other: when a browser or a second job
    takes one core of two, two threads decode several times slower than one (SmolLM2, 2-core EPYC: 7.1 vs
    20.9 tok/s; 1.7 vs 62 was seen on a Xeon). The price on a quiet 2-core machine: one thread decodes
    1.25× (dequantized) to 1.7× (quantized) slower than two there; ask for more with --threads."""
    try:
        n_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n_cores = os.cpu_count() or 1
    return max(1, n_cores - 1)


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU thread count to `n`, or to default_threads() when None; returns it. With torch's OpenMP
    build the count belongs to the calling OS thread (a new thread starts from the last count set anywhere), so
    code that runs on several threads (the app's tabs) sets it before each load and step."""
    if n is None:
        n = default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise InputError(f"threads must be a whole number from 1 to 1024, not {n!r}.")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, returned in x's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first `rot` dims of x [T, heads, head_dim] by position; cos, sin are rope_table rows [T, rot].

    Each rotated dim is x·cos + partner·sin, where the partner is the other member of its pair: x[i + rot/2]
    (neox, split halves) or x[i ± 1] (normal, adjacent pairs). rope_table lays cos and sin out per style,
    with the sign of sin folded in, so both styles cost the same few ops.
    """
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
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Softmax attention of q [T, n_heads, d] over keys, values [n_kv_heads, S, d] → [T, n_heads, d].

    Grouped-query attention without copying K/V per query head: the n_heads / n_kv_heads query heads that
    share a KV head are consecutive (as llama.cpp and HF group them), so query head h reads KV head
    h // (n_heads / n_kv_heads). `mask` [T, S] is True where a query may attend (None: everywhere). One fused
    PyTorch kernel (scaled_dot_product_attention with enable_gqa), which accumulates in float32; the
    walkthrough writes the same computation out op by op.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
    )  # [1, n_heads, T, d]
    return out[0].transpose(0, 1)


@dataclass
class LoadInfo:
    seconds: float
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int  # bytes of the tensors on the device
    weights: str = "dequantized"  # the form of the matrices: one of WEIGHT_MODES


class Model:
    """A loaded GGUF model: config, tokenizer, weights on a device, and the forward pass."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig, tokenizer: Tokenizer, weights: Weights, info: LoadInfo) -> None:
        self.gguf, self.config, self.tokenizer, self.weights, self.info = gguf, config, tokenizer, weights, info
        self.device, self.dtype = info.device, info.dtype
        self._rope_tables: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}
        # Decode-time MoE through torch._grouped_mm: bf16 on CUDA compute capability ≥ 9 (its fast kernel).
        self._grouped_mm = (
            config.is_moe and self.device.type == "cuda" and self.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(self.device)[0] >= 9
        )
        self._expert_ids = torch.arange(max(config.n_experts, 1), device=self.device)

    @classmethod
    def load(
        cls, model: str | Path, device: str = "auto", dtype: str = "auto",
        progress: Callable[[int, int], None] | None = None, weights: str = "auto",
    ) -> Model:
        """A bundled name or a path → a model on the device. Raises WorkbenchError subclasses on bad input.
        `progress(done, total)` follows the weights as they load (layer by layer). `weights`: auto,
        dequantized (exact) or quantized (quantized matmuls, qmatmul.py; see resolve_weights)."""
        t0 = time.perf_counter()
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        gguf = GGUFFile(resolve(model))
        config = ModelConfig.from_gguf(gguf)
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        if tokenizer.vocab_size > config.vocab_size:
            raise ModelError(
                f"{gguf.path.name}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {config.vocab_size} rows."
            )
        mode = resolve_weights(weights, dev, gguf.n_params, dt)
        try:
            loaded = load_weights(gguf, config, dev, dt, progress, mode)
        except RuntimeError as exc:
            if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)):
                raise
            raise ResourceError(
                f"{gguf.path.name} does not fit in the memory of {dev} as {mode} {str(dt).removeprefix('torch.')} "
                "weights; try weights quantized, a smaller dtype or another device."
            ) from None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        n_bytes = sum(t.numel() * t.element_size() for t in _unique_tensors(loaded))
        model = cls(gguf, config, tokenizer, loaded, LoadInfo(0.0, dev, dt, n_bytes, mode))
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
        """How far (max |Δlogit| / max |logit|) the cached and uncached paths may drift apart with correct
        code: float32 arithmetic throughout keeps them within 1e-4; bfloat16 on the way rounds differently for a
        one-row step and a whole-sequence pass: quantized matmuls (bf16 activations, float32 elsewhere) measured
        up to 1.6e-2 on the bundled models, a bf16/fp16 compute dtype more."""
        if self.dtype != torch.float32:
            return 1e-1  # bf16/fp16 activations through every layer: 4.9e-2 measured on a 48-layer MoE (H200)
        return 1e-4 if self.info.weights == "dequantized" else 4e-2

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
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    def rope_table(
        self, base: float, scale: float, n_positions: int, style: str, rot: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n_positions, rot] (rot defaults to rope_dim) for apply_rope in `style`, grown on demand.

        Pair i turns by position × scale × base^(-2i/rot) (÷ rope_freqs[i] when the file has them). The
        sin table carries the sign: −sin on a pair's first member, +sin on its second.
        """
        rot = rot or self.config.rope_dim
        key = (base, scale, style, rot)
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < n_positions:
            n = max(n_positions, 2 * table[0].shape[0] if table else 256)
            half = rot // 2
            # Angles in float64: position × base^(-2i/rot) loses digits in float32 at long positions.
            inv_freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rot)
            if self.weights.rope_freqs is not None and rot == self.config.rope_dim:
                inv_freq = inv_freq / self.weights.rope_freqs.double().cpu()
            angles = torch.outer(torch.arange(n, dtype=torch.float64) * scale, inv_freq)  # [n, half]
            cos, sin = angles.cos(), angles.sin()
            if style == "neox":  # dims (i, i + half) form pair i
                cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
            else:  # dims (2i, 2i + 1) form pair i
                cos, sin = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
            table = (cos.float().to(self.device), sin.float().to(self.device))
            self._rope_tables[key] = table
        return table

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: KVCache,
        probe: Probe | None = None,
        last_only: bool = False,
        breaks: frozenset[str] = frozenset(),
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [T, vocab] (float32) after each of tokens [T] at positions start..start+T-1.

        With last_only, only the last position's logits are computed ([1, vocab]): prefill needs no more.
        `breaks` switches on deviations from BREAKS (empty: the correct forward).

        `pos` (a [1] long tensor on the device; `start` is then ignored) runs one decode step with static
        shapes: the position is data, attention spans the whole cache under a mask, and nothing waits for
        the device, so a CUDA graph can capture the step (DecodeGraph). Token ids are not checked then.
        """
        c, w = self.config, self.weights
        if pos is None:
            self.check_token_ids(tokens)
            positions = torch.arange(start, start + tokens.shape[0], device=self.device)
        else:
            positions = pos
        x = w.embed(tokens)
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        memo: dict = {} if pos is not None else None  # static step: RoPE rows and masks shared by the layers
        for i, layer in enumerate(w.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_eps)
            a = self.attention(h, i, layer, cache, start, positions, probe, breaks, memo=memo)
            if layer.post_attn_norm is not None:
                a = rms_norm(a, layer.post_attn_norm, c.rms_eps)
            x = x + a
            h = rms_norm(x, layer.ffn_norm, c.rms_eps)
            f = self.moe(h, i, layer, probe, breaks) if c.is_moe else self.feed_forward(h, layer)
            if layer.post_ffn_norm is not None:
                f = rms_norm(f, layer.post_ffn_norm, c.rms_eps)
            x = x + f
            if probe is not None:
                probe(f"blocks.{i}.resid_post", x)
        if last_only:
            x = x[-1:]
        x = rms_norm(x, w.output_norm, c.rms_eps)
        return matmul(x, w.output).float()

    def attention(
        self,
        x: torch.Tensor,
        i: int,
        layer: LayerWeights,
        cache: KVCache,
        start: int,
        positions: torch.Tensor,
        probe: Probe | None,
        breaks: frozenset[str] = frozenset(),
        memo: dict | None = None,
    ) -> torch.Tensor:
        """One block's attention. `memo` (a dict per forward) marks the static-shape step: `positions` holds
        the one position as a tensor, and RoPE rows and masks are computed once and shared by the layers."""
        c = self.config
        T = x.shape[0]
        qkv = matmul(x, layer.wqkv)
        if layer.bqkv is not None:
            qkv = qkv + layer.bqkv
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q = qkv[:, :q_dim].view(T, c.n_heads, c.head_dim)
        k = qkv[:, q_dim : q_dim + kv_dim].view(T, c.n_kv_heads, c.head_dim)
        v = qkv[:, q_dim + kv_dim :].view(T, c.n_kv_heads, c.head_dim)
        if probe is not None:
            probe(f"blocks.{i}.attn.q", q)
            probe(f"blocks.{i}.attn.k", k)
        qk = qkv[:, : q_dim + kv_dim].view(T, c.n_heads + c.n_kv_heads, c.head_dim)  # Q and K heads, one view
        if layer.q_norm is not None:
            if "skip-qk-norm" not in breaks:
                q = rms_norm(q, layer.q_norm, c.rms_eps)
                k = rms_norm(k, layer.k_norm, c.rms_eps)
                qk = torch.cat((q, k), dim=1)
            if probe is not None:  # with the norm skipped, "normed" shows what the next stage really gets
                probe(f"blocks.{i}.attn.q_normed", q)
                probe(f"blocks.{i}.attn.k_normed", k)
        end = start + T
        base = 10000.0 if "rope-base-10k" in breaks else c.layer_rope_base(i)
        style = c.rope_style
        if "rope-style-swap" in breaks:
            style = "normal" if style == "neox" else "neox"
        scale, rot = c.attn_scale, c.rope_dim
        if "head-dim-from-hidden" in breaks:
            derived = c.hidden // c.n_heads
            scale, rot = derived**-0.5, min(derived, c.rope_dim)
        window = c.layer_window(i)
        if memo is not None:  # one token at the position held by `positions`: every shape fixed by the cache
            rope_key = (base, c.layer_rope_scale(i), style, rot)
            if rope_key not in memo:
                cos, sin = self.rope_table(base, rope_key[1], cache.capacity, style, rot)
                memo[rope_key] = cos.index_select(0, positions), sin.index_select(0, positions)
            cos, sin = memo[rope_key]
            qk = apply_rope(qk, cos, sin, style)  # Q and K turn by the same angles: one rotation for both
            q, k = qk[:, : c.n_heads], qk[:, c.n_heads :]
            keys, values = cache.write_at(i, positions, k, v)  # the whole cache [n_kv_heads, capacity, head_dim]
            if ("mask", window) not in memo:
                delta = positions[:, None] - cache.positions[None, :]
                mask = delta >= (1 if "cache-off-by-one" in breaks else 0)
                memo["mask", window] = mask & (delta < window) if window is not None else mask
            out = grouped_attention(q, keys, values, memo["mask", window], scale)
            return matmul(out.reshape(T, c.n_heads * c.head_dim), layer.wo)
        cos, sin = self.rope_table(base, c.layer_rope_scale(i), end, style, rot)
        qk = apply_rope(qk, cos[start:end], sin[start:end], style)
        q, k = qk[:, : c.n_heads], qk[:, c.n_heads :]
        keys, values = cache.write(i, start, k, v)  # [n_kv_heads, end, head_dim]
        if "cache-off-by-one" in breaks and T == 1 and start > 0:
            keys, values = keys[:, :-1], values[:, :-1]
        mask = None
        if T > 1 or (window is not None and end > window):
            kpos = torch.arange(keys.shape[1], device=x.device)
            delta = positions[:, None] - kpos[None, :]  # [T, keys]: query position − key position
            mask = delta >= 0
            if window is not None:
                mask &= delta < window
        out = grouped_attention(q, keys, values, mask, scale)  # [T, n_heads, head_dim]
        return matmul(out.reshape(T, c.n_heads * c.head_dim), layer.wo)

    def _gated(self, x: torch.Tensor, w_gate_up: Matrix, w_down: Matrix) -> torch.Tensor:
        """down(act(gate·x) ⊙ up·x) with gate and up fused: w_gate_up is [hidden, 2·ffn]. Dense weights may
        carry a leading batch dim (x [k, T, hidden] against k experts' stacks)."""
        gate, up = matmul(x, w_gate_up).chunk(2, dim=-1)
        return matmul(self._activation(gate) * up, w_down)

    def _activation(self, gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") if self.config.ffn_act == "gelu_tanh" else F.silu(gate)

    def feed_forward(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """Gated FFN: SwiGLU, or GELU-tanh gated for gemma3."""
        return self._gated(x, layer.w_gate_up, layer.w_down)

    def moe(
        self, x: torch.Tensor, i: int, layer: LayerWeights, probe: Probe | None, breaks: frozenset[str] = frozenset()
    ) -> torch.Tensor:
        """Router softmax → top-k → renormalise (qwen3moe) → each chosen expert's SwiGLU → weighted sum."""
        c = self.config
        router_logits = (x @ layer.router).float()  # [T, n_experts]
        probs = torch.softmax(router_logits, dim=-1)
        weights, ids = torch.topk(probs, c.n_experts_used, dim=-1)  # [T, k]
        if c.norm_topk and "no-topk-renorm" not in breaks:
            weights = weights / weights.sum(-1, keepdim=True)
        if "moe-as-dense" in breaks:
            ids, weights = torch.zeros_like(ids[:, :1]), torch.ones_like(weights[:, :1])
        if probe is not None:
            probe(f"blocks.{i}.moe.router_logits", router_logits)
            probe(f"blocks.{i}.moe.topk_ids", ids)
            probe(f"blocks.{i}.moe.topk_weights", weights)
        # How the chosen experts run depends on the form of BOTH stacks (a file may store gate/up dense and down
        # block-quantized): batched gathers and grouped matmuls need dense stacks; otherwise each expert's
        # matrices are taken one by one (qmatmul.expert), each in its own form.
        dense = layer.dense_experts
        if x.shape[0] == 1 and dense and self._grouped_mm:
            # One token on a Hopper-class GPU: a grouped matmul over the whole expert stack, whose groups are
            # the chosen experts (one row each, rows sorted by expert; `offs` ends each expert's rows), so
            # only the chosen experts' matrices are read, and nothing waits for the host.
            chosen = ids[0]
            order = chosen.argsort()
            offs = (chosen[None, :] <= self._expert_ids[:, None]).sum(1, dtype=torch.int32)  # [E]
            rows = x.expand(chosen.shape[0], -1).contiguous()
            gate, up = torch._grouped_mm(rows, layer.gate_up_exps, offs=offs).chunk(2, dim=-1)
            y = torch._grouped_mm((self._activation(gate) * up).contiguous(), layer.down_exps, offs=offs)  # [k, hidden], by expert
            return (y * weights[0, order, None].to(x.dtype)).sum(0, keepdim=True)
        if x.shape[0] == 1 and dense:
            # One token: gather the k chosen experts' matrices by index and batch them, with no host sync
            # (so a CUDA graph can hold the step).
            chosen = ids[0]
            y = self._gated(x.expand(chosen.shape[0], 1, -1), layer.gate_up_exps[chosen], layer.down_exps[chosen])
            return (y[:, 0] * weights[0, :, None].to(x.dtype)).sum(0, keepdim=True)
        if x.shape[0] == 1:
            # One token, the k chosen experts in turn. On a GPU each expert is selected on the device by its id
            # (a 0-d tensor), so nothing waits for the host and a CUDA graph can hold the step; on the CPU
            # reading the ids back costs nothing and an int selects views, no copies.
            out = torch.zeros_like(x)
            on_host = x.device.type == "cpu"
            for slot in range(ids.shape[1]):
                e = int(ids[0, slot]) if on_host else ids[0, slot]
                y = self._gated(x, expert(layer.gate_up_exps, e), expert(layer.down_exps, e))
                out += y * weights[0, slot].to(x.dtype)
            return out
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            token_idx, slot = (ids == e).nonzero(as_tuple=True)
            ye = self._gated(x[token_idx], expert(layer.gate_up_exps, e), expert(layer.down_exps, e))
            out.index_add_(0, token_idx, ye * weights[token_idx, slot, None].to(x.dtype))
        return out


def _unique_tensors(weights: Weights) -> list[torch.Tensor]:
    """Every weight tensor once (a tensor shared by two fields counts once; a quantized matrix is its planes)."""
    fields = [weights.token_embd, weights.output_norm, weights.output, weights.rope_freqs]
    if weights.embd_raw is not None:
        fields.append(weights.embd_raw[0])
    for layer in weights.layers:
        fields += list(vars(layer).values())
    tensors = []
    for t in fields:
        if isinstance(t, (QuantMatrix, QuantExperts)):
            tensors += t.tensors()
        elif t is not None:
            tensors.append(t)
    return list({t.data_ptr(): t for t in tensors}.values())


class _StaticStep:
    """What DecodeGraph and CompiledStep share: the static-shape step's inputs as device tensors (token and
    position, filled in per step), the RoPE tables grown to the whole cache before anything captures them, and
    the per-step bookkeeping. Subclasses set `self._run`, which returns the logits [1, vocab]."""

    def __init__(self, model: Model, cache: KVCache, position: int) -> None:
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        self.pos = torch.full((1,), position, dtype=torch.long, device=model.device)
        c = model.config
        for i in range(c.n_layers):
            model.rope_table(c.layer_rope_base(i), c.layer_rope_scale(i), cache.capacity, c.rope_style)
        self._tables = list(model._rope_tables.values())  # a graph reads these very tensors: keep them alive

    def _eager(self) -> torch.Tensor:
        return self.model.forward(self.token, 0, self.cache, last_only=True, pos=self.pos)

    def _compiled(self, options: dict | None = None) -> Callable[[], torch.Tensor]:
        """The step through torch.compile (call it under torch.no_grad: inference_mode cannot be traced)."""
        forward, model, cache = Model.forward.__wrapped__, self.model, self.cache
        # A new cache means new tensors to guard on: start from a clean slate rather than pile up recompiles
        # (the compiled code itself comes back from inductor's disk cache).
        torch.compiler.reset()
        return torch.compile(lambda: forward(model, self.token, 0, cache, last_only=True, pos=self.pos),
                             dynamic=False, options=options or {})

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, vocab] after `token` at `position` (a buffer the next step overwrites: copy to keep)."""
        if position >= self.cache.capacity:
            raise InputError(f"the context is full: position {position} does not fit a cache of {self.cache.capacity} positions.")
        self.model.check_token_ids([token])
        self.token.fill_(token)
        self.pos.fill_(position)
        logits = self._run()
        self.cache.mark_filled(position + 1)
        return logits


class DecodeGraph(_StaticStep):
    """One cached decode step captured as a CUDA graph and replayed per token.

    Eager PyTorch launches a few dozen kernels per layer from Python; for a 48-layer MoE on an H100 that
    launch time, not the GPU, bounds tokens/s. The static-shape step (`Model.forward(..., pos=)`) is captured
    once per cache; each `step` copies the token and position into the graph's inputs and replays it.
    Probes and breaks run the eager forward (they are Python at every capture point); a session uses this
    only for the plain cached path on CUDA.
    """

    def __init__(self, model: Model, cache: KVCache, position: int, compiled: bool = False) -> None:
        """Capture at `position`, the next position the cache will be written at (the capture's own writes
        land there and are overwritten by the first real step). `compiled`: capture the torch.compile'd step
        (inductor fuses the small elementwise kernels: fewer launches per token; compiling takes a minute)."""
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        super().__init__(model, cache, position)
        run, grad_mode = (self._compiled(), torch.no_grad) if compiled else (self._eager, torch.inference_mode)
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side), grad_mode():
            for _ in range(2):  # warm-up (and compilation): allocator and kernel selection outside the capture
                run()
        torch.cuda.current_stream(model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), grad_mode():
            self.logits = run()

    def _run(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class CompiledStep(_StaticStep):
    """One cached decode step compiled by torch.compile, for the CPU (inductor with its C++ wrapper).

    Eager PyTorch spends about half of a small model's CPU decode step dispatching small ops from Python;
    the compiled static-shape step (`Model.forward(..., pos=)`) runs them from generated C++. Compiling takes
    about a minute the first time on 2 cores and seconds afterwards (inductor caches the result on disk).
    Only the plain cached path uses it (probes and breaks run eagerly). In float32 its logits equal the eager
    step's to float32 rounding (tested); with quantized weights, whose activations pass through bfloat16, the
    fused kernels' other summation order moves them by bf16-sized steps (the bound cached vs uncached has).
    """

    def __init__(self, model: Model, cache: KVCache, position: int) -> None:
        super().__init__(model, cache, position)
        self._fn = self._compiled({"cpp_wrapper": True} if model.device.type == "cpu" else None)
        try:
            with torch.no_grad():
                self._fn()  # compiles; writes position `position`, which the next step rewrites
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported op, …: one sentence, not a trace
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UnsupportedError(f"torch.compile could not build the decode step ({first}); run without compile.") from exc

    def _run(self) -> torch.Tensor:
        with torch.no_grad():
            return self._fn()
