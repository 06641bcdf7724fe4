"""Model-level init schemes: exact formulas per parameter, distributions (KS),
allocated == deferred for a seed, one fused pass, unmatched parameters named, LSUV."""

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

import fastinit
from fastinit import Rule, Scheme, apply_scheme
from fastinit.schemes import SCHEMES, Call, get_scheme
from fastinit.specs import Constant, Normal, Uniform

P_MIN = 1e-4


class Net(nn.Module):
    """Conv, BatchNorm, Embedding with padding, Linear, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.emb = nn.Embedding(100, 32, padding_idx=1)
        self.fc1 = nn.Linear(32, 64)
        self.ln = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 16)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attention = nn.Module()
        self.attention.dense = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(d, 4 * d)
        self.mlp.dense_4h_to_h = nn.Linear(4 * d, d)


class Tiny(nn.Module):
    """A GPT-like stack in plain torch: n_layer and d_model are inferred (ModuleList, Embedding)."""

    def __init__(self, d=32, layers=3, vocab=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)


class RNNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16)
        self.gru = nn.GRU(16, 12)
        self.head = nn.Linear(12, 4)


class DCGen(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 3, 3, padding=1, bias=False)


def _fans(shape):
    rf = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * rf, shape[0] * rf


def _ks_pool(model, plans):
    """Every random parameter standardized by its spec, pooled: one KS per distribution family."""
    u, z = [], []
    for name, p in model.named_parameters():
        spec = plans[name].spec
        x = p.detach().double().flatten()
        if isinstance(spec, Uniform):
            assert x.min() >= spec.a and x.max() < spec.b, name  # the bounds, exactly
            u.append(((x - spec.a) / (spec.b - spec.a)).numpy())
        elif isinstance(spec, Normal) and spec.std > 0:
            if plans[name].padding_idx is not None:
                x = torch.cat([p.detach()[: plans[name].padding_idx], p.detach()[plans[name].padding_idx + 1:]])
                x = x.double().flatten()
            z.append(((x - spec.mean) / spec.std).numpy())
        elif isinstance(spec, Constant):
            if plans[name].padding_idx is None:
                assert torch.all(p == spec.value), name
    if u:
        assert stats.kstest(np.concatenate(u), "uniform").pvalue > P_MIN
    if z:
        assert stats.kstest(np.concatenate(z), "norm").pvalue > P_MIN


# ------------------------------------------------------------------ exact formulas, per parameter


def _expected_variance_scaling(model, gain, mode, dist):
    out = {}
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if type(owner).__name__.endswith("Norm") or "Norm" in type(owner).__name__:
            out[name] = Constant(1.0 if name.endswith("weight") else 0.0)
        elif p.dim() >= 2:
            fi, fo = _fans(p.shape)
            n = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]
            std = gain / math.sqrt(n)
            out[name] = Uniform(-math.sqrt(3) * std, math.sqrt(3) * std) if dist == "uniform" else Normal(0.0, std)
        else:
            out[name] = Constant(0.0)
    return out


@pytest.mark.parametrize("name, opts, gain, mode, dist", [
    ("xavier_uniform", {}, 1.0, "fan_avg", "uniform"),
    ("xavier_uniform", {"gain": 5 / 3}, 5 / 3, "fan_avg", "uniform"),
    ("xavier_normal", {}, 1.0, "fan_avg", "normal"),
    ("kaiming_uniform", {}, math.sqrt(2), "fan_in", "uniform"),
    ("kaiming_normal", {"mode": "fan_out", "nonlinearity": "relu"}, math.sqrt(2), "fan_out", "normal"),
    ("kaiming_normal", {"nonlinearity": "tanh"}, 5 / 3, "fan_in", "normal"),
    ("general_rule", {}, 1 / math.sqrt(3), "fan_in", "uniform"),
    ("general_normal", {}, 1.0, "fan_in", "normal"),
])
def test_variance_scaling_schemes_give_the_formula_per_parameter(name, opts, gain, mode, dist):
    model = Net()
    report = apply_scheme(model, name, seed=0, **opts)
    want = _expected_variance_scaling(model, gain, mode, dist)
    for pname, spec in want.items():
        got = report.plans[pname].spec
        if isinstance(spec, Constant):
            assert got == spec, pname
        else:
            assert type(got) is type(spec), pname
            fields = ("a", "b") if isinstance(spec, Uniform) else ("mean", "std")
            for f in fields:
                assert getattr(got, f) == pytest.approx(getattr(spec, f), rel=1e-12, abs=0), pname
    _ks_pool(model, report.plans)
    assert torch.all(model.emb.weight[1] == 0)  # the padding row stays zero, as torch keeps it


def test_general_rule_bounds_are_one_over_sqrt_fan_in_exactly():
    model = nn.Sequential(nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 3))
    report = apply_scheme(model, "general_rule", seed=1)
    for i, n in ((0, 50), (2, 20)):
        spec = report.plans[f"{i}.weight"].spec
        assert spec.b == pytest.approx(1 / math.sqrt(n), rel=1e-15) and spec.a == -spec.b
        w = model[i].weight
        assert w.abs().max() <= spec.b and w.abs().max() > 0.9 * spec.b
        assert torch.all(model[i].bias == 0)
    report = apply_scheme(model, "general_normal", seed=1)
    assert report.plans["0.weight"].spec == Normal(0.0, 1 / math.sqrt(50))


def test_xavier_uniform_dim_is_the_loop_it_replaces():
    model = Net()
    report = apply_scheme(model, "xavier_uniform_dim", seed=0)
    for name, p in model.named_parameters():
        spec = report.plans[name].spec
        if p.dim() > 1:
            fi, fo = _fans(p.shape)
            b = math.sqrt(6 / (fi + fo))
            assert spec == Uniform(-b, b) or spec.b == pytest.approx(b, rel=1e-15), name
        else:
            assert spec == Constant(0.0) and torch.all(p == 0), name  # LayerNorm's gain too, as the loop does
    _ks_pool(model, report.plans)


def test_torch_default_matches_torch_module_by_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 30)
            self.conv = nn.Conv1d(4, 6, 5, groups=2)
            self.convt = nn.ConvTranspose2d(6, 4, 3)
            self.bil = nn.Bilinear(5, 7, 3)
            self.emb = nn.Embedding(40, 8, padding_idx=0)
            self.lstm = nn.LSTM(8, 10)
            self.mha = nn.MultiheadAttention(16, 4, add_bias_kv=True)
            self.ln = nn.LayerNorm(16)
            self.prelu = nn.PReLU(3, init=0.1)

    m = M()
    report = apply_scheme(m, "torch_default", seed=0)
    plans = report.plans

    def u(b):
        return Uniform(-b, b)

    assert plans["fc.weight"].spec == u(1 / math.sqrt(20)) and plans["fc.bias"].spec == u(1 / math.sqrt(20))
    assert plans["conv.weight"].spec == u(1 / math.sqrt(2 * 5))  # fan_in per group: in/groups * k
    assert plans["convt.weight"].spec == u(1 / math.sqrt(4 * 9))  # torch's fans of the (in, out, k, k) weight
    assert plans["bil.weight"].spec == u(1 / math.sqrt(5)) and plans["bil.bias"].spec == u(1 / math.sqrt(5))
    assert plans["emb.weight"].spec == Normal(0.0, 1.0) and torch.all(m.emb.weight[0] == 0)
    for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert plans[f"lstm.{n}"].spec == u(1 / math.sqrt(10))
    xb = math.sqrt(6 / (16 + 48))
    assert plans["mha.in_proj_weight"].spec.b == pytest.approx(xb, rel=1e-15)
    assert plans["mha.in_proj_bias"].spec == Constant(0.0) and plans["mha.out_proj.bias"].spec == Constant(0.0)
    assert plans["mha.out_proj.weight"].spec == u(1 / math.sqrt(16))
    assert plans["mha.bias_k"].spec == Normal(0.0, math.sqrt(2 / (16 + 16)))
    assert plans["ln.weight"].spec == Constant(1.0)
    assert "reset_parameters" in report["prelu.weight"][1] and torch.all(m.prelu.weight == 0.1)
    _ks_pool(m, plans)
    # The same distributions as torch's own constructor (two-sample KS on the pooled Linear weights).
    torch.manual_seed(0)
    ref = torch.cat([nn.Linear(20, 30).weight.detach().flatten() for _ in range(20)])
    ours = []
    for s in range(20):
        lin = nn.Linear(20, 30)
        apply_scheme(lin, "torch_default", seed=s)
        ours.append(lin.weight.detach().flatten())
    assert stats.ks_2samp(ref.numpy(), torch.cat(ours).numpy()).pvalue > P_MIN


def test_dcgan():
    g = DCGen()
    report = apply_scheme(g, "dcgan", seed=0)
    assert report.plans["up.weight"].spec == Normal(0.0, 0.02)
    assert report.plans["out.weight"].spec == Normal(0.0, 0.02)
    assert report.plans["bn.weight"].spec == Normal(1.0, 0.02)
    assert report.plans["bn.bias"].spec == Constant(0.0)
    _ks_pool(g, report.plans)


def test_gpt2_scales_residual_projections_by_depth():
    model = Tiny(d=32, layers=3)
    report = apply_scheme(model, "gpt2", seed=0)
    assert report.plans["h.0.c_proj.weight"].spec == Normal(0.0, 0.02 / math.sqrt(2 * 3))  # n_layer inferred: 3
    assert report.plans["h.0.c_attn.weight"].spec == Normal(0.0, 0.02)
    assert report.plans["wte.weight"].spec == Normal(0.0, 0.02)
    assert report.plans["h.1.c_attn.bias"].spec == Constant(0.0)
    assert report.plans["h.2.ln_1.weight"].spec == Constant(1.0)
    _ks_pool(model, report.plans)
    report = apply_scheme(model, "gpt2", n_layer=12, std=0.01)
    assert report.plans["h.0.c_proj.weight"].spec == Normal(0.0, 0.01 / math.sqrt(24))


def test_gpt2_on_transformers_gpt2_with_conv1d():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    report = apply_scheme(model, "gpt2", seed=0)
    assert report.plans["transformer.h.1.attn.c_proj.weight"].spec == Normal(0.0, 0.02 / 2)
    assert report.plans["transformer.h.1.mlp.c_proj.weight"].spec == Normal(0.0, 0.02 / 2)
    assert report.plans["transformer.h.1.mlp.c_fc.weight"].spec == Normal(0.0, 0.02)
    # Conv1D stores (in, out): fans follow the layer, not the storage order.
    r = apply_scheme(model, "kaiming_uniform", seed=0)
    b = math.sqrt(2) * math.sqrt(3 / 32)  # fan_in of c_fc is 32 (n_embd), not 128
    assert r.plans["transformer.h.0.mlp.c_fc.weight"].spec.b == pytest.approx(b, rel=1e-15)


def test_neox_small_init_and_wang():
    model = Tiny(d=32, layers=4)
    report = apply_scheme(model, "neox", seed=0)
    small, wang = math.sqrt(2 / (5 * 32)), 2 / 4 / math.sqrt(32)
    assert report.plans["h.0.mlp.dense_h_to_4h.weight"].spec == Normal(0.0, small)
    assert report.plans["wte.weight"].spec == Normal(0.0, small)
    assert report.plans["h.3.attention.dense.weight"].spec == Normal(0.0, wang)
    assert report.plans["h.3.mlp.dense_4h_to_h.weight"].spec == Normal(0.0, wang)
    _ks_pool(model, report.plans)
    r = apply_scheme(model, "neox", d_model=64, n_layer=8)
    assert r.plans["h.0.attention.dense.weight"].spec == Normal(0.0, 2 / 8 / 8)


def test_fused_qkv_fans_per_block():
    model = Tiny(d=32, layers=1)
    report = apply_scheme(model, "fused_qkv", seed=0)
    per_block = math.sqrt(6 / (32 + 32))  # each of q, k, v: 32 -> 32
    whole = math.sqrt(6 / (32 + 96))
    assert report.plans["h.0.c_attn.weight"].spec.b == pytest.approx(per_block, rel=1e-15)
    _ks_pool(model, report.plans)
    assert apply_scheme(model, "xavier_uniform").plans["h.0.c_attn.weight"].spec.b == pytest.approx(whole)
    # Grouped-query sizes: one spec per block, each block within its own bounds.
    gqa = nn.Module()
    gqa.qkv = nn.Linear(32, 64)
    r = apply_scheme(gqa, "fused_qkv", qkv=(32, 16, 16), seed=0)
    w = gqa.qkv.weight.detach()
    bounds = [math.sqrt(6 / (32 + 32)), math.sqrt(6 / (32 + 16)), math.sqrt(6 / (32 + 16))]
    for blk, b in zip(w.split([32, 16, 16]), bounds):
        assert blk.abs().max() < b and blk.abs().max() > 0.9 * b
    assert "blocks(32:" in r["qkv.weight"][1]
    with pytest.raises(ValueError, match="does not add up"):
        apply_scheme(gqa, "fused_qkv", qkv=(32, 16))


def test_orthogonal_rnn_gates_and_forget_bias():
    torch.manual_seed(0)
    model = RNNNet()
    report = apply_scheme(model, "orthogonal_rnn", seed=0)
    hh = model.lstm.weight_hh_l0.detach().double()
    for gate in hh.split(16):
        assert torch.allclose(gate @ gate.t(), torch.eye(16, dtype=torch.float64), atol=1e-5)
    for gate in model.gru.weight_hh_l0.detach().double().split(12):
        assert torch.allclose(gate @ gate.t(), torch.eye(12, dtype=torch.float64), atol=1e-5)
    b = model.lstm.bias_ih_l0.detach()
    assert torch.all(b[16:32] == 1) and torch.all(b[:16] == 0) and torch.all(b[32:] == 0)
    assert torch.all(model.lstm.bias_hh_l0 == 0) and torch.all(model.gru.bias_ih_l0 == 0)
    _ks_pool(model, report.plans)  # weight_ih (per-gate fans) and the head
    ih = report.plans["lstm.weight_ih_l0"].spec
    assert ih.b == pytest.approx(math.sqrt(6 / (8 + 16)), rel=1e-15)  # per-gate fans: 8 -> 16
    assert model.lstm.weight_ih_l0.abs().max() < ih.b
    apply_scheme(model, "orthogonal_rnn", forget_bias=2.0, gain=2.0)
    assert torch.all(model.lstm.bias_ih_l0[16:32] == 2)
    for proj in (8, 6):  # an LSTM projection is one matrix, not four gates
        lstm = torch.nn.LSTM(8, 16, proj_size=proj)
        apply_scheme(lstm, "orthogonal_rnn", seed=0)
        q = lstm.weight_hr_l0.detach().double()
        assert torch.allclose(q @ q.t(), torch.eye(proj, dtype=torch.float64), atol=1e-5)
    g = model.lstm.weight_hh_l0.detach().double()[:16]
    assert torch.allclose(g @ g.t(), 4 * torch.eye(16, dtype=torch.float64), atol=1e-4)


# ------------------------------------------------------------------ allocated == deferred


_MODELS = {"dcgan": DCGen, "orthogonal_rnn": RNNNet, "gpt2": Tiny, "neox": Tiny, "fused_qkv": Tiny}


@pytest.mark.parametrize("name", [n for n in SCHEMES if n != "lsuv"])
def test_allocated_and_deferred_give_the_same_values_for_a_seed(name):
    cls = _MODELS.get(name, Net)
    torch.manual_seed(123)
    eager = cls()
    apply_scheme(eager, name, seed=7)
    deferred = fastinit.deferred_init(cls)
    report = apply_scheme(deferred, name, seed=7)
    assert report.deferred and all(p.is_meta for p in deferred.parameters())
    fastinit.materialize(deferred, seed=99)  # the scheme's seed keys what the scheme wrote
    for (n, a), (_, b) in zip(eager.named_parameters(), deferred.named_parameters()):
        assert torch.equal(a, b), n


def test_deferred_scheme_is_in_the_plan_and_fused_by_materialize():
    model = fastinit.deferred_init(Tiny)
    apply_scheme(model, "gpt2")
    plan = fastinit.planned(model)
    assert plan["h.0.c_proj.weight"].spec == Normal(0.0, 0.02 / math.sqrt(6))
    rep = fastinit.materialize(model, seed=3)
    assert rep.fused == len(list(model.parameters())) + len(list(model.buffers()))
    again = fastinit.deferred_init(Tiny)
    apply_scheme(again, "gpt2")
    fastinit.materialize(again, seed=3)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_a_seed_makes_it_reproducible_and_none_follows_torch_manual_seed():
    a, b = Net(), Net()
    apply_scheme(a, "xavier_normal", seed=5)
    apply_scheme(b, "xavier_normal", seed=5)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    torch.manual_seed(1)
    apply_scheme(a, "xavier_normal")
    torch.manual_seed(1)
    apply_scheme(b, "xavier_normal")
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    apply_scheme(b, "xavier_normal", seed=6)
    assert not torch.equal(a.fc1.weight, b.fc1.weight)


def test_allocated_model_is_one_fused_pass(monkeypatch):
    from fastinit import engines

    calls = []
    real = engines.fill
    monkeypatch.setattr(engines, "fill", lambda targets, **kw: (calls.append(len(targets)), real(targets, **kw))[1])
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)], nn.LayerNorm(16))
    apply_scheme(model, "kaiming_normal", seed=0)
    # the 6 weights and the 8 constants in one engine call (the constants are queued, so
    # that a failure drops them too; on the CPU the engine memsets them)
    assert calls == [14]


# ------------------------------------------------------------------ rules, errors


def test_unmatched_parameters_are_named_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as e:
        apply_scheme(model, "dcgan")
    msg = str(e.value)
    assert "2.weight" in msg and "2.bias" in msg and "0.weight" not in msg and "Linear" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="Mode fan_middle not supported"):
        apply_scheme(model, "kaiming_normal", mode="fan_middle")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    apply_scheme(model, get_scheme("dcgan").then(Rule("keep")))  # a catch-all: now fine
    assert torch.equal(before[2], model[2].weight)


def test_custom_rules_globs_calls_and_keep():
    model = Net()
    keep = model.fc2.weight.detach().clone()
    scheme = Scheme("mine", [
        Rule("keep", name="fc2.weight"),
        Rule(Call(fastinit.trunc_normal_, std=0.02, a=-0.04, b=0.04), module=nn.Linear, ndim=2),
        Rule(0.5, name="bias"),
        Rule(Normal(0.0, 0.1), module="*Norm*", name="weight"),
        Rule(fastinit.schemes.VarianceScaling(1.0, "fan_in", "uniform"), ndim=">1"),
        Rule(0.0),
    ])
    r = apply_scheme(model, scheme, seed=0)
    assert torch.equal(model.fc2.weight, keep) and r["fc2.weight"][1] == "keep"
    assert model.fc1.weight.abs().max() <= 0.04
    assert torch.all(model.fc1.bias == 0.5) and torch.all(model.bn.bias == 0.5)
    assert model.ln.weight.std() > 0.05
    assert "trunc_normal_(std=0.02" in r["fc1.weight"][1]
    with pytest.raises(ValueError, match="emb.weight: kaiming_normal_.*Mode nope not supported"):
        apply_scheme(model, Scheme("bad", [Rule(Call(fastinit.kaiming_normal_, mode="nope"), ndim=2),
                                           Rule(0.0)]))
    with pytest.raises(TypeError, match="unknown option"):
        apply_scheme(model, "gpt2", n_layers=3)
    with pytest.raises(ValueError, match="unknown scheme"):
        apply_scheme(model, "xavier")
    with pytest.raises(ValueError, match="ndim"):
        Rule(0.0, ndim="~2")
    with pytest.raises(TypeError):
        Rule([1, 2])


def test_a_rule_no_parameter_takes_is_warned_at_the_callers_line():
    """A typo in a rule's name glob, or a rule added behind a catch-all, leaves its
    parameters to another rule's init: a warning names the rule, at the caller's line."""
    model = Net()
    typo = Rule(Normal(0.0, 0.5), name="fc1.wieght")
    with pytest.warns(UserWarning, match=r"fc1\.wieght.*took no parameter of Net") as w:
        apply_scheme(model, Scheme("mine", [typo, Rule(0.0)]))
    assert all(x.filename == __file__ for x in w)
    behind = Rule(Normal(0.0, 0.01), name="fc2.weight")
    with pytest.warns(UserWarning, match=r"'gpt2'.*fc2\.weight.*took no parameter"):
        get_scheme("gpt2").then(behind).plan(model)
    with pytest.warns(UserWarning, match=r"'gpt2'.*residual.*took no parameter"):  # (the caller's glob)
        fastinit.schemes.gpt2(residual="*fc9.weight").then(Rule("keep")).plan(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built-in rules, catch-alls and optional rules are quiet
        for name in ("gpt2", "dcgan", "torch_default", "xavier_uniform"):
            get_scheme(name).then(Rule("keep")).plan(model)
        get_scheme("gpt2").before(behind).plan(model)  # tried first: it takes fc2.weight
        apply_scheme(model, Scheme("mine", [Rule(Normal(0.0, 0.5), name="fc1.wieght", optional=True), Rule(0.0)]))


def test_an_error_in_a_where_predicate_names_the_parameter_and_the_rule():
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    bad = Rule(0.5, where=lambda p: p.module.wieght is None, label="my where")
    with pytest.raises(AttributeError) as e:
        apply_scheme(model, Scheme("mine", [bad, Rule(0.0)]))
    assert "while matching conv.weight against rule my where" in "".join(getattr(e.value, "__notes__", []))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_report_names_the_rule_of_every_parameter():
    model = Tiny(layers=2)
    r = apply_scheme(model, "gpt2", seed=0)
    assert len(r) == len(list(model.parameters()))
    assert r["h.1.c_proj.weight"][0].startswith("residual")
    text = str(r)
    assert "h.1.c_proj.weight" in text and "scheme gpt2" in text


# ------------------------------------------------------------------ LSUV


def _layer_vars(model, x):
    out = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, o.var().item()))
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_lsuv_reaches_unit_variance_on_an_mlp_and_a_cnn():
    g = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    x = torch.rand(128, 20, generator=g) * 3
    r = apply_scheme(mlp, "lsuv", example_input=x, seed=0)
    v = _layer_vars(mlp, x)
    assert len(v) == 3 and all(abs(s - 1) < 0.1 for s in v.values()), v
    assert [row["layer"] for row in r.lsuv] == ["0", "2", "4"]
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    xc = torch.randn(32, 3, 16, 16, generator=g) * 0.3
    running = cnn[1].running_mean.clone()
    apply_scheme(cnn, "lsuv", example_input=xc, tol=0.05, seed=0)
    assert cnn.training  # its mode is restored
    v = _layer_vars(cnn.eval(), xc)
    assert len(v) == 3 and all(abs(s - 1) < 0.05 for s in v.values()), v
    assert torch.equal(cnn[1].running_mean, running)  # nothing but the weights changed


def test_lsuv_converges_on_a_tied_head_and_names_what_it_leaves_off_unit_variance():
    """An lm_head tied to the embedding scales its output twice (W /= sqrt(Var) swung
    between Var and 1/Var and stopped at Var 0.33 with no word); attention's out_proj,
    which nn.MultiheadAttention uses without calling its forward, is not rescaled."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.l1, self.head = nn.Embedding(50, 32), nn.Linear(32, 32), nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(torch.relu(self.l1(self.emb(t))))

    torch.manual_seed(0)
    lm, tokens = TiedLM(), torch.randint(0, 50, (8, 10))
    with pytest.warns(UserWarning, match=r"not within 0.1 of 1 once every layer is rescaled.*: l1 \(") as w:
        r = apply_scheme(lm, "lsuv", example_input=tokens, seed=0)
    assert all(x.filename == __file__ for x in w)
    assert lm.head.weight is lm.emb.weight and r.lsuv[1]["layer"] == "head" and r.lsuv[1]["iterations"] < 10
    with torch.no_grad():
        assert abs(lm(tokens).var().item() - 1) < 0.1
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1, enable_nested_tensor=False)
    with pytest.warns(UserWarning, match=r"not rescaled.*: layers\.0\.self_attn\.out_proj$"):
        r = apply_scheme(enc, "lsuv", example_input=torch.randn(8, 10, 32), seed=0)
    assert [row["layer"] for row in r.lsuv] == ["layers.0.linear1", "layers.0.linear2"]


def test_lsuv_needs_an_example_batch_and_an_allocated_model():
    with pytest.raises(ValueError, match="example"):
        apply_scheme(nn.Linear(3, 3), "lsuv")
    d = fastinit.deferred_init(nn.Linear, 3, 3)
    with pytest.raises(ValueError, match="materialize it first"):
        apply_scheme(d, "lsuv", example_input=torch.zeros(1, 3))
    zero_in = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="variance"):
        apply_scheme(zero_in, "lsuv", example_input=torch.zeros(4, 3))


def test_norm_layers_that_are_not_torchs_keep_their_own_init():
    class GemmaRMSNorm(nn.Module):  # scales by (1 + weight): its weight starts at zero
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(d))

    class NormedLinear(nn.Linear):  # not a norm layer, whatever its name says
        pass

    model = nn.Sequential(NormedLinear(8, 8), GemmaRMSNorm(8), nn.LayerNorm(8))
    with torch.no_grad():
        model[2].weight.fill_(3.0)
    r = apply_scheme(model, "xavier_uniform", seed=0)
    assert torch.all(model[1].weight == 0) and r["1.weight"][1] == "keep"
    assert torch.all(model[2].weight == 1)  # torch's LayerNorm: its gain is 1
    assert r.plans["0.weight"].spec.b == pytest.approx(math.sqrt(6 / 16))
    d = fastinit.deferred_init(lambda: nn.Sequential(NormedLinear(8, 8), GemmaRMSNorm(8)))
    apply_scheme(d, "gpt2", n_layer=1)
    fastinit.materialize(d, seed=0)
    assert torch.all(d[1].weight == 0)


def test_transformers_neox_and_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=100, max_position_embeddings=32)
    r = apply_scheme(transformers.GPTNeoXForCausalLM(cfg), "neox", seed=0)  # d and n_layer from the config
    wang, small = Normal(0.0, 2 / 3 / math.sqrt(64)), Normal(0.0, math.sqrt(2 / (5 * 64)))
    assert r.plans["gpt_neox.layers.2.attention.dense.weight"].spec == wang
    assert r.plans["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"].spec == wang
    assert r.plans["gpt_neox.layers.0.attention.query_key_value.weight"].spec == small
    assert r.plans["lm_head.weight"].spec == small
    lcfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    eager = transformers.LlamaForCausalLM(lcfg)
    r = apply_scheme(eager, "kaiming_normal", seed=0)
    assert r["model.norm.weight"][1] == "keep"  # LlamaRMSNorm is not torch's: its own ones stay
    deferred = fastinit.deferred_init(transformers.LlamaForCausalLM, lcfg)
    apply_scheme(deferred, "kaiming_normal", seed=0)
    fastinit.materialize(deferred, seed=1)
    for (n, a), (_, b) in zip(eager.named_parameters(), deferred.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("deferred", [False, True], ids=["allocated", "deferred"])
def test_a_reset_rule_leaves_the_parameters_other_rules_claimed(deferred):
    """``Rule(Reset())`` re-runs the module's reset_parameters, which re-draws every
    parameter of the module: those an earlier rule set (or kept) stay as that rule says."""
    from fastinit.schemes import Reset

    def build(first):
        torch.manual_seed(0)
        m = fastinit.deferred_init(nn.Linear, 8, 8) if deferred else nn.Linear(8, 8)
        b0 = None if deferred else m.bias.detach().clone()
        rep = apply_scheme(m, Scheme("s", [first, Rule(Reset())]), seed=0)
        if deferred:
            fastinit.materialize(m, seed=1)
        assert m.weight.abs().max() <= 1 / 8 ** 0.5 and m.weight.unique().numel() == 64  # the reset's law
        return m, b0, rep

    m, _, rep = build(Rule(0.0, name="bias"))
    assert (m.bias == 0).all(), rep["bias"]
    m, b0, rep = build(Rule("keep", name="bias"))
    if deferred:  # kept: what the model's own init records, keyed by the seed
        b0 = fastinit.deferred_init(nn.Linear, 8, 8)
        fastinit.materialize(b0, seed=1)
        b0 = b0.bias.detach()
    assert torch.equal(m.bias.detach(), b0), rep["bias"]


def test_variance_scaling_names_a_bad_mode_or_distribution():
    from fastinit.schemes import VarianceScaling

    for mode, dist in (("fanin", "normal"), ("fan_in", "truncated_normal"), ("fan_in", "gaussian")):
        with pytest.raises(ValueError, match="VarianceScaling: "):
            VarianceScaling(1.0, mode, dist)


def test_a_call_with_bad_arguments_raises_before_any_rule_writes():
    m = nn.Linear(8, 16)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="from=1 > to=0"):
        apply_scheme(m, Scheme("x", [Rule(1.0, ndim=1), Rule(Call(fastinit.uniform_, a=1, b=0))]))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kwargs", [dict(module=3), dict(module=nn.Linear(2, 2)), dict(name=3), dict(ndim=2.0),
                                    dict(ndim=True), dict(ndim=">=x"), dict(where=5)], ids=str)
def test_a_rule_with_a_bad_condition_is_an_error_when_made(kwargs):
    with pytest.raises((TypeError, ValueError), match="Rule: |ndim="):
        Rule(0.0, **kwargs)


@pytest.mark.parametrize("scheme,opts", [("gpt2", dict(n_layer=0)), ("gpt2", dict(n_layer=-1)),
                                         ("gpt2", dict(n_layer=2.5)), ("neox", dict(d_model=0)),
                                         ("xavier_uniform", dict(qkv=0))], ids=str)
def test_bad_scheme_options_are_named_before_anything_is_written(scheme, opts):
    m = nn.Sequential(nn.Linear(4, 12))
    w0 = m[0].weight.detach().clone()
    with pytest.raises(ValueError, match=f"scheme '{scheme}': "):
        apply_scheme(m, scheme, **opts)
    assert torch.equal(m[0].weight, w0)


def test_a_failing_scheme_leaves_the_model_unchanged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    before = [p.detach().clone() for p in m.parameters()]
    for x in (torch.zeros(16, 32), torch.randn(16, 31)):  # LSUV: a constant batch, a wrong-shaped one
        with pytest.raises((ValueError, RuntimeError)):
            fastinit.apply_scheme(m, "lsuv", example_input=x)
        assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


class _HalfTail(nn.Module):
    """A float32 layer, then a float16 one: a constant too big for float16 fails late."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4).half()
        self.c = nn.Linear(4, 4)
        self.c.reset_parameters = self._broken_reset  # (a module's own reset that writes, then raises)

    def _broken_reset(self):
        nn.init.zeros_(self.c.weight)
        raise ValueError("reset failed")


def _failures():
    from fastinit.schemes import Orthogonal, Reset

    catch_rest = Rule(0.5)
    return {
        "overflow": (Scheme("big", [Rule(1e6, name="weight"), catch_rest]), RuntimeError),
        "bad orthogonal": (Scheme("orth", [Rule(0.0, name="bias"), Rule(Orthogonal(blocks=-2))]), ValueError),
        "reset raises": (Scheme("reset", [Rule(0.25, name="bias"), Rule(Reset(), name="c.weight"),
                                          Rule(Normal(0, 1))]), ValueError),
        "interrupt": (Scheme("int", [Rule(0.0, name="bias"), Rule(Normal(0, 1))]), KeyboardInterrupt),
    }


@pytest.mark.parametrize("seed", [0, None])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("failure", ["overflow", "bad orthogonal", "reset raises", "interrupt"])
def test_a_scheme_failing_part_way_changes_nothing(failure, deferred, seed, monkeypatch):
    """Whatever fails after the first rules ran (a value float16 cannot hold, a bad
    rule, a module's own reset, Ctrl-C): the parameters are as they were, the error
    names the parameter, and a deferred model's records too (its materialize equals
    a clean one's). Without a seed, an allocated model's small tensors are written at
    once by torch's own ops (keyed fills are queued): those are put back too."""
    from fastinit import schemes

    scheme, error = _failures()[failure]
    if failure == "interrupt":
        real, n = schemes._apply_action, []

        def interrupted(*a, **k):
            n.append(1)
            if len(n) == 4:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(schemes, "_apply_action", interrupted)
    m = fastinit.deferred_init(_HalfTail) if deferred else _HalfTail()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    with pytest.raises(error) as e:
        apply_scheme(m, scheme, seed=seed)
    if failure in ("overflow", "reset raises"):
        assert "apply_scheme: while initializing" in "".join(getattr(e.value, "__notes__", [])) or \
            not hasattr(e.value, "add_note")
    if deferred:
        fastinit.materialize(m, seed=3)
        clean = fastinit.deferred_init(_HalfTail)
        fastinit.materialize(clean, seed=3)
        after, before = m.state_dict(), clean.state_dict()
    else:
        after = m.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_a_tied_embeddings_padding_row_is_zero_whichever_name_comes_first():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 50, bias=False)  # named first
            self.emb = nn.Embedding(50, 16, padding_idx=3)
            self.head.weight = self.emb.weight

    for name in ("gpt2", "xavier_uniform"):
        m = M()
        fastinit.apply_scheme(m, name, seed=0)
        assert not m.emb.weight[3].any() and m.emb.weight[4].abs().max() > 0


def test_a_seeded_scheme_given_block_by_block_keys_blocks_by_their_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

    blocks = fastinit.deferred_init(lambda: nn.Sequential(Block(), Block()))
    whole = fastinit.deferred_init(lambda: nn.Sequential(Block(), Block()))
    for blk in blocks:
        fastinit.apply_scheme(blk, "xavier_uniform", seed=0)
    fastinit.apply_scheme(whole, "xavier_uniform", seed=0)
    fastinit.materialize(blocks, seed=1)
    fastinit.materialize(whole, seed=1)
    assert not torch.equal(blocks[0].lin.weight, blocks[1].lin.weight)
    for i in range(2):
        assert torch.equal(blocks[i].lin.weight, whole[i].lin.weight)


def test_planned_and_the_deferred_audit_say_what_the_values_will_be():
    lstm = fastinit.deferred_init(nn.LSTM, 8, 8)
    fastinit.apply_scheme(lstm, "orthogonal_rnn")
    assert fastinit.planned(lstm)["bias_ih_l0"].spec is None  # gates filled apart: no single law

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 8)
            nn.init.constant_(self.a.bias, float("nan"))
            nn.init.uniform_(self.b.weight, 0.0, 1.0)
            nn.init.normal_(self.c.weight, mean=float("inf"))

    flags = {(f.kind, f.where) for f in fastinit.audit(fastinit.deferred_init(Net)).flags}
    eager = {(f.kind, f.where) for f in fastinit.audit(Net()).flags}
    for want in [("nonfinite", "a.bias"), ("offset", "b.weight"), ("nonfinite", "c.weight")]:
        assert want in flags and want in eager


def test_a_seeded_scheme_on_nested_deferred_blocks_keys_them_by_their_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(fastinit.deferred_init(Block) for _ in range(2))

    blocks, whole = fastinit.deferred_init(Model), fastinit.deferred_init(Model)
    for blk in blocks.layers:
        fastinit.apply_scheme(blk, "xavier_uniform", seed=0)
    fastinit.apply_scheme(whole, "xavier_uniform", seed=0)
    fastinit.materialize(blocks, seed=1)
    fastinit.materialize(whole, seed=1)
    assert not torch.equal(blocks.layers[0].lin.weight, blocks.layers[1].lin.weight)
    assert all(torch.equal(a, b) for a, b in zip(blocks.state_dict().values(), whole.state_dict().values()))


def test_a_bad_option_names_the_parameter_and_rule():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RuntimeError) as e:
        apply_scheme(m, "xavier_uniform", gain=float("nan"))
    if hasattr(e.value, "add_note"):  # (notes: Python >= 3.11)
        assert "while initializing 0.weight by rule" in "".join(e.value.__notes__)
    with pytest.raises(ValueError, match="tol must be a number"):
        apply_scheme(m, "lsuv", example_input=torch.randn(2, 4), tol="x")


@pytest.mark.parametrize("name", ["xavier_uniform", "kaiming_normal", "gpt2", "general_rule", "torch_default"])
def test_norm_layers_of_any_shape_get_gain_one_and_bias_zero(name):
    # LayerNorm((8, 16)) holds an 8x16 matrix of gains: a norm layer's, not a weight matrix
    m = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm((8, 16)), nn.RMSNorm((8, 16)), nn.GroupNorm(2, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-3, 3)
    apply_scheme(m, name, seed=0, **({"n_layer": 1} if name == "gpt2" else {}))
    for norm in m[1:]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        if getattr(norm, "bias", None) is not None:
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert fastinit.audit(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm((8, 16)))).ok  # torch's default: fine


def test_torch_default_of_nn_transformer_is_its_xavier_reset():
    # nn.Transformer's _reset_parameters runs xavier_uniform_ on every matrix after building its
    # layers: linear1 (256 x 64) is U(+-sqrt(6/320)) = +-0.137 there, not Linear's +-1/8
    def build():
        return nn.Transformer(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=256)

    m = build()
    report = apply_scheme(m, "torch_default", seed=0)
    bound = math.sqrt(6 / 320)
    for name in ("encoder.layers.0.linear1.weight", "decoder.layers.0.linear2.weight"):
        w = dict(m.named_parameters())[name]
        assert report[name][0] == "nn.Transformer: xavier_uniform"
        assert 0.125 < w.abs().max() < bound and stats.kstest(w.detach().flatten().numpy(), "uniform",
                                                              args=(-bound, 2 * bound)).pvalue > P_MIN
    assert torch.equal(m.encoder.layers[0].norm1.weight, torch.ones(64))
    lin = nn.Sequential(nn.Linear(256, 64))  # outside a Transformer: Linear's own default
    apply_scheme(lin, "torch_default", seed=0)
    assert lin[0].weight.abs().max() <= 1 / 16


def test_a_seeded_call_of_a_function_without_a_generator_is_refused_and_changes_nothing():
    def my_init(t, std=0.02):  # draws from torch's global generator: a seed cannot key it
        return fastinit.normal_(t, std=std)

    def my_keyed_init(t, std=0.02, generator=None):
        return fastinit.normal_(t, std=std, generator=generator)

    for deferred in (False, True):
        m = fastinit.deferred_init(nn.Linear, 64, 64) if deferred else nn.Linear(64, 64)
        before = None if deferred else m.weight.detach().clone()
        with pytest.raises(ValueError, match="my_init.*generator="):
            apply_scheme(m, Scheme("mine", [Rule(Call(my_init), ndim=2), Rule(0.0)]), seed=0)
        if before is not None:
            assert torch.equal(m.weight, before)
    apply_scheme(nn.Linear(4, 4), Scheme("mine", [Rule(Call(my_init), ndim=2), Rule(0.0)]))  # no seed: as asked
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # (other draws of the program do not matter)
        m = nn.Linear(64, 64)
        apply_scheme(m, Scheme("mine", [Rule(Call(my_keyed_init), ndim=2), Rule(Call(fastinit.zeros_))]), seed=0)
        runs.append(m.weight.detach().clone())
        assert torch.equal(m.bias, torch.zeros(64))  # zeros_ draws nothing: no key needed
    assert torch.equal(runs[0], runs[1])


def test_a_seeded_reset_rule_leaves_the_global_generator_as_it_was():
    m = nn.Sequential(nn.Bilinear(4, 4, 2))
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    apply_scheme(m, Scheme("r", [Rule(fastinit.schemes.Reset())]), seed=0)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA generators exist only with CUDA")
def test_a_seeded_reset_rule_on_cpu_leaves_the_cuda_generators_as_they_were():
    torch.cuda.manual_seed_all(7)
    states = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    apply_scheme(nn.Sequential(nn.Bilinear(4, 4, 2)), Scheme("r", [Rule(fastinit.schemes.Reset())]), seed=0)
    assert all(torch.equal(s, torch.cuda.get_rng_state(i)) for i, s in enumerate(states))


@pytest.mark.parametrize("style", ["parametrizations", "hook"])
def test_weight_norm_gain_is_the_norm_of_its_initialized_direction(style):
    # weight_norm keeps w = g v / |v| with g of shape (out, 1): a scheme initializes the
    # direction v as the weight it stands for, and g is its norm (the effective weight is v)
    from torch.nn.utils import parametrizations, weight_norm

    wn = parametrizations.weight_norm if style == "parametrizations" else weight_norm

    def build():
        return nn.Sequential(wn(nn.Linear(256, 256)), nn.ReLU(), wn(nn.Conv1d(16, 32, 3), dim=None), nn.Linear(256, 4))

    with pytest.warns() if style == "hook" else contextlib.nullcontext():  # (torch's deprecation warning)
        alloc, deferred = build(), fastinit.deferred_init(build)
    assert fastinit.audit(alloc).ok  # torch's own weight_norm init: nothing to flag
    report = apply_scheme(alloc, "xavier_uniform", seed=0)
    apply_scheme(deferred, "xavier_uniform", seed=0)
    fastinit.materialize(deferred, seed=0)
    for a, b in zip(alloc.parameters(), deferred.parameters()):
        assert torch.equal(a, b)
    if style == "parametrizations":
        g, v = alloc[0].parametrizations.weight.original0, alloc[0].parametrizations.weight.original1
        assert report["0.parametrizations.weight.original0"][0].startswith("weight_norm gain")
        effective = alloc[0].weight
    else:
        g, v = alloc[0].weight_g, alloc[0].weight_v
        effective = torch._weight_norm(v, g, 0)
    assert torch.allclose(g, v.norm(dim=1, keepdim=True)) and torch.allclose(effective, v, atol=1e-6)
    bound = math.sqrt(6 / 512)
    assert stats.kstest(effective.detach().flatten().numpy(), "uniform", args=(-bound, 2 * bound)).pvalue > P_MIN


def test_a_weight_norm_gain_is_kept_with_its_direction():
    from torch.nn.utils.parametrizations import weight_norm

    m = nn.Sequential(weight_norm(nn.Linear(16, 16)))
    with torch.no_grad():
        m[0].parametrizations.weight.original0.mul_(3)  # a gain of the user's own
    plist = m[0].parametrizations.weight
    before = [p.detach().clone() for p in plist.parameters()]
    report = apply_scheme(m, Scheme("k", [Rule("keep", module="ParametrizationList"), Rule(0.0)]))
    assert all(torch.equal(a, b) for a, b in zip(before, plist.parameters()))
    assert report["0.parametrizations.weight.original0"][1] == "keep"


def test_torch_default_of_a_transformer_subclass_leaves_what_it_adds_to_their_own_defaults():
    class TransformerModel(nn.Transformer):  # pytorch/examples' word_language_model pattern
        def __init__(self):
            super().__init__(d_model=32, nhead=2, dim_feedforward=64, num_encoder_layers=1, num_decoder_layers=1)
            self.emb = nn.Embedding(1000, 32)
            self.head = nn.Linear(32, 1000)

    m = TransformerModel()
    report = apply_scheme(m, "torch_default", seed=0)
    assert report["emb.weight"][0] == "embedding N(0, 1)" and 0.9 < m.emb.weight.std() < 1.1
    assert report["head.weight"][0] == "U(±1/√fan_in)" and m.head.weight.abs().max() <= 1 / math.sqrt(32)
    assert report["encoder.layers.0.linear1.weight"][0] == "nn.Transformer: xavier_uniform"


def test_weight_norm_under_another_parametrization_is_still_a_gain_and_a_direction():
    import torch.nn.utils.parametrize as parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    lin = weight_norm(nn.Linear(16, 16))
    parametrize.register_parametrization(lin, "weight", Twice())
    apply_scheme(nn.Sequential(lin), "xavier_uniform", seed=0)
    p = lin.parametrizations.weight
    assert torch.allclose(p.original0, p.original1.norm(dim=1, keepdim=True))
    assert torch.allclose(lin.weight, 2 * p.original1, atol=1e-6)


def test_a_seeded_call_of_torchs_own_random_method_is_keyed():
    runs = []
    for other in range(2):
        torch.manual_seed(other)  # (other draws of the program do not matter)
        m = nn.Linear(64, 64)
        apply_scheme(m, Scheme("t", [Rule(Call(torch.Tensor.normal_, 0.0, 0.02), ndim=2), Rule(0.0)]), seed=0)
        runs.append(m.weight.detach().clone())
    assert torch.equal(runs[0], runs[1]) and 0.015 < runs[0].std() < 0.025
