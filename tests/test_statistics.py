"""Statistical equivalence with torch.nn.init, per function and dtype.

Sizes are not multiples of the cpu engine's chunk and span several chunks.
"""

import math

import pytest
import torch

import fastinit
from fastinit.engines.cpu import CHUNK
from stats_util import check_against, check_rounded, exact_dist, two_sample

N = 3 * CHUNK + 12_345
SHAPE = (1031, N // 1031)  # fan_out x fan_in for the shape rules

CASES = [
    ("uniform_", (-2.0, 3.0), {}, lambda t: exact_dist("uniform", a=-2.0, b=3.0)),
    ("normal_", (0.5, 2.0), {}, lambda t: exact_dist("normal", mean=0.5, std=2.0)),
    ("trunc_normal_", (0.0, 1.0, -2.0, 2.0), {}, lambda t: exact_dist("trunc_normal", mean=0.0, std=1.0, a=-2.0, b=2.0)),
    ("trunc_normal_", (0.0, 0.02, -0.04, 0.04), {}, lambda t: exact_dist("trunc_normal", mean=0.0, std=0.02, a=-0.04, b=0.04)),
    ("trunc_normal_", (1.0, 1.0, 1.5, 3.0), {}, lambda t: exact_dist("trunc_normal", mean=1.0, std=1.0, a=1.5, b=3.0)),
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
    check_rounded(t, dist(t), label=f"{name} {dtype}")


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
    ref = _fill(name, args, kwargs, torch.float32, fastinit, seed=9)
    assert torch.equal(low, ref.to(dtype))


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


def test_far_tail_truncation_stays_inside_and_finite():
    # The interval is 5 to 6 std out: the mirrored inverse CDF keeps resolution.
    with pytest.warns(UserWarning):
        t = fastinit.trunc_normal_(torch.empty(200_000), 0.0, 1.0, 5.0, 6.0)
    assert torch.isfinite(t).all() and t.min() >= 5.0 and t.max() <= 6.0
    check_against(t.numpy(), exact_dist("trunc_normal", mean=0, std=1, a=5, b=6), label="tail")
