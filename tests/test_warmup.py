"""Kernels compile in worker processes at the first load of a model (a cold kernel cache), so
that neither the first prompt nor the first decoded token waits on the compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Load the model, optionally chat, and report the load's compile wait and every kernel
# specialization that had to compile in this process instead of coming from the cache.
_CHILD = r"""
import json, sys
from numba.core.dispatcher import Dispatcher
from pocketlm import LLM
import pocketlm.kernels as K
llm = LLM.load(sys.argv[1], n_ctx=512)
if sys.argv[2] == "chat":
    words = " ".join(["word"] * 40)
    for prompt in ("Hi", words):   # a short prompt and one long enough for BLAS
        llm.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=6)
    llm.generate(list(range(3, 300)), max_tokens=4, temperature=0)   # a long context
missed = []
for mod in [m for name, m in sys.modules.items() if name.startswith("pocketlm.kernels")]:
    for name, obj in vars(mod).items():
        if isinstance(obj, Dispatcher) and sum(obj.stats.cache_misses.values()):
            missed.append(f"{mod.__name__}.{name}")
missed += [str(k) for k, d in K._compiled.items() if sum(d.stats.cache_misses.values())]
print(json.dumps({"compile_s": llm.compile_s, "missed": missed}))
"""


def _run(path, home, what):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "POCKETLM_"))}
    env["POCKETLM_HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), what], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fixture", ["smallthinker_tiny_path", "qwen2_path"])
def test_first_load_compiles_everything_a_chat_needs(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    first = _run(path, tmp_path, "load")
    assert first["compile_s"] > 0            # an empty cache: the workers ran
    again = _run(path, tmp_path, "chat")
    assert again["compile_s"] == 0           # done once per model and kernel sources
    assert again["missed"] == []             # every kernel of the chat came from the cache
