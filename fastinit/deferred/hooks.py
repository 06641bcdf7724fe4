"""Every hook fastinit puts into torch, in one place.

Recording is a ``TorchFunctionMode`` (torch's public extension point), which is
thread-local and leaves torch unchanged. Two things it cannot see are handled
here, each checked against what it expects when first used (a clear error
naming torch's version if torch changed), and inert for threads that are not
recording:

* **The legacy constructor** ``torch.Tensor(out, in)`` (uninitialized memory of
  a size, as older modules write ``nn.Parameter(torch.Tensor(out, in))``) does
  not dispatch to modes. While any thread records, ``torch.Tensor.__new__`` is
  replaced by :func:`_legacy_tensor_new`, which makes a meta ``torch.empty`` in
  a recording thread and calls torch's own constructor everywhere else; it is
  removed when the last recording ends, also on error. The typed classes
  (``torch.FloatTensor(d, h, k)``, as transformers' XLNet makes its parameters)
  are immutable types: their names in ``torch`` are replaced meanwhile by
  :class:`_LegacyTypedMeta` stand-ins, likewise.
* **Code that seeds or sets torch's global generator** (``torch.manual_seed(k)``,
  ``torch.set_rng_state(s)``, and ``torch.random.fork_rng``, which calls them)
  while fastinit records: draws made after are keyed by ``materialize``'s seed
  and each tensor's name, not drawn from that state, so values the code makes
  fixed or equal that way differ, and a mode sees none of these calls. While any
  thread records, the names in ``torch`` and ``torch.random`` are wrappers that
  note such a call made by a recording thread (not fastinit's own) and then call
  torch's function; :func:`recording_thread` warns once at its end.
* **Init functions that return early on meta tensors** (``trunc_normal_``,
  ``orthogonal_``, ``sparse_``, ``dirac_`` in ``torch.nn.init``) never reach a
  mode with their arguments, but each reads ``tensor.is_meta`` first, and a mode
  does see that read. :func:`init_call_reading_is_meta` finds the calling init
  function's frame and its arguments; no torch code is changed, and references
  to these functions captured at import time (transformers' ``initialization``
  module) are seen too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._frames import first_frame_outside
from .._interrupts import interrupts_held

# torch.nn.init functions that return early on meta tensors after reading
# tensor.is_meta, and the arguments fastinit reads from their frames.
_EARLY_RETURN_INITS = {
    "_no_grad_trunc_normal_": ("trunc_normal_", ("tensor", "mean", "std", "a", "b", "generator")),
    "orthogonal_": ("orthogonal_", ("tensor", "gain", "generator")),
    "sparse_": ("sparse_", ("tensor", "sparsity", "std", "generator")),
    "dirac_": ("dirac_", ("tensor", "groups")),
}
_codes: dict | None = None


def _torch_changed(what: str) -> RuntimeError:
    return RuntimeError(
        f"fastinit: torch {torch.__version__} {what}, which fastinit's deferred init relies on; "
        "this torch version is not supported by this fastinit release (please report it)")


def _init_codes() -> dict:
    """``{code object: (init name, argument names)}``, checked once against torch."""
    global _codes
    if _codes is None:
        codes, patched = {}, False
        for fn_name, (init_name, params) in _EARLY_RETURN_INITS.items():
            fn = getattr(torch.nn.init, fn_name, None)
            owner = getattr(fn, "__module__", None) or ""
            if owner == "fastinit" or owner.startswith("fastinit."):
                patched = True  # (not remembered: torch's may be put back)
                continue  # patched with fastinit's own function, which records itself
            if fn is not None and owner != torch.nn.init.__name__:
                raise RuntimeError(
                    f"fastinit: torch.nn.init.{fn_name} is not torch's (it was replaced by {owner}."
                    f"{getattr(fn, '__qualname__', fn)!s}), so deferred init cannot see what it does on meta "
                    "tensors; put torch's back, or replace it with fastinit's")
            code = getattr(fn, "__code__", None)
            if code is None or "is_meta" not in code.co_names or not set(params) <= set(code.co_varnames):
                raise _torch_changed(f"changed torch.nn.init.{fn_name} (it no longer reads tensor.is_meta "
                                     f"with arguments {', '.join(params)})")
            codes[code] = (init_name, params)
        if patched:
            return codes
        _codes = codes
    return _codes


def init_call_reading_is_meta(f):
    """``(name, {argument: value}, frame)`` if ``f``, the frame that read
    ``tensor.is_meta`` (the caller of a mode's ``__torch_function__``), is one of
    the torch.nn.init functions of :data:`_EARLY_RETURN_INITS`, else None. Only
    that frame counts, so a read made deeper inside such a function is not taken
    for the function's own."""
    hit = _init_codes().get(f.f_code)
    if hit is None:
        return None
    name, params = hit
    loc = f.f_locals
    return name, {p: loc[p] for p in params}, f


def stacklevel_above(frame) -> int:
    """The ``warnings.warn`` stacklevel that names the caller of ``frame``'s function
    (for warnings torch would have given the user's line)."""
    level, f = 1, sys._getframe(1)
    while f is not None and f is not frame:
        f = f.f_back
        level += 1
    return level + 2 if f is not None else 2


# ------------------------------------------------------------ torch.Tensor.__new__

_local = threading.local()
_lock = threading.Lock()
_installed = 0


def _recording_here() -> bool:
    return getattr(_local, "depth", 0) > 0


def _legacy_tensor_new(*args, **kwargs):
    """``torch.Tensor(64, 32)`` becomes ``torch.empty(64, 32)`` on meta in a
    recording thread, so that the init that follows is recorded instead of running
    on real memory. Any other use is torch's own constructor.

    The signature is ``(*args, **kwargs)`` on purpose: torch._dynamo, when first
    imported during a recording (meta ops can import it), checks the signature
    of ``torch.Tensor.__new__`` against its polyfill and accepts only an exact
    match or this wildcard. Dynamo then keeps this function, not the builtin, in
    its polyfill registry: compiled code that constructs Tensor subclasses may
    graph-break in such a process; nothing else depends on it."""
    cls, args = args[0], args[1:]
    if cls is torch.Tensor and not kwargs and args and _recording_here():
        sizes = args[0] if len(args) == 1 and isinstance(args[0], torch.Size) else args
        if all(isinstance(a, int) and not isinstance(a, bool) for a in sizes):
            return torch.empty(*sizes, device="meta")
    return torch._C.TensorBase.__new__(cls, *args, **kwargs)


class _LegacyTypedMeta(type):
    """The metaclass of the stand-ins for ``torch.FloatTensor`` and its kin while a
    recording runs: in a recording thread ``torch.FloatTensor(d, h, k)``
    (uninitialized memory, as transformers' XLNet makes its parameters) becomes
    ``torch.empty`` on meta, like ``torch.Tensor(d, h, k)``; any other call is the
    class's own. These classes are immutable types, so their names in ``torch`` are
    what is replaced (code that imported a class itself keeps torch's). A stand-in
    is a type (``torch.FloatTensor | None`` in an annotation still works) whose
    ``isinstance``, ``issubclass`` and attributes are the class's."""

    def __call__(cls, *args, **kwargs):
        if not kwargs and args and _recording_here():
            sizes = args[0] if len(args) == 1 and isinstance(args[0], torch.Size) else args
            if all(isinstance(a, int) and not isinstance(a, bool) for a in sizes):
                return torch.empty(*sizes, dtype=cls._dtype, device="meta")
        return cls._cls(*args, **kwargs)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls._cls)

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, cls._cls)

    def __getattr__(cls, name):
        return getattr(cls._cls, name)

    def __eq__(cls, other) -> bool:  # (a table keyed by torch's class finds it)
        return other is cls._cls or other is cls

    def __hash__(cls) -> int:
        return hash(cls._cls)

    def __repr__(cls) -> str:
        return repr(cls._cls)


_LEGACY_TYPED = {"FloatTensor": torch.float32, "DoubleTensor": torch.float64, "HalfTensor": torch.float16,
                 "BFloat16Tensor": torch.bfloat16}
_saved_typed: dict = {}


def _install_typed() -> None:
    for name, dtype in _LEGACY_TYPED.items():
        cls = getattr(torch, name, None)
        if cls is None:
            continue
        if not isinstance(cls, type) or type(cls).__name__ != "tensortype":
            raise _torch_changed(f"torch.{name} is not torch's legacy tensor type (something replaced it)")
        _saved_typed[name] = cls
        # (its C name is torch's, "torch.FloatTensor": x.type(torch.FloatTensor) reads it)
        setattr(torch, name, _LegacyTypedMeta(f"{cls.__module__}.{name}", (),
                                              {"_cls": cls, "_dtype": dtype, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__}))  # (pickled by torch's name)


def _remove_typed() -> None:
    for name, cls in _saved_typed.items():
        setattr(torch, name, cls)
    _saved_typed.clear()


# ------------------------------------------------------------ torch's global generator

_RNG_SETTERS = ("manual_seed", "set_rng_state")
_saved_rng: list = []  # (module, name, the function found there, our wrapper of it)


def _outside_fastinit(depth: int) -> str | None:
    """The module of the first frame above ``depth`` that is neither torch's nor
    contextlib's (a ``fork_rng`` block's caller), or None when that is fastinit's."""
    f, _ = first_frame_outside(("torch", "contextlib"), depth)
    name = f.f_globals.get("__name__", "") if f is not None else ""
    return None if name.partition(".")[0] == "fastinit" else name or "?"


def _noting(name: str, fn):
    @functools.wraps(fn)  # (its name, module and doc: pickled and inspected as torch's)
    def wrapper(*args, **kwargs):
        if _recording_here() and _outside_fastinit(2) is not None:
            shown = f"torch.{name}({args[0]!r})" if name == "manual_seed" and args else f"torch.{name}(...)"
            if shown not in _local.rng_calls:
                _local.rng_calls.append(shown)
        return fn(*args, **kwargs)

    return wrapper


def _install_rng() -> None:
    import torch.random

    made: dict = {}  # one wrapper per function: torch.manual_seed is torch.random.manual_seed stays true
    for name in _RNG_SETTERS:
        for mod in (torch, torch.random):
            fn = getattr(mod, name)
            ours = made.get(id(fn)) or made.setdefault(id(fn), _noting(name, fn))
            _saved_rng.append((mod, name, fn, ours))
            setattr(mod, name, ours)


def _remove_rng() -> None:
    for mod, name, fn, ours in reversed(_saved_rng):
        # (torch._dynamo, first imported while recording, wraps torch.manual_seed once: then
        # what it wrapped, ours, stays under its wrapper, inert outside a recording thread)
        if getattr(mod, name) is ours:
            setattr(mod, name, fn)
    _saved_rng.clear()


def _warn_rng_calls(calls: list[str]) -> None:
    _, level = first_frame_outside(("fastinit", "contextlib"), 1)  # (the warning names the user's line)
    import warnings

    warnings.warn(
        f"fastinit: the code recorded called {', '.join(calls[:3])}{' and more' if len(calls) > 3 else ''}: "
        "draws it made after are keyed by materialize's seed and each tensor's name, not drawn from the "
        "state it set, so values eager code makes fixed or equal that way (a buffer drawn after "
        "manual_seed in fork_rng, two tensors drawn from one saved state) differ from eager ones. Draw "
        "such values from a torch.Generator of the code's own, which deferred init keeps exactly",
        stacklevel=level)


@contextlib.contextmanager
def recording_thread():
    """Mark this thread as recording and keep the hooks installed meanwhile
    (installed by the first recording in the process, removed by the last)."""
    global _installed
    _init_codes()  # fail early, with the torch version, if torch changed
    entered = failed = False
    outer = getattr(_local, "depth", 0) == 0
    try:
        with interrupts_held():  # (a Ctrl-C half-way through would leave torch patched for good)
            with _lock:
                if _installed == 0:
                    if "__new__" in torch.Tensor.__dict__:
                        raise _torch_changed("defines torch.Tensor.__new__ (or something else replaced it)")
                    try:
                        torch.Tensor.__new__ = staticmethod(_legacy_tensor_new)
                        _install_typed()
                        _install_rng()
                    except BaseException:
                        _uninstall()
                        raise
                _installed += 1
            if outer:
                _local.rng_calls = []
            _local.depth = getattr(_local, "depth", 0) + 1
            entered = True
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if entered:
            with interrupts_held():
                _local.depth -= 1
                with _lock:
                    _installed -= 1
                    if _installed == 0:
                        _uninstall()
        if entered and outer and _local.rng_calls and not failed:
            _warn_rng_calls(_local.rng_calls)


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: the recordings of other threads did
    not survive, and nothing would take their hooks out. Only the forking thread's own
    recordings (if it forked while recording) keep them."""
    global _installed, _lock
    _lock = threading.Lock()
    _installed = getattr(_local, "depth", 0)
    if _installed == 0:
        _uninstall()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _uninstall() -> None:
    """Every hook back to torch's (each step undoes only what is there)."""
    if "__new__" in torch.Tensor.__dict__ and torch.Tensor.__dict__["__new__"].__func__ is _legacy_tensor_new:
        del torch.Tensor.__new__  # back to torch._C.TensorBase's
    _remove_typed()
    _remove_rng()


# ------------------------------------------------------------ draws from default generators

def _generator_index(func) -> int | None:
    """Where aten op ``func`` takes its ``generator`` argument, or None."""
    idx = _GEN_INDEX.get(func, -1)
    if idx == -1:
        idx = next((i for i, a in enumerate(func._schema.arguments) if a.name == "generator"), None)
        _GEN_INDEX[func] = idx
    return idx


_GEN_INDEX: dict = {}


@functools.lru_cache(maxsize=None)
def _no_generator_draws() -> frozenset:
    """aten ops some overload of which draws from a default generator and takes none."""
    aten = torch.ops.aten
    return frozenset({aten.native_dropout, aten.rand_like, aten.randn_like, aten.randint_like, aten.rand,
                      aten.randperm})


def _drawn_with(func, args, kwargs, g):
    """The draw of ``func``, an overload of :func:`_no_generator_draws` taking no
    generator, made with ``g``."""
    aten = torch.ops.aten
    packet = func._overloadpacket
    if packet is aten.native_dropout:
        x, p = args[0], args[1] if len(args) > 1 else kwargs["p"]
        train = args[2] if len(args) > 2 else kwargs.get("train")
        if train is False or p == 0:
            return x.clone(), torch.ones_like(x, dtype=torch.bool)
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p, generator=g)
        return x * mask * (0.0 if p == 1 else 1.0 / (1.0 - p)), mask
    if packet in (aten.rand_like, aten.randn_like, aten.randint_like):
        x = args[0]
        opts = {k: kwargs[k] for k in ("dtype", "layout", "device", "memory_format") if kwargs.get(k) is not None}
        out = torch.empty_like(x, **opts)
        if packet is aten.rand_like:
            return out.uniform_(0.0, 1.0, generator=g)
        if packet is aten.randn_like:
            return out.normal_(0.0, 1.0, generator=g)
        bounds = [a for a in args[1:] if isinstance(a, (int, torch.SymInt))]
        low, high = (0, bounds[0]) if len(bounds) == 1 else (bounds[0], bounds[1])
        return out.random_(low, high, generator=g)
    return packet.generator(*args, generator=g, **kwargs)  # (rand, randperm: their overload that takes one)


class DefaultDraws(TorchDispatchMode):
    """In this thread only (dispatch modes are per thread), every aten op that would
    draw from a default generator draws from ``gen`` instead; with ``gen=None`` from a
    throwaway generator, the op noted in ``drew``. No global generator is read,
    advanced or reset, whatever other threads draw meanwhile (comparing and putting
    back the global state, as before, rewound another thread's stream)."""

    def __init__(self, device: torch.device, gen: torch.Generator | None = None):
        super().__init__()
        self.device, self.gen, self.drew = device, gen, []

    def _generator(self, func) -> torch.Generator:
        if self.gen is not None:
            return self.gen
        self.drew.append(getattr(func, "__name__", str(func)))
        return torch.Generator(device=self.device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        idx = _generator_index(func)
        if idx is not None:
            if idx < len(args):
                if args[idx] is None:
                    args = (*args[:idx], self._generator(func), *args[idx + 1:])
            elif kwargs.get("generator") is None:
                kwargs["generator"] = self._generator(func)
            return func(*args, **kwargs)
        if func._overloadpacket in _no_generator_draws():
            return _drawn_with(func, args, kwargs, self._generator(func))
        return func(*args, **kwargs)
