"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024).

Per layer (here: per leaf) and per task, mask out both tails of the
magnitude distribution, then add the masked task vectors:

  m_t = [ v_t(r + b) <= |tau_t| < v_t(r) ],   r = floor(gamma n),  b = ceil(beta n)
  tau = lambda * sum_t m_t * tau_t

where v_t(j) is the j-th largest |entry| of the leaf (v_t(0) = +inf), i.e.
the ``gamma`` fraction of largest entries (outliers) and everything below
the next ``beta`` fraction (negligible perturbations) are dropped.
Parametrisation and defaults follow the authors' code (rezazzr/breadcrumbs,
``TaskVectorMiddleKeep``: ``beta`` = kept fraction ``top_k_keep``, ``gamma``
= removed top fraction ``top_k_remove``; its search starts at beta = 0.15,
gamma = 0.006). lambda defaults to 1 (see ``task_arithmetic``).

Deviation: the authors' code ranks entries within each row (last axis) of
a layer; here the whole layer (leaf) is ranked, as the paper describes.

``init`` runs the exact selection of ``selection.py`` for two ranks per
leaf and task (no model-sized buffer); ``apply`` is one fused pass.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from research.merging import base
from research.merging import hparams
from research.merging import selection
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.merging.task_arithmetic import task_arithmetic


def ranks(n: int, beta: float, gamma: float) -> tuple[int, int]:
  """(removed, removed + kept) entries of an n-entry leaf."""
  removed = math.floor(gamma * n + 1e-9)
  kept = selection.topk_count(n, beta)
  return removed, min(n, removed + kept)


def mask_tails(beta: float = 0.15, gamma: float = 0.006) -> Merge:
  """Pre-transform: keep, per leaf and task, the magnitudes ranked in (gamma n, gamma n + beta n]."""
  beta = hparams.fraction(beta, "beta")
  gamma = hparams.fraction(gamma, "gamma", low_open=False, high_open=True)
  if beta + gamma > 1:
    raise ValueError(f"beta + gamma must be at most 1, got beta={beta}, gamma={gamma}.")

  def init(stacked, **kwargs):
    del kwargs
    t = stacked_lib.check(stacked)
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    n_leaves = len(leaves)
    rk = [ranks(x.size // t, beta, gamma) for x in leaves]
    # Both ranks in one selection: leaf i is in groups i and n_leaves + i.
    k = np.array([[max(r, 1) for r, _ in rk] + [e for _, e in rk]], np.int32)
    groups = [(i, n_leaves + i) for i in range(n_leaves)]
    keys = selection.select_keys(leaves, groups, 2 * n_leaves, k,
                                 lambda p: [selection.abs_key(p)])
    vals = selection.key_to_value(keys)
    upper = [jnp.where(r > 0, vals[:, i], jnp.inf) for i, (r, _) in enumerate(rk)]
    lower = [vals[:, n_leaves + i] for i in range(n_leaves)]
    return {"upper": jax.tree_util.tree_unflatten(treedef, upper),
            "lower": jax.tree_util.tree_unflatten(treedef, lower)}

  def apply(coeffs, stacked):
    def one(x, lo, hi):
      bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
      mag = jnp.abs(x.astype(jnp.float32))
      keep = (mag >= lo.reshape(bshape)) & (mag < hi.reshape(bshape))
      return jnp.where(keep, x, jnp.zeros((), x.dtype))
    return jax.tree.map(one, stacked, coeffs["lower"], coeffs["upper"])

  return Merge(init, apply)


@register("breadcrumbs")
def breadcrumbs(beta: float = 0.15, gamma: float = 0.006, scale: float = 1.0) -> Merge:
  """Model Breadcrumbs: tail masks per layer, then ``scale * sum``."""
  return base.chain(mask_tails(beta, gamma), task_arithmetic(scale))
