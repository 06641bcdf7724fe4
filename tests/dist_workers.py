"""Worker bodies for the multi-process tests (importable by spawned processes)."""

import gc

import torch
import torch.distributed as dist
import torch.nn as nn

import fastinit

SEED = 1234


class Block(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        nn.init.trunc_normal_(self.q.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.orthogonal_(self.o.weight)  # replayed, not fused
        nn.init.normal_(self.up.weight, std=0.02)
        with torch.no_grad():  # scalar edits after a random fill: replayed on each shard, exactly
            self.up.weight.div_(6 ** 0.5)  # (GPT-2's residual scaling)
            self.down.weight.add_(0.1, alpha=0.3)


class TinyLM(nn.Module):
    """Sizes chosen not to divide by 2 or 4: uneven and padded shards."""

    def __init__(self, vocab=101, d=38, ffn=70, layers=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=1)
        self.blocks = nn.ModuleList(Block(d, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.register_buffer("freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
        # A random op outside init calls, and a tensor computed from another's value.
        self.pos = nn.Parameter(torch.randn(5, d) * 0.02)
        self.q_twice = nn.Parameter(self.blocks[0].q.weight.detach() * 2)


def run(rank, world, rendezvous, name):
    """Spawned entry point: join the group, run worker ``name``, leave cleanly.

    The worker's models and meshes (which hold the process group) are gone,
    collected, before the group is destroyed: a process group whose last
    reference dies only at interpreter exit is torn down with its native threads
    still running, and the process aborts ("terminate called without an active
    exception", SIGABRT) about once in 15 runs. A file rendezvous: no TCP store
    hosted by rank 0, no port picked free and then taken by another process.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    globals()[name](rank, world)
    gc.collect()
    dist.barrier()  # leave together
    dist.destroy_process_group()


def _reference():
    ref = fastinit.deferred_init(TinyLM)
    fastinit.materialize(ref, device="cpu", seed=SEED)
    return ref


def _compare(model, ref, perturb=False):
    from torch.distributed.tensor import DTensor

    ref_t = dict(ref.named_parameters())
    ref_t.update(dict(ref.named_buffers()))
    n_dt = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        full = t.full_tensor() if isinstance(t, DTensor) else t
        n_dt += isinstance(t, DTensor)
        want = ref_t[name]
        if perturb:
            want = want.clone()
            want.view(-1)[-1] += 1.0
        assert torch.equal(full.detach(), want.detach()), f"{name} differs from the unsharded model"
    return n_dt


def _check_sharded_deferred(rank, world, make_mesh, shard_block):
    """deferred_init -> shard every block (and FSDP the root) -> materialize -> compare."""
    from torch.distributed.fsdp import fully_shard

    import fastinit.distributed as dm

    full_replay = dm.replay_into

    def no_full_embedding(real, compute, spec=None, key=0, name=""):
        # The padding-row edit of the sharded embedding must stay shard-local.
        assert not (dm.is_dtensor(real) and name == "emb.weight"), "emb.weight computed whole on a rank"
        return full_replay(real, compute, spec, key, name)

    dm.replay_into = no_full_embedding
    mesh = make_mesh()
    model = fastinit.deferred_init(TinyLM)
    for b in model.blocks:
        shard_block(b, mesh)
    fully_shard(model, mesh=mesh["dp"] if mesh.mesh_dim_names else mesh)
    fastinit.materialize(model, device="cpu", seed=SEED)
    assert _compare(model, _reference()) > 0


def fsdp_deferred(rank, world):
    """deferred_init -> fully_shard per layer -> materialize."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _check_sharded_deferred(rank, world, lambda: init_device_mesh("cpu", (world,)),
                            lambda block, mesh: fully_shard(block, mesh=mesh))


def fsdp_block_by_block(rank, world):
    """deferred_init -> fully_shard per block -> materialize block by block, then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = fastinit.deferred_init(TinyLM)
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for b in model.blocks:
        fastinit.materialize(b, device="cpu", seed=SEED)
        assert not any(t.is_meta for t in b.parameters())
    assert any(t.is_meta for t in model.parameters())  # the rest is still deferred
    fastinit.materialize(model, device="cpu", seed=SEED)
    assert _compare(model, _reference()) > 0


def fsdp_init_after_sharding_is_refused(rank, world):
    """Init added after fully_shard to a deferred model cannot reach its records: an
    error naming the way around it (it was silently dropped), and nothing changes."""
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = fastinit.deferred_init(TinyLM)
    fully_shard(model, mesh=mesh)
    with pytest.raises(NotImplementedError, match="sharded after deferred_init"):
        fastinit.materialize(model, device="cpu", seed=SEED, init_fn=lambda m: fastinit.zeros_(m.norm.weight))
    assert all(t.is_meta for t in model.parameters())
    with pytest.raises(NotImplementedError, match="sharded after deferred_init"):
        with fastinit.batched(module=model):
            fastinit.normal_(model.emb.weight)
    fastinit.materialize(model, device="cpu", seed=SEED)  # the model's own init, as recorded
    assert _compare(model, _reference()) > 0


def fsdp_cast_then_shard_and_scheme_after_sharding(rank, world):
    """A deferred model cast before fully_shard materializes as the unsharded cast model
    (its recorded edits were dropped for a default init); a scheme applied after
    sharding a deferred model is refused (it was silently dropped); on a real sharded
    model a scheme zeroes the padding row (indexing the DTensor wrote a temporary)."""
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastinit.schemes import Orthogonal

    mesh = init_device_mesh("cpu", (world,))
    model = fastinit.deferred_init(TinyLM).half()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fastinit.materialize(model, device="cpu", seed=SEED)
    ref = fastinit.deferred_init(TinyLM).half()
    fastinit.materialize(ref, device="cpu", seed=SEED)
    assert _compare(model, ref) > 0
    # materialize(dtype=...) of a sharded model: FSDP2's own _apply is no cast of another
    # kind, so the shards are filled straight in the target dtype, as the unsharded model
    from fastinit.deferred.api import _casting_themselves, _walk

    model = fastinit.deferred_init(TinyLM)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert _casting_themselves(_walk(model))[0] == []
    fastinit.materialize(model, device="cpu", seed=SEED, dtype=torch.bfloat16)
    ref = fastinit.deferred_init(TinyLM)
    fastinit.materialize(ref, device="cpu", seed=SEED, dtype=torch.bfloat16)
    assert _compare(model, ref) > 0
    model = fastinit.deferred_init(TinyLM)
    fully_shard(model, mesh=mesh)
    with pytest.raises(NotImplementedError, match="sharded after deferred_init"):
        fastinit.apply_scheme(model, fastinit.Scheme("s", [fastinit.Rule(0.5)]), seed=0)
    fastinit.materialize(model, device="cpu", seed=SEED)  # real and sharded: a scheme zeroes padding rows
    fastinit.apply_scheme(model, fastinit.Scheme("s", [fastinit.Rule(0.5)]), seed=0)
    emb = model.emb.weight.full_tensor()
    assert (emb[1] == 0).all() and (emb[0] == 0.5).all() and (emb[2:] == 0.5).all()
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="need.*the whole tensor"):  # refused before any write
        fastinit.apply_scheme(model, fastinit.Scheme("o", [fastinit.Rule(0.25, name="bias"),
                                                           fastinit.Rule(Orthogonal(), ndim=2), fastinit.Rule(1.0)]), seed=0)
    assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())


def tp_2d(rank, world):
    """2-D mesh: tensor parallel (Colwise/Rowwise) inside, FSDP across."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def shard(block, mesh):
        parallelize_module(block, mesh["tp"], {"q": ColwiseParallel(), "o": RowwiseParallel(),
                                               "up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])

    _check_sharded_deferred(
        rank, world,
        lambda: init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp")), shard)


def fsdp_meta_init_fn(rank, world):
    """A plain meta model sharded first, materialized with init_fn."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def build():
        return nn.Sequential(nn.Linear(30, 21), nn.GELU(), nn.Linear(21, 7))

    def init_fn(m):
        for layer in (m[0], m[2]):
            fastinit.normal_(layer.weight, std=0.1)
            fastinit.constant_(layer.bias, 0.5)

    with torch.device("meta"):
        model = build()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    fastinit.materialize(model, seed=SEED, init_fn=init_fn, device="cpu")
    with torch.device("meta"):
        ref = build()
    fastinit.materialize(ref, seed=SEED, init_fn=init_fn, device="cpu")
    for (n, t), r in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(t.full_tensor(), r), n


def dropin_dtensor(rank, world):
    """fastinit.normal_ on a DTensor equals the same call on a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for placement in (Shard(0), Shard(1), Replicate()):
        for fn, args in ((fastinit.normal_, (0.0, 2.0)), (fastinit.trunc_normal_, ()),
                         (fastinit.kaiming_uniform_, ()), (fastinit.uniform_, (-1.0, 1.0))):
            dt = distribute_tensor(torch.zeros(13, 7), mesh, [placement])
            fn(dt, *args, generator=torch.Generator().manual_seed(5))
            plain = fn(torch.zeros(13, 7), *args, generator=torch.Generator().manual_seed(5))
            assert torch.equal(dt.full_tensor(), plain), (placement, fn.__name__)
    # Structured inits would treat each shard as the whole tensor (torch's own eye_ and
    # dirac_ then write wrong values without an error): an error, nothing written.
    import pytest

    for fn, shape, error in ((fastinit.eye_, (6, 8), NotImplementedError),
                             (fastinit.dirac_, (4, 4, 3), NotImplementedError),
                             (fastinit.orthogonal_, (6, 8), NotImplementedError),
                             (lambda t: fastinit.sparse_(t, 0.5), (6, 8), RuntimeError)):
        dt = distribute_tensor(torch.full(shape, -7.0), mesh, [Shard(0)])
        with pytest.raises(error, match="DTensors are not supported"):
            fn(dt)
        assert (dt.full_tensor() == -7).all()


def dropin_dtensor_default_generator(rank, world):
    """Without generator=, a small CPU tensor takes torch's own draw (no key): so does
    a DTensor of the same shape, whole on each rank, its box kept; torch's generator
    ends where the unsharded call leaves it. A Partial("sum") DTensor is refused
    (filled on every rank it would be world-size times the values), nothing drawn."""
    import pytest
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for placement in (Shard(0), Shard(1), Replicate()):
        for fn, args, shape, dtype in (
                (fastinit.normal_, (0.0, 2.0), (40, 40), torch.float32), (fastinit.normal_, (), (512, 512), torch.float32),
                (fastinit.uniform_, (-1.0, 1.0), (13, 7), torch.float32), (fastinit.trunc_normal_, (), (13, 7), torch.float32),
                (fastinit.kaiming_uniform_, (), (64, 33), torch.float32), (fastinit.xavier_normal_, (), (9, 11), torch.float32),
                (fastinit.normal_, (), (40, 40), torch.bfloat16), (fastinit.uniform_, (), (30, 30), torch.float16)):
            dt = distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, [placement])
            torch.manual_seed(11)
            fn(dt, *args)
            after = torch.random.get_rng_state()
            torch.manual_seed(11)
            plain = fn(torch.zeros(shape, dtype=dtype), *args)
            assert torch.equal(dt.full_tensor(), plain), (placement, fn.__name__, shape, dtype)
            assert torch.equal(after, torch.random.get_rng_state()), (placement, fn.__name__, shape, dtype)
    for fn, shape in ((fastinit.ones_, (6, 5)), (fastinit.normal_, (6, 5)), (fastinit.normal_, (600, 600)),
                      (lambda t: fastinit.uniform_(t, generator=torch.Generator()), (6, 5))):
        for op in ("sum", "avg"):  # (the average of equal values rounds: (x + x + x) / 3 is not x)
            dt = DTensor.from_local(torch.full(shape, -7.0), mesh, [Partial(op)])
            state = torch.random.get_rng_state()
            with pytest.raises(NotImplementedError, match=f"the {op} over ranks"):
                fn(dt)
            assert (dt.to_local() == -7).all() and torch.equal(state, torch.random.get_rng_state())
    # Zeros are zeros under any reduction; the maximum or minimum of equal values is them.
    dt = DTensor.from_local(torch.full((6, 5), -7.0), mesh, [Partial()])
    fastinit.zeros_(dt)
    assert (dt.full_tensor() == 0).all()
    dt = DTensor.from_local(torch.zeros(6, 5), mesh, [Partial("max")])
    fastinit.normal_(dt, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dt.full_tensor(), fastinit.normal_(torch.zeros(6, 5), generator=torch.Generator().manual_seed(3)))
    # materialize refuses a Partial("sum") parameter before allocating anything.
    m = fastinit.deferred_init(nn.Linear, 10, 14)
    for pn, p in list(m.named_parameters()):
        m.register_parameter(pn, nn.Parameter(DTensor.from_local(torch.empty(p.shape, device="meta"), mesh,
                                                                 [Partial()])))
    with pytest.raises(NotImplementedError, match="weight has the placement"):
        fastinit.materialize(m, device="cpu", seed=1)
    assert all(p.is_meta for p in m.parameters())

    def zeroed(part):
        lin = nn.Linear(10, 14)
        nn.init.zeros_(lin.weight[:3] if part else lin.weight)
        nn.init.zeros_(lin.bias)
        return lin

    for part in (False, True):  # zeros whole: allowed; zeros in part, the rest left: refused
        m = fastinit.deferred_init(zeroed, part)
        for pn, p in list(m.named_parameters()):
            m.register_parameter(pn, nn.Parameter(DTensor.from_local(torch.empty(p.shape, device="meta"), mesh,
                                                                     [Partial()])))
        if part:
            with pytest.raises(NotImplementedError, match="weight has the placement"):
                fastinit.materialize(m, device="cpu", seed=1, strict=False)
            continue
        fastinit.materialize(m, device="cpu", seed=1)
        assert all((p.full_tensor() == 0).all() for p in m.parameters())
    # Dtypes the engines do not hold are refused alike (torch's fill_ would sum the ranks' ones).
    dt = DTensor.from_local(torch.zeros(3, dtype=torch.int64), mesh, [Partial()])
    with pytest.raises(NotImplementedError, match="the sum over ranks"):
        fastinit.ones_(dt)
    fastinit.zeros_(dt)


def fsdp_seed_none_wrappers_and_replaced_parameters(rank, world):
    """Sharded, ``materialize(seed=None)`` keys every rank with the first rank's seed
    (ranks seeded differently would each key their shards their own way: a patchwork);
    blocks wrapped after recording (activation checkpointing, then fully_shard) and
    materialized one by one are keyed by their names in the model (no warning that
    they get alike values); an init_fn assigning a new Parameter where fully_shard
    manages one is a clear error, the model as it was."""
    import warnings

    import pytest
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(100 + rank)
    model = fastinit.deferred_init(TinyLM)
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    seed = fastinit.materialize(model, device="cpu").seed
    seeds = [None] * world
    dist.all_gather_object(seeds, seed)
    assert len(set(seeds)) == 1, seeds
    ref = fastinit.deferred_init(TinyLM)
    fastinit.materialize(ref, device="cpu", seed=seed)
    assert _compare(model, ref) > 0
    if world == 4:  # a 2-D (dp, tp) mesh: agreed along both dimensions
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        lin = fastinit.deferred_init(nn.Linear, 6, 8)
        for pn, p in list(lin.named_parameters()):
            lin.register_parameter(pn, nn.Parameter(distribute_tensor(p, mesh2, [Replicate(), Shard(0)])))
        seed = fastinit.materialize(lin, device="cpu").seed
        dist.all_gather_object(seeds, seed)
        assert len(set(seeds)) == 1, seeds

    model = fastinit.deferred_init(TinyLM)
    for i in range(len(model.blocks)):
        model.blocks[i] = checkpoint_wrapper(model.blocks[i])
        fully_shard(model.blocks[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in model.blocks:
            fastinit.materialize(b, device="cpu", seed=SEED)
    assert not [w for w in caught if "same values" in str(w.message)], [str(w.message) for w in caught]
    fastinit.materialize(model, device="cpu", seed=SEED)
    got = {n.replace("._checkpoint_wrapped_module", ""): t for n, t in model.named_parameters()}
    ref = _reference()
    for n, t in ref.named_parameters():
        assert torch.equal(got[n].full_tensor(), t), n

    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    fully_shard(m, mesh=mesh)
    before = dict(m.named_parameters())

    def assigns(mm):
        for lin in mm:
            fastinit.normal_(lin.weight)
            fastinit.zeros_(lin.bias)
        mm[1].bias = nn.Parameter(torch.ones(2))

    with pytest.raises(RuntimeError, match="1.bias is managed by fully_shard"):
        fastinit.materialize(m, device="cpu", seed=SEED, init_fn=assigns)
    after = dict(m.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is t and t.is_meta for n, t in before.items())

    def assigns_real(mm):  # (a real tensor: kept by materialize, still not FSDP2's)
        assigns(mm)
        mm[1].bias = nn.Parameter(torch.tensor([5.0, 6.0]))

    with pytest.raises(RuntimeError, match="1.bias is managed by fully_shard"):
        fastinit.materialize(m, device="cpu", seed=SEED, init_fn=assigns_real)
    after = dict(m.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is t and t.is_meta for n, t in before.items())


def negative_control(rank, world):
    """The comparison catches a shard filled one element off."""
    from fastinit.engines import Layout, Target, fill

    model = fastinit.deferred_init(TinyLM)
    fastinit.materialize(model, device="cpu", seed=SEED)
    ref = _reference()
    try:
        _compare(model, ref, perturb=True)
    except AssertionError:
        pass
    else:
        raise AssertionError("a perturbed reference went unnoticed")
    # And a shard filled at the wrong offset differs from the right one.
    right, wrong = torch.empty(50), torch.empty(50)
    fill([Target(right, fastinit.Normal(), 9, Layout(100, 1, 50, 50, 1000))])
    fill([Target(wrong, fastinit.Normal(), 9, Layout(101, 1, 50, 50, 1000))])
    assert not torch.equal(right, wrong) and torch.equal(right[1:], wrong[:-1])
