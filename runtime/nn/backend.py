"""Compute devices: the CPU (default) and an optional CUDA GPU through Numba CUDA.

Models never name a device. ``place(model, device)`` uploads a model's weights once and gives
it the device's ops (``model.ops``, ``pocketlm.nn.ops``): from then on its activations and KV
cache live on the device. Nothing here imports ``numba.cuda`` until a GPU is asked for.
"""
from __future__ import annotations

import importlib.util

DEVICES = ("cpu", "cuda", "auto")


def cuda_problem() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'pocketlm[cuda]')"
    from numba import cuda
    try:
        if not cuda.is_available():
            return "no CUDA GPU or driver found"
    except Exception as e:  # a broken driver or toolkit: say what it is
        return f"CUDA does not start: {e}"
    return None


def resolve(device: str) -> tuple[str, str | None]:
    """The device to use for ``device`` ("cpu", "cuda" or "auto"), and a note for the user when
    "auto" fell back to the CPU. "cuda" without a usable GPU is a one-line ValueError."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu", None
    problem = cuda_problem()
    if problem is None:
        return "cuda", None
    if device == "cuda":
        raise ValueError(f"device 'cuda' is not available: {problem}")
    return "cpu", f"running on the CPU: {problem}"


def place(model, device: str, gpu_budget: int | None = None):
    """Put ``model`` on ``device`` (a resolved name: "cpu" or "cuda"); returns the model.

    ``gpu_budget``: bytes of GPU memory for mixture-of-experts weights (None: all of them); the
    other weights and the KV cache are always resident.
    """
    if device == "cpu":
        if gpu_budget is not None:
            raise ValueError("a GPU budget needs device 'cuda'")
        return model
    if device not in model.capabilities.devices:
        raise ValueError("this model has no CUDA path (it runs dense decoders with plain or "
                         "linear RoPE); use device 'cpu'")
    from pocketlm.cuda.model import upload
    return upload(model, gpu_budget)
