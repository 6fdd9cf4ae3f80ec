"""The `Merge` type and its combinators (`chain`, `masked`, `identity`, `scale`).

A merge method is a pair of pure functions, shaped like optax's
``GradientTransformation``::

  coeffs = merge.init(stacked_taus, **kwargs)   # reduction over all leaves
  tau = merge.apply(coeffs, stacked_taus)       # map, leaf by leaf

``stacked_taus`` is a pytree whose every leaf has a leading ``task`` axis of
size T (``research.task_vectors.stack``). ``init`` computes everything that
needs the whole tree at once (TIES' top-k threshold over the whole flattened
task vector, a random key for DARE, ...) and returns it as an explicit pytree
of coefficients / statistics; it only ever reads shapes from its argument when
it has no statistics to compute, so ``jax.eval_shape(merge.init, stacked)``
works. ``apply`` is leaf-local: leaf ``i`` of the output depends only on leaf
``i`` of the input and on ``coeffs``. That split is what lets a merge run
sharded over a mesh (statistics by collective reduction in ``init``) and be
streamed leaf by leaf.

Stages and composition
  The same type describes three kinds of stage, told apart only by what their
  ``apply`` returns:
  - a *pre-transform* maps stacked taus to stacked taus (TIES' trim, DARE's
    drop-and-rescale, Breadcrumbs' mask);
  - a *merge* maps stacked taus to one tau (average, task arithmetic, TIES'
    sign election and disjoint mean);
  - a *post-transform* maps one tau to one tau (a global scale, LiNeS'
    depth-dependent scaling).
  ``chain(*stages)`` threads the output of each stage's ``apply`` into the
  next stage, exactly like ``optax.chain``: its ``init`` gives stage ``i``
  the input that stage ``i`` will see in ``apply``. So
  ``chain(trim(0.2), disjoint_mean(), lines(...))`` is TIES followed by LiNeS.

Keyword arguments of ``init``
  Randomness comes in as ``key=`` (a ``jax.random`` key); data statistics
  (Fisher diagonals, Gram matrices) as further keyword arguments. Each stage
  takes what it needs and ignores the rest, and a stage that needs an
  argument raises a ``ValueError`` naming it when it is missing. ``chain``
  gives stage ``i`` the key ``jax.random.fold_in(key, i)`` so that two random
  stages never share bits.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class Merge(NamedTuple):
  """A merge method: ``init(stacked, **kwargs) -> coeffs``, ``apply(coeffs, stacked) -> out``."""
  init: Callable[..., PyTree]
  apply: Callable[[PyTree, PyTree], PyTree]


class MaskedNode(NamedTuple):
  """Stands in for a leaf that a `masked` stage does not see (a pytree with no leaves)."""


def _no_coeffs(x, **kwargs):
  del x, kwargs
  return ()


def identity() -> Merge:
  """The stage that returns its input unchanged (``masked``'s default ``otherwise``)."""
  return Merge(_no_coeffs, lambda coeffs, x: x)


def scale(c: float) -> Merge:
  """Multiplies every leaf by the constant ``c`` (a post-transform, like ``optax.scale``).

  Computes in at least float32 and casts back to each leaf's dtype.
  """
  c = float(c)

  def apply(coeffs, x):
    del coeffs
    def one(v):
      dt = jnp.promote_types(v.dtype, jnp.float32)
      return (v.astype(dt) * c).astype(v.dtype)
    return jax.tree.map(one, x)

  return Merge(_no_coeffs, apply)


def chain(*stages: Merge) -> Merge:
  """Composes stages left to right; ``coeffs`` is the tuple of the stages' coeffs.

  ``init`` runs stage ``i``'s ``init`` on the output of stages ``0..i-1``
  (their ``apply``), so a statistic is always computed on what the stage will
  see. Inside ``jax.jit`` an intermediate that no later ``init`` reads is
  never computed; one that is read (e.g. the dropped taus that a trim after
  DARE ranks) is materialised once.
  """
  for i, s in enumerate(stages):
    if not isinstance(s, Merge):
      raise TypeError(
          f"chain() argument {i} is a {type(s).__name__}, not a Merge. Fix: pass "
          "stages built by the factories, e.g. chain(ties(0.2), lines()).")

  def init(x, **kwargs):
    key = kwargs.pop("key", None)
    coeffs = []
    for i, s in enumerate(stages):
      extra = dict(kwargs)
      if key is not None:
        extra["key"] = jax.random.fold_in(key, i)
      c = s.init(x, **extra)
      coeffs.append(c)
      if i + 1 < len(stages):
        x = s.apply(c, x)
    return tuple(coeffs)

  def apply(coeffs, x):
    if len(coeffs) != len(stages):
      raise ValueError(
          f"chain of {len(stages)} stages got {len(coeffs)} coeffs. Fix: pass the "
          "output of this chain's own init.")
    for s, c in zip(stages, coeffs):
      x = s.apply(c, x)
    return x

  return Merge(init, apply)


def _is_masked_node(x):
  return isinstance(x, MaskedNode)


def _resolve_mask(mask, x):
  m = mask(x) if callable(mask) else mask
  try:
    return jax.tree.map(lambda _, b: bool(b), x, m)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "masked(): the mask must be a pytree of Python bools with the structure of "
        "the tree it masks (or a function returning one); got a mismatch: "
        f"{e}. Fix: build it with jax.tree.map(lambda x: ..., tree) or "
        "jax.tree_util.tree_map_with_path.") from e


def masked(inner: Merge, mask: Any, otherwise: Merge | None = None) -> Merge:
  """Runs ``inner`` on the leaves where ``mask`` is True and ``otherwise`` on the rest.

  Like ``optax.masked``: ``mask`` is a pytree of Python bools with the
  structure of the input (or a function of the input returning one).
  ``inner.init`` sees only the selected leaves (the others are replaced by
  ``MaskedNode()``), so global statistics are computed over those leaves
  only, e.g. TIES' top-k over the weight matrices but not over the biases.
  ``otherwise`` defaults to ``identity()``, which is right for pre- and
  post-transforms; for a merge, give the merge to use on the other leaves,
  e.g. ``masked(ties(), is_matrix, otherwise=average())``.
  """
  otherwise = identity() if otherwise is None else otherwise

  def split(x):
    m = _resolve_mask(mask, x)
    sel = jax.tree.map(lambda v, b: v if b else MaskedNode(), x, m)
    rest = jax.tree.map(lambda v, b: MaskedNode() if b else v, x, m)
    return m, sel, rest

  def init(x, **kwargs):
    _, sel, rest = split(x)
    return (inner.init(sel, **kwargs), otherwise.init(rest, **kwargs))

  def apply(coeffs, x):
    m, sel, rest = split(x)
    c_in, c_out = coeffs
    out_sel = inner.apply(c_in, sel)
    out_rest = otherwise.apply(c_out, rest)
    # Both outputs keep the input's structure (MaskedNode where the stage
    # did not look), so the two can be zipped back leaf by leaf.
    return jax.tree.map(
        lambda b, a, r: a if b else r, m, out_sel, out_rest,
        is_leaf=_is_masked_node)

  return Merge(init, apply)
