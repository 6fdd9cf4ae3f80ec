"""Model Stock (Jang et al., "Model Stock: All We Need Is Just a Few Fine-Tuned Models", ECCV 2024).

Per layer (here: per leaf), the merged weight interpolates between the
average of the N fine-tuned weights and the pre-trained one:

  w_H = t * w_avg + (1 - t) * w_0,   t = N cos(theta) / (1 + (N - 1) cos(theta))

where theta is the angle between fine-tuned task vectors. In task-vector
form: tau = t * (1/N) sum_i tau_i. With N > 2 the paper uses one angle;
as mergekit does, cos(theta) here is the mean pairwise cosine
<tau_i, tau_j> / (|tau_i| |tau_j|) over i < j, clipped to [-1, 1] (t = 1
for a single task; t = 0 where the denominator vanishes or a norm is 0).

``init`` computes the T x T Gram matrix of every leaf (a contraction over
the leaf, a collective sum when sharded; no buffer beyond it) and returns
the per-leaf ratios t; ``apply`` is one fused pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


def ratio(gram: jax.Array) -> jax.Array:
  """Model Stock's t from a T x T Gram matrix of task vectors."""
  n = gram.shape[0]
  if n == 1:
    return jnp.ones((), gram.dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
  denom = norms[:, None] * norms[None, :]
  cos = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1), 0)
  iu = jnp.triu_indices(n, 1)
  c = jnp.clip(jnp.mean(cos[iu]), -1.0, 1.0)
  den = 1 + (n - 1) * c
  return jnp.where(jnp.abs(den) > 1e-12, n * c / jnp.where(jnp.abs(den) > 1e-12, den, 1), 0)


@register("model_stock")
def model_stock() -> Merge:
  """Per-leaf Model Stock interpolation of the task-vector mean."""

  def init(stacked, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    def leaf_ratio(x):
      flat = x.astype(stacked_lib.compute_dtype(x.dtype)).reshape(x.shape[0], -1)
      # A x A^T on the flat view: XLA contracts it in place (a tensordot over
      # several axes makes it copy the leaf first).
      return ratio(jnp.einsum("ti,si->ts", flat, flat))
    return {"ratio": jax.tree.map(leaf_ratio, stacked)}

  def apply(coeffs, stacked):
    return jax.tree.map(lambda x, t: (t * stacked_lib.task_mean(x)).astype(x.dtype),
                        stacked, coeffs["ratio"])

  return Merge(init, apply)
