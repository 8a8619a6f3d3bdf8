"""The public LLM API on the real SmolLM2: generation, streaming, stops, cache reuse, cancel,
threads, errors; and the `pocketlm run` command."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pocketlm import LLM
from pocketlm.generate.loop import ContextOverflowError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    m = LLM.load(str(smollm2_path), n_ctx=512)
    yield m
    m.close()


def test_greedy_is_deterministic_and_stream_equals_blocking(llm):
    a = llm.generate(PROMPT, max_tokens=12, temperature=0)
    b = llm.generate(PROMPT, max_tokens=12, temperature=0)
    assert a.text == b.text and a.tokens == b.tokens
    assert a.completion_tokens == 12 and a.finish_reason == "length"
    chunks = list(llm.generate(PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.text for c in chunks) == a.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].timings.generation_tps > 0
    assert all(c.finish_reason is None for c in chunks[:-1])
    # Each greedy token is the best (up to kernel-path noise) when the whole sequence is
    # evaluated in one batch: decode quantizes activations to 8 bits, batch prefill does not.
    ids = llm.tokenize(PROMPT)
    logits = llm.eval(ids + a.tokens[:-1])[len(ids) - 1:]
    assert int(logits[0].argmax()) == a.tokens[0]
    chosen = logits[np.arange(len(a.tokens)), a.tokens]
    assert (logits.max(axis=1) - chosen).max() < 0.3


def test_seeded_sampling_reproducible(llm):
    a = llm.generate(PROMPT, max_tokens=10, temperature=1.0, seed=7)
    b = llm.generate(PROMPT, max_tokens=10, temperature=1.0, seed=7)
    assert a.tokens == b.tokens


def test_stop_string_never_emitted(llm):
    full = llm.generate(PROMPT, max_tokens=16, temperature=0).text
    stop = full.strip().split()[1]
    r = llm.generate(PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.finish_reason == "stop"
    assert stop not in r.text and full.startswith(r.text)


def test_prefix_reuse_processes_only_new_tokens(llm):
    llm.generate(PROMPT, max_tokens=2, temperature=0)
    r = llm.generate(PROMPT, max_tokens=2, temperature=0)
    assert r.timings.prompt_tokens == 1  # only the last prompt token is evaluated again


def test_chat_answers(llm):
    r = llm.chat([{"role": "user", "content": "What is 2+2? Answer with a number."}],
                 max_tokens=24, temperature=0)
    assert r.finish_reason in ("stop", "length") and "4" in r.text


def test_context_overflow_is_an_error(smollm2_path):
    with LLM.load(str(smollm2_path), n_ctx=16) as small:
        with pytest.raises(ContextOverflowError, match="context"):
            small.generate("word " * 40, max_tokens=4)
        r = small.generate("Hello", max_tokens=100, temperature=0)
        assert r.finish_reason in ("length", "stop")
        # every evaluated token fits; the last sampled one is returned but never evaluated
        assert r.prompt_tokens + r.completion_tokens <= 16 + 1


def test_cancel_stops_stream(llm):
    seen = []
    for c in llm.generate(PROMPT, max_tokens=200, temperature=0, stream=True):
        seen.append(c)
        if len(seen) == 3:
            llm.cancel()
    assert seen[-1].finish_reason == "cancelled" and len(seen) <= 5


def test_threads_are_serialized(llm):
    want = llm.generate(PROMPT, max_tokens=8, temperature=0).text
    got = []

    def work():
        got.append(llm.generate(PROMPT, max_tokens=8, temperature=0).text)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [want] * 3


def test_bad_settings_rejected(llm):
    with pytest.raises(ValueError):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(TypeError, match="unknown generation setting"):
        llm.generate(PROMPT, temprature=0.5)


def test_cli_run(smollm2_path, capsys):
    from pocketlm.apps.cli import main
    assert main(["run", str(smollm2_path), "Say hello.", "-n", "6", "--temp", "0", "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
