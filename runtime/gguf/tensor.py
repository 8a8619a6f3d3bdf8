"""QTensor: a weight kept as its raw quantized blocks; the qtype picks the kernel."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class QTensor:
    qtype: str                # ggml type name: "Q4_0", "Q4_K", "F32", ...
    shape: tuple[int, ...]    # numpy order; shape[-1] is the contiguous (input) dimension
    data: np.ndarray          # uint8 (prod(shape[:-1]), row_bytes): raw blocks, one row per line
    # derived data the kernels attach on first use (``kernels.Prepared``: f32 block scales)
    prepared: object = field(default=None, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 array of ``shape``."""
        from pocketlm import quant
        return quant.dequantize(self.qtype, self.data, self.shape)
