"""The ``reference`` engine: Philox4x32-10 in plain torch, on any device.

Slow (tens of millions of elements per second at best) and bit-identical to the
``triton`` engine for uniform and constant specs; normal and truncated normal
agree with it to float32 rounding (``log``, ``cos`` and ``sin`` differ in the last
bit between implementations). It is the oracle for the kernels and answers "what
would the GPU have produced?" on a CPU.
"""

from __future__ import annotations

import torch

from .. import rng

BLOCK = 1 << 20  # elements per step, bounds the temporaries


def check_available() -> None:
    return None


def global_indices(layout, start: int, stop: int, device) -> torch.Tensor:
    """Global flat indices of local elements [start, stop) of a target with ``layout``."""
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    if layout.rows == 1:
        return j + layout.offset
    return layout.offset + (j // layout.cols) * layout.row_stride + j % layout.cols


def fill(targets, progress=None) -> None:
    for t in targets:
        kind, params = t.spec.kernel_params()
        flat = t.tensor.detach().view(-1)
        n = flat.numel()
        for s in range(0, n, BLOCK):
            e = min(n, s + BLOCK)
            g = global_indices(t.layout, s, e, flat.device)
            words = rng.philox_words(g, t.key)
            vals = rng.words_to_values(words, g & 3, kind, params)
            flat[s:e].copy_(vals)
            if progress is not None:
                progress((e - s) * flat.element_size())
