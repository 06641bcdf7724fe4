"""Which caller a warning names: the first frame outside some packages."""

from __future__ import annotations

import sys


def first_frame_outside(packages: tuple[str, ...], depth: int):
    """``(frame, stacklevel)``: the first frame, from ``depth`` levels above the caller
    (0: the caller itself) up, whose module is in none of ``packages`` (top-level
    names), and the ``warnings.warn`` stacklevel that names it from the caller; or
    ``(None, ...)``."""
    f, level = sys._getframe(depth + 1), depth + 1
    while f is not None and f.f_globals.get("__name__", "").partition(".")[0] in packages:
        f, level = f.f_back, level + 1
    return f, level
