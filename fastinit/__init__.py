"""fastinit: fast, reproducible and complete weight initialization for PyTorch.

``import fastinit as init`` is a drop-in for ``import torch.nn.init as init``;
engines fill tensors in one pass (Triton on CUDA, a parallel pure-torch engine
on CPU), following one RNG contract: element ``i`` of a tensor is a function of
``(key, i, spec)`` only.
"""

from . import engines, specs
from .engines import use_engine
from .fans import calculate_fan_in_and_fan_out, calculate_gain, variance_scaling
from .init import (
    _calculate_correct_fan,
    _calculate_fan_in_and_fan_out,
    _no_grad_fill_,
    _no_grad_normal_,
    _no_grad_trunc_normal_,
    _no_grad_uniform_,
    _no_grad_zero_,
    constant,
    constant_,
    dirac,
    dirac_,
    eye,
    eye_,
    kaiming_normal,
    kaiming_normal_,
    kaiming_uniform,
    kaiming_uniform_,
    normal,
    normal_,
    ones_,
    orthogonal,
    orthogonal_,
    sparse,
    sparse_,
    trunc_normal_,
    uniform,
    uniform_,
    xavier_normal,
    xavier_normal_,
    xavier_uniform,
    xavier_uniform_,
    zeros_,
)
from .specs import Constant, InitSpec, Normal, TruncNormal, Uniform
from .deferred import MaterializeReport, Planned, batched, deferred_init, is_deferred, materialize, planned
from . import schemes
from .schemes import Rule, Scheme, apply_scheme
from .audit import Audit, audit

__version__ = "0.1.0"

__all__ = [
    "calculate_gain", "calculate_fan_in_and_fan_out", "variance_scaling",
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_", "uniform", "normal", "constant", "eye", "dirac", "xavier_uniform",
    "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "sparse",
    "deferred_init", "materialize", "batched", "planned", "is_deferred", "MaterializeReport", "Planned",
    "use_engine", "engines", "specs", "InitSpec", "Uniform", "Normal", "TruncNormal", "Constant",
    "apply_scheme", "Scheme", "Rule", "schemes", "audit", "Audit",
]
