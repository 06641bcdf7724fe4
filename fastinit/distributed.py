"""Sharding-invariant fills of DTensors (FSDP2, tensor parallel).

A DTensor's local shard is a box of its global tensor. Under the RNG contract
an element's value depends on ``(key, global flat index)`` only, so each rank
fills exactly its own elements with the values an unsharded fill would give
them: no rank generates the full tensor and no collective runs to fill. (Two
exceptions: a small CPU DTensor filled from torch's default generator is drawn
whole, as the same plain tensor is, see :func:`fill_dtensor_default`; and a
sharded ``materialize(seed=None)`` broadcasts the seed, see :func:`agree_on_seed`.)

The box of a shard coalesces to a :class:`~fastinit.engines.Layout` (rows of
contiguous global indices); Shard(d) on one or two mesh dimensions, Replicate,
and uneven shards all take that form for tensors whose sharded dims are the
first two non-trivial ones (every FSDP2 / Colwise / Rowwise case). Plain
tensors pass through these helpers unchanged.
"""

from __future__ import annotations

import math
import sys

import torch

from . import engines
from .engines import Layout, Target


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing
    torch.distributed where nothing made one yet)."""
    cls = _DTENSOR_CLS
    if cls is None:
        if "torch.distributed.tensor" not in sys.modules or not hasattr(sys.modules["torch.distributed.tensor"], "DTensor"):
            return False
        cls = _load_dtensor_cls()
    return isinstance(t, cls)


_DTENSOR_CLS = None


def _load_dtensor_cls():
    global _DTENSOR_CLS
    from torch.distributed.tensor import DTensor

    _DTENSOR_CLS = DTensor
    return DTensor


def _dt_cls():
    return _DTENSOR_CLS or _load_dtensor_cls()


# Pending reductions that a value held whole by every rank survives exactly: the
# maximum or the minimum of equal values is that value. Their sum is world-size
# times it, and their average (x + ... + x) / n is x rounded, or inf near the
# dtype's largest value.
_PARTIAL_OF_EQUALS = frozenset({"max", "min"})


def check_placements(dt, name: str = "", zero: bool = False) -> None:
    """Refuse a DTensor whose value no rank-local fill can give: a ``Partial``
    placement (``Partial("sum")``, the default, or ``"avg"``), whose value is a
    reduction over ranks of what each holds, except max/min, and except a fill with
    zeros (``zero``: every reduction of zeros is zero)."""
    if zero:
        return
    for p in dt.placements:
        op = getattr(p, "reduce_op", "sum")
        if p.is_partial() and op not in _PARTIAL_OF_EQUALS:
            raise NotImplementedError(
                f"fastinit: {name or 'a DTensor'} has the placement {p}: its value is the {op} over ranks of "
                "what each holds, which a fill of each rank's local tensor does not give (the sum of equal "
                "values is world-size times them). Initialize it as Replicate() or Shard(d), or "
                "redistribute it so, and make it Partial after")


def shard_box(dt) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of DTensor ``dt`` (its callers'
    entry points refuse placements no box gives: :func:`check_placements`)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    return tuple(shape), tuple(offset)


def _keep_box(real, full: torch.Tensor) -> None:
    """DTensor ``real``'s local tensor <- its box of ``full`` (the whole value, made on this rank)."""
    local_shape, offset = shard_box(real)
    box = full[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
    with torch.no_grad():
        local_tensor(real).copy_(box)


def agree_on_seed(seed: int, tensors) -> int:
    """The seed a sharded ``materialize(seed=None)`` uses on every rank: the one drawn
    on the first rank of each mesh the ``tensors``' DTensors live on, broadcast
    along each of its dimensions, so that no rank keys its shards with a seed of its
    own and the gathered tensors are one model's. Only the ranks of those meshes
    take part (they all materialize their shards anyway): not the mesh a mesh was
    sliced from, whose other slices (pipeline stages) may call materialize another
    number of times. Plain tensors only: ``seed`` itself."""
    meshes = []
    for t in tensors:
        if is_dtensor(t) and not any(t.device_mesh is m for m in meshes):
            meshes.append(t.device_mesh)
    if not meshes:
        return seed
    import torch.distributed as dist

    for mesh in meshes:
        kind = mesh.device_type
        dev = torch.device(kind, getattr(torch, kind).current_device()) if kind not in ("cpu", "meta") \
            and hasattr(getattr(torch, kind, None), "current_device") else torch.device("cpu")
        v = torch.tensor([seed], dtype=torch.int64, device=dev)
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            dist.broadcast(v, src=dist.get_global_rank(group, 0), group=group)
        seed = int(v.item())
    return seed


def fill_row(t: torch.Tensor, row: int, value: float) -> None:
    """``t[row].fill_(value)``, also for a DTensor: on the part of that row this rank's
    shard holds (indexing a DTensor would write into a temporary)."""
    if not is_dtensor(t) or t.is_meta:
        t[row].fill_(value)
        return
    check_placements(t, zero=value == 0)
    shape, offset = shard_box(t)
    row = row + t.shape[0] if row < 0 else row
    if offset[0] <= row < offset[0] + shape[0]:
        local_tensor(t)[row - offset[0]].fill_(value)


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
    """A DTensor's local shard (an alias: writes land in the DTensor), or ``t``."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def allocate_like(meta: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized real tensor shaped like ``meta`` (and laid out like it where it
    is dense: channels_last, transposed): for a DTensor, only this rank's shard."""
    if not is_dtensor(meta):
        if meta.is_contiguous():
            return torch.empty(meta.shape, dtype=dtype, device=device)
        return torch.empty_like(meta, dtype=dtype, device=device)  # (strides kept when dense)
    local_shape, _ = shard_box(meta)
    local = torch.empty(local_shape, dtype=dtype, device=device)
    return _dt_cls().from_local(local, meta.device_mesh, meta.placements, run_check=False,
                                shape=meta.shape, stride=meta.stride())


def targets_for(real: torch.Tensor, meta: torch.Tensor, spec, key: int) -> list[Target]:
    """Engine targets that fill ``real`` (a tensor or a DTensor's local shard) with ``spec``."""
    if not is_dtensor(real):
        return [Target(real, spec, key)]
    local_shape, offset = shard_box(real)
    local = local_tensor(real)
    if local.numel() == 0:
        return []
    return [Target(local, spec, key, box_layout(real.shape, offset, local_shape))]


def fill_dtensor(dt, spec, key: int) -> None:
    """Drop-in fills on a DTensor: each rank writes its shard's global values."""
    with torch.no_grad():
        engines.fill(targets_for(dt, dt, spec, key))


def fill_dtensor_default(dt, spec) -> bool:
    """A drop-in fill of a CPU DTensor from torch's default generator, made as the cpu
    engine makes it on the same plain tensor where that takes no key (a small tensor:
    torch's own op, see ``engines.fill_default``): the whole value on this rank, its
    box kept, so the values are those of the unsharded call. False: nothing was done
    (a bigger tensor is keyed: :func:`fill_dtensor`). The caller checked the placements."""
    from .engines.cpu import default_max

    if dt.numel() > default_max(dt.dtype, type(spec)) or not dt.is_contiguous() or not local_tensor(dt).is_cpu:
        return False  # (a view draws keyed, as the same plain view does)
    full = torch.empty(dt.shape, dtype=dt.dtype, device="cpu")
    if not engines.fill_default(full, spec):
        return False
    _keep_box(dt, full)
    return True


def replay_into(real: torch.Tensor, compute, spec=None, key: int = 0, name: str = "") -> None:
    """Run ``compute(full_tensor)`` for a tensor whose value needs replayed ops.

    Plain tensors compute in place. For a DTensor the full (replicated) value is
    built on this rank (filled with ``spec`` first, if given) from the recorded
    ops, which are the non-fusable, usually small tensors (buffers, QR-initialized
    matrices), then this rank keeps its shard. ``name``: the tensor's, for messages.
    """
    if not is_dtensor(real):
        compute(real)
        return
    full = torch.empty(real.shape, dtype=real.dtype, device=local_tensor(real).device)
    if spec is not None:
        engines.fill([Target(full, spec, key)])
    compute(full)
    _keep_box(real, full)


def _row_major_strides(shape) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def view_in_shard(real, geom) -> tuple[torch.Tensor, torch.Tensor]:
    """For a view ``geom = (size, stride, offset)`` of DTensor ``real``'s global
    (row-major) storage: ``(inside, pos)``, per element of the view in view order,
    whether this rank's shard holds it and where in the shard's flat local tensor."""
    local_shape, offset = shard_box(real)
    dev = local_tensor(real).device
    gshape = tuple(real.shape)
    gstrides = _row_major_strides(gshape)
    lstrides = _row_major_strides(local_shape)
    size, stride, off = geom
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
    return inside, pos


def apply_to_shard(real, edits, rec_dtype: torch.dtype) -> None:
    """Apply recorded fills and scalar edits of views (``[(event, key)]``) to this
    rank's shard of DTensor ``real``: each touches only the elements of its view
    that the shard holds, with the values the unsharded replay gives them (a fill's
    values are keyed by the view's flat index, so the view's values are drawn at
    the view's size and the shard keeps its part). Memory: the edited views only."""
    flat = local_tensor(real).view(-1)
    with torch.no_grad():
        for e, key in edits:
            inside, pos = view_in_shard(real, e.geom)
            if not bool(inside.any()):
                continue
            pos = pos[inside]
            if e.kind == "fill":
                buf = torch.empty(e.geom[0], dtype=rec_dtype, device=flat.device)
                engines.fill([Target(buf, e.spec, key)])
                vals = buf.reshape(-1)[inside]
            else:  # the recorded scalar op itself, on the values in the recorded dtype (exact)
                vals = flat[pos].to(rec_dtype)
                e.func(vals, *e.args[1:], **e.kwargs)
            flat[pos] = vals.to(flat.dtype)


def after_assign(modules, new_of: dict) -> None:
    """Let FSDP2 re-register (and re-pad) the sharded parameters we assigned.

    FSDP2 keeps, per module it wraps, a view of each parameter's padded shard;
    after a parameter object is replaced it must be told (``reset_sharded_param``,
    what FSDP2's own ``_apply`` calls after ``to_empty``). Only FSDP parameters
    whose module now holds one of the new tensors are reset. Guarded: on a torch
    whose FSDP2 lacks these internals this does nothing for modules without them.
    """
    new_ids = {id(t) for t in new_of.values()}
    resets = []
    for m in modules.modules():
        if not hasattr(type(m), "_get_fsdp_state"):  # a class attribute of FSDP2's module classes
            continue
        state = m._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for fsdp_param in group.fsdp_params:
                info = getattr(fsdp_param, "_module_info", None)
                current = getattr(info, "module", None)
                current = current._parameters.get(info.param_name) if current is not None else None
                if current is not None and not is_dtensor(current) \
                        and current is not getattr(fsdp_param, "_unsharded_param", None):
                    # (a plain tensor put where FSDP2 keeps its shard; its own unsharded
                    # parameter sits there between forward and backward)
                    where = next((f"{n}.{info.param_name}" if n else info.param_name
                                  for root in modules.roots for n, mod in root.named_modules()
                                  if mod is info.module), info.param_name)
                    raise RuntimeError(
                        f"fastinit.materialize: {where} "
                        "is managed by fully_shard but was replaced by a plain tensor (an init assigning a new "
                        "nn.Parameter): FSDP2 can only take back its own sharded parameter. Initialize it in "
                        "place (torch.nn.init or fastinit calls, copy_) instead of assigning a new one")
                if current is None or id(current) in new_ids:
                    resets.append(fsdp_param)
    with torch.no_grad():  # (all checked first: a refusal resets nothing)
        for fsdp_param in resets:
            fsdp_param.reset_sharded_param()
