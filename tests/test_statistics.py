"""Statistical equivalence with torch.nn.init, per function and dtype.

Sizes are not multiples of the cpu engine's chunk and span several chunks.
"""

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch

import fastinit
from fastinit.engines.cpu import CHUNK
from scipy import stats

from stats_util import WrappedUniform, check_against, check_rounded, exact_dist, two_sample

N = 3 * CHUNK + 12_345
SHAPE = (1031, N // 1031)  # fan_out x fan_in for the shape rules

CASES = [
    ("uniform_", (-2.0, 3.0), {}, lambda t: exact_dist("uniform", a=-2.0, b=3.0)),
    ("normal_", (0.5, 2.0), {}, lambda t: exact_dist("normal", mean=0.5, std=2.0)),
    ("trunc_normal_", (0.0, 1.0, -2.0, 2.0), {}, lambda t: exact_dist("trunc_normal", mean=0.0, std=1.0, a=-2.0, b=2.0)),
    ("trunc_normal_", (0.0, 0.02, -0.04, 0.04), {}, lambda t: exact_dist("trunc_normal", mean=0.0, std=0.02, a=-0.04, b=0.04)),
    ("trunc_normal_", (1.0, 1.0, 1.5, 3.0), {}, lambda t: exact_dist("trunc_normal", mean=1.0, std=1.0, a=1.5, b=3.0)),
    # the common call: std=.02 with the default bounds +-2 (+-100 std), and +-3.5 std
    # (the normal drawn directly, the rare values outside replaced)
    ("trunc_normal_", (0.0, 0.02), {}, lambda t: exact_dist("trunc_normal", mean=0.0, std=0.02, a=-2.0, b=2.0)),
    ("trunc_normal_", (0.5, 1.0, -3.0, 4.0), {}, lambda t: exact_dist("trunc_normal", mean=0.5, std=1.0, a=-3.0, b=4.0)),
    ("xavier_uniform_", (), {"gain": 2.0}, lambda t: _uni(2.0 * math.sqrt(6.0 / sum(t.shape)))),
    ("xavier_normal_", (), {}, lambda t: exact_dist("normal", mean=0, std=math.sqrt(2.0 / sum(t.shape)))),
    ("kaiming_uniform_", (), {"a": math.sqrt(5)}, lambda t: _uni(1 / math.sqrt(t.shape[1]))),
    ("kaiming_normal_", (), {"mode": "fan_out", "nonlinearity": "relu"},
     lambda t: exact_dist("normal", mean=0, std=math.sqrt(2.0 / t.shape[0]))),
]


def _uni(bound):
    return exact_dist("uniform", a=-bound, b=bound)


def _fill(name, args, kwargs, dtype, lib, seed):
    torch.manual_seed(seed)
    return getattr(lib, name)(torch.empty(SHAPE, dtype=dtype), *args, **kwargs)


@pytest.mark.parametrize("name,args,kwargs,dist", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("engine", ["cpu", "reference"])
def test_exact_distribution_and_bounds(name, args, kwargs, dist, dtype, engine):
    with fastinit.use_engine(engine):  # the reference engine is what the GPU kernels compute
        t = _fill(name, args, kwargs, dtype, fastinit, seed=11)
    d = dist(t)
    check_against(t.numpy(), d, label=f"{name} {dtype}")
    lo, hi = d.support()
    assert t.min().item() >= lo and t.max().item() <= hi
    if "uniform" in name:
        assert t.max().item() < hi  # [a, b)


@pytest.mark.parametrize("name,args,kwargs,dist", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_exact_distribution(name, args, kwargs, dist, dtype):
    t = _fill(name, args, kwargs, dtype, fastinit, seed=13)
    d = dist(t)
    if "uniform" in name:  # (what rounds to b is a, as torch's uniform_ makes it)
        d = WrappedUniform(*d.support(), dtype)
    check_rounded(t, d, label=f"{name} {dtype}")


# torch's own bfloat16/float16 fills are not an oracle: its rejection-based
# trunc_normal_ piles mass on the lower bound in bfloat16 (it draws candidates
# with a truncating uniform), so the two-sample comparison runs in float32.
@pytest.mark.parametrize("name,args,kwargs,dist", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_sample_against_torch(name, args, kwargs, dist, dtype):
    ours = _fill(name, args, kwargs, dtype, fastinit, seed=5).float()
    theirs = _fill(name, args, kwargs, dtype, torch.nn.init, seed=5).float()
    two_sample(ours.numpy(), theirs.numpy(), label=f"{name} {dtype}")
    lo, hi = dist(ours).support()
    # Bounds hold after rounding to the dtype (a bound itself may round outward).
    lo_t = torch.tensor(lo, dtype=dtype).float() if math.isfinite(lo) else -math.inf
    hi_t = torch.tensor(hi, dtype=dtype).float() if math.isfinite(hi) else math.inf
    assert ours.min() >= lo_t and ours.max() <= hi_t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,args,kwargs,dist", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_low_precision_is_the_float32_fill_rounded_once(name, args, kwargs, dist, dtype):
    low = _fill(name, args, kwargs, dtype, fastinit, seed=9)
    ref = _fill(name, args, kwargs, torch.float32, fastinit, seed=9).to(dtype)
    if "uniform" in name:  # except that what rounds to b (as the dtype holds it) is a, as torch's uniform_
        lo, hi = dist(ref).support()
        ref = torch.where(ref >= torch.tensor(hi, dtype=dtype), torch.tensor(lo, dtype=dtype), ref)
    assert torch.equal(low, ref)


def test_zero_std_and_degenerate_ranges():
    t = fastinit.normal_(torch.empty(1000), 3.0, 0.0)
    assert (t == 3.0).all()
    t = fastinit.uniform_(torch.empty(1000), 2.0, 2.0)
    assert (t == 2.0).all()
    # torch divides by std in trunc_normal_ (ZeroDivisionError); the drop-in does the same
    with pytest.raises(ZeroDivisionError):
        fastinit.trunc_normal_(torch.empty(1000), 0.5, 0.0, -1.0, 1.0)
    with pytest.raises(ZeroDivisionError):
        torch.nn.init.trunc_normal_(torch.empty(1000), 0.5, 0.0, -1.0, 1.0)
    # ... a numpy scalar or 0-d tensor std of 0 divides without raising: torch fills with the mean
    for std in (np.float64(0.0), torch.tensor(0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (numpy's divide-by-zero warning, as torch's call gives)
            ours = fastinit.trunc_normal_(torch.empty(1000), 0.5, std, -1.0, 1.0)
            theirs = torch.nn.init.trunc_normal_(torch.empty(1000), 0.5, std, -1.0, 1.0)
        assert torch.equal(ours, theirs) and (ours == 0.5).all()


def test_far_tail_truncation_stays_inside_and_finite():
    # The interval is 5 to 6 std out: the mirrored inverse CDF keeps resolution.
    with pytest.warns(UserWarning):
        t = fastinit.trunc_normal_(torch.empty(200_000), 0.0, 1.0, 5.0, 6.0)
    assert torch.isfinite(t).all() and t.min() >= 5.0 and t.max() <= 6.0
    check_against(t.numpy(), exact_dist("trunc_normal", mean=0, std=1, a=5, b=6), label="tail")


# ------------------------------------------------------------ bounds after rounding, extremes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a,b", [(-1.0, 1.0), (0.0, 1.0), (2.0, 3.0), (-0.1, 0.1)])
def test_uniform_keeps_a_b_after_rounding_to_the_dtype(dtype, a, b):
    """b is never returned (torch never returns it), though float32 values just below b
    round up to it in bfloat16 (~1/1000 of them on [-1, 1]) and float16: those become a,
    as torch's ``value == to ? from : value`` makes them (so a has the mass of a whole
    step, as in torch, and the last value below b no more than its own)."""
    t = torch.empty(2_000_000, dtype=dtype)
    torch.manual_seed(0)
    fastinit.uniform_(t, a, b)
    assert t.min() >= torch.tensor(a, dtype=dtype) and t.max().item() < b
    if dtype in (torch.float16, torch.bfloat16):
        # round to nearest, except that what would round to b (as the dtype holds it) is a
        check_rounded(t, WrappedUniform(a, b, dtype), label=f"uniform {dtype}")
        theirs = torch.empty(2_000_000, dtype=dtype).uniform_(a, b)
        held = torch.tensor([b, -math.inf], dtype=dtype)
        for v in (torch.tensor(a, dtype=dtype), torch.nextafter(held[0], held[1])):  # the ends' masses are
            # torch's (within 6 sigma)
            p, q = (t == v).double().mean().item(), (theirs == v).double().mean().item()
            assert abs(p - q) < 6 * math.sqrt(2 * max(p, q) / t.numel()) + 1e-6, (v.item(), p, q)


def test_uniform_bounds_that_round_together_give_the_rounded_value_as_torch():
    for a, b in [(1 - 1e-10, 1.0), (0.5, 0.5 + 1e-12)]:
        ours = fastinit.uniform_(torch.empty(1000), a, b)
        theirs = torch.nn.init.uniform_(torch.empty(1000), a, b)
        assert torch.equal(ours, theirs), (a, b)


def test_trunc_normal_with_std_far_above_the_window_is_not_quantized():
    t = torch.empty(100_000)
    torch.manual_seed(0)
    fastinit.trunc_normal_(t, 0.0, 1e6, -2.0, 2.0)
    assert t.unique().numel() > 99_000  # 24-bit uniform draws: ~99.7k distinct, as torch's
    exact = exact_dist("trunc_normal", mean=0.0, std=1e6, a=-2.0, b=2.0)
    assert stats.kstest(t.double().numpy(), exact.cdf).pvalue > 1e-4
    # (scipy's moments of so narrow a truncation are off; it is U(-2, 2) to 1e-12)
    check_against(t.numpy(), exact_dist("uniform", a=-2.0, b=2.0), label="std=1e6")


@pytest.mark.parametrize("std", [math.inf, 1e300, 1e30])
def test_trunc_normal_with_huge_std_is_uniform_and_finite(std):
    t = torch.empty(100_000)
    torch.manual_seed(1)
    fastinit.trunc_normal_(t, 0.0, std, -2.0, 2.0)
    assert torch.isfinite(t).all() and t.min() >= -2.0 and t.max() <= 2.0
    check_against(t.numpy(), exact_dist("uniform", a=-2.0, b=2.0), label=f"std={std}")


@pytest.mark.parametrize("lo", [5.5, 8.0, 14.0, 30.0, 40.0])
@pytest.mark.parametrize("side", [1, -1])
def test_trunc_normal_deep_in_a_tail_against_the_exact_cdf(lo, side):
    """[a, a + 1] with a = 5.5 ... 40 std: Phi(-40) underflows even in float64, yet the
    exact truncated normal (its mean - a ~ 1/a) comes out, on either side."""
    a, b = (lo, lo + 1.0) if side > 0 else (-lo - 1.0, -lo)
    t = torch.empty(200_000, dtype=torch.float64)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="more than 2 std"):
        fastinit.trunc_normal_(t, 0.0, 1.0, a, b)
    assert torch.isfinite(t).all() and t.min() >= a and t.max() <= b
    check_against(t.numpy(), exact_dist("trunc_normal", mean=0.0, std=1.0, a=a, b=b), label=f"[{a}, {b}]")


def _small_fills(name, args, kwargs, dtype, monkeypatch, count=64, shape=(64, 64)):
    """``count`` small tensors (4096 elements: drawn from torch's default generator
    without a key) filled by one function, their values together."""
    import fastinit.init as dropin

    def no_key(*a, **k):
        raise AssertionError("a small CPU tensor's fill drew a key")

    monkeypatch.setattr(dropin, "draw_key", no_key)
    torch.manual_seed(21)
    ts = [getattr(fastinit, name)(torch.empty(shape, dtype=dtype), *args, **kwargs) for _ in range(count)]
    return ts[0], torch.cat([t.flatten() for t in ts])


@pytest.mark.parametrize("name,args,kwargs,dist", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_tensors_from_torchs_generator_have_the_exact_distribution(name, args, kwargs, dist, dtype,
                                                                           monkeypatch):
    """Small CPU tensors draw from torch's default generator without a key (torch's own
    uniform_/normal_; the exact truncated-normal samplers through torch's ops): the
    same distributions and bounds as keyed fills."""
    first, x = _small_fills(name, args, kwargs, dtype, monkeypatch)
    d = dist(first)
    check_against(x.numpy(), d, label=f"small {name} {dtype}")
    lo, hi = d.support()
    assert x.min().item() >= lo and x.max().item() <= hi
    if "uniform" in name:
        assert x.max().item() < hi


@pytest.mark.parametrize("name,args,kwargs,dist", [c for c in CASES if c[0] == "trunc_normal_"],
                         ids=[f"trunc_normal_{i}" for i, c in enumerate(CASES) if c[0] == "trunc_normal_"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_low_precision_truncated_normals_are_rounded_once(name, args, kwargs, dist, dtype, monkeypatch):
    first, x = _small_fills(name, args, kwargs, dtype, monkeypatch)
    check_rounded(x, dist(first), label=f"small {name} {dtype}")


@pytest.mark.parametrize("std,a,b", [(1.0, 5.0, 6.0), (1.0, -50.0, -4.0), (1e6, -2.0, 2.0)])
def test_small_truncated_normals_in_tails_and_flat_windows(std, a, b, monkeypatch):
    """The tail sampler, the float64 far-tail inverse CDF and the flat window (exactly
    uniform), each drawing from torch's default generator on small tensors."""
    first, x = _small_fills("trunc_normal_", (0.0, std, a, b), {}, torch.float32, monkeypatch, count=16)
    assert x.min().item() >= a and x.max().item() <= b and torch.isfinite(x).all()
    d = exact_dist("uniform", a=a, b=b) if std > 1e3 else exact_dist("trunc_normal", mean=0.0, std=std, a=a, b=b)
    check_against(x.numpy(), d, label=f"[{a}, {b}] std {std}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mean,std,a,b,value", [
    (1e17, 1.0, -2.0, 2.0, 2.0), (1e20, 1.0, 1.0, 3.0, 3.0), (-1e20, 1.0, -3.0, -1.0, -3.0),
    (math.inf, 1.0, -2.0, 2.0, 2.0), (-math.inf, 1.0, -2.0, 2.0, -2.0),
])
def test_trunc_normal_beside_a_huge_or_infinite_mean_is_its_near_bound(mean, std, a, b, value, dtype):
    """A window 1e17 std from the mean holds all its mass within 1e-17 of the near bound
    (an infinite mean: the limit, the bound itself); written as ``mean + std z`` the
    value cancelled to 0 or landed on the far bound."""
    t = torch.empty(50_000, dtype=dtype)
    with pytest.warns(UserWarning, match="more than 2 std"):
        fastinit.trunc_normal_(t, mean, std, a, b, generator=torch.Generator().manual_seed(3))
    # (the law's spread there is 1e-17: a draw in 1e5 is one float64 step off the bound)
    assert (t.double() - value).abs().max() <= 1e-12 and (t == value).double().mean() > 0.999


@pytest.mark.parametrize("mean,std,a,b", [(1e17, 1e16, -2.0, 2.0), (1e17, 5e16, -2.0, 2.0), (1e17, 1e17, -2.0, 2.0),
                                          (1e6, 1e5, 5.0, 5.001)])
def test_trunc_normal_on_a_narrow_window_far_from_a_huge_mean_is_uniform(mean, std, a, b):
    """There the density varies by < 1e-7 across [a, b] (the tail, tilted or flat
    sampler, each from the near bound); it came out as one constant."""
    t = torch.empty(100_000, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's "more than 2 std from [a, b]", where it is)
        fastinit.trunc_normal_(t, mean, std, a, b, generator=torch.Generator().manual_seed(4))
    assert t.min() >= a and t.max() <= b
    check_against(t.numpy(), exact_dist("uniform", a=a, b=b), label=f"mean {mean} std {std}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("a,b", [(2.0, 2.01), (-3.012, -3.0), (0.5, 0.51), (4.0, 4.015)])
def test_trunc_normal_on_a_narrow_window_beside_the_mean_against_the_exact_cdf(a, b, dtype):
    """Windows narrower than 1/64 std beside the mean take the tilted sampler (an
    exponential proposal across the window, accepted with exp(-t^2/2))."""
    from fastinit.specs import TruncNormal

    assert TruncNormal(0.0, 1.0, a, b).sampler() == "tilt"
    t = torch.empty(200_000, dtype=dtype)
    ctx = pytest.warns(UserWarning, match="more than 2 std") if min(abs(a), abs(b)) > 2 else contextlib.nullcontext()
    with ctx:
        fastinit.trunc_normal_(t, 0.0, 1.0, a, b, generator=torch.Generator().manual_seed(5))
    assert t.min() >= a and t.max() <= b
    if dtype == torch.float64:
        check_against(t.numpy(), exact_dist("trunc_normal", mean=0.0, std=1.0, a=a, b=b), label=f"[{a}, {b}]")
    else:  # float32 holds a 0.01 window in ~1e5 steps: the mean and spread of the law
        d = exact_dist("trunc_normal", mean=0.0, std=1.0, a=a, b=b)
        x = t.double().numpy()
        assert abs(x.mean() - d.mean()) < 5 * d.std() / math.sqrt(x.size)


@pytest.mark.parametrize("mean,std,a,b", [(0.0, 1.0, 6.0, 7.0), (1e17, 1.0, -2.0, 2.0), (0.0, 1.0, 2.0, 2.01),
                                          (math.inf, 1.0, -2.0, 2.0)])
def test_the_gpu_engines_hand_tails_and_narrow_windows_to_the_cpu_samplers(mean, std, a, b):
    """The triton kernel (and the reference engine, its oracle) sample a truncated
    normal by the float32 inverse CDF; windows it cannot hold (beyond 5 std, narrow
    beside the mean, an infinite mean) are drawn by the cpu engine, with the same key."""
    from fastinit import engines
    from fastinit.specs import TruncNormal

    spec = TruncNormal(mean, std, a, b)
    ref, cpu = torch.empty(3000), torch.empty(3000)
    with fastinit.use_engine("reference"):
        engines.fill([engines.Target(ref, spec, 99)])
    with fastinit.use_engine("cpu"):
        engines.fill([engines.Target(cpu, spec, 99)])
    assert torch.equal(ref, cpu) and ref.min() >= a and ref.max() <= b
    one = torch.empty(3000)  # a drop-in call's own path (one launch with scalar arguments) too
    with fastinit.use_engine("reference"):
        engines.fill_one(one, spec, 99)
    assert torch.equal(one, cpu)


@pytest.mark.parametrize("mean,std,a,b", [(0.0, 1e-308, 5.0, 5.0), (0.0, 5e-324, 1.0, 1.0),
                                          (-1e308, 1.0, 1e308, 1e308), (0.0, 1e-308, 5.0, 6.0)])
def test_trunc_normal_where_the_window_in_std_overflows(mean, std, a, b):
    """alpha = (a - mean) / std is infinite: a == b is U(a, a) (its width times an
    infinite slope made the tail sampler's acceptance NaN, which looped forever), a
    window infinitely many std out is its near bound."""
    x = torch.empty(64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastinit.trunc_normal_(x, mean, std, a, b, generator=torch.Generator().manual_seed(6))
    assert torch.equal(x, torch.full_like(x, a))
