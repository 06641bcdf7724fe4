"""The init audit: flags (symmetry, NaN, uninitialized memory, band, exploding/vanishing
signal), known-scheme matches, deferred plans, JSON and PNG output."""

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

import fastinit
from fastinit import Rule, Scheme, apply_scheme
from fastinit.schemes import Call


def mlp(depth, width, act, d_in=64, d_out=10):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def batch(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_kaiming_relu_mlp_passes():
    model = mlp(8, 64, nn.ReLU)
    apply_scheme(model, "kaiming_normal", nonlinearity="relu", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    a = fastinit.audit(model, batch(256, 64))
    assert a.ok, a.flags
    assert a.params[0].matches[0] == "kaiming_normal (relu, fan_in)"
    assert a.params[0].std_sqrt_fan_in == pytest.approx(math.sqrt(2), rel=0.05)
    assert len(a.layers) == 9 and all(l.act_std > 0 and l.grad_std > 0 for l in a.layers)
    # nothing in the model changed: values, .grad, mode
    assert all(torch.equal(x, p) for x, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_zeros_init_mlp_is_flagged_for_symmetry():
    model = mlp(3, 32, nn.ReLU)
    apply_scheme(model, Scheme("zeros", [Rule(0.0)]))
    a = fastinit.audit(model, batch(16, 64))
    sym = {f.where for f in a.flagged("symmetry")}
    # every hidden layer's units are alike and feed a constant matrix; the head's 10 outputs feed
    # nothing here (the targets tell them apart)
    assert sym == {"0.weight", "2.weight", "4.weight"}
    assert a.flagged("vanishing") and not a.ok
    assert a.params[0].matches == ["zeros"]
    # ones: every unit identical too; a matrix with identical rows, not constant, as well
    apply_scheme(model, Scheme("ones", [Rule(1.0)]))
    assert {f.where for f in fastinit.audit(model).flagged("symmetry")} == sym
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(64.0).expand(32, 64))
    assert "0.weight" in {f.where for f in fastinit.audit(model).flagged("symmetry")}


def test_weights_drawn_around_a_nonzero_centre_are_flagged():
    model = mlp(3, 32, nn.ReLU)
    apply_scheme(model, Scheme("u01", [Rule(Call(fastinit.uniform_), ndim=2), Rule(0.0)]))  # the classic U(0, 1) row
    assert {f.where for f in fastinit.audit(model).flagged("offset")} == {"0.weight", "2.weight", "4.weight", "6.weight"}
    apply_scheme(model, "kaiming_uniform")
    assert not fastinit.audit(model).flagged("offset")


def test_nan_and_uninitialized_memory_are_flagged():
    model = mlp(2, 16, nn.ReLU)
    with torch.no_grad():
        model[0].weight[3, 4] = float("nan")
        model[2].weight[0, 0] = 1e-41  # subnormal in float32
        model[4].weight[1, 1] = 3e30
    a = fastinit.audit(model, batch(8, 64))
    assert [f.where for f in a.flags if f.kind == "nonfinite"][0] == "0.weight"
    assert {f.where for f in a.flagged("uninitialized")} == {"2.weight", "4.weight"}
    assert fastinit.audit(mlp(2, 16, nn.ReLU)).ok  # torch's default: nothing to flag


def test_deep_tanh_with_unit_normal_weights_explodes():
    model = mlp(50, 64, nn.Tanh)
    apply_scheme(model, Scheme("N(0,1)", [Rule(fastinit.Normal(0.0, 1.0), ndim=2), Rule(0.0)]), seed=0)
    a = fastinit.audit(model, batch(128, 64))
    assert a.flagged("exploding"), a.flags
    assert "gradient" in a.flagged("exploding")[0].message
    # Every hidden weight: std 1 against a band of [0.072, 0.177] (x4); the 64 -> 10 head's band
    # reaches sqrt(2/10) x4 = 1.8 (He with fan_out), so it is not flagged.
    assert {f.where for f in a.flagged("band")} == {f"{i}.weight" for i in range(0, 100, 2)}


def test_scheme_expectation_and_matches():
    model = mlp(2, 32, nn.ReLU)
    apply_scheme(model, "xavier_uniform", seed=0)
    assert fastinit.audit(model, scheme="xavier_uniform").ok
    a = fastinit.audit(model, scheme="kaiming_normal")
    # The 32 -> 10 head: xavier's std is 13% below kaiming's, within the sampling error of 320 values.
    assert {f.where for f in a.flagged("scheme")} == {"0.weight", "2.weight"}
    assert a.params[0].expected_std == pytest.approx(math.sqrt(2 / 64))
    assert fastinit.audit(model).params[0].matches[0] == "xavier_uniform"
    lin = nn.Linear(64, 32)
    fastinit.orthogonal_(lin.weight)
    assert fastinit.audit(lin).params[0].matches[0] == "orthogonal (gain 1)"


def test_deferred_model_is_audited_from_its_plan():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 32)
            self.b = nn.Linear(32, 4)
            nn.init.zeros_(self.b.weight)

    model = fastinit.deferred_init(Net)
    a = fastinit.audit(model)
    assert a.deferred and all(p.is_meta for p in model.parameters())  # nothing allocated
    pa = {p.name: p for p in a.params}
    assert pa["a.weight"].max == pytest.approx(1 / 4) and pa["a.weight"].matches[0].startswith("U(±1/√fan_in)")
    assert pa["a.weight"].std == pytest.approx(1 / 4 / math.sqrt(3))
    # a zero-initialized head alone breaks symmetry at the first step (its targets differ)
    assert not a.flagged("symmetry")
    with fastinit.batched(module=model):
        nn.init.zeros_(model.a.weight)  # with a constant matrix before it, its units never differ
    assert {f.where for f in fastinit.audit(model).flagged("symmetry")} == {"a.weight"}
    with pytest.raises(ValueError, match="materialize it first"):
        fastinit.audit(model, batch(2, 16))
    apply_scheme(model, "gpt2", n_layer=1)
    assert fastinit.audit(model, scheme="gpt2", n_layer=1).ok


def test_json_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = mlp(3, 32, nn.Tanh)
    a = fastinit.audit(model, batch(32, 64))
    path = tmp_path / "a.json"
    a.to_json(path)
    data = json.loads(path.read_text())
    assert data["model"] == "Sequential" and len(data["parameters"]) == 8 and len(data["layers"]) == 4
    assert set(data["parameters"][0]) >= {"name", "shape", "fan_in", "fan_out", "mean", "std", "min", "max",
                                          "std_sqrt_fan_in", "matches", "flags"}
    text = str(a)
    assert "| parameter" in text and "0.weight" in text and "activation std" in text
    png = tmp_path / "a.png"
    a.plot(png)
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 1000  # two panels
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    assert json.loads(fastinit.audit(model).to_json())["parameters"][0]["max"] is not None  # inf excluded


def test_bad_input():
    with pytest.raises(TypeError):
        fastinit.audit(torch.zeros(3))
    with pytest.raises(ValueError, match="band"):
        fastinit.audit(nn.Linear(2, 2), band=0.5)


def test_deferred_uninitialized_tensor_is_flagged_before_allocation():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 4))
            self.lin = nn.Linear(4, 4)
            nn.init.orthogonal_(self.lin.weight)

    a = fastinit.audit(fastinit.deferred_init(M))
    assert [(f.where, f.kind) for f in a.flags] == [("w", "uninitialized")]
    assert a.params[1].planned == "replay orthogonal_" and a.params[1].std is None


def test_deferred_trunc_normal_with_wide_bounds_matches_the_normal():
    def build():
        m = nn.Linear(64, 64)
        nn.init.trunc_normal_(m.weight, std=0.02)  # bounds ±2: ±100 std, as timm and others call it
        nn.init.trunc_normal_(m.bias, std=0.02, a=-0.02, b=0.02)
        return m

    a = fastinit.audit(fastinit.deferred_init(build))
    assert a.params[0].matches == ["N(0, 0.02) (GPT-2/BERT)"] and a.params[0].std == pytest.approx(0.02)
    assert a.params[1].matches == [] and a.params[1].max == 0.02 and a.params[1].std < 0.02


def test_a_correctly_initialized_float16_model_is_not_flagged_uninitialized():
    """float16's subnormals start at 6.1e-5: a drawn init of std .02 puts a few per
    thousand values there, which is no sign of uninitialized memory; random bits are."""
    torch.manual_seed(0)
    m = torch.nn.Linear(768, 768).half()
    assert "uninitialized" not in [f.kind for f in fastinit.audit(m).flags]
    with torch.no_grad():
        m.weight.copy_(torch.randint(-32768, 32767, (768, 768), dtype=torch.int16).view(torch.float16))
    assert "uninitialized" in [f.kind for f in fastinit.audit(m).flags]


def test_a_deferred_tensor_edited_after_its_fill_has_no_predicted_law():
    """``w.mul_(100)`` after the fill: the fill's law is not the value's, so neither
    ``planned`` nor the audit claims it (a padding row filled after it keeps the law)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            with torch.no_grad():
                self.a.weight.mul_(100.0)
            self.e = nn.Embedding(10, 4, padding_idx=0)

    d = fastinit.deferred_init(Net)
    plan = fastinit.planned(d)
    assert plan["a.weight"].spec is None and "affine" in plan["a.weight"].description
    assert plan["e.weight"].spec is not None
    assert [p.std for p in fastinit.audit(d).params if p.name == "a.weight"] == [None]


def test_the_deferred_audit_flags_nan_and_inf_that_edits_after_the_fill_put_in():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 8, padding_idx=0)
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.ok = nn.Linear(8, 8)
            with torch.no_grad():
                self.e.weight[0].fill_(float("nan"))
                self.a.weight.mul_(float("inf"))
                self.b.weight[:, 0].fill_(float("nan"))

    deferred = {(f.kind, f.where) for f in fastinit.audit(fastinit.deferred_init(Net)).flags}
    eager = {(f.kind, f.where) for f in fastinit.audit(Net()).flags}
    for name in ("e.weight", "a.weight", "b.weight"):
        assert ("nonfinite", name) in deferred and ("nonfinite", name) in eager
    assert not any(where.startswith("ok.") for _, where in deferred)
    assert fastinit.planned(fastinit.deferred_init(Net))["e.weight"].spec is None  # a NaN row: no law


def test_audit_leaves_modes_and_buffers_and_refuses_unknown_keywords():
    """The audit's forward pass runs in eval mode: after it every module's training
    flag and every buffer is as it was (a frozen BatchNorm, an observer's min/max);
    a misspelt keyword is an error, not a pass without a forward."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # frozen
    model[1].register_buffer("seen_max", torch.zeros(()))
    model[1].register_forward_hook(lambda m, i, o: m.seen_max.copy_(o.max()) and None)  # (an observer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for run in (lambda: fastinit.audit(model, torch.randn(16, 4)),
                lambda: apply_scheme(model, "lsuv", example_input=torch.randn(16, 4))):
        run()
        assert [m.training for m in model.modules()] == [True, True, False, True, True]
        assert torch.equal(model[1].seen_max, before["1.seen_max"])
        assert torch.equal(model[1].running_mean, before["1.running_mean"])
    with pytest.raises(TypeError, match="exmaple_input"):
        fastinit.audit(model, exmaple_input=torch.randn(16, 4))
    with pytest.raises(TypeError, match="band"):
        fastinit.audit(model, band="x")


def test_a_lone_small_gradient_is_no_vanishing_trend():
    # Attention's query and key projections get small gradients at init (the logits barely
    # move the softmax), while the value and output paths carry full ones: no vanishing.
    class Attention(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.norm = nn.LayerNorm(d)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) * 1e-3, -1)
            return self.norm(x + self.o(a @ self.v(x)))

    model = nn.Sequential(Attention(32), Attention(32), nn.Linear(32, 32))
    apply_scheme(model, "xavier_uniform", seed=0)
    a = fastinit.audit(model, batch(4, 16, 32))
    grads = {l.name: l.grad_std for l in a.layers}
    assert grads["0.q"] < grads["2"] / 100  # what the first-against-last comparison flagged
    assert not a.flagged("vanishing"), a.flags
    deep = mlp(40, 64, nn.Tanh)  # a real trend still is one
    apply_scheme(deep, Scheme("small", [Rule(fastinit.Normal(0.0, 0.02), ndim=2), Rule(0.0)]), seed=0)
    assert fastinit.audit(deep, batch(64, 64)).flagged("vanishing")


def test_fixed_std_conventions_and_token_tables_are_not_outside_the_band():
    class ViTBits(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.randn(1, 1, 192) * 1e-6)  # timm's jax init: on purpose
            self.pos_embed = nn.Parameter(torch.randn(1, 17, 192) * 0.02)
            self.fc1 = nn.Linear(40, 160)  # a narrow MLP under GPT-2/BERT's N(0, 0.02)
            nn.init.normal_(self.fc1.weight, std=0.02, generator=torch.Generator().manual_seed(0))
            self.fc2 = nn.Linear(40, 160)
            nn.init.normal_(self.fc2.weight, std=0.002, generator=torch.Generator().manual_seed(0))

    a = fastinit.audit(ViTBits())
    assert {f.where for f in a.flagged("band")} == {"fc2.weight"}  # 0.002: no convention, far below the band
    assert a.params[2].matches[0] == "N(0, 0.02) (GPT-2/BERT)"


def test_a_model_materialized_in_part_is_audited_from_its_values_where_real():
    model = fastinit.deferred_init(lambda: nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    fastinit.materialize(model[0], device="cpu", seed=0)
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    a = fastinit.audit(model)
    assert a.deferred and [f.where for f in a.flagged("nonfinite")] == ["0.weight"]
    pa = {p.name: p for p in a.params}
    assert pa["0.bias"].min == model[0].bias.min().item() and pa["0.bias"].max == model[0].bias.max().item()
    assert pa["1.weight"].planned is not None and pa["1.weight"].max == pytest.approx(1 / 4)
    assert a.device == "cpu" and "partly materialized: real tensors on cpu" in str(a).splitlines()[0]


def test_zero_matrices_followed_by_different_weights_are_no_symmetry():
    # Fixup/LoRA-style: one zero matrix per residual block, its outputs weighed by random ones
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
            nn.init.zeros_(self.fc2.weight)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    assert not fastinit.audit(nn.Sequential(Block(), Block(), nn.Linear(32, 10))).flagged("symmetry")
    lone = nn.Linear(64, 64)  # identical rows of a large std, alone: not symmetry, but out of the band
    with torch.no_grad():
        lone.weight.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).mul(100).expand(64, 64))
    assert [f.kind for f in fastinit.audit(nn.Sequential(lone)).flags] == ["band"]


def test_a_parametrized_weight_is_audited_as_the_weight_it_stands_for():
    from torch.nn.utils.parametrizations import weight_norm

    lin = weight_norm(nn.Linear(64, 64))
    nn.init.normal_(lin.parametrizations.weight.original1.data, 0, 100)
    assert [(f.where, f.kind) for f in fastinit.audit(nn.Sequential(lin)).flags] == [
        ("0.parametrizations.weight.original1", "band")]


def test_a_model_materialized_in_part_meets_its_scheme_where_real():
    def build():
        return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))

    model = fastinit.deferred_init(build)
    fastinit.materialize(model[0], device="cpu", seed=0)
    assert not fastinit.audit(model, scheme="torch_default").flags  # sampled values: sampling error allowed


def test_one_small_gradient_near_the_output_is_no_exploding_trend():
    class Gated(nn.Module):  # a branch gated near zero just before the head (LayerScale, ReZero)
        def __init__(self):
            super().__init__()
            self.l = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))
            self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            for layer in self.l:
                x = x + layer(x)
            return self.head(x + 1e-4 * self.b(x))

    torch.manual_seed(0)
    assert not fastinit.audit(Gated(), batch(32, 64)).flagged("exploding")


def test_a_complex_parameter_is_audited_from_both_parts():
    """torch.randn(..., dtype=cfloat) has parts of std 1/sqrt(2): the audit's stats are those
    of the real and imaginary parts together, not of the real part alone (which a cast to
    float64 would keep, with a warning)."""
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    m.c = nn.Parameter(torch.randn(64, 64, dtype=torch.cfloat) * 2 + 3j)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = next(p for p in fastinit.audit(m).params if p.name == "c")
    parts = torch.view_as_real(m.c.detach()).reshape(-1)
    assert row.mean == pytest.approx(parts.mean().item(), abs=1e-4)  # (1.5: real parts 0, imaginary 3)
    assert row.std == pytest.approx(parts.std(unbiased=False).item(), rel=1e-4)
    assert row.max == parts.max().item() and row.min == parts.min().item()


def test_scheme_expectations_of_blocks_and_orthogonal_matrices_are_checked():
    """A fused q/k/v matrix (per-block Xavier) and per-gate orthogonal matrices have an
    expected std too: their own scheme passes, a whole-matrix Xavier is flagged."""
    lstm = nn.LSTM(32, 64)
    apply_scheme(lstm, "orthogonal_rnn", seed=0)
    a = fastinit.audit(lstm, scheme="orthogonal_rnn")
    pa = {p.name: p for p in a.params}
    assert pa["weight_hh_l0"].expected_std == pytest.approx(1 / 8)  # 4 blocks of 64x64: gain/sqrt(64)
    assert pa["weight_ih_l0"].expected_std is not None and not a.flagged("scheme")
    m = nn.Module()
    m.qkv = nn.Linear(256, 384)
    apply_scheme(m, "fused_qkv", qkv=(256, 64, 64), seed=0)
    assert not fastinit.audit(m, scheme="fused_qkv", qkv=(256, 64, 64)).flagged("scheme")
    apply_scheme(m, "xavier_uniform", seed=0)
    assert [f.where for f in fastinit.audit(m, scheme="fused_qkv", qkv=(256, 64, 64)).flagged("scheme")] == \
        ["qkv.weight"]
