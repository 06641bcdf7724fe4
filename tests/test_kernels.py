"""The Triton kernels against the reference engine.

Without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest), about a million elements a second: shapes stay small.
"""

import pytest
import torch

from conftest import have_triton
from fastinit.engines import Layout, Target, fill, use_engine
from fastinit.specs import Constant, Normal, TruncNormal, Uniform

pytestmark = pytest.mark.skipif(not have_triton(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SPECS = [
    Uniform(-3.0, 5.0),
    Uniform(-(2.0**-110), 2.0**-110),  # a span below 2^-100: the kernel's unscaled uniform path
    Constant(-0.375),
    Normal(1.0, 2.0),
    TruncNormal(0.0, 1.0, -2.0, 2.0),
    TruncNormal(0.0, 1.0, 5.0, 6.0),  # mirrored upper tail, Acklam branch
    TruncNormal(0.0, 0.02, -2.0, 2.0),  # trunc_normal_(w, std=.02): +-100 sigma, both polynomials
]
SIZES = [1, 3, 4, 5, 2047, 2048, 2049, 4101]


def _run(engine, targets):
    with use_engine(engine):
        fill(targets)


def _poisoned(n, dtype, pad=8):
    base = torch.full((n + 2 * pad,), float("nan"), dtype=dtype, device=DEVICE)
    return base, base[pad : pad + n]


def _assert_match(spec, got, want):
    if isinstance(spec, (Uniform, Constant)):
        assert torch.equal(got, want)
    else:  # log/cos/sin differ by an ulp between implementations
        g, w = got.double(), want.double()
        eps = max(torch.finfo(got.dtype).eps, torch.finfo(torch.float32).eps)
        tol = 4 * eps * (abs(getattr(spec, "mean", 0.0)) + 8 * getattr(spec, "std", 1.0)) + 1e-6
        if got.is_cuda and isinstance(spec, Normal):
            # The GPU's sin.approx/cos.approx: absolute error below 2^-20 on
            # [0, 2pi), times a radius of at most sqrt(2 * 24 ln 2) < 5.8.
            tol += 2.0**-20 * 5.8 * spec.std
        diff = (g - w).abs().max().item()
        assert diff <= tol, f"max diff {diff} > {tol}"


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equals_reference_and_writes_exactly_its_elements(spec, dtype):
    for n in SIZES:
        base, got = _poisoned(n, dtype)
        want = torch.empty(n, dtype=dtype, device=DEVICE)
        _run("triton", [Target(got, spec, 0xDEADBEEF12345678)])
        _run("reference", [Target(want, spec, 0xDEADBEEF12345678)])
        assert not torch.isnan(got).any(), f"n={n}: an element was not written"
        assert torch.isnan(base[:8]).all() and torch.isnan(base[-8:]).all(), f"n={n}: wrote outside"
        _assert_match(spec, got, want)
        if isinstance(spec, TruncNormal):
            assert got.min() >= torch.tensor(spec.a, dtype=dtype) and got.max() <= torch.tensor(spec.b, dtype=dtype)


def test_low_precision_kernel_output_is_float32_rounded_once():
    for spec in SPECS:
        a = torch.empty(3000, device=DEVICE)
        b = torch.empty(3000, dtype=torch.bfloat16, device=DEVICE)
        _run("triton", [Target(a, spec, 77), Target(b, spec, 77)])
        expected = a.bfloat16()
        if isinstance(spec, Uniform):  # what would round up to b is a, as torch's uniform_ makes it
            b16 = torch.tensor(spec.b, dtype=torch.bfloat16)
            expected = torch.where(expected >= b16, torch.tensor(spec.a, dtype=torch.bfloat16), expected)
        assert torch.equal(expected, b)


def test_a_batch_equals_one_by_one():
    shapes = [(1,), (5, 7), (2049,), (3, 1001), (4,)]
    specs = [SPECS[i % len(SPECS)] for i in range(len(shapes))]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    keys = [3 * i + (1 << 40) for i in range(len(shapes))]
    batch = [torch.empty(s, dtype=d, device=DEVICE) for s, d in zip(shapes, dtypes)]
    _run("triton", [Target(t, s, k) for t, s, k in zip(batch, specs, keys)])
    for t, s, k, d in zip(batch, specs, keys, dtypes):
        one = torch.empty(t.shape, dtype=d, device=DEVICE)
        _run("triton", [Target(one, s, k)])
        assert torch.equal(t, one)


def test_same_key_same_values_different_key_different_values():
    a, b, c = (torch.empty(2100, device=DEVICE) for _ in range(3))
    _run("triton", [Target(a, Normal(), 5), Target(b, Normal(), 5), Target(c, Normal(), 6)])
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("spec", SPECS[:5], ids=repr)
def test_kernel_honours_shard_layouts(spec):
    R, C = 9, 23
    full = torch.empty(R, C, device=DEVICE)
    _run("reference", [Target(full, spec, 11)])
    boxes = [(0, R, 0, C), (2, 7, 0, C), (0, R, 3, 17), (4, 5, 1, 2), (1, 8, 22, 23)]
    for r0, r1, c0, c1 in boxes:
        part = torch.full((r1 - r0, c1 - c0), float("nan"), device=DEVICE)
        if c0 == 0 and c1 == C:
            lay = Layout(r0 * C, 1, part.numel(), part.numel(), R * C)
        else:
            lay = Layout(r0 * C + c0, r1 - r0, c1 - c0, C, R * C)
        _run("triton", [Target(part, spec, 11, lay)])
        _assert_match(spec, part, full[r0:r1, c0:c1])


def test_indices_past_two_to_the_31():
    # A one-row shard far into a huge logical tensor: 64-bit counters and offsets.
    off = (1 << 33) + 3
    lay = Layout(off, 1, 10, 10, off + 10)
    got = torch.empty(10, device=DEVICE)
    want = torch.empty(10, device=DEVICE)
    _run("triton", [Target(got, Uniform(), 1, lay)])
    _run("reference", [Target(want, Uniform(), 1, lay)])
    assert torch.equal(got, want)
    other = torch.empty(10, device=DEVICE)
    _run("reference", [Target(other, Uniform(), 1, Layout(3, 1, 10, 10, 13))])
    assert not torch.equal(got, other)


def test_counter_carries_into_the_high_word_inside_a_program():
    # Calls 2^32 - 5 ... 2^32 + 4 in one program: the low counter word wraps and
    # the high word must carry exactly there, as in the reference.
    off = 4 * ((1 << 32) - 5) + 1
    lay = Layout(off, 1, 40, 40, off + 40)
    got, want = torch.empty(40, device=DEVICE), torch.empty(40, device=DEVICE)
    _run("triton", [Target(got, Uniform(), 9, lay)])
    _run("reference", [Target(want, Uniform(), 9, lay)])
    assert torch.equal(got, want)


def test_every_program_finds_its_target_in_a_large_batch():
    # 37 targets of uneven sizes (1 to 4101 elements, so 1 to 3 programs each):
    # the binary search from program id to target must land on each one exactly.
    sizes = [1 + (i * 997) % 4101 for i in range(37)]
    spec = Uniform(-1.0, 1.0)
    got = [torch.full((n,), float("nan"), device=DEVICE) for n in sizes]
    _run("triton", [Target(g, spec, 1000 + i) for i, g in enumerate(got)])
    for i, g in enumerate(got):
        want = torch.empty_like(g)
        _run("reference", [Target(want, spec, 1000 + i)])
        assert torch.equal(g, want), f"target {i} ({sizes[i]} elements)"


_HOPPER_BUILD = r"""
import re, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from fastinit.kernels import philox_fill as pf

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
# Widest store of the aligned path: 4 elements per instruction, 16 bytes (8 for 2-byte types).
VECTOR = {torch.float32: "st.global.v4.b32", torch.float64: "st.global.v2.b64",
          torch.bfloat16: "st.global.v2.b32", torch.float16: "st.global.v2.b32"}


def build(kernel, args, kwargs):
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)  # what a real launch binds first
    # ... then the signature, constants and alignment facts it compiles with
    options, sig, const, attrs = kernel._pack_args(backend, options, bound, spec, options)
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=target, options=options.__dict__)


for dtype in pf._TL_DTYPES:
    ts = [torch.empty(5000, dtype=dtype), torch.empty(3, dtype=dtype)]
    grid, args, kwargs = pf.launch_args(ts, [(0, 1, 5000, 5000), (7, 1, 3, 3)], [1, 2], [5, 6],
                                        [0.5] * (2 * pf.N_PARAMS))
    one = dict(KIND=2, OUT_DTYPE=pf._TL_DTYPES[dtype], IS_BF16=dtype == torch.bfloat16, CALLS=pf.CALLS,
               ONE_ROW=False, num_warps=pf.NUM_WARPS, **pf._COMPILE_OPTIONS)
    for name, out in (("batch", build(pf._fill_kernel, args, kwargs)),
                      ("one", build(pf._fill_one_kernel, (ts[0], 1, 0, 50, 100, 1, 5, 6) + (0.5,) * 6, one))):
        ptx = out.asm["ptx"]
        assert len(out.asm["cubin"]) > 0
        assert VECTOR[dtype] in ptx, (name, dtype, sorted(set(re.findall(r"st\.global[.\w]*", ptx))))
        print(name, dtype, "ok")
"""


def _compiled_mode(script, timeout=600):
    """Run ``script`` in a fresh interpreter with Triton compiling (not interpreting)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-c", script] if isinstance(script, str) else [sys.executable, *script]
    return subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)


def test_kernel_binds_and_compiles_for_hopper_without_a_gpu():
    # The interpreter checks what the kernels compute, not that a launch binds
    # their arguments, that they compile, or how they store: this builds both
    # (the batch kernel and the single-target one) for sm_90 (the H100/H200)
    # with Triton's own launcher code and compiler, no GPU needed, and checks
    # that aligned blocks are written with vector stores (scalar stores held a
    # fill to a third of memset bandwidth on an H200).
    res = _compiled_mode(_HOPPER_BUILD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(" ok") == 8, res.stdout


def _nvidia_tools_present() -> bool:
    try:
        import os

        from triton.backends.nvidia.compiler import get_ptxas

        bindir = os.path.join(os.path.dirname(get_ptxas(90).path))
        return os.path.exists(get_ptxas(90).path) and os.path.exists(os.path.join(bindir, "cuobjdump"))
    except Exception:  # noqa: BLE001 - no nvidia backend at all
        return False


@pytest.mark.skipif(not _nvidia_tools_present(), reason="Triton's nvidia backend tools (ptxas, cuobjdump) are absent")
def test_sm90_machine_code_keeps_what_the_bandwidth_prediction_assumes(tmp_path):
    # docs/gpu-bound.md predicts each fill's rate from its sm_90 SASS; the
    # prediction assumes 128-bit stores (64-bit for bfloat16: four values per
    # store) on the aligned path and no local memory (spills would add memory
    # traffic and instructions). benchmarks/sass_count.py --check enforces both.
    import json

    out = tmp_path / "sass.json"
    res = _compiled_mode(["-m", "benchmarks.sass_count", "--check", "--json", str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {f"one_{k}_{d}" for k in ("uniform", "normal", "trunc_normal", "constant")
            for d in ("float32", "bfloat16")} <= kernels and {"batch_float32", "batch_bfloat16"} <= kernels
    for r in rows:
        assert r["spill_stores"] == r["spill_loads"] == r["local_memory_insns"] == 0, r
        assert r["widest_store_bits"] == (128 if r["dtype"] == "float32" else 64), r
        if r["dtype"] == "float32":
            assert "st.global.v4.b32" in r["ptx_stores"], r
    # The fast paths the doc counts (constant: a store of a broadcast value).
    per = {(r["kernel"], r["variant"]): r["insns_per_element"] for r in rows}
    assert per[("one_constant_float32", None)] < 6, per


_DIRECT_LAUNCH = r"""
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaLauncher
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature
from fastinit.kernels import philox_fill as pf

# 1. The internals a direct launch relies on are this Triton's.
assert list(inspect.signature(CudaLauncher.__call__).parameters)[1:] == pf._LAUNCHER_PARAMS
run_src = inspect.getsource(JITFunction.run)
assert "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata" in run_src
assert "*bound_args.values())" in run_src
assert not pf.direct_launch_supported(None) and not pf.direct_launch_supported(object())

# 2. A direct launch hands the launcher exactly what Triton's binder binds, in
#    order (constexprs included), with the grid and stream in front.
kernel = pf._fill_one_kernel
binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
pf._current_device = lambda: -1
pf._current_stream = lambda device: 1234
seen, slow = [], []
pf._fill_one_launch = lambda *a: slow.append(a)
key = 0xDEADBEEF12345678
for dtype in (torch.float32, torch.bfloat16):
    for kind, params in ((1, (-1.0, 2.0, 0.9999999, 0.0, 0.0, 0.0)), (3, (0.1, 1.8, 1.4, 0.5, -2.0, 2.0))):
        for offset, rows, cols, row_stride in ((0, 1, 5000, 5000), (7, 3, 10, 23), ((1 << 33) + 3, 1, 9, 9)):
            t = torch.empty(rows * cols, dtype=dtype)
            one_row = rows == 1
            constexprs = (kind, pf._TL_DTYPES[dtype], dtype == torch.bfloat16, pf.CALLS, one_row)
            pf._DIRECT[(-1, dtype, kind, 1, one_row, pf.CALLS, pf.NUM_WARPS)] = (
                lambda *a: seen.append(a), "function", b"metadata", constexprs)
            pf.fill_one(t, offset, rows, cols, row_stride, kind, key, params)
            got = seen.pop()
            bpr = pf.programs_per_row(offset, rows, cols)
            assert got[:9] == (rows * bpr, 1, 1, 1234, "function", b"metadata", None, None, None), got[:9]
            bound, spec, _ = binder(t, 1, offset, cols, row_stride, bpr, key & 0xFFFFFFFF, key >> 32, *params,
                                    KIND=kind, OUT_DTYPE=pf._TL_DTYPES[dtype], IS_BF16=dtype == torch.bfloat16,
                                    CALLS=pf.CALLS, ONE_ROW=one_row)
            want = list(bound.values())
            assert list(got[9:]) == [t.data_ptr()] + want[1:], (got[9:], want)
            # every program's calls lie inside the grid: the last program still touches the row
            assert (bpr - 1) * pf.CALLS * 4 < cols + offset % 4 <= bpr * pf.CALLS * 4 or rows > 1

# 3. With a launch hook installed (a profiler), Triton's own launch runs, so the hook sees it.
hook = lambda *a: None
triton.knobs.runtime.launch_enter_hook.add(hook)
pf.fill_one(torch.empty(8), 0, 1, 8, 8, 1, key, (0.0, 1.0, 0.9, 0.0, 0.0, 0.0))
triton.knobs.runtime.launch_enter_hook.remove(hook)
assert len(slow) == 1 and not seen
print("direct launch ok")
"""


def test_direct_launch_passes_what_tritons_own_launch_binds():
    # After the first launch of a kernel, fill_one calls the compiled kernel's
    # launcher itself (no binding, specialization or cache key per call). This
    # checks, without a GPU, that the arguments it passes are those Triton's
    # own JITFunction.run would pass for the same call, and that the Triton
    # internals this relies on are the installed Triton's.
    res = _compiled_mode(_DIRECT_LAUNCH)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "direct launch ok" in res.stdout


def test_host_path_benchmark_reaches_the_direct_launch_on_cpu():
    # benchmarks/host_path.py times a drop-in call on the CUDA path with the
    # launch stubbed; it asserts that every call it times ends in the stubbed
    # launcher of a cached compiled kernel (the direct launch), not in Triton's
    # dispatch. A short run keeps that wiring checked without a GPU.
    res = _compiled_mode(["-m", "benchmarks.host_path", "--device", "cpu", "--calls", "20", "--repeat", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "goal <= 8 us per drop-in call" in res.stdout and "| uniform_ |" in res.stdout, res.stdout


@pytest.mark.parametrize("spec", [TruncNormal(0.0, 1.0, 30.0, 31.0), TruncNormal(1e17, 1.0, -2.0, 2.0),
                                  TruncNormal(0.0, 1.0, 2.0, 2.01), TruncNormal(float("inf"), 1.0, -2.0, 2.0)])
def test_the_kernel_hands_windows_it_cannot_hold_to_the_cpu_samplers_on_every_path(spec):
    """A drop-in call's one-launch path (``engines.fill_one``) and a batch's agree, and
    both are the cpu engine's exact samplers (the float32 inverse CDF put every value of
    [30, 31] on 30, whose law has mean 30.033)."""
    from fastinit import engines

    one, batch, cpu = torch.empty(1000), torch.empty(1000), torch.empty(1000)
    with use_engine("triton"):
        engines.fill_one(one, spec, 5)
        fill([Target(batch, spec, 5)])
    with use_engine("cpu"):
        fill([Target(cpu, spec, 5)])
    assert torch.equal(one, cpu) and torch.equal(batch, cpu)
