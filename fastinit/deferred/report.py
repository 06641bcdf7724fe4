"""Report: what every tensor received (``materialize``) or will receive (``planned``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..specs import InitSpec


@dataclass
class MaterializeReport:
    """What every tensor received. ``entries[name]`` is a one-line description;
    ``fused`` counts tensors filled by the engine in one batch, ``replayed``
    those that needed replayed ops; ``tensors`` counts tensor objects (a tied
    tensor has several names in ``entries``); ``seed`` is the seed used."""

    seed: int
    device: torch.device
    entries: dict[str, str]
    fused: int
    replayed: int
    bytes: int
    seconds: float
    tensors: int | None = None

    def __str__(self) -> str:
        n = len(self.entries) if self.tensors is None else self.tensors
        names = f" under {len(self.entries)} names" if n != len(self.entries) else ""
        lines = [f"materialized {n} tensors{names} ({self.bytes / 2**20:.1f} MiB) on {self.device} "
                 f"in {self.seconds:.2f}s, seed {self.seed}: {self.fused} fused, {self.replayed} replayed"]
        lines += [f"  {k}: {v}" for k, v in self.entries.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class Planned:
    """What a deferred tensor will get when it is materialized: ``spec``, the
    :class:`~fastinit.specs.InitSpec` of its fused fill, which is its value's law
    (None when its value is replayed, e.g. an ``orthogonal_`` or a computed buffer,
    or edited after the fill other than by filling a part, as an Embedding's padding
    row: ``w.mul_(100)``), ``description``
    (the line ``materialize``'s report will show), ``uninitialized`` (why
    strict mode would reject it, or None) and ``nonfinite`` (a fill or a scalar
    edit after it puts NaN or inf into it: ``w[0].fill_(nan)``, ``w.mul_(inf)``)."""

    spec: InitSpec | None
    description: str
    uninitialized: str | None = None
    nonfinite: bool = False

    def __str__(self) -> str:
        return self.description
