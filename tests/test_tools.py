"""Tool-call parsing per template family, streamed and whole, without a model; and the
grammar of each family accepting the call it parses."""
from __future__ import annotations

import json

import pytest

from pocketlm.generate.loop import GenerationChunk, collect
from pocketlm.text import tools as T

NAMES = ["get_weather", "get_time"]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def _stream(parser, text: str, step: int):
    content, calls = [], []
    for i in range(0, len(text), step):
        c, k = parser.feed(text[i:i + step])
        content.append(c)
        calls += k
    c, k = parser.finish()
    return "".join(content) + c, calls + k


CASES = [
    (T.HERMES, "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>", "", 1),
    (T.HERMES, "Let me look.\n<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>\n"
               "<tool_call>\n" + json.dumps({"name": "get_time", "arguments": {}}) +
               "\n</tool_call>", "Let me look.\n", 2),
    (T.HERMES, "Use <tool_call> tags, e.g. <tool_call>nope</tool_call>.",
     "Use <tool_call> tags, e.g. <tool_call>nope</tool_call>.", 0),
    (T.HERMES, "```json\n" + json.dumps(CALL) + "\n```", "", 1),   # the fenced fallback
    (T.HERMES, json.dumps({"name": "rm_rf", "arguments": {}}),   # not one of the tools
     json.dumps({"name": "rm_rf", "arguments": {}}), 0),
    (T.LLAMA3, json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}}), "", 1),
    (T.LLAMA3, "It is sunny {mostly}.", "It is sunny {mostly}.", 0),
    (T.MISTRAL, json.dumps([CALL, {"name": "get_time", "arguments": {}}]), "", 2),
    (T.FIREFUNCTION, " functools" + json.dumps([CALL]), "", 1),
    (T.HERMES, "Plain answer.", "Plain answer.", 0),
]


@pytest.mark.parametrize("family,text,content,n_calls", CASES)
def test_parser_streamed_and_whole_agree(family, text, content, n_calls):
    whole = _stream(T.ToolCallParser(family, NAMES), text, len(text))
    for step in (1, 3, 7):
        got = _stream(T.ToolCallParser(family, NAMES), text, step)
        assert got[0] == whole[0] and [c["function"] for c in got[1]] == \
            [c["function"] for c in whole[1]]
    assert whole[0] == content and len(whole[1]) == n_calls
    for c in whole[1]:
        assert c["id"].startswith("call_") and c["type"] == "function"
        assert c["function"]["name"] in NAMES
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_deltas_in_openai_order_and_finish_reason():
    text = "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"
    chunks = [GenerationChunk(text[i:i + 4], 1) for i in range(0, len(text), 4)]
    chunks.append(GenerationChunk("", None, "stop"))
    out = list(T.with_tool_calls(iter(chunks), T.HERMES, NAMES))
    deltas = [d for c in out for d in c.tool_calls or ()]
    assert deltas[0]["id"] and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert set(deltas[1]) == {"index", "function"} and all(d["index"] == 0 for d in deltas)
    r = collect(iter(out))
    assert r.finish_reason == "tool_calls" and r.text == ""
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_families_and_tool_checks():
    assert T.family_for("{{ '<tool_call>' }}") is T.HERMES
    assert T.family_for("[TOOL_CALLS]") is T.MISTRAL
    assert T.family_for("functools[") is T.FIREFUNCTION
    assert T.family_for("{{ messages }}") is T.LLAMA3
    tools = [{"type": "function", "function": {"name": n}} for n in NAMES]
    assert T.tool_choice_names(tools, None) == ("auto", NAMES)
    assert T.tool_choice_names(tools, {"type": "function", "function": {"name": "get_time"}}) \
        == ("required", ["get_time"])
    for bad in ([], [{"type": "function"}], [{"type": "function", "function": {"name": "a"}}] * 2,
                [{"type": "function", "function": {"name": "a", "parameters": 3}}]):
        with pytest.raises(ValueError, match="tools"):
            T.check_tools(bad)
    with pytest.raises(ValueError, match="tool_choice"):
        T.tool_choice_names(tools, "sometimes")


def test_template_messages_turn_argument_text_into_objects():
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    out = T.template_messages(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # untouched
