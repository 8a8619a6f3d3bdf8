"""Make llama.cpp reference logits for the tiny synthetic `minicpm` models.

The models are written by ``tools.synth`` (preset ``minicpm-tiny``, fixed seed); llama.cpp runs in a
separate Python environment that has ``llama-cpp-python`` (never a dependency of this project):

    python -m tools.minicpm_reference --llama-python /path/to/venv/bin/python --out tests/data

It writes ``minicpm-reference.json`` (models, file sha256, settings, prompts, llama.cpp
version, this command) and ``minicpm-reference.npz`` (float32 logits of every prompt position,
key ``{run}/prompt{i}``). ``tests/test_minicpm.py`` regenerates the models, checks their sha256
and compares.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pocketlm.tools import synth_minicpm

# model name -> shape overrides of the minicpm-tiny preset (tools.synth, seed SEED, Q4_0)
MODELS = {
    "tiny": dict(std=0.1),
    # same weights, no scale keys: llama.cpp's defaults (12, 1.4/sqrt(L), 256/n_embd)
    "tiny-nokeys": dict(std=0.1, mup_keys=0),
    # same weights, other muP scales
    "tiny-mup": dict(std=0.1, scale_emb=3.0, scale_depth=0.5, dim_model_base=256),
    "tiny-longrope": dict(std=0.1, longrope=1, eps=1e-6),
    "tiny-moe": dict(std=0.1, n_expert=8, n_expert_used=2),
}
SEED = 1
# run name -> (model, n_ctx); n_ctx picks LongRoPE's list (long above the trained 256)
RUNS = {
    "tiny": ("tiny", 256),
    "tiny-nokeys": ("tiny-nokeys", 256),
    "tiny-mup": ("tiny-mup", 256),
    "tiny-longrope-short": ("tiny-longrope", 128),
    "tiny-longrope-long": ("tiny-longrope", 512),
    "tiny-moe": ("tiny-moe", 256),
}


def prompts() -> list[list[int]]:
    """Three BOS-led prompts of random ids (lengths 6, 18, 41)."""
    rng = np.random.default_rng(7)
    return [[1] + rng.integers(3, 512, n).tolist() for n in (5, 17, 40)]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_model(name: str, directory: Path) -> Path:
    """Write model ``name`` (Q4_0, with the 512-token vocabulary of
    ``synth_minicpm.vocab_gguf``) into ``directory`` unless already there."""
    from pocketlm.tools.synth import Options, synthesize
    path = Path(directory) / f"minicpm-{name}-synthetic-Q4_0.gguf"
    if not path.exists():
        vocab = Path(directory) / "minicpm-vocab-512.gguf"
        if not vocab.exists():
            synth_minicpm.vocab_gguf(vocab)
        synthesize("minicpm-tiny", path, Options(seed=SEED, qtype="Q4_0", recipe="plain",
                                                 name=f"minicpm {name} synthetic",
                                                 overrides=MODELS[name]), vocab)
    return path


LLAMA_SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
out = {}
for run, (path, n_ctx) in job["runs"].items():
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=2,
                          logits_all=True, verbose=False)
    for i, p in enumerate(job["prompts"]):
        llm.reset()
        llm.eval(p)
        out[f"{run}/prompt{i}"] = np.array(llm.scores[:len(p)], dtype=np.float32)
    del llm
np.savez_compressed(job["npz"], **out)
print(llama_cpp.__version__)
"""


def make_reference(stem: str, paths: dict, runs: dict, llama_python: str, out: Path,
                   command: str, models: dict) -> None:
    """Run llama.cpp (``llama_python``) on ``runs`` (run -> (model, n_ctx)) of the models at
    ``paths`` over ``prompts()``; write ``{stem}-reference.npz`` and ``.json`` into ``out``,
    the json describing each model by ``models[name]`` plus its file and sha256."""
    out.mkdir(parents=True, exist_ok=True)
    job = {"runs": {r: (str(paths[m]), n_ctx) for r, (m, n_ctx) in runs.items()},
           "prompts": prompts(), "npz": str(out / f"{stem}-reference.npz")}
    res = subprocess.run([llama_python, "-c", LLAMA_SCRIPT, json.dumps(job)], check=True,
                         capture_output=True, text=True)
    meta = {
        "command": command,
        "engine": f"llama-cpp-python {res.stdout.strip()} (CPU, 2 threads, n_batch 512, "
                  "default flash-attention and KV cache settings)",
        "models": {m: {"file": paths[m].name, "sha256": sha256(paths[m]), **models[m]}
                   for m in models},
        "runs": {r: {"model": m, "n_ctx": n_ctx} for r, (m, n_ctx) in runs.items()},
        "prompts": job["prompts"],
    }
    (out / f"{stem}-reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / stem}-reference.json and .npz")


def reference_main(stem: str, make_model, runs: dict, models: dict, argv=None):
    """The command line of a reference tool: make each of ``models`` (name -> what to pin
    about it) with ``make_model(name, folder)`` and llama.cpp's logits of its ``runs``."""
    ap = argparse.ArgumentParser(description=f"llama.cpp reference logits of the {stem} "
                                             "synthetic models")
    ap.add_argument("--llama-python", required=True,
                    help="python of an environment with llama-cpp-python")
    ap.add_argument("--out", default="tests/data", help="directory for the reference files")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        paths = {m: make_model(m, Path(d)) for m in models}
        make_reference(stem, paths, runs, a.llama_python,
                       Path(a.out), f"python -m tools.{stem}_reference --llama-python PYTHON "
                       f"--out {a.out}", models)


def main(argv=None):
    reference_main("minicpm", make_model, RUNS,
                   {m: {"preset": "minicpm-tiny", "seed": SEED, "overrides": MODELS[m]}
                    for m in MODELS}, argv)


if __name__ == "__main__":
    sys.exit(main())
