"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) as factors of task vectors.

A LoRA fine-tune keeps the pre-trained ``params0`` frozen and trains, for each
adapted 2-D kernel ``W0 [d_in, d_out]`` (our kernels map ``x @ W``), two
factors

  A [d_in, r]   (random at init),   B [r, d_out]   (zeros at init)

so that the adapted kernel is ``W0 + s * A @ B`` with ``s = alpha / r``
(``alpha=None`` means ``alpha = r``, i.e. ``s = 1``, the LoRA paper's GLUE
setting of alpha equal to the rank). The densified update ``s * A @ B`` at the
adapted leaves and zeros elsewhere is a task vector like any other: it adds,
negates, stacks and merges with ``research.task_vectors`` /
``research.merging``.

Factors are a plain nested dict that follows the leaf names of ``params0``
(``research.models.param_tree.leaf_name``), with ``{"a": A, "b": B}`` in place
of each adapted kernel, e.g. ``factors["layers"]["0"]["attention"]["query"]
["kernel"] = {"a": ..., "b": ...}``. Plain dicts checkpoint with Orbax, stack
with ``task_vectors.stack`` (a leading ``task`` axis on every factor) and
shard with ``train.default_param_axes``.

>>> factors = init(params0, rank=8, key=jax.random.key(0))     # doctest: +SKIP
>>> f = model_fn(apply_fn)                                      # doctest: +SKIP
>>> out = f(factors, params0, ids, mask)   # = apply_fn(params0, ...) at B = 0  # doctest: +SKIP
>>> tau = densify(factors, params0)            # a task vector shaped like params0  # doctest: +SKIP

Default selection (``select=None``): every 2-D floating leaf named ``kernel``
inside the transformer layers, i.e. whose path names a layer index
(``research.merging.lines.depth_from_path``): the attention query / key /
value / output and the two MLP kernels of BERT (and of CLIP's blocks).
Embeddings, norms and biases stay frozen, as in the LoRA paper (which adapts
attention weights; adapting the MLP as well follows later practice, e.g.
QLoRA).

Initialisation follows the reference implementation (microsoft/LoRA,
``loralib``): A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (torch's kaiming-uniform
with a = sqrt(5)), B = 0. The paper says "random Gaussian" for A; either way
the product starts at zero.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from research import task_vectors
from research.models.param_tree import leaf_name

PyTree = Any
FACTOR_KEYS = ("a", "b")


# ----------------------------------------------------------------- selection

def _layer_path(name: str) -> tuple:
  return tuple(jax.tree_util.DictKey(part) for part in name.split("/"))


def default_select(name: str, leaf: Any) -> bool:
  """Every 2-D floating leaf named ``kernel`` whose path has a layer index."""
  # Lazy: research.merging imports this module.
  from research.merging.lines import depth_from_path  # pylint: disable=g-import-not-at-top
  return (name.split("/")[-1] == "kernel" and len(leaf.shape) == 2
          and task_vectors.is_floating(leaf)
          and depth_from_path(_layer_path(name)) is not None)


def _selector(select) -> Callable[[str, Any], bool]:
  if select is None:
    return default_select
  if isinstance(select, str):
    pattern = re.compile(select)
    return lambda name, leaf: pattern.search(name) is not None
  if callable(select):
    return select
  raise ValueError(
      f"select must be None, a regular expression matched against leaf names (e.g. "
      f"r'attention/(query|value)/kernel$') or a function (name, leaf) -> bool; got "
      f"{type(select).__name__}.")


# ----------------------------------------------------------------- factor trees

def named(factors: PyTree) -> dict[str, tuple[Any, Any]]:
  """``{leaf name: (A, B)}`` of a factors tree (see the module docstring)."""
  if not isinstance(factors, Mapping):
    raise ValueError(
        f"LoRA factors must be a nested dict (from lora.init), got {type(factors).__name__}.")
  out: dict[str, tuple[Any, Any]] = {}

  def walk(node, prefix):
    if isinstance(node, Mapping) and set(node) == set(FACTOR_KEYS):
      out["/".join(prefix)] = (node["a"], node["b"])
      return
    if not isinstance(node, Mapping) or not node:
      raise ValueError(
          f"LoRA factors: the entry at {'/'.join(prefix) or '<root>'!r} is not a dict of "
          f"{{'a': A, 'b': B}} factors. Fix: pass the tree returned by lora.init (or a "
          "stack of such trees).")
    for k, v in node.items():
      walk(v, prefix + [str(k)])

  walk(factors, [])
  return out


def nest(mapping: Mapping[str, tuple[Any, Any]]) -> dict:
  """Inverse of ``named``: a factors tree from ``{leaf name: (A, B)}``."""
  out: dict = {}
  for name, (a, b) in mapping.items():
    node = out
    parts = name.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = {"a": a, "b": b}
  return out


def rank(factors: PyTree) -> int:
  """The LoRA rank r (the last axis of every A); raises if the factors disagree."""
  ranks = {name: a.shape[-1] for name, (a, _) in named(factors).items()}
  if len(set(ranks.values())) != 1:
    raise ValueError(f"LoRA factors have different ranks per leaf: {ranks}.")
  return next(iter(ranks.values()))


def scaling(alpha, r: int) -> float:
  """The LoRA scale s = alpha / r (alpha None: 1.0); ValueError on a bad alpha."""
  if alpha is None:
    return 1.0
  alpha = float(alpha)
  if not math.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"LoRA alpha must be a finite number > 0 (or None for alpha = rank), "
                     f"got {alpha!r}.")
  return alpha / r


def _check_rank(r) -> int:
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise ValueError(f"LoRA rank must be a positive int, got {r!r}.")
  return r


# ----------------------------------------------------------------- public API

def init(params0: PyTree, rank: int, key: jax.Array, *, select=None) -> dict:
  """LoRA factors for ``params0``: A random, B zero, at every selected kernel.

  Args:
    params0: the pre-trained params (arrays or ``jax.ShapeDtypeStruct``s; only
      shapes and dtypes are read).
    rank: r, a positive int no larger than ``min(d_in, d_out)`` of any
      selected kernel.
    key: ``jax.random`` key; leaf ``i`` (in sorted name order) draws from
      ``fold_in(key, i)``.
    select: which leaves to adapt: None (see the module docstring), a regular
      expression searched in the leaf names, or ``select(name, leaf) -> bool``.
      Every selected leaf must be a 2-D floating kernel.

  Returns:
    A factors tree: ``{"a": [d_in, r], "b": [r, d_out]}`` per adapted leaf, in
    the leaf's dtype.
  """
  r = _check_rank(rank)
  choose = _selector(select)
  leaves = [(leaf_name(path), x) for path, x in jax.tree_util.tree_flatten_with_path(params0)[0]]
  chosen = sorted((name, x) for name, x in leaves if choose(name, x))
  if not chosen:
    sample = ", ".join(name for name, _ in leaves[:12])
    raise ValueError(
        "lora.init: no leaf of params0 matches the selection, so there is nothing to adapt "
        f"(leaf names: {sample}{', ...' if len(leaves) > 12 else ''}). Fix: pass select= (a "
        "regular expression on these names or a function (name, leaf) -> bool); the default "
        "takes the 2-D 'kernel' leaves under a layer index (e.g. layers/0/.../kernel).")
  factors = {}
  for i, (name, x) in enumerate(chosen):
    shape = tuple(x.shape)
    if len(shape) != 2 or not task_vectors.is_floating(x):
      raise ValueError(
          f"lora.init: selected leaf {name!r} has shape {shape} and dtype {x.dtype}; LoRA adapts "
          "2-D floating kernels [d_in, d_out]. Fix: narrow select= to the dense kernels.")
    d_in, d_out = shape
    if r > min(d_in, d_out):
      raise ValueError(
          f"lora.init: rank {r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of leaf {name!r} "
          f"(shape {shape}); a rank this large is no longer low-rank. Fix: lower the rank or "
          "leave this leaf out with select=.")
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, r), jnp.float32, -bound, bound)
    factors[name] = (a.astype(x.dtype), jnp.zeros((r, d_out), x.dtype))
  return nest(factors)


def densify(factors: PyTree, params0: PyTree, *, alpha: float | None = None) -> PyTree:
  """The task vector of ``factors``: ``alpha / r * A @ B`` at adapted leaves, zeros elsewhere.

  The result has the tree structure, shapes and dtypes of ``params0`` (whose
  leaves may be ``jax.ShapeDtypeStruct``s: only shapes are read). Stacked
  factors (a leading ``task`` axis on every A and B, ``task_vectors.stack``)
  give stacked task vectors ([T, ...] on every leaf). Jit-able and
  differentiable in ``factors``; the products accumulate in at least float32.
  """
  pairs = named(factors)
  if not pairs:
    raise ValueError("densify: the factors tree is empty.")
  batch = None
  for name, (a, b) in pairs.items():
    if a.ndim < 2 or b.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
      raise ValueError(
          f"densify: factors of leaf {name!r} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
          "expected A [..., d_in, r] and B [..., r, d_out] with the same leading axes.")
    if batch is None:
      batch = tuple(a.shape[:-2])
    elif tuple(a.shape[:-2]) != batch:
      raise ValueError(
          f"densify: leaf {name!r} has leading (task) axes {tuple(a.shape[:-2])}, others "
          f"{batch}; stack all factors together.")
  names = {leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params0)[0]}
  unknown = sorted(set(pairs) - names)
  if unknown:
    raise ValueError(
        f"densify: factors for {unknown} name no leaf of params0. Fix: build the factors "
        "with lora.init from these params0 (same model and config).")

  def leaf(path, p):
    shape, dtype = tuple(p.shape), p.dtype
    name = leaf_name(path)
    if name not in pairs:
      return jnp.zeros(batch + shape, dtype)
    a, b = pairs[name]
    if len(shape) != 2 or (a.shape[-2], b.shape[-1]) != shape:
      raise ValueError(
          f"densify: leaf {name!r} has shape {shape} but its factors give "
          f"[{a.shape[-2]}, {b.shape[-1]}]. Fix: use factors made for these params0.")
    dt = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    delta = jnp.einsum("...ir,...ro->...io", a.astype(dt), b.astype(dt),
                       precision=jax.lax.Precision.HIGHEST)
    return (scaling(alpha, a.shape[-1]) * delta).astype(dtype)

  return jax.tree_util.tree_map_with_path(leaf, params0)


def apply(params0: PyTree, factors: PyTree, *, alpha: float | None = None) -> PyTree:
  """``params0 + densify(factors, params0)``: the fine-tuned params of a LoRA run."""
  return task_vectors.apply(params0, densify(factors, params0, alpha=alpha))


def model_fn(apply_fn: Callable, *, alpha: float | None = None) -> Callable:
  """``f(factors, params0, *inputs) = apply_fn(params0 + densify(factors, params0), *inputs)``.

  The training target of the ``lora`` fine-tuning mode (``train.model_fn``):
  differentiable in ``factors``; ``params0`` is an argument, never captured.
  """
  def f(factors, params0, *inputs, **kwargs):
    return apply_fn(apply(params0, factors, alpha=alpha), *inputs, **kwargs)

  return f
