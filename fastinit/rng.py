"""Philox4x32-10 and the word→value maps, in plain torch.

This module is the executable statement of the RNG contract (see the README):
element ``i`` (row-major flat index of the logical, global tensor) takes word
``i % 4`` of the Philox call with counter ``(i // 4 low, i // 4 high, 0, 0)`` and
key ``(key low, key high)``. The Triton kernels compute the same functions; the
``reference`` engine is built on this file and is their oracle.

All 32-bit words are held in int64 tensors so every operation is exact on any
device.
"""

from __future__ import annotations

import torch

from .specs import KIND_CONSTANT, KIND_NORMAL, KIND_TRUNC_NORMAL, KIND_UNIFORM

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
M32 = 0xFFFFFFFF

TWO_PI_F32 = 6.2831854820251465  # float32(2 * pi)
INV_2_24 = 1.0 / (1 << 24)
# Limits of t = 1 + v for erfinv(v): (0, 2), kept finite.
T_MIN = 2.0**-126
T_MAX = 2.0 - 2.0**-23


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * m`` for 32-bit ``a`` and ``m``, without int64 overflow."""
    ml, mh = m & 0xFFFF, m >> 16
    t1 = a * ml  # < 2**48
    t2 = a * mh  # < 2**48
    lo = (((t2 & 0xFFFF) << 16) + t1) & M32
    hi = (t2 + (t1 >> 16)) >> 16
    return hi & M32, lo


def philox4x32(counters: torch.Tensor, keys: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Philox4x32 (Salmon et al., SC'11; Random123) in pure torch.

    Args:
        counters: int64 tensor ``[..., 4]`` of 32-bit words.
        keys: int64 tensor ``[..., 2]`` of 32-bit words (broadcastable to counters).
        rounds: number of rounds (10 is the standard Philox4x32-10).

    Returns:
        int64 tensor ``[..., 4]`` of 32-bit output words.

    Example:
        >>> philox4x32(torch.zeros(4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
        tensor([1713891541, 3781805453, 3160845388, 2600524760])  # 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    """
    c0, c1, c2, c3 = (counters[..., j] & M32 for j in range(4))
    k0 = keys[..., 0] & M32
    k1 = keys[..., 1] & M32
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_words(index: torch.Tensor, key: int) -> torch.Tensor:
    """The four Philox words of the call that element ``index`` (int64 tensor) belongs to."""
    q = index >> 2
    counters = torch.stack([q & M32, (q >> 32) & M32, torch.zeros_like(q), torch.zeros_like(q)], -1)
    keys = torch.tensor([key & M32, (key >> 32) & M32], dtype=torch.int64, device=index.device)
    return philox4x32(counters, keys)


# Acklam's rational approximation of the normal quantile's lower tail, used where
# Giles' float32 polynomials stop (w >= 16, i.e. t < 4e-8): relative error < 1e-6.
ACKLAM_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
            -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
ACKLAM_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
            3.754408661907416e+00)
INV_SQRT2 = 0.7071067811865476


def erfinv_f32(t: torch.Tensor) -> torch.Tensor:
    """:math:`\\operatorname{erfinv}(t - 1)` in single precision, from ``t`` in (0, 2).

    M. Giles, "Approximating the erfinv function" (GPU Computing Gems, 2010):
    two polynomial branches in :math:`w = -\\log((1-v)(1+v)) = -\\log(t(2-t))`;
    for :math:`w \\ge 16` (deep lower tail) P. J. Acklam's rational tail of the
    normal quantile at :math:`p = t/2`, divided by :math:`\\sqrt2`. Taking ``t``
    rather than ``v = t - 1`` keeps full relative precision in the lower tail.
    Same operations as the Triton kernels. Relative error below 2e-6 for all
    ``t`` down to 1e-38.
    """
    v = t - 1.0
    w = -torch.log(t * (2.0 - t))
    ws = w - 2.5
    p = torch.full_like(v, 2.81022636e-08)
    for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
              -0.00125372503, -0.00417768164, 0.246640727, 1.50140941):
        p = c + p * ws
    wl = torch.sqrt(w) - 3.0
    q = torch.full_like(v, -0.000200214257)
    for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
              -0.0076224613, 0.00943887047, 1.00167406, 2.83297682):
        q = c + q * wl
    r = torch.sqrt(-2.0 * torch.log(t * 0.5))
    num = torch.full_like(v, ACKLAM_C[0])
    for c in ACKLAM_C[1:]:
        num = num * r + c
    den = torch.full_like(v, ACKLAM_D[0])
    for c in ACKLAM_D[1:]:
        den = den * r + c
    tail = num / (den * r + 1.0) * INV_SQRT2
    return torch.where(w < 16.0, torch.where(w < 5.0, p, q) * v, tail)


def words_to_values(words: torch.Tensor, lane: torch.Tensor, kind: int, params) -> torch.Tensor:
    """Map Philox words to float32 values of one spec.

    ``words`` is ``[n, 4]`` (the call of each element), ``lane`` is ``index % 4``.

    * uniform: :math:`u = \\lfloor w / 2^8 \\rfloor 2^{-24} \\in [0,1)`,
      :math:`x = a + (b-a)u`, and :math:`a` where :math:`x` is above the spec's top
      (a value the target dtype would hold as :math:`b`: torch's ``uniform_`` rule);
    * normal (Box–Muller on the word pair of the lane,
      :math:`u_1 = (\\lfloor w_0/2^8 \\rfloor + 1)2^{-24} \\in (0, 1]`):
      :math:`x = \\mu + \\sigma\\sqrt{-2\\ln u_1}\\,(\\cos|\\sin)(2\\pi u_2)`;
    * truncated normal (inverse CDF):
      :math:`x = \\operatorname{clamp}(\\mu + s\\sqrt2\\sigma\\operatorname{erfinv}(t - 1), a, b)`,
      :math:`t = \\ell + w\\,(\\lfloor w/2^8 \\rfloor + \\tfrac12)2^{-24}`;
    * constant: :math:`x = v`.
    """
    f32 = torch.float32
    p = [torch.tensor(x, dtype=f32, device=words.device) for x in params]
    if kind == KIND_CONSTANT:
        return p[0].expand(lane.shape).clone()
    if kind == KIND_NORMAL:
        base = lane & 2
        w0 = torch.gather(words, 1, base[:, None])[:, 0]
        w1 = torch.gather(words, 1, (base + 1)[:, None])[:, 0]
        u1 = ((w0 >> 8) + 1).to(f32) * INV_2_24
        u2 = (w1 >> 8).to(f32) * INV_2_24
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = u2 * TWO_PI_F32
        z = torch.where((lane & 1) == 0, r * torch.cos(theta), r * torch.sin(theta))
        return p[0] + p[1] * z
    w = torch.gather(words, 1, lane[:, None])[:, 0]
    if kind == KIND_UNIFORM:
        u = (w >> 8).to(f32) * INV_2_24
        x = p[0] + p[1] * u
        return torch.where(x > p[2], p[0], x)  # (above the top: a, as torch's uniform_)
    if kind == KIND_TRUNC_NORMAL:
        u = ((w >> 8).to(f32) + 0.5) * INV_2_24
        t = torch.clamp(p[0] + p[1] * u, T_MIN, T_MAX)
        x = p[3] + p[2] * erfinv_f32(t)
        return torch.minimum(torch.maximum(x, p[4]), p[5])
    raise ValueError(f"unknown spec kind {kind}")
