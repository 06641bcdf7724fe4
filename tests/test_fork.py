"""The CPU engine in forked children and under concurrent thread-count changes.

Each scenario runs in a fresh interpreter with a timeout, so a hang (a child
waiting on a thread pool that did not survive the fork) fails the test instead
of stalling the suite.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

FORK = textwrap.dedent(
    """
    import multiprocessing as mp, os, torch, fastinit
    from fastinit.engines.cpu import CHUNK

    N = 3 * CHUNK + 5  # several chunks: the parent's fill starts the engine's thread pool

    def fill(seed):
        # (checked with numpy: torch's own parallel reductions are what may not survive
        # a fork, with GNU OpenMP, as torch's documentation says)
        torch.manual_seed(seed)
        w = torch.empty(N)
        fastinit.trunc_normal_(w, std=0.02)
        fastinit.kaiming_uniform_(u := torch.empty(N // 64, 64))
        fastinit.normal_(v := torch.empty(N))
        return [float(x.numpy().astype("float64").sum()) for x in (w, u, v)], w.numpy()[:: CHUNK // 3].tolist()

    if __name__ == "__main__":
        torch.set_num_threads(2)
        parent = [fill(s) for s in range(4)]                 # the pool exists now
        with mp.get_context("fork").Pool(2) as pool:         # children forked from it
            children = pool.map(fill, range(4))
        assert children == parent, "forked children filled other values"
        pid = os.fork()                                      # a bare fork, too
        if pid == 0:
            os._exit(0 if fill(2) == parent[2] else 3)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, status
        print("ok")
    """
)

THREADS = textwrap.dedent(
    """
    import threading, torch, fastinit
    from fastinit.engines import Target, fill
    from fastinit.engines.cpu import CHUNK
    from fastinit.specs import Normal, TruncNormal, Uniform

    SPECS = [Uniform(-1.0, 1.0), Normal(0.0, 0.02), TruncNormal(0.0, 0.02, -2.0, 2.0), TruncNormal()]
    N = 2 * CHUNK + 7

    def make(i):
        t = torch.empty(N)
        fill([Target(t, SPECS[i % len(SPECS)], 1000 + i)])
        return t

    torch.set_num_threads(1)
    expected = [make(i) for i in range(8)]
    results, errors, stop = {}, [], threading.Event()

    def worker(k):
        try:
            for r in range(6):
                for i in range(8):
                    if not torch.equal(make(i), expected[i]):
                        errors.append(f"thread {k} round {r} tensor {i}")
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    n = 0
    while any(t.is_alive() for t in threads):
        torch.set_num_threads(1 + n % 3)                     # while the others fill
        n += 1
        threads[0].join(0.002)
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert n > 3, n
    print("ok")
    """
)


def _run(code: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env, preexec_fn=os.setsid)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung children too
        proc.communicate()
        raise AssertionError("timed out: a fill hung") from None
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.strip().endswith("ok")


def test_forked_children_fill_at_once_with_the_parents_values():
    _run(FORK)


def test_thread_count_changes_while_other_threads_fill_change_nothing():
    _run(THREADS)


INTERRUPT = textwrap.dedent(
    """
    import os, signal, threading, time, torch, fastinit

    torch.set_num_threads(2)
    n = 1 << 25  # many chunks: the pool's threads write while the main thread waits
    for delay in (0.002, 0.02, 0.05):
        w = torch.full((n,), float("nan"))  # (normal_ never writes a NaN; it may write an exact 0)
        timer = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
        try:
            timer.start()
            fastinit.normal_(w)
            timer.join()
            time.sleep(0.05)  # (the handler runs here if the fill was quicker than the timer)
        except KeyboardInterrupt:
            pass
        timer.join()
        first = int((~w.isnan()).sum())
        time.sleep(0.2)
        assert first in (0, n) and int((~w.isnan()).sum()) == first, (delay, first)  # whole, or not begun
    print("ok")
    """
)


def test_ctrl_c_during_a_parallel_fill_leaves_it_whole_or_untouched():
    """Like torch's one op: the interrupt is delivered once the workers are done, so
    no worker writes into the tensor after the call has raised."""
    _run(INTERRUPT)


FORK_WHILE_RECORDING = textwrap.dedent(
    """
    import os, threading, torch, torch.nn as nn
    import fastinit
    from fastinit.deferred import hooks

    inside, release = threading.Event(), threading.Event()

    def build():
        inside.set()
        release.wait(60)
        return nn.Linear(2, 2)

    th = threading.Thread(target=fastinit.deferred_init, args=(build,))
    th.start()
    inside.wait(60)
    assert "__new__" in torch.Tensor.__dict__  # (the other thread records: hooks in)
    pid = os.fork()
    if pid == 0:  # the child: no thread records here, so no hook stays in torch
        clean = "__new__" not in torch.Tensor.__dict__ and hooks._installed == 0 \\
            and type(torch.FloatTensor).__name__ == "tensortype"
        m = fastinit.deferred_init(nn.Linear, 3, 3)
        fastinit.materialize(m, seed=0)
        os._exit(0 if clean and "__new__" not in torch.Tensor.__dict__ else 1)
    _, status = os.waitpid(pid, 0)
    release.set()
    th.join()
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert "__new__" not in torch.Tensor.__dict__
    print("ok")
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_child_forked_while_another_thread_records_keeps_no_hook():
    _run(FORK_WHILE_RECORDING)
