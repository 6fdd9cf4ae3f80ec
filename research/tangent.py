"""Tangent-space (linearized) models: first-order Taylor expansion of ``apply_fn`` via ``jax.jvp``.

Used for linearized fine-tuning and for evaluating task vectors in the tangent
space (Ortiz-Jimenez et al., "Task Arithmetic in the Tangent Space", NeurIPS
2023). Like ``neural_tangents.linearize``, ``linearize`` is a function
transform, but the expansion point ``params0`` is an argument of the
linearized function, never a constant closed over: it can be sharded, and it
is not baked into the compiled program.

Because the tangent model is linear in ``params - params0``,

    f_lin(params0 + sum_t alpha_t tau_t) = f(params0) + sum_t alpha_t J(params0) tau_t,

so every combination of ``T`` task vectors is a weighted sum of ``T`` cached
JVPs. ``precompute`` runs the model once per task (``f(params0)`` plus one JVP
each) and ``combine`` evaluates any number of coefficient vectors from the
cache without touching the model: an alpha-grid search costs ``O(T)`` model
passes instead of ``O(grid x T)``.

Only the raw ``apply_fn`` output is linearized. A caller that post-processes
it non-linearly (e.g. L2-normalises features for a cosine classifier head)
must apply that step to the output of ``f_lin`` / ``combine``, exactly as the
tangent-space paper does.

Non-floating leaves follow ``research.task_vectors``: integer or boolean
buffers in ``params`` are not differentiated (their tangent is ``float0``) and
the values in ``params0`` are used; non-floating outputs of ``apply_fn`` are
returned as computed at ``params0``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.task_vectors import accumulation_dtype, check_same_structure, is_floating, num_tasks

__all__ = ["linearize", "TangentCache", "precompute", "combine"]

PyTree = Any


def linearize(apply_fn: Callable[..., PyTree]) -> Callable[..., PyTree]:
  """The first-order Taylor expansion of ``apply_fn`` in its first argument.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs) -> outputs``, a function of
      a params pytree and any number of other inputs (e.g. a batch).

  Returns:
    ``f_lin(params, params0, *args, **kwargs) -> outputs`` equal to

        apply_fn(params0, *args, **kwargs) + J(params0) (params - params0)

    where ``J(params0)`` is the Jacobian of ``apply_fn`` in ``params`` at
    ``params0``. ``params`` and ``params0`` must match leaf by leaf (tree
    structure, shapes, dtypes); ``outputs`` has exactly the tree structure,
    shapes and dtypes of ``apply_fn(params0, *args, **kwargs)``. It costs one
    ``jax.jvp`` (about the price of three forward passes) and no Jacobian is
    ever materialised. ``args`` and ``kwargs`` are held fixed (not
    differentiated). ``f_lin`` is differentiable in ``params`` (that is how
    linear fine-tuning trains) and in ``params0``.

  Example: a model with ``w: f32[3, 2]`` and a batch ``x: f32[4, 3]`` gives
  outputs ``f32[4, 2]``.

  >>> import jax, jax.numpy as jnp
  >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"])
  >>> params0 = {"w": jnp.zeros((3, 2))}
  >>> params = {"w": jnp.ones((3, 2))}
  >>> x = jnp.ones((4, 3))
  >>> f_lin = linearize(apply_fn)
  >>> f_lin(params, params0, x).shape
  (4, 2)
  >>> f_lin(params, params0, x)[0]   # tanh(0) + tanh'(0) * (x @ 1) = 3
  Array([3., 3.], dtype=float32)
  >>> apply_fn(params, x)[0]         # the non-linear model saturates
  Array([0.9950547, 0.9950547], dtype=float32)
  """

  def f_lin(params, params0, *args, **kwargs):
    check_same_structure(params, params0, ("params", "params0"))
    f = lambda p: apply_fn(p, *args, **kwargs)
    delta = jax.tree.map(
        lambda p, p0: p - p0 if is_floating(p0) else _no_tangent(p0), params, params0)
    out0, dout = jax.jvp(f, (params0,), (delta,))
    return jax.tree.map(_plus_tangent, out0, dout)

  name = getattr(apply_fn, "__name__", "apply_fn")
  f_lin.__name__ = f"linearized_{name}"
  f_lin.__qualname__ = f_lin.__name__
  return f_lin


class TangentCache(NamedTuple):
  """What ``combine`` needs to evaluate ``f_lin(params0 + sum_t c_t tau_t)``.

  Attributes:
    f0: ``apply_fn(params0, *args, **kwargs)``, outputs pytree.
    jvps: same tree structure as ``f0``; each leaf has a leading ``task``
      axis of size ``T`` and holds ``J(params0) tau_t`` for each task vector
      (zeros for non-floating outputs).
  """

  f0: PyTree
  jvps: PyTree


def precompute(apply_fn: Callable[..., PyTree], params0: PyTree, stacked_taus: PyTree,
               *args, task_chunk: int | None = None, **kwargs) -> TangentCache:
  """``f(params0)`` and one JVP per task vector, for ``combine``.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs) -> outputs``.
    params0: the expansion point (pre-trained params).
    stacked_taus: ``task_vectors.stack(taus)``: the tree of ``params0`` with a
      leading ``task`` axis of size ``T`` on every leaf.
    *args, **kwargs: the other (fixed) inputs of ``apply_fn``, e.g. a batch.
    task_chunk: ``None`` (default) computes all ``T`` JVPs in one vectorised
      pass (``jax.vmap``), which holds ``T`` sets of activations at once. An
      integer computes that many tasks at a time (``jax.lax.map``) to bound
      memory, at the price of recomputing ``f(params0)`` per chunk.

  Returns:
    ``TangentCache(f0, jvps)``: ``f0`` has the structure of ``apply_fn``'s
    outputs, ``jvps`` the same with a leading ``task`` axis of size ``T``.

  To compile it, close over ``apply_fn``:
  ``jax.jit(lambda p0, st, x: precompute(apply_fn, p0, st, x))``.
  """
  num_tasks(stacked_taus, "stacked_taus")
  per_task = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked_taus)
  check_same_structure(params0, per_task, ("params0", "stacked_taus (one task)"))
  f = lambda p: apply_fn(p, *args, **kwargs)

  def one_task(tau):
    tangent = jax.tree.map(
        lambda t, p0: t if is_floating(p0) else _no_tangent(p0), tau, params0)
    out0, dout = jax.jvp(f, (params0,), (tangent,))
    return out0, jax.tree.map(_dense_tangent, out0, dout)

  if task_chunk is None:
    # The primal output does not depend on the tangent, so vmap leaves it
    # unbatched and f(params0) is computed once.
    return TangentCache(*jax.vmap(one_task, out_axes=(None, 0))(stacked_taus))
  if not isinstance(task_chunk, int) or task_chunk < 1:
    raise ValueError(f"task_chunk must be None or a positive int, got {task_chunk!r}.")
  jvps = jax.lax.map(lambda tau: one_task(tau)[1], stacked_taus, batch_size=task_chunk)
  return TangentCache(f(params0), jvps)


def combine(cache: TangentCache, coeffs: Any) -> PyTree:
  """``f0 + sum_t coeffs[..., t] * jvps[t]``: the tangent model at ``params0 + sum_t c_t tau_t``.

  Args:
    cache: from ``precompute``, with ``T`` tasks.
    coeffs: ``[T]`` for one combination, or ``[G, T]`` (any leading axes
      ``[..., T]``) for a grid of combinations. Differentiable, so learned
      coefficients can be trained through it.

  Returns:
    The outputs pytree of ``apply_fn`` with the leading axes of ``coeffs``
    (without ``T``) prepended to every leaf, in the dtypes of ``cache.f0``.
    Equal (up to rounding) to
    ``linearize(apply_fn)(task_vectors.apply(params0, sum_t c_t tau_t), params0, ...)``.
  """
  t = num_tasks(cache.jvps, "cache.jvps")
  coeffs = jnp.asarray(coeffs)
  if coeffs.ndim < 1 or coeffs.shape[-1] != t:
    raise ValueError(
        f"coeffs must have shape [T] or [G, T] with T={t} tasks (the task axis of "
        f"cache.jvps), got shape {coeffs.shape}. Fix: one coefficient per task "
        "vector in the order they were stacked, in the last axis.")
  batch = coeffs.shape[:-1]

  def leaf(f0, jvp):
    f0 = jnp.asarray(f0)
    if not is_floating(f0):
      return jnp.broadcast_to(f0, batch + f0.shape)
    dt = accumulation_dtype(jvp.dtype, coeffs.dtype)
    delta = jnp.tensordot(coeffs.astype(dt), jvp.astype(dt), axes=([-1], [0]))
    return (f0.astype(dt) + delta).astype(f0.dtype)

  return jax.tree.map(leaf, cache.f0, cache.jvps)


def _no_tangent(p0):
  # jax.jvp wants float0 tangents for integer / boolean primals.
  return np.zeros(np.shape(p0), jax.dtypes.float0)


def _plus_tangent(out0, dout):
  if dout.dtype == jax.dtypes.float0:
    return out0
  return out0 + dout


def _dense_tangent(out0, dout):
  if dout.dtype == jax.dtypes.float0:
    return jnp.zeros_like(out0)
  return dout
