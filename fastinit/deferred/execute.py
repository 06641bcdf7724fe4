"""Execute: compute real values from records, then swap them in, all or nothing.

* :class:`Evaluator` computes the value any recorded storage has just before a
  recorded step: its start (a fill keyed by ``(seed, name)``, the creating op,
  or a replayed event), then the events after it. A tensor read by another
  tensor's replay (a copy made in a constructor) is computed exactly as its own
  plan computes it, so copies stay copies. Random ops get explicit generators
  (or, for the few that take none, the device's default generator is seeded and
  restored around the op): no global generator is consumed or reset.
* :func:`compute` allocates every tensor of a plan (each DTensor rank only its
  shard), fills all fusable specs in one engine batch and replays the rest.
  Nothing in the module changes.
* :func:`swap_in` puts the real tensors in place of the meta ones everywhere
  they appear, with interrupts held back, and undoes itself if anything fails.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import threading
import time

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .. import distributed as dist_mod
from .. import engines
from .._interrupts import interrupts_held
from ..engines import Target
from ..seeding import key_for_name
from ..specs import Constant, Normal, Uniform
from . import intercept
from .hooks import DefaultDraws
from .intercept import FACTORIES, RANDOM_NAMES, SHAPE_ONLY, tensors_in
from .plan import Plan, events_before, fill_tag, start_of
from .record import MODULE_KEYS, Recording, StorageRecord, recording_of, storage_key, storage_numel


class ReplayError(RuntimeError):
    """A recorded op could not be replayed on real tensors."""


def temp_names(rec: Recording) -> dict[int, str]:
    """Names for the storages a model never names (``torch.randn(d)`` in
    ``nn.Parameter(torch.randn(d) * 0.02)``): ``owner<k>``, after the named storage
    (or named temporary) that reads it first, in recorded order. A function of the
    records alone, so every materialization (whole, block by block, any order)
    keys a temporary the same way, and other tensors do not change its name."""
    names = dict(rec.names)
    out: dict[int, str] = {}
    queue = sorted(names.items(), key=lambda kv: rec.storages[kv[0]].born if kv[0] in rec.storages else 0)
    claims: dict[int, tuple[int, str]] = {}  # temp -> (seq of its first read, reader name)
    i = 0
    while i < len(queue):
        sk, name = queue[i]
        i += 1
        r = rec.storages.get(sk)
        if r is None:
            continue
        reads = []
        if r.node is not None:
            reads.append((r.node.seq, r.node.args, r.node.kwargs))
        for e in r.events:
            if e.kind == "op":
                reads.append((e.seq, e.args, e.kwargs))
        mine = []
        for seq, args, kwargs in reads:
            for t in tensors_in(args, kwargs):
                if t.is_meta:
                    tsk = storage_key(t)
                    if tsk != sk and tsk in rec.storages and tsk not in names and tsk not in claims:
                        claims[tsk] = (seq, name)
                        mine.append(tsk)
        for k, tsk in enumerate(mine):
            names[tsk] = out[tsk] = f"{name}<{k}>"
            queue.append((tsk, out[tsk]))
    return out


_NO_GENERATOR = frozenset({"dropout", "dropout_", "feature_dropout", "alpha_dropout", "rrelu", "rrelu_",
                           "gumbel_softmax", "dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout",
                           "alpha_dropout_", "feature_alpha_dropout_", "feature_dropout_"})


@functools.lru_cache(maxsize=None)
def _takes_generator(fn) -> bool:
    """Whether a recorded op accepts ``generator=``: torch's random builtins do
    (but dropout); Python functions say so in their signature."""
    if not inspect.isfunction(fn):
        name = getattr(fn, "__name__", "")
        return name in RANDOM_NAMES and name not in _NO_GENERATOR
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# Argument types that are leaves for pytree: :meth:`Evaluator.resolve` passes them through.
_LEAVES = frozenset({int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.Size,
                     torch.layout, torch.memory_format, slice, type(Ellipsis)})


def autocast_device_types() -> list[str]:
    """The device types whose autocast is on in this thread (CPU and CUDA, those torch
    has; ``torch.autocast`` contexts and the state they set are per thread)."""
    on = []
    for dt in ("cpu", "cuda"):
        if dt == "cuda" and not torch.cuda.is_available():
            continue
        try:
            if torch.is_autocast_enabled(dt):
                on.append(dt)
        except TypeError:  # (an older torch: one flag per backend)
            if (torch.is_autocast_cpu_enabled() if dt == "cpu" else torch.is_autocast_enabled()):
                on.append(dt)
    return on


@contextlib.contextmanager
def without_autocast():
    """Every autocast region of this thread off for the block: a replay computes what
    the recorded code computed, which ran on meta tensors, untouched by autocast (a
    ``materialize`` called inside ``torch.autocast`` would otherwise compute a
    constructor's ``a @ a.t()`` buffer in bfloat16)."""
    with contextlib.ExitStack() as stack:
        for dt in autocast_device_types():
            stack.enter_context(torch.autocast(device_type=dt, enabled=False))
        yield


class Evaluator:
    """Computes real values of recorded storages on ``device`` (in recorded dtypes),
    keyed by ``seed``. ``deterministic``: values read while a model is built,
    which must not depend on random draws (there is no seed yet)."""

    def __init__(self, device: torch.device, seed: int | None, *, deterministic: bool = False,
                 prefixes: dict[int, str] | None = None):
        self.device = device
        self.seed = seed
        self.deterministic = deterministic
        self.prefixes = prefixes or {}  # id(recording) -> path of its root in the model materialized
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self._temp: dict[int, dict[int, str]] = {}

    @classmethod
    def deterministic(cls, rec: Recording) -> "Evaluator":
        return cls(torch.device("cpu"), None, deterministic=True)

    # ------------------------------------------------------------ names and keys

    def name(self, rec: Recording, r: StorageRecord) -> str:
        n = rec.names.get(r.sk)
        if n is None:
            tn = self._temp.get(id(rec))
            if tn is None:
                tn = self._temp[id(rec)] = temp_names(rec)
            n = tn.get(r.sk, f"<unnamed {r.born}>")
        p = self.prefixes.get(id(rec))
        return f"{p}.{n}" if p else n

    def key(self, rec: Recording, r: StorageRecord, tag: str) -> int:
        if self.deterministic:
            raise ReplayError("a random draw")
        return key_for_name(self.seed, self.name(rec, r) + tag)

    def _random(self, what: str, rec: Recording, r: StorageRecord):
        raise RuntimeError(
            f"fastinit: code that fastinit records (a constructor under deferred_init, materialize's "
            f"init_fn, a batched(module=...) block) reads the value of a deferred tensor, and that value "
            f"depends on random draws ({what}), which are only made when the model is materialized with a "
            "seed (a copy into a real tensor reads it too). Build this model eagerly, or move the step "
            "that reads it after materialize()")

    # ------------------------------------------------------------ values

    def value(self, t: torch.Tensor, seq: int) -> torch.Tensor:
        """Real value of meta tensor ``t`` as it was just before recorded step ``seq``."""
        found = recording_of(t)
        if found is None:
            raise ReplayError(f"a meta tensor of shape {tuple(t.shape)} that no recording holds")
        rec, r = found
        flat = self.storage_value(rec, r, seq)
        if t.dtype != flat.dtype:  # a view that reinterprets the bytes (w.view(torch.int32))
            flat = flat.view(t.dtype)
        return flat.as_strided(t.shape, t.stride(), t.storage_offset())

    def resolve(self, obj, seq: int):
        """``obj`` with meta tensors as their values before step ``seq``, and real
        tensors recorded on the CPU (an index, data) moved to the device."""
        def real(x):
            if not isinstance(x, torch.Tensor):
                return x
            if x.is_meta:
                return self.value(x, seq)
            return x.to(self.device) if x.device != self.device and x.dim() else x

        def walk(x):  # (tuples, lists and dicts of leaves here; other containers through pytree)
            t = type(x)
            if t is tuple or t is list:
                return t(walk(y) for y in x)
            if t is dict:
                return {k: walk(v) for k, v in x.items()}
            if t in _LEAVES or isinstance(x, torch.Tensor):
                return real(x)
            return tree_map(real, x)
        return walk(obj)

    def storage_value(self, rec: Recording, r: StorageRecord, seq: int | None) -> torch.Tensor:
        """The flat value of storage ``r`` just before step ``seq`` (None: the end)."""
        events = events_before(r, seq)
        ck = (r.sk, len(events))
        hit = self.cache.get(ck)
        if hit is not None:
            return hit
        dtype = r.tensor.dtype
        st = start_of(events, r.node, dtype)
        if st.kind == "creation":
            base = self._creation_value(rec, r)
        else:
            if st.kind == "none" and self.deterministic:
                raise RuntimeError("fastinit.deferred_init: the model reads uninitialized memory while it is built")
            base = torch.empty(storage_numel(r.tensor), dtype=dtype, device=self.device)
        todo = [events[st.index], *st.rest] if st.kind == "event" else st.rest
        if st.kind == "fill":
            if st.spec.random and self.deterministic:
                self._random(repr(st.spec), rec, r)
            ev = r.events[st.index] if st.index is not None else None
            key = ev.key if ev is not None and ev.key is not None else (
                self.key(rec, r, fill_tag(r.events, st.index)) if st.spec.random else 0)
            _fill(base if ev is None else base.as_strided(*ev.geom), st.spec, key)
        offset = len(events) - len(todo)  # todo is a suffix of the events
        self.apply(rec, r, base, todo, offset)
        self.cache[ck] = base
        return base

    def _creation_value(self, rec: Recording, r: StorageRecord) -> torch.Tensor:
        node = r.node
        if self.deterministic and getattr(node.func, "__name__", "") in RANDOM_NAMES:
            self._random(node.label, rec, r)
        args = self.resolve(node.args, node.seq)
        kwargs = self.resolve(node.kwargs, node.seq)
        if node.func in FACTORIES or node.func in SHAPE_ONLY or str(kwargs.get("device")) == "meta":
            kwargs["device"] = self.device
        try:
            with _default_dtype(node.default_dtype):
                out = self._call(node.func, args, kwargs, lambda: self.key(rec, r, "#create"))
        except ReplayError:
            raise
        except Exception as e:
            raise ReplayError(f"{self.name(rec, r)}: cannot replay {node.label} ({type(e).__name__}: {e})") from e
        flat = [out] if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
        x = flat[r.out_index] if r.out_index < len(flat) else None
        if not isinstance(x, torch.Tensor) or x.shape != r.tensor.shape:
            raise ReplayError(f"{self.name(rec, r)}: cannot replay {node.label} (its result has another shape)")
        base = torch.empty(storage_numel(r.tensor), dtype=r.tensor.dtype, device=self.device)
        with torch.no_grad():
            base.as_strided(r.tensor.shape, r.tensor.stride(), r.tensor.storage_offset()).copy_(x)
        return base

    def _call(self, func, args, kwargs, key):
        """Run a recorded op; a random one draws from a generator keyed by ``key()``."""
        name = getattr(func, "__name__", "")
        takes = _takes_generator(func)
        if name not in RANDOM_NAMES and not takes:
            guard = DefaultDraws(self.device)  # (no global generator is read: other threads draw from them)
            with guard:
                out = func(*args, **kwargs)
            if guard.drew:  # it would have drawn from the global generator, unkeyed
                raise ReplayError(f"{name or func} draws random numbers from torch's global generator, which "
                                  "materialize does not key by the seed; make this tensor after materialize()")
            return out
        k = key() & ((1 << 63) - 1)
        if takes:
            # torch's builtins want a generator on the tensors' device; fastinit's
            # functions draw their key from any generator.
            gen = torch.Generator(device="cpu" if inspect.isfunction(func) else self.device)
            try:
                return func(*args, **{**kwargs, "generator": gen.manual_seed(k)})
            except TypeError as e:
                if "generator" not in str(e):
                    raise
        # an op that takes no generator (dropout): its draws take a keyed one, not the global
        # generator seeded and put back (which rewound what other threads drew meanwhile)
        with DefaultDraws(self.device, torch.Generator(device=self.device).manual_seed(k)):
            return func(*args, **kwargs)

    def apply(self, rec: Recording, r: StorageRecord, base: torch.Tensor, events, offset: int) -> None:
        """Replay ``events`` (those of ``r`` from index ``offset`` on) on the real ``base``."""
        with torch.no_grad():
            for idx, ev in enumerate(events, offset):
                view = base.as_strided(*ev.geom)
                try:
                    if ev.kind == "fill":
                        if ev.spec.random and self.deterministic:
                            self._random(repr(ev.spec), rec, r)
                        key = ev.key if ev.key is not None else (
                            self.key(rec, r, fill_tag(r.events, idx)) if ev.spec.random else 0)
                        _fill(view, ev.spec, key)
                    elif ev.kind == "side":  # it writes here among others (batch_norm's running stats)
                        self._replay_side(rec, r, ev, view, idx)
                    elif "out" in ev.kwargs:  # torch.eye(n, m, out=w)
                        args = self.resolve(ev.args, ev.seq)
                        kwargs = {**self.resolve({k: v for k, v in ev.kwargs.items() if k != "out"}, ev.seq),
                                  "out": view}  # (what out= held before is not read)
                        self._call(ev.func, args, kwargs, lambda: self.key(rec, r, f"#{idx}"))
                    else:  # a method or init function whose first argument is the tensor
                        if self.deterministic and ev.label in RANDOM_NAMES:
                            self._random(ev.label, rec, r)
                        args = self.resolve(ev.args[1:], ev.seq)
                        kwargs = self.resolve(ev.kwargs, ev.seq)
                        self._call(ev.func, (view, *args), kwargs, lambda: self.key(rec, r, f"#{idx}"))
                except (ReplayError, KeyboardInterrupt):
                    raise
                except Exception as e:
                    if self.deterministic and isinstance(e, RuntimeError) and "random draws" in str(e):
                        raise
                    raise ReplayError(f"{self.name(rec, r)}: cannot replay {ev.describe()} "
                                      f"({type(e).__name__}: {e})") from e

    def _replay_side(self, rec: Recording, r: StorageRecord, ev, view: torch.Tensor, idx: int) -> None:
        """Replay an op that wrote into ``r``'s storage (``view``: all of it) and maybe
        others: on private copies of every storage it writes, its inputs as they were
        before it, aliases kept (``_foreach_add_([b, c], [c, b])`` adds the new ``b``
        to ``c``, as eagerly); then ``r``'s copy is the value."""
        args, kwargs = self.resolve((ev.args, ev.kwargs), ev.reads_at)
        leaves, spec = tree_flatten((args, kwargs))
        written = {storage_key(leaves[j]) for j in ev.mutated}
        copies: dict[int, torch.UntypedStorage] = {}
        for j, x in enumerate(leaves):
            if isinstance(x, torch.Tensor) and storage_key(x) in written:
                st = copies.get(storage_key(x))
                if st is None:
                    st = copies[storage_key(x)] = x.untyped_storage().clone()
                leaves[j] = torch.empty(0, dtype=x.dtype, device=x.device).set_(
                    st, x.storage_offset(), x.size(), x.stride())
        target = copies[storage_key(tree_flatten((args, kwargs))[0][ev.leaf])]
        args, kwargs = tree_unflatten(leaves, spec)
        self._call(ev.func, args, kwargs, lambda: self.key(rec, r, f"#{idx}"))
        view.copy_(torch.empty(0, dtype=view.dtype, device=view.device).set_(target, 0, view.shape, (1,)))

    # ------------------------------------------------------------ plans

    def plan_value(self, rec: Recording, plan: Plan, out: torch.Tensor, geom: tuple, fused: bool,
                   view_dtype: torch.dtype | None = None, via: torch.dtype | None = None) -> None:
        """Compute ``plan``'s value into ``out``: a real tensor shaped as the plan's
        tensor, which views its storage with ``geom`` (in elements of ``view_dtype``,
        the tensor's own dtype, when it reinterprets the storage's bytes:
        ``nn.Parameter(torch.view_as_real(c))``). ``fused``: the plan's spec was
        already filled into ``out`` (which then covers the storage): only the
        events after it are left. ``via``: a dtype the value is rounded to on its way
        to ``out``'s (a model cast after recording, materialized in a third dtype)."""
        r = plan.record
        with torch.no_grad():
            if fused:
                rest = plan.start.rest
                if not rest:
                    return
                offset = len(r.events) - len(rest)
                if out.dtype == r.tensor.dtype and out.is_contiguous():
                    self.apply(rec, r, out.view(-1), rest, offset)
                else:  # replay in the recorded dtype, round once
                    tmp = out.to(r.tensor.dtype).reshape(-1)
                    self.apply(rec, r, tmp, rest, offset)
                    out.copy_(tmp.view(out.shape))
                return
            value = self.storage_value(rec, r, None)
            if view_dtype is not None and view_dtype != value.dtype:
                value = value.view(view_dtype)
            value = value.as_strided(*geom)
            out.copy_(value if via is None else value.to(via))


def _read_while_recording(rec: Recording, t: torch.Tensor) -> torch.Tensor:
    """What the recorder hands code that reads a value while a model is built."""
    return Evaluator.deterministic(rec).value(t, rec.next_seq())


intercept._reader = _read_while_recording


_DEFAULT_DTYPE_LOCK = threading.RLock()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """torch's default dtype set to ``dtype`` (None: float32) for the block, if it
    differs. torch's default is one for the process: replays that change it take
    turns, so each puts back what it found."""
    dtype = torch.float32 if dtype is None else dtype
    if dtype is torch.float32 and torch.get_default_dtype() is dtype:
        yield  # (the common case: nothing to change, nothing to wait for)
        return
    with _DEFAULT_DTYPE_LOCK:
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _fill(view: torch.Tensor, spec, key: int) -> None:
    if view.dtype in engines.FLOAT_DTYPES:
        engines.fill([Target(view, spec, key)])
    elif isinstance(spec, Constant):
        view.fill_(spec.value)
    elif view.is_complex() and type(spec) in (Normal, Uniform):
        # as torch's normal_/uniform_ fill a complex tensor: the floats of view_as_real,
        # each part N(mean, std^2 / 2) (the complex variance is std^2), or U(a, b)
        if type(spec) is Normal:
            spec = Normal(spec.mean, spec.std / math.sqrt(2.0))
        engines.fill([Target(torch.view_as_real(view), spec, key)])
    else:
        raise TypeError(f"cannot fill a {view.dtype} tensor with {spec!r}")


# ------------------------------------------------------------------ interrupts


def swap_in(root, new_of: dict[int, torch.Tensor], after=None) -> None:
    """Replace each tensor object ``id -> new`` wherever it is a parameter or buffer
    of ``root`` (its ``modules()``; tied names stay one object), or a module's own
    attribute, directly or as an item of a list or tuple (``self.shared =
    [self.lin.weight]``, ``RNN._flat_weights``; a list of over 64 items only if one of
    its first four is a tensor); then run ``after()``; all or nothing."""
    swaps = []  # (container, key, old, new): a dict or a list, set back on failure
    for mod in root.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None and id(v) in new_of:
                    swaps.append((store, k, v, new_of[id(v)]))
        d = mod.__dict__
        for k in d.keys() - MODULE_KEYS:
            v = d[k]
            if (type(v) is list or type(v) is tuple) and len(v) > 64 \
                    and not any(isinstance(x, torch.Tensor) for x in v[:4]):
                continue  # (a long list of other things: not scanned on every materialize)
            if type(v) is list:
                swaps.extend((v, i, x, new_of[id(x)]) for i, x in enumerate(v)
                             if isinstance(x, torch.Tensor) and id(x) in new_of)
            elif type(v) is tuple:
                if any(isinstance(x, torch.Tensor) and id(x) in new_of for x in v):
                    swaps.append((d, k, v, tuple(new_of.get(id(x), x) if isinstance(x, torch.Tensor) else x
                                                 for x in v)))
            elif isinstance(v, torch.Tensor) and id(v) in new_of:
                swaps.append((d, k, v, new_of[id(v)]))
    with interrupts_held():
        done = 0
        try:
            for where, k, _old, new in swaps:
                where[k] = new
                done += 1
            if after is not None:
                after()
        except BaseException:
            for where, k, old, _new in reversed(swaps[:done]):
                where[k] = old
            raise


def as_module_tensor(old: torch.Tensor, real: torch.Tensor, skip_attr: str) -> torch.Tensor:
    """``real`` dressed as ``old`` was: the same class (a Parameter subclass whose
    constructor takes other arguments, a tensor subclass made with ``as_subclass``),
    ``requires_grad``, its tensor hooks (``register_hook``, post-accumulate-grad
    hooks) and its Python attributes (HF's ``_is_hf_initialized``, ...)."""
    cls = type(old)
    if isinstance(old, torch.nn.Parameter):
        try:
            new = cls(real, requires_grad=old.requires_grad)
        except TypeError:  # (its own __new__ arguments: made as nn.Parameter makes itself)
            new = torch.Tensor._make_subclass(cls, real.detach(), old.requires_grad)
    else:
        new = real
        if cls is not torch.Tensor and cls is not type(real) and not dist_mod.is_dtensor(real) \
                and cls.__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
            new = real.as_subclass(cls)  # (a plain Python subclass; not a wrapper like FakeTensor)
        if old.requires_grad and old.is_leaf:
            new.requires_grad_(True)
    for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
        h = getattr(old, hooks, None)
        if h:
            setattr(new, hooks, h)
    for k, v in getattr(old, "__dict__", {}).items():
        if k == skip_attr:
            continue
        try:
            setattr(new, k, v)
        except (AttributeError, TypeError):
            pass
    return new


def progress_printer(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and total > (256 << 20)
    if not enabled:
        return lambda nbytes: None
    done = [0, time.perf_counter()]

    def cb(nbytes: int) -> None:
        done[0] += nbytes
        now = time.perf_counter()
        if now - done[1] > 0.1 or done[0] >= total:
            done[1] = now
            pct = 100.0 * done[0] / max(total, 1)
            sys.stderr.write(f"\rfastinit: materializing {done[0] / 2**30:6.2f}/{total / 2**30:.2f} GiB {pct:5.1f}%")
            if done[0] >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return cb

