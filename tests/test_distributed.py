"""Sharding invariance under torch.distributed (gloo, CPU, loopback, spawned from pytest).

Every parameter gathered with full_tensor() must equal, bit for bit, the
single-process materialization with the same seed.
"""

import socket

import pytest
import torch
import torch.distributed as dist

import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world):
    torch.multiprocessing.spawn(fn, args=(world, _free_port()), nprocs=world, join=True)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp2_deferred_model_matches_unsharded(world):
    _spawn(dist_workers.fsdp_deferred, world)


def test_fsdp2_blocks_materialized_one_by_one_match_unsharded():
    _spawn(dist_workers.fsdp_block_by_block, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_meta_model_with_init_fn_matches_unsharded(world):
    _spawn(dist_workers.fsdp_meta_init_fn, world)


def test_2d_mesh_tensor_parallel_plus_fsdp_matches_unsharded():
    _spawn(dist_workers.tp_2d, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_dropin_functions_on_dtensors(world):
    _spawn(dist_workers.dropin_dtensor, world)


def test_negative_control_catches_a_wrong_offset():
    _spawn(dist_workers.negative_control, 2)
