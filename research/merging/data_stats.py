"""Data statistics for the data-dependent merges: diagonal Fisher (Fisher merging) and kernel-input Grams (RegMean).

``diagonal_fisher(logits_fn, params, batches)`` -> a tree like ``params``:

  F = (1/N) sum_n E_{y ~ p(y|x_n)} [ (d/d theta log p(y | x_n; theta))^2 ]

with ``kind="exact"`` (the expectation over the C classes computed exactly,
one backward pass per class, as Matena & Raffel do for classification),
``"sampled"`` (one y drawn from the model per example; needs ``key``) or
``"empirical"`` (y = the true label; batches of ``(inputs, labels)``).
Per-example gradients are computed one example at a time inside one jitted
scan, so memory is one gradient plus the accumulator whatever the batch.
``logits_fn(params, inputs) -> logits [B, C]`` is the model at the point the
Fisher is taken (theta_t = theta0 + tau_t for task t; the linearized model
for linear task vectors).

``kernel_input_grams(apply_fn, params, batches)`` -> ``{leaf name: G}``, with
G = X^T X / n the Gram of the inputs X (n rows) of every kernel W used as
``y = x W`` in ``apply_fn``, averaged over rows (tokens), as RegMean's
reference implementations do.

How the kernel inputs are found. Our models keep a functional boundary
(``apply_fn(params, *inputs)``) and have no hooks or sown intermediates, and
the activations entering a kernel cannot be read off gradients with respect
to the parameters alone (those give x^T g, never x^T x). So the function is
traced to a jaxpr (``jax.make_jaxpr``) and re-evaluated by a small jaxpr
interpreter (the "custom interpreter" pattern of the JAX docs) that knows
which jaxpr inputs are parameter leaves: at every ``dot_general`` whose one
operand is a parameter leaf (possibly through a dtype conversion)
contracted over its first axis, the other operand, with the contracted
axis moved last, is the matrix X of the kernel's inputs, and its Gram is
accumulated. Nested ``jit`` / ``custom_jvp`` / ``custom_vjp`` / ``remat``
calls that receive a parameter are interpreted recursively; everything else
is bound as is, so the values are exactly ``apply_fn``'s and the whole thing
runs inside one ``jax.jit``. This works for any model written with
``nnx.Linear`` / ``jnp.dot`` / ``einsum`` kernels, with no change to the
model. Limits: a kernel contracted over another axis (e.g. a tied embedding
used as an output projection, ``h @ E.T``) or used inside a ``scan`` /
``while`` body is not captured (it is then absent from the result, and
RegMean averages it like any other leaf); a kernel used several times gets
the sum of the Grams of all its uses.

Padding. ``weights_fn(*inputs) -> w`` gives a weight per row of X (e.g. the
attention mask [B, L] of a text batch: padding tokens then do not count);
it is applied to every kernel whose inputs have exactly ``w``'s leading
shape, and the others are left unweighted. The references hook every
``nn.Linear`` and count padding tokens too; for BERT the padded positions'
activations are not inputs of any real token, so we leave them out.

For linearized task vectors (f0 + J(theta0) tau), the output change that
RegMean's per-layer objective matches is x(theta0) tau at every layer, so the
Grams are those of the inputs at params0 on each task's data: call
``kernel_input_grams(apply_fn, params0, task_batches)``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from research.models.param_tree import leaf_name

PyTree = Any

FISHER_KINDS = ("exact", "sampled", "empirical")
# Primitives that leave a kernel's values as they are (so its consumer still
# sees the kernel).
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                           "optimization_barrier", "sharding_constraint"})


# ------------------------------------------------------------------ Fisher

def _per_example(inputs):
  """[B, ...] leaves -> [B, 1, ...] so that a scan over axis 0 yields batches of one."""
  return jax.tree.map(lambda a: jnp.asarray(a)[:, None], inputs)


def _batch_size(inputs):
  sizes = {np.shape(a)[0] for a in jax.tree.leaves(inputs)}
  if len(sizes) != 1:
    raise ValueError(f"every input leaf must have the same leading batch size, got {sizes}.")
  return sizes.pop()


@functools.lru_cache(maxsize=16)
def _fisher_batch_fn(logits_fn: Callable, kind: str) -> Callable:
  """The jitted per-batch Fisher sum, cached so that repeated calls compile once."""
  def sq_grads(params, x1, y, k):
    """Fisher contribution of one example x1 (a batch of one)."""
    logp_fn = lambda p: jax.nn.log_softmax(logits_fn(p, x1)[0].astype(jnp.float32))
    logp, vjp = jax.vjp(logp_fn, params)
    zero = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    if kind == "exact":
      # sum_c p_c g_c^2 = sum_c (sqrt(p_c) g_c)^2: one backward pass per class with
      # cotangent sqrt(p_c) e_c, reusing the forward pass.
      cot = jnp.diag(jnp.sqrt(jax.lax.stop_gradient(jnp.exp(logp))))
      def body(acc, row):
        (g,) = vjp(row)
        return jax.tree.map(lambda a, gi: a + jnp.square(gi.astype(jnp.float32)), acc, g), None
      acc, _ = jax.lax.scan(body, zero, cot)
      return acc
    if kind == "sampled":
      y = jax.random.categorical(k, logp)
    (g,) = vjp(jax.nn.one_hot(y, logp.shape[-1], dtype=logp.dtype))
    return jax.tree.map(lambda gi: jnp.square(gi.astype(jnp.float32)), g)

  @jax.jit
  def batch_sum(params, inputs, labels, k):
    n = _batch_size(inputs)
    keys = jax.random.split(k, n)
    labels = jnp.zeros((n,), jnp.int32) if labels is None else jnp.asarray(labels)
    def body(acc, xs):
      x1, y, ki = xs
      return jax.tree.map(jnp.add, acc, sq_grads(params, x1, y, ki)), None
    zero = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    acc, _ = jax.lax.scan(body, zero, (_per_example(inputs), labels, keys))
    return acc

  return batch_sum


def diagonal_fisher(logits_fn: Callable, params: PyTree, batches: Iterable, *,
                    kind: str = "exact", key: jax.Array | None = None) -> PyTree:
  """Diagonal Fisher of ``logits_fn`` at ``params`` over ``batches``; float32 tree like ``params``.

  Args:
    logits_fn: ``logits_fn(params, inputs) -> [B, C]`` logits.
    params: where the Fisher is taken (the fine-tuned model of one task).
    batches: iterable of ``inputs`` (``exact`` / ``sampled``) or of
      ``(inputs, labels)`` (``empirical``); every input leaf has a leading
      batch axis.
    kind: ``"exact"`` (default), ``"sampled"`` or ``"empirical"``.
    key: PRNG key, needed by ``"sampled"``.
  """
  if kind not in FISHER_KINDS:
    raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}.")
  if kind == "sampled" and key is None:
    raise ValueError("diagonal_fisher(kind='sampled') needs key= (a jax.random key).")

  batch_sum = _fisher_batch_fn(logits_fn, kind)
  total, count = None, 0
  key = jax.random.key(0) if key is None else key
  for i, batch in enumerate(batches):
    if kind == "empirical":
      if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("diagonal_fisher(kind='empirical') needs batches of (inputs, labels).")
      inputs, labels = batch
    else:
      inputs, labels = batch, None
    s = batch_sum(params, inputs, labels, jax.random.fold_in(key, i))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    count += _batch_size(inputs)
  if total is None:
    raise ValueError("diagonal_fisher got no batches.")
  return jax.tree.map(lambda a: a / count, total)


# ------------------------------------------------------------------ Grams

def _sub_jaxpr(eqn):
  """(jaxpr, consts) of a call-like equation whose body we interpret, else None."""
  p = eqn.params
  for field in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = p.get(field)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jcore.Jaxpr) and eqn.primitive.name in ("remat", "checkpoint",
                                                                "closed_call", "core_call"):
      return sub, ()
  return None


def _bind(eqn, invals):
  out = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = out if isinstance(out, tuple) else ((), out)
  ans = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(ans) if eqn.primitive.multiple_results else [ans]


def _kernel_operand(eqn, origins, shapes):
  """(index of the kernel operand, its leaf index) if this dot_general reads a kernel as x @ W."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    return None
  for k, contract in ((1, rc), (0, lc)):
    leaf = origins[k]
    if leaf is not None and tuple(contract) == (0,) and len(shapes[k]) >= 2:
      return k, leaf
  return None


def _interpret(jaxpr, consts, args, origins, record):
  env, orig = {}, {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  origin = lambda v: None if isinstance(v, jcore.Literal) else orig.get(v)
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, o in zip(jaxpr.invars, args, origins):
    env[v] = a
    if o is not None:
      orig[v] = o
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    inorig = [origin(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn) if any(o is not None for o in inorig) else None
    if sub is not None:
      outs, outorig = _interpret(sub[0], sub[1], invals, inorig, record)
    else:
      if name == "dot_general":
        hit = _kernel_operand(eqn, inorig, [np.shape(x) for x in invals])
        if hit is not None:
          k, leaf = hit
          (lc, rc), _ = eqn.params["dimension_numbers"]
          other_axis = (lc if k == 1 else rc)[0]
          record(leaf, jnp.moveaxis(invals[1 - k], other_axis, -1))
      outs = _bind(eqn, invals)
      keep = name in _PASS_THROUGH and inorig and inorig[0] is not None
      outorig = [inorig[0] if keep else None for _ in outs]
    for v, val, o in zip(eqn.outvars, outs, outorig):
      env[v] = val
      if o is not None:
        orig[v] = o
  return [read(v) for v in jaxpr.outvars], [origin(v) for v in jaxpr.outvars]


def _as_args(batch):
  return tuple(batch) if isinstance(batch, tuple) else (batch,)


@functools.lru_cache(maxsize=16)
def _grams_batch_fn(apply_fn: Callable, weights_fn: Callable | None,
                    select: Callable | None, names: tuple[str, ...]) -> Callable:
  """The jitted per-batch Gram sums, cached so that repeated calls compile once."""
  n_params = len(names)

  @jax.jit
  def batch_grams(params, args):
    closed = jax.make_jaxpr(lambda p, *a: apply_fn(p, *a))(params, *args)
    flat_args = jax.tree.leaves((params, args))
    kernel = [i if (np.ndim(x) >= 2 and jnp.issubdtype(jnp.result_type(x), jnp.floating)
                    and (select is None or select(names[i]))) else None
              for i, x in enumerate(flat_args[:n_params])]
    origins = kernel + [None] * (len(flat_args) - n_params)
    weights = None if weights_fn is None else jnp.asarray(weights_fn(*args), jnp.float32)
    sums = {}

    def record(leaf, x):
      x = x.astype(jnp.float32)
      if weights is not None and x.shape[:-1] == weights.shape:
        w = weights.reshape(-1)
      else:
        w = jnp.ones(x.shape[:-1], jnp.float32).reshape(-1)
      x = x.reshape(-1, x.shape[-1])
      g, n = (x * w[:, None]).T @ x, jnp.sum(w)
      name = names[leaf]
      if name in sums:
        g0, n0 = sums[name]
        g, n = g0 + g, n0 + n
      sums[name] = (g, n)

    _interpret(closed.jaxpr, closed.consts, flat_args, origins, record)
    return sums

  return batch_grams


def kernel_input_grams(apply_fn: Callable, params: PyTree, batches: Iterable, *,
                       weights_fn: Callable | None = None,
                       select: Callable[[str], bool] | None = None) -> dict[str, jax.Array]:
  """``{leaf name: X^T X / n}`` for every kernel read as ``x @ W`` by ``apply_fn``.

  Args:
    apply_fn: ``apply_fn(params, *inputs)``.
    params: the model the activations are taken from (task t's fine-tuned
      model; params0 for linearized task vectors, see the module doc).
    batches: iterable of input tuples (``apply_fn(params, *batch)``); a
      non-tuple batch is passed as the single input.
    weights_fn: ``weights_fn(*batch) -> w`` row weights (e.g. the attention
      mask, to leave padding tokens out), applied to kernels whose inputs
      have w's leading shape.
    select: optional predicate on leaf names; only those kernels are kept.

  Returns:
    ``{name: float32 [d_in, d_in]}`` named by ``param_tree.leaf_name``.
  """
  names = tuple(leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  batch_grams = _grams_batch_fn(apply_fn, weights_fn, select, names)
  totals: dict[str, list] = {}
  for batch in batches:
    for name, (g, n) in batch_grams(params, _as_args(batch)).items():
      if name in totals:
        totals[name][0] = totals[name][0] + g
        totals[name][1] = totals[name][1] + n
      else:
        totals[name] = [g, n]
  if not totals:
    raise ValueError(
        "kernel_input_grams found no kernel read as x @ W (no batches, or no dot_general "
        "contracting a 2-D parameter over its first axis). Fix: check apply_fn / select.")
  return {name: g / jnp.maximum(n, 1.0) for name, (g, n) in totals.items()}


def stack_grams(per_task: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """``{name: [T, d, d]}`` from one Gram dict per task (the kernels they all have)."""
  if not per_task:
    raise ValueError("stack_grams needs at least one dict of Grams.")
  common = set(per_task[0])
  for g in per_task[1:]:
    common &= set(g)
  if not common:
    raise ValueError("the Gram dicts of the tasks have no kernel in common.")
  return {name: jnp.stack([g[name] for g in per_task]) for name in sorted(common)}
