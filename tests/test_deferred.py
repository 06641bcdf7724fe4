"""deferred_init → materialize on real third-party and torch model code."""

import contextlib
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastinit
from fastinit import engines
from stats_util import two_sample

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id must be.*")


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM, cfg


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel, cfg


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=300, max_position_embeddings=64,
                                  pad_token_id=5)
    return transformers.BertModel, cfg


def _vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8)
    return transformers.ViTModel, cfg


def _t5():  # relative attention bias, factor-scaled inits
    cfg = transformers.T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return transformers.T5Model, cfg


def _whisper():  # convolutions, sinusoidal position table written by _init_weights
    cfg = transformers.WhisperConfig(vocab_size=300, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=32,
                                     max_target_positions=32, num_mel_bins=16, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperModel, cfg


def _mamba():  # A_log from arange, dt bias by inverse softplus of random steps
    cfg = transformers.MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    return transformers.MambaModel, cfg


class FactoryInit(nn.Module):
    """Values made in __init__ by factory ops and arithmetic, plus orthogonal_."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(32) * 0.5)
        self.shift = nn.Parameter(torch.full((32,), -2.0))
        self.register_buffer("freq", 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)))
        self.register_buffer("steps", torch.arange(7))
        self.register_buffer("table", torch.tensor([1.5, 2.5, 3.5]))
        self.rnn_w = nn.Parameter(torch.empty(48, 32))
        nn.init.orthogonal_(self.rnn_w, gain=2.0)
        self.proj = nn.Linear(32, 32)
        with torch.no_grad():
            self.proj.weight.mul_(0.5)
            self.proj.weight[0].fill_(3.0)


class ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv1d(16, 8, 5)
        self.ln = nn.LayerNorm(8)


TORCH_MODELS = {
    "transformer": lambda: nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=64),
    "lstm": lambda: nn.LSTM(16, 32, num_layers=2),
    "mha": lambda: nn.MultiheadAttention(32, 4),
    "convstack": ConvStack,
    "factory": FactoryInit,
    # Module.half() in a constructor repoints each parameter (param.data = ...)
    "halved": lambda: nn.Sequential(nn.Linear(64, 48), nn.LayerNorm(48)).half(),
}
HF_MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "vit": _vit, "t5": _t5, "whisper": _whisper,
             "mamba": _mamba}


def _build(kind, name):
    if kind == "hf":
        cls, cfg = HF_MODELS[name]()
        return (lambda: cls(cfg)), (lambda: fastinit.deferred_init(cls, cfg))
    ctor = TORCH_MODELS[name]
    return ctor, (lambda: fastinit.deferred_init(ctor))


def _tensors(m):
    d = dict(m.named_parameters(remove_duplicate=False))
    d.update(dict(m.named_buffers(remove_duplicate=False)))
    return d


CASES = [("hf", n) for n in HF_MODELS] + [("torch", n) for n in TORCH_MODELS]


# With a GPU present the models are also materialized on it (the Triton engine).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,name", CASES, ids=[c[1] for c in CASES])
def test_materialized_model_is_distributed_like_the_eager_one(kind, name, device):
    eager_fn, deferred_fn = _build(kind, name)
    torch.manual_seed(0)
    eager = eager_fn()
    model = deferred_fn()
    assert all(t.is_meta for t in _tensors(model).values())
    report = fastinit.materialize(model, device=device, seed=1)
    ours, theirs = _tensors(model), _tensors(eager)
    assert ours.keys() == theirs.keys()
    for n, t in ours.items():
        assert t.device.type == device, n
        t = t.detach().cpu()
        e = theirs[n]
        assert not t.is_meta and t.shape == e.shape and t.dtype == e.dtype, n
        if not t.dtype.is_floating_point or e.numel() < 2 or e.std() == 0:
            assert torch.equal(t, e), f"{n}: {report.entries[n]}"
        elif name == "factory" and n == "rnn_w":  # orthogonal: compare the structure
            torch.testing.assert_close(t.T @ t, e.T @ e, atol=1e-4, rtol=0)
        elif n.endswith(("inv_freq", "freq")):
            torch.testing.assert_close(t, e)
        elif name == "factory" and n == "proj.weight":  # affine edit folded, then a row replayed
            assert (t[0] == 3.0).all() and (e[0] == 3.0).all()
            two_sample(t[1:].detach().numpy(), e[1:].detach().numpy(), label=n)
        else:
            two_sample(t.detach().numpy(), e.detach().numpy(), label=f"{name}:{n} ({report.entries[n]})")


def test_hf_specifics_ties_padding_rows_and_scaled_residuals():
    cls, cfg = _llama()
    m = fastinit.deferred_init(cls, cfg)
    fastinit.materialize(m, seed=3)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    cls, cfg = _bert()
    m = fastinit.deferred_init(cls, cfg)
    rep = fastinit.materialize(m, seed=3)
    assert (m.embeddings.word_embeddings.weight[cfg.pad_token_id] == 0).all()
    assert torch.equal(m.embeddings.position_ids.cpu(), torch.arange(64).expand(1, -1))
    assert "view" in rep.entries["embeddings.word_embeddings.weight"]
    cls, cfg = _gpt2()
    m = fastinit.deferred_init(cls, cfg)
    rep = fastinit.materialize(m, seed=3)
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert rep.entries["transformer.h.0.attn.c_proj.weight"] == repr(fastinit.Normal(0.0, want))


def test_gpt2_scaled_residual_std():
    cls, cfg = _gpt2()
    m = fastinit.deferred_init(cls, cfg)
    fastinit.materialize(m, seed=3)
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    got = torch.cat([b.attn.c_proj.weight.flatten() for b in m.transformer.h]).std().item()
    assert abs(got - want) < 0.05 * want


def test_no_double_init_and_one_engine_batch(monkeypatch):
    calls = []
    real_fill = engines.fill

    def spy(targets, progress=None):
        targets = list(targets)
        calls.append(len(targets))
        return real_fill(targets, progress)

    monkeypatch.setattr(engines, "fill", spy)
    cls, cfg = _llama()
    m = fastinit.deferred_init(cls, cfg)
    rep = fastinit.materialize(m, seed=0)
    # nn.Linear's kaiming init is dead (overwritten by _init_weights): every weight got Normal.
    assert all("Uniform" not in v for v in rep.entries.values())
    assert calls[0] == rep.fused and len(calls) == 1  # one fused batch, no replays through the engine


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_same_seed_same_model_different_seed_different(name):
    cls, cfg = HF_MODELS[name]()
    a, b, c = (fastinit.deferred_init(cls, cfg) for _ in range(3))
    fastinit.materialize(a, seed=7)
    fastinit.materialize(b, seed=7)
    fastinit.materialize(c, seed=8)
    # Which tensors are random: those two eager builds with other torch seeds disagree on.
    torch.manual_seed(1)
    e1 = _tensors(cls(cfg))
    torch.manual_seed(2)
    e2 = _tensors(cls(cfg))
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert ta.keys() == e1.keys()
    for n, x in ta.items():
        assert torch.equal(x, tb[n]), f"{n}: same seed, different values"
        if torch.equal(e1[n], e2[n]):  # computed (RoPE, sinusoids, ones, zeros): exact, seed-free
            assert torch.equal(x, tc[n]) and torch.equal(x.cpu(), e1[n]), n
        else:
            assert not torch.equal(x, tc[n]), f"{n}: different seeds, same values"


def test_values_do_not_depend_on_init_order_or_other_parameters():
    class A(nn.Module):
        def __init__(self, order, extra=False):
            super().__init__()
            self.first = nn.Linear(40, 30)
            self.second = nn.Linear(30, 20)
            if extra:
                self.third = nn.Linear(20, 10)
            for m in [self.first, self.second][::order]:
                nn.init.normal_(m.weight, std=0.1)

    m1 = fastinit.deferred_init(A, 1)
    m2 = fastinit.deferred_init(A, -1, extra=True)
    fastinit.materialize(m1, seed=5)
    fastinit.materialize(m2, seed=5)
    assert torch.equal(m1.first.weight, m2.first.weight)
    assert torch.equal(m1.second.weight, m2.second.weight)


def test_strict_names_uninitialized_tensors_before_allocating():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.ok = nn.Linear(4, 4)
            self.forgotten = nn.Parameter(torch.empty(3))
            self.register_buffer("also", torch.empty(2))

    m = fastinit.deferred_init(Bad)
    with pytest.raises(RuntimeError, match="forgotten.*also|also.*forgotten"):
        fastinit.materialize(m, seed=0)
    assert all(t.is_meta for t in _tensors(m).values())
    rep = fastinit.materialize(m, seed=0, strict=False)
    assert rep.entries["forgotten"] == "uninitialized" and not m.forgotten.is_meta


def test_bounds_the_target_dtype_cannot_hold_are_cast_as_eagerly():
    """uniform_(-4e4, 4e4) is fine in float32 but its span overflows float16 (torch raises
    for that call on a float16 tensor); materialize(dtype=float16) casts, as building in
    float32 then ``.half()`` does: built in float32, then rounded once (4e4 fits)."""

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(64, 64))
            nn.init.uniform_(self.w, -4e4, 4e4)

    with pytest.raises(RuntimeError):
        nn.init.uniform_(torch.empty(8, 8, dtype=torch.float16), -4e4, 4e4)
    m, ref = fastinit.deferred_init(Wide), fastinit.deferred_init(Wide)
    fastinit.materialize(m, dtype=torch.float16, seed=0)
    fastinit.materialize(ref, seed=0)
    assert m.w.dtype == torch.float16 and torch.equal(m.w, ref.w.half())
    assert m.w.abs().max() <= 4e4 and m.w.float().std() > 1e4


def test_a_failure_leaves_the_model_deferred(monkeypatch):
    cls, cfg = _llama()
    m = fastinit.deferred_init(cls, cfg)

    def boom(targets, progress=None):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engines, "fill", boom)
    with pytest.raises(torch.OutOfMemoryError):
        fastinit.materialize(m, seed=0)
    assert all(t.is_meta for t in _tensors(m).values())
    monkeypatch.undo()
    fastinit.materialize(m, seed=0)  # and it can be retried
    assert not any(t.is_meta for t in _tensors(m).values())


def test_meta_model_with_init_fn_and_default_reset_parameters():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(50, 40), nn.LayerNorm(40), nn.Linear(40, 3))
    rep = fastinit.materialize(m, seed=0)
    assert rep.entries["0.weight"].startswith("Uniform")
    assert (m[1].weight == 1).all() and m[0].weight.abs().max() <= 1 / math.sqrt(50)

    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 3))

    def init_fn(model):
        for layer in model:
            fastinit.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
            fastinit.zeros_(layer.bias)

    rep = fastinit.materialize(m, seed=0, init_fn=init_fn)
    assert rep.entries["1.weight"].startswith("TruncNormal") and (m[1].bias == 0).all()
    assert m[0].weight.abs().max() <= 0.04


def test_dtype_cast_and_report():
    cls, cfg = _llama()
    m = fastinit.deferred_init(cls, cfg)
    rep = fastinit.materialize(m, dtype=torch.bfloat16, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    unique = {id(t): t for t in _tensors(m).values()}.values()  # the tied weight once
    assert rep.fused > 0 and rep.bytes == sum(t.numel() * 2 for t in unique)
    assert "materialized" in str(rep)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_deferred_init_allocates_nothing():
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    cls, cfg = _llama()
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 4096, 14336, 128256
    before = rss()
    m = fastinit.deferred_init(cls, cfg)  # an 8B-wide model with 2 layers: 3.2 GB if allocated
    assert all(t.is_meta for t in _tensors(m).values())
    assert rss() - before < 200 << 20



def test_deferred_init_leaves_the_garbage_collector_as_it_was():
    import gc
    import weakref

    cls, cfg = _llama()
    was = gc.isenabled()
    try:
        gc.enable()
        gc.collect()  # (generation counts from zero: no collection of the middle one comes on its own)
        m = fastinit.deferred_init(cls, cfg)
        # the model's objects stay young: dropped at once, held by a reference cycle, they
        # go with a collection of the young generations, not only with a full one
        m.cycle = {"model": m}
        m.cycle["self"] = m.cycle
        gone = weakref.ref(m)
        del m
        gc.collect(1)
        assert gone() is None
        assert gc.isenabled() and gc.get_freeze_count() == 0
        gc.disable()
        fastinit.deferred_init(cls, cfg)
        assert not gc.isenabled()
        gc.enable()
        with pytest.raises(ZeroDivisionError):
            fastinit.deferred_init(lambda: 1 / 0)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


# ------------------------------------------------------------------ batched()


def test_batched_equals_one_by_one_in_one_engine_call(monkeypatch):
    def init_weights(mod):
        if isinstance(mod, nn.Linear):
            fastinit.normal_(mod.weight, std=0.02)
            fastinit.kaiming_uniform_(mod.weight)  # last overwrite wins
            fastinit.zeros_(mod.bias)

    # (weights above the size that takes torch's own op one by one: keyed, so queued)
    torch.manual_seed(4)
    one = nn.Sequential(nn.Linear(80, 70), nn.Linear(70, 60))
    torch.manual_seed(5)
    one.apply(init_weights)

    calls = []
    real_fill = engines.fill
    monkeypatch.setattr(engines, "fill", lambda ts, progress=None: (calls.append(len(list(ts))), real_fill(ts))[1])
    torch.manual_seed(4)
    two = nn.Sequential(nn.Linear(80, 70), nn.Linear(70, 60))
    torch.manual_seed(5)
    with fastinit.batched():
        two.apply(init_weights)
        assert calls == []  # nothing runs inside the block
    # the two weights' kaiming_uniform_ (their normal_, a float32 tensor of one chunk, ran at
    # its call: torch's own op on the default generator); the biases' zeros ran at their calls
    # as memsets (nothing was queued in their memory, and the CPU engine fuses no constants)
    assert calls == [2]
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [
    "zeros_(w); normal_(w[:2])",  # a constant written at its call, a partial fill queued after it
    "normal_(w); zeros_(w[0]); ones_(w[:, 1])",  # constants into queued memory: queued, in order
    "ones_(w[:1].expand(3, 4)); normal_(w[1:])",  # fill_ writes into an expanded view, as eagerly
    "normal_(w); ones_(w[:1].expand(3, 4))",  # ... queued too, whatever the engine
    "constant_(w, 3.0); w.data.mul_(2); normal_(w[2:], std=.5)",
])
@pytest.mark.parametrize("engine", ["cpu", "reference"])
def test_batched_constants_keep_their_place_among_writes(steps, engine):
    def run():
        w = torch.empty(4, 4)
        torch.manual_seed(3)
        exec(steps, {**{n: getattr(fastinit, n) for n in ("zeros_", "ones_", "constant_", "normal_")}, "w": w})
        return w

    with fastinit.use_engine(engine):
        eager = run()
        with fastinit.batched():
            w = run()
    assert torch.equal(w, eager)


def _outcome(fn):
    """``fn()``'s values, or the type and message of what it raised."""
    try:
        return fn()
    except Exception as e:  # (compared with eager's)
        return type(e), str(e)[:60]


@pytest.mark.parametrize("case", ["tensor value, expanded", "tensor value overflows float16", "row of expanded",
                                  "sparse csr", "nested", "nested scheme"])
def test_batched_edge_cases_equal_eager(case):
    def run():
        torch.manual_seed(0)
        if case == "tensor value, expanded":  # fill_(Tensor) refuses overlapping memory; fill_(number) not
            w = torch.zeros(1, 4)
            fastinit.normal_(w)
            fastinit.constant_(w.expand(3, 4), torch.tensor(2.0))
            return w
        if case == "tensor value overflows float16":  # converted as fill_(Tensor) converts it: inf
            w = torch.zeros(4, dtype=torch.float16)
            fastinit.constant_(w, torch.tensor(65520.0, dtype=torch.float64))
            return w
        if case == "row of expanded":
            w = torch.zeros(1, 6)
            fastinit.normal_(w)
            w.expand(3, 6)[0] = 1.5
            return w
        if case == "sparse csr":
            w = torch.eye(3).to_sparse_csr()
            fastinit.constant_(w, 6.0)
            return w.to_dense()
        w, b = torch.empty(4), torch.empty(4)
        fastinit.normal_(w)  # queued in the outer block
        fastinit.zeros_(b)
        if case == "nested":  # the inner block's writes come after the outer one's
            with fastinit.batched():
                fastinit.zeros_(w)
                fastinit.ones_(b[:2])
            return torch.cat([w, b])
        m = nn.Sequential(nn.Linear(4, 4))
        fastinit.normal_(m[0].weight, std=200.0)
        fastinit.apply_scheme(m, "xavier_uniform")  # a block of its own, inside the user's
        return torch.cat([w, m[0].weight.flatten()])

    eager = _outcome(run)
    with fastinit.batched():
        got = _outcome(run)
    if isinstance(eager, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, eager)
    else:
        assert got == eager


def test_batched_inside_a_failing_init_fn_is_undone():
    m = fastinit.deferred_init(nn.Linear, 4, 4)
    m.register_buffer("real", torch.ones(3))

    def init_fn(mod):
        with fastinit.batched():
            fastinit.zeros_(mod.real[:2])
            fastinit.normal_(mod.real)
        raise ValueError("boom")

    with pytest.raises(ValueError):
        fastinit.materialize(m, init_fn=init_fn, device="cpu")
    assert m.real.tolist() == [1.0, 1.0, 1.0] and m.weight.is_meta


def test_batched_keeps_partial_edits_after_their_whole_fill():
    w = torch.empty(10, 10)
    with fastinit.batched():
        fastinit.normal_(w)
        fastinit.zeros_(w[3])
    assert (w[3] == 0).all() and (w[4] != 0).all()


def test_hooks_are_removed_after_recording_even_on_error():
    code = torch.nn.init.trunc_normal_.__code__

    def broken():
        m = nn.Linear(3, 3)
        nn.init.trunc_normal_(m.weight)
        raise KeyError("constructor failed")

    with pytest.raises(KeyError):
        fastinit.deferred_init(broken)
    assert torch.nn.init.trunc_normal_.__code__ is code
    w = torch.nn.init.trunc_normal_(torch.empty(1000), std=0.5, a=-1.0, b=1.0)
    assert w.abs().max() <= 1.0 and w.std() > 0.3
    assert "__new__" not in torch.Tensor.__dict__  # the legacy constructor is torch's again
    assert torch.Tensor(2, 3).device.type == "cpu"


class _LegacyLayer(nn.Module):
    """Older modules allocate with the legacy constructor, then reset_parameters."""

    def __init__(self, n_in=300, n_out=200):
        super().__init__()
        self.weight = nn.Parameter(torch.Tensor(n_out, n_in))
        self.bias = nn.Parameter(torch.Tensor(torch.Size([n_out])))
        self.register_buffer("table", torch.Tensor([1.0, 2.0, 3.0]))  # data, not a size
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)


def test_legacy_tensor_constructor_is_deferred_and_keyed():
    m = fastinit.deferred_init(_LegacyLayer)
    assert m.weight.is_meta and m.bias.is_meta  # nothing ran on real memory
    rep = fastinit.materialize(m, seed=4)
    assert "Uniform" in rep.entries["weight"]
    again = fastinit.deferred_init(_LegacyLayer)
    fastinit.materialize(again, seed=4)
    assert torch.equal(m.weight, again.weight)
    assert torch.equal(m.bias.cpu(), torch.zeros(200))
    assert torch.equal(m.table.cpu(), torch.tensor([1.0, 2.0, 3.0]))
    bound = 1 / math.sqrt(300)
    assert m.weight.abs().max() < bound and abs(m.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.02


def test_torch_inits_that_skip_meta_tensors_are_recorded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.empty(30, 40))
            self.b = nn.Parameter(torch.empty(8, 4, 3))
            self.c = nn.Parameter(torch.empty(20, 10))
            self.d = nn.Parameter(torch.empty(50))
            nn.init.orthogonal_(self.a)
            nn.init.dirac_(self.b)
            nn.init.sparse_(self.c, sparsity=0.5)
            nn.init.trunc_normal_(self.d, mean=5.0, std=1.0, a=-1.0, b=1.0)

    with pytest.warns(UserWarning, match="more than 2 std"):
        m = fastinit.deferred_init(M)
    rep = fastinit.materialize(m, seed=0)
    torch.testing.assert_close((m.a @ m.a.T).cpu(), torch.eye(30), atol=1e-4, rtol=0)
    assert torch.equal(m.b.cpu(), torch.nn.init.dirac_(torch.empty(8, 4, 3)))
    assert ((m.c == 0).sum(0) == 10).all()
    assert rep.entries["d"].startswith("TruncNormal") and m.d.min() >= -1 and m.d.max() <= 1


def test_progress_reports_bytes_done(capsys):
    cls, cfg = _llama()
    m = fastinit.deferred_init(cls, cfg)
    rep = fastinit.materialize(m, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "materializing" in err and "100.0%" in err
    assert f"{rep.bytes / 2**30:.2f} GiB" in err


_BAD_INITS = [
    lambda m: nn.init.normal_(m.w, 0.0, -1.0),
    lambda m: nn.init.kaiming_normal_(m.w),  # 1-D: no fans
    lambda m: nn.init.xavier_normal_(m.w),
    lambda m: nn.init.kaiming_normal_(m.v, mode="fan_middle"),
    lambda m: nn.init.kaiming_normal_(m.v, nonlinearity="tanhh"),
    lambda m: m.v.data.normal_(0.0, -2.0),
    lambda m: m.v.data.uniform_(1.0, 0.0),
    lambda m: m.h.data.uniform_(0.0, 1e6),  # float16 cannot hold the bound
    # torch's orthogonal_/sparse_ return early on meta tensors: the recorded call is checked
    lambda m: nn.init.orthogonal_(m.v, generator=1),
    lambda m: nn.init.orthogonal_(m.v, gain="x"),
    lambda m: nn.init.sparse_(m.v, "x"),
    lambda m: nn.init.sparse_(m.v, 0.5, std=-1.0),
    lambda m: fastinit.orthogonal_(m.v, gain=1j),
]


@pytest.mark.parametrize("init", _BAD_INITS, ids=range(len(_BAD_INITS)))
def test_recording_raises_what_the_eager_constructor_raises(init):
    # Recording validates normal_/uniform_ without running them on meta tensors
    # (torch's meta path for normal_ is slow): the errors must stay torch's.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(5))
            self.v = nn.Parameter(torch.empty(4, 3))
            self.h = nn.Parameter(torch.empty(4, dtype=torch.float16))
            init(self)

    with pytest.raises(Exception) as eager:
        M()
    with pytest.raises(type(eager.value)) as deferred:
        fastinit.deferred_init(M)
    assert str(deferred.value) == str(eager.value)


class _RandomOps(nn.Module):
    """Random values made by plain torch ops, not init calls: factories on
    temporaries, *_like, torch.normal's two forms, bernoulli, in-place on a temporary."""

    def __init__(self, extra: bool = False):
        super().__init__()
        if extra:
            self.first = nn.Parameter(torch.randn(7))
        self.pos = nn.Parameter(torch.randn(1, 64, 32) * 0.02)
        self.like = nn.Parameter(torch.randn_like(torch.zeros(32, 16)) * 0.5)
        self.sized = nn.Parameter(torch.normal(0.0, 2.0, size=(4000,)))
        self.follows = nn.Parameter(torch.normal(torch.zeros(3000), 3.0))
        self.temp = nn.Parameter(torch.empty(3000).uniform_(-1.0, 1.0) * 3)
        self.register_buffer("mask", torch.bernoulli(torch.full((4000,), 0.3)))


def test_random_torch_ops_are_keyed_by_seed_and_name_too():
    def build(seed, extra=False):
        m = fastinit.deferred_init(_RandomOps, extra)
        assert all(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
        fastinit.materialize(m, seed=seed)
        return dict(list(m.named_parameters()) + list(m.named_buffers()))

    a, b, c, d = build(1), build(1), build(2), build(1, extra=True)
    for n, t in a.items():
        assert torch.equal(t, b[n]), f"{n}: same seed, different values"
        assert not torch.equal(t, c[n]), f"{n}: different seeds, same values"
        assert torch.equal(t, d[n]), f"{n}: another parameter changed its values"
    check = [("pos", 0.0, 0.02), ("like", 0.0, 0.5), ("sized", 0.0, 2.0), ("follows", 0.0, 3.0)]
    for n, mean, std in check:
        x = a[n].detach().flatten().double()
        assert abs(x.mean().item() - mean) < 5 * std / x.numel() ** 0.5, n
        assert abs(x.std().item() / std - 1) < 5 * (2.0 / x.numel()) ** 0.5, n
    assert a["temp"].min() >= -3.0 and a["temp"].max() < 3.0 and a["temp"].std() > 1.6
    assert abs(a["mask"].mean().item() - 0.3) < 5 * (0.21 / 4000) ** 0.5


def test_recording_survives_torch_dynamo_being_imported_during_it():
    # A fresh process: a meta division imports torch._dynamo mid-recording, whose
    # polyfills check torch.Tensor.__new__ (hooked while recording) on import. (Of
    # more than 2^16 elements: smaller float math is shaped on the CPU, not on meta.)
    import subprocess
    import sys

    code = (
        "import sys, torch, torch.nn as nn, fastinit\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "def build():\n"
        "    m = nn.Linear(4, 4)\n"
        "    m.register_buffer('f', 1.0 / (1e4 ** (torch.arange(0, 1 << 18, 2).float() / 8)))\n"
        "    m.extra = nn.Parameter(torch.Tensor(3, 3))\n"
        "    nn.init.ones_(m.extra)\n"
        "    return m\n"
        "m = fastinit.deferred_init(build)\n"
        "fastinit.materialize(m, seed=0)\n"
        "assert 'torch._dynamo' in sys.modules and torch.equal(m.extra.cpu(), torch.ones(3, 3))\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_a_built_module_passed_to_deferred_init_gets_a_clear_error():
    with pytest.raises(TypeError, match=r"deferred_init\(Linear, \.\.\.\)"):
        fastinit.deferred_init(nn.Linear(3, 3))


def test_lazy_modules_get_a_clear_error():
    with pytest.raises(ValueError, match=r"1\.weight, 1\.bias belong to lazy modules.*forward pass"):
        fastinit.deferred_init(lambda: nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(8)))
    with torch.device("meta"):
        m = nn.Sequential(nn.LazyLinear(8))
    with pytest.raises(ValueError, match="lazy modules"):
        fastinit.materialize(m, seed=0)
    assert torch.nn.parameter.is_lazy(m[0].weight)  # left as it was


class _Derived(nn.Module):
    """Tensors made from other tensors' values in the constructor: a MoCo/EMA key
    encoder copied from the query encoder, a parameter scaled from a random
    factory, a copy of a weight after an edit that folds into its fill."""

    def __init__(self):
        super().__init__()
        self.q = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
        self.k = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
        for pq, pk in zip(self.q.parameters(), self.k.parameters()):
            pk.data.copy_(pq.data)
            pk.requires_grad = False
        self.a = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(self.a.detach() * 2)
        self.lin = nn.Linear(8, 8)
        self.lin.weight.data.mul_(0.5)
        self.snapshot = nn.Parameter(self.lin.weight.detach().clone())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_tensors_read_from_other_tensors_see_their_final_values(dtype):
    # As in eager construction: a value read by another tensor's replay starts the
    # way that tensor's own plan does (same spec, same key, same folded edits).
    m = fastinit.deferred_init(_Derived)
    fastinit.materialize(m, seed=0, dtype=dtype)
    for pq, pk in zip(m.q.parameters(), m.k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad
    assert torch.equal(m.b, (m.a.float() * 2).to(m.b.dtype))
    assert torch.equal(m.snapshot, m.lin.weight)
    assert m.a.float().std() > 0.8  # still a random draw


def test_constructors_that_read_values_get_a_clear_error():
    # torch's orthogonal parametrization reads the random weight's values (inside an op,
    # .item()) while the module is built: a value no seed has drawn yet.
    with pytest.raises(RuntimeError, match=r"reads the value of a deferred tensor.*random draws"):
        fastinit.deferred_init(lambda: nn.utils.parametrizations.orthogonal(nn.Linear(8, 8)))
    # ... and the hooks it installed are gone
    assert "__new__" not in torch.Tensor.__dict__


class _Views(nn.Module):
    """Parameters and a buffer that are views of one storage, as in eager torch."""

    def __init__(self):
        super().__init__()
        base = torch.empty(40, 16)
        nn.init.normal_(base, std=0.5)
        base[:, 0] = 1.0  # an edit of a view of the storage
        self.a = nn.Parameter(base[:10])
        self.b = nn.Parameter(base[10:])
        self.register_buffer("whole", base)
        self.lin = nn.Linear(16, 4)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_views_of_one_storage_stay_views_with_consistent_values(dtype):
    eager = _Views()
    assert eager.a.untyped_storage().data_ptr() == eager.whole.untyped_storage().data_ptr()
    m = fastinit.deferred_init(_Views)
    rep = fastinit.materialize(m, seed=3, dtype=dtype)
    ptr = m.whole.untyped_storage().data_ptr()
    assert m.a.untyped_storage().data_ptr() == ptr == m.b.untyped_storage().data_ptr()
    assert torch.equal(m.whole[:10], m.a) and torch.equal(m.whole[10:], m.b)
    assert (m.whole[:, 0] == 1).all() and isinstance(m.a, nn.Parameter) and m.a.requires_grad
    assert m.whole.dtype == (dtype or torch.float32)
    assert abs(m.whole[:, 1:].float().std().item() / 0.5 - 1) < 0.1
    assert "shared with" in rep.entries["a"] and "Uniform" in rep.entries["lin.weight"]
    again = fastinit.deferred_init(_Views)
    fastinit.materialize(again, seed=3, dtype=dtype)
    assert torch.equal(again.whole, m.whole)  # same seed, same storage
    with torch.no_grad():
        m.a.add_(1.0)
    assert torch.equal(m.whole[:10], m.a)  # one storage, as in eager


def test_real_tensors_are_never_reinitialized():
    # A model with nothing deferred: materialize does nothing (and says so).
    m = nn.Linear(4, 4)
    w = m.weight.detach().clone()
    with pytest.warns(UserWarning, match="no meta tensors"):
        rep = fastinit.materialize(m, seed=0)
    assert torch.equal(m.weight, w) and rep.entries == {}
    # Child by child (timm's blocks hold Dropout and Identity): a module with no tensor
    # at all has nothing to say.
    d = fastinit.deferred_init(lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Identity(), nn.ReLU()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports = [fastinit.materialize(child, seed=0) for child in d]
    assert not d[0].weight.is_meta and [len(r.entries) for r in reports] == [2, 0, 0, 0]
    # A meta model with one part already real (loaded): the default init leaves it alone.
    with torch.device("meta"):
        part = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    part[0] = nn.Linear(4, 4)
    w = part[0].weight.detach().clone()
    rep = fastinit.materialize(part, seed=0)
    assert torch.equal(part[0].weight, w) and set(rep.entries) == {"1.weight", "1.bias"}
    assert not part[1].weight.is_meta


@pytest.mark.parametrize("expr", [
    "1.0 / (5e5 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))",  # RoPE's inverse frequencies
    "torch.arange(0.5, 3, 0.25) * torch.ones(1, dtype=torch.float16)",  # promotion, broadcasting
    "torch.ones(3, 1).half() + torch.ones(4)",
    "torch.ones(()) - 2",
    "torch.arange(10, 0, -3)",
    "torch.arange(4).float().exp().sqrt().neg().reciprocal()",
    "torch.pow(torch.full((2, 3), 2.0), torch.ones(3)) / torch.ones(2, 1, dtype=torch.float64)",
])
def test_small_float_math_is_shaped_and_valued_as_eagerly(expr):
    # small float math on meta is shaped by the same op on the CPU (torch's meta kernels for
    # it are slow): the recorded tensor has eager's shape, dtype and strides, and its value
    def build():
        m = nn.Module()
        m.register_buffer("b", eval(expr))
        return m

    eager = build().b
    m = fastinit.deferred_init(build)
    with torch.device("meta"):
        on_meta = build().b
    assert m.b.is_meta and m.b.shape == eager.shape == on_meta.shape and m.b.dtype == eager.dtype == on_meta.dtype
    assert m.b.stride() == eager.stride()
    fastinit.materialize(m, seed=0)
    assert torch.equal(m.b, eager)


def test_a_plain_block_inside_a_keyed_one_keys_fills_by_name_too():
    def init(m, inner):
        with inner():
            fastinit.normal_(m.weight, std=0.02)

    d = fastinit.deferred_init(nn.Linear, 16, 16)
    fastinit.materialize(d, seed=0, init_fn=lambda m: init(m, contextlib.nullcontext))
    torch.manual_seed(1)
    m = nn.Linear(16, 16)
    with fastinit.batched(seed=0, module=m):
        init(m, fastinit.batched)  # (a library helper batching its own calls)
    assert torch.equal(m.weight, d.weight)


def test_small_float_math_shaped_on_the_cpu_only_where_nothing_else_decides():
    from torch.overrides import TorchFunctionMode

    class Upcast(TorchFunctionMode):  # a user's mode: its ops are the model's
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out.double() if getattr(func, "__name__", "") == "mul" else out

    class MyT(torch.Tensor):
        pass

    def build():
        m = nn.Module()
        m.register_buffer("s", torch.mul(torch.arange(4, dtype=torch.float), 2.0))
        m.t = torch.ones(3).as_subclass(MyT) * 2  # (a subclass keeps its type)
        m.register_buffer("big", torch.ones(1 << 14, 1) * torch.ones(1, 1 << 14))  # 2^28 elements
        return m

    with Upcast():
        eager_s = build().s
        m = fastinit.deferred_init(build)
    assert m.s.dtype == eager_s.dtype == torch.float64 and type(m.t) is MyT and m.big.is_meta
    assert m.big.shape == (1 << 14, 1 << 14)


def test_math_on_tensors_made_in_inference_mode_while_recording():
    def build():  # (inference tensors have no version counter for the recorder to watch)
        m = nn.Module()
        with torch.inference_mode():
            x = torch.arange(6, dtype=torch.float).reshape(2, 3)
            m.register_buffer("y", torch.exp(x) * 2 + 1)
        return m

    m = fastinit.deferred_init(build)
    fastinit.materialize(m, seed=0)
    assert torch.equal(m.y, build().y)


@pytest.mark.parametrize("init", [
    lambda m: (fastinit.ones_(m.bias), fastinit.uniform_(m.bias[4:])),
    lambda m: (fastinit.zeros_(m.bias), fastinit.constant_(m.bias[:1], 3.0), fastinit.uniform_(m.bias[4:])),
    lambda m: (fastinit.zeros_(m.bias), fastinit.constant_(m.bias[:1].expand(4), 3.0), fastinit.uniform_(m.bias[4:])),
    lambda m: (fastinit.normal_(m.weight), fastinit.normal_(m.weight[2:], std=3.0), fastinit.zeros_(m.bias)),
])
def test_partial_fills_after_a_whole_one_are_keyed_alike_allocated_and_deferred(init):
    # a fill that is not a tensor's final one is keyed by its place after the final one,
    # which the constructor's own writes before it (on the deferred model) do not move
    m1 = nn.LayerNorm(8)
    with fastinit.batched(seed=5, module=m1):
        init(m1)
    m2 = fastinit.deferred_init(nn.LayerNorm, 8)
    fastinit.materialize(m2, seed=5, init_fn=init, device="cpu")
    assert torch.equal(m1.weight, m2.weight) and torch.equal(m1.bias, m2.bias)


@pytest.mark.parametrize("seed, error", [(2**64, ValueError), (-2**63 - 1, ValueError), (0.9999, TypeError),
                                         ("0", TypeError), (False, TypeError)])
def test_a_seed_that_would_stand_for_another_is_refused(seed, error):
    """``int(seed) & (2**64 - 1)`` would make each of these seed 0 (or another seed)
    without a word: refused by every function that takes a seed, before any work."""
    m = fastinit.deferred_init(nn.Linear, 3, 3)
    with pytest.raises(error, match="seed"):
        fastinit.materialize(m, seed=seed)
    with pytest.raises(error, match="seed"):
        with fastinit.batched(seed=seed, module=nn.Linear(3, 3)):
            pass
    with pytest.raises(error, match="seed"):
        fastinit.apply_scheme(nn.Linear(3, 3), "xavier_uniform", seed=seed)
    assert m.weight.is_meta
    fastinit.materialize(m, seed=np.uint64(2**64 - 1))  # numpy ints are ints


def test_a_non_module_gets_a_type_error():
    for f in (fastinit.materialize, fastinit.planned):
        with pytest.raises(TypeError, match="nn.Module"):
            f("x")
    with pytest.raises(TypeError, match="nn.Module"):
        with fastinit.batched(module="x"):
            pass


def test_the_report_counts_a_tied_tensor_once_and_lists_its_names():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

    report = fastinit.materialize(fastinit.deferred_init(Tied), seed=0)
    assert report.tensors == 3 and {"a.weight", "b.weight"} <= set(report.entries)
    assert str(report).startswith("materialized 3 tensors under 4 names")
