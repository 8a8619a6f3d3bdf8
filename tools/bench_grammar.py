"""Constrained-decoding cost: grammar compilation time for a JSON schema, and what the grammar
mask adds to each decode step (``pocketlm bench MODEL --schema [FILE]``).

Compilation is timed from the schema to a matcher's first mask (llguidance's
tokenizer view is built once per model beforehand and reported apart). The decode overhead
is measured inside a constrained generation: the time spent computing masks, applying them
and advancing the matcher, against the rest of each step; the unconstrained generation of
the same prompt and length is reported beside it.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

from pocketlm.generate import constrain
from pocketlm.generate.loop import stream_generate

# a typical structured-output schema (an order), about 2 KB of JSON
ORDER_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["order_id", "customer", "items", "shipping", "payment", "status"],
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "object", "additionalProperties": False,
                     "required": ["name", "email"],
                     "properties": {"name": {"type": "string", "maxLength": 40},
                                    "email": {"type": "string", "format": "email"},
                                    "phone": {"type": "string",
                                              "pattern": "^\\+?[0-9 ]{7,15}$"},
                                    "vip": {"type": "boolean"}}},
        "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["sku", "name", "quantity", "unit_price"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "name": {"type": "string", "maxLength": 40},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "unit_price": {"type": "number", "minimum": 0},
                           "category": {"enum": ["books", "electronics", "garden", "toys",
                                                 "clothing", "food"]}}}},
        "shipping": {"type": "object", "additionalProperties": False,
                     "required": ["method", "address"],
                     "properties": {
                         "method": {"enum": ["standard", "express", "overnight", "pickup"]},
                         "address": {"type": "object", "additionalProperties": False,
                                     "required": ["street", "city", "postcode", "country"],
                                     "properties": {
                                         "street": {"type": "string", "maxLength": 60},
                                         "city": {"type": "string", "maxLength": 40},
                                         "postcode": {"type": "string",
                                                      "pattern": "^[0-9A-Z -]{3,10}$"},
                                         "country": {"type": "string",
                                                     "pattern": "^[A-Z]{2}$"}}}}},
        "payment": {"anyOf": [
            {"type": "object", "additionalProperties": False, "required": ["type", "last4"],
             "properties": {"type": {"const": "card"},
                            "last4": {"type": "string", "pattern": "^[0-9]{4}$"}}},
            {"type": "object", "additionalProperties": False, "required": ["type", "iban"],
             "properties": {"type": {"const": "transfer"},
                            "iban": {"type": "string", "maxLength": 34}}}]},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "notes": {"type": ["string", "null"], "maxLength": 200},
        "gift": {"type": "boolean"},
    },
}
PROMPT = "Write one example order for an online shop as JSON."


class _TimedGuide:
    """A guide whose mask and accept calls are timed."""

    def __init__(self, guide):
        self.guide, self.seconds, self.steps = guide, 0.0, 0

    def mask(self, logits):
        t0 = time.perf_counter()
        out = self.guide.mask(logits)
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    def accept(self, token):
        t0 = time.perf_counter()
        self.guide.accept(token)
        self.seconds += time.perf_counter() - t0


def bench_grammar(llm, schema: dict | None = None, n_gen: int = 64, reps: int = 3) -> dict:
    """Compile and decode figures for ``schema`` (default: ``ORDER_SCHEMA``) on a loaded
    decoder ``LLM``; a JSON-friendly dict."""
    schema = ORDER_SCHEMA if schema is None else schema
    tok = llm.tokenizer
    t0 = time.perf_counter()
    constrain.lltokenizer(tok)
    tokenizer_ms = (time.perf_counter() - t0) * 1e3
    zeros = np.zeros(tok.n_vocab, dtype=np.float32)
    compile_ms = []
    for _ in range(max(reps, 5)):
        t0 = time.perf_counter()
        c = constrain.Constraint(constrain.json_schema_grammar(schema, "schema"), tok, "schema")
        c.guide().mask(zeros)   # the first mask builds the lexer states it needs
        compile_ms.append((time.perf_counter() - t0) * 1e3)
    ids = tok.encode(llm.template.render([{"role": "user", "content": PROMPT}]),
                     parse_special=True)
    cfg = llm.defaults.replace(temperature=0, max_tokens=n_gen)
    free, guided, share, mask = [], [], [], []
    for _ in range(reps):
        for timed in (None, _TimedGuide(c.guide())):
            last = None
            for last in stream_generate(llm.model, tok, llm.cache, ids, cfg, llm.chunk,
                                        guide=timed):
                pass
            t = last.timings
            per_token = t.generation_s / max(t.generated_tokens, 1)
            if timed is None:
                free.append(per_token)
            else:
                guided.append(per_token)
                share.append(timed.seconds / max(t.generation_s - timed.seconds, 1e-9))
                mask.append(timed.seconds / max(timed.steps, 1))
    return {"model": llm._name, "schema_bytes": len(json.dumps(schema)),
            "tokenizer_ms": round(tokenizer_ms, 1),
            "compile_ms": round(statistics.median(compile_ms), 2),
            "decode_ms_per_token": round(statistics.median(free) * 1e3, 2),
            "constrained_ms_per_token": round(statistics.median(guided) * 1e3, 2),
            "mask_ms_per_token": round(statistics.median(mask) * 1e3, 3),
            "mask_overhead_pct": round(statistics.median(share) * 100, 2),
            "n_gen": n_gen, "repetitions": reps}


def format_grammar_table(r: dict) -> str:
    return "\n".join([
        f"model {r['model']}, schema {r['schema_bytes']} bytes",
        f"tokenizer view (once per model) {r['tokenizer_ms']:8.1f} ms",
        f"schema compile                  {r['compile_ms']:8.2f} ms",
        f"decode, free                    {r['decode_ms_per_token']:8.2f} ms/token",
        f"decode, constrained             {r['constrained_ms_per_token']:8.2f} ms/token",
        f"mask, apply, advance            {r['mask_ms_per_token']:8.3f} ms/token",
        f"mask overhead per token         {r['mask_overhead_pct']:8.2f} %",
    ])
