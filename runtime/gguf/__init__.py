"""GGUF I/O: the validated reader, the tensors it maps, and the writer (``gguf.writer``)."""
from pocketlm.gguf.reader import GGUFError, GGUFFile, TensorInfo, open_gguf
from pocketlm.gguf.tensor import QTensor

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "open_gguf", "QTensor"]
