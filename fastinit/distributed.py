"""Sharding-invariant fills of DTensors (FSDP2, tensor parallel).

A DTensor's local shard is a box of its global tensor. Under the RNG contract
an element's value depends on ``(key, global flat index)`` only, so each rank
fills exactly its own elements with the values an unsharded fill would give
them: no rank allocates or generates the full tensor and no collective runs.

The box of a shard coalesces to a :class:`~fastinit.engines.Layout` (rows of
contiguous global indices); Shard(d) on one or two mesh dimensions, Replicate,
and uneven shards all take that form for tensors whose sharded dims are the
first two non-trivial ones (every FSDP2 / Colwise / Rowwise case). Plain
tensors pass through these helpers unchanged.
"""

from __future__ import annotations

import math

import torch

from . import engines
from .engines import Layout, Target


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements") and hasattr(t, "device_mesh")


def _dt_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_box(dt) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of DTensor ``dt``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    return tuple(shape), tuple(offset)


def box_layout(global_shape, offset, local_shape) -> Layout:
    """The layout of the box ``[offset, offset + local_shape)`` of a contiguous global tensor."""
    gnumel = math.prod(global_shape)
    strides = [1] * len(global_shape)
    for d in range(len(global_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    base = sum(o * s for o, s in zip(offset, strides))
    n = math.prod(local_shape)
    # Coalesce (local size, global stride) pairs from the innermost dim outwards.
    dims: list[list[int]] = []
    for size, stride in zip(reversed(local_shape), reversed(strides)):
        if size == 1:
            continue
        if dims and dims[-1][0] * dims[-1][1] == stride:
            dims[-1][0] *= size  # the inner dim is full: this dim continues its run
        else:
            dims.append([size, stride])
    if not dims:
        return Layout(base, 1, n, n, gnumel)
    if len(dims) == 1:
        size, stride = dims[0]
        if stride == 1:
            return Layout(base, 1, size, size, gnumel)
        return Layout(base, size, 1, stride, gnumel)
    if len(dims) == 2 and dims[0][1] == 1:
        (cols, _), (rows, row_stride) = dims
        return Layout(base, rows, cols, row_stride, gnumel)
    raise NotImplementedError(
        f"fastinit: a shard of shape {tuple(local_shape)} at {tuple(offset)} of a {tuple(global_shape)} "
        "tensor is not a set of equally spaced rows (shard at most two dims)"
    )


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if is_dtensor(t) else t


def allocate_like(meta: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized real tensor shaped like ``meta``: for a DTensor, only this rank's shard."""
    if not is_dtensor(meta):
        return torch.empty(meta.shape, dtype=dtype, device=device)
    local_shape, _ = shard_box(meta)
    local = torch.empty(local_shape, dtype=dtype, device=device)
    return _dt_cls().from_local(local, meta.device_mesh, meta.placements, run_check=False,
                                shape=meta.shape, stride=meta.stride())


def targets_for(real: torch.Tensor, meta: torch.Tensor, spec, key: int) -> list[Target]:
    """Engine targets that fill ``real`` (a tensor or a DTensor's local shard) with ``spec``."""
    if not is_dtensor(real):
        return [Target(real, spec, key)]
    local_shape, offset = shard_box(real)
    local = real._local_tensor
    if local.numel() == 0:
        return []
    return [Target(local, spec, key, box_layout(real.shape, offset, local_shape))]


def fill_dtensor(dt, spec, key: int) -> None:
    """Drop-in fills on a DTensor: each rank writes its shard's global values."""
    with torch.no_grad():
        engines.fill(targets_for(dt, dt, spec, key))


def replay_into(real: torch.Tensor, compute, plan, meta: torch.Tensor) -> None:
    """Run ``compute(full_tensor)`` for a tensor whose value needs replayed ops.

    Plain tensors compute in place. DTensors compute the replayed value with
    DTensor's own ops: the full (replicated) value is built on this rank from the
    recorded ops, which are the non-fusable, usually small tensors (buffers,
    QR-initialized matrices), then this rank keeps its shard.
    """
    if not is_dtensor(real):
        compute(real)
        return
    full = torch.empty(real.shape, dtype=real.dtype, device=real._local_tensor.device)
    if plan.spec is not None:
        engines.fill([Target(full, plan.spec, plan.key)])
    compute(full)
    local_shape, offset = shard_box(real)
    box = full[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
    with torch.no_grad():
        real._local_tensor.copy_(box)


def after_assign(module: torch.nn.Module) -> None:
    """Let FSDP2 re-register (and re-pad) the sharded parameters we assigned."""
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        with torch.no_grad():
            for group in getattr(state, "_fsdp_param_groups", []) or []:
                for fsdp_param in group.fsdp_params:
                    fsdp_param.reset_sharded_param()
