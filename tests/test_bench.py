"""`pocketlm bench`: the figures it reports are there and mean what they say."""
from __future__ import annotations

import json

import numpy as np

from pocketlm import LLM
from pocketlm.nn.ops import TimedOps


def test_timed_ops_change_no_number_and_time_every_leaf(smallthinker_tiny_path):
    with LLM.load(str(smallthinker_tiny_path), n_ctx=64) as llm:
        m = llm.model
        outs, timed = [], TimedOps(m.ops)
        for ops in (m.ops, timed):
            cache = m.new_cache(64, 16)
            for i, t in enumerate([5, 9, 14]):
                logits = m.forward(np.array([t]), np.array([i]), cache, ops=ops)
                cache.n_past += 1
            outs.append(logits)
        qtypes = {t.qtype for t in llm.gguf.tensors.values()}
    np.testing.assert_array_equal(outs[0], outs[1])
    assert {"attention", "experts", "small ops", "embed"} <= set(timed.times)
    assert any(k.startswith("matvec ") and set(k[7:].split("+")) <= qtypes
               for k in timed.times)
    assert all(v > 0 for v in timed.times.values())


def test_bench_json(smallthinker_tiny_path, capsys):
    from pocketlm.apps.cli import main
    assert main(["bench", str(smallthinker_tiny_path), "-p", "16", "-n", "4", "-d", "8", "-r", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [t["test"] for t in r["results"]] == ["pp16", "tg4 @ d8"]
    st = r["startup"]
    assert st["kernel_cache"] in ("cold", "warm") and st["load_s"] >= st["compile_s"] >= 0
    b = r["decode_breakdown"]
    assert b["depth"] == 8 and b["ms_per_token"] > 0
    # the tiny MoE's own leaves are all there: its Q4_0 matvecs, attention, the experts
    assert {"matvec Q4_0", "attention", "experts", "outside ops"} <= set(b["ms"])
