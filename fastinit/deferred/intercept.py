"""The recorder: one ``TorchFunctionMode`` behind ``deferred_init``,
``materialize(init_fn=...)`` and ``batched()``.

It sees every torch call of the thread it runs in and sorts it:

* **meta tensors** (a model being built by ``deferred_init``, or one built
  earlier): creations and writes are logged into the recording that holds the
  storage (:mod:`.record`); factories make meta tensors while a *home*
  recording is set (``deferred_init``; ``materialize``'s ``init_fn``), whatever
  device the code names, so nothing is drawn from torch's generators;
* **real tensors** with queued fills (``batched()``; ``init_fn``'s writes to
  tensors that are already real): handed to the :class:`~.batched.Batch`, which
  queues scalar edits after the fused fill and runs everything queued before an
  op reads those values;
* anything else runs as it would without fastinit.

Drop-in calls (``fastinit.normal_`` ...) reach it through the sink of
:mod:`fastinit._sink`: the same translation of a call into an
:class:`~fastinit.specs.InitSpec` serves every user. ``torch.nn.init`` calls that
reach the mode are handed to the drop-in of the same name, and those that return
early on meta tensors are found by :mod:`.hooks`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import threading
import types

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .. import _sink
from .._interrupts import interrupts_held
from ..distributed import is_dtensor
from .. import init as dropin
from ..init import stand_in
from ..seeding import draw_key
from ..specs import Constant, Normal, Uniform
from . import hooks
from .record import (Node, Recording, covers_storage, recorded_or_adopted, recording_of, session_ended,
                     session_started, storage_key, storage_key_or_none, storage_numel, touch)

# Factory ops: new tensors from sizes (or ranges), on the device they name.
FACTORIES = frozenset({
    torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.range, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.empty_strided, torch.tril_indices, torch.triu_indices,
})
# Ops whose result is uninitialized memory (strict mode reports tensors made so).
UNINITIALIZED = frozenset({torch.empty, torch.empty_strided, torch.empty_like, torch.Tensor.new_empty,
                           torch.Tensor.new_empty_strided})
# Ops that read only the shape, dtype and device of their tensor arguments.
SHAPE_ONLY = frozenset({
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.Tensor.new_empty, torch.Tensor.new_zeros,
    torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_empty_strided,
})
# Ops that draw random numbers (their replays are keyed by (seed, name)).
RANDOM_NAMES = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
    "bernoulli", "poisson", "multinomial", "uniform_", "normal_", "random_", "exponential_",
    "geometric_", "log_normal_", "cauchy_", "bernoulli_", "dropout", "dropout_", "feature_dropout",
    "alpha_dropout", "orthogonal_", "sparse_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "binomial", "_standard_gamma", "_sample_dirichlet", "rrelu",
    "rrelu_", "rrelu_with_noise", "gumbel_softmax", "dropout1d", "dropout2d", "dropout3d",
    "feature_alpha_dropout", "alpha_dropout_", "feature_alpha_dropout_", "feature_dropout_",
})

# Calls that read no values and write none: metadata, flags, grad mode.
_QUERIES = frozenset({
    "size", "stride", "dim", "ndimension", "numel", "nelement", "is_contiguous", "storage_offset",
    "untyped_storage", "_typed_storage", "data_ptr", "element_size", "is_floating_point",
    "is_complex", "is_signed", "get_device", "__len__", "requires_grad_", "retain_grad",
    "register_hook", "__hash__", "is_inference", "is_pinned", "is_shared", "_is_view",
    "is_set_to", "_set_grad_enabled", "__set__", "__get__", "has_names", "__reduce_ex__",
    "__deepcopy__", "_fix_weakref",
})
# Calls that return views of their first argument's storage without reading it.
VIEWS = frozenset({
    "view", "view_as", "t", "transpose", "permute", "narrow", "select", "unsqueeze", "squeeze",
    "expand", "expand_as", "as_strided", "detach", "unbind", "split", "chunk", "diagonal",
    "unflatten", "movedim", "swapaxes", "swapdims", "alias", "__iter__", "T", "mT",
})
# Calls that return a Python value read from the tensor.
_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                    "numpy", "__array__"})
# In-place methods that change metadata or flags, not values.
NOT_VALUE_MUTATIONS = frozenset({
    "requires_grad_", "share_memory_", "t_", "transpose_", "squeeze_", "unsqueeze_", "as_strided_",
    "swapdims_", "swapaxes_", "resize_", "resize_as_", "rename_", "detach_", "set_", "retain_grad_",
})
# In-place ops whose result does not depend on the previous values.
OVERWRITING = frozenset({"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "exponential_",
                         "geometric_", "cauchy_", "log_normal_", "random_"})
_AFFINE = {"mul_": 0, "div_": 1, "add_": 2, "sub_": 3}
# Scalar in-place ops whose value checks (overflow, casts) meta kernels skip: run on
# an empty CPU tensor of the dtype too, so recording raises what eager code raises.
_VALUE_CHECKED = frozenset({"fill_", "mul_", "div_", "add_", "sub_", "clamp_", "clamp_min_", "clamp_max_",
                            "pow_", "fmod_", "remainder_", "floor_divide_"})
# torch.nn.init functions that reach a mode through handle_torch_function, by name
# (transformers swaps in same-named wrappers): the drop-in of the same name takes them.
_NN_INIT_DISPATCHED = frozenset({"uniform_", "normal_", "constant_", "kaiming_uniform_", "kaiming_normal_"})

# Queries that hand out a tensor's memory (not its metadata), and deep copies of it
# (copy.deepcopy(model.state_dict())): batched() runs what is queued first.
RAW_READS = frozenset({"untyped_storage", "_typed_storage", "storage", "data_ptr", "__reduce_ex__", "__deepcopy__"})
_IS_META = torch.Tensor.is_meta

# _QUERY: run as is; _SEEN_QUERY: a query the recorder looks at (a raw read, a deep
# copy, the read of ``is_meta`` by which torch.nn.init functions return early)
_QUERY, _SEEN_QUERY, _VIEW, _FACTORY, _NN_INIT, _READ, _OTHER = range(7)
_kinds: dict = {}


def _kind(func) -> int:
    k = _kinds.get(func)
    if k is None:
        name = getattr(func, "__name__", "")
        if name in _QUERIES:
            k = _SEEN_QUERY if name in RAW_READS or getattr(func, "__self__", None) is _IS_META else _QUERY
        elif func in FACTORIES:
            k = _FACTORY
        elif isinstance(func, types.FunctionType) and name in _NN_INIT_DISPATCHED:
            k = _NN_INIT
        elif name in _READS:
            k = _READ
        elif name in VIEWS:
            k = _VIEW
        else:
            k = _OTHER
        try:
            _kinds[func] = k
        except TypeError:  # unhashable callables: classify every time
            pass
    return k


def basic_index(idx) -> bool:
    """An index made of ints, slices, ``None`` and ``...`` (a view, no copy)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool)
               for i in items)


def is_number(x) -> bool:
    t = type(x)
    return t is float or t is int or (t is not bool and isinstance(x, numbers.Number))


_SCALAR_FILLS = frozenset({"uniform_", "normal_", "fill_", "zero_"})


def scalar_fill_spec(name: str, rest: tuple, kwargs: dict):
    """The spec of ``t.uniform_(a, b)``, ``t.normal_(mean, std)``, ``t.fill_(v)`` or
    ``t.zero_()`` called with numbers (``rest``: the arguments after ``t``); None otherwise."""
    def arg(i, key, default):
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    if name == "zero_":
        return Constant(0.0)
    if name == "fill_":
        v = arg(0, "value", None)
        return Constant(float(v)) if is_number(v) else None
    if name == "uniform_":
        a, b = arg(0, "from", 0.0), arg(1, "to", 1.0)
        return Uniform(float(a), float(b)) if is_number(a) and is_number(b) else None
    mean, std = arg(0, "mean", 0.0), arg(1, "std", 1.0)
    return Normal(float(mean), float(std)) if is_number(mean) and is_number(std) else None


def stored_as(value, dtype: torch.dtype):
    """What ``t[i] = value`` stores in a ``dtype`` tensor, with eager's checks (a
    string raises) and rounding (1e6 into float16 is inf, without an error)."""
    probe = torch.empty(1, dtype=dtype, device="cpu")
    probe[0] = value
    return probe.item()


def write_target(name: str, args, kwargs):
    """The tensor an op writes into: ``out=``, or the first argument of an
    in-place method (``x.mul_(2)``, ``x[i] = v``); None for ops that do not write."""
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out
    if args and isinstance(args[0], torch.Tensor) and name not in NOT_VALUE_MUTATIONS and (
            name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))):
        return args[0]
    return None


def tensors_in(args, kwargs):
    """The tensors among an op's arguments (one level of lists and tuples)."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                if isinstance(y, torch.Tensor):
                    yield y


def snapshot(obj):
    """``obj`` as a record keeps it: meta tensors as detached aliases (the same
    storage and geometry, which ``param.data = other`` cannot repoint later), real
    tensors as copies of their current values."""
    t = type(obj)
    if t is tuple:  # the common cases without pytree's per-leaf cost
        for x in obj:
            if type(x) is not int:
                return tuple(snapshot(x) for x in obj)
        return obj  # a shape: nothing to copy
    if t is list:
        return [snapshot(x) for x in obj]
    if t is dict:
        for v in obj.values():
            if type(v) not in _LEAVES:
                return {k: snapshot(v) for k, v in obj.items()}
        return dict(obj)  # (a factory's dtype=, device=: nothing to copy)
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.is_meta else obj.detach().clone()
    if t in _LEAVES:
        return obj
    return tree_map(snapshot, obj) if isinstance(obj, (tuple, list, dict)) else obj


_LEAVES = frozenset({int, float, bool, str, type(None), complex, torch.dtype, torch.device, torch.Size,
                     torch.memory_format, torch.layout, slice, type(Ellipsis)})


def _record_eager_draw(rec: Recording, t: torch.Tensor, gen: torch.Generator, run, name: str) -> None:
    """Model code drawing from its own generator into meta tensor ``t``: the draw
    runs now (``run(real)`` on a real tensor with ``t``'s geometry, so in the same
    element order), and ``t`` is recorded to hold its values."""
    real = _run_recorded(torch.empty_strided, (t.shape, t.stride()), {"dtype": t.dtype, "device": gen.device})
    _run_recorded(run, (real,), {})
    if t.numel():
        rec.add_value(t, real.to("cpu"), f"{name}(drawn from its generator)")


def _on(device, args_kwargs, *, values, shape_only: bool = False):
    """``(args, kwargs)`` with meta tensors as real tensors on ``device``: their values
    (``values(args, kwargs)``), or, for an op that reads shapes only, empty tensors."""
    if shape_only:
        return tree_map(lambda x: torch.empty_like(x, device=device) if isinstance(x, torch.Tensor) and x.is_meta
                        else x, args_kwargs)
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, values(*args_kwargs))


# Elementwise float math whose meta kernels are Python references (55-90 us a call in
# torch 2.13, against 2-4 us for the CPU kernel on a small tensor): on small dense meta
# tensors, the result's shape, dtype and strides come from the same op on CPU stand-ins.
SHAPED_ON_CPU = frozenset({
    "add", "sub", "mul", "div", "true_divide", "pow", "reciprocal", "neg", "exp", "log", "sqrt", "rsqrt",
    "sin", "cos", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__div__", "__rdiv__", "__pow__", "__rpow__", "__neg__",
})
_SMALL = 1 << 16


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


_SHAPED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_len_mode_stack = getattr(torch._C, "_len_torch_function_stack", None)
_mode_at = getattr(torch._C, "_get_function_stack_at", None)


def _alone() -> bool:
    """Inside a recorder's handler: whether no other torch function mode is on the stack
    (the handler's own mode is off it meanwhile), so that an op made unseen changes nothing."""
    return _len_mode_stack is not None and _len_mode_stack() == 0


def _only_mode(mode) -> bool:
    """Outside its handler: whether ``mode`` is the one torch function mode on this thread's stack."""
    return _len_mode_stack is not None and _mode_at is not None and _len_mode_stack() == 1 and _mode_at(0) is mode


def _shaped_on_cpu(func, args, kwargs):
    """The meta result of ``func`` (one of :data:`SHAPED_ON_CPU`) on small dense meta
    tensors of float dtypes (plain tensors or parameters), shaped by the same op on
    uninitialized CPU tensors of their shapes and strides (float math raises nothing
    whatever the values; the recorded op replays on the real values); None where that
    does not apply (then the meta kernel runs): other types, a result of more than
    :data:`_SMALL` elements, another torch function mode on the stack."""
    if "out" in kwargs or not _alone():
        return None
    grad = torch.is_grad_enabled()
    shapes = []
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            if not (type(x) in _PLAIN_TENSORS and x.is_meta and x.dtype in _SHAPED_DTYPES
                    and x.numel() <= _SMALL and x.is_contiguous() and not (grad and x.requires_grad)):
                return None
            shapes.append(x.shape)
        elif isinstance(x, (list, tuple, dict)):
            return None
    if not shapes:
        return None
    try:
        n = math.prod(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return None  # (the meta kernel raises eager's error)
    if n > _SMALL:
        return None

    def stand_in(x):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if isinstance(x, torch.Tensor) else x

    with torch._C.DisableTorchFunction():  # (no mode sees the stand-ins: none but the recorder's is on)
        out = func(*(stand_in(x) for x in args), **{k: stand_in(v) for k, v in kwargs.items()})
        return _meta_like(out) if type(out) is torch.Tensor else None


def _small_range_on_meta(args, kwargs):
    """``torch.arange(...)`` on meta of a short range of numbers, made on the CPU and
    shaped on meta (torch's meta arange of floats runs a Python reference: 140 us); None
    otherwise."""
    if len(args) > 3 or set(kwargs) - {"dtype", "device", "start", "end", "step"}:
        return None
    named = {"start": 0, "step": 1, **{k: v for k, v in kwargs.items() if k in ("start", "end", "step")}}
    named.update(zip(("end",) if len(args) == 1 else ("start", "end", "step"), args))
    start, end, step = named["start"], named.get("end"), named["step"]
    if any(type(v) not in (int, float) for v in (start, end, step)) or not step:
        return None  # (errors as torch's meta arange raises them)
    if not 0 <= (end - start) / step <= _SMALL or kwargs.get("dtype") not in (None, *_SHAPED_DTYPES, torch.int64,
                                                                                torch.int32) or not _alone():
        return None
    with torch._C.DisableTorchFunction():
        return _meta_like(torch.arange(*args, **{**kwargs, "device": "cpu"}))


# Set while a recorder runs an op it has recorded: a recorder further out (a session
# inside another one, a deferred_init inside a constructor) lets it through unrecorded.
class _Depth(threading.local):
    depth = 0


_recorded = _Depth()


def _run_recorded(func, args, kwargs):
    """``func(*args, **kwargs)``, an op this recorder has recorded (see ``_recorded``)."""
    _recorded.depth += 1
    try:
        return func(*args, **kwargs)
    finally:
        _recorded.depth -= 1


def _held(rec: Recording, out, label: str):
    """``out`` (real tensors computed or drawn while a model is built) as meta tensors
    that ``rec`` records to hold those values."""
    def as_meta(x):
        if not isinstance(x, torch.Tensor) or x.is_meta:
            return x
        meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        rec.record(meta)
        if x.numel():
            rec.add_value(meta, x.detach().to("cpu").clone(), label)
        return meta

    return tree_map(as_meta, out)


def _as_meta(obj):
    """``obj`` with its real tensors as meta tensors of the same geometry (not 0-dim
    ones: torch treats those as scalars on any device)."""
    return tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) and not x.is_meta and x.dim() else x,
                    obj)


def _mixes_meta_and_real(args, kwargs) -> bool:
    """Whether an op's tensor arguments mix meta tensors with real ones (not 0-dim:
    torch treats those as scalars on any device)."""
    meta = real = False
    for t in tensors_in(args, kwargs):
        if t.is_meta:
            meta = True
        elif t.dim():
            real = True
    return meta and real


def _no_meta_kernel(e: BaseException) -> bool:
    """Whether an op failed on meta tensors for want of a meta kernel (ops whose
    result's size depends on the values), not because of its arguments."""
    msg = str(e)
    if isinstance(e, NotImplementedError):
        return "meta" in msg.lower()
    # ("cannot repeat_interleave a meta tensor without output_size", allclose's
    # "Tensor.item() cannot be called on meta tensors" from inside the op,
    # tensor_split's "expected tensor_indices_or_sections to be on cpu, but it's on meta")
    return "meta tensor" in msg.lower() or "it's on meta" in msg or (
        "Meta" in msg and ("kernel" in msg or "backend" in msg or "fake impl" in msg))


# Ops that write into some arguments without an in-place name or a version-counter
# bump (their schemas do not mark the write): (parameter names, the flag that turns
# the write on and its default, the parameters written).
_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_HIDDEN = {
    torch.nn.functional.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training",
                                      "momentum", "eps"), ("training", False), ("running_mean", "running_var")),
    torch.batch_norm: (_BN, ("training", False), ("running_mean", "running_var")),
    torch.native_batch_norm: (_BN[:-1], ("training", False), ("running_mean", "running_var")),
    torch.ops.aten.native_batch_norm: (_BN[:-1], ("training", False), ("running_mean", "running_var")),
    torch.ops.aten.native_batch_norm.default: (_BN[:-1], ("training", False), ("running_mean", "running_var")),
    torch.ops.aten._native_batch_norm_legit: (_BN[:-1], ("training", False), ("running_mean", "running_var")),
    torch.ops.aten._native_batch_norm_legit.default: (_BN[:-1], ("training", False),
                                                      ("running_mean", "running_var")),
    torch.nn.functional.instance_norm: (("input", "running_mean", "running_var", "weight", "bias",
                                         "use_input_stats", "momentum", "eps"), ("use_input_stats", True),
                                        ("running_mean", "running_var")),
    torch.instance_norm: (("input", "weight", "bias", "running_mean", "running_var", "use_input_stats",
                           "momentum", "eps", "cudnn_enabled"), ("use_input_stats", True),
                          ("running_mean", "running_var")),
}


def _hidden_writes(func, args, kwargs) -> tuple:
    """The tensors ``func(*args, **kwargs)`` writes into without saying so (see ``_HIDDEN``)."""
    spec = _HIDDEN.get(func)
    if spec is None:
        return ()
    params, (flag, default), written = spec
    bound = dict(zip(params, args))
    bound.update(kwargs)
    if not bound.get(flag, default):
        return ()
    return tuple(bound[n] for n in written if isinstance(bound.get(n), torch.Tensor))


def only_scalars(args, kwargs) -> bool:
    return not any(True for _ in tensors_in(args, kwargs))


class Recorder(TorchFunctionMode):
    """Records into ``home`` (new meta storages; ``None``: only storages some
    recording already holds) and hands real tensors to ``batch`` (or runs them)."""

    def __init__(self, home: Recording | None = None, batch=None):
        super().__init__()
        self.home = home
        self.batch = batch
        # (tensor, write_lookup(tensor)) while a torch.nn.init call on it runs the drop-in,
        # so that the sink does not look it up again
        self.hint: tuple | None = None

    def recording_for(self, t: torch.Tensor) -> Recording | None:
        """Where a write into meta tensor ``t`` is recorded."""
        return self.write_lookup(t)[0]

    def write_lookup(self, t: torch.Tensor) -> tuple:
        """``(recording, storage record)`` of a write into meta tensor ``t``: where it is
        recorded (None: nowhere), and the record of ``t``'s storage there (None: none yet)."""
        dt = is_dtensor(t)
        found = recorded_or_adopted(t)
        if found is not None and not (dt and self.home is not None and self.home.root is not None
                                      and found[1].node is not None and found[1].node.func in _DTENSOR_ALIASES):
            touch(found[0])  # (before it is written into)
            return (found[0], None) if dt else found
        if self.home is not None and self.home.root is not None and dt:  # (a built model's)
            raise NotImplementedError(
                "fastinit: a write into a parameter sharded after deferred_init (fully_shard, "
                "distribute_tensor) cannot be recorded: its record is the unsharded tensor's. Initialize "
                "before sharding (in the constructor, or batched(module=model) / init calls before "
                "fully_shard), or build the model under torch.device('meta'), shard it, then "
                "materialize(model, init_fn=...)")
        return self.home, None

    # ------------------------------------------------------------ dispatch

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if _recorded.depth:  # a recorder inside this one recorded the op and runs it: not again
            return func(*args, **kwargs)
        kind = _kind(func)
        if kind == _QUERY:
            return func(*args, **kwargs)
        if kind == _SEEN_QUERY:
            name = func.__name__
            if self.batch is not None and self.batch.pending and name in RAW_READS:  # (it runs the queue)
                self.batch.on_op(func, name, kind, None, args, kwargs)
            if getattr(func, "__self__", None) is _IS_META and args and args[0].is_meta:
                self._early_return_init(args[0], sys._getframe(1))
            if func is _DEEPCOPY and self.home is not None and args and args[0].is_meta:
                return self._record_deepcopy(func, args, kwargs)
            return func(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None and isinstance(gen, torch.Generator):
            drawn = self._drawn_now(func, kind, args, kwargs)
            if drawn is not None:
                return drawn
        if self.home is not None and "out" not in kwargs and (
                kind == _FACTORY or (func is torch.normal and ("size" in kwargs or len(args) >= 3))):
            # (torch.normal(mean, std, size) is a factory; with tensor arguments it follows them)
            kwargs["device"] = "meta"  # whatever device the code names: recorded, keyed by the seed
            out = _small_range_on_meta(args, kwargs) if func is torch.arange else None
            if out is None:
                out = _run_recorded(func, args, kwargs)
            self.home.record(out, Node(self.home.next_seq(), func, snapshot(args), snapshot(kwargs)))
            return out
        name = getattr(func, "__name__", "")
        if kind == _NN_INIT:
            t = args[0] if args else kwargs.get("tensor")  # handle_torch_function passes keywords
            if isinstance(t, torch.Tensor) and t.is_meta:
                where = self.write_lookup(t)
                if where[0] is not None:
                    self.hint = (t, where)
                    try:
                        return getattr(dropin, name)(*args, **kwargs)  # validates as torch does; the sink records
                    finally:
                        self.hint = None
        if kind == _READ and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            value = self._read_value(args[0])
            if value is not None:
                return func(value, *args[1:], **kwargs)
        target = write_target(name, args, kwargs)
        if target is None and kind == _NN_INIT and isinstance(kwargs.get("tensor"), torch.Tensor):
            target = kwargs["tensor"]  # (torch.nn.init's own call on a real tensor, by keyword)
        if self.batch is not None and self.batch.pending:
            handled, result = self.batch.on_op(func, name, kind, target, args, kwargs)
            if handled:
                return result
        if target is not None and target.is_meta:
            rec = self.recording_for(target)
            if rec is not None:
                return self._record_write(rec, func, name, target, args, kwargs)
        if self.home is not None and "device" in kwargs and kwargs["device"] is not None \
                and any(True for t in tensors_in(args, kwargs) if t.is_meta):
            kwargs["device"] = "meta"  # randn_like(meta_x, device="cpu") and the like stay recorded
        if target is not None and self.batch is not None:
            if self.batch.keeps(target):
                return None if name == "__setitem__" else target  # real before materialize: it keeps its values
            self.batch.before_write(target)  # (a block's writes into real tensors are undone on failure)
        if target is not None and not target.is_meta and any(t.is_meta for t in tensors_in(args, kwargs)):
            # real.mul_(meta) (torch would do nothing): the meta operands stand for values
            # the code computed, which eager code would have used here
            args, kwargs = self._with_values(args, kwargs)
        watched = self._watch(func, args, kwargs) if target is None else None
        # a random op on real tensors only (torch.normal(mean, std) of a distribution's sample):
        # on meta, recorded, so that materialize keys it by the seed as it keys factories
        draw_later = self.home is not None and target is None and name in RANDOM_NAMES and not name.endswith("_") \
            and kind != _NN_INIT and "out" not in kwargs \
            and kwargs.get("generator") is None and any(True for _ in tensors_in(args, kwargs)) \
            and not any(t.is_meta for t in tensors_in(args, kwargs))
        try:
            if draw_later or target is None and _mixes_meta_and_real(args, kwargs):
                # torch.ones(4) + loaded.bias inside init_fn, with ones made meta: computed on meta
                # here; the recorded op keeps the real tensors' values, for materialize
                out = func(*_as_meta(args), **_as_meta(kwargs))
            else:
                out = _shaped_on_cpu(func, args, kwargs) if target is None and name in SHAPED_ON_CPU else None
                if out is None:
                    out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:
            if target is not None or not _no_meta_kernel(e):
                raise
            return self._computed_now(func, name, args, kwargs, e)
        if watched:
            self._record_side_writes(func, name, watched)
        self._note_created(func, args, kwargs, out)
        return out

    # ------------------------------------------------------------ writes no name announces

    def _watch(self, func, args, kwargs):
        """Before an op that is no recognized write: its recorded meta tensors and their
        version counters (an in-place write bumps them, wherever the tensor sits in the
        arguments), and the snapshot the op would be replayed from. None if it has none."""
        if not any(t.is_meta for t in tensors_in(args, kwargs)):
            return None
        leaves, _ = tree_flatten((args, kwargs))
        seen = [(i, t, None if t.is_inference() else t._version) for i, t in enumerate(leaves)  # (no counter)
                if isinstance(t, torch.Tensor) and t.is_meta and recording_of(t) is not None]
        if not seen:
            return None
        return seen, _hidden_writes(func, args, kwargs), args, kwargs, snapshot((args, kwargs))

    def _record_side_writes(self, func, name, watched) -> None:
        """Record the writes an op made into recorded meta tensors that its name did not
        announce (see :class:`~.record.Event`, kind ``"side"``)."""
        seen, hidden, args, kwargs, (snap_args, snap_kwargs) = watched
        mutated = [(i, t) for i, t, v in seen if (v is not None and t._version != v) or any(t is h for h in hidden)]
        if not mutated:
            return
        outs = kwargs.get("out")
        outs = tree_flatten(outs)[0] if outs is not None else []
        where = tuple(i for i, _ in mutated)
        ats: dict[int, int] = {}
        done = set()
        for i, t in mutated:
            rec = self.recording_for(t)
            sk = storage_key(t)
            if rec is None or sk in done:
                continue
            done.add(sk)
            n = storage_numel(t)
            if not n:
                continue
            # One event per storage, over all of it: the op's result for the storage
            # (written through one view or several: _foreach_mul_([w[0], w[1]], 2))
            whole = t.as_strided((n,), (1,), 0)
            at = ats.setdefault(id(rec), rec.next_seq())  # the op reads its inputs as they were before it
            rec.add_event(whole, "side", overwrites=any(t is o for o in outs) and covers_storage(t), func=func,
                          args=snap_args, kwargs=snap_kwargs, label=name, leaf=i, mutated=where, at=at)

    def _with_values(self, args, kwargs):
        """``(args, kwargs)`` with recorded meta tensors replaced by their values (which
        must not depend on random draws)."""
        def value(x):
            if isinstance(x, torch.Tensor) and x.is_meta:
                v = self._read_value(x)
                if v is None:
                    raise NotImplementedError(
                        f"fastinit: an op writes into a real tensor from a meta tensor of shape "
                        f"{tuple(x.shape)} that nothing records, whose values are unknown")
                return v
            return x

        return tree_map(value, (args, kwargs))

    def _computed_now(self, func, name, args, kwargs, error):
        """An op meta tensors cannot run (its result's size depends on the values:
        ``torch.unique``, ``nonzero``, boolean masks) on tensors a constructor computed:
        run on their values, now, on the CPU (values that depend on random draws, and
        ops that draw, are an error: there is no seed yet). Its tensor results are meta
        tensors that hold those values; anything else (a count) is returned as is."""
        found = [recording_of(t) for t in tensors_in(args, kwargs) if t.is_meta]
        if None in found or (self.home is None and not found):
            raise error  # a meta tensor nothing records (or none at all): no value to compute from
        real = self._with_values(args, kwargs)
        guard = hooks.DefaultDraws(torch.device("cpu"))  # (no global generator read: other threads draw)
        with torch._C.DisableTorchFunction(), guard:
            out = func(*real[0], **real[1])
        if guard.drew:  # torch.binomial, Dirichlet's sample
            raise NotImplementedError(
                f"fastinit.deferred_init: {name} draws random numbers and has no meta kernel, so it cannot be "
                "recorded to draw at materialize (keyed by the seed); make this tensor after materialize(), "
                "or with a generator of its own (generator=g)")
        rec = self.home if self.home is not None else found[0][0]
        return _held(rec, out, f"{name}(computed while built)")

    def _record_deepcopy(self, func, args, kwargs):
        """``copy.deepcopy`` of a meta tensor while a model is built (an EMA or MoCo key
        encoder copied in a constructor): torch clones it where no mode sees the
        clone, so the copy is recorded here as a clone of its source, made now."""
        src = args[0]
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_meta and recording_of(out) is None \
                and recording_of(src) is not None:
            self.home.record(out, Node(self.home.next_seq(), torch.Tensor.clone, (src.detach(),), {}))
        return out

    def _drawn_now(self, func, kind, args, kwargs):
        """A random op given its own ``generator=`` draws from it now, as eager code
        does (its values are the generator's, not the seed's): a factory's result,
        or an in-place draw into a recorded meta tensor, becomes recorded data.
        None: not such an op."""
        gen = kwargs["generator"]
        name = getattr(func, "__name__", "")
        if self.home is not None and kind != _FACTORY and "out" not in kwargs and name in RANDOM_NAMES \
                and not name.endswith("_") and any(t.is_meta for t in tensors_in(args, kwargs)):
            # torch.multinomial(p, n, generator=g), torch.bernoulli(p, generator=g): drawn now,
            # from the values its inputs hold (which must not depend on random draws);
            # randn_like(x, generator=g) reads x's shape only
            real = _on(gen.device, (args, kwargs), shape_only=func in SHAPE_ONLY, values=self._with_values)
            with torch._C.DisableTorchFunction():
                out = func(*real[0], **real[1])
            return _held(self.home, out, f"{name}(drawn from its generator)")
        if self.home is not None and kind == _FACTORY and "out" not in kwargs:
            real = _run_recorded(func, args, {**kwargs, "device": gen.device})
            meta = torch.empty_like(real, device="meta")
            self.home.add_value(meta, real.to("cpu"), "copy_(drawn from its generator)")
            return meta
        t = args[0] if args else kwargs.get("tensor")  # (torch.nn.init's calls come as keywords)
        if not isinstance(t, torch.Tensor) or not t.is_meta or not name.endswith("_") or name not in RANDOM_NAMES:
            return None
        rec = self.recording_for(t)
        if rec is None:
            return None
        if any(x.is_meta for x in tensors_in(args[1:], {k: v for k, v in kwargs.items() if k != "tensor"})):
            # t.bernoulli_(p, generator=g) with p computed by the constructor: p's values now
            rest = _on(gen.device, (args[1:], kwargs), values=self._with_values)
            args, kwargs = (t, *rest[0]), rest[1]
        if args:
            _record_eager_draw(rec, t, gen, lambda real: func(real, *args[1:], **kwargs), name)
        else:
            _record_eager_draw(rec, t, gen, lambda real: func(**{**kwargs, "tensor": real}), name)
        return t

    def _note_created(self, func, args, kwargs, out) -> None:
        """Record the new meta storages ``out`` holds, created by this call."""
        if isinstance(out, torch.Tensor):
            if not out.is_meta:
                return
            metas = [out]
        else:
            metas, _ = tree_flatten(out)
            if not any(isinstance(x, torch.Tensor) and x.is_meta for x in metas):
                return
            metas = [x if isinstance(x, torch.Tensor) and x.is_meta else None for x in metas]
        rec = self.home
        if rec is None:  # batched() on a deferred model: a temporary of its tensors
            for t in tensors_in(args, kwargs):
                if t.is_meta:
                    found = recording_of(t)
                    if found is not None:
                        rec = found[0]
                        break
        if rec is None:
            return
        node = None
        for i, x in enumerate(metas):
            if x is not None and recording_of(x) is None:  # a new storage (views of recorded ones are not)
                if node is None:
                    node = Node(rec.next_seq(), func, snapshot(args), snapshot(kwargs))
                rec.record(x, node, i)

    # ------------------------------------------------------------ writes into meta tensors

    def _record_write(self, rec: Recording, func, name, t, args, kwargs):
        if "out" in kwargs:
            out = _run_recorded(func, args, kwargs)
            rec.add_event(t, "op", overwrites=True, func=func, args=snapshot(args),
                          kwargs=snapshot(kwargs), label=name)
            return out
        rest = args[1:]

        def arg(i, key, default):
            return rest[i] if len(rest) > i else kwargs.get(key, default)

        floating = t.dtype.is_floating_point
        if name == "__setitem__" and len(rest) == 2 and basic_index(rest[0]) \
                and (is_number(rest[1]) or isinstance(rest[1], torch.Tensor)):
            return self._record_assign(rec, func, t, args)
        if name in _SCALAR_FILLS and floating and only_scalars(rest, kwargs) \
                and not (t.requires_grad and torch.is_grad_enabled()):  # (else the op raises: a leaf)
            # On meta tensors torch runs uniform_/normal_ through its Python references
            # (about a millisecond a call) and fill_ skips the value checks; the checks
            # eager code makes, with its errors, run on an empty CPU tensor of the dtype
            # in microseconds, and the meta op itself (which would only return ``t``) not at all.
            func(stand_in(t.dtype, "cpu"), *rest, **kwargs)
            spec = scalar_fill_spec(name, rest, kwargs)
            if spec is not None:
                if t.numel():
                    rec.add_event(t, "fill", overwrites=True, spec=spec)
                return t
        if name in _VALUE_CHECKED and only_scalars(rest, kwargs):
            func(stand_in(t.dtype, "cpu"), *rest, **kwargs)  # values (overflow, casts), with the CPU's errors
        if any(not x.is_meta for x in tensors_in(rest, kwargs)):  # a CPU index, a CPU source
            out = _run_recorded(func, (*args[:1], *_as_meta(rest)), _as_meta(kwargs))  # (meta kernels: one device)
        else:
            out = _run_recorded(func, args, kwargs)  # meta: shapes, dtypes and indices checked as eagerly
        if t.numel() == 0:
            return out
        constant = scalar_fill_spec(name, rest, kwargs) if name in ("fill_", "zero_") and floating else None
        if constant is not None:
            rec.add_event(t, "fill", overwrites=True, spec=constant)
        elif name in _AFFINE and floating and is_number(arg(0, "other", None)) \
                and not kwargs.get("rounding_mode") and is_number(arg(1, "alpha", 1)):
            k = float(arg(0, "other", None))
            mul, add = ((k, 0.0), (1.0 / k if k else float("inf"), 0.0),
                        (1.0, k * float(arg(1, "alpha", 1))), (1.0, -k * float(arg(1, "alpha", 1))))[_AFFINE[name]]
            rec.add_event(t, "affine", overwrites=False, mul=mul, add=add, func=func, args=snapshot(args),
                          kwargs=snapshot(kwargs), label=name)
        else:
            rec.add_event(t, "op", overwrites=name in OVERWRITING, func=func, args=snapshot(args),
                          kwargs=snapshot(kwargs), label=name)
        return out

    def _record_assign(self, rec: Recording, func, t, args):
        """``t[idx] = value`` with a basic index: an overwrite of the view ``t[idx]``
        (so ``w.data[:] = 2.0``, or rows written one by one, initialize ``w``)."""
        out = _run_recorded(func, args, {})  # meta: shapes and indices checked as eager code would
        idx, value = args[1], args[2]
        view = t[idx]
        if is_number(value):
            value = stored_as(value, t.dtype)
        if not view.numel():
            return out
        if is_number(value) and t.dtype.is_floating_point:
            rec.add_event(view, "fill", overwrites=True, spec=Constant(float(value)))
        else:  # (copy_ broadcasts as assignment does)
            fill = torch.Tensor.fill_ if is_number(value) else torch.Tensor.copy_
            rec.add_event(view, "op", overwrites=True, func=fill, args=(view.detach(), snapshot(value)),
                          kwargs={}, label="__setitem__")
        return out

    def _early_return_init(self, t: torch.Tensor, frame) -> None:
        """``trunc_normal_``/``orthogonal_``/``sparse_``/``dirac_`` of torch.nn.init
        read ``t.is_meta`` (in ``frame``) and return: record the call they would have made."""
        hit = hooks.init_call_reading_is_meta(frame)
        if hit is None or self.recording_for(t) is None:
            return
        name, a, frame = hit
        gen = a.get("generator")
        if isinstance(gen, torch.Generator):  # its own generator: drawn now, as eagerly
            _record_eager_draw(self.recording_for(t), t, gen,
                               lambda real: getattr(torch.nn.init, name)(**{**a, "tensor": real}), name)
            return
        if name == "trunc_normal_":
            # Eager code warns and raises (std == 0) as torch would: same checks here.
            spec = dropin.trunc_normal_spec(a["mean"], a["std"], a["a"], a["b"], zero_std_is_error=True,
                                            stacklevel=hooks.stacklevel_above(frame))
            if t.numel():
                self.recording_for(t).add_event(t, "fill", overwrites=True, spec=spec)
        else:  # fastinit's own function: it checks the arguments as the eager call would, then the sink records it
            getattr(dropin, name)(t, **{k: v for k, v in a.items() if k != "tensor"})

    # ------------------------------------------------------------ values read while recording

    def _read_value(self, t: torch.Tensor):
        """The real value of a recorded meta tensor that code reads while it is
        built (``[x.item() for x in torch.linspace(0, p, depth)]``), computed on the
        CPU if it is deterministic; a value that depends on random draws is an error."""
        found = recording_of(t)
        if found is None:
            return None
        return _reader(found[0], t)


def _unset_reader(rec: Recording, t: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("fastinit: the deferred-init evaluator is not loaded")


# ``_reader(recording, t)``: the value of ``t`` as recorded so far; set by
# :mod:`.execute`, the stage that computes values (recording only asks for them).
_reader = _unset_reader


# A DTensor alias of a sharded parameter made inside a block (p.detach(), p.data): a
# record of its own, but a write into it is a write into the sharded parameter.
_DTENSOR_ALIASES = frozenset({torch.Tensor.detach, torch.Tensor.view_as})
_DEEPCOPY = torch.Tensor.__deepcopy__


class RecordingSink:
    """Takes the drop-in calls made while a :class:`Recorder` runs."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def fill(self, tensor, spec, generator) -> bool:
        if tensor.is_meta:
            hint = self.recorder.hint
            rec, r = hint[1] if hint is not None and hint[0] is tensor else self.recorder.write_lookup(tensor)
            if rec is None:
                return False
            if tensor.numel():
                # An explicit generator keys the fill as the same call made eagerly
                # (drawn now); otherwise materialize's (seed, name) does.
                key = draw_key(generator) if generator is not None and spec.random else None
                rec.add_event(tensor, "fill", overwrites=True, spec=spec, key=key, r=r)
            return True
        batch = self.recorder.batch
        if batch is None:
            return False
        if batch.fill(tensor, spec, generator):
            return True
        batch.before_write(tensor)  # (filled now)
        return False

    def reads(self, tensors) -> None:
        """A call is about to read the values of ``tensors`` (a 0-d tensor given as a
        fill's mean or std): what is queued in their memory runs first."""
        if self.recorder.batch is not None:
            self.recorder.batch.before_read(tensors)

    def writes_now(self, tensor) -> bool:
        """Whether a constant fill of ``tensor``, or a small one's random fill that draws
        from torch's default generator, is written now, as the call one by one would,
        rather than recorded or queued: a real CPU tensor (no DTensor) with nothing
        queued in its memory and not keyed by name, while no torch function mode but this
        recorder's would see the write. A memset or torch's op on a small tensor costs
        less than queueing it, and the CPU engine fuses neither. An undoable block keeps
        the tensor's bytes first."""
        if tensor.is_meta or not tensor.is_cpu or is_dtensor(tensor) or not _only_mode(self.recorder):
            return False
        batch = self.recorder.batch
        if batch is not None:
            sk = storage_key_or_none(tensor)
            if sk is None:  # no storage of its own (a torch.func transform's tensor): nothing can be
                batch.flush()  # queued for it, and it may wrap queued memory: after the queue, now
                return not batch.atomic
            # queued instead: in an atomic block (a failure drops it), behind what is queued in its
            # memory, for a named tensor (its fills are keyed by their place among its events),
            # or dropped there, for one materialize keeps
            if batch.atomic or sk in batch.pending or (batch.seed is not None and sk in batch.names) \
                    or batch.keeps(tensor):
                return False
            batch.before_write(tensor)
        return True

    def replay(self, tensor, fn, args, kwargs) -> bool:
        if tensor.is_meta:
            rec = self.recorder.recording_for(tensor)
            if rec is None:
                return False
            gen = kwargs.get("generator")
            if isinstance(gen, torch.Generator) and tensor.numel():
                # Its own generator (orthogonal_, sparse_): drawn now, as eagerly, whatever the seed.
                with _sink.unseen():
                    _record_eager_draw(rec, tensor, gen, lambda real: fn(real, *args, **kwargs), fn.__name__)
                return True
            if tensor.numel():
                rec.add_event(tensor, "op", overwrites=True, func=fn, args=(tensor.detach(), *args),
                              kwargs=dict(kwargs), label=fn.__name__)
            return True
        batch = self.recorder.batch
        if batch is not None:
            if batch.keeps(tensor):
                return True  # real before materialize: it keeps its values
            # a structured init writes this tensor now: what is queued in its memory first (its key
            # is drawn now, after the queued calls drew theirs; it reads no other tensor)
            batch.flush(only=tensor)
            batch.before_write(tensor)  # (written now, by the engines)
        return False


_OUTSIDE = RecordingSink(Recorder())


def current_batch():
    """The queue of the ``batched()`` block (or ``init_fn``) this thread runs in, or None."""
    sink = _sink.current.get()
    return sink.recorder.batch if isinstance(sink, RecordingSink) else None


def outside_sink_for(t: torch.Tensor):
    """Outside any block: the sink of deferred meta tensor ``t`` (None for other tensors)."""
    return _OUTSIDE if recorded_or_adopted(t) is not None else None


_sink.meta_sink = outside_sink_for


def _leave(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack unless it is gone already
    (a Ctrl-C inside torch's own handling of a call, which takes the mode off while the
    mode runs, can leave it off; popping then would fail and hide the interrupt)."""
    size = getattr(torch._C, "_len_torch_function_stack", None)
    at = getattr(torch._C, "_get_function_stack_at", None)
    if size is not None and at is not None and all(at(i) is not mode for i in range(size())):
        return
    mode.__exit__(None, None, None)


@contextlib.contextmanager
def recording(home: Recording | None = None, batch=None):
    """Run the block under a :class:`Recorder` (and its sink)."""
    touched = session_started()
    if home is not None:
        touch(home)
    rec = Recorder(home, batch)
    token = _sink.current.set(RecordingSink(rec))
    entered = contextlib.ExitStack()
    try:
        # (a Ctrl-C inside torch's mode push, before a with-block owns it, left the recorder
        # on the thread's mode stack for good: eager code then made meta tensors)
        with interrupts_held():
            # Only a recording with a home makes new tensors meta (the legacy constructor too).
            if home is not None:
                entered.enter_context(hooks.recording_thread())
            rec.__enter__()
            entered.callback(_leave, rec)
        yield rec
    except BaseException:
        with interrupts_held():
            if not entered.__exit__(*sys.exc_info()):
                raise
    else:
        with interrupts_held():
            entered.close()
    finally:
        _sink.current.reset(token)
        session_ended(touched)


__all__ = ["Recorder", "RecordingSink", "recording", "covers_storage"]
