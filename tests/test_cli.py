"""The command line: help, a small preset end to end, every error case, compare."""

import json
import subprocess
import sys

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
