"""A preallocated key/value cache that grows by doubling, so decode steps allocate nothing."""

from __future__ import annotations

import torch

from dsmoe.checkpoint.config import DeepseekConfig


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together.

    ``length`` is the number of positions already stored; ``truncate`` rolls back to a prefix
    (a chat that rewinds, or the choices of one question that share their context).
    """

    def __init__(self, config: DeepseekConfig, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.max_positions = config.max_position_embeddings
        self.batch_size = batch_size
        self.length = 0
        shape = (batch_size, config.num_key_value_heads, max(capacity, 1), config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions, doubling so growth is amortised."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[:2] + (new_capacity,) + old.shape[3:])
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown

    def update(self, layer_idx: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values; return all of them up to the step's end."""
        end = start_pos + k.shape[2]
        self.reserve(end)
        self.keys[layer_idx][:, :, start_pos:end] = k
        self.values[layer_idx][:, :, start_pos:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def layer_tensors(self, layer_idx: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for positions up to ``end``, and the layer's whole key and value buffers (for kernels that write in place)."""
        self.reserve(end)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on."""
        self.length = min(self.length, length)

    def expand(self, batch_size: int) -> "KVCache":
        """A new cache holding this one's single sequence repeated ``batch_size`` times."""
        if self.batch_size != 1:
            raise ValueError("only a cache of one sequence can be expanded")
        clone = object.__new__(KVCache)
        clone.max_positions = self.max_positions
        clone.batch_size = batch_size
        clone.length = self.length
        clone.keys = [k[:, :, : self.length].expand(batch_size, -1, -1, -1).contiguous() for k in self.keys]
        clone.values = [v[:, :, : self.length].expand(batch_size, -1, -1, -1).contiguous() for v in self.values]
        return clone

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
