"""OpenAI-shaped dicts at the edge of the typed API.

Requests: :func:`settings_from_request`, :func:`chat_messages` and :func:`completion_prompt`
turn an OpenAI request body into ``GenerationConfig`` settings and the LLM's inputs, raising
:class:`RequestError` (message + offending parameter) for anything the API would refuse.
Responses: :func:`chat_completion` / :func:`text_completion` build the blocking responses from a
``GenerationResult``; :class:`StreamAdapter` turns a generation's ``GenerationChunk`` stream into
``chat.completion.chunk`` / ``text_completion`` dicts. The server and Python callers share them.
"""
from __future__ import annotations

import time
import uuid

from pocketlm.generate.loop import (GenerationChunk, GenerationConfig, GenerationResult,
                                    TokenLogprob)

__all__ = ["RequestError", "error_body", "settings_from_request", "tool_settings",
           "chat_messages", "completion_prompt", "chat_completion", "text_completion",
           "chat_logprobs", "text_logprobs", "StreamAdapter", "usage"]


class RequestError(ValueError):
    """A request the OpenAI API would refuse; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.type = param, status, code, type

    def body(self) -> dict:
        return error_body(str(self), self.param, self.code, self.type)


def error_body(message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests ----------------------------------------------------------------------------------
# OpenAI name -> GenerationConfig field; top_k, min_p and repeat_penalty are llama.cpp's
# server extensions, sent by clients through extra_body.
_FLOATS = {"temperature": "temperature", "top_p": "top_p", "min_p": "min_p",
           "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
           "repeat_penalty": "repeat_penalty"}
_INTS = {"top_k": "top_k", "seed": "seed"}
# accepted only at their no-op value: anything else would be silently ignored
_UNSUPPORTED = {"echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                "logit_bias": (None, {}), "functions": (None, []), "function_call": (None,),
                "audio": (None,),
                "prediction": (None,)}
MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}   # OpenAI's bounds


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def settings_from_request(body: dict, kind: str = "chat") -> dict:
    """``GenerationConfig`` settings from an OpenAI request body (absent fields: the LLM's
    defaults) of a "chat" or "text" completion. Raises ``RequestError`` naming the parameter
    that is wrong or unsupported."""
    out: dict = {}
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name, None) not in allowed:
            raise RequestError(f"'{name}' is not supported by this server", name)
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("only n=1 is supported", "n")
    out.update(_logprob_settings(body, kind))
    fmt = body.get("response_format")
    if fmt is not None:
        out["response_format"] = fmt
    for name in ("grammar", "regex"):   # llama.cpp's and vLLM's extensions, via extra_body
        if body.get(name) is not None:
            out[name] = body[name]
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v) or v < 1:
            raise RequestError(f"'{name}' must be a positive integer", name)
        out.setdefault("max_tokens", v)
    for table, check, kind in ((_FLOATS, _is_number, "a number"), (_INTS, _is_int, "an integer")):
        for name, field in table.items():
            v = body.get(name)
            if v is None:
                continue
            if not check(v):
                raise RequestError(f"'{name}' must be {kind}", name)
            out[field] = v
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
        out["stop"] = stop
    for name, value in out.items():  # range checks live in one place: GenerationConfig
        if name == "top_logprobs":
            continue   # needs logprobs: checked with it below
        try:
            GenerationConfig().replace(**{name: value})
        except ValueError as e:
            raise RequestError(str(e), _param_name(name, body)) from None
    return out


def _logprob_settings(body: dict, kind: str) -> dict:
    """Chat takes ``logprobs`` (bool) and ``top_logprobs`` (0..20); completions take
    ``logprobs`` as the number of top tokens (0..5)."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    limit = MAX_TOP_LOGPROBS[kind]
    if kind == "text":
        if lp is None:
            return {}
        if not _is_int(lp) or not 0 <= lp <= limit:
            raise RequestError(f"'logprobs' must be an integer from 0 to {limit}", "logprobs")
        return {"logprobs": True, "top_logprobs": lp}
    if lp is not None and not isinstance(lp, bool):
        raise RequestError("'logprobs' must be true or false", "logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= limit:
            raise RequestError(f"'top_logprobs' must be an integer from 0 to {limit}",
                               "top_logprobs")
        if top and not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return {"logprobs": bool(lp), "top_logprobs": top or 0} if lp else {}


def tool_settings(body: dict) -> dict:
    """``tools`` and ``tool_choice`` of a chat request, for ``LLM.chat``."""
    from pocketlm.text.tools import check_tools, tool_choice_names
    out = {}
    tools, choice = body.get("tools"), body.get("tool_choice")
    try:
        if tools is not None:
            out["tools"] = check_tools(tools)
        if choice is not None:
            if tools is None:
                if choice != "none":
                    raise ValueError("tool_choice: there are no tools to choose from")
            else:
                tool_choice_names(tools, choice)
            out["tool_choice"] = choice
        parallel = body.get("parallel_tool_calls")
        if parallel is not None:
            if not isinstance(parallel, bool):
                raise ValueError("parallel_tool_calls must be true or false")
            if tools is not None:
                out["parallel_tool_calls"] = parallel
    except ValueError as e:
        raise RequestError(str(e), next((p for p in ("tool_choice", "parallel_tool_calls")
                                         if str(e).startswith(p)), "tools")) from None
    return out


def _param_name(field: str, body: dict) -> str:
    if field == "max_tokens" and "max_completion_tokens" in body:
        return "max_completion_tokens"
    return field


def stream_requested(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) of a request."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    return stream, bool(opts.get("include_usage", False))


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def chat_messages(body: dict) -> list[dict]:
    """The conversation of a chat request as ``[{"role", "content": str}]`` for the template.

    Content given as a list of parts keeps its text parts (joined); other parts are refused.
    OpenAI's "developer" role is the system prompt of older templates.
    """
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(sorted(_ROLES))}",
                               f"{where}.role")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise RequestError(f"{where}.content: only text parts are supported",
                                       f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of text parts",
                               f"{where}.content")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        # what a tool round needs: the assistant's calls, and which call a result answers
        for key, kind in (("tool_calls", list), ("tool_call_id", str), ("name", str)):
            if m.get(key) is not None:
                if not isinstance(m[key], kind):
                    raise RequestError(f"{where}.{key} must be a {kind.__name__}",
                                       f"{where}.{key}")
                msg[key] = m[key]
        for j, call in enumerate(msg.get("tool_calls", ())):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                    not isinstance(fn.get("arguments", ""), (str, dict)):
                raise RequestError(f"{where}.tool_calls[{j}] must be {{'id', 'type': 'function',"
                                   " 'function': {'name', 'arguments'}}",
                                   f"{where}.tool_calls")
        out.append(msg)
    return out


def completion_prompt(body: dict) -> str | list[int]:
    """The prompt of a completions request: a string, or token ids (one prompt only)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p):
        return p
    raise RequestError("'prompt' must be a non-empty string or a list of token ids "
                       "(one prompt per request)", "prompt")


# -- responses ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, evaluated: int | None = None) -> dict:
    """OpenAI's usage object; prompt tokens served from the KV cache (the whole prompt minus
    the ``evaluated`` ones) are reported as ``prompt_tokens_details.cached_tokens``."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if evaluated is not None:
        u["prompt_tokens_details"] = {"cached_tokens": prompt_tokens - evaluated}
    return u


def _usage_of(r) -> dict:
    return usage(r.prompt_tokens, r.completion_tokens,
                 r.timings.prompt_tokens if r.timings is not None else None)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _token_text(b: bytes) -> str:
    # a token may hold part of a character: its bytes are exact, its text shows escapes
    return b.decode("utf-8", "backslashreplace")


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat ``logprobs``: {"content": [{"token", "logprob", "bytes",
    "top_logprobs": [...]}]}."""
    if entries is None:
        return None
    return {"content": [
        {"token": _token_text(e.bytes), "logprob": e.logprob, "bytes": list(e.bytes),
         "top_logprobs": [{"token": _token_text(b), "logprob": lp, "bytes": list(b)}
                          for _, b, lp in e.top]} for e in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The completions API's ``logprobs``: parallel lists, ``text_offset`` counted from
    ``offset`` characters."""
    if entries is None:
        return None
    tokens = [_token_text(e.bytes) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(b): lp for _, b, lp in e.top} for e in entries],
            "text_offset": offsets}


def chat_completion(result: GenerationResult, model: str) -> dict:
    """A ``chat.completion`` object for a finished chat generation."""
    message = {"role": "assistant", "content": result.text}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
        message["content"] = result.text or None   # OpenAI's content beside calls
    return {"id": _new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": chat_logprobs(result.logprobs),
                         "finish_reason": result.finish_reason}],
            "usage": _usage_of(result)}


def text_completion(result: GenerationResult, model: str) -> dict:
    """A ``text_completion`` object for a finished completion."""
    return {"id": _new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": result.text,
                         "logprobs": text_logprobs(result.logprobs),
                         "finish_reason": result.finish_reason}],
            "usage": _usage_of(result)}


class StreamAdapter:
    """Dicts for one streamed generation: feed it each ``GenerationChunk`` in order.

    ``kind`` "chat" gives ``chat.completion.chunk`` objects (the first one carries the
    assistant role), "text" gives ``text_completion`` objects. Chunks whose text is held back
    (an incomplete character, a possible stop string) produce nothing. With ``include_usage``
    the stream ends with a choice-less chunk carrying ``usage``, as OpenAI's
    ``stream_options`` asks.
    """

    def __init__(self, kind: str, model: str, include_usage: bool = False):
        if kind not in ("chat", "text"):
            raise ValueError(f"stream kind {kind!r}: expected chat or text")
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = _new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self._started = False
        self._logprobs: list | None = None   # entries not sent yet
        self._offset = 0   # characters sent (the completions API's text_offset)

    def _obj(self, choices: list) -> dict:
        return {"id": self.id,
                "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False,
                logprobs: list | None = None, tool_call: dict | None = None) -> dict:
        if self.kind == "text":
            lp = text_logprobs(logprobs, self._offset)
            self._offset += len(text or "")
            return {"index": 0, "text": text or "", "logprobs": lp,
                    "finish_reason": finish_reason}
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        return {"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                "finish_reason": finish_reason}

    def feed(self, chunk: GenerationChunk) -> list[dict]:
        out = []
        if self.kind == "chat" and not self._started:
            out.append(self._obj([self._choice("", None, role=True)]))
        self._started = True
        if chunk.logprobs is not None:
            # a token whose text is held back sends its logprobs with the next text
            self._logprobs = (self._logprobs or []) + chunk.logprobs
        for d in chunk.tool_calls or ():   # one delta per chunk, as OpenAI sends them
            out.append(self._obj([self._choice(None, None, tool_call=d)]))
        if chunk.finish_reason is not None:
            out.append(self._obj([self._choice(chunk.text or None, chunk.finish_reason,
                                               logprobs=self._take_logprobs())]))
            if self.include_usage:
                last = self._obj([])
                last["usage"] = _usage_of(chunk)
                out.append(last)
        elif chunk.text:
            out.append(self._obj([self._choice(chunk.text, None,
                                               logprobs=self._take_logprobs())]))
        return out

    def _take_logprobs(self) -> list | None:
        got, self._logprobs = self._logprobs, None
        return got
