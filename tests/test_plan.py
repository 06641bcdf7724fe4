"""The planner on hand-built records: no model, no recorder, no allocation.

A plan says where a storage's value starts (the last whole overwrite wins, what
comes before never runs), which scalar edits fold into its fill, what replays
after it, which name suffix keys it and why it would hold uninitialized memory.
"""

from __future__ import annotations

import torch

from fastinit.deferred.plan import fill_tag, plan_tensor, start_of
from fastinit.deferred.record import Event, Node, StorageRecord
from fastinit.specs import Constant, Normal, Uniform

WHOLE = ((4, 4), (4, 1), 0)
ROW = ((4,), (1,), 4)


def _fill(seq, spec, geom=WHOLE):
    return Event(seq, geom, "fill", geom is WHOLE, True, spec=spec)


def _affine(seq, mul=1.0, add=0.0, geom=WHOLE):
    """``x.mul_(mul)`` (or ``x.add_(add)`` when ``add`` is given), as the recorder logs it."""
    func, arg = (torch.Tensor.add_, add) if add else (torch.Tensor.mul_, mul)
    return Event(seq, geom, "affine", geom is WHOLE, False, mul=mul, add=add, func=func, args=(None, arg),
                 label=func.__name__)


def _op(seq, label="copy_", overwrites=False, geom=WHOLE, args=(), func=torch.Tensor.copy_):
    return Event(seq, geom, "op", geom is WHOLE, overwrites, func=func, args=args, label=label)


def _record(events, node=None, dtype=torch.float32):
    r = StorageRecord(1, torch.empty(4, 4, dtype=dtype, device="meta"), node, 0)
    r.events = list(events)
    return r


def _empty_node():
    return Node(0, torch.empty, ((4, 4),), {})


def test_the_last_whole_overwrite_wins_and_earlier_fills_never_run():
    events = [_fill(1, Uniform(-1, 1)), _fill(2, Normal(0, 0.02)), _fill(3, Constant(0.5), ROW)]
    st = start_of(events, _empty_node(), torch.float32)
    assert st.kind == "fill" and st.index == 1 and st.spec == Normal(0, 0.02)
    assert st.rest == [events[2]]  # the row edit replays after the fused fill
    assert fill_tag(events, st.index) == ""  # the final fill: keyed by the name alone
    # the others by their place counted from it (before: negative), factories apart
    assert fill_tag(events, 0) == "#-1" and fill_tag(events, 2) == "#1" and fill_tag(events, None) == "#create"
    assert fill_tag([events[2]], 0) == "#1"  # (nothing overwrites the whole: counted from before the first)


def test_whole_scalar_edits_fold_into_a_constant_as_eager_code_computes_them():
    events = [_fill(1, Constant(1.0)), _affine(2, add=1 / 256), _affine(3, add=1 / 256), _affine(4, mul=2.0, geom=ROW)]
    eager = torch.ones((), dtype=torch.bfloat16).add_(1 / 256).add_(1 / 256)
    st = start_of(events, None, torch.bfloat16)
    assert st.spec == Constant(eager.item()) == Constant(1.0)  # (1 + 2/256 would be 1.0078125)
    assert st.rest == [events[3]]  # a partial edit replays
    st = start_of([_fill(1, Constant(0.3)), _affine(2, mul=3.0)], None, torch.float32)
    assert st.spec == Constant(torch.full((), 0.3).mul_(3.0).item()) != Constant(0.3 * 3.0)
    st = start_of([_fill(1, Constant(60000.0)), _affine(2, mul=2.0)], None, torch.float16)
    assert st.spec == Constant(float("inf"))  # eager overflows to inf, without an error


def test_scalar_edits_after_a_random_fill_replay_after_it():
    """``k * x`` rounds differently from a draw of the scaled law: nothing folds."""
    events = [_fill(1, Normal(0, 1)), _affine(2, mul=0.5), _affine(3, add=1.0)]
    st = start_of(events, None, torch.float32)
    assert st.spec == Normal(0, 1)
    assert st.rest == events[1:]


def test_a_factory_spec_starts_the_value_when_nothing_overwrites_it():
    ones = Node(0, torch.ones, ((4, 4),), {})
    st = start_of([_affine(1, mul=3.0)], ones, torch.float32)
    assert st.kind == "fill" and st.index is None and st.spec == Constant(3.0)
    ints = Node(0, torch.ones, ((4, 4),), {"dtype": torch.int64})
    assert start_of([], ints, torch.int64).kind == "creation"  # integer values replay exactly


def test_an_overwriting_op_starts_the_value_and_what_follows_replays():
    events = [_fill(1, Normal()), _op(2, overwrites=True), _affine(3, mul=2.0)]
    st = start_of(events, None, torch.float32)
    assert st.kind == "event" and st.index == 1 and st.rest == [events[2]]


def test_real_tensors_start_from_their_memory_in_batched():
    events = [_affine(1, mul=2.0)]
    st = start_of(events, None, torch.float32, existing=True)
    assert st.kind == "existing" and st.rest == events


def test_uninitialized_memory_is_named_with_how_it_was_made():
    r = _record([], node=_empty_node())
    plan = plan_tensor("w", ["w"], r, lambda t: None)
    assert plan.why_uninitialized == "made by empty (uninitialized memory)"
    assert plan.describe() == "uninitialized"
    partly = _record([_fill(1, Constant(1.0), ROW)], node=_empty_node())
    assert plan_tensor("w", ["w"], partly, lambda t: None).why_uninitialized.endswith("only partly written")
    never = _record([])
    assert plan_tensor("b", ["b"], never, lambda t: None).why_uninitialized == "never initialized"


def test_a_value_copied_from_uninitialized_memory_is_uninitialized_too():
    src_t = torch.empty(4, 4, device="meta")
    src = StorageRecord(2, src_t, _empty_node(), 0)
    dst = _record([_op(5, "copy_", overwrites=True, args=(None, src_t))], node=_empty_node())
    find = {id(src_t): src}
    plan = plan_tensor("w", ["w"], dst, lambda t: find.get(id(t)))
    assert plan.why_uninitialized == "computed from uninitialized memory (made by empty (uninitialized memory))"
    src.events = [_fill(1, Normal())]  # once the source is filled before the copy, all is well
    assert plan_tensor("w", ["w"], dst, lambda t: find.get(id(t))).why_uninitialized is None


def test_plan_describes_what_the_tensor_gets():
    r = _record([_fill(1, Normal(0.0, 0.02)), _op(2, "index_fill_", geom=ROW)])
    plan = plan_tensor("emb.weight", ["emb.weight", "head.weight"], r, lambda t: None)
    assert plan.spec == Normal(0, 0.02) and plan.aliases == ["emb.weight", "head.weight"]
    assert plan.describe() == "Normal(mean=0.0, std=0.02); then index_fill_[view]"
