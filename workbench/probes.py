"""Capture points and the cheap reductions taken at them.

The forward pass calls a probe with a TransformerLens-style name and the tensor there. `StepProbe` reduces
each tensor on the device as it arrives (RMS, max |x|, NaN/Inf counts, top-k ids and weights, router
entropy), keeps the small results on the device, and moves them all to the host in one transfer when the step
is over (`collect`). A forward without a probe does none of this.

Which token rows are reduced: the rows that are new at this step. The cached path computes exactly those;
the uncached path recomputes the whole sequence, so `rows` selects its last row (all prompt rows at step 0),
which makes the two paths' records comparable row for row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_NAME = re.compile(r"blocks\.(\d+)\.(attn\.(?:q|k)(?:_normed)?|moe\.(?:router_logits|topk_ids|topk_weights)|resid_post)$")


@dataclass
class StepRecord:
    """What one forward of one path recorded, on the host, as plain Python values."""

    qk: list[tuple[int, int, str, str, float, float]] = field(default_factory=list)  # layer, head, tensor, stage, rms, max_abs
    routing: list[tuple[int, int, int, int, float, float]] = field(default_factory=list)  # row, layer, rank, expert, weight, entropy (nats)
    layers: list[tuple[int, float, float, int, int]] = field(default_factory=list)  # layer, rms, max_abs, nan, inf


class StepProbe:
    """Callable as the model's probe for one forward; `collect()` returns a StepRecord.

    During the forward it only keeps references to the new rows at each capture point (no copies: the forward
    never writes into them afterwards). `collect` then stacks each kind of tensor across layers and reduces it
    in a handful of batched device ops, whatever the number of layers, and makes one host transfer.
    """

    def __init__(self, rows: slice) -> None:
        self.rows = rows
        self._seen: dict[str, dict[int, torch.Tensor]] = {}  # point → layer → tensor rows

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        match = _NAME.match(name)
        if match is not None:
            self._seen.setdefault(match.group(2), {})[int(match.group(1))] = tensor[self.rows]

    def _stacked(self, point: str) -> tuple[list[int], torch.Tensor] | None:
        seen = self._seen.get(point)
        if not seen:
            return None
        layers = sorted(seen)
        return layers, torch.stack([seen[i] for i in layers])

    def collect(self, first_row: int = 0) -> StepRecord:
        """Batched reductions on the device, then one device → host transfer of all of them."""
        parts: list[torch.Tensor] = []
        plan: list[tuple] = []
        for point in ("attn.q", "attn.k", "attn.q_normed", "attn.k_normed"):
            got = self._stacked(point)
            if got is None:
                continue
            layers, x = got  # [layers, T, heads, head_dim]
            xf = x.float()
            parts += [xf.pow(2).mean(dim=(1, 3)).sqrt().flatten(), xf.abs().amax(dim=(1, 3)).flatten()]
            plan.append(("qk", layers, point[5], "post" if point.endswith("_normed") else "pre", x.shape[2]))
        got = self._stacked("resid_post")
        if got is not None:
            layers, x = got  # [layers, T, hidden]
            xf = x.float().flatten(1)
            nan = torch.isnan(xf)
            inf = torch.isinf(xf)
            parts += [xf.pow(2).mean(1).sqrt(), torch.nan_to_num(xf.abs(), nan=0.0).amax(1) if xf.shape[1] else xf.new_zeros(len(layers)),
                      nan.sum(1).float(), inf.sum(1).float()]
            plan.append(("layers", layers))
        got = self._stacked("moe.topk_ids")
        if got is not None:
            layers, ids = got  # [layers, T, k]
            _, weights = self._stacked("moe.topk_weights")
            _, logits = self._stacked("moe.router_logits")  # [layers, T, experts]
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [layers, T], nats
            parts += [ids.float().flatten(), weights.float().flatten(), entropy.flatten()]
            plan.append(("routing", layers, ids.shape[1], ids.shape[2]))
        record = StepRecord()
        if not parts:
            return record
        flat = torch.cat(parts).cpu().tolist()
        i = 0
        for item in plan:
            if item[0] == "qk":
                _, layers, tensor, stage, heads = item
                n = len(layers) * heads
                rms, max_abs = flat[i : i + n], flat[i + n : i + 2 * n]
                for li, layer in enumerate(layers):
                    for h in range(heads):
                        record.qk.append((layer, h, tensor, stage, rms[li * heads + h], max_abs[li * heads + h]))
                i += 2 * n
            elif item[0] == "layers":
                n = len(item[1])
                for li, layer in enumerate(item[1]):
                    record.layers.append((layer, flat[i + li], flat[i + n + li], int(flat[i + 2 * n + li]), int(flat[i + 3 * n + li])))
                i += 4 * n
            else:
                _, layers, n_rows, k = item
                n = len(layers) * n_rows * k
                ids, weights = flat[i : i + n], flat[i + n : i + 2 * n]
                entropy = flat[i + 2 * n : i + 2 * n + len(layers) * n_rows]
                for li, layer in enumerate(layers):
                    for r in range(n_rows):
                        for rank in range(k):
                            j = (li * n_rows + r) * k + rank
                            record.routing.append((first_row + r, layer, rank, int(ids[j]), weights[j], entropy[li * n_rows + r]))
                i += 2 * n + len(layers) * n_rows
        return record
