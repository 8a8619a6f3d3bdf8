"""Routing statistics: a tap on the routing decisions a model announces to its experts."""
from __future__ import annotations

from contextlib import contextmanager

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

    def each(self, layer: int, ids):
        return self.source.each(layer, ids)


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
