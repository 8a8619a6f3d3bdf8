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


def test_streamed_decode_figures_are_the_decode_s_own(smallthinker_tiny_path):
    """Under a memory budget a decode test's cache figures cover what its read log holds,
    the decode's reads, not the prefill of its context; with text routing each repetition
    reads on through the text."""
    import pytest
    from pocketlm.experts.budget import MemoryBudgetError
    from pocketlm.tools import bench
    from test_experts import _reported_minimum
    with pytest.raises(MemoryBudgetError) as e:
        LLM.load(str(smallthinker_tiny_path), n_ctx=64, memory_budget="1MiB")
    with LLM.load(str(smallthinker_tiny_path), n_ctx=64,
                  memory_budget=_reported_minimum(e.value)) as llm:
        text = list(range(3, 200))
        for r in (1, 2):
            log = []
            _, figures = bench._run(llm, "tg", 6, 12, r, text, log, experts=llm.model.experts)
            assert figures.reads == len(log) > 0
        assert bench._stretch(text, 19, 1) == text[19:38] != bench._stretch(text, 19, 2)
        assert bench._stretch(text, 19, 10) == text[11:30]   # 190 wraps past 197 - 19
