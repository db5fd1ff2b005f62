"""KVCache: per layer, keys and values preallocated for the whole context and written by position.

Each layer holds K and V as [n_kv_heads, capacity, head_dim]: one slice per KV head (GQA), so a query head
h reads KV head h // (n_heads / n_kv_heads) with no copy. The cache knows how much of it is filled per layer
and what that costs in bytes, which the probes report step by step.
"""

from __future__ import annotations

import torch

from workbench.errors import InputError
from workbench.frames import row_type


def context_full(position: int, capacity: int) -> InputError:
    """The one sentence for a position past the end of the context (the cache, a static step, a session)."""
    return InputError(f"the context is full: position {position} does not fit a context of {capacity} positions; "
                      "reset the session to go on.")


LayerStats = row_type("kv")  # one layer's fill and size: layer, length, k_bytes, v_bytes, capacity_bytes


class KVCache:
    """With `values_in_keys` (MLA) each layer holds only keys [1, capacity, head_dim], one row per position (the
    latent, then the RoPE key), and the values are the first `values_in_keys` dims of those rows, a view: what
    llama.cpp's MLA cache stores, and the bytes the KV panel reports (V costs nothing of its own)."""

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device,
        values_in_keys: int | None = None,
    ) -> None:
        shape = (n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.shared_values = values_in_keys is not None
        self.values = ([k[..., :values_in_keys] for k in self.keys] if self.shared_values
                       else [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)])
        self.capacity = capacity
        self.lengths = [0] * n_layers
        self.positions = torch.arange(capacity, device=device)  # key positions, for static-shape masks

    @property
    def length(self) -> int:
        """Positions filled in every layer (the last layer is written last)."""
        return self.lengths[-1]

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, n_kv_heads, head_dim] at `positions` ([T] long, on the device) and return the K, V a
        step attends over [n_kv_heads, keys, head_dim]: the first `n_keys` positions (which become the layer's
        length), or with n_keys None the whole cache, for the static step, whose shapes must not depend on the
        position (its caller keeps the lengths: mark_filled; nothing here reads the position back)."""
        if n_keys is not None and n_keys > self.capacity:
            raise context_full(n_keys - 1, self.capacity)
        self.keys[layer].index_copy_(1, positions, k.transpose(0, 1))
        if not self.shared_values:
            self.values[layer].index_copy_(1, positions, v.transpose(0, 1))
        if n_keys is None:
            return self.keys[layer], self.values[layer]
        self.lengths[layer] = n_keys
        return self.keys[layer][:, :n_keys], self.values[layer][:, :n_keys]

    def reserve(self, layer: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole K, V [n_kv_heads, capacity, head_dim], its length set to n_keys, for a caller that
        writes position n_keys − 1 itself (blocks.cpp's decode_step)."""
        if n_keys > self.capacity:
            raise context_full(n_keys - 1, self.capacity)
        self.lengths[layer] = n_keys
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, n_kv_heads, head_dim] at positions start..start+T; return the filled K, V views."""
        positions = torch.arange(start, start + k.shape[0], device=self.keys[layer].device)
        return self.update(layer, positions, k, v, start + k.shape[0])

    def mark_filled(self, length: int) -> None:
        if length > self.capacity:
            raise context_full(length - 1, self.capacity)
        self.lengths = [length] * len(self.lengths)

    def layer_bytes(self, layer: int) -> tuple[int, int]:
        """Bytes of K and of V holding real positions in this layer (V: 0 where it is a view of K)."""
        k, v = self.keys[layer], self.values[layer]
        k_bytes = self.lengths[layer] * k.shape[0] * k.shape[2] * k.element_size()
        v_bytes = 0 if self.shared_values else self.lengths[layer] * v.shape[0] * v.shape[2] * v.element_size()
        return k_bytes, v_bytes

    def layer_stats(self) -> list[LayerStats]:
        """Every layer's fill and size, in layer order."""
        stats = []
        for i, (keys, values) in enumerate(zip(self.keys, self.values)):
            k_bytes, v_bytes = self.layer_bytes(i)
            stats.append(LayerStats(layer=i, length=self.lengths[i], k_bytes=k_bytes, v_bytes=v_bytes,
                                    capacity_bytes=self._bytes(keys) + (0 if self.shared_values else self._bytes(values))))
        return stats

    @staticmethod
    def _bytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    @property
    def capacity_bytes(self) -> int:
        return sum(map(self._bytes, self.keys if self.shared_values else (*self.keys, *self.values)))

    @property
    def used_bytes(self) -> int:
        return sum(sum(self.layer_bytes(i)) for i in range(len(self.lengths)))
