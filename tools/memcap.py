"""Run a command under a hard memory cap, to check that a memory budget holds for real.

    python -m tools.memcap 1GiB -- pocketlm bench MODEL --memory-budget 1GiB --cold

The command runs in a child of this process's cgroup-v1 memory group with
``memory.limit_in_bytes`` set (page cache included, as the kernel charges it); on cgroup v2
with a memory controller, ``memory.max`` of a child group. Needs root. When the command ends
the peak usage, the limit hits and whether the OOM killer struck are printed as one JSON line
on stderr, and the group is removed. Exit status: the command's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pocketlm.experts.budget import parse_size

V1 = "/sys/fs/cgroup/memory"
V2 = "/sys/fs/cgroup"


def _own_group() -> tuple[str, str]:
    """(version, directory) of this process's memory cgroup."""
    with open("/proc/self/cgroup") as f:
        lines = [ln.strip().split(":", 2) for ln in f if ln.strip()]
    for _, ctrl, path in lines:
        if "memory" in ctrl.split(",") and os.path.isdir(V1):
            return "v1", V1 + path
    for hid, ctrl, path in lines:
        if hid == "0" and os.path.exists(os.path.join(V2, "cgroup.controllers")):
            with open(os.path.join(V2, "cgroup.controllers")) as f:
                if "memory" in f.read().split():
                    return "v2", V2 + path
    raise OSError("no cgroup memory controller found (neither v1 nor v2 with memory)")


def _write(path: str, value: str):
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def run_capped(limit: int, cmd: list[str]) -> tuple[int, dict]:
    version, parent = _own_group()
    group = os.path.join(parent, f"pocketlm-cap-{os.getpid()}")
    try:
        os.mkdir(group)
    except PermissionError:
        raise OSError(f"cannot create a memory cgroup under {parent} (needs root)") from None
    try:
        if version == "v1":
            _write(os.path.join(group, "memory.limit_in_bytes"), str(limit))
            swap = os.path.join(group, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):
                _write(swap, str(limit))
        else:
            _write(os.path.join(group, "memory.max"), str(limit))
            _write(os.path.join(group, "memory.swap.max"), "0")
        procs = os.path.join(group, "cgroup.procs")
        # the child joins the group before it execs, so nothing it allocates escapes the cap
        proc = subprocess.Popen(cmd, preexec_fn=lambda: _write(procs, str(os.getpid())))
        rc = proc.wait()
        if version == "v1":
            oom = dict(ln.split() for ln in _read(os.path.join(group, "memory.oom_control"))
                       .splitlines() if ln.strip())
            report = {
                "limit_bytes": limit,
                "peak_bytes": int(_read(os.path.join(group, "memory.max_usage_in_bytes")) or 0),
                "limit_hits": int(_read(os.path.join(group, "memory.failcnt")) or 0),
                "oom_kills": int(oom.get("oom_kill", 0)),
            }
        else:
            events = dict(ln.split() for ln in _read(os.path.join(group, "memory.events"))
                          .splitlines() if ln.strip())
            report = {
                "limit_bytes": limit,
                "peak_bytes": int(_read(os.path.join(group, "memory.peak")) or 0),
                "limit_hits": int(events.get("max", 0)),
                "oom_kills": int(events.get("oom_kill", 0)),
            }
        report["returncode"] = rc
        return rc, report
    finally:
        try:
            os.rmdir(group)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tools.memcap SIZE -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        rc, report = run_capped(parse_size(argv[0]), argv[2:])
    except (OSError, ValueError) as e:
        print(f"memcap: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"memcap": report}), file=sys.stderr)
    return rc if rc >= 0 else 128 - rc   # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
