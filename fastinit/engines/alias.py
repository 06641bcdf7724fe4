"""Aliases through which engines write."""

from __future__ import annotations

import torch


def unversioned(t: torch.Tensor) -> torch.Tensor:
    """An alias of ``t``'s memory with a version counter of its own (an inference
    tensor has none to share): engines write without bumping the counter of what
    they fill; the call that asked bumps it once, as the call made eagerly would."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                               t.stride())
