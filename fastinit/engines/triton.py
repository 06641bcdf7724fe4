"""The ``triton`` engine: one kernel launch per dtype for a whole batch.

CUDA tensors always; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
interpreter, how CI checks the kernels). The kernels live in
``fastinit.kernels.philox_fill``.
"""

from __future__ import annotations

import os


def check_available() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "the triton engine needs the 'triton' package (pip install triton); "
            "CPU tensors use the 'cpu' engine"
        ) from e


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fill(targets, progress=None) -> None:
    groups: dict[tuple, list] = {}
    for t in targets:
        dev = t.tensor.device
        if dev.type != "cuda" and not (dev.type == "cpu" and _interpreting()):
            raise RuntimeError(
                f"the triton engine fills CUDA tensors (got a {dev.type} tensor); on CPU it runs "
                "only under TRITON_INTERPRET=1 — use the 'cpu' or 'reference' engine"
            )
        groups.setdefault((t.tensor.dtype, dev), []).append(t)
    # Imported only now: the kernels are decorated (compiled or interpreted) on import.
    from fastinit.kernels.philox_fill import fill_batch

    for batch in groups.values():
        kinds, params = zip(*(t.spec.kernel_params() for t in batch))
        fill_batch(
            [t.tensor for t in batch],
            [(t.layout.offset, t.layout.rows, t.layout.cols, t.layout.row_stride) for t in batch],
            list(kinds),
            [t.key for t in batch],
            [p for ps in params for p in ps],
        )
        if progress is not None:
            progress(sum(t.tensor.numel() * t.tensor.element_size() for t in batch))
