"""DOGE (Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent", ICML 2025).

Data-free. Merging is posed as: find a modification Delta of the task vectors
so that the merged model stays close to every task model on that task's
inputs, without destroying the knowledge the tasks share. For a linear
layer tau [d_in, d_out] (y = x tau) the task-t inputs are approximated by the
rows of tau_t itself (the paper's data-free surrogate), giving per layer

  L(Delta) = sum_j sum_r ( <tau_j[:, r], tau_j[:, r] - (tau_m + Lambda Delta)[:, r]> )^2
  tau_m = sum_i lambda_i tau_i,   Lambda = sum_i lambda_i                (sec. 3.2)

with task-aware, training-free coefficients ("merging coefficients as
adaptive learning rates", sec. 3.4):

  lambda_i^l = lam / ||tau_i^l||_F                                        (per layer l)

Delta is optimised by projective gradient descent (sec. 3.3): the gradient
is projected out of the shared subspace of the layer, spanned by the top
singular directions of the tasks' output spaces,

  B = [V_1[:, :k/T], ..., V_T[:, :k/T]]   (top right singular vectors of each tau_i)
  U = top k/subspace left singular vectors of B,   P = U U^T            (k = min(d_in, d_out))

(singular vectors from eigendecompositions of the smaller Gram matrices, which
span the same leading subspaces as the reference's SVDs at a fraction of
XLA's CPU SVD cost)
  g <- g - g P

with Adam (lr 1e-4, 400 steps). As in the official code the projection acts on
the gradient that Adam receives; Adam's per-coordinate scaling then lets
Delta itself leave the orthogonal complement slightly. The merged task vector keeps each task's
top-``density`` entries (by magnitude of tau_i over all its matrices):

  tau* = sum_i lambda_i^l (tau_i + Delta) * m_i,   m_i = [|tau_i| >= top-density threshold of tau_i]

Defaults are the official configuration (FusionBench ``doge_ta``): lam = 0.07,
density = 0.3 (K = 30), subspace = 6, Adam lr 1e-4, 400 steps.

Conventions and deviations. Our kernels are [d_in, d_out]; the reference's
torch weights are [d_out, d_in], so its per-row sums and left singular
vectors are our per-column sums (over d_in) and right singular vectors. The
reference runs 400 Adam steps layer after layer with one optimizer; Adam is
per-coordinate and the layers' losses are independent, so here all layers
are optimised jointly in one loop, which is the same computation. Every
2-D leaf is treated as a matrix (the reference restricts itself to the
encoder's weight matrices; restrict ours with
``masked(doge(), mask, otherwise=task_arithmetic(0.0))``). Leaves that are
not 2-D (biases, norms) get no update, as in the reference (they stay at
theta0); route them elsewhere with ``masked``. The top-k mask uses ceil(k n)
entries (the reference int(k n) + 1 on ties), as ``ties.trim`` does.

Cost: ``init`` computes T + 1 small symmetric eigendecompositions per matrix
and runs ``steps`` Adam steps, each two passes over the stacked matrices; it holds Delta and Adam's two
moments (three model-sized buffers). ``apply`` is one fused pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.merging import hparams
from research.merging import learned
from research.merging import selection
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


def _is_matrix(x) -> bool:
  return x.ndim == 3   # [T, d_in, d_out]


def _top_right_vectors(x: jax.Array, r: int) -> jax.Array:
  """[d_out, r]: the top-r right singular vectors of x [d_in, d_out] (columns, by singular value).

  From an eigendecomposition of the smaller Gram matrix (x^T x, or x x^T mapped back
  through x^T): the same subspace as an SVD for the leading directions, and far cheaper
  than XLA's SVD on CPU. Directions with a zero singular value come back as zero columns.
  """
  x = x.astype(jnp.float32)
  d_in, d_out = x.shape
  if d_out <= d_in:
    _, v = jnp.linalg.eigh(x.T @ x)
    return v[:, ::-1][:, :r]
  evals, u = jnp.linalg.eigh(x @ x.T)
  evals, u = evals[::-1][:r], u[:, ::-1][:, :r]
  s = jnp.sqrt(jnp.maximum(evals, 0.0))
  tiny = s <= s[0] * 1e-6
  return jnp.where(tiny, 0.0, (x.T @ u) / jnp.where(tiny, 1.0, s))


def shared_basis(x: jax.Array, subspace: int) -> jax.Array:
  """U [d_out, k // subspace]: the shared subspace of the output space of stacked matrices x [T, d_in, d_out]."""
  t, d_in, d_out = x.shape
  k = min(d_in, d_out)
  r = max(k // t, 1)
  b = jnp.concatenate([_top_right_vectors(x[i], r) for i in range(t)], axis=1)   # [d_out, t r]
  # Left singular vectors of b = right singular vectors of b^T.
  return _top_right_vectors(b.T, max(k // subspace, 1))


def task_coefficients(x: jax.Array, lam: float) -> jax.Array:
  """lambda_i = lam / ||tau_i||_F for stacked x [T, ...] -> [T] (0 where tau_i = 0)."""
  norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1))
  return jnp.where(norms > 0, lam / jnp.where(norms > 0, norms, 1.0), 0.0)


def layer_loss(delta: jax.Array, x: jax.Array, lambdas: jax.Array) -> jax.Array:
  """DOGE's data-free loss of one layer: sum_j sum_r <tau_j[:, r], tau_j[:, r] - tau_m[:, r] - Lambda delta[:, r]>^2."""
  x = x.astype(jnp.float32)
  merged = jnp.tensordot(lambdas, x, axes=1) + jnp.sum(lambdas) * delta   # [d_in, d_out]
  s = jnp.sum(x * (x - merged[None]), axis=1)                            # [T, d_out]
  return jnp.sum(jnp.square(s))


def _loss_parts(x: jax.Array, lambdas: jax.Array):
  """(c, Lambda) with layer_loss(delta) = sum (c - Lambda sum_i x * delta)^2: one pass over x per evaluation."""
  x = x.astype(jnp.float32)
  c = jnp.sum(x * (x - jnp.tensordot(lambdas, x, axes=1)[None]), axis=1)  # [T, d_out]
  return c, jnp.sum(lambdas)


@register("doge")
def doge(lam: float = 0.07, density: float = 0.3, subspace: int = 6, lr: float = 1e-4,
         steps: int = 400) -> Merge:
  """DOGE: projective-gradient correction of the task vectors, task-aware coefficients, top-k masks."""
  lam = learned.positive(lam, "lam")
  density = hparams.fraction(density, "density")
  if isinstance(subspace, bool) or not isinstance(subspace, int) or subspace < 1:
    raise ValueError(f"subspace must be a positive int (the shared basis keeps "
                     f"min(d_in, d_out) // subspace directions), got {subspace!r}.")
  lr = learned.positive(lr, "lr")
  steps = learned.steps_arg(steps)

  def init(stacked, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    leaves, treedef = jax.tree.flatten(stacked)
    keys = [i for i, x in enumerate(leaves) if _is_matrix(x)]
    as_tree = lambda d: jax.tree.unflatten(treedef, [d.get(i) for i in range(len(leaves))])
    if not keys:
      return {"delta": as_tree({}), "lambdas": as_tree({}), "threshold": None}
    mats = {i: leaves[i] for i in keys}
    lambdas = {i: task_coefficients(mats[i], lam) for i in keys}
    bases = {i: shared_basis(mats[i], subspace) for i in keys}
    threshold = selection.topk_threshold([mats[i] for i in keys], density)

    parts = {i: _loss_parts(mats[i], lambdas[i]) for i in keys}

    def loss(delta):   # = sum_i layer_loss(delta[i], mats[i], lambdas[i])
      total = 0.0
      for i in keys:
        c, lam_sum = parts[i]
        s = c - lam_sum * jnp.sum(mats[i].astype(jnp.float32) * delta[i][None], axis=1)
        total = total + jnp.sum(jnp.square(s))
      return total

    def project(grads):
      return {i: g - (g @ bases[i]) @ bases[i].T for i, g in grads.items()}

    opt = optax.adam(lr)
    delta0 = {i: jnp.zeros(mats[i].shape[1:], jnp.float32) for i in keys}

    def body(_, carry):
      delta, opt_state = carry
      grads = project(jax.grad(loss)(delta))
      updates, opt_state = opt.update(grads, opt_state, delta)
      return optax.apply_updates(delta, updates), opt_state

    delta, _ = jax.lax.fori_loop(0, steps, body, (delta0, opt.init(delta0)))
    return {"delta": as_tree(delta), "lambdas": as_tree(lambdas), "threshold": threshold}

  def apply(coeffs, stacked):
    thr = coeffs["threshold"]

    def one(x, d, lams):
      if d is None:
        return jnp.zeros(x.shape[1:], x.dtype)
      total = None
      for t, xt in enumerate(stacked_lib.slices(x)):
        keep = jnp.abs(xt) >= thr[t]
        term = lams[t] * jnp.where(keep, xt + d.astype(xt.dtype), 0.0)
        total = term if total is None else total + term
      return total.astype(x.dtype)

    return jax.tree.map(one, stacked, coeffs["delta"], coeffs["lambdas"])

  return Merge(init, apply)


# Data-free: init needs nothing but the stacked task vectors (merging.DATA_FREE lists it).
doge.requires = ()
