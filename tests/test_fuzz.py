"""Hostile model files: a seeded mutational fuzzer (pocketlm.tools.fuzz_gguf) over the tiny
SmallThinker and SmolLM2's header. Every case must load and evaluate to finite logits or fail
with a one-line error: no crash, hang, traceback or non-finite logits."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

CASES = 300
LIMIT_S = 180


def test_mutated_headers_load_or_fail_in_one_line(smallthinker_tiny_path, smollm2_path):
    # a process of its own: Numba's bounds checks must be on before Numba is imported
    r = subprocess.run([sys.executable, "-m", "pocketlm.tools.fuzz_gguf", str(CASES), "--json",
                        "--seed", "1", "--model", f"smallthinker={smallthinker_tiny_path}",
                        "--model", f"smollm2={smollm2_path}"],
                       capture_output=True, text=True, timeout=LIMIT_S)
    assert r.stdout, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert sum(report["counts"].values()) == CASES
    assert not report["failures"], "\n".join(
        f"{f['model']} {f['mutation']}: {f['outcome']} {f['detail']}"
        for f in report["failures"][:20])
    assert r.returncode == 0


def test_cli_reports_an_unsupported_tokenizer_in_one_line(smallthinker_tiny_path, tmp_path):
    from pocketlm.tools.fuzz_gguf import U32, U64, load_base, write_case
    base = load_base("smallthinker", smallthinker_tiny_path)
    s, e = base.spans["tokenizer.ggml.model"]
    header = base.header[:s] + struct.pack(U32, 8) + struct.pack(U64, 2) + b"t5" + \
        base.header[e:]
    path = tmp_path / "t5.gguf"
    write_case(base, header, None, path)
    r = subprocess.run([sys.executable, "-m", "pocketlm.apps", "run", str(path), "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr == f"pocketlm: error: {path}: tokenizer model 't5' is not supported\n"
