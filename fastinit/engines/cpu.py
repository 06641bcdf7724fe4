"""The ``cpu`` engine: pure torch, chunk-parallel on a thread pool.

The logical flat index of a tensor is cut into chunks of :data:`CHUNK` elements.
Chunk ``c`` of a tensor with key ``k`` draws from its own stream: a Mersenne
Twister whose whole 19937-bit state is taken from numpy's Philox4x64 keyed by the
128 bits ``(k, c)``. (A torch generator seeded with ``manual_seed`` keeps only 32
bits of its seed, so one seeded per chunk would repeat chunks at model scale.)
Values therefore depend on ``(key, element index)`` only: never on the number of
threads, the order of chunks, or the other tensors of the batch.

Within a chunk, torch's own serial kernels generate (``uniform_``, ``normal_``)
into float32 (float64 for float64 tensors); float16/bfloat16 tensors receive
the float32 values rounded once. Elementwise work (the truncated normal's inverse
CDF, casts) runs on slabs of :data:`SLAB` elements, below ATen's parallel grain,
so worker threads never spawn nested OpenMP teams. Extra memory: one chunk
buffer per thread.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..specs import Constant, Normal, TruncNormal, Uniform

CHUNK = 1 << 18
SLAB = 1 << 15  # at or below ATen's GRAIN_SIZE: elementwise ops stay single-threaded
_MT_N = 624
_T_MIN = 2.0**-126
_T_MAX = 2.0 - 2.0**-23
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


def _thread_state():
    st = getattr(_local, "st", None)
    if st is None:
        state = _state_template().clone()
        words = state.numpy()[24 : 24 + 8 * _MT_N].view(np.uint64)
        st = _local.st = (torch.Generator(), state, words, {})
    return st


def chunk_generator(key: int, chunk: int) -> torch.Generator:
    """The generator of chunk ``chunk`` of the tensor keyed ``key`` (this thread's object)."""
    gen, state, words, _ = _thread_state()
    bits = np.random.Philox(key=np.array([key, chunk], dtype=np.uint64)).random_raw(_MT_N // 2)
    words[:] = bits.view(np.uint32)
    gen.set_state(state)
    return gen


def _buffer(dtype: torch.dtype, n: int) -> torch.Tensor:
    bufs = _thread_state()[3]
    b = bufs.get(dtype)
    if b is None:
        b = bufs[dtype] = torch.empty(CHUNK, dtype=dtype)
    return b[:n]


def _slabs(n: int):
    for s in range(0, n, SLAB):
        yield s, min(n, s + SLAB)


def generate_chunk(spec, key: int, chunk: int, out: torch.Tensor) -> None:
    """Write chunk ``chunk`` of the tensor keyed ``key`` into ``out`` (float32/64, contiguous)."""
    if isinstance(spec, Constant):
        for s, e in _slabs(out.numel()):
            out[s:e].fill_(spec.value)
        return
    g = chunk_generator(key, chunk)
    if isinstance(spec, Uniform):
        out.uniform_(spec.a, spec.b, generator=g)
    elif isinstance(spec, Normal):
        out.normal_(spec.mean, spec.std, generator=g)
    elif isinstance(spec, TruncNormal):
        lo, span, sign = spec.cdf_window()
        out.uniform_(lo, lo + span, generator=g)  # t = 2p in (0, 2)
        if lo >= _TAIL_T:
            scale = sign * spec.std * math.sqrt(2.0)
            for s, e in _slabs(out.numel()):
                v = out[s:e]
                v.clamp_(_T_MIN, _T_MAX).sub_(1.0).erfinv_().mul_(scale)
                v.add_(spec.mean).clamp_(spec.a, spec.b)
        else:
            scale = sign * spec.std
            for s, e in _slabs(out.numel()):
                v = out[s:e]
                torch.special.ndtri(v.clamp_(_T_MIN, _T_MAX).mul_(0.5), out=v)
                v.mul_(scale).add_(spec.mean).clamp_(spec.a, spec.b)
    else:
        raise TypeError(f"the cpu engine cannot fill {spec!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fill_chunk(t, chunk: int) -> None:
    """Generate global chunk ``chunk`` of target ``t`` and write the local elements it holds."""
    lay = t.layout
    n_global_lo = chunk * CHUNK
    glo, ghi = lay.global_range()
    flat = t.tensor.view(-1)
    cdt = _compute_dtype(flat.dtype)
    # Length of this chunk in the global tensor (the last chunk may be short).
    n = min(CHUNK, t.layout.global_numel - n_global_lo)
    direct = lay.rows == 1 and flat.dtype == cdt
    if direct and glo <= n_global_lo and n_global_lo + n <= ghi:
        # The whole chunk is ours and needs no cast: generate in place.
        s = n_global_lo - glo
        generate_chunk(t.spec, t.key, chunk, flat[s : s + n])
        return
    buf = _buffer(cdt, n)
    generate_chunk(t.spec, t.key, chunk, buf)
    for dst, src in _overlaps(lay, n_global_lo, n):
        for s, e in _slabs(dst[1] - dst[0]):
            flat[dst[0] + s : dst[0] + e].copy_(buf[src + s : src + e])


def _overlaps(lay, chunk_lo: int, n: int):
    """Pieces of the layout inside global [chunk_lo, chunk_lo + n): ((local lo, local hi), buf offset)."""
    chunk_hi = chunk_lo + n
    if lay.rows == 1:
        r_first, r_last = 0, 0
    else:
        r_first = max(0, (chunk_lo - lay.offset - lay.cols) // lay.row_stride)
        r_last = min(lay.rows - 1, (chunk_hi - 1 - lay.offset) // lay.row_stride)
    for r in range(r_first, r_last + 1):
        g0 = lay.offset + r * lay.row_stride
        lo, hi = max(g0, chunk_lo), min(g0 + lay.cols, chunk_hi)
        if lo < hi:
            yield (r * lay.cols + lo - g0, r * lay.cols + hi - g0), lo - chunk_lo


def _chunks_of(t) -> range:
    glo, ghi = t.layout.global_range()
    return range(glo // CHUNK, (ghi + CHUNK - 1) // CHUNK)


def _get_pool() -> ThreadPoolExecutor:
    global _pool, _pool_size
    n = max(1, torch.get_num_threads())
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fastinit-cpu")
            _pool_size = n
    return _pool


def fill(targets) -> None:
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
    nthreads = max(1, torch.get_num_threads())
    if len(work) == 1 or nthreads == 1:
        for t, c in work:
            _fill_chunk(t, c)
        return
    # Contiguous groups of work, several per thread, so uneven chunks balance out.
    ngroups = min(len(work), 4 * nthreads)
    step = -(-len(work) // ngroups)
    groups = [work[i : i + step] for i in range(0, len(work), step)]

    def run(group):
        with torch.no_grad():
            for t, c in group:
                _fill_chunk(t, c)

    for f in [_get_pool().submit(run, g) for g in groups]:
        f.result()
