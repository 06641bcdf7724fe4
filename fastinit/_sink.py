"""Where drop-in calls go: filled now, or taken by a recorder.

``deferred_init``/``materialize`` record the calls made on meta tensors, and
``batched()`` queues the calls made inside it; both install a sink here. A sink
has ``fill(tensor, spec, generator) -> bool`` (fusable specs) and
``replay(tensor, fn, args, kwargs) -> bool`` (everything else): ``True`` means it
took the call and nothing is to be done now.

Outside any block, a call on a meta tensor that a deferred model holds is still
recorded, onto that model's recording (as inside ``batched(module=model)``),
instead of doing nothing as torch's calls on meta tensors do.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

current: contextvars.ContextVar = contextvars.ContextVar("fastinit_sink", default=None)

# ``meta_sink(tensor)``: the sink of a meta tensor outside any block (None: none),
# set by the recorder's module when it is imported (so this one imports nothing).
meta_sink = None


dynamo_compiling = getattr(getattr(torch, "compiler", None), "is_dynamo_compiling", lambda: False)


def for_tensor(tensor):
    """The sink a drop-in call on ``tensor`` goes to (None: fill it now). While
    ``torch.compile`` traces the call, none (it cannot trace the context variable, and
    the call is left to torch's own function, which it traces)."""
    if dynamo_compiling():  # (False in 50 ns outside; dynamo reads it as True)
        return None
    sink = current.get()
    if sink is None and tensor.is_meta and meta_sink is not None:
        return meta_sink(tensor)
    return sink


_ALONE = contextlib.nullcontext()


def no_modes():
    """``torch._C.DisableTorchFunction()`` where a torch function mode is active (a
    recorder's, a user's), so that it does not see fastinit's own ops on plain tensors;
    where none is, a shared no-op context, cheaper (this is on every drop-in call's
    path). (A tensor subclass with a ``__torch_function__`` of its own needs
    ``DisableTorchFunction`` whatever the modes.)"""
    return torch._C.DisableTorchFunction() if torch._C._is_torch_function_mode_enabled() else _ALONE


@contextlib.contextmanager
def unseen():
    """Run a block that no sink takes calls from and no torch function mode sees: a
    call fastinit itself makes eagerly while a recorder runs (which would otherwise
    take its calls, and make its allocations meta tensors)."""
    token = current.set(None)
    try:
        with torch._C.DisableTorchFunction():
            yield
    finally:
        current.reset(token)
