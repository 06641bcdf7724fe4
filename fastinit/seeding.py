"""Keys: every filled tensor gets a 64-bit key.

* Drop-in calls draw their key from ``generator=`` or torch's default CPU
  generator (:func:`draw_key`), so ``torch.manual_seed`` governs them and two
  calls never share a stream.
* Materialization derives the key from ``(seed, fully-qualified name)`` and, for
  a fill that is not the tensor's final one, its place among the tensor's recorded
  events counted from the final fill (:func:`key_for_name` of ``"name#k"``), so a
  parameter's values depend neither on the order of init, nor on other
  parameters, devices or sharding.
"""

from __future__ import annotations

import hashlib
import numbers
import threading

import torch

from ._sink import no_modes

MASK64 = (1 << 64) - 1
_local = threading.local()


def splitmix64(x: int) -> int:
    """One step of SplitMix64's finalizer: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def draw_key(generator: torch.Generator | None = None) -> int:
    """Draw a fresh 64-bit key from ``generator`` (default: torch's default CPU generator).

    CPU generators advance by two 32-bit draws. CUDA generators (Philox, a seed
    and an offset) are read and advanced on the host, with no device sync.
    """
    if generator is None or generator.device.type == "cpu":
        # The draws of torch.randint(0, 2**32, (2,)), into this thread's buffer
        # (same values, no allocation: this is on the path of every drop-in call).
        buf = getattr(_local, "buf", None)
        # (no torch function mode sees these: a recorder would make the buffer a meta tensor)
        with no_modes():
            if buf is None:
                with torch.inference_mode(False):  # usable in and out of inference mode
                    buf = _local.buf = torch.empty(2, dtype=torch.int64, device="cpu")
            # (the default generator unnamed: torch's argument parser is quicker without one)
            w = (buf.random_(0, 1 << 32) if generator is None else buf.random_(0, 1 << 32, generator=generator))
        w = w.tolist()
        return splitmix64((w[0] << 32) | w[1])
    g = generator
    offset = g.get_offset()
    g.set_offset(offset + 4)
    return splitmix64(splitmix64(g.initial_seed() & MASK64) ^ offset)


def check_seed(seed, where: str) -> None:
    """A seed is an int torch's ``manual_seed`` takes (-2**63 <= seed < 2**64), or None:
    anything else would be reduced to another seed's values without a word."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{where}: seed must be an int or None, not {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"{where}: seed must be in [-2**63, 2**64), got {seed}")


def key_for_name(seed: int, name: str) -> int:
    """The key of the tensor called ``name`` in a model materialized with ``seed``."""
    h = hashlib.blake2b(f"{int(seed) & MASK64}:{name}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 63-bit seed drawn from torch's default generator (``materialize(seed=None)``)."""
    return draw_key(generator) >> 1
