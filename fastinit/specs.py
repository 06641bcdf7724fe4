"""Init specs: small immutable descriptions of what a tensor is filled with.

Every random init in fastinit is first turned into an :class:`InitSpec`, computed
in plain Python from the tensor's shape (fans, gains, bounds) exactly as
``torch.nn.init`` computes them. Engines only ever see specs; Xavier and Kaiming
are shape rules that *produce* a :class:`Uniform` or :class:`Normal` spec (see
:mod:`fastinit.fans`), never separate code paths.

Each spec also knows how to encode itself for the engines that share one value
mapping (``reference`` and ``triton``): :meth:`InitSpec.kernel_params` returns
the spec's kind code and six float32 parameters, precomputed in float64.
"""

from __future__ import annotations

import math
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

# Kind codes shared by the reference engine and the Triton kernels.
KIND_CONSTANT = 0
KIND_UNIFORM = 1
KIND_NORMAL = 2
KIND_TRUNC_NORMAL = 3

N_PARAMS = 6
# Truncated normal windows (TruncNormal.sampler):
FLAT_VAR = 2.0**-53  # variation of the log density across [a, b] below which it is uniform
WIDE_Q = 2.0**-10  # mass outside [a, b] below which the normal is drawn directly
TAIL_Z = 5.0  # a window wholly beyond this many std on one side: the tail sampler
TILT_W = 1.0 / 64  # a window beside the mean narrower than this (in std): the tilted sampler


@functools.lru_cache(maxsize=4096)
def uniform_top(a: float, b: float, dtype: torch.dtype) -> float:
    """The largest value a ``U[a, b)`` fill of a ``dtype`` tensor keeps, as the fill
    computes it (in float32; float64 for a float64 tensor). A larger one is a value
    that ``dtype`` holds as ``b`` (as ``dtype`` holds ``b``) or above: it becomes ``a``
    (as ``dtype`` holds it). That is torch's ``uniform_``: ``from + u (to - from)``
    with the bounds in the type it computes in, rounded to the dtype, and ``value ==
    to ? from : value``. So on a bfloat16 tensor ``uniform_(-1, 1)`` gives -1 the mass
    of a whole step, as torch does (timm's ``trunc_normal_`` then turns exactly those
    into its outliers, ``erfinv(-1)`` clamped), not half of one, with the last value
    below 1 taking one and a half."""
    if not b > a:
        return a
    if dtype == torch.float64:
        return float(np.nextafter(np.float64(b), -np.inf))
    half = dtype in (torch.float16, torch.bfloat16)
    held = torch.tensor([b, -math.inf], dtype=dtype if half else torch.float32, device="cpu")
    below = float(torch.nextafter(held[0], held[1]))  # the largest value kept, in the dtype
    if not half:
        return below
    mid = np.float32((below + float(held[0])) / 2)  # exact: a half value's bits and one more
    if float(torch.tensor(float(mid), dtype=torch.float32, device="cpu").to(dtype)) != below:
        mid = np.nextafter(mid, np.float32(-np.inf))  # (the tie rounds to even: here, up)
    return float(mid)


# How torch's messages name floating dtypes: the C++ type, and the ScalarType.
_C_TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
                 torch.bfloat16: "c10::BFloat16"}
_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                 torch.bfloat16: "BFloat16"}


class InitSpec:
    """Base class of all specs. Subclasses are frozen dataclasses."""

    #: True when an engine can fill it from a key (Uniform, Normal, TruncNormal, Constant).
    fusable = True
    #: True when the fill consumes random numbers.
    random = True

    def kernel_params(self) -> tuple[int, tuple[float, ...]]:
        """``(kind, params)``: what the kernels take (computed once per spec object:
        a drop-in call reuses the spec its checks remembered)."""
        return self._kernel_params

    # Values remembered on a spec object (functools.cached_property writes the instance's
    # __dict__ itself, which a frozen dataclass allows; not fields: equality and hash
    # ignore them; once there, a lookup finds them without a call).
    _kernel_params = functools.cached_property(lambda self: self._params())
    _for_dtype = functools.cached_property(lambda self: {})

    def _params(self) -> tuple[int, tuple[float, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_dtype(self, dtype) -> None:
        """Raise torch's error if this spec cannot fill a tensor of ``dtype``."""

    def torch_op(self) -> tuple[str, tuple] | None:
        """``(op, args)``: the one torch op that draws this spec,
        ``tensor.<op>(*args, generator=...)``; None if there is none."""
        return None


@dataclass(frozen=True)
class Constant(InitSpec):
    r"""Every element equals ``value``: :math:`x_i = v`."""

    value: float
    random = False

    def check_dtype(self, dtype):
        """torch's ``fill_`` check: a finite value beyond ``dtype``'s range overflows."""
        v = self.value
        if v == v and abs(v) != float("inf") and abs(v) > torch.finfo(dtype).max:
            torch.empty(0, dtype=dtype, device="cpu").fill_(v)  # torch's own error (rounding at the edge is torch's)

    def _params(self):
        return KIND_CONSTANT, (float(self.value), 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Uniform(InitSpec):
    r"""Continuous uniform on :math:`[a, b)`: :math:`x = a + (b - a)\,u`, :math:`u \sim U[0, 1)`."""

    a: float = 0.0
    b: float = 1.0
    #: The largest value the fill keeps (see :func:`uniform_top`; a larger one becomes
    #: ``a``, as in torch), set by the engines for the target's dtype; None: float32's.
    top: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.a > self.b:  # NaN and infinite bounds are reported by check_dtype, as torch does
            raise RuntimeError(
                f"uniform_ expects to return a [from, to) range, but found from={self.a:g} > to={self.b:g}"
            )

    def check_dtype(self, dtype):
        """torch's checks of ``uniform_(from=a, to=b)`` on a ``dtype`` tensor that
        ``__post_init__`` (``a <= b``) cannot make: both bounds finite in ``dtype``,
        and ``b - a`` representable."""
        fi = torch.finfo(dtype)
        for v, what in ((self.a, "from"), (self.b, "to")):
            if not fi.min <= v <= fi.max:
                raise RuntimeError(f"{what} is out of bounds for {_C_TYPE_NAMES.get(dtype, dtype)}")
        if self.b - self.a > fi.max:
            raise RuntimeError(
                f"uniform_ expects to-from <= std::numeric_limits<{_SCALAR_NAMES.get(dtype, dtype)}>::max(), "
                f"but found to={self.b:g} and from={self.a:g} which result in to-from to exceed the limit"
            )

    def for_dtype(self, dtype: torch.dtype) -> "Uniform":
        """This spec for a ``dtype`` tensor: values stay below ``b`` once rounded to it
        (remembered on this spec object, as :meth:`kernel_params`: a drop-in call reuses
        the spec its checks remembered)."""
        memo = self._for_dtype
        spec = memo.get(dtype)
        if spec is None:
            spec = memo[dtype] = _uniform_for_dtype(float(self.a).hex(), float(self.b).hex(), dtype)  # (by bits:
            # -0.0 is not 0.0)
        return spec

    def _params(self):
        hi = self.top if self.top is not None else uniform_top(self.a, self.b, torch.float32)
        if float(np.float32(hi)) > hi:  # (the kernels compare in float32: a float64 top, rounded down)
            hi = float(np.nextafter(np.float32(hi), np.float32(-np.inf)))
        # the span of the bounds as float32 holds them, as torch's uniform_ computes it
        return KIND_UNIFORM, (float(self.a), float(np.float32(self.b) - np.float32(self.a)), hi, 0.0, 0.0, 0.0)

    def torch_op(self):
        return "uniform_", (self.a, self.b)


@functools.lru_cache(maxsize=4096)
def _uniform_for_dtype(a_hex: str, b_hex: str, dtype: torch.dtype) -> Uniform:
    a, b = float.fromhex(a_hex), float.fromhex(b_hex)
    return Uniform(a, b, uniform_top(a, b, dtype))


@dataclass(frozen=True)
class Normal(InitSpec):
    r"""Gaussian :math:`\mathcal{N}(\mu, \sigma^2)`: :math:`x = \mu + \sigma z`, :math:`z \sim \mathcal{N}(0, 1)`."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if not self.std >= 0.0:
            raise RuntimeError(f"normal expects std >= 0.0, but found std {self.std:g}")

    def _params(self):
        return KIND_NORMAL, (float(self.mean), float(self.std), 0.0, 0.0, 0.0, 0.0)

    def torch_op(self):
        return "normal_", (self.mean, self.std)


@dataclass(frozen=True)
class TruncNormal(InitSpec):
    r"""Gaussian :math:`\mathcal{N}(\mu, \sigma^2)` truncated to :math:`[a, b]`.

    Sampled by the inverse CDF, with no rejection loop:
    :math:`x = \mu + \sigma\sqrt{2}\,\operatorname{erfinv}(t - 1)`,
    :math:`t = 2p`, :math:`p \sim U(\Phi(\alpha), \Phi(\beta))`,
    :math:`\alpha = (a-\mu)/\sigma`, :math:`\beta = (b-\mu)/\sigma`, then
    clamped to :math:`[a, b]`. The engines evaluate erfinv from :math:`t` itself
    (never from :math:`t - 1`, which loses all precision in the lower tail), and
    an interval in the upper tail is sampled as its mirror image and negated, so
    float32 keeps its resolution where the mass is, even 5 or 6 std out.
    """

    mean: float = 0.0
    std: float = 1.0
    a: float = -2.0
    b: float = 2.0

    def __post_init__(self):
        if not self.std >= 0.0:
            raise RuntimeError(f"trunc_normal_ expects std >= 0.0, but found std {self.std}")
        if not self.a <= self.b:
            raise RuntimeError(
                f"trunc_normal_ expects a <= b, but found a={self.a} > b={self.b}"
            )

    def z_window(self) -> tuple[float, float]:
        """``(alpha, beta)``: the bounds in standard deviations from the mean."""
        if self.std == math.inf:
            return 0.0, 0.0
        return (self.a - self.mean) / self.std, (self.b - self.mean) / self.std

    def z_width(self) -> float:
        """``beta - alpha``, computed as ``(b - a) / std``: exact where the difference of
        the two rounded bounds is not (a window far from a huge mean: ``mean = 1e17``,
        ``std = 1e16``, ``[-2, 2]`` has alpha == beta == -10 in float64)."""
        return 0.0 if self.std == math.inf else (self.b - self.a) / self.std

    def is_flat(self) -> bool:
        """Whether the log density varies across [a, b] by at most 2^-53 (float64's
        resolution): then it is exactly U(a, b). So it is where std is infinite or
        ``>> b - a``, and where a narrow window lies far from a huge mean and std (``mean
        = 1e17, std = 1e17, [-2, 2]``). The variation is ``max(alpha^2, beta^2) / 2``
        for a window holding the mean, ``|beta^2 - alpha^2| / 2 = width |alpha + beta| /
        2`` for one beside it (from the exact width, :meth:`z_width`)."""
        if not self.std > 0:
            return False
        if self.std == math.inf or self.a == self.b:  # (a == b: U(a, a); its z may be infinite)
            return True
        alpha, beta = self.z_window()
        if alpha <= 0.0 <= beta:
            var = max(alpha * alpha, beta * beta) / 2.0
        else:
            var = self.z_width() * abs((self.a + self.b - 2.0 * self.mean) / self.std) / 2.0
        return var <= FLAT_VAR

    def sampler(self) -> str:
        """Which exact sampler the window takes (the cpu engine's; the GPU kernel's
        inverse CDF in float32 hands ``"tail"``, ``"tilt"`` and infinite means to it):

        * ``"limit"``: std = 0, or an infinite mean (finite std): the limit, the mean
          clamped to [a, b] (the near bound, for an infinite mean);
        * ``"uniform"``: flat (:meth:`is_flat`);
        * ``"normal"``: [a, b] holds all but < 2^-10 of the normal's mass;
        * ``"tail"``: the window lies wholly beyond 5 std on one side;
        * ``"tilt"``: a window beside the mean narrower than 1/64 std (its density
          is then nearly exponential across it, and ``mean + std z`` would lose the
          window to cancellation where the mean is huge);
        * ``"icdf"``: the inverse CDF.

        (Remembered on the spec object: every chunk of a fill asks.)
        """
        return self._sampler

    @functools.cached_property
    def _sampler(self) -> str:
        if self.std == 0.0:
            return "limit"
        if self.is_flat():
            return "uniform"
        if math.isinf(self.mean):
            return "limit"
        if self.outside_mass() < WIDE_Q:
            return "normal"
        alpha, beta = self.z_window()
        if alpha >= TAIL_Z or beta <= -TAIL_Z:
            return "tail"
        if (alpha > 0.0 or beta < 0.0) and self.z_width() < TILT_W:
            return "tilt"
        return "icdf"

    def offset_window(self) -> tuple[float, float, float, float]:
        """``(lo, width, near, sign)`` of a window beside the mean: in std from the
        mean, it is ``[lo, lo + width]`` (mirrored when below the mean), and a value
        ``t`` std past ``lo`` is ``near + sign std t`` (``near``: the bound nearer the
        mean). Written from the near bound, the value keeps its precision however far
        the mean is (``mean + std z`` cancels)."""
        alpha, beta = self.z_window()
        if alpha >= 0.0:
            return alpha, self.z_width(), self.a, 1.0
        return -beta, self.z_width(), self.b, -1.0

    def outside_mass(self) -> float:
        """The normal's mass outside [a, b]: Phi(alpha) + 1 - Phi(beta)."""
        alpha, beta = self.z_window()
        return 0.5 * (math.erfc(-alpha / math.sqrt(2.0)) + math.erfc(beta / math.sqrt(2.0)))

    def cdf_window(self) -> tuple[float, float, float]:
        """``(lo, span, sign)``: sample ``t = lo + span * u`` in (0, 2) and
        ``x = mean + sign * std * sqrt(2) * erfinv(t - 1)``."""
        if self.std == 0.0:
            return 1.0, 0.0, 1.0
        alpha, beta = self.z_window()
        sign = 1.0
        if alpha + beta > 0:  # upper tail: sample the mirror image
            alpha, beta, sign = -beta, -alpha, -1.0
        # 2 * Phi(x) = erfc(-x / sqrt 2): precise deep into the lower tail.
        lo = math.erfc(-alpha / math.sqrt(2.0))
        hi = math.erfc(-beta / math.sqrt(2.0))
        return lo, hi - lo, sign

    def _params(self):
        if self.is_flat():  # std >> b - a (or infinite): uniform on [a, b] to float64 precision
            return Uniform(self.a, self.b).kernel_params()
        lo, span, sign = self.cdf_window()
        scale = sign * self.std * math.sqrt(2.0)
        # Clamp bounds past the mean when std == 0 so the result is the mean, clipped.
        return KIND_TRUNC_NORMAL, (lo, span, scale, float(self.mean), float(self.a), float(self.b))


def zeros() -> Constant:
    return Constant(0.0)


def ones() -> Constant:
    return Constant(1.0)
