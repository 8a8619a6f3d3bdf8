"""Model building blocks: the ops object a model computes with, and the blocks around it.

``ops`` holds the one seam between models and devices (``Ops``; ``CPUOps`` on the Numba
kernels under a numerics, ``NumpyOps``; the CUDA backend adds ``CudaOps``), ``kvcache`` the
KV cache, ``moe`` routing and expert evaluation, ``encoder`` the numpy parts of encoders,
``backend`` device placement. Model files import from here, never from the kernels.
"""
from __future__ import annotations

from pocketlm.kernels import YaRN, yarn
from pocketlm.kernels.sparse_attention import CompressedKeys, SparseConfig
from pocketlm.nn.ops import BACKENDS, CPU, EXACT, LLAMA, NUMPY, CPUOps, NumpyOps, Ops, backend_ops

__all__ = ["BACKENDS", "CPU", "EXACT", "LLAMA", "NUMPY", "CPUOps", "CompressedKeys", "NumpyOps", "Ops",
           "SparseConfig", "YaRN", "backend_ops", "yarn"]
