"""CUDA backend: every kernel and two real models against the CPU path, on Numba's CUDA
simulator (or a real GPU with POCKETLM_CUDA_REAL=1, as tools/device_check.sh runs it).

The simulator must be switched on before ``numba.cuda`` is first imported, so the checks run in
one subprocess (this file run as a script) that prints its measurements as JSON; the tests
here compare them with tolerances. The rest of the suite never sees the simulator.

The simulator runs every GPU thread as a Python thread, so shapes are tiny and SmolLM2 runs
its first layer only; on a real GPU the same checks run and SmolLM2's logits are compared too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REAL = os.environ.get("POCKETLM_CUDA_REAL") == "1"
QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "F32", "F16")
# f32 sums in another order than the reference: relative to the result's scale
TOL = 2e-5
# The CPU's decode path rounds activations as llama.cpp does for these types (8-bit blocks,
# f16 for F16); the GPU keeps them f32, so it is compared with the CPU's f32 path (dequantized
# weights times BLAS) for them.
CPU_ROUNDS_X = ("Q5_0", "Q5_1", "Q4_K", "Q6_K", "F16")


# ----------------------------------------------------------------------- parent: the tests
@pytest.fixture(scope="module")
def sim(smallthinker_tiny_path, smollm2_path):
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pocketlm[cuda])")
    env = dict(os.environ)
    if not REAL:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__, str(smallthinker_tiny_path), str(smollm2_path)],
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"device checks failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _close(m, tol=TOL):
    assert m["err"] <= tol * max(m["scale"], 1e-30), m


@pytest.mark.parametrize("qtype", QTYPES)
def test_matmul_matches_reference_and_cpu(sim, qtype):
    for n in (1, 3, 10):   # decode; prefill inside one token tile and across two
        _close(sim[f"matmul {qtype} n={n}"])
        _close(sim[f"matmul {qtype} n={n} vs cpu"], 1e-4)


@pytest.mark.parametrize("qtype", QTYPES)
def test_embedding_rows_dequantize_exactly(sim, qtype):
    _close(sim[f"embed {qtype}"], 1e-6)


def test_small_ops_match_cpu_kernels(sim):
    for name in ("rms_norm", "rope neox", "rope norm partial", "glu silu", "glu gelu",
                 "glu relu", "add", "scale", "gather rows"):
        _close(sim[name])


def test_attention_matches_cpu_kernel(sim):
    for name in ("attention decode chunk 0", "attention decode chunk 1",
                 "attention prefill causal chunk 0", "attention window softcap chunk 0",
                 "attention nothing visible"):
        _close(sim[name])


def test_device_kv_cache_ring_and_truncate(sim):
    for name in ("cache ring chunk 0", "cache ring chunk 1", "cache ring chunk 2",
                 "cache after truncate"):
        _close(sim[name])


def test_tiny_smallthinker_runs_on_device(sim):
    for name in ("smallthinker prefill hidden", "smallthinker prefill logits",
                 "smallthinker decode hidden", "smallthinker decode logits"):
        _close(sim[name], 1e-4)


def test_smallthinker_experts_streamed_under_budget(sim):
    m = sim["smallthinker budget"]
    _close(m, 1e-4)
    assert m["slots"] == 3 and m["copies"] > m["slots"]   # experts were evicted and re-copied
    assert m["source"]


def test_smollm2_first_layer_on_device(sim):
    _close(sim["smollm2 prefill hidden"], 1e-4)
    if REAL:
        _close(sim["smollm2 decode hidden"], 1e-4)
    if REAL:
        _close(sim["smollm2 logits"], 1e-3)


def test_auto_falls_back_to_cpu_with_a_reason():
    from pocketlm.nn import backend
    problem = backend.cuda_problem()
    device, note = backend.resolve("auto")
    if problem is None:   # a machine with a GPU
        assert (device, note) == ("cuda", None)
        return
    assert device == "cpu" and note == f"running on the CPU: {problem}"
    with pytest.raises(ValueError, match=r"^device 'cuda' is not available: "):
        backend.resolve("cuda")
    with pytest.raises(ValueError, match="device 'tpu'"):
        backend.resolve("tpu")


def test_llm_load_auto_runs_on_cpu_without_gpu(smallthinker_tiny_path):
    from pocketlm import LLM
    from pocketlm.nn import backend
    if backend.cuda_problem() is None:
        pytest.skip("a GPU is present: auto picks it")
    with LLM.load(str(smallthinker_tiny_path), device="auto", n_ctx=64) as llm:
        assert llm.device == "cpu"
        assert llm.device_note == f"running on the CPU: {backend.cuda_problem()}"
        assert llm.eval([1, 2, 3], last_n=1).shape == (1, llm.model.args.n_vocab)
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        LLM.load(str(smallthinker_tiny_path), device="cuda")
    with pytest.raises(ValueError, match="^a GPU budget needs device 'cuda' or 'auto'$"):
        LLM.load(str(smallthinker_tiny_path), gpu_budget="1G")


# ----------------------------------------------------------- subprocess: the measurements
def _metric(got, ref, **extra) -> dict:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return {"err": float(np.abs(got - ref).max()), "scale": float(np.abs(ref).max()), **extra}


def _random_blocks(qtype, rows, cols, rng):
    """Raw blocks of ``qtype`` with every byte random except the f16 scales, kept finite."""
    from pocketlm import quant
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == "F32":
        return dense.view(np.uint8)
    if qtype == "F16":
        return dense.astype(np.float16).view(np.uint8)
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return quant.quantize(qtype, dense)
    bt = quant.REGISTRY[qtype]
    data = rng.integers(0, 256, (rows, cols // bt.block_size * bt.type_size), dtype=np.uint8)
    blocks = data.reshape(-1, bt.type_size)
    scales = {"Q4_K": (0, 2), "Q6_K": (208,)}[qtype]
    for at in scales:
        blocks[:, at:at + 2] = (rng.uniform(0.001, 0.02, (len(blocks), 1))
                                .astype(np.float16).view(np.uint8))
    return data


def _check_kernels(out: dict, rng):
    from pocketlm import quant
    from pocketlm import kernels
    from pocketlm.cuda import ops
    from pocketlm.gguf.tensor import QTensor
    dev = lambda a: ops.DArray(ops.upload(np.asarray(a, np.float32)))  # noqa: E731
    rows, cols = 4, 1024   # 32 chunks a row: two lanes reduce
    for q in QTYPES:
        w = QTensor(q, (rows, cols), _random_blocks(q, rows, cols, rng))
        ref_w = quant.dequantize(q, w.data, w.shape).astype(np.float64)
        dw = ops.DeviceTensor.from_host(w, "w")
        for n in (1, 3, 10):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            y = ops.linear(dw, dev(x)).numpy()
            out[f"matmul {q} n={n}"] = _metric(y, x.astype(np.float64) @ ref_w.T)
            if q in CPU_ROUNDS_X:
                cpu = kernels.matmul(w, x, method="blas")
            else:
                cpu = (kernels.matvec(w, x[0], numerics="exact")[None] if n == 1
                       else kernels.matmul(w, x, numerics="exact"))
            out[f"matmul {q} n={n} vs cpu"] = _metric(y, cpu)
        ids = np.array([3, 0, 2, 3])
        out[f"embed {q}"] = _metric(ops.embed(dw, ids).numpy(), ref_w[ids])

    x = rng.standard_normal((3, 64)).astype(np.float32)
    wn = rng.standard_normal(64).astype(np.float32)
    out["rms_norm"] = _metric(ops.rms_norm(dev(x), ops.upload(wn), 1e-5).numpy(),
                              kernels.rms_norm(x, wn, 1e-5))
    pos = np.array([0, 7, 300])
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    out["rope neox"] = _metric(ops.rope(dev(x), pos, 16, 10000.0, "neox").numpy(),
                               kernels.rope(x.copy(), pos, 16, 10000.0, "neox"))
    out["rope norm partial"] = _metric(
        ops.rope(dev(x), pos, 8, 500000.0, "norm", 0.25).numpy(),
        kernels.rope(x.copy(), pos, 8, 500000.0, "norm", 0.25))
    g, u = (rng.standard_normal((2, 40)).astype(np.float32) * 3 for _ in range(2))
    for act, fn in (("silu", kernels.silu_mul), ("gelu", kernels.gelu_tanh_mul),
                    ("relu", kernels.relu_mul)):
        out[f"glu {act}"] = _metric(ops.glu(dev(g), dev(u), act).numpy(), fn(g, u))
    out["add"] = _metric((dev(g) + dev(u)).numpy(), g + u)
    out["scale"] = _metric((dev(g) * np.float32(0.3)).numpy(), g * np.float32(0.3))
    out["gather rows"] = _metric(dev(g)[np.array([1, 1, 0])].numpy(), g[[1, 1, 0]])


def _check_attention(out: dict, rng):
    from pocketlm.cuda import ops
    from pocketlm.cuda.ops import DeviceLayerCache
    from pocketlm.kernels.attention import attend
    from pocketlm.nn.kvcache import LayerCache
    dev = lambda a: ops.DArray(ops.upload(np.asarray(a, np.float32)))  # noqa: E731
    H, KVH, D = 4, 2, 16

    def run(name, n_ctx, window, chunks, softcap=0.0, start=0):
        chunk = max(len(c) for c in chunks)
        host = LayerCache(KVH, D, n_ctx, window, chunk=chunk)
        devc = DeviceLayerCache(LayerCache(KVH, D, n_ctx, window, chunk=chunk))
        for i, pos in enumerate(chunks):
            pos = np.asarray(pos, np.int64)
            q, k, v = (rng.standard_normal((len(pos), h, D)).astype(np.float32)
                       for h in (H, KVH, KVH))
            host.store(k, v, pos)
            ref = attend(q, host.kt, host.v, host.slot_pos, host.n_slots, pos, 0.25, window,
                         softcap)
            got = ops.attention(dev(q), dev(k), dev(v), devc, pos, 0.25, softcap)
            out[f"{name} chunk {i}"] = _metric(
                got.numpy(), ref.reshape(len(pos), -1))
        return host, devc

    run("attention decode", 16, 0, [[0, 1, 2, 3, 4], [5]])
    run("attention prefill causal", 16, 0, [[0, 1, 2, 3, 4]])
    run("attention window softcap", 16, 3, [[0, 1, 2, 3, 4, 5]], softcap=2.0)
    host, devc = run("cache ring", 64, 4, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    host.truncate(7)
    devc.truncate(7)
    pos = np.array([7], np.int64)
    q, k, v = (rng.standard_normal((1, h, D)).astype(np.float32) for h in (H, KVH, KVH))
    host.store(k, v, pos)
    ref = attend(q, host.kt, host.v, host.slot_pos, host.n_slots, pos, 0.25, 4, 0.0)
    got = ops.attention(dev(q), dev(k), dev(v), devc, pos, 0.25)
    out["cache after truncate"] = _metric(got.numpy(), ref.reshape(1, -1))
    # positions before every key: the query sees nothing and gets zeros
    devc = DeviceLayerCache(LayerCache(KVH, D, 16, 0))
    q, k, v = (rng.standard_normal((1, h, D)).astype(np.float32) for h in (H, KVH, KVH))
    devc.store(dev(k), dev(v), np.array([5]))
    from pocketlm.cuda import kernels as K
    o = ops.empty((1, H, D))
    scratch = ops.empty((1, H, 1))
    K.attention[(1, H), 32, ops.stream()](dev(q).a, devc.kt, devc.v, devc.d_slot_pos, 1,
                                          ops.upload(np.array([2])), np.float32(0.25), 0,
                                          np.float32(0.0), scratch.a, o.a)
    out["attention nothing visible"] = _metric(o.numpy(), np.zeros((1, H, D)))


def _truncated(g, n_layer: int | None):
    """The model of an open GGUF with only its first ``n_layer`` layers (None: all)."""
    from pocketlm.models import load_model
    m = load_model(g)
    if n_layer is None or n_layer >= m.args.n_layer:
        return m
    w = SimpleNamespace(**vars(m.w))
    w.blk = w.blk[:n_layer]
    return type(m)(dataclasses.replace(m.args, n_layer=n_layer), w)


def _check_model(out: dict, tag: str, path: str, n_layer, prompt, budget=None, decode=True):
    from pocketlm.nn import backend
    from pocketlm import nn
    from pocketlm.gguf.reader import open_gguf
    with open_gguf(path) as g:
        cpu = _truncated(g, n_layer)
        dev = backend.place(_truncated(g, n_layer), "cuda", budget)
        cc, dc = cpu.new_cache(32), dev.new_cache(32)
        steps = [("prefill", np.asarray(prompt)), ("decode", np.array([42]))]
        if not decode:
            steps = steps[:1]
        n_past = 0
        for kind, ids in steps:
            pos = np.arange(n_past, n_past + len(ids))
            hc = cpu.forward_hidden(ids, pos, cc, nn.EXACT)   # float activations, as the device
            hd = dev.forward_hidden(ids, pos, dc, dev.ops).numpy()
            n_past += len(ids)
            if budget is not None:
                continue
            out[f"{tag} {kind} hidden"] = _metric(hd, hc)
            if tag == "smallthinker":   # the 49152-row head on the host: the simulator is slow
                out[f"{tag} {kind} logits"] = _metric(nn.EXACT.linear(cpu.output, hd),
                                                      nn.EXACT.linear(cpu.output, hc))
        if budget is not None:
            from pocketlm.nn import moe
            ex = dev.experts
            out[f"{tag} budget"] = _metric(hd, hc, slots=ex.n_slots, copies=ex.copies,
                                           source=isinstance(ex, moe.ExpertSource))


def _check_llm(out: dict, smollm2: str):
    from pocketlm import LLM
    ids = [1, 504, 3358, 314, 260, 1345]
    with LLM.load(smollm2, n_ctx=64) as cpu, LLM.load(smollm2, n_ctx=64, device="cuda") as gpu:
        out["smollm2 logits"] = _metric(gpu.eval(ids), cpu.eval(ids))


def _simulator_shared_fix():
    """The simulator finds a block's shared array by its source line with a look-up then an
    insert, unlocked: two threads can each make their own, and a reduction then reads another
    thread's copy. The same look-up (static shared arrays only), under a lock."""
    import threading

    from numba.cuda.simulator import kernelapi
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res
    kernelapi.FakeCUDAShared.array = array


def main(smallthinker: str, smollm2: str):
    import time

    from pocketlm.gguf.reader import open_gguf
    if not REAL:
        _simulator_shared_fix()
        sys.setswitchinterval(1e-4)   # the block manager polls threads: hand the GIL over sooner
    rng = np.random.default_rng(1234)
    out: dict = {}
    with open_gguf(smallthinker) as g:
        slot = sum(g.tensors[f"blk.0.ffn_{p}_exps.weight"].nbytes for p in ("gate", "up", "down"))
        slot //= int(g.metadata["smallthinker.expert_count"])
    checks = [
        ("kernels", lambda: _check_kernels(out, rng)),
        ("attention", lambda: _check_attention(out, rng)),
        ("smallthinker", lambda: _check_model(out, "smallthinker", smallthinker, None,
                                              [1, 500])),
        # two layers, prefill only: each layer needs its own experts, so 3 slots evict
        ("smallthinker budget", lambda: _check_model(out, "smallthinker", smallthinker, 2,
                                                     [1, 500, 42], budget=3 * slot,
                                                     decode=False)),
        # the simulator: one layer, one token (prefill and decode are checked above)
        ("smollm2", lambda: _check_model(out, "smollm2", smollm2, None if REAL else 1,
                                         [1, 504, 3358] if REAL else [1], decode=REAL)),
    ] + ([("llm", lambda: _check_llm(out, smollm2))] if REAL else [])
    for name, check in checks:
        t0 = time.perf_counter()
        check()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
