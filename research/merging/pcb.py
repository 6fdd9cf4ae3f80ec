"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024).

Per task t (N tasks, n entries each, whole flattened task vectors), following
the authors' reference implementation (duguodong7/pcb-merging, ``PCB_merge``):

  clip:   a_t = clamp(|tau_t|, q_t(1e-4), q_t(1 - 1e-4)),  tau'_t = sign(tau_t) a_t
          (q_t(u): the entry at fraction u of tau_t's sorted magnitudes)
  intra:  beta_intra,t = exp(N * ((a_t - min a_t) / (max a_t - min a_t))^2)
  inter:  beta_inter,t = tanh(tau_t * sum_s tau_s)
  score:  beta_t = beta_intra,t * beta_inter,t
  drop and rescale: with c_t the score at fraction (1 - r) of beta_t's sorted
          values, s_t = (max(beta_t, c_t) - c_t) / (max beta_t - c_t)
          (the top-r scores survive, scaled into (0, 1])
  merge:  tau = lambda * sum_t s_t tau'_t / max(sum_t s_t, 1e-12)

Default r = 0.1 (the reference ``pcb_ratio``); lambda = 1 (the reference
tunes one lambda per task by evolutionary search around 1).

Deviations from the paper's equations, which the reference code itself
does not follow: the paper writes the intra term as Softmax(N Norm(tau^2))
and the inter term as sum_s Softmax(Norm(tau_t tau_s)); softmax denominators
are per-task constants that the final min-max normalisation cancels, but
the inter term really differs. The code is what produced the paper's
numbers, so it is what is implemented.

``init`` runs two exact selections (``selection.py``): the clip quantiles,
then the score quantile, with the score computed on the fly, plus one pass
for the largest score. That last reduction is where XLA:CPU materialises
the score (``x * sum_s x_s`` feeding a reduction is not fused): about one
buffer the size of the stacked taus. ``apply`` reads the taus twice (the
score is recomputed rather than stored: no model-sized buffer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research.merging import counting
from research.merging import hparams
from research.merging import selection
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register

_CLIP = 1e-4


def _bcast(v, x):
  return v.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _clipped(x, lo, hi):
  """(sign(x) a, a) with a = |x| clamped to [lo, hi] per task; x: [T, ...] float32."""
  a = jnp.clip(jnp.abs(x), _bcast(lo, x), _bcast(hi, x))
  return jnp.sign(x) * a, a


def _score(x, lo, hi):
  """beta_t for a stacked slice x [T, ...] (all tasks at the same positions)."""
  n_tasks = x.shape[0]
  _, a = _clipped(x, lo, hi)
  span = _bcast(hi - lo, x)
  norm = jnp.where(span > 0, (a - _bcast(lo, x)) / jnp.where(span > 0, span, 1), 0)
  intra = jnp.exp(n_tasks * norm * norm)
  # The task sum as a chain of adds (fused with the rest; a reduction over
  # the task axis would be materialised by XLA).
  total = x[0]
  for i in range(1, n_tasks):
    total = total + x[i]
  inter = jnp.tanh(x * total[None])
  return intra * inter


def _max_score(leaves, lo, hi):
  """float32 [T]: the largest score of each task (one fused pass per leaf)."""
  t = leaves[0].shape[0]
  out = jnp.full((t,), -jnp.inf, jnp.float32)
  for x in leaves:
    parts = counting.fold_parts(x, 16)
    m = None
    for p in parts:
      b = _score(p.astype(jnp.float32), lo, hi)
      m = b if m is None else jnp.maximum(m, b)
    out = jnp.maximum(out, jnp.max(m.reshape(t, -1), axis=1))
  return out


def _rank_of_ascending(n: int, index: int) -> int:
  """k such that the k-th largest is the entry at ascending position ``index``."""
  return n - index


@register("pcb")
def pcb(ratio: float = 0.1, scale: float = 1.0) -> Merge:
  """PCB-Merging: balance intra- and inter-task competition, keep the top ``ratio`` scores."""
  ratio = hparams.fraction(ratio, "ratio")
  scale = hparams.real(scale, "scale")

  def init(stacked, **kwargs):
    del kwargs
    t = stacked_lib.check(stacked)
    leaves = jax.tree.leaves(stacked)
    n = sum(x.size for x in leaves) // t
    both = [(0, 1)] * len(leaves)     # every leaf counts towards both ranks
    # Clip bounds: ascending positions int(n r) and int(n (1 - r)) - 1 of |tau_t|.
    k_clip = np.array([[_rank_of_ascending(n, int(n * _CLIP)),
                        _rank_of_ascending(n, int(n * (1 - _CLIP)) - 1)]], np.int32)
    keys = selection.select_keys(leaves, both, 2, k_clip, lambda p: [selection.abs_key(p)])
    lo, hi = (selection.key_to_value(keys[:, i]) for i in range(2))
    # Score threshold: ascending position int(n (1 - r)). One rank per
    # selection: counting the expensive score for two ranks in one pass would
    # make XLA materialise it.
    k_score = np.array([[_rank_of_ascending(n, int(n * (1 - ratio)))]], np.int32)
    score_key = lambda p: [selection.signed_key(_score(p.astype(jnp.float32), lo, hi))]
    cut = selection.key_to_value(
        selection.select_keys(leaves, [0] * len(leaves), 1, k_score, score_key)[:, 0],
        signed=True)
    top = _max_score(leaves, lo, hi)
    return {"clip_low": lo, "clip_high": hi, "score_cut": cut, "score_max": top}

  def apply(coeffs, stacked):
    lo, hi = coeffs["clip_low"], coeffs["clip_high"]
    cut, top = coeffs["score_cut"], coeffs["score_max"]

    def weights(xf):
      b = _score(xf, lo, hi)
      span = _bcast(top - cut, xf)
      return jnp.where(span > 0, (jnp.maximum(b, _bcast(cut, xf)) - _bcast(cut, xf))
                       / jnp.where(span > 0, span, 1), 1.0)

    def one(x):
      xf = x.astype(jnp.float32)
      den = stacked_lib.task_sum(weights(xf))
      # Recompute the weights for the numerator rather than share them: XLA
      # would otherwise materialise them (exp and tanh are not duplicated
      # into two consumers). The barrier keeps the two copies apart.
      xf2, den = lax.optimization_barrier((xf, den))
      clipped, _ = _clipped(xf2, lo, hi)
      num = stacked_lib.task_sum(weights(xf2) * clipped)
      return (scale * num / jnp.maximum(den, 1e-12)).astype(x.dtype)

    return jax.tree.map(one, stacked)

  return Merge(init, apply)
