"""The command line: help, a small preset end to end, every error case, compare."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastinit.cli import EXIT_MEMORY, EXIT_USAGE, main


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastinit", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_explains_every_option():
    out = _run("bench", "--help")
    assert out.returncode == 0
    for opt in ("--model", "--device", "--dtype", "--seed", "--repeat", "--json", "llama-1b", "gpt2-xl",
                "llama-8b", "convnet"):
        assert opt in out.stdout
    top = _run("--help")
    assert "bench" in top.stdout and "compare" in top.stdout


def test_small_preset_end_to_end_with_json(tmp_path):
    path = tmp_path / "out.json"
    out = _run("bench", "--model", "llama-tiny", "--device", "cpu", "--json", str(path))
    assert out.returncode == 0, out.stderr
    data = json.loads(path.read_text())
    methods = [r["method"] for r in data["rows"]]
    assert methods == ["memset (floor)", "torch eager", "torch meta+to_empty+init",
                       "fastinit deferred_init+materialize"]
    for r in data["rows"]:
        assert r["seconds"] > 0 and r["params"] == data["rows"][0]["params"] > 0
        for key in ("bytes", "Mparams_per_s", "GB_per_s", "pct_of_memset", "fastinit_speedup"):
            assert key in r
        assert r["method"].split()[0] in out.stdout  # every row is in the printed table
    assert data["check"]["ok"] and data["check"]["checked"] > 0
    assert "statistical check" in out.stdout and "-> ok" in out.stdout
    assert "[4/4]" in out.stderr  # progress while it runs


def test_unknown_preset_lists_the_presets():
    out = _run("bench", "--model", "gpt5")
    assert out.returncode == EXIT_USAGE
    assert "llama-1b" in out.stderr and "convnet" in out.stderr


def test_unavailable_device_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--device", "cuda", "--model", "llama-tiny"]) == EXIT_USAGE
    assert "no CUDA device" in capsys.readouterr().err


def test_not_enough_memory_is_refused_with_the_estimate(monkeypatch, capsys):
    import fastinit.cli as cli

    monkeypatch.setattr(cli, "_available_bytes", lambda device: 1 << 20)
    assert main(["bench", "--model", "llama-tiny", "--device", "cpu"]) == EXIT_MEMORY
    err = capsys.readouterr().err
    assert "needs about" in err and "only 0.0 GB is available" in err and "bfloat16" in err


def test_compare_orders_the_schemes_and_writes_a_png(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "loss.png", tmp_path / "res.json"
    out = _run("compare", "--plot", str(png), "--json", str(js))  # the default: 2 epochs
    assert out.returncode == 0, out.stderr
    acc = {r["scheme"]: r["val_accuracy"] for r in json.loads(js.read_text())}
    assert acc["zeros"] < 0.2 and acc["ones"] < 0.2  # symmetric: near chance (10 classes)
    rule = acc["general rule ±1/√n"]
    assert rule > acc["zeros"] + 0.5 and rule > acc["ones"] + 0.5
    # The classic order: constant < uniform [0, 1) < centred < scaled by 1/sqrt(n).
    assert acc["ones"] + 0.15 < acc["uniform [0, 1)"] < acc["uniform [-0.5, 0.5)"] - 0.15
    assert acc["uniform [-0.5, 0.5)"] < max(rule, acc["normal(0, 1/√n)"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 500


# ------------------------------------------------------------------ usage errors: one line, exit 2


@pytest.mark.parametrize("argv, says", [
    (["bench", "--device", "banana"], "not a device"),
    (["bench", "--device", "tpu"], "cpu or cuda"),
    (["bench", "--repeat", "0"], "--repeat must be at least 1"),
    (["bench", "--threads", "-1"], "--threads must be at least 0"),
    (["bench", "--json", "/nonexistent-folder/x.json"], "does not exist"),
    (["bench", "--preset", "gpt5"], "llama-1b"),
    (["bench", "--repeat", "many"], "invalid int"),
    (["compare", "--epochs", "0"], "--epochs must be at least 1"),
    (["compare", "--plot", "/nonexistent-folder/x.png"], "does not exist"),
    (["compare", "--json", "/nonexistent-folder/x.json"], "does not exist"),
    (["compare", "--scheme", "xavier_uniform,nope"], "unknown scheme"),
    (["compare", "--scheme", "dcgan"], "has no rule for"),
    (["compare", "--scheme", ""], "no scheme named"),
    (["compare", "--scheme", " , "], "no scheme named"),
    (["audit", "nope"], "neither a preset"),
    (["audit", "no_such_module_xyz:f"], "cannot import"),
    (["audit", "torch.nn:NoSuchLayer"], "has no attribute"),
    (["audit", "llama-tiny", "--scheme", "nope"], "unknown scheme"),
    (["audit", "llama-tiny", "--input-shape", "2,x"], "--input-shape"),
    (["audit", "llama-tiny", "--deferred", "--input-shape", "2,4"], "--deferred"),
    (["audit", "llama-tiny", "--json", "/nonexistent-folder/a.json"], "does not exist"),
    (["audit", "llama-tiny", "--plot", "/nonexistent-folder/a.png"], "does not exist"),
    (["audit", "llama-tiny", "--device", "banana"], "not a device"),
    (["bench", "--seed", str(2**64)], "out of range"),
    (["bench", "--seed", "-1"], "out of range"),
    (["bench", "--seed", "abc"], "invalid seed"),
    (["compare", "--epochs", "1", "--plot", "", "--seed", "99999999999999999999999"], "out of range"),
    (["audit", "llama-tiny", "--seed", "99999999999999999999999"], "out of range"),
    (["audit", "llama-tiny", "--input-shape", "100000,100000"], "too large"),
    (["audit", "llama-tiny", "--input-shape", "1,99999999999999999999"], "too large"),
    (["compare", "--scheme", "uniform [0, 1),nope"], "unknown scheme(s) 'nope';"),
    (["audit", "convnet", "--scheme", "lsuv", "--input-shape", "2,3"], "--scheme lsuv: RuntimeError"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, says, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert err.count("\n") == 1 and says in err, err
    assert "Traceback" not in err


def test_seed_range_is_torchs():
    import torch

    from fastinit.cli import _seed

    assert _seed(str(2**64 - 1)) == 2**64 - 1 and _seed("0") == 0
    torch.Generator().manual_seed(2**64 - 1)  # the largest seed torch takes ...
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator().manual_seed(2**64)  # ... and the first it refuses


def test_bench_help_has_no_doubled_percent():
    out = _run("bench", "--help")
    assert "% of memset" in out.stdout and "%%" not in out.stdout


def test_example_input_allocation_failure_is_a_usage_error(monkeypatch, capsys):
    import fastinit.cli as cli

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory\nException raised from alloc_cpu")

    monkeypatch.setattr(cli, "_example_input", fail)
    assert main(["audit", "llama-tiny", "--input-shape", "2,16"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "can't allocate memory" in err and "--input-shape" in err, err


def test_compare_scheme_names_with_commas():
    from fastinit.compare import SCHEMES, split_schemes
    from fastinit.schemes import SCHEMES as BUILTIN

    every = list(SCHEMES) + list(BUILTIN)  # every name the error message lists
    assert split_schemes([",".join(every)]) == every
    assert split_schemes(every) == every
    assert split_schemes(["xavier_uniform, uniform [0, 1) ,lsuv", " , "]) == ["xavier_uniform", "uniform [0, 1)",
                                                                              "lsuv"]


def test_compare_runs_classic_rows_whose_names_have_commas(tmp_path):
    pytest.importorskip("sklearn")
    js = tmp_path / "a.json"
    argv = ["compare", "--epochs", "1", "--plot", "", "--seed", str(2**64 - 1), "--json", str(js),
            "--scheme", "uniform [0, 1),general_rule", "--scheme", "normal(0, 1/√n)"]
    assert main(argv) == 0
    assert [r["scheme"] for r in json.loads(js.read_text())] == ["uniform [0, 1)", "general_rule",
                                                                  "normal(0, 1/√n)"]


def test_usage_errors_in_a_fresh_process_are_one_line():
    for argv in (["bench", "--device", "banana"], ["compare", "--epochs", "0"], ["bench", "--threads", "-1"],
                 ["audit", "llama-tiny", "--input-shape", "100000,100000"],
                 ["compare", "--epochs", "1", "--plot", "", "--seed", "99999999999999999999999"]):
        out = _run(*argv)
        assert out.returncode == EXIT_USAGE and out.stderr.count("\n") == 1, out.stderr


def test_preset_is_an_alias_of_model():
    from fastinit.cli import _Parser  # noqa: F401 - the parser main() builds
    import fastinit.cli as cli

    seen = {}
    real = cli.bench
    try:
        cli.bench = lambda args: seen.setdefault("model", args.model) and 0
        main(["bench", "--preset", "llama-tiny"])
        assert seen["model"] == "llama-tiny"
    finally:
        cli.bench = real
    assert "--preset" in _run("bench", "--help").stdout


def test_compare_is_reproducible_and_takes_builtin_schemes(tmp_path):
    pytest.importorskip("sklearn")
    js1, js2 = tmp_path / "a.json", tmp_path / "b.json"
    argv = ["compare", "--epochs", "1", "--plot", "", "--scheme", "general_rule,kaiming_normal",
            "--scheme", "lsuv", "--scheme", "ones"]
    assert main(argv + ["--json", str(js1)]) == 0
    assert main(argv + ["--json", str(js2)]) == 0
    a, b = json.loads(js1.read_text()), json.loads(js2.read_text())
    assert [r["scheme"] for r in a] == ["general_rule", "kaiming_normal", "lsuv", "ones"]
    assert a == b  # the same table, to the last bit, from one run to the next
    acc = {r["scheme"]: r["val_accuracy"] for r in a}
    assert acc["ones"] < 0.2 and min(acc["general_rule"], acc["kaiming_normal"], acc["lsuv"]) > 0.6


_FACTORIES = '''
import torch.nn as nn


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def zeros():
    m = mlp()
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def not_a_model():
    return 3
'''


def test_audit_a_factory_with_scheme_input_json_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "fi_factories.py").write_text(_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    rc = main(["audit", "fi_factories:mlp", "--scheme", "kaiming_normal", "--input-shape", "64,16",
               "--json", str(js), "--plot", str(png), "--strict"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(js.read_text())
    assert data["ok"] and data["scheme"] == "kaiming_normal" and len(data["layers"]) == 3
    assert "| 0.weight" in out and "no flags" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a zeros model: flagged, exit 4 with --strict, 0 without
    assert main(["audit", "fi_factories:zeros", "--strict"]) == 4
    assert "[symmetry] 0.weight" in capsys.readouterr().out
    assert main(["audit", "fi_factories:zeros"]) == 0
    capsys.readouterr()
    assert main(["audit", "fi_factories:not_a_model"]) == EXIT_USAGE
    assert "not an nn.Module" in capsys.readouterr().err


def test_audit_a_deferred_preset_allocates_nothing(capsys):
    assert main(["audit", "llama-tiny", "--deferred", "--expect", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "plan of a deferred model" in out and "layers.0.q_proj.weight" in out


def test_audit_of_presets_with_an_input_runs_their_forward(tmp_path):
    js = tmp_path / "a.json"
    assert main(["audit", "llama-tiny", "--input-shape", "2,16", "--json", str(js)]) == 0
    layers = json.loads(js.read_text())["layers"]
    assert len(layers) > 10 and all(x["act_std"] > 0 for x in layers)
    assert main(["audit", "llama-tiny", "--scheme", "lsuv", "--input-shape", "2,16"]) == 0


def test_the_call_cost_benchmark_runs_every_row():
    """Its stubs replace engine functions: a change of their signatures must not break it."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.call_cost", "--repeat", "40"], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| call")]
    assert len(rows) == 8 and all(line.rstrip().endswith("x |") for line in rows)


def test_audit_plot_without_matplotlib_is_refused_before_any_work(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (import matplotlib raises ImportError)
    assert main(["audit", "llama-tiny", "--plot", "a.png"]) == EXIT_USAGE
    out = capsys.readouterr()
    assert "needs matplotlib" in out.err and out.out == ""  # (no table: nothing ran)
