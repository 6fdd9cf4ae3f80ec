"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For every linear layer y = x W (W: [d_in, d_out]) the merged kernel minimises
sum_t ||X_t W - X_t W_t||^2 over the layer inputs X_t of each model on its
own data; in closed form, with the Gram matrices G_t = X_t^T X_t:

  W* = (sum_t G~_t)^-1 sum_t G~_t W_t                         (eq. 2)
  G~_t = alpha G_t + (1 - alpha) diag(G_t)                    (sec. 3.2, regularisation)

(alpha scales the off-diagonal entries: alpha = 1 is the plain least-squares
merge, alpha = 0 a per-input-feature weighted average). Every other leaf
(biases, LayerNorm, embeddings) is averaged. On task vectors the same
formulas hold with tau_t in place of W_t (the pre-trained kernel factors out:
(sum G)^-1 sum G (W0 + tau_t) = W0 + (sum G)^-1 sum G tau_t):

  tau* = scale * (sum_t G~_t)^-1 sum_t G~_t tau_t   (kernels),   scale * mean_t tau_t (others)

Defaults: alpha = 0.9 and scale = 1 (the paper's merge). The paper tunes
alpha on validation data; the reference implementations (bloomberg
dataless-model-merging, MergeLM, FusionBench) average the Gram over the
tokens they saw (G_t = X_t^T X_t / n_t), so that every model has the same
weight whatever its number of examples: ``data_stats.kernel_input_grams``
does the same.

The Grams come in as ``init(stacked, *, grams)``: a dict mapping the leaf
name of a kernel (``'layers/0/attention/query/kernel'``, as
``research.models.param_tree.leaf_name`` writes it) to a [T, d_in, d_in]
array (task t's Gram at index t), e.g. ``data_stats.stack_grams`` of
``data_stats.kernel_input_grams`` per task. A kernel leaf of per-task shape
[d_in, ...] is treated as [d_in, prod(...)]. ``init`` applies the
off-diagonal scaling; ``apply`` is leaf-local (one d_in x d_in solve per
kernel, in float32; a singular sum of Grams gives NaN, as ``torch.inverse``
does in the reference).

Memory: the coefficients are the T Gram matrices per kernel (T d_in^2
each); ``apply`` creates one d_in x d_out buffer per kernel beside the
output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.merging import hparams
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.models.param_tree import leaf_name


def reduce_off_diagonal(gram: jax.Array, alpha: float) -> jax.Array:
  """alpha * G + (1 - alpha) * diag(G), for G [..., d, d]."""
  d = gram.shape[-1]
  eye = jnp.eye(d, dtype=gram.dtype)
  return gram * (alpha + (1.0 - alpha) * eye)


def _leaf_names(stacked):
  return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(stacked)[0]]


def _check_grams(grams, stacked):
  if grams is None:
    raise ValueError(
        "regmean.init needs grams=: a dict {kernel leaf name: [T, d_in, d_in]} of the Gram "
        "matrices of each kernel's inputs. Fix: compute them with "
        "research.merging.data_stats.kernel_input_grams per task and stack with "
        "data_stats.stack_grams.")
  if not isinstance(grams, dict):
    raise ValueError(f"grams must be a dict {{leaf name: [T, d_in, d_in]}}, got a "
                     f"{type(grams).__name__}.")
  leaves = dict(zip(_leaf_names(stacked), jax.tree.leaves(stacked)))
  unknown = [k for k in grams if k not in leaves]
  if unknown:
    raise ValueError(
        f"grams names leaves that the task vectors do not have: {unknown[:5]}. Known leaf "
        f"names include {list(leaves)[:5]}. Fix: key the Grams by "
        "research.models.param_tree.leaf_name of the params paths.")
  for name, g in grams.items():
    x = leaves[name]
    t, d_in = x.shape[0], (x.shape[1] if x.ndim >= 2 else None)
    if d_in is None or tuple(g.shape) != (t, d_in, d_in):
      raise ValueError(
          f"grams[{name!r}] has shape {tuple(g.shape)}; the stacked kernel there has shape "
          f"{tuple(x.shape)}, so it needs [T, d_in, d_in] = {(t, d_in, d_in)}. Fix: one "
          "Gram of the kernel's inputs per task, stacked in the order of the task vectors.")


def regmean_leaf(gram: jax.Array, x: jax.Array) -> jax.Array:
  """(sum_t G_t)^-1 sum_t G_t x_t for one stacked kernel x [T, d_in, ...], in float32."""
  t, d_in = x.shape[0], x.shape[1]
  xs = stacked_lib.slices(x)
  xs = [xi.reshape(d_in, -1).astype(jnp.float32) for xi in xs]
  g = gram.astype(jnp.float32)
  num, den = g[0] @ xs[0], g[0]
  for i in range(1, t):
    num, den = num + g[i] @ xs[i], den + g[i]
  return jnp.linalg.solve(den, num).reshape(x.shape[1:])


@register("regmean")
def regmean(alpha: float = 0.9, scale: float = 1.0) -> Merge:
  """RegMean: per-kernel least-squares merge from input Grams, average elsewhere."""
  alpha = hparams.fraction(alpha, "alpha", low_open=False)
  scale = hparams.real(scale, "scale")

  def init(stacked, *, grams=None, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    _check_grams(grams, stacked)
    names = _leaf_names(stacked)
    reduced = [reduce_off_diagonal(jnp.asarray(grams[n], jnp.float32), alpha)
               if n in grams else None for n in names]
    return {"grams": jax.tree.unflatten(jax.tree.structure(stacked), reduced)}

  def apply(coeffs, stacked):
    def one(x, g):
      out = stacked_lib.task_mean(x) if g is None else regmean_leaf(g, x)
      return (scale * out).astype(x.dtype)
    return jax.tree.map(one, stacked, coeffs["grams"])

  return Merge(init, apply)


regmean.requires = ("grams",)
