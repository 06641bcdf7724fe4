"""The ``fastinit`` command line: ``bench`` (the main job), ``compare`` and ``audit``.

    fastinit bench                         # llama-1b on CUDA if available, else CPU
    fastinit bench --preset gpt2-xl --device cpu --dtype bfloat16 --json out.json
    fastinit compare --epochs 5 --plot losses.png
    fastinit compare --scheme xavier_uniform,kaiming_normal,lsuv
    fastinit audit transformers:GPT2LMHeadModel --scheme gpt2 --input-shape 1,64 --plot audit.png

Every usage error (a bad option value, an output folder that does not exist, an
unknown device or scheme) is one line on stderr and exit code 2, before any work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time

EXIT_USAGE = 2
EXIT_MEMORY = 3
EXIT_CHECK = 4


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message.splitlines()[0] if message else message}\n")


SEED_LIMIT = 1 << 64  # torch.manual_seed takes seeds below 2**64 (and wraps negative ones onto them)
MAX_INPUT_ELEMENTS = 1 << 31  # an example batch, not a dataset


def _seed(text: str) -> int:
    """The argparse type of every ``--seed``: an integer torch.manual_seed takes, 0 <= seed < 2**64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer from 0 to 2**64 - 1") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: give an integer from 0 to 2**64 - 1")
    return value


def _device(arg):
    """The torch device ``--device`` names (default: CUDA if available, else CPU)."""
    import torch

    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {arg!r} is not a device: use cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {arg!r} is not supported: use cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {arg}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _out_path(path, opt: str):
    """Check an output file's folder before any work (not after a long run)."""
    if not path:
        return path
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        raise UsageError(f"{opt} {path}: the folder {folder} does not exist")
    if os.path.isdir(full):
        raise UsageError(f"{opt} {path}: is a folder, not a file name")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{opt} {path}: the folder {folder} is not writable")
    return path


def _at_least(value, least: int, opt: str):
    if value < least:
        raise UsageError(f"{opt} must be at least {least}, got {value}")


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


def _warm_torch_meta_kernels() -> None:
    """Run torch's init ops once on tiny meta tensors, untimed. The first call of a meta
    kernel loads torch's Python meta registrations (about 2 s on 2 CPU cores), which the
    meta row would otherwise pay and fastinit's path, which records those calls instead
    of running them, never does: a one-time cost, not the method's."""
    import torch

    x = torch.empty(4, 4, device="meta")
    for fn in (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_,
               torch.nn.init.kaiming_uniform_, torch.nn.init.xavier_uniform_, torch.nn.init.zeros_,
               torch.nn.init.ones_):
        fn(x)
    x.fill_(0.5)


def bench(args) -> int:
    import torch

    import fastinit
    from fastinit.presets import PRESETS

    preset = PRESETS[args.model]
    _at_least(args.repeat, 1, "--repeat")
    _at_least(args.threads, 0, "--threads")
    _out_path(args.json, "--json")
    device = _device(args.device)
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
    _warm_torch_meta_kernels()
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
    from .compare import check_schemes, run, split_schemes

    _at_least(args.epochs, 1, "--epochs")
    _out_path(args.plot, "--plot")
    _out_path(args.json, "--json")
    if args.scheme is not None:
        names = split_schemes(args.scheme)
        if not names:
            raise UsageError("--scheme: no scheme named (give names separated by commas)")
        bad = check_schemes(names)
        if bad:
            raise UsageError(bad)
    return run(args)


def load_model_factory(spec: str):
    """``(name, factory)`` for a preset name or a ``package.module:callable`` factory; a
    transformers model class (``transformers:GPT2LMHeadModel``) is built from its default config."""
    from fastinit.presets import PRESETS

    if spec in PRESETS:
        return spec, PRESETS[spec].build
    if ":" not in spec:
        raise UsageError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                         "package.module:callable factory")
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} ({e})") from None
    except AttributeError:
        raise UsageError(f"{mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{spec} is not callable")
    config_class = getattr(obj, "config_class", None)
    if isinstance(obj, type) and config_class is not None and callable(config_class):
        return spec, lambda: obj(config_class())
    return spec, obj


def _parse_shape(text: str) -> tuple[int, ...]:
    import re

    try:
        shape = tuple(int(x) for x in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: give sizes separated by commas, e.g. 8,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r}: every size must be a positive integer")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UsageError(f"--input-shape {text!r}: {math.prod(shape):.3g} elements is too large for an example "
                         f"batch (at most 2**31)")
    return shape


def _example_input(model, shape, kind: str, device, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if kind == "auto":
        kind = "ids" if embeddings else "float"
    if kind == "ids":
        high = min((m.num_embeddings for m in embeddings), default=2)
        return torch.randint(0, high, shape, generator=g).to(device)
    return torch.randn(shape, generator=g).to(device)


def audit_cmd(args) -> int:
    import torch

    import fastinit
    from fastinit.schemes import SCHEMES

    device = _device(args.device)
    for opt in ("scheme", "expect"):
        name = getattr(args, opt)
        if name is not None and name not in SCHEMES:
            raise UsageError(f"--{opt} {name!r}: unknown scheme; built-in schemes: {', '.join(SCHEMES)}")
    if args.scheme and args.expect and args.scheme != args.expect:
        raise UsageError("--scheme already sets the expectation; give --scheme or --expect, not both")
    shape = _parse_shape(args.input_shape) if args.input_shape else None
    if args.deferred and shape is not None:
        raise UsageError("--deferred audits the plan, before anything is allocated: it cannot run an input "
                         "(drop --input-shape or --deferred)")
    if args.scheme == "lsuv" and shape is None:
        raise UsageError("--scheme lsuv needs --input-shape (it rescales layers on an example batch)")
    _out_path(args.json, "--json")
    _out_path(args.plot, "--plot")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (before any work, not after it)
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    label, factory = load_model_factory(args.model)
    torch.manual_seed(args.seed)
    try:
        if args.deferred:
            model = fastinit.deferred_init(factory)
        else:
            with torch.device(device):
                model = factory()
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"building {label} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{label} returned {type(model).__name__}, not an nn.Module")
    try:
        x = _example_input(model, shape, args.input_dtype, device, args.seed) if shape is not None else None
    except (RuntimeError, MemoryError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"--input-shape {args.input_shape}: cannot build the example input: "
                         f"{type(e).__name__}: {first}") from None
    if args.scheme:
        opts = {"example_input": x} if args.scheme == "lsuv" else {}
        try:
            fastinit.apply_scheme(model, args.scheme, seed=args.seed, **opts)
        except (ValueError, TypeError, RuntimeError) as e:  # (LSUV's forward on a wrong --input-shape)
            first = str(e).splitlines()[0] if str(e) else ""
            raise UsageError(f"--scheme {args.scheme}: {type(e).__name__}: {first}") from None
    expect = args.scheme or args.expect
    try:
        result = fastinit.audit(model, x, scheme=expect if expect != "lsuv" else None)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UsageError(f"auditing {label} failed: {type(e).__name__}: {e}") from None
    result.model_name = f"{type(model).__name__} ({label})"
    print(result.table())
    if args.json:
        result.to_json(args.json)
        print(f"json: {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"plot: {args.plot}")
    return EXIT_CHECK if args.strict and not result.ok else 0


def main(argv=None) -> int:
    from fastinit.presets import PRESETS

    ap = _Parser(prog="fastinit", description="fastinit: fast, reproducible weight init.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser(
        "bench",
        help="time model initialization: torch eager, torch meta path, fastinit, memset floor",
        description="Initialize a model preset three ways in one run (torch's eager constructor, torch's "
                    "meta -> to_empty -> init_weights path, fastinit's deferred_init -> materialize) plus a "
                    "memset of the same bytes, and print seconds, M params/s, GB/s, % of memset and "
                    "fastinit's speedup, then check each weight's std against what the model's init implies.",
        epilog="Presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    b.add_argument("--model", "--preset", dest="model", default="llama-1b", choices=list(PRESETS),
                   help="model preset (default llama-1b); --preset is the same option")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default float32)")
    b.add_argument("--seed", type=_seed, default=0, help="materialization seed, 0 to 2**64 - 1 (default 0)")
    b.add_argument("--repeat", type=int, default=1,
                   help="runs per method, at least 1; the median is reported (default 1)")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's setting)")
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
    c.add_argument("--epochs", type=int, default=2,
                   help="training epochs, at least 1 (default 2, as the classic table)")
    c.add_argument("--seed", type=_seed, default=0,
                   help="seed for data split and init, 0 to 2**64 - 1 (default 0)")
    c.add_argument("--plot", default="fastinit-compare.png", help="PNG path for the loss curves ('' to skip)")
    c.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    c.add_argument("--scheme", action="append", metavar="NAME[,NAME]",
                   help="compare these built-in schemes (fastinit.schemes: torch_default, xavier_uniform, "
                        "kaiming_normal, general_rule, lsuv, ...) or classic rows instead of the classic table; "
                        "repeatable")
    c.set_defaults(fn=compare)
    from fastinit.schemes import SCHEMES

    a = sub.add_parser(
        "audit",
        help="audit a model's init: per-parameter stats, known-scheme matches, flags, signal by depth",
        description="Build a model (a preset, or any package.module:callable factory; a transformers model "
                    "class is built from its default config), optionally initialize it with a built-in scheme, "
                    "and print per parameter: shape, fans, mean, std, min/max, std*sqrt(fan_in), the known "
                    "scheme it matches and flags (symmetry, NaN/inf, uninitialized memory, std far outside "
                    "the Glorot/He band). With --input-shape, one forward/backward pass adds activation and "
                    "gradient std by depth.",
        epilog="Schemes: " + ", ".join(SCHEMES) + ". Presets: " + ", ".join(PRESETS) + ".",
    )
    a.add_argument("model", help="a preset name or a package.module:callable factory "
                                 "(e.g. transformers:GPT2LMHeadModel)")
    a.add_argument("--scheme", metavar="NAME", help="initialize with this built-in scheme first (seeded), and "
                                                    "check every parameter against it")
    a.add_argument("--expect", metavar="NAME", help="check every parameter against this built-in scheme "
                                                    "without applying it")
    a.add_argument("--input-shape", metavar="N,N,...", help="run one forward/backward pass on a random batch "
                                                            "of this shape")
    a.add_argument("--input-dtype", choices=["auto", "float", "ids"], default="auto",
                   help="the batch: token ids below the smallest vocabulary, or N(0, 1) floats (default: ids "
                        "when the model has an Embedding)")
    a.add_argument("--deferred", action="store_true", help="build with deferred_init and audit the plan "
                                                           "(nothing allocated)")
    a.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    a.add_argument("--seed", type=_seed, default=0, help="seed for the model, the scheme and the batch, "
                                                       "0 to 2**64 - 1 (default 0)")
    a.add_argument("--json", metavar="PATH", help="also write the audit as JSON")
    a.add_argument("--plot", metavar="PATH", help="also write a PNG: weight std against the expectation, "
                                                  "activation/gradient std by depth")
    a.add_argument("--strict", action="store_true", help="exit with code 4 when anything is flagged")
    a.set_defaults(fn=audit_cmd)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        _log(f"fastinit {args.cmd}: {e}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
