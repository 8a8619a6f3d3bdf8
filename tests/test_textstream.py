"""IncrementalDecoder and StopMatcher: split characters, split and overlapping stop strings."""
from __future__ import annotations

import random

import pytest

from pocketlm.generate.textstream import IncrementalDecoder, StopMatcher


def _decode_all(chunks: list[bytes]) -> tuple[list[str], str]:
    dec = IncrementalDecoder()
    outs = [dec.feed(c) for c in chunks]
    return outs, dec.flush()


def test_emoji_split_bytewise():
    emoji = "👋🏽"  # two 4-byte code points
    data = emoji.encode()
    outs, tail = _decode_all([data[i:i + 1] for i in range(len(data))])
    assert outs == ["", "", "", "👋", "", "", "", "🏽"]
    assert tail == ""


def test_cjk_split_across_tokens_with_ascii():
    text = "Hi 你好, 世界!"
    data = text.encode()
    # token boundaries that cut through the 3-byte characters
    cuts = [0, 4, 5, 8, 10, 13, 15, len(data)]
    chunks = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    outs, tail = _decode_all(chunks)
    assert "".join(outs) + tail == text
    for o in outs:
        assert "\ufffd" not in o
        o.encode()  # every emitted piece is itself valid text


def test_random_splits_roundtrip():
    text = "naïve café — 日本語のテキスト 🎉🚀 done"
    data = text.encode()
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(8))})
        outs, tail = _decode_all([data[a:b] for a, b in zip(cuts, cuts[1:])])
        assert "".join(outs) + tail == text


def test_pending_and_flush_replaces_truncated_char():
    dec = IncrementalDecoder()
    assert dec.feed("ok ".encode() + "😀".encode()[:2]) == "ok "
    assert dec.pending == "😀".encode()[:2]
    assert dec.flush() == "\ufffd"
    assert dec.pending == b""


def test_invalid_bytes_midstream_replaced_immediately():
    dec = IncrementalDecoder()
    assert dec.feed(b"a\xffb") == "a\ufffdb"
    dec.reset()
    assert dec.feed("é".encode()) == "é"


def _run_stops(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    pieces = []
    stopped = False
    for d in deltas:
        out, stopped = m.feed(d)
        pieces.append(out)
        if stopped:
            break
    if not stopped:
        pieces.append(m.flush())
    return "".join(pieces), stopped, pieces


def _reference(stops: list[str], text: str) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def test_stop_split_across_many_deltas():
    deltas = ["Hello", " world", "<", "|", "im", "_", "end", "|>", "never"]
    out, stopped, pieces = _run_stops(["<|im_end|>"], deltas)
    assert (out, stopped) == ("Hello world", True)
    assert all("<" not in p for p in pieces)


def test_partial_stop_released_when_ruled_out():
    m = StopMatcher(["</s>"])
    assert m.feed("a</") == ("a", False)
    assert m.feed("b") == ("</b", False)
    assert m.feed("<") == ("", False)
    assert m.flush() == "<"


def test_stop_at_very_start():
    assert _run_stops(["###"], ["###", "rest"])[:2] == ("", True)
    assert _run_stops(["###"], ["#", "#", "#x"])[:2] == ("", True)


def test_overlapping_stops_earliest_wins():
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("bc") == ("a", True)
    assert m.matched == "bc"
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
    # a stop that is a prefix of another, and repeated characters
    assert _run_stops(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", True)
    assert _run_stops(["User:", "User"], ["Hi\nUs", "er: x"])[:2] == ("Hi\n", True)


def test_stop_matcher_never_emits_stop_random():
    rng = random.Random(1)
    alphabet = "ab<|>"
    stops = ["<|a", "ab|", "bb", "|>|"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        cuts = sorted({0, len(text), *(rng.randrange(len(text)) for _ in range(5))})
        out, stopped, pieces = _run_stops(stops, [text[a:b] for a, b in zip(cuts, cuts[1:])])
        assert (out, stopped) == _reference(stops, text), text
        emitted = ""
        for p in pieces:
            emitted += p
            assert not any(s in emitted for s in stops)


def test_no_stops_passthrough_and_empty_stop_ignored():
    assert _run_stops([], ["a", "b"])[:2] == ("ab", False)
    assert _run_stops([""], ["a", "b"])[:2] == ("ab", False)


@pytest.mark.parametrize("stop", ["🎉", "。"])
def test_decoder_then_stop_matcher_with_multibyte_stop(stop):
    text = f"好的{stop}后面"
    data = text.encode()
    dec, m = IncrementalDecoder(), StopMatcher([stop])
    out = ""
    stopped = False
    for i in range(len(data)):
        emit, stopped = m.feed(dec.feed(data[i:i + 1]))
        out += emit
        if stopped:
            break
    assert (out, stopped) == ("好的", True)
