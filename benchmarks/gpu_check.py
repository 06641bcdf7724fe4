"""GPU check: kernel tests on CUDA, then bandwidth of every fill against memset.

    python benchmarks/gpu_check.py [--gib 2] [--repeat 10] [--json gpu.json] [--skip-tests] [--sweep]
    python benchmarks/gpu_check.py --dry-run      # no GPU: every step on small CPU tensors

1. runs the kernel and engine tests on CUDA tensors (pytest);
2. times torch.nn.init and fastinit for each init function in float32 and
   bfloat16 on a tensor of ``--gib`` GiB, with CUDA events (median of
   ``--repeat``), against ``zero_()`` of the same bytes (the memset floor), and
   prints GB/s, % of memset and the speedup over torch, then the JSON rows.

``--sweep`` first times a few kernel shapes (Philox calls per program, warps)
on uniform, normal and truncated-normal fills, to choose the defaults.

Goals (each row says whether it meets its own): every fill >= 85% of memset
in float32, >= 70% in bfloat16 (memset measured on the same tensor);
trunc_normal_ >= 5x torch at +-2 sigma and >= 1x at its default bounds
(std=.02, a=-2, b=2: +-100 sigma). Plus one batched launch for a model-sized
set of tensors (many small ones), to show the per-launch cost.

``--dry-run`` runs every step on CPU tensors of a few MB, timed with the
wall clock (the numbers mean nothing; it checks that the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fastinit  # noqa: E402
from fastinit.engines import Target, fill  # noqa: E402

CASES = [  # (row label, function, arguments after the tensor)
    ("uniform_", "uniform_", (-0.1, 0.1)),
    ("normal_", "normal_", (0.0, 0.02)),
    ("trunc_normal_ +-2 sigma", "trunc_normal_", (0.0, 0.02, -0.04, 0.04)),
    ("trunc_normal_ std=.02 (+-100 sigma)", "trunc_normal_", (0.0, 0.02)),
    ("kaiming_uniform_", "kaiming_uniform_", ()),
    ("xavier_normal_", "xavier_normal_", ()),
    ("constant_", "constant_", (0.5,)),
]
GOAL_PCT_MEMSET = {"float32": 85, "bfloat16": 70}
GOAL_SPEEDUP = {"trunc_normal_ +-2 sigma": 5.0, "trunc_normal_ std=.02 (+-100 sigma)": 1.0}
DEVICE = "cuda"


def cuda_time(fn, repeat: int) -> float:
    if DEVICE != "cuda":  # --dry-run: wall clock on CPU
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


SWEEP = [(256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8)]


def sweep(args) -> list:
    from fastinit.kernels import philox_fill as pf

    default = (pf.CALLS, pf.NUM_WARPS)
    out = []
    print("| calls/program | warps | fill | dtype | GB/s | % of memset |\n|---:|---:|---|---|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        elem = torch.tensor([], dtype=dtype).element_size()
        t = torch.empty(int(args.gib * 2**30 / elem), dtype=dtype, device=DEVICE)
        nbytes = t.numel() * elem
        t_mem = cuda_time(lambda: t.zero_(), args.repeat)
        for calls, warps in SWEEP:
            pf.CALLS, pf.NUM_WARPS = calls, warps
            for label, name, a in CASES[:4]:
                secs = cuda_time(lambda: getattr(fastinit, name)(t, *a), args.repeat)
                r = dict(sweep=True, calls=calls, warps=warps, function=label, dtype=str(dtype)[6:],
                         GBps=nbytes / secs / 1e9, pct_memset=100 * t_mem / secs)
                out.append(r)
                print(f"| {calls} | {warps} | {label} | {r['dtype']} | {r['GBps']:.0f} | {r['pct_memset']:.0f}% |",
                      flush=True)
        t = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    pf.CALLS, pf.NUM_WARPS = default
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time kernel shapes (CALLS, num_warps) first")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run every step on small CPU tensors")
    args = ap.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE, args.gib, args.repeat, args.skip_tests = "cpu", min(args.gib, 1 / 256), 2, True
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (--dry-run runs the steps on CPU)")
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "dry run on CPU", "torch", torch.__version__,
          flush=True)
    rc = 0
    if not args.skip_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels.py",
                              "tests/test_api.py", "tests/test_errors.py"], cwd=ROOT)
        print("tests exit code", rc, flush=True)
    rows = []
    if args.sweep:
        rows += sweep(args)
    print("| function | dtype | torch GB/s | fastinit GB/s | memset GB/s | % of memset | speedup | goal |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for dtype in (torch.float32, torch.bfloat16):
        elem = torch.tensor([], dtype=dtype).element_size()
        n = int(args.gib * 2**30 / elem)
        t = torch.empty(32768, n // 32768, dtype=dtype, device=DEVICE)
        nbytes = t.numel() * elem
        t_mem = cuda_time(lambda: t.zero_(), args.repeat)
        for label, name, a in CASES:
            t_torch = cuda_time(lambda: getattr(torch.nn.init, name)(t, *a), args.repeat)
            t_fast = cuda_time(lambda: getattr(fastinit, name)(t, *a), args.repeat)
            r = dict(function=label, dtype=str(dtype).replace("torch.", ""), bytes=nbytes,
                     torch_GBps=nbytes / t_torch / 1e9, fastinit_GBps=nbytes / t_fast / 1e9,
                     memset_GBps=nbytes / t_mem / 1e9, pct_memset=100 * t_mem / t_fast,
                     speedup=t_torch / t_fast)
            goals = [f">= {GOAL_PCT_MEMSET[r['dtype']]}% of memset"] if r["dtype"] in GOAL_PCT_MEMSET else []
            met = r["pct_memset"] >= GOAL_PCT_MEMSET.get(r["dtype"], 0)
            if label in GOAL_SPEEDUP:
                goals.append(f">= {GOAL_SPEEDUP[label]:g}x torch")
                met = met and r["speedup"] >= GOAL_SPEEDUP[label]
            r["goal"], r["goal_met"] = ", ".join(goals), met
            rows.append(r)
            print(f"| {label} | {r['dtype']} | {r['torch_GBps']:.0f} | {r['fastinit_GBps']:.0f} | "
                  f"{r['memset_GBps']:.0f} | {r['pct_memset']:.0f}% | {r['speedup']:.2f}x | "
                  f"{r['goal']}: {'met' if met else 'NOT met'} |", flush=True)
        t = None  # free the buffer before the next dtype
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    # Many tensors, one launch per dtype: a 1B-parameter-like set of shapes.
    shapes = [(2048, 2048)] * 64 + [(8192, 2048)] * 48 + [(2048,)] * 33 + [(128256, 2048)]
    if DEVICE != "cuda":
        shapes = [(64, 64)] * 8 + [(64,)] * 4
    ts = [torch.empty(s, device=DEVICE) for s in shapes]
    targets = [Target(x, fastinit.Normal(0, 0.02), i + 1) for i, x in enumerate(ts)]
    nbytes = sum(x.numel() * 4 for x in ts)
    t_batch = cuda_time(lambda: fill(targets), args.repeat)
    t_loop = cuda_time(lambda: [torch.nn.init.normal_(x, 0, 0.02) for x in ts], args.repeat)
    print(f"batch of {len(ts)} tensors ({nbytes / 2**30:.2f} GiB): fastinit one launch "
          f"{t_batch * 1e3:.1f} ms ({nbytes / t_batch / 1e9:.0f} GB/s), torch per tensor {t_loop * 1e3:.1f} ms")
    rows.append(dict(function="batch_normal", tensors=len(ts), bytes=nbytes, fastinit_s=t_batch, torch_s=t_loop))
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    sys.exit(rc)


if __name__ == "__main__":
    main()
