"""The ``triton`` engine: one kernel launch per dtype for a whole batch.

CUDA tensors always; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
interpreter, how CI checks the kernels). The kernels live in
``fastinit.kernels.philox_fill``: a batch of one tensor (every drop-in call)
takes its single-target kernel, with scalar arguments and a direct launch once
compiled; larger batches one table-driven launch per dtype.
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
    """CPU tensors are accepted (read per call, for CPU tensors only;
    benchmarks/host_path.py replaces it to time the CUDA path on CPU tensors
    with the launch stubbed)."""
    return os.environ.get("TRITON_INTERPRET") == "1"

_pf = None  # fastinit.kernels.philox_fill, imported on the first fill


def _kernels():
    global _pf
    if _pf is None:
        check_available()  # (a clear error where triton is missing; engines.fill checks it too)
        # Imported only now: the kernels are decorated (compiled or interpreted) on import.
        from fastinit.kernels import philox_fill

        _pf = philox_fill
    return _pf


def _device_error(dev) -> RuntimeError:
    return RuntimeError(
        f"the triton engine fills CUDA tensors (got a {dev.type} tensor); on CPU it runs "
        "only under TRITON_INTERPRET=1 — use the 'cpu' or 'reference' engine"
    )


def check_device(tensor) -> None:
    """The error for a tensor this engine cannot reach."""
    if not (tensor.is_cuda or (tensor.is_cpu and _interpreting())):
        raise _device_error(tensor.device)


def _launch_one(tensor, spec, key: int, offset: int, rows: int, cols: int, row_stride: int) -> None:
    """One launch for one contiguous tensor, scalar arguments (a direct launch once
    its kernel is compiled)."""
    check_device(tensor)
    kind, params = spec.kernel_params()
    (_pf or _kernels()).fill_one(tensor, offset, rows, cols, row_stride, kind, key, params)


def fill_one(tensor, spec, key: int) -> bool:
    """A whole contiguous tensor (a drop-in call)."""
    n = tensor.numel()
    _launch_one(tensor, spec, key, 0, 1, n, n)
    return True


def fill(targets, progress=None) -> None:
    if len(targets) == 1:  # a drop-in call on a view, or a batch of one
        t = targets[0]
        lay = t.layout
        _launch_one(t.tensor, t.spec, t.key, lay.offset, lay.rows, lay.cols, lay.row_stride)
        if progress is not None:
            progress(t.tensor.numel() * t.tensor.element_size())
        return
    groups: dict[tuple, list] = {}
    for t in targets:
        check_device(t.tensor)
        groups.setdefault((t.tensor.dtype, t.tensor.device), []).append(t)
    fill_batch = _kernels().fill_batch
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
