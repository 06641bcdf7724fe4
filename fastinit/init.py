r"""Drop-in replacements for every public function of ``torch.nn.init``.

Same names, parameters, defaults, return values and errors as torch 2.13, with
``import fastinit as init`` instead of ``import torch.nn.init as init``. Each
random init is described by an :class:`~fastinit.specs.InitSpec` computed from
the tensor's shape exactly as torch computes it, keyed by a 64-bit key drawn from
``generator`` (or torch's default CPU generator, so ``torch.manual_seed`` governs
it), and filled by the engine of the tensor's device. A call on the default
generator into a small contiguous CPU tensor takes no key: the cpu engine draws
from that generator itself (``uniform_``/``normal_`` and the rules built on them
are then torch's own op, with ``torch.nn.init``'s values; see
``engines.fill_default``).
"""

from __future__ import annotations

import contextvars
import math
import warnings

import torch

from . import _sink, engines
from ._sink import dynamo_compiling
from .distributed import check_placements, fill_dtensor, fill_dtensor_default, is_dtensor
from .fans import (
    calculate_correct_fan,
    calculate_fan_in_and_fan_out,
    calculate_gain,
    scaled_std,
    shape_of,
)
from .seeding import draw_key, splitmix64
from .specs import Constant, InitSpec, Normal, TruncNormal, Uniform

_TORCH_TYPE_NAMES = {
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
    torch.uint8: "Byte", torch.bool: "Bool", torch.uint16: "UInt16", torch.uint32: "UInt32",
    torch.uint64: "UInt64",
}
_INFERENCE_MSG = (
    "Inplace update to inference tensor outside InferenceMode is not allowed."
    "You can make a clone to get a normal tensor before doing inplace update."
    "See https://github.com/pytorch/rfcs/pull/17 for more details."
)
_OVERLAP_MSG = (
    "unsupported operation: more than one element of the written-to tensor refers to a single "
    "memory location. Please clone() the tensor before performing the operation."
)


def _is_engine_dtype(dtype: torch.dtype) -> bool:
    return dtype in engines.FLOAT_DTYPES


def _check_normal_dtype(tensor: torch.Tensor, device: torch.device) -> None:
    """Integer and bool tensors cannot hold normal draws: torch raises NotImplementedError."""
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        name = _TORCH_TYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        raise NotImplementedError(f'"normal_kernel_{device.type}" not implemented for \'{name}\'')


# ------------------------------------------------------------ checks, before any write
#
# torch.nn.init ends every random init in one in-place op (``uniform_``/``normal_``)
# under ``no_grad``. Its argument, generator, dtype and bound checks are made by
# running that very op on a 0-element tensor of the same dtype and device (a
# "stand-in": it writes nothing, consumes no random numbers and costs about a
# microsecond), so every bad input raises torch's own error, before anything is
# written. What torch checks only while writing (overlapping memory, inference
# tensors) is checked here first.

_STAND_INS: dict = {}
_CPU = torch.device("cpu")
# Set while a call on a meta tensor stands for the same call on a CPU tensor (a
# scheme's dry run): its values are checked as the CPU's kernels check them.
meta_checked_as_cpu: contextvars.ContextVar = contextvars.ContextVar("fastinit_meta_checked_as_cpu", default=False)


def stand_in(dtype: torch.dtype, device) -> torch.Tensor:
    """A 0-element tensor of ``dtype`` on ``device`` (not an inference tensor)."""
    key = (dtype, device)
    s = _STAND_INS.get(key)
    if s is None:
        with torch._C.DisableTorchFunction(), torch.inference_mode(False):
            s = _STAND_INS[key] = torch.empty(0, dtype=dtype, device=device)
    return s


def check_like_torch(tensor: torch.Tensor, op: str, *args, recording: bool = False, **kwargs) -> None:
    """Raise what ``tensor.<op>(*args, **kwargs)`` would raise in torch, writing nothing.

    A meta tensor is checked as torch's meta kernels check it, unless it is being
    recorded (``recording``: it stands for the real tensor eager code would make
    on the CPU, so it is checked as that one would be).
    """
    as_cpu = tensor.is_meta and (recording or meta_checked_as_cpu.get())
    device = _CPU if as_cpu else tensor.device
    s = stand_in(tensor.dtype, device)
    with torch._C.DisableTorchFunction():
        getattr(s, op)(*args, **kwargs)
    if op == "normal_" and tensor.numel() and (as_cpu or not tensor.is_meta):
        # torch's normal_ looks at the dtype only when there are elements to write
        _check_normal_dtype(tensor, device)


def _whole_tensor_only(tensor: torch.Tensor, name: str, error=NotImplementedError) -> None:
    """Structured inits see the whole tensor: on a DTensor they would compute on each
    shard as if it were the whole (torch's own eye_/dirac_ then write wrong values
    without an error): an error, before anything is written."""
    if is_dtensor(tensor):
        raise error(f"fastinit.{name}: DTensors are not supported (each shard would be initialized as if it "
                    "were the whole tensor); initialize the full tensor, then distribute it, or materialize a "
                    "deferred model (its replays are computed whole)")


def _exotic(tensor) -> bool:
    """A tensor no engine holds: a sparse (or other non-strided) layout, or a nested one."""
    return isinstance(tensor, torch.Tensor) and (tensor.layout != torch.strided or tensor.is_nested)


def _torch_on_scratch(fn, tensor, *args, generator=None):
    """``torch.nn.init``'s own ``fn`` on a tensor no engine holds (:func:`_exotic`):
    first on a copy, with the random state put back, so that where torch raises after
    writing part of the tensor (``sparse_`` on a CSR tensor) it raises the same with
    nothing written; where that succeeds, on the tensor itself (the values torch gives)."""
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        with torch.random.fork_rng(devices=[tensor.device] if tensor.is_cuda else []):
            fn(tensor.clone(), *args, generator=generator)
    finally:
        if state is not None:
            generator.set_state(state)
    return fn(tensor, *args, generator=generator)


def check_writable(tensor: torch.Tensor, overlap: bool = True) -> None:
    """torch's checks of an in-place write that its kernels make while writing."""
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_MSG)
    if not overlap or tensor.numel() == 0 or tensor.is_contiguous():
        return  # (a contiguous tensor has no stride-0 dimension of size > 1)
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride == 0 and size > 1:
            raise RuntimeError(_OVERLAP_MSG)


def _version_incrementer():
    """torch.autograd.graph.increment_version on ``(t,)``: the C function it calls, in
    the form this torch's takes (a tuple of tensors in 2.13, one tensor in older ones)."""
    f = getattr(torch._C, "_increment_version", None)
    probe = torch.zeros(1)
    for form in (f, lambda ts: f(ts[0])):
        try:
            v = probe._version
            form((probe,))
        except (TypeError, RuntimeError):
            continue
        if probe._version == v + 1:
            return form
    return lambda ts: torch.autograd.graph.increment_version(ts[0])


_increment_version = _version_incrementer()


def bump_version(tensor: torch.Tensor) -> None:
    """The one version-counter bump of an eager in-place write (inference tensors
    have no counter): autograd then sees the write."""
    if not tensor.is_inference():
        _increment_version((tensor,))


def bump_version_once(tensor: torch.Tensor, before) -> None:
    """One version-counter bump for the call (autograd then sees the write), unless a
    torch op of the fill already made it."""
    if before is not None and tensor._version == before:
        _increment_version((tensor,))


def _version(tensor: torch.Tensor):
    return None if tensor.is_inference() else tensor._version


_DEFAULT_DISPATCH = torch.Tensor.__torch_dispatch__
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


_transforms_active = torch._C._are_functorch_transforms_active
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _proxy_traced() -> bool:
    """Whether ``make_fx`` (torch.export's and AOT's tracer) is tracing: a dispatch mode
    is on, and it is the proxy mode (looked up only then: a microsecond)."""
    if not _dispatch_modes():
        return False
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None


def foreign(tensor) -> bool:
    """Whether a call is left to ``torch.nn.init`` itself: while ``torch.compile``
    traces it (the graph then holds torch's ops) or ``make_fx`` does; on a tensor that a
    ``torch.func`` transform wraps (``vmap``, ``grad``, ``jvp``, ``functionalize``: the
    write must go through the transform, whose randomness rules are torch's); or on a
    tensor subclass with a ``__torch_dispatch__`` of its own (FakeTensor, wrapper
    subclasses such as torchao's; not DTensor, which fastinit fills shard by shard).
    The data of all of these is out of any engine's reach (written there, a fill was
    lost under ``functionalize``, with no error)."""
    return (type(tensor).__torch_dispatch__ is not _DEFAULT_DISPATCH and not is_dtensor(tensor)) \
        or _is_compiling() or (_transforms_active() and _wrapped(tensor)) or _proxy_traced()


def random_fill(tensor: torch.Tensor, op: str, op_args: tuple, generator, make_spec,
                torch_fallback=None) -> torch.Tensor:
    """The drop-in path of every random init that torch ends in ``tensor.<op>(*op_args)``.

    Checks as torch would (:func:`check_like_torch`, :func:`check_writable`),
    then builds the spec (``make_spec()``), then fills the tensor now or hands
    the call to the active recorder. ``torch_fallback()`` runs instead for
    dtypes the engines do not hold (complex), and for :func:`foreign` calls.
    Nothing is written when it raises.
    """
    plain = type(tensor) in _PLAIN
    if (plain or isinstance(tensor, torch.Tensor)) and foreign(tensor):
        return torch_fallback()
    sink = _sink.for_tensor(tensor)
    if sink is not None and tensor.layout == torch.strided:
        if isinstance(op_args[0], torch.Tensor) or isinstance(op_args[1], torch.Tensor):
            with torch._C.DisableTorchFunction():  # (a 0-d tensor as mean or std: its value, queued work run)
                sink.reads([x for x in op_args if isinstance(x, torch.Tensor)])
        # a small CPU tensor the sink lets write now (nothing queued in its memory, not keyed
        # by name): torch's own op at once, as one by one (see below); the recorder's mode
        # need not see the engine's lookups
        if plain and generator is None:
            with torch._C.DisableTorchFunction():
                if _writable(tensor) and engines.fill_like_torch(tensor, op, op_args,
                                                                 before=lambda: sink.writes_now(tensor)):
                    return tensor
        spec = _checked_spec(tensor, op, op_args, {"generator": generator}, make_spec)
        return _fill_now(tensor, spec, generator, sink, torch_fallback)
    if _exotic(tensor):  # sparse, nested...: torch's own op, its errors
        with torch.no_grad():
            return getattr(tensor, op)(*op_args, generator=generator)
    if tensor.is_meta or not _is_engine_dtype(tensor.dtype):
        check_like_torch(tensor, op, *op_args, generator=generator)
        if tensor.is_meta:
            bump_version(tensor)  # torch's meta kernels check no more than that, and count the write
            return tensor
        check_writable(tensor)
        if not plain and is_dtensor(tensor):
            check_placements(tensor)
        return torch_fallback()  # complex: torch's own
    # a small CPU tensor: torch's own op, its checks and errors (only the cpu engine, which
    # only CPU tensors have, draws without a key: others skip the lookups)
    tried = plain and generator is None and tensor.is_cpu and _writable(tensor)
    if tried and engines.fill_like_torch(tensor, op, op_args):
        return tensor
    # (the checks remembered as a sink's are: the same op on a stand-in of the same dtype)
    return _write_now(tensor, _checked_spec(tensor, op, op_args, {"generator": generator}, make_spec), generator,
                      not plain, default_tried=tried)


def _writable(tensor: torch.Tensor) -> bool:
    """Whether torch's own op may write ``tensor`` as the call: not an inference tensor
    outside inference mode, which torch's op writes, then refuses (the keyed path checks
    the arguments, then refuses it before anything is written)."""
    return not (tensor.is_inference() and not torch.is_inference_mode_enabled())


# Recorded or queued calls (a model built under deferred_init makes hundreds, mostly
# alike: nn.Linear's kaiming_uniform_, then the model's normal_): what the checks and
# the spec of a call gave, by everything they depend on (the op, its numbers and their
# types, the dtype, whether there are elements, the device type; checks on a stand-in
# look at nothing else), and what Kaiming's fan and gain gave, by shape and arguments.
_CHECKED: dict = {}
_FANS: dict = {}
_NUMBER_TYPES = (int, float)


def _checked_key(op: str, op_args: tuple, tensor: torch.Tensor):
    # floats as themselves, but a zero by its sign (0.0 and -0.0 are equal keys and give
    # other values); an int followed by ``int`` (1 and 1.0 are equal keys too); the
    # device by its type (meta read without making a device object: this is on every
    # recorded call's path)
    key = [op, tensor.dtype, tensor.numel() > 0,
           "meta" if tensor.is_meta else "cpu" if tensor.is_cpu else tensor.device.type]
    for x in op_args:
        t = type(x)
        if t is float:
            key.append(x if x else math.copysign(1.0, x))  # (a zero: +-1.0, and no float is)
            if not x:
                key.append(0.0)
        elif t is int:
            key.append(x)
            key.append(int)
        else:
            return None
    return tuple(key)


def _remember(memo: dict, key, value) -> None:
    if len(memo) > 4096:
        memo.clear()
    memo[key] = value


def _checked_spec(tensor: torch.Tensor, op: str, op_args: tuple, op_kwargs: dict, make_spec, check=None):
    """torch's checks of ``tensor.<op>(*op_args, **op_kwargs)`` (or ``check()``, for a
    call that is not one op), raising what torch raises, then ``make_spec()``; both
    remembered by what they depend on (see ``_CHECKED``; not for an explicit
    generator), and unseen by the recorder's mode."""
    with _sink.no_modes() if type(tensor) in _PLAIN else torch._C.DisableTorchFunction():
        memo = _checked_key(op, op_args, tensor) if op_kwargs.get("generator") is None else None
        spec = _CHECKED.get(memo) if memo is not None else None
        if spec is None:
            if check is None:
                check_like_torch(tensor, op, *op_args, recording=True, **op_kwargs)
            else:
                check()
            spec = make_spec()
            if memo is not None:
                _remember(_CHECKED, memo, spec)
        return spec


def _fill_now(tensor, spec, generator, sink, torch_fallback) -> torch.Tensor:
    """The checked spec's fill: recorded, a no-op on meta, or written now (one version bump)."""
    if sink is not None:
        with torch._C.DisableTorchFunction():
            if sink.fill(tensor, spec, generator):
                return tensor
    if tensor.is_meta:
        if sink is None:
            bump_version(tensor)  # (as torch's op on a meta tensor: no values, one write counted)
        return tensor
    if not _is_engine_dtype(tensor.dtype):
        check_writable(tensor)
        return torch_fallback()
    return _write_now(tensor, spec, generator, True)


def _write_now(tensor, spec, generator, maybe_dtensor: bool, default_tried: bool = False) -> torch.Tensor:
    """Write the checked spec into a real tensor of an engine dtype, with one version bump
    (``default_tried``: the engine already declined to fill it from torch's default
    generator without a key)."""
    check_writable(tensor)
    before = None if tensor.is_inference() else tensor._version
    dtensor = maybe_dtensor and is_dtensor(tensor)
    if dtensor:  # (before a key is drawn: a refused call changes nothing)
        check_placements(tensor, zero=type(spec) is Constant and spec.value == 0)
    if not tensor.numel():
        pass  # (nothing to draw: torch's op draws nothing from the generator either)
    elif spec.random and generator is None and not default_tried and (
            fill_dtensor_default(tensor, spec) if dtensor else tensor.is_cpu and engines.fill_default(tensor, spec)):
        pass  # (a small CPU tensor, or DTensor: drawn from torch's default generator, no key)
    elif dtensor:
        fill_dtensor(tensor, spec, draw_key(generator) if spec.random else 0)
    else:
        engines.fill_one(tensor, spec, draw_key(generator) if spec.random else 0)
    bump_version_once(tensor, before)
    return tensor


def submit(tensor: torch.Tensor, spec: InitSpec, generator=None, torch_fallback=None) -> torch.Tensor:
    """Fill ``tensor`` with ``spec`` now (or hand the call to the active recorder).

    ``torch_fallback()`` runs instead for dtypes the engines do not hold (complex).
    """
    if isinstance(spec, Constant):
        return _constant_fill(tensor, spec.value)
    if isinstance(spec, Uniform):
        return random_fill(tensor, "uniform_", (spec.a, spec.b), generator, lambda: spec, torch_fallback)
    if isinstance(spec, Normal):
        return random_fill(tensor, "normal_", (spec.mean, spec.std), generator, lambda: spec, torch_fallback)
    return _fill_now(tensor, spec, generator, _sink.for_tensor(tensor), torch_fallback)


def _constant_fill(tensor: torch.Tensor, value) -> torch.Tensor:
    """``tensor.fill_(value)`` under no_grad, as torch.nn.init does (or recorded)."""
    if dynamo_compiling():  # (torch.compile traces torch's own function)
        return torch.nn.init.constant_(tensor, value)
    sink = _sink.for_tensor(tensor)
    if sink is None and not tensor.is_meta and not is_dtensor(tensor):
        return _memset(tensor, value)
    if sink is not None:
        with torch._C.DisableTorchFunction():  # (a recorder's mode need not see our own bookkeeping)
            if tensor.layout != torch.strided or (not isinstance(value, torch.Tensor) and sink.writes_now(tensor)):
                return _memset(tensor, value)  # (sparse...: torch's own op, nothing records or queues it)
        if isinstance(value, torch.Tensor) and not tensor.is_meta and not value.is_meta and value.dim() == 0:
            # a queued call takes the value the tensor holds now (it may change before the
            # queue runs; reading it runs what is queued into it first), converted as torch's
            # fill_(Tensor) converts it (65520. into float16 is inf), which refuses
            # overlapping memory (fill_ of a number writes into expanded tensors)
            check_writable(tensor)
            value = value.to(tensor.dtype).item()
        spec = _checked_spec(tensor, "fill_", (value,), {}, lambda: Constant(value))
        with torch._C.DisableTorchFunction():
            if sink.fill(tensor, spec, None):
                return tensor
    else:
        check_like_torch(tensor, "fill_", value)
    if tensor.is_meta:
        with torch.no_grad():
            return tensor.fill_(value)
    if is_dtensor(tensor):
        check_placements(tensor, zero=_is_zero(value))
        if _is_engine_dtype(tensor.dtype):
            check_writable(tensor, overlap=False)
            fill_dtensor(tensor, Constant(float(value)), 0)
            return tensor
    return _memset(tensor, value)


def _is_zero(value) -> bool:
    """Whether a fill value is zero (a number, a bool, a complex, a 0-d tensor)."""
    try:
        return bool(value == 0)
    except (TypeError, RuntimeError, ValueError):
        return False


def _memset(tensor: torch.Tensor, value) -> torch.Tensor:
    """torch.nn.init.constant_'s own op, ``tensor.fill_(value)`` with grad off: its checks
    and errors (value overflow) come before it writes, except the inference-tensor one
    (torch writes, then raises): that one first."""
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        check_like_torch(tensor, "fill_", value)  # (a bad value: torch's argument error comes first)
        check_writable(tensor, overlap=False)  # (then the refusal; torch's fill_ allows expanded tensors)
    grad = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        return tensor.fill_(value)
    finally:
        torch._C._set_grad_enabled(grad)


def _replay_or_none(tensor, fn, args, kwargs, check=None):
    """Hand a structured init to the active recorder; True if it was done (recorded,
    or, for a real tensor inside a recording, run now where the recorder does not
    see its own allocations, which it would otherwise make meta tensors). A recorded
    call first runs ``check()``: the checks of its arguments the eager call on a real
    tensor would make (a bad generator or gain raises at the call, not at replay)."""
    sink = _sink.for_tensor(tensor)
    if sink is None:
        return False
    if check is not None and tensor.is_meta:
        with torch._C.DisableTorchFunction():
            check()
    if not sink.replay(tensor, fn, args, kwargs):
        with _sink.unseen():
            fn(tensor, *args, **kwargs)
    return True


# --------------------------------------------------------------------------- fills


def uniform_(tensor, a: float = 0.0, b: float = 1.0, generator=None):
    r"""Fill the input Tensor with values drawn from the uniform distribution.

    :math:`\mathcal{U}(a, b)`: :math:`x = a + (b - a)\,u`, :math:`u \sim U[0, 1)`.

    Args:
        tensor: an n-dimensional `torch.Tensor`
        a: the lower bound of the uniform distribution
        b: the upper bound of the uniform distribution
        generator: the torch Generator drawn from (default: None, torch's default generator)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.uniform_(w)
    """
    return random_fill(tensor, "uniform_", (a, b), generator, lambda: Uniform(float(a), float(b)),
                       lambda: torch.nn.init.uniform_(tensor, a, b, generator=generator))


def normal_(tensor, mean: float = 0.0, std: float = 1.0, generator=None):
    r"""Fill the input Tensor with values drawn from the normal distribution.

    :math:`\mathcal{N}(\text{mean}, \text{std}^2)`.

    Args:
        tensor: an n-dimensional `torch.Tensor`
        mean: the mean of the normal distribution
        std: the standard deviation of the normal distribution (``>= 0``)
        generator: the torch Generator drawn from (default: None, torch's default generator)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.normal_(w)
    """
    return random_fill(tensor, "normal_", (mean, std), generator, lambda: Normal(float(mean), float(std)),
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
        generator: the torch Generator drawn from (default: None, torch's default generator)

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.trunc_normal_(w)
    """
    if isinstance(tensor, torch.Tensor) and foreign(tensor):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator)
    if _exotic(tensor):
        return _torch_on_scratch(torch.nn.init.trunc_normal_, tensor, mean, std, a, b, generator=generator)
    sink = _sink.for_tensor(tensor)
    if tensor.is_meta and sink is None:
        return tensor  # torch returns at once: no checks, no warning
    _trunc_normal_warn(mean, std, a, b, zero_std_is_error=not tensor.is_meta, stacklevel=3)
    recording = sink is not None

    def torch_sampler_p() -> float:  # torch's sampler: the window's mass p picks normal_ or uniform_
        with torch.no_grad():  # (as torch: a tensor mean that requires grad converts without a warning)
            return _norm_cdf((b - mean) / std) - _norm_cdf((a - mean) / std)

    def check():  # the op torch's sampler would run checks the arguments
        if std == 0:
            return
        if torch_sampler_p() > 0.3:
            # torch casts the bounds with the tensor's new_tensor: an int dtype's overflow, a
            # negative view's refusal, a tensor bound's copy warning (a float dtype: nothing else)
            own = tensor.is_neg() or isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
            if own or not tensor.dtype.is_floating_point:
                s = tensor if own else stand_in(tensor.dtype, "cpu")
                s.new_tensor(a, device="cpu").item()
                s.new_tensor(b, device="cpu").item()
            check_like_torch(tensor, "normal_", mean, std, generator=generator, recording=recording)
        else:
            mode = max(a, min(mean, b))
            -0.5 * ((mode - mean) / std) ** 2  # noqa: B018 - torch's log_peak: an OverflowError where it has one
            check_like_torch(tensor, "uniform_", a, b, generator=generator, recording=recording)

    def torch_fallback():  # complex: torch's rejection compares values, which have no order
        with torch._C.DisableTorchFunction():
            (torch.lt if std != 0 and torch_sampler_p() > 0.3 else torch.gt)(stand_in(tensor.dtype, "cpu"), 0)
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator)

    if not tensor.is_meta and not _is_engine_dtype(tensor.dtype):  # complex: torch's own, after its checks
        check()
        if tensor.numel() and std != 0 and not torch_sampler_p() > 0.3:
            # torch's uniform_ checks its bounds only when it has elements to write: on one of
            # the dtype (a generator of its own: nothing drawn from the caller's)
            with torch._C.DisableTorchFunction():
                torch.empty(1, dtype=tensor.dtype).uniform_(a, b, generator=torch.Generator())
        check_writable(tensor)
        return torch_fallback()
    if tensor.is_neg():
        check()  # (not remembered: a tensor alike without the negative bit passes it)
    spec = _checked_spec(tensor, "trunc_normal_", (mean, std, a, b), {"generator": generator},
                         lambda: _trunc_normal_spec(mean, std, a, b), check)
    return _fill_now(tensor, spec, generator, sink, torch_fallback)


def _norm_cdf(x: float) -> float:
    return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0


def trunc_normal_spec(mean: float, std: float, a: float, b: float, *, zero_std_is_error: bool,
                      stacklevel: int) -> InitSpec:
    """The spec of ``trunc_normal_(mean, std, a, b)`` with torch's argument rules: its
    warning when the mean is more than 2 std from [a, b] (``stacklevel`` for it), its
    ZeroDivisionError for std == 0 (it divides by std first), and a negative std
    sampled as |std| (torch only uses std squared). A NaN mean or std makes torch's
    sampler accept every uniform candidate: the spec is then ``Uniform(a, b)``."""
    _trunc_normal_warn(mean, std, a, b, zero_std_is_error=zero_std_is_error, stacklevel=stacklevel + 1)
    return _trunc_normal_spec(mean, std, a, b)


def _trunc_normal_warn(mean, std, a, b, *, zero_std_is_error: bool, stacklevel: int) -> None:
    if (mean < a - 2 * std) or (mean > b + 2 * std):
        warnings.warn(
            "mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
            "The distribution of values may be incorrect.",
            stacklevel=stacklevel,
        )
    if std == 0 and zero_std_is_error:
        # torch's first step, (a - mean) / std: Python numbers raise ZeroDivisionError; a numpy
        # scalar or a 0-d tensor gives inf, and torch then fills with the mean clamped to [a, b]
        _ = (a - mean) / std  # noqa: F841 (for the error it raises, or not)


def _trunc_normal_spec(mean, std, a, b) -> InitSpec:
    mean, std, a, b = float(mean), abs(float(std)), float(a), float(b)
    if math.isnan(mean) or math.isnan(std):
        return Uniform(a, b)
    return TruncNormal(mean, std, a, b)


def constant_(tensor, val: float):
    r"""Fill the input Tensor with the value :math:`\text{val}`.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.constant_(w, 0.3)
    """
    return _constant_fill(tensor, val)


def ones_(tensor):
    r"""Fill the input Tensor with the scalar value `1`.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.ones_(w)
    """
    return _constant_fill(tensor, 1.0)


def zeros_(tensor):
    r"""Fill the input Tensor with the scalar value `0`.

    Examples:
        >>> w = torch.empty(3, 5)
        >>> fastinit.zeros_(w)
    """
    if tensor.layout != torch.strided or tensor.is_quantized:  # torch's zero_ works on sparse tensors, fill_
        with torch.no_grad():  # does not; a quantized one's fill_ works, its zero_ raises
            return tensor.zero_()
    return _constant_fill(tensor, 0.0)


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
    if dynamo_compiling():  # (torch.compile traces torch's own function)
        return torch.nn.init.xavier_uniform_(tensor, gain, generator=generator)
    bound = math.sqrt(3.0) * _xavier_std(tensor, gain)
    return random_fill(tensor, "uniform_", (-bound, bound), generator,
                       lambda: Uniform(-float(bound), float(bound)),
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
    if dynamo_compiling():  # (torch.compile traces torch's own function)
        return torch.nn.init.xavier_normal_(tensor, gain, generator=generator)
    std = _xavier_std(tensor, gain)
    return random_fill(tensor, "normal_", (0.0, std), generator, lambda: Normal(0.0, float(std)),
                       lambda: torch.nn.init.xavier_normal_(tensor, gain, generator=generator))


def _xavier_std(tensor, gain) -> float:
    """Xavier's std (``scaled_std`` with ``"fan_avg"``), remembered by shape and gain
    for a plain tensor, as Kaiming's is."""
    memo = ("fan_avg", tensor.shape, gain.hex() if type(gain) is float else gain, type(gain)) \
        if type(tensor) in _PLAIN and type(gain) in _NUMBER_TYPES else None
    std = _FANS.get(memo) if memo is not None else None
    if std is None:
        std = scaled_std(shape_of(tensor), gain, "fan_avg")
        if memo is not None:
            _remember(_FANS, memo, std)
    return std


def _kaiming(tensor, a, mode, nonlinearity, distribution, generator, fallback):
    if dynamo_compiling():  # (torch.compile traces torch's own function)
        return fallback()
    try:
        shape = tensor.shape
    except RuntimeError:  # a lazy module's parameter
        if distribution == "normal":
            raise  # torch's kaiming_normal_ reads the shape first: this RuntimeError
        shape = shape_of(tensor)  # its kaiming_uniform_ dispatches __torch_function__ first: a ValueError
    if 0 in shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return tensor
    memo = (shape, mode, nonlinearity, a.hex() if type(a) is float else a, type(a)) \
        if type(mode) is str and type(nonlinearity) is str and type(a) in _NUMBER_TYPES else None
    std = _FANS.get(memo) if memo is not None else None
    if std is None:
        fan = calculate_correct_fan(tensor, mode)  # validates dims and mode before the gain, as torch does
        std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
        if memo is not None:
            _remember(_FANS, memo, std)
    if distribution == "uniform":
        bound = math.sqrt(3.0) * std
        return random_fill(tensor, "uniform_", (-bound, bound), generator,
                           lambda: Uniform(-float(bound), float(bound)), fallback)
    return random_fill(tensor, "normal_", (0, std), generator, lambda: Normal(0.0, float(std)), fallback)


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
        generator: the torch Generator drawn from (default: None, torch's default generator)

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
    if dynamo_compiling():  # (torch.compile traces torch's own function)
        return torch.nn.init.eye_(tensor)
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    if _replay_or_none(tensor, eye_, (), {}):
        return tensor
    if tensor.is_meta:
        bump_version(tensor)  # (torch's eye(out=) on a meta tensor: no values, one write counted)
        return tensor
    _whole_tensor_only(tensor, "eye_")
    check_writable(tensor, overlap=False)
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
    if dynamo_compiling():  # (torch.compile traces torch's own function)
        return torch.nn.init.dirac_(tensor, groups)
    dimensions = tensor.ndimension()
    if dimensions not in [3, 4, 5]:
        raise ValueError("Only tensors with 3, 4, or 5 dimensions are supported")
    sizes = tensor.size()
    if sizes[0] % groups != 0:
        raise ValueError("dim 0 must be divisible by groups")
    if _replay_or_none(tensor, dirac_, (groups,), {}) or tensor.is_meta:
        return tensor
    _whole_tensor_only(tensor, "dirac_")
    out_per_group = sizes[0] // groups
    min_dim = min(out_per_group, sizes[1])
    # torch's zero_ refuses an inference tensor first (expanded tensors it allows), then its
    # loops raise TypeError for non-integers: both before any write here
    check_writable(tensor, overlap=False)
    range(groups), range(min_dim)
    with torch.no_grad():  # torch's own loop: same writes, same errors, same version bumps
        tensor.zero_()
        centre = tuple(s // 2 for s in sizes[2:])
        for g in range(groups):
            for d in range(min_dim):
                tensor[(g * out_per_group + d, d) + centre] = 1
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
    if isinstance(tensor, torch.Tensor) and foreign(tensor):
        return torch.nn.init.orthogonal_(tensor, gain, generator=generator)
    if _exotic(tensor):
        return _torch_on_scratch(torch.nn.init.orthogonal_, tensor, gain, generator=generator)
    if tensor.ndimension() < 2:
        raise ValueError("Only tensors with 2 or more dimensions are supported")
    def check():
        # torch draws with new_empty((rows, cols)).normal_(0, 1, generator), then writes
        # tensor.view_as(q).copy_(q) and tensor.mul_(gain): all checked before any write, in
        # that order (a view across strides raises before a bad gain)
        if tensor.numel():
            check_like_torch(tensor, "normal_", 0, 1, generator=generator, recording=True)
            with torch.no_grad(), torch._C.DisableTorchFunction():
                tensor.view(tensor.size(0), tensor.numel() // tensor.size(0))
                check_writable(tensor)  # (copy_'s refusals: an inference tensor, overlapping memory)
                stand_in(tensor.dtype, "cpu" if tensor.is_meta else tensor.device).mul_(gain)

    if _replay_or_none(tensor, orthogonal_, (gain,), {"generator": generator}, check):
        return tensor
    if tensor.numel() == 0 or tensor.is_meta:
        return tensor
    _whole_tensor_only(tensor, "orthogonal_")
    if not _is_engine_dtype(tensor.dtype):  # complex and integer tensors: torch's own errors
        return torch.nn.init.orthogonal_(tensor, gain, generator=generator)
    rows = tensor.size(0)
    cols = tensor.numel() // rows
    check()
    target = tensor.view(rows, cols)
    flattened = _filled((rows, cols), Normal(0.0, 1.0), _subkey(generator, 0x0), tensor)
    if rows < cols:
        flattened.t_()
    q, r = torch.linalg.qr(flattened.float() if flattened.dtype in (torch.float16, torch.bfloat16)
                           else flattened)
    q *= torch.diag(r, 0).sign()
    if rows < cols:
        q.t_()
    with torch.no_grad():
        target.copy_(q)
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
    if isinstance(tensor, torch.Tensor) and foreign(tensor):
        return torch.nn.init.sparse_(tensor, sparsity, std, generator=generator)
    if _exotic(tensor):
        return _torch_on_scratch(torch.nn.init.sparse_, tensor, sparsity, std, generator=generator)
    if tensor.ndimension() != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    def check():  # torch's first steps: math.ceil(sparsity * rows), then normal_(0, std, generator)
        math.ceil(sparsity * tensor.shape[0])
        check_like_torch(tensor, "normal_", 0, std, generator=generator, recording=True)

    if _replay_or_none(tensor, sparse_, (sparsity, std), {"generator": generator}, check):
        return tensor
    if tensor.is_meta:
        return tensor
    _whole_tensor_only(tensor, "sparse_", RuntimeError)  # (torch's type here)
    rows, cols = tensor.shape
    check()
    num_zeros = math.ceil(sparsity * rows)
    check_writable(tensor)
    if not _is_engine_dtype(tensor.dtype) or not tensor.numel():  # complex: torch's own; empty: it draws
        return torch.nn.init.sparse_(tensor, sparsity, std, generator=generator)  # nothing, nor do we
    spec = Normal(0.0, float(std))
    values_key, mask_key = _subkey(generator, 0x1), _subkey(generator, 0x2)
    # Zero positions: per column, the rows of the num_zeros smallest uniform scores
    # (a uniformly random subset, as torch's randperm per column, without the loop).
    scores = _filled((rows, cols), Uniform(0.0, 1.0), mask_key, torch.empty(0, device=tensor.device))
    zero_rows = scores.argsort(dim=0)[:num_zeros]
    before = _version(tensor)
    engines.fill([engines.Target(tensor, spec, values_key)])
    with torch.no_grad():
        tensor.scatter_(0, zero_rows, 0)
    bump_version_once(tensor, before)
    return tensor


# ------------------------------------------------ private functions third-party code calls
#
# torch.nn.init's private names that libraries reach for through the module
# (timm's ``init._calculate_fan_in_and_fan_out``, ...): same signatures and behaviour.


def _calculate_fan_in_and_fan_out(tensor):
    tensor.dim()  # (torch's first step: a shape, unlike for the public function, is an AttributeError)
    return calculate_fan_in_and_fan_out(tensor)


def _calculate_correct_fan(tensor, mode):
    tensor.dim()
    return calculate_correct_fan(tensor, mode)


def _no_grad_uniform_(tensor, a, b, generator=None):
    return uniform_(tensor, a, b, generator=generator)


def _no_grad_normal_(tensor, mean, std, generator=None):
    return normal_(tensor, mean, std, generator=generator)


def _no_grad_trunc_normal_(tensor, mean, std, a, b, generator=None):
    return trunc_normal_(tensor, mean, std, a, b, generator=generator)


def _no_grad_fill_(tensor, val):
    return _constant_fill(tensor, val)


def _no_grad_zero_(tensor):
    return zeros_(tensor)


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
