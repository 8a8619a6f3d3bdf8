"""GGUF I/O: the validated reader and the tensors it maps."""
from pocketlm.gguf.reader import GGUFError, GGUFFile, TensorInfo, open_gguf
from pocketlm.gguf.tensor import QTensor

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "open_gguf", "QTensor"]
