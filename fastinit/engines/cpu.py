"""The ``cpu`` engine: pure torch, chunk-parallel on a thread pool.

The logical flat index of a tensor is cut into chunks of :data:`CHUNK` elements.
Chunk ``c`` of a tensor with key ``k`` draws from its own stream, whose state is
taken from numpy's Philox4x64 keyed by the 128 bits ``(k, c)``: numpy's SFC64
for uniform and truncated normal fills, torch's Mersenne Twister (all 19937 bits
of state) for normal fills. (A torch generator seeded with ``manual_seed`` keeps
only 32 bits of its seed, so one seeded per chunk would repeat chunks at model
scale.) Values therefore depend on ``(key, element index)`` only: never on the
number of threads, the order of chunks, or the other tensors of the batch.

Each chunk is generated in slabs of :data:`SLAB` elements that stay in cache
while they are transformed (the truncated normal's inverse CDF), rounded
(float16/bfloat16 receive the float32 values rounded once) and copied. Slabs are
below ATen's parallel grain, so worker threads never spawn nested OpenMP teams.
Extra memory: one slab buffer per thread.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..rng import T_MAX, T_MIN
from ..specs import Constant, Normal, TruncNormal, Uniform, float_below

CHUNK = 1 << 18
SLAB = 1 << 15  # at or below ATen's GRAIN_SIZE: elementwise ops stay single-threaded
_MT_N = 624
# Below this t = 2p the float32 v = t - 1 has too little resolution for erfinv;
# torch's ndtri (slower, precise for small p) takes over.
_TAIL_T = 2e-3

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def check_available() -> None:
    _state_template()


def _state_template() -> torch.Tensor:
    """A valid CPU generator state whose Mersenne Twister words we overwrite.

    torch's CPU generator state is ``{seed u64, left i32, seeded i32, next u64,
    state[624] u64, normal cache (legacy), next float normal, valid flag}``
    (5056 bytes since torch 1.5). ``left = 1`` makes the first draw regenerate
    the whole state (the twist), so every output depends on all 624 words.
    """
    t = getattr(_state_template, "_t", None)
    if t is None:
        t = torch.Generator().get_state().clone()
        if t.numel() != 5056:
            raise RuntimeError(
                f"the cpu engine does not know this torch's CPU generator state layout "
                f"({t.numel()} bytes); use fastinit.use_engine('reference')"
            )
        raw = t.numpy()
        raw[8:16] = np.array([1, 1], dtype=np.int32).view(np.uint8)  # left = 1, seeded = 1
        raw[16:24] = 0  # next = 0
        raw[5048:5056] = 0  # no cached normal sample
        _state_template._t = t
    return t


class _ThreadState:
    """Per worker thread: one torch generator and its state bytes, one numpy
    SFC64 generator, and slab buffers by dtype, reused for every chunk."""

    def __init__(self):
        self.state = _state_template().clone()
        self.mt_words = self.state.numpy()[24 : 24 + 8 * _MT_N].view(np.uint64)
        self.torch_gen = torch.Generator()
        self.sfc = np.random.SFC64(0)
        self.numpy_gen = np.random.Generator(self.sfc)
        self.buffers: dict[torch.dtype, torch.Tensor] = {}


def _thread_state() -> _ThreadState:
    st = getattr(_local, "st", None)
    if st is None:
        st = _local.st = _ThreadState()
    return st


def _chunk_words(key: int, chunk: int, n: int) -> np.ndarray:
    """``n`` 64-bit words of Philox4x64-10 keyed by the 128 bits ``(key, chunk)``."""
    return np.random.Philox(key=np.array([key, chunk], dtype=np.uint64)).random_raw(n)


def chunk_generator(key: int, chunk: int) -> torch.Generator:
    """torch generator of chunk ``chunk`` of the tensor keyed ``key`` (this thread's object):
    a Mersenne Twister whose whole state comes from the chunk's Philox words."""
    st = _thread_state()
    st.mt_words[:] = _chunk_words(key, chunk, _MT_N // 2).view(np.uint32)
    st.torch_gen.set_state(st.state)
    return st.torch_gen


def chunk_numpy_generator(key: int, chunk: int) -> np.random.Generator:
    """numpy generator (SFC64, state from the chunk's Philox words) of chunk ``chunk``."""
    st = _thread_state()
    w = _chunk_words(key, chunk, 3)
    st.sfc.state = {
        "bit_generator": "SFC64",
        "state": {"state": np.array([w[0], w[1], w[2], 1], dtype=np.uint64)},
        "has_uint32": 0,
        "uinteger": 0,
    }
    return st.numpy_gen


def _buffer(dtype: torch.dtype) -> torch.Tensor:
    bufs = _thread_state().buffers
    b = bufs.get(dtype)
    if b is None:
        b = bufs[dtype] = torch.empty(SLAB, dtype=dtype)
    return b


def _slabs(n: int):
    for s in range(0, n, SLAB):
        yield s, min(n, s + SLAB)


@functools.lru_cache(maxsize=1024)
def _uniform_map(lo: float, hi: float, ftype) -> tuple:
    """``(span, lo, clamp)`` in ``ftype`` for ``x = lo + span * u``, ``u`` in [0, 1).

    ``clamp`` is the largest value below ``hi``, or None when even the largest
    ``u`` numpy draws maps below ``hi`` (the map is monotonic, so no clamp pass
    is needed then, which is the common case).
    """
    span_f, lo_f = ftype(hi - lo), ftype(lo)
    umax = ftype(1.0) - ftype(2.0 ** (-24 if ftype == np.float32 else -53))
    if float(ftype(umax * span_f) + lo_f) < hi:
        return span_f, lo_f, None
    return span_f, lo_f, float_below(hi, ftype)


def _np_uniform(g: np.random.Generator, o: np.ndarray, lo: float, hi: float) -> None:
    """``o`` (float32/64 numpy view) <- U[lo, hi): numpy's u in [0, 1), then lo + (hi - lo) u, kept below hi."""
    g.random(dtype=o.dtype, out=o)
    if hi > lo:
        span, lo_f, clamp = _uniform_map(lo, hi, o.dtype.type)
        np.multiply(o, span, out=o)
        np.add(o, lo_f, out=o)
        if clamp is not None:
            np.minimum(o, clamp, out=o)
    else:
        o.fill(lo)


def chunk_slabs(spec, key: int, chunk: int, n: int, cdt: torch.dtype, out: torch.Tensor | None):
    """Generate chunk ``chunk`` (``n`` elements) of the tensor keyed ``key``, slab by slab.

    Yields ``(s, e, values)`` in order, ``values`` holding elements ``[s, e)`` of
    the chunk in ``cdt`` (float32 or float64): a view of ``out`` when given
    (generated in place), else this thread's slab buffer. Each slab is small
    enough to stay in cache while it is transformed, cast and copied.

    Uniform and truncated normal draw from numpy's SFC64, normal from torch's
    Mersenne Twister (its vectorized Box–Muller is the fastest CPU normal), both
    with their state taken from Philox4x64 keyed by ``(key, chunk)``.
    """
    if isinstance(spec, Uniform):
        g = chunk_numpy_generator(key, chunk)
    elif isinstance(spec, TruncNormal):
        g = chunk_numpy_generator(key, chunk)
        t_lo, span, sign = spec.cdf_window()  # t = 2p in (0, 2)
    elif isinstance(spec, Normal):
        g = chunk_generator(key, chunk)
    elif not isinstance(spec, Constant):
        raise TypeError(f"the cpu engine cannot fill {spec!r}")
    dst = out if out is not None else _buffer(cdt)
    dst_np = dst.numpy()  # numpy slices of one view: cheaper than a torch slice per slab
    for s, e in _slabs(n):
        v = dst[s:e] if out is not None else dst[: e - s]
        v_np = dst_np[s:e] if out is not None else dst_np[: e - s]
        if isinstance(spec, Uniform):
            _np_uniform(g, v_np, spec.a, spec.b)
        elif isinstance(spec, Normal):
            v.normal_(spec.mean, spec.std, generator=g)
        elif isinstance(spec, Constant):
            v.fill_(spec.value)
        else:
            _np_uniform(g, v_np, t_lo, t_lo + span)
            v.clamp_(T_MIN, T_MAX)
            if t_lo >= _TAIL_T:
                v.sub_(1.0).erfinv_().mul_(sign * spec.std * math.sqrt(2.0))
            else:
                torch.special.ndtri(v.mul_(0.5), out=v).mul_(sign * spec.std)
            v.add_(spec.mean).clamp_(spec.a, spec.b)
        yield s, e, v


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_bytes(t, chunk: int) -> int:
    lo, hi = chunk * CHUNK, (chunk + 1) * CHUNK
    glo, ghi = t.layout.global_range()
    return max(0, min(hi, ghi) - max(lo, glo)) * t.tensor.element_size()


def _fill_chunk(t, chunk: int) -> None:
    """Generate global chunk ``chunk`` of target ``t`` and write the local elements it holds."""
    lay = t.layout
    chunk_lo = chunk * CHUNK
    glo, ghi = lay.global_range()
    flat = t.tensor.view(-1)
    cdt = _compute_dtype(flat.dtype)
    n = min(CHUNK, lay.global_numel - chunk_lo)  # the last chunk may be short
    if lay.rows == 1 and flat.dtype == cdt and glo <= chunk_lo and chunk_lo + n <= ghi:
        # The whole chunk is ours and needs no cast: generate in place.
        s0 = chunk_lo - glo
        for _ in chunk_slabs(t.spec, t.key, chunk, n, cdt, flat[s0 : s0 + n]):
            pass
        return
    for s, e, v in chunk_slabs(t.spec, t.key, chunk, n, cdt, None):
        _scatter(lay, flat, v, chunk_lo + s, chunk_lo + e)


def _scatter(lay, flat: torch.Tensor, v: torch.Tensor, lo: int, hi: int) -> None:
    """Copy the layout's elements among global [lo, hi) (held by ``v``) into ``flat``."""
    if lay.rows == 1:
        a, b = max(lo, lay.offset), min(hi, lay.offset + lay.cols)
        if a < b:
            flat[a - lay.offset : b - lay.offset].copy_(v[a - lo : b - lo])
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
        src = v.as_strided((rows, lay.cols), (lay.row_stride, 1),
                           v.storage_offset() + lay.offset + mid_lo * lay.row_stride - lo)
        flat[mid_lo * lay.cols : (mid_hi + 1) * lay.cols].view(rows, lay.cols).copy_(src)
    for r in sorted({r_first, r_last} - set(range(mid_lo, mid_hi + 1))):
        g0 = lay.offset + r * lay.row_stride
        a, b = max(lo, g0), min(hi, g0 + lay.cols)
        if a < b:
            flat[r * lay.cols + a - g0 : r * lay.cols + b - g0].copy_(v[a - lo : b - lo])


def _chunks_of(t) -> range:
    glo, ghi = t.layout.global_range()
    return range(glo // CHUNK, (ghi + CHUNK - 1) // CHUNK)


def _get_pool() -> ThreadPoolExecutor:
    global _pool, _pool_size
    n = max(1, torch.get_num_threads() - 1)  # the calling thread works too
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fastinit-cpu")
            _pool_size = n
    return _pool


def fill(targets, progress=None) -> None:
    """Fill CPU targets: every (target, chunk) pair is one unit of work on the pool."""
    work = []
    for t in targets:
        if t.tensor.device.type != "cpu":
            raise RuntimeError(
                f"the cpu engine fills CPU tensors, got a {t.tensor.device} tensor; "
                "use the triton or reference engine"
            )
        if t.tensor.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"the cpu engine cannot fill dtype {t.tensor.dtype}")
        work.extend((t, c) for c in _chunks_of(t))
    if not work:
        return
    nthreads = min(len(work), max(1, torch.get_num_threads()))
    # Dynamic scheduling: every thread (the caller's included) takes the next
    # chunk until none is left, so uneven chunks and uneven cores balance out to
    # within one chunk (~1 ms). Values do not depend on who takes which chunk.
    next_item = itertools.count().__next__  # atomic under the GIL
    errors: list[BaseException] = []

    def run():
        with torch.no_grad():
            while not errors:
                i = next_item()
                if i >= len(work):
                    return
                t, c = work[i]
                try:
                    _fill_chunk(t, c)
                except BaseException as e:  # surfaced in the caller below
                    errors.append(e)
                    return
                if progress is not None:
                    progress(_chunk_bytes(t, c))

    futures = [_get_pool().submit(run) for _ in range(nthreads - 1)]
    run()
    for f in futures:
        f.result()
    if errors:
        raise errors[0]
