"""Record: what a model's own code does to its tensors, kept with the tensors.

A :class:`Recording` is the history of one model: for every storage its code
made or touched, a :class:`StorageRecord` with the op that created it (a
:class:`Node`) and the writes into it, in order (:class:`Event`). Records are
plain data; nothing here computes a value (that is :mod:`.plan` and
:mod:`.execute`).

Records travel with tensors, as torchdistx attaches its op graph to its fake
tensors: every deferred tensor and every module of a model built by
``deferred_init`` carries a :class:`Handle` naming its recording and its
fully-qualified name in the model ``deferred_init`` returned, so any submodule
can be materialized on its own, keyed by the names of the whole model. A
registry maps live meta storages to the recording that holds them, so an alias
(``w.data``, ``w[0]``) finds its history too.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..specs import InitSpec

HANDLE_ATTR = "_fastinit_deferred"

# storage key -> weak reference to the Recording that holds the storage. The
# recording keeps its storages alive, so a live entry's key is never reused.
_REGISTRY: dict[int, weakref.ref] = {}


def _storage_cdata(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


# storage_key(t): identity of ``t``'s storage, stable while the storage lives: its
# StorageImpl's address, ``untyped_storage()._cdata``. torch._C._storage_id returns the
# same without making the Python storage object or entering any TorchFunctionMode
# (a method call inside the recorder's mode costs ~1 us, this ~0.1 us).
storage_key = getattr(torch._C, "_storage_id", None) or _storage_cdata


def storage_key_or_none(t: torch.Tensor) -> int | None:
    """:data:`storage_key`, or None for a tensor with no storage of its own (sparse,
    mkldnn, functorch's vmap/grad wrappers): no record or queue can hold it."""
    try:
        return storage_key(t)
    except (NotImplementedError, RuntimeError):
        return None


def storage_numel(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // t.element_size()


def geometry(t: torch.Tensor) -> tuple:
    """``(size, stride, storage_offset)``: which elements of its storage ``t`` views."""
    return tuple(t.shape), t.stride(), t.storage_offset()  # (stride() is a tuple already)


def covers_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` views every element of its storage exactly once (contiguous,
    or a permutation of dimensions of a contiguous tensor: ``w.t()``). (The size is
    read each time: ``resize_`` and ``out=`` grow meta storages too.)"""
    if t.storage_offset() != 0 or t.numel() * t.element_size() != t.untyped_storage().nbytes():
        return False
    if t.is_contiguous():
        return True
    expect = 1
    for st, sz in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True


def _default_dtype_if_not_float32():
    d = torch.get_default_dtype()
    return None if d is torch.float32 else d


@dataclass(eq=False, slots=True)
class Node:
    """A recorded op that created tensors (a factory, or a pure op of other tensors)."""

    seq: int
    func: Callable
    args: tuple
    kwargs: dict
    # torch's default dtype when it ran, if not float32 (transformers sets it around a
    # constructor): ``torch.arange(6) / 7`` and ``linspace`` replay in it
    default_dtype: torch.dtype | None = field(default_factory=_default_dtype_if_not_float32)

    @property
    def label(self) -> str:
        return getattr(self.func, "__name__", str(self.func))


@dataclass(eq=False, slots=True)
class Event:
    """A recorded write into a storage, through a view of it (``geom``).

    ``kind`` is ``"fill"`` (``spec``: a fusable fill), ``"affine"`` (a scalar
    ``mul_``/``div_``/``add_``/``sub_`` of a floating tensor: ``x * mul + add``,
    which folds into a constant fill's value; replayed as the recorded op), ``"op"``
    (any other op, replayed as recorded: ``func(view, *args[1:], **kwargs)``) or
    ``"side"`` (an op that writes into this tensor among others, wherever it sits in
    its arguments: ``batch_norm``'s running statistics, ``_foreach_mul_``'s list,
    ``out=(values, indices)``, ``embedding``'s ``max_norm``; replayed as recorded with
    leaf ``leaf`` of the flattened ``(args, kwargs)`` as the view, the other
    ``mutated`` leaves as copies, every input as it was at step ``at``).
    ``key`` is set when the fill's key was drawn at call time (``batched()``);
    otherwise materialization keys it by ``(seed, name)``.
    """

    seq: int
    geom: tuple
    kind: str
    whole: bool  # the view covers the whole storage
    overwrites: bool  # the result does not depend on the previous values
    spec: InitSpec | None = None
    mul: float = 1.0
    add: float = 0.0
    func: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    key: int | None = None
    engine: str | None = None  # (batched(): the engine in force at the call)
    leaf: int = -1  # ("side")
    mutated: tuple = ()
    at: int | None = None

    @property
    def reads_at(self) -> int:
        """The step before which this event's inputs are read."""
        return self.seq if self.at is None else self.at

    def describe(self) -> str:
        where = "" if self.whole else "[view]"
        if self.kind == "fill":
            return f"{self.spec!r}{where}"
        if self.kind == "affine":
            return f"affine(*{self.mul:g} +{self.add:g}){where}"
        return f"{self.label}{where}"


class StorageRecord:
    """One storage's history: how it was created (``node``, None if made outside
    the recording) and every write into it, in recorded order."""

    __slots__ = ("sk", "tensor", "node", "out_index", "events", "born", "guessed", "__weakref__")

    def __init__(self, sk: int, tensor: torch.Tensor, node: Node | None, born: int, out_index: int = 0):
        self.sk = sk
        self.tensor = tensor  # the tensor the storage was first seen as (geometry, dtype)
        self.node = node
        self.out_index = out_index  # which of the node's (flattened) outputs it is
        self.events: list[Event] = []
        self.born = born
        # the last step of a guessed init (its module's reset hook, for a tensor added after
        # deferred_init outside blocks, whose own init nothing recorded), or None
        self.guessed: int | None = None


class Recording:
    """The history of one model: its storages' records, and the names that key them.

    ``names[sk]`` is the canonical fully-qualified name of a storage in the root
    model (the first name a parameter or buffer viewing it has), ``by_name``
    maps every name (tied aliases included) to its storage.
    """

    def __init__(self):
        self._seq = itertools.count()
        self.storages: dict[int, StorageRecord] = {}
        self.keep: list[torch.Tensor] = []  # keeps every recorded storage (and its key) alive
        self.names: dict[int, str] = {}
        self.by_name: dict[str, int] = {}
        self.geoms: dict[str, tuple] = {}  # name -> geometry of the tensor so named, in its storage
        self.root: weakref.ref | None = None
        self._self_ref = weakref.ref(self)
        # id(tensor) -> (the tensor, its version counter when a recording session last
        # ended): a write no recording saw (a torch op on the model outside fastinit's
        # blocks) moves the counter; found when the next session starts or when the
        # model is prepared, the tensor is "tainted" for good, and refused
        self.versions: dict[int, tuple] = {}
        self.tainted: dict[int, int] = {}  # id -> version bumps no session saw
        self.excused: set[int] = set()  # ids whose one unseen bump was a parametrization's set_
        # A model deferred on its own and built into another deferred model: (a weak
        # reference to that model's recording, its root's path there)
        self.outer: tuple | None = None

    def next_seq(self) -> int:
        return next(self._seq)

    def record(self, t: torch.Tensor, node: Node | None = None, out_index: int = 0) -> StorageRecord:
        """The record of ``t``'s storage, made (created by output ``out_index`` of
        ``node``) if it is new."""
        sk = storage_key_or_none(t)
        if sk is None:
            raise NotImplementedError(
                "fastinit: a tensor without storage of its own (made inside torch.func's vmap/grad, or sparse) "
                "cannot be recorded while a model is built; build this model eagerly, or compute the tensor "
                "after materialize()")
        r = self.storages.get(sk)
        if r is None:
            r = self.storages[sk] = StorageRecord(sk, t, node, self.next_seq(), out_index)
            self.keep.append(t)
            _REGISTRY[sk] = self._self_ref
        return r

    def add_event(self, t: torch.Tensor, kind: str, *, overwrites: bool, r: StorageRecord | None = None,
                  **kw) -> Event:
        """Record a write into ``t`` (``r``: its storage's record, if known)."""
        touch(self, check=False)  # (its counters moved with this write: noted when the session ends)
        if r is None:
            r = self.storages.get(storage_key(t)) or self.record(t)
        if t.dtype != r.tensor.dtype:
            raise NotImplementedError(
                f"fastinit: {kw.get('label') or kind} writes into a {t.dtype} view of a {r.tensor.dtype} "
                f"tensor of shape {tuple(r.tensor.shape)} (a view that reinterprets its bytes, such as "
                "w.view(torch.int32)), which deferred init cannot replay exactly; make this edit after "
                "materialize(), or, where it is made by code you do not control, build the model eagerly")
        ev = Event(next(self._seq), geometry(t), kind, covers_storage(t), overwrites, **kw)
        r.events.append(ev)
        self.keep.append(t)
        return ev

    def note(self, t: torch.Tensor) -> None:
        """Watch ``t``'s version counter from now on (an inference tensor has none)."""
        if t.is_inference():
            return
        self.versions[id(t)] = (t, t._version)

    def taint_unseen(self) -> None:
        """Before a recording session: every noted tensor written since the last one
        ended was written by ops no recording saw; it stays tainted."""
        while True:  # (no copy of the table: for a big model its allocation wakes the collector)
            found = {}
            try:
                for k, (t, v) in self.versions.items():
                    if t._version != v:
                        found[k] = t._version - v
            except RuntimeError:  # another thread noted a tensor meanwhile: again
                continue
            break
        for k, d in found.items():
            self.tainted[k] = self.tainted.get(k, 0) + d
            t = self.versions[k][0]
            self.versions[k] = (t, t._version)  # (counted once)

    def notes_seen(self) -> None:
        """After a recording session: every noted tensor's counter as it saw them."""
        versions = self.versions
        while True:
            try:
                for k, (t, _) in versions.items():
                    versions[k] = (t, t._version)
            except RuntimeError:  # another thread noted a tensor meanwhile: again
                continue
            return

    def unseen_bumps(self, t: torch.Tensor) -> int:
        """How many times ``t``'s counter moved, since it was noted, by ops no recording
        saw (``t.zero_()``, ``load_state_dict``, a parametrization's ``original.set_(...)``
        on the deferred model, outside fastinit's blocks)."""
        noted = self.versions.get(id(t))
        if noted is None or noted[0] is not t:
            return 0
        return self.tainted.get(id(t), 0) + t._version - noted[1]

    def forget(self, t: torch.Tensor) -> None:
        """``t`` was replaced by its real tensor: no longer watched."""
        self.versions.pop(id(t), None)
        self.tainted.pop(id(t), None)

    def add_value(self, t: torch.Tensor, value: torch.Tensor, label: str) -> Event:
        """``t`` now holds ``value``, computed eagerly (a constructor's data, a draw
        from the code's own generator): an overwrite that replays as ``copy_``."""
        return self.add_event(t, "op", overwrites=True, func=torch.Tensor.copy_, args=(t.detach(), value),
                              label=label)

    # ------------------------------------------------------------ transactions

    def checkpoint(self) -> int:
        """A point to :meth:`rollback` to: everything recorded after it can be undone."""
        return self.next_seq()

    def rollback(self, cp: int) -> None:
        """Forget every storage registered and every event recorded after ``cp``."""
        for sk, r in list(self.storages.items()):
            if r.born > cp:
                del self.storages[sk]
                if _REGISTRY.get(sk) is self._self_ref:
                    del _REGISTRY[sk]
            else:
                if r.events and r.events[-1].seq > cp:
                    r.events = [e for e in r.events if e.seq < cp]
                if r.guessed is not None and r.guessed > cp:
                    r.guessed = None

    def name_of(self, sk: int) -> str | None:
        return self.names.get(sk)

    def named(self, fqn: str) -> tuple[StorageRecord, tuple] | None:
        """``(storage record, geometry)`` of the tensor named ``fqn`` in the model, or None."""
        sk = self.by_name.get(fqn)
        r = self.storages.get(sk) if sk is not None else None
        geom = self.geoms.get(fqn)
        return (r, geom) if r is not None and geom is not None else None


def recorded_or_adopted(t: torch.Tensor) -> tuple[Recording, StorageRecord] | None:
    """The recording holding ``t``'s storage, recording it first if ``t`` is a copy or
    cast of a deferred tensor (see :func:`adopt_derived`)."""
    return recording_of(t) or adopt_derived(t)


def adopt_derived(t: torch.Tensor) -> tuple[Recording, StorageRecord] | None:
    """A deferred tensor that now lives in a storage nothing recorded: a copy of the
    tensor its handle names (``copy.deepcopy(block)``) or a cast of it made after
    recording (``model.half()`` keeps the parameter, with new data). Its storage is
    recorded as made by that copy or cast (``to(dtype, copy=True)`` of the named
    tensor as it is now), so writes into it record after it and it materializes as
    eager code computes it. None for any other tensor."""
    h = tensor_handle(t)
    if h is None and t._base is not None:  # a view of such a tensor (w[0] of a cast parameter)
        found = adopt_derived(t._base)
        return found if found is not None and found[1].sk == storage_key(t) else None
    if h is None or not t.is_meta:
        return None
    named = h.recording.named(h.name)
    return adopt_as(t, h.recording, *named) if named is not None else None


def castable(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a tensor of dtype ``b`` can stand for one of dtype ``a`` cast to it after
    recording: the same dtype (a copy), or both floating or complex (``Module.to(dtype)``
    casts both kinds: a complex buffer cast to bfloat16 keeps its real part, as torch's
    cast does)."""
    return a == b or ((a.is_floating_point or a.is_complex) and (b.is_floating_point or b.is_complex))


def adopt_as(t: torch.Tensor, rec: "Recording", r: "StorageRecord", geom: tuple):
    """Record ``t``'s storage as made by ``to(t.dtype, copy=True)`` of the tensor that
    views ``r`` with ``geom`` (see :func:`adopt_derived`); None if ``t`` is not such
    a copy or floating/complex cast."""
    if recording_of(t) is not None or tuple(t.shape) != geom[0] or not castable(r.tensor.dtype, t.dtype):
        return None
    src = r.tensor.as_strided(*geom).detach()
    node = Node(rec.next_seq(), torch.Tensor.to, (src, t.dtype), {"copy": True})
    return rec, rec.record(t, node)


def recording_of(t: torch.Tensor) -> tuple[Recording, StorageRecord] | None:
    """The recording holding ``t``'s (meta) storage, and the storage's record."""
    try:  # (storage_key_or_none, inlined: this is on every recorded op's path)
        sk = storage_key(t)
    except (NotImplementedError, RuntimeError):  # (no storage: a functorch wrapper, a sparse tensor)
        return None
    ref = _REGISTRY.get(sk)
    if ref is None:
        return None
    rec = ref()
    if rec is None:
        del _REGISTRY[sk]
        return None
    r = rec.storages.get(sk)
    return (rec, r) if r is not None else None


# ------------------------------------------------------------------ handles


class Handle:
    """What a deferred tensor or module knows: its recording and its
    fully-qualified name (``prefix`` for a module) in the model ``deferred_init``
    returned. Shared, never copied: a deep copy of a deferred model keeps the
    same records, so both copies materialize to the same values for a seed."""

    __slots__ = ("recording", "name", "on_tensor")

    def __init__(self, recording: Recording, name: str, on_tensor: bool = False):
        self.recording = recording
        self.name = name
        self.on_tensor = on_tensor  # (a deferred tensor's; else a module's)

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        # Records hold weak references and torch ops: they are not saved. A module's
        # handle is left out (a materialized model saves and loads as it is); a tensor
        # that is still deferred cannot be saved without what initializes it.
        if self.on_tensor:
            raise TypeError(f"fastinit: cannot pickle the deferred tensor {self.name or '(the root)'}: its records "
                            "(what initializes it) cannot be saved; materialize the model, then save it")
        return _no_handle, ()

    def __repr__(self) -> str:
        return f"<fastinit deferred record of {self.name or 'the root'}>"


def _no_handle():
    return None


def _recorded_in(t: torch.Tensor, rec: Recording) -> bool:
    found = recording_of(t)
    return found is not None and found[0] is rec


def named_tensors(module: torch.nn.Module):
    """Every parameter and buffer with its name, tied aliases included."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


# What every nn.Module keeps in its __dict__ (its parameters, buffers, children, hooks):
# the rest are the attributes its code set.
MODULE_KEYS = frozenset(torch.nn.Module().__dict__) - {"training"}


def plain_tensors(mod: torch.nn.Module):
    """``(attribute, tensor)`` of the plain tensors a module keeps as attributes, not as
    parameters or buffers (``self.freqs_cis = precompute_freqs_cis(...)``)."""
    for k, v in mod.__dict__.items():  # (in the order the module set them: names stay the same run to run)
        if type(v) is torch.Tensor and k not in MODULE_KEYS:
            yield k, v


def named_model_tensors(module: torch.nn.Module):
    """Every parameter and buffer with its name (:func:`named_tensors`), then the plain
    tensors its modules keep as attributes, by their path (``layers.0.freqs_cis``)."""
    yield from named_tensors(module)
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for k, t in plain_tensors(mod):
            yield (f"{prefix}.{k}" if prefix else k), t


def attach(root: torch.nn.Module, rec: Recording, mods=None) -> list:
    """Name ``rec``'s storages after ``root``'s parameters and buffers and hang a
    handle on each module and each meta tensor. Returns what :func:`detach_handles`
    needs to undo it. ``mods``: ``root.named_modules(remove_duplicate=False)``, if
    already listed."""
    rec.root = weakref.ref(root)
    added = []
    mods = list(root.named_modules(remove_duplicate=False)) if mods is None else mods
    params, buffers = [], []  # in named_parameters() then named_buffers() order: first names win
    linked: set[int] = set()
    for prefix, mod in mods:
        h = mod.__dict__.get(HANDLE_ATTR)
        if h is None:
            mod.__dict__[HANDLE_ATTR] = Handle(rec, prefix)  # (a plain attribute: no Module.__setattr__)
            added.append(mod)
        elif h.recording is not rec and not h.name and prefix and id(h.recording) not in linked \
                and h.recording.root is not None and h.recording.root() is mod:
            # keyed by its path here (its first one; the latest model it is built into wins)
            h.recording.outer = (weakref.ref(rec), prefix)
            linked.add(id(h.recording))
        for store, out in ((mod._parameters, params), (mod._buffers, buffers)):
            for k, t in store.items():
                if t is not None:
                    out.append((f"{prefix}.{k}" if prefix else k, t))
    # plain tensor attributes this recording made (named after parameters and buffers:
    # a tensor that is both keeps its parameter's name)
    attrs = [(f"{prefix}.{k}" if prefix else k, t) for prefix, mod in mods for k, t in plain_tensors(mod)
             if t.is_meta and _recorded_in(t, rec)]
    in_model = {id(m) for _, m in mods}
    for name, t in itertools.chain(params, buffers, attrs):
        if not t.is_meta:
            continue
        found = recording_of(t)
        if found is not None and found[0] is not rec:
            other, r = found
            other_root = other.root() if other.root is not None else None
            if other_root is not None and id(other_root) in in_model:
                continue  # a block deferred on its own, then built into this model: its recording keeps it
            # A block the constructor dropped after taking its tensors (self.w1 =
            # deferred_init(nn.Linear, 4, 4).weight): this model takes their records over,
            # so they are keyed by their names here, not by the lost block's ("weight").
            other.storages.pop(r.sk, None)
            rec.storages[r.sk] = r
            rec.keep.append(t)
            _REGISTRY[r.sk] = rec._self_ref
            try:
                t.__dict__[HANDLE_ATTR] = Handle(rec, name, on_tensor=True)
            except AttributeError:
                pass
        r = found[1] if found is not None else rec.record(t)  # (rec's, or taken over above)
        rec.names.setdefault(r.sk, name)
        rec.by_name.setdefault(name, r.sk)
        rec.geoms.setdefault(name, geometry(t))
        if not t.is_inference():  # (an inference tensor has no version counter to watch)
            rec.versions[id(t)] = (t, t._version)  # (rec.note(t), inlined: what an unseen write moves)
        if HANDLE_ATTR not in getattr(t, "__dict__", {}):
            try:
                t.__dict__[HANDLE_ATTR] = Handle(rec, name, on_tensor=True)
                added.append(t)
            except AttributeError:  # a tensor type without a __dict__
                pass
    return added


# The recordings each open recording session of this thread has touched, innermost
# last: a session checks a recording for writes no session saw when it first reaches
# it (before writing into it), and notes the counters of those it touched when it
# ends. Recordings it never reaches keep what they had: an unseen write into another
# model stays visible, whatever sessions run meanwhile.
_sessions = threading.local()


def session_started() -> dict:
    touched: dict = {}
    stack = getattr(_sessions, "stack", None)
    if stack is None:
        stack = _sessions.stack = []
    stack.append(touched)
    return touched


def touch(rec: Recording, check: bool = True) -> None:
    """The session running in this thread reaches ``rec`` (``check``: before writing
    into it: writes no session saw are found now)."""
    stack = _sessions.__dict__.get("stack")
    if not stack or id(rec) in stack[-1]:
        return
    if check:
        rec.taint_unseen()
    stack[-1][id(rec)] = rec


def session_ended(touched: dict) -> None:
    stack = getattr(_sessions, "stack", None)
    if stack and stack[-1] is touched:
        stack.pop()
    for rec in touched.values():
        rec.notes_seen()


def _outers(rec: Recording):
    """``(path, recording)`` of each deferred model ``rec``'s model was built into, from
    the nearest out (the recording None where that model is gone: the last item)."""
    seen = set()
    while rec is not None and rec.outer is not None and id(rec) not in seen:
        seen.add(id(rec))
        ref, path = rec.outer
        rec = ref()
        yield path, rec


def outermost(rec: Recording) -> Recording:
    """The outermost deferred model's recording that ``rec``'s model was built into."""
    for _, outer in _outers(rec):
        if outer is not None:
            rec = outer
    return rec


def path_prefix(rec: Recording) -> str:
    """The path of ``rec``'s root in the outermost deferred model it was built into
    ("" if none): a nested block's tensors are keyed by their path there, whichever
    part of that model is materialized."""
    return ".".join(reversed([path for path, _ in _outers(rec)]))


def outermost_root(rec: Recording):
    """The root module of the outermost deferred model ``rec``'s model was built
    into (its own root if none; None if gone)."""
    rec = outermost(rec)
    return rec.root() if rec.root is not None else None


def detach_handles(objs) -> None:
    for o in objs:
        o.__dict__.pop(HANDLE_ATTR, None)


def module_handle(mod: torch.nn.Module) -> Handle | None:
    return mod.__dict__.get(HANDLE_ATTR)


def tensor_handle(t: torch.Tensor) -> Handle | None:
    d = getattr(t, "__dict__", None)
    return d.get(HANDLE_ATTR) if d else None
