"""The package's shape: one import name, no import cycles, no shadowing by users' folders."""
from __future__ import annotations

import ast
import os
import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pocketlm", "pocketlm.models", "pocketlm.quant", "pocketlm.tools", "pocketlm.apps")


def _modules() -> dict[str, Path]:
    """Every project module by dotted name, from the folders the package maps."""
    roots = {p: Path(importlib.util.find_spec(p).origin).parent for p in PACKAGES}
    mods: dict[str, Path] = {}
    for pkg, d in roots.items():
        for f in d.rglob("*.py"):
            rel = f.relative_to(d).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join((pkg, *rel))] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports, at any depth of its code (lazy imports count:
    they run too), with the packages whose ``__init__`` they pass through."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str):
        parts = target.split(".")
        for i in range(2, len(parts) + 1):   # importing a.b.c runs a.b's __init__ too
            t = ".".join(parts[:i])
            if t in mods and t != name and not name.startswith(t + "."):
                out.add(t)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rsplit(".", 1)[0]
                pkg = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1])
                base = f"{pkg}.{base}" if base else pkg
            add(base)
            for a in node.names:
                add(f"{base}.{a.name}")
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert not [m for m in mods if m.split(".")[0] != "pocketlm"]
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_only_pocketlm_is_installed(tmp_path):
    """A plain ``pip install .`` (its wheel) holds one top-level import package."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel, = tmp_path.glob("pocketlm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pocketlm"}
    # The editable install's finder, when that is how this interpreter has it, maps only it.
    for f in Path(sysconfig.get_paths()["purelib"]).glob("__editable___pocketlm*_finder.py"):
        mapping = ast.literal_eval(
            f.read_text().split("MAPPING: dict[str, str] = ", 1)[1].split("\n", 1)[0])
        assert {k.split(".")[0] for k in mapping} == {"pocketlm"}


def test_users_folders_do_not_shadow(tmp_path, smallthinker_tiny_path):
    """A script run where the user keeps ``models/``, ``tools/``… folders still gets ours."""
    for d in ("models", "tools", "runtime", "apps", "quant"):
        (tmp_path / d).mkdir()
    code = ("import sys; sys.path.insert(0, '')\n"
            "from pocketlm import LLM\n"
            f"with LLM.load({str(smallthinker_tiny_path)!r}, n_ctx=64) as llm:\n"
            "    logits = llm.eval([1, 2, 3])\n"
            "print(logits.shape[0], bool(abs(logits).sum() > 0))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["3", "True"]


@pytest.mark.parametrize("name", ["runtime", "models", "tools", "apps", "quant"])
def test_generic_names_are_not_ours(name, tmp_path):
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_no_file_imports_a_folder_by_its_generic_name():
    """From the repository root ``import runtime`` would find the folder itself (a second copy
    of every module, with its own state): code and tests import through ``pocketlm`` only."""
    generic = {"runtime", "models", "quant", "tools", "apps"}
    bad = []
    for f in [*ROOT.joinpath("tests").glob("*.py"), *_modules().values()]:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{f.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in generic]
    assert not bad


def test_model_files_reach_kernels_only_through_ops():
    """Architectures compute with their ops object (``pocketlm.nn``): no model file imports
    the kernels, the CUDA backend or a device check."""
    mods = _modules()
    bad = {name: sorted(t for t in _imports(name, path, mods)
                        if t.startswith(("pocketlm.kernels", "pocketlm.cuda")))
           for name, path in mods.items() if name.startswith("pocketlm.models")}
    assert not {k: v for k, v in bad.items() if v}


def test_importing_the_kernels_configures_nothing(tmp_path):
    """Importing the kernels leaves numpy's BLAS thread pool as it was (the kernels set it on
    their first BLAS call), and starts no thread."""
    code = """
import threading
import numpy
from threadpoolctl import threadpool_info
before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
n = threading.active_count()
import pocketlm.kernels
after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
assert after == before and threading.active_count() == n, (before, after)
"""
    env = {**os.environ, "POCKETLM_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
