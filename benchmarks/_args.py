"""Argument checks the benchmark scripts share."""

from __future__ import annotations

import argparse


def check_device(ap: argparse.ArgumentParser, text: str) -> None:
    """Exit with a one-line usage error (code 2) unless ``text`` names a device this
    machine has (``cpu``, or ``cuda`` where CUDA is available)."""
    import torch

    try:
        device_type = torch.device(text).type
    except (RuntimeError, ValueError):
        ap.exit(2, f"{ap.prog}: error: --device {text!r} is not a device (use cpu or cuda)\n")
    if device_type == "cuda" and not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: error: --device {text}: no CUDA device is available (use --device cpu)\n")
