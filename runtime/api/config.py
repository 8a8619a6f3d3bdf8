"""``LoadConfig``: how ``LLM.load`` sets a model up, one validated record shared by the Python
API, the CLI flags and the server, so a bad value fails in one place, before any file opens."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pocketlm.experts.budget import parse_size
from pocketlm.experts.policies import POLICIES
from pocketlm.models.minicpm import SPARSE_MODES
from pocketlm.nn.backend import DEVICES
from pocketlm.nn.ops import BACKENDS, CPUOps

# the oracle replays a traced first pass: only the benchmark can set it up
EXPERT_POLICIES = tuple(p for p in POLICIES if p != "oracle")


@dataclass(frozen=True)
class LoadConfig:
    """Settings for ``LLM.load`` (docs/api.md). Sizes (``memory_budget``, ``max_memory``,
    ``gpu_budget``) take bytes or a string such as "1GiB" and are held as bytes."""
    n_ctx: int | None = None            # None: the model's training context, capped at 4096
    threads: int | None = None          # None: all cores
    chunk: int = 512                    # prompt-evaluation chunk (also the cancel granularity)
    chat_template: str | None = None    # a Jinja file overriding the model's template
    pull: bool = True                   # fetch a missing store model
    memory_budget: int | str | None = None
    expert_policy: str = "lru"
    sparse_attention: str = "auto"
    backend: str | None = None          # None: the model's default (numba)
    max_memory: int | str | None = None
    device: str = "cpu"
    gpu_budget: int | str | None = None
    numerics: str = "auto"              # CPU decoders: "auto", "llama" or "exact" (nn.CPUOps)

    def __post_init__(self):
        for name in ("n_ctx", "threads", "chunk"):
            value = getattr(self, name)
            if value is None and name != "chunk":
                continue
            # bool is an int subclass: True would silently mean 1
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} {value!r}: expected a positive integer")
        if self.chat_template is not None:
            if not isinstance(self.chat_template, (str, os.PathLike)):
                raise ValueError(f"chat_template {self.chat_template!r}: expected a file path")
            object.__setattr__(self, "chat_template", os.fspath(self.chat_template))
        if not isinstance(self.pull, bool):
            raise ValueError(f"pull {self.pull!r}: expected True or False")
        _one_of("expert_policy", self.expert_policy, EXPERT_POLICIES)
        _one_of("sparse_attention", self.sparse_attention, SPARSE_MODES)
        if self.backend is not None:
            _one_of("backend", self.backend, BACKENDS)
        _one_of("device", self.device, DEVICES)
        _one_of("numerics", self.numerics, CPUOps.NUMERICS)
        for name in ("memory_budget", "max_memory", "gpu_budget"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, parse_size(value))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        if self.gpu_budget is not None and self.device == "cpu":
            raise ValueError("a GPU budget needs device 'cuda' or 'auto'")

    def replace(self, **changes) -> "LoadConfig":
        """A copy with ``changes`` applied and validated; unknown names are an error."""
        names = [f.name for f in dataclasses.fields(self)]
        bad = sorted(set(changes) - set(names))
        if bad:
            raise TypeError(f"unknown load setting(s): {', '.join(bad)} "
                            f"(expected {', '.join(names)})")
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
