"""`pocketlm chat` driven through its standard input: an answer streams, slash commands work,
the conversation's cache carries over, /bye leaves."""
from __future__ import annotations

import re
import subprocess
import sys


def test_chat_session(smollm2_path):
    script = "\n".join([
        "What is 2+2? Answer with a number.",
        "/set temp 0",
        "/set nonsense 1",
        "/stats",
        "And 3+3?",
        "/stats",
        "/bye",
    ]) + "\n"
    r = subprocess.run(
        [sys.executable, "-m", "pocketlm.apps", "chat", str(smollm2_path), "-c", "512", "--temp", "0",
         "-n", "16"],
        input=script, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "4" in out
    assert "(temperature = 0.0)" in out
    assert "usage: /set NAME VALUE" in out
    first, second = [int(m) for m in re.findall(r"prompt (\d+) tok at", out)]
    # the second turn reuses the cache of the first: only the new messages are processed
    assert second < first


def test_chat_unknown_model_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "pocketlm.apps", "chat", "no-such-model"],
                       input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("pocketlm: error: unknown model")
    assert r.stderr.strip().count("\n") == 0
