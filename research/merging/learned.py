"""Shared machinery of the learned-coefficient merges: coefficient sums, objectives, an optax loop.

AdaMerging, aTLAS and Self-Positioning all merge as

  tau = sum_t lambda_t * tau_t        (lambda_t a scalar, or one scalar per leaf)

with the lambdas trained by gradient descent on an objective of the merged
model's predictions. This module holds the pieces they share:

- ``weighted_sum(lambdas, stacked)``: the merge itself, leaf-local and
  differentiable in ``lambdas`` ([T] for all leaves, or a tree of [T]).
- Objectives of the logits of the merged model: ``entropy`` (unsupervised,
  AdaMerging / aTLAS test-time adaptation) and ``cross_entropy``
  (supervised, aTLAS few-shot / Self-Positioning).
- ``fit``: a jitted optax loop over a stream of batches.

How data comes in (keyword arguments of each method's ``init``)
  ``logits_fn(tau, inputs) -> logits`` maps a merged task vector and a batch
  of inputs to logits [B, C], or to a list of them (one per task, e.g. one
  head per task); the objective is summed over the list. ``tau`` is a merged
  task vector, so the function decides how it is used: ``params0 + tau``
  through ``apply_fn`` (standard), or through ``tangent.linearize(apply_fn)``
  (linearized task vectors), with whatever head. Batches are ``inputs`` for
  unsupervised objectives and ``(inputs, labels)`` for supervised ones
  (``labels`` an int array [B], or a list matching the list of logits).
  ``loss_fn(tau, batch) -> scalar`` replaces the objective entirely.
  ``batches`` is a list of batches (cycled) or a function ``step -> batch``.
  ``aux`` (optional) is a pytree of arrays the functions read, passed to them
  as a last argument (``logits_fn(tau, inputs, aux)``) so that large arrays
  such as ``params0`` are arguments of the compiled step rather than
  constants baked into it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from research.merging import hparams
from research.merging import stacked as stacked_lib

PyTree = Any


# ------------------------------------------------------------------ the merge

def _lambda_tree(lambdas, stacked):
  if isinstance(lambdas, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(lambdas, "ndim"):
    return jax.tree.map(lambda _: lambdas, stacked)
  return lambdas


def weighted_leaf(w: jax.Array, x: jax.Array) -> jax.Array:
  """``sum_t w[t] * x[t]`` for one stacked leaf x [T, ...]; w[t] broadcasts against x[t].

  Accumulates in x's dtype (one slice at a time, no [T, ...] temporary) and
  returns it.
  """
  parts = stacked_lib.slices(x)
  w = jnp.asarray(w).astype(parts[0].dtype)
  out = w[0] * parts[0]
  for i in range(1, len(parts)):
    out = out + w[i] * parts[i]
  return out.astype(x.dtype)


def weighted_sum(lambdas: PyTree, stacked: PyTree) -> PyTree:
  """``sum_t lambdas[t] * stacked[t]`` per leaf; ``lambdas`` is [T] or a tree of [T] like ``stacked``.

  Computes in at least float32 and casts back to each leaf's dtype;
  differentiable in ``lambdas``.
  """
  t = stacked_lib.check(stacked)
  lam_tree = _lambda_tree(lambdas, stacked)

  def one(lam, x):
    lam = jnp.asarray(lam)
    if lam.shape != (t,):
      raise ValueError(
          f"merge coefficients must have shape [T]=({t},) per leaf, got {lam.shape}. Fix: "
          "pass the coeffs returned by this method's init.")
    return weighted_leaf(lam, x)

  try:
    return jax.tree.map(one, lam_tree, stacked)
  except ValueError as e:
    if "shape [T]" in str(e):
      raise
    raise ValueError(
        "per-leaf merge coefficients must be a tree with the structure of the stacked "
        f"task vectors (one [T] array per leaf): {e}") from e


def full_like_tasks(stacked: PyTree, value: float, per_leaf: bool) -> PyTree:
  """Initial coefficients: ``value`` for every task ([T]), or per leaf (a tree of [T])."""
  t = stacked_lib.check(stacked)
  one = jnp.full((t,), value, jnp.float32)
  return jax.tree.map(lambda _: one, stacked) if per_leaf else one


# ------------------------------------------------------------------ objectives

def entropy(logits: jax.Array) -> jax.Array:
  """Mean over the batch of the Shannon entropy (nats) of ``softmax(logits)``, logits [..., C]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of int ``labels`` [B] under ``logits`` [B, C]."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


OBJECTIVES = ("entropy", "cross_entropy")


def _as_list(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


def _call(fn, tau, data, aux):
  return fn(tau, data) if aux is None else fn(tau, data, aux)


def make_loss(objective: str, *, logits_fn: Callable | None, loss_fn: Callable | None,
              method: str) -> Callable:
  """``loss(tau, batch, aux) -> scalar`` from either ``loss_fn`` or ``logits_fn`` + ``objective``."""
  if (logits_fn is None) == (loss_fn is None):
    raise ValueError(
        f"{method}.init needs exactly one of logits_fn= (logits_fn(tau, inputs) -> logits, "
        f"scored by the {objective!r} objective) or loss_fn= (loss_fn(tau, batch) -> scalar); "
        f"got {'both' if logits_fn is not None else 'neither'}.")
  if loss_fn is not None:
    return lambda tau, batch, aux: _call(loss_fn, tau, batch, aux)
  if objective == "entropy":
    def loss(tau, inputs, aux):
      return sum(entropy(l) for l in _as_list(_call(logits_fn, tau, inputs, aux)))
    return loss
  if objective == "cross_entropy":
    def loss(tau, batch, aux):
      if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"{method}: the cross_entropy objective needs batches of (inputs, labels); got a "
            f"{type(batch).__name__}. Fix: yield (inputs, labels) pairs, or use loss_fn=.")
      inputs, labels = batch
      logits = _as_list(_call(logits_fn, tau, inputs, aux))
      labels = _as_list(labels)
      if len(logits) != len(labels):
        raise ValueError(f"{method}: logits_fn returned {len(logits)} logits arrays but the "
                         f"batch has {len(labels)} label arrays.")
      return sum(cross_entropy(l, y) for l, y in zip(logits, labels))
    return loss
  raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")


# ------------------------------------------------------------------ the loop

def batch_source(batches, method: str) -> Callable[[int], Any]:
  """``step -> batch`` from a list of batches (cycled) or a function."""
  if batches is None:
    raise ValueError(f"{method}.init needs batches=: a list of batches (cycled) or a function "
                     "step -> batch.")
  if callable(batches):
    return batches
  if isinstance(batches, list):
    if not batches:
      raise ValueError(f"{method}.init got an empty list of batches.")
    return lambda step: batches[step % len(batches)]
  raise ValueError(
      f"{method}.init: batches must be a list of batches or a function step -> batch, got a "
      f"{type(batches).__name__}. Fix: wrap a single batch as [batch].")


def fit(raw0: PyTree, stacked: PyTree, combine: Callable[[PyTree, PyTree], PyTree],
        loss: Callable, batches: Callable[[int], Any], *, optimizer: optax.GradientTransformation,
        steps: int, aux: PyTree = None, penalty: Callable[[PyTree], jax.Array] | None = None
        ) -> tuple[PyTree, list[float]]:
  """Trains raw coefficients: minimises ``loss(combine(raw, stacked), batch, aux) + penalty(raw)``.

  One jitted step per batch (compiled once per batch shape); ``stacked`` and
  ``aux`` are arguments of the compiled step (never constants). Returns the
  final raw coefficients and the loss of every step.
  """
  def objective(raw, stacked, batch, aux):
    value = loss(combine(raw, stacked), batch, aux)
    return value + penalty(raw) if penalty is not None else value

  @jax.jit
  def step(raw, opt_state, stacked, batch, aux):
    value, grads = jax.value_and_grad(objective)(raw, stacked, batch, aux)
    updates, opt_state = optimizer.update(grads, opt_state, raw)
    return optax.apply_updates(raw, updates), opt_state, value

  raw = raw0
  opt_state = optimizer.init(raw)
  losses = []
  for i in range(int(steps)):
    raw, opt_state, value = step(raw, opt_state, stacked, batches(i), aux)
    losses.append(value)
  return raw, [float(v) for v in losses]


def steps_arg(value, name: str = "steps") -> int:
  """A positive int number of optimisation steps, else ``ValueError``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def positive(value, name: str) -> float:
  """A finite float > 0, else ``ValueError`` naming ``name``."""
  out = hparams.real(value, name)
  if out <= 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")
  return out


def check_choice(value, name: str, choices: Sequence[str]) -> str:
  """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
  return value
