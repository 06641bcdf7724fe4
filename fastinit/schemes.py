r"""Model-level init schemes: "how should I initialize this model?", in one fused pass.

A :class:`Scheme` is an ordered list of :class:`Rule` s. Each rule matches
parameters by the type of the module that owns them, by name (a glob) and/or by
number of dimensions, and says what they get: a spec. The first rule that
matches a parameter wins. A spec is

* a number: a constant (``0.0`` for biases, ``1.0`` for norm gains);
* an :class:`~fastinit.specs.InitSpec` (``Normal(0, 0.02)``, ``Uniform(-b, b)``, ...);
* a drop-in call with its arguments: ``Call(fastinit.trunc_normal_, std=0.02)``;
* ``"keep"``: leave the parameter as it is (its value, or what is recorded for it);
* a shape rule: :class:`VarianceScaling` (Xavier, Kaiming, LeCun, the general
  rule), :class:`Orthogonal`, :class:`Reset` (the module's own
  ``reset_parameters``), or any function of a :class:`Param` returning a spec.

:func:`apply_scheme` applies a scheme (or a built-in one by name)::

    report = fastinit.apply_scheme(model, "gpt2", seed=0)          # n_layer inferred
    report = fastinit.apply_scheme(model, "kaiming_normal", nonlinearity="relu")
    print(report)       # which rule each parameter took, and what it got

On an allocated model every random fill runs in one fused pass (:func:`fastinit.batched`);
on a deferred model (:func:`fastinit.deferred_init`, or any model on the meta
device) the calls are recorded, and :func:`fastinit.materialize` fuses them with
everything else. With ``seed=``, each tensor's values are keyed by
``(seed, its name in model)``: the same on an allocated and on a deferred model,
whatever seed ``materialize`` is given later.

Fans are module-aware: transformers' ``Conv1D`` (GPT-2) stores its weight as
``(in, out)``, so its fans are swapped back; fused matrices (a QKV projection)
can be split into blocks (the ``qkv`` option) whose fans are computed one block
at a time, as llm-foundry's private ``fused_init_helper_`` does.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from . import distributed as dist_mod
from ._frames import first_frame_outside
from . import init as dropin
from .fans import calculate_fan_in_and_fan_out, calculate_gain
from .seeding import check_seed, draw_key, key_for_name
from .specs import Constant, InitSpec, Normal, Uniform

KEEP = "keep"

#: torch's normalization layers: their gains start at 1 and their biases at 0.
TORCH_NORMS = tuple(c for c in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                getattr(nn, "RMSNorm", None)) if c is not None)
#: Normalization layers: torch's, and any class named ``*Norm``/``*Norm2d`` (LlamaRMSNorm, T5LayerNorm, ...).
NORM = (*TORCH_NORMS, "*Norm", "*Norm1d", "*Norm2d", "*Norm3d")
#: Default names of fused query/key/value matrices (GPT-2, GPT-NeoX, MPT/ViT-style, nn.MultiheadAttention).
QKV_NAMES = ("*c_attn.weight", "*query_key_value.weight", "*qkv*.weight", "*Wqkv.weight", "*in_proj_weight")
#: GPT-2's residual projections (scaled by 1/sqrt(2 n_layer)): attn.c_proj and mlp.c_proj.
GPT2_RESIDUAL = ("*c_proj.weight",)
#: Output projections of a transformer block that GPT-NeoX's Wang init scales.
NEOX_OUTPUT = ("*attention.dense.weight", "*dense_4h_to_h.weight", "*c_proj.weight", "*o_proj.weight",
               "*down_proj.weight", "*out_proj.weight")


# ------------------------------------------------------------------ what rules see


def _transposed(module: nn.Module | None) -> bool:
    """transformers' Conv1D (GPT-2) keeps its weight as (in_features, out_features)."""
    return module is not None and type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class Param:
    """A parameter as rules and shape rules see it."""

    name: str  # its name in the model (the first one, for tied parameters)
    tensor: torch.Tensor
    module: nn.Module  # the module that owns it
    model: nn.Module
    options: dict = field(default_factory=dict)

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def ndim(self) -> int:
        return self.tensor.dim()

    @property
    def out_dim(self) -> int:
        """The dimension of output units (0 for torch's layouts, 1 for Conv1D)."""
        return 1 if _transposed(self.module) and self.ndim == 2 else 0

    def fans(self, shape: Sequence[int] | None = None) -> tuple[int, int]:
        """``(fan_in, fan_out)`` of this parameter (or of a block of it, ``shape``), as
        torch computes them, with Conv1D's layout turned back into torch's."""
        shape = tuple(self.shape if shape is None else shape)
        if self.out_dim == 1:
            shape = (shape[1], shape[0])
        return calculate_fan_in_and_fan_out(shape)

    def weight_fans(self) -> tuple[int, int] | None:
        """Fans of the owning module's ``weight`` (what a bias's bound depends on)."""
        w = getattr(self.module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            shape = tuple(w.shape)
            if _transposed(self.module):
                shape = (shape[1], shape[0])
            return calculate_fan_in_and_fan_out(shape)
        return None


# ------------------------------------------------------------------ specs


class Call:
    """A drop-in call with its arguments: ``Call(fastinit.trunc_normal_, std=0.02)``
    runs ``fastinit.trunc_normal_(param, std=0.02)``."""

    def __init__(self, fn: Callable, *args, **kwargs):
        if not callable(fn):
            raise TypeError(f"Call: {fn!r} is not callable")
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{getattr(self.fn, '__name__', self.fn)}({', '.join(parts)})"


@dataclass(frozen=True)
class VarianceScaling:
    r""":math:`\sigma = \text{gain}/\sqrt{n}` with :math:`n` the parameter's ``fan_in``,
    ``fan_out`` or ``fan_avg`` (:math:`(\text{fan\_in}+\text{fan\_out})/2`); ``uniform``
    gives :math:`U(-\sqrt3\sigma, \sqrt3\sigma)`, ``normal`` gives :math:`N(0, \sigma^2)`.
    Xavier is ``fan_avg``, Kaiming ``fan_in``/``fan_out`` with torch's gain. A
    parameter named by the ``qkv_names`` option with a ``qkv`` split gets one spec
    per block of output rows, with that block's fans."""

    gain: float
    mode: str
    distribution: str
    label: str = ""

    def __post_init__(self):
        if self.mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"VarianceScaling: mode must be 'fan_in', 'fan_out' or 'fan_avg', not {self.mode!r}")
        if self.distribution not in ("uniform", "normal"):
            raise ValueError(f"VarianceScaling: distribution must be 'uniform' or 'normal', not "
                             f"{self.distribution!r} (a truncated normal is a Call of trunc_normal_)")

    def __call__(self, p: Param):
        if p.ndim < 2:
            raise ValueError(f"{p.name}: {self.label or 'variance scaling'} needs a tensor with at least 2 "
                             f"dimensions, got shape {p.shape}")
        blocks = _qkv_blocks(p)
        specs = [self.spec(p, p.fans(bshape)) for bshape in (b[2] for b in blocks)]
        if len(set(specs)) == 1:
            return specs[0]
        return Blocks(p.out_dim, [b[1] for b in blocks], specs)

    def spec(self, p: Param, fans: tuple[int, int]) -> InitSpec:
        fan_in, fan_out = fans
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        if n <= 0:
            raise ValueError(f"{p.name}: {self.mode} of shape {p.shape} is 0")
        std = self.gain / math.sqrt(n)
        if self.distribution == "uniform":
            b = math.sqrt(3.0) * std
            return Uniform(-b, b)
        return Normal(0.0, std)


def _qkv_blocks(p: Param):
    """``[(start, size, block shape)]`` along the output dimension: one block, or the
    ``qkv`` option's split for parameters named by ``qkv_names``."""
    rows = p.shape[p.out_dim]
    split = p.options.get("qkv")
    names = p.options.get("qkv_names", QKV_NAMES)
    if split is None or not _glob(p.name, names):
        return [(0, rows, p.shape)]
    sizes = [rows // split] * split if isinstance(split, int) else list(split)
    if isinstance(split, int) and (split <= 0 or rows % split):
        raise ValueError(f"{p.name}: qkv={split} does not divide its {rows} output rows")
    if sum(sizes) != rows or any(s <= 0 for s in sizes):
        raise ValueError(f"{p.name}: qkv={tuple(sizes)} does not add up to its {rows} output rows")
    out, start = [], 0
    for s in sizes:
        shape = list(p.shape)
        shape[p.out_dim] = s
        out.append((start, s, tuple(shape)))
        start += s
    return out


@dataclass(frozen=True)
class Blocks:
    """Different specs for consecutive blocks along ``dim`` (sizes ``sizes``)."""

    dim: int
    sizes: list
    specs: list

    def __repr__(self) -> str:
        return "blocks(" + ", ".join(f"{n}: {s!r}" for n, s in zip(self.sizes, self.specs)) + ")"


@dataclass(frozen=True)
class Orthogonal:
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2013), per block of
    ``blocks`` equal row blocks (an LSTM's four gates each get their own)."""

    gain: float = 1.0
    blocks: int | Callable[[Param], int] = 1

    def __call__(self, p: Param):
        if p.ndim < 2:
            raise ValueError(f"{p.name}: orthogonal needs a tensor with at least 2 dimensions, got shape {p.shape}")
        n = self.blocks(p) if callable(self.blocks) else self.blocks
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{p.name}: Orthogonal's blocks must be a positive int, got {n!r}")
        if p.shape[p.out_dim] % n:
            raise ValueError(f"{p.name}: {n} blocks do not divide its {p.shape[p.out_dim]} rows")
        if isinstance(self.gain, bool) or not isinstance(self.gain, numbers.Real):
            raise TypeError(f"{p.name}: Orthogonal's gain must be a real number, got {self.gain!r}")
        return _OrthoAction(self.gain, n, p.out_dim)


@dataclass(frozen=True)
class _OrthoAction:
    gain: float
    blocks: int
    dim: int

    def __repr__(self) -> str:
        return f"orthogonal(gain={self.gain:g}" + (f", per {self.blocks} blocks)" if self.blocks > 1 else ")")


@dataclass(frozen=True)
class Reset:
    """The owning module's own ``reset_parameters()`` (or ``_reset_parameters()``): torch's default."""

    def __call__(self, p: Param):
        return _ResetAction(p.module)

    @staticmethod
    def applies(p: Param) -> bool:
        return callable(getattr(p.module, "reset_parameters", None)) or callable(
            getattr(p.module, "_reset_parameters", None))


@dataclass(frozen=True, eq=False)
class _ResetAction:
    module: nn.Module

    def __repr__(self) -> str:
        return f"{type(self.module).__name__}.reset_parameters()"


def _is_keep(x) -> bool:
    return isinstance(x, str) and x == KEEP


def _glob(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        patterns = (patterns,)
    leaf = name.rpartition(".")[2]
    return any(fnmatch.fnmatchcase(name, pat) or ("." not in pat and fnmatch.fnmatchcase(leaf, pat))
               for pat in patterns)


def _ndim_ok(ndim: int, want) -> bool:
    if want is None:
        return True
    if isinstance(want, int):
        return ndim == want
    if isinstance(want, str):
        w = want.replace(" ", "")
        for op, fn in ((">=", lambda a, b: a >= b), ("<=", lambda a, b: a <= b), ("==", lambda a, b: a == b),
                       (">", lambda a, b: a > b), ("<", lambda a, b: a < b)):
            if w.startswith(op):
                return fn(ndim, int(w[len(op):]))
        raise ValueError(f"ndim={want!r}: use an int, a container of ints, or '>1', '>=2', '<2', '==1'")
    if callable(want):
        return bool(want(ndim))
    return ndim in want


def _module_ok(module: nn.Module, want) -> bool:
    if want is None:
        return True
    items = want if isinstance(want, (tuple, list)) else (want,)
    for w in items:
        if isinstance(w, str):
            if any(fnmatch.fnmatchcase(c.__name__, w) for c in type(module).__mro__):
                return True
        elif isinstance(w, type) and isinstance(module, w):
            return True
    return False


class Rule:
    """Parameters matched by all of ``module`` (a class, a class-name glob such as
    ``"*Norm*"``, or a tuple of them: matched against the owning module's class
    and its bases), ``name`` (glob(s) on the full name; a glob without a dot also
    matches the last component: ``"bias"``), ``ndim`` (an int, a container of
    ints, ``">1"``-style, or a predicate) and ``where`` (a predicate of the
    :class:`Param`) get ``spec``. A rule with no condition is a catch-all.

    A rule with conditions that no parameter takes (none matches it, or earlier
    rules take all it matches: a typo in ``name=``, a rule added with ``then``
    behind a catch-all) is warned about when a model is planned, since its
    parameters silently get another rule's init; ``optional=True`` says it may
    apply to no parameter of some models (as the built-in schemes' rules)."""

    def __init__(self, spec, *, module=None, name=None, ndim=None, where: Callable[[Param], bool] | None = None,
                 label: str | None = None, optional: bool = False):
        _check_spec(spec)
        _check_conditions(module, name, ndim, where)
        self.spec, self.module, self.name, self.ndim, self.where = spec, module, name, ndim, where
        self.label = label or self._describe()
        self.optional = bool(optional)

    @property
    def catch_all(self) -> bool:
        return self.module is None and self.name is None and self.ndim is None and self.where is None

    def matches(self, p: Param) -> bool:
        return (_module_ok(p.module, self.module) and (self.name is None or _glob(p.name, self.name))
                and _ndim_ok(p.ndim, self.ndim) and (self.where is None or bool(self.where(p))))

    def _describe(self) -> str:
        cond = []
        if self.module is not None:
            items = self.module if isinstance(self.module, (tuple, list)) else (self.module,)
            cond.append("/".join(m if isinstance(m, str) else m.__name__ for m in items))
        if self.name is not None:
            cond.append(self.name if isinstance(self.name, str) else "|".join(self.name))
        if self.ndim is not None:
            cond.append(f"ndim {self.ndim}" if not callable(self.ndim) else "ndim rule")
        if self.where is not None:
            cond.append(getattr(self.where, "__name__", "where"))
        return " ".join(cond) or "*"

    def __repr__(self) -> str:
        return f"Rule({self.label} -> {_spec_label(self.spec)})"


def _spec_label(spec) -> str:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return f"constant {spec:g}"
    if isinstance(spec, VarianceScaling) and spec.label:
        return spec.label
    if callable(spec) and not isinstance(spec, (Call, VarianceScaling, Orthogonal, Reset)) \
            and hasattr(spec, "__name__"):
        return spec.__name__
    return repr(spec)


def _check_conditions(module, name, ndim, where) -> None:
    """A rule's conditions, checked when it is made (not when it first meets a parameter)."""
    for m in (() if module is None else module if isinstance(module, (tuple, list)) else (module,)):
        if not (isinstance(m, str) or isinstance(m, type) and issubclass(m, nn.Module)):
            raise TypeError(f"Rule: module= takes module classes or class-name globs (or a tuple of them), "
                            f"not {m!r}")
    for n in (() if name is None else name if isinstance(name, (tuple, list)) else (name,)):
        if not isinstance(n, str):
            raise TypeError(f"Rule: name= takes name globs (or a tuple of them), not {n!r}")
    if ndim is not None:
        ok = (isinstance(ndim, int) and not isinstance(ndim, bool)) or isinstance(ndim, str) or callable(ndim) or (
            isinstance(ndim, (tuple, list, set, frozenset, range))
            and all(isinstance(d, int) and not isinstance(d, bool) for d in ndim))
        if not ok:
            raise TypeError(f"Rule: ndim= takes an int, a container of ints, '>1'-style or a predicate, not {ndim!r}")
        if isinstance(ndim, str):
            try:
                _ndim_ok(1, ndim)
            except ValueError:
                raise ValueError(f"ndim={ndim!r}: use an int, a container of ints, or '>1', '>=2', '<2', "
                                 "'==1'") from None
    if where is not None and not callable(where):
        raise TypeError(f"Rule: where= takes a predicate of a Param, not {where!r}")


def _check_spec(spec) -> None:
    if isinstance(spec, bool):
        raise TypeError("a rule's spec cannot be a bool")
    if isinstance(spec, (int, float, InitSpec, Call)) or _is_keep(spec) or callable(spec):
        return
    raise TypeError(f"a rule's spec must be a number, an InitSpec, Call(fn, ...), 'keep' or a function of a "
                    f"Param, not {spec!r}")


class Scheme:
    """An ordered set of :class:`Rule` s (the first match wins), with its options.

    ``options``: the names a caller may pass to :func:`apply_scheme` (with defaults),
    which rules see as ``param.options``. ``after``: a step run on the allocated
    model once the rules are applied (LSUV's rescaling)."""

    def __init__(self, name: str, rules: Iterable[Rule], *, doc: str = "", options: dict | None = None,
                 after: Callable | None = None):
        self.name = name
        self.rules = list(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise TypeError(f"Scheme {name!r}: {r!r} is not a Rule")
        self.doc = doc
        self.options = dict(options or {})
        self.after = after

    @property
    def catch_all(self) -> bool:
        return any(r.catch_all for r in self.rules)

    def __add__(self, other) -> "Scheme":
        """``scheme + [Rule(...)]``: the same scheme with more rules after its own."""
        more = other.rules if isinstance(other, Scheme) else list(other)
        opts = dict(self.options)
        if isinstance(other, Scheme):
            opts.update(other.options)
        return Scheme(self.name, self.rules + more, doc=self.doc, options=opts, after=self.after)

    def then(self, *rules: Rule) -> "Scheme":
        return self + list(rules)

    def before(self, *rules: Rule) -> "Scheme":
        """The same scheme with ``rules`` tried first."""
        return Scheme(self.name, list(rules) + self.rules, doc=self.doc, options=self.options, after=self.after)

    def __repr__(self) -> str:
        return f"Scheme({self.name!r}, {len(self.rules)} rules)"

    def plan(self, model: nn.Module, **options) -> dict[str, "Planned"]:
        """What each parameter of ``model`` will get, by name, without changing anything.
        Raises ValueError naming the parameters no rule matches."""
        return _plan(model, self, self._options(options))

    def _options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"scheme {self.name!r} got unknown option(s) {', '.join(unknown)}; it takes "
                            f"{', '.join(sorted(self.options)) or 'none'}")
        for k in ("n_layer", "d_model"):
            v = options.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"scheme {self.name!r}: {k} must be a positive int (or None: inferred), not {v!r}")
        q = options.get("qkv")
        if q is not None:
            parts = [q] if isinstance(q, int) and not isinstance(q, bool) else q
            if isinstance(q, bool) or not isinstance(parts, (list, tuple)) or not parts or any(
                    isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in parts):
                raise ValueError(f"scheme {self.name!r}: qkv must be a positive int (the number of equal blocks) "
                                 f"or a list of positive block sizes, not {q!r}")
        return {**self.options, **options}


@dataclass
class Planned:
    """One parameter's plan: the rule it took and its action (an InitSpec,
    :class:`Blocks`, an orthogonal/reset action, a :class:`Call` or ``"keep"``)."""

    name: str
    rule: str
    action: Any
    padding_idx: int | None = None

    @property
    def spec(self) -> InitSpec | None:
        return self.action if isinstance(self.action, InitSpec) else None

    def describe(self) -> str:
        d = "keep" if _is_keep(self.action) else repr(self.action)
        if self.padding_idx is not None and not _is_keep(self.action):
            d += f"; row {self.padding_idx} (padding_idx) zero"
        return d


def _resolve(spec, p: Param, depth: int = 0):
    if depth > 8:
        raise RecursionError(f"{p.name}: a spec function keeps returning functions")
    if isinstance(spec, bool):
        raise TypeError(f"{p.name}: a spec cannot be a bool")
    if isinstance(spec, (int, float)):
        return Constant(float(spec))
    if isinstance(spec, (InitSpec, Call, Blocks, _OrthoAction, _ResetAction)) or _is_keep(spec):
        return spec
    if callable(spec):
        return _resolve(spec(p), p, depth + 1)
    raise TypeError(f"{p.name}: a spec function returned {spec!r}")


def _params(model: nn.Module, options: dict):
    mods = dict(model.named_modules(remove_duplicate=False))
    for name, t in model.named_parameters():
        owner = mods.get(name.rpartition(".")[0], model)
        yield Param(name, t, owner, model, options)


def _padding_rows(model: nn.Module) -> dict[int, int]:
    """``id(weight) -> padding_idx`` of every Embedding/EmbeddingBag: a weight tied to a
    head whose name comes first (``named_parameters`` names it once) keeps its row."""
    out = {}
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "padding_idx", None) is not None \
                and isinstance(getattr(m, "weight", None), torch.Tensor):
            out.setdefault(id(m.weight), m.padding_idx)
    return out


@dataclass(frozen=True)
class _NormOf:
    """A weight-normalized tensor's gain ``g``: the norm of its direction ``v`` (the
    parameter named ``v``) over every dimension but ``dim``, as ``weight_norm`` sets it
    (``torch.norm_except_dim``), so that the effective weight ``g v / ‖v‖`` is ``v``,
    which the scheme's rules initialize. Rules do not see a gain: it follows its
    direction (kept when the direction is kept)."""

    v: str
    dim: int

    def __repr__(self) -> str:
        return f"‖{self.v}‖ (weight_norm's gain)"


def _weight_norm_gains(model: nn.Module) -> dict[int, tuple[str, int]]:
    """``id(g) -> (name of v, dim)`` of every weight-normalized tensor of ``model``: torch's
    ``parametrizations.weight_norm`` (``original0`` is g, ``original1`` is v) and the former
    ``nn.utils.weight_norm`` (``<name>_g`` and ``<name>_v``, kept by a forward pre-hook)."""
    out = {}
    names = {id(t): n for n, t in model.named_parameters()}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if type(hook).__name__ == "WeightNorm" and hasattr(hook, "name") and hasattr(hook, "dim"):
                g, v = getattr(m, hook.name + "_g", None), getattr(m, hook.name + "_v", None)
                if isinstance(g, torch.Tensor) and id(v) in names:
                    out[id(g)] = (names[id(v)], -1 if hook.dim is None else hook.dim)
        if type(m).__name__ == "ParametrizationList" and len(m) and type(m[0]).__name__ == "_WeightNorm":
            # (weight_norm comes first in a list, or not at all: its right_inverse makes two originals)
            g, v = getattr(m, "original0", None), getattr(m, "original1", None)
            if isinstance(g, torch.Tensor) and id(v) in names:
                out[id(g)] = (names[id(v)], m[0].dim)
    return out


def _plan(model: nn.Module, scheme: Scheme, options: dict) -> dict[str, Planned]:
    out, unmatched, taken = {}, [], set()
    pads = _padding_rows(model)
    gains = _weight_norm_gains(model)
    for p in _params(model, options):
        if id(p.tensor) in gains:  # (derived from v, whatever the rules say: its shape is no weight's)
            out[p.name] = Planned(p.name, "weight_norm gain: the norm of its direction", _NormOf(*gains[id(p.tensor)]))
            continue
        rule = next((r for r in scheme.rules if _matches(r, p)), None)
        if rule is None:
            unmatched.append(f"{p.name} ({type(p.module).__name__}, shape {list(p.shape)})")
            continue
        taken.add(id(rule))
        try:
            action = _resolve(rule.spec, p)
        except Exception as e:
            _name_in(e, p.name, rule.label)
            raise
        if isinstance(action, Call):
            _dry_run(action, p)
        out[p.name] = Planned(p.name, rule.label, action, pads.get(id(p.tensor)))
    for name, pl in out.items():  # a gain whose direction is kept is kept too
        if isinstance(pl.action, _NormOf) and pl.action.v in out and _is_keep(out[pl.action.v].action):
            out[name] = Planned(name, out[pl.action.v].rule, KEEP)
    if unmatched:
        raise ValueError(
            f"apply_scheme: scheme {scheme.name!r} has no rule for {len(unmatched)} parameter(s): "
            + ", ".join(unmatched)
            + " (add a rule for them, e.g. scheme.then(Rule(0.0)) for a catch-all, or Rule('keep') to keep them)")
    _warn_untaken(model, scheme, taken)
    return out


def _warn_untaken(model: nn.Module, scheme: Scheme, taken: set) -> None:
    """A warning naming the rules (with conditions, not ``optional``) no parameter took:
    what they were written for gets another rule's init, silently otherwise."""
    idle = [r for r in scheme.rules if id(r) not in taken and not r.optional and not r.catch_all]
    if idle:
        _, level = first_frame_outside(("fastinit",), 1)  # (the warning names the user's line)
        warnings.warn(
            f"scheme {scheme.name!r}: {', '.join(map(repr, idle))} took no parameter of "
            f"{type(model).__name__}: none matches {'it' if len(idle) == 1 else 'them'}, or rules before take "
            "all that do (check name=/module=/ndim=; scheme.before(...) tries rules first). Pass "
            "Rule(..., optional=True) for a rule that may apply to no parameter", stacklevel=level)


def _matches(rule: Rule, p: Param) -> bool:
    """``rule.matches(p)``; an error in its conditions (a ``where=`` predicate) names both."""
    try:
        return rule.matches(p)
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"(apply_scheme: while matching {p.name} against rule {rule.label})")
        raise


def _name_in(e: BaseException, name: str, rule) -> None:
    """Say in ``e`` (a note under its message) which parameter and rule it came from."""
    if hasattr(e, "add_note"):  # (Python >= 3.11)
        e.add_note(f"(apply_scheme: while initializing {name} by rule {rule})")


def _dry_run(call: Call, p: Param) -> None:
    """A drop-in call's argument checks, on a meta tensor of the same shape, before anything is written."""
    from . import _sink

    token = _sink.current.set(None)
    as_cpu = dropin.meta_checked_as_cpu.set(True)  # (bounds and values: torch's meta kernels skip them)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call.fn(torch.empty(p.shape, dtype=p.tensor.dtype, device="meta"), *call.args, **call.kwargs)
    except Exception as e:
        raise type(e)(f"{p.name}: {call!r}: {e}") if type(e) in (ValueError, TypeError, RuntimeError) else e
    finally:
        dropin.meta_checked_as_cpu.reset(as_cpu)
        _sink.current.reset(token)


# ------------------------------------------------------------------ apply


@dataclass
class SchemeReport:
    """What :func:`apply_scheme` did: per parameter, the rule it took and what it got
    (``entries[name] = (rule, description)``); ``deferred``: recorded for
    ``materialize``; ``lsuv``: per layer, LSUV's scale, output variance and iterations."""

    scheme: str
    seed: int | None
    deferred: bool
    entries: dict[str, tuple[str, str]]
    plans: dict[str, Planned]
    lsuv: list[dict] = field(default_factory=list)

    def __getitem__(self, name: str) -> tuple[str, str]:
        return self.entries[name]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        how = "recorded for materialize" if self.deferred else "applied in one pass"
        seed = f", seed {self.seed}" if self.seed is not None else ""
        lines = [f"scheme {self.scheme}: {len(self.entries)} parameters, {how}{seed}"]
        w = max((len(n) for n in self.entries), default=0)
        lines += [f"  {n:<{w}}  [{rule}]  {desc}" for n, (rule, desc) in self.entries.items()]
        for row in self.lsuv:
            lines.append(f"  lsuv {row['layer']}: scale {row['scale']:.4g}, output var {row['var']:.4f} "
                         f"after {row['iterations']} iteration(s)")
        return "\n".join(lines)


def _key63(seed: int, name: str) -> int:
    return key_for_name(seed, name) >> 1


def orthogonal_keyed_(tensor: torch.Tensor, gain: float, seed63: int) -> torch.Tensor:
    """``orthogonal_(tensor, gain)`` drawing from a CPU generator seeded with ``seed63``
    (so an allocated and a deferred model get the same matrix). On a deferred
    model it is recorded as one op, and replayed by ``materialize``."""
    if dropin._replay_or_none(tensor, orthogonal_keyed_, (gain, seed63), {}) or tensor.is_meta:
        return tensor
    return dropin.orthogonal_(tensor, gain, generator=torch.Generator().manual_seed(seed63))


def _set_new_keys(t: torch.Tensor, before: int, key_of: Callable[[int], int]) -> None:
    """Give the fills recorded for meta tensor ``t`` since ``before`` events the keys
    ``key_of(i)`` (as an allocated model's fills drew them)."""
    from .deferred.record import recording_of

    found = recording_of(t)
    if found is None:
        return
    i = 0
    for ev in found[1].events[before:]:
        if ev.kind == "fill" and ev.key is None and ev.spec.random:
            ev.key = key_of(i)
            i += 1


def _n_events(t: torch.Tensor) -> int:
    from .deferred.record import recording_of

    found = recording_of(t)
    return len(found[1].events) if found is not None else 0


@contextlib.contextmanager
def _keyed_default_generators(seed63: int, device: torch.device):
    """torch's default generators of the CPU and, for a CUDA ``device``, of that device
    (the ones a module's own ``reset_parameters()`` draws from) seeded with ``seed63``
    for the block, then put back as they were; no other generator is read or changed
    (``torch.manual_seed`` would reseed every CUDA device, and ``fork_rng`` restores only
    those it is given). Another accelerator's generator is not seeded: a reset there
    draws from it, unkeyed."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed63)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed63)
        yield


def _generator(seed: int | None, name: str, device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(_key63(seed, name))


def _fill(view: torch.Tensor, spec: InitSpec, seed: int | None, keyname: str, keys: dict) -> None:
    meta = view.is_meta
    before = _n_events(view) if meta and seed is not None else 0
    dropin.submit(view, spec, _generator(seed, keyname, view.device))
    if meta and seed is not None and spec.random:
        _set_new_keys(view, before, lambda i: keys[keyname])


def _keys(seed: int | None, plans, prefix: str = "") -> dict[str, int]:
    """The key each seeded fill draws (computed before recording starts: on a deferred
    model, torch ops inside the recording make meta tensors). ``prefix``: see
    :func:`_key_prefix`."""
    if seed is None:
        return {}
    out = {}
    for pl in plans:
        a = pl.action
        names = [f"{prefix}{pl.name}#scheme{i}" for i in range(len(a.specs))] if isinstance(a, Blocks) \
            else [f"{prefix}{pl.name}#scheme"]
        for n in names:
            out[n] = draw_key(torch.Generator().manual_seed(_key63(seed, n)))
    return out


def _blocks(t: torch.Tensor, dim: int, sizes):
    start = 0
    for s in sizes:
        yield t.narrow(dim, start, s)
        start += s


def _drop_events_after(t: torch.Tensor, n: int) -> None:
    """Forget what was recorded for meta tensor ``t`` after its first ``n`` events."""
    from .deferred.record import recording_of

    found = recording_of(t)
    if found is not None:
        del found[1].events[n:]


_WHOLE_TENSOR_FNS = ("orthogonal_", "sparse_", "eye_", "dirac_")


def _refuse_whole_tensor_actions_on_dtensors(plans, params) -> None:
    """Before anything is written: actions that need the whole tensor (orthogonal
    blocks, torch's own reset hooks, structured inits) on a real DTensor would be
    computed per shard, so values would depend on the sharding; refused, naming them."""
    bad = []
    for name, pl in plans.items():
        p = params[name]
        if not dist_mod.is_dtensor(p) or p.is_meta:
            continue
        a = pl.action
        if isinstance(a, (_OrthoAction, _ResetAction)) or (
                isinstance(a, Call) and getattr(a.fn, "__name__", "") in _WHOLE_TENSOR_FNS):
            bad.append(name)
    if bad:
        raise NotImplementedError(
            f"apply_scheme: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} sharded (DTensors), and the "
            f"rule{'' if len(bad) == 1 else 's'} there need{'s' if len(bad) == 1 else ''} the whole tensor "
            "(orthogonal, a module's reset hook, a structured init): each shard would be computed as if it "
            "were the whole. Apply the scheme before sharding, or to a deferred model before materialize")


def _apply_action(p: nn.Parameter, name: str, plan: Planned, seed: int | None, done_resets: set,
                  keys: dict, reset_owned: dict, params: dict) -> None:
    a = plan.action
    t = p.detach()
    if _is_keep(a):
        return
    if isinstance(a, InitSpec):
        _fill(t, a, seed, f"{name}#scheme", keys)
    elif isinstance(a, Blocks):
        for i, (view, spec) in enumerate(zip(_blocks(t, a.dim, a.sizes), a.specs)):
            _fill(view, spec, seed, f"{name}#scheme{i}", keys)
    elif isinstance(a, _OrthoAction):
        size = t.shape[a.dim] // a.blocks
        for i, view in enumerate(_blocks(t, a.dim, [size] * a.blocks)):
            if seed is None:
                dropin.orthogonal_(view, a.gain)
            else:
                orthogonal_keyed_(view, a.gain, _key63(seed, f"{name}#scheme{i}"))
    elif isinstance(a, _ResetAction):
        if id(a.module) in done_resets:
            return
        done_resets.add(id(a.module))
        reset = getattr(a.module, "reset_parameters", None) or getattr(a.module, "_reset_parameters")
        # The reset re-initializes every parameter of the module: those other rules
        # claimed (a bias set to 0, one kept) get back what they held before it.
        others = [q for q in a.module.parameters() if id(q) not in reset_owned.get(id(a.module), ())]
        held = [(q, _n_events(q) if q.is_meta else q.detach().clone()) for q in others]
        if seed is None or t.is_meta:
            reset()
        else:
            with _keyed_default_generators(_key63(seed, f"{name}#reset"), t.device):
                reset()
        for q, before in held:
            if q.is_meta:
                _drop_events_after(q, before)
            else:
                q.detach().copy_(before)
    elif isinstance(a, _NormOf):
        t.copy_(torch.norm_except_dim(params[a.v].detach(), 2, a.dim))
    elif isinstance(a, Call):
        kwargs = dict(a.kwargs)
        meta = t.is_meta
        if seed is not None and "generator" not in kwargs and _takes_generator(a.fn):
            kwargs["generator"] = _generator(seed, f"{name}#scheme", t.device)
        before = _n_events(t) if meta and seed is not None else 0
        a.fn(t, *a.args, **kwargs)
        if meta and seed is not None:
            _set_new_keys(t, before, lambda i: keys[f"{name}#scheme"] if i == 0 else None)
    if plan.padding_idx is not None:
        with torch.no_grad():
            dist_mod.fill_row(t, plan.padding_idx, 0.0)


def _key_prefix(model: nn.Module) -> str:
    """What a seed keys a tensor by besides its name in ``model``: for a block of a
    deferred model, the block's path in the whole model, a model deferred inside
    another one included (so that blocks given the scheme one at a time differ, as
    one call on the whole model makes them)."""
    from .deferred.record import module_handle, path_prefix

    h = module_handle(model)
    if h is None:
        return ""
    path = ".".join(x for x in (path_prefix(h.recording), h.name) if x)
    return f"{path}." if path else ""


# torch.nn.init's functions (and fastinit's) that draw no random numbers: a Call of one
# needs no key.
_DRAWS_NOTHING = frozenset({"constant_", "ones_", "zeros_", "eye_", "dirac_", "_no_grad_fill_", "_no_grad_zero_"})


def _refuse_unkeyed_calls(plans, seed: int) -> None:
    """``seed=`` keys a :class:`Call` through its function's ``generator=``; a function
    without one (a user's wrapper, a lambda) would draw from torch's global generator,
    unkeyed: the same seed would give other values run to run, and a deferred model
    other values than an allocated one. An error before anything is written, naming them."""
    bad = []
    for name, pl in plans.items():
        a = pl.action
        if not isinstance(a, Call) or "generator" in a.kwargs or _takes_generator(a.fn):
            continue
        fn_name = getattr(a.fn, "__name__", repr(a.fn))
        if fn_name in _DRAWS_NOTHING and getattr(a.fn, "__module__", "") in ("fastinit.init", "torch.nn.init"):
            continue
        bad.append(f"{name} ({fn_name})")
    if bad:
        raise ValueError(
            f"apply_scheme(seed={seed}): the Call rule(s) of {', '.join(bad)} cannot be keyed by the seed: the "
            "function takes no generator= argument, so its draws would come from torch's global generator "
            "(other values run to run, and on a deferred model than on an allocated one). Give the function a "
            "generator= parameter and pass it on to fastinit's calls, or apply the scheme without seed= "
            "(torch.manual_seed then governs it)")


def _takes_generator(fn) -> bool:
    """Whether ``fn`` accepts ``generator=``: the replayer's answer (a Python function by
    its signature, torch's random builtins by name: ``torch.Tensor.normal_`` takes one)."""
    from .deferred.execute import _takes_generator as takes

    return takes(fn)


def apply_scheme(model: nn.Module, scheme: "Scheme | str", *, seed: int | None = None, **options) -> SchemeReport:
    """Initialize every parameter of ``model`` by ``scheme`` (a :class:`Scheme` or the
    name of a built-in one, see :data:`SCHEMES`), in one fused pass.

    Example::

        report = fastinit.apply_scheme(model, "xavier_uniform", seed=0)
        model = fastinit.deferred_init(GPT2LMHeadModel, config)
        fastinit.apply_scheme(model, "gpt2")                 # recorded
        fastinit.materialize(model, seed=0)                  # fused with everything else

    Args:
        model: an allocated model (filled now, one engine pass for every fusable
            fill, as :func:`fastinit.batched`), or a deferred one (the calls are
            recorded for :func:`fastinit.materialize`).
        scheme: a :class:`Scheme`, or a built-in name (``fastinit.schemes.SCHEMES``).
        seed: key each parameter by ``(seed, its name)``: the same values on an
            allocated and on a deferred model. None: an allocated model draws keys
            from torch's default generator (``torch.manual_seed`` governs them);
            a deferred one is keyed by ``materialize``'s seed. (On a deferred
            model the seed keys the scheme's fills and orthogonal matrices; a
            module's own ``reset_parameters()`` fallback and the fills after the
            first of a ``Call`` are keyed by ``materialize``'s seed.)
        **options: the scheme's options (``n_layer=``, ``nonlinearity=``,
            ``qkv=3``, ``example_input=`` for LSUV, ...).

    Returns:
        A :class:`SchemeReport`: per parameter, the rule it took and what it got.

    Raises:
        ValueError: parameters no rule matches (all named), a shape a rule cannot
        handle; TypeError: unknown options. Nothing is changed when it raises
        while it plans and applies the rules (an interrupt included): the
        parameters, and the records of a deferred model, are as they were. Its
        last step, the fused pass of the queued fills, is not undone: an
        interrupt there lands once it is whole; an error there (out of memory)
        leaves the parameters it reached written.
    """
    from .deferred.api import block

    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_scheme: expected an nn.Module, got {type(model).__name__}")
    if isinstance(scheme, str):
        scheme = get_scheme(scheme)
    elif not isinstance(scheme, Scheme):
        raise TypeError(f"apply_scheme: scheme must be a Scheme or a built-in name ({', '.join(SCHEMES)}), "
                        f"not {type(scheme).__name__}")
    check_seed(seed, "apply_scheme")
    opts = scheme._options(options)
    plans = _plan(model, scheme, opts)
    if seed is not None:
        _refuse_unkeyed_calls(plans, seed)
    deferred = any(p.is_meta for p in model.parameters())
    if scheme.after is not None and deferred:
        raise ValueError(f"apply_scheme: scheme {scheme.name!r} runs the model on an example batch, which a "
                         "deferred model cannot do: materialize it first, then apply the scheme")
    if scheme.after is not None and hasattr(scheme.after, "validate"):
        scheme.after.validate(model, opts)
    params = dict(model.named_parameters())
    # fills first, then whole-tensor actions, then weight_norm gains (which read their v)
    order = sorted(plans.values(), key=lambda pl: 0 if isinstance(pl.action, (InitSpec, Blocks))
                   else 2 if isinstance(pl.action, _NormOf) else 1)
    done: set = set()
    prefix = _key_prefix(model)
    keys = _keys(seed, order, prefix)
    reset_owned: dict[int, set] = {}  # module -> its parameters that a Reset rule claims
    for pl in plans.values():
        if isinstance(pl.action, _ResetAction):
            reset_owned.setdefault(id(pl.action.module), set()).add(id(params[pl.name]))
    _refuse_whole_tensor_actions_on_dtensors(plans, params)
    if deferred:
        from .deferred.record import recording_of

        late = [n for n in plans if dist_mod.is_dtensor(params[n]) and params[n].is_meta
                and recording_of(params[n]) is None]
        if late:  # (refused here, before the rules for the other parameters record anything)
            raise NotImplementedError(
                f"apply_scheme: {', '.join(late)} {'was' if len(late) == 1 else 'were'} sharded after "
                "deferred_init, so a scheme's writes cannot be recorded (their records are the unsharded "
                "tensors'): apply the scheme before fully_shard/parallelize_module")
    # A step after the fills (LSUV's forward passes) may fail once they are written: the
    # parameters it may change are kept, and put back if it does (its models are small).
    kept = [(q, q.detach().clone()) for q in params.values()] if scheme.after is not None else []
    try:
        with torch.no_grad(), block(module=model if deferred else None, atomic=True):
            for pl in order:
                try:
                    _apply_action(params[pl.name], prefix + pl.name, pl, seed, done, keys, reset_owned, params)
                except Exception as e:
                    _name_in(e, pl.name, pl.rule)
                    raise
        report = SchemeReport(scheme.name, seed, deferred, {n: (pl.rule, pl.describe()) for n, pl in plans.items()},
                              plans)
        if scheme.after is not None:
            report.lsuv = scheme.after(model, opts)
    except BaseException:
        with torch.no_grad():
            for q, before in kept:
                q.detach().copy_(before)
        raise
    return report


# ------------------------------------------------------------------ built-in schemes


_GLOB_OPTIONS = ("residual", "output")  # a built-in's options that give a rule its name globs


def _builtin(factory: Callable[..., Scheme]) -> Callable[..., Scheme]:
    """A built-in scheme's factory: its rules are generic (for any model), so each is
    ``optional`` (none warns when it applies to no parameter of a given model), except a
    rule whose name globs the caller gave (``gpt2(residual=...)``: a typo there warns)."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def make(*args, **options) -> Scheme:
        scheme = factory(*args, **options)
        given = [v for k, v in signature.bind_partial(*args, **options).arguments.items() if k in _GLOB_OPTIONS]
        for r in scheme.rules:
            r.optional = not any(r.name is v for v in given)
        return scheme
    return make


def _norm_rules() -> list[Rule]:
    """torch's norm layers: weight 1, bias 0, whatever their shape (``LayerNorm((8, 16))``
    has a matrix of gains, not a weight matrix). Other norm classes keep what their own
    code gives them: Gemma's RMSNorm scales by ``1 + weight`` and starts at zeros, so
    a generic 1 would be a silent wrong value."""
    return [Rule(1.0, module=TORCH_NORMS, name="weight", label="norm weight"),
            Rule(0.0, module=TORCH_NORMS, name="bias", label="norm bias"),
            Rule(KEEP, module=NORM, label="other norm layers: their own init, kept")]


def _weights_then_zeros(weight_spec, label: str) -> list[Rule]:
    return [*_norm_rules(), Rule(weight_spec, ndim=">=2", label=f"ndim>=2: {label}"),
            Rule(0.0, label="other (biases): zeros")]


_VS_OPTIONS = {"qkv": None, "qkv_names": QKV_NAMES}


def _matrix_of_a_transformer(p: Param) -> bool:
    """Whether ``p`` is a matrix of an ``nn.Transformer``'s encoder or decoder: what its
    ``_reset_parameters`` re-initializes at the end of ``nn.Transformer.__init__`` (not
    what a subclass adds after it, an embedding or a head)."""
    if p.ndim < 2:
        return False
    parts = p.name.split(".")
    return any(parts[i] in ("encoder", "decoder")
               and isinstance(p.model.get_submodule(".".join(parts[:i])), nn.Transformer) for i in range(len(parts) - 1))


@_builtin
def torch_default(**options) -> Scheme:
    r"""torch's own defaults, by module type (torch 2.x ``reset_parameters``):

    * Linear, Conv*d, ConvTranspose*d: weight and bias :math:`U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})`
      (``kaiming_uniform_(a=√5)``; fans as torch computes them from the weight's shape);
    * Bilinear: weight and bias :math:`U(\pm 1/\sqrt{\text{in1\_features}})`;
    * Embedding / EmbeddingBag: :math:`N(0, 1)`, the ``padding_idx`` row zero;
    * RNN / LSTM / GRU (and cells): every parameter :math:`U(\pm 1/\sqrt{\text{hidden\_size}})`;
    * MultiheadAttention: ``in_proj_weight``/``q,k,v_proj_weight`` Xavier uniform, ``in_proj_bias``
      and ``out_proj.bias`` zeros, ``bias_k``/``bias_v`` Xavier normal;
    * norm layers: weight 1, bias 0;
    * an ``nn.Transformer``'s encoder and decoder: every matrix (ndim > 1) Xavier uniform,
      as its ``_reset_parameters`` does after building them (not what a subclass adds);
    * any other module: its own ``reset_parameters()`` (parameters of modules without one are an error).

    Source: ``torch/nn/modules/{linear,conv,sparse,rnn,activation,normalization,batchnorm}.py``.
    """

    def uniform_fan_in(p: Param):
        fans = p.fans() if p.ndim >= 2 else p.weight_fans()
        fan_in = fans[0] if fans else 0
        b = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        return Uniform(-b, b)

    def bilinear(p: Param):
        b = 1 / math.sqrt(p.module.weight.size(1))
        return Uniform(-b, b)

    def rnn(p: Param):
        b = 1.0 / math.sqrt(p.module.hidden_size) if p.module.hidden_size > 0 else 0.0
        return Uniform(-b, b)

    def xavier(dist):
        return VarianceScaling(1.0, "fan_avg", dist, f"xavier_{dist}")

    mha = nn.MultiheadAttention
    return Scheme("torch_default", [
        Rule(xavier("uniform"), where=_matrix_of_a_transformer, label="nn.Transformer: xavier_uniform"),
        Rule(xavier("uniform"), module=mha, name=("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                  "v_proj_weight"), label="MultiheadAttention projections"),
        Rule(0.0, module=mha, name="in_proj_bias", label="MultiheadAttention in_proj_bias"),
        Rule(xavier("normal"), module=mha, name=("bias_k", "bias_v"), label="MultiheadAttention bias_k/v"),
        Rule(0.0, module=nn.modules.linear.NonDynamicallyQuantizableLinear, name="bias",
             label="MultiheadAttention out_proj.bias"),
        Rule(bilinear, module=nn.Bilinear, label="Bilinear U(±1/√in1)"),
        Rule(uniform_fan_in, module=(nn.Linear, nn.modules.conv._ConvNd), label="U(±1/√fan_in)"),
        Rule(Normal(0.0, 1.0), module=(nn.Embedding, nn.EmbeddingBag), name="weight", label="embedding N(0, 1)"),
        Rule(rnn, module=(nn.RNNBase, nn.RNNCellBase), label="recurrent U(±1/√hidden)"),
        *_norm_rules(),
        Rule(Reset(), where=Reset.applies, label="module's reset_parameters"),
    ], doc=torch_default.__doc__, options=options)


@_builtin
def xavier_uniform(gain: float = 1.0, **options) -> Scheme:
    r"""Glorot & Bengio (2010): weights (ndim ≥ 2)
    :math:`U(-a, a)`, :math:`a = \text{gain}\sqrt{6/(\text{fan\_in}+\text{fan\_out})}`;
    norm layers weight 1, bias 0; every other parameter (biases) 0.
    Option ``gain`` (default 1), ``qkv`` (fused-QKV split)."""
    vs = lambda p: VarianceScaling(p.options["gain"], "fan_avg", "uniform", "xavier_uniform")(p)  # noqa: E731
    return Scheme("xavier_uniform", _weights_then_zeros(vs, "xavier_uniform"), doc=xavier_uniform.__doc__,
                  options={"gain": gain, **_VS_OPTIONS, **options})


@_builtin
def xavier_normal(gain: float = 1.0, **options) -> Scheme:
    r"""Glorot & Bengio (2010): weights :math:`N(0, \sigma^2)`,
    :math:`\sigma = \text{gain}\sqrt{2/(\text{fan\_in}+\text{fan\_out})}`; norms 1/0; biases 0."""
    vs = lambda p: VarianceScaling(p.options["gain"], "fan_avg", "normal", "xavier_normal")(p)  # noqa: E731
    return Scheme("xavier_normal", _weights_then_zeros(vs, "xavier_normal"), doc=xavier_normal.__doc__,
                  options={"gain": gain, **_VS_OPTIONS, **options})


def _kaiming(dist: str):
    def spec(p: Param):
        o = p.options
        gain = calculate_gain(o["nonlinearity"], o["a"])
        mode = o["mode"].lower()
        if mode not in ("fan_in", "fan_out"):
            raise ValueError(f"Mode {o['mode']} not supported, please use one of ['fan_in', 'fan_out']")
        return VarianceScaling(gain, mode, dist, f"kaiming_{dist}")(p)
    return spec


@_builtin
def kaiming_uniform(a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", **options) -> Scheme:
    r"""He et al. (2015): weights :math:`U(-b, b)`, :math:`b = \text{gain}\sqrt{3/\text{fan\_mode}}`,
    gain from ``nonlinearity`` and ``a`` as ``torch.nn.init.calculate_gain`` (default
    leaky_relu with a=0: :math:`\sqrt2`); norms 1/0; biases 0."""
    return Scheme("kaiming_uniform", _weights_then_zeros(_kaiming("uniform"), "kaiming_uniform"),
                  doc=kaiming_uniform.__doc__,
                  options={"a": a, "mode": mode, "nonlinearity": nonlinearity, **_VS_OPTIONS, **options})


@_builtin
def kaiming_normal(a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", **options) -> Scheme:
    r"""He et al. (2015): weights :math:`N(0, \sigma^2)`, :math:`\sigma = \text{gain}/\sqrt{\text{fan\_mode}}`;
    norms 1/0; biases 0."""
    return Scheme("kaiming_normal", _weights_then_zeros(_kaiming("normal"), "kaiming_normal"),
                  doc=kaiming_normal.__doc__,
                  options={"a": a, "mode": mode, "nonlinearity": nonlinearity, **_VS_OPTIONS, **options})


@_builtin
def general_rule(**options) -> Scheme:
    r"""The "general rule": weights :math:`U(-1/\sqrt n, 1/\sqrt n)` with :math:`n` = fan_in
    (inputs per unit); biases 0; norms 1/0. Source: the classic PyTorch comparison of
    init schemes (``y = 1.0/np.sqrt(n); m.weight.data.uniform_(-y, y); m.bias.data.fill_(0)``)."""
    spec = VarianceScaling(1.0 / math.sqrt(3.0), "fan_in", "uniform", "U(±1/√fan_in)")
    return Scheme("general_rule", _weights_then_zeros(spec, "U(±1/√fan_in)"), doc=general_rule.__doc__,
                  options={**_VS_OPTIONS, **options})


@_builtin
def general_normal(**options) -> Scheme:
    r"""Weights :math:`N(0, \sigma^2)` with :math:`\sigma = 1/\sqrt n`, :math:`n` = fan_in (the
    classic comparison's "normal distribution with mean 0 and standard deviation
    :math:`y = 1/\sqrt n`", LeCun normal); biases 0; norms 1/0."""
    spec = VarianceScaling(1.0, "fan_in", "normal", "N(0, 1/√fan_in)")
    return Scheme("general_normal", _weights_then_zeros(spec, "N(0, 1/√fan_in)"), doc=general_normal.__doc__,
                  options={**_VS_OPTIONS, **options})


@_builtin
def xavier_uniform_dim(gain: float = 1.0, **options) -> Scheme:
    r"""The loop ``for p in model.parameters(): xavier_uniform_(p) if p.dim() > 1 else zeros_(p)``:
    every parameter with more than one dimension Xavier uniform, every other one
    zeros (norm gains too: they become 0, as that loop makes them)."""
    vs = lambda p: VarianceScaling(p.options["gain"], "fan_avg", "uniform", "xavier_uniform")(p)  # noqa: E731
    return Scheme("xavier_uniform_dim", [Rule(vs, ndim=">1", label="dim>1: xavier_uniform"),
                                         Rule(0.0, label="dim<=1: zeros")],
                  doc=xavier_uniform_dim.__doc__, options={"gain": gain, **_VS_OPTIONS, **options})


@_builtin
def dcgan(std: float = 0.02, **options) -> Scheme:
    r"""DCGAN (Radford et al. 2015; PyTorch's DCGAN tutorial ``weights_init``):
    Conv/ConvTranspose weights :math:`N(0, 0.02^2)`, BatchNorm weight :math:`N(1, 0.02^2)`
    and bias 0, conv biases 0. Other layers have no rule (the tutorial leaves them alone):
    they are reported as an error; add a rule for them."""
    s = lambda p: Normal(0.0, p.options["std"])  # noqa: E731
    return Scheme("dcgan", [
        Rule(s, module="*Conv*", name="weight", label="conv N(0, std)"),
        Rule(0.0, module="*Conv*", name="bias", label="conv bias 0"),
        Rule(lambda p: Normal(1.0, p.options["std"]), module="*BatchNorm*", name="weight",
             label="BatchNorm N(1, std)"),
        Rule(0.0, module="*BatchNorm*", name="bias", label="BatchNorm bias 0"),
    ], doc=dcgan.__doc__, options={"std": std, **options})


def infer_n_layer(model: nn.Module) -> int:
    """The number of transformer blocks: ``config.n_layer``/``num_hidden_layers``/...,
    else the length of the longest ModuleList of same-type modules."""
    for src in (getattr(model, "config", None), model):
        for attr in ("n_layer", "num_hidden_layers", "num_layers", "n_layers"):
            v = getattr(src, attr, None) if src is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    best = 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1:
            best = max(best, len(m))
    if best:
        return best
    raise ValueError("cannot infer the number of layers of this model: pass n_layer=...")


def infer_d_model(model: nn.Module) -> int:
    """The hidden size: ``config.hidden_size``/``n_embd``/``d_model``, else the first Embedding's dim."""
    cfg = getattr(model, "config", None)
    for src in (cfg, model):
        for attr in ("hidden_size", "n_embd", "d_model", "dim"):
            v = getattr(src, attr, None) if src is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
    raise ValueError("cannot infer the hidden size of this model: pass d_model=...")


@_builtin
def gpt2(std: float = 0.02, n_layer: int | None = None, residual=GPT2_RESIDUAL, **options) -> Scheme:
    r"""GPT-2 (Radford et al. 2019; transformers' ``GPT2PreTrainedModel._init_weights``, nanoGPT):
    every weight with ndim ≥ 2 (Linear, Conv1D, Embedding) :math:`N(0, 0.02^2)`, the
    residual projections (``residual`` globs, default ``*c_proj.weight``)
    :math:`N(0, (0.02/\sqrt{2\,n_\text{layer}})^2)`, biases 0, LayerNorm 1/0, padding rows 0.
    ``n_layer`` from the option, else inferred (``config.n_layer``, or the longest ModuleList)."""

    def res(p: Param):
        n = p.options["n_layer"] or infer_n_layer(p.model)
        return Normal(0.0, p.options["std"] / math.sqrt(2 * n))

    return Scheme("gpt2", [
        Rule(res, name=residual, ndim=">=2", label="residual N(0, std/√(2·n_layer))"),
        *_norm_rules(),
        Rule(lambda p: Normal(0.0, p.options["std"]), ndim=">=2", label="N(0, std)"),
        Rule(0.0, label="biases 0"),
    ], doc=gpt2.__doc__, options={"std": std, "n_layer": n_layer, **options})


@_builtin
def neox(d_model: int | None = None, n_layer: int | None = None, output=NEOX_OUTPUT, **options) -> Scheme:
    r"""GPT-NeoX (Black et al. 2022; ``megatron/model/init_functions.py``): "small init"
    (Nguyen & Salazar 2019) :math:`N(0, 2/(5d))`, i.e. :math:`\sigma = \sqrt{2/(5d)}`, for every weight
    with ndim ≥ 2, and "Wang init" :math:`\sigma = 2/(n_\text{layer}\sqrt d)` for each block's
    output projections (``output`` globs: ``attention.dense``, ``dense_4h_to_h``, ``c_proj``,
    ``o_proj``, ``down_proj``, ``out_proj``); biases 0; norms 1/0. ``d_model`` and
    ``n_layer`` from options, else inferred."""

    def d(p):
        return p.options["d_model"] or infer_d_model(p.model)

    def wang(p: Param):
        n = p.options["n_layer"] or infer_n_layer(p.model)
        return Normal(0.0, 2.0 / n / math.sqrt(d(p)))

    return Scheme("neox", [
        Rule(wang, name=output, ndim=">=2", label="wang 2/(n_layer·√d)"),
        *_norm_rules(),
        Rule(lambda p: Normal(0.0, math.sqrt(2.0 / (5 * d(p)))), ndim=">=2", label="small_init √(2/(5d))"),
        Rule(0.0, label="biases 0"),
    ], doc=neox.__doc__, options={"d_model": d_model, "n_layer": n_layer, **options})


@_builtin
def fused_qkv(qkv=3, **options) -> Scheme:
    r"""Xavier uniform with fused-QKV-aware fans: a matrix named by ``qkv_names``
    (``c_attn``, ``query_key_value``, ``qkv``, ``Wqkv``, ``in_proj_weight``) is split
    into ``qkv`` blocks of output rows (3 equal blocks, or sizes such as
    ``(d, d_kv, d_kv)`` for grouped-query attention), each with its own fans:
    :math:`a = \sqrt{6/(\text{fan\_in} + \text{fan\_out}/3)}` for three equal blocks
    instead of the whole matrix's :math:`\sqrt{6/(\text{fan\_in}+\text{fan\_out})}`
    (llm-foundry's ``fused_init_helper_``)."""
    s = xavier_uniform(qkv=qkv, **options)
    s.name, s.doc = "fused_qkv", fused_qkv.__doc__
    return s


def _gates(p: Param) -> int:
    mode = getattr(p.module, "mode", None)
    if isinstance(p.module, (nn.LSTM, nn.LSTMCell)) or mode == "LSTM":
        return 4
    if isinstance(p.module, (nn.GRU, nn.GRUCell)) or mode == "GRU":
        return 3
    return 1


@_builtin
def orthogonal_rnn(gain: float = 1.0, forget_bias: float = 1.0, **options) -> Scheme:
    r"""Recurrent nets (Saxe et al. 2013; Jozefowicz et al. 2015): each gate's block
    of ``weight_hh`` orthogonal (times ``gain``), ``weight_ih`` Xavier uniform with
    per-gate fans, biases 0 except the LSTM forget gate's ``bias_ih`` block, set to
    ``forget_bias`` = 1 (``bias_hh`` stays 0: the gate's total bias is 1); ``weight_hr``
    (projections) orthogonal; other weights Xavier uniform, norms 1/0, biases 0."""
    rec = (nn.RNNBase, nn.RNNCellBase)

    def hh(p):
        return Orthogonal(p.options["gain"], _gates)(p)

    def hr(p):  # a projection (LSTM proj_size): one matrix, no gates
        return Orthogonal(p.options["gain"], 1)(p)

    def ih(p):
        g = _gates(p)
        rows = p.shape[0] // g
        spec = VarianceScaling(1.0, "fan_avg", "uniform", "xavier_uniform").spec(p, (p.shape[1], rows))
        return spec

    def bias_ih(p):
        g = _gates(p)
        h = p.shape[0] // g
        if g != 4:
            return 0.0
        return Blocks(0, [h, h, 2 * h], [Constant(0.0), Constant(float(p.options["forget_bias"])), Constant(0.0)])

    return Scheme("orthogonal_rnn", [
        Rule(hh, module=rec, name="weight_hh*", label="recurrent orthogonal (per gate)"),
        Rule(hr, module=rec, name="weight_hr*", label="projection orthogonal"),
        Rule(ih, module=rec, name="weight_ih*", label="input xavier_uniform (per gate)"),
        Rule(bias_ih, module=rec, name="bias_ih*", label="bias_ih (LSTM forget gate = forget_bias)"),
        Rule(0.0, module=rec, label="recurrent bias 0"),
        *_weights_then_zeros(VarianceScaling(1.0, "fan_avg", "uniform", "xavier_uniform"), "xavier_uniform"),
    ], doc=orthogonal_rnn.__doc__, options={"gain": gain, "forget_bias": forget_bias, **options})


# ------------------------------------------------------------------ LSUV


def _lsuv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) \
                and not _module_ok(m, NORM) and not any(True for _ in m.children()):
            out.append((name, m))
    return out


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for y in x:
            t = _first_tensor(y)
            if t is not None:
                return t
    return getattr(x, "last_hidden_state", None) if not isinstance(x, (list, tuple, dict)) else None


@contextlib.contextmanager
def measuring(model: nn.Module):
    """The model in eval mode for forward passes that only measure (LSUV, the audit):
    after the block every module's ``training`` flag and every buffer is as it was
    (a frozen BatchNorm stays in eval mode; an observer's min/max, which move even in
    eval mode, are put back)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:  # (only what moved: an expanded or inference buffer cannot be written)
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


def run_model(model: nn.Module, example_input):
    """``model(example_input)``: a tuple is unpacked into arguments, a dict into keywords."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


class _LSUV:
    """Mishkin & Matas (2016), "All you need is a good init": after an orthogonal
    init, each layer in the order the forward pass reaches it is rescaled,
    ``W *= Var(output)^(-1/p)``, until its output variance on the example batch is
    within ``tol`` of 1 (at most ``max_iter`` times). ``p`` is 2 (the output is linear
    in ``W``) until a step shows otherwise: a weight tied to one the batch passes
    before (an lm_head tied to the embedding) scales the output twice, ``p = 4``."""

    def validate(self, model, opts):
        if opts.get("example_input") is None:
            raise ValueError("apply_scheme: scheme 'lsuv' needs an example batch: example_input=...")
        if isinstance(opts["tol"], bool) or not isinstance(opts["tol"], numbers.Real) or not opts["tol"] > 0:
            raise ValueError(f"apply_scheme: lsuv tol must be a number > 0, got {opts['tol']!r}")
        if not (isinstance(opts["max_iter"], int) and opts["max_iter"] >= 1):
            raise ValueError(f"apply_scheme: lsuv max_iter must be an int >= 1, got {opts['max_iter']}")

    def __call__(self, model: nn.Module, opts: dict) -> list[dict]:
        x, tol, max_iter = opts["example_input"], float(opts["tol"]), opts["max_iter"]
        layers = dict(_lsuv_layers(model))
        # The order the forward pass reaches them.
        seen: list[str] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n) if n not in seen else None)
                 for n, m in layers.items()]
        rows = []
        try:
            # no dropout, BatchNorm on its running statistics (measuring puts every buffer back)
            with measuring(model), torch.no_grad():
                run_model(model, x)
                for h in hooks:
                    h.remove()
                hooks = []
                for name in seen:
                    m = layers[name]
                    out: list = []
                    h = m.register_forward_hook(lambda mod, i, o: out.append(_first_tensor(o)))
                    hooks = [h]
                    scale, var, it = 1.0, float("nan"), 0
                    power, last = 2.0, None  # Var(output) ~ scale^power: 2 for a layer whose output is linear in W
                    try:
                        for it in range(1, max_iter + 1):
                            out.clear()
                            run_model(model, x)
                            var = out[0].float().var().item()
                            if not math.isfinite(var) or var <= 0:
                                raise ValueError(f"apply_scheme: lsuv: layer {name} has output variance {var} "
                                                 "on the example batch; it cannot be rescaled to 1")
                            if last is not None and last[1] != var and abs(math.log(last[0])) > 1e-6:
                                # the power the last step showed: a weight tied to one the batch passed
                                # before (an lm_head tied to the embedding) scales the output twice, and
                                # W /= sqrt(Var) then swings between Var and 1 / Var
                                seen_power = math.log(var / last[1]) / math.log(last[0])
                                if seen_power > 0.5:
                                    power = seen_power
                            if abs(var - 1.0) < tol:
                                break
                            k = var ** (-1.0 / power)
                            m.weight.mul_(k)
                            scale *= k
                            last = (k, var)
                            if it == max_iter:
                                out.clear()
                                run_model(model, x)
                                var = out[0].float().var().item()
                    finally:
                        h.remove()
                        hooks = []
                    rows.append({"layer": name, "scale": scale, "var": var, "iterations": it})
            # each layer once more, all rescaled: a later layer whose weight an earlier one also
            # uses (tied) moves that one's variance again
            final: dict[str, float] = {}

            def measure(mod, i, o, n):  # (a hook returns None: its output stays the layer's)
                final.setdefault(n, _first_tensor(o).float().var().item())

            hooks = [layers[n].register_forward_hook(functools.partial(measure, n=n)) for n in seen]
            with measuring(model), torch.no_grad():
                run_model(model, x)
        finally:
            for h in hooks:
                h.remove()
        off = [f"{n} ({v:.4g})" for n, v in final.items() if not abs(v - 1.0) < tol]
        unrun = [n for n in layers if n not in seen]
        if off or unrun:
            _, level = first_frame_outside(("fastinit",), 1)
            warnings.warn(
                "apply_scheme: lsuv: " + "; ".join(
                    ([f"output variance not within {tol:g} of 1 once every layer is rescaled (at most {max_iter} "
                      f"step(s) each; a weight tied to an earlier layer's moves that layer too): {', '.join(off)}"]
                     if off else [])
                    + ([f"not rescaled, as the example batch runs no forward of theirs (a layer whose weight "
                        f"its parent uses directly, as nn.MultiheadAttention's out_proj): {', '.join(unrun)}"]
                       if unrun else [])), stacklevel=level)
        return rows


@_builtin
def lsuv(tol: float = 0.1, max_iter: int = 10, example_input=None, **options) -> Scheme:
    r"""LSUV, layer-sequential unit variance (Mishkin & Matas 2016, "All you need is a
    good init"): every weight with ndim ≥ 2 orthogonal, biases 0, norms 1/0; then, on
    ``example_input``, each Linear/Conv layer in forward order is rescaled by
    :math:`1/\sqrt{\operatorname{Var}(\text{output})}` until
    :math:`|\operatorname{Var}(\text{output}) - 1| < \text{tol}` (``max_iter`` tries). Runs
    in eval mode (no dropout; BatchNorm on its running statistics); needs an allocated model."""
    return Scheme("lsuv", [
        *_norm_rules(),
        Rule(Orthogonal(1.0), ndim=">=2", label="orthogonal"),
        Rule(0.0, label="biases 0"),
    ], doc=lsuv.__doc__, options={"tol": tol, "max_iter": max_iter, "example_input": example_input, **options},
        after=_LSUV())


#: Built-in schemes by name: ``apply_scheme(model, name, **options)``.
SCHEMES: dict[str, Callable[..., Scheme]] = {
    "torch_default": torch_default,
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "kaiming_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "general_rule": general_rule,
    "general_normal": general_normal,
    "xavier_uniform_dim": xavier_uniform_dim,
    "dcgan": dcgan,
    "gpt2": gpt2,
    "neox": neox,
    "fused_qkv": fused_qkv,
    "orthogonal_rnn": orthogonal_rnn,
    "lsuv": lsuv,
}


def get_scheme(name: str) -> Scheme:
    """The built-in scheme called ``name`` with its default options."""
    try:
        return SCHEMES[name]()
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; built-in schemes: {', '.join(SCHEMES)}") from None


__all__ = ["Scheme", "Rule", "Call", "Param", "Planned", "SchemeReport", "VarianceScaling", "Orthogonal", "Reset",
           "Blocks", "KEEP", "NORM", "QKV_NAMES", "SCHEMES", "apply_scheme", "get_scheme", "infer_n_layer",
           "infer_d_model", "orthogonal_keyed_", *SCHEMES]
