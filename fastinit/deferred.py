"""Deferred init and one-pass materialization: record → plan → execute.

* **Record.** :func:`deferred_init` runs a constructor under a
  ``TorchFunctionMode`` that puts every new tensor on the meta device and logs,
  per storage, what writes it: torch and fastinit init calls (also those that
  return early on meta tensors, such as ``trunc_normal_`` and ``orthogonal_``,
  and those called through references captured at import time), in-place tensor
  ops, factory ops, and edits of views. Initialization the model runs after
  construction (``post_init``, ``_init_weights``, ``apply``) is recorded too.
* **Plan.** :func:`materialize` decides, per parameter and buffer, what its
  value is: the last whole-tensor overwrite wins and earlier ones never run;
  scalar ``mul_``/``add_`` after a random fill fold into its spec; every
  fusable spec goes to the engine in one batch; everything else (QR, copies,
  buffer arithmetic, partial edits) replays in recorded order on the real tensor.
* **Execute.** Values are keyed by ``(seed, fully-qualified name)`` (and which of
  the tensor's recorded fills it is); a tensor the replay of another reads (a
  copy made in a constructor) starts exactly as its own plan does. Nothing in
  the module changes until every tensor is computed: a failure leaves it as it
  was.

:func:`batched` applies the same idea to already-allocated tensors: drop-in
calls inside it are queued and run as one fused batch at exit.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import math
import numbers
import sys
import threading
import time
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from . import _sink, engines
from . import distributed as dist_mod
from . import init as fi
from .engines import Target
from .fans import calculate_gain, variance_scaling
from .seeding import draw_seed, key_for_name
from .specs import Constant, InitSpec, Normal, Uniform

__all__ = ["deferred_init", "materialize", "batched", "MaterializeReport", "is_deferred"]

# Factory ops whose new tensors go to the meta device when no device is named.
_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.range, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.empty_strided, torch.tril_indices, torch.triu_indices,
}
# In-place methods that change metadata or flags, not values.
_NOT_VALUE_MUTATIONS = {
    "requires_grad_", "share_memory_", "t_", "transpose_", "squeeze_", "unsqueeze_", "as_strided_",
    "swapdims_", "swapaxes_", "resize_", "resize_as_", "rename_", "detach_", "set_",
}
_OVERWRITING_OPS = {"copy_", "fill_", "zero_", "uniform_", "normal_"}

# torch.nn.init functions that reach a TorchFunctionMode through handle_torch_function.
# They are matched by name: handle_torch_function passes whatever the module
# attribute is at call time, and transformers swaps in same-named wrappers.
_TORCH_INIT_OVERRIDABLE = {
    "uniform_": lambda b: Uniform(b["a"], b["b"]),
    "normal_": lambda b: Normal(b["mean"], b["std"]),
    "constant_": lambda b: Constant(b["val"]),
    "kaiming_uniform_": lambda b: variance_scaling(
        b["tensor"].shape, calculate_gain(b["nonlinearity"], b["a"]), b["mode"].lower(), "uniform"
    ),
}
_TORCH_INIT_SIGNATURES = {n: inspect.signature(getattr(torch.nn.init, n)) for n in _TORCH_INIT_OVERRIDABLE}
# torch.nn.init functions that return early on meta tensors before any tensor op:
# their code objects are swapped for trampolines while recording, which also
# catches references captured at import time (transformers' initialization module).
_HOOKED_INIT_NAMES = ("trunc_normal_", "orthogonal_", "dirac_", "sparse_")
_TORCH_INIT_FUNCS = {name: getattr(torch.nn.init, name) for name in _HOOKED_INIT_NAMES}

_active: contextvars.ContextVar["_Recorder | None"] = contextvars.ContextVar("fastinit_recorder", default=None)


def _skey(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _snapshot(obj):
    """``obj`` with each meta tensor replaced by a detached alias: the same storage
    and geometry, but an object that ``param.data = other`` (``Module.half()``
    inside a constructor) cannot repoint later."""
    return tree_map(lambda x: x.detach() if _is_meta(x) else x, obj)


def _storage_numel(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // t.element_size()


def _covers_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() == _storage_numel(t)


def _is_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta


@dataclass
class _Node:
    """A recorded op that created a tensor (factory or pure op)."""

    seq: int
    func: Callable
    args: tuple
    kwargs: dict


@dataclass
class _Event:
    """A recorded write into a storage, through a view of it (``geom``)."""

    seq: int
    geom: tuple  # (size, stride, storage_offset) of the written view
    kind: str  # "fill" (spec) | "affine" (mul, add) | "op" (func, args, kwargs)
    whole: bool  # the view covers the whole storage
    overwrites: bool  # the result does not depend on the previous values
    spec: InitSpec | None = None
    mul: float = 1.0
    add: float = 0.0
    func: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    def describe(self) -> str:
        where = "" if self.whole else "[view]"
        if self.kind == "fill":
            return f"{self.spec!r}{where}"
        if self.kind == "affine":
            return f"affine(*{self.mul:g} +{self.add:g}){where}"
        return f"{self.label}{where}"


class _Recorder(TorchFunctionMode):
    """Logs creations and writes of meta tensors (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._seq = itertools.count()
        self.created: dict[int, tuple[_Node | None, torch.Tensor]] = {}
        self.nodes: dict[int, _Node] = {}
        self.events: dict[int, list[_Event]] = defaultdict(list)
        self.keep: list[torch.Tensor] = []

    # ----------------------------------------------------------- bookkeeping

    def next_seq(self) -> int:
        return next(self._seq)

    def _note_created(self, t: torch.Tensor, node: _Node | None) -> None:
        self.keep.append(t)
        if node is not None:
            self.nodes[id(t)] = node
        sk = _skey(t)
        if sk not in self.created:
            self.created[sk] = (node, t)

    def note_existing(self, t: torch.Tensor) -> None:
        """A meta tensor made outside the recording (a ``with torch.device('meta')`` model)."""
        sk = _skey(t)
        if sk not in self.created:
            self.keep.append(t)
            self.created[sk] = (None, t)

    def add_event(self, t: torch.Tensor, ev_kind: str, *, overwrites: bool, **kw) -> None:
        self.note_existing(t)
        ev = _Event(self.next_seq(), (tuple(t.shape), tuple(t.stride()), t.storage_offset()), ev_kind,
                    _covers_storage(t), overwrites, **kw)
        self.events[_skey(t)].append(ev)
        self.keep.append(t)

    def fill_event(self, t: torch.Tensor, spec: InitSpec) -> None:
        self.add_event(t, "fill", overwrites=True, spec=spec)

    def op_event(self, t: torch.Tensor, func, args, kwargs, overwrites: bool, label: str) -> None:
        self.add_event(t, "op", overwrites=overwrites, func=func, args=_snapshot(args),
                       kwargs=_snapshot(kwargs), label=label)

    # ----------------------------------------------------------- interception

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is None and (
            func in _FACTORIES
            # torch.normal(mean, std, size): a factory; with tensor arguments it follows them
            or (func is torch.normal and ("size" in kwargs or len(args) >= 3))
        ):
            kwargs["device"] = "meta"
        name = getattr(func, "__name__", "")
        if isinstance(func, types.FunctionType) and name in _TORCH_INIT_OVERRIDABLE:
            bound = _TORCH_INIT_SIGNATURES[name].bind(*args, **kwargs)
            bound.apply_defaults()
            t = bound.arguments["tensor"]
            if _is_meta(t) and name in ("normal_", "xavier_normal_", "kaiming_normal_"):
                # torch runs normal_ on meta tensors through its Python references
                # (about a millisecond a call, most of a Llama's recording); the
                # drop-in validates the same way and its sink records the fill.
                return getattr(fi, name)(*args, **kwargs)
            if _is_meta(t):
                out = func(*args, **kwargs)  # validates and warns exactly as torch does
                if t.numel() > 0:
                    self.fill_event(t, _TORCH_INIT_OVERRIDABLE[name](bound.arguments))
                return out
        target = None
        if "out" in kwargs and _is_meta(kwargs["out"]):
            target = kwargs["out"]
        elif args and _is_meta(args[0]) and name not in _NOT_VALUE_MUTATIONS and (
            name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))
        ):
            target = args[0]  # an in-place op writes its first argument
        if (target is not None and name in ("uniform_", "normal_") and target is args[0]
                and kwargs.get("generator") is None):
            # On meta tensors torch runs these through its Python references
            # (about a millisecond each, half of a Llama's recording). The same
            # checks, with the errors the eager constructor would raise, run on
            # an empty CPU tensor of the dtype in microseconds.
            func(torch.empty(0, dtype=target.dtype), *args[1:], **kwargs)
            self._record_write(func, name, target, args, kwargs)
            return target
        out = func(*args, **kwargs)
        if target is not None:
            self._record_write(func, name, target, args, kwargs)
            return out
        flat, _ = tree_flatten(out)
        metas = [x for x in flat if _is_meta(x)]
        if metas:
            node = _Node(self.next_seq(), func, _snapshot(args), _snapshot(kwargs))
            for x in metas:
                self._note_created(x, node)
        return out

    def _record_write(self, func, name, t, args, kwargs) -> None:
        if "out" in kwargs:
            self.op_event(t, func, args, kwargs, overwrites=True, label=getattr(func, "__name__", "op"))
            return
        rest = args[1:]

        def arg(i, key, default):
            return rest[i] if len(rest) > i else kwargs.get(key, default)

        num = lambda x: isinstance(x, numbers.Number) and not isinstance(x, bool)  # noqa: E731
        if name == "uniform_" and num(arg(0, "from", 0.0)) and num(arg(1, "to", 1.0)):
            self.fill_event(t, Uniform(float(arg(0, "from", 0.0)), float(arg(1, "to", 1.0))))
        elif name == "normal_" and num(arg(0, "mean", 0.0)) and num(arg(1, "std", 1.0)):
            self.fill_event(t, Normal(float(arg(0, "mean", 0.0)), float(arg(1, "std", 1.0))))
        elif name == "fill_" and num(arg(0, "value", None)):
            self.fill_event(t, Constant(arg(0, "value", None)))
        elif name == "zero_":
            self.fill_event(t, Constant(0.0))
        elif name in ("mul_", "div_") and num(arg(0, "other", None)) and not kwargs.get("rounding_mode"):
            k = arg(0, "other", None)
            self.add_event(t, "affine", overwrites=False, mul=float(k) if name == "mul_" else 1.0 / k)
        elif name in ("add_", "sub_") and num(arg(0, "other", None)) and num(arg(1, "alpha", 1)):
            c = float(arg(0, "other", None)) * float(arg(1, "alpha", 1))
            self.add_event(t, "affine", overwrites=False, add=c if name == "add_" else -c)
        else:
            self.op_event(t, func, args, kwargs, overwrites=name in _OVERWRITING_OPS, label=name)


# ------------------------------------------------------------------ the sink


class _RecordingSink:
    """Takes fastinit's own drop-in calls on meta tensors while recording."""

    def __init__(self, rec: _Recorder):
        self.rec = rec

    def fill(self, tensor, spec, generator) -> bool:
        if not tensor.is_meta:
            return False
        if tensor.numel():
            self.rec.fill_event(tensor, spec)
        return True

    def replay(self, tensor, fn, args, kwargs) -> bool:
        if not tensor.is_meta:
            return False
        if tensor.numel():
            self.rec.op_event(tensor, fn, (tensor, *args), dict(kwargs), overwrites=True, label=fn.__name__)
        return True


def _init_hook(name, tensor, *args, **kwargs):
    """Trampoline target of the hooked torch.nn.init functions."""
    rec = _active.get()
    if rec is not None and _is_meta(tensor):
        if name == "trunc_normal_":
            bound = inspect.signature(_ORIGINAL_FUNCS[name]).bind(tensor, *args, **kwargs)
            bound.apply_defaults()
            b = bound.arguments
            # std == 0 raises what the eager constructor would raise
            spec = fi.trunc_normal_spec(b["mean"], b["std"], b["a"], b["b"], zero_std_is_error=True,
                                        stacklevel=4)
            if tensor.numel():
                rec.fill_event(tensor, spec)
            return tensor
        return getattr(fi, name)(tensor, *args, **kwargs)  # validates, then the sink records
    return _ORIGINAL_FUNCS[name](tensor, *args, **kwargs)


def _trampoline_code(name: str, fn) -> types.CodeType:
    params = list(inspect.signature(fn).parameters)
    src = (f"def {name}({', '.join(params)}):\n"
           f"    return _fastinit_init_hook({name!r}, {', '.join(params)})\n")
    ns: dict[str, Any] = {}
    exec(compile(src, f"<fastinit hook {name}>", "exec"), ns)
    return ns[name].__code__


_ORIGINAL_FUNCS = {
    name: types.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    for name, f in _TORCH_INIT_FUNCS.items()
}
_TRAMPOLINES = {name: _trampoline_code(name, f) for name, f in _TORCH_INIT_FUNCS.items()}
_hook_depth = 0


_hook_lock = threading.Lock()


@contextlib.contextmanager
def _torch_init_hooks():
    """Install the trampolines while any recording is active (in any thread);
    outside a recording they call torch's original code."""
    global _hook_depth
    with _hook_lock:
        if _hook_depth == 0:
            torch.nn.init.__dict__["_fastinit_init_hook"] = _init_hook
            for name, f in _TORCH_INIT_FUNCS.items():
                f.__code__ = _TRAMPOLINES[name]
            torch.Tensor.__new__ = staticmethod(_legacy_tensor_new)
        _hook_depth += 1
    try:
        yield
    finally:
        with _hook_lock:
            _hook_depth -= 1
            if _hook_depth == 0:
                for name, f in _TORCH_INIT_FUNCS.items():
                    f.__code__ = _ORIGINAL_FUNCS[name].__code__
                del torch.Tensor.__new__  # back to torch._C.TensorBase's


def _legacy_tensor_new(*args, **kwargs):
    """``torch.Tensor(64, 32)`` (uninitialized memory of a size, as older modules
    write ``nn.Parameter(torch.Tensor(out, in))``) becomes ``torch.empty`` on
    meta while recording, so that the init that follows is recorded too instead
    of running on real memory. Any other use is torch's own constructor.

    The signature is ``(*args, **kwargs)`` on purpose: torch._dynamo, when first
    imported during a recording (meta ops can import it), checks the signature
    of ``torch.Tensor.__new__`` against its polyfill and accepts only an exact
    match or this wildcard. Dynamo then keeps this function, not the builtin, in
    its polyfill registry: compiled code that constructs Tensor subclasses may
    graph-break in such a process; nothing else depends on it."""
    cls, args = args[0], args[1:]
    if cls is torch.Tensor and not kwargs and args and _active.get() is not None:
        sizes = args[0] if len(args) == 1 and isinstance(args[0], torch.Size) else args
        if all(isinstance(a, int) and not isinstance(a, bool) for a in sizes):
            return torch.empty(*sizes, device="meta")
    return torch._C.TensorBase.__new__(cls, *args, **kwargs)


@contextlib.contextmanager
def _recording(rec: _Recorder):
    token = _active.set(rec)
    sink_token = _sink.current.set(_RecordingSink(rec))
    try:
        with _torch_init_hooks(), rec:
            yield rec
    finally:
        _sink.current.reset(sink_token)
        _active.reset(token)


# ------------------------------------------------------------------ public: record

_RECORD_ATTR = "_fastinit_record"


def deferred_init(fn: Callable[..., torch.nn.Module], *args, **kwargs) -> torch.nn.Module:
    """Build ``fn(*args, **kwargs)`` with no memory: every parameter and buffer on
    the meta device, with a record of what initializes each one.

    Example::

        model = fastinit.deferred_init(LlamaForCausalLM, config)   # instant, no memory
        report = fastinit.materialize(model, device="cuda", seed=0)

    Anything the model's own code does to its tensors while it is built
    (constructors, ``reset_parameters``, ``post_init``/``_init_weights``,
    ``apply``) is recorded; do further initialization by passing ``init_fn`` to
    :func:`materialize`. Code that reads values during construction (``.item()``
    on a new tensor) cannot run on meta tensors and raises here.
    """
    rec = _Recorder()
    with _recording(rec):
        try:
            module = fn(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
            try:
                clear = type(e)(
                    f"fastinit.deferred_init: {getattr(fn, '__name__', fn)!s} reads tensor values while "
                    f"it is built, which meta tensors do not have ({e}). Build this model eagerly, or "
                    "apply the step that reads values (a parametrization, say) after materialize()")
            except Exception:  # an exception type that takes other arguments: keep torch's
                raise e from None
            raise clear from e
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"deferred_init: {getattr(fn, '__name__', fn)!r} returned {type(module).__name__}, not an nn.Module")
    _reject_lazy(module, "fastinit.deferred_init")
    _convert_real_tensors(module, rec)
    _attach(module, rec)
    return module


def _reject_lazy(module: torch.nn.Module, where: str) -> None:
    """Lazy modules (``nn.LazyLinear``...) have no shapes until their first forward."""
    lazy = [n for n, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                          module.named_buffers(remove_duplicate=False))
            if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise ValueError(
            f"{where}: {', '.join(lazy)} belong to lazy modules and have no shape yet; run one "
            "forward pass on a dummy batch first (torch's Lazy* modules infer their shapes from "
            "it), or use the non-lazy modules"
        )


def is_deferred(module: torch.nn.Module) -> bool:
    """True when ``module`` holds tensors on the meta device."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _convert_real_tensors(module, rec: _Recorder) -> None:
    """Small real tensors a constructor made from data (torch.tensor(...)) become
    meta tensors whose recorded value is that data."""
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                value = t.detach().clone()
                meta = torch.empty_like(t, device="meta")
                if isinstance(t, torch.nn.Parameter):
                    meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
                rec.note_existing(meta)
                rec.op_event(meta, torch.Tensor.copy_, (meta, value), {}, overwrites=True, label="copy_(data)")
                store[name] = meta


def _attach(module: torch.nn.Module, rec: _Recorder) -> None:
    """Remember, per fully-qualified name, which recorded storage a tensor is."""
    by_name = {}
    for fqn, t in _named_tensors(module):
        if t.is_meta:
            rec.note_existing(t)
            by_name[fqn] = _skey(t)
    object.__setattr__(module, _RECORD_ATTR, (rec, by_name))


def _named_tensors(module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


# ------------------------------------------------------------------ plan


@dataclass
class _Plan:
    name: str  # canonical (first) fully-qualified name
    aliases: list[str]
    meta: torch.Tensor
    sk: int
    spec: InitSpec | None  # fused fill, or None
    start: str  # "fill" | "creation" | "event" | "none"
    replay: list[_Event]  # events to replay after the start point
    creation: _Node | None = None
    start_event: _Event | None = None
    tag: str = ""  # names the fused fill's key: (seed, f"{name}#{tag}")
    key: int = 0

    def describe(self) -> str:
        parts = []
        if self.spec is not None:
            parts.append(repr(self.spec))
        elif self.start == "creation":
            parts.append(f"replay {getattr(self.creation.func, '__name__', 'op')}")
        elif self.start == "event":
            parts.append(f"replay {self.start_event.describe()}")
        parts += [f"then {e.describe()}" for e in self.replay]
        return "; ".join(parts) or "uninitialized"


@dataclass
class MaterializeReport:
    """What every tensor received. ``entries[name]`` is a one-line description;
    ``fused`` counts tensors filled by the engine in one batch, ``replayed``
    those that needed replayed ops; ``seed`` is the seed used."""

    seed: int
    device: torch.device
    entries: dict[str, str]
    fused: int
    replayed: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        lines = [f"materialized {len(self.entries)} tensors ({self.bytes / 2**20:.1f} MiB) on {self.device} "
                 f"in {self.seconds:.2f}s, seed {self.seed}: {self.fused} fused, {self.replayed} replayed"]
        lines += [f"  {k}: {v}" for k, v in self.entries.items()]
        return "\n".join(lines)


def _creation_spec(node: _Node | None) -> InitSpec | None | str:
    """Spec of a tensor created by a factory op, "empty" if undefined, None if it must replay."""
    if node is None or node.func in (torch.empty, torch.empty_strided):
        return "empty"
    dtype = node.kwargs.get("dtype")
    if dtype is not None and not (dtype.is_floating_point):
        return None
    if node.func is torch.zeros:
        return Constant(0.0)
    if node.func is torch.ones:
        return Constant(1.0)
    if node.func is torch.full:
        v = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        return Constant(float(v)) if isinstance(v, numbers.Number) and not isinstance(v, bool) else None
    if node.func is torch.rand:
        return Uniform(0.0, 1.0)
    if node.func is torch.randn:
        return Normal(0.0, 1.0)
    return None


def _start_of(events: list[_Event], node: _Node | None, floating: bool):
    """Where a tensor's value starts, given its events so far: ``(start, spec, tag,
    w, rest)``. The last whole overwrite wins (everything before it is dead);
    a fill (or a factory with a spec) becomes ``spec``, with the whole-tensor
    scalar edits right after it folded in, keyed by ``tag`` (the event's index,
    or "create"). The plan of a tensor and any read of its value by another
    tensor's replay start the same way, so both see the same values."""
    w = None
    for i in range(len(events) - 1, -1, -1):
        if events[i].whole and events[i].overwrites:
            w = i
            break
    if w is None:
        cs = _creation_spec(node)
        if cs == "empty":
            return "none", None, None, None, list(events)
        if cs is not None and floating:
            spec, rest = _fold(cs, events)
            return "fill", spec, "create", None, rest
        return "creation", None, None, None, list(events)
    if events[w].kind == "fill" and floating:
        spec, rest = _fold(events[w].spec, events[w + 1:])
        return "fill", spec, str(w), w, rest
    return "event", None, None, w, list(events[w + 1:])


def _plan_one(rec: _Recorder, name: str, aliases: list[str], meta: torch.Tensor) -> _Plan:
    sk = _skey(meta)
    events = rec.events.get(sk, [])
    node = rec.created.get(sk, (None, None))[0]
    start, spec, tag, w, rest = _start_of(events, node, meta.dtype.is_floating_point)
    if start == "fill":
        return _Plan(name, aliases, meta, sk, spec, "fill", rest, creation=node, tag=tag)
    if start == "event":
        return _Plan(name, aliases, meta, sk, None, "event", rest, start_event=events[w])
    return _Plan(name, aliases, meta, sk, None, start, rest, creation=node)


def _fold(spec: InitSpec, events: list[_Event]) -> tuple[InitSpec, list[_Event]]:
    """Fold leading whole-tensor scalar affine edits into ``spec`` (exact in distribution)."""
    i = 0
    while i < len(events) and events[i].kind == "affine" and events[i].whole:
        spec = spec.scaled(events[i].mul).shifted(events[i].add)
        i += 1
    return spec, events[i:]


# ------------------------------------------------------------------ execute


class _Evaluator:
    """Computes real values of recorded tensors on ``device`` (recorded dtypes)."""

    def __init__(self, rec: _Recorder, device: torch.device, seed: int, names: dict[int, str]):
        self.rec, self.device, self.seed = rec, device, seed
        self.names = dict(names)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self._owners: list[str] = []  # names of the tensors being computed, innermost last
        self._derived: dict[str, int] = {}

    def _name(self, sk: int) -> str:
        """The name that keys ``sk``'s random ops. A tensor the model never names
        (``torch.randn(d)`` in ``nn.Parameter(torch.randn(d) * 0.02)``) is named
        after the tensor whose value first needed it and its rank among those:
        stable from run to run, unlike its storage's identity."""
        name = self.names.get(sk)
        if name is None:
            owner = self._owners[-1] if self._owners else ""
            k = self._derived.get(owner, 0)
            self._derived[owner] = k + 1
            name = self.names[sk] = f"{owner}<{k}>"
        return name

    @contextlib.contextmanager
    def _computing(self, sk: int):
        self._owners.append(self._name(sk))
        try:
            yield
        finally:
            self._owners.pop()

    def _gen_key(self, sk: int, tag: str) -> int:
        return key_for_name(self.seed, f"{self._name(sk)}#{tag}")

    def value(self, t: torch.Tensor, seq: int) -> torch.Tensor:
        """Real value of meta tensor ``t`` as it was just before recorded step ``seq``."""
        sk = _skey(t)
        base = self.storage_value(sk, seq)
        return base.as_strided(t.shape, t.stride(), t.storage_offset())

    def resolve(self, obj, seq: int):
        return tree_map(lambda x: self.value(x, seq) if _is_meta(x) else x, obj)

    def storage_value(self, sk: int, seq: int) -> torch.Tensor:
        events = [e for e in self.rec.events.get(sk, []) if e.seq < seq]
        ck = (sk, len(events))
        if ck in self.cache:
            return self.cache[ck]
        node, ctensor = self.rec.created[sk]
        start, spec, tag, w, rest = _start_of(events, node, ctensor.dtype.is_floating_point)
        if start == "creation":
            base = self.creation_value(sk, node, ctensor)
        else:
            base = torch.empty(ctensor.shape, dtype=ctensor.dtype, device=self.device)
        if start == "fill":  # as the tensor's own plan fills it: same spec, same key
            engines.fill([Target(base, spec, self._gen_key(sk, tag))])
        elif start == "event":
            rest = [events[w], *rest]
        self.apply(base, sk, rest)
        self.cache[ck] = base
        return base

    def creation_value(self, sk: int, node: _Node | None, ctensor: torch.Tensor) -> torch.Tensor:
        with self._computing(sk):
            return self._creation_value(sk, node, ctensor)

    def _creation_value(self, sk: int, node: _Node | None, ctensor: torch.Tensor) -> torch.Tensor:
        if node is None:
            return torch.empty(ctensor.shape, dtype=ctensor.dtype, device=self.device)
        args = self.resolve(node.args, node.seq)
        kwargs = self.resolve(node.kwargs, node.seq)
        if node.func in _FACTORIES or str(kwargs.get("device")) == "meta":
            kwargs["device"] = self.device
        # Seeded whatever the op: random ones are not only the factories
        # (torch.randn_like, torch.normal, torch.bernoulli, x.uniform_ on a temporary...).
        with self._seeded(self._gen_key(sk, "create")):
            out = node.func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        for x in flat:
            if isinstance(x, torch.Tensor) and x.shape == ctensor.shape:
                if x.is_contiguous() and x.storage_offset() == 0:
                    return x
                return x.contiguous()
        raise RuntimeError(f"fastinit: could not replay {getattr(node.func, '__name__', node.func)}")

    @contextlib.contextmanager
    def _seeded(self, key: int):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(key & ((1 << 63) - 1))
            yield

    def apply(self, base: torch.Tensor, sk: int, events: list[_Event]) -> None:
        """Replay ``events`` (all on storage ``sk``) on the real ``base``."""
        with self._computing(sk):
            self._apply(base, sk, events)

    def _apply(self, base: torch.Tensor, sk: int, events: list[_Event]) -> None:
        all_events = self.rec.events.get(sk, [])
        with torch.no_grad():
            for ev in events:
                idx = all_events.index(ev)
                size, stride, off = ev.geom
                view = base.as_strided(size, stride, off)
                if ev.kind == "fill":
                    if view.dtype in engines.FLOAT_DTYPES:
                        engines.fill([Target(view, ev.spec, self._gen_key(sk, str(idx)))])
                    elif isinstance(ev.spec, Constant):
                        view.fill_(ev.spec.value)
                    else:
                        raise TypeError(f"cannot fill a {view.dtype} tensor with {ev.spec!r}")
                elif ev.kind == "affine":
                    view.mul_(ev.mul).add_(ev.add)
                elif "out" in ev.kwargs:  # e.g. torch.eye(n, m, out=w)
                    args = self.resolve(ev.args, ev.seq)
                    kwargs = {**self.resolve(ev.kwargs, ev.seq), "out": view}
                    with self._seeded(self._gen_key(sk, str(idx))):
                        ev.func(*args, **kwargs)
                else:  # a method or init function whose first argument is the tensor
                    args = self.resolve(ev.args[1:], ev.seq)
                    kwargs = self.resolve(ev.kwargs, ev.seq)
                    key = self._gen_key(sk, str(idx))
                    if _takes_generator(ev.func):
                        kwargs["generator"] = torch.Generator(device=self.device).manual_seed(key >> 1)
                    with self._seeded(key):
                        ev.func(view, *args, **kwargs)


    def apply_to_shard(self, real, plan: "_Plan") -> None:
        """Replay ``plan``'s fill/affine edits of views on this rank's shard of DTensor ``real``.

        Each edit touches only the elements of its view that lie in the shard, with
        the values the unsharded replay gives them (a fill's values are keyed by
        the view's flat index, so the view's values are drawn, at the view's size,
        and the shard keeps its part). Memory: the edited views, never the tensor.
        """
        local_shape, offset = dist_mod.shard_box(real)
        flat = real._local_tensor.view(-1)
        dev = flat.device
        gshape = tuple(real.shape)
        gstrides = [1] * len(gshape)
        for d in range(len(gshape) - 2, -1, -1):
            gstrides[d] = gstrides[d + 1] * gshape[d + 1]
        lstrides = [1] * len(local_shape)
        for d in range(len(local_shape) - 2, -1, -1):
            lstrides[d] = lstrides[d + 1] * local_shape[d + 1]
        all_events = self.rec.events[plan.sk]
        rec_dtype = plan.meta.dtype
        with torch.no_grad():
            for e in plan.replay:
                size, stride, off = e.geom
                g = torch.full((), off, dtype=torch.int64, device=dev)
                for k, (n, st) in enumerate(zip(size, stride)):
                    shape = [1] * len(size)
                    shape[k] = n
                    g = g + (torch.arange(n, dtype=torch.int64, device=dev) * st).view(shape)
                g = g.reshape(-1)  # global storage index of each view element, in view order
                inside = torch.ones_like(g, dtype=torch.bool)
                pos = torch.zeros_like(g)
                for d in range(len(gshape)):
                    coord = (g // gstrides[d]) % gshape[d] - offset[d]
                    inside &= (coord >= 0) & (coord < local_shape[d])
                    pos += coord * lstrides[d]
                if not bool(inside.any()):
                    continue
                pos = pos[inside]
                if e.kind == "fill":
                    buf = torch.empty(size, dtype=rec_dtype, device=dev)
                    engines.fill([Target(buf, e.spec, self._gen_key(plan.sk, str(all_events.index(e))))])
                    vals = buf.reshape(-1)[inside]
                else:
                    vals = flat[pos].to(rec_dtype) * e.mul + e.add
                flat[pos] = vals.to(flat.dtype)


def _takes_generator(fn) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _progress_printer(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and total > (256 << 20)
    if not enabled:
        return None
    done = [0, time.perf_counter()]

    def cb(nbytes: int) -> None:
        done[0] += nbytes
        now = time.perf_counter()
        if now - done[1] > 0.1 or done[0] >= total:
            done[1] = now
            pct = 100.0 * done[0] / max(total, 1)
            sys.stderr.write(f"\rfastinit: materializing {done[0] / 2**30:6.2f}/{total / 2**30:.2f} GiB {pct:5.1f}%")
            if done[0] >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return cb


def _default_init_fn(module: torch.nn.Module) -> None:
    """Every submodule's ``reset_parameters`` whose own tensors include meta ones:
    real tensors (a part already loaded from a checkpoint) keep their values."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        own = itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))
        if callable(reset) and any(t.is_meta for t in own):
            reset()


def materialize(
    module: torch.nn.Module,
    device=None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    *,
    strict: bool = True,
    progress: bool | None = None,
    init_fn: Callable[[torch.nn.Module], Any] | None = None,
) -> MaterializeReport:
    """Allocate and initialize every meta tensor of ``module``, in one fused pass.

    Args:
        module: a model from :func:`deferred_init`, or any model with meta
            tensors (then ``init_fn`` runs first, recorded; default: every
            submodule's ``reset_parameters``).
        device: where to allocate (default: CUDA if available, else CPU).
        dtype: cast floating parameters and buffers to this dtype.
        seed: values are keyed by ``(seed, fully-qualified name)``: the same
            seed gives the same model whatever the init order or the set of
            other parameters. ``None`` draws a seed from torch's default generator.
        strict: raise (before allocating anything) if a tensor was never
            initialized, naming every such tensor.
        progress: show bytes done on stderr (default: on a terminal, for big models).
        init_fn: initialization to record and apply (see ``module``).

    Returns:
        A :class:`MaterializeReport`: per tensor, what it received.

    A tensor's last whole overwrite wins; earlier ones never run. All fusable
    fills run as one engine batch (one launch per dtype on CUDA, one thread-pool
    pass on CPU); the rest replays in recorded order. Tied parameters stay the
    same object. On any failure the module is left exactly as it was.
    """
    t0 = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if seed is None:
        seed = draw_seed()
    _reject_lazy(module, "fastinit.materialize")
    rec, by_name = getattr(module, _RECORD_ATTR, (None, {}))
    named = [(n, t) for n, t in _named_tensors(module) if t.is_meta]
    if not named:  # already real (materialized, loaded, built eagerly): touch nothing
        warnings.warn("fastinit.materialize: the module has no meta tensors; nothing was done "
                      "(its init, default or init_fn, was not run)", stacklevel=2)
        return MaterializeReport(seed, device, {}, 0, 0, 0, time.perf_counter() - t0)
    # A model not built by deferred_init runs its init (default: reset_parameters)
    # under the recorder; a deferred one runs only the init_fn it is given.
    run = init_fn if init_fn is not None else (_default_init_fn if rec is None else None)
    rec = rec or _Recorder()
    for _, t in named:
        rec.note_existing(t)
    if run is not None:
        with _recording(rec):
            run(module)
    by_name = {**{n: _skey(t) for n, t in named}, **by_name}

    # Group aliases (tied tensors) by object; plan each object once.
    objects: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for n, t in named:
        objects.setdefault(id(t), (t, []))[1].append(n)
    plans: list[_Plan] = []
    names_of_storage: dict[int, str] = {}
    for t, names in objects.values():
        sk = by_name[names[0]]
        rec_t = _recorded_tensor(rec, sk, t)
        names_of_storage.setdefault(sk, names[0])
        plan = _plan_one(rec, names[0], names, rec_t)
        plan.key = key_for_name(seed, f"{plan.name}#{plan.tag}")
        plans.append(plan)
    missing = [a for p in plans if p.start == "none" for a in p.aliases]
    if missing and strict:
        raise RuntimeError(
            f"fastinit.materialize: {len(missing)} tensor(s) are never initialized: "
            + ", ".join(missing)
            + " (initialize them in the model, pass init_fn=..., or strict=False to leave them uninitialized)"
        )

    def target_dtype(t):
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    for (t, names), plan in zip(objects.values(), plans):  # e.g. uniform_ bounds a float16 cannot hold
        if plan.spec is not None and target_dtype(t).is_floating_point:
            try:
                plan.spec.check_dtype(target_dtype(t))
            except RuntimeError as e:
                raise RuntimeError(f"fastinit.materialize: {names[0]}: {e}") from None

    # Allocate everything (nothing is assigned to the module yet).
    objs = list(objects.values())
    shared = _shared_storages(rec, objs, plans)
    in_shared = {i for ix in shared.values() for i in ix}
    reals: list[torch.Tensor | None] = []
    total = 0
    for i, ((t, _names), plan) in enumerate(zip(objs, plans)):
        if i in in_shared:
            reals.append(None)
            continue
        real = dist_mod.allocate_like(t, device, target_dtype(t))
        reals.append(real)
        total += dist_mod.local_tensor(real).numel() * dist_mod.local_tensor(real).element_size()
    bases = {}
    for sk, ix in shared.items():  # one real storage, each tensor the same view of it as on meta
        first = objs[ix[0]][0]
        bases[sk] = torch.empty(_storage_numel(first), dtype=target_dtype(first), device=device)
        total += bases[sk].numel() * bases[sk].element_size()
        for i in ix:
            t = objs[i][0]
            reals[i] = bases[sk].as_strided(t.shape, t.stride(), t.storage_offset())

    ev = _Evaluator(rec, device, seed, names_of_storage)
    targets = []
    for i, ((t, _names), plan, real) in enumerate(zip(objs, plans, reals)):
        if plan.spec is not None and i not in in_shared:
            targets.extend(dist_mod.targets_for(real, t, plan.spec, plan.key))
    report_bytes = _progress_printer(total, progress) or (lambda nbytes: None)
    engines.fill(targets, progress=report_bytes)
    with torch.no_grad():
        for sk, base in bases.items():  # the storage's value, computed whole, cast once
            base.copy_(ev.storage_value(sk, math.inf).reshape(-1))
            report_bytes(base.numel() * base.element_size())
    replayed = 0
    for i, ((t, _names), plan, real) in enumerate(zip(objs, plans, reals)):
        if i in in_shared:
            replayed += 1
            continue
        if plan.replay or (plan.spec is None and plan.start != "none"):
            replayed += 1
            if (dist_mod.is_dtensor(real) and plan.spec is not None and _engine_dtype(plan)
                    and all(e.kind in ("fill", "affine") for e in plan.replay)):
                ev.apply_to_shard(real, plan)  # e.g. an Embedding's padding row, shard-local
            else:
                dist_mod.replay_into(real, lambda full: _replay_plan(ev, plan, full), plan, t)
        if plan.spec is None:  # bytes the fused batch did not report
            local = dist_mod.local_tensor(real)
            report_bytes(local.numel() * local.element_size())
    _assign(module, objs, reals)
    dist_mod.after_assign(module)
    if hasattr(module, _RECORD_ATTR):
        object.__delattr__(module, _RECORD_ATTR)
    entries = {a: p.describe() for p in plans for a in p.aliases}
    for ix in shared.values():
        group = [a for i in ix for a in objs[i][1]]
        for a in group:
            entries[a] = f"view of a storage shared with {', '.join(x for x in group if x != a)}: {entries[a]}"
    fused = sum(p.spec is not None for i, p in enumerate(plans) if i not in in_shared)
    return MaterializeReport(seed, device, entries, fused, replayed, total, time.perf_counter() - t0)


def _shared_storages(rec: _Recorder, objs, plans) -> dict[int, list[int]]:
    """Storages that several objects are views of (``nn.Parameter(base[:10])``,
    ``nn.Parameter(base[10:])``): storage key -> indices into ``objs``. Only where
    the recorded storage is known whole, on one device, in one dtype (not DTensors)."""
    groups: dict[int, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(plan.sk, []).append(i)
    out = {}
    for sk, ix in groups.items():
        ts = [objs[i][0] for i in ix]
        created = rec.created.get(sk)
        if (len(ix) > 1 and created is not None and not any(dist_mod.is_dtensor(t) for t in ts)
                and len({t.dtype for t in ts}) == 1 and created[1].dtype == ts[0].dtype
                and created[1].numel() == _storage_numel(ts[0])):
            out[sk] = ix
    return out


def _engine_dtype(plan: _Plan) -> bool:
    return plan.meta.dtype in engines.FLOAT_DTYPES


def _recorded_tensor(rec: _Recorder, sk: int, fallback: torch.Tensor) -> torch.Tensor:
    ent = rec.created.get(sk)
    return ent[1] if ent is not None else fallback


def _replay_plan(ev: _Evaluator, plan: _Plan, out: torch.Tensor) -> None:
    """Compute ``plan``'s value into ``out`` (a full-size real tensor, its spec already filled)."""
    with torch.no_grad():
        if plan.spec is None and plan.start != "none":
            if plan.start == "creation":
                base = ev.creation_value(plan.sk, plan.creation, plan.meta).clone()
                ev.apply(base, plan.sk, plan.replay)
            else:
                base = torch.empty(plan.meta.shape, dtype=plan.meta.dtype, device=ev.device)
                ev.apply(base, plan.sk, [plan.start_event, *plan.replay])
            out.copy_(base.view(out.shape))
        elif plan.replay:  # after the fused fill (or on an uninitialized tensor, strict=False)
            if out.dtype == plan.meta.dtype:
                ev.apply(out, plan.sk, plan.replay)
            else:  # replay in the recorded dtype, round once
                tmp = out.to(plan.meta.dtype)
                ev.apply(tmp, plan.sk, plan.replay)
                out.copy_(tmp)


def _assign(module: torch.nn.Module, objs, reals) -> None:
    """Swap real tensors in for the meta ones, everywhere each object appears."""
    new_of = {}
    for (t, _names), real in zip(objs, reals):
        if isinstance(t, torch.nn.Parameter):
            try:
                new = type(t)(real, requires_grad=t.requires_grad)
            except TypeError:
                new = torch.nn.Parameter(real, requires_grad=t.requires_grad)
        else:
            new = real
        for k, v in getattr(t, "__dict__", {}).items():
            try:
                setattr(new, k, v)
            except (AttributeError, TypeError):
                pass
        new_of[id(t)] = new
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in new_of:
                    store[name] = new_of[id(t)]


# ------------------------------------------------------------------ batched


class _BatchSink:
    """Queues drop-in fills on real tensors; the last whole fill of a tensor wins."""

    def __init__(self):
        self.pending: dict[tuple, Target] = {}

    @staticmethod
    def _where(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))

    def _flush_storage(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        hit = [k for k in self.pending if k[0] == ptr]
        if hit:
            engines.fill([self.pending.pop(k) for k in hit])

    def fill(self, tensor, spec, generator) -> bool:
        if tensor.is_meta or tensor.dtype not in engines.FLOAT_DTYPES or dist_mod.is_dtensor(tensor):
            return False
        key = fi.draw_key(generator) if spec.random else 0
        where = self._where(tensor)
        if where not in self.pending:
            self._flush_storage(tensor)  # an earlier fill of an overlapping view must land first
        self.pending.pop(where, None)
        self.pending[where] = Target(tensor, spec, key)
        return True

    def replay(self, tensor, fn, args, kwargs) -> bool:
        if tensor.is_meta:
            return False
        where = self._where(tensor)
        self.pending.pop(where, None)  # overwritten whole by the structured init
        self._flush_storage(tensor)
        return False  # run it now

    def flush(self) -> None:
        targets = list(self.pending.values())
        self.pending.clear()
        engines.fill(targets)


@contextlib.contextmanager
def batched():
    """Queue the drop-in calls made inside the block and run them as one batch at exit.

    ::

        with fastinit.batched():
            model.apply(init_weights)   # fastinit.normal_/zeros_/... inside

    Values equal those of the same calls made one by one with the same seed
    state (keys are drawn at call time); a tensor's last whole fill wins and
    earlier ones never run. The whole model then costs one launch per dtype on
    GPU and one parallel pass on CPU. Tensors are **not yet filled** inside the
    block: code that reads them there sees their old values. Structured inits
    (``orthogonal_``, ``sparse_``, ``eye_``, ``dirac_``) run immediately.
    """
    sink = _BatchSink()
    token = _sink.current.set(sink)
    try:
        yield sink
    finally:
        _sink.current.reset(token)
    sink.flush()
