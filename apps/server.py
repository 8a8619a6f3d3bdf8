"""`pocketlm serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn).

The socket is bound first and the model loads in the background (``/health`` answers 503
until it is ready). Each generation runs in its own thread behind the model's first-come
first-served lock (``runtime.concurrency.AsyncLLM``), so the event loop never waits on the
model. A client that goes away, while queued or while generating, cancels its own generation
only. The server holds one model and answers to any ``model`` name a client sends (as
llama-server does), reporting its own. Bad requests get OpenAI's error object with status 400
(413 for a body over ``max_body``, 415 for a POST body that is not ``application/json``: a web
page can send ``text/plain`` without a CORS preflight, so that is refused).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pocketlm.api.async_llm import AsyncLLM
from pocketlm.api.config import LoadConfig
from pocketlm.api.llm import LLM, ProgressFn
from pocketlm.generate.constrain import ConstraintError
from pocketlm.generate.loop import ContextOverflowError
from pocketlm.apps.openai_compat import (RequestError, StreamAdapter, chat_completion, chat_messages,
                                   completion_prompt, error_body, settings_from_request,
                                   stream_requested, text_completion, tool_settings)


MAX_BODY = 8 << 20    # bytes of a request body (default of ``max_body``)
MAX_JSON_DEPTH = 64   # nesting of arrays and objects in a request body
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \ud800 escapes decode to lone surrogates


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def model_id_for(model: str) -> str:
    """The id a model is served under: its store name, or a .gguf file's stem."""
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else model


class _State:
    def __init__(self, model_id: str):
        self.model_id = model_id
        self.allm: AsyncLLM | None = None
        self.error: str | None = None
        self.created = 0


def create_app(load: Callable[[], object], model_id: str, *, cors: list[str] | None = None,
               system: str | None = None, on_load_error: Callable[[str], None] | None = None,
               log: Callable[[str], None] | None = None, max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app. ``load()`` returns an ``LLM``; it runs in a thread once the server starts.

    ``cors``: origins allowed to call the API from a browser (none by default).
    ``max_body``: the largest request body in bytes (larger ones get 413).
    ``system``: system prompt for chat requests that bring none.
    ``on_load_error(message)`` is told when loading fails (the app then answers 503).
    ``log(line)`` gets one line of timings per finished generation.
    """
    state = _State(model_id)

    async def load_in_background():
        try:
            llm = await asyncio.to_thread(load)
        except Exception as e:  # reported to the operator; clients see 503 with the reason
            state.error = str(e) or type(e).__name__
            if on_load_error is not None:
                on_load_error(state.error)
            return
        state.allm = AsyncLLM(llm)
        state.created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            task.cancel()
            if state.allm is not None:
                await state.allm.close()

    def ready() -> AsyncLLM:
        if state.allm is None:
            msg = (f"the model failed to load: {state.error}" if state.error
                   else "the model is still loading; retry when /health answers 200")
            raise RequestError(msg, status=503, code="model_not_ready", type="server_error")
        return state.allm

    def check_model(body: dict):
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise RequestError("'model' must be a string", "model")
        # any other name is this model: clients send their own default names

    async def health(request: Request):
        if state.allm is not None:
            return JSONResponse({"status": "ok", "model": state.model_id,
                                 "pending": state.allm.pending})
        if state.error:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.created,
             "owned_by": "pocketlm"}]})

    async def completions(request: Request, kind: str):
        body = await _json_body(request, max_body)
        check_model(body)
        allm = ready()
        settings = settings_from_request(body, kind)
        stream, include_usage = stream_requested(body)
        if kind == "chat":
            settings.update(tool_settings(body))
            msgs = chat_messages(body)
            if system and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": system})
            chunks = await allm.chat(msgs, stream=True, **settings)
        else:
            chunks = await allm.generate(completion_prompt(body), stream=True, **settings)
        if log is not None:
            chunks = _logged(chunks, log, kind)
        adapter = StreamAdapter(kind, state.model_id, include_usage)
        if not stream:
            result = await _unless_disconnected(request, _collect(chunks))
            make = chat_completion if kind == "chat" else text_completion
            return JSONResponse(make(result, state.model_id))
        # the first chunk comes after prefill: errors such as an overlong prompt still get
        # their status code instead of a broken stream
        first = await _unless_disconnected(request, chunks.__anext__())
        return StreamingResponse(_sse(first, chunks, adapter), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def chat(request: Request):
        return await completions(request, "chat")

    async def text(request: Request):
        return await completions(request, "text")

    async def embeddings(request: Request):
        body = await _json_body(request, max_body)
        check_model(body)
        llm = ready().llm
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or \
                not all(isinstance(t, str) and t for t in texts):
            raise RequestError("'input' must be a non-empty string or a list of them", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError("'encoding_format' must be float or base64", "encoding_format")
        if not llm.model.capabilities.embed:
            raise RequestError(f"model '{state.model_id}' does not produce embeddings "
                               "(serve an encoder model for /v1/embeddings)", "model",
                               code="embeddings_not_supported")

        def work():
            vecs = np.asarray(llm.embed(texts), dtype=np.float32)
            n_tokens = sum(len(llm.tokenize(t)) for t in texts)
            return vecs, n_tokens

        try:
            vecs, n_tokens = await asyncio.to_thread(work)
        except ValueError as e:  # e.g. a decoder-only model: no embeddings
            raise RequestError(str(e), "model", code="embeddings_not_supported") from None
        data = []
        for i, v in enumerate(vecs):
            emb = (base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64"
                   else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return JSONResponse({"object": "list", "data": data, "model": state.model_id,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", _errors(chat), methods=["POST"]),
        Route("/v1/completions", _errors(text), methods=["POST"]),
        Route("/v1/embeddings", _errors(embeddings), methods=["POST"]),
    ]
    middleware = []
    if cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["*"]))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


# -- request plumbing --------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: Request, max_body: int) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(f"the request body must be sent as Content-Type: application/json, "
                           f"not {ctype or 'none'}", status=415, code="unsupported_media_type")
    too_big = RequestError(f"the request body exceeds {max_body} bytes", status=413,
                           code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():  # counted as it arrives: the length may be absent
        raw += chunk
        if len(raw) > max_body:
            raise too_big
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"malformed JSON in request body: {e}") from None
    except RecursionError:
        raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") \
            from None
    _check_json(body)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _check_json(body) -> None:
    """Refuse deep nesting (later recursive code would overflow) and lone surrogates (no
    UTF-8 for them: tokenizing or echoing one in an error would fail)."""
    stack = [(body, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise RequestError("the request body contains a lone UTF-16 surrogate")
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} "
                                   "levels")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items)


def _errors(handler):
    """Requests the API refuses become OpenAI error objects; only our own bugs are 500s."""
    async def wrapped(request: Request):
        try:
            return await handler(request)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except ConstraintError as e:   # a schema or grammar llguidance cannot use
            return JSONResponse(error_body(str(e), e.param), status_code=400)
        except ContextOverflowError as e:
            return JSONResponse(error_body(str(e), "messages" if "chat" in request.url.path
                                           else "prompt", "context_length_exceeded"),
                                status_code=400)
        except ValueError as e:  # settings or a chat template that refuses the conversation
            return JSONResponse(error_body(str(e)), status_code=400)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
    return wrapped


async def _http_error(request: Request, exc: HTTPException):
    kind = "not_found" if exc.status_code == 404 else None
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                   code=kind), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception):
    traceback.print_exception(exc, file=sys.stderr)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                   type="server_error"), status_code=500)


async def _wait_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``; if the client disconnects first, cancel it (which cancels its
    generation) and raise ``_ClientGone``."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        work.cancel()
        raise
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise _ClientGone()
    return work.result()


async def _collect(chunks):
    from pocketlm.generate.loop import collect
    got = [c async for c in chunks]
    return collect(iter(got))


async def _logged(chunks, log: Callable[[str], None], kind: str):
    async with contextlib.aclosing(chunks):  # closing this stream closes the generation's
        async for c in chunks:
            if c.timings is not None:
                t = c.timings
                log(f"{kind}: {c.finish_reason} | prompt {t.prompt_tokens} tok, "
                    f"{t.prompt_tps:.1f} tok/s | generation {t.generated_tokens} tok, "
                    f"{t.generation_tps:.1f} tok/s | peak RSS "
                    f"{t.peak_rss_bytes / 2**20:.0f} MiB")
            yield c


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(first, chunks, adapter: StreamAdapter):
    """Server-sent events: one per non-empty delta, ``data: [DONE]`` at the end. On a
    disconnect Starlette cancels this generator, and closing ``chunks`` stops the generation."""
    try:
        for obj in adapter.feed(first):
            yield _event(obj)
        async for chunk in chunks:
            for obj in adapter.feed(chunk):
                yield _event(obj)
    except Exception as e:  # the status line is sent: report in-band, as OpenAI does
        traceback.print_exception(e, file=sys.stderr)
        yield _event(error_body(f"generation failed: {e}", type="server_error"))
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


# -- running -----------------------------------------------------------------------------------
def serve(model: str, *, host: str = "127.0.0.1", port: int = 8080,
          cors: list[str] | None = None, max_body: int = MAX_BODY, alias: str | None = None,
          config: LoadConfig | None = None,
          progress: ProgressFn | None = None,
          settings: dict | None = None, system: str | None = None, verbose: bool = False,
          announce: Callable[[str], None] | None = None) -> int:
    """Bind ``host:port`` (port 0: any free port), then load ``model`` in the background and
    serve until interrupted. Returns the exit code (1 if the model failed to load).

    ``config`` (a ``LoadConfig``; None: the defaults) and ``progress`` go to ``LLM.load``;
    ``settings`` (``GenerationConfig`` fields) are the defaults for what a request leaves out;
    ``verbose`` logs requests and their timings; ``max_body`` is the largest request body
    in bytes; ``alias`` is the name ``/v1/models`` lists and responses report (default: the
    store name or the file's stem).
    """
    import uvicorn

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)  # clients queue from now on, even before the loop runs
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = sock.getsockname()[1]
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str):
        failed.append(message)
        print(f"pocketlm: error: {message}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    def load():
        llm = LLM.load(model, config, progress=progress)
        llm.defaults = llm.defaults.replace(**(settings or {}))
        return llm

    def log(line: str):
        print(line, file=sys.stderr, flush=True)

    mid = alias or model_id_for(model)
    app = create_app(load, mid, cors=cors, system=system, on_load_error=on_load_error,
                     log=log if verbose else None, max_body=max_body)
    # not named `config`: load() above reads the LoadConfig of that name when it runs
    uv_config = uvicorn.Config(app, http="h11", loop="asyncio", ws="none", lifespan="on",
                               log_level="info" if verbose else "warning",
                               access_log=verbose, timeout_graceful_shutdown=5)
    server = uvicorn.Server(uv_config)
    url_host = f"[{host}]" if ":" in host else host
    if announce is not None:
        announce(f"serving {mid} on http://{url_host}:{bound}/v1 (GET /health is 200 once "
                 "the model is loaded)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises Ctrl+C
        pass
    return 1 if failed else 0
