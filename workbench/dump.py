"""Dumps: one engine's tensors at our capture points, over one token sequence, in a file any engine can write.

The format (workbench-dump/1; docs/compare.md explains it with writers in Python, Rust and C++):
- one safetensors file (an .npz is read too), tensors named `"{step}/{capture}"`: step 0 is the prompt fed as
  one batch (rows = its positions), step s ≥ 1 one new token at position n_prompt + s − 1; `capture` is one of
  our capture point names (`blocks.3.attn.q_rope`, `logits`, …; probes.py, model.py);
- metadata: `format` = "workbench-dump/1", `tokens` (a JSON list of every token id fed, prompt first),
  `n_prompt` (a whole number, as text), optionally `engine` (free text);
- any subset of keys; a tensor with fewer rows than its step computed holds that step's last rows (engines
  skip rows they do not need: llama.cpp computes the last layer's feed-forward for the output rows only);
- rows first, then the point's shape ([T, heads, head_dim], [T, hidden], [T, heads, keys], …; a row may also
  come flat), float32/float16/bfloat16 values, int32/int64 ids (`moe.topk_ids`);
- a statistics-only point (what llama.cpp's llama-eval-callback prints) is a float64 vector [count, sum,
  sum of squares] named `"{step}/{capture}:stats"`.

`Dump.read` checks all of this and raises DumpError with one sentence; `ours` writes our own engine's dump.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.errors import InputError

FORMAT = "workbench-dump/1"
STATS = ":stats"  # the suffix of a statistics-only point: [count, sum, sum of squares]

# The chain of one block, in forward order (the order compare reports a first divergence in).
BLOCK_CHAIN = (
    "attn_norm", "attn.q", "attn.q_pe", "attn.kv_latent", "attn.k_pe", "attn.k", "attn.v", "attn.q_normed", "attn.k_normed", "attn.q_rope", "attn.k_rope",
    "attn.pattern", "attn.sink_share", "attn.out", "resid_mid", "ffn_norm", "moe.router_logits", "moe.topk_ids", "moe.topk_weights",
    "moe.shared_gate", "ffn_out", "resid_post",
)
FINAL_CHAIN = ("final_norm", "logits")
ID_POINTS = frozenset({"moe.topk_ids"})
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ID_DTYPES = (torch.int32, torch.int64)
_KEY = re.compile(r"(\d+)/(.+)")


def point_shape(config, point: str, n_keys: int) -> tuple[int, ...]:
    """The shape of one row of a block or final point (without its layer) for a model of `config`; n_keys: the
    positions a step's pattern spans."""
    c = config
    return {
        "attn.q": (c.n_heads, c.head_dim), "attn.q_normed": (c.n_heads, c.head_dim), "attn.q_rope": (c.n_heads, c.head_dim),
        "attn.k": (c.n_kv_heads, c.head_dim), "attn.k_normed": (c.n_kv_heads, c.head_dim),
        "attn.k_rope": (c.n_kv_heads, c.head_dim), "attn.v": (c.n_kv_heads, c.v_head_dim),
        "attn.pattern": (c.n_heads, n_keys), "attn.out": (c.n_heads * c.v_head_dim,),
        "attn.sink_share": (c.n_heads,), "attn.q_pe": (c.n_heads, c.rope_dim), "attn.kv_latent": (c.kv_lora_rank,), "attn.k_pe": (c.rope_dim,),
        "moe.router_logits": (c.n_experts,), "moe.topk_ids": (c.n_experts_used,), "moe.topk_weights": (c.n_experts_used,),
        "moe.shared_gate": (1,), "logits": (c.vocab_size,),
    }.get(point, (c.hidden,))


class DumpError(InputError):
    """A file that is not a workbench dump, or one whose contents contradict its own metadata or the model."""


def split_capture(capture: str) -> tuple[int | None, str]:
    """"blocks.3.attn.q" → (3, "attn.q"); "logits" → (None, "logits"). ValueError for a name we do not have."""
    if capture in FINAL_CHAIN:
        return None, capture
    parts = capture.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in BLOCK_CHAIN:
        return int(parts[1]), parts[2]
    raise ValueError(capture)


def order_key(step: int, capture: str) -> tuple[int, int, int]:
    """Forward order: step, then layer, then the chain of a block (final_norm and logits after every layer)."""
    layer, point = split_capture(capture)
    if layer is None:
        return step, 1 << 30, FINAL_CHAIN.index(point)
    return step, layer, BLOCK_CHAIN.index(point)


@dataclass
class Dump:
    """Tensors by (step, capture name), CPU, as stored (floats in their dtype, ids as int64), and the run they
    came from. `stats` holds the statistics-only points, [count, sum, sum of squares] each."""

    tokens: list[int]
    n_prompt: int
    tensors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    stats: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    engine: str | None = None

    def __post_init__(self) -> None:
        _check_run(self.tokens, self.n_prompt, "the dump")
        self.tokens = [int(t) for t in self.tokens]

    @property
    def n_steps(self) -> int:
        """Steps fed: the prompt (step 0) and one per token after it."""
        return len(self.tokens) - self.n_prompt + 1

    def rows(self, step: int) -> int:
        """How many positions step `step` computes."""
        return self.n_prompt if step == 0 else 1

    def first_position(self, step: int) -> int:
        return 0 if step == 0 else self.n_prompt + step - 1

    def step_tokens(self, step: int) -> list[int]:
        start = self.first_position(step)
        return self.tokens[start : start + self.rows(step)]

    def keys(self) -> list[tuple[int, str]]:
        """Every (step, capture) held, tensors and statistics, in forward order."""
        return sorted({*self.tensors, *self.stats}, key=lambda k: order_key(*k))

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (or .npz by suffix; bfloat16 is stored as float32 there, numpy has no bf16)."""
        path = Path(path)
        meta = {"format": FORMAT, "tokens": json.dumps(self.tokens), "n_prompt": str(self.n_prompt)}
        if self.engine:
            meta["engine"] = self.engine
        named = {f"{s}/{c}": t.contiguous() for (s, c), t in self.tensors.items()}
        named |= {f"{s}/{c}{STATS}": t.to(torch.float64).contiguous() for (s, c), t in self.stats.items()}
        if path.suffix == ".npz":
            arrays = {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for k, t in named.items()}
            np.savez(path, __metadata__=np.array(json.dumps(meta)), **arrays)
        else:
            from safetensors.torch import save_file

            save_file(named, str(path), metadata=meta)
        return path

    @classmethod
    def read(cls, path: str | Path) -> Dump:
        """A dump from a safetensors or .npz file; DumpError with one sentence for anything that is not one."""
        path = Path(path)
        if not path.is_file():
            raise DumpError(f"{path} does not exist or is not a file.")
        try:
            if path.suffix == ".npz":
                meta, tensors = _read_npz(path)
            else:
                meta, tensors = _read_safetensors(path)
        except DumpError:
            raise
        except Exception as exc:  # a damaged or foreign file: the readers' own errors vary
            kind = "an .npz archive" if path.suffix == ".npz" else "a safetensors file"
            raise DumpError(f"{path.name} is not {kind} that can be read ({type(exc).__name__}: {exc}).") from None
        return cls.from_named(meta, tensors, path.name)

    @classmethod
    def from_named(cls, meta: dict[str, str], named: dict[str, torch.Tensor], source: str = "the dump") -> Dump:
        """A dump from metadata and tensors named `"{step}/{capture}"`, checked as `read` checks a file."""
        if meta.get("format") != FORMAT:
            raise DumpError(f"{source} is not a workbench dump: its metadata has no format = {FORMAT} "
                            f"(found {meta.get('format')!r}).")
        try:
            tokens = json.loads(meta["tokens"])
        except (KeyError, TypeError, ValueError):
            raise DumpError(f"{source} has no readable 'tokens' in its metadata (a JSON list of token ids).") from None
        try:
            n_prompt = int(meta["n_prompt"])
        except (KeyError, TypeError, ValueError):
            raise DumpError(f"{source} has no 'n_prompt' in its metadata (the number of prompt tokens, as text).") from None
        _check_run(tokens, n_prompt, source)
        dump = cls(tokens, n_prompt, engine=meta.get("engine") or None)
        for name, tensor in named.items():
            stats = name.endswith(STATS)
            m = _KEY.fullmatch(name[: -len(STATS)] if stats else name)
            if m is None:
                raise DumpError(f"{source}: tensor '{name}' is not named \"{{step}}/{{capture}}\" (like \"0/blocks.0.attn.q\").")
            step, capture = int(m[1]), m[2]
            try:
                _, point = split_capture(capture)
            except ValueError:
                raise DumpError(f"{source}: '{capture}' (tensor '{name}') is not a capture point; the points are "
                                f"blocks.{{i}}.{{{', '.join(BLOCK_CHAIN)}}}, final_norm and logits.") from None
            if step >= dump.n_steps:
                raise DumpError(f"{source}: tensor '{name}' is for step {step}, but its {len(tokens)} tokens with "
                                f"n_prompt = {n_prompt} make steps 0..{dump.n_steps - 1}.")
            if stats:
                if tensor.dim() != 1 or tensor.shape[0] != 3 or not tensor.is_floating_point():
                    raise DumpError(f"{source}: statistics '{name}' must be 3 floats [count, sum, sum of squares], "
                                    f"not {tensor.dtype} {list(tensor.shape)}.")
                dump.stats[(step, capture)] = tensor.to(torch.float64)
                continue
            wanted = ID_DTYPES if point in ID_POINTS else FLOAT_DTYPES
            if tensor.dtype not in wanted:
                kinds = "int32 or int64 ids" if point in ID_POINTS else "float32, float16 or bfloat16 values"
                raise DumpError(f"{source}: '{name}' holds {str(tensor.dtype).removeprefix('torch.')}; it must hold {kinds}.")
            if tensor.dim() == 0 or not 1 <= tensor.shape[0] <= dump.rows(step):
                raise DumpError(f"{source}: '{name}' has {tensor.shape[0] if tensor.dim() else 'no'} rows; step {step} "
                                f"computes {dump.rows(step)} (a dump may hold its last rows, at least one).")
            dump.tensors[(step, capture)] = tensor.to(torch.int64) if point in ID_POINTS else tensor
        if not dump.tensors and not dump.stats:
            raise DumpError(f"{source} holds no tensors.")
        return dump


def _check_run(tokens: object, n_prompt: object, source: str) -> None:
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise DumpError(f"{source}'s 'tokens' must be a non-empty JSON list of whole numbers.")
    if isinstance(n_prompt, bool) or not isinstance(n_prompt, int) or not 1 <= n_prompt <= len(tokens):
        raise DumpError(f"{source}'s n_prompt must be from 1 to the number of tokens ({len(tokens)}), not {n_prompt}.")


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def _read_npz(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with np.load(path, allow_pickle=False) as z:
        if "__metadata__" not in z.files:
            raise DumpError(f"{path.name} is not a workbench dump: the archive has no __metadata__ entry "
                            "(a JSON object as a 0-d string array).")
        try:
            meta = json.loads(str(z["__metadata__"]))
        except ValueError:
            raise DumpError(f"{path.name}: its __metadata__ is not a JSON object.") from None
        if not isinstance(meta, dict):
            raise DumpError(f"{path.name}: its __metadata__ is not a JSON object.")
        tensors = {}
        for k in z.files:
            if k == "__metadata__":
                continue
            a = z[k]
            if a.dtype.kind not in "fiu":
                raise DumpError(f"{path.name}: '{k}' holds {a.dtype}; a dump holds numbers only.")
            tensors[k] = torch.from_numpy(np.ascontiguousarray(a))
        return {k: str(v) for k, v in meta.items()}, tensors


# -- our own engine's dump ---------------------------------------------------------------------------------
def ours(
    model, tokens: Sequence[int], n_prompt: int, names: Iterable[str] | None = None,
    breaks: frozenset[str] = frozenset(), max_bytes: int = 1 << 30,
) -> Dump:
    """Our engine's dump of `tokens` (the first n_prompt as one batch, then one token per step through the KV
    cache), every capture point or those matching `names` (fnmatch patterns), `breaks` switched on."""
    from workbench.probes import Capture

    dump = Dump(list(tokens), n_prompt, engine=f"workbench ({model.info.weights}, {str(model.dtype).removeprefix('torch.')})"
                + (f" with {', '.join(sorted(breaks))}" if breaks else ""))
    model.check_token_ids(dump.tokens)
    cache = model.new_cache(len(dump.tokens))
    budget = max_bytes
    for step in range(dump.n_steps):
        cap = Capture(names, max_bytes=budget)
        ids = torch.tensor(dump.step_tokens(step), device=model.device)
        model.forward(ids, dump.first_position(step), cache, cap, breaks=frozenset(breaks))
        budget -= cap.bytes
        for name, t in cap.tensors.items():  # cloned out of inference mode: a dump's tensors are ordinary ones
            dump.tensors[(step, name)] = t.clone()
    return dump
