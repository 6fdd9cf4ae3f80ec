"""DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024).

Drop And REscale, applied to each task vector before merging:

  tau~_t = (m_t * tau_t) / (1 - p),   m_t ~ Bernoulli(1 - p) entrywise

(``rescale=False`` skips the division). The dropped vectors are then merged
by task arithmetic (``dare``: lambda * sum_t tau~_t) or by TIES' sign
election and disjoint mean (``dare_ties``, as mergekit does; FusionBench
additionally trims by magnitude, which is
``chain(drop(p), trim(density), disjoint_mean())``). Default p = 0.9, the
drop rate of the paper's headline experiments; lambda = 1 (see
``task_arithmetic``).

Randomness: ``init`` needs ``key=`` (a ``jax.random`` key) and returns it as
the coefficients; ``apply`` draws leaf i's mask from ``fold_in(key, i)``, so
the same key gives the same masks. The mask bits are a counter-based hash
(two rounds of the murmur3 finalizer) of each entry's flat index, seeded
by 64 bits drawn from that key: entrywise arithmetic that XLA fuses into
the merge and computes shard by shard, where ``jax.random.bernoulli`` on a
model-sized shape materialises its random bits (about 2x the stacked taus
of scratch memory on XLA:CPU). So no model-sized buffer is created.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research.merging import base
from research.merging import hparams
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.merging.task_arithmetic import task_arithmetic
from research.merging.ties import disjoint_mean


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
  """Bernoulli(keep_prob) booleans of ``shape``, hashed from ``key`` and the flat entry index."""
  if keep_prob >= 1.0:
    return jnp.ones(shape, bool)
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  h = _fmix32(index ^ seed[0])
  h = _fmix32(h + seed[1])
  return h < np.uint32(int(keep_prob * 2.0**32))


def drop(p: float = 0.9, rescale: bool = True) -> Merge:
  """Pre-transform: drop each entry with probability ``p``, rescale the rest by 1/(1-p)."""
  p = hparams.fraction(p, "p", low_open=False, high_open=True)
  rescale = hparams.boolean(rescale, "rescale")

  def init(stacked, key=None, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    if key is None:
      raise ValueError(
          "DARE drops entries at random and needs a key: call "
          "init(stacked, key=jax.random.key(seed)).")
    return {"key": key}

  def apply(coeffs, stacked):
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    out = []
    for i, x in enumerate(leaves):
      keep = keep_mask(jax.random.fold_in(coeffs["key"], i), x.shape, 1.0 - p)
      dt = stacked_lib.compute_dtype(x.dtype)
      kept = x.astype(dt) / (1.0 - p) if rescale else x.astype(dt)
      out.append(jnp.where(keep, kept, 0).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return Merge(init, apply)


@register("dare")
def dare(p: float = 0.9, rescale: bool = True, scale: float = 1.0) -> Merge:
  """DARE then task arithmetic: ``scale * sum_t drop(tau_t)``."""
  return base.chain(drop(p, rescale), task_arithmetic(scale))


@register("dare_ties")
def dare_ties(p: float = 0.9, rescale: bool = True, scale: float = 1.0) -> Merge:
  """DARE then TIES' sign election and disjoint mean, times ``scale``."""
  scale = hparams.real(scale, "scale")
  return base.chain(drop(p, rescale), disjoint_mean(), base.scale(scale))
