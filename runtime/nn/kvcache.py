"""KV cache: per layer, a set of position-tagged slots; sliding-window layers use a ring buffer."""
from __future__ import annotations

import numpy as np


class LayerCache:
    """One layer's keys and values.

    A global layer has one slot per context position. A sliding-window layer keeps a ring of
    ``window + chunk`` slots: a prefill chunk writes all its keys before its queries read, so the
    ring must hold the window behind the chunk's first token as well as the chunk itself.
    """

    def __init__(self, n_kv_heads: int, head_dim: int, n_ctx: int, window: int = 0,
                 chunk: int = 512, dtype=np.float32, half_copy: bool = False):
        self.window = window
        self.capacity = n_ctx if window <= 0 else min(n_ctx, window + chunk)
        # keys transposed so a query's scores are contiguous runs over slots
        self.kt = np.zeros((n_kv_heads, head_dim, self.capacity), dtype=dtype)  # (KVH, D, S)
        self.v = np.zeros((self.capacity, n_kv_heads, head_dim), dtype=dtype)   # (S, KVH, D)
        # ``half_copy``: the same keys and values in float16 too, for decode attention (half
        # the bytes per step; llama.cpp's cache type), while prompts read the float32 ones
        # and stay exact, whatever part of them came from the cache
        self.kt16 = np.zeros(self.kt.shape, np.float16) if half_copy else None
        self.v16 = np.zeros(self.v.shape, np.float16) if half_copy else None
        self.slot_pos = np.full(self.capacity, -1, dtype=np.int64)             # (S,)
        self.n_slots = 0  # slots [0, n_slots) have been written at least once

    def store(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray):
        """Write k, v (n, KVH, D) for ``positions`` (n,)."""
        slots = self.claim(positions)
        kt = k.transpose(1, 2, 0)
        self.kt[:, :, slots] = kt
        self.v[slots] = v
        if self.kt16 is not None:
            self.kt16[:, :, slots] = kt
            self.v16[slots] = v

    def claim(self, positions: np.ndarray):
        """Tag the slots for ``positions`` (n,) and return them (an index array, or a slice
        when they are one run); the caller writes k and v there (a device cache keeps its
        arrays elsewhere)."""
        n = len(positions)
        if n > self.capacity:
            raise ValueError(f"chunk of {n} tokens exceeds the cache ring "
                             f"({self.capacity} slots)")
        first = int(positions[0]) % self.capacity
        if first + n <= self.capacity and int(positions[-1]) - int(positions[0]) == n - 1 \
                and (n < 3 or bool(np.all(np.diff(positions) == 1))):
            slots = slice(first, first + n)
            self.slot_pos[slots] = positions
            self.n_slots = max(self.n_slots, first + n)
            return slots
        slots = positions % self.capacity
        self.slot_pos[slots] = positions
        self.n_slots = max(self.n_slots, int(slots.max()) + 1)
        return slots

    def truncate(self, n: int) -> bool:
        """Forget positions >= n. False if positions the window still needs were overwritten."""
        self.slot_pos[self.slot_pos >= n] = -1
        if self.window > 0 and n > 0:
            need = max(0, n - self.window)
            held = np.count_nonzero((self.slot_pos >= need) & (self.slot_pos < n))
            if held < n - need:
                return False
        return True

    def clear(self):
        self.slot_pos[:] = -1
        self.n_slots = 0

    @property
    def nbytes(self) -> int:
        half = 0 if self.kt16 is None else self.kt16.nbytes + self.v16.nbytes
        return self.kt.nbytes + self.v.nbytes + half


class KVCache:
    """All layers' caches plus the number of positions already processed (``n_past``)."""

    def __init__(self, layers: list[LayerCache], n_ctx: int):
        self.layers = layers
        self.n_ctx = n_ctx
        self.n_past = 0
        self.tokens: list[int] = []  # ids at positions [0, n_past), for prefix reuse

    def truncate(self, n: int) -> bool:
        """Keep positions [0, n). False (and the cache cleared) when that is not possible."""
        # Slots past n_past can hold keys of an interrupted step; they are cleared as well.
        n = min(n, self.n_past)
        ok = all([layer.truncate(n) for layer in self.layers])
        if not ok:
            self.clear()
            return False
        self.n_past = n
        del self.tokens[n:]
        return True

    def clear(self):
        for layer in self.layers:
            layer.clear()
        self.n_past = 0
        self.tokens = []

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
