"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

For stacked task vectors tau_t (t = 1..T) and density k:

  1. Trim:  tau^_t = tau_t * [|tau_t| >= v_t], with v_t the ceil(k n)-th largest
            |entry| of tau_t over the whole flattened task vector (n entries);
            ``per_leaf=True`` takes v_t per leaf instead, as LLM merging tools
            (mergekit) do.
  2. Elect: gamma = sign(sum_t tau^_t)          (the paper's "mass" election)
  3. Disjoint merge: tau = lambda * sum_{t in A} tau^_t / |A|,
            A = {t : tau^_t != 0 and sign(tau^_t) = gamma}, per entry
            (0 where A is empty).

``ties`` is ``chain(trim(density, per_leaf), disjoint_mean(), scale(lambda))``;
the stages are exported for use in other methods (DARE-TIES is DARE's drop
followed by ``disjoint_mean``). Defaults: density 0.2 (the paper's top-20%)
and lambda = 1.

Deliberate deviations from the official implementation (prateeky2806/ties-merging):
- It keeps the entries ``>=`` the (n - int(k n))-th smallest magnitude, i.e.
  int(k n) + 1 entries; here ceil(k n) are kept (more only on exact ties).
- Where the elected mass is exactly 0 it falls back to the sign of the
  summed signs over the whole model; here such entries merge to 0 (they are
  entries that no task kept, or whose kept values cancel exactly).

Cost: ``init`` runs the exact selection of ``selection.py`` (about 4.5 reads
of the stacked tree, no model-sized buffer); ``apply`` is one fused pass
producing the merged tau.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.merging import base
from research.merging import hparams
from research.merging import selection
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


def _broadcast(threshold, x):
  return threshold.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def trim(density: float = 0.2, per_leaf: bool = False) -> Merge:
  """Pre-transform: zero all but the top-``density`` magnitudes of each task vector.

  ``coeffs = {"threshold": v}`` with v float32 [T] (or, with ``per_leaf``, a
  tree of [T] like the input).
  """
  density = hparams.fraction(density, "density")
  per_leaf = hparams.boolean(per_leaf, "per_leaf")

  def init(stacked, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    return {"threshold": selection.topk_threshold(stacked, density, per_leaf=per_leaf)}

  def apply(coeffs, stacked):
    thr = coeffs["threshold"]
    if not per_leaf:
      thr = jax.tree.map(lambda _: thr, stacked)
    def one(x, v):
      keep = jnp.abs(x.astype(jnp.float32)) >= _broadcast(v, x)
      return jnp.where(keep, x, jnp.zeros((), x.dtype))
    return jax.tree.map(one, stacked, thr)

  return Merge(init, apply)


def disjoint_mean_leaf(x: jax.Array) -> jax.Array:
  """Steps 2-3 for one stacked leaf [T, ...] -> [...], in the compute dtype."""
  parts = stacked_lib.slices(x)
  mass = parts[0]
  for p in parts[1:]:
    mass = mass + p
  gamma = jnp.sign(mass)            # exactly -1, 0 or 1: the products below are exact
  num = den = None
  for p in parts:
    along = p * gamma               # > 0 exactly where task t agrees with gamma
    n_p = jnp.maximum(along, 0)
    d_p = (along > 0).astype(p.dtype)
    num = n_p if num is None else num + n_p
    den = d_p if den is None else den + d_p
  return gamma * num / jnp.maximum(den, 1)


def disjoint_mean() -> Merge:
  """Merge: elect the sign of the summed mass per entry, average the agreeing tasks."""
  return stacked_lib.leafwise(disjoint_mean_leaf)


@register("ties")
def ties(density: float = 0.2, scale: float = 1.0, per_leaf: bool = False) -> Merge:
  """TIES-Merging: trim to ``density``, elect signs, disjoint mean, times ``scale``."""
  scale = hparams.real(scale, "scale")
  return base.chain(trim(density, per_leaf), disjoint_mean(), base.scale(scale))
