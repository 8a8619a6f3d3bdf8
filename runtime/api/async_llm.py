"""The LLM API for asyncio: :class:`AsyncLLM` runs each call in its own thread and hands
chunks to the event loop through a queue, so the loop never waits on the model."""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from pocketlm.generate.loop import GenerationChunk, GenerationResult, collect

__all__ = ["AsyncLLM"]


_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class AsyncLLM:
    """An ``LLM`` for asyncio programs: the same calls, awaited.

    ``await allm.generate(prompt, **settings)`` returns a ``GenerationResult``;
    ``await allm.generate(prompt, stream=True)`` an async iterator of ``GenerationChunk``
    (as the ``openai`` client's ``AsyncOpenAI`` does). Leaving the iteration early, or
    cancelling the task that runs it, stops that generation within one decode step or
    prefill chunk; other callers' generations are untouched.
    """

    def __init__(self, llm):
        self.llm = llm
        self._pending = 0
        self._pending_lock = threading.Lock()

    @classmethod
    async def load(cls, model: str, config=None, **kwargs) -> "AsyncLLM":
        """``LLM.load`` (a ``LoadConfig`` and/or its fields as keywords) in a worker thread."""
        from pocketlm.api.llm import LLM
        return cls(await asyncio.to_thread(LLM.load, model, config, **kwargs))

    @property
    def pending(self) -> int:
        """Calls queued or running (their worker threads have not finished)."""
        return self._pending

    async def generate(self, prompt, *, stream: bool = False, **settings):
        """``LLM.generate`` without blocking the loop."""
        chunks = self._stream(self.llm.generate, prompt, settings)
        return chunks if stream else await _collect(chunks)

    async def chat(self, messages: list[dict], *, stream: bool = False, **settings):
        """``LLM.chat`` without blocking the loop."""
        chunks = self._stream(self.llm.chat, messages, settings)
        return chunks if stream else await _collect(chunks)

    async def close(self):
        await asyncio.to_thread(self.llm.close)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _stream(self, method, first, settings) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()

        def work():
            try:
                for chunk in method(first, stream=True, cancel=cancel, **settings):
                    put(chunk)
            except BaseException as e:  # handed to the awaiting task, raised there
                put(_Failed(e))
            finally:
                with self._pending_lock:
                    self._pending -= 1
                put(_END)

        with self._pending_lock:
            self._pending += 1
        threading.Thread(target=work, name="pocketlm-generate", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            cancel.set()  # stopped early (break, task cancelled): free the model for others


async def _collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationResult:
    got = [c async for c in chunks]
    return collect(iter(got))
