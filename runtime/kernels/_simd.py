"""x86 AVX2 block dot products written directly in LLVM IR (through Numba intrinsics).

LLVM does not derive ``vpmaddubsw`` (unsigned x signed byte products, summed in pairs) from
scalar code, and Numba's auto-vectorized kernels reduce every 32-weight block to a scalar,
which costs more than the block's arithmetic. Here each weight row runs one IR loop of the
kind llama.cpp's AVX2 path uses: per block the weights are unpacked to 32 bytes, one
``vpmaddubsw`` + ``vpmaddwd`` gives eight int32 partial sums against the row's 8-bit
activations (K-quants weight the pairs by their sub-block scales in the ``vpmaddwd``), which
are converted and accumulated with the block scale in an 8-lane float register; lanes are
summed once per row. Per-block constant terms (Q4_0's -8, Q5_0's -16 and Q6_K's -32
offsets, Q4_1's and Q4_K's mins) use the activation block sums and accumulate separately.
Rows run two to a loop, so each activation block is loaded once for both and the two
chains of dependent instructions overlap (ffn_up of SmolLM2: 31 -> 27 us on 2 threads);
with AVX512-VNNI one ``vpdpbusd`` replaces the byte-product pair of the 32-weight types.

Numerics are "llama" (see ``pocketlm.kernels``): activations quantized per block as
ggml does (Q8_0; Q8_1 for Q4_1; Q8_K for K-quants), exact integer block dots, float32
accumulation. Used only when the host has AVX2, FMA and F16C (``AVAILABLE``); otherwise the
portable kernels run.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from pocketlm.quant import type_size

from ._base import CPU_FEATURES as _FEATURES
from ._base import VEC_OPTS, silu_f32
from ._quant import act_q8_0, act_q8_k

AVAILABLE = all(_FEATURES.get(f, False) for f in ("avx2", "fma", "f16c"))
# AVX512-VNNI's vpdpbusd on 256-bit registers: the four-product sums of vpmaddubsw +
# vpmaddwd in one instruction, exact where those are (no pair sum here reaches int16's
# limit), so results are the same bit for bit
VNNI = AVAILABLE and all(_FEATURES.get(f, False) for f in ("avx512vnni", "avx512vl"))

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _F16 = ir.FloatType(), ir.HalfType()
_V32I8, _V16I8 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 16)
_V16I16, _V8I32, _V8F32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)
_V16F32 = ir.VectorType(_F32, 16)
_V1F32 = ir.VectorType(_F32, 1)

# qtype -> (block bytes from quant's table, offset of the quants, weight offset applied
# through block sums)
LAYOUT = {q: (type_size(q), qoff, offset) for q, qoff, offset in
          (("Q4_0", 2, -8.0), ("Q4_1", 4, 0.0), ("Q5_0", 6, -16.0), ("Q8_0", 2, 0.0))}


def _declare(module, name, ret, args):
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, ir.FunctionType(ret, args), name=name)


def _c64(v):
    return ir.Constant(_I64, v)


def _half_at(builder, ptr, offset):
    p = builder.bitcast(builder.gep(ptr, [_c64(offset)]), _F16.as_pointer())
    return builder.fpext(builder.load(p, align=1), _F32)


def _weights(builder, qtype, blk):
    """The block's 32 weights as <32 x i8>: unsigned 0..15 / 0..31 for Q4/Q5, signed for Q8."""
    size, qoff, _ = LAYOUT[qtype]
    if qtype == "Q8_0":
        return builder.load(builder.bitcast(builder.gep(blk, [_c64(qoff)]), _V32I8.as_pointer()),
                            align=1)
    q = builder.load(builder.bitcast(builder.gep(blk, [_c64(qoff)]), _V16I8.as_pointer()), align=1)
    lo = builder.and_(q, ir.Constant(_V16I8, [15] * 16))
    hi = builder.lshr(q, ir.Constant(_V16I8, [4] * 16))
    w = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
    if qtype == "Q5_0":   # bit j of the 32-bit qh field is weight j's fifth bit
        qh = builder.load(builder.bitcast(builder.gep(blk, [_c64(2)]), _I32.as_pointer()), align=1)
        bits = builder.zext(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), _V32I8)
        w = builder.or_(w, builder.shl(bits, ir.Constant(_V32I8, [4] * 32)))
    return w


class _Ops:
    """The intrinsics one codegen uses, declared in its module."""

    def __init__(self, builder):
        mod = builder.module
        self.b = builder
        self.maddubs = _declare(mod, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        self.maddwd = _declare(mod, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        self.psign = _declare(mod, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
        self.fma8 = _declare(mod, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
        # scalar products are fused explicitly: left as fmul + fadd, the backend may or may
        # not contract them depending on the caller, and results would differ by call site.
        # One-lane vectors: Numba's fastmath pass flags calls that return a scalar float,
        # and a chain of reassociable calls may be regrouped (also by call site).
        self.fma1 = _declare(mod, "llvm.fma.v1f32", _V1F32, [_V1F32, _V1F32, _V1F32])
        if VNNI:
            self.dpbusd = _declare(mod, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                                   [_V8I32, _V8I32, _V8I32])

    def fma(self, a, b, c):
        """a * b + c for scalar floats, rounded once, in this order wherever it is inlined."""
        lanes = [self.b.insert_element(ir.Constant(_V1F32, ir.Undefined), v, _c64(0))
                 for v in (a, b, c)]
        return self.b.extract_element(self.b.call(self.fma1, lanes), _c64(0))

    def splat(self, v, vtype):
        b = self.b
        one = b.insert_element(ir.Constant(vtype, ir.Undefined), v, _c64(0))
        return b.shuffle_vector(one, ir.Constant(vtype, ir.Undefined),
                                ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count))

    def load(self, ptr, offset, ty):
        b = self.b
        return b.load(b.bitcast(b.gep(ptr, [offset if isinstance(offset, ir.Value)
                                             else _c64(offset)]), ty.as_pointer()), align=1)

    def dot32(self, w, x, weights16=None):
        """<32 x u8> weights . <32 x i8> activations -> <8 x i32> sums of four products
        each, pairs weighted by ``weights16`` (<16 x i16>; default 1)."""
        b = self.b
        if weights16 is None and VNNI:
            return b.call(self.dpbusd, [ir.Constant(_V8I32, None), b.bitcast(w, _V8I32),
                                        b.bitcast(x, _V8I32)])
        pairs = b.call(self.maddubs, [w, x])
        return b.call(self.maddwd, [pairs, weights16 or ir.Constant(_V16I16, [1] * 16)])


def _loop(builder, nb, inits, body):
    """Emit ``for i in range(nb)`` carrying the values ``inits``; body(i, values) -> their next
    values. Returns the final values (``inits`` if nb <= 0)."""
    entry = builder.block
    loop = builder.append_basic_block("blocks")
    done = builder.append_basic_block("done")
    builder.cbranch(builder.icmp_signed(">", nb, _c64(0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_I64)
    phis = [builder.phi(v.type) for v in inits]
    nxt = body(i, phis)
    i2 = builder.add(i, _c64(1))
    tail = builder.block
    for phi, start, new in zip([i] + phis, [_c64(0)] + inits, [i2] + nxt):
        phi.add_incoming(start, entry)
        phi.add_incoming(new, tail)
    builder.cbranch(builder.icmp_signed("<", i2, nb), loop, done)
    builder.position_at_end(done)
    out = []
    for start, last in zip(inits, nxt):
        phi = builder.phi(start.type)
        phi.add_incoming(start, entry)
        phi.add_incoming(last, tail)
        out.append(phi)
    return out


# Flags on the adds whose order decides the result. Numba's fastmath pass gives every float
# operation without flags ``reassoc``, which lets LLVM regroup the lane sums differently in
# each context it is inlined into; a row must sum the same way whether it runs alone or
# beside other rows.
_ORDERED = ("nsz",)


def _hsum(builder, v):
    """Sum of v's 8 lanes in the order of ggml's AVX hsum: lanes k and k + 4, then k and
    k + 2, then the last pair."""
    lanes = [builder.extract_element(v, _c64(k)) for k in range(8)]
    while len(lanes) > 1:
        half = len(lanes) // 2
        lanes = [builder.fadd(lanes[k], lanes[k + half], flags=_ORDERED) for k in range(half)]
    return lanes[0]


def _step_32(qtype, o, wbase, xa, da, sa):
    """One 32-weight block of Q4_0/Q4_1/Q5_0/Q8_0 (see ``_weights``)."""
    size, _, offset = LAYOUT[qtype]
    b = o.b

    def step(i, acc, acc_c):
        blk = b.gep(wbase, [b.mul(i, _c64(size))])
        w = _weights(b, qtype, blk)
        x = o.load(xa.data, b.mul(i, _c64(32)), _V32I8)
        if qtype == "Q8_0":   # vpmaddubsw takes unsigned x signed: move w's sign to x
            w, x = b.call(o.psign, [w, w]), b.call(o.psign, [x, w])
        sums = b.sitofp(o.dot32(w, x), _V8F32)
        scale = b.fmul(_half_at(b, blk, 0), b.load(b.gep(da.data, [i])), flags=_ORDERED)
        acc = b.call(o.fma8, [sums, o.splat(scale, _V8F32), acc])
        if qtype == "Q4_1" or offset:   # Q4_1: min * f16(d_x * sum); else d * sum
            first = _half_at(b, blk, 2) if qtype == "Q4_1" else scale
            acc_c = o.fma(first, b.load(b.gep(sa.data, [i])), acc_c)
        return acc, acc_c
    return step


def _sum_exact(builder, prod):
    """Sum of an <8|16 x float> whose lanes and partial sums are integers below 2**24: exact
    in any order, so the same as the scalar chain it replaces."""
    if prod.type.count == 16:
        lo = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
        hi = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(_I32, 8),
                                                            list(range(8, 16))))
        prod = builder.fadd(lo, hi)
    return _hsum(builder, prod)


def _lane_splat(b, v, lanes):
    """<16 x i16> whose lanes are v's lanes ``lanes`` (16 indices)."""
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), lanes))


def _scales_mins_k4(o, blk):
    """Q4_K's 8 6-bit scales and 8 mins (12 packed bytes at offset 4) as one <16 x i16>:
    lanes 0-7 the scales, 8-15 the mins (unpacked four at a time in 32-bit words)."""
    b = o.b

    def c(v):
        return ir.Constant(_I32, v)
    u0, u1, u2 = (o.load(blk, 4 + 4 * k, _I32) for k in range(3))
    m63, m15, m3 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
    sc_lo = b.and_(u0, m63)                                         # scales 0-3
    sc_hi = b.or_(b.and_(u2, m15), b.shl(b.and_(b.lshr(u0, c(6)), m3), c(4)))   # 4-7
    mn_lo = b.and_(u1, m63)                                         # mins 0-3
    mn_hi = b.or_(b.and_(b.lshr(u2, c(4)), m15), b.shl(b.and_(b.lshr(u1, c(6)), m3), c(4)))
    words = ir.Constant(ir.VectorType(_I32, 4), ir.Undefined)
    for k, w in enumerate((sc_lo, sc_hi, mn_lo, mn_hi)):
        words = b.insert_element(words, w, _c64(k))
    return b.zext(b.bitcast(words, _V16I8), _V16I16)


def _step_q4_k(o, wbase, xa, da, sa):
    """One 256-weight Q4_K superblock against Q8_K activations (xs: sums per 16)."""
    b = o.b
    nib = ir.Constant(_V32I8, [15] * 32)
    four = ir.Constant(_V32I8, [4] * 32)

    def step(i, acc, acc_c):
        blk = b.gep(wbase, [b.mul(i, _c64(144))])
        sm = _scales_mins_k4(o, blk)
        xbase = b.mul(i, _c64(256))
        isum = ir.Constant(_V8I32, None)
        for c in range(4):
            q = o.load(blk, 16 + 32 * c, _V32I8)
            for half, wq in ((0, b.and_(q, nib)), (1, b.lshr(q, four))):
                j = 2 * c + half
                x = o.load(xa.data, b.add(xbase, _c64(64 * c + 32 * half)), _V32I8)
                isum = b.add(isum, o.dot32(wq, x, _lane_splat(b, sm, [j] * 16)))
        # mins . block sums (per 32 = two sums per 16), integers: exact
        bs = o.load(sa.data, b.mul(i, _c64(16)), _V16F32)
        pairs = b.fadd(b.shuffle_vector(bs, bs, ir.Constant(ir.VectorType(_I32, 8),
                                                            list(range(0, 16, 2)))),
                       b.shuffle_vector(bs, bs, ir.Constant(ir.VectorType(_I32, 8),
                                                            list(range(1, 16, 2)))))
        mins = b.sitofp(b.shuffle_vector(sm, sm, ir.Constant(ir.VectorType(_I32, 8),
                                                             list(range(8, 16)))), _V8F32)
        summ = _sum_exact(b, b.fmul(mins, pairs))
        dx = b.load(b.gep(da.data, [i]))
        scale = b.fmul(_half_at(b, blk, 0), dx, flags=_ORDERED)
        acc = b.call(o.fma8, [b.sitofp(isum, _V8F32), o.splat(scale, _V8F32), acc])
        acc_c = o.fma(b.fmul(_half_at(b, blk, 2), dx, flags=_ORDERED), summ, acc_c)
        return acc, acc_c
    return step


def _step_q6_k(o, wbase, xa, da, sa):
    """One 256-weight Q6_K superblock (values 0..63, offset -32 through the sums)."""
    b = o.b
    lo4, three = ir.Constant(_V32I8, [15] * 32), ir.Constant(_V32I8, [3] * 32)

    def shr(v, k):
        return b.lshr(v, ir.Constant(_V32I8, [k] * 32)) if k else v

    def step(i, acc, acc_c):
        blk = b.gep(wbase, [b.mul(i, _c64(210))])
        xbase = b.mul(i, _c64(256))
        sc8 = o.load(blk, 192, _V16I8)                 # 16 signed scales, one per 16 weights
        sc = b.sext(sc8, _V16I16)
        isum = ir.Constant(_V8I32, None)
        for h in range(2):
            ql0 = o.load(blk, 64 * h, _V32I8)
            ql1 = o.load(blk, 64 * h + 32, _V32I8)
            qh = o.load(blk, 128 + 32 * h, _V32I8)
            for k, (ql, lshift) in enumerate(((ql0, 0), (ql1, 0), (ql0, 4), (ql1, 4))):
                low = b.and_(shr(ql, lshift), lo4)
                high = b.shl(b.and_(shr(qh, 2 * k), three), ir.Constant(_V32I8, [4] * 32))
                wq = b.or_(low, high)
                g = 8 * h + 2 * k          # scale index of the first 16 weights
                x = o.load(xa.data, b.add(xbase, _c64(128 * h + 32 * k)), _V32I8)
                isum = b.add(isum, o.dot32(wq, x, _lane_splat(b, sc, [g] * 8 + [g + 1] * 8)))
        # scales . block sums, for the -32: integers, exact in any order
        bs = o.load(sa.data, b.mul(i, _c64(16)), _V16F32)
        offs = _sum_exact(b, b.fmul(b.sitofp(sc8, _V16F32), bs))
        scale = b.fmul(_half_at(b, blk, 208), b.load(b.gep(da.data, [i])),
                       flags=_ORDERED)
        acc = b.call(o.fma8, [b.sitofp(isum, _V8F32), o.splat(scale, _V8F32), acc])
        acc_c = o.fma(scale, offs, acc_c)
        return acc, acc_c
    return step


def _steps(qtype, o, wbase, xa, da, sa):
    """The block step of ``qtype`` for the row at ``wbase``, and the scale of its constant
    terms."""
    if qtype == "Q4_K":
        return _step_q4_k(o, wbase, xa, da, sa), -1.0
    if qtype == "Q6_K":
        return _step_q6_k(o, wbase, xa, da, sa), -32.0
    return _step_32(qtype, o, wbase, xa, da, sa), LAYOUT[qtype][2] or 1.0


# the ``kind`` argument of the drivers; kinds from 4 on are K-quants (256-weight blocks)
KIND = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q8_0": 3, "Q4_K": 4, "Q6_K": 5}


def _dot_codegen(n_rows: int):
    """The codegen of dot(kind, w_1, o_1, ..., w_n, o_n, xq, xd, xs, nb) -> a tuple of
    n_rows float32: for each row, the nb blocks of weight type ``kind`` starting at
    byte o_k of the uint8 array w_k (C-contiguous, any shape; or an int64 address) against
    int8 activations xq with block scales xd and block sums xs (32-blocks: integer sums, Q4_1: f16(d * sum) as
    ggml's Q8_1; K-quants: Q8_K's sums per 16). The rows share one loop over the blocks, so
    each activation block is loaded once for all of them; every row's result is the one it
    gets alone."""
    ret = types.UniTuple(types.float32, n_rows)

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array)
                  else None for t, a in zip(sig.args, args)]
        xa, da, sa = arrays[-4:-1]
        nb = args[-1]
        o = _Ops(builder)
        # a weight given as an address (an integer) instead of an array: its bytes start there
        bases = [builder.gep(arrays[1 + 2 * k].data, [args[2 + 2 * k]])
                 if arrays[1 + 2 * k] is not None else
                 builder.inttoptr(builder.add(args[1 + 2 * k], args[2 + 2 * k]), _I8.as_pointer())
                 for k in range(n_rows)]
        done = builder.append_basic_block("dot_done")
        blocks = {q: builder.append_basic_block(q) for q in KIND}
        # the last type is the default: kinds are checked where the drivers are called
        switch = builder.switch(args[0], blocks["Q6_K"])
        incoming = []
        for q, bb in blocks.items():
            if q != "Q6_K":
                switch.add_case(ir.Constant(_I64, KIND[q]), bb)
            builder.position_at_end(bb)
            steps = [_steps(q, o, base, xa, da, sa) for base in bases]
            c_scale = ir.Constant(_F32, steps[0][1])

            def body(i, vals):
                out = []
                for k, (step, _) in enumerate(steps):
                    out += step(i, vals[2 * k], vals[2 * k + 1])
                return out
            vals = _loop(builder, nb, [ir.Constant(_V8F32, None),
                                       ir.Constant(_F32, 0.0)] * n_rows, body)
            incoming.append(([o.fma(vals[2 * k + 1], c_scale, _hsum(builder, vals[2 * k]))
                              for k in range(n_rows)], builder.block))
            builder.branch(done)
        builder.position_at_end(done)
        res = []
        for k in range(n_rows):
            phi = builder.phi(_F32)
            for vals, bb in incoming:
                phi.add_incoming(vals[k], bb)
            res.append(phi)
        return context.make_tuple(builder, ret, res)
    return ret, codegen


@intrinsic
def _dot2(typingctx, kind, wa, oa, wb, ob, xq, xd, xs, nb):
    ret, codegen = _dot_codegen(2)
    return ret(kind, wa, oa, wb, ob, xq, xd, xs, nb), codegen


PAR = dict(parallel=True, **VEC_OPTS)


@njit(**VEC_OPTS)
def _act(x, kind):
    """x (n, cols) f32 -> int8 activations (n, cols), scales and block sums for ``kind``:
    Q8_1 for Q4_1, Q8_K (scale per 256, sums per 16) for K-quants, else Q8_0."""
    if kind >= 4:
        yq, yd, ys = act_q8_k(x)
    else:
        yq, yd, ys = act_q8_0(x, kind == 1)
    return yq.astype(np.int8), yd, ys


@njit(inline="always", **VEC_OPTS)
def _pair(kind, wa, ra, wb, rb, xq, xd, xs, nb):
    """Rows ra of wa and rb of wb (either may repeat the other) through one ``_dot2``."""
    return _dot2(kind, wa, np.int64(ra * wa.shape[1]), wb, np.int64(rb * wb.shape[1]),
                 xq, xd, xs, nb)


@njit(inline="always", **VEC_OPTS)
def _halves(p, n):
    """The rows of pair p of n rows: p and the row half the range further on (the last row
    of an odd count pairs with itself). Pairs of neighbouring rows stream from memory up to
    2.8x slower (measured on Q8_0 matrices beyond the caches), distant ones do not."""
    return p + 0, min(p + (n + 1) // 2, n - 1)


@njit(inline="always", **VEC_OPTS)
def _locate(ws, r):
    """(matrix, row) of row r of the matrices ws stacked."""
    k = 0
    while r >= ws[k].shape[0]:
        r = r - ws[k].shape[0]
        k += 1
    return k, r


@njit(**PAR)
def mv(kind, w0, w1, w2, x, out):
    """Weights w0, w1, w2 ((rows_i, row_bytes) uint8 matrices of one type, all with x's
    column count; any may have no rows) times x (n, cols) f32 -> out (n, sum rows_i): the
    matrices' outputs side by side. One call quantizes x once and runs every row in one
    parallel loop, two rows at a time (``_halves``). (Three arrays rather than a tuple: the
    caller's dispatch types arrays fast, a tuple through Python.)"""
    ws = (w0, w1, w2)
    nb = np.int64(x.shape[1] // (256 if kind >= 4 else 32))
    xq, xd, xs = _act(x, kind)
    total = 0
    for k in range(len(ws)):
        total += ws[k].shape[0]
    for p in prange((total + 1) // 2):
        r0, r1 = _halves(p, total)
        k0, i0 = _locate(ws, r0)
        k1, i1 = _locate(ws, r1)
        for t in range(x.shape[0]):
            y0, y1 = _pair(kind, ws[k0], i0, ws[k1], i1, xq[t], xd[t], xs[t], nb)
            out[t, r0] = y0
            out[t, r1] = y1


@njit(**PAR)
def _rows_at(kind, w, idx, xq, xd, xs, nb, out):
    """out[idx[i]] = row idx[i] of w against the quantized activations, two rows at a time
    (``_halves``)."""
    n = idx.shape[0]
    for p in prange((n + 1) // 2):
        ia, ib = _halves(p, n)
        ra, rb = idx[ia], idx[ib]
        ya, yb = _pair(kind, w, ra, w, rb, xq, xd, xs, nb)
        out[ra] = ya
        out[rb] = yb


@njit(**VEC_OPTS)
def mv_rows(kind, w2, x, idx, out):
    """Rows idx of w2 times x (1, cols) -> out[idx]; other entries untouched."""
    nb = np.int64(x.shape[1] // (256 if kind >= 4 else 32))
    xq, xd, xs = _act(x, kind)
    _rows_at(kind, w2, idx, xq[0], xd[0], xs[0], nb, out)


@njit(**PAR)
def _gate_up(kind, addr, rb, xq, xd, xs, nb, relu, g, u):
    """g[e], u[e] = expert e's gate and up rows (at byte addresses addr[e, 0] and addr[e, 1],
    rb bytes a row) against the quantized activations, every expert's rows in one parallel
    loop, two rows at a time (``_halves``). With ``relu`` (ReGLU) an up row is computed only
    where its gate is positive: elsewhere it would be multiplied by 0 (u stays 0 there)."""
    k, n = g.shape
    half = (n + 1) // 2
    for p in prange(k * half):
        e = p // half
        ra, rb_ = _halves(p - e * half, n)
        ga, gb = _dot2(kind, addr[e, 0], ra * rb, addr[e, 0], rb_ * rb, xq, xd, xs, nb)
        g[e, ra] = ga
        g[e, rb_] = gb
        if relu and not (ga > 0 or gb > 0):
            continue
        r0, r1 = ra, rb_
        if relu:      # one active row of the two: compute it twice, as a pair
            r0 = ra if ga > 0 else rb_
            r1 = rb_ if gb > 0 else ra
        ua, ub = _dot2(kind, addr[e, 1], r0 * rb, addr[e, 1], r1 * rb, xq, xd, xs, nb)
        u[e, r0] = ua
        u[e, r1] = ub


@njit(**PAR)
def _down_rows(kind, addr, rb, hq, hd, hs, nb, out):
    """out[e] = expert e's down matrix (at addr[e, 2]) times its activations hq[e]."""
    k, n = out.shape
    half = (n + 1) // 2
    for p in prange(k * half):
        e = p // half
        ra, rb_ = _halves(p - e * half, n)
        ya, yb = _dot2(kind, addr[e, 2], ra * rb, addr[e, 2], rb_ * rb, hq[e], hd[e], hs[e], nb)
        out[e, ra] = ya
        out[e, rb_] = yb


@njit(**VEC_OPTS)
def experts(kind, addr, n_ff, rb_in, rb_ff, x, relu, out):
    """k experts on one token: out[e] (n_embd,) = down_e · (act(gate_e · x) * (up_e · x)),
    x (1, n_embd); expert e's gate and up (n_ff rows of rb_in bytes) and down (n_embd rows
    of rb_ff bytes) start at the byte addresses addr[e]. Returns the number of up rows
    computed (``relu``: those with a positive gate). The same block dots, activation quantization and GLU as separate
    calls, in two parallel loops for all the experts together."""
    k, n_embd = out.shape
    blk = 256 if kind >= 4 else 32
    xq, xd, xs = _act(x, kind)
    g = np.empty((k, n_ff), np.float32)
    u = np.zeros((k, n_ff), np.float32)
    _gate_up(kind, addr, rb_in, xq[0], xd[0], xs[0], np.int64(n_embd // blk), relu, g, u)
    h = np.zeros((k, n_ff), np.float32)
    n = 0
    for e in range(k):
        for r in range(n_ff):
            if not relu:
                h[e, r] = silu_f32(g[e, r]) * u[e, r]
            elif g[e, r] > 0:
                h[e, r] = g[e, r] * u[e, r]
                n += 1
    hq, hd, hs = _act(h, kind)
    _down_rows(kind, addr, rb_ff, hq, hd, hs, np.int64(n_ff // blk), out)
    return n if relu else k * n_ff
