"""The queue of ``batched()`` (:func:`fastinit.deferred.api.batched`): the recorder
on real tensors, with the planner of ``materialize``.

Inside the block, drop-in fills of real tensors are queued, keyed at call time
(so values equal the same calls made one by one); a small CPU tensor's fill that
draws from torch's default generator itself runs at its call instead, after what
is queued in its memory. Plain torch writes into a
tensor with queued work that take only scalars (``w.data.mul_(0.5)``,
``b.data[0] = 1``, ``w.data[pad].zero_()``, a ``fill_`` of a slice) are queued
after it, in order; any other op that touches such a tensor (a read, a copy
from another tensor, a random torch op) first runs everything queued. At the
end (or at such a read) each storage is planned as materialize plans it: its
last overwrite of everything written wins, scalar edits right after a constant
fold into it (computed as eager code computes them), every fill left goes to
the engine in one batch, and the rest replays
in recorded order. So the values always equal the same code run without
``batched()``; only when work runs differs.

On a deferred model (meta tensors) the same calls are recorded into the model's
records instead: ``materialize`` fuses them with everything else.
"""

from __future__ import annotations

import functools
import sys

import torch

from .. import distributed as dist_mod
from .. import engines
from ..engines import Target
from ..engines.alias import unversioned
from ..init import bump_version, bump_version_once, check_writable, stand_in
from ..seeding import draw_key, key_for_name
from ..specs import Constant
from . import intercept
from .plan import fill_tag, start_of
from .record import Event, geometry, storage_key, storage_key_or_none

_RECORDABLE = frozenset({"fill_", "zero_", "mul_", "div_", "add_", "sub_", "clamp_", "clamp_min_",
                         "clamp_max_", "__setitem__"})


def _span(geom) -> tuple[int, int, bool]:
    """``(first, last + 1, dense)`` of the storage elements a view touches;
    ``dense``: it touches every element in between."""
    size, stride, off = geom
    n = 1
    hi = off
    for s, st in zip(size, stride):
        if s == 0:
            return off, off, True
        n *= s
        hi += (s - 1) * abs(st)
    lo = off - sum((s - 1) * abs(st) for s, st in zip(size, stride) if st < 0)
    return lo, hi + 1, n == hi + 1 - lo




@functools.lru_cache(maxsize=None)
def _eager(fn):
    """``fn`` run with torch.compile's frame evaluation off: eagerly, a graph break where
    it is traced (made once torch._dynamo is imported, by whatever compiles)."""
    return torch.compiler.disable(fn)


class _Pending:
    __slots__ = ("alias", "events", "name")

    def __init__(self, alias: torch.Tensor, name: str | None):
        self.alias = alias  # an unversioned alias of the storage (as_strided reaches all of it)
        self.events: list[Event] = []
        self.name = name


class Batch:
    """Work queued on real tensors, per storage. ``names`` (storage key -> name)
    and ``seed`` key fills of those tensors as ``materialize(seed)`` would."""

    def __init__(self, seed: int | None = None, names: dict[int, str] | None = None, undo: dict | None = None,
                 kept: frozenset = frozenset(), atomic: bool = False):
        self.pending: dict[int, _Pending] = {}
        self.seed = seed
        self.names = names or {}
        self._seq = 0
        self._busy = False
        self._version_before = None  # (a fill written at its call: the counter before it)
        # undo (materialize's init_fn, and blocks inside it share it): the bytes of every
        # real storage as they were before a block first wrote into it, so that a
        # failure can put them back; None: not undoable
        self.undo: dict[int, tuple] | None = undo
        # kept (materialize's init, default or init_fn): the storages of the model's tensors
        # that were real before it ran (loaded from a checkpoint, a block materialized
        # earlier): writes into them are dropped, so they keep their values
        self.kept = kept
        # atomic (apply_scheme's block): constants are queued too, so that a failure
        # drops them with the rest instead of copying what they overwrite
        self.atomic = atomic

    def keeps(self, t: torch.Tensor) -> bool:
        """Whether a write into ``t`` is dropped (see ``kept``)."""
        if not self.kept or t.is_meta:
            return False
        with torch._C.DisableTorchFunction():
            return storage_key(dist_mod.local_tensor(t)) in self.kept

    def before_write(self, t: torch.Tensor) -> None:
        """``t``'s memory is about to be written (an undoable block keeps it first)."""
        if self.undo is None or t.is_meta:
            return
        with torch._C.DisableTorchFunction():
            st = dist_mod.local_tensor(t).untyped_storage()  # (a DTensor: its shard's memory)
            if st._cdata not in self.undo:
                self.undo[st._cdata] = (st, st.clone())

    def restore(self) -> None:
        """Put back every storage an undoable block wrote into."""
        if self.undo:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                for st, saved in self.undo.values():
                    st.copy_(saved)
            self.undo.clear()

    def _queue(self, t: torch.Tensor, sk: int | None = None) -> _Pending:
        sk = storage_key(t) if sk is None else sk
        p = self.pending.get(sk)
        if p is None:
            # (an alias with a version counter of its own: each queued write bumped the tensor's
            # counter at its call, as eagerly; running it later bumps nothing more)
            name = self.names.get(sk) if self.seed is not None else None
            p = self.pending[sk] = _Pending(unversioned(t.detach()), name)
        return p

    def _other_dtype(self, t: torch.Tensor, sk: int | None = None) -> bool:
        """Whether ``t`` views queued memory as another dtype (``w.view(torch.int32)``):
        queued events address elements of the first dtype seen, so such a write runs
        now, after the queue."""
        p = self.pending.get(storage_key(t) if sk is None else sk)
        return p is not None and p.alias.dtype != t.dtype

    def _event(self, t: torch.Tensor, kind: str, overwrites: bool, sk: int | None = None, **kw) -> None:
        self._seq += 1
        self._queue(t, sk).events.append(Event(self._seq, geometry(t), kind, False, overwrites, **kw))

    # ------------------------------------------------------------ from the sink and the recorder

    def fill(self, tensor: torch.Tensor, spec, generator) -> bool:
        """Queue a drop-in fill (its key drawn now, as the call one by one would)."""
        if storage_key_or_none(tensor) is None:  # no storage of its own, a torch.func transform's tensor:
            self.flush()  # written now, as one by one, after the queue (it may wrap queued memory)
            return False
        if self.keeps(tensor):
            return True  # (nothing written, no key drawn)
        if tensor.dtype not in engines.FLOAT_DTYPES or dist_mod.is_dtensor(tensor):
            return False
        # what torch checks while writing, now: a failing call queues nothing (fill_ writes
        # into expanded tensors, as zeros_/ones_/constant_ do eagerly)
        check_writable(tensor, overlap=type(spec) is not Constant)
        self._busy = True  # (our own storage lookups are not reads of the memory)
        try:
            sk = storage_key(tensor)
            if self._other_dtype(tensor, sk):
                self.flush()  # a view that reinterprets queued memory: what is queued first, this call now
                return False
            # (an explicit generator keys the fill as the call made eagerly, as materialize keys it)
            named = self.seed is not None and generator is None and sk in self.names
            # the engine in force now, as the call one by one would use (use_engine inside the block),
            # with the error the call one by one would raise now
            engine = engines.engine_for(tensor.device)
            engines.check_engine(engine, tensor)
            direct = not named and spec.random
            if not direct:
                self._event(tensor, "fill", True, sk, spec=spec, key=None if named else 0, engine=engine)
        finally:
            self._busy = False
        if direct:  # a random fill keyed from the generator, or (small CPU tensors) torch's op
            return self._random(tensor, spec, generator, engine, sk)
        bump_version(tensor)  # at the call, as eagerly: backward through old values raises
        return True

    def _random(self, tensor: torch.Tensor, spec, generator, engine: str, sk: int) -> bool:
        """A random fill as the call one by one makes it: torch's op on its default
        generator now, where the engine does that (a small CPU tensor: what is queued in
        its memory runs first), or queued with a key drawn now."""
        if generator is None and engines.fill_default(tensor, spec, before=lambda: self._before_direct(tensor)):
            bump_version_once(tensor, self._version_before)  # (once: torch's uniform_/normal_ made it)
            return True
        self._busy = True
        try:
            # (an empty tensor draws no key: torch's op on it draws nothing from the generator)
            self._event(tensor, "fill", True, sk, spec=spec, key=draw_key(generator) if tensor.numel() else 0,
                        engine=engine)
        finally:
            self._busy = False
        bump_version(tensor)
        return True

    def _before_direct(self, tensor: torch.Tensor) -> None:
        """Before a fill written at its call: what is queued in its memory runs (the
        queued edits' replay may move the version counter), an undoable block keeps the
        bytes, and the counter is read for the call's one bump."""
        self.flush(only=tensor)
        self.before_write(tensor)
        self._version_before = None if tensor.is_inference() else tensor._version

    def on_op(self, func, name, kind, target, args, kwargs):
        """``(handled, result)`` for a torch op while work is queued."""
        if kind == intercept._SEEN_QUERY:
            if name in intercept.RAW_READS and not self._busy and args and isinstance(args[0], torch.Tensor) and not args[0].is_meta \
                    and storage_key_or_none(args[0]) in self.pending:
                self.flush()  # torch.save, bytes(t.untyped_storage()), a data_ptr for C code
            return False, None
        if target is not None and not target.is_meta and storage_key_or_none(target) in self.pending:
            if name in _RECORDABLE and not self._other_dtype(target) and self._record(func, name, target, args, kwargs):
                bump_version(target)
                return True, (None if name == "__setitem__" else target)
            self.flush()
            return False, None
        if kind == intercept._VIEW or (name == "__getitem__" and len(args) > 1 and intercept.basic_index(args[1])):
            return False, None  # a view reads nothing
        self.before_read(intercept.tensors_in(args, kwargs))
        return False, None

    def before_read(self, tensors) -> None:
        """``tensors`` are about to be read: if any views queued memory, the queue runs first."""
        for t in tensors:
            if not t.is_meta and storage_key_or_none(t) in self.pending:
                self.flush()
                return

    def _record(self, func, name, t, args, kwargs) -> bool:
        """Queue a scalar write (validated now, as eager code would fail now)."""
        rest = args[1:]
        if not intercept.only_scalars(rest, kwargs) or kwargs.get("out") is not None:
            return False
        check_writable(t, overlap=name not in ("fill_", "zero_", "__setitem__"))
        if name == "__setitem__":
            idx, value = rest if len(rest) == 2 else (None, None)
            if not (intercept.basic_index(idx) and intercept.is_number(value)):
                return False
            view = t[idx]  # IndexError as eager code raises it
            check_writable(view)  # (what is written: a row of an expanded tensor may be)
            value = intercept.stored_as(value, t.dtype)
            if not view.numel():
                return True
            if t.dtype.is_floating_point:
                self._event(view, "fill", True, spec=Constant(float(value)), key=0)
            else:
                self._event(view, "op", True, func=torch.Tensor.fill_, args=(view, value), label="__setitem__")
            return True
        func(stand_in(t.dtype, "cpu"), *rest, **kwargs)  # values (overflow, casts), with the CPU's errors
        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        func(meta, *rest, **kwargs)  # shapes and types
        if not t.numel():
            return True
        arg0 = rest[0] if rest else kwargs.get("value", kwargs.get("other"))
        alpha = kwargs.get("alpha", rest[1] if len(rest) > 1 else 1)
        constant = intercept.scalar_fill_spec(name, rest, kwargs) \
            if name in ("fill_", "zero_") and t.dtype.is_floating_point else None
        if constant is not None:
            self._event(t, "fill", True, spec=constant, key=0)
        elif name in ("mul_", "div_", "add_", "sub_") and t.dtype.is_floating_point and intercept.is_number(arg0) \
                and not kwargs.get("rounding_mode") and intercept.is_number(alpha):
            k, alpha = float(arg0), float(alpha)
            mul, add = {"mul_": (k, 0.0), "div_": (1.0 / k if k else float("inf"), 0.0),
                        "add_": (1.0, k * alpha), "sub_": (1.0, -k * alpha)}[name]
            self._event(t, "affine", False, mul=mul, add=add, func=func, args=(t, *rest), kwargs=dict(kwargs),
                        label=name)
        else:
            self._event(t, "op", name in intercept.OVERWRITING, func=func, args=(t, *rest), kwargs=dict(kwargs),
                        label=name)
        return True

    # ------------------------------------------------------------ run

    def flush(self, only: torch.Tensor | None = None) -> None:
        """Run everything queued (``only``: what is queued in that tensor's memory):
        the fills that start their storages' values in one engine batch, then every
        other queued write in order."""
        if not self.pending:
            return
        if only is None:
            pending = list(self.pending.values())
            self.pending = {}
        else:
            p = self.pending.pop(storage_key_or_none(only), None)
            if p is None:
                return
            pending = [p]
        if "torch._dynamo" in sys.modules:  # (a read torch.compile traces: the queue runs eagerly, outside
            _eager(Batch._run)(self, pending)  # the graph, its frames not compiled one by one)
            return
        self._run(pending)

    def _run(self, pending: list[_Pending]) -> None:
        for p in pending:
            self.before_write(p.alias)
        fused, later = [], []
        for p in pending:
            if len(p.events) == 1 and p.events[0].kind == "fill" and _span(p.events[0].geom)[2]:
                ev = p.events[0]  # the common case: one fill of a whole tensor, nothing after it
                key = ev.key if ev.key is not None else key_for_name(self.seed, p.name)
                fused.append(Target(p.alias.as_strided(*ev.geom), ev.spec, key, engine=ev.engine))
                continue
            spans = [_span(e.geom) for e in p.events]
            lo = min(s[0] for s in spans)
            hi = max(s[1] for s in spans)
            covering = {id(e) for e, s in zip(p.events, spans) if s[2] and s[0] <= lo and s[1] >= hi}

            def whole(e, covering=covering):
                return id(e) in covering

            st = start_of(p.events, None, p.alias.dtype, existing=True, whole=whole)
            if st.kind == "fill":
                ev = p.events[st.index]
                fused.append(Target(p.alias.as_strided(*ev.geom), st.spec, self._key(p, ev, st.index, whole),
                                    engine=ev.engine))
                later.append((p, st.rest, len(p.events) - len(st.rest), whole))
            else:
                todo = [p.events[st.index], *st.rest] if st.kind == "event" else st.rest
                later.append((p, todo, len(p.events) - len(todo), whole))
        with torch.no_grad():
            engines.fill(fused)
            for p, events, offset, whole in later:
                for idx, e in enumerate(events, offset):
                    view = p.alias.as_strided(*e.geom)
                    if e.kind == "fill":
                        engines.fill([Target(view, e.spec, self._key(p, e, idx, whole), engine=e.engine)])
                    else:
                        e.func(view, *e.args[1:], **e.kwargs)

    def _key(self, p: _Pending, e: Event, idx: int, whole) -> int:
        if e.key is not None:
            return e.key
        return key_for_name(self.seed, p.name + fill_tag(p.events, idx, whole))
