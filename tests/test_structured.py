"""Structured output on Qwen2.5-Coder-0.5B-Instruct: JSON schemas, json_object, tools and
tool_choice through `pocketlm serve` and the official `openai` client; regexes, grammars and
logprobs through the Python API, the logprobs checked against LLM.eval."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import openai
import pytest

from tests.conftest import serving

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string"},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone.",
    "parameters": {"type": "object",
                   "properties": {"timezone": {"type": "string",
                                               "enum": ["UTC", "Europe/Paris", "Asia/Tokyo"]},
                                  "format": {"type": "string", "enum": ["12h", "24h"]}},
                   "required": ["timezone", "format"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(qwen2_path, tmp_path_factory):
    with serving(qwen2_path, tmp_path_factory.mktemp("serve"), "--alias", "qwen") as (port, _):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                            max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(qwen2_path):
    from pocketlm.api.llm import LLM
    with LLM.load(str(qwen2_path), n_ctx=1024) as m:
        yield m


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="qwen", messages=messages, temperature=0,
                                          max_tokens=kw.pop("max_tokens", 80), **kw)


def _args(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


# ---- tools -----------------------------------------------------------------------------------

def test_weather_round_trip(client):
    r = _chat(client, ASK_WEATHER, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert _args(call, WEATHER)["city"] == "Paris"
    # the result goes back through the template as a "tool" message
    convo = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}]
    # "none" asks for the answer: under "auto" this 0.5B model calls the tool again
    r = _chat(client, convo, tools=[WEATHER, TIME], tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "21" in r.choices[0].message.content   # only the tool's result says 21


def test_streamed_tool_call_deltas_assemble_to_the_same_call(client):
    whole = _chat(client, ASK_WEATHER, tools=[WEATHER]).choices[0].message.tool_calls
    calls, finish = {}, None
    for ev in _chat(client, ASK_WEATHER, tools=[WEATHER], stream=True):
        for ch in ev.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or ():
                if d.index not in calls:   # OpenAI's order: id, type and name come first
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and not d.function.name
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and len(calls) == len(whole) == 1
    assert calls[0]["name"] == whole[0].function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole[0].function.arguments)


def test_tool_choice_required_and_named(client):
    # nothing here asks for a tool: the grammar makes the call, with valid arguments
    hello = [{"role": "user", "content": "Say hello."}]
    r = _chat(client, hello, tools=[WEATHER, TIME], tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    for call in r.choices[0].message.tool_calls:
        _args(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    r = _chat(client, ASK_WEATHER, tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert set(_args(calls[0], TIME)) == {"timezone", "format"}
    r = _chat(client, ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content


# ---- JSON schemas ----------------------------------------------------------------------------

def _obj(props: dict, required=None, **kw) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


STR, INT, NUM, BOOL = ({"type": t} for t in ("string", "integer", "number", "boolean"))
SCHEMAS = [
    ("a person", _obj({"name": STR, "age": INT})),
    ("a book", _obj({"title": STR, "year": {"type": "integer", "minimum": 1450,
                                            "maximum": 2030}, "isbn": STR}, ["title", "year"])),
    ("a traffic light state", _obj({"color": {"enum": ["red", "amber", "green"]}})),
    ("a list of three fruits", _obj({"fruits": {"type": "array", "items": STR,
                                                "minItems": 3, "maxItems": 3}})),
    ("a point in 3D", _obj({"x": NUM, "y": NUM, "z": NUM})),
    ("a user with an address", _obj({"user": _obj({"name": STR, "address": _obj(
        {"street": STR, "city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})})),
    ("a todo item", _obj({"task": STR, "done": BOOL, "priority": {"enum": [1, 2, 3]}})),
    ("a matrix of 2 rows of 2 integers", _obj({"rows": {"type": "array", "minItems": 2,
                                                        "maxItems": 2, "items": {
        "type": "array", "items": INT, "minItems": 2, "maxItems": 2}}})),
    ("a product with tags", _obj({"name": STR, "price": {"type": "number", "minimum": 0},
                                  "tags": {"type": "array", "items": {"enum": [
                                      "new", "sale", "popular"]}, "maxItems": 3}})),
    ("an HTTP response", _obj({"status": {"type": "integer", "enum": [200, 404, 500]},
                               "headers": _obj({"content_type": STR}),
                               "body": {"type": ["string", "null"]}})),
    ("a yes or no answer to: is water wet?", {"type": "boolean"}),
    ("the number of legs of a spider", {"type": "integer", "minimum": 0, "maximum": 100}),
    ("a shape: either a circle with a radius or a square with a side",
     {"anyOf": [_obj({"kind": {"const": "circle"}, "radius": NUM}),
                _obj({"kind": {"const": "square"}, "side": NUM})]}),
    ("a chess move", _obj({"piece": {"enum": ["king", "queen", "rook", "bishop", "knight",
                                              "pawn"]},
                           "from": {"type": "string", "pattern": "^[a-h][1-8]$"},
                           "to": {"type": "string", "pattern": "^[a-h][1-8]$"}})),
    ("an event with a date", _obj({"name": STR, "date": {"type": "string", "format": "date"}})),
    ("a team of two members, each with a name and a role",
     _obj({"team": STR, "members": {"type": "array", "minItems": 2, "maxItems": 2,
                                    "items": _obj({"name": STR, "role": STR})}})),
    ("a recipe", {"$defs": {"ingredient": _obj({"item": STR, "grams": INT})},
                  **_obj({"title": STR, "ingredients": {"type": "array", "maxItems": 4,
                                                        "items": {"$ref": "#/$defs/ingredient"}}})}),
    ("a color in RGB", _obj({"r": {"type": "integer", "minimum": 0, "maximum": 255},
                             "g": {"type": "integer", "minimum": 0, "maximum": 255},
                             "b": {"type": "integer", "minimum": 0, "maximum": 255}})),
    ("a short username", _obj({"username": {"type": "string", "minLength": 3,
                                            "maxLength": 12, "pattern": "^[a-z]+$"}})),
    ("a configuration with optional fields", _obj(
        {"debug": BOOL, "level": {"enum": ["info", "warn", "error"]}, "retries": INT,
         "name": STR}, ["level"])),
]


@pytest.mark.parametrize("what,schema", SCHEMAS, ids=[s[0][:24] for s in SCHEMAS])
def test_json_schema_answers_validate(client, what, schema):
    r = _chat(client, [{"role": "user", "content": f"Give me {what} as JSON."}],
              max_tokens=160, response_format={
                  "type": "json_schema",
                  "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_mode(client):
    r = _chat(client, [{"role": "user", "content": "Name a cat and give its age."}],
              max_tokens=120,
              response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_schemas_and_tools_are_400(client):
    for fmt, words in [({"type": "json_schema", "json_schema": {"name": "x",
                                                               "schema": {"type": 42}}},
                        "type must be"),
                       # strict: a keyword llguidance cannot enforce is refused, not ignored
                       ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                               "schema": {"type": "array",
                                                                          "uniqueItems": True}}},
                        "uniqueItems"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
                           "type": "object", "properties": {
                               f"p{i}": {"type": "string", "description": "x" * 64}
                               for i in range(1000)}}}}, "larger than"),
                       ({"type": "yaml"}, "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, ASK_WEATHER, response_format=fmt)
        assert e.value.body["param"] == "response_format" and words in e.value.body["message"]
        assert "\n" not in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, ASK_WEATHER, tools=[WEATHER],
              tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qwen", prompt="x", extra_body={"regex": "(a"})
    assert e.value.body["param"] == "regex"


# ---- logprobs --------------------------------------------------------------------------------

def test_server_logprobs_chat_stream_and_completions(client):
    msgs = [{"role": "user", "content": "Name a color."}]
    r = _chat(client, msgs, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0])   # greedy picks the most likely
        assert bytes(e.bytes).decode() == e.token
    streamed = [e for ev in _chat(client, msgs, max_tokens=6, logprobs=True, top_logprobs=3,
                                  stream=True)
                for ch in ev.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # the repeated prompt comes from the KV cache, so its last token runs alone instead of in
    # the batch, and the decode steps' 8-bit activations carry that difference on
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content],
                                                          abs=0.25)
    c = client.completions.create(model="qwen", prompt="The capital of France is", max_tokens=3,
                                  temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.fixture
def exact_llm(llm):
    """The model with float32 activations in decode too: decode steps then give the logits
    eval gives for the same tokens, to rounding."""
    from pocketlm import nn
    ops, llm.model.ops = llm.model.ops, nn.EXACT
    yield llm
    llm.model.ops = ops


def test_logprobs_cover_the_vocabulary_and_match_eval(exact_llm):
    llm = exact_llm
    n = llm.tokenizer.n_vocab
    prompt = llm.tokenize("The capital of France is")
    r = llm.generate(prompt, max_tokens=3, temperature=0, logprobs=True, top_logprobs=n)
    assert len(r.logprobs) == 3
    for i, e in enumerate(r.logprobs):
        ids = np.array([t for t, _, _ in e.top])
        lps = np.array([lp for _, _, lp in e.top])
        assert sorted(ids) == list(range(n))
        assert np.exp(lps).sum() == pytest.approx(1.0, abs=1e-9)
        assert e.token == r.tokens[i] and e.logprob == lps[0]
        ref = _log_softmax(llm.eval(prompt + r.tokens[:i], last_n=1)[-1])
        assert np.abs(lps - ref[ids]).max() < 1e-6
    # under a grammar the probability stays on what the grammar allows, and still sums to 1
    r = llm.generate(prompt, max_tokens=2, temperature=0, logprobs=True, top_logprobs=n,
                     regex=" (Paris|Rome)")
    first = r.logprobs[0]
    live = [llm.tokenizer.token_bytes(t) for t, _, lp in first.top if lp > -np.inf]
    assert live and all(b" Paris".startswith(b) or b" Rome".startswith(b) for b in live)
    assert np.exp([lp for _, _, lp in first.top]).sum() == pytest.approx(1.0, abs=1e-6)


# ---- regex and grammars (Python API) ---------------------------------------------------------

def test_auto_tool_grammar_switches_on_at_the_call(llm):
    from pocketlm.generate import constrain
    from pocketlm.text import tools
    tok = llm.tokenizer
    c = constrain.Constraint(tools.call_grammar(tools.HERMES, [WEATHER], ["get_weather"]), tok,
                             "tools")
    guide = constrain.LazyGuide(c, "<tool_call>")
    x = np.zeros(tok.n_vocab, np.float32)
    for t in tok.encode("Let me check. <tool_call>\n", add_special=False):
        assert (guide.active is None) == np.isfinite(guide.mask(x)).all()
        guide.accept(t)
    allowed = np.isfinite(guide.mask(x))
    assert guide.active is not None and 0 < allowed.sum() < 50
    assert allowed[tok.encode('{"', add_special=False)[0]]
    assert not allowed[tok.encode("Hello", add_special=False)[0]]


def test_regex_and_grammars(llm):
    r = llm.generate("My phone number is", max_tokens=12, temperature=0,
                     regex=r" [0-9]{3}-[0-9]{4}\.")
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}\.", r.text) and r.finish_reason == "stop"
    lark = 'start: " " answer "."\nanswer: "yes" | "no" | "maybe"\n'
    gbnf = 'root ::= " " ("yes" | "no" | "maybe") "."'
    for grammar in (lark, gbnf):
        for seed in range(3):   # sampled at temperature 1.5: the mask holds under any setting
            r = llm.chat([{"role": "user", "content": "Is the sea salty?"}], grammar=grammar,
                         max_tokens=8, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                         seed=seed)
            assert r.text in (" yes.", " no.", " maybe.") and r.finish_reason == "stop"
    with pytest.raises(ValueError, match="grammar"):
        llm.generate("x", grammar="start: ((", max_tokens=1)
    with pytest.raises(ValueError, match="only one constraint"):
        llm.generate("x", grammar=lark, regex="a", max_tokens=1)
