"""What bounds the cpu engine on this machine, measured.

    python -m benchmarks.cpu_ceiling

1. per-core generators, one thread, into a buffer of one chunk (2^18 float32):
   torch's ``uniform_`` and ``normal_`` (Mersenne Twister), numpy's SFC64
   ``random(float32)``, the cpu engine's uniform (SFC64 raw words, two 24-bit
   uniforms per word, the affine map included), and the two other normal
   generators pure numpy/torch offers: numpy's ziggurat ``standard_normal``,
   Box–Muller built from numpy ufuncs on raw words (the engine's fallback) or
   from torch ufuncs, and the inverse CDF with torch's ``erfinv_``;
2. thread scaling: the engine's uniform and torch's ``normal_`` from 1 and 2
   Python threads, each call covering a whole chunk (what the engine does) or a
   2^15-element slab: every call hands the GIL over twice, and short calls make
   the hand-overs, not the arithmetic, the bound;
3. memory: the engine's normal fill of 2^28 float32 (1 GiB) on all threads,
   into fresh memory (the first touch included: page faults, zeroing) and
   again into the same, touched memory; and a plain ``fill_`` of fresh memory.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch

from fastinit import engines
from fastinit.engines import cpu
from fastinit.specs import Normal

CHUNK = cpu.CHUNK
WORK = 1 << 27  # elements per measurement, per thread


def _best_rate(fn, n_elems: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_elems / best / 1e6


def per_core(repeat: int = 5) -> dict[str, float]:
    b = torch.empty(CHUNK)
    bn = b.numpy()
    g = torch.Generator()
    ng = np.random.Generator(np.random.SFC64(0))
    st = cpu._ThreadState()
    calls = WORK // CHUNK // 4

    def loop(step):
        return lambda: [step() for _ in range(calls)]

    h = CHUNK // 2
    r, th = torch.empty(h), torch.empty(h)

    def torch_box_muller():  # what a Box–Muller of torch ufuncs costs (uniforms from raw words)
        cpu._np_uniform(st, r.numpy(), 2.0**-24, 1.0)
        cpu._np_uniform(st, th.numpy(), 0.0, 2 * np.pi)
        torch.log(r, out=r).mul_(-2.0).sqrt_()
        torch.cos(th, out=b[:h]).mul_(r)
        torch.sin(th, out=b[h:]).mul_(r)

    def erfinv_normal():  # inverse CDF: sqrt(2) erfinv(2u - 1)
        cpu._np_uniform(st, bn, -1.0 + 2.0**-23, 1.0)
        b.erfinv_().mul_(2**0.5)

    cases = {
        "torch uniform_": lambda: b.uniform_(-0.1, 0.1, generator=g),
        "torch normal_": lambda: b.normal_(0.0, 0.02, generator=g),
        "numpy SFC64 random(float32)": lambda: ng.random(dtype=np.float32, out=bn),
        "fastinit uniform (SFC64 raw words)": lambda: cpu._np_uniform(st, bn, -0.1, 0.1),
        "numpy SFC64 standard_normal(float32)": lambda: ng.standard_normal(dtype=np.float32, out=bn),
        "Box-Muller from numpy ufuncs": lambda: cpu._np_box_muller(st, bn, 0.0, 0.02),
        "Box-Muller from torch ufuncs": torch_box_muller,
        "inverse CDF, torch erfinv_": erfinv_normal,
    }
    return {name: _best_rate(loop(step), calls * CHUNK, repeat) for name, step in cases.items()}


def _threads_rate(make_step, nthreads: int, call: int, repeat: int) -> float:
    calls = WORK // call // 2

    def worker():
        step = make_step(call)
        for _ in range(calls):
            step()

    def run():
        ts = [threading.Thread(target=worker) for _ in range(nthreads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return _best_rate(run, nthreads * calls * call, repeat)


def _uniform_step(call: int):
    st = cpu._ThreadState()
    bn = np.empty(call, dtype=np.float32)
    return lambda: cpu._np_uniform(st, bn, -0.1, 0.1)


def _normal_step(call: int):
    g = torch.Generator()
    b = torch.empty(call)
    return lambda: b.normal_(0.0, 0.02, generator=g)


def scaling(repeat: int = 3) -> list[tuple[str, int, float, float]]:
    rows = []
    for name, make in (("fastinit uniform", _uniform_step), ("torch normal_", _normal_step)):
        for call in (1 << 15, CHUNK):
            one = _threads_rate(make, 1, call, repeat)
            two = _threads_rate(make, 2, call, repeat)
            rows.append((name, call, one, two))
    return rows


def memory(threads: int) -> list[tuple[str, float, float]]:
    """(label, seconds, system CPU seconds) for 1 GiB of float32."""
    import resource

    torch.set_num_threads(threads)
    n = 1 << 28
    rows = []

    def timed(label, fn):
        s0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        fn()
        rows.append((label, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0))

    x = torch.empty(n)
    timed("engine normal fill, fresh memory", lambda: engines.fill([engines.Target(x, Normal(0, 0.02), 1)]))
    timed("engine normal fill, touched memory", lambda: engines.fill([engines.Target(x, Normal(0, 0.02), 2)]))
    del x
    y = torch.empty(n)
    timed("fill_(0) of fresh memory (first touch)", lambda: y.fill_(0.0))
    torch.set_num_threads(1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)  # no options: --help, and a clear error for anything else
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    print("one core, one chunk (2^18 float32) per call:")
    rates = per_core()
    base = rates["torch uniform_"]
    for name, r in rates.items():
        print(f"  {name:36s} {r:5.0f} M/s  ({r / base:.2f}x torch uniform_)")
    print("Python threads, elements per call -> 1 thread, 2 threads, scaling:")
    for name, call, one, two in scaling():
        print(f"  {name:18s} {call:7d} per call: {one:5.0f} M/s, {two:5.0f} M/s -> {two / one:.2f}x")
    print(f"1 GiB of float32 ({1 << 28} elements), {threads} threads:")
    for label, secs, sys_s in memory(threads):
        print(f"  {label:40s} {secs:6.2f} s  {(1 << 28) / secs / 1e6:5.0f} M/s  (system CPU {sys_s:.2f} s)")


if __name__ == "__main__":
    main()
