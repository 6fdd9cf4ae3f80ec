"""Model merging: methods that turn stacked task vectors into one task vector.

Every method is a `Merge` (``init(stacked, **kwargs) -> coeffs``,
``apply(coeffs, stacked) -> tau``; see ``base.py``), built by a factory named
after it and registered by name::

  from research import merging, task_vectors
  stacked = task_vectors.stack([tau_a, tau_b, tau_c])
  m = merging.get("ties", density=0.2)      # or merging.ties(density=0.2)
  coeffs = jax.jit(m.init)(stacked)
  tau = jax.jit(m.apply)(coeffs, stacked)
  params = task_vectors.apply(params0, tau, alpha)

``METHODS`` lists the registered names: the data-free average,
task_arithmetic, ties, dare, dare_ties, breadcrumbs, pcb, consensus,
model_stock, lines, doge; fisher and regmean, whose data statistics come in
as keyword arguments of ``init`` (``data_stats`` computes them); and the
learned-coefficient adamerging_task, adamerging_layer, atlas and
self_positioning, whose ``init`` trains with optax (``learned``); twin
(a shared merge plus low-rank task residuals mixed per input by a router:
``twin.route`` / ``twin.compose``); and lora_lego and scalearn, which read
LoRA factors (``research.lora``).
Combinators: ``chain``, ``masked``, ``identity``, ``scale``; stages for
composition: ``trim``, ``disjoint_mean``, ``drop``, ``mask_tails``,
``layer_scaling`` (LiNeS, a post-transform for any merge). ``selection``
holds the exact global top-k threshold that TIES and friends share.
"""
from research.merging import data_stats
from research.merging import learned
from research.merging import selection
from research.merging.adamerging import adamerging_layer, adamerging_task
from research.merging.atlas import atlas
from research.merging.average import average
from research.merging.base import MaskedNode, Merge, chain, identity, masked, scale
from research.merging.breadcrumbs import breadcrumbs, mask_tails
from research.merging.consensus import consensus
from research.merging.dare import dare, dare_ties, drop
from research.merging.doge import doge
from research.merging.fisher import fisher
from research.merging.lines import depth_from_path, layer_scaling, lines
from research.merging.lora_lego import lora_lego
from research.merging.model_stock import model_stock
from research.merging.pcb import pcb
from research.merging.regmean import regmean
from research.merging.registry import defaults, get, register
from research.merging.scalearn import scalearn
from research.merging.self_positioning import self_positioning
from research.merging.task_arithmetic import task_arithmetic
from research.merging.ties import disjoint_mean, ties, trim
from research.merging.twin import twin
from research.merging import registry as _registry

METHODS = _registry.names()
# Methods that need nothing but the stacked task vectors (and a key).
DATA_FREE = ("average", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs",
             "pcb", "consensus", "model_stock", "lines", "doge")

__all__ = [
    "DATA_FREE", "METHODS", "MaskedNode", "Merge", "adamerging_layer", "adamerging_task",
    "atlas", "average", "breadcrumbs", "chain", "consensus", "dare", "dare_ties", "data_stats",
    "defaults", "depth_from_path", "disjoint_mean", "doge", "drop", "fisher", "get",
    "identity", "layer_scaling", "learned", "lines", "lora_lego", "mask_tails", "masked",
    "model_stock", "pcb", "register", "regmean", "scale", "scalearn", "selection",
    "self_positioning", "task_arithmetic",
    "ties", "trim",
]
