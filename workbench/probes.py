"""Capture points and the cheap reductions taken at them.

The forward pass calls a probe with a TransformerLens-style name and the tensor there. `StepProbe` reduces
each tensor on the device as it arrives (RMS, max |x|, NaN/Inf counts, top-k ids and weights, router
entropy), keeps the small results on the device, and moves them all to the host in one transfer when the step
is over (`collect`). A forward without a probe does none of this.

Which token rows are reduced: the rows that are new at this step. The cached path computes exactly those;
the uncached path recomputes the whole sequence, so `rows` selects its last row (all prompt rows at step 0),
which makes the two paths' records comparable row for row.

Two teaching frames are taken at the same points, each on request because each costs the forward work of its
own, and only for the newest token (the last prompt row at step 0):
- attention: `attn.pattern`, the softmax probabilities over every key 0..its position, per layer and head. The
  forward computes the pattern only for a probe that wants it (a second attention per layer).
- lens (the logit lens): each layer's `resid_post` read through the final norm and the head, all layers in one
  matmul (one vocabulary-sized product per layer): its top-1 token and probability, its entropy, and
  KL(final ‖ layer), in nats, where `final` is the forward's own logits, the distribution the token is drawn
  from: the extra nats it costs to code the model's answer with the layer's guess. 0 at the last layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from workbench.errors import ResourceError
from workbench.frames import row_type
from workbench.model import Model

QK_POINTS = ("attn.q", "attn.k", "attn.q_normed", "attn.k_normed")
REDUCED_POINTS = frozenset({*QK_POINTS, "resid_post", "moe.router_logits", "moe.topk_ids", "moe.topk_weights",
                            "moe.shared_gate"})


# Rows of the frames a probe fills (their columns after step and path, declared in frames.SCHEMAS).
QKRow = row_type("qk")  # layer, head, tensor (q|k), stage (pre|post the per-head norm), rms, max_abs
RoutingRow = row_type("routing")  # position, layer, rank, expert, weight, router_entropy (nats)
LayerRow = row_type("layers")  # layer, resid_rms, resid_max_abs, nan, inf
SharedRow = row_type("shared")  # position, layer, gate
LensRow = row_type("lens")  # layer, token_id, prob, entropy (nats), kl_to_final (KL(final ‖ layer), nats)


def unembed(model: Model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What Model.compute does after the last block, as a function of residual rows [n, hidden] → logits
    [n, vocab] float32: the final RMSNorm, then the output head (the logit lens reads every layer through it)."""
    return lambda x: model.unembed(model.final_norm(x))


@dataclass
class StepRecord:
    """What one forward of one path recorded, on the host, as plain Python values: rows named like the
    trace frames' columns (trace.SCHEMAS; the session adds the step and the path)."""

    qk: list[QKRow] = field(default_factory=list)
    routing: list[RoutingRow] = field(default_factory=list)
    shared: list[SharedRow] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    # The attention frame's columns (layer, head, key, weight), each a list: layers × heads × keys rows a step,
    # too many to build one Python tuple at a time (trace.Recorder.extend_columns zips them in C).
    attention: dict[str, list] = field(default_factory=dict)
    lens: list[LensRow] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)  # next-token candidates, most probable first
    top_probs: list[float] = field(default_factory=list)


class StepProbe:
    """Callable as the model's probe for one forward; `collect()` returns a StepRecord.

    During the forward it only keeps references to the new rows at each capture point (no copies: the forward
    never writes into them afterwards). `collect` then stacks each kind of tensor across layers and reduces it
    in a handful of batched device ops, whatever the number of layers, and makes one host transfer.
    """

    def __init__(self, rows: slice, top_k: int = 5, statistics: bool = True, attention: bool = False,
                 lens: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """`statistics`: the qk, routing and layers rows and the candidates; `attention`: the newest token's
        pattern; `lens`: the head (`unembed(model)`) to read each layer's newest residual through."""
        self.rows = rows
        self.top_k = top_k
        self.statistics, self.attention, self.lens = statistics, attention, lens
        self._points = {
            *(REDUCED_POINTS if statistics else ()), *(("attn.pattern",) if attention else ()),
            *(("resid_post",) if lens is not None else ()),
        }
        self._seen: dict[str, dict[int, torch.Tensor]] = {}  # point → layer → tensor rows
        self._logits: torch.Tensor | None = None

    def wants(self, name: str) -> bool:
        """The points taken here (the forward computes a costly point only for a probe that wants it)."""
        return name.startswith("blocks.") and name.split(".", 2)[2] in self._points

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self.wants(name):
            _, layer, point = name.split(".", 2)  # "blocks.{i}.{point}"
            # The pattern [T, heads, keys] is T² at a prefill: keep a copy of its newest row, not a view of it all.
            rows = tensor[-1].clone() if point == "attn.pattern" else tensor[self.rows]
            self._seen.setdefault(point, {})[int(layer)] = rows

    def candidates(self, logits: torch.Tensor) -> None:
        """The forward's logits [vocab]: their top-k next-token candidates are reported (in the same transfer),
        and they are the final distribution the lens measures each layer against."""
        self._logits = logits

    def _stacked(self, point: str) -> tuple[list[int], torch.Tensor] | None:
        seen = self._seen.get(point)
        if not seen:
            return None
        layers = sorted(seen)
        return layers, torch.stack([seen[i] for i in layers])

    def collect(self, first_row: int = 0) -> StepRecord:
        """Batched reductions on the device, each its own tensor, then one device → host transfer of all of
        them; `first_row` is the sequence position of the first reduced row."""
        reduced: dict[str, torch.Tensor] = {}
        qk = [(point, got) for point in QK_POINTS if (got := self._stacked(point)) is not None]
        if qk:
            # All four points side by side along the head axis: one reduction for every layer and head.
            qk_layers = qk[0][1][0]
            x = torch.cat([x for _, (_, x) in qk], dim=2).float()  # [layers, T, Σ heads, head_dim]
            reduced["qk_rms"] = x.pow(2).mean(dim=(1, 3)).sqrt()  # [layers, Σ heads]
            reduced["qk_max_abs"] = x.abs().amax(dim=(1, 3))
        resid = self._stacked("resid_post") if self.statistics else None  # the lens takes resid_post too
        if resid is not None:
            resid_layers, x = resid
            x = x.float().flatten(1)  # [layers, T·hidden]
            reduced["resid_rms"] = x.pow(2).mean(1).sqrt()  # [layers]
            reduced["resid_max_abs"] = torch.nan_to_num(x.abs(), nan=0.0).amax(1) if x.shape[1] else x.new_zeros(len(resid_layers))
            reduced["nan"] = torch.isnan(x).sum(1)
            reduced["inf"] = torch.isinf(x).sum(1)
        topk = self._stacked("moe.topk_ids")
        if topk is not None:
            moe_layers, reduced["expert"] = topk  # [layers, T, k]
            reduced["weight"] = self._stacked("moe.topk_weights")[1]  # [layers, T, k]
            probs = torch.softmax(self._stacked("moe.router_logits")[1].float(), dim=-1)  # [layers, T, experts]
            reduced["router_entropy"] = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [layers, T], nats
        shared = self._stacked("moe.shared_gate")
        if shared is not None:
            shared_layers, reduced["shared_gate"] = shared[0], shared[1][..., 0]  # [layers, T]
        if self._logits is not None and self.statistics:
            reduced["top_probs"], reduced["top_ids"] = torch.softmax(
                torch.nan_to_num(self._logits.float(), nan=float("-inf")), -1).topk(self.top_k)
        pattern = self._stacked("attn.pattern") if self.attention else None
        if pattern is not None:
            attn_layers, newest = pattern  # [layers, heads, keys]: already the newest row
            reduced["attention"] = newest.flatten()
        lens = self._seen.get("resid_post") if self.lens is not None else None
        if lens:
            lens_layers = sorted(lens)
            newest_resid = torch.stack([lens[i][-1] for i in lens_layers])  # [layers, hidden]
            reduced |= logit_lens(self.lens(newest_resid), self._logits)  # all layers in one matmul
        host = _to_host(reduced)

        record = StepRecord()
        if qk:
            heads = [(point[5], "post" if point.endswith("_normed") else "pre", x.shape[2]) for point, (_, x) in qk]
            for layer, rms, max_abs in zip(qk_layers, host["qk_rms"], host["qk_max_abs"]):
                j = 0
                for tensor, stage, n_heads in heads:
                    for head in range(n_heads):
                        record.qk.append(QKRow(layer=layer, head=head, tensor=tensor, stage=stage, rms=rms[j], max_abs=max_abs[j]))
                        j += 1
        if resid is not None:
            for values in zip(resid_layers, host["resid_rms"], host["resid_max_abs"], host["nan"], host["inf"]):
                layer, rms, max_abs, nan, inf = values
                record.layers.append(LayerRow(layer=layer, resid_rms=rms, resid_max_abs=max_abs, nan=int(nan), inf=int(inf)))
        if topk is not None:
            for layer, experts, weights, entropies in zip(moe_layers, host["expert"], host["weight"], host["router_entropy"]):
                for r, entropy in enumerate(entropies):
                    for rank, (expert, weight) in enumerate(zip(experts[r], weights[r])):
                        record.routing.append(RoutingRow(position=first_row + r, layer=layer, rank=rank, expert=int(expert),
                                                         weight=weight, router_entropy=entropy))
        if shared is not None:
            for layer, gates in zip(shared_layers, host["shared_gate"]):
                record.shared.extend(SharedRow(position=first_row + r, layer=layer, gate=g) for r, g in enumerate(gates))
        if "top_ids" in host:
            record.top_probs, record.top_ids = host["top_probs"], [int(t) for t in host["top_ids"]]
        if pattern is not None:
            n_layers, n_heads, n_keys = newest.shape
            record.attention = {  # in the order of newest.flatten()
                "layer": torch.tensor(attn_layers).repeat_interleave(n_heads * n_keys).tolist(),
                "head": torch.arange(n_heads).repeat_interleave(n_keys).repeat(n_layers).tolist(),
                "key": torch.arange(n_keys).repeat(n_layers * n_heads).tolist(),
                "weight": host["attention"],
            }
        if lens:
            for layer, token, prob, entropy, kl in zip(lens_layers, host["lens_token"], host["lens_prob"],
                                                       host["lens_entropy"], host["lens_kl"]):
                record.lens.append(LensRow(layer=layer, token_id=int(token), prob=prob, entropy=entropy, kl_to_final=kl))
        return record


def logit_lens(logits: torch.Tensor, final: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per row of logits [layers, vocab]: the top-1 token and its probability, the entropy and KL(final ‖ row),
    in nats (`final` [vocab]: the forward's logits; None: the last row stands for them). A session records
    only steps whose logits are finite; a non-finite row here gives NaN, not a guess."""
    logp = torch.log_softmax(logits, dim=-1)  # [layers, vocab]
    top_logp, top = logp.max(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    final_logp = logp[-1] if final is None else torch.log_softmax(final.float(), dim=-1)
    kl = (final_logp.exp() * (final_logp - logp)).sum(-1)
    return {"lens_token": top, "lens_prob": top_logp.exp(), "lens_entropy": entropy, "lens_kl": kl}


def _to_host(reduced: dict[str, torch.Tensor]) -> dict[str, list]:
    """The tensors as nested Python lists of their shapes, moved in one transfer (as float32: the ids here are
    below 2**24, so they are exact)."""
    if not reduced:
        return {}
    flat = torch.cat([t.float().flatten() for t in reduced.values()]).cpu()
    parts = flat.split([t.numel() for t in reduced.values()])
    return {name: part.view(t.shape).tolist() for (name, t), part in zip(reduced.items(), parts)}


class Capture:
    """A probe that keeps whole tensors by capture point name, as host copies (floats as float32, ids as int64),
    up to `max_bytes` in all: what dumps and comparisons with other engines read, where StepProbe keeps a few
    numbers. `names`: the points to keep, as fnmatch patterns (`blocks.3.*`, `*.attn.pattern`); None keeps every
    point. Past the bound it raises ResourceError rather than fill the memory."""

    def __init__(self, names: Iterable[str] | None = None, max_bytes: int = 1 << 30) -> None:
        self.names, self.max_bytes = (list(names) if names is not None else None), max_bytes
        self.tensors: dict[str, torch.Tensor] = {}  # in the order the forward reached them
        self.bytes = 0

    def wants(self, name: str) -> bool:
        return self.names is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if not self.wants(name):
            return
        dtype = torch.float32 if tensor.is_floating_point() else torch.int64
        n_bytes = tensor.numel() * dtype.itemsize
        if self.bytes + n_bytes > self.max_bytes:
            raise ResourceError(f"keeping {name} ({n_bytes / 2**20:.1f} MiB) would pass the capture bound of "
                                f"{self.max_bytes / 2**20:.0f} MiB; capture fewer points or fewer tokens.")
        self.tensors[name] = tensor.detach().to("cpu", dtype=dtype, copy=True)
        self.bytes += n_bytes
