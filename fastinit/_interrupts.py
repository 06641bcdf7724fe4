"""Ctrl-C held back around steps that must not stop half-way."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) back for the block and deliver it after: in the main
    thread, a KeyboardInterrupt cannot land half-way through swapping tensors in, or
    through a fill that worker threads are writing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except (ValueError, TypeError):  # no signals here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)  # (None: set outside Python)
        if got:
            if callable(old):
                old(signal.SIGINT, None)
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)  # (what SIG_DFL does with it: the process ends)
            # (SIG_IGN, or a handler set outside Python: ignored, as it would have been)
