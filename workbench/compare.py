"""Line another engine's dump up with ours, capture point by capture point, and say where it goes wrong.

For a dump (dump.py) `compare` runs our engine on the dump's tokens with the same prefill split twice:
- clean, for the **end-to-end** error at each point: their tensor against ours — what they have accumulated;
- teacher-forced, for the **local** error: at every capture point the forward computes our operation, records
  the result, and then goes on with *their* tensor in its place (model.seen). Our output at a point is therefore
  our operation applied to their inputs at the points before it, and its distance to their output is what
  their step *introduces*, apart from what it inherits. Points the dump lacks are computed by us from the
  (forced) points before them, so a dump with only `resid_post` gives each layer's whole block as one step.

Errors are relative L2 (‖theirs − ours‖ / ‖theirs‖) over the rows the dump holds; routing ids compare as sets
per row (the share of rows whose chosen experts differ), routing weights as vectors over all experts.

Each point has a kind of operation (KINDS). A correct engine's exact operations (norms, RoPE, residual adds,
routing) introduce its storage precision (~1e-7 in float32, ~4e-3 in bfloat16); its attention what its K/V
cache holds (float16 cache: ~1e-3); its matmuls what its arithmetic does (float32 ~1e-6, llama.cpp's 8-bit
activations ~1e-2). The threshold of a kind is calibrated from the dump itself: THRESHOLD_FACTOR × the median
local error of that kind over every step and layer, clamped to the kind's documented [floor, ceiling] (the
ceiling catches a bug that is everywhere, which the median would absorb). The **first divergence** is the first
point in forward order (step, layer, chain) whose local error passes its threshold.

**Suspects**: each break switch (model.BREAKS) that applies to the model is run teacher-forced in turn: a break
that reproduces their bug makes our operation match theirs where it acts, so the excess over the thresholds
(Σ log10(local / threshold) over the points that pass) falls. Suspects are the breaks that at least halve the
clean run's excess, likeliest (smallest excess) first.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import polars as pl
import torch

from workbench.dump import ID_POINTS, Dump, DumpError, point_shape, split_capture
from workbench.model import BREAKS, Model, breaks_that_apply

KINDS = {
    "attn_norm": "norm", "attn.q": "matmul", "attn.k": "matmul", "attn.v": "matmul",
    "attn.q_pe": "rope", "attn.kv_latent": "matmul", "attn.k_pe": "matmul",
    "attn.q_normed": "norm", "attn.k_normed": "norm", "attn.q_rope": "rope", "attn.k_rope": "rope",
    "attn.pattern": "attention", "attn.sink_share": "attention", "attn.out": "attention", "resid_mid": "matmul", "ffn_norm": "norm",
    "moe.router_logits": "matmul", "moe.topk_ids": "routing", "moe.topk_weights": "routing",
    "moe.shared_gate": "matmul", "ffn_out": "matmul", "resid_post": "add", "final_norm": "norm", "logits": "matmul",
}


def kind_of(point: str, config) -> str:
    """The kind of operation a point's local error measures: KINDS, but MLA's attn.out, which includes the
    attn_v_b decompression of the latent output, is a matmul."""
    return "matmul" if point == "attn.out" and config.is_mla else KINDS[point]


# [floor, ceiling] of each kind's threshold (relative L2; routing ids: the share of rows that differ).
# Floors: well above float32 rounding (~1e-7). Ceilings: 10× what bfloat16 storage (~1e-3) does to an exact
# operation, what a float16 KV cache (~1e-3) does to attention, and 8-bit activations (~1e-2) to a matmul.
LIMITS = {
    "norm": (1e-4, 1e-2), "rope": (1e-4, 1e-2), "add": (1e-4, 1e-2), "routing": (1e-4, 1e-2),
    "attention": (1e-4, 2e-2), "matmul": (1e-3, 0.1),
}
THRESHOLD_FACTOR = 10.0
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# A dump stored in float16 or bfloat16 carries its rounding into every local error: ~1× the unit roundoff for
# norms, RoPE and adds, more after a softmax (its inputs' absolute rounding becomes its outputs' relative error).
ROUNDING_FACTOR = 4.0  # and at each point at least this × what that rounding alone does there (_raise_to_rounding)
ROUNDOFF_FLOOR = {"norm": 2.0, "rope": 2.0, "add": 2.0, "matmul": 2.0, "attention": 4.0, "routing": 4.0}
STATS_THRESHOLD = 5e-2  # statistics-only points: relative difference of RMS or mean beyond this is a divergence
HEAD_POINTS = frozenset({"attn.q", "attn.q_pe", "attn.sink_share", "attn.k", "attn.v", "attn.q_normed", "attn.k_normed", "attn.q_rope", "attn.k_rope",
                         "attn.pattern", "attn.out"})


@dataclass
class Point:
    """One capture point of one step: its errors, and where the largest local error sits (head, sequence row)."""

    step: int
    capture: str
    layer: int | None
    kind: str
    local_error: float | None
    end_to_end_error: float
    cosine: float | None = None
    max_abs: float | None = None
    head: int | None = None
    row: int | None = None
    threshold: float | None = None
    stands_out: bool = False


@dataclass
class Comparison:
    points: list[Point]
    first_divergence: Point | None
    suspects: list[str]
    thresholds: dict[str, float]
    engine: str | None = None
    excess: dict[str, float] = field(default_factory=dict)  # break name ("" = clean) → excess over thresholds

    def as_json(self) -> dict:
        """The object `workbench compare --json` prints."""
        fd = self.first_divergence
        first = None if fd is None else {k: getattr(fd, k) for k in
                                         ("step", "capture", "layer", "local_error", "end_to_end_error", "head", "row", "kind")}
        return {"first_divergence": first, "suspects": self.suspects, "engine": self.engine,
                "thresholds": self.thresholds, "points": [asdict(p) for p in self.points]}

    def table(self) -> pl.DataFrame:
        return pl.DataFrame([asdict(p) for p in self.points],
                            schema_overrides={"local_error": pl.Float64, "cosine": pl.Float64, "max_abs": pl.Float64,
                                              "threshold": pl.Float64, "head": pl.Int64, "row": pl.Int64, "layer": pl.Int64})


class _Run:
    """The probe of one step: keeps our tensor at the dump's points (`ours`), and with `forced` hands the forward
    their tensor in its place (their last rows over ours)."""

    def __init__(self, keep: set[str], theirs: dict[str, torch.Tensor] | None) -> None:
        self.keep, self.theirs = keep, theirs
        self.ours: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        return name in self.keep

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name in self.keep:
            self.ours[name] = x.detach().clone()
        if self.theirs is None or name not in self.theirs:
            return None
        t = self.theirs[name].to(x.device)
        r = t.shape[0]
        if t.shape[1:] != x.shape[1:]:  # only routing may differ in width (another number of experts per token)
            return t if r == x.shape[0] else None
        y = x.clone()
        y[-r:] = t.to(x.dtype)
        return y


def fit(model: Model, dump: Dump) -> dict[tuple[int, str], torch.Tensor]:
    """Their tensors reshaped to our shapes ([rows, *ours]); DumpError with one sentence where the dump does not
    fit the model (a point the model does not have, a layer past its last, another number of values per row)."""
    c = model.config
    bad = [t for t in dump.tokens if not 0 <= t < c.vocab_size]
    if bad:
        raise DumpError(f"the dump feeds token id {bad[0]}, outside this model's vocabulary (0..{c.vocab_size - 1}).")
    fitted: dict[tuple[int, str], torch.Tensor] = {}
    for (step, capture), t in dump.tensors.items():
        shape = expected_shape(model, capture, dump.first_position(step) + dump.rows(step))
        if isinstance(shape, str):
            raise DumpError(f"the dump's '{step}/{capture}' does not fit {model.gguf.path.name}: {shape}.")
        _, point = split_capture(capture)
        per_row = math.prod(shape)
        if point in ID_POINTS or point == "moe.topk_weights":
            if t.dim() != 2:
                raise DumpError(f"the dump's '{step}/{capture}' must be [rows, experts per token], not {list(t.shape)}.")
            fitted[(step, capture)] = t
            continue
        if t[0].numel() != per_row:
            raise DumpError(f"the dump's '{step}/{capture}' does not fit {model.gguf.path.name}: it holds {t[0].numel()} "
                            f"values per row where the model has {per_row} ({' × '.join(map(str, shape))}).")
        fitted[(step, capture)] = t.reshape(t.shape[0], *shape)
    for step, capture in dump.stats:
        shape = expected_shape(model, capture, dump.first_position(step) + dump.rows(step))
        if isinstance(shape, str):
            raise DumpError(f"the dump's '{step}/{capture}:stats' does not fit {model.gguf.path.name}: {shape}.")
    return fitted


def expected_shape(model: Model, capture: str, n_keys: int) -> tuple[int, ...] | str:
    """Our shape of a point after its rows, or why the model has no such point."""
    c = model.config
    layer, point = split_capture(capture)
    if layer is not None and layer >= c.n_layers:
        return f"the model has layers 0..{c.n_layers - 1}"
    if point in ("attn.q_normed", "attn.k_normed") and not c.qk_norm:
        return f"{c.arch} has no QK-norm"
    if point.startswith("moe.") and not (c.is_moe_layer(layer) if layer is not None else c.is_moe):
        return f"{c.arch} is not a mixture of experts" if not c.is_moe else f"its layer {layer} is a dense FFN"
    mla_only = point in ("attn.q_pe", "attn.kv_latent", "attn.k_pe")
    if c.is_mla and point in ("attn.k", "attn.v", "attn.q_normed", "attn.k_normed", "attn.q_rope", "attn.k_rope"):
        return "its latent attention has no per-head K and V (see attn.kv_latent, attn.k_pe and attn.q_pe)"
    if point == "attn.sink_share" and not c.attn_sinks:
        return f"{c.arch} has no attention sinks"
    if mla_only and not c.is_mla:
        return f"{c.arch} has no latent attention"
    if point == "moe.shared_gate" and not c.shared_gate:
        return f"{c.arch} has no gated shared expert"
    return point_shape(c, point, n_keys)


def run(model: Model, dump: Dump, keep: set[str], theirs: dict[tuple[int, str], torch.Tensor] | None,
        breaks: frozenset[str] = frozenset()) -> dict[tuple[int, str], torch.Tensor]:
    """Our tensors at `keep` for every step of the dump: clean (theirs None) or teacher-forced by theirs."""
    cache = model.new_cache(len(dump.tokens))
    out: dict[tuple[int, str], torch.Tensor] = {}
    for step in range(dump.n_steps):
        forced = None if theirs is None else {c: t for (s, c), t in theirs.items() if s == step and _forceable(t, model)}
        probe = _Run(keep, forced)
        ids = torch.tensor(dump.step_tokens(step), device=model.device)
        model.forward(ids, dump.first_position(step), cache, probe, breaks=breaks)
        out |= {(step, name): t.cpu() for name, t in probe.ours.items()}
    return out


def _forceable(t: torch.Tensor, model: Model) -> bool:
    """Whether the forward can go on with their tensor: expert ids outside the model's experts are measured,
    not run (they would index past the stack)."""
    return t.is_floating_point() or not t.numel() or (int(t.min()) >= 0 and int(t.max()) < model.config.n_experts)


def _ids_behind(key: tuple[int, str], theirs: dict, run: dict, model: Model) -> tuple:
    """For a topk_weights point: (their expert ids, the ids our weights in `run` belong to — theirs where the
    forward went on with them, else the ones our router chose)."""
    ids_key = (key[0], key[1].replace("topk_weights", "topk_ids"))
    their_ids, our_ids = theirs.get(ids_key), run.get(ids_key)
    if their_ids is not None and _forceable(their_ids, model):
        our_ids = their_ids
    return (their_ids if their_ids is not None else our_ids), our_ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖a‖ (a: theirs) in float64; inf where theirs is not finite."""
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    norm = float(a.norm())
    diff = float((a - b).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _dense_routing(ids: torch.Tensor, weights: torch.Tensor | None, n_experts: int) -> torch.Tensor:
    """[rows, n_experts]: each row's weight per expert (1 per chosen expert without weights)."""
    dense = torch.zeros(ids.shape[0], n_experts, dtype=torch.float64)
    values = torch.ones_like(ids, dtype=torch.float64) if weights is None else weights.double()
    return dense.scatter_add_(1, ids.clamp(0, n_experts - 1), values)


def _errors(point: str, theirs: torch.Tensor, ours: torch.Tensor, their_ids: torch.Tensor | None,
            our_ids: torch.Tensor | None, n_experts: int, n_heads: int) -> tuple[float, float | None, float | None, int | None, int]:
    """(error, cosine, max |Δ|, head, row within theirs) of one point."""
    r = theirs.shape[0]
    ours = ours[-r:]
    if point == "moe.topk_ids":
        a, b = _dense_routing(theirs, None, n_experts) > 0, _dense_routing(ours, None, n_experts) > 0
        differs = (a != b).any(-1)
        return float(differs.double().mean()), None, None, None, int(differs.double().argmax())
    if point == "moe.topk_weights":
        a = _dense_routing(their_ids[-r:], theirs, n_experts)
        b = _dense_routing(our_ids[-r:], ours, n_experts)
        theirs, ours = a, b
    elif theirs.shape != ours.shape:
        return math.inf, None, None, None, 0
    a, b = theirs.double(), ours.double()
    d = (a - b).nan_to_num(nan=math.inf)
    rows = d.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)
    row = int(rows.nan_to_num(nan=math.inf).argmax())
    head = None
    if point in HEAD_POINTS:
        per_head = d[row].reshape(d.shape[1] if d.dim() > 2 else n_heads, -1).norm(dim=1)  # attn.out is flat
        head = int(per_head.nan_to_num(nan=math.inf).argmax())
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) if bool(torch.isfinite(a).all()) else None
    return _rel(theirs, ours), cos, float(d.abs().max()), head, row


def _stats_error(stats: torch.Tensor, ours: torch.Tensor) -> float:
    """Their [count, sum, sum of squares] against the same statistics of our last rows: the larger relative
    difference of the mean and of the RMS (each relative to our RMS), over the statistics they give."""
    count, total, squares = (float(v) for v in stats)
    x = ours.double().flatten()
    n = int(count) if not math.isnan(count) and 0 < count <= x.numel() else x.numel()
    x = x[-n:]
    rms = float(x.pow(2).mean().sqrt()) or 1e-30
    errs = []
    if not math.isnan(total):
        errs.append(abs(total / n - float(x.mean())) / rms)
    if not math.isnan(squares):
        errs.append(abs(math.sqrt(max(squares, 0.0) / n) - rms) / rms)
    return max(errs) if errs else math.nan


def applicable_breaks(model: Model, dump: Dump) -> list[str]:
    """The break switches that change something on this model and this run (cache-off-by-one needs a step
    after the prompt)."""
    return [b for b in breaks_that_apply(model.config) if b != "cache-off-by-one" or dump.n_steps >= 2]


def compare(model: Model, dump: Dump, suspects: bool = True) -> Comparison:
    """Every point of the dump against our engine (run on the model as loaded: load it dequantized in float32
    for the exact path), the first divergence and, with `suspects`, the breaks that explain it."""
    theirs = fit(model, dump)
    keep = {c for _, c in dump.keys()}
    if any(c.endswith("moe.topk_weights") for c in keep):  # weights are compared by expert: their ids too
        keep |= {c.replace("topk_weights", "topk_ids") for c in keep if c.endswith("topk_weights")}
    clean = run(model, dump, keep, None)
    forced = run(model, dump, keep, theirs)

    sizes = (model.config.n_experts, model.config.n_heads)
    points = []
    for step, capture in dump.keys():
        layer, point = split_capture(capture)
        key = (step, capture)
        if key in dump.stats:
            points.append(Point(step, capture, layer, kind_of(point, model.config), None, _stats_error(dump.stats[key], clean[key])))
            continue
        ids_key = (step, capture.replace("topk_weights", "topk_ids"))
        their_ids = theirs.get(ids_key, clean.get(ids_key))
        e2e, cos, max_abs, _, _ = _errors(point, theirs[key], clean[key], their_ids, clean.get(ids_key), *sizes)
        local, _, _, head, row = _errors(point, theirs[key], forced[key], *_ids_behind(key, theirs, forced, model), *sizes)
        first_row = dump.first_position(step) + dump.rows(step) - theirs[key].shape[0]
        points.append(Point(step, capture, layer, kind_of(point, model.config), local, e2e, cos, max_abs, head, first_row + row))

    roundoff = unit_roundoff(dump)
    thresholds = calibrate(points, roundoff)
    _mark(points, thresholds)
    if roundoff > ROUNDOFF[torch.float32]:
        _raise_to_rounding(model, dump, points, theirs, clean, keep)
    first = next((p for p in points if p.stands_out), None)
    result = Comparison(points, first, [], thresholds, dump.engine, {"": excess(points)})
    if suspects and first is not None:
        for name in applicable_breaks(model, dump):
            broken = run(model, dump, keep, theirs, frozenset({name}))
            trial = [_local_only(p, theirs, broken, model) for p in points]
            result.excess[name] = excess(trial)
        clean_excess = result.excess[""]
        ranked = sorted((e, list(BREAKS).index(n), n) for n, e in result.excess.items() if n and e <= 0.5 * clean_excess)
        result.suspects = [n for _, _, n in ranked]
    return result


def _raise_to_rounding(model, dump, points, theirs, clean, keep) -> None:
    """A dump in float16 or bfloat16: at every point, the local error that rounding our own tensors to the dump's
    dtypes alone makes there (our clean run, rounded, teacher-forcing our engine); a point's threshold is at least
    ROUNDING_FACTOR × that. A softmax turns its inputs' absolute rounding into relative error in its outputs,
    so this matters most for attention patterns and routing weights."""
    rounded = {k: clean[k][-t.shape[0]:].to(t.dtype) if t.is_floating_point() else clean[k][-t.shape[0]:]
               for k, t in theirs.items()}
    again = run(model, dump, keep, rounded)
    for p in points:
        if p.local_error is None or p.capture.endswith("topk_ids"):
            continue
        noise = _local_only(p, rounded, again, model).local_error
        if math.isfinite(noise) and ROUNDING_FACTOR * noise > p.threshold:
            p.threshold = ROUNDING_FACTOR * noise
            p.stands_out = not p.local_error <= p.threshold


def _local_only(p: Point, theirs, ours, model: Model) -> Point:
    """p's local error against another teacher-forced run `ours` (with a break; of rounded tensors). A point the
    run does not compute (a break that drops the shared expert has no gate) keeps its error: nothing explained."""
    key = (p.step, p.capture)
    if p.local_error is None or key not in ours:
        return p
    point = split_capture(p.capture)[1]
    sizes = (model.config.n_experts, model.config.n_heads)
    local = _errors(point, theirs[key], ours[key], *_ids_behind(key, theirs, ours, model), *sizes)[0]
    return Point(p.step, p.capture, p.layer, p.kind, local, p.end_to_end_error, threshold=p.threshold,
                 stands_out=local > p.threshold)


def unit_roundoff(dump: Dump) -> float:
    """The rounding of the dump's least precise float values (2^-24 float32, 2^-11 float16, 2^-8 bfloat16)."""
    dtypes = {t.dtype for t in dump.tensors.values() if t.is_floating_point()}
    return max((ROUNDOFF[d] for d in dtypes), default=ROUNDOFF[torch.float32])


def calibrate(points: list[Point], roundoff: float = ROUNDOFF[torch.float32]) -> dict[str, float]:
    """Each kind's threshold: THRESHOLD_FACTOR × its median local error in this dump, within LIMITS, both limits
    raised to what rounding to the dump's precision alone does (ROUNDOFF_FLOOR × its unit roundoff)."""
    out = {}
    for kind, (floor, ceiling) in LIMITS.items():
        floor = max(floor, ROUNDOFF_FLOOR[kind] * roundoff)
        ceiling = max(ceiling, 2 * floor)
        errs = [p.local_error for p in points if p.kind == kind and p.local_error is not None and math.isfinite(p.local_error)]
        if kind == "routing":  # ids are right or wrong: any row that differs stands out
            errs = [p.local_error for p in points if p.capture.endswith("topk_weights") and p.local_error is not None
                    and math.isfinite(p.local_error)]
        median = statistics.median(errs) if errs else 0.0
        out[kind] = min(ceiling, max(floor, THRESHOLD_FACTOR * median))
    return out


def _mark(points: list[Point], thresholds: dict[str, float]) -> None:
    for p in points:
        if p.local_error is None:  # statistics only: the end-to-end error is all there is
            p.threshold = STATS_THRESHOLD
            p.stands_out = p.end_to_end_error > STATS_THRESHOLD
        elif p.capture.endswith("topk_ids"):
            p.threshold = 0.0
            p.stands_out = p.local_error > 0
        else:
            p.threshold = thresholds[p.kind]
            p.stands_out = not p.local_error <= p.threshold  # NaN stands out


def excess(points: list[Point]) -> float:
    """Σ log10(local error / threshold) over the points past their threshold (ids: 1 + 3 × the share of rows)."""
    total = 0.0
    for p in points:
        if p.local_error is None or not p.stands_out:
            continue
        if p.capture.endswith("topk_ids"):
            total += 1 + 3 * p.local_error
        else:
            total += min(10.0, math.log10(p.local_error / p.threshold)) if math.isfinite(p.local_error) else 10.0
    return total
