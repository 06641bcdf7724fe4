"""What bounds the cpu engine on this machine, measured.

    python -m benchmarks.cpu_ceiling

1. thread scaling: torch's ``normal_`` on a cache-sized buffer, 1 thread vs 2
   threads each with its own generator (compute-bound: the best any 2-thread
   fill can gain);
2. per-core generators: torch's ``uniform_`` against numpy's SFC64
   ``random(float32)`` (what the cpu engine uses for uniform fills), both into
   the same cache-sized buffer, one thread.
"""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import torch

SLAB = 1 << 15
CALLS = 2048


def _normal_loop():
    g = torch.Generator()
    b = torch.empty(SLAB)
    for _ in range(CALLS):
        b.normal_(generator=g)


def thread_scaling(repeat: int = 5) -> tuple[float, float]:
    rates = {}
    for nt in (1, 2):
        best = float("inf")
        for _ in range(repeat):
            ts = [threading.Thread(target=_normal_loop) for _ in range(nt)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        rates[nt] = nt * CALLS * SLAB / best / 1e6
    return rates[1], rates[2]


def per_core(repeat: int = 7) -> tuple[float, float]:
    b = torch.empty(SLAB)
    bn = b.numpy()
    g = torch.Generator()
    ng = np.random.Generator(np.random.SFC64(0))

    def rate(fn):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(CALLS // 4):
                fn()
            times.append(time.perf_counter() - t0)
        return CALLS // 4 * SLAB / statistics.median(times) / 1e6

    return rate(lambda: b.uniform_(generator=g)), rate(lambda: ng.random(dtype=np.float32, out=bn))


def main():
    torch.set_num_threads(1)
    one, two = thread_scaling()
    print(f"torch normal_, cache-sized buffer: 1 thread {one:.0f} M/s, 2 threads {two:.0f} M/s "
          f"-> scaling {two / one:.2f}x")
    tu, nu = per_core()
    print(f"one core, cache-sized buffer: torch uniform_ {tu:.0f} M/s, numpy SFC64 random(float32) "
          f"{nu:.0f} M/s -> {nu / tu:.2f}x")


if __name__ == "__main__":
    main()
