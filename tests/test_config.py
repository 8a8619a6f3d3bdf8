"""LoadConfig: every setting validated once, with a one-line error naming it; LLM.load, the
CLI and the server all build one."""
from __future__ import annotations

import dataclasses
import re

import pytest

from pocketlm import LoadConfig


@pytest.mark.parametrize("changes, message", [
    (dict(device="tpu"), "device 'tpu': expected one of cpu, cuda, auto"),
    (dict(backend="jax"), "backend 'jax': expected one of numba, numpy"),
    (dict(sparse_attention="yes"), "sparse_attention 'yes': expected one of auto, on, off"),
    (dict(expert_policy="mru"), "expert_policy 'mru': expected one of lru, lfu, predictive"),
    (dict(expert_policy="oracle"), "expert_policy 'oracle': expected one of lru, lfu, "
                                   "predictive"),
    (dict(n_ctx=0), "n_ctx 0: expected a positive integer"),
    (dict(n_ctx=-5), "n_ctx -5: expected a positive integer"),
    (dict(n_ctx=64.0), "n_ctx 64.0: expected a positive integer"),
    (dict(threads=0), "threads 0: expected a positive integer"),
    (dict(threads=True), "threads True: expected a positive integer"),
    (dict(chunk=0), "chunk 0: expected a positive integer"),
    (dict(chunk=None), "chunk None: expected a positive integer"),
    (dict(pull="yes"), "pull 'yes': expected True or False"),
    (dict(chat_template=3), "chat_template 3: expected a file path"),
    (dict(memory_budget="lots"), "memory_budget: memory size 'lots': expected a number with an "
                                 "optional unit such as 800M, 1.5GiB or 2GB"),
    (dict(max_memory="-1kB"), "max_memory: memory size '-1kB': expected a number"),
    (dict(max_memory=0), "max_memory: memory size 0: expected a finite positive size"),
    (dict(gpu_budget="2X", device="cuda"), "gpu_budget: memory size '2X'"),
    (dict(gpu_budget="1G"), "a GPU budget needs device 'cuda' or 'auto'"),
])
def test_each_bad_setting_is_a_one_line_error(changes, message):
    with pytest.raises(ValueError) as e:
        LoadConfig(**changes)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        LoadConfig().replace(**changes)   # replace validates as construction does


def test_the_gpu_budget_message_is_exact():
    with pytest.raises(ValueError, match="^a GPU budget needs device 'cuda' or 'auto'$"):
        LoadConfig(gpu_budget=1 << 30)


def test_defaults_and_sizes():
    c = LoadConfig()
    assert (c.n_ctx, c.threads, c.chunk, c.chat_template, c.pull) == (None, None, 512, None, True)
    assert (c.expert_policy, c.sparse_attention, c.backend, c.device) == ("lru", "auto", None,
                                                                           "cpu")
    c = LoadConfig(memory_budget="1GiB", max_memory="781kB", gpu_budget="2G", device="auto")
    assert (c.memory_budget, c.max_memory, c.gpu_budget) == (1 << 30, 781_000, 2 << 30)
    assert c == LoadConfig(memory_budget=1 << 30, max_memory=781_000, gpu_budget=2 << 30,
                           device="auto")
    assert LoadConfig(gpu_budget="1G", device="cuda").gpu_budget == 1 << 30


def test_replace_and_frozen():
    c = LoadConfig(n_ctx=128)
    d = c.replace(threads=2, n_ctx=None)
    assert (c.n_ctx, c.threads) == (128, None)      # the original is untouched
    assert (d.n_ctx, d.threads) == (None, 2)
    with pytest.raises(TypeError, match=r"^unknown load setting\(s\): colour, nctx \(expected "
                                        r"n_ctx, threads, chunk, "):
        c.replace(nctx=1, colour="red")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_ctx = 4


def test_llm_load_with_a_config_or_keywords(smallthinker_tiny_path):
    from pocketlm import LLM
    path = str(smallthinker_tiny_path)
    config = LoadConfig(n_ctx=64, chunk=16, threads=1)
    with LLM.load(path, config) as a, LLM.load(path, n_ctx=64, chunk=16, threads=1) as b:
        assert a.config == b.config == config
        assert (a.n_ctx, a.chunk) == (b.n_ctx, b.chunk) == (64, 16)
        ids = a.tokenize("Hello there")
        assert (a.eval(ids) == b.eval(ids)).all()
    # keywords override the config's fields
    with LLM.load(path, config, n_ctx=32) as c:
        assert c.config == config.replace(n_ctx=32) and c.n_ctx == 32
    with LLM.load(path) as d:
        assert d.config == LoadConfig()


def test_llm_load_rejects_bad_settings_before_opening(tmp_path):
    from pocketlm import LLM
    missing = str(tmp_path / "absent.gguf")   # never opened: the settings fail first
    with pytest.raises(TypeError, match=r"^unknown load setting\(s\): n_context "):
        LLM.load(missing, n_context=64)
    with pytest.raises(ValueError, match="^device 'tpu': expected one of cpu, cuda, auto$"):
        LLM.load(missing, device="tpu")
    with pytest.raises(TypeError, match="^config must be a LoadConfig, not int$"):
        LLM.load(missing, 64)


@pytest.mark.parametrize("argv, message", [
    (["--gpu-budget", "2G"], "pocketlm: error: a GPU budget needs device 'cuda' or 'auto'\n"),
    (["-c", "0"], "pocketlm: error: n_ctx 0: expected a positive integer\n"),
    (["--memory-budget", "lots"], "pocketlm: error: memory_budget: memory size 'lots': "),
])
def test_cli_bad_flag_value_is_one_line(tmp_path, capsys, argv, message):
    from pocketlm.apps.cli import main
    assert main(["run", str(tmp_path / "absent.gguf"), "Hi", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_serve_loads_with_its_config(smallthinker_tiny_path, capsys):
    """The server's background load gets the LoadConfig: a setting this model refuses ends
    the server with exit code 1 and the one-line reason."""
    from pocketlm.apps.server import serve
    rc = serve(str(smallthinker_tiny_path), port=0, config=LoadConfig(sparse_attention="on"))
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("pocketlm: error: ") and err.count("\n") == 1, err
    assert "smallthinker models have no sparse attention" in err
