"""pocketlm's engine. The public API: ``LLM``, ``LoadConfig``, ``AsyncLLM``, ``Tokenizer``,
``GenerationConfig``."""

_LAZY = {
    "LLM": ("pocketlm.api.llm", "LLM"),
    "LoadConfig": ("pocketlm.api.config", "LoadConfig"),
    "Tokenizer": ("pocketlm.text.tokenizer", "Tokenizer"),
    "GenerationConfig": ("pocketlm.generate.loop", "GenerationConfig"),
    "GenerationChunk": ("pocketlm.generate.loop", "GenerationChunk"),
    "GenerationResult": ("pocketlm.generate.loop", "GenerationResult"),
    "AsyncLLM": ("pocketlm.api.async_llm", "AsyncLLM"),
}


def __getattr__(name):
    # Imported on first use so that `import pocketlm.gguf` stays light (no Numba compile).
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


__all__ = list(_LAZY)
