"""Tool calling: how each chat-template family writes a call, the grammar that enforces it, and
a streaming parser that turns the model's text into OpenAI ``tool_calls``.

Families (chosen from the template's source):

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>``, one block per call, after optional text;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (the marker is a
  control token, so the text starts at the list);
- ``firefunction``: `` functools[{"name": ..., "arguments": {...}}, ...]``;
- ``llama3`` (Llama 3.x and any other template): the whole message is one JSON object
  ``{"name": ..., "parameters": {...}}`` (``arguments`` is accepted too).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Iterator

__all__ = ["Family", "family_for", "check_tools", "tool_choice_names", "call_grammar",
           "auto_grammars",
           "ToolCallParser", "with_tool_calls", "template_messages"]


@dataclass(frozen=True)
class Family:
    name: str
    start: str        # text that opens the call(s); "" : the message itself is the call
    end: str          # text that closes each call (hermes) or "" for none
    as_list: bool     # calls written as one JSON list
    args_key: str     # the key the template's instructions use for the arguments
    trigger: str      # text at which, under tool_choice auto, the grammar switches on
    at_start: bool    # the trigger counts only as the first thing the model writes


HERMES = Family("hermes", "<tool_call>", "</tool_call>", False, "arguments", "<tool_call>",
                False)
MISTRAL = Family("mistral", "", "", True, "arguments", "[", True)
FIREFUNCTION = Family("firefunction", " functools", "", True, "arguments", " functools",
                      True)
LLAMA3 = Family("llama3", "", "", False, "parameters", "{", True)


def family_for(template_source: str) -> Family:
    src = template_source or ""
    if "<tool_call>" in src:
        return HERMES
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "functools" in src:
        return FIREFUNCTION
    return LLAMA3


def check_tools(tools) -> list[dict]:
    """``tools`` in OpenAI's shape (``{"type": "function", "function": {"name", ...}}``);
    raises ValueError naming the bad entry."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools: expected a non-empty list of {'type': 'function', "
                         "'function': {...}}")
    names = set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': "
                             "{'name': ..., 'parameters': {...}}}")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        if f["name"] in names:
            raise ValueError(f"tools[{i}]: the name {f['name']!r} is used twice")
        names.add(f["name"])
    return tools


def tool_choice_names(tools: list[dict], tool_choice) -> tuple[str, list[str]]:
    """(mode, names the model may call): mode is "none", "auto" or "required" (a named
    function is "required" with just that name)."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        return "auto", names
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, names
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
            isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ValueError(f"tool_choice: no tool is named {name!r}")
        return "required", [name]
    raise ValueError("tool_choice: expected 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}")


def _call_schema(family: Family, tools: list[dict], names: list[str]) -> dict:
    variants = []
    for t in tools:
        f = t["function"]
        if f["name"] not in names:
            continue
        params = f.get("parameters") or {"type": "object"}
        variants.append({"type": "object",
                         "properties": {"name": {"const": f["name"]}, family.args_key: params},
                         "required": ["name", family.args_key], "additionalProperties": False})
    out = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # as OpenAI's functions without "strict": true, keywords llguidance does not implement
    # are ignored rather than refused
    if not all(t["function"].get("strict") is True for t in tools
               if t["function"]["name"] in names):
        out = {**out, "x-guidance": {"lenient": True}}
    return out


def call_grammar(family: Family, tools: list[dict], names: list[str],
                 parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect, with its %json) for one call (or with
    ``parallel`` one or more) of the ``names`` tools, each call's arguments fitting that
    tool's parameter schema."""
    call = "%json " + json.dumps(_call_schema(family, tools, names))
    if family is HERMES:
        return ('start: block ("\\n" block)*\n' if parallel else "start: block\n") + (
                'block: "<tool_call>\\n" call "\\n</tool_call>"\n'
                f"call: {call}\n")
    ws = "/[ \\t\\n]*/"   # what a model may write before its call
    if family.as_list:
        more = ' (", " call)*' if parallel else ""
        opener = json.dumps(family.start) + " " if family.start else ""
        return f'start: {ws} {opener}"[" call{more} "]"\ncall: {call}\n'

    return f"start: {ws} call\ncall: {call}\n"


def auto_grammars(family: Family, tools: list[dict], names: list[str],
                  parallel: bool = True) -> list[tuple[str, str, bool]]:
    """(grammar, trigger, at_start) for tool_choice auto: the family's own format, and the
    message-level call object (bare or in a code fence) that ``ToolCallParser`` also
    accepts, so a call's arguments fit their schema whichever way the model starts it."""
    call = "call: %json " + json.dumps(_call_schema(family, tools, names)) + "\n"
    out = [(call_grammar(family, tools, names, parallel), family.trigger, family.at_start)]
    ws = "/[ \\t\\n]*/ "   # the whitespace the trigger may come after
    if family.trigger != "{":
        out.append((f"start: {ws}call\n" + call, "{", True))
    out.append((f'start: {ws}"```" /[a-z]*/ "\\n" call "\\n```"\n' + call, "```", True))
    return out


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _as_call(obj) -> dict | None:
    """An OpenAI tool call for a parsed ``{"name", "arguments"|"parameters"}``, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):   # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": _new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _parse_calls(text: str, names) -> list[dict] | None:
    """The calls in ``text`` (one call object, or a list of them) if every one names a tool."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    calls = [_as_call(o) for o in (obj if isinstance(obj, list) else [obj])]
    if not calls or any(c is None or c["function"]["name"] not in names for c in calls):
        return None
    return calls


def _unfence(text: str) -> str:
    """``text`` without a Markdown code fence around it (```json ... ```)."""
    t = text.strip()
    if t.startswith("```"):
        nl = t.find("\n")
        t = t[nl + 1:] if nl >= 0 else ""
        t = t.rstrip()
        if t.endswith("```"):
            t = t[:-3]
    return t.strip()


class ToolCallParser:
    """Feed it the model's text as it streams; it returns (content, complete calls). Text that
    could still become a call is held back; what turns out not to be one comes back as
    content. Besides its family's format, a message that is nothing but a call object (or a
    list of them), bare or in a code fence, naming one of ``names``, counts: small models
    answer that way even when their template asks for another format."""

    def __init__(self, family: Family, names):
        self.f = family
        self.names = set(names)
        self.buf = ""
        self.whole: bool | None = None   # whether the message is held to its end; None: unknown
        self.in_call = False      # hermes: inside <tool_call> ... </tool_call>
        self.seen_call = False
        opener = "{" if not family.as_list else (family.start.strip() or "[")
        self.openers = (opener, "```")

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        return self._step(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str, list[dict]]:
        if self.whole is None:
            head = self.buf.lstrip()
            if not final and any(len(head) < len(o) and o.startswith(head)
                                 for o in self.openers):
                return "", []
            self.whole = head.startswith(self.openers)
        if self.whole:
            if not final:
                return "", []
            body = _unfence(self.buf)
            if self.f.start.strip() and body.startswith(self.f.start.strip()):
                body = body[len(self.f.start.strip()):]
            calls = _parse_calls(body, self.names)
            if calls:
                self.buf = ""
                return "", calls
        if self.f is HERMES:
            return self._hermes(final)
        text, self.buf = self.buf, ""
        return text, []

    def _hermes(self, final: bool) -> tuple[str, list[dict]]:
        out, calls = [], []
        start, end = self.f.start, self.f.end

        def text(t: str) -> None:
            # the line breaks between and after calls are the format's, not an answer
            if t and not (self.seen_call and not t.strip()):
                out.append(t)

        while True:
            if not self.in_call:
                i = self.buf.find(start)
                if i < 0:
                    # hold back a possible beginning of the marker
                    keep = 0 if final else next((k for k in range(min(len(start) - 1,
                                                                      len(self.buf)), 0, -1)
                                                 if start.startswith(self.buf[-k:])), 0)
                    text(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                text(self.buf[:i])
                self.buf = self.buf[i + len(start):]
                self.in_call = True
            j = self.buf.find(end)
            if j < 0 and not final:
                break
            body = self.buf if j < 0 else self.buf[:j]
            got = _parse_calls(body.strip(), self.names)
            if got is None:   # not a call after all: the text is the model's answer
                text(start + body + ("" if j < 0 else end))
            else:
                calls += got
                self.seen_call = True
            self.buf = "" if j < 0 else self.buf[j + len(end):]
            self.in_call = False
            if j < 0:
                break
        return "".join(out), calls


def with_tool_calls(chunks: Iterator, family: Family, names) -> Iterator:
    """A chat chunk stream with tool calls split out of the text into ``chunk.tool_calls``
    deltas (OpenAI's order: id, type and name, then the arguments), and finish_reason
    "tool_calls" when the turn ends in calls."""
    parser = ToolCallParser(family, names)
    n_calls = 0
    for c in chunks:
        if c.finish_reason is None:
            c.text, calls = parser.feed(c.text)
        else:
            text, calls = parser.feed(c.text)
            tail, more = parser.finish()
            c.text, calls = text + tail, calls + more
        if calls:
            deltas = []
            for call in calls:
                fn = call["function"]
                deltas.append({"index": n_calls, "id": call["id"], "type": "function",
                               "function": {"name": fn["name"], "arguments": ""}})
                deltas.append({"index": n_calls, "function": {"arguments": fn["arguments"]}})
                n_calls += 1
            c.tool_calls = deltas
        if c.finish_reason == "stop" and n_calls:
            c.finish_reason = "tool_calls"
        yield c


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages for a chat template: tool-call arguments given as JSON text (OpenAI) become
    objects (what transformers' templates, such as Qwen2.5's ``tojson``, expect)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        args = json.loads(fn["arguments"])
                    except ValueError:
                        args = fn["arguments"]
                    c = {**c, "function": {**fn, "arguments": args}}
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
