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
    """Callable as the model's probe for one forward; `collect()` returns a StepRecord."""

    def __init__(self, rows: slice) -> None:
        self.rows = rows
        self._keys: list[tuple] = []  # what each reduced tensor means, in order
        self._values: list[torch.Tensor] = []  # flat float32 tensors on the device
        self._pending_router: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        match = _NAME.match(name)
        if match is None:
            return
        layer, point = int(match.group(1)), match.group(2)
        x = tensor[self.rows]
        if point.startswith("attn."):
            # x: [T, heads, head_dim] → per head over tokens and dims
            xf = x.float()
            rms = xf.pow(2).mean(dim=(0, 2)).sqrt()
            max_abs = xf.abs().amax(dim=(0, 2))
            base = point.removeprefix("attn.")
            self._keys.append(("qk", layer, base[0], "post" if base.endswith("_normed") else "pre", x.shape[1]))
            self._values.append(torch.cat((rms, max_abs)))
        elif point == "resid_post":
            xf = x.float()
            finite = torch.isfinite(xf)
            stats = torch.stack((
                xf.pow(2).mean().sqrt(),
                xf.abs().amax() if xf.numel() else xf.new_zeros(()),
                torch.isnan(xf).sum().float(),
                (~finite & ~torch.isnan(xf)).sum().float(),
            ))
            self._keys.append(("layer", layer))
            self._values.append(stats)
        else:
            parts = self._pending_router.setdefault(layer, {})
            parts[point.removeprefix("moe.")] = x
            if len(parts) == 3:
                del self._pending_router[layer]
                probs = torch.softmax(parts["router_logits"].float(), dim=-1)
                entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [T]
                ids, weights = parts["topk_ids"], parts["topk_weights"]  # [T, k]
                self._keys.append(("routing", layer, ids.shape[0], ids.shape[1]))
                self._values.append(torch.cat((ids.float().flatten(), weights.float().flatten(), entropy)))

    def collect(self, first_row: int = 0) -> StepRecord:
        """One device → host transfer of everything reduced in this forward."""
        record = StepRecord()
        if not self._values:
            return record
        flat = torch.cat(self._values).cpu().tolist()
        i = 0
        for key in self._keys:
            if key[0] == "qk":
                _, layer, tensor, stage, heads = key
                for h in range(heads):
                    record.qk.append((layer, h, tensor, stage, flat[i + h], flat[i + heads + h]))
                i += 2 * heads
            elif key[0] == "layer":
                record.layers.append((key[1], flat[i], flat[i + 1], int(flat[i + 2]), int(flat[i + 3])))
                i += 4
            else:
                _, layer, n_rows, k = key
                ids, weights, entropy = flat[i : i + n_rows * k], flat[i + n_rows * k : i + 2 * n_rows * k], flat[i + 2 * n_rows * k : i + 2 * n_rows * k + n_rows]
                for r in range(n_rows):
                    for rank in range(k):
                        record.routing.append((first_row + r, layer, rank, int(ids[r * k + rank]), weights[r * k + rank], entropy[r]))
                i += 2 * n_rows * k + n_rows
        return record
