"""Task vectors: arithmetic on the difference between fine-tuned and pre-trained weights.

Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR
2023) treats ``tau = finetuned - pretrained`` as a vector in weight space:
adding task vectors builds a multi-task model, negating one makes the model
forget a task. Everything here is a pure function on pytrees of arrays (the
``params`` of a model), works on tracers under ``jax.jit`` and keeps the
sharding of its inputs.

>>> import jax.numpy as jnp
>>> params0 = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
>>> finetuned = {"w": jnp.array([1.5, 1.0]), "b": jnp.array(0.0)}
>>> tau = task_vector(finetuned, params0)
>>> apply(params0, tau, scale=0.5)["w"]
Array([1.25, 1.5 ], dtype=float32)

Structure checks
  Every binary operation checks, at trace time and only on shapes and dtypes
  (never on values), that its pytrees have the same tree structure and that
  each pair of leaves has the same shape and dtype. A mismatch raises a
  ``ValueError`` that names the leaf path (``jax.tree_util.keystr``), both
  shapes / dtypes and how to fix it. ``check_same_structure`` is shared with
  ``research.merging`` and accepts abstract leaves (``jax.ShapeDtypeStruct``).

Non-floating leaves (policy)
  A model's state may hold integer or boolean buffers (position ids, step
  counters, masks). They are *frozen*: they take part in the structure check
  but never in arithmetic.
  - ``task_vector`` maps them to zeros of the same shape and dtype, so a task
    vector has exactly the tree structure, shapes and dtypes of the params
    (it can be stacked, sharded and merged like them). The fine-tuned value
    of such a buffer is dropped, even if it differs from the pre-trained one.
  - ``apply`` carries them unchanged from ``pretrained``; the value in
    ``tau`` is ignored.
  - ``add`` / ``scale`` / ``negate`` keep the first argument's value;
    ``dot`` / ``norm`` / ``cosine`` ignore them.
  - ``stack`` / ``unstack`` treat them like any other leaf.
  Leaves with extended dtypes (PRNG key arrays) have no zero; filter them out
  first, e.g. ``nnx.split(model, nnx.Param)``.
  Complex leaves count as floating; ``dot`` is the real inner product
  ``Re <a, b>`` on them.

Precision
  Arithmetic happens in the leaves' own dtype except where it loses too much:
  ``apply`` and ``scale`` compute in at least float32 and cast back to the
  input dtype; ``dot`` / ``norm`` / ``cosine`` accumulate in at least float32
  and return a scalar of that dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "task_vector",
    "apply",
    "add",
    "scale",
    "negate",
    "dot",
    "norm",
    "cosine",
    "stack",
    "unstack",
]

PyTree = Any

# How many mismatching leaves an error message lists before it says "...".
_MAX_REPORTED = 5


# ----------------------------------------------------------------------------
# Helpers shared with the rest of the library (merging, tangent).


def is_floating(x) -> bool:
  """Whether a leaf (array, tracer or ``ShapeDtypeStruct``) takes part in arithmetic."""
  return jnp.issubdtype(_dtype(x), jnp.inexact)


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def check_same_structure(a: PyTree, b: PyTree, names: Sequence[str] = ("a", "b")) -> None:
  """Raises ``ValueError`` unless ``a`` and ``b`` match leaf by leaf.

  Matching means: same tree structure, and for each leaf the same shape and
  dtype. Only static information is read, so this works on tracers and on
  abstract ``jax.ShapeDtypeStruct`` trees. The message names the leaf path.
  """
  name_a, name_b = names
  leaves_a, treedef_a = jax.tree_util.tree_flatten_with_path(a)
  leaves_b, treedef_b = jax.tree_util.tree_flatten_with_path(b)
  if treedef_a != treedef_b:
    paths_a = {jax.tree_util.keystr(p): p for p, _ in leaves_a}
    paths_b = {jax.tree_util.keystr(p): p for p, _ in leaves_b}
    only_a = [k for k in paths_a if k not in paths_b]
    only_b = [k for k in paths_b if k not in paths_a]
    lines = [f"{name_a} and {name_b} have different tree structures."]
    if only_a:
      lines.append(f"Leaf paths only in {name_a}: {_listing(only_a)}.")
    if only_b:
      lines.append(f"Leaf paths only in {name_b}: {_listing(only_b)}.")
    if not only_a and not only_b:
      lines.append(
          "The leaf paths agree but the container types differ "
          f"({name_a}: {treedef_a}; {name_b}: {treedef_b}).")
    lines.append(
        "Fix: build both from the same model definition and the same filter "
        "(e.g. nnx.split(model, nnx.Param)), or drop the extra entries from one "
        "of them, and use the same container types (dict vs FrozenDict, list vs "
        "tuple).")
    raise ValueError(" ".join(lines))

  bad = []
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    sx, sy, dx, dy = _shape(x), _shape(y), _dtype(x), _dtype(y)
    if sx != sy:
      bad.append(("shape", jax.tree_util.keystr(path), sx, sy))
    elif dx != dy:
      bad.append(("dtype", jax.tree_util.keystr(path), dx, dy))
  if not bad:
    return
  kinds = {kind for kind, *_ in bad}
  details = "; ".join(
      f"leaf {path}: {kind} {va} in {name_a} vs {vb} in {name_b}"
      for kind, path, va, vb in bad[:_MAX_REPORTED])
  more = f" (and {len(bad) - _MAX_REPORTED} more)" if len(bad) > _MAX_REPORTED else ""
  fixes = []
  if "shape" in kinds:
    fixes.append("both must come from the same architecture and config "
                 "(same widths, vocabulary, number of layers)")
  if "dtype" in kinds:
    fixes.append(f"cast one tree to the other's dtypes, e.g. "
                 f"jax.tree.map(lambda x, y: x.astype(y.dtype), {name_b}, {name_a})")
  raise ValueError(
      f"{name_a} and {name_b} do not match: {details}{more}. "
      f"Fix: {'; '.join(fixes)}.")


def _listing(items):
  shown = ", ".join(items[:_MAX_REPORTED])
  return shown + (f", ... ({len(items) - _MAX_REPORTED} more)"
                  if len(items) > _MAX_REPORTED else "")


def num_tasks(stacked: PyTree, name: str = "stacked") -> int:
  """Size of the leading ``task`` axis of a stacked tree (checked on every leaf)."""
  leaves = jax.tree_util.tree_flatten_with_path(stacked)[0]
  if not leaves:
    raise ValueError(
        f"{name} has no leaves, so it has no task axis. Fix: pass the output "
        "of task_vectors.stack(taus) for a non-empty params tree.")
  sizes = {}
  for path, x in leaves:
    shape = _shape(x)
    if not shape:
      raise ValueError(
          f"{name} leaf {jax.tree_util.keystr(path)} is a scalar, so it has no "
          "leading task axis. Fix: build stacked trees with task_vectors.stack.")
    sizes.setdefault(shape[0], jax.tree_util.keystr(path))
  if len(sizes) > 1:
    listed = ", ".join(f"{n} at leaf {p}" for n, p in sizes.items())
    raise ValueError(
        f"{name} leaves disagree on the size of the leading task axis ({listed}). "
        "Fix: build stacked trees with task_vectors.stack.")
  return next(iter(sizes))


def _zeros_like(x, path):
  if jnp.issubdtype(_dtype(x), jax.dtypes.extended):
    raise TypeError(
        f"leaf {jax.tree_util.keystr(path)} has the extended dtype {_dtype(x)} "
        "(e.g. a PRNG key), which has no task vector. Fix: keep only the "
        "parameters, e.g. nnx.split(model, nnx.Param).")
  return jnp.zeros_like(x)


def accumulation_dtype(*dtypes):
  """The dtype arithmetic on these dtypes runs in: their promotion, at least float32."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


# ----------------------------------------------------------------------------
# Public API.


def task_vector(finetuned: PyTree, pretrained: PyTree) -> PyTree:
  """``finetuned - pretrained`` leaf by leaf; non-floating leaves become zeros."""
  check_same_structure(finetuned, pretrained, ("finetuned", "pretrained"))

  def leaf(path, ft, p0):
    return ft - p0 if is_floating(p0) else _zeros_like(p0, path)

  return jax.tree.map_with_path(leaf, finetuned, pretrained)


def apply(pretrained: PyTree, tau: PyTree, scale: Any = 1.0) -> PyTree:
  """``pretrained + scale * tau``, in the dtypes of ``pretrained``.

  ``scale`` is a python number or a scalar array (traceable, differentiable).
  Non-floating leaves are carried unchanged from ``pretrained``.
  """
  check_same_structure(pretrained, tau, ("pretrained", "tau"))
  c = _as_scalar(scale, "scale")

  def leaf(p0, t):
    if not is_floating(p0):
      return p0
    p0 = jnp.asarray(p0)
    dt = accumulation_dtype(p0.dtype, c.dtype)
    return (p0.astype(dt) + c.astype(dt) * t.astype(dt)).astype(p0.dtype)

  return jax.tree.map(leaf, pretrained, tau)


def add(*taus: PyTree) -> PyTree:
  """Sum of one or more task vectors (``add(t1, t2, t3)``, or ``add(*taus)``)."""
  if not taus:
    raise ValueError(
        "add() needs at least one task vector; the sum of none has no structure. "
        "Fix: pass task vectors as separate arguments, e.g. add(*taus) with a "
        "non-empty list.")
  for i, tau in enumerate(taus[1:], start=1):
    check_same_structure(taus[0], tau, ("taus[0]", f"taus[{i}]"))

  def leaf(first, *rest):
    if not is_floating(first):
      return first
    out = first
    for t in rest:
      out = out + t
    return out

  return jax.tree.map(leaf, *taus)


def scale(tau: PyTree, c: Any) -> PyTree:
  """``c * tau`` for a python number or scalar array ``c`` (differentiable in ``c``)."""
  c = _as_scalar(c, "c")

  def leaf(t):
    if not is_floating(t):
      return t
    t = jnp.asarray(t)
    dt = accumulation_dtype(t.dtype, c.dtype)
    return (c.astype(dt) * t.astype(dt)).astype(t.dtype)

  return jax.tree.map(leaf, tau)


def negate(tau: PyTree) -> PyTree:
  """``-tau`` (task negation: applying it makes the model forget the task)."""
  return jax.tree.map(lambda t: -t if is_floating(t) else t, tau)


def dot(a: PyTree, b: PyTree) -> jax.Array:
  """Inner product ``sum over floating leaves of <a, b>``, accumulated in >= float32."""
  check_same_structure(a, b, ("a", "b"))
  terms = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if not is_floating(x):
      continue
    dt = accumulation_dtype(x.dtype)
    x, y = x.astype(dt), y.astype(dt)
    # An elementwise product then a full reduction keeps any input sharding
    # legal (a ravel-based vdot would need a reshape of sharded dimensions).
    terms.append(jnp.sum(jnp.real(jnp.conj(x) * y)))
  if not terms:
    return jnp.zeros((), jnp.float32)
  dt = jnp.result_type(*terms)
  return sum(t.astype(dt) for t in terms)


def norm(tau: PyTree) -> jax.Array:
  """Euclidean norm over all floating leaves, accumulated in >= float32.

  Its gradient at ``tau = 0`` is defined as 0 (not nan), so a norm penalty
  can be trained from zero.
  """
  return _safe_sqrt(dot(tau, tau))


def _safe_sqrt(x):
  # sqrt'(0) is inf and inf * 0 = nan in the backward pass; the where keeps
  # the zero branch out of the derivative.
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def cosine(a: PyTree, b: PyTree) -> jax.Array:
  """Cosine similarity of two task vectors, in [-1, 1]; 0 if either is zero."""
  ab = dot(a, b)
  denom = _safe_sqrt(dot(a, a)) * _safe_sqrt(dot(b, b))
  positive = denom > 0
  # Rounding can push |ab| / denom a hair past 1 for parallel vectors.
  cos = jnp.clip(ab / jnp.where(positive, denom, 1), -1, 1)
  return jnp.where(positive, cos, 0).astype(ab.dtype)


def stack(taus: Sequence[PyTree]) -> PyTree:
  """One tree whose every leaf has a leading ``task`` axis of size ``len(taus)``."""
  taus = list(taus)
  if not taus:
    raise ValueError(
        "stack() got an empty list of task vectors; a stacked tree needs at "
        "least one task. Fix: pass a non-empty list, e.g. stack([tau_a, tau_b]).")
  for i, tau in enumerate(taus[1:], start=1):
    check_same_structure(taus[0], tau, ("taus[0]", f"taus[{i}]"))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *taus)


def unstack(stacked: PyTree) -> list[PyTree]:
  """Inverse of ``stack``: a list with one tree per entry of the ``task`` axis."""
  n = num_tasks(stacked)
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def _as_scalar(c, name):
  c = jnp.asarray(c)
  if c.ndim != 0:
    raise ValueError(
        f"{name} must be a scalar, got shape {c.shape}. Fix: scale by one number "
        "per call; for one coefficient per task use a stacked tree and "
        "jnp.tensordot, or research.merging.")
  if not jnp.issubdtype(c.dtype, jnp.number):
    raise ValueError(f"{name} must be a number, got dtype {c.dtype}.")
  return c
