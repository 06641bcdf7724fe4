"""Everyday model-code patterns under deferred_init / materialize / batched(),
each compared with the same code run eagerly (exact where eager is deterministic).

A wrong value without an error is the worst outcome here: each test is a pattern
real code uses (torchdistx's block-by-block materialization, HF's padding rows,
LSTM forget-gate slices, Swin's relative-position index, FSDP's param_init_fn).
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn

import fastinit
from fastinit import engines

transformers = pytest.importorskip("transformers")


def _state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------ submodules


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


def test_torch_is_unpatched_after_recording_and_untouched_in_other_threads():
    init = torch.nn.init
    fns = {n: getattr(init, n) for n in dir(init) if callable(getattr(init, n)) and not n.startswith("__")}
    codes = {n: getattr(f, "__code__", None) for n, f in fns.items()}
    new = torch.Tensor.__new__
    seen = {}

    def other_thread():
        x = torch.empty(1000)
        torch.nn.init.normal_(x)
        y = torch.Tensor(3, 2)
        seen["x"] = (x.is_meta, x.std().item())
        seen["y"] = y.device.type

    def build():
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
        return nn.Linear(4, 4)

    fastinit.deferred_init(build)
    assert seen["x"][0] is False and 0.9 < seen["x"][1] < 1.1  # torch's own, on real memory
    assert seen["y"] == "cpu"
    assert all(getattr(init, n) is f for n, f in fns.items())
    assert all(getattr(getattr(init, n), "__code__", None) is c for n, c in codes.items())
    assert torch.Tensor.__new__ is new and "__new__" not in torch.Tensor.__dict__


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
