"""Where drop-in calls go: filled now, or taken by a recorder.

``deferred_init``/``materialize`` record the calls made on meta tensors, and
``batched()`` queues the calls made inside it; both install a sink here. A sink
has ``fill(tensor, spec, generator, op) -> bool`` (fusable specs) and
``replay(tensor, fn, args, kwargs) -> bool`` (everything else): ``True`` means it
took the call and nothing is to be done now.
"""

from __future__ import annotations

import contextvars

current: contextvars.ContextVar = contextvars.ContextVar("fastinit_sink", default=None)
