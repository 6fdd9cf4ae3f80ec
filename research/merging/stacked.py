"""Checks and task-axis reductions for stacked task vectors (every leaf: [T, ...]).

``check(stacked)`` validates a stacked tree once, at trace time, with
errors that name the offending leaf. ``task_sum`` / ``task_mean`` reduce
over the leading task axis as a chain of adds over the T slices: XLA fuses
that into one loop that reads each entry once, where a ``jnp.sum(x, 0)``
over the (major) task axis runs ~20x slower on XLA:CPU. T is static, so
the chain is unrolled at trace time.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from research import task_vectors

PyTree = Any


def check(stacked: PyTree, name: str = "stacked_taus") -> int:
  """Number of tasks T; raises ``ValueError`` naming the leaf path on a bad tree.

  Every leaf must be a floating array (or ``ShapeDtypeStruct``) with the
  same leading task axis. Integer or boolean buffers (which
  ``task_vectors.task_vector`` keeps as frozen zeros) are rejected: merge
  only the trainable leaves (``nnx.split(model, nnx.Param)``), or route the
  others around the merge with ``merging.masked``.
  """
  t = task_vectors.num_tasks(stacked, name)
  for path, x in jax.tree_util.tree_flatten_with_path(stacked)[0]:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
          f"{name} leaf {jax.tree_util.keystr(path)} has dtype {x.dtype}; merging "
          "needs floating task vectors. Fix: merge only the trainable leaves "
          "(e.g. nnx.split(model, nnx.Param)), or exclude this leaf with "
          "merging.masked(method, mask, otherwise=...).")
  return t


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype merges compute in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def slices(x: jax.Array) -> list[jax.Array]:
  """The T task slices of a stacked leaf, in the compute dtype."""
  dt = compute_dtype(x.dtype)
  return [x[i].astype(dt) for i in range(x.shape[0])]


def task_sum(x: jax.Array) -> jax.Array:
  """Sum over the task axis, in the compute dtype (one fused pass on every backend)."""
  parts = slices(x)
  out = parts[0]
  for p in parts[1:]:
    out = out + p
  return out


def task_mean(x: jax.Array) -> jax.Array:
  """Mean over the task axis, in the compute dtype."""
  return task_sum(x) / x.shape[0]


def leafwise(leaf_fn) -> "Merge":
  """A `Merge` with no statistics: `apply` maps `leaf_fn` ([T, ...] -> [...]) over
  the leaves and casts back to each leaf's dtype."""
  from research.merging.base import Merge  # pylint: disable=g-import-not-at-top

  def init(stacked, **kwargs):
    del kwargs
    check(stacked)
    return ()

  def apply(coeffs, stacked):
    del coeffs
    check(stacked)
    return jax.tree.map(lambda x: leaf_fn(x).astype(x.dtype), stacked)

  return Merge(init, apply)
