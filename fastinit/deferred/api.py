"""deferred_init, materialize, planned: record → plan → execute, as one transaction."""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import itertools
import math
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable

import torch

from torch.nn.modules.lazy import LazyModuleMixin as _LazyModuleMixin

from .. import distributed as dist_mod
from .. import engines
from .._interrupts import interrupts_held
from ..seeding import check_seed, draw_seed
from ..specs import Constant, Uniform
from . import intercept
from .batched import Batch
from .execute import (Evaluator, ReplayError, autocast_device_types, as_module_tensor, progress_printer, swap_in,
                      without_autocast)
from .plan import Plan, fill_tag, plan_tensor, position_independent
from .record import (HANDLE_ATTR, Handle, Recording, adopt_as, attach, castable, covers_storage, detach_handles,
                     geometry, module_handle, named_model_tensors, named_tensors, outermost, outermost_root,
                     path_prefix, plain_tensors, recorded_or_adopted, recording_of, storage_key, storage_numel,
                     tensor_handle)
from .report import MaterializeReport, Planned


# ------------------------------------------------------------------ record


def deferred_init(fn: Callable[..., torch.nn.Module], *args, **kwargs) -> torch.nn.Module:
    """Build ``fn(*args, **kwargs)`` with no memory: every parameter and buffer on
    the meta device, with a record of what initializes each one.

    Example::

        model = fastinit.deferred_init(LlamaForCausalLM, config)   # instant, no memory
        report = fastinit.materialize(model, device="cuda", seed=0)

    Anything the model's own code does to its tensors while it is built
    (constructors, ``reset_parameters``, ``post_init``/``_init_weights``,
    ``apply``) is recorded, on whatever device the code names. Values the code
    reads while it is built (``[x.item() for x in torch.linspace(0, p, n)]``)
    are computed on the CPU when they do not depend on random draws. Do further
    initialization with :func:`fastinit.batched` (``module=model``) or by passing
    ``init_fn`` to :func:`materialize`. Each tensor and module of the result
    carries its record and its fully-qualified name, so any submodule can be
    materialized on its own.
    """
    if isinstance(fn, torch.nn.Module):
        raise TypeError(f"fastinit.deferred_init builds the model itself: pass what builds it and its arguments "
                        f"(deferred_init({type(fn).__name__}, ...)), not a built {type(fn).__name__}")
    on = autocast_device_types()
    if on:
        warnings.warn(
            f"fastinit.deferred_init: torch.autocast is on ({', '.join(on)}): the ops the constructor makes on "
            "tensors are recorded on the meta device, where autocast does not apply, and materialize replays "
            "them without it (in their own dtypes), while eager construction under autocast would run matmuls "
            "and convolutions in the autocast dtype. Build the model outside the autocast region to get what "
            "eager construction outside it gives", stacklevel=2)
    rec = Recording()
    with _gc_paused():
        with intercept.recording(home=rec):
            try:
                module = fn(*args, **kwargs)
            except (RuntimeError, NotImplementedError) as e:
                if "meta" not in str(e) or str(e).startswith("fastinit"):
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
            raise TypeError(f"deferred_init: {getattr(fn, '__name__', fn)!r} returned {type(module).__name__}, "
                            "not an nn.Module")
        mods = list(module.named_modules(remove_duplicate=False))  # one walk for the three passes
        _reject_lazy(module, "fastinit.deferred_init", mods)
        _convert_real_tensors(mods, rec)
        attach(module, rec, mods)
    return module


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while a model is built and recorded: that makes
    thousands of small long-lived objects (modules, tensors, records, events), each
    batch of which would otherwise make the collector walk the young objects again.
    (Re-enabling it makes the next allocation scan them all once. Moving them to the
    oldest generation unscanned, with ``gc.freeze()`` and ``gc.unfreeze()``, would
    save that scan, but it moves every young object of the process, garbage cycles
    included, which then wait for a full collection: a dropped model held by a cycle
    would keep its memory.)"""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _reject_lazy(module: torch.nn.Module, where: str, mods=None) -> None:
    """Lazy modules (``nn.LazyLinear``...) have no shapes until their first forward.
    ``mods``: ``module.named_modules(remove_duplicate=False)``, if already listed."""
    if not any(isinstance(m, _LazyModuleMixin) for m in (module.modules() if mods is None else
                                                          (m for _, m in mods))):
        return  # (one cheap walk: only lazy modules hold uninitialized parameters)
    lazy = [n for n, t in named_tensors(module) if t is not None and torch.nn.parameter.is_lazy(t)]
    if lazy:
        _lazy_error(lazy, where)


def _lazy_error(lazy: list[str], where: str):
    raise ValueError(
            f"{where}: {', '.join(lazy)} belong to lazy modules and have no shape yet; run one "
            "forward pass on a dummy batch first (torch's Lazy* modules infer their shapes from "
            "it), or use the non-lazy modules"
        )


def _convert_real_tensors(mods, rec: Recording) -> None:
    """Small real tensors a constructor made from data (``torch.tensor(...)``) become
    meta tensors whose recorded value is that data. ``mods``: ``(name, module)`` pairs."""
    real = [(prefix, store, name, t) for prefix, mod in mods for store in (mod._parameters, mod._buffers)
            for name, t in store.items() if t is not None and not t.is_meta]
    for prefix, _, name, t in real:  # (all checked before any is replaced)
        if t.layout != torch.strided:
            raise NotImplementedError(
                f"fastinit.deferred_init: {_join(prefix, name)} is a {t.layout} tensor; a deferred model "
                "holds strided tensors only: register it after materialize(), or build this model eagerly")
    if not real:
        return
    done = []
    try:
        for _, store, name, t in real:
            value = t.detach().clone()
            meta = torch.empty_like(t, device="meta")
            if isinstance(t, torch.nn.Parameter):
                meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
            rec.add_value(meta, value, "copy_(data)")
            store[name] = meta
            done.append((store, name, t))
    except BaseException:  # (a real module passed in is left as it was)
        for store, name, t in reversed(done):
            store[name] = t
        raise


def is_deferred(module: torch.nn.Module) -> bool:
    """True when ``module`` holds tensors on the meta device."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


# ------------------------------------------------------------------ transactions


class _Transaction:
    """Everything a materialize (or a plan preview) adds to records, names and
    handles, so that a failure, or a preview, leaves them as they were."""

    def __init__(self):
        self.points: dict[int, tuple[Recording, int]] = {}
        self.names: list[tuple[Recording, str, int]] = []
        self.handles: list = []
        self.batch: Batch | None = None
        self.modules: list = []

    def keep_modules(self, module: torch.nn.Module) -> None:
        """Remember every module under ``module`` as it is (:func:`_save_modules`), for an
        init that may change them (``lin.bias = nn.Parameter(...)``, a parametrization)."""
        self.modules = _save_modules(module.modules())

    def watch(self, rec: Recording) -> None:
        if id(rec) not in self.points:
            self.points[id(rec)] = (rec, rec.checkpoint())

    def name(self, rec: Recording, name: str, sk: int, geom: tuple) -> None:
        if name not in rec.by_name:
            rec.by_name[name] = sk
            rec.geoms[name] = geom
            self.names.append((rec, name, sk))
        if sk not in rec.names:
            rec.names[sk] = name
            self.names.append((rec, None, sk))

    def rollback(self) -> None:
        if self.batch is not None:
            self.batch.restore()
        self.batch = None
        _restore_modules(self.modules)
        self.modules = []
        detach_handles(self.handles)
        for rec, name, sk in reversed(self.names):
            if name is None:
                rec.names.pop(sk, None)
            else:
                rec.by_name.pop(name, None)
                rec.geoms.pop(name, None)
        for rec, cp in self.points.values():
            rec.rollback(cp)


def _save_modules(modules) -> list:
    """What each module is now: its class, its attributes, and the contents of its
    dicts and sets (parameters, buffers, children, hooks), for :func:`_restore_modules`."""
    return [(m, m.__class__, dict(m.__dict__),
             [(v, v.copy()) for v in m.__dict__.values() if type(v) in _CONTAINERS]) for m in modules]


_CONTAINERS = (dict, set, collections.OrderedDict, list)  # (a list: nn.LSTM's _flat_weights)


def _restore_modules(saved: list) -> None:
    """Put modules back as :func:`_save_modules` saw them (the same dict and set objects,
    their contents as they were: other objects, hook handles, may hold them)."""
    for m, cls, attrs, contents in reversed(saved):
        m.__class__ = cls
        m.__dict__.clear()
        m.__dict__.update(attrs)
        for container, was in contents:
            if type(container) is list:
                container[:] = was
            else:
                container.clear()
                container.update(was)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _walk(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every ``(path, submodule)`` of ``module``, a shared module under each of its paths
    (``named_modules(remove_duplicate=False)``): the one walk of the tree that
    ``materialize``'s passes share."""
    return list(module.named_modules(remove_duplicate=False))


def _objects(module: torch.nn.Module, where: str | None = None, walk=None, plain: set | None = None):
    """The meta tensors of ``module``, once per object, with all their names (in
    ``named_parameters`` then ``named_buffers`` order), then the deferred plain
    tensors its modules keep as attributes (``self.freqs_cis = ...``, made while
    ``deferred_init`` recorded; their ids go into ``plain``). With ``where``: lazy
    modules are an error (see :func:`_reject_lazy`). ``walk``: :func:`_walk` of
    ``module``, if made already."""
    objs: dict[int, tuple[torch.Tensor, list[str]]] = {}
    params, buffers, attrs = [], [], []
    for prefix, mod in (walk if walk is not None else _walk(module)):
        for store, out in ((mod._parameters, params), (mod._buffers, buffers)):
            for k, t in store.items():
                if t is not None:
                    out.append((f"{prefix}.{k}" if prefix else k, t))
        for k, t in plain_tensors(mod):
            if t.is_meta and tensor_handle(t) is not None:
                attrs.append((f"{prefix}.{k}" if prefix else k, t))
    lazy = []
    for n, t in itertools.chain(params, buffers):
        if torch.nn.parameter.is_lazy(t):  # (before anything else: lazy tensors raise on use)
            if where is not None:
                lazy.append(n)
        elif t.is_meta:
            objs.setdefault(id(t), (t, []))[1].append(n)
    if lazy:
        _lazy_error(lazy, where)
    params_and_buffers = set(objs)
    for n, t in attrs:  # (a tensor that is also a parameter or buffer keeps that name alone)
        if id(t) not in params_and_buffers:
            objs.setdefault(id(t), (t, []))[1].append(n)
            if plain is not None:
                plain.add(id(t))
    return list(objs.values())


def _fits(t: torch.Tensor, r, geom: tuple) -> bool:
    return tuple(t.shape) == geom[0] and t.dtype == r.tensor.dtype


def _cast_of(t: torch.Tensor, r, geom: tuple) -> bool:
    """Whether meta tensor ``t`` is the recorded tensor cast to another floating dtype
    after ``deferred_init`` (``model.half()``, ``model.to(torch.bfloat16)``: new storages,
    which nothing recorded): it then materializes to the recorded value, cast."""
    return tuple(t.shape) == geom[0] and t.dtype != r.tensor.dtype and t.is_meta and castable(r.tensor.dtype, t.dtype)


def _recorded_dtype(t: torch.Tensor, plan: Plan) -> torch.dtype:
    """The dtype ``t``'s value is computed in: its record's, if ``t`` is a cast of it
    made after recording (its own storage, another dtype); else ``t``'s own."""
    r = plan.record
    if t.dtype != r.tensor.dtype and (dist_mod.is_dtensor(t) or storage_key(t) != r.sk):
        return r.tensor.dtype  # (a DTensor never reinterprets its record's bytes: a cast)
    return t.dtype


def _is_copy(owner: torch.nn.Module, mh: Handle) -> bool:
    """Whether ``owner`` is a deep copy of the module its handle names (``copy.deepcopy``
    shares handles: the copy is not the module found at that name in the recorded model)."""
    root = mh.recording.root() if mh.recording.root is not None else None
    if root is None:
        return False
    try:
        return root.get_submodule(mh.name) is not owner
    except AttributeError:
        return False


def _resolve(module: torch.nn.Module, t: torch.Tensor, name: str):
    """``(recording, storage record, fully-qualified name, geometry)`` of deferred
    tensor ``t`` (named ``name`` in ``module``), or None for a tensor nothing records."""
    h = tensor_handle(t)
    if h is not None and not dist_mod.is_dtensor(t):
        r = h.recording.storages.get(storage_key(t))
        if r is not None:
            return h.recording, r, h.name, geometry(t)
        named = h.recording.named(h.name)
        if named is not None and (_fits(t, *named) or _cast_of(t, *named)):
            # A deep copy (``copy.deepcopy(block)``): a new storage with its original's
            # handle materializes to its original's value, in memory of its own; so
            # does a parameter cast after recording (``model.half()`` keeps the object).
            return h.recording, named[0], h.name, named[1]
    prefix, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        owner = None
    mh = module_handle(owner) if owner is not None else None
    if mh is not None:
        rec = mh.recording
        fqn = _join(mh.name, leaf)
        named = rec.named(fqn)
        if named is not None:
            r, geom = named
            dt = dist_mod.is_dtensor(t)
            if (dt and (_fits(t, r, geom) or _cast_of(t, r, geom))) or storage_key(dist_mod.local_tensor(t)) == r.sk \
                    or (not dt and _is_copy(owner, mh) and _fits(t, r, geom)) \
                    or (not dt and leaf in owner._buffers and _cast_of(t, r, geom)):  # (a buffer cast:
                # model.half() makes new buffer tensors; a new parameter object is a replacement, not a cast)
                if not dt and storage_key(t) == r.sk:
                    geom = geometry(t)  # (its own view of the storage: nn.Parameter(w.t()) put in w's place)
                return rec, r, fqn, geom
    if not dist_mod.is_dtensor(t):
        found = recording_of(t)
        if found is not None:
            rec, r = found
            return rec, r, rec.names.get(r.sk, name), geometry(t)
    return None


_DEFAULT_INIT_NOTE = (
    "{where}: {what} was built on the meta device without fastinit.deferred_init, so the "
    "initialization its constructors did was not recorded; each module's own reset hook "
    "(reset_parameters, or _reset_parameters as in nn.MultiheadAttention) initializes it instead. "
    "Build it with fastinit.deferred_init to keep what its code does, or pass init_fn=... to say "
    "how to initialize it.")


_ADDED_LATER_NOTE = (
    "{where}: {names} {were} made after deferred_init, outside fastinit's blocks, so nothing recorded "
    "what was done to them (peft's get_peft_model zeroes each LoRA B matrix, transformers' "
    "resize_token_embeddings copies the old rows into its new embedding); ")
_ADDED_LATER_FIX = ("make such changes inside `with fastinit.batched(module=model):`, or pass init_fn=... to say "
                    "how to initialize them")
_ADDED_LATER_DEFAULT = "each module's own reset hook initializes them instead: " + _ADDED_LATER_FIX
_ADDED_LATER_GUESSED = ("each module's own reset hook initializes them for now, which materialize (strict) "
                        "refuses unless later code in a block initializes them: " + _ADDED_LATER_FIX)
_ADDED_LATER_REFUSED = ("their modules' own reset hooks may give other values (LoRA B not zero), so nothing was "
                        "done: " + _ADDED_LATER_FIX + ", or strict=False for each module's own reset hook")


def default_init(module: torch.nn.Module, only: set[int] | None = None) -> None:
    """torch's default init of a model built on the meta device: each module's own
    reset hook, children before parents (as their constructors ran), for the
    modules holding tensors in ``only`` (ids; None: every meta tensor)."""
    def ours(t):
        return t is not None and t.is_meta and (only is None or id(t) in only)

    for m in _post_order(module):
        reset = getattr(m, "reset_parameters", None)
        if not callable(reset):
            reset = getattr(m, "_reset_parameters", None)
        if not callable(reset):
            continue
        own = itertools.chain(m._parameters.values(), m._buffers.values())
        # A module with tensors of its own resets them; one without (nn.Transformer,
        # whose _reset_parameters re-initializes its layers) runs its hook after
        # its children's, as its constructor did.
        if any(ours(t) for t in own) or (not m._parameters and not m._buffers and any(
                ours(t) for t in itertools.chain(m.parameters(), m.buffers()))):
            reset()


def _post_order(module: torch.nn.Module, seen=None):
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


def _prepare(module: torch.nn.Module, objs, init_fn, txn: _Transaction, *, where: str, persist: bool,
             warn: int = 0, strict: bool = False):
    """Resolve every meta tensor of ``module`` to its record: tensors nothing
    records are adopted (recorded from their default init, or ``init_fn``), then
    ``init_fn`` is recorded. Returns ``[(tensor, names, recording, record, fqn, geom)]``
    and the home recording. ``strict``: tensors added to a deferred model after
    ``deferred_init``, outside blocks, are an error naming them (without ``init_fn``)."""
    resolved, orphans = [], []
    for t, names in objs:
        res = _resolve(module, t, names[0])
        (resolved if res is not None else orphans).append((t, names, res))
    if where != "fastinit.planned":  # (a preview refuses nothing)
        _refuse_unseen_writes(module, resolved, where)
    mh = module_handle(module)
    home = mh.recording if mh is not None else (resolved[0][2][0] if resolved else None)
    if home is None:
        home = Recording()
        home.root = weakref.ref(module)
    txn.watch(home)
    for _, _, res in resolved:
        txn.watch(res[0])
    prefix = mh.name if mh is not None else ""
    if orphans:
        for t, names, _ in orphans:
            r = home.record(t)
            for n in names:
                txn.name(home, _join(prefix, n), r.sk, geometry(t))
        if persist:
            added = attach_orphans(module, home, prefix, orphans)
            txn.handles.extend(added)
    if init_fn is not None or persist:  # copies and casts get records of their own first: init_fn or a
        for t, _, res in resolved:  # batched() block may write into them through any alias (w.data.mul_(2))
            if res[1].sk != storage_key(t) and not dist_mod.is_dtensor(t):
                adopt_as(t, res[0], res[1], res[3])
    run = init_fn
    added_later = bool(orphans) and (mh is not None or bool(resolved))  # (a deferred_init model's, added after it)
    if run is None and orphans:
        if added_later and (warn or strict):
            added = [n[0] for _, n, _ in orphans]
            names = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
            were = "was" if len(added) == 1 else "were"
            note = _ADDED_LATER_NOTE.format(where=where, names=names, were=were)
            if strict:
                raise RuntimeError(note + _ADDED_LATER_REFUSED)
            note += _ADDED_LATER_GUESSED if persist else _ADDED_LATER_DEFAULT
        else:
            note = _DEFAULT_INIT_NOTE.format(where=where, what=type(module).__name__)
        if warn:  # the stacklevel that names the user's call
            warnings.warn(note, stacklevel=warn + 1)
        only = {id(t) for t, _, _ in orphans}
        run = lambda m: default_init(m, only)  # noqa: E731
    if run is not None:
        # the model's tensors that are real already keep their values; its other writes to
        # real tensors are undone if materialize fails
        with torch._C.DisableTorchFunction():
            kept = frozenset(storage_key(dist_mod.local_tensor(t))
                             for _, t in named_model_tensors(module) if t is not None and not t.is_meta)
        txn.batch = Batch(undo={}, kept=kept)
        txn.keep_modules(module)
        with intercept.recording(home, txn.batch):
            run(module)
        if init_fn is None and added_later:  # (their reset hooks: a guess, which strict materialize refuses
            # unless code in a block overwrites it)
            for t, _, _ in orphans:
                r = home.storages.get(storage_key(t))
                if r is not None and r.events:
                    r.guessed = r.events[-1].seq
        resolved, orphans = _after_init_fn(module, where, resolved, orphans, txn, prefix)
    out = []
    for t, names, res in resolved:
        if res[1].sk != storage_key(t) and not dist_mod.is_dtensor(t):
            found = recording_of(t)  # a copy or cast that init_fn wrote into: its own record now
            if found is not None:
                res = (found[0], found[1], res[2], geometry(t))
        out.append((t, names, *res))
    for t, names, _ in orphans:
        r = home.storages[storage_key(t)]
        out.append((t, names, home, r, _join(prefix, names[0]), geometry(t)))
    return out, home


def _refuse_unseen_writes(module: torch.nn.Module, resolved, where: str) -> None:
    """Tensors written in place after ``deferred_init`` by torch ops that nothing
    recorded (their version counters moved: see ``Recording.unseen_bumps``) are an
    error that names them: fastinit would lose the write. A parametrization without
    ``right_inverse`` registered outside a block sets its original to itself (a
    counter bump, no write): not refused."""
    unseen = []
    for t, names, res in resolved:
        bumps = res[0].unseen_bumps(t)
        if bumps:
            if bumps == 1 and id(t) not in res[0].excused and any(_set_to_itself(module, n) for n in names):
                res[0].forget(t)  # (that set_, and nothing else: excused once)
                res[0].note(t)
                res[0].excused.add(id(t))
            else:
                unseen.append(names[0])
    if unseen:
        raise RuntimeError(
            f"{where}: {', '.join(unseen)} {'was' if len(unseen) == 1 else 'were'} written after deferred_init "
            "by torch ops that nothing recorded (on meta tensors they do nothing: an in-place op, "
            "load_state_dict, a parametrization's right_inverse), so fastinit would lose the write. Build the "
            "model again with fastinit.deferred_init and make such changes inside `with "
            "fastinit.batched(module=model):`, in materialize(model, init_fn=...), or after materialize")


def _set_to_itself(module: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` is the ``original`` of a parametrization list none of whose
    parametrizations has a ``right_inverse`` (torch then runs ``original.set_(original)``)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf != "original":
        return False
    try:
        owner = module.get_submodule(prefix)
    except AttributeError:
        return False
    plist = getattr(getattr(torch.nn.utils, "parametrize", None), "ParametrizationList", None)
    return plist is not None and isinstance(owner, plist) and not any(hasattr(p, "right_inverse") for p in owner)


def _after_init_fn(module: torch.nn.Module, where: str, resolved, orphans, txn: _Transaction, prefix: str):
    """``resolved`` and ``orphans`` as the module holds them after its init ran: a
    tensor it replaced (``lin.weight = nn.Parameter(torch.ones(8, 8))``) is gone, one
    it made (a new buffer, a parametrization's ``original0``) is resolved from what
    recorded it, and named by its path in the whole model (its key, as any tensor's,
    then does not depend on which block is materialized first)."""
    known = {id(t): res for t, _, res in resolved}
    adopted = {id(t) for t, _, _ in orphans}
    resolved, orphans, lost = [], [], []
    for t, names in _objects(module, where):
        if id(t) in known:
            resolved.append((t, names, known[id(t)]))
        elif id(t) in adopted:
            orphans.append((t, names, None))
        else:
            res = _resolve(module, t, names[0])
            if res is None:
                lost.append(names[0])
                continue
            rec, r = res[0], res[1]
            for n in names:
                txn.name(rec, _join(prefix, n), r.sk, geometry(t))
            resolved.append((t, names, (rec, r, _join(prefix, names[0]), res[3])))
    if lost:
        raise RuntimeError(f"{where}: the init made meta tensors that nothing recorded: {', '.join(lost)} "
                           "(make them inside init_fn with torch ops or fastinit calls, or on a real device)")
    return resolved, orphans


def attach_orphans(module, home: Recording, prefix: str, orphans) -> list:
    """Handles on adopted tensors and on the modules that had none."""
    added = []
    for p, mod in module.named_modules(remove_duplicate=False):
        if HANDLE_ATTR not in mod.__dict__:
            object.__setattr__(mod, HANDLE_ATTR, Handle(home, _join(prefix, p)))
            added.append(mod)
    for t, names, _ in orphans:
        home.note(t)  # (a write no recording sees is refused from now on, as on a deferred_init model)
        try:
            t.__dict__[HANDLE_ATTR] = Handle(home, _join(prefix, names[0]), on_tensor=True)
            added.append(t)
        except AttributeError:
            pass
    return added


def adopt(module: torch.nn.Module) -> Recording:
    """The recording ``module``'s meta tensors are recorded into (``batched(module=...)``).
    A model built on the meta device without ``deferred_init`` first gets one,
    holding its default init (each module's reset hook), kept with its tensors."""
    txn = _Transaction()
    try:
        _, home = _prepare(module, _objects(module), None, txn, where="fastinit.batched", persist=True, warn=4)
    except BaseException:
        txn.rollback()
        raise
    if home.root is None:
        home.root = weakref.ref(module)
    return home


# ------------------------------------------------------------------ plan


def _plans(resolved) -> list[tuple[torch.Tensor, list[str], Recording, Plan, tuple]]:
    out = []
    for t, names, rec, r, fqn, geom in resolved:
        out.append((t, names, rec, plan_tensor(fqn, list(names), r, _find), geom))
    return out


def _find(t: torch.Tensor):
    found = recording_of(t)
    return found[1] if found is not None else None


def planned(module: torch.nn.Module) -> dict[str, Planned]:
    """What each meta tensor of ``module`` will get from :func:`materialize`, by name,
    before anything is allocated (nothing is changed, nothing is drawn).

    Example::

        model = fastinit.deferred_init(GPT2LMHeadModel, config)
        fastinit.planned(model)["transformer.h.0.attn.c_proj.weight"].spec
        # Normal(mean=0.0, std=0.0040...)   (0.02 / sqrt(2 * n_layer), n_layer=12)
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fastinit.planned: expected an nn.Module, got {type(module).__name__}")
    txn = _Transaction()
    try:
        resolved, _ = _prepare(module, _objects(module), None, txn, where="fastinit.planned", persist=False)
        out = {}
        for t, names, rec, plan, geom in _plans(resolved):
            # the law of the value: the fill's, unless something but a constant fill of at
            # most a row (an Embedding's padding row) edits it after the fill (fills of
            # parts that cover much of it, an LSTM's gates, fused QKV blocks, change its law)
            lawful = plan.spec is not None and _covers(plan, geom) and _small_constant_parts(plan.replay, geom)
            item = Planned(plan.spec if lawful else None, plan.describe(), plan.why_uninitialized,
                           _puts_nonfinite(plan))
            for n in names:
                out[n] = item
        return out
    finally:
        txn.rollback()


def _puts_nonfinite(plan: Plan) -> bool:
    """Whether a constant fill or a scalar edit of ``plan`` puts NaN or inf in the value."""
    fills = [plan.spec] + [e.spec for e in plan.replay if e.kind == "fill"]
    return any(isinstance(f, Constant) and not math.isfinite(f.value) for f in fills) or any(
        e.kind == "affine" and not (math.isfinite(e.mul) and math.isfinite(e.add)) for e in plan.replay)


def _small_constant_parts(events, geom: tuple) -> bool:
    """Whether ``events`` are finite constant fills of rows that together hold at most
    one row of the tensor (an Embedding's padding row)."""
    size = geom[0]
    row = math.prod(size[1:]) if size else 1
    part = 0
    for e in events:
        if e.kind != "fill" or e.whole or not isinstance(e.spec, Constant) or not math.isfinite(e.spec.value) \
                or tuple(e.geom[0]) != tuple(size[1:]):
            return False
        part += math.prod(e.geom[0])
    return part <= row


def _covers(plan: Plan, geom: tuple) -> bool:
    r = plan.record
    size, stride, off = geom
    n = 1
    for s in size:
        n *= s
    if off != 0 or n != storage_numel(r.tensor):
        return False
    expect = 1  # row-major strides (dims of size 1 may have any stride, as torch says)
    for s, st in zip(reversed(size), reversed(stride)):
        if s != 1 and st != expect:
            return False
        expect *= s
    return True


# ------------------------------------------------------------------ execute


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
        module: a model from :func:`deferred_init` or any of its submodules (its
            tensors are keyed by their names in the whole model, so materializing
            block by block gives the same values as all at once), or any model
            with meta tensors (then every module's reset hook is recorded first,
            with a warning that constructor init was not recorded, unless
            ``init_fn`` is given).
        device: where to allocate (default: CUDA if available, else CPU).
        dtype: cast floating parameters and buffers to this dtype, as ``module.to(dtype)``
            after building would: a module that casts itself its own way (overrides
            ``_apply``, as timm's rotary embeddings, which keep float32 frequencies) is
            materialized as recorded, then cast by its own ``to(dtype)``.
        seed: values are keyed by ``(seed, fully-qualified name)``: the same seed
            gives the same model whatever the init order, the set of other
            parameters, the device count or the sharding. ``None`` draws a seed
            from torch's default generator (once; for a sharded model, on the first
            rank of its device mesh, broadcast to the others).
        strict: raise (before allocating anything) if a tensor was never
            initialized or holds uninitialized memory (``empty``, ``empty_like``,
            ``new_empty``, the legacy ``torch.Tensor(n, m)``, or values computed
            from those), or was added to the model after ``deferred_init``
            outside fastinit's blocks (what its code did to it was not recorded:
            peft's zeroed LoRA B) and nothing in a block initialized it since,
            naming every such tensor. ``strict=False``: those get their modules'
            reset hooks, and the uninitialized ones stay uninitialized.
        progress: show bytes done on stderr (default: on a terminal, for big models).
        init_fn: initialization to record and apply, after what is recorded. Its
            writes into the module's tensors that are already real (loaded from a
            checkpoint, a block materialized before) are dropped: those keep their
            values, as they do under the default init. Its writes into other
            real tensors are applied, and undone if materialize fails (a copy of
            each such tensor is kept meanwhile).

    Returns:
        A :class:`MaterializeReport`: per tensor, what it received.

    A tensor's last whole overwrite wins; earlier ones never run. All fusable
    fills run as one engine batch (one launch per dtype on CUDA, one thread-pool
    pass on CPU); the rest replays in recorded order. Tied parameters stay one
    object, also across the boundary of a submodule. On any failure (an
    uninitialized tensor, out of memory, an op that cannot replay, an interrupt)
    the model, its records included, is exactly as it was. Global random state is
    untouched: with a ``seed``, no generator of any device is read or reset.
    """
    t0 = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "meta":
        raise ValueError("fastinit.materialize: device='meta' is where a deferred model already is; name the "
                         "device to allocate on ('cpu', 'cuda', ...)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
        raise TypeError(f"fastinit.materialize only casts to floating point or complex dtypes (as nn.Module.to), "
                        f"but got dtype={dtype}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fastinit.materialize: expected an nn.Module, got {type(module).__name__}")
    check_seed(seed, "fastinit.materialize")
    walk = _walk(module)
    plain: set[int] = set()  # plain tensor attributes: never cast, nor reported by strict (eager keeps them so)
    objs = _objects(module, "fastinit.materialize", walk, plain)
    if not objs:  # already real (materialized, loaded, built eagerly): touch nothing
        if any(t is not None for _, t in named_tensors(module)):  # (no tensor at all, Dropout: nothing to say)
            warnings.warn("fastinit.materialize: the module has no meta tensors; nothing was done "
                          "(its init, default or init_fn, was not run)", stacklevel=2)
        return MaterializeReport(seed if seed is not None else 0, device, {}, 0, 0, 0, time.perf_counter() - t0, 0)
    if seed is None:  # (sharded: the first rank's draw, on every rank of the meshes)
        seed = dist_mod.agree_on_seed(draw_seed(), (t for t, _ in objs))
    _warn_if_keyed_as_before(module, objs, seed)
    txn = _Transaction()
    try:
        resolved, home = _prepare(module, objs, init_fn, txn, where="fastinit.materialize", persist=False, warn=2,
                                  strict=strict)
        if txn.batch is not None:  # an init ran: it may have added modules (a parametrization's)
            walk = _walk(module)
        root = outermost_root(home)  # (a block built into another deferred model: that model's root)
        if root is not None and root is not module:
            _check_views_across(module, root, resolved)
        plans = _plans(resolved)
        _check(plans, strict, dtype, plain)
        own, uncast, kept = _casting_themselves(walk) if dtype is not None else ((), frozenset(), frozenset())
        with without_autocast():  # (the recorded ops ran without it, on meta tensors)
            new_of, entries, counts = _compute(plans, device, dtype, seed, progress, _key_prefixes(walk, plans),
                                               plain | uncast)
        if txn.batch is not None:
            txn.batch.flush()  # init_fn's writes to real tensors
        targets = [module] if root is None or root is module else [module, root]
        mods = _Modules(targets, walk)

        def after():
            _cast_by_themselves(own, dtype, kept)  # (a failure here undoes the assignment too)
            dist_mod.after_assign(mods, new_of)

        swap_in(mods, new_of, after=after)
        for t, _, rec, _, _ in plans:
            rec.forget(t)  # (replaced: no longer watched)
    except BaseException:
        txn.rollback()
        raise
    fused, replayed, total = counts
    return MaterializeReport(seed, device, entries, fused, replayed, total, time.perf_counter() - t0, len(plans))


def _casting_themselves(walk) -> tuple[list[torch.nn.Module], frozenset[int], frozenset[int]]:
    """``(modules, uncast, kept)``: the outermost modules that cast themselves their own
    way (:func:`_casts_itself`: timm's rotary embeddings keep their frequency buffers in
    float32, ``nn.RNNBase`` re-flattens its weights); the ids of the tensors only they
    hold, which ``materialize(dtype=...)`` makes in their recorded dtype for them to cast
    (:func:`_cast_by_themselves`), as ``model.to(dtype)`` after building would (a tensor
    a module outside them holds too is cast as every other: ``model.to`` casts it for
    that module); and the ids of the tensors under them that are real already, which
    materialize keeps as they are, as everywhere else."""
    tops: list[tuple[str, torch.nn.Module]] = []

    def under_one(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") or not p for p, _ in tops)

    for path, m in walk:  # (named_modules: parents before their children)
        if _casts_itself(type(m)) and not under_one(path):
            tops.append((path, m))
    if not tops:
        return [], frozenset(), frozenset()
    inside = [t for _, m in tops for t in itertools.chain(m.parameters(), m.buffers())]
    outside = {id(t) for path, m in walk if not under_one(path)
               for t in itertools.chain(m._parameters.values(), m._buffers.values()) if t is not None}
    uncast = frozenset(id(t) for t in inside if id(t) not in outside)
    kept = frozenset(id(t) for t in inside if not t.is_meta)
    return [m for _, m in tops], uncast, kept


def _cast_by_themselves(tops, dtype: torch.dtype, kept: frozenset[int]) -> None:
    """Cast each module of ``tops`` with its own ``_apply``, as ``model.to(dtype)`` would:
    every floating tensor it casts (those materialize just made, anything of its own:
    timm's training task casts a scratch tensor to learn the dtype), but not the
    tensors that were real before (``kept``), which materialize leaves as they are. All
    or nothing: if one raises, every module under them gets its attributes,
    parameters, buffers and children back (an ``nn.LSTM`` replaces its list of flat
    weights; a module may keep its dtype in an attribute)."""
    if not tops:
        return
    saved = _save_modules(m for top in tops for m in top.modules())

    def convert(t):
        return t.to(dtype) if t.is_floating_point() and id(t) not in kept else t

    try:
        for m in tops:
            m._apply(convert)
    except BaseException:
        _restore_modules(saved)
        raise


@functools.lru_cache(maxsize=1024)
def _casts_itself(cls: type) -> bool:
    """Whether a class of ``cls``'s MRO below ``nn.Module`` defines ``_apply``, other than
    torch.distributed's own (FSDP2's module class re-registers its shards after a cast,
    which materialize does for the tensors it assigns: not a cast of another kind)."""
    for klass in cls.__mro__:
        if klass is torch.nn.Module:
            return False
        if "_apply" in vars(klass) and not klass.__module__.startswith("torch.distributed."):
            return True
    return False


# Modules built on the meta device without deferred_init that materialize keyed, by
# what their keys depend on: their tensors' names (relative to them), shapes, dtypes
# and the seed. Such a module does not know its name in a model it is part of, so the
# blocks of one model materialized one by one with one seed would all be the same.
_KEYED_PLAIN: dict = {}


def _warn_if_keyed_as_before(module: torch.nn.Module, objs, seed: int) -> None:
    """Warn when ``module`` (built on meta without deferred_init) gets the very values
    another such module got: blocks of one model materialized one by one."""
    if module_handle(module) is not None or any(_resolve(module, t, names[0]) is not None for t, names in objs):
        return  # (recorded: keyed by names in the whole model, as a block wrapped after recording is)
    fingerprint = (seed, tuple(sorted((names[0], tuple(t.shape), t.dtype) for t, names in objs)))
    before = _KEYED_PLAIN.get(fingerprint)
    other = before() if before is not None else None
    if other is not None and other is not module and _siblings(module, other):
        warnings.warn(
            f"fastinit.materialize: this {type(module).__name__} gets the same values as the sibling "
            f"{type(other).__name__} materialized before with seed={seed}: a module built on the meta device "
            "without fastinit.deferred_init keys its tensors by their names in it, not in the model it is "
            "part of, so blocks materialized one by one with one seed come out identical. Materialize the "
            "whole model, build it with fastinit.deferred_init (its blocks know their names), or give each "
            "block its own seed.", stacklevel=3)
    if len(_KEYED_PLAIN) > 4096:
        _KEYED_PLAIN.clear()
    _KEYED_PLAIN[fingerprint] = weakref.ref(module)


def _siblings(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether ``a`` and ``b`` are children of one module (two blocks of one model, not
    two models built alike that a script's globals hold; asked only when their keys
    are the same: a gc walk)."""
    for d in gc.get_referrers(a):
        if isinstance(d, dict) and any(v is b for v in d.values()) and any(
                isinstance(o, dict) and o.get("_modules") is d for o in gc.get_referrers(d)):  # (a module's __dict__)
            return True
    return False


class _Modules:
    """Several module trees seen as one (``modules()`` without repeats); ``walk``: the
    first root's :func:`_walk`, if made already."""

    def __init__(self, roots, walk=None):
        self.roots = roots
        self._all = None
        self._walk = walk

    def modules(self):
        if self._all is None:  # one walk, however many passes use it
            seen, self._all = set(), []
            for i, root in enumerate(self.roots):
                for m in ((m for _, m in self._walk) if i == 0 and self._walk is not None else root.modules()):
                    if id(m) not in seen:
                        seen.add(id(m))
                        self._all.append(m)
        return iter(self._all)


def _check_views_across(module: torch.nn.Module, root: torch.nn.Module, resolved) -> None:
    """A submodule's tensor whose storage another tensor object outside it views
    (``nn.Parameter(other.weight[:4])``) would get memory of its own here, and the two
    would no longer alias (a tied tensor, one object, is assigned in both places):
    an error, before anything is done."""
    inside = {id(t) for t, *_ in resolved}
    names_of: dict[int, dict[int, list[str]]] = {}
    for t, names, rec, r, fqn, _ in resolved:
        if dist_mod.is_dtensor(t) or storage_key(t) != r.sk:
            continue  # (a deep copy or a cast: memory of its own already)
        by_sk = names_of.get(id(rec))
        if by_sk is None:
            by_sk = names_of[id(rec)] = {}
            for n, sk in rec.by_name.items():
                by_sk.setdefault(sk, []).append(n)
        for other in by_sk.get(r.sk, ()):
            prefix, _, leaf = other.rpartition(".")
            try:
                owner = root.get_submodule(prefix) if prefix else root
            except AttributeError:
                continue
            obj = owner._parameters.get(leaf, owner._buffers.get(leaf))
            if obj is not None and id(obj) not in inside and not dist_mod.is_dtensor(obj) \
                    and storage_key(obj) == r.sk:
                raise RuntimeError(
                    f"fastinit.materialize: {fqn} shares its storage with {other}, a tensor outside this "
                    "submodule (a view of one another): materialized apart they would no longer alias, as "
                    "they do when built eagerly. Materialize a module that holds both")


def _guessed(plan) -> bool:
    """Whether the value of ``plan`` starts from a guessed init (see ``StorageRecord.guessed``)
    that nothing overwrote whole after it."""
    g, st = plan.record.guessed, plan.start
    return g is not None and st.index is not None and plan.record.events[st.index].seq <= g


def _check(plans, strict: bool, dtype, plain=frozenset()) -> None:
    if strict:
        bad = [(a, p.why_uninitialized) for t, names, _, p, _ in plans  # (no elements: nothing to initialize)
               if p.why_uninitialized and t.numel() and id(t) not in plain for a in names]

        if bad:
            raise RuntimeError(
                f"fastinit.materialize: {len(bad)} tensor(s) are never initialized: "
                + ", ".join(f"{n} ({why})" for n, why in bad)
                + " (initialize them in the model, pass init_fn=..., or strict=False to leave them "
                "uninitialized)")
        guessed = [a for t, names, _, p, _ in plans if _guessed(p) for a in names]
        if guessed:
            raise RuntimeError(
                f"fastinit.materialize: {', '.join(guessed)} {'was' if len(guessed) == 1 else 'were'} made after "
                "deferred_init, outside fastinit's blocks, and only their modules' reset hooks (run when a block "
                "adopted them) initialize them: what the code that made them did is lost (peft's get_peft_model "
                "zeroes each LoRA B matrix). " + _ADDED_LATER_FIX[0].upper() + _ADDED_LATER_FIX[1:]
                + ", or pass strict=False to keep the reset hooks' values")
    for t, names, _, plan, geom in plans:  # e.g. uniform_ bounds a recorded float16 tensor cannot hold
        if dist_mod.is_dtensor(t):  # (a Partial("sum") DTensor: refused before any allocation)
            dist_mod.check_placements(t, names[0], zero=not plan.replay and type(plan.spec) is Constant
                                      and plan.spec.value == 0 and _covers(plan, geom))
        # (in the dtype the value is built in: eager code builds, then casts, which overflows to inf)
        td = _recorded_dtype(t, plan)
        if plan.spec is not None and td.is_floating_point:
            try:
                plan.spec.check_dtype(td)
            except RuntimeError as e:
                raise RuntimeError(f"fastinit.materialize: {names[0]}: {e}") from None


def _key_prefixes(walk, plans) -> dict[int, str]:
    """``id(recording) -> prefix`` of the names its tensors are keyed by: a block built
    into another deferred model, its path in that model (materialized whole or block by
    block alike); other blocks put together, their path in the module materialized."""
    out = _nested_roots(walk)
    base = dict(out)
    for _, _, rec, _, _ in plans:
        if rec.outer is not None:
            top = base.get(id(outermost(rec)))  # (that model's own path, put together in a container)
            path = path_prefix(rec)
            out[id(rec)] = f"{top}.{path}" if top else path
    return out


def _nested_roots(walk) -> dict[int, str]:
    """Models built by separate ``deferred_init`` calls and put together inside
    ``module`` (``nn.Sequential(*[deferred_init(Block) for _ in range(n)])``):
    ``id(recording) -> path of its root in module``, so their tensors are keyed by
    their names in ``module`` (``0.lin.weight``, ``1.lin.weight``) and the blocks
    differ, as eager blocks do, instead of all being keyed ``lin.weight``. ``walk``:
    :func:`_walk` of ``module`` (a shared module counts at its first path)."""
    out: dict[int, str] = {}
    for path, mod in walk:
        h = module_handle(mod)
        if path and h is not None and h.name == "" and h.recording.root is not None \
                and h.recording.root() is mod:
            out.setdefault(id(h.recording), path)
    return out


def _cast_commutes(plan: Plan, recorded: torch.dtype, target: torch.dtype) -> bool:
    """Whether filling straight into ``target`` gives what eager code gives: build
    in ``recorded``, then cast once. Only from float32 to bfloat16/float16 (the
    engines round the float32 values once; float64 has a stream of its own, a
    bfloat16 build cast up keeps bfloat16's rounding, float16 to bfloat16 rounds
    twice), and not when an edit after the fill reads the values (``div_(norm)``),
    which would then see values rounded twice. Other tensors are computed in the
    recorded dtype, then cast."""
    if recorded == target:
        return True
    if recorded != torch.float32 or target not in (torch.bfloat16, torch.float16):
        return False
    try:  # a value beyond the target's range: eager casts it to inf (a fill of the target raises)
        plan.spec.check_dtype(target)
    except RuntimeError:
        return False
    return all(e.overwrites for e in plan.replay)


def _fill_spec(plan: Plan, recorded: torch.dtype, target: torch.dtype):
    """The spec that fills a ``target`` tensor as building in ``recorded`` then casting
    does: a uniform keeps [a, b) as the recorded dtype holds it, then is rounded once
    (a float32 just below b may round up to b)."""
    spec = plan.spec
    if type(spec) is Uniform and recorded != target:
        spec = spec.for_dtype(recorded)
    return spec


def _compute(plans, device, dtype, seed, progress, prefixes=None, plain=frozenset()):
    """Real values for every plan, in new tensors: ``(new_of, entries, counts)``.
    ``dtype`` casts floating tensors, but not the ``plain`` ones (as ``module.to``)."""
    ev = Evaluator(device, seed, prefixes=prefixes)

    def target_dtype(t):
        return dtype if dtype is not None and t.dtype.is_floating_point and id(t) not in plain else t.dtype

    # Storages several objects view (nn.Parameter(base[:10]), nn.Parameter(base[10:])):
    # one real storage, each object the same view of it as on meta.
    by_storage: dict[int, list[int]] = {}
    for i, (t, _, _, plan, _) in enumerate(plans):
        if not dist_mod.is_dtensor(t):
            by_storage.setdefault((id(plan.record), storage_key(t)), []).append(i)  # (copies: their own)
    shared = {k: ix for k, ix in by_storage.items()
              if len(ix) > 1 and len({plans[i][0].dtype for i in ix}) == 1}
    in_shared = {i for ix in shared.values() for i in ix}

    reals: list[torch.Tensor | None] = [None] * len(plans)
    fused_flags = [False] * len(plans)
    specs: list = [None] * len(plans)  # the fused fills' specs, for the target dtype
    total = 0
    targets = []
    for i, (t, names, rec, plan, geom) in enumerate(plans):
        if i in in_shared:
            continue
        real = dist_mod.allocate_like(t, device, target_dtype(t))
        reals[i] = real
        local = dist_mod.local_tensor(real)
        total += local.numel() * local.element_size()
        rd = _recorded_dtype(t, plan)
        # (a cast after recording, then another dtype here: rounded twice, as eagerly, below)
        if plan.spec is not None and _covers(plan, geom) and _cast_commutes(plan, rd, target_dtype(t)) \
                and (rd == t.dtype or target_dtype(t) == t.dtype):
            fused_flags[i] = True
            specs[i] = _fill_spec(plan, rd, target_dtype(t))
            targets.extend(dist_mod.targets_for(real, t, specs[i], _plan_key(ev, rec, plan)))
    bases = {}
    for k, ix in shared.items():
        t0, _, rec0, plan0, _ = plans[ix[0]]
        base = torch.empty(storage_numel(plan0.record.tensor), dtype=target_dtype(t0), device=device)
        bases[k] = (base, rec0, plan0)
        total += base.numel() * base.element_size()
        for i in ix:
            reals[i] = base.as_strided(*plans[i][4])
    report_bytes = progress_printer(total, progress)
    with torch.no_grad():
        engines.fill(targets, progress=report_bytes)
        for base, rec0, plan0 in bases.values():  # the storage's value, computed whole, cast once
            base.copy_(ev.storage_value(rec0, plan0.record, None))
            report_bytes(base.numel() * base.element_size())
        replayed = 0
        for i, (t, names, rec, plan, geom) in enumerate(plans):
            if i in in_shared:
                replayed += 1
                continue
            real = reals[i]
            if fused_flags[i] and not plan.replay:
                continue
            replayed += 1
            if fused_flags[i] and dist_mod.is_dtensor(real) and plan.record.tensor.dtype in engines.FLOAT_DTYPES \
                    and all(e.kind == "fill" or e.kind == "affine" and position_independent(e) for e in plan.replay):
                offset = len(plan.record.events) - len(plan.replay)
                edits = [(e, _event_key(ev, rec, plan, e, idx) if e.kind == "fill" else 0)
                         for idx, e in enumerate(plan.replay, offset)]
                dist_mod.apply_to_shard(real, edits, plan.record.tensor.dtype)
            else:
                fused = fused_flags[i]
                rd = _recorded_dtype(t, plan)
                via = t.dtype if rd != t.dtype != target_dtype(t) else None
                dist_mod.replay_into(
                    real, lambda full, rec=rec, plan=plan, geom=geom, fused=fused, dt=rd, via=via:
                    ev.plan_value(rec, plan, full, geom, fused, dt, via),
                    specs[i] if fused else None, _plan_key(ev, rec, plan) if fused else 0, name=plan.name)
            if not fused_flags[i]:
                local = dist_mod.local_tensor(real)
                report_bytes(local.numel() * local.element_size())
    new_of, entries = {}, {}
    for i, (t, names, rec, plan, geom) in enumerate(plans):
        new_of[id(t)] = as_module_tensor(t, reals[i], HANDLE_ATTR)
        for a in names:
            entries[a] = plan.describe()
    for ix in shared.values():
        group = [a for i in ix for a in plans[i][1]]
        for a in group:
            entries[a] = f"view of a storage shared with {', '.join(x for x in group if x != a)}: {entries[a]}"
    n_fused = sum(fused_flags)
    return new_of, entries, (n_fused, replayed, total)


def _plan_key(ev: Evaluator, rec: Recording, plan: Plan) -> int:
    st = plan.start
    if st.index is not None and plan.record.events[st.index].key is not None:
        return plan.record.events[st.index].key
    return ev.key(rec, plan.record, plan.tag) if plan.spec.random else 0


def _event_key(ev: Evaluator, rec: Recording, plan: Plan, e, idx: int) -> int:
    if e.key is not None:
        return e.key
    return ev.key(rec, plan.record, fill_tag(plan.record.events, idx)) if e.spec.random else 0


_ = (ReplayError, covers_storage)


# ------------------------------------------------------------------ batched()


@contextlib.contextmanager
def batched(seed: int | None = None, module: torch.nn.Module | None = None):
    """Queue the drop-in calls made inside the block and run them as one fused pass at exit.

    ::

        with fastinit.batched():
            model.apply(init_weights)   # fastinit.normal_/zeros_/... inside

    Values equal those of the same code run without ``batched()`` with the same
    seed state (keys are drawn at call time; plain torch edits of queued tensors,
    such as ``w.data[padding_idx].zero_()``, keep their order after the fused
    fill, and any read of a queued tensor runs the queue first). A tensor's last
    whole fill wins and earlier ones never run. The whole model then costs one
    launch per dtype on GPU and one parallel pass on CPU, where two kinds of call
    run at once instead (queueing them would cost more than they do; nothing
    fuses them on the CPU): a constant fill (``zeros_``, ``ones_``, ``constant_``
    of a number) into memory with nothing queued, a memset; and a random fill of
    a small tensor that draws from torch's default generator itself (see
    ``engines.fill_default``), after what is queued in its memory. A call that
    raises queues nothing; what was queued before it still runs.

    Args:
        seed: with an allocated ``module``, fastinit's fills of its tensors are
            keyed by ``(seed, fully-qualified name)`` exactly as
            ``materialize(seed=...)`` keys them (instead of drawing keys from
            torch's generator), so the same init code gives the same values on
            an allocated model and on a deferred one materialized with that
            seed. ``torch.nn.init``'s own calls and torch's random ops run as
            eagerly, from torch's generator. A deferred ``module``'s fills are
            keyed by the seed ``materialize`` gets (a seed here warns). A seed
            without ``module`` is a ``ValueError`` (nothing to key by).
        module: a model whose tensors the block initializes. If it is deferred
            (meta tensors), the calls are recorded into its records, for
            ``materialize`` to fuse; a model built on the meta device without
            ``deferred_init`` first records its default init (every module's
            reset hook), as ``materialize`` would.
    """
    if seed is not None and module is None:
        raise ValueError("fastinit.batched(seed=...) keys the fills of module=...'s tensors by their names in it: "
                         "without module= there are no names to key by, and the calls would draw from torch's "
                         "generator as if no seed were given. Pass module=model, or torch.manual_seed(...) before "
                         "the block")
    with block(seed, module):
        yield


_script_hook = None
_script_hook_users = 0
_script_hook_lock = threading.Lock()


def _compiled(module) -> bool:
    """A ``torch.compile``d module (without importing torch._dynamo where nothing did)."""
    ef = sys.modules.get("torch._dynamo.eval_frame")
    return ef is not None and isinstance(module, getattr(ef, "OptimizedModule", ()))


def _flush_before_script(module, args):
    """A TorchScript (scripted or traced) module reads its tensors in C++, where no
    torch function mode sees the reads, and a compiled one is traced: what this
    thread's block queued runs first."""
    if isinstance(module, torch.jit.ScriptModule) or _compiled(module):
        batch = intercept.current_batch()
        if batch is not None and batch.pending:
            batch.flush()


@contextlib.contextmanager
def _script_calls_run_the_queue():
    """A global forward pre-hook (:func:`_flush_before_script`) while any block is open."""
    global _script_hook, _script_hook_users
    with _script_hook_lock:
        if _script_hook_users == 0:
            _script_hook = torch.nn.modules.module.register_module_forward_pre_hook(_flush_before_script)
        _script_hook_users += 1
    try:
        yield
    finally:
        with _script_hook_lock:
            _script_hook_users -= 1
            if _script_hook_users == 0:
                _script_hook.remove()
                _script_hook = None


@contextlib.contextmanager
def block(seed: int | None = None, module: torch.nn.Module | None = None, *, atomic: bool = False):
    """:func:`batched`'s block. ``atomic`` (``apply_scheme``): if the block raises,
    nothing it did stays: what it queued is dropped, what it wrote at once
    (structured inits, torch ops, a module's own reset) is put back, and the
    records of a deferred ``module`` are as they were."""
    check_seed(seed, "fastinit.batched")
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"fastinit.batched: module must be an nn.Module, not {type(module).__name__}")
    home = None
    names = None
    if module is not None:
        if any(t.is_meta for _, t in named_tensors(module) if t is not None):
            if seed is not None and not atomic:
                warnings.warn("fastinit.batched: seed= keys the fills of allocated tensors; this model's deferred "
                              "tensors are keyed by the seed materialize() gets, not by this one", stacklevel=5)
            home = adopt(module)
        if seed is not None:
            names = {}
            for name, t in named_model_tensors(module):
                if t is not None and not t.is_meta:
                    names.setdefault(storage_key(t), name)
    outer, undo, kept = intercept.current_batch(), None, frozenset()
    if outer is not None:
        # a block inside another (apply_scheme inside the user's or in init_fn): what the outer
        # one queued runs first, so that this one's writes come after it, and fail with it (and
        # leave alone what materialize keeps)
        outer.flush()
        undo, kept = outer.undo, outer.kept
        if seed is None and module is None:
            seed, names = outer.seed, outer.names  # (a plain block keys fills as the one it runs in)
    txn = None
    if atomic:
        undo = {}  # (its own: an outer block's undo keeps what was there before that block)
        txn = _Transaction()  # (the records a deferred module's calls go into)
        for _, t in named_tensors(module) if module is not None else ():
            found = recorded_or_adopted(t) if t is not None and t.is_meta else None
            if found is not None:
                txn.watch(found[0])
        if home is not None:
            txn.watch(home)
    batch = Batch(seed, names, undo=undo, kept=kept, atomic=atomic)
    try:
        with intercept.recording(home, batch), _script_calls_run_the_queue():
            yield
    except BaseException:
        if not atomic:
            batch.flush()  # (the calls made before the one that raised: as they would have run)
            raise
        batch.pending.clear()
        txn.batch = batch
        txn.rollback()  # (the bytes written at once, and the records)
        raise
    if atomic:
        if outer is not None and outer.undo is not None:
            for k, v in undo.items():
                outer.undo.setdefault(k, v)
        # The fills at exit are the block's last step: no copies of what they overwrite, unless
        # an outer block (materialize's init_fn) must be able to undo them. An interrupt during
        # them lands after them (the scheme whole); an error in them (out of memory) leaves
        # what they reached written.
        batch.undo = outer.undo if outer is not None else None
        with interrupts_held():
            batch.flush()
    else:
        batch.flush()
