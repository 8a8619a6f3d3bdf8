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
