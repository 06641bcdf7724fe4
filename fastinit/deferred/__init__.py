"""Deferred init and one-pass materialization: record → plan → execute.

* **Record** (:mod:`.record`, :mod:`.intercept`, :mod:`.hooks`):
  :func:`deferred_init` runs a constructor under a ``TorchFunctionMode`` that
  puts every new tensor on the meta device and logs, per storage, what creates
  and writes it; the records travel with the model's tensors and modules.
* **Plan** (:mod:`.plan`): per tensor, the last whole overwrite wins and
  earlier ones never run; a constant absorbs the scalar edits after it (computed
  as eager code computes them); what is left replays in recorded order.
* **Execute** (:mod:`.execute`): every fusable fill in one engine batch, keyed
  by ``(seed, fully-qualified name)``, replays after it, then the real tensors
  are swapped in, all or nothing.

:func:`batched` (its queue in :mod:`.batched`) is the same recorder and planner on tensors
that are already real; :func:`materialize`'s ``init_fn`` and
:func:`fastinit.apply_scheme`-style code record through it too.
"""

from .api import batched, deferred_init, is_deferred, materialize, planned
from .report import MaterializeReport, Planned

__all__ = ["deferred_init", "materialize", "batched", "planned", "is_deferred", "MaterializeReport", "Planned"]
