"""`pocketlm chat` in a pseudo-terminal, as a person uses it: a progress bar while the model
loads, a streamed answer, Ctrl+C stopping a long answer without leaving, multi-line input,
/bye."""
from __future__ import annotations

import os
import sys

import pexpect


def test_chat_in_a_terminal(smollm2_path):
    child = pexpect.spawn(sys.executable, ["-m", "pocketlm.apps", "chat", str(smollm2_path), "-c", "1024",
                                           "--temp", "0", "-n", "400"],
                          encoding="utf-8", timeout=300, dimensions=(40, 120),
                          env={**os.environ, "TERM": "xterm"})  # CI may have no TERM
    try:
        child.expect("load")  # rich draws the loading bar on the terminal's stderr
        child.expect(">>> ")
        child.sendline("What is 2+2? Answer with a number.")
        child.expect("4")
        child.expect(">>> ")

        child.sendline("Count from 1 to 300, separated by commas.")
        child.expect(r"\d{6}|\d+, \d+, \d+, ")  # the answer is streaming...
        child.sendintr()                  # ...and Ctrl+C stops it
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        assert child.isalive()

        child.sendline('"""')             # a multi-line message
        child.expect(r"\.\.\. ")
        child.sendline("What is 3+3?")
        child.expect(r"\.\.\. ")
        child.sendline('Answer with a number."""')
        child.expect(">>> ")              # one answer to the three lines
        assert child.before.split('"""', 1)[1].strip()

        child.sendline("/stats")
        child.expect(r"prompt (\d+) tok at")
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_cold_first_chat(qwen2_path, tmp_path):
    """README's first command as a newcomer meets it: no model in the store and no compiled
    kernels. Every stage shows and then leaves the screen before the prompt; the answer
    streams as the same text the Python API gives, with no bar drawn into it."""
    import re

    from pocketlm import LLM

    question = "What is the capital of France?"
    with LLM.load(str(qwen2_path), n_ctx=512) as llm:
        want = llm.chat([{"role": "user", "content": question}], temperature=0,
                        max_tokens=12).text
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "POCKETLM_"))}
    env.update(TERM="xterm", POCKETLM_HOME=str(tmp_path / "home"))
    child = pexpect.spawn(sys.executable, ["-m", "pocketlm.apps", "chat", "--temp", "0",
                                           "-n", "12", "-c", "512"],
                          encoding="utf-8", timeout=600, dimensions=(40, 120), env=env)
    try:
        child.expect(">>> ")
        screen = child.before
        for stage in ("download", "extract", "load", "compile"):
            assert f"qwen2.5-coder-0.5b: {stage}" in screen, stage
        child.sendline(question)
        child.expect(">>> ")
        after = child.before
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", after).replace("\r\n", "\n")
    echoed, answer = text.split("\n", 1)
    assert echoed == question                  # the typed line echoes
    assert answer.strip() == want.strip()      # tokens stream in place, nothing else drawn
    assert "━" not in after and "qwen2.5-coder-0.5b:" not in after
    assert (tmp_path / "home" / "models" / "qwen2.5-coder-0.5b").is_dir()
