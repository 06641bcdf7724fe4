"""Shared statistical checks (fixed seeds: every test is deterministic)."""

import math

import numpy as np
from scipy import stats

P_MIN = 1e-4  # fixed seeds make each test deterministic; this margin keeps them stable


def exact_dist(kind, **p):
    if kind == "uniform":
        return stats.uniform(loc=p["a"], scale=p["b"] - p["a"])
    if kind == "normal":
        return stats.norm(loc=p["mean"], scale=p["std"])
    if kind == "trunc_normal":
        s = p["std"]
        return stats.truncnorm((p["a"] - p["mean"]) / s, (p["b"] - p["mean"]) / s, loc=p["mean"], scale=s)
    raise ValueError(kind)


class WrappedUniform:
    """``U[a, b)`` on a half-precision ``dtype`` as torch's ``uniform_`` makes it: drawn
    in float32, rounded to nearest, and a value rounded to ``dtype(b)`` replaced by
    ``dtype(a)`` (``value == to ? from : value``). Its ``cdf`` before rounding, for
    :func:`check_rounded`: what lies at or above ``t`` (the midpoint between ``dtype(b)``
    and the value below it) is at ``a``."""

    def __init__(self, a, b, dtype):
        import torch

        self.u, self.a = exact_dist("uniform", a=a, b=b), float(torch.tensor(a, dtype=dtype))
        held = torch.tensor([b, -math.inf], dtype=dtype)
        self.t = (float(held[0]) + float(torch.nextafter(held[0], held[1]))) / 2

    def support(self):
        return self.u.support()

    def cdf(self, x):
        return np.where(x >= self.a, self.u.cdf(np.minimum(x, self.t)) + 1.0 - self.u.cdf(self.t), self.u.cdf(x))


def check_against(values, dist, *, label=""):
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    ks = stats.kstest(x, dist.cdf)
    assert ks.pvalue > P_MIN, f"{label}: KS D={ks.statistic:.5f} p={ks.pvalue:.2e} (n={n})"
    mean, var = dist.stats(moments="mv")
    sd = math.sqrt(var)
    assert abs(x.mean() - mean) < 5 * sd / math.sqrt(n), f"{label}: mean {x.mean()} vs {mean}"
    assert abs(x.std() / sd - 1) < 5 * math.sqrt(2.0 / n) + 1e-3, f"{label}: std {x.std()} vs {sd}"


def two_sample(a, b, *, label=""):
    r = stats.ks_2samp(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())
    assert r.pvalue > P_MIN, f"{label}: two-sample KS D={r.statistic:.5f} p={r.pvalue:.2e}"


def check_rounded(values_t, dist, *, label=""):
    """KS against ``dist`` rounded to the tensor's dtype grid (bfloat16, float16).

    The empirical CDF at each grid value ``v`` must match the exact CDF at the
    midpoint between ``v`` and the next representable value (round to nearest).
    """
    import torch

    v, counts = torch.unique(values_t.flatten(), return_counts=True)
    n = values_t.numel()
    nxt = torch.nextafter(v, torch.full_like(v, float("inf")))
    mid = (v.double() + nxt.double()) / 2
    emp = counts.double().cumsum(0) / n
    d = (emp - torch.from_numpy(dist.cdf(mid.numpy()))).abs().max().item()
    assert d < 2.0 / math.sqrt(n), f"{label}: rounded KS D={d:.5f} (n={n})"
