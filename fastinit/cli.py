"""The ``fastinit`` command line: ``bench`` (the main job) and ``compare``.

    fastinit bench                         # llama-1b on CUDA if available, else CPU
    fastinit bench --model gpt2-xl --device cpu --dtype bfloat16 --json out.json
    fastinit compare --epochs 5 --plot losses.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

EXIT_USAGE = 2
EXIT_MEMORY = 3
EXIT_CHECK = 4


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _available_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable")
    except OSError:
        return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int):
    """Median seconds of ``repeat`` runs of ``fn`` (which returns a model), and the last model."""
    times, out = [], None
    for _ in range(repeat):
        out = None
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _stat_check(model, expected_std) -> dict:
    """Per weight: measured std against the value the model's own init implies."""
    worst, checked, bad = 0.0, 0, []
    for name, p in model.named_parameters():
        want = expected_std(name)
        if want is None:
            continue
        x = p.detach()
        if x.numel() > (1 << 22):  # a strided sample keeps the check cheap on big tensors
            x = x.flatten()[:: x.numel() // (1 << 22)]
        got = x.float().std().item()
        n = x.numel()
        rel = abs(got / want - 1)
        tol = 6 * math.sqrt(1.0 / (2 * n)) + 0.01
        worst = max(worst, rel)
        checked += 1
        if rel > tol:
            bad.append(f"{name}: std {got:.5g}, expected {want:.5g}")
    return {"checked": checked, "worst_rel_err": worst, "failures": bad, "ok": not bad}


def bench(args) -> int:
    import torch

    import fastinit
    from fastinit.presets import PRESETS

    preset = PRESETS[args.model]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _log("fastinit bench: --device cuda was asked for, but no CUDA device is available "
             "(use --device cpu)")
        return EXIT_USAGE
    if device.type not in ("cpu", "cuda"):
        _log(f"fastinit bench: device {device} is not supported (use cpu or cuda)")
        return EXIT_USAGE
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Size the model on the meta device first: nothing is allocated.
    meta = fastinit.deferred_init(preset.build)
    unique = {id(t): t for t in list(meta.parameters()) + list(meta.buffers())}.values()
    n_params = sum(p.numel() for p in {id(p): p for p in meta.parameters()}.values())
    nbytes = sum(t.numel() * (dtype.itemsize if t.dtype.is_floating_point else t.element_size())
                 for t in unique)
    need = int(nbytes * 1.15)  # one model at a time, plus the engines' buffers and slack
    avail = _available_bytes(device)
    if avail is not None and need > avail:
        _log(f"fastinit bench: {preset.name} needs about {need / 1e9:.1f} GB on {device} in {args.dtype} "
             f"({n_params / 1e9:.2f}B parameters), but only {avail / 1e9:.1f} GB is available. "
             "Try --dtype bfloat16 or a smaller --model.")
        return EXIT_MEMORY
    del meta

    _log(f"fastinit bench: {preset.name} ({preset.description}) on {device}, {args.dtype}, "
         f"{torch.get_num_threads()} CPU threads, repeat {args.repeat}")
    rows = []
    old_default = torch.get_default_dtype()

    def eager():
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return preset.build()
        finally:
            torch.set_default_dtype(old_default)

    def meta_path():
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                m = preset.build()
            m.to_empty(device=device)
            m.init_weights()
            return m
        finally:
            torch.set_default_dtype(old_default)

    def ours():
        m = fastinit.deferred_init(preset.build)
        fastinit.materialize(m, device=device, dtype=dtype, seed=args.seed, progress=None)
        return m

    def memset():
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        buf.fill_(1)
        return buf

    # The first touch of fresh memory can cost more than the fill itself (page
    # faults; more so in VMs): touch the model's bytes once, untimed, so every
    # method below meets memory in the same state.
    _log(f"  [0] warm-up: touching {nbytes / 2**30:.2f} GiB once (untimed) ...")
    warm = memset()
    del warm
    steps = [("memset (floor)", memset), ("torch eager", eager), ("torch meta+to_empty+init", meta_path),
             ("fastinit deferred_init+materialize", ours)]
    if args.skip_eager:
        steps = [s for s in steps if s[0] != "torch eager"]
    check = None
    for i, (label, fn) in enumerate(steps, 1):
        _log(f"  [{i}/{len(steps)}] {label} ...")
        secs, model = _timed(fn, device, args.repeat)
        rows.append({"method": label, "seconds": secs})
        if label.startswith("fastinit"):
            check = _stat_check(model, model.expected_std)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _log(f"        {secs:.3f} s")

    t_mem = rows[0]["seconds"]
    by = {r["method"]: r["seconds"] for r in rows}
    t_ours = by["fastinit deferred_init+materialize"]
    for r in rows:
        r.update(params=n_params, bytes=nbytes, Mparams_per_s=n_params / r["seconds"] / 1e6,
                 GB_per_s=nbytes / r["seconds"] / 1e9, pct_of_memset=100 * t_mem / r["seconds"],
                 fastinit_speedup=r["seconds"] / t_ours)
    print(f"{preset.name}: {n_params / 1e9:.3f}B params, {nbytes / 2**30:.2f} GiB {args.dtype} on {device}"
          f" ({torch.get_num_threads()} CPU threads)")
    print("| method | seconds | M params/s | GB/s | % of memset | fastinit speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['Mparams_per_s']:.0f} | {r['GB_per_s']:.2f} | "
              f"{r['pct_of_memset']:.0f}% | {r['fastinit_speedup']:.2f}x |")
    status = "ok" if check["ok"] else "FAILED"
    print(f"statistical check: {check['checked']} weights, worst std error {100 * check['worst_rel_err']:.2f}% "
          f"-> {status}")
    for f in check["failures"]:
        print(f"  {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": preset.name, "device": str(device), "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "rows": rows, "check": check}, f, indent=1)
    return 0 if check["ok"] else EXIT_CHECK


def compare(args) -> int:
    from .compare import run

    return run(args)


def main(argv=None) -> int:
    from fastinit.presets import PRESETS

    ap = argparse.ArgumentParser(prog="fastinit", description="fastinit: fast, reproducible weight init.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser(
        "bench",
        help="time model initialization: torch eager, torch meta path, fastinit, memset floor",
        description="Initialize a model preset three ways in one run (torch's eager constructor, torch's "
                    "meta -> to_empty -> init_weights path, fastinit's deferred_init -> materialize) plus a "
                    "memset of the same bytes, and print seconds, M params/s, GB/s, %% of memset and "
                    "fastinit's speedup, then check each weight's std against what the model's init implies.",
        epilog="Presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    b.add_argument("--model", default="llama-1b", choices=list(PRESETS),
                   help="model preset (default llama-1b)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default float32)")
    b.add_argument("--seed", type=int, default=0, help="materialization seed (default 0)")
    b.add_argument("--repeat", type=int, default=1, help="runs per method; the median is reported (default 1)")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's setting)")
    b.add_argument("--skip-eager", action="store_true", help="skip torch's eager construction (slowest)")
    b.add_argument("--json", metavar="PATH", help="also write every row of the table as JSON")
    b.set_defaults(fn=bench)
    c = sub.add_parser(
        "compare",
        help="train one small MLP per init scheme and compare (zeros, ones, uniform, normal, xavier, ...)",
        description="The classic init-scheme experiment: the same MLP trained from each scheme on "
                    "scikit-learn's bundled handwritten digits (no download), fixed seeds; prints validation "
                    "accuracy and loss per scheme and writes a PNG of the training-loss curves.",
    )
    c.add_argument("--epochs", type=int, default=2, help="training epochs (default 2, as the classic table)")
    c.add_argument("--seed", type=int, default=0, help="seed for data split and init (default 0)")
    c.add_argument("--plot", default="fastinit-compare.png", help="PNG path for the loss curves ('' to skip)")
    c.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    c.set_defaults(fn=compare)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
