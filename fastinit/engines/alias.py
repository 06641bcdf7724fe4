"""Aliases through which engines write."""

from __future__ import annotations

import torch


def unversioned(t: torch.Tensor) -> torch.Tensor:
    """An alias of ``t``'s memory with a version counter of its own (an inference
    tensor has none to share): engines write without bumping the counter of what
    they fill; the call that asked bumps it once, as the call made eagerly would."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                                t.stride())
    return alias._neg_view() if t.is_neg() else alias  # (a negative view writes its values negated)


def version_setter():
    """``set(tensors, versions)``: torch's private setter of version counters, whichever
    form this torch has (a tuple of tensors in recent torch, one tensor in older
    ones), checked on a scratch tensor; None without it (an alias stands in then)."""
    f = getattr(getattr(torch._C, "_autograd", None), "_unsafe_set_version_counter", None)
    if f is None:
        return None
    probe = torch.empty(0)
    for form in (lambda ts, vs: f(ts, vs), lambda ts, vs: [f(t, v) for t, v in zip(ts, vs)]):
        try:
            form((probe,), (3,))
        except (TypeError, RuntimeError):
            continue
        if probe._version == 3:
            return form
    return None


_set_version = version_setter()


def quiet(t: torch.Tensor, held: list) -> torch.Tensor:
    """``t``, to be written by a torch op without its version counter moving for good:
    ``t`` itself, its counter noted in ``held`` for :func:`restore_versions` (one call
    for a whole batch, cheaper than an alias per tensor), or :func:`unversioned` where
    the counter cannot be set back (an inference tensor has none; an older torch)."""
    if _set_version is None or t.is_inference():
        return unversioned(t)
    held.append((t, t._version))
    return t


def restore_versions(held: list) -> None:
    """Put back the version counters :func:`quiet` noted (in a ``finally``: also after
    a failed op, whose tensor may have been written in part). Views of one tensor
    share its counter: set back last noted first, so the first noting wins."""
    if held:
        held.reverse()
        _set_version(tuple(t for t, _ in held), tuple(v for _, v in held))
