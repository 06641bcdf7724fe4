"""Where drop-in calls go: filled now, or taken by a recorder.

``deferred_init``/``materialize`` record the calls made on meta tensors, and
``batched()`` queues the calls made inside it; both install a sink here. A sink
has ``fill(tensor, spec, generator) -> bool`` (fusable specs) and
``replay(tensor, fn, args, kwargs) -> bool`` (everything else): ``True`` means it
took the call and nothing is to be done now.

Outside any block, the default sink takes only calls on meta tensors that a
deferred model holds: they are recorded onto that model's recording, as inside
``batched(module=model)``, instead of doing nothing as torch's calls on meta
tensors do.
"""

from __future__ import annotations

import contextvars


class _DeferredTensors:
    """The default sink: records calls on deferred meta tensors, ignores the rest."""

    def fill(self, tensor, spec, generator) -> bool:
        if not tensor.is_meta:
            return False
        from .deferred.intercept import outside_sink
        return outside_sink.fill(tensor, spec, generator)

    def replay(self, tensor, fn, args, kwargs) -> bool:
        if not tensor.is_meta:
            return False
        from .deferred.intercept import outside_sink
        return outside_sink.replay(tensor, fn, args, kwargs)


current: contextvars.ContextVar = contextvars.ContextVar("fastinit_sink", default=_DeferredTensors())
