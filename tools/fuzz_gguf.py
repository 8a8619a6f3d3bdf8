"""Mutational fuzzer for model loading: a mutated GGUF header must load and evaluate two tokens
to finite logits, or fail with a one-line error (a ``ValueError``, as the CLI prints it).

Usage: ``python -m pocketlm.tools.fuzz_gguf N [--seed S] [--json] [--model NAME=PATH]...``.
Prints the count of each outcome class; exits 1 when any case crashed, hung, raised a traceback
or returned non-finite logits.

Every case runs in a child forked from a parent that has imported and warmed up pocketlm once,
so a crash or hang ends only that case. Numba's bounds checks are on (out-of-bounds reads raise
instead of reading past a buffer), one Numba thread on the fork-safe workqueue layer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# read by Numba at import: the parent re-executes itself with them when they are missing
FUZZ_ENV = {"NUMBA_BOUNDSCHECK": "1", "NUMBA_THREADING_LAYER": "workqueue",
            "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            # the parent has every kernel loaded; mutants need no compiling workers
            "POCKETLM_PRECOMPILE": "0"}
FAILURES = ("crash", "hang", "traceback", "nonfinite")
CASE_TIMEOUT = 20.0
N_CTX = 8
BOUNDARY = (0, 1, 2, 3, 7, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 4096, 65535,
            2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1)
U64, U32 = "<Q", "<I"
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
          10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class Field:
    """A fixed-width field of the header: where it is, its struct format and what it is."""

    pos: int
    fmt: str
    kind: str  # count, strlen, vtype, etype, arrlen, value, ndims, dim, ttype, offset


def header_fields(buf: bytes) -> tuple[list[Field], int, dict]:
    """The header's fields, its end (the unaligned start of the data) and the byte range of
    each metadata key's value, walked from the bytes of a well-formed file."""
    out: list[Field] = []
    pos = 8

    def take(fmt, kind):
        nonlocal pos
        out.append(Field(pos, fmt, kind))
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take(U64, "strlen")
        s = buf[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def value(vt):
        nonlocal pos
        if vt == 8:
            string()
        elif vt == 9:
            et, n = take(U32, "etype"), take(U64, "arrlen")
            for _ in range(n):
                if et in SCALAR:   # large numeric arrays: record a few elements only
                    if len(out) < 20000:
                        take(SCALAR[et], "value")
                    else:
                        pos += struct.calcsize(SCALAR[et])
                else:
                    value(et)
        else:
            take(SCALAR[vt], "value")

    n_tensors, n_kv = take(U64, "count"), take(U64, "count")
    spans = {}
    for _ in range(n_kv):
        k = string()
        start = pos
        value(take(U32, "vtype"))
        spans[k] = (start, pos)
    for _ in range(n_tensors):
        string()
        for _ in range(take(U32, "ndims")):
            take(U64, "dim")
        take(U32, "ttype")
        take(U64, "offset")
    return out, pos, spans


@dataclass
class Base:
    """One original model: its bytes up to the data, where the data starts, its fields."""

    name: str
    path: Path
    header: bytes
    data_start: int
    fields: list[Field]
    spans: dict
    logits: object = None


def load_base(name: str, path: Path) -> Base:
    with open(path, "rb") as f:
        head = f.read(64 << 20)
    fields, end, spans = header_fields(head)
    from pocketlm.gguf import open_gguf
    with open_gguf(path) as g:
        data_start = g.data_offset
    return Base(name, Path(path), head[:end], data_start, fields, spans)


def alignment_of(header: bytes) -> int:
    """general.alignment as a header declares it (32 when absent, 0 when not an integer)."""
    _, _, spans = header_fields(header)
    if "general.alignment" not in spans:
        return 32
    s, _ = spans["general.alignment"]
    vt = struct.unpack_from(U32, header, s)[0]
    return struct.unpack_from(SCALAR[vt], header, s + 4)[0] if vt in (4, 10) else 0


def _put(buf: bytearray, f: Field, v) -> None:
    size = struct.calcsize(f.fmt)
    if f.fmt in ("<f", "<d"):
        buf[f.pos:f.pos + size] = struct.pack(f.fmt, float(v))
    else:
        buf[f.pos:f.pos + size] = (int(v) % (1 << 8 * size)).to_bytes(size, "little")


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack(U64, len(k)) + k + struct.pack(U32, vtype) + payload


def mutate(base: Base, rng: random.Random) -> tuple[bytes, int | None, str]:
    """A mutated header, where to truncate the whole file (None: not), and what was done."""
    buf = bytearray(base.header)
    kinds = {f.kind for f in base.fields}
    op = rng.choice(("bitflip", "boundary", "surgery", "surgery", "surgery", "truncate",
                     "alignment", "retype"))
    if op == "bitflip":
        what = []
        for _ in range(rng.choice((1, 1, 2, 4, 8))):
            i = rng.randrange(8, len(buf))
            buf[i] ^= 1 << rng.randrange(8)
            what.append(i)
        return bytes(buf), None, f"bitflip at {what}"
    if op in ("boundary", "surgery"):
        kind = rng.choice(sorted(kinds - {"value"}) if op == "surgery" else ["value"])
        f = rng.choice([x for x in base.fields if x.kind == kind])
        old = struct.unpack_from(f.fmt, buf, f.pos)[0]
        if f.fmt == "<?":
            new = rng.choice((0, 1, 2, 255))
        elif isinstance(old, float):
            new = rng.choice((0.0, -1.0, 1e30, float("nan"), float("inf"), 1e-30, old * 2))
        else:
            new = rng.choice(BOUNDARY + (-1, old + 1, old - 1, old * 2, old // 2, old + 32))
            if f.kind == "ttype":
                new = rng.choice((new, rng.randrange(0, 45)))
        _put(buf, f, new)
        return bytes(buf), None, f"{kind} at {f.pos}: {old} -> {new}"
    if op == "truncate":
        end = base.data_start + (base.path.stat().st_size - base.data_start) * 0.999
        cut = rng.choice((rng.randrange(0, len(buf)), rng.randrange(len(buf), int(end))))
        return bytes(buf), cut, f"truncate at {cut}"
    if op == "alignment":
        v = rng.choice((0, 1, 3, 8, 16, 32, 64, 4096, 2**31, 2**32 - 1))
        vt, payload = rng.choice(((4, struct.pack(U32, v)), (10, struct.pack(U64, v)),
                                  (5, struct.pack("<i", -min(v, 2**31))), (6, struct.pack("<f", v)),
                                  (8, struct.pack(U64, 2) + b"32")))
        n_kv = struct.unpack_from(U64, buf, 16)[0]
        end = max(e for _, e in base.spans.values())
        buf = buf[:16] + struct.pack(U64, n_kv + 1) + buf[24:end] + \
            _kv("general.alignment", vt, payload) + buf[end:]
        return bytes(buf), None, f"general.alignment type {vt} = {v}"
    # retype: a metadata value of another type or length, the header re-laid around it
    k = rng.choice(sorted(base.spans))
    s, e = base.spans[k]
    vt = rng.choice((4, 5, 6, 7, 8, 9, 10))
    if vt == 8:
        payload = struct.pack(U64, 5) + b"bogus"
    elif vt == 9:
        et = rng.choice((0, 4, 6, 7, 8))
        n = rng.choice((0, 1, 2, 50))
        payload = struct.pack(U32, et) + struct.pack(U64, n) + (
            b"".join(struct.pack(U64, 1) + b"x" for _ in range(n)) if et == 8 else
            bytes(struct.calcsize(SCALAR[et]) * n))
    else:
        payload = struct.pack(SCALAR[vt], rng.choice((0, 1, 2, 64, 2**31 - 1))
                              if vt != 6 else rng.choice((0.0, 1.5, 1e30)))
    buf = buf[:s] + struct.pack(U32, vt) + payload + buf[e:]
    return bytes(buf), None, f"{k} retyped to {vt}"


def write_case(base: Base, header: bytes, cut: int | None, out: Path) -> None:
    """The mutated header, zeros up to the original data start (or, when the header was
    re-laid, the next boundary of the alignment it declares), then the original tensor data."""
    pad = base.data_start - len(header)
    if len(header) != len(base.header):
        align = alignment_of(header)
        pad = -len(header) % align if 0 < align <= 1 << 20 else 0
    with open(base.path, "rb") as src, open(out, "wb") as dst:
        dst.write(header + bytes(pad))
        dst.flush()
        n = base.path.stat().st_size - base.data_start
        if cut is not None:
            n = max(0, min(n, cut - dst.tell()))
        done = 0
        while done < n:   # copied in the kernel, from the page cache
            done += os.sendfile(dst.fileno(), src.fileno(), base.data_start + done, n - done)
        if cut is not None:
            dst.truncate(cut)


def evaluate(path: Path):
    """Load as users do and evaluate two tokens: the logits."""
    from pocketlm import LLM
    llm = LLM.load(str(path), n_ctx=N_CTX, threads=1)
    try:
        ids = llm.tokenize("Hi", add_special=False)[:1] + [0]
        return llm.eval(ids)
    finally:
        llm.close()


def classify(logits, base: Base) -> str:
    import numpy as np
    if not np.all(np.isfinite(logits)):
        return "nonfinite"
    same = base.logits is not None and logits.shape == base.logits.shape and \
        np.allclose(logits, base.logits, atol=1e-4)
    return "ok-same" if same else "ok-different"


def child(path: Path, base: Base, wfd: int) -> None:
    """Run one case and write its outcome and one-line detail to ``wfd``; never returns."""
    import traceback
    try:
        outcome, detail = classify(evaluate(path), base), ""
    except ValueError as e:   # what the CLI prints as one line
        msg = str(e)
        one_line = msg and "\n" not in msg and "Traceback" not in msg
        outcome, detail = ("error" if one_line else "traceback"), msg.splitlines()[0] if msg else ""
    except BaseException as e:  # noqa: BLE001 - anything else reaches the user as a traceback
        outcome = "traceback"
        detail = f"{type(e).__name__}: {e}".splitlines()[0][:300] + " | " + \
            traceback.format_exc().splitlines()[-3].strip()[:200]
    os.write(wfd, json.dumps({"outcome": outcome, "detail": detail[:500]}).encode())
    os._exit(0)


def run_case(base: Base, header: bytes, cut: int | None, tmp: Path) -> dict:
    path = tmp / f"case-{base.name}.gguf"
    write_case(base, header, cut, path)
    r, w = os.pipe()
    out = os.open(tmp / "out.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(out, 1)
        os.dup2(out, 2)
        child(path, base, w)
    os.close(w)
    os.close(out)
    deadline = time.monotonic() + CASE_TIMEOUT
    data = b""
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"outcome": "hang", "detail": f"no result in {CASE_TIMEOUT:.0f} s"}
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    printed = (tmp / "out.txt").read_text(errors="replace")
    if os.WIFSIGNALED(status) or not data:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.waitstatus_to_exitcode(status)
        return {"outcome": "crash", "detail": f"signal {sig}, exit {code}: {printed[-300:]!r}"}
    res = json.loads(data)
    if "Traceback" in printed:
        res = {"outcome": "traceback", "detail": printed.strip().splitlines()[-1][:300]}
    return res


def default_models() -> dict[str, Path]:
    from pocketlm.api import store
    root = Path(__file__).resolve().parents[1]
    shared = Path(os.environ.get("POCKETLM_SHARED", root.parent / "shared"))
    return {"smallthinker": shared / "data" / "models" / "smallthinker-tiny-synthetic-Q4_0.gguf",
            "smollm2": store.pull("smollm2-135m")}


def campaign(n: int, seed: int = 0, models: dict[str, Path] | None = None,
             log=None) -> tuple[Counter, list[dict]]:
    """``n`` seeded cases spread over ``models``: the count per outcome and every failure."""
    import numpy as np  # noqa: F401 - imported once in the parent, shared by the children
    models = models or default_models()
    bases = [load_base(k, Path(p)) for k, p in models.items()]
    counts: Counter = Counter()
    failures = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as t:
        tmp = Path(t)
        for b in bases:   # compiles the kernels once, here, and records the reference logits
            b.logits = evaluate(b.path)
        rng = random.Random(seed)
        for i in range(n):
            b = bases[i % len(bases)]
            header, cut, what = mutate(b, rng)
            res = run_case(b, header, cut, tmp)
            counts[res["outcome"]] += 1
            if res["outcome"] in FAILURES:
                failures.append({"case": i, "model": b.name, "mutation": what, **res})
            if log:
                log(f"{i} {b.name} {what}: {res['outcome']} {res.get('detail', '')}")
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(os.environ.get(k) != v for k, v in FUZZ_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "pocketlm.tools.fuzz_gguf", *argv],
                  {**os.environ, **FUZZ_ENV})
    p = argparse.ArgumentParser(prog="python -m pocketlm.tools.fuzz_gguf")
    p.add_argument("n", type=int, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print counts and failures as JSON")
    p.add_argument("--verbose", action="store_true", help="print every case")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to mutate (default: the tiny SmallThinker and SmolLM2)")
    a = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in a.model) if a.model else None
    t0 = time.time()
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.verbose else None
    counts, failures = campaign(a.n, a.seed, models, log=log)
    if a.json:
        print(json.dumps({"counts": counts, "failures": failures, "seconds": time.time() - t0}))
    else:
        for f in failures:
            print(f"FAIL case {f['case']} {f['model']} {f['mutation']}: {f['outcome']} "
                  f"{f['detail']}")
        print(f"{a.n} cases in {time.time() - t0:.0f} s: " +
              ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
