"""What notebooks/walkthrough.py computes, apart from how it shows it: one function per table or check.

The notebook arranges (sliders, charts, prose); these functions take the engine's objects and return frames,
tensors and plain values, so that each can be read, tested and reused on its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import gguf as gguf_py
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from workbench import trace as wtrace
from workbench.bench import run as bench_run
from workbench.bench import speedup as bench_speedup
from workbench.dump import ours, split_capture
from workbench.model import Model, apply_rope
from workbench.qmatmul import matmul
from workbench.session import Session
from workbench.trace import Trace

# The order the forward pass computes the frames in: the first difference between two traces is the earliest
# (step, layer, stage); `tokens` (the logits) and `equiv` come after every layer.
STAGE_ORDER = {"qk": 0, "routing": 1, "layers": 2, "kv": 3, "tokens": 4, "equiv": 5, "reference": 6}


def visible(piece: str) -> str:
    """A token piece with its whitespace made visible: · for a space, ↵ for a newline, ⇥ for a tab."""
    return piece.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"


def decode(model: Model, ids: list[int], steps: int, **options: Any) -> Session:
    """A Session over `ids` (options: path, probes, breaks, …) after `steps` steps; end-of-text does not stop it."""
    session = Session(model, ids, context=len(ids) + steps + 1, **options)
    for _ in range(steps):
        session.step()
    return session


def break_effects(model: Model, ids: list[int], steps: int, breaks: Sequence[str]) -> pl.DataFrame:
    """The clean run and each of `breaks`, `steps` greedy tokens after `ids` each. How far the logits move: one
    uncached forward over the clean run's tokens with the break on, max |Δlogit| over every position relative to
    the clean run's max |logit|, and at how many positions the top token changes. And the text: the generated
    tokens and the first step whose token differs from the clean run's (None: none does). What each family's
    lesson says of its own porting bugs."""
    clean = decode(model, ids, steps).ids
    tokens = torch.tensor(clean, device=model.device)

    def logits(b: frozenset[str]) -> torch.Tensor:  # [T, vocab]
        return model.forward(tokens, 0, model.new_cache(len(clean)), breaks=b)

    reference = logits(frozenset())
    rows = []
    for name in ("clean", *breaks):
        b = frozenset() if name == "clean" else frozenset({name})
        moved = logits(b)
        gen = decode(model, ids, steps, breaks=b).ids[len(ids):]
        rows.append({
            "break": name, "relative max |Δlogit|": float((moved - reference).abs().max() / reference.abs().max()),
            "top token changes at": int((moved.argmax(-1) != reference.argmax(-1)).sum()), "of positions": len(clean),
            "tokens differ from step": next((s for s, (a, c) in enumerate(zip(gen, clean[len(ids):])) if a != c), None),
            "text (generated)": "|".join(visible(model.tokenizer.piece(t)) for t in gen),
        })
    return pl.DataFrame(rows, schema_overrides={"tokens differ from step": pl.Int64})


# ---- 1 · the GGUF file ------------------------------------------------------------------------------------

def tensor_table(gguf) -> pl.DataFrame:
    """One row per tensor of a GGUFFile: name, type, shape (PyTorch order), params, bytes, bits per param."""
    return pl.DataFrame([
        {"name": t.name, "type": t.type_name, "shape": " × ".join(map(str, t.shape)), "params": t.n_elements,
         "bytes": t.n_bytes, "bits per param": 8 * t.n_bytes / t.n_elements}
        for t in gguf.tensors.values()
    ])


def quant_table(gguf, tensors: pl.DataFrame) -> pl.DataFrame:
    """One row per quant type in the file: tensors, params, bytes, bits per param, weights and bytes per block."""
    table = (
        tensors.group_by("type")
        .agg(pl.len().alias("tensors"), pl.col("params").sum(), pl.col("bytes").sum())
        .with_columns((8 * pl.col("bytes") / pl.col("params")).alias("bits per param"))
        .sort("bits per param")
    )
    blocks = {t.type_name: gguf_py.GGML_QUANT_SIZES[t.ggml_type] for t in gguf.tensors.values()}
    return table.with_columns(
        pl.col("type").replace_strict({k: v[0] for k, v in blocks.items()}, return_dtype=pl.Int64).alias("block weights"),
        pl.col("type").replace_strict({k: v[1] for k, v in blocks.items()}, return_dtype=pl.Int64).alias("block bytes"),
    )


# ---- 3 · one decode step by hand --------------------------------------------------------------------------

def qk_rms(layer: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> pl.DataFrame:
    """Per head of q and k: the RMS before (`pre`) and after (`post`) QK-norm, from one layer's tensors."""
    rows = []
    for name, n in (("q", n_heads), ("k", n_kv_heads)):
        for stage, t in (("pre", layer[name]), ("post", layer[f"{name}_normed"])):
            rms = t[0].pow(2).mean(-1).sqrt().tolist()  # t: [1, heads, head_dim] → [heads]
            rows += [{"tensor": name, "stage": stage, "head": h, "rms": rms[h]} for h in range(n)]
    return pl.DataFrame(rows)


def rope_pair(style: str, i: int, half: int) -> tuple[int, int]:
    """The two dims pair i rotates in `style`: (i, i + half) for neox (split halves), (2i, 2i + 1) for normal."""
    return (i, i + half) if style == "neox" else (2 * i, 2 * i + 1)


def rope_turns(model: Model, vec: torch.Tensor, pos: int, base: float, scale: float,
               rope_dim: int) -> tuple[dict[str, torch.Tensor], pl.DataFrame]:
    """One head's vector [head_dim] rotated to `pos` in both RoPE styles by `apply_rope`: the rotated vectors per
    style, and per (style, pair) the two dims, their values before and after, the angle measured and the formula's."""
    half = rope_dim // 2
    rotated, rows = {}, []
    for style in ("neox", "normal"):
        cos, sin = model.rope_table(base, scale, pos + 1, style)
        out = apply_rope(vec[None, None, :], cos[pos:pos + 1], sin[pos:pos + 1], style)[0, 0]  # [head_dim]
        rotated[style] = out
        for i in range(half):
            a, b = rope_pair(style, i, half)
            before, after = (float(vec[a]), float(vec[b])), (float(out[a]), float(out[b]))
            turn = (math.atan2(after[1], after[0]) - math.atan2(before[1], before[0])) % (2 * math.pi)
            rows.append({"style": style, "pair": i, "dims": f"{a}, {b}", "x0": before[0], "y0": before[1],
                         "x1": after[0], "y1": after[1], "measured turn": turn,
                         "formula": (pos * scale * base ** (-2 * i / rope_dim)) % (2 * math.pi)})
    return rotated, pl.DataFrame(rows)


def rope_points(turns: pl.DataFrame, n_pairs: int) -> pl.DataFrame:
    """The first `n_pairs` pairs of `rope_turns` as points to draw: one row per (style, pair, before|after)."""
    rows = []
    for r in turns.filter(pl.col("pair") < n_pairs).iter_rows(named=True):
        for when, x, y in (("before", r["x0"], r["y0"]), ("after", r["x1"], r["y1"])):
            rows.append({"style": r["style"], "pair": r["pair"], "dims": r["dims"], "when": when, "x": x, "y": y, "o": 0.0})
    return pl.DataFrame(rows)


def angle_error(turns: pl.DataFrame) -> float:
    """The largest gap between a measured turn and the formula's, the short way round the circle (rad)."""
    return float((turns["measured turn"] - turns["formula"]).abs()
                 .map_elements(lambda d: min(d, 2 * math.pi - d), return_dtype=pl.Float64).max())


def qk_norm_across_positions(model: Model, ids: list[int]) -> pl.DataFrame:
    """One uncached forward over `ids` (positions 0..n-1): per layer, head, tensor (q | k), stage (pre | post
    QK-norm) and position, the RMS of that head's vector."""
    stages = {"attn.q": ("q", "pre"), "attn.k": ("k", "pre"), "attn.q_normed": ("q", "post"),
              "attn.k_normed": ("k", "post")}
    frames = []
    dump = ours(model, ids, len(ids), names=[f"blocks.*.{point}" for point in stages])  # the prompt: one step
    for (_, name), x in dump.tensors.items():
        layer, point = split_capture(name)
        tensor, stage = stages[point]
        rms = x.float().pow(2).mean(-1).sqrt()  # [T, heads]
        positions, heads = rms.shape
        frames.append(pl.DataFrame({
            "layer": [layer] * rms.numel(), "head": list(range(heads)) * positions,
            "tensor": [tensor] * rms.numel(), "stage": [stage] * rms.numel(),
            "position": [p for p in range(positions) for _ in range(heads)], "rms": rms.flatten().tolist(),
        }))
    return pl.concat(frames).sort("layer", "tensor", "stage", "head", "position", descending=[False, True, True, False, False])


def qk_norm_spread(frame: pl.DataFrame) -> pl.DataFrame:
    """Per tensor and stage of a `qk_norm_across_positions` frame: the smallest (min) and largest (max) head RMS over
    every layer, head and position, and their ratio (spread = max / min)."""
    return frame.group_by("tensor", "stage").agg(
        pl.col("rms").min().alias("min"), pl.col("rms").max().alias("max"),
    ).with_columns((pl.col("max") / pl.col("min")).alias("spread")).sort(
        "tensor", "stage", descending=True)  # q before k, pre before post


def rope_unwrapped(model: Model, vec: torch.Tensor, pos: int, base: float, scale: float, rope_dim: int,
                   style: str) -> pl.DataFrame:
    """Per pair of one head's vector [head_dim]: the total angle it has turned at `pos`, measured from `apply_rope`'s
    output at every position 0..pos and unwrapped along them (a fast pair's full turns count), and the formula's
    pos × scale × base^(−2i/rope_dim)."""
    half = rope_dim // 2
    cos, sin = model.rope_table(base, scale, pos + 1, style, rope_dim)
    out = apply_rope(vec[None, None, :].expand(pos + 1, 1, -1), cos[: pos + 1], sin[: pos + 1], style)[:, 0]
    before, after = vec.double().cpu().numpy(), out.double().cpu().numpy()  # [head_dim], [pos + 1, head_dim]
    rows = []
    for i in range(half):
        a, b = rope_pair(style, i, half)
        turns = np.arctan2(after[:, b], after[:, a]) - math.atan2(before[b], before[a])  # [pos + 1], mod 2π
        rows.append({"pair": i, "measured": float(np.unwrap(turns)[-1]),  # turns[0] = 0: position 0 does not turn
                     "formula": pos * scale * base ** (-2 * i / rope_dim)})
    return pl.DataFrame(rows)


def rope_relative_check(model: Model, q: torch.Tensor, k: torch.Tensor, base: float, scale: float, style: str,
                        offsets: tuple[int, ...] = (0, 1, 5), starts: tuple[int, ...] = (0, 7, 30)) -> pl.DataFrame:
    """Per offset d and start m: the dot product of q [head_dim] rotated to position m + d with k rotated to m
    (`apply_rope`). RoPE makes it depend on d only: the same at every start."""
    cos, sin = model.rope_table(base, scale, max(offsets) + max(starts) + 1, style)

    def at(v: torch.Tensor, p: int) -> torch.Tensor:
        return apply_rope(v[None, None, :], cos[p:p + 1], sin[p:p + 1], style)[0, 0].double()

    return pl.DataFrame([{"offset": d, "start": m, "dot": float(at(q, m + d) @ at(k, m))}
                         for d in offsets for m in starts])


def attention_pattern(layer: dict[str, torch.Tensor], group: int, attn_scale: float,
                      pieces: list[str]) -> tuple[pl.DataFrame, float]:
    """The newest query's softmax weights per head over the cached keys (grouped_attention does not return them),
    and the largest gap between those weights applied to the values and grouped_attention's own output."""
    q, keys, values, att = layer["q_rope"], layer["keys"], layer["values"], layer["att"]  # keys: [kv, pos+1, d]
    rows, check = [], 0.0
    for head in range(q.shape[1]):
        kv_head = head // group
        probs = torch.softmax(((q[0, head] @ keys[kv_head].T) * attn_scale).float(), -1)  # [pos+1]
        check = max(check, float((probs @ values[kv_head] - att[0, head]).abs().max()))
        rows += [{"head": head, "key position": j, "piece": visible(pieces[j]) if j < len(pieces) else "",
                  "weight": float(probs[j])} for j in range(keys.shape[1])]
    return pl.DataFrame(rows), check


# The by-hand tensors the engine's capture points are compared with: capture point → key in a layer's dict.
PROBED = {"attn.q": "q", "attn.k": "k", "attn.q_normed": "q_normed", "attn.k_normed": "k_normed",
          "moe.router_logits": "router_logits", "resid_post": "resid_post"}


def probe_check(model: Model, hand: list[dict[str, torch.Tensor]], captured: dict[str, torch.Tensor],
                breaks: frozenset[str] = frozenset()) -> pl.DataFrame:
    """Per capture point (and Model.moe run on the by-hand input of each layer, with the same `breaks`):
    max |by hand − engine|."""
    rows = []
    with torch.inference_mode():
        for i, r in enumerate(hand):
            for point, key in PROBED.items():
                name = f"blocks.{i}.{point}"
                if name in captured:
                    mine, theirs = r[key].float(), captured[name].float().reshape(r[key].shape)
                    rows.append({"capture point": name, "shape": "×".join(map(str, captured[name].shape)),
                                 "max |by hand − engine|": float((mine - theirs).abs().max())})
            moe = model.moe(r["h2"], i, model.weights.layers[i], None, breaks)  # the engine's MoE on our input
            rows.append({"capture point": f"Model.moe (layer {i})", "shape": "×".join(map(str, moe.shape)),
                         "max |by hand − engine|": float((moe - r["moe_out"]).abs().max())})
    return pl.DataFrame(rows)


# ---- 3 · QK-norm over the whole projection (olmoe) --------------------------------------------------------

def _head_rms(x: torch.Tensor) -> list[float]:
    """The RMS of each head's vector of x [T, heads, head_dim], position-major: T · heads values."""
    return x.double().pow(2).mean(-1).sqrt().flatten().tolist()


def qk_norm_whole_vs_per_head(model: Model, ids: list[int]) -> pl.DataFrame:
    """q's QK-norm as olmoe computes it, over the whole projection (one RMS over every head of a row), against the
    per-head norm a port may write instead (the qk-norm-per-head break), on one uncached forward over `ids` each:
    per norm ("whole" | "per head"), layer, position and head, the RMS of the head's q before the norm, after it,
    and after it ÷ the norm's weight (what the norm itself sets). The whole-row norm divides every head of a row
    by one number, so the heads keep their relative sizes and only their combined RMS ÷ weight is 1; normed head
    by head, each head's is 1."""
    c = model.config
    T, H, D = len(ids), c.n_heads, c.head_dim
    frames = []
    for norm, breaks in (("whole", frozenset()), ("per head", frozenset({"qk-norm-per-head"}))):
        dump = ours(model, ids, T, names=["blocks.*.attn.q", "blocks.*.attn.q_normed"], breaks=breaks)  # one step
        for i, layer in enumerate(model.weights.layers):
            q, normed = (dump.tensors[(0, f"blocks.{i}.attn.{point}")] for point in ("q", "q_normed"))  # [T, H, D]
            weight = layer.q_norm.float().cpu().view(H, D)  # [H·D] as each head's slice
            frames.append(pl.DataFrame({
                "norm": [norm] * T * H, "layer": [i] * T * H, "position": [p for p in range(T) for _ in range(H)],
                "head": list(range(H)) * T, "rms before": _head_rms(q), "rms after": _head_rms(normed),
                "rms after ÷ weight": _head_rms(normed / weight),
            }, schema_overrides={"layer": pl.Int32, "position": pl.Int32, "head": pl.Int32}))
    return pl.concat(frames)


def qk_whole_summary(heads: pl.DataFrame) -> pl.DataFrame:
    """Per norm of a `qk_norm_whole_vs_per_head` frame, over every layer and position: the smallest and largest
    head RMS ÷ weight; the largest distance from 1 of a row's combined RMS ÷ weight (the root of its heads' mean
    square), which both norms hold at 1; and the largest change of the heads' relative sizes within a row (the
    spread of after ÷ weight ÷ before over its heads, − 1), which only the whole-row norm leaves at 0."""
    rows = heads.with_columns((pl.col("rms after ÷ weight") / pl.col("rms before")).alias("scale")).group_by(
        "norm", "layer", "position").agg(
        (pl.col("rms after ÷ weight").pow(2).mean().sqrt() - 1).abs().alias("row"),
        (pl.col("scale").max() / pl.col("scale").min() - 1).alias("relative"))
    return heads.group_by("norm").agg(
        pl.col("rms after ÷ weight").min().alias("head RMS ÷ weight, min"),
        pl.col("rms after ÷ weight").max().alias("head RMS ÷ weight, max"),
    ).join(rows.group_by("norm").agg(pl.col("row").max().alias("max |row RMS ÷ weight − 1|"),
                                     pl.col("relative").max().alias("max change of the heads' relative sizes")),
           on="norm").sort("norm", descending=True)  # whole, then per head


# ---- 4 · latent attention (deepseek2) ---------------------------------------------------------------------

def latent_cache(trace: Trace) -> pl.DataFrame:
    """Per step of an MLA session's trace, on its primary path: the positions cached, the bytes the cache holds
    (the kv frame over every layer: a latent + RoPE-key row per position; V is a view of the latent and costs
    nothing), those bytes per position and layer, and what an MHA cache of the same model would hold for as many
    positions (the trace's mha_bytes_per_token), in all and per position and layer."""
    meta = trace.meta
    n_layers, mha = meta["config"]["n_layers"], meta["mha_bytes_per_token"]
    kv = trace.kv.filter(pl.col("path") == meta["primary_path"])
    return kv.group_by("step").agg(
        pl.col("length").max().cast(pl.Int64).alias("positions"),
        (pl.col("k_bytes") + pl.col("v_bytes")).sum().alias("cache bytes"),
    ).sort("step").with_columns(
        (pl.col("cache bytes") / (pl.col("positions") * n_layers)).alias("bytes per position and layer"),
        (pl.col("positions") * mha).alias("MHA bytes"),
        pl.lit(mha / n_layers).alias("MHA bytes per position and layer"),
    )


def latent_attention_forms(model: Model, ids: list[int]) -> pl.DataFrame:
    """MLA's attention two ways at every layer, in float64, from the engine's capture points on one uncached forward
    over `ids` (`attn.q`, `.q_pe`, `.kv_latent`, `.k_pe`) and the layer's attn_k_b (`wk_b` [H, lora, nope]) and
    attn_v_b (`wv_b` [H, v, lora]). As MHA: every head's K = [latent · attn_k_b | k_pe] and V = attn_v_b · latent,
    decompressed at every position. Absorbed, as the engine runs it: q_nope through attn_k_b into the latent, scored
    against the cached latent rows themselves. Per layer: max |difference| of each form's softmax from the engine's
    `attn.pattern`, and of the MHA form's Σ p·V from its `attn.out`."""
    c = model.config
    T, nope = len(ids), c.head_dim - c.rope_dim
    points = ("q", "q_pe", "kv_latent", "k_pe", "pattern", "out")
    dump = ours(model, ids, T, names=[f"blocks.*.attn.{point}" for point in points])  # the prompt: one step
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)[:, None]  # [T, 1, keys]: a key after the query

    def softmax(scores: torch.Tensor) -> torch.Tensor:  # [T, H, keys]
        return torch.softmax((scores * c.attn_scale).masked_fill(causal, -math.inf), -1)

    rows = []
    for i, layer in enumerate(model.weights.layers):
        q, q_pe, latent, k_pe, pattern, out = (dump.tensors[(0, f"blocks.{i}.attn.{p}")].double() for p in points)
        wk_b, wv_b = layer.wk_b.double().cpu(), layer.wv_b.double().cpu()
        k_nope = torch.einsum("sl,hln->shn", latent, wk_b)  # [keys, H, nope]: every head's K, decompressed
        v = torch.einsum("hvl,sl->shv", wv_b, latent)  # [keys, H, v]
        mha = softmax(torch.einsum("thn,shn->ths", q[..., :nope], k_nope) + torch.einsum("thr,sr->ths", q_pe, k_pe))
        q_latent = torch.einsum("thn,hln->thl", q[..., :nope], wk_b)  # [T, H, lora]
        absorbed = softmax(torch.einsum("thl,sl->ths", q_latent, latent) + torch.einsum("thr,sr->ths", q_pe, k_pe))
        rows.append({"layer": i, "max |MHA-form pattern − engine's|": float((mha - pattern).abs().max()),
                     "max |absorbed pattern − engine's|": float((absorbed - pattern).abs().max()),
                     "max |MHA-form Σ p·V − engine's attn.out|": float(
                         (torch.einsum("ths,shv->thv", mha, v).reshape(T, -1) - out).abs().max())})
    return pl.DataFrame(rows)


# ---- 5 · cached vs uncached -------------------------------------------------------------------------------

def speed_sweep(model: Model, sizes: list[int], steps: int, on_size: Callable[[], None] = lambda: None) -> pl.DataFrame:
    """`workbench.bench.run` at each prompt length, best of two runs per path (a busy machine only ever makes a run
    slower): one row per (prompt tokens, path) with ms per token, tokens/s, and the measured and expected speedup."""
    rows = []
    for j, n in enumerate(sizes):
        runs = (bench_run(model, prompt_tokens=n, steps=steps, warmup=j == 0)
                + bench_run(model, prompt_tokens=n, steps=steps, warmup=False))
        best = [max((r for r in runs if r.path == path), key=lambda r: r.tokens_per_s) for path in ("cached", "uncached")]
        measured, expected = bench_speedup(best)
        rows += [{"prompt tokens": r.prompt_tokens, "path": r.path, "ms per token": r.ms_per_token,
                  "tokens/s": r.tokens_per_s, "speedup": measured, "expected speedup": expected} for r in best]
        on_size()
    return pl.DataFrame(rows)


# ---- 6 · mixture of experts -------------------------------------------------------------------------------

def expert_load(traces: dict[str, Trace]) -> pl.DataFrame:
    """Per prompt, layer and expert: the picks and their share of all (token, rank) picks at that layer."""
    return pl.concat([
        t.routing.group_by("layer", "expert").len("picks").with_columns(
            (pl.col("picks") / pl.col("picks").sum().over("layer")).alias("share"), pl.lit(name).alias("prompt"))
        for name, t in traces.items()
    ]).sort("prompt", "layer", "expert")


def load_summary(load: pl.DataFrame, n_experts: int) -> pl.DataFrame:
    """Per prompt and layer: the busiest expert's share and how many experts were never picked."""
    return load.group_by("prompt", "layer").agg(
        pl.col("share").max().round(3).alias("busiest expert's share"),
        (pl.lit(n_experts) - pl.len()).alias("experts never picked"),
    ).sort("prompt", "layer")


def largest_load_gap(load: pl.DataFrame) -> dict | None:
    """The (layer, expert) whose share differs most between the `code` and `prose` prompts, or None."""
    if load["prompt"].n_unique() != 2:
        return None
    gap = (load.pivot(on="prompt", index=["layer", "expert"], values="share").fill_null(0)
           .with_columns((pl.col("code") - pl.col("prose")).abs().alias("gap")))
    return gap.sort("gap", descending=True).row(0, named=True) if gap.height else None


# Default prompts for `specialisation`: the bundled model was trained on Python standard-library code and docstrings.
CODE_PROMPTS = [
    ('import os\n\n\ndef read_lines(path):\n    """Return the lines of the file at path, without their newlines."""\n'
     '    with open(path) as f:\n        return [line.rstrip("\\n") for line in f]\n'),
    ('def count_words(text):\n    """Return a dict mapping each word of text to how often it occurs."""\n'
     '    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n'),
    ('class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n        self._items = []\n\n'
     '    def push(self, item):\n        self._items.append(item)\n\n    def pop(self):\n        return self._items.pop()\n'),
]
PROSE_PROMPTS = [
    ("The history of the city begins with a small village on the river. Over the centuries it grew into a market "
     "town, and later into a busy port where ships from many countries came to trade."),
    ("Every morning the old baker opened his shop before sunrise. The smell of fresh bread filled the street, and "
     "the children stopped at his window on their way to school."),
    ("The mountains to the north are covered with snow for most of the year. In the short summer, farmers bring "
     "their sheep up to the high meadows, where the grass is green and the air is cool."),
]


def expert_usage(model: Model, ids: list[int], steps: int = 0) -> pl.DataFrame:
    """Per layer and expert: the picks and their share of all (position, rank) top-k picks at that layer, over the
    prompt's positions and `steps` generated tokens (a cached Session's routing frame)."""
    routing = decode(model, ids, steps + 1, path="cached", probes=True).trace().routing  # step 0: the prefill
    return routing.group_by("layer", "expert").len("picks").with_columns(
        (pl.col("picks") / pl.col("picks").sum().over("layer")).alias("share")).sort("layer", "expert")


def usage_distance(a: pl.DataFrame, b: pl.DataFrame) -> pl.DataFrame:
    """Per layer: the total-variation distance between two `expert_usage` frames, 0.5 × Σ_e |share_a − share_b|
    (an expert one of them never picked has share 0 there): 0 for the same usage, 1 for disjoint experts."""
    joined = a.select("layer", "expert", pl.col("share").alias("a")).join(
        b.select("layer", "expert", pl.col("share").alias("b")), on=["layer", "expert"], how="full", coalesce=True)
    return joined.fill_null(0).group_by("layer").agg(
        (0.5 * (pl.col("a") - pl.col("b")).abs().sum()).alias("distance")).sort("layer")


@contextmanager
def random_router(model: Model, seed: int) -> Iterator[None]:
    """While active, every MoE layer's router is a random Gaussian matrix (seeded; same shape, dtype and device,
    scaled to the original's std); the original tensors are put back on exit, even on an error."""
    generator = torch.Generator().manual_seed(seed)
    layers = [layer for layer in model.weights.layers if layer.router is not None]
    originals = [layer.router for layer in layers]
    try:
        for layer, router in zip(layers, originals):
            noise = torch.randn(router.shape, generator=generator, dtype=torch.float64)
            layer.router = (noise * router.double().std().cpu()).to(router.device, router.dtype)
        yield
    finally:
        for layer, router in zip(layers, originals):
            layer.router = router


def specialisation(model: Model, prompts: dict[str, list[list[int]]], seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> pl.DataFrame:
    """Per layer: the mean `usage_distance` between prompts of different kinds and between prompts of the same
    kind, with the trained router and with `random_router` (the mean over `seeds`: one random router is a noisy
    control). Specialisation is the across-kind distance standing above the within-kind one — by more than a
    random router's does, which separates texts only by their tokens."""
    kinds = [(kind, ids) for kind, many in prompts.items() for ids in many]

    def mean_distances(usages: list[pl.DataFrame], same_kind: bool) -> pl.DataFrame:
        pairs = [(i, j) for i, j in itertools.combinations(range(len(kinds)), 2)
                 if (kinds[i][0] == kinds[j][0]) == same_kind]
        return pl.concat([usage_distance(usages[i], usages[j]) for i, j in pairs]).group_by("layer").agg(
            pl.col("distance").mean())

    trained = [expert_usage(model, ids) for _, ids in kinds]
    frames = {"across kinds": mean_distances(trained, False), "within a kind": mean_distances(trained, True)}
    random_runs = {"across kinds, random router": [], "within a kind, random router": []}
    for seed in seeds:
        with random_router(model, seed):
            untrained = [expert_usage(model, ids) for _, ids in kinds]
        random_runs["across kinds, random router"].append(mean_distances(untrained, False))
        random_runs["within a kind, random router"].append(mean_distances(untrained, True))
    for name, runs in random_runs.items():
        frames[name] = pl.concat(runs).group_by("layer").agg(pl.col("distance").mean())
    frame = pl.DataFrame({"layer": range(model.config.n_layers)}, schema={"layer": pl.Int32})
    for name, distances in frames.items():
        frame = frame.join(distances.rename({"distance": name}), on="layer", how="left")
    return frame.sort("layer")


# ---- 6 · a shared expert and its gate --------------------------------------------------------------------

SHARED_BREAKS = ("shared-expert-dropped", "shared-expert-ungated")  # the porting bugs of a gated shared expert


def shared_expert_share(model: Model, ids: list[int]) -> pl.DataFrame:
    """One uncached forward over `ids` on a model with a gated shared expert (qwen2moe): per layer and position,
    the gate σ(x·g), the sizes (L2 norms) of the gated shared expert's output and of the routed experts' weighted
    sum, the shared share ‖gate·shared‖ / (‖gate·shared‖ + ‖routed‖), and max |gate·shared + routed − ffn_out|,
    which says the two parts make the whole MoE output. Both parts are recomputed from the captured MoE input
    (`ffn_norm`): the routed one by Model.moe with the shared expert dropped, the shared one by its SwiGLU."""
    points = ("ffn_norm", "moe.shared_gate", "ffn_out")
    dump = ours(model, ids, len(ids), names=[f"blocks.*.{point}" for point in points])  # the prompt: one step
    frames = []
    with torch.inference_mode():
        for i, layer in enumerate(model.weights.layers):
            x, gate, out = (dump.tensors[(0, f"blocks.{i}.{point}")] for point in points)  # [T, hidden], [T, 1], [T, hidden]
            routed = model.moe(x, i, layer, None, frozenset({"shared-expert-dropped"}))  # Σ_k w_k · expert_k(x)
            g, u = matmul(x, layer.shared_gate_up).chunk(2, dim=-1)  # the shared expert: a SwiGLU, written out
            shared = gate.to(x.dtype) * matmul(F.silu(g) * u, layer.shared_down)
            s, r = shared.float().norm(dim=-1), routed.float().norm(dim=-1)  # [T]
            frames.append(pl.DataFrame({
                "layer": [i] * len(ids), "position": list(range(len(ids))), "gate": gate[:, 0].tolist(),
                "gated shared norm": s.tolist(), "routed norm": r.tolist(), "shared share": (s / (s + r)).tolist(),
                "max |gated shared + routed − ffn_out|": (shared + routed - out).abs().amax(-1).tolist(),
            }, schema_overrides={"layer": pl.Int32, "position": pl.Int32}))
    return pl.concat(frames)


def shared_summary(share: pl.DataFrame) -> pl.DataFrame:
    """Per layer of a `shared_expert_share` frame: the gate's smallest, mean and largest value, and the shared
    expert's smallest, mean and largest share of the MoE output."""
    return share.group_by("layer").agg(
        pl.col("gate").min().alias("gate min"), pl.col("gate").mean().alias("gate mean"),
        pl.col("gate").max().alias("gate max"), pl.col("shared share").min().alias("share min"),
        pl.col("shared share").mean().alias("share mean"), pl.col("shared share").max().alias("share max"),
    ).sort("layer")


# ---- 6 · V3 routing (deepseek2) --------------------------------------------------------------------------

def v3_routing(model: Model, ids: list[int]) -> pl.DataFrame:
    """DeepSeek-V3's router written out step by step at every MoE layer of one uncached forward over `ids`, from the
    captured router logits and the layer's exp_probs_b: one row per (layer, position, expert) with its group, its
    score (sigmoid of the logit), the bias, the biased score (only for choosing), its group's score (the sum of the
    group's 2 best biased scores, as llama.cpp), whether the group is among the n_groups_used best, whether the
    expert is chosen (top-k biased scores within those groups), whether plain top-k of the scores or of the biased
    scores would choose it, its weight (the unbiased score, renormalised over the chosen where the model does,
    × routed_scale; 0 unless chosen) and the engine's (`moe.topk_weights`; 0 where it did not choose it)."""
    c = model.config
    T, E, G, k = len(ids), c.n_experts, c.n_expert_groups, c.n_experts_used
    points = ("moe.router_logits", "moe.topk_ids", "moe.topk_weights")
    dump = ours(model, ids, T, names=[f"blocks.*.{point}" for point in points])  # the prompt: one step

    def top(x: torch.Tensor) -> torch.Tensor:  # [T, E] → True at each row's k largest
        return torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.topk(k, -1).indices, True)

    frames = []
    for i, layer in enumerate(model.weights.layers):
        if not c.is_moe_layer(i):
            continue
        logits, engine_ids, engine_weights = (dump.tensors[(0, f"blocks.{i}.{point}")] for point in points)
        scores = torch.sigmoid(logits.double()) if c.gating == "sigmoid" else torch.softmax(logits.double(), -1)
        bias = layer.probs_bias.double().cpu() if layer.probs_bias is not None else torch.zeros(E, dtype=torch.float64)
        biased = scores + bias  # [T, E]
        grouped = biased.view(T, G, E // G)
        group_score = grouped.topk(min(2, E // G), -1).values.sum(-1)  # [T, G]
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(c.n_groups_used, -1).indices, True)
        kept = kept.repeat_interleave(E // G, 1)  # [T, E]: the expert's group survives
        chosen = top(biased.masked_fill(~kept, -math.inf))
        weight = scores * chosen
        if c.norm_topk:
            weight = weight / weight.sum(-1, keepdim=True)
        weight = weight * c.routed_scale
        engine = torch.zeros(T, E, dtype=torch.float64).scatter_(1, engine_ids, engine_weights.double())
        frames.append(pl.DataFrame({
            "layer": [i] * T * E, "position": [p for p in range(T) for _ in range(E)], "expert": list(range(E)) * T,
            "group": [e // (E // G) for e in range(E)] * T, "score": scores.flatten().tolist(),
            "bias": bias.repeat(T).tolist(), "biased score": biased.flatten().tolist(),
            "group score": group_score.repeat_interleave(E // G, 1).flatten().tolist(), "group kept": kept.flatten().tolist(),
            "chosen": chosen.flatten().tolist(), "plain top-k": top(scores).flatten().tolist(),
            "biased top-k": top(biased).flatten().tolist(), "weight": weight.flatten().tolist(),
            "engine weight": engine.flatten().tolist(),
        }, schema_overrides={"layer": pl.Int32, "position": pl.Int32, "expert": pl.Int32, "group": pl.Int32}))
    return pl.concat(frames)


def v3_choice_changes(routing: pl.DataFrame) -> pl.DataFrame:
    """Per MoE layer of a `v3_routing` frame: at how many positions the chosen experts differ from plain top-k of the
    scores, at how many the bias alone changes them (top-k of the biased scores over every expert), at how many the
    group limit changes them again, and the largest |weight − the engine's|."""
    per_token = routing.group_by("layer", "position").agg(
        (pl.col("chosen") != pl.col("plain top-k")).any().alias("chosen ≠ plain top-k"),
        (pl.col("biased top-k") != pl.col("plain top-k")).any().alias("the bias changes it"),
        (pl.col("chosen") != pl.col("biased top-k")).any().alias("the groups change it"),
        (pl.col("weight") - pl.col("engine weight")).abs().max().alias("max |weight − engine's|"),
    )
    return per_token.group_by("layer").agg(
        pl.len().alias("positions"), pl.col("chosen ≠ plain top-k").sum(), pl.col("the bias changes it").sum(),
        pl.col("the groups change it").sum(), pl.col("max |weight − engine's|").max(),
    ).sort("layer")


def v3_example(routing: pl.DataFrame) -> pl.DataFrame:
    """The rows (one per expert) of the (layer, position) of a `v3_routing` frame that shows the most: the first
    where the group limit changes the choice, else the first where the bias does, else the first of all."""
    per_token = routing.group_by("layer", "position", maintain_order=True).agg(
        (pl.col("chosen") != pl.col("biased top-k")).any().alias("groups"),
        (pl.col("biased top-k") != pl.col("plain top-k")).any().alias("bias"))
    pick = next((r for key in ("groups", "bias") for r in per_token.filter(pl.col(key)).iter_rows(named=True)),
                per_token.row(0, named=True))
    return routing.filter((pl.col("layer") == pick["layer"]) & (pl.col("position") == pick["position"])).sort("expert")


# ---- 7 · break it on purpose ------------------------------------------------------------------------------

def first_difference(broken: Trace, clean: Trace, n_layers: int) -> dict | None:
    """The earliest frame difference between two traces, in forward-pass order (step, layer, stage), or None."""
    found = [(d.first["step"], d.first.get("layer", n_layers), STAGE_ORDER[d.frame], d)
             for d in wtrace.diff(broken, clean) if d.first]
    if not found:
        return None
    step, layer, _, d = min(found, key=lambda f: f[:3])
    return {"frame": d.frame, "step": step, "layer": None if layer == n_layers else layer, "column": d.first["column"],
            "path": d.first.get("path")}


def invariant_alarm(t: Trace) -> tuple[str, int, str] | None:
    """What the trace says about itself, with no clean run: (frame, first step, what) or None."""
    eq = t.equiv.filter((pl.col("max_abs_diff") / pl.col("max_abs_logit") > t.meta["equiv_tolerance"]) | ~pl.col("argmax_equal"))
    if eq.height:
        return ("equiv", int(eq["step"].min()), "cached ≠ uncached")
    sums = t.routing.group_by("step", "path", "position", "layer").agg(pl.col("weight").sum().alias("s"))
    bad = sums.filter((pl.col("s") - 1).abs() > 1e-5)
    if bad.height:
        first = bad.sort("step", "path", "position", "layer").row(0, named=True)  # group_by's order is arbitrary
        return ("routing", first["step"], f"top-k weights sum to {first['s']:.3f}, not 1 (position {first['position']}, "
                                          f"layer {first['layer']})")
    used = t.routing.group_by("layer").agg(pl.col("expert").n_unique().alias("n"))
    if used.height and int(used["n"].max()) == 1:
        return ("routing", 0, "one expert for every token: routing collapsed")
    qk = t.qk.pivot(on="stage", index=["step", "path", "layer", "head", "tensor"], values="rms")
    if "post" in qk.columns:
        same = qk.filter((pl.col("post") - pl.col("pre")).abs() <= 1e-6 * pl.col("pre").abs())
        if same.height == qk.height and qk.height:
            return ("qk", 0, "post-norm RMS = pre-norm RMS: the norm did nothing")
    return None


def break_row(name: str, what: str, broken: tuple[Session, Trace], clean: tuple[Session, Trace], n_prompt: int) -> dict:
    """One row of the break report from a (session, trace) pair and the clean run's: the text it wrote, where its
    tokens and its trace first part from the clean run's, and which invariant (if any) fires on its own trace."""
    (session, trace), (clean_session, clean_trace) = broken, clean
    gen, clean_gen = session.ids[n_prompt:], clean_session.ids[n_prompt:]
    split = next((i for i, (a, b) in enumerate(zip(gen, clean_gen)) if a != b), None)
    first = first_difference(trace, clean_trace, session.model.config.n_layers)
    alarm = invariant_alarm(trace)
    where = "none"
    if first:
        layer = f" · layer {first['layer']}" if first["layer"] is not None else ""
        where = f"{first['frame']} · step {first['step']}{layer} · {first['column']}"
    return {
        "break": name, "what it does": what,
        "text (generated)": "|".join(visible(session.model.tokenizer.piece(t)) for t in gen),
        "tokens differ from step": split,
        "first difference vs clean": where,
        "first frame": first["frame"] if first else None, "first step": first["step"] if first else None,
        "invariant that fires": f"{alarm[0]} at step {alarm[1]}: {alarm[2]}" if alarm else "none — needs a reference",
        "alarm frame": alarm[0] if alarm else None, "alarm step": alarm[1] if alarm else None,
    }


def cost_growth(tokens: pl.DataFrame, warmup: int) -> pl.DataFrame:
    """Per path, a decode step's cost early and late in a run: the median ms (and position) of the first 4 decode
    steps after the first `warmup` ones, and of the last 4, and late / early. The section 5 claim in numbers."""
    rows = []
    for path in ("cached", "uncached"):
        steps = tokens.filter((pl.col("path") == path) & ~pl.col("prefill")).sort("step").slice(warmup)
        early, late = steps.head(4), steps.tail(4)
        ms_early, ms_late = float(early["seconds"].median()) * 1000, float(late["seconds"].median()) * 1000
        rows.append({"path": path, "position early": int(early["position"].median()), "ms early": round(ms_early, 2),
                     "position late": int(late["position"].median()), "ms late": round(ms_late, 2),
                     "ratio": round(ms_late / ms_early, 2)})
    return pl.DataFrame(rows)


# ---- 7 · attention heads and the logit lens ---------------------------------------------------------------

def attention_shares(attention: pl.DataFrame, step: int) -> pl.DataFrame:
    """Per layer at one step of an `attention` frame (the newest token's weights over keys 0..its own): the mean
    over heads of the weight on key 0 (a sink), on the newest token itself and on the one before it, and how
    many heads put their largest weight on each of those."""
    df = attention.filter(pl.col("step") == step)
    newest = int(df["key"].max())
    top = df.sort("weight", descending=True).group_by("layer", "head", maintain_order=True).first()
    return df.group_by("layer").agg(
        pl.col("weight").filter(pl.col("key") == 0).mean().alias("on key 0"),
        pl.col("weight").filter(pl.col("key") == newest).mean().alias("on itself"),
        pl.col("weight").filter(pl.col("key") == newest - 1).mean().alias("on the previous token"),
    ).join(top.group_by("layer").agg(
        (pl.col("key") == 0).sum().alias("heads reading key 0 most"),
        (pl.col("key") == newest - 1).sum().alias("heads reading the previous token most"),
        (pl.col("key") == newest).sum().alias("heads reading itself most"),
    ), on="layer").sort("layer")


def answer_layer(lens: pl.DataFrame) -> pl.DataFrame:
    """Per step of a `lens` frame: the final layer's top-1 token and the first layer from which every layer's
    top-1 is that token (where the answer appears and stays)."""
    rows = []
    for step, df in lens.sort("step", "layer").group_by("step", maintain_order=True):
        ids = df["token_id"].to_list()
        first = len(ids) - 1
        while first > 0 and ids[first - 1] == ids[-1]:
            first -= 1
        rows.append({"step": step[0], "token_id": ids[-1], "from layer": int(df["layer"][first])})
    return pl.DataFrame(rows, schema={"step": pl.Int32, "token_id": pl.Int64, "from layer": pl.Int32})


# ---- 7 · attention sinks and sliding windows (gpt-oss) ----------------------------------------------------

SINK_BREAKS = ("sinks-dropped", "no-sliding-window")  # gpt-oss's two attention porting bugs


def sink_attention(model: Model, ids: list[int], first: int) -> pl.DataFrame:
    """gpt-oss's attention in every layer of one uncached forward over `ids`, for each token from position `first`
    on, per layer and head: the sink's share as the engine captures it (`attn.sink_share`), the sum of its pattern
    (`attn.pattern`, the sink's column dropped), and both written out in float64 from the captured `attn.q_rope`,
    `attn.k_rope` and the layer's sink logits: a softmax over [q·k × scale for every key the layer lets the token
    see, the head's sink logit], whose last column is the share. And the keys the token may not see: on a sliding
    layer those `sliding_window` or more positions back, whose weights are exactly 0 ("keys masked"), and the
    weight the engine's pattern puts on keys that far back (0 on a sliding layer; on a full one what it reads
    beyond the window)."""
    c = model.config
    T, group = len(ids), c.n_heads // c.n_kv_heads
    points = ("q_rope", "k_rope", "pattern", "sink_share")
    dump = ours(model, ids, T, names=[f"blocks.*.attn.{point}" for point in points])  # the prompt: one step
    delta = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # [T, keys]: query − key position
    far = delta >= (c.sliding_window or T)  # [T, keys]: outside a sliding window
    rows = []
    for i, layer in enumerate(model.weights.layers):
        q, k, pattern, share = (dump.tensors[(0, f"blocks.{i}.attn.{point}")].double() for point in points)
        k = k.repeat_interleave(group, dim=1)  # [keys, heads, d]: each query head's KV head
        window = c.layer_window(i)
        hidden = delta < 0  # [T, keys]: a later key, or (a sliding layer) one the window has passed
        if window:
            hidden = hidden | (delta >= window)
        scores = (torch.einsum("thd,shd->ths", q, k) * c.attn_scale).masked_fill(hidden[:, None], -math.inf)
        sinks = layer.sinks.double().cpu()[None, :, None].expand(T, -1, 1)  # [T, heads, 1]
        full = torch.softmax(torch.cat((scores, sinks), -1), -1)  # [T, heads, keys + 1]
        for p in range(first, T):
            for h in range(c.n_heads):
                rows.append({
                    "position": p, "layer": i, "layer kind": "sliding" if window else "full", "head": h,
                    "sink share": float(share[p, h]), "Σ pattern": float(pattern[p, h].sum()),
                    "sink share, written out": float(full[p, h, -1]),
                    "max |pattern − written out|": float((pattern[p, h] - full[p, h, :-1]).abs().max()),
                    "keys": p + 1, "keys masked": int((pattern[p, h, : p + 1] == 0).sum()),
                    "weight beyond the window": float(pattern[p, h][far[p]].sum()),
                })
    return pl.DataFrame(rows, schema_overrides={"position": pl.Int32, "layer": pl.Int32, "head": pl.Int32})


def sink_summary(sinks: pl.DataFrame) -> pl.DataFrame:
    """Per layer of a `sink_attention` frame: its kind, the sink share's smallest, mean and largest value over
    heads and positions, max |Σ pattern + the written-out share − 1| (the pattern and the sink make the whole
    softmax), max |engine's share − written out|, and at the last position the keys, the keys masked and the
    mean weight on keys beyond the window."""
    last = sinks.filter(pl.col("position") == pl.col("position").max())
    return sinks.group_by("layer", "layer kind").agg(
        pl.col("sink share").min().alias("share min"), pl.col("sink share").mean().alias("share mean"),
        pl.col("sink share").max().alias("share max"),
        (pl.col("Σ pattern") + pl.col("sink share, written out") - 1).abs().max().alias("max |Σ pattern + share − 1|"),
        (pl.col("sink share") - pl.col("sink share, written out")).abs().max().alias("max |share − written out|"),
    ).join(last.group_by("layer").agg(
        pl.col("keys").first().alias("keys (last position)"), pl.col("keys masked").max().alias("keys masked"),
        pl.col("weight beyond the window").mean().alias("weight beyond the window"),
    ), on="layer").sort("layer")


# ---- 8 · each break's own signature -------------------------------------------------------------------------

def rope_difference_by_position(model: Model, ids: list[int], breaks: frozenset[str], layer: int = 0) -> pl.DataFrame:
    """Per prompt position: |q after RoPE with `breaks` − without| / |q without| at `layer` (all heads; one
    uncached forward each, so the inputs of that layer are the same when layer = 0). A RoPE bug's signature:
    exactly 0 at position 0, which is never rotated."""
    name = f"blocks.{layer}.attn.q_rope"

    def q_rope(b: frozenset[str]) -> torch.Tensor:  # [T, heads, head_dim]
        return ours(model, ids, len(ids), names=[name], breaks=b).tensors[(0, name)].float()

    clean, broken = q_rope(frozenset()), q_rope(breaks)
    rel = (broken - clean).flatten(1).norm(dim=-1) / clean.flatten(1).norm(dim=-1)
    return pl.DataFrame({"position": list(range(len(ids))), "relative difference": rel.tolist()})


def attention_entropy(pattern: pl.DataFrame) -> pl.DataFrame:
    """Per head of an `attention_pattern` frame: the entropy (nats) of its weights over the keys: low = sharp."""
    return pattern.group_by("head").agg(
        (-(pl.col("weight") * pl.col("weight").clip(1e-30).log()).sum()).alias("entropy")).sort("head")
