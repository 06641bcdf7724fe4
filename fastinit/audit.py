r"""Init audit: what did each parameter of a model actually get?

:func:`audit` looks at every parameter (shape, fans, mean, std, min, max,
:math:`\text{std}\cdot\sqrt{\text{fan\_in}}`), names the known scheme it matches
within sampling error, and flags what goes wrong in practice:

* ``symmetry``: a weight matrix whose output units all have the same weights (a
  constant matrix: zeros, ones) when a weight matrix taking that many inputs weighs
  all its inputs alike (its columns are alike, as in a constant matrix): units
  that start alike and feed alike weights get the same gradient, and never differ
  (the zeros/ones rows of the classic comparison stay at chance). A zero matrix
  followed by different weights (a zero-initialized head, Fixup's or LoRA's zero
  matrices) is not flagged: the weights after it, or the targets, tell its units
  apart at the first step (matched by size: layers are not traced);
* ``nonfinite``: NaN or inf values;
* ``uninitialized``: values that look like uninitialized memory (subnormal or
  huge magnitudes, as ``torch.empty`` leaves them);
* ``band``: a weight's std far outside the Glorot/He band
  (:math:`\min(\sqrt{2/(n_i+n_o)}, 1/\sqrt{3 n_i})/4` to :math:`4\max(\sqrt{2/n_i}, \sqrt{2/n_o})`),
  unless it is a std chosen whatever the fans (GPT-2/BERT's N(0, 0.02), N(0, 0.01),
  residual projections scaled by depth);
* ``scheme``: a std that is not what ``scheme=`` says it should be.

With ``example_input``, one forward and one backward pass (hooks on every layer
that holds parameters; eval mode; nothing in the model changes, not even
``.grad``) give each layer's activation std and gradient std by depth, flagging
``exploding``/``vanishing`` signal and gradients.

On a deferred model (:func:`fastinit.deferred_init`) the audit reads the plan
(:func:`fastinit.planned`): what each tensor *will* get, before anything is allocated.

Output: ``str(a)`` (a table), ``a.to_dict()``, ``a.to_json(path)``, ``a.plot(path)`` (PNG,
with matplotlib).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .schemes import (NORM, QKV_NAMES, Blocks, Param, _glob, _module_ok, _OrthoAction, _transposed, infer_d_model,
                      infer_n_layer)
from .specs import Constant, InitSpec, Normal, TruncNormal, Uniform

#: Sampled elements per tensor for the moments (min/max/NaN counts use every element).
SAMPLE = 1 << 22
#: A weight's std outside [lo / BAND, hi * BAND] of the Glorot/He band is flagged.
BAND = 4.0
#: Activation or gradient std changing by more than this factor from the first to the last layer is flagged.
SIGNAL_RATIO = 100.0


@dataclass
class ParamAudit:
    name: str
    shape: list
    dtype: str
    module: str
    fan_in: int | None
    fan_out: int | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    std_sqrt_fan_in: float | None
    matches: list = field(default_factory=list)
    expected_std: float | None = None  # from scheme=, else from the best match
    expected: str | None = None
    planned: str | None = None  # deferred: what materialize will do
    flags: list = field(default_factory=list)


@dataclass
class LayerAudit:
    depth: int
    name: str
    module: str
    act_std: float | None
    grad_std: float | None


@dataclass
class Flag:
    where: str
    kind: str
    message: str


class Audit:
    """The result of :func:`audit`: ``params``, ``layers``, ``flags``; ``ok`` when nothing is flagged."""

    def __init__(self, model_name: str, deferred: bool, device: str, scheme: str | None,
                 params: list[ParamAudit], layers: list[LayerAudit], flags: list[Flag], input_shape=None):
        self.model_name, self.deferred, self.device, self.scheme = model_name, deferred, device, scheme
        self.params, self.layers, self.flags, self.input_shape = params, layers, flags, input_shape

    @property
    def ok(self) -> bool:
        return not self.flags

    def flagged(self, kind: str) -> list[Flag]:
        return [f for f in self.flags if f.kind == kind]

    def to_dict(self) -> dict:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean({"model": self.model_name, "deferred": self.deferred, "device": self.device,
                      "scheme": self.scheme, "input_shape": self.input_shape, "ok": self.ok,
                      "parameters": [asdict(p) for p in self.params], "layers": [asdict(l) for l in self.layers],
                      "flags": [asdict(f) for f in self.flags]})

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    # ------------------------------------------------------------ table

    def table(self) -> str:
        n = len(self.params)
        what = f"on {self.device}" if not self.deferred else "plan of a deferred model (nothing allocated)" \
            if self.device == "meta" else f"partly materialized: real tensors on {self.device}, the rest from the plan"
        lines = [f"audit of {self.model_name}: {n} parameters, {what}"
                 + (f", scheme {self.scheme}" if self.scheme else "")]
        head = ["parameter", "shape", "fan_in", "fan_out", "mean", "std", "min", "max", "std·√fan_in",
                "matches", "flags"]
        rows = []
        for p in self.params:
            match = p.matches[0] if p.matches else (p.planned or "-")
            if len(p.matches) > 1:
                match += f" (+{len(p.matches) - 1})"
            rows.append([p.name, "x".join(map(str, p.shape)) or "scalar", _i(p.fan_in), _i(p.fan_out), _g(p.mean),
                         _g(p.std), _g(p.min), _g(p.max), _g(p.std_sqrt_fan_in), match, ", ".join(p.flags) or "ok"])
        lines += _aligned(head, rows)
        if self.layers:
            lines.append("")
            lines.append(f"forward/backward on an input of shape {self.input_shape} (eval mode):")
            lines += _aligned(["depth", "layer", "module", "activation std", "gradient std"],
                              [[str(l.depth), l.name, l.module, _g(l.act_std), _g(l.grad_std)] for l in self.layers])
        lines.append("")
        if self.flags:
            lines.append(f"{len(self.flags)} flag(s):")
            lines += [f"  [{f.kind}] {f.where}: {f.message}" for f in self.flags]
        else:
            lines.append("no flags")
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return f"<Audit of {self.model_name}: {len(self.params)} parameters, {len(self.flags)} flags>"

    # ------------------------------------------------------------ plot

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG: each weight's std against its expectation (the scheme's, or its best
        match's), and activation/gradient std by depth. Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("Audit.plot needs matplotlib (pip install matplotlib)") from e
        ws = [p for p in self.params if len(p.shape) >= 2 and p.std is not None]
        panels = 2 if self.layers else 1
        fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
        ax = axes[0][0]
        x = list(range(len(ws)))
        ax.plot(x, [max(p.std, 1e-12) for p in ws], "o", ms=3.5, label="measured std")
        ex = [(i, p.expected_std) for i, p in enumerate(ws) if p.expected_std]
        if ex:
            lab = f"scheme {self.scheme}" if self.scheme else "best-matching known scheme"
            ax.plot([i for i, _ in ex], [e for _, e in ex], "_", ms=11, mew=1.6, color="C3",
                    label=f"expected ({lab})")
        bad = [(i, max(p.std, 1e-12)) for i, p in enumerate(ws) if p.flags]
        if bad:
            ax.plot([i for i, _ in bad], [s for _, s in bad], "x", ms=7, color="k", label="flagged")
        ax.set_yscale("log")
        ax.set_xlabel("weight (ndim ≥ 2), in model order")
        ax.set_ylabel("std (log scale)")
        ax.set_title(f"{self.model_name}: weight std")
        ax.legend(fontsize=8)
        if self.layers:
            ax2 = axes[0][1]
            kinds = list(dict.fromkeys(l.module for l in self.layers))
            for k, kind in enumerate(kinds):
                rows = [l for l in self.layers if l.module == kind]
                d = [l.depth for l in rows]
                ax2.plot(d, [l.act_std if l.act_std else float("nan") for l in rows], "o-", ms=3.5, lw=0.8,
                         color=f"C{k % 10}", label=f"activation std, {kind}")
                ax2.plot(d, [l.grad_std if l.grad_std else float("nan") for l in rows], "^--", ms=3.5, lw=0.8,
                         color=f"C{k % 10}", alpha=0.7, label=f"gradient std, {kind}")
            ax2.set_yscale("log")
            ax2.set_xlabel("depth (layers with parameters, forward order)")
            ax2.set_ylabel("std (log scale)")
            ax2.set_title(f"one forward/backward pass, input {self.input_shape}")
            ax2.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _i(v) -> str:
    return "-" if v is None else str(v)


def _g(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def _aligned(head, rows) -> list[str]:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |",
           "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    out += ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows]
    return out


# ------------------------------------------------------------------ known schemes


@dataclass(frozen=True)
class _Cand:
    label: str
    kind: str  # "uniform" (center, half-width), "normal" (mean, std), "constant" (value)
    a: float
    b: float
    deliberate: bool = False  # a std chosen whatever the fans (depth-scaled residual projections, GPT-2's 0.02)

    @property
    def std(self) -> float:
        if self.kind == "uniform":
            return self.b / math.sqrt(3.0)
        if self.kind == "normal":
            return self.b
        return 0.0


def _candidates(p: Param, model_facts: dict) -> list[_Cand]:
    out = []
    if p.ndim >= 2:
        fi, fo = p.fans()
        if fi > 0 and fo > 0:
            out += [
                _Cand("U(±1/√fan_in) (torch default, general rule)", "uniform", 0.0, 1 / math.sqrt(fi)),
                _Cand("xavier_uniform", "uniform", 0.0, math.sqrt(6.0 / (fi + fo))),
                _Cand("xavier_normal", "normal", 0.0, math.sqrt(2.0 / (fi + fo))),
                _Cand("kaiming_uniform (relu, fan_in)", "uniform", 0.0, math.sqrt(6.0 / fi)),
                _Cand("kaiming_normal (relu, fan_in)", "normal", 0.0, math.sqrt(2.0 / fi)),
                _Cand("kaiming_uniform (relu, fan_out)", "uniform", 0.0, math.sqrt(6.0 / fo)),
                _Cand("kaiming_normal (relu, fan_out)", "normal", 0.0, math.sqrt(2.0 / fo)),
                _Cand("N(0, 1/√fan_in) (LeCun)", "normal", 0.0, 1 / math.sqrt(fi)),
            ]
            if _glob(p.name, QKV_NAMES) and fo % 3 == 0:
                out.append(_Cand("xavier_uniform per q/k/v block", "uniform", 0.0,
                                 math.sqrt(6.0 / (fi + fo / 3))))
        out += [_Cand("N(0, 0.02) (GPT-2/BERT)", "normal", 0.0, 0.02, True), _Cand("N(0, 0.01)", "normal", 0.0, 0.01, True),
                _Cand("N(0, 1) (torch Embedding)", "normal", 0.0, 1.0)]
        n_layer, d = model_facts.get("n_layer"), model_facts.get("d_model")
        if n_layer:
            out.append(_Cand(f"GPT-2 residual N(0, 0.02/√(2·{n_layer}))", "normal", 0.0, 0.02 / math.sqrt(2 * n_layer),
                             True))
        if d:
            out.append(_Cand(f"small_init N(0, √(2/(5·{d})))", "normal", 0.0, math.sqrt(2.0 / (5 * d))))
            if n_layer:
                out.append(_Cand(f"wang N(0, 2/({n_layer}·√{d}))", "normal", 0.0, 2.0 / n_layer / math.sqrt(d),
                                 True))
    else:
        wf = p.weight_fans()
        if wf and wf[0] > 0:
            out.append(_Cand("U(±1/√fan_in) (torch default bias)", "uniform", 0.0, 1 / math.sqrt(wf[0])))
        h = getattr(p.module, "hidden_size", None)
        if isinstance(p.module, (nn.RNNBase, nn.RNNCellBase)) and h:
            out.append(_Cand("U(±1/√hidden) (torch default RNN)", "uniform", 0.0, 1 / math.sqrt(h)))
        out += [_Cand("N(1, 0.02) (DCGAN BatchNorm)", "normal", 1.0, 0.02), _Cand("N(0, 0.02)", "normal", 0.0, 0.02)]
    if isinstance(p.module, (nn.RNNBase, nn.RNNCellBase)) and p.ndim >= 2 and getattr(p.module, "hidden_size", 0):
        out.append(_Cand("U(±1/√hidden) (torch default RNN)", "uniform", 0.0, 1 / math.sqrt(p.module.hidden_size)))
    return out


def _spec_moments(spec: InitSpec) -> tuple[float, float, float, float]:
    """mean, std, min, max of a spec's distribution."""
    if isinstance(spec, Constant):
        return spec.value, 0.0, spec.value, spec.value
    if isinstance(spec, Uniform):
        return (spec.a + spec.b) / 2, (spec.b - spec.a) / math.sqrt(12.0), spec.a, spec.b
    if isinstance(spec, Normal):
        return spec.mean, spec.std, -math.inf if spec.std else spec.mean, math.inf if spec.std else spec.mean
    if isinstance(spec, TruncNormal):
        s = spec.std
        if s == 0:
            v = min(max(spec.mean, spec.a), spec.b)
            return v, 0.0, v, v
        al, be = (spec.a - spec.mean) / s, (spec.b - spec.mean) / s
        phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        zz = cdf(be) - cdf(al)
        m = (phi(al) - phi(be)) / zz
        var = 1 + (al * phi(al) - be * phi(be)) / zz - m * m
        return spec.mean + s * m, s * math.sqrt(max(var, 0.0)), spec.a, spec.b
    raise TypeError(repr(spec))


def _action_std(action, shape: list) -> float | None:
    """The std a scheme's action gives a tensor of ``shape``, or None (kept, a module's own
    reset, a call): a spec's; blocks along a dim, the pooled std of their specs'
    ``sqrt(sum n_i (s_i^2 + m_i^2) / n - m^2)``; an orthogonal matrix (per block) of
    ``r`` rows and ``c`` columns, times ``gain``: its squares sum to ``min(r, c)``, so its
    elements' root mean square is ``gain / sqrt(max(r, c))`` (their mean is ~0)."""
    if isinstance(action, InitSpec):
        return _spec_moments(action)[1]
    n = math.prod(shape)
    if not n:
        return None
    if isinstance(action, Blocks):
        per = n // shape[action.dim]  # elements per unit of the split dim
        moments = [(k * per, *_spec_moments(sp)[:2]) for k, sp in zip(action.sizes, action.specs)]
        mean = sum(w * m for w, m, _ in moments) / n
        return math.sqrt(max(sum(w * (s * s + m * m) for w, m, s in moments) / n - mean * mean, 0.0))
    if isinstance(action, _OrthoAction) and len(shape) >= 2:
        rows = shape[action.dim] // action.blocks
        return abs(action.gain) / math.sqrt(max(rows, n // shape[action.dim]))
    return None


def _spec_matches(spec: InitSpec, c: _Cand) -> bool:
    def close(a, b):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-30)
    if c.kind == "uniform" and isinstance(spec, Uniform):
        return close(spec.a, c.a - c.b) and close(spec.b, c.a + c.b)
    if c.kind == "normal" and isinstance(spec, TruncNormal) and spec.std > 0 \
            and min(spec.mean - spec.a, spec.b - spec.mean) >= 6 * spec.std:  # trunc_normal_(std=.02): bounds ±100σ
        return close(spec.mean, c.a) and close(spec.std, c.b)
    if c.kind == "normal" and isinstance(spec, Normal):
        return close(spec.mean, c.a) and close(spec.std, c.b)
    return False


def _std_tol(n: int, dtype: torch.dtype) -> float:
    rounding = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}.get(dtype, 0.0)
    return 6.0 * math.sqrt(1.0 / (2 * max(n, 1))) + 2 * rounding + 1e-6


def _matches(st: dict, c: _Cand, n: int, dtype) -> bool:
    """Whether measured stats ``st`` are consistent with candidate ``c`` (within sampling error)."""
    std, mean = st["std"], st["mean"]
    if std is None or c.std <= 0 or n < 8:
        return False
    if abs(std / c.std - 1) > _std_tol(n, dtype):
        return False
    if abs(mean - c.a) > 6 * c.std / math.sqrt(n) + 1e-7:
        return False
    slack = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-6)
    lo, hi = st["min"] - c.a, st["max"] - c.a
    if c.kind == "uniform":
        if lo < -c.b * (1 + slack) or hi > c.b * (1 + slack):
            return False
        reach = c.b * (1 - min(1.0, 40.0 / n)) * (1 - slack)  # the extremes of n uniform draws get this close
        return -lo >= reach and hi >= reach
    # normal: tails beyond a uniform's sqrt(3) std when there are enough draws
    return n < 200 or max(-lo, hi) > 2.2 * c.std


# ------------------------------------------------------------------ audit


def _too_many_subnormals(st: dict, dtype: torch.dtype) -> bool:
    """More subnormal values than a drawn init could make: a law of std s has density
    at most 0.4/s near 0 (the normal's; a uniform's is 0.29/s), so about
    ``0.8 n tiny / s`` of ``n`` values fall below the dtype's smallest normal ``tiny``.
    In float16 (tiny 6.1e-5) that is a few per thousand at s = 0.02; in float32 and
    bfloat16 (tiny 1.2e-38) none."""
    sub = st["subnormal"]
    if not sub:
        return False
    std = st["std"]
    if not std or not math.isfinite(std):
        return True
    return sub > 10 * 0.8 * st["n"] * torch.finfo(dtype).tiny / std  # (ten times that: no sampling flake)


def _stats(t: torch.Tensor) -> dict:
    """Moments (of a strided sample of at most :data:`SAMPLE` elements), extremes and
    counts of NaN/inf, subnormal and huge values (of every element). A complex tensor's
    are those of its real and imaginary parts together (each part of torch's complex
    ``randn`` has std 1/√2)."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    flat = x.reshape(-1)
    if not flat.dtype.is_floating_point:
        flat = flat.double()
    n = flat.numel()
    empty = {"n": n, "mean": None, "std": None, "min": None, "max": None, "nonfinite": 0, "subnormal": 0,
             "huge": 0, "constant": False}
    if n == 0:
        return empty
    mn, mx = (v.item() for v in torch.aminmax(flat))
    nonfinite = 0
    vals = flat
    if not (math.isfinite(mn) and math.isfinite(mx)):
        fin = torch.isfinite(flat)
        nonfinite = int(n - fin.sum().item())
        vals = flat[fin]
        if vals.numel() == 0:
            return {**empty, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                    "nonfinite": nonfinite}
        mn, mx = (v.item() for v in torch.aminmax(vals))
    sample = vals if vals.numel() <= SAMPLE else vals[:: vals.numel() // SAMPLE]
    sf = sample.float() if sample.dtype != torch.float64 else sample
    if sf.numel() > 1:
        std, mean = (v.item() for v in torch.std_mean(sf, unbiased=False))
    else:
        std, mean = 0.0, sf.item()
    a = vals.abs()
    huge = int((a > 1e8).sum().item()) if max(abs(mn), abs(mx)) > 1e8 else 0
    tiny = torch.finfo(vals.dtype).tiny
    sub = 0
    if a.amin().item() < tiny:  # zeros or subnormals: count the subnormals
        sub = int(((a < tiny) & (a > 0)).sum().item())
    return {"n": sample.numel(), "mean": mean, "std": std, "min": float(mn), "max": float(mx),
            "nonfinite": nonfinite, "subnormal": sub, "huge": huge, "constant": mn == mx}


def _same_units(p: Param) -> bool:
    """Every output unit of weight ``p`` has the same weights (symmetry never breaks)."""
    x = p.tensor.detach()
    if p.out_dim == 1:
        x = x.t()
    rows = x.reshape(x.shape[0], -1)
    if rows.shape[0] < 2 or not bool((rows[1] == rows[0]).all().item()):
        return False
    return bool((rows == rows[:1]).all().item())


def _same_inputs(p: Param) -> bool:
    """Every input of weight ``p`` has the same weights into every unit (its columns are
    alike: a constant matrix), so units before it that are alike get alike gradients."""
    x = p.tensor.detach()
    if p.out_dim == 1:
        x = x.t()
    cols = x.reshape(x.shape[0], x.shape[1], -1)
    return cols.shape[1] >= 2 and bool((cols == cols[:, :1]).all().item())


def _tensor_name(p: Param) -> str:
    """The name of the tensor ``p`` stands for: a parametrization's original
    (``lin.parametrizations.weight.original1``) stands for ``weight``."""
    parts = p.name.split(".")
    if len(parts) >= 3 and parts[-3] == "parametrizations":
        return parts[-2]
    return p.leaf


def _fan_layer(p: Param, gains=()) -> bool:
    """Whether ``p`` is a layer's weight matrix (or kernel), whose fans set its scale: not an
    embedding table, a norm layer's gains, a weight_norm gain (ids in ``gains``), or a
    learned token or position table (``cls_token``, ``pos_embed``: N(0, 1e-6) or N(0, 0.02)
    on purpose, whatever their shape)."""
    return p.ndim >= 2 and "weight" in _tensor_name(p).lower() and id(p.tensor) not in gains \
        and not isinstance(p.module, (nn.Embedding, nn.EmbeddingBag)) and not _module_ok(p.module, NORM)


def _offset_message(mean: float, std: float) -> str:
    return (f"mean {mean:.3g} exceeds the std {std:.3g}: a weight matrix drawn around a nonzero centre "
            "(U(0, 1), say) adds one shared direction to every unit's input, so units start nearly alike")


def _facts(model: nn.Module) -> dict:
    out = {}
    for key, fn in (("n_layer", infer_n_layer), ("d_model", infer_d_model)):
        try:
            out[key] = fn(model)
        except ValueError:
            out[key] = None
    return out


def audit(model: nn.Module, example_input=None, *, scheme=None, band: float = BAND, **scheme_options) -> Audit:
    """Audit what every parameter of ``model`` got (see the module docstring).

    Example::

        a = fastinit.audit(model, torch.randn(32, 784))
        print(a)                 # the table, then the flags
        a.to_json("audit.json"); a.plot("audit.png")
        assert a.ok

    Args:
        model: an allocated model (CPU or CUDA), or a deferred one (its plan is audited).
        example_input: a batch to run one forward/backward pass on (a tuple is
            unpacked into arguments, a dict into keywords); not for deferred models.
        scheme: a :class:`~fastinit.schemes.Scheme` or built-in name: each
            parameter's std is checked against what that scheme gives it.
        band: the factor outside the Glorot/He band at which a std is flagged.
        **scheme_options: options of ``scheme`` (``n_layer=``, ...).
    """
    from .deferred import planned as planned_fn
    from .schemes import Scheme, _params, _plan, _weight_norm_gains, get_scheme

    if not isinstance(model, nn.Module):
        raise TypeError(f"audit: expected an nn.Module, got {type(model).__name__}")
    if isinstance(band, bool) or not isinstance(band, (int, float)):
        raise TypeError(f"audit: band must be a number > 1, not {type(band).__name__}")
    if not (band > 1):
        raise ValueError(f"audit: band must be > 1, got {band}")
    if scheme is None and scheme_options:  # (a typo such as exmaple_input= would pass unseen)
        raise TypeError(f"audit: unexpected keyword argument(s) {', '.join(sorted(scheme_options))} "
                        "(scheme options need scheme=...)")
    deferred = any(t.is_meta for t in model.parameters())
    if deferred and example_input is not None:
        raise ValueError("audit: a deferred model has no values to run a forward pass on: materialize it first, "
                         "or audit its plan without example_input")
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if sch is not None and not isinstance(sch, Scheme):
        raise TypeError(f"audit: scheme must be a Scheme or a built-in name, not {type(scheme).__name__}")
    expected_plan = _plan(model, sch, sch._options(scheme_options)) if sch is not None else {}
    plan = planned_fn(model) if deferred else {}
    facts = _facts(model)
    params, flags = [], []
    alike: list[tuple[ParamAudit, str, str, int]] = []  # weight matrices whose output units are all the same
    alike_inputs: list[tuple[str, int]] = []  # and those that weigh all their inputs the same
    gains = _weight_norm_gains(model)
    real = next((t for t in model.parameters() if not t.is_meta), None)  # (a model materialized in part: some)
    dev = str(real.device) if real is not None else "meta" if deferred else "cpu"

    for p in _params(model, {}):
        fans = None
        try:
            if p.ndim >= 2:
                fans = p.fans()
        except ValueError:
            fans = None
        pa = ParamAudit(p.name, list(p.shape), str(p.tensor.dtype).replace("torch.", ""), type(p.module).__name__,
                        fans[0] if fans else None, fans[1] if fans else None, None, None, None, None, None)
        cands = _candidates(p, facts)
        own: list[tuple[str, str]] = []
        layer = _fan_layer(p, gains)
        units = p.shape[p.out_dim] if layer else 0
        inputs = p.shape[1 - p.out_dim] if layer else 0
        if p.tensor.is_meta:  # (a block materialized already: its values, below)
            pl = plan.get(p.name)
            spec = pl.spec if pl is not None else None
            pa.planned = pl.description if pl is not None else "not recorded"
            if pl is not None and pl.uninitialized:
                own.append(("uninitialized", f"will hold uninitialized memory ({pl.uninitialized})"))
            if pl is not None and pl.nonfinite and (spec is None or isinstance(spec, Constant)):
                own.append(("nonfinite", f"will hold NaN/inf values ({pl.description})"))
            if spec is not None:
                m, s, lo, hi = _spec_moments(spec)
                pa.mean, pa.std, pa.min, pa.max = m, s, lo, hi
                if any(x is not None and not math.isfinite(x) for x in (m, s)) and not pl.nonfinite:
                    own.append(("nonfinite", f"will hold NaN/inf values ({pl.description})"))
                elif layer and not isinstance(spec, Constant) and s and abs(m) > s:
                    own.append(("offset", _offset_message(m, s)))
                pa.matches = [c.label for c in cands if _spec_matches(spec, c)]
                if isinstance(spec, Constant):
                    pa.matches = ["zeros" if spec.value == 0 else "ones" if spec.value == 1 else f"constant {spec.value:g}"]
                    if layer and units > 1:
                        alike.append((pa, p.name, f"constant matrix (all {spec.value:g})", units))
                    if layer and inputs > 1:
                        alike_inputs.append((p.name, inputs))
        else:
            st = _stats(p.tensor)
            pa.mean, pa.std, pa.min, pa.max = st["mean"], st["std"], st["min"], st["max"]
            if st["nonfinite"]:
                own.append(("nonfinite", f"{st['nonfinite']} NaN/inf value(s)"))
            if _too_many_subnormals(st, p.tensor.dtype) or st["huge"]:
                own.append(("uninitialized", f"looks like uninitialized memory: {st['subnormal']} subnormal and "
                                             f"{st['huge']} huge (>1e8) value(s)"))
            if st["constant"] and p.tensor.numel():
                v = st["min"]
                pa.matches = ["zeros" if v == 0 else "ones" if v == 1 else f"constant {v:g}"]
            elif st["std"] is not None and math.isfinite(st["std"]):
                ok = [c for c in cands if _matches(st, c, st["n"], p.tensor.dtype)]
                pa.matches = [c.label for c in sorted(ok, key=lambda c: abs(st["std"] / c.std - 1))]
                if p.ndim >= 2 and _orthogonal_gain(p) is not None:
                    pa.matches.insert(0, f"orthogonal (gain {_orthogonal_gain(p):.3g})")
            if layer and p.tensor.numel() >= 16 and not st["constant"] and st["std"] and st.get("mean") is not None \
                    and math.isfinite(st["std"]) and abs(st["mean"]) > st["std"]:
                own.append(("offset", _offset_message(st["mean"], st["std"])))
            if layer and p.tensor.numel() and not st["nonfinite"]:
                if _same_units(p):
                    alike.append((pa, p.name, f"constant matrix (all {st['min']:g})" if st["constant"]
                                  else "identical output units", units))
                if st["constant"] or _same_inputs(p):
                    alike_inputs.append((p.name, inputs))
        if fans and pa.std is not None and math.isfinite(pa.std):
            pa.std_sqrt_fan_in = pa.std * math.sqrt(fans[0])
        # expectation: the scheme's, else the best match's
        exp = expected_plan.get(p.name)
        exp_std = _action_std(exp.action, list(p.shape)) if exp is not None else None
        if exp_std is not None:
            pa.expected, pa.expected_std = f"{sch.name}: {exp.describe()}", exp_std
            if pa.std is not None and math.isfinite(pa.std):
                n = p.tensor.numel()
                tol = _std_tol(min(n, SAMPLE), p.tensor.dtype) if not p.tensor.is_meta else 1e-6
                want = pa.expected_std
                if (want == 0 and pa.std != 0) or (want > 0 and abs(pa.std / want - 1) > tol):
                    own.append(("scheme", f"std {pa.std:.4g}, but scheme {sch.name} gives {want:.4g} "
                                          f"({exp.describe()})"))
        elif pa.matches:
            c = next((c for c in cands if c.label == pa.matches[0]), None)
            if c is not None:
                pa.expected, pa.expected_std = c.label, c.std
        deliberate = any(c.deliberate and c.label in pa.matches for c in cands) or (
            exp is not None and exp.spec is not None and not any(k == "scheme" for k, _ in own))
        if fans and layer and pa.std is not None and math.isfinite(pa.std) and pa.std > 0 and not deliberate:
            fi, fo = fans
            if fi > 0 and fo > 0:
                lo = min(math.sqrt(2.0 / (fi + fo)), 1 / math.sqrt(3.0 * fi))
                hi = max(math.sqrt(2.0 / fi), math.sqrt(2.0 / fo))
                if pa.std < lo / band or pa.std > hi * band:
                    side = "below" if pa.std < lo / band else "above"
                    own.append(("band", f"std {pa.std:.3g} is far {side} the Glorot/He band "
                                        f"[{lo:.3g}, {hi:.3g}] for fan_in {fi}, fan_out {fo}"))
        pa.flags = [k for k, _ in own]
        flags += [Flag(p.name, k, msg) for k, msg in own]
        params.append(pa)

    for pa, name, what, units in alike:  # (fed to alike weights: a zero head, LoRA's B, Fixup's zeros are not)
        after = next((n for n, inputs in alike_inputs if inputs == units), None)
        if after is not None:
            pa.flags.append("symmetry")
            flags.append(Flag(name, "symmetry", f"{what}, and a weight matrix taking its {units} outputs ({after}) "
                                                "weighs them alike: units that start alike and feed alike weights "
                                                "get the same gradient, so they never differ"))
    layers, shape = [], None
    if example_input is not None:
        layers, lflags = _signal(model, example_input)
        flags += lflags
        shape = _shape_of(example_input)
    name = type(model).__name__
    return Audit(name, deferred, dev, sch.name if sch is not None else None, params, layers, flags, shape)


def _orthogonal_gain(p: Param) -> float | None:
    x = p.tensor.detach()
    if x.dim() < 2 or not x.dtype.is_floating_point:
        return None
    m = x.reshape(x.shape[0], -1)
    r, c = m.shape
    if min(r, c) < 2 or min(r, c) > 2048:
        return None
    rounding = {torch.bfloat16: 2e-2, torch.float16: 3e-3}.get(x.dtype, 1e-4)
    norms = m.float().square().sum(1 if r <= c else 0)  # an orthogonal matrix's short-side vectors: norm = gain
    if (norms.max() - norms.min()).item() > rounding * norms.mean().item():
        return None
    m = m.double()
    g = m @ m.t() if r <= c else m.t() @ m
    diag = g.diagonal()
    g2 = diag.mean().item()
    if not g2 > 0:
        return None
    off = (g - torch.diag(diag)).abs().max().item()
    if off > rounding * g2 or (diag - g2).abs().max().item() > rounding * g2:
        return None
    return math.sqrt(g2)


def _shape_of(x):
    if isinstance(x, torch.Tensor):
        return list(x.shape)
    if isinstance(x, (tuple, list)):
        return [_shape_of(y) for y in x]
    if isinstance(x, dict):
        return {k: _shape_of(v) for k, v in x.items()}
    return None


def _signal(model: nn.Module, example_input) -> tuple[list[LayerAudit], list[Flag]]:
    """One forward and backward pass with hooks: activation and gradient std per layer."""
    from .schemes import _first_tensor, measuring, run_model

    layers = [(n, m) for n, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))]
    outs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def hook(n):
        def fn(mod, inp, out):
            t = _first_tensor(out)
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and n not in outs:
                outs[n] = t
                order.append(n)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        with measuring(model), torch.enable_grad():
            out = _first_tensor(run_model(model, example_input))
            if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
                raise ValueError("audit: the model's output has no floating tensor to backpropagate from")
            want = [n for n in order if outs[n].requires_grad]
            grads = {}
            if want and out.requires_grad:
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
                got = torch.autograd.grad(out, [outs[n] for n in want], grad_outputs=g.to(out.device, out.dtype),
                                          allow_unused=True)
                grads = {n: gr for n, gr in zip(want, got)}
    finally:
        for h in handles:
            h.remove()
    mods = dict(layers)
    rows = []
    for d, n in enumerate(order):
        a = outs[n].detach().float()
        gr = grads.get(n)
        rows.append(LayerAudit(d, n, type(mods[n]).__name__, a.std().item() if a.numel() > 1 else None,
                               gr.float().std().item() if gr is not None and gr.numel() > 1 else None))
    flags = []
    for r in rows:
        if r.act_std is not None and not math.isfinite(r.act_std):
            flags.append(Flag(r.name, "nonfinite", "NaN/inf in its output"))
        if r.grad_std is not None and not math.isfinite(r.grad_std):
            flags.append(Flag(r.name, "nonfinite", "NaN/inf in its gradient"))
    weights = [r for r in rows if isinstance(mods[r.name], (nn.Linear, nn.modules.conv._ConvNd))
               or _transposed(mods[r.name])] or rows
    acts = [r for r in weights if r.act_std is not None and math.isfinite(r.act_std)]
    dead = [r for r in acts if r.act_std == 0]
    if dead:
        flags.append(Flag(dead[0].name, "vanishing", f"output std is 0 at depth {dead[0].depth} "
                          f"({len(dead)} layer(s) output a constant): no signal reaches the layers after it"))
    elif len(acts) >= 2:
        ratio = acts[-1].act_std / acts[0].act_std
        top = max(acts, key=lambda r: r.act_std)
        if ratio > SIGNAL_RATIO or top.act_std / acts[0].act_std > SIGNAL_RATIO:
            flags.append(Flag(top.name, "exploding", f"activation std grows from {acts[0].act_std:.3g} "
                              f"({acts[0].name}) to {top.act_std:.3g} ({top.name})"))
        elif ratio < 1 / SIGNAL_RATIO:
            flags.append(Flag(acts[-1].name, "vanishing", f"activation std shrinks from {acts[0].act_std:.3g} "
                              f"({acts[0].name}) to {acts[-1].act_std:.3g} ({acts[-1].name})"))
    gs = [r for r in weights if r.grad_std is not None and math.isfinite(r.grad_std)]
    if len(gs) >= 2:
        # Backward, from the last three weight layers to the first three (fewer in a shallow
        # model): vanishing if the first group's largest gradient is 100x below the last group's
        # largest, exploding if its smallest is 100x above the last group's largest (a layer or
        # two alone are no trend: attention's query and key projections, a branch gated near
        # zero, get small gradients at init by design).
        q = min(3, len(gs) // 2)
        first, last = gs[:q], gs[-q:]
        hi_first, hi_last = max(first, key=lambda r: r.grad_std), max(last, key=lambda r: r.grad_std)
        lo_first = min(first, key=lambda r: r.grad_std)
        if hi_last.grad_std > 0 and lo_first.grad_std / hi_last.grad_std > SIGNAL_RATIO:
            flags.append(Flag(lo_first.name, "exploding", f"gradient std grows from {hi_last.grad_std:.3g} "
                              f"({hi_last.name}) to {lo_first.grad_std:.3g} ({lo_first.name}) on the way back"))
        elif hi_last.grad_std > 0 and hi_first.grad_std / hi_last.grad_std < 1 / SIGNAL_RATIO:
            flags.append(Flag(hi_first.name, "vanishing", f"gradient std shrinks from {hi_last.grad_std:.3g} "
                              f"({hi_last.name}) to {hi_first.grad_std:.3g} ({hi_first.name}) on the way back"))
    return rows, flags


__all__ = ["audit", "Audit", "ParamAudit", "LayerAudit", "Flag"]
