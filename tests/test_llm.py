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


def test_warm_evaluates_the_next_chat_prompts_start(llm):
    system = {"role": "system", "content": "You answer briefly."}
    user = {"role": "user", "content": "What is 2+2? Answer with a number."}
    llm.generate("Unrelated text", max_tokens=1)   # a cache holding something else
    cold = llm.chat([system, user], max_tokens=8, temperature=0)
    llm.generate("Unrelated text", max_tokens=1)
    llm.warm([system])
    warm = llm.chat([system, user], max_tokens=8, temperature=0)
    # the system turn and the user turn's opening came from the cache: only the message
    # and the assistant header ran, and the answer is the same
    preamble = len(llm.tokenize("<|im_start|>system\nYou answer briefly.<|im_end|>\n"
                                "<|im_start|>user\n", parse_special=True))
    assert warm.prompt_tokens == cold.prompt_tokens
    assert cold.prompt_tokens - warm.timings.prompt_tokens >= preamble - 1
    assert warm.text == cold.text


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
    # numpy scalars are numbers like any other
    assert llm.generate(PROMPT, max_tokens=np.int64(2), temperature=np.float32(0)).tokens


@pytest.mark.parametrize("name,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")),
    ("top_k", 1.5), ("top_k", True), ("max_tokens", 2.0), ("seed", -1), ("seed", "7"),
    ("repeat_penalty", 0), ("repeat_penalty", -1), ("top_p", 0), ("top_p", 1.5),
    ("min_p", -0.1), ("frequency_penalty", float("-inf")), ("repeat_last_n", -2),
    ("stop", [1]),
])
def test_out_of_range_settings_are_one_line_errors(llm, name, value):
    from pocketlm import GenerationConfig
    with pytest.raises(ValueError, match=f"^{name} .*: expected [^\n]*$"):
        llm.generate(PROMPT, **{"max_tokens": 1, name: value})
    with pytest.raises(ValueError, match=f"^{name} "):
        GenerationConfig(**{name: value})


def test_closed_llm_is_a_clear_error(smollm2_path):
    m = LLM.load(str(smollm2_path), n_ctx=64)
    m.close()
    m.close()   # a second close is a no-op
    for call in (lambda: m.eval([1, 2]), lambda: m.generate(PROMPT), lambda: m.tokenize("a"),
                 lambda: m.detokenize([1]), lambda: m.chat([{"role": "user", "content": "a"}]),
                 lambda: m.embed(["a"]), lambda: m.classify(["a"]),
                 lambda: m.set_memory_limit("1GiB")):
        with pytest.raises(ValueError, match="^this LLM is closed$"):
            call()


def test_paused_stream_then_same_thread_call_is_an_error(llm):
    """A stream paused on a thread holds the model: a second call (or close) on that thread
    must fail at once rather than wait forever; other threads still queue behind it."""
    outcome = []

    def same_thread():
        it = llm.generate(PROMPT, max_tokens=4, temperature=0, stream=True)
        next(it)
        for call in (lambda: llm.generate(PROMPT, max_tokens=1),
                     lambda: llm.generate(PROMPT, max_tokens=1, stream=True),
                     lambda: llm.eval([1, 2]), llm.close):
            try:
                call()
                outcome.append("no error")
            except RuntimeError as e:
                outcome.append(str(e))
        other = threading.Thread(target=lambda: outcome.append(
            llm.generate(PROMPT, max_tokens=2, temperature=0).completion_tokens))
        other.start()
        other.join(0.5)
        outcome.append(other.is_alive())        # queued behind the open stream
        rest = list(it)                         # finishing the stream lets it run
        other.join(60)
        outcome.append(bool(rest[-1].finish_reason))

    t = threading.Thread(target=same_thread, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), f"deadlocked after {outcome}"
    assert outcome[:4] == ["a streamed generation of this LLM is still open on this thread; "
                           "finish or close it first"] * 4
    assert outcome[4:] == [True, 2, True]
    assert llm.generate(PROMPT, max_tokens=1).completion_tokens == 1   # still open


def test_cli_run(smollm2_path, capsys):
    from pocketlm.apps.cli import main
    assert main(["run", str(smollm2_path), "Say hello.", "-n", "6", "--temp", "0", "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert out.strip()


@pytest.mark.parametrize("fixture", ["smollm2_path", "smallthinker_tiny_path"])
def test_same_seed_same_tokens_on_any_thread_count(fixture, request):
    """Greedy and seeded sampling give the same tokens on 1 and 2 threads, dense and MoE: a
    prompt long enough for the BLAS path, then decode (work is split by rows, never sums)."""
    from pocketlm import LLM
    path = str(request.getfixturevalue(fixture))
    prompt = ("Mixture-of-experts layers route each token to a few experts, and the router "
              "reads the layer input. " * 4)
    got = []
    for threads in (1, 2):
        with LLM.load(path, threads=threads, n_ctx=256) as llm:
            ids = llm.tokenize(prompt)
            assert len(ids) > 32
            got.append([[c.token for c in llm.generate(ids, max_tokens=12, stream=True, **s)]
                        for s in (dict(temperature=0), dict(temperature=0.9, seed=11))])
    assert got[0] == got[1]
