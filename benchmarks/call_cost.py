"""What a drop-in call costs before any element is written.

    python -m benchmarks.call_cost               # 768-element float32 tensor, median of 2000
    python -m benchmarks.call_cost --numel 4096 --repeat 5000

For each function it times, on one small CPU tensor: torch.nn.init's call,
fastinit's call, and fastinit's call with the engine's write stubbed out (the
argument checks, spec and dispatch that the CUDA path shares; a tensor this
small takes no key: it draws from torch's default generator, see the cpu
engine's ``fill_default``). The stubbed column is what fastinit adds before the
first element is written.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

import fastinit
from fastinit.engines import cpu

CALLS = [
    ("uniform_", (-0.1, 0.1)),
    ("normal_", (0.0, 0.02)),
    ("trunc_normal_", (0.0, 0.02)),
    ("kaiming_uniform_", ()),
    ("kaiming_normal_", ()),
    ("xavier_uniform_", ()),
    ("zeros_", ()),
    ("ones_", ()),
]


def per_call(fn, repeat: int) -> float:
    """Median seconds per call over ``repeat`` calls timed in 20 batches."""
    fn()
    batch = max(1, repeat // 20)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args(argv)
    t = torch.empty(args.numel // 32 or 1, 32) if args.numel >= 32 else torch.empty(1, args.numel)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, a {tuple(t.shape)} float32 CPU tensor, "
          f"median of {args.repeat} calls")
    print("| call | torch us | fastinit us | fastinit, write stubbed us | torch / fastinit |\n|---|---:|---:|---:|---:|")
    for name, a in CALLS:
        theirs = per_call(lambda: getattr(torch.nn.init, name)(t, *a), args.repeat)
        ours = per_call(lambda: getattr(fastinit, name)(t, *a), args.repeat)
        with mock.patch.object(cpu, "generate_chunk", lambda *_: None), \
                mock.patch.object(cpu, "fill_single_chunk", lambda *_, **__: None), \
                mock.patch.object(cpu, "fill_like_torch", lambda *_, **__: True), \
                mock.patch.object(cpu, "fill_default", lambda *_, **__: True), \
                mock.patch.object(torch.Tensor, "fill_", lambda self, *_: self):
            stub = per_call(lambda: getattr(fastinit, name)(t, *a), args.repeat)
        print(f"| {name} | {theirs * 1e6:.1f} | {ours * 1e6:.1f} | {stub * 1e6:.1f} | {theirs / ours:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
