"""LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025).

Conventions. Our kernels map ``x @ W`` and a LoRA update is
``dW = s * A @ B`` with A [d_in, r], B [r, d_out], s = alpha / r
(``research.lora``). The paper writes torch's ``dW = B_p A_p`` with
B_p [d_out, r], A_p [r, d_in]; its i-th *minimal semantic unit* (MSU) is
(column i of B_p, row i of A_p), which in our convention is

  u_i = [A[:, i] ; B[i, :]]  in R^(d_in + d_out),    dW = s * sum_i A[:, i] B[i, :]^T

(MSUs are permutation invariant, and concatenating two LoRAs along the rank
axis sums their updates). For each adapted kernel, independently:

  1. Pool:    U = {u_(t,i) : task t = 1..T, rank i = 1..r}          (N = T r units)
  2. Cluster: k-means on U into k clusters C_1..C_k (k-means++ seeding from
              an explicit key, then ``iters`` Lloyd steps; deterministic)
  3. Centroids: c_j = mean_(u in C_j) u
  4. Parameter reweighting (norm decay: the mean of non-parallel units is
     shorter than they are):
              c_j <- c_j * (mean_(u in C_j) ||u||) / ||c_j||
  5. Output reweighting (variance expansion: k units of the size of one
     LoRA's r units add k / r times the output variance):
              dW_merged = s * sqrt(r / k) * sum_j c_j[:d_in] c_j[d_in:]^T

so the merged update is the LoRA of rank k whose i-th unit is the
(reweighted) centroid i. Defaults: k = r (the merged LoRA has the rank of
the inputs; the paper varies k), both reweightings on, 100 Lloyd steps.

Deliberate choices where the paper leaves room (it has no official code we
could read): norms are Euclidean over the concatenated unit (a third-party
re-implementation uses the max-abs norm instead); k-means runs on the raw
units (not normalised ones) with k-means++ seeding; an empty cluster
contributes a zero unit.

The ``Merge`` contract: LoRA factors come in as a keyword of ``init``::

  m = merging.get("lora_lego", k=8)
  coeffs = m.init(stacked_taus, factors=stacked_factors, key=key, alpha=lora_alpha)
  tau = m.apply(coeffs, stacked_taus)          # densified merged update, shaped like one tau

``stacked_taus`` are the densified LoRA task vectors
(``lora.densify(stacked_factors, params0, alpha=...)``), used for
structure and shapes only; ``stacked_factors`` is ``task_vectors.stack`` of
the T factor trees (every A [T, d_in, r], B [T, r, d_out]); ``alpha`` is the
LoRAs' alpha (None: alpha = r). ``coeffs["factors"]`` is the merged rank-k
LoRA itself, with all scaling folded into B: ``lora.densify(coeffs["factors"],
params0)`` (alpha None, scale 1) equals ``apply``'s output.

Memory: ``init`` works on the factors only (T r units per kernel); ``apply``
creates the output task vector and nothing else.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from research import lora
from research.merging import hparams
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.models.param_tree import leaf_name

_HIGHEST = jax.lax.Precision.HIGHEST


def _sq_dists(u: jax.Array, c: jax.Array) -> jax.Array:
  """[N, k] squared Euclidean distances between rows of u [N, D] and c [k, D]."""
  cross = jnp.matmul(u, c.T, precision=_HIGHEST)
  d2 = jnp.sum(u * u, -1)[:, None] - 2 * cross + jnp.sum(c * c, -1)[None, :]
  return jnp.maximum(d2, 0.0)


def kmeans(units: jax.Array, k: int, key: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
  """k-means++ seeding then ``iters`` Lloyd steps; returns (assignment [N] int, centroids [k, D]).

  Deterministic given ``key``; ties go to the lower cluster index. A cluster
  that loses all its points keeps its previous centroid during the Lloyd
  steps. Jit-able (k and iters are static).
  """
  n = units.shape[0]
  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, n)
  centroids = jnp.zeros((k, units.shape[1]), units.dtype).at[0].set(units[first])
  nearest = _sq_dists(units, centroids[:1])[:, 0]
  for j in range(1, k):
    total = jnp.sum(nearest)
    # All points already coincide with a centroid: any choice is as good; take uniform.
    p = jnp.where(total > 0, nearest / jnp.where(total > 0, total, 1.0), 1.0 / n)
    pick = jax.random.choice(keys[j], n, p=p)
    centroids = centroids.at[j].set(units[pick])
    nearest = jnp.minimum(nearest, _sq_dists(units, centroids[j:j + 1])[:, 0])

  def lloyd(_, c):
    onehot = jax.nn.one_hot(jnp.argmin(_sq_dists(units, c), -1), k, dtype=units.dtype)
    counts = onehot.sum(0)
    sums = jnp.matmul(onehot.T, units, precision=_HIGHEST)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)

  centroids = jax.lax.fori_loop(0, iters, lloyd, centroids)
  return jnp.argmin(_sq_dists(units, centroids), -1), centroids


def merge_units(a: jax.Array, b: jax.Array, k: int, key: jax.Array, *, iters: int = 100,
                param_reweight: bool = True) -> tuple[jax.Array, jax.Array]:
  """Steps 1-4 for one kernel: A [T, d_in, r], B [T, r, d_out] -> A' [d_in, k], B' [k, d_out].

  The product ``A' @ B'`` is the merged update before the LoRA scale and the
  output reweighting (step 5).
  """
  t, d_in, r = a.shape
  dt = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  units = jnp.concatenate([jnp.swapaxes(a, 1, 2).reshape(t * r, d_in),
                           b.reshape(t * r, b.shape[-1])], axis=1).astype(dt)
  assign, _ = kmeans(units, k, key, iters)
  onehot = jax.nn.one_hot(assign, k, dtype=dt)                 # [N, k]
  counts = jnp.maximum(onehot.sum(0), 1)[:, None]
  centroids = jnp.matmul(onehot.T, units, precision=_HIGHEST) / counts
  if param_reweight:
    mean_norm = jnp.matmul(onehot.T, jnp.linalg.norm(units, axis=-1)[:, None],
                           precision=_HIGHEST) / counts
    c_norm = jnp.linalg.norm(centroids, axis=-1, keepdims=True)
    centroids = centroids * jnp.where(c_norm > 0, mean_norm / jnp.where(c_norm > 0, c_norm, 1), 0)
  return centroids[:, :d_in].T, centroids[:, d_in:]


def _positive_int(value, name: str, allow_none: bool = False):
  if allow_none and value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                     f"got {value!r}.")
  return value


@register("lora_lego")
def lora_lego(k: int | None = None, iters: int = 100, param_reweight: bool = True,
              output_reweight: bool = True) -> Merge:
  """LoRA-LEGO: rank-wise k-means of the tasks' LoRA units into one rank-k LoRA, reweighted."""
  k = _positive_int(k, "k", allow_none=True)
  iters = _positive_int(iters, "iters")
  param_reweight = hparams.boolean(param_reweight, "param_reweight")
  output_reweight = hparams.boolean(output_reweight, "output_reweight")

  def init(stacked, *, factors=None, key=None, alpha=None, **kwargs):
    del kwargs
    t = stacked_lib.check(stacked)
    if factors is None:
      raise ValueError(
          "lora_lego.init needs factors=: the stacked LoRA factors of the task vectors "
          "(task_vectors.stack of the factor trees from lora.init / train.finetune(mode='lora')).")
    if key is None:
      raise ValueError("lora_lego.init needs key= (a jax.random key) for the k-means seeding.")
    shapes = {leaf_name(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(stacked)[0]}
    merged = {}
    for i, (name, (a, b)) in enumerate(sorted(lora.named(factors).items())):
      if a.ndim != 3 or b.ndim != 3 or a.shape[0] != t or b.shape[0] != t:
        raise ValueError(
            f"lora_lego: factors of leaf {name!r} have shapes A {tuple(a.shape)}, B "
            f"{tuple(b.shape)}; expected stacked factors A [T={t}, d_in, r], B [T, r, d_out] "
            "(one per task vector). Fix: pass task_vectors.stack(list_of_factor_trees).")
      if shapes.get(name) != (t, a.shape[1], b.shape[2]):
        raise ValueError(
            f"lora_lego: leaf {name!r} of the factors gives a [{t}, {a.shape[1]}, {b.shape[2]}] "
            f"update, but the stacked task vectors have {shapes.get(name, 'no such leaf')}. Fix: "
            "densify the same factors (lora.densify(stacked_factors, params0)).")
      r = a.shape[2]
      kk = r if k is None else k
      if kk > t * r:
        raise ValueError(
            f"lora_lego: k={kk} exceeds the T*r = {t * r} rank units of leaf {name!r} "
            f"({t} tasks of rank {r}). Fix: choose k <= {t * r}.")
      a_m, b_m = merge_units(a, b, kk, jax.random.fold_in(key, i), iters=iters,
                             param_reweight=param_reweight)
      scale = (1.0 if alpha is None else lora.scaling(alpha, r))
      if output_reweight:
        scale *= math.sqrt(r / kk)
      merged[name] = (a_m.astype(a.dtype), (scale * b_m).astype(b.dtype))
    return {"factors": lora.nest(merged)}

  def apply(coeffs, stacked):
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), stacked)
    return lora.densify(coeffs["factors"], like)

  return Merge(init, apply)


lora_lego.requires = ("factors", "key")
