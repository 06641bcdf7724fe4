"""Drop-in speed: fastinit against torch.nn.init on one big tensor, same run.

    python -m benchmarks.init_speed            # 64M elements, the README table
    python -m benchmarks.init_speed --numel 16777216 --repeat 7 --json out.json
    python -m benchmarks.init_speed --only f32 --repeat 11

Each case times torch and fastinit on the same tensor in ``--repeat`` rounds;
a round runs torch twice and then fastinit twice and times only the second call
of each, so both libraries meet the same machine (slow phases of a shared host
hit both) and neither pays for the switch (a VM parks an idle core, and the first
multithreaded call after a single-threaded one wakes it; compare with --interleave). It prints the medians and the ratio
torch / fastinit (> 1: fastinit is faster). ``--interleave`` times every call,
alternating the libraries call by call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastinit

# (name, dtype, function name, positional args)
CASES = [
    ("kaiming_uniform_ f32", torch.float32, "kaiming_uniform_", ()),
    ("normal_ f32", torch.float32, "normal_", (0.0, 0.02)),
    ("uniform_ f32", torch.float32, "uniform_", (-0.1, 0.1)),
    ("xavier_normal_ f32", torch.float32, "xavier_normal_", ()),
    ("trunc_normal_ f32", torch.float32, "trunc_normal_", (0.0, 0.02, -0.04, 0.04)),
    ("kaiming_uniform_ bf16", torch.bfloat16, "kaiming_uniform_", ()),
    ("normal_ bf16", torch.bfloat16, "normal_", (0.0, 0.02)),
    ("uniform_ bf16", torch.bfloat16, "uniform_", (-0.1, 0.1)),
    ("trunc_normal_ bf16", torch.bfloat16, "trunc_normal_", (0.0, 0.02, -0.04, 0.04)),
]


def shape_for(numel: int) -> tuple[int, int]:
    rows = 4096
    return rows, max(1, numel // rows)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(case, numel: int, repeat: int, device="cpu", interleave: bool = False) -> dict:
    name, dtype, fn_name, args = case
    device = torch.device(device)
    t = torch.empty(shape_for(numel), dtype=dtype, device=device)
    ours = lambda: getattr(fastinit, fn_name)(t, *args)  # noqa: E731
    theirs = lambda: getattr(torch.nn.init, fn_name)(t, *args)  # noqa: E731
    tf, tt = [], []
    if interleave:
        ours(), theirs()  # warm-up
        for _ in range(repeat):
            tt.append(time_call(theirs, device))
            tf.append(time_call(ours, device))
    else:
        for _ in range(repeat):
            for fn, times in ((theirs, tt), (ours, tf)):
                fn()  # untimed: the switch from the other library
                times.append(time_call(fn, device))
    mt, mf = statistics.median(tt), statistics.median(tf)
    n = t.numel()
    return {
        "case": name, "numel": n, "torch_s": mt, "fastinit_s": mf,
        "torch_Melem_s": n / mt / 1e6, "fastinit_Melem_s": n / mf / 1e6, "speedup": mt / mf,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=64 * 2**20, help="elements per tensor (default 64M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per library (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--interleave", action="store_true", help="alternate the libraries call by call")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.numel / 2**20:.0f}M elements, median of {args.repeat}"
          + (", interleaved" if args.interleave else ", paired rounds"))
    print("| case | torch M/s | fastinit M/s | speedup |\n|---|---:|---:|---:|")
    rows = []
    for case in [c for c in CASES if args.only in c[0]]:
        r = measure(case, args.numel, args.repeat, args.device, args.interleave)
        rows.append(r)
        print(f"| {r['case']} | {r['torch_Melem_s']:.0f} | {r['fastinit_Melem_s']:.0f} | {r['speedup']:.2f}x |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
