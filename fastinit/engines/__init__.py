"""Engines: fill a batch of ``(tensor, spec, key)`` targets.

* ``triton``    — CUDA tensors: Triton kernels, one launch per dtype per batch
  (on CPU tensors only under ``TRITON_INTERPRET=1``, which is how CI checks them);
* ``cpu``       — CPU tensors: pure torch, chunk-parallel on a thread pool;
* ``reference`` — any device: pure torch Philox, slow, bit-identical to ``triton``
  for uniform and constant (truncated normal agrees to float32 rounding; normal too,
  except for the GPU's approximate sin/cos, within 2^-20 of the radius).

The default engine is chosen by device (CUDA → ``triton``, CPU → ``cpu``);
:func:`use_engine` or the ``FASTINIT_ENGINE`` environment variable override it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ..specs import Constant, InitSpec, TruncNormal, Uniform
from .alias import quiet, restore_versions, unversioned

ENGINE_NAMES = ("cpu", "reference", "triton")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastinit_engine", default=None)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """Where a tensor's elements sit in the flat index of its logical, global tensor.

    Local element ``j = r * cols + c`` (row-major over the local tensor, seen as
    ``rows x cols``) is global element ``offset + r * row_stride + c`` of a
    global tensor of ``global_numel`` elements. An
    unsharded tensor is one row: ``Layout.dense(numel)``. A shard of a
    ``DTensor`` is a box of the global tensor, which coalesces to this form.
    """

    offset: int
    rows: int
    cols: int
    row_stride: int
    global_numel: int

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def dense(numel: int) -> "Layout":
        return Layout(0, 1, numel, numel, numel)  # (frozen: one object per size serves every tensor)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def global_range(self) -> tuple[int, int]:
        """[first, last + 1) of the global indices this layout touches."""
        if self.numel == 0:
            return self.offset, self.offset
        return self.offset, self.offset + (self.rows - 1) * self.row_stride + self.cols


@dataclass
class Target:
    """One tensor to fill: ``tensor`` gets ``spec`` with values keyed by ``key``."""

    tensor: torch.Tensor
    spec: InitSpec
    key: int
    layout: Layout | None = None
    name: str = field(default="")
    engine: str | None = None  # the engine that fills it (None: the one in force for its device)

    def __post_init__(self):
        if self.layout is None:
            self.layout = Layout.dense(self.tensor.numel())
        elif self.layout.numel != self.tensor.numel():
            raise ValueError(
                f"layout covers {self.layout.numel} elements but the tensor has {self.tensor.numel()}"
            )


_MODULES: dict = {}


def _engine_module(name: str):
    mod = _MODULES.get(name)
    if mod is not None:
        return mod
    if name == "cpu":
        from . import cpu as mod
    elif name == "reference":
        from . import reference as mod
    elif name == "triton":
        from . import triton as mod
    else:
        raise ValueError(f"unknown fastinit engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    _MODULES[name] = mod
    return mod


def check_engine(name: str, tensor: torch.Tensor | None = None) -> None:
    """Raise a clear error if engine ``name`` does not exist or cannot run on this machine
    (or cannot fill ``tensor``: a queued fill fails at its call, as it would one by one)."""
    mod = _engine_module(name)
    mod.check_available()
    check = getattr(mod, "check_device", None)
    if tensor is not None and check is not None:
        check(tensor)


@contextlib.contextmanager
def use_engine(name: str):
    """Use engine ``name`` for every fill inside the ``with`` block.

    Example::

        with fastinit.use_engine("reference"):
            fastinit.normal_(w)   # what the GPU kernels would have produced
    """
    check_engine(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _env_engine() -> str | None:
    """``$FASTINIT_ENGINE``, read live (CPython's environ mapping directly: a missing
    key through ``os.environ.get`` costs an exception per call)."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if data is None or encode is None:
        return os.environ.get("FASTINIT_ENGINE")
    raw = data.get(_ENV_KEY if _ENV_KEY is not None else encode("FASTINIT_ENGINE"))
    return None if raw is None else os.environ.decodevalue(raw)


_ENV_KEY = os.environ.encodekey("FASTINIT_ENGINE") if hasattr(os.environ, "encodekey") else None


def engine_for(device: torch.device) -> str:
    """The engine that fills tensors on ``device`` right now."""
    return _engine_name(device.type == "cuda")


def _engine_name(cuda: bool) -> str:
    return _override.get() or _env_engine() or ("triton" if cuda else "cpu")


def fill_one(tensor: torch.Tensor, spec: InitSpec, key: int) -> None:
    """``fill([Target(tensor, spec, key)])`` without the batch machinery, for the
    drop-in call: a whole contiguous tensor goes straight to its engine's
    ``fill_one`` (the cpu engine: one chunk on the calling thread; triton: one
    launch with scalar arguments), which returns False for what it leaves to
    :func:`fill`. Unlike :func:`fill`, it may bump the tensor's version counter
    once (the drop-in call bumps it once in any case)."""
    if tensor.dtype in FLOAT_DTYPES and tensor.is_contiguous() and not tensor.is_neg():
        if not tensor.numel():
            return
        name = _engine_name(tensor.is_cuda)
        one = getattr(_MODULES.get(name) or _engine_module(name), "fill_one", None)
        if name != "cpu" and type(spec) is TruncNormal and _cpu_only(spec):
            one = None  # (fill() draws it with the cpu engine's samplers, as for a batch)
        if one is not None and one(
                tensor, spec.for_dtype(tensor.dtype) if type(spec) is Uniform and spec.top is None else spec, key):
            return
    fill([Target(tensor, spec, key)])


def _engine_function(tensor: torch.Tensor, name: str):
    """Function ``name`` of the engine in force for ``tensor``'s device, or None."""
    engine = _engine_name(tensor.is_cuda)
    return getattr(_MODULES.get(engine) or _engine_module(engine), name, None)


def fill_like_torch(tensor: torch.Tensor, op: str, args: tuple, before=None) -> bool:
    """The drop-in call ``tensor.<op>(*args)`` (``uniform_``, ``normal_``) on torch's
    default generator, made as ``torch.nn.init`` makes it, with torch's own op, where the
    engine in force does that better than a keyed fill (the cpu engine, for small
    tensors; see ``cpu.fill_like_torch``), ``before()`` called first (False from it:
    nothing is done). False: nothing was done, and the caller keys the fill."""
    like = _engine_function(tensor, "fill_like_torch")
    return like is not None and like(tensor, op, args, before)


def fill_default(tensor: torch.Tensor, spec: InitSpec, before=None) -> bool:
    """A drop-in call's fill drawn from torch's default generator without a key, where
    the engine in force does that better (the cpu engine, for small tensors: torch's
    own ``uniform_``/``normal_``, the values ``torch.nn.init`` gives, and the exact
    truncated normal through torch's ops; see ``cpu.fill_default``), ``before()``
    called first (False from it: nothing is done). The version counter may be bumped
    or not. False: nothing was done, and the caller draws a key."""
    fill = _engine_function(tensor, "fill_default")
    return fill is not None and fill(tensor, spec, before)


def _constants_now(batch: list[Target], progress) -> list[Target]:
    """Fill the constant targets of a cpu batch with torch's ``fill_`` (a memset, about a
    microsecond for a small tensor; the chunk machinery costs ten), with the engine's
    values (both take the float to float32, then round once to a half dtype; float64
    keeps it); returns the rest."""
    rest, held = [], []
    try:
        with torch._C.DisableTorchFunction(), torch.no_grad():
            for t in batch:  # (other dtypes and devices go on, to the engine's own checks)
                if type(t.spec) is Constant and t.tensor.is_cpu and t.tensor.dtype in FLOAT_DTYPES:
                    quiet(t.tensor, held).fill_(t.spec.value)
                    if progress is not None:
                        progress(t.tensor.numel() * t.tensor.element_size())
                else:
                    rest.append(t)
    finally:
        restore_versions(held)
    return rest


def _cpu_only(spec: InitSpec) -> bool:
    """A truncated normal the GPU kernel's float32 inverse CDF would get wrong: a window
    beyond 5 std on one side, a narrow one beside a huge mean (``mean + std z`` cancels
    the window away), an infinite mean. The cpu engine's exact samplers draw it instead
    (:meth:`TruncNormal.sampler`)."""
    return type(spec) is TruncNormal and spec.std != 0.0 and spec.sampler() in ("tail", "tilt", "limit")


def _filled_on_cpu(t: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """``(destination, buffer)``: ``t``'s values made by the cpu engine in a CPU buffer
    (its layout kept: a shard gets its part of the global tensor), to be copied in."""
    buf = torch.empty(t.tensor.shape, dtype=t.tensor.dtype, device="cpu")
    _engine_module("cpu").fill([Target(buf, t.spec, t.key, t.layout, t.name)])
    return t.tensor.detach(), buf


def fill(targets: Sequence[Target] | Iterable[Target], progress=None) -> None:
    """Fill every target, grouped by engine: one batch per engine (and per dtype inside it).

    ``progress``, if given, is called with the number of bytes each finished
    piece of work wrote (from worker threads on CPU).
    """
    groups: dict[str, list[Target]] = {}
    named: dict[bool, str] = {}  # is_cuda -> engine name, looked up once per call
    for t in targets:
        x = t.tensor
        if x.numel() == 0:
            continue
        if type(t.spec) is Uniform and t.spec.top is None and x.dtype in FLOAT_DTYPES:
            t.spec = t.spec.for_dtype(x.dtype)  # [a, b) once rounded to the dtype (unless set)
        name = t.engine
        if name is None:
            cuda = x.is_cuda
            name = named.get(cuda) or named.setdefault(cuda, _engine_name(cuda))
        groups.setdefault(name, []).append(t)
    for name, batch in groups.items():
        mod = _engine_module(name)
        mod.check_available()
        if name == "cpu":
            batch = _constants_now(batch, progress)
        # Engines write flat, contiguous memory. A non-contiguous view (a slice, a
        # transpose) is filled through a contiguous buffer of the view's own size
        # and copied in, so nothing outside the view is touched.
        proxies = []
        work = []
        for t in batch:
            if name != "cpu" and _cpu_only(t.spec):
                proxies.append(_filled_on_cpu(t))
                if progress is not None:
                    progress(t.tensor.numel() * t.tensor.element_size())
                continue
            if t.tensor.is_contiguous() and not t.tensor.is_neg():
                work.append(t)  # engines write through .detach()ed views or data pointers
                continue
            if type(t.spec) is Constant and t.tensor.dtype in FLOAT_DTYPES:
                # a constant needs no buffer: fill_ writes any view, expanded ones too (whose
                # copy_ refuses), with the engines' values (see _constants_now)
                with torch._C.DisableTorchFunction(), torch.no_grad():
                    unversioned(t.tensor).fill_(t.spec.value)
                if progress is not None:
                    progress(t.tensor.numel() * t.tensor.element_size())
                continue
            dst = t.tensor.detach()
            buf = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
            proxies.append((dst, buf))
            work.append(Target(buf, t.spec, t.key, t.layout, t.name))
        mod.fill(work, progress)
        if proxies:
            with torch.no_grad(), torch._C.DisableTorchFunction():
                for dst, buf in proxies:
                    unversioned(dst).copy_(buf)
