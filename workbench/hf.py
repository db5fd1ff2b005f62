"""HF transformers as a second engine at our capture points: `transformers_dump` writes a workbench-dump/1
(dump.py) of a GGUF file run by transformers' own GGUF loader and modelling code.

The run: the prompt as one forward, then one token per forward through transformers' KV cache (a DynamicCache,
use_cache=True), with eager attention (the only implementation that computes the probabilities). Each capture
point is read where transformers has it, never recomputed:

  our point              transformers (per decoder layer `L = model.model.layers[i]`, `A = L.self_attn`)
  attn_norm              output of L.input_layernorm (forward hook)
  attn.q / .k / .v       output of A.q_proj / k_proj / v_proj (bias included), viewed as [T, heads, head_dim]
  attn.q_normed/k_normed output of A.q_norm / A.k_norm (qwen3, qwen3moe, gemma3)
  attn.q_rope / k_rope   the query and key arguments of the modelling module's eager_attention_forward, which is
                         wrapped for the duration of the run: the query as given; the key argument is the cache's
                         keys after this step's update, whose last T rows are this step's keys after RoPE
  attn.pattern           the attention weights eager_attention_forward returns (softmax over the keys it got)
  attn.out               input of A.o_proj (forward pre-hook)
  resid_mid              input of the layer's FFN norm: L.post_attention_layernorm (llama, qwen2, qwen3,
                         qwen3moe) or L.pre_feedforward_layernorm (gemma3, whose post_attention_layernorm is the
                         norm on the attention output, added to the residual before this input)
  ffn_norm               output of that FFN norm
  moe.router_logits,     the three outputs of the router L.mlp.gate (qwen3moe, qwen2moe): logits, top-k weights
  moe.topk_weights/ids   (after transformers' renormalisation, where the arch has it) and expert ids
  moe.shared_gate        sigmoid of the output of L.mlp.shared_expert_gate (qwen2moe: x·g; the sigmoid is the
                         one operation recomputed, as the block applies it inline)
  ffn_out                output of L.mlp (gemma3: before L.post_feedforward_layernorm, as ours)
  resid_post             output of L
  final_norm             output of model.model.norm
  logits                 the model's returned logits (all rows: logits_to_keep=0)

What does not map one to one, per architecture:
- llama (SmolLM2 too): GGUF stores Q and K rows of each head permuted so that RoPE pairs are adjacent; the GGUF
  loader undoes that permutation, so transformers' heads hold the same numbers in split-half order. attn.q,
  attn.k, attn.q_rope and attn.k_rope are put back in GGUF order (dim 2j+p ← dim p·head_dim/2+j of each head): a
  relabelling of dims, no arithmetic. Everything downstream (pattern, attn.out) is unaffected.
- gemma3: q_norm/k_norm run after the heads are moved first ([B, heads, T, d]), so they are transposed back.
  transformers has no GGUF key for query_pre_attn_scalar and assumes 256; it is passed from our reading of the
  file (1/attn_scale², i.e. head_dim for every size but 27B). Sliding layers' caches keep only the last
  window − 1 keys, so their patterns cover fewer keys; they are padded with zero probability on the left (the
  positions the window masks, which ours holds as exact zeros) to span positions 0..pos as ours do.
- qwen3: the GGUF loader ignores attention.key_length and sizes heads as hidden / heads, which is wrong for the
  tiny file and for real Qwen3 (e.g. 0.6B: 1024 / 16 = 64, head_dim 128): head_dim is passed from our config.
- qwen3moe: the loader ignores expert_feed_forward_length: moe_intermediate_size is passed from our config
  (head_dim too, which it does read for this arch). Its router logits come in the model dtype (ours are float32
  whatever the dtype); its loader sets norm_topk_prob, so the top-k weights are renormalised as ours are.
- qwen2moe: the loader reads neither expert_feed_forward_length nor expert_shared_feed_forward_length:
  moe_intermediate_size and shared_expert_intermediate_size are passed from our config.
Every other point maps directly, on all six; every point holds all the rows its step computed.

Loading: a file transformers refuses, one whose weights it would size differently from the file (it then
re-initialises them at random and runs anyway) or lacks, another architecture, and transformers not installed
all end in ReferenceFailed with one sentence.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from workbench.dump import Dump
from workbench.errors import ReferenceFailed, WorkbenchError

# Our architecture names → transformers' (the GGUF loader maps one to the other itself; this is for messages).
HF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gemma3": "gemma3",
            "qwen2moe": "qwen2_moe"}


def config_overrides(config) -> dict:
    """The config values transformers' GGUF loader misses for this file, from our reading of it (see the module
    doc): passed to from_pretrained as keyword arguments."""
    if config.arch == "qwen3":
        return {"head_dim": config.head_dim}
    if config.arch == "qwen3moe":
        return {"head_dim": config.head_dim, "moe_intermediate_size": config.expert_ffn_hidden}
    if config.arch == "qwen2moe":  # its GGUF mapping reads neither expert width
        return {"moe_intermediate_size": config.expert_ffn_hidden,
                "shared_expert_intermediate_size": config.shared_ffn_hidden}
    if config.arch == "gemma3":
        scalar = config.attn_scale**-2
        return {"query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar}
    return {}


def _sentence(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, shortened."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}".rstrip(": ").rstrip(".")


def _load(path: Path, dtype: torch.dtype):
    """(transformers, the model in eval mode, our ModelConfig) or ReferenceFailed."""
    from workbench.config import ModelConfig
    from workbench.gguf_file import GGUFFile

    try:
        import transformers
    except ImportError:
        raise ReferenceFailed("transformers is not installed (pip install transformers) so it cannot be the reference.") from None
    try:
        config = ModelConfig.from_gguf(GGUFFile(path))
    except WorkbenchError as exc:
        raise ReferenceFailed(f"transformers was not run on {path.name}: {str(exc).rstrip('.')}.") from None
    # olmoe, deepseek2: its GGUF loader has no mapping for them. gpt-oss it maps, but 5.24 reads each
    # rope.scaling.* field's first part (the key's length) as its value, so every gpt-oss file with YaRN fails.
    if config.arch not in HF_ARCHS:
        raise ReferenceFailed(f"{path.name}: transformers cannot load {config.arch} GGUF files, so it is no "
                              "reference for this one.")
    try:
        with _quiet(transformers), _name_map_memoized():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="eager",
                output_loading_info=True, ignore_mismatched_sizes=True, **config_overrides(config),
            )
    except Exception as exc:  # noqa: BLE001 - its loader's refusals vary (unknown arch, bad tensors, metadata)
        raise ReferenceFailed(f"transformers {transformers.__version__} could not load {path.name} "
                              f"({HF_ARCHS[config.arch]}): {_sentence(exc)}.") from None
    model, info = model
    # Mismatched or missing weights load anyway, initialised at random (with a warning): no reference at all.
    if info.get("mismatched_keys"):
        key, in_file, in_model = min(info["mismatched_keys"])
        raise ReferenceFailed(f"transformers {transformers.__version__} sizes {key} of {path.name} as "
                              f"{list(in_model)} but the file holds {list(in_file)} (the config its GGUF loader made "
                              f"disagrees with the tensor), so it cannot load the file.")
    if info.get("missing_keys"):
        key = min(info["missing_keys"])
        raise ReferenceFailed(f"transformers {transformers.__version__} finds no weights for {key} in {path.name} "
                              f"and would initialise them at random, so it cannot be the reference.")
    if model.config._attn_implementation != "eager":
        raise ReferenceFailed(f"transformers loaded {path.name} with {model.config._attn_implementation} attention, "
                              "not eager, so it has no attention probabilities to capture.")
    return transformers, model.eval(), config


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' progress bars and info logging off while it loads (restored after)."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _name_map_memoized() -> Iterator[None]:
    """gguf.get_tensor_name_map memoized while transformers loads: its GGUF loader asks for the same (arch,
    layers) table once per submodule (hundreds of times, ~30 ms each, a third of SmolLM2's load). The table is
    a read-only lookup, so one shared copy answers every call the same; the original is restored after."""
    try:
        import gguf
    except ImportError:  # transformers' loader then says what is missing itself
        yield
        return
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


class _Recorder:
    """The tensors of one step by our capture name: batch row dropped, float32 (ids int64), CPU."""

    def __init__(self, names: Iterable[str] | None, arch: str) -> None:
        self.names = list(names) if names is not None else None
        self.arch = arch
        self.step: dict[str, torch.Tensor] = {}
        self.n_keys = 0  # positions 0..pos this step attends over (ours: the pattern's width)

    def wants(self, name: str) -> bool:
        return self.names is None or any(fnmatch.fnmatchcase(name, p) for p in self.names)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.wants(name):
            dtype = torch.float32 if tensor.is_floating_point() else torch.int64
            self.step[name] = tensor.detach().to("cpu", dtype=dtype, copy=True)

    def gguf_order(self, x: torch.Tensor) -> torch.Tensor:
        """llama: each head's dims from transformers' split-half order back to GGUF's adjacent-pair order."""
        if self.arch != "llama":
            return x
        return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _hooks(model, config, rec: _Recorder) -> list:
    """Forward hooks and pre-hooks on every module boundary that is a capture point; their handles."""
    handles = []

    def on(module, name: str, pick=lambda args, out: out):
        handles.append(module.register_forward_hook(lambda m, args, out: rec.put(name, pick(args, out))))

    for i, layer in enumerate(model.model.layers):
        b = f"blocks.{i}"
        attn = layer.self_attn
        d = attn.head_dim
        on(layer.input_layernorm, f"{b}.attn_norm", lambda a, o: _first(o)[0])
        on(attn.q_proj, f"{b}.attn.q", lambda a, o, d=d: rec.gguf_order(o[0].unflatten(-1, (-1, d))))
        on(attn.k_proj, f"{b}.attn.k", lambda a, o, d=d: rec.gguf_order(o[0].unflatten(-1, (-1, d))))
        on(attn.v_proj, f"{b}.attn.v", lambda a, o, d=d: o[0].unflatten(-1, (-1, d)))
        if getattr(attn, "q_norm", None) is not None:
            # qwen3/qwen3moe norm [B, T, heads, d]; gemma3 after the transpose, [B, heads, T, d]
            heads_first = config.arch == "gemma3"
            pick = (lambda a, o: o[0].transpose(0, 1)) if heads_first else (lambda a, o: o[0])
            on(attn.q_norm, f"{b}.attn.q_normed", pick)
            on(attn.k_norm, f"{b}.attn.k_normed", pick)
        handles.append(attn.o_proj.register_forward_pre_hook(
            lambda m, args, name=f"{b}.attn.out": rec.put(name, args[0][0])))
        ffn_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        on(ffn_norm, f"{b}.resid_mid", lambda a, o: a[0][0])
        on(ffn_norm, f"{b}.ffn_norm", lambda a, o: o[0])
        if config.is_moe:
            gate = layer.mlp.gate  # → (router logits [T, E], top-k weights [T, k], top-k ids [T, k])
            on(gate, f"{b}.moe.router_logits", lambda a, o: o[0])
            on(gate, f"{b}.moe.topk_ids", lambda a, o: o[2])
            on(gate, f"{b}.moe.topk_weights", lambda a, o: o[1])
        if config.shared_gate:  # its Linear(hidden, 1) gives x·g; the MoE block takes the sigmoid of it inline
            on(layer.mlp.shared_expert_gate, f"{b}.moe.shared_gate", lambda a, o: torch.sigmoid(o.float()))
        on(layer.mlp, f"{b}.ffn_out", lambda a, o: _first(o)[0])
        on(layer, f"{b}.resid_post", lambda a, o: _first(o)[0])
    on(model.model.norm, "final_norm", lambda a, o: o[0])
    return handles


@contextlib.contextmanager
def _attention_wrapped(model, rec: _Recorder) -> Iterator[None]:
    """The modelling module's eager_attention_forward replaced, for the duration, by one that records its query
    (q_rope), the last T rows of its keys (k_rope: the cache returns this step's keys after the ones it held) and
    the probabilities it returns (pattern); restored afterwards."""
    attn_cls = type(model.model.layers[0].self_attn)
    module = sys.modules[attn_cls.__module__]
    original = getattr(module, "eager_attention_forward", None)
    if original is None:
        raise ReferenceFailed(f"transformers' {module.__name__} has no eager_attention_forward to capture "
                              "RoPE outputs and attention probabilities from.")

    def recording(attn, query, key, value, *args, **kwargs):
        out, weights = original(attn, query, key, value, *args, **kwargs)
        b, T = f"blocks.{attn.layer_idx}", query.shape[2]
        rec.put(f"{b}.attn.q_rope", rec.gguf_order(query[0].transpose(0, 1)))  # [T, heads, d]
        rec.put(f"{b}.attn.k_rope", rec.gguf_order(key[0, :, -T:].transpose(0, 1)))  # [T, kv heads, d]
        if weights is not None and rec.wants(f"{b}.attn.pattern"):
            p = weights[0].transpose(0, 1)  # [T, heads, keys held]
            if p.shape[-1] < rec.n_keys:  # a sliding layer's cache: the older positions are outside the window
                p = torch.nn.functional.pad(p, (rec.n_keys - p.shape[-1], 0))
            rec.put(f"{b}.attn.pattern", p)
        return out, weights

    module.eager_attention_forward = recording
    try:
        yield
    finally:
        module.eager_attention_forward = original


def transformers_dump(
    path: str | Path, tokens: Sequence[int], n_prompt: int, names: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dump:
    """transformers' dump of `tokens` on the GGUF at `path`: the first n_prompt as one forward, then one token per
    forward through its KV cache; every capture point it has (module doc), or those matching `names` (fnmatch
    patterns). Tensors float32 on the CPU, ids int64. ReferenceFailed (one sentence) where transformers is
    missing or cannot load the file."""
    path = Path(path)
    transformers, model, config = _load(path, dtype)
    dump = Dump(list(tokens), n_prompt, engine=f"transformers {transformers.__version__} "
                                               f"({str(dtype).removeprefix('torch.')})")
    if not all(0 <= t < config.vocab_size for t in dump.tokens):
        bad = next(t for t in dump.tokens if not 0 <= t < config.vocab_size)
        raise ReferenceFailed(f"token id {bad} is outside the vocabulary of {path.name} (0..{config.vocab_size - 1}).")
    rec = _Recorder(names, config.arch)
    cache = transformers.DynamicCache(config=model.config)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    handles = _hooks(model, config, rec)
    try:
        with _attention_wrapped(model, rec), torch.inference_mode():
            for step in range(dump.n_steps):
                ids = dump.step_tokens(step)
                first = dump.first_position(step)
                rec.step, rec.n_keys = {}, first + len(ids)
                out = model(
                    input_ids=torch.tensor([ids]), position_ids=torch.arange(first, first + len(ids))[None],
                    use_cache=True, logits_to_keep=0, **{cache_arg: cache},
                )
                rec.put("logits", out.logits[0])
                for name, tensor in rec.step.items():
                    dump.tensors[(step, name)] = tensor
    finally:
        for handle in handles:
            handle.remove()
    return dump
