"""Streaming text helpers for the generation loop.

Tokens end mid-character (byte-fallback emoji, CJK split by BPE merges), and stop strings arrive
split across deltas. :class:`IncrementalDecoder` turns token bytes into complete UTF-8 text only;
:class:`StopMatcher` holds back text that might begin a stop string and never emits the stop.
"""
from __future__ import annotations

import codecs

__all__ = ["IncrementalDecoder", "StopMatcher"]


class IncrementalDecoder:
    """Token bytes in, complete UTF-8 text out.

    Incomplete trailing sequences wait for the next token; bytes that can never become valid
    UTF-8 are replaced with U+FFFD as soon as that is certain, and :meth:`flush` replaces
    whatever is still pending at the end of the stream.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text completed by them (may be empty)."""
        return self._dec.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: return pending bytes decoded with replacement characters."""
        return self._dec.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet decoded (an incomplete character)."""
        return self._dec.getstate()[0]

    def reset(self) -> None:
        """Drop pending bytes and start a new stream."""
        self._dec.reset()


class StopMatcher:
    """Cut a text stream at the first stop string, without ever emitting any of it.

    Feed text deltas; each call returns ``(emit_text, stopped)``. Text that could be the start of
    a stop string is held back until it is ruled out; :meth:`flush` releases it at the end of a
    stream that did not stop. Once stopped, :attr:`matched` is the stop string found and later
    feeds return ``("", True)``.
    """

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)   # "" would match everywhere
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a text delta; return the text now safe to emit and whether a stop was hit."""
        if self.matched is not None:
            return "", True
        buf = self._held + delta
        if not self.stops:
            self._held = ""
            return buf, False
        # Earliest stop wins; the held part alone matched nothing before, so only positions
        # that reach into the new delta can match, but searching the short held part is cheap.
        best, best_stop = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (best == -1 or i < best):
                best, best_stop = i, s
        if best_stop is not None:
            self.matched = best_stop
            self._held = ""
            return buf[:best], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
