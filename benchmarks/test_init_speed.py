"""pytest-benchmark suite: fastinit vs torch.nn.init per case (group = case).

    python -m pytest benchmarks/test_init_speed.py --benchmark-only

With --benchmark-disable (CI) every case runs once on a small tensor, so the
suite cannot rot; the speed numbers come from real runs (see the README).
"""

import pytest
import torch

import fastinit
from benchmarks.init_speed import CASES, shape_for

BIG = 64 * 2**20
SMALL = 1 << 16


@pytest.mark.parametrize("lib", ["torch", "fastinit"])
@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
def test_init_speed(benchmark, case, lib):
    name, dtype, fn_name, args = case
    numel = SMALL if benchmark.disabled else BIG
    t = torch.empty(shape_for(numel), dtype=dtype)
    fn = getattr(torch.nn.init if lib == "torch" else fastinit, fn_name)
    benchmark.group = name
    benchmark.extra_info["numel"] = t.numel()
    benchmark.pedantic(fn, args=(t, *args), rounds=1 if benchmark.disabled else 5, warmup_rounds=1)
    assert torch.isfinite(t).all()
    assert t.float().std() > 0


def test_unavailable_device_is_a_one_line_error(capsys):
    from benchmarks.init_speed import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no CUDA device" in err, err
