"""Bad input: the same exception type as torch.nn.init, and nothing half-written."""

import pytest
import torch

import fastinit

I64 = torch.int64


def _t(*shape, dtype=torch.float32):
    return torch.full(shape, 7.0).to(dtype)


CASES = [
    ("xavier_uniform_", lambda: (_t(5),), {}),
    ("xavier_normal_", lambda: (_t(5),), {}),
    ("kaiming_uniform_", lambda: (_t(5),), {}),
    ("kaiming_normal_", lambda: (_t(5),), {}),
    ("kaiming_uniform_", lambda: (_t(4, 4),), {"mode": "fan_avg"}),
    ("kaiming_normal_", lambda: (_t(4, 4),), {"mode": "sideways"}),
    ("kaiming_uniform_", lambda: (_t(4, 4),), {"nonlinearity": "swish"}),
    ("kaiming_normal_", lambda: (_t(4, 4),), {"nonlinearity": "leaky_relu", "a": "0.1"}),
    ("eye_", lambda: (_t(3, 3, 3),), {}),
    ("eye_", lambda: (_t(3),), {}),
    ("dirac_", lambda: (_t(3, 3),), {}),
    ("dirac_", lambda: (_t(3, 3, 3, 3, 3, 3),), {}),
    ("dirac_", lambda: (_t(6, 3, 3), 4), {}),
    ("sparse_", lambda: (_t(3, 3, 3), 0.1), {}),
    ("orthogonal_", lambda: (_t(3),), {}),
    ("uniform_", lambda: (_t(5, dtype=I64),), {}),
    ("normal_", lambda: (_t(5, dtype=torch.int32),), {}),
    ("trunc_normal_", lambda: (_t(5, dtype=I64),), {}),
    ("xavier_uniform_", lambda: (_t(3, 3, dtype=torch.int32),), {}),
    ("xavier_normal_", lambda: (_t(3, 3, dtype=torch.int16),), {}),
    ("kaiming_uniform_", lambda: (_t(3, 3, dtype=torch.uint8),), {}),
    ("kaiming_normal_", lambda: (_t(3, 3, dtype=torch.bool),), {}),
    ("orthogonal_", lambda: (_t(3, 3, dtype=I64),), {}),
    ("sparse_", lambda: (_t(3, 3, dtype=I64), 0.1), {}),
    ("uniform_", lambda: (_t(5, dtype=torch.bool),), {}),
    ("normal_", lambda: (_t(5),), {"std": -1.0}),
    ("uniform_", lambda: (_t(5), 2.0, 1.0), {}),
    ("uniform_", lambda: (_t(5), float("nan"), 1.0), {}),
    ("uniform_", lambda: (_t(5), 0.0, float("inf")), {}),
    ("uniform_", lambda: (_t(5), -float("inf"), 0.0), {}),
    ("uniform_", lambda: (_t(5), 0.0, 1e300), {}),
    ("uniform_", lambda: (_t(5), -3e38, 3e38), {}),
    ("uniform_", lambda: (_t(5, dtype=torch.float16), -4e4, 4e4), {}),
    ("uniform_", lambda: (_t(5, dtype=torch.float16), 0.0, 7e4), {}),
    ("uniform_", lambda: (_t(5, dtype=torch.bfloat16), -3e38, 3e38), {}),
    ("trunc_normal_", lambda: (_t(5), 0.0, 1.0, 2.0, 1.0), {}),
    ("trunc_normal_", lambda: (_t(5), 0.0, 0.0), {}),
    ("trunc_normal_", lambda: (_t(5), 0.0, 1.0, float("nan"), 2.0), {}),
]


@pytest.mark.parametrize("name,make_args,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_exception_type_as_torch_and_nothing_written(name, make_args, kwargs):
    theirs = make_args()
    with pytest.raises(Exception) as torch_exc:
        getattr(torch.nn.init, name)(*theirs, **kwargs)
    ours = make_args()
    before = ours[0].clone()
    with pytest.raises(type(torch_exc.value)) as our_exc:
        getattr(fastinit, name)(*ours, **kwargs)
    assert torch.equal(ours[0], before), "a failed call changed the tensor"
    if name == "uniform_" and ours[0].dtype.is_floating_point:  # torch's bound checks, word for word
        assert str(our_exc.value) == str(torch_exc.value)


def test_calculate_gain_errors_like_torch():
    for bad in ("0.1", [0.1], True):
        with pytest.raises(ValueError, match="not a valid number"):
            fastinit.calculate_gain("leaky_relu", bad)
    with pytest.raises(ValueError, match="Unsupported nonlinearity"):
        fastinit.calculate_gain("gelu")
    for nl, p in [("linear", None), ("tanh", None), ("relu", None), ("leaky_relu", 0.2),
                  ("leaky_relu", 3), ("selu", None), ("conv_transpose2d", None)]:
        assert fastinit.calculate_gain(nl, p) == torch.nn.init.calculate_gain(nl, p)


def test_fans_match_torch():
    for shape in [(3, 4), (64, 3, 7, 7), (8, 2, 5), (2, 3, 4, 5, 6)]:
        t = torch.empty(shape)
        assert fastinit.calculate_fan_in_and_fan_out(t) == torch.nn.init._calculate_fan_in_and_fan_out(t)
    with pytest.raises(ValueError):
        fastinit.calculate_fan_in_and_fan_out(torch.empty(3))


def test_unknown_engine_and_engine_on_wrong_device():
    with pytest.raises(ValueError, match="unknown fastinit engine"):
        with fastinit.use_engine("gpu-magic"):
            pass
    if torch.cuda.is_available():
        with fastinit.use_engine("cpu"):
            with pytest.raises(RuntimeError, match="cpu engine"):
                fastinit.normal_(torch.empty(5, device="cuda"))


def test_triton_engine_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = _t(10)
    with fastinit.use_engine("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fastinit.normal_(t)
    assert (t == 7).all()
    # inside batched() the call raises at once too: the block stops there, as one by one
    a, c = _t(10), _t(10)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with fastinit.batched():
            fastinit.normal_(a)
            with fastinit.use_engine("triton"):
                fastinit.normal_(t)
            fastinit.normal_(c)
    assert not (a == 7).any() and (t == 7).all() and (c == 7).all()


def test_environment_variable_selects_the_engine(monkeypatch):
    monkeypatch.setenv("FASTINIT_ENGINE", "reference")
    torch.manual_seed(0)
    a = fastinit.uniform_(torch.empty(100))
    monkeypatch.setenv("FASTINIT_ENGINE", "cpu")
    torch.manual_seed(0)
    b = fastinit.uniform_(torch.empty(100))
    monkeypatch.delenv("FASTINIT_ENGINE")
    torch.manual_seed(0)
    with fastinit.use_engine("reference"):
        c = fastinit.uniform_(torch.empty(100))
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_trunc_normal_takes_a_negative_std_as_torch_does():
    """torch's trunc_normal_ only uses std squared: std < 0 is no error there and
    samples the truncated normal of |std| (its output passes this same KS test)."""
    from scipy import stats

    from stats_util import check_against

    x = torch.empty(200_000)
    torch.manual_seed(0)
    fastinit.trunc_normal_(x, 0.5, -1.5, -1.0, 3.0)
    check_against(x.numpy(), stats.truncnorm((-1.0 - 0.5) / 1.5, (3.0 - 0.5) / 1.5, loc=0.5, scale=1.5),
                  label="trunc_normal_ std=-1.5")
    y = torch.empty(200_000)
    torch.manual_seed(0)
    fastinit.trunc_normal_(y, 0.5, 1.5, -1.0, 3.0)
    assert torch.equal(x, y)


BAD_CALLS = [  # (function, tensor, args, kwargs): each raises in torch, with nothing written here
    ("normal_", lambda: _t(4, 4), (), {"generator": 5}),
    ("uniform_", lambda: _t(4, 4), (), {"generator": "gen"}),
    ("trunc_normal_", lambda: _t(4, 4), (), {"generator": 1}),
    ("kaiming_normal_", lambda: _t(4, 4), (), {"generator": 5}),
    ("xavier_uniform_", lambda: _t(4, 4), (), {"generator": "x"}),
    ("orthogonal_", lambda: _t(4, 4), (), {"generator": 3}),
    ("sparse_", lambda: _t(4, 4), (0.5,), {"generator": 3}),
    ("uniform_", lambda: _t(4, dtype=I64), (2.0, 1.0), {}),  # the dtype before the bounds
    ("uniform_", lambda: _t(4, dtype=torch.bool), (0.0, float("inf")), {}),
    ("normal_", lambda: _t(4, dtype=torch.uint8), (0.0, 1.0), {}),
    ("dirac_", lambda: _t(6, 2, 3, 3), (1.5,), {}),  # torch zeroes the tensor, then raises
    ("orthogonal_", lambda: _t(6, 4), (1 + 2j,), {}),  # torch writes Q, then raises
    ("trunc_normal_", lambda: _t(600), (1 + 2j,), {}),
    ("uniform_", lambda: torch.full((1,), 7.0).expand(5), (), {}),
    ("normal_", lambda: _t(4), ("0",), {}),
]


@pytest.mark.parametrize("name,make,args,kwargs", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_calls_raise_torchs_exception_type_and_write_nothing(name, make, args, kwargs):
    with pytest.raises(Exception) as torch_exc:
        getattr(torch.nn.init, name)(make(), *args, **kwargs)
    t = make()
    before, version = t.clone(), t._version
    with pytest.raises(type(torch_exc.value)):
        getattr(fastinit, name)(t, *args, **kwargs)
    assert torch.equal(t, before) and t._version == version


def test_calls_torch_accepts_are_accepted():
    import numpy as np

    w = _t(600)
    fastinit.trunc_normal_(w, np.float64(0.1), np.float32(0.5), -1.0, 1.0)  # numpy scalars
    assert w.abs().max() <= 1.0
    fastinit.uniform_(w, torch.tensor(-0.5), torch.tensor(0.5))  # 0-d tensors
    assert w.abs().max() <= 0.5
    g = _t(6, 2, 3, 3)
    t = _t(6, 2, 3, 3)
    fastinit.uniform_(torch.empty(0, dtype=torch.complex64), 3.0, 1e-30)  # torch checks no bounds there
    torch.nn.init.dirac_(g, -1)  # torch: zeroes the tensor and sets nothing
    fastinit.dirac_(t, -1)
    assert torch.equal(t, g)


@pytest.mark.parametrize("shape", [(4,), (4, 4), (2, 2, 2)])
def test_sparse_tensors_get_what_torch_gives_them(shape):
    import torch.nn.init as tinit

    def sparse():
        idx = torch.zeros(len(shape), 1, dtype=torch.int64)
        return torch.sparse_coo_tensor(idx, torch.ones(1), shape)

    calls = [("uniform_", ()), ("normal_", ()), ("trunc_normal_", ()), ("xavier_uniform_", ()),
             ("kaiming_normal_", ()), ("zeros_", ()), ("ones_", ()), ("constant_", (2.0,)), ("eye_", ()),
             ("dirac_", ()), ("orthogonal_", ()), ("sparse_", (0.5,))]
    for name, args in calls:
        outcome = []
        for mod in (tinit, fastinit):
            t = sparse()
            try:
                getattr(mod, name)(t, *args)
                outcome.append(("ok", t.to_dense().tolist()))
            except Exception as e:  # noqa: BLE001 - the type is what is compared
                outcome.append((type(e).__name__, None))
        assert outcome[0] == outcome[1], (name, outcome)


def _csr():
    return torch.full((6, 4), 7.0).to_sparse_csr()


def _nested():
    return torch.nested.nested_tensor([torch.full((2, 4), 7.0), torch.full((3, 4), 7.0)])


BAD_CALLS_MORE = [  # (function, tensor, args, kwargs): torch raises these; so must fastinit, writing nothing
    # torch's trunc_normal_ computes -0.5 ((mode - mean) / std) ** 2 in Python floats first
    ("trunc_normal_", lambda: torch.full((6, 4), 7.0), (1e155, 1.0, -2.0, 2.0), {}),
    ("trunc_normal_", lambda: torch.full((6, 4), 7.0), (0.0, 1e-300, 1.0, 2.0), {}),
    ("trunc_normal_", lambda: torch.full((6, 4), 7.0), (0.0, 1.0, 1e300, 1e301), {}),  # before uniform_'s bounds
    ("trunc_normal_", lambda: torch.full((6, 4), 7.0, dtype=torch.float64), (0.0, 1.0, 1e300, 1e301), {}),
    # torch casts the bounds with the tensor's own new_tensor, which a negative view refuses
    ("trunc_normal_", lambda: torch.zeros(6, 4, dtype=torch.complex64).conj().imag, (), {}),
    ("kaiming_normal_", lambda: torch.nn.UninitializedParameter(), (), {}),  # its shape, read first
    ("kaiming_uniform_", lambda: torch.nn.UninitializedParameter(), (), {}),  # its __torch_function__
]


@pytest.mark.parametrize("name,make,args,kwargs", BAD_CALLS_MORE,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS_MORE)])
def test_more_bad_calls_raise_torchs_exception_type_and_write_nothing(name, make, args, kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as torch_exc:
            getattr(torch.nn.init, name)(make(), *args, **kwargs)
        t = make()
        lazy = isinstance(t, torch.nn.parameter.UninitializedTensorMixin)
        before = None if lazy else (t.clone(), t._version)
        with pytest.raises(type(torch_exc.value)):
            getattr(fastinit, name)(t, *args, **kwargs)
    if before is not None:
        assert torch.equal(t, before[0]) and t._version == before[1]


@pytest.mark.parametrize("name,make,args", [
    ("trunc_normal_", _csr, ()), ("sparse_", _csr, (0.3,)), ("orthogonal_", _csr, ()),
    ("trunc_normal_", _nested, ()), ("orthogonal_", _nested, ()), ("uniform_", _nested, ()),
    ("sparse_", _nested, (0.3,)),
])
def test_sparse_layouts_and_nested_tensors_raise_what_torch_raises_writing_nothing(name, make, args):
    """No engine holds them: torch's own function decides, tried on a copy first (its
    sparse_ on a CSR tensor writes normal values, then raises)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as torch_exc:
            getattr(torch.nn.init, name)(make(), *args)
        t = make()
        before = t.values().clone() if t.layout == torch.sparse_csr else [x.clone() for x in t.unbind()]
        state = torch.get_rng_state()
        with pytest.raises(type(torch_exc.value)):
            getattr(fastinit, name)(t, *args)
    after = t.values() if t.layout == torch.sparse_csr else t.unbind()
    assert all(torch.equal(x, y) for x, y in zip(after, before)) if isinstance(before, list) else torch.equal(
        after, before)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_nested_tensor_gets_torchs_own_normal_():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, u = _nested(), _nested()
        torch.manual_seed(3)
        torch.nn.init.normal_(t)
        torch.manual_seed(3)
        fastinit.normal_(u)
    assert all(torch.equal(x, y) for x, y in zip(t.unbind(), u.unbind()))


def test_zeros_on_a_quantized_tensor_raises_as_torchs_zero_does():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make = lambda: torch.quantize_per_tensor(torch.full((6, 4), 0.7), 0.1, 0, torch.quint8)  # noqa: E731
        with pytest.raises(NotImplementedError):
            torch.nn.init.zeros_(make())
        q = make()
        with pytest.raises(NotImplementedError):
            fastinit.zeros_(q)
    assert torch.allclose(q.dequantize(), torch.full((6, 4), 0.7))


def test_trunc_normal_bounds_given_as_tensors_warn_as_torch_and_a_grad_mean_does_not():
    with pytest.warns(UserWarning, match="copy construct"):
        fastinit.trunc_normal_(torch.zeros(6, 4), a=torch.tensor(-1.0), b=3.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch computes p under no_grad: no conversion warning
        with pytest.raises(TypeError):
            fastinit.trunc_normal_(torch.zeros(6, 4), mean=torch.tensor(0.5, requires_grad=True))


@pytest.mark.parametrize("name,shape,args", [
    ("uniform_", (6, 4), ()), ("normal_", (6, 4), ()), ("trunc_normal_", (6, 4), ()), ("constant_", (6, 4), (0.5,)),
    ("ones_", (6, 4), ()), ("zeros_", (6, 4), ()), ("eye_", (6, 4), ()), ("dirac_", (4, 4, 3), ()),
    ("xavier_uniform_", (6, 4), ()), ("xavier_normal_", (6, 4), ()), ("kaiming_uniform_", (6, 4), ()),
    ("kaiming_normal_", (6, 4), ()), ("orthogonal_", (6, 4), ()), ("sparse_", (6, 4), (0.5,)),
])
def test_a_meta_tensor_counts_the_write_as_torch_does(name, shape, args):
    """torch's ops on a meta tensor write nothing but bump its version counter (autograd
    sees the write); fastinit's calls outside any block do what torch's do."""
    t, u = torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    getattr(torch.nn.init, name)(t, *args)
    getattr(fastinit, name)(u, *args)
    assert u._version == t._version
