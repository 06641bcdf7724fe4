"""Plan: what a tensor's value is, decided from its record alone.

Pure functions of records (no tensor is allocated or computed here), shared by
``materialize``, ``batched()`` and ``planned()``:

* :func:`start_of` — where a storage's value starts: the last overwrite of the
  whole storage wins and everything before it is dead (never runs); a fill (or
  a factory whose value is a spec: ``zeros``, ``randn``...) becomes one fused
  fill (a constant with the whole-tensor scalar edits right after it folded in,
  computed as eager code computes them); what follows replays in recorded order.
* :func:`fill_tag` — which name keys a fill: a storage's final fill is keyed by
  its name alone, the others (partial fills after it; fills read by other tensors
  before being overwritten) by ``name#k``, ``k`` their place counted from the final
  fill, factories by ``name#create``; so the same init code keys a tensor the same
  way whether it was recorded at construction, in ``init_fn`` or in ``batched()``,
  whatever writes came before its final fill (a deferred model's constructor's).
* :func:`uninitialized` — why a value holds uninitialized memory (``empty``,
  ``empty_like``, ``new_empty``, the legacy constructor, and anything computed
  from those), or None.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten

from ..specs import Constant, InitSpec, Normal, Uniform
from .intercept import SHAPE_ONLY, UNINITIALIZED, tensors_in
from .record import Event, Node, StorageRecord, storage_numel


def _whole(e: Event) -> bool:
    return e.whole


@dataclass
class Start:
    """Where a value starts. ``kind``: ``"fill"`` (``spec``, from the event at
    ``index`` or, when ``index`` is None, from the creating factory),
    ``"creation"`` (replay the creating op), ``"event"`` (replay the event at
    ``index``), ``"existing"`` (a real tensor's current memory) or ``"none"``
    (uninitialized memory); ``rest``: the events to replay after it, in order."""

    kind: str
    spec: InitSpec | None = None
    index: int | None = None
    rest: list[Event] = field(default_factory=list)


def creation_spec(node: Node | None) -> InitSpec | None | str:
    """The spec of a floating tensor a factory made, ``"empty"`` for uninitialized
    memory, None when the creating op must be replayed."""
    if node is None or node.func in UNINITIALIZED:
        return "empty"
    if node.func is torch.zeros:
        return Constant(0.0)
    if node.func is torch.ones:
        return Constant(1.0)
    if node.func is torch.full:
        v = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        return Constant(float(v)) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None
    if node.func is torch.rand:
        return Uniform(0.0, 1.0)
    if node.func is torch.randn:
        return Normal(0.0, 1.0)
    return None


def last_overwrite(events: list[Event], whole: Callable[[Event], bool] = _whole) -> int | None:
    for i in range(len(events) - 1, -1, -1):
        if events[i].overwrites and whole(events[i]):
            return i
    return None


def fold(spec: InitSpec, events: list[Event], dtype: torch.dtype, whole: Callable[[Event], bool] = _whole):
    """Fold the leading whole-tensor scalar edits (``mul_``, and ``add_``/``sub_``
    without ``alpha``) of a constant into it; returns ``(spec, the events left)``.

    Exact: the edits run, as recorded, on one element of ``dtype`` (``ones_(w)``
    then ``w.add_(1/256)`` twice in bfloat16 stays 1.0, as in eager code, where
    ``1 + 2/256`` would not), so the fill writes the very value eager code ends
    with. Random fills fold nothing: ``k * x`` rounds differently from a draw of
    the scaled law, so their edits replay after the fill, as in eager code.
    """
    if not isinstance(spec, Constant):
        return spec, events
    i = 0
    value = None
    while i < len(events) and events[i].kind == "affine" and whole(events[i]) and _same_on_every_device(events[i]):
        e = events[i]
        with torch._C.DisableTorchFunction():
            if value is None:
                value = torch.full((), spec.value, dtype=dtype, device="cpu")
            e.func(value, *e.args[1:], **e.kwargs)
        i += 1
    return (spec if value is None else Constant(value.item())), events[i:]


def position_independent(e: Event) -> bool:
    """A scalar edit that rounds each element once, the same wherever the element
    lies: ``mul_``, ``div_``, and ``add_``/``sub_`` without ``alpha`` (torch fuses
    ``x + alpha * other`` in its vectorized loop but not in the loop's tail, so
    there an element's result depends on its position in the tensor)."""
    name = getattr(e.func, "__name__", "")
    return name in ("mul_", "div_") or (name in ("add_", "sub_") and "alpha" not in e.kwargs and len(e.args) == 2)


def _same_on_every_device(e: Event) -> bool:
    """A position-independent edit that CUDA computes as the CPU does (CUDA divides
    by a scalar as a multiplication by its reciprocal): folding it on the CPU gives
    what the target device would."""
    return position_independent(e) and getattr(e.func, "__name__", "") != "div_"


def start_of(events: list[Event], node: Node | None, dtype: torch.dtype, *, existing: bool = False,
             whole: Callable[[Event], bool] = _whole) -> Start:
    """Where a storage of ``dtype`` starts, given its events (see the module docstring).
    ``existing``: the storage is real and holds values already (``batched()``)."""
    floating = dtype.is_floating_point
    w = last_overwrite(events, whole)
    if w is None:
        if existing:
            return Start("existing", rest=list(events))
        cs = creation_spec(node)
        if cs == "empty":
            return Start("none", rest=list(events))
        if cs is not None and floating:
            spec, rest = fold(cs, events, dtype, whole)
            return Start("fill", spec, None, rest)
        return Start("creation", rest=list(events))
    if events[w].kind == "fill" and floating:
        spec, rest = fold(events[w].spec, events[w + 1:], dtype, whole)
        return Start("fill", spec, w, rest)
    return Start("event", index=w, rest=list(events[w + 1:]))


def fill_tag(all_events: list[Event], index: int | None, whole: Callable[[Event], bool] = _whole) -> str:
    """The suffix of the name that keys the fill at ``index`` of a storage's
    events (None: its creating factory): "" for the storage's final fill (its last
    whole overwrite), ``#k`` for the event ``k`` places after it (before it: ``k``
    negative), counted from before the first event where nothing overwrites the
    whole storage. (Counted from the final fill, ``ones_(b); uniform_(b[4:])`` keys
    its partial fill alike on an allocated model, whose events start at the call,
    and on a deferred one, whose constructor wrote into ``b`` first.)"""
    if index is None:
        return "#create"
    last = last_overwrite(all_events, whole)
    if index == last:
        return ""
    return f"#{index - (-1 if last is None else last)}"


def events_before(r: StorageRecord, seq: int | None) -> list[Event]:
    if seq is None:
        return r.events
    return [e for e in r.events if e.seq < seq]


@dataclass
class Plan:
    """One tensor object's plan: its canonical name and every name it has."""

    name: str
    aliases: list[str]
    record: StorageRecord
    start: Start
    tag: str = ""
    key: int = 0
    why_uninitialized: str | None = None

    @property
    def spec(self) -> InitSpec | None:
        return self.start.spec if self.start.kind == "fill" else None

    @property
    def replay(self) -> list[Event]:
        return self.start.rest

    def describe(self) -> str:
        if self.why_uninitialized is not None and self.start.kind != "fill":
            return "uninitialized"
        st = self.start
        if st.kind == "fill" and not st.rest:
            return _spec_repr(st.spec)  # (the common case: one line per spec, made once)
        parts = []
        if st.kind == "fill":
            parts.append(repr(st.spec))
        elif st.kind == "creation":
            parts.append(f"replay {self.record.node.label}")
        elif st.kind == "event":
            parts.append(f"replay {self.record.events[st.index].describe()}")
        parts += [f"then {e.describe()}" for e in st.rest]
        return "; ".join(parts) or "uninitialized"


@functools.lru_cache(maxsize=4096)
def _spec_repr(spec: InitSpec) -> str:
    return repr(spec)


def plan_tensor(name: str, aliases: list[str], r: StorageRecord, find) -> Plan:
    """The plan of the tensor named ``name`` whose storage's record is ``r``."""
    st = start_of(r.events, r.node, r.tensor.dtype)
    tag = fill_tag(r.events, st.index) if st.kind == "fill" else ""
    return Plan(name, aliases, r, st, tag, why_uninitialized=uninitialized(r, None, find, start=st))


_PIECEWISE_LIMIT = 1 << 26  # elements: the coverage mask below stays under 64 MiB


def _overwritten_piecewise(r: StorageRecord, events: list[Event]) -> bool:
    """Whether overwrites of parts of the storage, together, write every element
    before anything reads one they did not write."""
    n = storage_numel(r.tensor)
    if n > _PIECEWISE_LIMIT:
        return False
    written = torch.zeros(n, dtype=torch.bool, device="cpu")
    for e in events:
        view = written.as_strided(*e.geom)
        if e.overwrites:
            view.fill_(True)
        elif not bool(view.all()):
            return False  # reads memory nothing wrote
    return bool(written.all())


def uninitialized(r: StorageRecord, seq: int | None, find, _memo=None, start: Start | None = None) -> str | None:
    """Why storage ``r``'s value just before step ``seq`` (None: at the end) holds
    uninitialized memory, or None. ``find(tensor)`` gives the record of another
    meta tensor's storage (or None); ``start``: ``start_of`` those events, if known."""
    memo = {} if _memo is None else _memo
    events = events_before(r, seq)
    mk = (r.sk, len(events))
    if mk in memo:
        return memo[mk]
    memo[mk] = None  # cycles cannot happen (records only point back in time); be safe
    st = start if start is not None else start_of(events, r.node, r.tensor.dtype)
    why = None
    if st.kind == "none" and events and _overwritten_piecewise(r, events):
        st = Start("pieces", rest=list(events))  # rows one by one, two halves, unbind + normal_
    if st.kind == "none":
        if r.node is None:
            why = "never initialized"
        else:
            why = f"made by {r.node.label} (uninitialized memory)"
        if events:
            why += ", only partly written"
    else:
        reads = []
        if st.kind == "creation" and r.node.func not in SHAPE_ONLY:
            reads.append((r.node.seq, tensors_in(r.node.args, r.node.kwargs)))
        replayed = ([events[st.index]] if st.kind == "event" else []) + st.rest
        for e in replayed:
            if e.kind == "op":
                args = e.args if "out" in e.kwargs else e.args[1:]
                reads.append((e.seq, tensors_in(args, {k: v for k, v in e.kwargs.items() if k != "out"})))
            elif e.kind == "side":  # its inputs: neither what it writes nor its out=
                outs = {id(x) for x in tree_flatten(e.kwargs.get("out"))[0]}
                leaves = tree_flatten((e.args, e.kwargs))[0]
                reads.append((e.reads_at, [x for j, x in enumerate(leaves) if j not in e.mutated
                                           and isinstance(x, torch.Tensor) and id(x) not in outs]))
        for at, tensors in reads:
            for t in tensors:
                if t.is_meta:
                    src = find(t)
                    if src is not None and src is not r:
                        inner = uninitialized(src, at, find, memo)
                        if inner is not None:
                            why = f"computed from uninitialized memory ({inner})"
                            break
            if why is not None:
                break
    memo[mk] = why
    return why
