"""Fans, gains and the variance-scaling rule behind Xavier and Kaiming.

These are plain functions of a tensor's shape, computed with exactly the float
operations ``torch.nn.init`` uses, so bounds and standard deviations agree with
torch to the last bit. :func:`variance_scaling` is the one mechanism that turns
(gain, fan mode, distribution) into a :class:`~fastinit.specs.Uniform` or
:class:`~fastinit.specs.Normal` spec, the way JAX's ``variance_scaling`` serves
lecun, glorot and he (with one difference: here ``gain`` multiplies the standard
deviation, as in torch, where JAX's ``scale`` multiplies the variance).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .specs import InitSpec, Normal, Uniform

_LINEAR_FNS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)


def calculate_gain(nonlinearity, param=None):
    r"""Return the recommended gain value for the given nonlinearity function.

    ================= ====================================================
    nonlinearity      gain
    ================= ====================================================
    Linear / Identity :math:`1`
    Conv{1,2,3}D      :math:`1`
    Sigmoid           :math:`1`
    Tanh              :math:`\frac{5}{3}`
    ReLU              :math:`\sqrt{2}`
    Leaky Relu        :math:`\sqrt{\frac{2}{1 + \text{negative\_slope}^2}}`
    SELU              :math:`\frac{3}{4}`
    ================= ====================================================

    Args:
        nonlinearity: the non-linear function (`nn.functional` name)
        param: optional parameter for the non-linear function (the negative
            slope of leaky_relu, default 0.01)

    Raises:
        ValueError: unknown nonlinearity, or a ``param`` that is not a number.

    Examples:
        >>> fastinit.calculate_gain("leaky_relu", 0.2)  # leaky_relu with negative_slope=0.2
        1.3867504905630728
    """
    if nonlinearity in _LINEAR_FNS or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            negative_slope = 0.01
        elif (not isinstance(param, bool) and isinstance(param, int)) or isinstance(param, float):
            negative_slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + negative_slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def shape_of(tensor_or_shape) -> tuple[int, ...]:
    """A tensor's shape (or the shape given); a lazy module's uninitialized
    parameter raises torch's ValueError, as torch.nn.init's fan helpers do."""
    if torch.nn.parameter.is_lazy(tensor_or_shape):
        tensor_or_shape.dim()  # (raises)
    if hasattr(tensor_or_shape, "shape"):
        return tuple(tensor_or_shape.shape)
    if isinstance(tensor_or_shape, (tuple, list, torch.Size)) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in tensor_or_shape):
        return tuple(tensor_or_shape)
    # what torch.nn.init's helpers raise for anything but a tensor (they call tensor.dim())
    raise AttributeError(f"'{type(tensor_or_shape).__name__}' object has no attribute 'dim'")


def calculate_fan_in_and_fan_out(tensor) -> tuple[int, int]:
    r"""Fans of a weight tensor (or a shape), as ``torch.nn.init`` computes them.

    For a weight of shape :math:`(n_{out}, n_{in}, k_1, \dots, k_m)`:
    :math:`\text{fan\_in} = n_{in} \prod k_j` and
    :math:`\text{fan\_out} = n_{out} \prod k_j`.

    Raises:
        ValueError: for tensors with fewer than 2 dimensions.

    Examples:
        >>> fastinit.calculate_fan_in_and_fan_out(torch.empty(64, 3, 7, 7))
        (147, 3136)
    """
    shape = shape_of(tensor)
    if len(shape) < 2:
        raise ValueError(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions"
        )
    receptive_field_size = 1
    for s in shape[2:]:
        receptive_field_size *= s
    return shape[1] * receptive_field_size, shape[0] * receptive_field_size


def calculate_correct_fan(tensor, mode: str) -> int:
    """``fan_in`` or ``fan_out`` of ``tensor`` by ``mode`` (case-insensitive)."""
    mode = mode.lower()
    valid_modes = ["fan_in", "fan_out"]
    if mode not in valid_modes:
        raise ValueError(f"Mode {mode} not supported, please use one of {valid_modes}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def scaled_std(shape: Sequence[int], gain: float, mode: str) -> float:
    r"""The standard deviation :math:`\sigma = g / \sqrt{n}` of Xavier (``mode="fan_avg"``,
    :math:`n = (\text{fan\_in} + \text{fan\_out}) / 2`) and Kaiming (``"fan_in"``,
    ``"fan_out"``), with exactly torch's float operations."""
    if mode == "fan_avg":
        fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
        return gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return gain / math.sqrt(calculate_correct_fan(shape, mode))


def variance_scaling(
    shape: Sequence[int], gain: float, mode: str, distribution: str
) -> InitSpec:
    r"""The spec with standard deviation :math:`\sigma = g / \sqrt{n}`.

    ``mode`` picks :math:`n`: ``"fan_in"``, ``"fan_out"``, or ``"fan_avg"``
    (:math:`n = (\text{fan\_in} + \text{fan\_out}) / 2`, Glorot/Xavier).
    ``distribution`` is ``"uniform"`` (:math:`U(-\sqrt{3}\sigma, \sqrt{3}\sigma)`)
    or ``"normal"`` (:math:`\mathcal{N}(0, \sigma^2)`). Kaiming is ``fan_in`` or
    ``fan_out`` with :math:`g` from :func:`calculate_gain`; Xavier is ``fan_avg``.

    .. warning::
        ``gain`` multiplies the **standard deviation**, as torch's ``gain`` does.
        JAX's ``variance_scaling(scale, mode, distribution)`` takes a ``scale``
        that multiplies the **variance** (:math:`\sigma^2 = s / n`). A JAX
        ``scale`` ports as ``gain = sqrt(scale)``: JAX's ``he_normal`` (scale 2)
        is ``variance_scaling(shape, math.sqrt(2), "fan_in", "normal")``, and
        JAX's ``"uniform"`` with scale ``s`` is ``gain = sqrt(s)`` here too.
        (JAX's ``"truncated_normal"``, its default, has no counterpart here: this
        function's ``"normal"`` is JAX's ``"normal"``, the plain normal.)

    Example:
        >>> variance_scaling((256, 128), math.sqrt(2.0), "fan_in", "normal")  # kaiming_normal_, relu
        Normal(mean=0.0, std=0.125)
    """
    std = scaled_std(shape, gain, mode)
    if distribution == "uniform":
        bound = math.sqrt(3.0) * std
        return Uniform(-bound, bound)
    if distribution == "normal":
        return Normal(0.0, std)
    raise ValueError(f"Unsupported distribution {distribution!r}: use 'uniform' or 'normal'")
