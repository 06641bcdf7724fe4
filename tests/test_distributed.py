"""Sharding invariance under torch.distributed (gloo, CPU, loopback, spawned from pytest).

Every parameter gathered with full_tensor() must equal, bit for bit, the
single-process materialization with the same seed.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _spawn(fn, world):
    with tempfile.TemporaryDirectory() as d:  # a fresh rendezvous file per run
        torch.multiprocessing.spawn(dist_workers.run, args=(world, os.path.join(d, "rendezvous"), fn.__name__),
                                    nprocs=world, join=True)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp2_deferred_model_matches_unsharded(world):
    _spawn(dist_workers.fsdp_deferred, world)


def test_fsdp2_blocks_materialized_one_by_one_match_unsharded():
    _spawn(dist_workers.fsdp_block_by_block, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_meta_model_with_init_fn_matches_unsharded(world):
    _spawn(dist_workers.fsdp_meta_init_fn, world)


def test_init_after_sharding_a_deferred_model_is_refused():
    _spawn(dist_workers.fsdp_init_after_sharding_is_refused, 2)


def test_a_deferred_model_cast_then_sharded_and_schemes_after_sharding():
    _spawn(dist_workers.fsdp_cast_then_shard_and_scheme_after_sharding, 2)


def test_2d_mesh_tensor_parallel_plus_fsdp_matches_unsharded():
    _spawn(dist_workers.tp_2d, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_dropin_functions_on_dtensors(world):
    _spawn(dist_workers.dropin_dtensor, world)


@pytest.mark.parametrize("world", [1, 2])
def test_dropin_default_generator_on_dtensors_equals_unsharded(world):
    _spawn(dist_workers.dropin_dtensor_default_generator, world)


@pytest.mark.parametrize("world", [2, 4])
def test_seed_none_wrapped_blocks_and_replaced_parameters_under_fsdp2(world):
    _spawn(dist_workers.fsdp_seed_none_wrappers_and_replaced_parameters, world)


def test_negative_control_catches_a_wrong_offset():
    _spawn(dist_workers.negative_control, 2)
