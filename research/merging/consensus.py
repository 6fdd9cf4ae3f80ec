"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024).

With the multi-task vector tau_MTL = sum_t tau_t (task arithmetic):

  TALL mask of task t:   m_t = [ |tau_t| > lambda_TALL * |tau_MTL - tau_t| ]
  consensus mask:        m   = [ sum_t m_t >= k ]
  merged:                tau = lambda * m * tau_MTL

i.e. entries that matter to fewer than k tasks ("selfish" for k = 2,
"catastrophic" for none) are removed from the task-arithmetic vector.
Defaults: k = 2 (the paper's), lambda_TALL = 1 (the authors' code default;
the paper tunes it per task in [0.2, 0.6] on validation data), lambda = 1
(see ``task_arithmetic``). Everything is entrywise, so ``init`` computes
nothing and ``apply`` is one fused pass with no extra buffer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.merging import hparams
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


def consensus_leaf(x: jax.Array, k: int, tall_lambda: float) -> jax.Array:
  """Consensus-masked task-arithmetic sum of one stacked leaf, in the compute dtype."""
  parts = stacked_lib.slices(x)
  total = parts[0]
  for p in parts[1:]:
    total = total + p
  votes = None
  for p in parts:
    v = (jnp.abs(p) > tall_lambda * jnp.abs(total - p)).astype(jnp.int32)
    votes = v if votes is None else votes + v
  return jnp.where(votes >= k, total, 0)


@register("consensus")
def consensus(k: int = 2, tall_lambda: float = 1.0, scale: float = 1.0) -> Merge:
  """Task arithmetic restricted to entries that at least ``k`` TALL masks select."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f"k must be a non-negative int (the number of tasks that must agree), got {k!r}.")
  tall_lambda = hparams.real(tall_lambda, "tall_lambda")
  if tall_lambda < 0:
    raise ValueError(f"tall_lambda must be >= 0, got {tall_lambda!r}.")
  scale = hparams.real(scale, "scale")
  return stacked_lib.leafwise(lambda x: scale * consensus_leaf(x, k, tall_lambda))
