"""The drop-in contract: names, signatures, defaults, return values, semantics."""

import contextlib
import inspect
import math
import subprocess
import sys
import warnings

import pytest
import torch

import fastinit

PUBLIC = [n for n in torch.nn.init.__all__]


def test_exports_every_public_torch_init_function():
    missing = [n for n in PUBLIC if not callable(getattr(fastinit, n, None))]
    assert not missing
    assert callable(fastinit.calculate_fan_in_and_fan_out)


@pytest.mark.parametrize("name", [n for n in PUBLIC if n.endswith("_") or n == "calculate_gain"])
def test_signatures_match_torch(name):
    ours = inspect.signature(getattr(fastinit, name))
    theirs = inspect.signature(getattr(torch.nn.init, name))
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.default, p.kind) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("name", [n for n in PUBLIC if not n.endswith("_") and n != "calculate_gain"])
def test_deprecated_aliases_warn_and_work(name):
    t = torch.empty(4, 3, 3, 3) if name == "dirac" else torch.empty(5, 6)
    args = {"constant": (0.5,), "sparse": (0.2,)}.get(name, ())
    with pytest.warns(FutureWarning, match=f"{name}_"):
        out = getattr(fastinit, name)(t, *args)
    assert out is t


# Every public drop-in, as a call on one tensor.
ALL_CALLS = [
    lambda t: fastinit.uniform_(t, -1, 1),
    lambda t: fastinit.normal_(t),
    lambda t: fastinit.trunc_normal_(t, std=0.02),
    lambda t: fastinit.trunc_normal_(t),
    lambda t: fastinit.xavier_uniform_(t),
    lambda t: fastinit.xavier_normal_(t),
    lambda t: fastinit.kaiming_uniform_(t),
    lambda t: fastinit.kaiming_normal_(t),
    lambda t: fastinit.orthogonal_(t),
    lambda t: fastinit.sparse_(t, 0.5),
    lambda t: fastinit.constant_(t, 0.5),
    lambda t: fastinit.ones_(t),
    lambda t: fastinit.zeros_(t),
    lambda t: fastinit.eye_(t),
]


@pytest.mark.parametrize("call", ALL_CALLS)
def test_returns_the_same_parameter_in_place(call):
    p = torch.nn.Parameter(torch.full((8, 6), float("nan")))
    out = call(p)
    assert out is p
    assert p.requires_grad and p.grad_fn is None
    assert not torch.isnan(p).any()


def test_dirac_matches_torch_exactly():
    for shape, groups in [((6, 3, 5), 1), ((4, 2, 3, 3), 2), ((6, 4, 3, 3, 3), 3)]:
        a = torch.nn.init.dirac_(torch.randn(shape), groups)
        b = fastinit.dirac_(torch.randn(shape), groups)
        assert torch.equal(a, b)


def test_eye_and_constants_match_torch_exactly():
    assert torch.equal(fastinit.eye_(torch.randn(4, 7)), torch.eye(4, 7))
    assert torch.equal(fastinit.constant_(torch.empty(3, 3), 0.25), torch.full((3, 3), 0.25))
    assert torch.equal(fastinit.ones_(torch.empty(3, dtype=torch.int64)), torch.ones(3, dtype=torch.int64))
    assert torch.equal(fastinit.zeros_(torch.randn(5)), torch.zeros(5))


def test_bounds_and_stds_equal_torch_formulas():
    t = torch.empty(300, 200)
    for gain in (1.0, 2.5):
        fastinit.xavier_uniform_(t, gain)
        assert t.abs().max() <= gain * (6 / 500) ** 0.5
    fastinit.kaiming_uniform_(t, a=5**0.5)
    assert t.abs().max() <= 1 / 200**0.5  # nn.Linear's default: bound = 1/sqrt(fan_in)
    fastinit.kaiming_uniform_(t, mode="fan_out", nonlinearity="relu")
    assert t.abs().max() <= (6 / 300) ** 0.5
    assert t.abs().max() > 0.99 * (6 / 300) ** 0.5


def test_noncontiguous_views_are_filled_without_touching_the_rest():
    base = torch.zeros(64, 48)
    fastinit.uniform_(base[:, 10:20], 1.0, 2.0)
    assert (base[:, 10:20] >= 1).all()
    assert (base[:, :10] == 0).all() and (base[:, 20:] == 0).all()
    t = torch.zeros(50, 30).t()
    fastinit.normal_(t, 5.0, 0.1)
    assert abs(t.mean().item() - 5.0) < 0.02
    # A view's values are those of a contiguous tensor with the same key (a keyed fill:
    # above the size that a small contiguous tensor takes torch's own op for).
    for shape, fn in (((600, 500), fastinit.normal_), ((30, 150), fastinit.uniform_)):
        torch.manual_seed(3)
        a = fn(torch.empty(shape), generator=torch.Generator().manual_seed(7))
        b = torch.empty(shape[::-1]).t()
        fn(b, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)
        torch.manual_seed(3)
        a = fn(torch.empty(shape))
        torch.manual_seed(3)
        b = torch.empty(shape[::-1]).t()
        fn(b)
        assert torch.equal(a, b)


# (name, args, shape, dtype): calls on torch's default generator that a small contiguous
# CPU tensor makes as torch.nn.init makes them, with torch's own op
_LIKE_TORCH = [
    ("normal_", (0.0, 0.02), (8, 6), torch.float32),
    ("normal_", (1.0, 2.0), (1,), torch.float64),
    ("normal_", (0.0, 1.0), (64, 64), torch.bfloat16),  # 4096: the largest half-precision one
    ("kaiming_normal_", (0, "fan_out", "relu"), (64, 64, 3, 3), torch.float32),  # float32 normal: one chunk
    ("xavier_normal_", (1.5,), (512, 512), torch.float32),  # 2^18 elements: still one chunk
    ("uniform_", (-1.0, 1.0), (7,), torch.float16),
    ("uniform_", (0.0, 3.0), (64, 64), torch.float32),
    ("kaiming_uniform_", (5 ** 0.5,), (30, 20), torch.float32),
    ("xavier_uniform_", (), (16, 8, 3, 3), torch.float32),
]


@pytest.mark.parametrize("name,args,shape,dtype", _LIKE_TORCH)
def test_small_cpu_calls_give_torchs_own_values_and_draws(name, args, shape, dtype):
    """Below a keyed stream's set-up cost, a call is torch's own op: the same values as
    torch.nn.init under torch.manual_seed, the generator left where torch leaves it,
    one version bump, a leaf stays a leaf."""
    torch.manual_seed(11)
    want = getattr(torch.nn.init, name)(torch.empty(shape, dtype=dtype), *args)
    state = torch.get_rng_state()
    torch.manual_seed(11)
    w = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
    v = w._version
    out = getattr(fastinit, name)(w, *args)
    assert out is w and torch.equal(w.detach(), want)
    assert torch.equal(torch.get_rng_state(), state)
    assert w._version == v + 1 and w.is_leaf and w.grad_fn is None


@pytest.mark.parametrize("name,args,shape,dtype,explicit", [
    ("normal_", (0.0, 1.0), (513, 512), torch.float32, False),  # over one chunk: filled in parallel
    ("normal_", (0.0, 1.0), (64, 65), torch.bfloat16, False),
    ("uniform_", (0.0, 1.0), (64, 65), torch.float32, False),
    ("normal_", (0.0, 1.0), (8, 6), torch.float32, True),  # with generator=
])
def test_other_calls_are_keyed_by_two_draws(name, args, shape, dtype, explicit):
    """Every other call draws a 64-bit key (two 32-bit draws, whatever the size) and
    fills from it: not torch's values."""
    def gen():
        return torch.Generator().manual_seed(5) if explicit else torch.default_generator.manual_seed(11)

    g = gen()
    torch.empty(2, dtype=torch.int64).random_(0, 1 << 32, generator=g)
    state = g.get_state()
    g = gen()
    w = getattr(fastinit, name)(torch.empty(shape, dtype=dtype), *args, generator=g if explicit else None)
    assert torch.equal(g.get_state(), state)
    theirs = getattr(torch.nn.init, name)(torch.empty(shape, dtype=dtype), *args, generator=gen())
    assert not torch.equal(w, theirs)


def test_batched_with_small_and_large_tensors_equals_one_by_one():
    """Inside batched(), a small tensor's call runs at once as torch's op (what is queued in
    its memory first), a large one's is queued with its key: the values and the generator's
    state equal the calls made one by one, edits included."""
    def calls(big, row, small, lin):
        fastinit.uniform_(big, -1, 1)  # 10000 elements: keyed, queued
        fastinit.normal_(big[3])  # a contiguous row: torch's op, after the queued uniform_
        big.data[5].mul_(0.5)
        fastinit.kaiming_uniform_(small)  # torch's op
        small.data[0].zero_()
        fastinit.xavier_normal_(lin.weight)  # float32 normal of one chunk: torch's op
        fastinit.uniform_(row, 2, 3)  # a view of a queued tensor's memory
        fastinit.trunc_normal_(small, std=0.02)  # 1200 elements: drawn from the generator at its call
        return big, small, lin.weight

    def fresh():
        big = torch.zeros(100, 100)
        return big, big[7, ::2], torch.empty(40, 30), torch.nn.Linear(300, 200)

    torch.manual_seed(0)
    want = [t.detach().clone() for t in calls(*fresh())]
    state = torch.get_rng_state()
    torch.manual_seed(0)
    with fastinit.batched():
        got = calls(*fresh())
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fn", [fastinit.uniform_, fastinit.trunc_normal_])
def test_version_counts_inside_batched_equal_eager_after_queued_edits(fn):
    """A small fill written at its call first runs the queued edits of its memory; their
    replay bumps nothing more (each bumped at its call): the counts equal eager code's."""
    def run(batched):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.zeros(300, 300))
        v0, seen = w._version, []
        with fastinit.batched() if batched else contextlib.nullcontext():
            fastinit.kaiming_uniform_(w)  # 90000 elements: keyed, queued
            with torch.no_grad():
                w.clamp_(-0.01, 0.01)  # queued behind it
            seen.append(w._version - v0)
            fn(w[0])  # 300 contiguous elements: written at its call
            seen.append(w._version - v0)
        seen.append(w._version - v0)
        return seen, w.detach().clone()

    (eager, a), (inside, b) = run(False), run(True)
    assert eager == inside and torch.equal(a, b)


@pytest.mark.parametrize("shape", [(4, 4), (300, 300)])
@pytest.mark.parametrize("name,args,error", [("uniform_", ("a", 1.0), TypeError), ("normal_", (0.0, "s"), TypeError),
                                             ("kaiming_uniform_", ("x",), ValueError)])
def test_an_inference_tensor_with_a_bad_argument_raises_torchs_argument_error(shape, name, args, error):
    with torch.inference_mode():
        t = torch.zeros(shape)
    with pytest.raises(error):
        getattr(torch.nn.init, name)(t, *args)
    for block in (contextlib.nullcontext, fastinit.batched):
        with pytest.raises(error), block():
            getattr(fastinit, name)(t, *args)
        assert (t == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_truncated_normal_of_zero_elements_is_a_no_op(dtype):
    for block in (contextlib.nullcontext, fastinit.batched):
        with block():
            for std in (0.02, 1.0):
                t = torch.empty(0, 8, dtype=dtype)
                assert fastinit.trunc_normal_(t, std=std) is t and t.shape == (0, 8)


def test_zero_element_tensors_warn_like_torch():
    for fn in (fastinit.kaiming_uniform_, fastinit.kaiming_normal_):
        with pytest.warns(UserWarning, match="zero-element"):
            fn(torch.empty(0, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastinit.uniform_(torch.empty(0))
        fastinit.normal_(torch.empty(2, 0))
        fastinit.orthogonal_(torch.empty(0, 4))


def test_meta_tensors_are_a_noop():
    m = torch.empty(10, 10, device="meta")
    for fn in (fastinit.uniform_, fastinit.normal_, fastinit.trunc_normal_, fastinit.kaiming_uniform_,
               fastinit.xavier_normal_, fastinit.orthogonal_, fastinit.eye_):
        assert fn(m) is m
    assert fastinit.sparse_(m, 0.1) is m


def test_manual_seed_reproduces_and_calls_never_share_a_stream():
    torch.manual_seed(1234)
    a = fastinit.normal_(torch.empty(1000))
    b = fastinit.normal_(torch.empty(1000))
    torch.manual_seed(1234)
    a2 = fastinit.normal_(torch.empty(1000))
    b2 = fastinit.normal_(torch.empty(1000))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.15


def test_generator_argument_is_honoured():
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    a = fastinit.kaiming_normal_(torch.empty(64, 32), generator=g1)
    torch.manual_seed(99)  # the default generator plays no part
    b = fastinit.kaiming_normal_(torch.empty(64, 32), generator=g2)
    assert torch.equal(a, b)
    c = fastinit.kaiming_normal_(torch.empty(64, 32), generator=g1)
    assert not torch.equal(a, c)


def test_orthogonal_is_orthogonal_and_sparse_has_exact_zero_counts():
    for shape in [(20, 50), (50, 20), (16, 4, 3, 3)]:
        q = fastinit.orthogonal_(torch.empty(shape), gain=2.0).reshape(shape[0], -1)
        small = min(q.shape)
        gram = q @ q.T if q.shape[0] == small else q.T @ q
        torch.testing.assert_close(gram, 4.0 * torch.eye(small), atol=1e-4, rtol=0)
    s = fastinit.sparse_(torch.empty(40, 30), sparsity=0.25, std=0.5)
    assert ((s == 0).sum(dim=0) == 10).all()
    assert 0.4 < s[s != 0].std() < 0.6


def test_import_works_without_triton():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, fastinit\n"
        "w = fastinit.kaiming_uniform_(torch.empty(300, 300))\n"
        "assert 'triton' not in sys.modules\n"
        "try:\n"
        "    fastinit.use_engine('triton').__enter__()\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------ autograd and inference mode

RANDOM_PAIRS = [  # (fastinit's call, torch's): random fills whose last op is one in-place draw
    (lambda t: fastinit.uniform_(t, -1, 1), lambda t: torch.nn.init.uniform_(t, -1, 1)),
    (lambda t: fastinit.normal_(t, 0, 0.02), lambda t: torch.nn.init.normal_(t, 0, 0.02)),
    (lambda t: fastinit.kaiming_normal_(t), lambda t: torch.nn.init.kaiming_normal_(t)),
    (lambda t: fastinit.xavier_uniform_(t), lambda t: torch.nn.init.xavier_uniform_(t)),
    (lambda t: fastinit.trunc_normal_(t, std=0.02), lambda t: torch.nn.init.trunc_normal_(t, std=0.02)),
]


@pytest.mark.parametrize("pair", RANDOM_PAIRS)
@pytest.mark.parametrize("shape", [(4, 6), (64, 8192)])  # one chunk of the cpu engine, and several
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_version_counter_moves_as_torch_moves_it(pair, shape, dtype):
    ours, theirs = pair
    a, b = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    va, vb = a._version, b._version
    ours(a)
    theirs(b)
    assert a._version - va == b._version - vb
    with torch.inference_mode():  # inside inference mode, on a normal tensor, too
        ours(a)
        theirs(b)
    assert a._version - va == b._version - vb


def test_engine_fills_leave_the_version_counter_to_their_callers():
    from fastinit import engines
    from fastinit.specs import Constant, Normal, Uniform

    for n in (24, 40000, 300000):
        ts = [torch.empty(n), torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.bfloat16)]
        before = [t._version for t in ts]
        engines.fill([engines.Target(t, spec, 7) for t in ts for spec in (Normal(0.0, 1.0),)])
        engines.fill([engines.Target(t, Uniform(-1.0, 1.0), 8) for t in ts])
        assert [t._version for t in ts] == before
        assert all(t.abs().max() > 0 for t in ts)
    # views the engines fill through a buffer, and constants (memsets), too
    base = torch.empty(40, 30)
    views = [base.t(), base[:, ::2], base[::3]]
    before = [v._version for v in views]
    engines.fill([engines.Target(v, spec, 9) for v in views for spec in (Normal(0.0, 1.0), Constant(2.0))])
    assert [v._version for v in views] == before
    # whole tensors that share one counter (a tensor and a reshaped view of it), filled in one
    # pass whose counters are set back together at its end
    a = torch.empty(64)
    a.add_(0)
    b = a.view(8, 8)
    engines.fill([engines.Target(x, spec, 10) for x in (a, b, a) for spec in (Normal(0.0, 1.0), Constant(3.0))])
    assert a._version == b._version == 1


@pytest.mark.parametrize("queued", ["fill", "constant"])
def test_a_queued_call_on_a_view_moves_the_version_counter_once(queued):
    w = torch.empty(30, 40)
    t = w.t()
    v = t._version
    with fastinit.batched():
        fastinit.normal_(t) if queued == "fill" else fastinit.constant_(t, 0.5)
        fastinit.normal_(w[0])  # (the view is queued with its storage: the constant is not a memset now)
    assert t._version == v + 2


@pytest.mark.parametrize("call", ALL_CALLS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_fill_after_use_makes_backward_raise_as_in_torch(call, layout):
    x = torch.randn(8, 6, requires_grad=True)
    w = x.detach().clone() if layout == "contiguous" else x.detach().t().contiguous().t()
    w.requires_grad_(True)
    y = (w * w).sum()
    v = w._version
    call(w)
    assert w._version > v
    assert w.is_leaf and w.requires_grad and w.grad_fn is None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("call", ALL_CALLS)
def test_inference_tensors_are_refused_outside_inference_mode_and_filled_inside(call):
    with torch.inference_mode():
        t = torch.full((8, 6), 7.0)
    with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
        call(t)
    assert (t == 7).all()
    with torch.inference_mode():
        call(t)
    assert not (t == 7).all()


def test_private_functions_exist_with_torchs_behaviour():
    import torch.nn.init as tinit

    for name in ("_calculate_fan_in_and_fan_out", "_calculate_correct_fan", "_no_grad_uniform_",
                 "_no_grad_normal_", "_no_grad_trunc_normal_", "_no_grad_fill_", "_no_grad_zero_"):
        assert callable(getattr(fastinit, name)), name
        ours = inspect.signature(getattr(fastinit, name))
        theirs = inspect.signature(getattr(tinit, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    for shape in [(3, 4), (64, 3, 7, 7), (2, 3, 4, 5, 6)]:
        t = torch.empty(shape)
        assert fastinit._calculate_fan_in_and_fan_out(t) == tinit._calculate_fan_in_and_fan_out(t)
        for mode in ("fan_in", "fan_out", "FAN_OUT"):
            assert fastinit._calculate_correct_fan(t, mode) == tinit._calculate_correct_fan(t, mode)
    with pytest.raises(ValueError):
        fastinit._calculate_correct_fan(torch.empty(3, 4), "fan_avg")
    for not_a_tensor in ("x", "ab", (3, 4), 5):  # torch calls .dim() first: an AttributeError
        with pytest.raises(AttributeError, match="has no attribute 'dim'"):
            fastinit._calculate_fan_in_and_fan_out(not_a_tensor)
        for f in (fastinit.xavier_uniform_, fastinit.xavier_normal_):
            with pytest.raises(AttributeError):
                f(not_a_tensor)
    assert fastinit.calculate_fan_in_and_fan_out((3, 4)) == (4, 3)  # (the public one also takes a shape)
    w = torch.full((50, 40), 7.0)
    assert fastinit._no_grad_uniform_(w, -1, 1) is w and w.abs().max() <= 1
    assert fastinit._no_grad_normal_(w, 5.0, 0.1) is w and abs(w.mean().item() - 5.0) < 0.05
    assert fastinit._no_grad_trunc_normal_(w, 0.0, 1.0, -0.5, 0.5) is w and w.abs().max() <= 0.5
    assert torch.equal(fastinit._no_grad_fill_(w, 3.0), torch.full_like(w, 3.0))
    assert torch.equal(fastinit._no_grad_zero_(w), torch.zeros_like(w))
    p = torch.nn.Parameter(torch.empty(4, 4))
    fastinit._no_grad_normal_(p, 0.0, 1.0)  # no_grad: a leaf that requires grad may be filled
    assert p.is_leaf and p.requires_grad


@pytest.mark.parametrize("how", ["set_default_device", "device_context"])
def test_calls_on_cpu_tensors_work_whatever_the_default_device(how):
    calls = [lambda w: fastinit.uniform_(w, -0.1234567, 0.1234567),  # bounds no other test uses (cached)
             lambda w: fastinit.kaiming_uniform_(w, a=0.77777),
             lambda w: fastinit.xavier_uniform_(w, gain=1.2345),
             lambda w: fastinit.sparse_(w, 0.5),
             lambda w: fastinit.constant_(w, 70000.0) if w.dtype == torch.float16 else fastinit.normal_(w),
             lambda w: fastinit.trunc_normal_(w, std=0.02)]
    for dtype in (torch.float32, torch.bfloat16):
        for call in calls:
            w = torch.full((64, 32), float("nan"), dtype=dtype)
            if how == "set_default_device":
                torch.set_default_device("meta")
                try:
                    call(w)
                finally:
                    torch.set_default_device(None)
            else:
                with torch.device("meta"):
                    call(w)
            assert w.device.type == "cpu" and not torch.isnan(w).any()
    w = torch.empty(4, dtype=torch.float16)
    with torch.device("meta"), pytest.raises(RuntimeError, match="overflow"):
        fastinit.constant_(w, 70000.0)  # torch's own check, on the CPU


def test_a_queued_constant_takes_a_tensor_value_as_it_is_at_the_call():
    def run(use_batched):
        torch.manual_seed(0)
        biases, x, w = [torch.empty(3) for _ in range(3)], torch.empty(3, 3), torch.empty(2)

        def body():
            val = torch.zeros(())
            for b in biases:
                fastinit.constant_(b, val)
                val += 0.5  # changes after the call
            fastinit.normal_(x)
            fastinit.constant_(w, x[0, 0])  # an element of a queued tensor
            fastinit.zeros_(x)

        if use_batched:
            with fastinit.batched():
                body()
        else:
            body()
        return [b.tolist() for b in biases], w.tolist()

    assert run(True) == run(False)
    assert run(False)[0] == [[0.0] * 3, [0.5] * 3, [1.0] * 3]


def test_fake_tensors_wrapper_subclasses_and_compile_get_torch_nn_init_itself():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    calls = [lambda t: fastinit.uniform_(t), lambda t: fastinit.normal_(t, std=0.02),
             lambda t: fastinit.trunc_normal_(t, std=0.02), lambda t: fastinit.xavier_uniform_(t),
             lambda t: fastinit.kaiming_normal_(t), lambda t: fastinit.orthogonal_(t),
             lambda t: fastinit.sparse_(t, 0.5), lambda t: fastinit.zeros_(t)]
    with FakeTensorMode():
        for call in calls[:2] + calls[3:]:
            w = torch.empty(4, 6)
            assert call(w) is w
        with pytest.raises(Exception) as theirs:  # torch's rejection loop reads values: it raises
            torch.nn.init.trunc_normal_(torch.empty(4, 6), std=0.02)
        with pytest.raises(theirs.type):
            calls[2](torch.empty(4, 6))
    for call in calls[:-1]:
        t = TwoTensor(torch.zeros(4, 6), torch.zeros(4, 6))
        call(t)
        assert t.a.abs().sum() > 0 and t.b.abs().sum() > 0  # both inner tensors filled, as torch fills them

    torch._dynamo.reset()

    def reinit(w):
        fastinit.normal_(w, std=0.02)
        return w

    w = torch.compile(reinit, backend="eager")(torch.zeros(128, 128))
    assert 0.018 < w.std().item() < 0.022


def test_torch_func_transforms_make_fx_and_fullgraph_compile_get_torch_nn_init_itself():
    """Tensors a torch.func transform wraps are plain torch.Tensor objects whose data no
    engine reaches: under functionalize a fill written there was lost, with no error (the
    result kept its zeros); vmap, grad and make_fx raised where torch works; and
    torch.compile(fullgraph=True) could not trace fastinit's own bookkeeping."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fastinit.uniform_(torch.empty(10_000))  # (a keyed call before: the lost-fill case)
    calls = [lambda t: fastinit.uniform_(t), lambda t: fastinit.normal_(t, std=0.02),
             lambda t: fastinit.trunc_normal_(t, std=0.02), lambda t: fastinit.kaiming_uniform_(t, a=math.sqrt(5)),
             lambda t: fastinit.xavier_normal_(t), lambda t: fastinit.orthogonal_(t), lambda t: fastinit.sparse_(t, 0.5)]
    for call in calls:
        out = torch.func.functionalize(call)(torch.zeros(600, 500))
        assert out.std() > 0.005, call
        g = torch.func.grad(lambda w: (call(w * 1.0) * w).sum())(torch.ones(60, 50))
        assert g.std() > 0.005
    for call in calls[:2] + calls[3:]:  # (torch's trunc_normal_ reads values: not under vmap or make_fx)
        same = torch.func.vmap(call, randomness="same")(torch.zeros(3, 60, 50))
        apart = torch.func.vmap(call, randomness="different")(torch.zeros(3, 60, 50))
        assert torch.equal(same[0], same[1]) and not torch.equal(apart[0], apart[1]) and apart.std() > 0.005
        ops = {str(n.target) for n in make_fx(call)(torch.zeros(60, 50)).graph.nodes if n.op == "call_function"}
        assert any("uniform" in o or "normal" in o for o in ops), ops  # torch's own ops, traced
    torch._dynamo.reset()
    for call in (lambda t: fastinit.zeros_(t), lambda t: fastinit.eye_(t),
                 lambda t: fastinit.kaiming_normal_(t), lambda t: fastinit.xavier_uniform_(t)):
        def f(x, call=call):
            call(x)
            return x + 1

        out = torch.compile(f, backend="eager", fullgraph=True)(torch.full((64, 64), 7.0))
        assert (out != 8.0).any()  # (every one overwrote the 7s)
        torch._dynamo.reset()


def test_lazy_parameters_raise_torchs_value_error():
    lazy = torch.nn.LazyLinear(8)
    for call in (fastinit.xavier_uniform_, fastinit.xavier_normal_, fastinit.kaiming_uniform_,
                 fastinit._calculate_fan_in_and_fan_out):
        with pytest.raises(ValueError, match="uninitialized parameter"):
            call(lazy.weight)
        with pytest.raises(ValueError):
            getattr(torch.nn.init, call.__name__)(lazy.weight)


def test_trunc_normal_warning_points_at_the_call():
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        fastinit.trunc_normal_(torch.empty(3), mean=10.0)  # the call
    assert ws and ws[0].filename == __file__


def test_memo_keys_of_checked_calls_tell_apart_what_torch_tells_apart():
    from fastinit.init import _checked_key

    t = torch.empty(2)
    args = [(0.0,), (-0.0,), (0,), (1,), (1.0,), (-1.0,), (1.0, 0.0), (0.0, 1.0), (1.0, -0.0), (-0.0, 1.0),
            (1, 0), (1.0, 0), (0.0, 0), (0, 0.0), (-1.0, 0.0), (1.0, 1.0, 0.0)]
    keys = [_checked_key("fill_", a, t) for a in args]
    assert len(set(keys)) == len(keys)
    assert _checked_key("fill_", (-0.0, 2), t) == _checked_key("fill_", (-0.0, 2), t)
    assert _checked_key("fill_", (1.0,), t) != _checked_key("fill_", (1.0,), t.half())
    assert _checked_key("fill_", (True,), t) is None and _checked_key("fill_", ("1",), t) is None


@pytest.mark.parametrize("numel", [1, 60, 6000, 420_000])
def test_negative_views_are_written_as_torch_writes_them(numel):
    """A view with the negative bit (``x._neg_view()``, the imaginary part of a conjugate)
    holds the values written into it, its memory their negation: torch's ops write it
    so; the engines, which have no numpy view of it, fill a buffer and copy it in."""
    from fastinit.specs import Normal, TruncNormal

    for name, args, kwargs, lo, hi in [("uniform_", (-1.0, 3.0), {}, -1.0, 3.0),
                                       ("uniform_", (-1.0, 3.0), {"generator": torch.Generator().manual_seed(1)},
                                        -1.0, 3.0),
                                       ("trunc_normal_", (0.0, 1.0, 0.5, 2.0), {}, 0.5, 2.0),
                                       ("trunc_normal_", (0.0, 1.0, 0.5, 2.0),
                                        {"generator": torch.Generator().manual_seed(2)}, 0.5, 2.0),
                                       ("constant_", (2.5,), {}, 2.5, 2.5)]:
        base = torch.zeros(numel)
        v = base._neg_view()
        getattr(fastinit, name)(v, *args, **kwargs)
        assert v.is_neg() and v.min() >= lo and v.max() <= hi, name
        assert torch.equal(base, -v.resolve_neg()), name
        if name == "uniform_" and not kwargs and numel <= 4096:  # torch's own op on its generator
            torch.manual_seed(5)
            fastinit.uniform_(v, *args)
            torch.manual_seed(5)
            w = torch.zeros(numel)._neg_view()
            torch.nn.init.uniform_(w, *args)
            assert torch.equal(v, w)
    # the engines' own path, and its values: those of a plain tensor with the same key
    from fastinit import engines

    for spec in (Normal(0.0, 1.0), TruncNormal(0.0, 1.0, 0.5, 2.0)):
        v, plain = torch.zeros(numel)._neg_view(), torch.zeros(numel)
        engines.fill([engines.Target(v, spec, 7)])
        engines.fill([engines.Target(plain, spec, 7)])
        assert torch.equal(v.resolve_neg(), plain)


@pytest.mark.parametrize("batched", [False, True])
def test_an_empty_tensor_draws_nothing_from_its_generator(batched):
    """torch's op on an empty tensor draws nothing: the same generator state after the call
    (fastinit drew a key, so the next call on that generator gave other values than torch's)."""
    calls = [("uniform_", ()), ("normal_", ()), ("trunc_normal_", ()), ("sparse_", (0.5,))]
    for shape in ((0, 5), (5, 0)):
        for name, args in calls:
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(0)
                t, theirs = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
                with fastinit.batched() if batched else contextlib.nullcontext():
                    getattr(fastinit, name)(t, *args, generator=g)
                getattr(torch.nn.init, name)(theirs, *args, generator=torch.Generator())
                assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state()), name
                assert t._version == theirs._version  # (the writes counted as torch's op counts them)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    fastinit.sparse_(torch.empty(5, 0), 0.5)
    assert torch.equal(torch.get_rng_state(), state)
