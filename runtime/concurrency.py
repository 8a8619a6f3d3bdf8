"""Sharing one model: a first-come-first-served lock, and an asyncio face for the LLM API.

Generation holds the model for its whole stream, so callers queue. ``threading.Lock`` wakes
waiters in no particular order (a busy client can starve the others); :class:`FairLock` serves
them in arrival order. :class:`AsyncLLM` runs each call in its own thread and hands chunks to
the event loop through a queue, so the loop never waits on the model.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from runtime.generate import GenerationChunk, GenerationResult

__all__ = ["FairLock", "AsyncLLM"]


class FairLock:
    """A non-reentrant lock granted in the order ``acquire`` was called."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = 0         # next ticket to hand out
        self._serving = 0      # ticket that holds (or may take) the lock
        self._abandoned: set[int] = set()

    def acquire(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            try:
                while ticket != self._serving:
                    self._cond.wait()
            except BaseException:  # e.g. KeyboardInterrupt while queued: give the turn away
                if ticket == self._serving:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise

    def release(self):
        with self._cond:
            self._advance()

    def _advance(self):
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Callers holding or queued for the lock."""
        with self._cond:
            return self._next - self._serving - len(self._abandoned)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


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
    async def load(cls, model: str, **kwargs) -> "AsyncLLM":
        """``LLM.load`` in a worker thread."""
        from runtime.llm import LLM
        return cls(await asyncio.to_thread(LLM.load, model, **kwargs))

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
    from runtime.llm import collect
    got = [c async for c in chunks]
    return collect(iter(got))
