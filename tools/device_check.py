"""The prepared check for a machine with an NVIDIA GPU: ``python3 tools/device_check.py [OUT]``.

From the repository root it (1) installs pocketlm with the ``cuda`` extra (``--no-deps`` when
the machine already has numba-cuda; wheels from ``$POCKETLM_WHEELS`` when it has no network),
(2) runs tests/test_cuda_sim.py on the GPU (``POCKETLM_CUDA_REAL=1``: no simulator, SmolLM2
whole), (3) runs ``pocketlm bench --device cuda`` for SmolLM2 and, when ``pocketlm synth`` is
there, for a synthetic SmallThinker 4b-a0.6b, once with every expert on the GPU and once
under a GPU budget of a quarter of its experts (streamed from host memory), and (4) measures
the GPU memory each configuration holds. OUT (default ``$OUT``, else ./device_check_out) gets
six files: summary.json (machine, each step's outcome, memory), tests.xml, one JSON per bench
and logs.txt. Sized for about 8 minutes; a step that fails is recorded and the next one runs.

Models come from the store (``$POCKETLM_HOME``): SmolLM2 is pulled if missing, which needs a
network; the tests regenerate the tiny SmallThinker with SmolLM2's tokenizer, and the
synthetic model takes its tokenizer from SmolLM2 too (no SmolLM2: no synthetic bench).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run as a script: the checkout, not an older install
SYNTH_PRESET = "4b-a0.6b"


def _run(name: str, cmd: list[str], out: Path, timeout: int, env=None) -> dict:
    """Run ``cmd``, append its output to OUT/logs.txt; the step's record (stdout in "_out")."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
    with open(out / "logs.txt", "a") as f:
        f.write(f"==== {name}: {' '.join(cmd)} (rc {rc})\n{stdout}{stderr}\n")
    return {"step": name, "rc": rc, "seconds": round(time.time() - t0, 1), "_out": stdout}


def _bench(name, model, out, extra, timeout):
    rec = _run(name, [sys.executable, "-m", "pocketlm.apps.cli", "bench", str(model), "--device", "cuda",
                      "--json", *extra], out, timeout)
    if rec["rc"] == 0:
        (out / f"{name}.json").write_text(rec["_out"])
    return rec


def _memory_probe(model: str, gpu_budget: str | None) -> dict:
    """GPU memory held after loading ``model`` on cuda and evaluating 64 tokens."""
    from numba import cuda

    from pocketlm import LLM
    ctx = cuda.current_context()
    free0, total = ctx.get_memory_info()
    t0 = time.time()
    with LLM.load(model, device="cuda", gpu_budget=gpu_budget, n_ctx=512) as llm:
        load_s = time.time() - t0
        llm.eval(list(range(100, 164)), last_n=1)
        free1, _ = ctx.get_memory_info()
        ex = llm.model.experts if llm.model.capabilities.moe else None
        rec = {"model": model, "gpu_budget": gpu_budget, "load_s": round(load_s, 2),
               "gpu_used_bytes": free0 - free1, "gpu_total_bytes": total}
        if ex is not None and hasattr(ex, "copies"):
            rec.update(expert_slots=ex.n_slots, expert_copies=ex.copies,
                       expert_slot_bytes=ex.slot_bytes)
    return rec


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else os.environ.get("OUT", "device_check_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = []
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout
    except OSError as e:
        smi = str(e)
    info = {"nvidia_smi": smi.strip(), "python": sys.version}

    # 1. install: deps the machine has are kept; the cuda extra only where numba-cuda is missing
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation"]
    wheels = os.environ.get("POCKETLM_WHEELS")
    if wheels:
        pip += ["--no-index", "--find-links", wheels]
    if importlib.util.find_spec("numba_cuda"):
        steps.append(_run("install", pip + ["--no-deps", "-e", "."], out, 120))
        missing = [m for m in ("gguf", "jinja2", "psutil", "sentencepiece", "pytest")
                   if importlib.util.find_spec(m) is None]
        if missing:
            steps.append(_run("install_deps", pip + missing, out, 120))
    else:
        steps.append(_run("install", pip + ["-e", ".[cuda,test]"], out, 300))
    from pocketlm.nn import backend
    info["cuda_problem"] = backend.cuda_problem()
    if info["cuda_problem"]:
        steps.append({"step": "cuda", "rc": info["cuda_problem"]})
        return _summary(out, info, steps, [])

    # 2. the CUDA tests on the GPU
    steps.append(_run("tests", [sys.executable, "-m", "pytest", "-q", "tests/test_cuda_sim.py",
                                f"--junitxml={out / 'tests.xml'}"], out, 240,
                      env={"POCKETLM_CUDA_REAL": "1"}))

    # 3. benchmarks, 4. memory
    from pocketlm.api import store
    try:
        smollm2 = str(store.pull("smollm2-135m"))
    except Exception as e:   # no network and not in the store
        smollm2 = None
        steps.append({"step": "smollm2", "rc": f"not available: {e}"})
    probes = []
    if smollm2:
        steps.append(_bench("bench_smollm2_cuda", smollm2, out, ["-p", "512", "-n", "128",
                                                                   "-d", "512", "-r", "2"], 150))
        probes.append((smollm2, None))
    synth = Path(tempfile.gettempdir()) / f"smallthinker-{SYNTH_PRESET}-synthetic-Q4_0.gguf"
    if smollm2 and (ROOT / "tools" / "synth.py").exists():
        if not synth.exists():
            steps.append(_run("synth", [sys.executable, "-m", "pocketlm.apps.cli", "synth",
                                        SYNTH_PRESET, str(synth), "--tokenizer", smollm2], out,
                              240))
        if synth.exists():
            from pocketlm.gguf.reader import open_gguf
            with open_gguf(synth) as g:
                expert_bytes = sum(t.nbytes for n, t in g.tensors.items() if "_exps." in n)
            quarter = str(expert_bytes // 4)
            args = ["-p", "128", "-n", "32", "-d", "128", "-r", "1"]
            steps.append(_bench("bench_smallthinker_cuda", synth, out, args, 150))
            steps.append(_bench("bench_smallthinker_cuda_budget", synth, out,
                                args + ["--gpu-budget", quarter], 150))
            probes += [(str(synth), None), (str(synth), quarter)]
    else:
        steps.append({"step": "synth", "rc": "skipped: no pocketlm synth here"})
    mem = []
    for model, budget in probes:
        try:
            mem.append(_memory_probe(model, budget))
        except Exception as e:
            mem.append({"model": model, "gpu_budget": budget, "error": str(e)})
    return _summary(out, info, steps, mem)


def _summary(out: Path, info: dict, steps: list, memory: list) -> int:
    for s in steps:
        s.pop("_out", None)
    (out / "summary.json").write_text(json.dumps({"machine": info, "steps": steps,
                                                  "memory": memory}, indent=2))
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
