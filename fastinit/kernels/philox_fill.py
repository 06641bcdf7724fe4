"""Fused one-pass fills: Philox4x32-10 → Uniform / Normal / TruncNormal / Constant.

One tensor (a drop-in call) is filled by ``_fill_one_kernel``: its layout, key
and six parameters are scalar arguments, its spec kind a compile-time constant,
and repeated calls launch the compiled kernel directly (:func:`fill_one`).

One launch fills a whole batch of tensors of one dtype. The host builds one
table, O(targets) in size and copied to the device once (per target: address,
layout, spec kind and parameters, key, first program id); each program finds
its target by binary search on the first program ids, then fills
``4 * CALLS`` consecutive global elements of one row of that target.

Indexing (the RNG contract): global element ``g`` takes word ``g % 4`` of the
Philox call with counter ``(g // 4 low, g // 4 high, 0, 0)`` and key
``(key low, key high)``. A program computes ``CALLS`` calls, i.e. all four words
of each, and writes the up to ``4 * CALLS`` elements they cover: no word is
wasted. A target's local element ``j = r * cols + c`` is global element
``offset + r * row_stride + c`` (``rows == 1`` for an unsharded tensor), and the
masks keep every store inside the row, so tails and shard edges are exact.
Element indices are 64-bit; the counter is built in 32-bit lanes with the carry.

``fastinit.rng`` holds the same computation in plain torch (the reference).
"""

from __future__ import annotations

import inspect
import os
import struct

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from fastinit.specs import N_PARAMS

CALLS = 512  # Philox calls per program → 2048 elements
NUM_WARPS = 4
# Uniform values must be bit-identical to the reference (a*b rounded, then +c
# rounded): forbid contracting them into FMAs on the GPU. The interpreter runs
# numpy, which never fuses, and takes no compile options.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_COMPILE_OPTIONS = {} if _INTERPRET else {"enable_fp_fusion": False}


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Random123's round and key schedule; the
    multipliers and Weyl constants are fastinit.rng's PHILOX_M0/M1/W0/W1)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        # One 32x32 -> 64-bit product per multiplier (a single IMAD.WIDE.U32
        # on sm_90) instead of separate high and low halves (IMAD.HI + IMAD).
        m0 = c0.to(tl.uint64) * 0xD2511F53
        m1 = c2.to(tl.uint64) * 0xCD9E8D57
        hi0 = (m0 >> 32).to(tl.uint32)
        lo0 = m0.to(tl.uint32)
        hi1 = (m1 >> 32).to(tl.uint32)
        lo1 = m1.to(tl.uint32)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _unit(w):
    """[0, 1) from the top 24 bits of a word: exact in float32."""
    return (w >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _erfinv_central(t, g):
    """erfinv(t - 1) where w = -log(t (2 - t)) = -ln2 g < 5: Giles' central polynomial."""
    ws = tl.fma(g, -0.6931471805599453, -2.5)
    p = tl.fma(2.81022636e-08, ws, 3.43273939e-07)
    p = tl.fma(p, ws, -3.5233877e-06)
    p = tl.fma(p, ws, -4.39150654e-06)
    p = tl.fma(p, ws, 0.00021858087)
    p = tl.fma(p, ws, -0.00125372503)
    p = tl.fma(p, ws, -0.00417768164)
    p = tl.fma(p, ws, 0.246640727)
    p = tl.fma(p, ws, 1.50140941)
    return p * (t - 1.0)


@triton.jit
def _erfinv_mid(t, g):
    """erfinv(t - 1) for w < 16: Giles' two polynomials."""
    w = g * -0.6931471805599453
    wl = tl.sqrt(w) - 3.0
    q = tl.fma(-0.000200214257, wl, 0.000100950558)
    q = tl.fma(q, wl, 0.00134934322)
    q = tl.fma(q, wl, -0.00367342844)
    q = tl.fma(q, wl, 0.00573950773)
    q = tl.fma(q, wl, -0.0076224613)
    q = tl.fma(q, wl, 0.00943887047)
    q = tl.fma(q, wl, 1.00167406)
    q = tl.fma(q, wl, 2.83297682)
    return tl.where(w < 5.0, _erfinv_central(t, g), q * (t - 1.0))


@triton.jit
def _erfinv_full(t, g):
    """erfinv(t - 1) for any w: below 16 Giles' polynomials, beyond (the deep
    lower tail) Acklam's rational quantile at p = t / 2, over sqrt(2)."""
    r = tl.sqrt(_log2(t * 0.5) * -1.3862943611198906)
    num = tl.fma(-7.784894002430293e-03, r, -3.223964580411365e-01)
    num = tl.fma(num, r, -2.400758277161838e+00)
    num = tl.fma(num, r, -2.549732539343734e+00)
    num = tl.fma(num, r, 4.374664141464968e+00)
    num = tl.fma(num, r, 2.938163982698783e+00)
    den = tl.fma(7.784695709041462e-03, r, 3.224671290700398e-01)
    den = tl.fma(den, r, 2.445134137142996e+00)
    den = tl.fma(den, r, 3.754408661907416e+00)
    tail = num / tl.fma(den, r, 1.0) * 0.7071067811865476
    return tl.where(g * -0.6931471805599453 < 16.0, _erfinv_mid(t, g), tail)


@triton.jit
def _trunc_t(w, a, b):
    """The CDF window's point t = lo + span u, u = (x + 1/2) 2^-24 for x the top
    24 bits of the word, as one multiply-add: t = a x + b (a = span 2^-24,
    b = lo + span 2^-25)."""
    return tl.fma((w >> 8).to(tl.float32), a, b)


@triton.jit
def _clamp_t(t):
    """Keep t in (0, 2): log(t (2 - t)) finite, and the upper tail below the Acklam branch."""
    return tl.minimum(tl.maximum(t, 1.1754943508222875e-38), 1.9999998807907104)


@triton.jit
def _trunc4(w0, w1, w2, w3, p0, p1, p2, p3, p4, p5):
    """Truncated normal by inverse CDF, x = mean + scale * erfinv(t - 1), clamped
    to [a, b]: Giles' polynomials in w = -log(t (2 - t)) (as fastinit.rng.erfinv_f32,
    with fused multiply-adds). A program computes only the polynomials its
    elements need. When the whole CDF window is central (every w < 5: windows
    inside about +-2.7 sigma, e.g. +-2 sigma), known from the window's ends
    alone, it computes the central polynomial with no clamp of t and nothing
    else. Otherwise the largest w among its elements decides: the second
    polynomial too when some w >= 5 (std=.02's default bounds), Acklam's tail
    as well when some w >= 16 (t below 5.6e-8: windows deep in the lower tail,
    such as a mirrored [5 sigma, 6 sigma]). The values are those of the branch
    each element's own w selects, whatever ran."""
    a = p1 * 5.9604644775390625e-08
    b = tl.fma(p1, 2.9802322387695312e-08, p0)
    # The window's ends (x = 0 and x = 2^24 - 1; t is monotone in x), and the
    # smallest t (2 - t) over it, which is at an end (concave): w < 5 everywhere
    # if log2 of it exceeds -5 / ln 2 = -7.2135 (with a margin for rounding).
    e0 = b
    e1 = tl.fma(16777215.0, a, b)
    c0 = _clamp_t(e0)
    c1 = _clamp_t(e1)
    g_ends = tl.minimum(_log2(c0 * (2.0 - c0)), _log2(c1 * (2.0 - c1)))
    central = (tl.minimum(e0, e1) >= 1.1754943508222875e-38) & (tl.maximum(e0, e1) <= 1.9999998807907104)
    if central & (g_ends > -7.2063):
        t0 = _trunc_t(w0, a, b)
        t1 = _trunc_t(w1, a, b)
        t2 = _trunc_t(w2, a, b)
        t3 = _trunc_t(w3, a, b)
        r0 = _erfinv_central(t0, _log2(t0 * (2.0 - t0)))
        r1 = _erfinv_central(t1, _log2(t1 * (2.0 - t1)))
        r2 = _erfinv_central(t2, _log2(t2 * (2.0 - t2)))
        r3 = _erfinv_central(t3, _log2(t3 * (2.0 - t3)))
    else:
        t0 = _clamp_t(_trunc_t(w0, a, b))
        t1 = _clamp_t(_trunc_t(w1, a, b))
        t2 = _clamp_t(_trunc_t(w2, a, b))
        t3 = _clamp_t(_trunc_t(w3, a, b))
        l0 = _log2(t0 * (2.0 - t0))  # g = log2(t (2 - t)) <= 0
        l1 = _log2(t1 * (2.0 - t1))
        l2 = _log2(t2 * (2.0 - t2))
        l3 = _log2(t3 * (2.0 - t3))
        # w = -ln2 g, so the largest w is -ln2 times the smallest g (rounding is monotone).
        wmax = tl.min(tl.minimum(tl.minimum(l0, l1), tl.minimum(l2, l3)), axis=0) * -0.6931471805599453
        if wmax < 5.0:
            r0 = _erfinv_central(t0, l0)
            r1 = _erfinv_central(t1, l1)
            r2 = _erfinv_central(t2, l2)
            r3 = _erfinv_central(t3, l3)
        elif wmax < 16.0:
            r0 = _erfinv_mid(t0, l0)
            r1 = _erfinv_mid(t1, l1)
            r2 = _erfinv_mid(t2, l2)
            r3 = _erfinv_mid(t3, l3)
        else:
            r0 = _erfinv_full(t0, l0)
            r1 = _erfinv_full(t1, l1)
            r2 = _erfinv_full(t2, l2)
            r3 = _erfinv_full(t3, l3)
    v0 = tl.minimum(tl.maximum(tl.fma(p2, r0, p3), p4), p5)
    v1 = tl.minimum(tl.maximum(tl.fma(p2, r1, p3), p4), p5)
    v2 = tl.minimum(tl.maximum(tl.fma(p2, r2, p3), p4), p5)
    v3 = tl.minimum(tl.maximum(tl.fma(p2, r3, p3), p4), p5)
    return v0, v1, v2, v3


# The GPU's sin.approx / cos.approx / lg2.approx (as cuRAND's Box-Muller,
# __sincosf, __logf): on [0, 2pi) sin and cos within about 1e-6 of the
# correctly rounded value, and no range reduction; libdevice's sinf/cosf/logf
# would make normal and truncated-normal fills compute-bound. The interpreter
# has no libdevice: exact functions there.
_FAST_TRIG = tl.constexpr(not _INTERPRET)


@triton.jit
def _log2(x):
    """log2 by the GPU's lg2.approx (one MUFU.LG2; relative error about 2^-22,
    as cuRAND's __logf): libdevice's accurate log is a dozen FMAs a call."""
    if _FAST_TRIG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _sincos(x):
    if _FAST_TRIG:
        return libdevice.fast_sinf(x), libdevice.fast_cosf(x)
    else:
        return tl.sin(x), tl.cos(x)


@triton.jit
def _wrap(x, p0, p2):
    """A uniform value above the top ``p2`` (one the output dtype would hold as ``b``)
    becomes ``a``, as torch's ``uniform_`` makes it (``value == to ? from : value``)."""
    return tl.where(x > p2, p0, x)


@triton.jit
def _uniform(w, p0, p1, p2):
    return _wrap(p0 + p1 * _unit(w), p0, p2)


_BY_HAND_BF16 = tl.constexpr(_INTERPRET)


@triton.jit
def _rows_of_four(v0, v1, v2, v3, OUT_DTYPE: tl.constexpr, IS_BF16: tl.constexpr, CALLS: tl.constexpr):
    """[CALLS, 4] in the output dtype: row i holds call i's four words (elements
    4 * (q0 + i) + lane). Built in registers; called inside each store branch so
    that any layout change the masked store needs stays off the aligned path."""
    vals = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [CALLS, 4])
    if IS_BF16 and _BY_HAND_BF16:
        # Round to nearest even by hand in the interpreter (whose float32 ->
        # bfloat16 cast truncates); the GPU's own conversion (cvt.rn.bf16x2.f32,
        # one instruction per two values) rounds the same way. Values are finite.
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return vals.to(OUT_DTYPE)


@triton.jit
def _values(w0, w1, w2, w3, kind, p0, p1, p2, p3, p4, p5, CALLS: tl.constexpr):
    """The four words of each call -> four float32 values of spec ``kind``.
    ``kind`` is a constexpr in the single-target kernel (one branch compiled)
    and a runtime value in the batch kernel (all four compiled)."""
    if kind == 1:  # uniform
        if p1 >= 7.888609052210118e-31:
            # span * (x 2^-24) == (span 2^-24) * x exactly while span 2^-24 and
            # the product stay normal floats (span >= 2^-100): one multiply less.
            s1 = p1 * 5.9604644775390625e-08
            v0 = _wrap(p0 + s1 * (w0 >> 8).to(tl.float32), p0, p2)
            v1 = _wrap(p0 + s1 * (w1 >> 8).to(tl.float32), p0, p2)
            v2 = _wrap(p0 + s1 * (w2 >> 8).to(tl.float32), p0, p2)
            v3 = _wrap(p0 + s1 * (w3 >> 8).to(tl.float32), p0, p2)
        else:
            v0 = _uniform(w0, p0, p1, p2)
            v1 = _uniform(w1, p0, p1, p2)
            v2 = _uniform(w2, p0, p1, p2)
            v3 = _uniform(w3, p0, p1, p2)
    elif kind == 2:  # normal: Box–Muller on (w0, w1) and (w2, w3), both outputs used
        # r = sqrt(-2 ln u) as sqrt(log2(u) * -2 ln 2); the angle 2 pi (x 2^-24)
        # as x (2 pi 2^-24): the same float32 product, one multiply fewer.
        ra = tl.sqrt(_log2(((w0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08) * -1.3862943611198906)
        ta = (w1 >> 8).to(tl.float32) * 3.745070282126183e-07
        rb = tl.sqrt(_log2(((w2 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08) * -1.3862943611198906)
        tb = (w3 >> 8).to(tl.float32) * 3.745070282126183e-07
        sa, ca = _sincos(ta)
        sb, cb = _sincos(tb)
        v0 = tl.fma(p1, ra * ca, p0)
        v1 = tl.fma(p1, ra * sa, p0)
        v2 = tl.fma(p1, rb * cb, p0)
        v3 = tl.fma(p1, rb * sb, p0)
    elif kind == 3:  # truncated normal by inverse CDF
        v0, v1, v2, v3 = _trunc4(w0, w1, w2, w3, p0, p1, p2, p3, p4, p5)
    else:  # constant
        v0 = tl.zeros([CALLS], dtype=tl.float32) + p0
        v1 = v0
        v2 = v0
        v3 = v0
    return v0, v1, v2, v3


@triton.jit
def _fill_block(base, row_start, g_row, blk, cols, base_aligned, k0, k1, kind, p0, p1, p2, p3, p4, p5,
                OUT_DTYPE: tl.constexpr, IS_BF16: tl.constexpr, CALLS: tl.constexpr):
    """Fill program ``blk`` of one row: the ``4 * CALLS`` elements of calls
    ``q0 .. q0 + CALLS - 1`` that fall inside the row.

    ``row_start``: element index (from ``base``) of the row's first element;
    ``g_row``: its global flat index (>= 0); ``cols``: the row's length.
    """
    q0 = (g_row >> 2) + blk * CALLS  # first Philox call of this program
    # Counter (q low, q high) for q = q0 + i, in 32-bit lanes with the carry.
    lo0 = (q0 & 0xFFFFFFFF).to(tl.uint32)
    c0 = lo0 + tl.arange(0, CALLS).to(tl.uint32)
    c1 = (q0 >> 32).to(tl.uint32) + (c0 < lo0).to(tl.uint32)
    z = tl.zeros([CALLS], dtype=tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, z, z, z + k0, z + k1)
    v0, v1, v2, v3 = _values(w0, w1, w2, w3, kind, p0, p1, p2, p3, p4, p5, CALLS)

    lanes = tl.arange(0, CALLS)[:, None] * 4 + tl.arange(0, 4)[None, :]
    c_first = q0 * 4 - g_row  # column of this program's first element inside the row
    first = row_start + c_first  # ... and its element index from base
    if (c_first >= 0) & (c_first + 4 * CALLS <= cols) & (first % 4 == 0) & (base_aligned != 0):
        # Whole block inside the row, 16-byte aligned: unmasked, vectorized stores.
        # (x // 4) * 4 == x here; written so, the compiler can prove the alignment.
        tl.store(base + (first // 4) * 4 + lanes, _rows_of_four(v0, v1, v2, v3, OUT_DTYPE, IS_BF16, CALLS))
    else:  # row edges, shard boxes, odd offsets: masked
        c = c_first + lanes
        vals = _rows_of_four(v0, v1, v2, v3, OUT_DTYPE, IS_BF16, CALLS)
        tl.store(base + row_start + c, vals, mask=(c >= 0) & (c < cols))


# One target, its few parameters passed as scalars: no table, no copy to the
# device, the spec kind a compile-time constant (one branch compiled, so each
# kind's instruction count stands alone: benchmarks/sass_count.py). Integer
# arguments are typed and never specialized, so one compiled kernel per
# (dtype, kind, 16-byte alignment of ``out``, one row or several) serves every call.
@triton.jit(do_not_specialize=["aligned", "offset", "cols", "row_stride", "bpr", "k0", "k1"])
def _fill_one_kernel(
    out,  # the tensor's data
    aligned: tl.int32,  # 1 if out is 16-byte aligned
    offset: tl.int64,  # global index of the first element (Layout.offset)
    cols: tl.int64,  # elements per row (rows = programs / bpr)
    row_stride: tl.int64,  # global index distance between rows
    bpr: tl.int32,  # programs per row
    k0: tl.uint32,  # key, low word
    k1: tl.uint32,  # key, high word
    p0: tl.float32, p1: tl.float32, p2: tl.float32, p3: tl.float32, p4: tl.float32, p5: tl.float32,
    KIND: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    IS_BF16: tl.constexpr,
    CALLS: tl.constexpr,
    ONE_ROW: tl.constexpr,  # rows == 1 (every unsharded tensor): no division
):
    pid = tl.program_id(0)
    if ONE_ROW:
        row = pid.to(tl.int64) * 0
        blk = pid.to(tl.int64)
    else:
        row = (pid // bpr).to(tl.int64)
        blk = (pid % bpr).to(tl.int64)
    # (The casts are no-ops when compiled; the interpreter hands scalars over as int64.)
    _fill_block(out, row * cols, offset + row * row_stride, blk, cols, aligned, k0.to(tl.uint32),
                k1.to(tl.uint32), KIND, p0, p1, p2, p3, p4, p5, OUT_DTYPE, IS_BF16, CALLS)


# The per-batch table is ONE int64 tensor (one host-to-device copy per launch):
#   [0, T]                     first program id of each target, then the total;
#   T+1 + 8*t + (0..7)         target t: offset, cols, row_stride, blocks per row,
#                              kind, key low word, key high word, and where its
#                              data starts, in elements from ``base``;
#   T+1 + 8*T + N_PARAMS*t + i parameter i of target t, as its float32 bits.


# Batch sizes are launch arguments, not compile-time facts: no recompiling when
# a batch has one target (Triton would specialize integers equal to 1).
@triton.jit(do_not_specialize=["base_aligned", "n_targets", "search_steps"])
def _fill_kernel(
    base,  # typed pointer every target's data is addressed from (Triton knows its alignment)
    base_aligned,  # 1 if base is 16-byte aligned
    table,  # int64, laid out as above (not "params": Triton's launcher binds that name)
    n_targets,  # T
    search_steps,  # ceil(log2(T)): binary-search steps from program id to target
    OUT_DTYPE: tl.constexpr,
    IS_BF16: tl.constexpr,
    N_PARAMS: tl.constexpr,
    CALLS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Which target this program fills: the last t with first[t] <= pid. A search
    # instead of a per-program map keeps the table O(targets), not O(elements).
    lo = pid * 0
    hi = lo + n_targets
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(table + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    t = lo
    local = pid - tl.load(table + t)
    row_ = table + (n_targets + 1) + t * 8
    offset = tl.load(row_)
    cols = tl.load(row_ + 1)
    row_stride = tl.load(row_ + 2)
    bpr = tl.load(row_ + 3)
    kind = tl.load(row_ + 4)
    k0 = tl.load(row_ + 5).to(tl.uint32)
    k1 = tl.load(row_ + 6).to(tl.uint32)
    start = tl.load(row_ + 7)
    # 32-bit division (programs and blocks per row are < 2^31); 64-bit division
    # is a long software routine that every thread would run.
    local32 = local.to(tl.int32)
    bpr32 = bpr.to(tl.int32)
    row = (local32 // bpr32).to(tl.int64)
    blk = (local32 % bpr32).to(tl.int64)
    pp = table + (n_targets + 1) + n_targets * 8 + t * N_PARAMS
    p0 = tl.load(pp).to(tl.uint32).to(tl.float32, bitcast=True)
    p1 = tl.load(pp + 1).to(tl.uint32).to(tl.float32, bitcast=True)
    p2 = tl.load(pp + 2).to(tl.uint32).to(tl.float32, bitcast=True)
    p3 = tl.load(pp + 3).to(tl.uint32).to(tl.float32, bitcast=True)
    p4 = tl.load(pp + 4).to(tl.uint32).to(tl.float32, bitcast=True)
    p5 = tl.load(pp + 5).to(tl.uint32).to(tl.float32, bitcast=True)

    _fill_block(base, start + row * cols, offset + row * row_stride, blk, cols, base_aligned, k0, k1, kind,
                p0, p1, p2, p3, p4, p5, OUT_DTYPE, IS_BF16, CALLS)


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def fill_batch(tensors, layouts, kinds, keys, params) -> None:
    """Fill same-dtype contiguous ``tensors`` in one launch.

    Args:
        tensors: contiguous tensors of one dtype on one device.
        layouts: per tensor ``(offset, rows, cols, row_stride)`` in its global flat index.
        kinds: per tensor spec kind (``fastinit.specs.KIND_*``).
        keys: per tensor 64-bit key.
        params: per tensor ``N_PARAMS`` floats.
    """
    if not tensors:
        return
    dtype = tensors[0].dtype
    device = tensors[0].device
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the triton engine cannot fill dtype {dtype}")
    for t in tensors:
        if t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError("fill_batch takes contiguous tensors of one dtype on one device")
    # Targets are addressed in elements from one base tensor; a tensor whose
    # address is not a whole number of elements away (never seen from torch's
    # allocators, but possible) goes in its own launch.
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.data_ptr() % t.element_size(), []).append(i)
    if len(groups) == 1:  # always, in practice: the batch as it is
        batches = [(tensors, layouts, kinds, keys, params)]
    else:
        batches = [([tensors[i] for i in idx], [layouts[i] for i in idx], [kinds[i] for i in idx],
                    [keys[i] for i in idx], [params[i * N_PARAMS + j] for i in idx for j in range(N_PARAMS)])
                   for idx in groups.values()]
    for batch in batches:
        grid, args, kwargs = launch_args(*batch)
        _fill_kernel[grid](*args, **kwargs)


def launch_args(tensors, layouts, kinds, keys, params):
    """``(grid, args, kwargs)`` of the launch that fills ``tensors`` (see :func:`fill_batch`)."""
    n = len(tensors)
    dtype, device, size = tensors[0].dtype, tensors[0].device, tensors[0].element_size()
    base = next((t for t in tensors if t.data_ptr() % 16 == 0), tensors[0])
    first, rows_ = [0], []
    for t, (offset, rows, cols, row_stride), kind, key in zip(tensors, layouts, kinds, keys):
        bpr = triton.cdiv(cols // 4 + 2, CALLS)
        first.append(first[-1] + rows * bpr)
        rows_ += (offset, cols, row_stride, bpr, kind, key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF,
                  (t.data_ptr() - base.data_ptr()) // size)
    # Built in plain Python, then one tensor and one copy: each torch op here
    # costs microseconds that a small fill does not.
    try:
        bits = list(struct.unpack(f"<{len(params)}I", struct.pack(f"<{len(params)}f", *params)))
    except OverflowError:  # beyond float32: inf, as torch.tensor(..., float32) makes it
        with np.errstate(over="ignore"):
            bits = np.asarray(params, dtype=np.float32).view(np.uint32).tolist()
    table = torch.tensor(first + rows_ + bits, dtype=torch.int64)
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    kwargs = dict(OUT_DTYPE=_TL_DTYPES[dtype], IS_BF16=dtype == torch.bfloat16, N_PARAMS=N_PARAMS,
                  CALLS=CALLS, num_warps=NUM_WARPS, **_COMPILE_OPTIONS)
    aligned = int(base.data_ptr() % 16 == 0)
    return (first[-1],), (base, aligned, table, n, max(n - 1, 0).bit_length()), kwargs




# --------------------------------------------------------------------------- one target
#
# A drop-in call fills one tensor: its parameters travel as kernel arguments
# (no table, no host-to-device copy), and once the kernel for its (device,
# dtype, kind, alignment, shape constants) is compiled, later calls hand the
# arguments straight to the compiled kernel's launcher, skipping Triton's
# per-call Python dispatch (argument binding, specialization, cache-key
# hashing, launch metadata). The first call of each kind goes through
# ``_fill_one_kernel[grid](...)``, which compiles and launches as usual.

# (device, dtype, kind, aligned, one row, CALLS, NUM_WARPS) -> (launcher, function, metadata, constexprs)
_DIRECT: dict = {}
_LAUNCHER_PARAMS = ["gridX", "gridY", "gridZ", "stream", "function", "kernel_metadata", "launch_metadata",
                    "launch_enter_hook", "launch_exit_hook", "args"]


def _current_device() -> int:
    return torch.cuda.current_device()


def _current_stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


if not _INTERPRET and torch.cuda.is_available():  # the raw calls Triton's own driver uses
    _current_device = torch._C._cuda_getDevice  # noqa: F811
    _current_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811


def _hooks_idle() -> bool:
    """No launch hook is installed (a profiler such as proton installs them;
    with one, every launch takes Triton's own path so the hook sees it)."""
    rt = triton.knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def direct_launch_supported(compiled) -> bool:
    """Whether ``compiled`` (what ``kernel[grid](...)`` returned) can be launched
    by calling its launcher directly, as ``JITFunction.run`` does in Triton 3.x:
    ``compiled.run(gridX, gridY, gridZ, stream, compiled.function,
    compiled.packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``,
    with every kernel argument (constexprs included) in signature order.
    Anything else (another Triton, the interpreter, an asynchronous compile)
    answers False, and launches keep going through ``kernel[grid](...)``."""
    if _INTERPRET or compiled is None:
        return False
    try:
        launcher = compiled.run  # creates the launcher and loads the module if needed
        if getattr(compiled, "function", None) is None or not hasattr(compiled, "packed_metadata"):
            return False
        names = list(inspect.signature(launcher).parameters.values())
        if [p.name for p in names] != _LAUNCHER_PARAMS or names[-1].kind != inspect.Parameter.VAR_POSITIONAL:
            return False
        return list(compiled.src.signature) == [p.name for p in _fill_one_kernel.params]
    except Exception:  # noqa: BLE001 - any surprise means: use Triton's own path
        return False


def programs_per_row(offset: int, rows: int, cols: int) -> int:
    """Programs per row: exact for one row (the Philox calls it touches), an
    upper bound for several (rows start at different offsets mod 4)."""
    if rows == 1:
        return -(-(((offset + cols - 1) >> 2) - (offset >> 2) + 1) // CALLS)
    return -(-(cols // 4 + 2) // CALLS)


def fill_one(tensor, offset, rows, cols, row_stride, kind, key, params) -> None:
    """Fill one contiguous ``tensor`` (layout ``offset, rows, cols, row_stride``
    in its global flat index) with spec ``kind`` and its ``N_PARAMS`` floats
    ``params``, keyed by the 64-bit ``key``: one launch, scalar arguments."""
    dtype = tensor.dtype
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the triton engine cannot fill dtype {dtype}")
    if not tensor.is_contiguous():
        raise ValueError("fill_one takes a contiguous tensor")
    ptr = tensor.data_ptr()
    aligned = 1 if ptr & 15 == 0 else 0
    bpr = programs_per_row(offset, rows, cols)
    device = tensor.get_device()
    entry = _DIRECT.get((device, dtype, kind, aligned, rows == 1, CALLS, NUM_WARPS))
    if entry is not None and _hooks_idle() and _current_device() == device:
        launcher, function, metadata, constexprs = entry
        launcher(rows * bpr, 1, 1, _current_stream(device), function, metadata, None, None, None,
                 ptr, aligned, offset, cols, row_stride, bpr, key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF,
                 *params, *constexprs)
        return
    _fill_one_launch(tensor, device, aligned, rows * bpr,
                     (aligned, offset, cols, row_stride, bpr, key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF, *params),
                     kind, rows == 1)


def _fill_one_launch(tensor, device, aligned, grid, args, kind, one_row) -> None:
    """Triton's own launch (compiling on first use); remembers the compiled
    kernel for direct launches when :func:`direct_launch_supported`."""
    dtype = tensor.dtype
    constexprs = (kind, _TL_DTYPES[dtype], dtype == torch.bfloat16, CALLS, one_row)
    kwargs = dict(zip(("KIND", "OUT_DTYPE", "IS_BF16", "CALLS", "ONE_ROW"), constexprs))
    if device >= 0 and device != _current_device():
        with torch.cuda.device(device):
            _fill_one_kernel[(grid,)](tensor, *args, num_warps=NUM_WARPS, **kwargs, **_COMPILE_OPTIONS)
        return
    compiled = _fill_one_kernel[(grid,)](tensor, *args, num_warps=NUM_WARPS, **kwargs, **_COMPILE_OPTIONS)
    if direct_launch_supported(compiled):
        _DIRECT[(device, dtype, kind, aligned, one_row, CALLS, NUM_WARPS)] = (
            compiled.run, compiled.function, compiled.packed_metadata, constexprs)
