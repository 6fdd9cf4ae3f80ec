"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022), diagonal.

Each model's parameters are weighted, entry by entry, by its diagonal Fisher
information F_t (computed at theta_t = theta0 + tau_t on task t's data):

  theta* = sum_t F_t theta_t / sum_t F_t                 (eq. 3, uniform model weights)

On task vectors this is exactly the same average of the tau_t, since
sum_t F_t (theta0 + tau_t) / sum_t F_t = theta0 + sum_t F_t tau_t / sum_t F_t:

  tau* = scale * sum_t F~_t tau_t / sum_t F~_t,   F~_t = max(F_t / n_t, floor)

where n_t = 1, or the L2 norm of F_t over all its entries when
``normalize=True`` (as MergeLM / FusionBench do, so that every model gets the
same total weight), and ``floor`` is the paper's "Fisher floor" (1e-6 in the
official code): entries no model is sensitive to are averaged plainly
instead of divided by zero. ``scale`` (default 1, the paper's merge) scales
the merged task vector.

The Fisher diagonals come in as ``init(stacked, *, fishers)``: a pytree like
``stacked`` (every leaf [T, ...], task t's Fisher at index t), e.g. from
``data_stats.diagonal_fisher`` per task, stacked with
``task_vectors.stack``. ``init`` applies the floor / normalisation (the
normalisation is a reduction over all leaves); ``apply`` is leaf-local.

Memory: the coefficients are the T Fisher diagonals (model-sized each);
``apply`` builds no buffer beyond the output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.merging import hparams
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


def _check_fishers(fishers, stacked):
  if fishers is None:
    raise ValueError(
        "fisher.init needs fishers=: the diagonal Fisher of every task, a pytree like the "
        "stacked task vectors (every leaf [T, ...]). Fix: compute it with "
        "research.merging.data_stats.diagonal_fisher per task and stack with "
        "task_vectors.stack.")
  f_leaves, f_def = jax.tree_util.tree_flatten_with_path(fishers)
  s_leaves, s_def = jax.tree_util.tree_flatten_with_path(stacked)
  if f_def != s_def:
    raise ValueError(
        f"fishers must have the tree structure of the stacked task vectors; got {f_def} vs "
        f"{s_def}. Fix: compute the Fisher for the same params tree.")
  for (path, f), (_, x) in zip(f_leaves, s_leaves):
    if tuple(f.shape) != tuple(x.shape):
      raise ValueError(
          f"fishers leaf {jax.tree_util.keystr(path)} has shape {tuple(f.shape)}, but the "
          f"stacked task vectors have {tuple(x.shape)} there. Fix: one Fisher per task, "
          "stacked along the leading task axis in the order of the task vectors.")


@register("fisher")
def fisher(floor: float = 1e-6, normalize: bool = False, scale: float = 1.0) -> Merge:
  """Fisher-weighted average of the task vectors (diagonal Fisher, floored)."""
  floor = hparams.real(floor, "floor")
  if floor <= 0:
    raise ValueError(f"floor must be > 0 (it keeps sum_t F_t away from 0), got {floor!r}.")
  normalize = hparams.boolean(normalize, "normalize")
  scale = hparams.real(scale, "scale")

  def init(stacked, *, fishers=None, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    _check_fishers(fishers, stacked)
    fishers = jax.tree.map(lambda f: jnp.asarray(f, jnp.float32), fishers)
    if normalize:
      sq = sum(jnp.sum(jnp.square(f).reshape(f.shape[0], -1), axis=1)
               for f in jax.tree.leaves(fishers))
      norm = jnp.sqrt(sq)                                   # [T]
      norm = jnp.where(norm > 0, norm, 1.0)
      fishers = jax.tree.map(
          lambda f: f / norm.reshape((-1,) + (1,) * (f.ndim - 1)), fishers)
    return {"fishers": jax.tree.map(lambda f: jnp.maximum(f, floor), fishers)}

  def apply(coeffs, stacked):
    def one(f, x):
      xs = stacked_lib.slices(x)
      fs = [f[i].astype(xs[0].dtype) for i in range(x.shape[0])]
      num, den = fs[0] * xs[0], fs[0]
      for fi, xi in zip(fs[1:], xs[1:]):
        num, den = num + fi * xi, den + fi
      return (scale * num / den).astype(x.dtype)
    return jax.tree.map(one, coeffs["fishers"], stacked)

  return Merge(init, apply)


fisher.requires = ("fishers",)
