"""Memory accounting for tiny models, as the EmbBERT-Q paper counts it: the bytes of the
weights plus the peak live activations of one sequence (spec: shared/specs/embbert-q.md §5).

- weights: every tensor's bytes as stored in the GGUF (int8 rows, their scales, fp16/fp32
  tables); ``n_params`` counts the values, not the scale vectors;
- activations: the model's ``activation_values(T)`` (EmbBERT-Q: T·d + T² + T·d_inner, the x/Q
  buffer, the score matrix and the conv buffer at peak) times 4 bytes for an all-F32 model,
  else 2 (the paper's 8-bit models run their activations in fp16);
- ``packed_int8_bytes``: the same model with every value and activation in one byte, the
  layout a microcontroller port would use (reported separately, as the spec asks).

These are the paper's figures for the model, not the resident size of this Python process.
"""
from __future__ import annotations

from dataclasses import dataclass


class MemoryLimitError(ValueError):
    """An input (or the model itself) needs more memory than the given limit."""


@dataclass(frozen=True)
class MemoryReport:
    seq_len: int
    n_params: int
    weight_bytes: int
    activation_values: int
    activation_value_bytes: int   # 4 (fp32) or 2 (fp16)

    @property
    def activation_bytes(self) -> int:
        return self.activation_values * self.activation_value_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def packed_int8_bytes(self) -> int:
        return self.n_params + self.activation_values

    def as_dict(self) -> dict:
        return {"seq_len": self.seq_len, "n_params": self.n_params,
                "weight_bytes": self.weight_bytes, "activation_values": self.activation_values,
                "activation_value_bytes": self.activation_value_bytes,
                "activation_bytes": self.activation_bytes, "total_bytes": self.total_bytes,
                "packed_int8_bytes": self.packed_int8_bytes}


def account(gguf_file, model, seq_len: int) -> MemoryReport:
    """The paper-style figures of ``model`` (built from ``gguf_file``) at ``seq_len`` tokens."""
    if not model.capabilities.accounting:
        raise ValueError(f"memory accounting is not defined for {gguf_file.arch} models "
                         f"(only for tiny encoders such as embbert)")
    if seq_len <= 0:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    tensors = gguf_file.tensors.values()
    all_f32 = all(t.qtype == "F32" for t in tensors)
    return MemoryReport(seq_len=seq_len,
                        n_params=sum(t.n_elements for t in tensors if not t.name.endswith(".scale")),
                        weight_bytes=sum(t.nbytes for t in tensors),
                        activation_values=model.activation_values(seq_len),
                        activation_value_bytes=4 if all_f32 else 2)


def check(report: MemoryReport, limit: int, what: str) -> None:
    """Raise ``MemoryLimitError`` naming ``what``, the need and the limit if it does not fit."""
    if report.total_bytes > limit:
        raise MemoryLimitError(
            f"{what} needs {report.total_bytes:,} bytes (weights {report.weight_bytes:,} + "
            f"activations {report.activation_bytes:,} at {report.seq_len} tokens), "
            f"more than the memory limit of {limit:,} bytes")


def format_report(r: MemoryReport) -> str:
    kb = lambda n: f"{n:>12,} B  {n / 1000:9.1f} kB"   # noqa: E731  (the paper uses kB = 1000 B)
    return "\n".join([
        f"memory at {r.seq_len} tokens (paper accounting: weights + peak activations)",
        f"  weights          {kb(r.weight_bytes)}   ({r.n_params:,} values)",
        f"  activations      {kb(r.activation_bytes)}   ({r.activation_values:,} values x "
        f"{r.activation_value_bytes} B)",
        f"  total            {kb(r.total_bytes)}",
        f"  packed int8      {kb(r.packed_int8_bytes)}   (every value and activation 1 B)",
    ])
