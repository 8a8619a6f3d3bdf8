"""Statistics of streamed experts: the cache's hits, misses, reads and prediction quality
(``CacheStats``), and a tap on the routing decisions a model announces to its experts."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

from pocketlm.nn.moe import ExpertSource


class RoutingTap(ExpertSource):
    """An ExpertSource over ``source`` that shows each request's routing to
    ``on_route(layer, ids (n, k))`` (traces, routing statistics) and passes everything on."""

    def __init__(self, source: ExpertSource, on_route):
        self.source, self.on_route = source, on_route

    @property
    def wants_hints(self) -> bool:
        return self.source.wants_hints

    @property
    def neurons(self):
        return self.source.neurons

    def request(self, layer: int, ids, x=None):
        self.on_route(layer, ids)
        self.source.request(layer, ids, x)

    def hint(self, layer: int, ids):
        self.source.hint(layer, ids)

    def close(self):
        self.source.close()

    def each(self, layer: int, ids):
        return self.source.each(layer, ids)

    def groups(self, layer: int, ids):
        return self.source.groups(layer, ids)


@contextmanager
def tap_routing(model, on_route):
    """Within the block, ``on_route(layer, ids)`` sees every routing decision of ``model`` (a
    mixture-of-experts model: its layers request their experts as soon as they are routed)."""
    source = model.experts
    model.experts = RoutingTap(source, on_route)
    try:
        yield
    finally:
        model.experts = source


@dataclass
class CacheStats:
    hit_bytes: int = 0      # requested expert bytes already in the cache
    miss_bytes: int = 0
    bytes_read: int = 0
    reads: int = 0
    speculative_reads: int = 0
    evictions: int = 0
    read_s: float = 0.0     # I/O threads' time reading (summed over threads)
    wait_s: float = 0.0     # main thread's time waiting for experts
    pred_n: int = 0
    pred_tp: int = 0
    pred_fp: int = 0
    pred_fn: int = 0

    @property
    def precision(self) -> float:
        n = self.pred_tp + self.pred_fp
        return self.pred_tp / n if n else 0.0

    @property
    def recall(self) -> float:
        n = self.pred_tp + self.pred_fn
        return self.pred_tp / n if n else 0.0

    def minus(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                             for f in dataclasses.fields(self)})

    def as_dict(self, n_tokens: int = 1) -> dict:
        """Figures for a run over ``n_tokens`` tokens (hidden: share of read time that the
        main thread did not spend waiting)."""
        total = self.hit_bytes + self.miss_bytes
        return {
            "hit_rate_bytes": self.hit_bytes / total if total else 0.0,
            "bytes_read": self.bytes_read,
            "bytes_read_per_token": self.bytes_read / max(n_tokens, 1),
            "reads": self.reads, "speculative_reads": self.speculative_reads,
            "evictions": self.evictions, "read_s": self.read_s, "wait_s": self.wait_s,
            "read_hidden": (max(0.0, 1.0 - self.wait_s / self.read_s) if self.read_s > 0
                            else 1.0),
            "prediction_precision": self.precision, "prediction_recall": self.recall,
        }
