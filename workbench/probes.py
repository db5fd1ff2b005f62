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

from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """What one forward of one path recorded, on the host, as plain Python values."""

    qk: list[tuple[int, int, str, str, float, float]] = field(default_factory=list)  # layer, head, tensor, stage, rms, max_abs
    routing: list[tuple[int, int, int, int, float, float]] = field(default_factory=list)  # row, layer, rank, expert, weight, entropy (nats)
    layers: list[tuple[int, float, float, int, int]] = field(default_factory=list)  # layer, rms, max_abs, nan, inf
    top_ids: list[int] = field(default_factory=list)  # next-token candidates, most probable first
    top_probs: list[float] = field(default_factory=list)


class StepProbe:
    """Callable as the model's probe for one forward; `collect()` returns a StepRecord.

    During the forward it only keeps references to the new rows at each capture point (no copies: the forward
    never writes into them afterwards). `collect` then stacks each kind of tensor across layers and reduces it
    in a handful of batched device ops, whatever the number of layers, and makes one host transfer.
    """

    def __init__(self, rows: slice, top_k: int = 5) -> None:
        self.rows = rows
        self.top_k = top_k
        self._seen: dict[str, dict[int, torch.Tensor]] = {}  # point → layer → tensor rows
        self._logits: torch.Tensor | None = None

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        _, layer, point = name.split(".", 2)  # "blocks.{i}.{point}": the forward's only capture points
        self._seen.setdefault(point, {})[int(layer)] = tensor[self.rows]

    def candidates(self, logits: torch.Tensor) -> None:
        """Also report the top-k next-token candidates of these logits [vocab] (in the same transfer)."""
        self._logits = logits

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
        qk_points = [(p, self._stacked(p)) for p in ("attn.q", "attn.k", "attn.q_normed", "attn.k_normed")]
        qk_points = [(p, got) for p, got in qk_points if got is not None]
        if qk_points:
            # All four points side by side along the head axis: one reduction for every layer and head.
            layers = qk_points[0][1][0]
            x = torch.cat([got[1] for _, got in qk_points], dim=2).float()  # [layers, T, Σ heads, head_dim]
            parts += [x.pow(2).mean(dim=(1, 3)).sqrt().flatten(), x.abs().amax(dim=(1, 3)).flatten()]
            heads = [(p[5], "post" if p.endswith("_normed") else "pre", got[1].shape[2]) for p, got in qk_points]
            plan.append(("qk", layers, heads))
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
        if self._logits is not None:
            probs, ids = torch.softmax(torch.nan_to_num(self._logits.float(), nan=float("-inf")), -1).topk(self.top_k)
            parts += [probs, ids.float()]
            plan.append(("top",))
        record = StepRecord()
        if not parts:
            return record
        flat = torch.cat(parts).cpu().tolist()
        i = 0
        for item in plan:
            if item[0] == "qk":
                _, layers, heads = item
                width = sum(n for _, _, n in heads)
                n = len(layers) * width
                rms, max_abs = flat[i : i + n], flat[i + n : i + 2 * n]
                for li, layer in enumerate(layers):
                    j = li * width
                    for tensor, stage, n_heads in heads:
                        for h in range(n_heads):
                            record.qk.append((layer, h, tensor, stage, rms[j], max_abs[j]))
                            j += 1
                i += 2 * n
            elif item[0] == "top":
                k = self.top_k
                record.top_probs, record.top_ids = flat[i : i + k], [int(t) for t in flat[i + k : i + 2 * k]]
                i += 2 * k
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
