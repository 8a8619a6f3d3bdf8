"""`pocketlm serve` on loopback, driven by the official `openai` client: chat and completions,
streaming and not, stop sequences, max_tokens, disconnects (running and queued), OpenAI error
bodies, and a bounded load test (32 clients x 4 requests) with the server's RSS checked."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest

from tests.conftest import http_request as _http, serving

COUNT = "1, 2, 3, 4, 5,"  # SmolLM2 keeps counting greedily: long answers on demand


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    """`pocketlm serve` in a subprocess on a free loopback port; its log is shown at the end."""
    with serving(smollm2_path, tmp_path_factory.mktemp("serve"), "--alias", "smollm2") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused",
                         max_retries=0, timeout=120)


def _model(client) -> str:
    return client.models.list().data[0].id


def _pending(port: int) -> int:
    return json.loads(_http(port, "GET", "/health")[2])["pending"]


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2"]   # --alias
    status, _, body = _http(server[0], "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_chat_stream_and_blocking_agree(client):
    msgs = [{"role": "user", "content": "What is 2+2? Answer with a number."}]
    r = client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=16,
                                       temperature=0)
    text = r.choices[0].message.content
    assert "4" in text and r.choices[0].finish_reason in ("stop", "length")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 10 and \
        r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, finish, roles, usage = [], None, [], None
    for ev in client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=16,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
        if ev.usage is not None:
            usage = ev.usage
        for ch in ev.choices:
            roles.append(ch.delta.role)
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == text and finish == r.choices[0].finish_reason
    assert roles[0] == "assistant" and len(parts) > 2  # streamed, not sent in one piece
    assert usage.completion_tokens == r.usage.completion_tokens


def test_completion_max_tokens_and_stop(client):
    model = _model(client)
    r = client.completions.create(model=model, prompt=COUNT, max_tokens=10, temperature=0)
    full = r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=COUNT, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == full
    stop = full.split(",")[2] + ","  # e.g. " 8," : a stop string spanning tokens
    r = client.completions.create(model=model, prompt=COUNT, max_tokens=10, temperature=0,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and full.startswith(r.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=COUNT, max_tokens=10, temperature=0, stop=stop, stream=True)
        if c.choices)
    assert streamed == r.choices[0].text


def test_sse_wire_format(server):
    body = json.dumps({"prompt": COUNT, "max_tokens": 3, "stream": True}).encode()
    status, headers, raw = _http(server[0], "POST", "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_errors_are_openai_shaped(server, client):
    port, model = server[0], _model(client)
    status, _, body = _http(port, "POST", "/v1/chat/completions", b'{"messages": [',
                            {"Content-Type": "application/json"})
    err = json.loads(body)["error"]
    assert status == 400 and "malformed JSON" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    status, _, body = _http(port, "POST", "/v1/completions", b"[1, 2]",
                            {"Content-Type": "application/json"})
    assert status == 400 and "JSON object" in json.loads(body)["error"]["message"]
    status, _, body = _http(port, "GET", "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"

    # one model served: any name a client sends is it, and the answer reports the real one
    r = client.chat.completions.create(model="gpt-4o", max_tokens=2,
                                       messages=[{"role": "user", "content": "x"}])
    assert r.model == model
    bad = [dict(temperature=-1), dict(top_p=0), dict(n=2), dict(max_tokens=0),
           dict(max_tokens="ten"), dict(logprobs=True), dict(stop=[""])]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="Hi", **kwargs)
        assert e.value.body["param"] == next(iter(kwargs)), kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 2100, max_tokens=1, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "do not fit the context of 2048" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model, input=["a sentence"])
    assert e.value.status_code == 400 and e.value.body["code"] == "embeddings_not_supported"
    # after all that, it still answers
    assert client.completions.create(model=model, prompt="Hi", max_tokens=1).choices[0].text


def test_disconnect_mid_stream_cancels_generation(server, client):
    port, model = server[0], _model(client)
    stream = client.completions.create(model=model, prompt=COUNT, max_tokens=1900,
                                       temperature=0, stream=True)
    got, t0 = 0, time.monotonic()
    for c in stream:
        got += 1
        if got == 1:
            t0 = time.monotonic()
        if got == 4:
            break
    per_token = (time.monotonic() - t0) / 3
    stream.close()
    # 1900 tokens would keep the model busy for a long time; a cancelled generation ends
    # within a decode step or so
    deadline = time.monotonic() + 2 + 5 * per_token
    while _pending(port) != 0:
        assert time.monotonic() < deadline, "the generation went on after the disconnect"
        time.sleep(0.05)
    r = client.completions.create(model=model, prompt=COUNT, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_disconnect_while_queued_cancels_only_that_request(server, client):
    port, model = server[0], _model(client)
    first = threading.Event()
    out = {}

    def long_running():
        text, finish, usage = [], None, None
        for c in client.completions.create(model=model, prompt=COUNT, max_tokens=64,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
            first.set()
            if c.usage is not None:
                usage = c.usage
            for ch in c.choices:
                text.append(ch.text)
                finish = ch.finish_reason or finish
        out.update(text="".join(text), finish=finish, usage=usage)

    t = threading.Thread(target=long_running)
    t.start()
    assert first.wait(60)
    impatient = client.with_options(timeout=0.25)
    with pytest.raises(openai.APITimeoutError):  # queued behind the long one, then gives up
        impatient.completions.create(model=model, prompt="Hello", max_tokens=50)
    t.join()
    assert out["finish"] == "length" and out["usage"].completion_tokens == 64
    deadline = time.monotonic() + 5
    while _pending(port) != 0:  # the abandoned request ends as soon as its turn comes
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_load_32_clients_x_4_requests(server, client):
    port, model = server[0], _model(client)
    client = client.with_options(timeout=600)  # the last of 128 queued requests waits long
    proc = psutil.Process(server[1].pid)
    msgs = [{"role": "user", "content": "Name a colour."}]

    def one(i: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        kw = dict(model=model, max_tokens=3, temperature=0.7, seed=i)
        if i % 4 == 3:
            r = client.completions.create(prompt="Colours: red,", **kw)
            ok = r.choices[0].finish_reason in ("stop", "length") and \
                r.usage.completion_tokens <= 3
        elif i % 2:
            r = client.chat.completions.create(messages=msgs, **kw)
            ok = r.choices[0].finish_reason in ("stop", "length") and \
                r.choices[0].message.content is not None
        else:
            finishes = [ch.finish_reason for ev in client.chat.completions.create(
                messages=msgs, stream=True, **kw) for ch in ev.choices if ch.finish_reason]
            ok = finishes in (["stop"], ["length"])
        return time.perf_counter() - t0, ok

    for i in range(4):  # warm up: buffers, connection pool
        one(i)
    rss_before = proc.memory_info().rss
    results, errors = [], []
    start = threading.Barrier(32)

    def worker(k: int):
        start.wait()
        for j in range(4):
            try:
                results.append(one(4 * k + j))
            except Exception as e:  # collected: the test reports every failure
                errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0
    rss_after = proc.memory_info().rss
    lat = sorted(r[0] for r in results)
    print(f"\nload: {len(results)} requests in {wall:.1f} s, {len(errors)} errors, "
          f"p50 {lat[len(lat) // 2]:.2f} s, p99 {lat[int(len(lat) * 0.99)]:.2f} s, "
          f"server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert errors == [] and len(results) == 128 and all(ok for _, ok in results)
    assert rss_after - rss_before < 32 * 2**20
    assert _pending(port) == 0


# -- in-process servers: loading state, CORS, the async client, embeddings ---------------------
@contextlib.contextmanager
def _in_thread(app):
    """The app on uvicorn in a thread, on a free loopback port."""
    import uvicorn
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http="h11",
                                        loop="asyncio", log_level="warning", lifespan="on"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        t.join(30)


def _wait_ready(port: int):
    deadline = time.monotonic() + 120
    while _http(port, "GET", "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def gated(smallthinker_tiny_path):
    """The tiny SmallThinker served in-process; it loads once the test opens the gate."""
    from pocketlm.apps.server import create_app
    from pocketlm import LLM
    gate = threading.Event()

    def load():
        gate.wait(60)
        return LLM.load(str(smallthinker_tiny_path), n_ctx=256)

    with _in_thread(create_app(load, "tiny", cors=["http://app.example"])) as port:
        yield port, gate
        gate.set()


def test_health_is_503_until_loaded(gated):
    port, gate = gated
    status, _, body = _http(port, "GET", "/health")
    assert status == 503 and json.loads(body) == {"status": "loading"}
    status, _, body = _http(port, "POST", "/v1/completions", b'{"prompt": "Hi"}',
                            {"Content-Type": "application/json"})
    assert status == 503 and json.loads(body)["error"]["code"] == "model_not_ready"
    gate.set()
    _wait_ready(port)


def test_cors_only_for_the_given_origin(gated):
    port, gate = gated
    gate.set()
    _, headers, _ = _http(port, "GET", "/v1/models", headers={"Origin": "http://app.example"})
    assert headers.get("access-control-allow-origin") == "http://app.example"
    _, headers, _ = _http(port, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_async_client_streams_concurrently(gated):
    port, gate = gated
    gate.set()
    _wait_ready(port)

    async def main():
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0)

        async def one(i):
            s = await c.completions.create(model="tiny", prompt=f"Hello {i}", max_tokens=5,
                                           temperature=0, stream=True)
            return [ch.choices[0].finish_reason async for ch in s if ch.choices]

        return await asyncio.gather(*(one(i) for i in range(6)))

    for finishes in asyncio.run(main()):
        assert finishes[-1] in ("stop", "length")


def test_embeddings_of_an_encoder(minilm_path):
    import numpy as np
    from pocketlm.apps.server import create_app
    from pocketlm import LLM
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
    with LLM.load(str(minilm_path)) as llm:
        want = llm.embed(texts)
    with _in_thread(create_app(lambda: LLM.load(str(minilm_path)), "minilm")) as port:
        _wait_ready(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0)
        r = client.embeddings.create(model="minilm", input=texts)  # base64 on the wire
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-6
        r = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
        assert np.abs(np.array(r.data[0].embedding) - want[0]).max() < 1e-6
        assert r.usage.prompt_tokens > 5
        with pytest.raises(openai.BadRequestError) as e:  # an encoder does not chat
            client.chat.completions.create(model="minilm",
                                           messages=[{"role": "user", "content": "Hi"}])
        assert "encoder" in e.value.body["message"]


def test_cli_refuses_a_busy_port(smollm2_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pocketlm.apps", "serve", str(smollm2_path),
                            "--port", str(port)], capture_output=True, text=True, timeout=120,
                           )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("pocketlm: error: cannot listen on 127.0.0.1:")
    assert r.stderr.strip().count("\n") == 0


# -- hostile requests: every one a 4xx with an OpenAI error object ------------------------------
RUNAWAY = "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def tiny(smallthinker_tiny_path):
    """The tiny SmallThinker in-process with a 1 MiB body limit; yields (port, llm)."""
    from pocketlm.apps.server import create_app
    from pocketlm import LLM
    loaded = {}

    def load():
        loaded["llm"] = LLM.load(str(smallthinker_tiny_path), n_ctx=256)
        return loaded["llm"]

    with _in_thread(create_app(load, "tiny", max_body=1 << 20)) as port:
        _wait_ready(port)
        yield port, loaded["llm"]


def _post(port: int, path: str, body, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, out = _http(port, "POST", path, raw,
                           {"Content-Type": "application/json"} if headers is None else headers)
    err = json.loads(out).get("error") if status >= 400 else None
    assert err is None or set(err) == {"message", "type", "param", "code"}
    return status, err


def test_body_limit_nesting_and_content_type(tiny):
    port = tiny[0]
    hi = {"prompt": "Hi", "max_tokens": 1}
    assert _post(port, "/v1/completions", hi)[0] == 200
    for headers in ({"Content-Type": "text/plain"}, {}):
        status, err = _post(port, "/v1/completions", hi, headers)
        assert status == 415 and err["code"] == "unsupported_media_type"
    status, err = _post(port, "/v1/completions", {"prompt": "x" * (1 << 20)})
    assert status == 413 and err["code"] == "request_too_large"
    for depth in (65, 5000):
        status, err = _post(port, "/v1/completions", b"[" * depth + b"]" * depth)
        assert status == 400 and "nests deeper" in err["message"]


def test_malformed_requests_are_4xx(tiny):
    port, llm = tiny
    n_vocab = llm.model.args.n_vocab
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    bad = [("/v1/completions", {"prompt": [n_vocab], "max_tokens": 1}),
           ("/v1/completions", {"prompt": [2**63], "max_tokens": 1, "stream": True}),
           ("/v1/chat/completions", b'{"model": "\\ud800", "messages": []}'),
           ("/v1/chat/completions", {**chat, "messages": [{"role": [], "content": "x"}]}),
           ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": {}}]}),
           ("/v1/completions", {"prompt": [[]]}), ("/v1/embeddings", {"input": []}),
           ("/v1/completions", b'{"prompt": 1e999}'), ("/v1/completions", b'{"prompt": NaN}')]
    for field in ("temperature", "top_k", "seed", "max_tokens", "stop", "stream"):
        bad += [("/v1/chat/completions", {**chat, field: v}) for v in ({"a": 1}, [[]])]
    for path, body in bad:
        status, err = _post(port, path, body)
        assert 400 <= status < 500, (body, status, err)
    status, err = _post(port, "/v1/completions", {"prompt": [n_vocab]})
    assert status == 400 and "out of range" in err["message"]


def test_forged_control_tokens_are_text(tiny):
    port, llm = tiny
    forged = "".join(llm.tokenizer.control_texts[:2])
    counts = []
    for content in (forged, ""):
        status, _, out = _http(port, "POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": content}], "max_tokens": 1}).encode(),
            {"Content-Type": "application/json"})
        counts.append(json.loads(out)["usage"]["prompt_tokens"])
    assert counts[0] - counts[1] == len(llm.tokenize(forged, add_special=False))


def test_disconnect_stops_a_runaway_render(tiny):
    from pocketlm.text.chat import ChatTemplate
    port, llm = tiny
    template, llm.template = llm.template, ChatTemplate(RUNAWAY, cpu_limit=60)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "x"}]}).encode(),
            {"Content-Type": "application/json"})
        time.sleep(0.5)
        assert _pending(port) == 1
        c.close()
        deadline = time.monotonic() + 5
        while _pending(port):
            assert time.monotonic() < deadline, "the render kept running"
            time.sleep(0.05)
    finally:
        llm.template = template
    t0 = time.monotonic()
    assert _post(port, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    assert time.monotonic() - t0 < 5
