"""A first-come-first-served lock for sharing one model.

Generation holds the model for its whole stream, so callers queue. ``threading.Lock`` wakes
waiters in no particular order (a busy client can starve the others); :class:`FairLock` serves
them in arrival order.
"""
from __future__ import annotations

import threading


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
