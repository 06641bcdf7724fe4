"""Everyday model-code patterns under deferred_init / materialize / batched(),
each compared with the same code run eagerly (exact where eager is deterministic).

A wrong value without an error is the worst outcome here: each test is a pattern
real code uses (torchdistx's block-by-block materialization, HF's padding rows,
LSTM forget-gate slices, Swin's relative-position index, FSDP's param_init_fn).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import pickle
import re
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import fastinit
from fastinit import Rule, Scheme, apply_scheme, engines
from fastinit.specs import Normal

transformers = pytest.importorskip("transformers")


def _state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------ submodules


class _Sym(nn.Module):
    """A parametrization without ``right_inverse``: registering it sets the original to itself."""

    def forward(self, w):
        return w.triu() + w.triu(1).t()


class _Block(nn.Module):
    """A torchdistx-style block whose constructor initializes one layer itself."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        nn.init.zeros_(self.lin.weight)
        self.lin2 = nn.Linear(16, 16)
        self.register_buffer("scale", torch.full((16,), 0.5))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = _Block()
        self.b2 = _Block()
        self.head = nn.Linear(16, 4)


def test_materializing_a_block_uses_what_its_constructor_recorded():
    m = fastinit.deferred_init(_Net)
    fastinit.materialize(m.b1, seed=0)
    assert (m.b1.lin.weight == 0).all()  # not kaiming: the constructor's zeros_
    assert torch.equal(m.b1.scale, torch.full((16,), 0.5))
    assert m.b2.lin.weight.is_meta and m.head.weight.is_meta  # the rest stays deferred
    fastinit.materialize(m, seed=0)
    whole = fastinit.deferred_init(_Net)
    fastinit.materialize(whole, seed=0)
    _assert_same(m, whole)  # block by block == all at once, bit for bit


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=500, max_position_embeddings=64)
    return transformers.BertModel, cfg


def test_one_hf_bert_layer_materialized_alone_gets_the_models_init():
    cls, cfg = _bert()
    m = fastinit.deferred_init(cls, cfg)
    fastinit.materialize(m.encoder.layer[0], seed=3)
    q = m.encoder.layer[0].attention.self.query
    # transformers' _init_weights: N(0, initializer_range=0.02), zero bias (4096 draws:
    # the std's sampling error is ~1%)
    assert abs(q.weight.std().item() - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert (q.bias == 0).all()
    ln = m.encoder.layer[0].output.LayerNorm
    assert (ln.weight == 1).all() and (ln.bias == 0).all()
    assert m.encoder.layer[1].attention.self.query.weight.is_meta


def test_llama_layers_one_by_one_then_the_rest_equal_the_whole_model():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   tie_word_embeddings=True)
    m = fastinit.deferred_init(transformers.LlamaForCausalLM, cfg)
    for layer in m.model.layers:
        fastinit.materialize(layer, seed=1)  # input_layernorm included (no "never initialized")
        assert not layer.input_layernorm.weight.is_meta
    fastinit.materialize(m, seed=1)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied across the boundary: one object
    whole = fastinit.deferred_init(transformers.LlamaForCausalLM, cfg)
    fastinit.materialize(whole, seed=1)
    _assert_same(m, whole)


# ------------------------------------------------------------------ batched() edits


def _edits(use_batched: bool):
    torch.manual_seed(0)
    w, b = torch.empty(64, 64), torch.empty(64)
    emb = nn.Embedding(20, 8, padding_idx=3)
    lstm_bias = torch.empty(4 * 16)
    c = torch.empty(8, 8)
    idx = torch.empty(10)

    def body():
        fastinit.normal_(w, 0, 0.2)
        w.data.mul_(0.5)
        fastinit.zeros_(b)
        b.data[0] = 1
        fastinit.normal_(emb.weight)
        emb.weight.data[emb.padding_idx].zero_()  # transformers' _init_weights
        fastinit.zeros_(lstm_bias)
        lstm_bias.data[16:32].fill_(1.0)  # forget gate
        fastinit.uniform_(c, -1, 1)
        c[2:4] = 0.25
        c.data.add_(1.0)
        fastinit.kaiming_uniform_(idx.view(2, 5))
        idx.copy_(torch.arange(10.0))

    if use_batched:
        with fastinit.batched():
            body()
    else:
        body()
    return w, b, emb.weight.detach(), lstm_bias, c, idx


def test_batched_keeps_every_plain_torch_edit_made_inside_it():
    eager = _edits(False)
    fused = _edits(True)
    for e, f in zip(eager, fused):
        assert torch.equal(e, f)
    w, b, emb, lstm_bias, c, idx = fused
    assert 0.09 < w.std().item() < 0.11  # the mul_ was not lost
    assert b[0] == 1 and (b[1:] == 0).all()
    assert (emb[3] == 0).all() and (emb[4] != 0).all()
    assert lstm_bias.sum() == 16 and (lstm_bias[16:32] == 1).all()
    assert torch.equal(idx, torch.arange(10.0))


def test_batched_raises_what_eager_code_raises_and_keeps_what_ran_before():
    h = torch.zeros(4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="overflow"):
        fastinit.constant_(h, 70000.0)
    with pytest.raises(RuntimeError, match="overflow"):
        with fastinit.batched():
            fastinit.constant_(h, 70000.0)
    assert (h == 0).all()
    a, b = torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="from=2 > to=1"):
        with fastinit.batched():
            fastinit.ones_(a)
            fastinit.uniform_(b, 2.0, 1.0)
    assert (a == 1).all()  # as one by one: the call before the failing one ran


@pytest.mark.parametrize("edit", [
    lambda w: w.normal_(0.0, 0.02), lambda w: w.uniform_(-1.0, 1.0), lambda w: w.fill_(2.0), lambda w: w.zero_(),
], ids=["normal_", "uniform_", "fill_", "zero_"])
def test_scalar_fills_in_constructors_raise_and_record_as_eager_code(edit):
    """``param.normal_()`` outside no_grad is autograd's leaf error eagerly: the same
    under deferred_init; under no_grad, or through ``.data``, the recorded fill wins."""

    def build(grad: bool):
        m = nn.Linear(8, 8)
        with torch.set_grad_enabled(grad):
            edit(m.weight if grad else m.weight.data)
            edit(m.bias)
        return m

    with pytest.raises(RuntimeError, match="leaf Variable that requires grad") as eager:
        build(True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad") as deferred:
        fastinit.deferred_init(build, True)
    assert type(eager.value) is type(deferred.value)
    m = fastinit.deferred_init(build, False)
    fastinit.materialize(m, seed=0)
    torch.manual_seed(0)
    ref = build(False)
    law = torch.empty(100_000)
    edit(law)  # (fixed seed below: the law's std, for the random edits)
    for name in ("weight", "bias"):
        got, want = getattr(m, name).detach(), getattr(ref, name).detach()
        if want.unique().numel() == 1:  # a constant: exact
            assert torch.equal(got, want), name
        else:  # a random fill: the edit's law (seed 0 fixed: no flake), not the default init's
            assert got.unique().numel() == got.numel(), name
            assert 0.5 * law.std() < got.std() < 1.5 * law.std(), name


_SCALAR_EDITS = {  # a fill, then whole-tensor scalar edits (each one rounds in the dtype)
    "ones_then_add_bf16": (torch.bfloat16, lambda w: (fastinit.ones_(w), w.add_(1 / 256), w.add_(1 / 256))),
    "constant_then_mul_f16": (torch.float16, lambda w: (fastinit.constant_(w, 0.1), w.mul_(3))),
    "constant_then_mul_f32": (torch.float32, lambda w: (fastinit.constant_(w, 0.3), w.mul_(3))),
    "constant_overflows_f16": (torch.float16, lambda w: (fastinit.constant_(w, 60000.0), w.mul_(2))),
    "uniform_then_mul": (torch.float32, lambda w: (fastinit.uniform_(w, -1, 1), w.mul_(0.1))),
    "normal_then_mul_add_bf16": (torch.bfloat16, lambda w: (fastinit.normal_(w), w.mul_(0.02).add_(1.0))),
    "trunc_normal_then_div": (torch.float32, lambda w: (fastinit.trunc_normal_(w), w.div_(3))),
    "kaiming_then_mul_f16": (torch.float16, lambda w: (fastinit.kaiming_uniform_(w, a=5 ** 0.5), w.mul_(1 / 3))),
}


@pytest.mark.parametrize("case", sorted(_SCALAR_EDITS))
def test_scalar_edits_after_a_fill_give_the_eager_values_bit_for_bit(case):
    """No edit is folded into a random fill (``k * x`` rounds otherwise than a draw of
    the scaled law), and a constant's edits are computed in its dtype, as eager code
    does: batched() equals the same calls unbatched, deferred_init equals eager torch."""
    dtype, body = _SCALAR_EDITS[case]
    outs = []
    for batched in (False, True):
        torch.manual_seed(0)
        w = torch.zeros(16, 16, dtype=dtype)
        with torch.no_grad():
            if batched:
                with fastinit.batched():
                    body(w)
            else:
                body(w)
        outs.append(w)
    assert torch.equal(outs[0], outs[1])
    if case.startswith(("ones", "constant")):  # deterministic: deferred == eager torch, exactly

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.empty(16, 16, dtype=dtype))
                with torch.no_grad():
                    body(self.w)

        m = fastinit.deferred_init(M)
        fastinit.materialize(m, seed=0)
        assert torch.equal(m.w.detach(), outs[0]), (m.w.flatten()[0].item(), outs[0].flatten()[0].item())


def test_a_deep_copy_inside_batched_sees_the_queued_fills():
    """Saving the initial weights (``copy.deepcopy(model.state_dict())``) inside the block."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with fastinit.batched():
        fastinit.normal_(model[0].weight, std=0.02)
        fastinit.zeros_(model[0].bias)
        fastinit.constant_(model[1].running_var, 2.0)
        saved = copy.deepcopy(model.state_dict())
        twin = copy.deepcopy(model)
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), k
    _assert_same(twin, model)


class _Moco(nn.Module):
    """A key encoder deep-copied from the query encoder in the constructor (MoCo, BYOL, EMA)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.q.register_buffer("center", torch.rand(4))
        self.k = copy.deepcopy(self.q)


def test_a_module_deep_copied_in_a_constructor_materializes_as_its_source():
    m = fastinit.deferred_init(_Moco)
    fastinit.materialize(m, seed=0)  # strict: every buffer of the copy is initialized
    _assert_same(m.q, m.k)
    eager = _Moco()
    assert torch.equal(m.k[1].running_var, eager.k[1].running_var)  # ones, as eagerly


def test_python_types_as_dtypes_and_setitem_overflow_in_constructors():
    """``dtype=bool`` (GPT-Neo's causal mask) and ``w[:] = 1e6`` in float16 (inf, as eagerly)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(4, 4, dtype=bool).tril())
            self.register_buffer("f", torch.full((3,), 2, dtype=float))
            self.register_buffer("i", torch.arange(3, dtype=int))
            self.h = nn.Parameter(torch.empty(3, dtype=torch.float16))
            with torch.no_grad():
                self.h[:] = 1e6

    m = fastinit.deferred_init(M)
    fastinit.materialize(m, seed=0)
    _assert_same(m, M())


@pytest.mark.parametrize("edit", [lambda w: w.clamp_(), lambda w: w.div_(2, rounding_mode="bad"),
                                  lambda w: w.__setitem__(0, "x")], ids=["clamp_", "div_", "setitem"])
def test_scalar_edits_raise_eagers_exception_type_when_recorded_or_queued(edit):
    with pytest.raises(Exception) as eager:
        edit(torch.zeros(3))
    with pytest.raises(Exception) as queued:
        with fastinit.batched():
            w = torch.zeros(3)
            fastinit.normal_(w)
            edit(w)
    assert type(queued.value) is type(eager.value)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))
            with torch.no_grad():
                edit(self.w)

    with pytest.raises(Exception) as recorded:
        fastinit.deferred_init(M)
    assert type(recorded.value) is type(eager.value)


_REINTERPRETING_EDITS = {
    "int32_fill": lambda w: w.view(torch.int32).fill_(1),
    "bf16_slice_fill": lambda w: w.view(torch.bfloat16)[2:4].fill_(1.0),
    "uint8_setitem": lambda w: w.view(torch.uint8).__setitem__(4, 255),
    "int32_mul": lambda w: w.view(torch.int32)[1].mul_(2),
    "bf16_uniform": lambda w: fastinit.uniform_(w.view(torch.bfloat16)[2:4]),
}


@pytest.mark.parametrize("case", sorted(_REINTERPRETING_EDITS))
def test_writes_through_views_of_another_dtype(case):
    """``w.view(torch.int32)`` addresses other elements and bits: batched() runs such a
    write after what it queued (the values of the same code unbatched); deferred init,
    which cannot replay it exactly, says so instead of writing the wrong elements."""
    edit = _REINTERPRETING_EDITS[case]
    outs = []
    for batched in (False, True):
        torch.manual_seed(0)
        w = torch.zeros(4)
        with torch.no_grad():
            if batched:
                with fastinit.batched():
                    fastinit.constant_(w, 0.5)
                    edit(w)
            else:
                fastinit.constant_(w, 0.5)
                edit(w)
        outs.append(w)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(4))
            with torch.no_grad():
                nn.init.constant_(self.w, 0.5)
                edit(self.w)

    with pytest.raises(NotImplementedError, match="view that reinterprets its bytes"):
        fastinit.deferred_init(M)


def test_parameters_that_view_complex_storage_as_real_materialize():
    """S4D's ``nn.Parameter(torch.view_as_real(torch.randn(h, n, dtype=torch.cfloat)))``:
    a float32 parameter over complex64 memory."""

    class S4D(nn.Module):
        def __init__(self, h=64, n=128):
            super().__init__()
            self.C = nn.Parameter(torch.view_as_real(torch.randn(h, n, dtype=torch.cfloat)))
            self.Z = nn.Parameter(torch.view_as_real(torch.full((h, n), 1 + 2j)))

    m = fastinit.deferred_init(S4D)
    fastinit.materialize(m, seed=0)
    eager = S4D()
    assert m.C.shape == eager.C.shape and m.C.dtype == torch.float32
    assert torch.equal(m.Z, eager.Z)
    assert abs(m.C.std().item() - 0.5 ** 0.5) < 0.02  # each part of a standard complex normal


def test_a_buffer_read_through_a_view_of_another_dtype_replays_exactly():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(4))
            nn.init.constant_(self.w, 0.5)
            self.register_buffer("bits", self.w.detach().view(torch.int32).clone())

    m = fastinit.deferred_init(M)
    fastinit.materialize(m, seed=0)
    assert torch.equal(m.bits, M().bits) and m.bits[0].item() == 0x3F000000


def test_materialized_tensors_keep_the_layout_the_constructor_gave_them():
    """channels_last (``self.to(memory_format=...)`` in a constructor) and transposed
    parameters come out laid out as eagerly, with the values of the contiguous layout."""

    class C(nn.Module):
        def __init__(self, channels_last: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.t = nn.Parameter(torch.empty(8, 4).t())
            nn.init.normal_(self.t)
            if channels_last:
                self.to(memory_format=torch.channels_last)

    m, flat = fastinit.deferred_init(C, True), fastinit.deferred_init(C, False)
    fastinit.materialize(m, seed=0)
    fastinit.materialize(flat, seed=0)
    eager = C(True)
    for name, p in m.named_parameters():
        assert p.stride() == eager.get_parameter(name).stride(), name
    assert m.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(m.t, flat.t)  # the same values, whatever the layout
    bound = 1 / 27 ** 0.5  # the conv's own kaiming_uniform_(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = m.conv.weight
    assert w.abs().max() <= bound and w.unique().numel() == w.numel()


def test_a_thread_whose_first_random_call_is_recorded_keeps_filling_eagerly():
    """The per-thread buffer keys are drawn into is made while recording, if the
    thread's first call is recorded: it must still be a CPU tensor after."""
    out = {}

    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)
            fastinit.normal_(self.l.weight, generator=torch.Generator().manual_seed(5))

    def body():
        try:
            m = fastinit.deferred_init(C)  # this thread's first random drop-in call
            fastinit.materialize(m, seed=0)
            w = torch.empty(3, 3)
            fastinit.normal_(w)
            out["w"] = w
        except BaseException as e:  # (surfaced below)
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert "error" not in out, out.get("error")
    assert out["w"].unique().numel() == 9


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.register_buffer("never", torch.empty(3))  # (strict mode: an error)


@pytest.mark.parametrize("failure", ["init_fn raises", "strict"])
def test_a_failed_materialize_leaves_real_tensors_as_they_were(failure):
    """init_fn's writes into real tensors outside the model are undone when materialize
    fails, plain edits and drop-in fills alike (those into the model's loaded tensors
    are never made)."""
    d = fastinit.deferred_init(_TwoLayers)
    d.a.load_state_dict(nn.Linear(4, 4).state_dict(), assign=True)
    w0, b0 = d.a.weight.detach().clone(), d.a.bias.detach().clone()
    outside = nn.Linear(4, 4)
    ow0, ob0 = outside.weight.detach().clone(), outside.bias.detach().clone()

    def init_fn(m):
        for lin in (m.a, outside):
            with torch.no_grad():
                lin.weight.mul_(2)
            fastinit.zeros_(lin.bias)
            print(lin.bias.sum().item())  # a read: the queued fill runs now, inside init_fn
            fastinit.orthogonal_(lin.weight)  # a structured init, written at once
        assert torch.equal(outside.bias, torch.zeros(4)) and torch.equal(m.a.bias, b0)
        if failure == "init_fn raises":
            nn.init.ones_(m.b.never)
            raise ValueError("bug in init_fn")
        # (strict: b.never is left uninitialized, which materialize reports)

    with pytest.raises(ValueError if failure == "init_fn raises" else RuntimeError):
        fastinit.materialize(d, seed=0, init_fn=init_fn)
    assert torch.equal(d.a.weight, w0) and torch.equal(d.a.bias, b0)
    assert torch.equal(outside.weight, ow0) and torch.equal(outside.bias, ob0)
    assert d.b.weight.is_meta


def test_the_default_init_of_a_meta_model_keeps_what_was_loaded():
    """Part of a checkpoint loaded into a meta-built model (``assign=True``): each
    module's reset hook initializes its meta tensors and leaves the loaded ones, and
    torch's generator, alone (its writes into them are dropped)."""
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LSTM(4, 4))
    ckpt = {"0.weight": torch.full((4, 4), 7.0), "1.running_mean": torch.full((4,), 3.0),
            "2.weight_ih_l0": torch.full((16, 4), 2.0)}
    m.load_state_dict(ckpt, strict=False, assign=True)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastinit.materialize(m, seed=0)
    state = m.state_dict()
    for k, v in ckpt.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(t.is_meta for t in state.values())
    assert 0 < m[0].bias.abs().max() <= 0.5  # its own reset: U(-1/sqrt(4), 1/sqrt(4))
    assert torch.equal(m[1].running_var, torch.ones(4)) and m[2].weight_hh_l0.abs().max() <= 0.5


def _walks_every_linear(m):  # an HF-style init_fn: it walks every module, real or not
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            nn.init.zeros_(mod.bias)
            with torch.no_grad():
                mod.bias.add_(torch.ones(mod.bias.shape))


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 3)


@pytest.mark.parametrize("build", ["deferred_init", "meta device"])
def test_init_fn_leaves_loaded_tensors_and_earlier_blocks_as_they_are(build):
    """An init_fn that walks every module writes only the meta tensors: one loaded
    from a checkpoint keeps its values, and blocks materialized one by one (then the
    rest, with the same init_fn) equal the whole model materialized at once."""
    def make():
        if build == "deferred_init":
            return fastinit.deferred_init(_Stack)
        with torch.device("meta"):
            return _Stack()

    whole = make()
    fastinit.materialize(whole, seed=0, init_fn=_walks_every_linear)
    blocks = make()
    for layer in blocks.layers:
        fastinit.materialize(layer, seed=0, init_fn=_walks_every_linear)
    first = blocks.layers[0].weight.detach().clone()
    fastinit.materialize(blocks, seed=0, init_fn=_walks_every_linear)
    assert torch.equal(blocks.layers[0].weight, first)
    if build == "deferred_init":  # (a meta model's blocks do not know their names in it)
        _assert_same(blocks, whole)
    loaded = make()
    head = nn.Linear(6, 3)
    loaded.head.load_state_dict(head.state_dict(), assign=True)
    fastinit.materialize(loaded, seed=0, init_fn=_walks_every_linear)
    assert torch.equal(loaded.head.weight, head.weight) and torch.equal(loaded.head.bias, head.bias)
    assert torch.equal(loaded.layers[1].weight, whole.layers[1].weight)
    assert torch.equal(loaded.layers[1].bias, torch.ones(6))


def test_init_fn_combines_loaded_and_deferred_tensors_out_of_place():
    """``m.b.bias.copy_(torch.ones(4) + m.a.bias)`` with ``a`` loaded and ``b`` deferred:
    a factory inside init_fn is recorded (meta), the loaded tensor's values with it."""
    d = fastinit.deferred_init(_TwoLayers)
    src = nn.Linear(4, 4)
    d.a.load_state_dict(src.state_dict(), assign=True)

    def init_fn(m):
        with torch.no_grad():
            m.b.bias.copy_(torch.ones(4) + m.a.bias)
            m.b.weight.copy_(torch.where(m.a.weight > 0, m.a.weight, 0.0) * 2)
            nn.init.zeros_(m.b.never)

    fastinit.materialize(d, seed=0, init_fn=init_fn)
    assert torch.equal(d.b.bias, torch.ones(4) + src.bias)
    assert torch.equal(d.b.weight, torch.where(src.weight > 0, src.weight, 0.0) * 2)


def test_batched_fills_with_the_engine_in_force_at_each_call():
    """``use_engine`` inside the block (or around a call, then a read after it)."""
    torch.manual_seed(0)
    ref, cpu = torch.empty(64), torch.empty(64)
    with fastinit.use_engine("reference"):
        fastinit.normal_(ref)
    fastinit.normal_(cpu)
    torch.manual_seed(0)
    a, b = torch.empty(64), torch.empty(64)
    with fastinit.batched():
        with fastinit.use_engine("reference"):
            fastinit.normal_(a)
        fastinit.normal_(b)
    assert torch.equal(a, ref) and torch.equal(b, cpu)


# ------------------------------------------------------------------ replay


def _swin_index(window: int = 4) -> nn.Module:
    """Swin's relative-position index (timm, torchvision): int64 arithmetic in place."""
    m = nn.Module()
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    m.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
    m.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, 3))
    nn.init.trunc_normal_(m.table, std=0.02)
    return m


def test_swin_relative_position_index_replays_exactly():
    eager = _swin_index()
    d = fastinit.deferred_init(_swin_index)
    fastinit.materialize(d, seed=0)
    assert d.relative_position_index.dtype == torch.int64
    assert torch.equal(d.relative_position_index, eager.relative_position_index)
    assert d.table.abs().max() <= 2.0 and 0.015 < d.table.std() < 0.025


def test_strict_mode_names_every_kind_of_uninitialized_memory():
    makers = {
        "empty_like": lambda: torch.empty_like(torch.zeros(4)),
        "new_empty": lambda: torch.zeros(4).new_empty(4),
        "empty_then_cast": lambda: torch.empty(4, dtype=torch.float64).float(),
        "empty_on_cpu": lambda: torch.empty(4, device="cpu"),
        "empty_strided": lambda: torch.empty_strided((2, 2), (1, 2)),
        "legacy": lambda: torch.Tensor(2, 2),
    }
    for what, make in makers.items():
        def build(make=make):
            m = nn.Module()
            m.register_buffer("b", make())
            return m
        m = fastinit.deferred_init(build)
        with pytest.raises(RuntimeError, match=r"never initialized: b "):
            fastinit.materialize(m, seed=0)
        assert m.b.is_meta, what


def test_tensors_made_on_a_real_device_inside_deferred_init_are_keyed_by_the_seed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8, device="cpu")
            self.register_buffer("noise", torch.randn(5, device="cpu"))

    a, b = fastinit.deferred_init(M), fastinit.deferred_init(M)
    assert a.l.weight.is_meta and a.noise.is_meta
    torch.manual_seed(1)
    fastinit.materialize(a, seed=0)
    torch.manual_seed(2)  # the global generator plays no part
    fastinit.materialize(b, seed=0)
    _assert_same(a, b)


# ------------------------------------------------------------------ default init of meta models


def test_meta_built_transformer_encoder_layer_gets_every_modules_reset_hook():
    with torch.device("meta"):
        m = nn.TransformerEncoderLayer(32, 4, 64)
    with pytest.warns(UserWarning, match="_reset_parameters as in nn.MultiheadAttention"):
        fastinit.materialize(m, seed=0)  # strict: nothing left uninitialized
    w = m.self_attn.in_proj_weight  # xavier_uniform_ over (96, 32): bound sqrt(6 / 128)
    bound = (6 / (96 + 32)) ** 0.5
    assert w.abs().max() <= bound and abs(w.std().item() - bound / 3 ** 0.5) < 0.05 * bound
    assert (m.self_attn.in_proj_bias == 0).all()
    assert (m.norm1.weight == 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # init_fn says how: no warning
        with torch.device("meta"):
            m2 = nn.TransformerEncoderLayer(32, 4, 64)
        fastinit.materialize(m2, seed=0, init_fn=lambda mod: [fastinit.normal_(p) for p in mod.parameters()])


# ------------------------------------------------------------------ failures change nothing


class _Forgot(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.x = nn.Parameter(torch.empty(3))


def _scaled(m):
    nn.init.normal_(m.lin.weight)
    m.lin.weight.data.mul_(0.5)


def _complete(m):
    _scaled(m)
    nn.init.zeros_(m.x)


def test_a_failed_materialize_then_a_retry_equals_a_clean_run(monkeypatch):
    clean = fastinit.deferred_init(_Forgot)
    fastinit.materialize(clean, init_fn=_complete, seed=0)

    m = fastinit.deferred_init(_Forgot)
    with pytest.raises(RuntimeError, match="never initialized: x"):
        fastinit.materialize(m, init_fn=_scaled, seed=0)  # strict names the forgotten tensor
    assert m.lin.weight.is_meta

    def boom(targets, progress=None):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engines, "fill", boom)
    with pytest.raises(torch.OutOfMemoryError):
        fastinit.materialize(m, init_fn=_complete, seed=0)
    monkeypatch.undo()
    assert all(t.is_meta for t in m.parameters())
    fastinit.materialize(m, init_fn=_complete, seed=0)
    _assert_same(m, clean)  # the mul_ applied once, not once per try


@pytest.mark.parametrize("deferred", [False, True])
def test_a_failed_init_fn_puts_back_what_it_replaced_in_the_modules(deferred):
    """An init that assigns a new Parameter, adds a buffer or a parametrization, then
    fails: every module holds what it held before (objects, class), and a retry
    equals a clean run."""
    def build():
        return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))

    def good(m):
        for lin in m:
            nn.init.normal_(lin.weight, std=0.5)
            nn.init.zeros_(lin.bias)

    def bad(m):
        good(m)
        m[1].bias = nn.Parameter(torch.ones(2))
        m[0].register_buffer("extra", torch.zeros(3), persistent=False)
        torch.nn.utils.parametrizations.weight_norm(m[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(m[1])  # (the legacy one: a hook and a plain attribute)
        raise ValueError("the init fails after changing the modules")

    def made():
        if deferred:
            return fastinit.deferred_init(build)
        with torch.device("meta"):
            return build()

    def state(m):
        return {n: (mod.__class__, dict(mod.__dict__), dict(mod._parameters), dict(mod._buffers),
                    dict(mod._modules), set(mod._non_persistent_buffers_set), dict(mod._forward_pre_hooks))
                for n, mod in m.named_modules()}

    m = made()
    before = state(m)
    with pytest.raises(ValueError, match="fails after changing"):
        fastinit.materialize(m, seed=0, init_fn=bad)
    after = state(m)
    assert after.keys() == before.keys()
    for n, (cls, *slots) in before.items():
        assert after[n][0] is cls, n
        for was, now in zip(slots, after[n][1:]):
            assert type(was) is type(now) and len(was) == len(now), n
            if isinstance(was, dict):
                assert was.keys() == now.keys() and all(now[k] is v for k, v in was.items()), n
            else:
                assert was == now, n
    fastinit.materialize(m, seed=0, init_fn=good)
    clean = made()
    fastinit.materialize(clean, seed=0, init_fn=good)
    _assert_same(m, clean)
    x = torch.randn(5, 4)
    assert torch.equal(m(x), clean(x))


def test_a_failed_init_fn_puts_back_the_lists_a_module_keeps():
    """nn.LSTM keeps its weights in a list too (_flat_weights): put back with them."""
    m = fastinit.deferred_init(nn.LSTM, 4, 3)
    flat = list(m._flat_weights)

    def bad(mod):
        mod.weight_ih_l0 = nn.Parameter(torch.zeros(12, 4))
        raise ValueError("fails after assigning")

    with pytest.raises(ValueError, match="fails after assigning"):
        fastinit.materialize(m, seed=0, init_fn=bad)
    assert len(m._flat_weights) == len(flat) and all(a is b for a, b in zip(m._flat_weights, flat))


def test_an_interrupt_while_tensors_are_assigned_leaves_the_model_deferred(monkeypatch):
    from fastinit.deferred import execute

    m = fastinit.deferred_init(_Net)
    orig = execute.swap_in

    def interrupt():
        raise KeyboardInterrupt

    def swap_then_interrupt(root, new_of, after=None):  # every tensor assigned, then Ctrl-C
        return orig(root, new_of, after=interrupt)

    monkeypatch.setattr("fastinit.deferred.api.swap_in", swap_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fastinit.materialize(m, seed=0)
    monkeypatch.undo()
    assert all(t.is_meta for t in m.state_dict(keep_vars=True).values())
    fastinit.materialize(m, seed=0)
    clean = fastinit.deferred_init(_Net)
    fastinit.materialize(clean, seed=0)
    _assert_same(m, clean)


# ------------------------------------------------------------------ global state


def test_materialize_with_a_seed_leaves_global_generators_alone():
    def draws():
        m = nn.Module()
        m.register_buffer("r", torch.rand(6))  # replayed by torch's own op
        m.lin = nn.Linear(4, 4)
        return m

    torch.manual_seed(7)
    before = torch.get_rng_state()
    m = fastinit.deferred_init(draws)
    fastinit.materialize(m, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    # seed=None draws one seed from the default generator, once
    torch.manual_seed(7)
    fastinit.seeding.draw_seed()
    expected = torch.get_rng_state()
    torch.manual_seed(7)
    fastinit.materialize(fastinit.deferred_init(draws))
    assert torch.equal(torch.get_rng_state(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generators exist only with CUDA")
def test_materialize_on_cpu_leaves_every_cuda_generator_alone():
    states = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    m = fastinit.deferred_init(lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))
    fastinit.materialize(m, device="cpu", seed=0)
    assert all(torch.equal(s, torch.cuda.get_rng_state(i)) for i, s in enumerate(states))


class _RopeAndDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)))
        self.register_buffer("mask", nn.functional.dropout(torch.ones(512), 0.5))  # draws, no generator=


def test_materialize_in_one_thread_leaves_another_threads_draws_alone():
    """Replays neither read nor reset torch's global generator (they compared and put
    back its state, or seeded it for an op that takes no generator: another thread's
    draws in between were rewound, and repeated, without an error), so a thread
    drawing meanwhile gets the seeded stream, and every materialize the same values."""
    ref_model = fastinit.deferred_init(_RopeAndDropout)
    fastinit.materialize(ref_model, seed=0)
    torch.manual_seed(0)
    ref = torch.cat([torch.randn(1) for _ in range(4000)])
    stop, wrong, runs, errors = threading.Event(), [], [], []

    def materialize_again_and_again():
        while not stop.is_set() or not runs:
            try:
                m = fastinit.deferred_init(_RopeAndDropout)
                fastinit.materialize(m, seed=0)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(repr(e))
                return
            runs.append(1)
            if not all(torch.equal(a, b) for a, b in zip(m.buffers(), ref_model.buffers())):
                wrong.append(1)

    th = threading.Thread(target=materialize_again_and_again)
    th.start()
    try:
        torch.manual_seed(0)
        got = torch.cat([torch.randn(1) for _ in range(4000)])
    finally:
        stop.set()
        th.join()
    assert not errors and not wrong and runs
    assert torch.equal(got, ref)


def _ctrl_c_in_deferred_init_where(code, now) -> bool:
    """Run ``deferred_init(nn.Linear, 4, 4)`` with a Ctrl-C raised at the first line of
    ``code`` run when ``now()`` holds (a tracer): it must end in KeyboardInterrupt.
    Whether it fired."""
    import signal
    import sys

    fired = []

    def tracer(frame, event, arg):
        if not fired and event == "line" and frame.f_code is code and now():
            fired.append(1)
            signal.raise_signal(signal.SIGINT)
        return tracer

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            fastinit.deferred_init(nn.Linear, 4, 4)
    finally:
        sys.settrace(None)
    return bool(fired)


def test_ctrl_c_while_the_hooks_go_in_leaves_torch_unpatched():
    """A Ctrl-C landing between two steps of installing the hooks is delivered once they
    are all in and counted, so the recording's exit takes them all out again."""
    from fastinit.deferred import hooks

    assert _ctrl_c_in_deferred_init_where(hooks.recording_thread.__wrapped__.__code__,
                                          lambda: "__new__" in torch.Tensor.__dict__)
    assert "__new__" not in torch.Tensor.__dict__ and hooks._installed == 0
    assert type(torch.FloatTensor).__name__ == "tensortype"
    fastinit.materialize(fastinit.deferred_init(nn.Linear, 4, 4), seed=0)  # (recording works again)


def test_ctrl_c_right_after_the_recorder_is_pushed_leaves_no_recorder_behind():
    """Inside torch's TorchFunctionMode.__enter__, after the push and before a with-block
    owns the mode, a Ctrl-C left the recorder on the thread's mode stack: eager code
    then made meta tensors, silently."""
    from torch.overrides import TorchFunctionMode

    assert _ctrl_c_in_deferred_init_where(TorchFunctionMode.__enter__.__code__,
                                          lambda: torch._C._len_torch_function_stack() > 0)
    assert torch._C._len_torch_function_stack() == 0
    assert not nn.Linear(2, 2).weight.is_meta


def test_torch_is_unpatched_after_recording_and_untouched_in_other_threads():
    init = torch.nn.init
    fns = {n: getattr(init, n) for n in dir(init) if callable(getattr(init, n)) and not n.startswith("__")}
    codes = {n: getattr(f, "__code__", None) for n, f in fns.items()}
    new = torch.Tensor.__new__
    typed = {n: getattr(torch, n) for n in ("FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor")}
    rng = {(m, n): getattr(m, n) for m in (torch, torch.random) for n in ("manual_seed", "set_rng_state")}
    seen = {}

    def other_thread():
        torch.manual_seed(3)  # (not the recording thread's call: no warning)
        x = torch.empty(1000)
        torch.nn.init.normal_(x)
        y = torch.Tensor(3, 2)
        z = torch.FloatTensor(3, 2)
        seen["x"] = (x.is_meta, x.std().item())
        seen["y"] = y.device.type
        seen["z"] = (z.device.type, isinstance(z, torch.FloatTensor))

    def build():
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
        return nn.Linear(4, 4)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastinit.deferred_init(build)
    assert all(getattr(m, n) is f for (m, n), f in rng.items())
    assert seen["x"][0] is False and 0.9 < seen["x"][1] < 1.1  # torch's own, on real memory
    assert seen["y"] == "cpu" and seen["z"] == ("cpu", True)
    assert all(getattr(torch, n) is c for n, c in typed.items())
    assert all(getattr(init, n) is f for n, f in fns.items())
    assert all(getattr(getattr(init, n), "__code__", None) is c for n, c in codes.items())
    assert torch.Tensor.__new__ is new and "__new__" not in torch.Tensor.__dict__


class _FixedFeatures(nn.Module):  # random features fixed whatever the outer seed (eagerly)
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(42)
            self.register_buffer("feat", torch.randn(16, 8))


class _Twins(nn.Module):  # two tensors drawn from one saved state: equal (eagerly)
    def __init__(self):
        super().__init__()
        st = torch.get_rng_state()
        self.w1 = nn.Parameter(torch.randn(8, 8))
        torch.set_rng_state(st)
        self.w2 = nn.Parameter(torch.randn(8, 8))


@pytest.mark.parametrize("build, calls", [(_FixedFeatures, "torch.manual_seed(42), torch.set_rng_state"),
                                          (_Twins, "torch.set_rng_state")])
def test_a_constructor_that_seeds_or_sets_the_global_generator_is_warned_about(build, calls):
    """Such code makes values fixed or equal eagerly; deferred draws are keyed by seed
    and name instead: not silently. A call made by fastinit's own code (a seeded
    Reset on real tensors forks and seeds the generator) is not the user's."""
    with pytest.warns(UserWarning, match=re.escape(calls)) as caught:
        m = fastinit.deferred_init(build)
    assert caught[0].filename == __file__  # the user's line
    fastinit.materialize(m, seed=0)
    try:
        raise KeyError("being handled")
    except KeyError:  # (deferred_init called while an exception is handled: still warned)
        with pytest.warns(UserWarning, match=re.escape(calls)):
            fastinit.deferred_init(build)
    def seeds_then_fails():  # (the error is what the user gets: no warning about a model never built)
        torch.manual_seed(4)
        raise ValueError("the constructor fails")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="constructor fails"):
            fastinit.deferred_init(seeds_then_fails)
    same = torch.manual_seed is torch.random.manual_seed  # (False once torch._dynamo wrapped it)

    def pickles_the_setters():  # (a config holding them pickles while recording, as torch's)
        assert pickle.loads(pickle.dumps(torch.set_rng_state)) is torch.set_rng_state
        assert (torch.manual_seed is torch.random.manual_seed) == same
        return nn.Linear(2, 2)

    fastinit.deferred_init(pickles_the_setters)
    as_fastinit = {"__name__": "fastinit.schemes", "torch": torch}

    def seeded_by_fastinit():
        exec("with torch.random.fork_rng():\n    torch.manual_seed(5)", as_fastinit)
        return nn.Linear(4, 4)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastinit.deferred_init(seeded_by_fastinit)


def test_dropin_calls_on_a_deferred_model_outside_any_block_are_recorded():
    m = fastinit.deferred_init(_Net)
    fastinit.zeros_(m.head.weight)
    fastinit.normal_(m.b1.lin.weight, std=3.0)
    fastinit.orthogonal_(m.b2.lin2.weight)
    assert m.head.weight.is_meta
    fastinit.materialize(m, seed=0)
    assert (m.head.weight == 0).all()
    assert 2.5 < m.b1.lin.weight.std().item() < 3.5
    w = m.b2.lin2.weight
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)


def test_lazy_modules_run_forward_inside_deferred_init_then_materialize():
    def build():
        m = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
        m(torch.zeros(2, 5))  # the dry run that gives LazyLinear its shape
        return m

    m = fastinit.deferred_init(build)
    assert m[0].weight.shape == (8, 5) and m[0].weight.is_meta
    fastinit.materialize(m, seed=0)
    bound = 1 / 5 ** 0.5  # nn.Linear's reset_parameters: kaiming_uniform_(a=sqrt(5)) over fan_in 5
    assert 0 < m[0].weight.abs().max() <= bound and m[0].weight.std() > bound / 3


# ------------------------------------------------------------------ found by trying it as a user


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.p = nn.Parameter(torch.randn(4))


def test_blocks_built_by_separate_deferred_init_calls_differ_inside_one_model():
    model = nn.Sequential(*[fastinit.deferred_init(_Small) for _ in range(3)])
    fastinit.materialize(model, seed=0)
    assert not torch.equal(model[0].lin.weight, model[1].lin.weight)
    assert not torch.equal(model[1].p, model[2].p)
    alone = fastinit.deferred_init(_Small)  # a block materialized alone keeps its own names
    fastinit.materialize(alone, seed=0)
    again = fastinit.deferred_init(_Small)
    fastinit.materialize(again, seed=0)
    _assert_same(alone, again)


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 64))
        with torch.no_grad():
            self.w.div_(self.w.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_cast_materialize_equals_building_then_casting(dtype):
    cast = fastinit.deferred_init(_Normalized)
    fastinit.materialize(cast, seed=0, dtype=dtype)
    ref = fastinit.deferred_init(_Normalized)
    fastinit.materialize(ref, seed=0)
    assert torch.equal(cast.w, ref.w.to(dtype))
    assert torch.allclose(ref.w.norm(dim=1), torch.ones(4), atol=1e-6)
    # kaiming_uniform_'s [-b, b): a float32 just below b may round up to b when cast, as eagerly
    cast, ref = fastinit.deferred_init(nn.Linear, 64, 48), fastinit.deferred_init(nn.Linear, 64, 48)
    fastinit.materialize(cast, seed=7, dtype=dtype)
    fastinit.materialize(ref, seed=7)
    for k, v in ref.state_dict().items():
        assert torch.equal(cast.state_dict()[k], v.to(dtype)), k


@pytest.mark.parametrize("built,target", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                          (torch.float16, torch.float32)], ids=str)
def test_a_cast_from_a_model_built_in_half_precision_equals_building_then_casting(built, target):
    """Cast up (bfloat16 built, float32 wanted) or across: computed in the built dtype,
    then cast (a float32 draw would not have bfloat16's rounding)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 48, dtype=built)
            self.n = nn.Parameter(torch.empty(48, 64, dtype=built))
            nn.init.normal_(self.n, std=0.02)

    cast, ref = fastinit.deferred_init(M), fastinit.deferred_init(M)
    fastinit.materialize(cast, seed=7, dtype=target)
    fastinit.materialize(ref, seed=7)
    for k, v in ref.state_dict().items():
        assert torch.equal(cast.state_dict()[k], v.to(target)), k


def test_batched_writes_are_seen_by_autograd_and_checked_like_eager_ones():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    y = lin(x).sum()
    with fastinit.batched():
        fastinit.normal_(lin.weight)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():
        frozen = torch.zeros(4)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        with fastinit.batched():
            fastinit.normal_(frozen)
    assert (frozen == 0).all()
    a = torch.zeros(3)
    with fastinit.batched():
        with pytest.raises(RuntimeError, match="more than one element"):
            fastinit.normal_(torch.zeros(1).expand(4))  # raised at the call, as eagerly
        fastinit.ones_(a)
    assert (a == 1).all()


def test_torch_save_inside_batched_sees_the_queued_fills(tmp_path):
    m = nn.Linear(4, 4)
    with fastinit.batched():
        fastinit.zeros_(m.weight)
        torch.save(m.state_dict(), tmp_path / "m.pt")
    assert (torch.load(tmp_path / "m.pt")["weight"] == 0).all()


def _written(body):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 6))
            body(self.w)
    return M


@pytest.mark.parametrize("name,body", [
    ("assign all", lambda w: w.data.__setitem__(slice(None), 2.0)),
    ("assign tensor", lambda w: w.data.__setitem__(Ellipsis, torch.arange(24.0).view(4, 6))),
    ("transposed fill", lambda w: w.data.t().fill_(3.0)),
    ("row by row", lambda w: [w.data.__setitem__(i, float(i)) for i in range(4)]),
    ("two halves", lambda w: (nn.init.ones_(w.data[:2]), nn.init.zeros_(w.data[2:]))),
])
def test_tensors_written_whole_through_views_or_piece_by_piece_are_initialized(name, body):
    cls = _written(body)
    eager = cls()
    d = fastinit.deferred_init(cls)
    fastinit.materialize(d, seed=0)  # strict: no "only partly written"
    assert torch.equal(d.w, eager.w), name


def test_a_partly_written_tensor_is_still_named():
    cls = _written(lambda w: nn.init.zeros_(w.data[:2]))
    with pytest.raises(RuntimeError, match="w .*only partly written"):
        fastinit.materialize(fastinit.deferred_init(cls), seed=0)


def test_pegasus_sinusoidal_positions_built_in_halves_materialize_exactly():
    cfg = transformers.PegasusConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0)
    eager = transformers.PegasusModel(cfg)
    d = fastinit.deferred_init(transformers.PegasusModel, cfg)
    fastinit.materialize(d, seed=0)
    e = dict(eager.named_parameters())
    for n, p in d.named_parameters():
        if "embed_positions" in n:
            assert torch.allclose(p, e[n]), n


def test_meta_built_nn_transformer_gets_its_own_xavier_reset():
    with torch.device("meta"):
        m = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
    with pytest.warns(UserWarning):
        fastinit.materialize(m, seed=0)
    w = m.encoder.layers[0].linear1.weight  # xavier over (32, 16), not Linear's 1/sqrt(16)
    bound = (6 / 48) ** 0.5
    assert 0.9 * bound < w.abs().max() <= bound


class _OwnGenerator(nn.Module):
    """Model code that draws from its own generator: eager values whatever the seed."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(42)
        self.register_buffer("proj", torch.randn(3, generator=g))
        self.a = nn.Parameter(torch.empty(5))
        nn.init.normal_(self.a, generator=g)
        self.b = nn.Parameter(torch.empty(5))
        fastinit.normal_(self.b, generator=g)
        self.c = nn.Parameter(torch.empty(2, 3))
        self.c.data.t().uniform_(generator=g)
        self.d = nn.Parameter(torch.empty(6, 6))
        nn.init.trunc_normal_(self.d, std=0.5, generator=g)
        self.e = nn.Parameter(torch.empty(6, 6))
        nn.init.orthogonal_(self.e, generator=g)
        self.f = nn.Parameter(torch.empty(6, 6))
        nn.init.kaiming_normal_(self.f, generator=g)
        self.h = nn.Parameter(torch.empty(6, 4))
        fastinit.orthogonal_(self.h, generator=g)
        self.i = nn.Parameter(torch.empty(6, 4))
        fastinit.sparse_(self.i, 0.5, generator=g)
        self.keyed = nn.Parameter(torch.empty(5))
        nn.init.normal_(self.keyed)  # no generator: keyed by materialize's seed


def test_explicit_generators_in_model_code_give_the_eager_values():
    eager = _OwnGenerator()
    seeds = []
    for seed in (0, 1):
        m = fastinit.deferred_init(_OwnGenerator)
        fastinit.materialize(m, seed=seed)
        for n in "proj a b c d e f h i".split():
            assert torch.equal(getattr(m, n), getattr(eager, n)), n
        seeds.append(m.keyed.detach().clone())
    assert not torch.equal(seeds[0], seeds[1])


class _Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(5))
        self.w.data.index_fill_(0, torch.tensor([1, 3]), 2.0)
        self.v = nn.Parameter(torch.zeros(5))
        self.v.data.index_add_(0, torch.tensor([0, 4]), torch.ones(2))
        self.u = nn.Parameter(torch.zeros(5))
        self.u.data.index_copy_(0, torch.tensor([2]), torch.full((1,), 7.0))


def test_index_ops_with_cpu_indices_in_constructors_replay_exactly():
    eager = _Indexed()
    d = fastinit.deferred_init(_Indexed)
    fastinit.materialize(d, seed=0)
    _assert_same(d, eager)


class _Buffered(_Small):
    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.arange(3.0))


def test_a_deep_copy_of_a_deferred_block_materializes_to_its_originals_values():
    b = fastinit.deferred_init(_Buffered)
    seq = nn.Sequential(b, copy.deepcopy(b))
    fastinit.materialize(seq, seed=0)
    for x, y in zip(seq[0].state_dict().values(), seq[1].state_dict().values()):
        assert torch.equal(x, y)  # as an eager deep copy: equal values ...
    assert seq[0].lin.weight.data_ptr() != seq[1].lin.weight.data_ptr()  # ... in memory of its own
    alone = fastinit.deferred_init(_Buffered)
    twin = copy.deepcopy(alone)
    fastinit.materialize(twin, seed=0)
    assert alone.lin.weight.is_meta
    fastinit.materialize(alone, seed=0)
    _assert_same(alone, twin)


def test_materialize_names_a_meta_device_or_a_non_float_dtype_before_any_work():
    m = fastinit.deferred_init(nn.Linear, 4, 4)
    with pytest.raises(ValueError, match="device='meta'"):
        fastinit.materialize(m, seed=0, device="meta")
    for dtype in (torch.int32, torch.bool):
        with pytest.raises(TypeError, match="floating point or complex"):
            fastinit.materialize(m, seed=0, dtype=dtype)
    assert fastinit.is_deferred(m) and m.weight.is_meta


# ------------------------------------------------------------------ writes no name announces


def _eager_and_deferred(cls, seed=0):
    torch.manual_seed(0)
    eager = cls()
    d = fastinit.deferred_init(cls)
    fastinit.materialize(d, device="cpu", seed=seed)
    return eager, d


class _ForwardInConstructor(nn.Module):
    """A dry-run forward in a constructor (to size a head, or give lazy modules their
    shapes) updates BatchNorm/InstanceNorm running statistics and renormalizes an
    Embedding with max_norm: writes no in-place name announces."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.bn_cum = nn.BatchNorm1d(4, momentum=None)
        self.inorm = nn.InstanceNorm1d(4, track_running_stats=True)
        self.emb = nn.Embedding(5, 4, max_norm=0.5)
        nn.init.constant_(self.emb.weight, 1.0)
        with torch.no_grad():
            self.emb.weight[2].mul_(0.1)  # a row already inside max_norm stays
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        x = torch.arange(8.0).reshape(2, 4)
        self.bn(x)
        self.bn_cum(x * 2)
        self.inorm(torch.arange(24.0).reshape(2, 4, 3))
        self.emb(torch.tensor([0, 2, 4]))
        nn.functional.batch_norm(x, self.rm, self.rv, training=True, momentum=0.5)


def test_a_forward_pass_in_a_constructor_updates_state_as_eagerly():
    eager, d = _eager_and_deferred(_ForwardInConstructor)
    _assert_same(eager, d)
    assert d.bn.running_mean.abs().sum() > 0 and d.emb.weight[1].norm() == 1.0 * 2  # (row 1 untouched)


class _ListAndTupleWrites(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(3))
        self.b = nn.Parameter(torch.ones(2))
        self.c = nn.Parameter(torch.full((2,), 2.0))
        with torch.no_grad():
            torch._foreach_mul_([self.a, self.b], 3.0)
            torch._foreach_add_([self.b, self.c], [self.c, self.b])  # each reads the other's old value
        v = torch.zeros(3)
        torch.sort(torch.tensor([3.0, 1.0, 2.0]), out=(v, torch.empty(3, dtype=torch.long)))
        self.register_buffer("v", v)
        w = torch.empty(3)  # written whole by out=: initialized
        idx = torch.empty(3, dtype=torch.long)
        torch.sort(torch.tensor([6.0, 4.0, 5.0]), descending=True, out=(w, idx))
        self.register_buffer("w", w)
        self.register_buffer("idx", idx)


def test_foreach_lists_and_out_tuples_in_constructors_are_recorded():
    eager, d = _eager_and_deferred(_ListAndTupleWrites)
    _assert_same(eager, d)
    assert d.b.tolist() == [5.0, 5.0] and d.c.tolist() == [7.0, 7.0]  # c += the new b, as eagerly


class _ValueSized(nn.Module):
    """Architecture computed with torch ops whose result's size depends on the values
    (timm's RegNet: ``torch.unique`` of rounded widths)."""

    def __init__(self):
        super().__init__()
        widths = torch.arange(6, dtype=torch.float32) * 0.6 + 8
        n = len(torch.unique(widths.round()))
        self.lin = nn.Linear(n, 2)
        m = torch.arange(6.0)
        self.register_buffer("sel", m[m > 2])
        self.register_buffer("nz", torch.nonzero(torch.arange(6) % 2))
        self.register_buffer("cnt", torch.bincount(torch.tensor([0, 1, 1, 3])))
        self.register_buffer("uc", torch.unique_consecutive(torch.tensor([1, 1, 2, 2, 3, 1])))
        self.register_buffer("ri", torch.repeat_interleave(m, torch.arange(6) % 3))
        self.register_buffer("ts", torch.tensor_split(m, torch.tensor([1, 2]) * 2)[1])
        self.register_buffer("close", torch.tensor(torch.allclose(m, m + 1e-9)))


def test_ops_sized_by_values_run_on_constructor_computed_tensors():
    eager, d = _eager_and_deferred(_ValueSized)
    assert d.lin.weight.shape == eager.lin.weight.shape == (2, 4)
    for n in ("sel", "nz", "cnt", "uc", "ri", "ts", "close"):
        assert torch.equal(getattr(d, n), getattr(eager, n)), n


def test_ops_sized_by_random_values_are_a_clear_error():
    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            torch.unique(self.lin.weight > 0)

    with pytest.raises(RuntimeError, match="depends on random draws"):
        fastinit.deferred_init(Random)


@pytest.mark.parametrize("cast,dtype", [("half", None), ("bfloat16", None), ("double", None),
                                        ("half", torch.bfloat16)])
def test_a_deferred_model_cast_before_materialize_equals_building_then_casting(cast, dtype):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    a = fastinit.deferred_init(transformers.GPT2LMHeadModel, cfg)
    getattr(a, cast)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (not taken for a model built without deferred_init)
        fastinit.materialize(a.transformer.h[0], device="cpu", seed=3, dtype=dtype)
        fastinit.materialize(a, device="cpu", seed=3, dtype=dtype)
    b = fastinit.deferred_init(transformers.GPT2LMHeadModel, cfg)
    fastinit.materialize(b, device="cpu", seed=3)
    getattr(b, cast)()
    if dtype is not None:
        b.to(dtype)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sb:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.lm_head.weight is a.transformer.wte.weight


def test_recorded_calls_alike_but_for_what_their_checks_read_still_raise_as_eagerly():
    """Recorded calls reuse the checks of a call made before with the same numbers and
    dtype: a call that differs in anything those checks read (elements or none, the
    mode, the argument types) is checked again, and raises what eager code raises."""
    def build(second):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)
                nn.init.normal_(torch.empty(0, dtype=torch.long))  # no elements: torch checks nothing
                nn.init.kaiming_uniform_(self.lin.weight, a=1.0)
                second(self)
        return M

    cases = [lambda m: nn.init.normal_(torch.empty(3, dtype=torch.long)),
             lambda m: nn.init.kaiming_uniform_(m.lin.weight, a=1.0, mode="fan_sideways"),
             lambda m: nn.init.kaiming_uniform_(m.lin.weight, a=True)]
    for second in cases:
        with pytest.raises(Exception) as eager:
            build(second)()
        with pytest.raises(type(eager.value)):
            fastinit.deferred_init(build(second))


class _LegacyTyped(nn.Module):
    """transformers' XLNet: ``nn.Parameter(torch.FloatTensor(d, h, k))``, then normal_."""

    def __init__(self):
        super().__init__()
        self.q = nn.Parameter(torch.FloatTensor(8, 2, 4))
        self.h = nn.Parameter(torch.HalfTensor(3, 5))
        nn.init.normal_(self.q, std=0.02)
        nn.init.zeros_(self.h)
        assert isinstance(self.q, torch.FloatTensor) is False  # (a meta tensor while recorded)
        self.register_buffer("t", torch.arange(3).type(torch.DoubleTensor))  # the classes still name types


def test_legacy_typed_constructors_are_recorded_and_keyed_by_the_seed():
    torch.manual_seed(1)
    a = fastinit.deferred_init(_LegacyTyped)
    torch.manual_seed(2)
    b = fastinit.deferred_init(_LegacyTyped)
    ra = fastinit.materialize(a, seed=0)
    fastinit.materialize(b, seed=0)
    assert ra.entries["q"].startswith("Normal") and a.h.dtype == torch.float16
    assert a.t.dtype == torch.float64 and a.t.tolist() == [0.0, 1.0, 2.0]
    _assert_same(a, b)
    assert isinstance(torch.zeros(2), torch.FloatTensor)


class _Draws(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(16, 16))
        with torch.no_grad():  # a distribution's sample: torch.normal of real tensors
            self.p.copy_(torch.distributions.Normal(torch.zeros(16, 16), torch.ones(16, 16)).sample())
        self.register_buffer("d", nn.functional.dropout2d(torch.ones(4, 3, 2, 2), training=True))
        self.register_buffer("r", nn.functional.rrelu(-torch.ones(64), training=True))


def test_random_ops_in_constructors_are_keyed_by_the_seed_and_leave_torch_s_generator():
    models = []
    for g in (1, 2):
        torch.manual_seed(g)
        m = fastinit.deferred_init(_Draws)
        state = torch.random.get_rng_state()
        fastinit.materialize(m, seed=0)
        assert torch.equal(state, torch.random.get_rng_state())
        models.append(m)
    _assert_same(*models)
    assert models[0].p.std() > 0.5 and set(models[0].d.unique().tolist()) <= {0.0, 2.0}

    class Binomial(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.binomial(torch.full((4,), 10.0), torch.full((4,), 0.5)))

    with pytest.raises(NotImplementedError, match="draws random numbers"):
        fastinit.deferred_init(Binomial)


def test_writes_after_a_cast_of_a_deferred_model_are_recorded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            nn.init.constant_(self.lin.bias, 0.3)

    m = fastinit.deferred_init(M).half()
    fastinit.zeros_(m.lin.bias)  # outside any block: recorded, after the cast
    fastinit.materialize(m, seed=0)
    assert m.lin.bias.dtype == torch.float16 and m.lin.bias.tolist() == [0.0] * 4
    m = fastinit.deferred_init(M).half()
    fastinit.materialize(m, seed=0, init_fn=lambda mm: nn.init.constant_(mm.lin.bias, 0.5))
    assert m.lin.bias.tolist() == [0.5] * 4


def test_real_tensors_written_from_meta_ones_in_constructors_get_eager_values():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((3,), 0.5))
            v = torch.tensor([1.0, 2.0, 3.0])
            v.mul_(self.scale)
            self.register_buffer("v", v)

    eager, d = _eager_and_deferred(M)
    _assert_same(eager, d)


def test_signed_zero_bounds_and_one_version_bump_inside_batched():
    w = torch.empty(3)
    fastinit.uniform_(torch.empty(2), 0.0, 0.0)
    fastinit.uniform_(w, -0.0, 0.0)
    assert all(math.copysign(1.0, x) < 0 for x in w.tolist())  # -0.0, as torch gives
    x = torch.empty(100)
    v = x._version
    with fastinit.batched():
        fastinit.normal_(x)
    assert x._version == v + 1


def test_an_init_call_on_a_real_tensor_in_a_constructor_writes_it():
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))  # real data, then an in-place draw
            nn.init.normal_(self.w, std=0.1)

    m = fastinit.deferred_init(A)
    fastinit.materialize(m, seed=0)
    assert m.w.abs().max() < 1.0  # drawn (eagerly, as torch does), not left at [1, 2, 3]


def test_partial_writes_into_a_cast_deferred_model_are_recorded():
    class N(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)
            nn.init.constant_(self.l.weight, 0.25)
            self.register_buffer("b", torch.arange(4.0))

    def edits(mm):
        mm.l.weight.data.mul_(2)
        mm.l.weight.data[1:3].fill_(1.0)
        mm.b.add_(1)

    eager = N().half()
    with torch.no_grad():
        edits(eager)
    m = fastinit.deferred_init(N).half()
    fastinit.materialize(m, seed=0, init_fn=edits)
    assert torch.equal(m.l.weight, eager.l.weight) and torch.equal(m.b, eager.b)
    m = fastinit.deferred_init(N).half()
    with fastinit.batched(module=m):
        with torch.no_grad():
            edits(m)
    fastinit.zeros_(m.l.weight[0])  # a view, outside any block
    fastinit.materialize(m, seed=0)
    eager.l.weight.data[0] = 0
    assert torch.equal(m.l.weight, eager.l.weight) and torch.equal(m.b, eager.b)


# ------------------------------------------------------------------ what init_fn makes, and what a model holds


def test_tensors_init_fn_makes_or_swaps_in_are_materialized_from_what_it_recorded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

    def init_fn(mod):
        if isinstance(mod, M):
            mod.lin.weight = nn.Parameter(torch.ones(8, 8))  # replaces the recorded weight
            mod.register_buffer("steps", torch.full((), 3.0))

    m = fastinit.deferred_init(M)
    report = fastinit.materialize(m, seed=0, init_fn=init_fn)
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    assert torch.equal(m.lin.weight, torch.ones(8, 8)) and m.steps.item() == 3.0
    assert "Constant(value=1.0)" in str(report.entries["lin.weight"])

    # a parametrization added by init_fn: its original0/original1 are real and give back the weight
    eager = nn.Linear(16, 16)
    m = fastinit.deferred_init(nn.Linear, 16, 16)
    fastinit.materialize(m, seed=0, init_fn=lambda mod: nn.utils.parametrizations.weight_norm(mod))
    pw = m.parametrizations.weight
    assert not pw.original0.is_meta and not pw.original1.is_meta
    assert torch.allclose(pw.original0.squeeze(1), pw.original1.norm(dim=1))
    assert torch.allclose(m.weight, pw.original1, atol=1e-6)
    assert pw.original1.abs().max() <= 1 / 4 and pw.original1.shape == eager.weight.shape


def test_references_a_module_keeps_outside_its_parameters_point_at_the_real_tensors():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.shared = [self.lin.weight]  # a list of parameters
            self.pair = (self.lin.bias, 1)
            self.register_buffer("scale", torch.full((4,), 2.0))
            self.scale_alias = self.scale
            self.rnn = nn.LSTM(4, 4)

    m = fastinit.deferred_init(M)
    fastinit.materialize(m, seed=0)
    assert m.shared[0] is m.lin.weight and m.pair[0] is m.lin.bias and m.pair[1] == 1
    assert m.scale_alias is m.scale and torch.equal(m.scale_alias, torch.full((4,), 2.0))
    assert len(m.rnn._flat_weights) == 4
    assert all(w is getattr(m.rnn, n) for w, n in zip(m.rnn._flat_weights, m.rnn._flat_weights_names))


def test_tensor_hooks_classes_and_requires_grad_of_buffers_are_kept():
    class TaggedParam(nn.Parameter):
        def __new__(cls, data, tag, requires_grad=True):
            p = super().__new__(cls, data, requires_grad)
            p.tag = tag
            return p

    class MyT(torch.Tensor):
        pass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.lin.weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
            self.calls = []
            self.lin.bias.register_post_accumulate_grad_hook(lambda p: self.calls.append("bias"))
            self.w = TaggedParam(torch.zeros(4), "no_decay")
            self.register_buffer("b", torch.zeros(4).as_subclass(MyT))
            self.register_buffer("temp", torch.ones(1, requires_grad=True))

    def run(m):
        with torch.no_grad():
            m.lin.weight.fill_(1.0)
        (m.lin(torch.full((8, 4), 100.0)) ** 2).sum().backward()
        return m.lin.weight.grad.abs().max().item(), m.calls

    eager, m = M(), fastinit.deferred_init(M)
    fastinit.materialize(m, seed=0)
    assert run(m) == run(eager)
    assert type(m.w) is TaggedParam and m.w.tag == "no_decay" and m.w.requires_grad
    assert type(m.b) is MyT and torch.equal(m.b, eager.b)
    assert m.temp.requires_grad and m.temp.is_leaf


def test_random_ops_with_tensor_inputs_draw_from_their_own_generator_as_eagerly():
    def ctor():
        m = nn.Module()
        g = torch.Generator().manual_seed(7)
        m.idx = nn.Buffer(torch.multinomial(torch.ones(10), 5, generator=g))
        m.mask = nn.Buffer(torch.bernoulli(torch.full((8,), 0.5), generator=g))
        m.noise = nn.Buffer(torch.normal(torch.zeros(4), torch.ones(4), generator=g))
        m.inplace = nn.Buffer(torch.empty(6).bernoulli_(torch.full((6,), 0.3), generator=g))
        m.after = nn.Buffer(torch.randn(3, generator=g))  # later draws from g are not shifted
        return m

    eager = ctor()
    for seed in (0, 1):
        m = fastinit.deferred_init(ctor)
        fastinit.materialize(m, seed=seed)
        _assert_same(eager, m)

    def reads_a_seeded_draw():
        m = nn.Module()
        m.idx = nn.Buffer(torch.multinomial(torch.rand(10), 5, generator=torch.Generator().manual_seed(1)))
        return m

    with pytest.raises(RuntimeError, match="random draws"):
        fastinit.deferred_init(reads_a_seeded_draw)


def test_a_torch_write_to_a_deferred_model_outside_any_block_is_refused_not_lost():
    class Scale(nn.Module):
        def forward(self, w):
            return w * 2

        def right_inverse(self, w):
            return w / 2

    def parametrized(m):
        nn.utils.parametrize.register_parametrization(m, "weight", Scale())

    eager = nn.Linear(4, 4)
    def zero(m):
        with torch.no_grad():
            m.weight.zero_()

    for write in (zero, lambda m: m.load_state_dict(eager.state_dict()), parametrized):
        m = fastinit.deferred_init(nn.Linear, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (load_state_dict's: copying into a meta tensor is a no-op)
            write(m)
        with pytest.raises(RuntimeError, match="written after deferred_init"):
            fastinit.materialize(m, seed=0)
        assert all(t.is_meta for t in m.parameters())  # nothing changed
    # the same inside a block is recorded: the right_inverse halves the recorded weight
    m, ref = fastinit.deferred_init(nn.Linear, 4, 4), fastinit.deferred_init(nn.Linear, 4, 4)
    with fastinit.batched(module=m):
        parametrized(m)
    fastinit.materialize(m, seed=0)
    fastinit.materialize(ref, seed=0)
    assert torch.equal(m.parametrizations.weight.original, ref.weight / 2)
    assert torch.equal(m.weight, ref.weight)
    # fastinit's own calls outside blocks are recorded (and a block after them is no write unseen)
    m = fastinit.deferred_init(nn.Linear, 4, 4)
    fastinit.zeros_(m.bias)
    with fastinit.batched(module=m):
        m.weight.data.mul_(0)
    fastinit.materialize(m, seed=0)
    assert not m.bias.any() and not m.weight.any()


def test_reading_a_weight_whose_random_init_eye_overwrote_is_exact():
    def traced():
        m = nn.Linear(4, 4)
        nn.init.eye_(m.weight)
        m.trace = float(m.weight.detach().sum())  # reads the value while built
        return m

    def orthogonal_on_eye():
        m = nn.Linear(16, 16)
        nn.init.eye_(m.weight)
        return nn.utils.parametrizations.orthogonal(m)  # its right_inverse reads the weight

    m = fastinit.deferred_init(traced)
    fastinit.materialize(m, seed=0)
    assert m.trace == 4.0 and torch.equal(m.weight, torch.eye(4))
    m, eager = fastinit.deferred_init(orthogonal_on_eye), orthogonal_on_eye()
    fastinit.materialize(m, seed=0)
    assert torch.allclose(m.weight, eager.weight, atol=1e-6)


def test_a_cast_that_overflows_the_target_dtype_gives_what_eager_casting_gives():
    def build(c, k=1.0):
        def ctor():
            m = nn.Module()
            m.w = nn.Parameter(torch.empty(2))
            nn.init.constant_(m.w, c)
            with torch.no_grad():
                m.w.mul_(k)
            m.u = nn.Parameter(torch.empty(1000))
            nn.init.uniform_(m.u, -1e5, 1e5)  # bounds beyond float16's range
            return m
        return ctor

    for c, k in [(65519.0, 1.0), (0.1, 1000003.0), (60000.0, 1.0)]:
        eager = build(c, k)().half()
        for how in ("dtype", "half"):
            m = fastinit.deferred_init(build(c, k))
            if how == "half":
                m.half()
                fastinit.materialize(m, seed=0)
            else:
                fastinit.materialize(m, seed=0, dtype=torch.float16)
            assert torch.equal(m.w, eager.w), (c, k, how)
            assert m.u.dtype == torch.float16
            assert abs(torch.isinf(m.u).float().mean().item() - 0.3446) < 0.06  # |u| > 65520: 34% inf


def test_a_complex_buffer_cast_with_the_model_keeps_its_real_part_as_eagerly():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            f = torch.outer(torch.arange(4.0), torch.ones(2))
            self.register_buffer("freqs_cis", torch.polar(torch.ones_like(f), f), persistent=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's: casting complex to real discards the imaginary part)
        eager = M().to(torch.bfloat16)
        m = fastinit.deferred_init(M).to(torch.bfloat16)
        fastinit.materialize(m, seed=0)
    assert m.freqs_cis.dtype == torch.bfloat16 and torch.equal(m.freqs_cis, eager.freqs_cis)


def test_a_sparse_buffer_is_refused_by_name():
    class SP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("adj", torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]),
                                                                torch.tensor([1.0, 2.0]), (2, 2)))

    with pytest.raises(NotImplementedError, match="adj is a torch.sparse_coo tensor"):
        fastinit.deferred_init(SP)
    assert torch.FloatTensor.__module__ == "torch" and "__new__" not in torch.Tensor.__dict__  # patches undone


def test_a_submodule_viewing_storage_outside_it_is_refused_and_whole_keeps_the_alias():
    class Holder(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.h = Holder(nn.Parameter(self.a.weight.detach()[:4]))  # the first 4 rows, same storage

    for first in ("h", "a"):
        m = fastinit.deferred_init(M)
        with pytest.raises(RuntimeError, match="shares its storage"):
            fastinit.materialize(getattr(m, first), seed=0)
        assert all(t.is_meta for t in m.parameters())
    fastinit.materialize(m, seed=0)
    assert m.h.p.untyped_storage().data_ptr() == m.a.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        m.a.weight.add_(1.0)
    assert torch.equal(m.h.p, m.a.weight[:4])
    # a deep copy of a block made after deferred_init has memory of its own: no error
    m = fastinit.deferred_init(M)
    m.b = copy.deepcopy(m.a)
    fastinit.materialize(m.b, seed=0)


def test_an_unseen_write_stays_refused_after_other_recording_sessions():
    other = nn.Linear(4, 4)
    sessions = [lambda m: fastinit.deferred_init(nn.Linear, 2, 2),
                lambda m: _run_batched(lambda: fastinit.normal_(torch.empty(8))),
                lambda m: _run_batched(lambda: None, module=m[1]),
                lambda m: fastinit.materialize(m[1], seed=0, init_fn=lambda mod: None)]
    for session in sessions:
        m = fastinit.deferred_init(nn.Sequential, nn.Linear(4, 4), nn.Linear(4, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m[0].load_state_dict(other.state_dict())  # a no-op on meta tensors: the values would be lost
        session(m)
        with pytest.raises(RuntimeError, match="written after deferred_init"):
            fastinit.materialize(m, seed=0)
        assert fastinit.planned(m)["0.weight"].description == "replay copy_(data)"  # a preview refuses nothing


def _run_batched(fn, module=None):
    with fastinit.batched(module=module):
        fn()


def test_a_parametrization_without_right_inverse_after_deferred_init_is_no_write():
    m, ref = fastinit.deferred_init(nn.Linear, 6, 6), fastinit.deferred_init(nn.Linear, 6, 6)
    nn.utils.parametrize.register_parametrization(m, "weight", _Sym())  # original.set_(original)
    fastinit.materialize(m, seed=0)
    fastinit.materialize(ref, seed=0)
    assert torch.equal(m.parametrizations.weight.original, ref.weight)
    assert torch.equal(m.weight, m.weight.t())


def test_tensors_init_fn_makes_are_keyed_by_their_path_block_by_block_or_whole():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

    def init_fn(mod):
        for sub in mod.modules():
            if isinstance(sub, nn.Linear):
                sub.weight = nn.Parameter(torch.randn(8, 8))

    blocks = fastinit.deferred_init(nn.Sequential, Block(), Block())
    whole = fastinit.deferred_init(nn.Sequential, Block(), Block())
    fastinit.materialize(blocks[1], seed=0, init_fn=init_fn)
    fastinit.materialize(blocks[0], seed=0, init_fn=init_fn)
    fastinit.materialize(whole, seed=0, init_fn=init_fn)
    for i in range(2):
        assert torch.equal(blocks[i].lin.weight, whole[i].lin.weight)
    assert not torch.equal(whole[0].lin.weight, whole[1].lin.weight)


def test_like_ops_with_a_generator_read_only_the_shape_of_a_random_tensor():
    def ctor():
        m = nn.Module()
        x = torch.randn(5)  # random: keyed by the seed
        g = torch.Generator().manual_seed(3)
        m.noise = nn.Buffer(torch.randn_like(x, generator=g))
        m.x = nn.Buffer(x)
        return m

    eager = ctor()
    m = fastinit.deferred_init(ctor)
    fastinit.materialize(m, seed=0)
    assert torch.equal(m.noise, eager.noise)


def test_a_refused_real_module_passed_in_is_left_as_it_was():
    real = nn.Linear(3, 3)
    before = real.weight

    def ctor(lin):
        m = nn.Module()
        m.lin = lin
        m.register_buffer("adj", torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), (2, 2)))
        return m

    with pytest.raises(NotImplementedError, match="sparse"):
        fastinit.deferred_init(ctor, real)
    assert real.weight is before and not real.weight.is_meta


def test_a_deferred_block_built_into_another_deferred_model_keeps_its_edits():
    for block_of, part_of in [(lambda o: o, lambda o: o), (lambda o: o[0], lambda o: o), (lambda o: o, lambda o: o[0])]:
        inner = fastinit.deferred_init(nn.Linear, 4, 4)
        outer = fastinit.deferred_init(lambda: nn.Sequential(inner, nn.Linear(4, 4)))
        with fastinit.batched(module=block_of(outer)):
            with torch.no_grad():
                outer[0].weight.mul_(0)
        fastinit.materialize(part_of(outer), seed=0)
        assert not outer[0].weight.any()


def test_an_outer_constructor_rewrapping_a_deferred_blocks_weight_as_a_view_is_exact():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            with torch.no_grad():
                self.lin.weight.copy_(torch.arange(9.0).reshape(3, 3))

    class Outer(nn.Module):
        def __init__(self, make):
            super().__init__()
            self.inner = make()
            self.inner.lin.weight = nn.Parameter(self.inner.lin.weight.t())

    eager = Outer(Block)
    for built_before in (False, True):
        for part in ("root", "inner"):
            block = fastinit.deferred_init(Block) if built_before else None
            d = fastinit.deferred_init(Outer, (lambda: block) if built_before else (lambda: fastinit.deferred_init(Block)))
            fastinit.materialize(d if part == "root" else d.inner, seed=0)
            assert torch.equal(d.inner.lin.weight, eager.inner.lin.weight), (built_before, part)


def test_only_the_set_to_itself_of_a_parametrization_is_excused_and_nested_sessions_see_their_writes():
    m = fastinit.deferred_init(nn.Linear, 4, 4)
    nn.utils.parametrize.register_parametrization(m, "weight", _Sym())
    with torch.no_grad():
        m.parametrizations.weight.original.fill_(2.0)  # a write besides the set_
    with pytest.raises(RuntimeError, match="written after deferred_init"):
        fastinit.materialize(m, seed=0)

    class Outer(nn.Module):  # edits a deferred block it built, then builds another (a nested session)
        def __init__(self):
            super().__init__()
            self.a = fastinit.deferred_init(nn.Linear, 3, 3)
            with torch.no_grad():
                self.a.bias.fill_(1).mul_(2)
            self.b = fastinit.deferred_init(nn.Linear, 3, 3)

    o = fastinit.deferred_init(Outer)
    fastinit.materialize(o, seed=0)
    assert torch.equal(o.a.bias, torch.full((3,), 2.0))


def test_a_long_list_starting_with_none_still_gets_the_real_tensors():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(70))
            self.gates = [None] + [layer.weight for layer in self.layers]

    m = fastinit.deferred_init(M)
    fastinit.materialize(m, seed=0)
    assert all(g is layer.weight for g, layer in zip(m.gates[1:], m.layers))


def test_blocks_deferred_inside_a_deferred_model_are_keyed_by_their_path_and_keep_ties():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(fastinit.deferred_init(Block) for _ in range(3))
            self.head = nn.Linear(4, 4)
            self.head.weight = self.layers[2].lin.weight  # tied across the block's boundary

    blockwise, whole = fastinit.deferred_init(Model), fastinit.deferred_init(Model)
    for blk in blockwise.layers:
        fastinit.materialize(blk, seed=0)
    fastinit.materialize(blockwise, seed=0)
    fastinit.materialize(whole, seed=0)
    assert not torch.equal(blockwise.layers[0].lin.weight, blockwise.layers[1].lin.weight)
    for a, b in zip(blockwise.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)
    assert blockwise.head.weight is blockwise.layers[2].lin.weight


def test_a_failed_deferred_init_puts_back_the_real_tensors_it_had_converted():
    real = nn.Linear(3, 3)
    real.register_buffer("q", torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8))
    before = real.weight

    with pytest.raises(NotImplementedError):  # (a quantized tensor has no meta twin)
        fastinit.deferred_init(lambda: real)
    assert real.weight is before and not real.weight.is_meta and not real.q.is_meta


def test_a_tensor_added_after_deferred_init_outside_blocks_is_refused_or_warned_with_strict_false():
    """What code did to modules it added after deferred_init, outside blocks, is lost (peft's
    get_peft_model zeroes LoRA B; their reset hooks give B kaiming values): an error naming
    them, the model as it was; strict=False: each module's reset hook, with a warning."""
    m = fastinit.deferred_init(nn.Sequential, nn.Linear(4, 4))
    with torch.device("meta"):
        m.append(nn.Linear(4, 2))  # outside any block: nothing records it
    nn.init.zeros_(m[1].weight)  # (a no-op on meta, as what peft does to LoRA B)
    with pytest.raises(RuntimeError, match=r"1\.weight, 1\.bias were made after deferred_init.*strict=False"):
        fastinit.materialize(m, seed=0)
    assert m[0].weight.is_meta and m[1].weight.is_meta
    with pytest.warns(UserWarning, match=r"1\.weight, 1\.bias were made after deferred_init"):
        fastinit.materialize(m, seed=0, strict=False)
    assert not m[1].weight.is_meta and m[1].weight.abs().max() <= 0.5
    # a later block (any edit) adopts them with their reset hooks: still a guess, still refused,
    # unless code in a block overwrites them whole
    m = fastinit.deferred_init(nn.Sequential, nn.Linear(4, 4))
    with torch.device("meta"):
        m.append(nn.Linear(4, 2))
    nn.init.zeros_(m[1].weight)
    with pytest.warns(UserWarning, match=r"1\.weight, 1\.bias were made after deferred_init.*refuses"):
        with fastinit.batched(module=m):
            nn.init.ones_(m[0].bias)
    with pytest.raises(RuntimeError, match=r"1\.weight, 1\.bias were made after deferred_init.*strict=False"):
        fastinit.materialize(m, seed=0)
    assert m[0].weight.is_meta and m[1].weight.is_meta
    with fastinit.batched(module=m):
        nn.init.zeros_(m[1].weight)
    with pytest.raises(RuntimeError, match=r": 1\.bias was made after"):
        fastinit.materialize(m, seed=0)
    with fastinit.batched(module=m):
        nn.init.constant_(m[1].bias, 0.5)
    fastinit.materialize(m, seed=0)
    assert torch.equal(m[1].weight, torch.zeros(2, 4)) and torch.equal(m[1].bias, torch.full((2,), 0.5))
    assert torch.equal(m[0].bias, torch.ones(4))
    # the same model built inside a block keeps what the code did
    m = fastinit.deferred_init(nn.Sequential, nn.Linear(4, 4))
    with fastinit.batched(module=m):
        with torch.device("meta"):
            m.append(nn.Linear(4, 2))
        nn.init.zeros_(m[1].weight)
    fastinit.materialize(m, seed=0)
    assert torch.equal(m[1].weight, torch.zeros(2, 4))


def test_nested_sessions_record_an_edit_once():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            with torch.no_grad():
                self.lin.bias.fill_(1).add_(1)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = fastinit.deferred_init(Block)  # a session inside deferred_init's

    o = fastinit.deferred_init(Outer)
    fastinit.materialize(o, seed=0)
    assert torch.equal(o.blk.lin.bias, torch.full((4,), 2.0))
    m = fastinit.deferred_init(nn.Linear, 4, 4)
    with fastinit.batched():
        with fastinit.batched(module=m), torch.no_grad():
            m.bias.fill_(1).mul_(2)
        with fastinit.batched(module=m), torch.no_grad():
            m.bias.add_(1)
    fastinit.materialize(m, seed=0)
    assert torch.equal(m.bias, torch.full((4,), 3.0))


def test_nested_blocks_in_deferred_stages_put_together_differ_and_match_plain_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    class Stage(nn.Module):
        def __init__(self, nest):
            super().__init__()
            self.blk = fastinit.deferred_init(Block) if nest else Block()

    for nest in (False, True):
        m = nn.Sequential(*[fastinit.deferred_init(Stage, nest) for _ in range(2)])
        fastinit.materialize(m, seed=0)
        assert not torch.equal(m[0].blk.lin.weight, m[1].blk.lin.weight)
        if nest:
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
        plain = m
    b1, b2 = fastinit.deferred_init(Block), fastinit.deferred_init(Block)
    fastinit.deferred_init(nn.Sequential, b1)  # a first model the block is built into, then dropped
    both = fastinit.deferred_init(nn.Sequential, b1, b2)
    fastinit.materialize(both, seed=0)
    assert not torch.equal(both[0].lin.weight, both[1].lin.weight)


def test_the_excuse_of_a_parametrizations_set_is_used_once():
    m = fastinit.deferred_init(nn.Linear, 4, 4)
    nn.utils.parametrize.register_parametrization(m, "weight", _Sym())
    with fastinit.batched(module=m):
        pass
    with torch.no_grad():
        m.parametrizations.weight.original.fill_(2.0)  # one unseen write, as the set_ was
    with pytest.raises(RuntimeError, match="written after deferred_init"):
        fastinit.materialize(m, seed=0)


def test_tensors_taken_from_deferred_blocks_a_constructor_drops_are_keyed_by_their_names():
    class M(nn.Module):
        def __init__(self, defer):
            super().__init__()
            make = (lambda: fastinit.deferred_init(nn.Linear, 4, 4)) if defer else (lambda: nn.Linear(4, 4))
            self.w1 = make().weight  # the block is dropped, its weight kept
            self.w2 = make().weight
            self.heads = nn.ModuleList([make(), make()])
            self.heads[0] = nn.Sequential(self.heads[0])  # a block moved one level down

    for defer in (False, True):
        m = fastinit.deferred_init(M, defer)
        fastinit.materialize(m, seed=0)
        assert not torch.equal(m.w1, m.w2)
        assert not torch.equal(m.heads[0][0].weight, m.heads[1].weight)
        assert m.w1.abs().max() <= 0.5 and m.w1.std() > 0.1  # still kaiming_uniform_(a=sqrt 5): U(+-1/2)


def test_a_materialized_model_pickles_and_a_deferred_one_is_refused():
    """``torch.save(model)`` after deferred_init + materialize loads the same model; a
    still deferred one cannot be saved with what initializes it: refused, by name."""
    import io
    import pickle

    m = fastinit.deferred_init(_Stack)
    fastinit.materialize(m, seed=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    _assert_same(back, m)
    d = fastinit.deferred_init(_Stack)
    fastinit.materialize(d.layers[0], seed=0)
    with pytest.raises(TypeError, match=r"deferred tensor layers\.1\.weight.*materialize the model"):
        pickle.dumps(d)
    fastinit.materialize(d, seed=0)
    assert pickle.loads(pickle.dumps(d)).head.bias.shape == (3,)


class _EmptyParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.empty(0, 3))
        self.lin = nn.Linear(0, 4)


@pytest.mark.parametrize("build", ["deferred_init", "meta device"])
def test_zero_element_tensors_need_no_init_in_strict_mode(build):
    """``nn.Linear(0, 4)`` and ``Parameter(torch.empty(0, 3))`` hold nothing to
    initialize: strict mode does not report them, and the rest is as eager's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if build == "deferred_init":
            m = fastinit.deferred_init(_EmptyParam)
        else:
            with torch.device("meta"):
                m = _EmptyParam()
        fastinit.materialize(m, seed=0)
        eager = _EmptyParam()
    assert m.p.shape == (0, 3) and m.lin.weight.shape == (4, 0)
    assert torch.equal(m.lin.bias, eager.lin.bias)  # U(-0, 0): zeros


class _ComplexInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = nn.Parameter(torch.empty(128, 128, dtype=torch.cfloat))
        self.u = nn.Parameter(torch.empty(128, 128, dtype=torch.cdouble))
        self.k = nn.Parameter(torch.empty(128, 128, dtype=torch.cfloat))
        nn.init.normal_(self.n, 0.5, 2.0)
        nn.init.uniform_(self.u, -1.0, 3.0)
        nn.init.kaiming_uniform_(self.k)


def test_random_inits_of_complex_parameters_replay_as_torch_draws_them():
    """torch's normal_/uniform_ on a complex tensor draw the floats of view_as_real
    (normal: each part with std / sqrt(2)); recorded in a constructor, they replay so."""
    a = fastinit.deferred_init(_ComplexInit)
    fastinit.materialize(a, seed=0)
    b = fastinit.deferred_init(_ComplexInit)
    fastinit.materialize(b, seed=0)
    _assert_same(a, b)
    for part in (a.n.real, a.n.imag):
        assert abs(part.mean().item() - 0.5) < 0.05 and abs(part.std().item() / math.sqrt(2.0) - 1) < 0.03
    bound = nn.init.calculate_gain("leaky_relu", 0) * math.sqrt(3.0 / 128)
    for part in (a.u.real, a.u.imag, a.k.real, a.k.imag):
        lo, hi = (-1.0, 3.0) if part.dtype == torch.float64 else (-bound, bound)
        assert lo <= part.min().item() and part.max().item() < hi
        assert abs(part.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo)
        assert abs(part.std().item() / ((hi - lo) / math.sqrt(12.0)) - 1) < 0.03
    assert not torch.equal(a.n.real, a.n.imag)


class _DefaultDtypeBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("r", torch.arange(6) / 7)  # int / int: the default dtype
        self.register_buffer("lin", torch.linspace(0, 1, 7))
        self.register_buffer("sq", torch.sqrt(torch.arange(6)))


def _built_under(dtype):  # what transformers' from_config(torch_dtype=...) does around __init__
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _DefaultDtypeBuffers()
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_constructor_values_replay_under_the_default_dtype_they_were_made_in(dtype):
    eager = _built_under(dtype)
    d = fastinit.deferred_init(_built_under, dtype)
    fastinit.materialize(d, seed=0)
    _assert_same(d, eager)
    assert torch.get_default_dtype() == torch.float32


def test_blocks_of_a_meta_model_materialized_one_by_one_with_one_seed_are_flagged():
    """A model built on the meta device without deferred_init: its blocks do not know
    their names in it, so one seed gives each the same values. materialize says so
    (a warning naming the fix); a deferred model's blocks are keyed by their paths."""
    with torch.device("meta"):
        m = _Stack()
    with pytest.warns(UserWarning, match="gets the same values as the sibling Linear"):
        for layer in m.layers:
            fastinit.materialize(layer, seed=0, init_fn=_walks_every_linear)
    assert torch.equal(m.layers[0].weight, m.layers[1].weight)
    d = fastinit.deferred_init(_Stack)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for layer in d.layers:
            fastinit.materialize(layer, seed=0, init_fn=_walks_every_linear)
    assert not torch.equal(d.layers[0].weight, d.layers[1].weight)


class _PlainAttrs(nn.Module):
    """Tensors kept as plain attributes (Meta's reference Llama: ``self.freqs_cis``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.freqs_cis = torch.polar(torch.ones(6, 4), torch.outer(torch.arange(6).float(), inv))
        self.mask = torch.tril(torch.ones(6, 6))
        self.noise = torch.randn(5)
        self.scratch = torch.empty(3)  # (eager: garbage; never reported)
        self.shared = self.lin.weight  # (a parameter: stays one object with it)


class _PlainBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_PlainAttrs() for _ in range(2))


def test_plain_tensor_attributes_made_by_a_constructor_are_materialized():
    """Deterministic ones as eager code computes them, random ones keyed by the seed
    and their paths (block by block == whole), none cast by ``dtype=`` (as
    ``module.to`` leaves them), none reported by strict mode."""
    eager = _PlainAttrs()
    d = fastinit.deferred_init(_PlainAttrs)
    fastinit.materialize(d, seed=0)
    assert torch.equal(d.freqs_cis, eager.freqs_cis) and torch.equal(d.mask, eager.mask)
    assert d.noise.device.type == "cpu" and d.scratch.shape == (3,) and not d.scratch.is_meta
    assert d.shared is d.lin.weight
    whole = fastinit.deferred_init(_PlainBlocks)
    fastinit.materialize(whole, seed=1)
    blocks = fastinit.deferred_init(_PlainBlocks)
    for b in blocks.blocks:
        fastinit.materialize(b, seed=1)
    for a, b in zip(whole.blocks, blocks.blocks):
        assert torch.equal(a.noise, b.noise) and torch.equal(a.freqs_cis, b.freqs_cis)
    assert not torch.equal(whole.blocks[0].noise, whole.blocks[1].noise)
    half = fastinit.deferred_init(_PlainAttrs)
    fastinit.materialize(half, seed=0, dtype=torch.bfloat16)
    assert half.lin.weight.dtype == torch.bfloat16 and half.mask.dtype == torch.float32
    assert half.freqs_cis.dtype == torch.complex64


def _bert_like_init(m):  # (fastinit's calls: queued inside batched())
    if isinstance(m, nn.Linear):
        fastinit.normal_(m.weight, std=0.02)
        fastinit.zeros_(m.bias)


@pytest.mark.parametrize("compiled", ["script", "trace"])
def test_a_torchscript_module_run_inside_batched_reads_the_filled_weights(compiled):
    """TorchScript reads its tensors in C++, unseen by the recorder: calling a
    scripted or traced module runs the queue first, as a Python forward does."""
    x = torch.randn(2, 16)
    torch.manual_seed(0)
    eager = nn.Linear(16, 4)
    eager.apply(_bert_like_init)
    torch.manual_seed(0)
    m = nn.Linear(16, 4)
    with fastinit.batched():
        m.apply(_bert_like_init)
        s = torch.jit.script(m) if compiled == "script" else torch.jit.trace(nn.Sequential(m), torch.zeros(1, 16))
        out = s(x)
    assert torch.equal(out, eager(x))


def test_compiled_code_sparse_tensors_and_torch_func_run_inside_batched():
    """What eager code runs inside a block runs there too, with the queued values:
    a compiled model or function (traced reads run the queue first, outside the
    graph), sparse tensors and torch.func's transforms (tensors without storage)."""
    x = torch.randn(2, 16)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    eager.apply(_bert_like_init)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    with fastinit.batched():
        m.apply(_bert_like_init)
        out = torch.compile(m, backend="eager")(x)
        w = torch.empty(8)
        fastinit.normal_(w)  # queued while the rest runs
        sparse = torch.eye(3).to_sparse() * 2.0
        batched_out = torch.vmap(lambda r: r * 2)(torch.ones(2, 3))
        twice = torch.compile(lambda t: t * 2, backend="eager")(w)
    assert torch.equal(out, eager(x)) and torch.equal(twice, w * 2)
    assert torch.equal(sparse.to_dense(), torch.eye(3) * 2) and torch.equal(batched_out, torch.full((2, 3), 2.0))


def test_an_atomic_scheme_keeps_no_copy_of_what_its_fills_overwrite(monkeypatch):
    """apply_scheme queues its fills, then runs an orthogonal rule at once: only the
    tensor written at once is kept for undo, not every queued parameter (a model's
    worth of memory on a GPU)."""
    import importlib

    batched_mod = importlib.import_module("fastinit.deferred.batched")
    from fastinit.schemes import Orthogonal

    copied = []
    real = batched_mod.Batch.before_write

    def spy(self, t):
        if self.undo is not None and not t.is_meta:
            copied.append(t.numel())
        return real(self, t)

    monkeypatch.setattr(batched_mod.Batch, "before_write", spy)
    m = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    scheme = Scheme("x", [Rule(Orthogonal(), name="3.weight"), Rule(Normal(0.0, 0.02), name="weight"), Rule(0.0)])
    apply_scheme(m, scheme, seed=0)
    assert sum(copied) <= 64 * 64


def test_a_seed_given_to_batched_with_a_deferred_model_says_it_does_not_key_it():
    d = fastinit.deferred_init(_Stack)
    with pytest.warns(UserWarning, match="keyed by the seed materialize"):
        with fastinit.batched(seed=0, module=d):
            fastinit.normal_(d.head.weight)


def test_deferred_init_works_with_torch_nn_init_patched_to_fastinit(monkeypatch):
    """Replacing torch.nn.init's private helpers with fastinit's (as the README's
    drop-in list invites) keeps deferred init working; a foreign replacement is
    named as such, not blamed on the torch version."""
    from fastinit.deferred import hooks

    monkeypatch.setattr(hooks, "_codes", None)  # (checked against torch once, at first use)
    monkeypatch.setattr(torch.nn.init, "_no_grad_trunc_normal_", fastinit._no_grad_trunc_normal_)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(64, 64))
            nn.init.trunc_normal_(self.w, std=0.02, a=-0.04, b=0.04)

    m = fastinit.deferred_init(M)
    fastinit.materialize(m, seed=0)
    assert m.w.abs().max() <= 0.04 and 0.01 < m.w.std() < 0.02
    monkeypatch.setattr(torch.nn.init, "orthogonal_", lambda tensor, gain=1, generator=None: tensor)
    with pytest.raises(RuntimeError, match="orthogonal_ is not torch's"):
        fastinit.deferred_init(M)


class _Freqs(nn.Module):
    """A plain tensor attribute beside a parameter (``self.freqs_cis = ...``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)
        self.freqs = torch.zeros(16)


def _init_freqs(m):
    fastinit.normal_(m.freqs)
    fastinit.normal_(m.a.weight)


def test_batched_with_a_seed_keys_plain_tensor_attributes_as_materialize_does():
    torch.manual_seed(0)
    m = _Freqs()
    torch.manual_seed(1)
    with fastinit.batched(seed=5, module=m):
        _init_freqs(m)
    after_batched = torch.rand(1)
    d = fastinit.deferred_init(_Freqs)
    torch.manual_seed(1)
    fastinit.materialize(d, init_fn=_init_freqs, seed=5)
    assert torch.equal(torch.rand(1), after_batched)  # neither drew from torch's generator
    assert torch.equal(m.freqs, d.freqs) and torch.equal(m.a.weight, d.a.weight)


def test_materialize_keeps_a_real_plain_tensor_attribute_as_it_keeps_real_buffers():
    d = fastinit.deferred_init(_Freqs)
    d.freqs = torch.ones(4)
    d.register_buffer("real", torch.ones(4))
    fastinit.materialize(d, init_fn=lambda m: (fastinit.normal_(m.freqs), fastinit.normal_(m.real),
                                               fastinit.zeros_(m.freqs[:1]), fastinit.normal_(m.a.weight)))
    assert torch.equal(d.freqs, torch.ones(4)) and torch.equal(d.real, torch.ones(4))


@pytest.mark.parametrize("fn", [fastinit.normal_, fastinit.uniform_])
@pytest.mark.parametrize("size", [8, 20_000])
def test_a_zero_dim_tensor_argument_that_views_queued_memory_is_read_after_the_queue(fn, size):
    """``normal_(w, 0, s)`` with ``s = big[0]`` whose fill is queued: the std (the bound of
    ``uniform_(w, 0, s)``) is the value ``big[0]`` holds after its fill, as one by one."""
    def run(block):
        torch.manual_seed(0)
        big, w = torch.ones(20_000), torch.empty(size)
        with block():
            fastinit.uniform_(big, 1e-3, 2e-3)  # keyed, queued
            s = big[0]
            fn(w, 0.0, s)  # (s itself: an op on it, s * 2, is a read the queue sees)
        return w

    eager, inside = run(contextlib.nullcontext), run(fastinit.batched)
    assert torch.equal(eager, inside) and inside.abs().max() < 0.01


def test_torch_func_transforms_of_small_tensors_inside_batched_fill_as_one_by_one():
    from torch.func import vmap

    def call(x):
        fastinit.normal_(x)
        return x * 1

    for randomness in ("same", "different"):
        torch.manual_seed(0)
        eager = vmap(call, randomness=randomness)(torch.zeros(4, 5))
        torch.manual_seed(0)
        with fastinit.batched():
            inside = vmap(call, randomness=randomness)(torch.zeros(4, 5))
        assert torch.equal(eager, inside) and eager.std() > 0


class _KeepsFloat32(torch.nn.Module):
    """timm's rotary embeddings: frequency bands that model.to(dtype) leaves in float32
    (its _apply rebuilds them after the cast)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bands", self._bands(), persistent=False)
        self.proj = torch.nn.Linear(8, 8)

    @staticmethod
    def _bands(device=None):
        return (2.0 ** torch.linspace(0.0, 5.0, 16) * math.pi / 7).to(device=device)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.bands.dtype != torch.float32:
            self.register_buffer("bands", self._bands(self.bands.device), persistent=False)
        return module


class _WithOwnCasts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rope = _KeepsFloat32()
        self.lstm = torch.nn.LSTM(8, 8)  # (nn.RNNBase casts itself too: it re-flattens its weights)
        self.head = torch.nn.Linear(8, 4)
        self.head.weight = self.rope.proj.weight  # tied across the boundary of a module casting itself


def test_materialize_dtype_casts_as_model_to_does_where_a_module_casts_itself():
    built = fastinit.deferred_init(_WithOwnCasts)
    fastinit.materialize(built, device="cpu", seed=4)
    built = built.to(torch.bfloat16)
    direct = fastinit.deferred_init(_WithOwnCasts)
    fastinit.materialize(direct, device="cpu", seed=4, dtype=torch.bfloat16)
    assert direct.rope.bands.dtype == torch.float32 and torch.equal(direct.rope.bands, built.rope.bands)
    for (n, a), (_, b) in zip(built.state_dict().items(), direct.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    assert direct.head.weight is direct.rope.proj.weight and direct.head.weight.dtype == torch.bfloat16
    assert direct.lstm._flat_weights[0] is direct.lstm.weight_ih_l0
    out, _ = direct.lstm(torch.ones(3, 1, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


class _SharesAndKeeps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.own = _KeepsFloat32()
        self.plain = torch.nn.Linear(8, 8)
        self.plain.register_buffer("f", self.own.bands)  # a buffer another module holds too


def test_materialize_dtype_around_modules_casting_themselves_casts_shared_buffers_and_keeps_real_tensors():
    """As model.to(dtype): a buffer that a module casting itself shares with another is
    cast for that other one; a tensor real before materialize stays as it is (as
    everywhere else materialize runs)."""
    built = fastinit.deferred_init(_SharesAndKeeps)
    fastinit.materialize(built, device="cpu", seed=5)
    built = built.to(torch.bfloat16)
    direct = fastinit.deferred_init(_SharesAndKeeps)
    loaded = torch.nn.Parameter(torch.full((8, 8), 0.25))
    direct.own.proj.weight = loaded  # (loaded from a checkpoint before materialize)
    fastinit.materialize(direct, device="cpu", seed=5, dtype=torch.bfloat16)
    assert direct.plain.f.dtype == built.plain.f.dtype == torch.bfloat16 and torch.equal(direct.plain.f, built.plain.f)
    assert direct.own.bands.dtype == torch.float32 and torch.equal(direct.own.bands, built.own.bands)
    assert direct.own.proj.weight is loaded and loaded.dtype == torch.float32 and (loaded == 0.25).all()
    assert direct.own.proj.bias.dtype == torch.bfloat16


class _CastFails(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def _apply(self, fn, *args, **kwargs):
        raise MemoryError("out of memory while casting")


class _KeepsItsDtype(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.dtype = torch.float32

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.dtype = self.lin.weight.dtype
        return out


def test_a_failed_cast_of_a_module_casting_itself_leaves_the_model_as_it_was():
    def make():
        m = torch.nn.Module()
        m.rnn = torch.nn.LSTM(4, 4)
        m.keeps = _KeepsItsDtype()
        m.fails = _CastFails()
        return m

    model = fastinit.deferred_init(make)
    flat = model.rnn._flat_weights
    with pytest.raises(MemoryError):
        fastinit.materialize(model, device="cpu", seed=1, dtype=torch.bfloat16)
    assert all(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    assert model.rnn._flat_weights is flat and all(t.is_meta for t in flat)
    assert model.keeps.dtype == torch.float32
    model.fails.__class__ = torch.nn.Module  # (the retry casts)
    fastinit.materialize(model, device="cpu", seed=1, dtype=torch.bfloat16)
    assert model.keeps.dtype == torch.bfloat16 and model.rnn._flat_weights[0] is model.rnn.weight_ih_l0
    assert all(t.dtype == torch.bfloat16 for t in model.parameters())


class _MatmulBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        a = torch.arange(1, 33, dtype=torch.float32)[:, None] / 7.0
        self.register_buffer("g", a @ a.t())  # deterministic, and a matmul: what autocast lowers
        self.lin = nn.Linear(4, 4)


def test_materialize_inside_autocast_replays_what_the_constructor_computed():
    eager = _MatmulBuffer().g
    m = fastinit.deferred_init(_MatmulBuffer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fastinit.materialize(m, seed=0)
        assert torch.is_autocast_enabled("cpu")  # (left as it was)
    assert m.g.dtype == torch.float32 and torch.equal(m.g, eager)


def test_deferred_init_under_autocast_warns_that_it_does_not_apply():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="autocast"):
        fastinit.deferred_init(_MatmulBuffer)


def test_batched_with_a_seed_and_no_module_is_refused():
    w = torch.zeros(16, 16)
    with pytest.raises(ValueError, match="module="):
        with fastinit.batched(seed=0):
            fastinit.normal_(w)
    assert torch.equal(w, torch.zeros(16, 16))  # (nothing ran)
