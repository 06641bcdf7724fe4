"""The ``cpu`` engine: pure torch and numpy, chunk-parallel on a thread pool.

The logical flat index of a tensor is cut into chunks of :data:`CHUNK` elements.
Chunk ``c`` of a tensor with key ``k`` draws from its own stream, whose state is
SHAKE128 of the 128 bits ``(k, c)`` (a domain byte apart): numpy's SFC64
for uniform and truncated normal fills (float32 values are made from its raw
64-bit words, two 24-bit uniforms per word), torch's Mersenne Twister (all 19937
bits of state) for normal fills. (A torch generator seeded with ``manual_seed``
keeps only 32 bits of its seed, so one seeded per chunk would repeat chunks at
model scale.) Values therefore depend on ``(key, element index)`` only: never on
the number of threads, the order of chunks, or the other tensors of the batch.

Worker threads are Python threads, so the GIL decides how well they scale: every
numpy or torch call releases it around its loop and takes it back after, and on
a busy machine each hand-over can cost tens of microseconds. A chunk is therefore
generated, transformed (the truncated normal's inverse CDF), rounded
(float16/bfloat16 receive the float32 values rounded once, to nearest even) and
copied with a handful of whole-chunk calls (measured on 2 cores: uniform fills
went from 429 M/s on one thread and 399 M/s on two with the former 32K-element
slabs to 848 M/s on two with whole chunks). Those calls are numpy's, which never
start threads of their own; the only torch calls made from workers are
``normal_`` (serial in torch) and ``erfinv_``/``ndtri`` on pieces of
:data:`GRAIN` elements, so that ATen's OpenMP team (used above that size) never
starts inside a worker. Extra memory: a few chunk buffers per thread.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._interrupts import interrupts_held
from ..seeding import MASK64
from ..specs import Constant, Normal, TruncNormal, Uniform, uniform_top
from .alias import quiet, restore_versions

CHUNK = 1 << 18
# Elements per torch call made from the engine's threads: torch 2.13 runs erfinv_
# on its OpenMP team above 2048 elements, and a team started from a worker thread
# costs milliseconds on a busy machine (measured: 6-9 ms for 2560-32768 elements
# on 2 loaded cores, 4 us for 2048).
GRAIN = 2048
# Elements per torch copy made from the engine's threads: ATen parallelizes a copy
# of 32768 elements or more (its grain); below that it runs on the calling thread.
COPY_GRAIN = 32767
_MT_N = 624
_F32_TINY = np.finfo(np.float32).tiny
# Below this t = 2p the float32 v = t - 1 has too little resolution for erfinv;
# torch's ndtri (slower, precise for small p) takes over.
_TAIL_T = 2e-3

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def check_available() -> None:
    """The cpu engine runs wherever torch and numpy do."""


def _state_template() -> torch.Tensor | None:
    """A valid CPU generator state whose Mersenne Twister words we overwrite, or
    None when this torch's state layout is not the one we know.

    torch's CPU generator state is ``{seed u64, left i32, seeded i32, next u64,
    state[624] u64, normal cache (legacy), next float normal, valid flag}``
    (5056 bytes since torch 1.5). ``left = 1`` makes the first draw regenerate
    the whole state (the twist), so every output depends on all 624 words.
    """
    if not hasattr(_state_template, "_t"):
        t = torch.Generator().get_state().clone()
        if t.numel() == 5056:
            raw = t.numpy()
            raw[8:16] = np.array([1, 1], dtype=np.int32).view(np.uint8)  # left = 1, seeded = 1
            raw[16:24] = 0  # next = 0
            raw[5048:5056] = 0  # no cached normal sample
        else:
            t = None
        _state_template._t = t
    return _state_template._t


def _use_torch_normal() -> bool:
    """Normal fills use torch's generator (per chunk) when its state layout is known;
    otherwise Box–Muller on numpy's SFC64 (:func:`_np_box_muller`), about 10% slower."""
    return _state_template() is not None


class _ThreadState:
    """Per worker thread: one torch generator and its state bytes, one numpy
    SFC64 generator and chunk-sized numpy buffers by dtype, reused for every chunk."""

    def __init__(self):
        template = _state_template()
        self.state = self.mt_words = None  # torch's layout unknown: no Mersenne Twister here
        if template is not None:
            self.state = template.clone()
            self.mt_words = self.state.numpy()[24 : 24 + 8 * _MT_N].view(np.uint64)
        self.torch_gen = torch.Generator()
        self.sfc = np.random.SFC64(0)
        self.numpy_gen = np.random.Generator(self.sfc)
        self.buffers: dict[tuple[np.dtype, str], np.ndarray] = {}

    def buffer(self, dtype, n: int, slot: str = "") -> np.ndarray:
        """``n`` elements (``n <= CHUNK``) of this thread's buffer ``slot`` of numpy ``dtype``."""
        b = self.buffers.get((dtype, slot))  # keyed as called: np.dtype() costs a microsecond
        if b is None:  # first use of this spelling: one buffer per dtype all the same
            norm = (np.dtype(dtype), slot)
            b = self.buffers.get(norm)
            if b is None:
                b = self.buffers[norm] = np.empty(CHUNK, dtype=norm[0])
            self.buffers[(dtype, slot)] = b
        return b[:n]


def _thread_state() -> _ThreadState:
    st = getattr(_local, "st", None)
    if st is None:
        st = _local.st = _ThreadState()
    return st


def _chunk_state_bytes(tag: bytes, key: int, chunk: int, n: int) -> bytes:
    """``n`` bytes of SHAKE128 of ``tag`` and the 128 bits ``(key, chunk)``: the
    state of one chunk's generator. An extendable-output hash, so every state word
    depends on all 128 bits (and costs about a microsecond, not a generator's setup)."""
    data = tag + (key & MASK64).to_bytes(8, "little") + chunk.to_bytes(8, "little")
    return hashlib.shake_128(data).digest(n)


def chunk_generator(key: int, chunk: int) -> torch.Generator:
    """torch generator of chunk ``chunk`` of the tensor keyed ``key`` (this thread's object):
    a Mersenne Twister whose 624 state words all come from SHAKE128 of ``(key, chunk)``."""
    st = _thread_state()
    if st.mt_words is None:
        raise RuntimeError("this torch's CPU generator state layout is unknown to fastinit")
    st.mt_words[:] = np.frombuffer(_chunk_state_bytes(b"M", key, chunk, 4 * _MT_N), dtype=np.uint32)
    st.torch_gen.set_state(st.state)
    return st.torch_gen


def chunk_numpy_generator(key: int, chunk: int) -> _ThreadState:
    """This thread's state with its SFC64 generator set to chunk ``chunk`` of the
    tensor keyed ``key`` (state: SHAKE128 of ``(key, chunk)``, counter 1)."""
    st = _thread_state()
    w = np.frombuffer(_chunk_state_bytes(b"S", key, chunk, 24), dtype=np.uint64)
    st.sfc.state = {
        "bit_generator": "SFC64",
        "state": {"state": np.array([w[0], w[1], w[2], 1], dtype=np.uint64)},
        "has_uint32": 0,
        "uinteger": 0,
    }
    return st


@functools.lru_cache(maxsize=1024)
def _uniform_map(lo: float, hi: float, ftype, top: float | None = None) -> tuple:
    """``(scale, lo, centred, wrap)`` in ``ftype``: how :func:`_np_uniform` maps its
    random integers to ``[lo, hi)``.

    float32 (``scale = 2^-24 (hi - lo)``, the grid of torch's float32 ``uniform_``):
    ``centred`` (``lo == -hi``, as in ``kaiming_uniform_`` and ``uniform_(-b, b)``):
    ``x = j scale`` with ``j`` in ``[-2^23, 2^23)``, one multiply; otherwise
    ``x = lo + j scale`` with ``j`` in ``[0, 2^24)``. float64: ``x = lo + (hi - lo) u``
    (``scale`` is then ``hi - lo``). ``wrap`` is ``top`` (default: the largest
    ``ftype`` value below ``hi``), above which a value becomes ``lo``, as in torch
    (see :func:`uniform_top`), or None when even the largest draw maps below it (the
    map is monotonic, so no pass is needed then, which is the common case for float32).
    """
    lo_f = ftype(lo)
    with np.errstate(over="ignore"):
        span_f = ftype(hi) - lo_f  # (the bounds as ftype holds them, as torch's uniform_)
    if top is None:
        top = uniform_top(lo, hi, torch.float32 if ftype == np.float32 else torch.float64)
    if ftype == np.float32:
        scale = span_f * np.float32(2.0**-24)
        centred = bool(lo_f == -ftype(hi)) and scale >= _F32_TINY
        if centred:  # -2^23 scale is lo exactly (a power of two times span / 2)
            xmax = float(np.float32(2.0**23 - 1) * scale)
        elif scale >= _F32_TINY:
            xmax = float(np.float32(2.0**24 - 1) * scale + lo_f)
        else:  # a subnormal scale would lose bits: u = j 2^-24 first, then the span
            xmax = float(np.float32(1.0 - 2.0**-24) * span_f + lo_f)
    else:
        scale, centred = span_f, False
        xmax = float(ftype(1.0 - 2.0**-53) * span_f + lo_f)
    return scale, lo_f, centred, (None if xmax <= top else ftype(top))


def _draw_j24(st: _ThreadState, n: int, signed: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """``n`` integers uniform in [0, 2^24) (``signed``: in [-2^23, 2^23)) from ``st``'s
    SFC64 stream: the top 24 bits of each half of ``ceil(n / 2)`` raw 64-bit words
    (an arithmetic shift for ``signed``), in ``out`` (float32: exact, converted as
    shifted, one pass and one call less than shifting, then converting) or this
    thread's int32 buffer."""
    raw = st.sfc.random_raw((n + 1) // 2)
    if out is not None:
        np.right_shift(raw.view(np.int32 if signed else np.uint32)[:n], 8, out=out, casting="unsafe")
        return out
    j = st.buffer(np.int32, n)
    if signed:
        np.right_shift(raw.view(np.int32)[:n], 8, out=j)
    else:
        np.right_shift(raw.view(np.uint32)[:n], 8, out=j.view(np.uint32))
    return j


def _np_uniform(st: _ThreadState, o: np.ndarray, lo: float, hi: float, top: float | None = None) -> None:
    """``o`` (float32/64 numpy array) <- U[lo, hi) from ``st``'s SFC64 stream.

    float32: each raw 64-bit word gives two 24-bit integers ``j`` (the resolution of
    torch's float32 ``uniform_``), ``x = j (2^-24 (hi - lo))`` for a centred range
    (``j`` in ``[-2^23, 2^23)``), ``x = lo + j (2^-24 (hi - lo))`` otherwise (``j``
    in ``[0, 2^24)``): ``j`` converts exactly, then one multiply (and one add; the
    former ``lo + j scale`` for every range cost an add more, and numpy's
    int-to-float multiply is twice a conversion plus a float multiply). float64:
    numpy's ``random`` (53 bits). A value above ``top`` (one the target dtype would
    hold as ``hi``: see :func:`_uniform_map`) becomes ``lo``, as torch's ``value == to
    ? from : value``, where the map can make one: those are rare (a step of a half
    dtype in 2^8), so one comparison finds them and they are set by index (on 256K
    float32 values: 39 us, against 133 us for a clamp by ``np.minimum``).
    """
    if not hi > lo:
        o.fill(lo)
        return
    scale, lo_f, centred, wrap = _uniform_map(lo, hi, o.dtype.type, top)
    if o.dtype == np.float32:
        _draw_j24(st, o.size, signed=centred, out=o)  # |j| < 2^24: exact
        if scale >= _F32_TINY:
            np.multiply(o, scale, out=o)
        else:
            np.multiply(o, np.float32(2.0**-24), out=o)
            np.multiply(o, np.float32(hi) - lo_f, out=o)  # (the span, as _uniform_map takes it)
        if not centred:
            np.add(o, lo_f, out=o)
    else:
        st.numpy_gen.random(dtype=o.dtype, out=o)
        np.multiply(o, scale, out=o)
        np.add(o, lo_f, out=o)
    if wrap is not None:
        above = np.greater(o, wrap, out=st.buffer(np.bool_, o.size, "wrap"))
        o[np.flatnonzero(above)] = o.dtype.type(lo)  # (not the cached lo_f: -0.0 and 0.0 share its entry)


class _Keyed:
    """Where chunk ``chunk`` of the tensor keyed ``key`` draws from: torch's Mersenne
    Twister for normal values (:func:`_normal_chunk`), this thread's SFC64 for the
    rest (set up at its first draw)."""

    __slots__ = ("key", "chunk", "_st")

    def __init__(self, key: int, chunk: int):
        self.key, self.chunk, self._st = key, chunk, None

    def _sfc(self) -> _ThreadState:
        if self._st is None:
            self._st = chunk_numpy_generator(self.key, self.chunk)
        return self._st

    def normal(self, o: np.ndarray, mean: float, std: float) -> None:
        _normal_chunk(o, mean, std, self.key, self.chunk)

    def uniform(self, o: np.ndarray, lo: float, hi: float) -> None:
        _np_uniform(self._sfc(), o, lo, hi)

    def random(self, n: int) -> np.ndarray:
        return self._sfc().numpy_gen.random(n)


class _TorchDefault:
    """torch's default CPU generator, through torch's own ops: what a drop-in call on a
    small tensor draws from (see :func:`fill_default`). The ops write into the numpy
    arrays' memory; float32 ``uniform_`` keeps torch's 24-bit grid."""

    @staticmethod
    def normal(o: np.ndarray, mean: float, std: float) -> None:
        torch.from_numpy(o).normal_(mean, std)

    @staticmethod
    def uniform(o: np.ndarray, lo: float, hi: float) -> None:
        torch.from_numpy(o).uniform_(lo, hi)

    @staticmethod
    def random(n: int) -> np.ndarray:
        return torch.rand(n, dtype=torch.float64).numpy()


def _bounds_as(o: np.ndarray, a: float, b: float):
    """``a`` and ``b`` in ``o``'s dtype (beyond its range: infinite, the same clip)."""
    with np.errstate(over="ignore"):
        return o.dtype.type(a), o.dtype.type(b)


def _trunc_normal(o: np.ndarray, spec: TruncNormal, src) -> None:
    """``o`` <- the truncated normal ``spec`` drawn from ``src`` (a chunk's keyed
    streams, :class:`_Keyed`, or torch's default generator, :class:`_TorchDefault`),
    exactly, by the sampler :meth:`TruncNormal.sampler` picks:

    * ``"limit"``: the mean clamped to [a, b] (std = 0; an infinite mean: the near bound);
    * ``"uniform"``: ``U(a, b)`` (the density is flat across the window);
    * ``"normal"``: the normal itself, and each value outside ``[a, b]`` replaced by
      an independent draw of the truncated normal (:func:`_trunc_icdf`): a value is
      then in ``A`` with probability ``P(Z in A, Z in [a, b]) + P(Z outside) TN(A) =
      TN(A)`` (``trunc_normal_(std=.02)`` with its default bounds +-2 is +-100 std);
    * ``"tail"``: :func:`_trunc_tail`; ``"tilt"``: :func:`_trunc_tilt`;
    * ``"icdf"``: the inverse CDF, :func:`_trunc_icdf`.
    """
    if not o.size:
        return
    how = spec.sampler()
    if how == "limit":
        o.fill(min(max(spec.mean, spec.a), spec.b))
    elif how == "uniform":
        src.uniform(o, spec.a, spec.b)
    elif how == "normal":
        src.normal(o, spec.mean, spec.std)
        a, b = _bounds_as(o, spec.a, spec.b)
        if o.min() < a or o.max() > b:
            bad = np.flatnonzero((o < a) | (o > b))
            fix = np.empty(bad.size, dtype=o.dtype)
            _trunc_icdf(src, fix, spec)
            o[bad] = fix
    elif how == "tail":
        _trunc_tail(src, o, spec)
    elif how == "tilt":
        _trunc_tilt(src, o, spec)
    else:
        _trunc_icdf(src, o, spec)


def _trunc_icdf(src, o: np.ndarray, spec: TruncNormal) -> None:
    """``o`` <- the truncated normal ``spec`` by its inverse CDF, drawn from ``src``.

    A window in the upper half is sampled as its mirror image and negated, so the
    window ``[alpha, beta]`` (in std) lies in the lower half. If ``2 Phi(alpha) >=``
    2e-3, ``v = erf(z / sqrt 2)`` is drawn uniform in ``[erf(alpha/sqrt2), erf(beta/sqrt2))``
    and ``x = mean + sign std sqrt2 erfinv(v)``: ``v`` is drawn directly (not as
    ``2p - 1``), so a window narrow around the mean (std >> b - a) keeps full
    resolution. Further out, ``p = Phi(z)`` is drawn in float64 (53 bits, so the far
    tail is spread down to ``Phi^-1(2^-53)`` = -8.2 std instead of lumped on the
    lowest of 2^24 float32 steps) and ``x = mean + sign std ndtri(p)`` (torch's
    ndtri is precise for small ``p``), then rounded once. Then clipped to ``[a, b]``.
    """
    alpha, beta = spec.z_window()
    sign = 1.0
    if alpha + beta > 0:
        alpha, beta, sign = -beta, -alpha, -1.0
    r2 = math.sqrt(2.0)
    v = torch.from_numpy(o)
    if math.erfc(-alpha / r2) >= _TAIL_T:
        src.uniform(o, math.erf(alpha / r2), math.erf(beta / r2))
        for s in range(0, o.size, GRAIN):
            v[s : s + GRAIN].erfinv_()
        scale = sign * spec.std * r2
    else:
        # p in float64 (53-bit draws): in float32 the lowest of the 2^24 steps of p
        # would hold the window's whole far tail, as one value (ndtri(tiny32) = -13 std)
        p = _thread_state().buffer(np.float64, o.size, "tail_p")
        src.uniform(p, 0.5 * math.erfc(-alpha / r2), 0.5 * math.erfc(-beta / r2))
        np.maximum(p, np.finfo(np.float64).tiny, out=p)  # p > 0: ndtri stays finite
        pt = torch.from_numpy(p)
        for s in range(0, p.size, GRAIN):
            torch.special.ndtri(pt[s : s + GRAIN], out=pt[s : s + GRAIN])
        np.multiply(p, sign * spec.std, out=p)
        np.add(p, spec.mean, out=p)
        np.clip(p, spec.a, spec.b, out=p)
        with np.errstate(over="ignore"):
            np.copyto(o, p, casting="same_kind")
        np.clip(o, *_bounds_as(o, spec.a, spec.b), out=o)  # (the bounds rounded to o's dtype)
        return
    np.multiply(o, scale, out=o)
    np.add(o, spec.mean, out=o)
    np.clip(o, *_bounds_as(o, spec.a, spec.b), out=o)


def _from_near_bound(o: np.ndarray, t: np.ndarray, spec: TruncNormal, near: float, sign: float) -> None:
    """``o`` <- ``near + sign std t`` (``t``: float64 offsets in std past the near
    bound), clipped to [a, b] and rounded once."""
    t *= sign * spec.std
    t += near
    np.clip(t, spec.a, spec.b, out=t)
    with np.errstate(over="ignore"):
        o[:] = t


# Rounds of a rejection sampler: each accepts a draw with probability > 0.97 (far more
# on average), so 200 rounds leave one pending once in 10^300; should an argument ever
# make acceptance impossible, an error (_by_rejection), not an endless loop.
_MAX_ROUNDS = 200


def _by_rejection(propose, n: int, spec: TruncNormal) -> np.ndarray:
    """``n`` float64 draws by rejection: each round, ``propose(m)`` gives ``(values,
    accepted)`` for the ``m`` draws still pending, in order; after :data:`_MAX_ROUNDS`
    rounds with some still pending, an error (never an endless loop)."""
    t = np.empty(n, dtype=np.float64)
    pending = np.arange(n)
    for _ in range(_MAX_ROUNDS):
        if not pending.size:
            return t
        d, accept = propose(pending.size)
        t[pending[accept]] = d[accept]
        pending = pending[~accept]
    if pending.size:
        raise RuntimeError(f"fastinit: the truncated-normal sampler accepts no draw for {spec!r} (a bug; please "
                           "report it)")
    return t


def _trunc_tail(src, o: np.ndarray, spec: TruncNormal) -> None:
    """``o`` <- the truncated normal ``spec`` whose window lies wholly beyond 5 std on
    one side, in float64 drawn from ``src`` (Marsaglia's tail method, exact): with
    the window as ``[lo, lo + w]`` std from the mean (:meth:`TruncNormal.offset_window`),
    propose ``z = sqrt(lo^2 + W)``, ``W = -2 log(1 - u (1 - exp(-(hi^2 - lo^2)/2)))``,
    ``hi^2 - lo^2 = w (2 lo + w)`` (density proportional to ``z exp(-z^2/2)`` on the
    window) and accept with probability ``lo / z`` (>= 1 - 1/lo^2, so a few
    vectorized rounds finish any chunk). No CDF is evaluated, so nothing underflows
    however far out the window is (``[a, a + 1]`` with ``a = 40`` std keeps its mean -
    a ~ 1/a), and the value is ``z - lo`` std past the near bound, so a huge mean
    does not cancel it away (``mean = 1e20``, ``[1, 3]``: 3, not 1).
    """
    lo, w, near, sign = spec.offset_window()
    c = -math.expm1(-w * (lo + w / 2.0)) if w < math.inf else 1.0  # 1 - exp(-(hi^2 - lo^2)/2)
    lo2 = lo * lo

    def propose(m: int):
        big_w = np.log1p(-c * src.random(m))
        big_w *= -2.0
        d = big_w / (lo + np.sqrt(lo2 + big_w))  # sqrt(lo^2 + W) - lo, without cancellation
        return d, src.random(m) * (lo + d) <= lo

    with np.errstate(over="ignore", invalid="ignore"):
        t = _by_rejection(propose, o.size, spec)
    _from_near_bound(o, t, spec, near, sign)


def _trunc_tilt(src, o: np.ndarray, spec: TruncNormal) -> None:
    """``o`` <- the truncated normal ``spec`` on a window beside the mean narrower than
    1/64 std, in float64 drawn from ``src``, exactly: with the window as ``[lo, lo + w]``
    std from the mean, the density ``t`` std past ``lo`` is proportional to
    ``exp(-lo t) exp(-t^2/2)``: propose ``t`` from the exponential ``exp(-lo t)``
    truncated to ``[0, w]`` (``t = -log(1 - u (1 - exp(-lo w))) / lo``; ``u w`` where
    ``lo w`` underflows) and accept with probability ``exp(-t^2/2)`` (>= exp(-w^2/2)
    > 0.9998). The value is ``t`` std past the near bound: exact however far the
    mean is (``mean = 1e17``, ``std = 5e16``, ``[-2, 2]``: about ``U(-2, 2)``, not 0).
    """
    lo, w, near, sign = spec.offset_window()
    c = -math.expm1(-lo * w)

    def propose(m: int):
        u = src.random(m)
        if c > 0.0:
            d = np.log1p(-c * u)
            d *= -1.0 / lo
        else:
            d = u * w
        return d, src.random(m) <= np.exp(-0.5 * d * d)

    _from_near_bound(o, _by_rejection(propose, o.size, spec), spec, near, sign)


def _normal_chunk(o: np.ndarray, mean: float, std: float, key: int, chunk: int) -> None:
    """``o`` <- chunk ``chunk`` of N(mean, std^2) keyed ``key`` (torch's Mersenne
    Twister per chunk; Box-Muller on SFC64 where torch's state layout is unknown)."""
    if _use_torch_normal():
        torch.from_numpy(o).normal_(mean, std, generator=chunk_generator(key, chunk))
    else:
        _np_box_muller(chunk_numpy_generator(key, chunk), o, mean, std)


def _np_box_muller(st: _ThreadState, o: np.ndarray, mean: float, std: float) -> None:
    """``o`` <- N(mean, std^2) by Box–Muller on ``st``'s SFC64 stream:
    ``z = sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)`` with ``u1`` in (0, 1] (no
    inf), the cosines in the first half of ``o`` and the sines in the second
    (the two are independent). float32: 24-bit ``u1, u2`` from raw words;
    float64: numpy's 53-bit ``random``.
    """
    n = o.size
    h = (n + 1) // 2
    r = st.buffer(o.dtype, h, "bm_r")
    angle = st.buffer(o.dtype, h, "bm_angle")
    if o.dtype == np.float32:
        j = _draw_j24(st, 2 * h)
        np.multiply(j[:h], np.float32(2.0**-24), out=r, dtype=np.float32)
        np.add(r, np.float32(2.0**-24), out=r)
        np.multiply(j[h:], np.float32(2 * math.pi * 2.0**-24), out=angle, dtype=np.float32)
    else:
        st.numpy_gen.random(out=r)
        np.subtract(1.0, r, out=r)
        st.numpy_gen.random(out=angle)
        np.multiply(angle, 2 * math.pi, out=angle)
    np.log(r, out=r)
    np.multiply(r, -2.0, out=r)
    np.sqrt(r, out=r)
    np.multiply(r, std, out=r)
    np.cos(angle, out=o[:h])
    np.multiply(o[:h], r, out=o[:h])
    np.sin(angle[: n - h], out=o[h:])
    np.multiply(o[h:], r[: n - h], out=o[h:])
    if mean:
        np.add(o, mean, out=o)


def generate_chunk(spec, key: int, chunk: int, o: np.ndarray) -> None:
    """``o`` (float32 or float64, the chunk's length) <- chunk ``chunk`` of the
    tensor keyed ``key`` filled with ``spec``, generated in place.

    Uniform and truncated normal draw from numpy's SFC64 (raw words), normal from
    torch's Mersenne Twister (its vectorized Box–Muller is the fastest CPU normal
    here; :func:`_np_box_muller` where torch's state layout is unknown), all with
    their state taken from SHAKE128 of ``(key, chunk)``.
    """
    if isinstance(spec, Uniform):
        _np_uniform(chunk_numpy_generator(key, chunk), o, spec.a, spec.b, spec.top)
    elif isinstance(spec, TruncNormal):
        _trunc_normal(o, spec, _Keyed(key, chunk))
    elif isinstance(spec, Normal):
        _normal_chunk(o, spec.mean, spec.std, key, chunk)
    elif isinstance(spec, Constant):
        o.fill(spec.value)
    else:
        raise TypeError(f"the cpu engine cannot fill {spec!r}")


def _numpy_view(flat: torch.Tensor) -> np.ndarray:
    """A numpy array over ``flat``'s memory (bfloat16 as its 16-bit patterns)."""
    if flat.requires_grad:
        flat = flat.detach()
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _round_into(v: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16 bfloat16 patterns or float16) <- float32 ``v`` rounded to nearest even.

    torch's own float32 -> bfloat16/float16 conversion (``copy_``, vectorized:
    about 3x numpy's bit arithmetic for bfloat16 and 8x numpy's float16 cast, with
    the same values: beyond 65504 a float16 is inf, as in torch), in pieces below
    ATen's parallel grain so that no OpenMP team starts inside a worker thread.
    """
    with torch._C.DisableTorchFunction():  # (the engine's own calls: no user's mode sees them)
        src = torch.from_numpy(v)
        dst = torch.from_numpy(out)
        if out.dtype == np.uint16:
            dst = dst.view(torch.bfloat16)
        for s in range(0, v.size, COPY_GRAIN):
            dst[s : s + COPY_GRAIN].copy_(src[s : s + COPY_GRAIN])


def _chunk_bytes(t, chunk: int) -> int:
    return _chunk_elements(t, chunk) * t.tensor.element_size()


def _fill_chunk(t, chunk: int) -> None:
    """Generate global chunk ``chunk`` of target ``t`` and write the local elements it holds."""
    lay = t.layout
    chunk_lo = chunk * CHUNK
    glo, ghi = lay.global_range()
    dst = _numpy_view(t.tensor.detach().view(-1))
    n = min(CHUNK, lay.global_numel - chunk_lo)  # the last chunk may be short
    whole = lay.rows == 1 and glo <= chunk_lo and chunk_lo + n <= ghi  # all of it is ours, in order
    s0 = chunk_lo - glo
    st = _thread_state()
    if dst.dtype in (np.float32, np.float64):
        if whole:
            generate_chunk(t.spec, t.key, chunk, dst[s0 : s0 + n])  # in place
            return
        v = st.buffer(dst.dtype, n)
        generate_chunk(t.spec, t.key, chunk, v)
    else:
        f = st.buffer(np.float32, n)
        generate_chunk(t.spec, t.key, chunk, f)
        if whole:
            _round_into(f, dst[s0 : s0 + n])
            return
        v = st.buffer(dst.dtype, n)
        _round_into(f, v)
    _scatter(lay, dst, v, chunk_lo, chunk_lo + n)


def _by_torch_normal(t: torch.Tensor, spec, torch_normal: bool) -> bool:
    """Whether chunk 0 of ``t``'s fill is torch's ``normal_`` on the keyed Mersenne
    Twister (``torch_normal``: :func:`_use_torch_normal`, asked once by the caller)."""
    return torch_normal and type(spec) is Normal and (t.dtype == torch.float32 or t.dtype == torch.float64)


def _torch_normal(x: torch.Tensor, spec: Normal, key: int) -> None:
    """``x`` <- chunk 0 of N(mean, std^2) keyed ``key``: torch's ``normal_`` on it."""
    x.normal_(spec.mean, spec.std, generator=chunk_generator(key, 0))


def fill_single_chunk(tensor: torch.Tensor, spec, key: int, bump: bool = False) -> None:
    """Fill a contiguous float CPU tensor of at most :data:`CHUNK` elements (chunk 0
    of its key: the values :func:`fill` gives it), on the calling thread.

    Engines write without bumping the tensor's version counter (their callers bump
    it once, as the call made eagerly would); ``bump``: the caller is the drop-in
    call itself, and torch's ``normal_`` may make that one bump (saves an alias).
    """
    t = tensor.detach()
    if _by_torch_normal(t, spec, _use_torch_normal()):  # (the common small call: no numpy view on the way)
        held: list = []
        try:
            with torch._C.DisableTorchFunction():
                # (an inference tensor is written through an alias: it has no counter, and a
                # queued one may be filled outside inference mode)
                _torch_normal(t if bump and not t.is_inference() else quiet(t, held), spec, key)
        finally:
            restore_versions(held)
        return
    dst = (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()).reshape(-1)
    if dst.dtype == np.float32 or dst.dtype == np.float64:
        generate_chunk(spec, key, 0, dst)
        return
    st = _thread_state()
    f = st.buffer(np.float32, dst.size)
    generate_chunk(spec, key, 0, f)
    _round_into(f, dst)


# A keyed stream costs 5-12 us to set up (SHAKE128 of the key, a generator's state)
# before its first value: more than torch's own uniform_/normal_ takes for a few
# thousand elements. So a drop-in call on a small CPU tensor that would draw its key
# from torch's default generator takes no key: it draws from that generator itself
# (measured on 2 cores, float32, torch's op against the keyed chunk: uniform 2.8 vs
# 10.1 us at 768 elements, 42 vs 24 us at 16K; normal 2.6 vs 12.0 us at 768, 41 vs
# 51 us at 16K, 157 vs 164 us at 64K). A float32/float64 normal fill of one chunk is
# torch's normal_ on a keyed Mersenne Twister anyway: without the key, the same
# kernel at the same speed, minus the set-up. (A truncated normal's inverse CDF on
# torch's float32 uniform_ is slower than on the keyed SFC64 stream from 16K elements:
# 129 vs 114 us, std=1 on [-2, 2].)
LIKE_TORCH_MAX = 4096


def default_max(dtype: torch.dtype, kind) -> int:
    """The most elements of a ``kind`` fill (Uniform, Normal, TruncNormal) of ``dtype``
    made on torch's default generator without a key: :data:`LIKE_TORCH_MAX`, or
    :data:`CHUNK` for a float32/float64 normal."""
    return CHUNK if kind is Normal and (dtype == torch.float32 or dtype == torch.float64) else LIKE_TORCH_MAX


def _takes_default(tensor: torch.Tensor, kind) -> bool:
    """Whether a ``kind`` fill of ``tensor`` on torch's default generator is made without
    a key: a contiguous CPU tensor (torch's op on a view draws in another order than
    on a whole tensor) of at most :func:`default_max` elements."""
    if not tensor.is_cpu or not tensor.is_contiguous():
        return False
    return tensor.numel() <= default_max(tensor.dtype, kind)


_TORCH_OPS = {"uniform_": Uniform, "normal_": Normal}


def fill_like_torch(tensor: torch.Tensor, op: str, args: tuple, before=None) -> bool:
    """Make the drop-in call ``tensor.<op>(*args)`` (``uniform_``, ``normal_``) on torch's
    default generator as ``torch.nn.init`` makes it, with torch's own op, where that
    beats a keyed stream (:func:`_takes_default`); ``before()`` called first (False
    from it: nothing is done). Values and errors are then torch's; the op bumps the
    version counter once. False: nothing was done (the caller keys the fill, so a view
    holds the values of a whole tensor with the same key)."""
    kind = _TORCH_OPS.get(op)
    if kind is None or not _takes_default(tensor, kind) or (before is not None and before() is False):
        return False
    with torch._C.DisableTorchFunction():  # (as the engine's other ops: no user's mode sees it)
        # a tensor that requires grad is written through a detached alias: autograd does not
        # record the write (torch.nn.init writes under no_grad), and the alias shares the
        # version counter, so the op's bump is the call's (the caller refuses what torch's
        # op would write, then refuse: an inference tensor outside inference mode)
        getattr(tensor.detach() if tensor.requires_grad else tensor, op)(*args)
    return True


def fill_default(tensor: torch.Tensor, spec, before=None) -> bool:
    """Fill ``tensor`` with ``spec`` from torch's default generator, without a key, where
    that beats a keyed stream (:func:`_takes_default`); ``before()`` called first (False
    from it: nothing is done). Uniform and Normal: torch's own op
    (:func:`fill_like_torch`); TruncNormal of a float tensor: the keyed chunk's exact
    samplers (:func:`_trunc_normal`) drawing through torch's ops, in float32 for a
    half-precision tensor, rounded once. May leave the version counter as it was (the
    caller bumps it). False: nothing was done."""
    kind = type(spec)
    if kind is not TruncNormal:
        call = spec.torch_op()
        return call is not None and fill_like_torch(tensor, *call, before)
    if tensor.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16) or tensor.is_neg() \
            or not _takes_default(tensor, kind) or (before is not None and before() is False):
        return False  # (a negative view has no numpy view: keyed, through a buffer)
    with torch._C.DisableTorchFunction():
        dst = _numpy_view(tensor.detach().view(-1))
        if dst.dtype == np.float32 or dst.dtype == np.float64:
            _trunc_normal(dst, spec, _TorchDefault)
        else:
            f = _thread_state().buffer(np.float32, dst.size)
            _trunc_normal(f, spec, _TorchDefault)
            _round_into(f, dst)
    return True


def fill_one(tensor: torch.Tensor, spec, key: int) -> bool:
    """A whole contiguous float tensor of one chunk (a drop-in call), filled here
    (see :func:`fill_single_chunk`; may bump its version counter once); False
    for anything else, which :func:`fill` takes."""
    if tensor.is_cpu and tensor.numel() <= CHUNK:
        fill_single_chunk(tensor, spec, key, bump=True)
        return True
    return False


def _fill_whole(targets, progress) -> None:
    """Whole small tensors, each chunk 0 of its key (:func:`fill_single_chunk`), here
    in order. Their float32/float64 normal fills (most of a model's weights) run in
    one loop, their version counters put back in one call: on 224 Llama weights of
    2-16K elements that loop costs what torch's own ``normal_`` loop costs plus the
    keyed generators' set-up, 7 us each."""
    fast = _use_torch_normal()
    held: list = []
    try:
        with torch._C.DisableTorchFunction():
            for t in targets:
                x = t.tensor
                if _by_torch_normal(x, t.spec, fast):
                    _torch_normal(quiet(x.detach() if x.requires_grad else x, held), t.spec, t.key)
                elif t.layout.cols:
                    fill_single_chunk(x, t.spec, t.key)
                if progress is not None:
                    progress(x.numel() * x.element_size())
    finally:
        restore_versions(held)


def _scatter(lay, flat: np.ndarray, v: np.ndarray, lo: int, hi: int) -> None:
    """Copy the layout's elements among global [lo, hi) (held by ``v``) into ``flat``."""
    if lay.rows == 1:
        a, b = max(lo, lay.offset), min(hi, lay.offset + lay.cols)
        if a < b:
            flat[a - lay.offset : b - lay.offset] = v[a - lo : b - lo]
        return
    # Rows r whose segment [g_r, g_r + cols) meets [lo, hi), g_r = offset + r * row_stride.
    r_first = max(0, -(-(lo - lay.offset - lay.cols + 1) // lay.row_stride))
    r_last = min(lay.rows - 1, (hi - 1 - lay.offset) // lay.row_stride)
    if r_first > r_last:
        return
    # Whole rows in the middle move with one strided copy; the two end rows may be partial.
    mid_lo = r_first + 1 if lay.offset + r_first * lay.row_stride < lo else r_first
    mid_hi = r_last - 1 if lay.offset + r_last * lay.row_stride + lay.cols > hi else r_last
    if mid_lo <= mid_hi:
        rows = mid_hi - mid_lo + 1
        start = lay.offset + mid_lo * lay.row_stride - lo
        src = np.lib.stride_tricks.as_strided(
            v[start:], (rows, lay.cols), (lay.row_stride * v.itemsize, v.itemsize), writeable=False)
        flat[mid_lo * lay.cols : (mid_hi + 1) * lay.cols].reshape(rows, lay.cols)[...] = src
    for r in sorted({r_first, r_last} - set(range(mid_lo, mid_hi + 1))):
        g0 = lay.offset + r * lay.row_stride
        a, b = max(lo, g0), min(hi, g0 + lay.cols)
        if a < b:
            flat[r * lay.cols + a - g0 : r * lay.cols + b - g0] = v[a - lo : b - lo]


_POOL_MIN = 1 << 16  # a chunk of this many elements or more is a unit of pool work alone
BUNDLE_MIN = 1 << 16  # smaller chunks go to the pool in bundles of at least this many
_TINY = 1 << 14  # chunks of fewer elements run on the calling thread


def _chunk_elements(t, chunk: int) -> int:
    glo, ghi = t.layout.global_range()
    return max(0, min((chunk + 1) * CHUNK, ghi) - max(chunk * CHUNK, glo))


def _chunks_of(t) -> range:
    glo, ghi = t.layout.global_range()
    return range(glo // CHUNK, (ghi + CHUNK - 1) // CHUNK)


def _submit(fn, copies: int) -> list:
    """Run ``fn`` on ``copies`` pool threads (the pool sized for ``torch.get_num_threads()``).

    Submitted under the lock, so a pool replaced because another thread changed
    the thread count is never handed new work (a replaced pool still runs what it
    was given, then its threads exit).
    """
    global _pool, _pool_size
    n = max(1, torch.get_num_threads() - 1)  # the calling thread works too
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fastinit-cpu")
            _pool_size = n
        return [_pool.submit(fn) for _ in range(copies)]


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: the pool's threads (and a lock
    another thread may have held) did not survive. Start afresh."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_device(tensor: torch.Tensor) -> None:
    """The error for a tensor this engine cannot reach."""
    if not tensor.is_cpu:
        raise RuntimeError(f"the cpu engine fills CPU tensors, got a {tensor.device} tensor; "
                           "use the triton or reference engine")


def fill(targets, progress=None) -> None:
    """Fill CPU targets: every (target, chunk) pair is one piece of work, run on the pool
    alone (big chunks) or bundled (small ones), or here (tiny ones)."""
    work, plain = [], []
    for t in targets:
        check_device(t.tensor)
        if t.tensor.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"the cpu engine cannot fill dtype {t.tensor.dtype}")
        lay = t.layout
        if lay.offset == 0 and lay.rows == 1 and lay.cols == lay.global_numel < _TINY:
            plain.append(t)  # a whole small tensor: chunk 0 of its key, no layout to follow
        else:
            work.extend((t, c) for c in _chunks_of(t))
    if plain:
        _fill_whole(plain, progress)
    if not work:
        return
    # A unit of work for the pool is one chunk of at least _POOL_MIN elements, or a
    # bundle of consecutive smaller chunks adding up to BUNDLE_MIN: threads taking
    # small chunks one by one would mostly contend for the GIL. Chunks under _TINY
    # elements cost more in Python than in elements and run here, in order, as does
    # a lone unit. Measured on 2 cores, 40 conv weights of 37K elements (a CNN in
    # batched()): 4.35 ms one by one, 2.47 ms bundled (torch's normal_ loop 3.75 ms);
    # 226 tensors of 2-16K elements: 6.4 ms here, 9.4 ms bundled, 6.5 ms with _TINY.
    units, bundle, size, here = [], [], 0, []
    for w in work:
        n = _chunk_elements(*w)
        if n >= _POOL_MIN:
            units.append((w,))
            continue
        if n < _TINY:
            here.append(w)
            continue
        bundle.append(w)
        size += n
        if size >= BUNDLE_MIN:
            units.append(bundle)
            bundle, size = [], 0
    if bundle:
        units.append(bundle)
    if len(units) == 1 or torch.get_num_threads() == 1:
        here.extend(w for unit in units for w in unit)
        units = []
    for t, c in here:
        _fill_chunk(t, c)
        if progress is not None:
            progress(_chunk_bytes(t, c))
    if not units:
        return
    work = units
    nthreads = min(len(work), max(1, torch.get_num_threads()))
    # Dynamic scheduling: every thread (the caller's included) takes the next
    # chunk until none is left, so uneven chunks and uneven cores balance out to
    # within one chunk (~1 ms). Values do not depend on who takes which chunk.
    next_item = itertools.count().__next__  # atomic under the GIL
    errors: list[BaseException] = []

    def run():  # workers touch numpy views and tensors made from them: nothing needs no_grad
        while not errors:
            i = next_item()
            if i >= len(work):
                return
            for t, c in work[i]:
                try:
                    _fill_chunk(t, c)
                except BaseException as e:  # surfaced in the caller below
                    errors.append(e)
                    return
                if progress is not None:
                    progress(_chunk_bytes(t, c))

    # Ctrl-C is held back until the workers are done: raised half-way, it would leave
    # them writing into the tensor after the call returned (torch's one op is whole too)
    with interrupts_held():
        futures = _submit(run, nthreads - 1)
        run()
        for f in futures:
            f.result()
    if errors:
        raise errors[0]
