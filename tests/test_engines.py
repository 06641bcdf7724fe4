"""Engine properties: determinism, thread-count invariance, stream independence,
the layout (shard) contract, and the reference Philox."""

import pytest
import torch

import fastinit
from fastinit import rng
from fastinit.engines import Layout, Target, fill, use_engine
from fastinit.engines.cpu import CHUNK, chunk_generator
from fastinit.specs import Constant, Normal, TruncNormal, Uniform
from stats_util import check_against, exact_dist

SPECS = [Uniform(-1.0, 2.0), Normal(0.5, 3.0), TruncNormal(0.0, 1.0, -2.0, 2.0), Constant(0.25)]


# ---------------------------------------------------------------- reference Philox

KAT = [  # Random123 kat_vectors, philox4x32 with 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_reference_philox_meets_known_answers(ctr, key, expected):
    out = rng.philox4x32(torch.tensor(ctr, dtype=torch.int64), torch.tensor(key, dtype=torch.int64))
    assert tuple(out.tolist()) == expected


def test_reference_philox_batches_and_broadcasts():
    ctr = torch.tensor([k[0] for k in KAT], dtype=torch.int64)
    key = torch.tensor([k[1] for k in KAT], dtype=torch.int64)
    assert rng.philox4x32(ctr, key).tolist() == [list(k[2]) for k in KAT]


def test_giles_erfinv_is_accurate_across_the_range():
    t = torch.cat([torch.logspace(-37.5, 0, 4000), torch.linspace(1e-3, 1.999, 20001)]).float()
    ours = rng.erfinv_f32(t).double()
    exact = torch.special.ndtri(t.double() / 2) / 2**0.5
    assert ((ours - exact).abs() / exact.abs().clamp_min(1e-6)).max() < 2e-6


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("engine", ["cpu", "reference"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_values_depend_on_key_and_index_only(engine, spec):
    n = 2 * CHUNK + 1001 if engine == "cpu" else 5003
    with use_engine(engine):
        a = torch.empty(n)
        fill([Target(a, spec, 42)])
        torch.set_num_threads(1)
        b = torch.empty(n)
        fill([Target(b, spec, 42)])
        torch.set_num_threads(2)
        c = torch.empty(n)
        # Batched with other tensors, in another order: same values.
        others = [torch.empty(777), torch.empty(CHUNK + 5)]
        fill([Target(others[0], Normal(), 1), Target(c, spec, 42), Target(others[1], Uniform(), 2)])
    assert torch.equal(a, b) and torch.equal(a, c)
    if spec.random:
        d = torch.empty(n)
        with use_engine(engine):
            fill([Target(d, spec, 43)])
        assert not torch.equal(a, d)


def test_many_threads_and_one_thread_agree_on_a_big_batch():
    targets = lambda: [torch.empty(s) for s in (CHUNK * 3 + 17, 5, CHUNK - 1, 40_000)]  # noqa: E731
    outs = []
    for nt in (1, 2, 3):
        torch.set_num_threads(nt)
        ts = targets()
        fill([Target(t, s, 100 + i) for i, (t, s) in enumerate(zip(ts, SPECS))])
        outs.append(ts)
    for ts in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], ts))


def test_concurrent_calls_from_user_threads_match_serial_ones():
    """Fills from several user threads share the engine's pool and per-thread
    buffers: each must still get exactly its own (key, index) values."""
    from concurrent.futures import ThreadPoolExecutor

    n = 3 * CHUNK + 77
    specs = [Uniform(-1.0, 1.0), Normal(0.0, 2.0), TruncNormal(0.0, 1.0, -1.0, 1.0)] * 3
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 3
    with use_engine("cpu"):
        serial = []
        for i, (spec, dt) in enumerate(zip(specs, dtypes)):
            t = torch.empty(n, dtype=dt)
            fill([Target(t, spec, 1000 + i)])
            serial.append(t)
        outs = [torch.empty(n, dtype=dt) for dt in dtypes]

        def one(i):
            with use_engine("cpu"):
                fill([Target(outs[i], specs[i], 1000 + i)])

        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(one, range(len(specs))))
    for a, b in zip(serial, outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- independence


def test_chunk_streams_never_repeat():
    # 20k chunks of one key, 20k keys of one chunk, and keys equal in their low
    # 32 bits (where a torch-seeded generator per chunk would collide).
    seen = set()
    firsts = []
    for c in range(20_000):
        firsts.append(tuple(torch.empty(4).uniform_(generator=chunk_generator(7, c)).tolist()))
    for k in range(20_000):
        firsts.append(tuple(torch.empty(4).uniform_(generator=chunk_generator(k << 32 | 5, 0)).tolist()))
    seen.update(firsts)
    assert len(seen) == len(firsts)
    # the SFC64 streams (uniform, truncated normal) too: first raw words of 40k chunk states
    from fastinit.engines import cpu

    raw = set()
    for k, c in [(7, c) for c in range(20_000)] + [(k << 32 | 5, 0) for k in range(20_000)]:
        raw.add(int(cpu.chunk_numpy_generator(k, c).sfc.random_raw()))
    assert len(raw) == 40_000


def test_neighbours_chunk_boundaries_and_calls_are_uncorrelated():
    n = 4 * CHUNK
    torch.manual_seed(0)
    a = fastinit.normal_(torch.empty(n))
    b = fastinit.normal_(torch.empty(n))
    bound = 5 / n**0.5

    def corr(x, y):
        return torch.corrcoef(torch.stack([x, y]))[0, 1].item()

    assert abs(corr(a[:-1], a[1:])) < bound  # lag 1
    assert abs(corr(a[:-4], a[4:])) < bound  # lag 4 (one Philox call on GPU)
    assert abs(corr(a, b)) < bound  # two calls
    # Across chunk boundaries: the tail of chunk c against the head of chunk c+1.
    tails = torch.cat([a[c * CHUNK - 2000 : c * CHUNK] for c in (1, 2, 3)])
    heads = torch.cat([a[c * CHUNK : c * CHUNK + 2000] for c in (1, 2, 3)])
    assert abs(corr(tails, heads)) < 5 / 6000**0.5
    # No chunk repeats another, within one tensor or across the two.
    firsts = {tuple(t[c * CHUNK : c * CHUNK + 4].tolist()) for t in (a, b) for c in range(4)}
    assert len(firsts) == 8


def test_reference_engine_matches_torch_distributions():
    with use_engine("reference"):
        torch.manual_seed(2)
        u = fastinit.uniform_(torch.empty(200_000), -1, 1)
        z = fastinit.normal_(torch.empty(200_003), 2, 0.5)
        t = fastinit.trunc_normal_(torch.empty(200_001), 0, 1, -1, 2)
        with pytest.warns(UserWarning, match="more than 2 std"):
            tail = fastinit.trunc_normal_(torch.empty(100_000), 0, 1, -6, -5)
    check_against(u.numpy(), exact_dist("uniform", a=-1, b=1), label="ref uniform")
    check_against(z.numpy(), exact_dist("normal", mean=2, std=0.5), label="ref normal")
    check_against(t.numpy(), exact_dist("trunc_normal", mean=0, std=1, a=-1, b=2), label="ref trunc")
    check_against(tail.numpy(), exact_dist("trunc_normal", mean=0, std=1, a=-6, b=-5), label="ref tail")
    assert u.max() < 1 and t.min() >= -1 and t.max() <= 2


def test_cpu_rounding_to_half_types_is_torchs():
    """The cpu engine rounds float32 to bfloat16/float16 piece by piece: it must give
    torch's conversion bit for bit, ties to even, signs, subnormals and extremes included."""
    from fastinit.engines import cpu

    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**31), 2**31, (200_000,), dtype=torch.int64, generator=g).to(torch.int32)
    v = bits.view(torch.float32)
    v = v[torch.isfinite(v)]
    ties = (torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3.4e38, -3.4e38, 65504.0, 65520.0, 6e-8, 1e-3])
    v = torch.cat([v, ties[torch.isfinite(ties)], special, torch.randn(10_000, generator=g)])
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(v.numel(), dtype=dtype)
        for s in range(0, v.numel(), cpu.CHUNK):
            part = v[s : s + cpu.CHUNK]
            cpu._round_into(part.numpy(), cpu._numpy_view(out)[s : s + part.numel()])
        assert torch.equal(out.view(torch.int16), v.to(dtype).view(torch.int16)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_normal_fallback_when_torchs_generator_state_is_unknown(monkeypatch, dtype):
    """A torch whose CPU generator state layout differs must not break normal fills:
    they switch to Box–Muller on numpy's SFC64, exact in distribution, keyed and
    thread-count invariant like the rest."""
    from scipy import stats

    from fastinit.engines import cpu

    n = 2 * CHUNK + 1001
    spec = Normal(0.5, 3.0)
    with use_engine("cpu"):
        torch_path = torch.empty(n, dtype=dtype)
        fill([Target(torch_path, spec, 42)])
        monkeypatch.setattr(cpu, "_use_torch_normal", lambda: False)
        a, b, c = (torch.empty(n, dtype=dtype) for _ in range(3))
        fill([Target(a, spec, 42)])
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            fill([Target(b, spec, 42)])
        finally:
            torch.set_num_threads(threads)
        fill([Target(c, spec, 43)])
    assert not torch.equal(a, torch_path)  # the fallback ran
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    check_against(a.numpy(), stats.norm(0.5, 3.0), label=f"fallback normal {dtype}")
    # the cosine and sine halves of each chunk are independent normals
    h = (CHUNK + 1) // 2
    assert abs(torch.corrcoef(torch.stack([a[:h], a[h:2 * h]]).double())[0, 1]) < 5 / h**0.5


def test_cpu_uniform_keeps_its_resolution_for_subnormal_spans():
    # x = lo + j * (span 2^-24) would round a subnormal scale away; torch keeps ~54k values here
    x = torch.empty(100_000)
    with use_engine("cpu"):
        fastinit.uniform_(x, 0.0, 1e-40)
    assert x.min() >= 0 and x.max() < 1e-40 and x.unique().numel() > 40_000


# ---------------------------------------------------------------- layouts (shards)


def _box_layout(shape, r0, r1, c0, c1):
    """Layout of the box rows [r0, r1) x cols [c0, c1) of a 2-D tensor of ``shape``."""
    R, C = shape
    if c0 == 0 and c1 == C:
        return Layout(r0 * C, 1, (r1 - r0) * C, (r1 - r0) * C, R * C)
    return Layout(r0 * C + c0, r1 - r0, c1 - c0, C, R * C)


@pytest.mark.parametrize("engine", ["cpu", "reference"])
@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_box_of_the_global_tensor_gets_exactly_its_elements(engine, spec, dtype):
    shape = (700, 1201) if engine == "cpu" else (37, 45)
    full = torch.empty(shape, dtype=dtype)
    with use_engine(engine):
        fill([Target(full, spec, 9)])
        R, C = shape
        for r0, r1, c0, c1 in [(0, R, 0, C), (3, R - 2, 0, C), (1, R, 5, C - 3), (0, R // 3, 7, 8), (R - 1, R, 1, C)]:
            part = torch.empty(r1 - r0, c1 - c0, dtype=dtype)
            fill([Target(part, spec, 9, _box_layout(shape, r0, r1, c0, c1))])
            assert torch.equal(part, full[r0:r1, c0:c1]), (r0, r1, c0, c1)


@pytest.mark.parametrize("engine", ["cpu", "reference", "triton"])
def test_engines_fill_parameters_that_require_grad(engine):
    # Targets reach the engines as given (no detached copy per call): each engine
    # must write a leaf that requires grad without autograd noticing.
    if engine == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if engine == "triton" and torch.cuda.is_available() else "cpu"
    p = torch.nn.Parameter(torch.empty(3, 700, device=dev))
    plain = torch.empty(3, 700, device=dev)
    with use_engine(engine):
        fill([Target(p, Normal(0.0, 1.0), 11)])
        fill([Target(plain, Normal(0.0, 1.0), 11)])
    assert p.requires_grad and p.grad_fn is None and p.is_leaf
    assert torch.equal(p.detach(), plain)


def test_the_version_setter_takes_either_form_of_torchs_private_binding(monkeypatch):
    from fastinit.engines import alias

    real = torch._C._autograd._unsafe_set_version_counter

    def one_tensor_form(t, v):  # the binding's form in older torch: (Tensor, int)
        if not isinstance(t, torch.Tensor):
            raise TypeError("incompatible function arguments")
        real((t,), (v,))

    for binding in (real, one_tensor_form):
        monkeypatch.setattr(torch._C._autograd, "_unsafe_set_version_counter", binding)
        setter = alias.version_setter()
        t, u = torch.empty(3), torch.empty(2)
        setter((t, u), (5, 7))
        assert t._version == 5 and u._version == 7
    monkeypatch.delattr(torch._C._autograd, "_unsafe_set_version_counter")
    assert alias.version_setter() is None


def test_a_far_tail_truncated_window_draws_its_probabilities_in_float64(monkeypatch):
    """In float32 the lowest of the 2^24 steps of p would hold the whole far tail: one
    value (ndtri(tiny32) = -13 std) once in 2^24 draws. The tail must be spread."""
    import math

    import numpy as np

    from fastinit.engines import cpu

    seen = []
    real = torch.special.ndtri

    def ndtri(x, *a, **k):
        seen.append(x.dtype)
        return real(x, *a, **k)

    monkeypatch.setattr(torch.special, "ndtri", ndtri)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.empty(5000, dtype=dtype)
        fill([Target(w, TruncNormal(0.0, 1.0, 0.0, math.inf), 11)])
        assert w.min() >= 0 and torch.isfinite(w).all()
    assert seen and set(seen) == {torch.float64}
    # the lowest draw maps beyond float32's reach: p = 2^-53 of the window, not 2^-24
    monkeypatch.setattr(cpu, "_np_uniform", lambda st_, o, lo, hi, top=None: o.__setitem__(
        slice(None), lo + (hi - lo) * 2.0**-53))
    out = np.empty(4, dtype=np.float32)
    cpu._trunc_icdf(cpu._Keyed(11, 0), out, TruncNormal(0.0, 1.0, 0.0, math.inf))
    assert 8.0 < out[0] < 8.5  # -ndtri(2^-54): the tail, not one lump at 13 std
