"""pocketlm's engine. The public API: ``LLM``, ``AsyncLLM``, ``Tokenizer``, ``GenerationConfig``."""

_LAZY = {
    "LLM": ("runtime.llm", "LLM"),
    "Tokenizer": ("runtime.tokenizer", "Tokenizer"),
    "GenerationConfig": ("runtime.generate", "GenerationConfig"),
    "GenerationChunk": ("runtime.generate", "GenerationChunk"),
    "GenerationResult": ("runtime.generate", "GenerationResult"),
    "AsyncLLM": ("runtime.concurrency", "AsyncLLM"),
}


def __getattr__(name):
    # Imported on first use so that `import runtime.gguf` stays light (no Numba compile).
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


__all__ = list(_LAZY)
