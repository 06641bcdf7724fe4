"""Host cost of a drop-in call on the CUDA path: everything before the kernel launch.

    python -m benchmarks.host_path [--device cpu|cuda] [--calls 2000] [--repeat 7] [--json PATH]

Goal: <= 8 us per call for everything fastinit does before the compiled kernel
is launched (a 1M-element float32 tensor; the launch itself is Triton's C
launcher, then the driver's).

``--device cpu`` (no GPU needed): the calls run on CPU tensors through the
``triton`` engine exactly as on CUDA tensors, with three things stubbed that
need a GPU: the engine's device check accepts CPU tensors, the current
device/stream queries return constants, and the compiled kernel's launcher is
a Python function that does nothing (entered in the direct-launch cache as a
compiled kernel would be). So every line of fastinit's own path runs:
argument checks, spec, key, target, engine dispatch, layout, kernel
arguments, cache lookup, the call of the launcher.

``--device cuda``: the same with the real kernels, on the GPU: the host cost
with the launcher stubbed, then real calls (host time per call, the GPU
synchronized at the end of each repeat) against ``torch.nn.init``'s.

Each row also shows where the time goes: the layers of the call timed on
their own (the drop-in function, ``engines.fill``, the triton engine's
``fill``, ``philox_fill.fill_one``) and their parts (``draw_key``, the spec,
``Target``). The reference is torch's own CPU call cost: ``torch.nn.init``'s
function on a 256-element CPU tensor, timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

N = 1 << 20


def per_call_us(fn, calls: int, repeat: int, sync=None) -> float:
    """Median over ``repeat`` rounds of the mean time of ``calls`` calls, in us."""
    for _ in range(min(calls, 200)):
        fn()
    if sync:
        sync()
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


class StubLauncher:
    """Stands for a compiled kernel's launcher: counts calls, launches nothing."""

    def __init__(self):
        self.calls = 0
        self.last = None

    def __call__(self, *args):
        self.calls += 1
        self.last = args


def install_stubs(device: str):
    """Route CPU tensors through the triton engine's CUDA path (see the module
    docstring); on CUDA, swap the launcher of every cached kernel for a stub.
    Returns the stub and a function that undoes everything."""
    import fastinit.engines.triton as eng
    from fastinit.kernels import philox_fill as pf

    stub = StubLauncher()
    saved = (eng._interpreting, pf._current_device, pf._current_stream, dict(pf._DIRECT))
    if device == "cpu":
        eng._interpreting = lambda: True
        pf._current_device = lambda: -1
        pf._current_stream = lambda device: 0
        for dtype in (torch.float32, torch.bfloat16):
            for kind in range(4):
                constexprs = (kind, pf._TL_DTYPES[dtype], dtype == torch.bfloat16, pf.CALLS, True)
                pf._DIRECT[(-1, dtype, kind, 1, True, pf.CALLS, pf.NUM_WARPS)] = (stub, 0, b"", constexprs)
    else:
        for key, (_launcher, function, metadata, constexprs) in list(pf._DIRECT.items()):
            pf._DIRECT[key] = (stub, function, metadata, constexprs)

    def undo():
        eng._interpreting, pf._current_device, pf._current_stream = saved[:3]
        pf._DIRECT.clear()
        pf._DIRECT.update(saved[3])

    return stub, undo


def triton_dispatch_us(calls, repeat) -> float | None:
    """What Triton's own ``kernel[grid](...)`` does per call before its launcher
    and that the direct launch skips: binding and specializing the arguments
    and the compiled-kernel cache key (timed without a driver)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import compute_cache_key, create_function_from_signature

        from fastinit.kernels import philox_fill as pf
    except ImportError:
        return None
    k = pf._fill_one_kernel
    binder = create_function_from_signature(k.signature, k.params, make_backend(GPUTarget("cuda", 90, 32)))
    t = torch.empty(N)
    args = (t, 1, 0, N, N, 513, 5, 6, 0.5, 0.25, 0.75, 0.0, -1.0, 1.0)
    kw = dict(KIND=1, OUT_DTYPE=pf._TL_DTYPES[torch.float32], IS_BF16=False, CALLS=pf.CALLS, ONE_ROW=True,
              num_warps=pf.NUM_WARPS, **pf._COMPILE_OPTIONS)
    cache: dict = {}

    def dispatch():
        bound, spec, options = binder(*args, **kw)
        return compute_cache_key(cache, spec, options)

    return per_call_us(dispatch, calls, repeat)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds (the median is shown)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: error: --device cuda: no CUDA device is available (use --device cpu)\n")
    if args.device == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)  # the compiled path, not the interpreter
    import fastinit
    from fastinit import engines
    from fastinit.engines import triton as eng
    from fastinit.seeding import draw_key
    from fastinit.specs import Constant, Normal, TruncNormal, Uniform

    fastinit.engines.check_engine("triton")
    from fastinit.kernels import philox_fill as pf

    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else None
    t = torch.empty(N, device=dev)
    w = torch.empty(1024, 1024, device=dev)
    small = torch.empty(256)  # torch's own CPU call cost
    calls, repeat = args.calls, args.repeat
    cases = [  # (name, fastinit call, torch call, spec of the engine-level rows)
        ("uniform_", lambda: fastinit.uniform_(t, -0.1, 0.1), lambda x: torch.nn.init.uniform_(x, -0.1, 0.1),
         Uniform(-0.1, 0.1)),
        ("normal_", lambda: fastinit.normal_(t, 0.0, 0.02), lambda x: torch.nn.init.normal_(x, 0.0, 0.02),
         Normal(0.0, 0.02)),
        ("trunc_normal_", lambda: fastinit.trunc_normal_(t, std=0.02), lambda x: torch.nn.init.trunc_normal_(
            x, std=0.02), TruncNormal(0.0, 0.02, -2.0, 2.0)),
        ("kaiming_uniform_", lambda: fastinit.kaiming_uniform_(w, a=5**0.5),
         lambda x: torch.nn.init.kaiming_uniform_(x.view(16, 16), a=5**0.5), Uniform(-1 / 32, 1 / 32)),
        ("constant_", lambda: fastinit.constant_(t, 0.5), lambda x: torch.nn.init.constant_(x, 0.5), Constant(0.5)),
    ]
    if dev == "cuda":  # compile and cache every kernel first (real launches)
        for _name, f, _tf, _spec in cases:
            f()
        torch.cuda.synchronize()
    stub, undo = install_stubs(dev)
    rows = []
    try:
        with fastinit.use_engine("triton"):
            for name, f, tf, spec in cases:
                if dev == "cpu" and isinstance(spec, Constant):
                    f = None  # on CPU tensors constant_ is torch's fill_ (never the engine): engine rows only
                kind, params = spec.kernel_params()
                target = engines.Target(t, spec, 12345)
                before = stub.calls
                r = dict(function=name, device=dev)
                if f is not None:
                    r["dropin_us"] = per_call_us(f, calls, repeat)
                r["engines_fill_us"] = per_call_us(lambda: engines.fill([target]), calls, repeat)
                r["triton_engine_fill_us"] = per_call_us(lambda: eng.fill([target]), calls, repeat)
                r["fill_one_us"] = per_call_us(lambda: pf.fill_one(t, 0, 1, N, N, kind, 12345, params), calls,
                                               repeat)
                assert stub.calls > before, "the stubbed launcher was never reached: not the direct path"
                r["torch_cpu_call_us"] = per_call_us(lambda: tf(small), calls, repeat)
                rows.append(r)
            parts = dict(
                draw_key_us=per_call_us(draw_key, calls, repeat),
                spec_us=per_call_us(lambda: Uniform(-0.1, 0.1), calls, repeat),
                kernel_params_us=per_call_us(Uniform(-0.1, 0.1).kernel_params, calls, repeat),
                target_us=per_call_us(lambda: engines.Target(t, Uniform(-0.1, 0.1), 1), calls, repeat),
                stub_launcher_us=per_call_us(lambda: stub(1, 1, 1, 0, 0, b"", None, None, None, *range(18)), calls,
                                             repeat),
            )
    finally:
        undo()
    parts["triton_dispatch_us"] = triton_dispatch_us(calls, repeat)
    real = []
    if dev == "cuda":
        for name, f, tf, _spec in cases:
            real.append(dict(function=name, fastinit_us=per_call_us(f, calls, repeat, sync),
                             torch_us=per_call_us(lambda: tf(t) if name != "kaiming_uniform_" else
                                                  torch.nn.init.kaiming_uniform_(w, a=5**0.5), calls, repeat, sync)))

    print(f"torch {torch.__version__}, {dev} tensors of {N} float32 elements, launch stubbed"
          + (" (CPU tensors through the CUDA path)" if dev == "cpu" else "")
          + f"; median of {repeat} rounds of {calls} calls")
    print("| function | drop-in call us | engines.fill us | triton engine fill us | fill_one us "
          "| torch CPU call us (256 el.) | drop-in / torch CPU call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d, tc = r.get("dropin_us"), r["torch_cpu_call_us"]
        dropin, ratio = ("-", "-") if d is None else (f"{d:.2f}", f"{d / tc:.2f}x")
        print(f"| {r['function']} | {dropin} | {r['engines_fill_us']:.2f} | {r['triton_engine_fill_us']:.2f} | "
              f"{r['fill_one_us']:.2f} | {tc:.2f} | {ratio} |")
    print("parts: " + ", ".join(f"{k[:-3]} {v:.2f} us" for k, v in parts.items() if v is not None))
    worst = max(r.get("dropin_us", r["engines_fill_us"]) for r in rows)
    print(f"goal <= 8 us per drop-in call before the launch: worst {worst:.2f} us -> "
          f"{'met' if worst <= 8 else 'NOT met'}")
    if real:
        print("| function | fastinit us/call (real launch) | torch us/call | ratio |\n|---|---:|---:|---:|")
        for r in real:
            print(f"| {r['function']} | {r['fastinit_us']:.2f} | {r['torch_us']:.2f} | "
                  f"{r['fastinit_us'] / r['torch_us']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, parts=parts, real=real), fh, indent=1)


if __name__ == "__main__":
    main()
