r"""Drop-in replacements for every public function of ``torch.nn.init``.

Same names, parameters, defaults, return values and errors as torch 2.13, with
``import fastinit as init`` instead of ``import torch.nn.init as init``. Each
random init is described by an :class:`~fastinit.specs.InitSpec` computed from
the tensor's shape exactly as torch computes it, keyed by a 64-bit key drawn from
``generator`` (or torch's default CPU generator, so ``torch.manual_seed`` governs
it), and filled by the engine of the tensor's device.
"""

from __future__ import annotations

import math
import warnings

import torch

from . import _sink, engines
from .distributed import fill_dtensor, is_dtensor
from .fans import (
    calculate_correct_fan,
    calculate_fan_in_and_fan_out,
    calculate_gain,
    variance_scaling,
)
from .seeding import draw_key, splitmix64
from .specs import Constant, InitSpec, Normal, TruncNormal, Uniform

_TORCH_TYPE_NAMES = {
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
    torch.uint8: "Byte", torch.bool: "Bool", torch.uint16: "UInt16", torch.uint32: "UInt32",
    torch.uint64: "UInt64",
}


def _is_engine_dtype(dtype: torch.dtype) -> bool:
    return dtype in engines.FLOAT_DTYPES


def _check_random_dtype(tensor: torch.Tensor, kernel: str) -> None:
    """Integer and bool tensors cannot hold random floats: torch raises NotImplementedError."""
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        name = _TORCH_TYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        raise NotImplementedError(f'"{kernel}" not implemented for \'{name}\'')


def _kernel_name(spec: InitSpec, tensor: torch.Tensor) -> str:
    dev = "cpu" if tensor.device.type == "cpu" else tensor.device.type
    return "check_uniform_bounds" if isinstance(spec, Uniform) else f"normal_kernel_{dev}"


def submit(tensor: torch.Tensor, spec: InitSpec, generator=None, torch_fallback=None) -> torch.Tensor:
    """Fill ``tensor`` with ``spec`` now (or hand the call to the active recorder).

    ``torch_fallback()`` runs instead for dtypes the engines do not hold (complex).
    """
    if spec.random:
        _check_random_dtype(tensor, _kernel_name(spec, tensor))
    if not tensor.is_meta and tensor.dtype.is_floating_point:
        spec.check_dtype(tensor.dtype)  # before anything is queued or written
    sink = _sink.current.get()
    if sink is not None and sink.fill(tensor, spec, generator):
        return tensor
    if tensor.is_meta:
        return tensor
    if not _is_engine_dtype(tensor.dtype):
        if isinstance(spec, Constant):
            with torch.no_grad():
                return tensor.fill_(spec.value)
        if torch_fallback is not None:
            return torch_fallback()
        raise TypeError(f"fastinit cannot fill a tensor of dtype {tensor.dtype}")
    if is_dtensor(tensor):
        fill_dtensor(tensor, spec, draw_key(generator) if spec.random else 0)
        return tensor
    if isinstance(spec, Constant) and tensor.device.type == "cpu":
        with torch.no_grad():  # a memset: torch's own fill_ is already the floor
            return tensor.fill_(spec.value)
    key = draw_key(generator) if spec.random else 0
    engines.fill([engines.Target(tensor, spec, key)])
    return tensor


def _replay_or_none(tensor, fn, args, kwargs):
    sink = _sink.current.get()
    return sink is not None and sink.replay(tensor, fn, args, kwargs)


# --------------------------------------------------------------------------- fills


def uniform_(tensor, a: float = 0.0, b: float = 1.0, generator=None):
    r"""Fill the input Tensor with values drawn from the uniform distribution.

    :math:`\mathcal{U}(a, b)`: :math:`x = a + (b - a)\,u`, :math:`u \sim U[0, 1)`.

    Args:
        tensor: an n-dimensional `torch.Tensor`
        a: the lower bound of the uniform distribution
        b: the upper bound of the uniform distribution
        generator: the torch Generator the key is drawn from (default: None)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.uniform_(w)
    """
    return submit(tensor, Uniform(a, b), generator,
                  lambda: torch.nn.init.uniform_(tensor, a, b, generator=generator))


def normal_(tensor, mean: float = 0.0, std: float = 1.0, generator=None):
    r"""Fill the input Tensor with values drawn from the normal distribution.

    :math:`\mathcal{N}(\text{mean}, \text{std}^2)`.

    Args:
        tensor: an n-dimensional `torch.Tensor`
        mean: the mean of the normal distribution
        std: the standard deviation of the normal distribution (``>= 0``)
        generator: the torch Generator the key is drawn from (default: None)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.normal_(w)
    """
    return submit(tensor, Normal(mean, std), generator,
                  lambda: torch.nn.init.normal_(tensor, mean, std, generator=generator))


def trunc_normal_(tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0,
                  generator=None):
    r"""Fill the input Tensor with values drawn from a truncated normal distribution.

    The values are effectively drawn from :math:`\mathcal{N}(\text{mean}, \text{std}^2)`
    with values outside :math:`[a, b]` redrawn until they are within the bounds;
    fastinit samples it exactly by the inverse CDF, with no rejection loop:
    :math:`x = \mu + \sigma\sqrt{2}\,\operatorname{erfinv}(2p-1)`,
    :math:`p \sim U\big(\Phi(\tfrac{a-\mu}{\sigma}), \Phi(\tfrac{b-\mu}{\sigma})\big)`.
    The method works best when :math:`a \le \text{mean} \le b`.

    Args:
        tensor: an n-dimensional `torch.Tensor`
        mean: the mean of the normal distribution
        std: the standard deviation of the normal distribution
        a: the minimum cutoff value
        b: the maximum cutoff value
        generator: the torch Generator the key is drawn from (default: None)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.trunc_normal_(w)
    """
    spec = trunc_normal_spec(mean, std, a, b, zero_std_is_error=not tensor.is_meta, stacklevel=3)
    return submit(tensor, spec, generator,
                  lambda: torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator))


def trunc_normal_spec(mean: float, std: float, a: float, b: float, *, zero_std_is_error: bool,
                      stacklevel: int) -> TruncNormal:
    """The spec of ``trunc_normal_(mean, std, a, b)`` with torch's argument rules: its
    warning when the mean is more than 2 std from [a, b] (``stacklevel`` for it), its
    ZeroDivisionError for std == 0 (it divides by std first), and a negative std
    sampled as |std| (torch only uses std squared)."""
    if (mean < a - 2 * std) or (mean > b + 2 * std):
        warnings.warn(
            "mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
            "The distribution of values may be incorrect.",
            stacklevel=stacklevel,
        )
    if std == 0 and zero_std_is_error:
        raise ZeroDivisionError("float division by zero")
    return TruncNormal(mean, abs(std), a, b)


def constant_(tensor, val: float):
    r"""Fill the input Tensor with the value :math:`\text{val}`.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.constant_(w, 0.3)
    """
    return submit(tensor, Constant(val))


def ones_(tensor):
    r"""Fill the input Tensor with the scalar value `1`.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.ones_(w)
    """
    return submit(tensor, Constant(1.0))


def zeros_(tensor):
    r"""Fill the input Tensor with the scalar value `0`.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.zeros_(w)
    """
    return submit(tensor, Constant(0.0))


# ------------------------------------------------------------- variance scaling


def xavier_uniform_(tensor, gain: float = 1.0, generator=None):
    r"""Fill the input `Tensor` with values using a Xavier uniform distribution.

    Described in *Understanding the difficulty of training deep feedforward
    neural networks* (Glorot & Bengio, 2010): :math:`\mathcal{U}(-a, a)` with

    .. math::
        a = \text{gain} \times \sqrt{\frac{6}{\text{fan\_in} + \text{fan\_out}}}

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.xavier_uniform_(w, gain=fastinit.calculate_gain("relu"))
    """
    spec = variance_scaling(tensor.shape, gain, "fan_avg", "uniform")
    return submit(tensor, spec, generator,
                  lambda: torch.nn.init.xavier_uniform_(tensor, gain, generator=generator))


def xavier_normal_(tensor, gain: float = 1.0, generator=None):
    r"""Fill the input `Tensor` with values using a Xavier normal distribution.

    :math:`\mathcal{N}(0, \text{std}^2)` with

    .. math::
        \text{std} = \text{gain} \times \sqrt{\frac{2}{\text{fan\_in} + \text{fan\_out}}}

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.xavier_normal_(w)
    """
    spec = variance_scaling(tensor.shape, gain, "fan_avg", "normal")
    return submit(tensor, spec, generator,
                  lambda: torch.nn.init.xavier_normal_(tensor, gain, generator=generator))


def _kaiming(tensor, a, mode, nonlinearity, distribution, generator, fallback):
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return tensor
    calculate_correct_fan(tensor, mode)  # validates dims and mode before the gain, as torch does
    gain = calculate_gain(nonlinearity, a)
    spec = variance_scaling(tensor.shape, gain, mode.lower(), distribution)
    return submit(tensor, spec, generator, fallback)


def kaiming_uniform_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                     generator=None):
    r"""Fill the input `Tensor` with values using a Kaiming uniform distribution.

    Described in *Delving deep into rectifiers* (He et al., 2015):
    :math:`\mathcal{U}(-\text{bound}, \text{bound})` with

    .. math::
        \text{bound} = \text{gain} \times \sqrt{\frac{3}{\text{fan\_mode}}}

    Args:
        tensor: an n-dimensional `torch.Tensor`
        a: the negative slope of the rectifier used after this layer (only used
            with ``'leaky_relu'``)
        mode: ``'fan_in'`` (default) preserves the variance of the forward pass,
            ``'fan_out'`` of the backward pass
        nonlinearity: the non-linear function (`nn.functional` name)
        generator: the torch Generator the key is drawn from (default: None)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")
    """
    return _kaiming(tensor, a, mode, nonlinearity, "uniform", generator,
                    lambda: torch.nn.init.kaiming_uniform_(tensor, a, mode, nonlinearity,
                                                           generator=generator))


def kaiming_normal_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    generator=None):
    r"""Fill the input `Tensor` with values using a Kaiming normal distribution.

    :math:`\mathcal{N}(0, \text{std}^2)` with

    .. math::
        \text{std} = \frac{\text{gain}}{\sqrt{\text{fan\_mode}}}

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    """
    return _kaiming(tensor, a, mode, nonlinearity, "normal", generator,
                    lambda: torch.nn.init.kaiming_normal_(tensor, a, mode, nonlinearity,
                                                          generator=generator))


# ------------------------------------------------------------ structured inits


def _subkey(generator, salt: int) -> int:
    return splitmix64(draw_key(generator) ^ salt)


def _filled(shape, spec, key, like: torch.Tensor) -> torch.Tensor:
    """A fresh float tensor of ``shape`` on ``like``'s device filled with ``spec``."""
    dtype = like.dtype if _is_engine_dtype(like.dtype) else torch.float32
    out = torch.empty(shape, dtype=dtype, device=like.device)
    engines.fill([engines.Target(out, spec, key)])
    return out


def eye_(tensor):
    r"""Fill the 2-dimensional input `Tensor` with the identity matrix.

    :math:`x_{ij} = \delta_{ij}`. Preserves the identity of the inputs in
    `Linear` layers, where as many inputs are preserved as possible.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.eye_(w)
    """
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    if _replay_or_none(tensor, eye_, (), {}) or tensor.is_meta:
        return tensor
    with torch.no_grad():
        torch.eye(*tensor.shape, out=tensor, requires_grad=tensor.requires_grad)
    return tensor


def dirac_(tensor, groups: int = 1):
    r"""Fill the {3, 4, 5}-dimensional input `Tensor` with the Dirac delta function.

    :math:`x_{o,i,k} = 1` when :math:`i = o \bmod (n_{out}/g)` and :math:`k` is
    the kernel's centre, else 0. Preserves the identity of the inputs in
    convolutional layers; with ``groups > 1`` each group of channels does.

    Examples:
        >>> w = torch.empty(3, 16, 5, 5)
        >>> fastinit.dirac_(w)
    """
    dimensions = tensor.ndimension()
    if dimensions not in [3, 4, 5]:
        raise ValueError("Only tensors with 3, 4, or 5 dimensions are supported")
    sizes = tensor.size()
    if sizes[0] % groups != 0:
        raise ValueError("dim 0 must be divisible by groups")
    if _replay_or_none(tensor, dirac_, (groups,), {}) or tensor.is_meta:
        return tensor
    out_per_group = sizes[0] // groups
    min_dim = min(out_per_group, sizes[1])
    with torch.no_grad():
        tensor.zero_()
        d = torch.arange(min_dim, device=tensor.device)
        centre = tuple(s // 2 for s in sizes[2:])
        for g in range(groups):
            index = (g * out_per_group + d, d) + tuple(
                torch.full_like(d, c) for c in centre
            )
            tensor.index_put_(index, torch.ones((), dtype=tensor.dtype, device=tensor.device))
    return tensor


def orthogonal_(tensor, gain: float = 1, generator=None):
    r"""Fill the input `Tensor` with a (semi) orthogonal matrix.

    Described in *Exact solutions to the nonlinear dynamics of learning in deep
    linear neural networks* (Saxe et al., 2013). The tensor, seen as
    :math:`(n_0, \prod_{k>0} n_k)`, becomes :math:`\text{gain}\cdot Q` where
    :math:`A = QR` is the QR decomposition of a standard Gaussian matrix (drawn
    by fastinit) and the signs of :math:`\operatorname{diag}(R)` are folded into
    :math:`Q` so that :math:`Q` is Haar-distributed.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.orthogonal_(w)
    """
    if tensor.ndimension() < 2:
        raise ValueError("Only tensors with 2 or more dimensions are supported")
    if _replay_or_none(tensor, orthogonal_, (gain,), {"generator": generator}):
        return tensor
    if tensor.numel() == 0 or tensor.is_meta:
        return tensor
    _check_random_dtype(tensor, _kernel_name(Normal(), tensor))
    rows = tensor.size(0)
    cols = tensor.numel() // rows
    flattened = _filled((rows, cols), Normal(0.0, 1.0), _subkey(generator, 0x0), tensor)
    if rows < cols:
        flattened.t_()
    q, r = torch.linalg.qr(flattened.float() if flattened.dtype in (torch.float16, torch.bfloat16)
                           else flattened)
    q *= torch.diag(r, 0).sign()
    if rows < cols:
        q.t_()
    with torch.no_grad():
        tensor.view_as(q).copy_(q)
        tensor.mul_(gain)
    return tensor


def sparse_(tensor, sparsity: float, std: float = 0.01, generator=None):
    r"""Fill the 2D input `Tensor` as a sparse matrix.

    Non-zero elements are drawn from :math:`\mathcal{N}(0, \text{std}^2)`;
    in each column, :math:`\lceil \text{sparsity} \cdot \text{rows} \rceil`
    elements, chosen uniformly at random, are zero (Martens, 2010).

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.sparse_(w, sparsity=0.1)
    """
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    if _replay_or_none(tensor, sparse_, (sparsity, std), {"generator": generator}):
        return tensor
    if tensor.is_meta:
        return tensor
    _check_random_dtype(tensor, _kernel_name(Normal(), tensor))
    rows, cols = tensor.shape
    num_zeros = math.ceil(sparsity * rows)
    spec = Normal(0.0, std)
    values_key, mask_key = _subkey(generator, 0x1), _subkey(generator, 0x2)
    # Zero positions: per column, the rows of the num_zeros smallest uniform scores
    # (a uniformly random subset, as torch's randperm per column, without the loop).
    scores = _filled((rows, cols), Uniform(0.0, 1.0), mask_key, torch.empty(0, device=tensor.device))
    zero_rows = scores.argsort(dim=0)[:num_zeros]
    with torch.no_grad():
        if _is_engine_dtype(tensor.dtype):
            engines.fill([engines.Target(tensor, spec, values_key)])
        else:
            tensor.normal_(0, std, generator=generator)
        tensor.scatter_(0, zero_rows, 0)
    return tensor


# ------------------------------------------------------------ deprecated aliases


def _make_deprecate(meth):
    new_name = meth.__name__
    old_name = new_name[:-1]

    def deprecated_init(*args, **kwargs):
        warnings.warn(
            f"`nn.init.{old_name}` is now deprecated in favor of `nn.init.{new_name}`.",
            FutureWarning,
            stacklevel=2,
        )
        return meth(*args, **kwargs)

    deprecated_init.__doc__ = f"""
    {old_name}(...)

    .. warning::
        This method is now deprecated in favor of :func:`fastinit.{new_name}`.

    See :func:`~fastinit.{new_name}` for details."""
    deprecated_init.__name__ = old_name
    return deprecated_init


uniform = _make_deprecate(uniform_)
normal = _make_deprecate(normal_)
constant = _make_deprecate(constant_)
eye = _make_deprecate(eye_)
dirac = _make_deprecate(dirac_)
xavier_uniform = _make_deprecate(xavier_uniform_)
xavier_normal = _make_deprecate(xavier_normal_)
kaiming_uniform = _make_deprecate(kaiming_uniform_)
kaiming_normal = _make_deprecate(kaiming_normal_)
orthogonal = _make_deprecate(orthogonal_)
sparse = _make_deprecate(sparse_)

__all__ = [
    "calculate_gain", "calculate_fan_in_and_fan_out", "uniform_", "normal_", "trunc_normal_",
    "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_", "uniform", "normal",
    "constant", "eye", "dirac", "xavier_uniform", "xavier_normal", "kaiming_uniform",
    "kaiming_normal", "orthogonal", "sparse",
]
