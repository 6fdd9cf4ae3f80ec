"""Twin-Merging (Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging", NeurIPS 2024).

Knowledge is split into a part every task shares and a part exclusive to
each task, and the exclusive parts are mixed per input by a router:

  tau_s   = shared merge of the task vectors:
            lambda * sum_t tau_t              (``shared="task_arithmetic"``), or
            TIES(tau_1..T; density, lambda)   (``shared="ties"``)
  r_t     = tau_t - tau_s                     (exclusive knowledge of task t)
  r~_t    = its rank-k truncated SVD, U_k S_k V_k^T, per leaf of >= 2 dims
            (seen as a [d_0, prod(rest)] matrix); k = ``rank``, or
            max(1, floor(``rank_fraction`` * min(d_0, d_1))) when ``rank=0``.
            Leaves of <= 1 dim (biases, norms) keep their dense residual.
  w(x)    = softmax(MLP(z(x))),   z(x) = (phi(x) - mean) / std          [T]
  theta(x) = theta0 + tau_s + sum_t w_t(x) r~_t

``phi(x)`` are features of the input (``features=`` of ``init``: one row per
example, e.g. the pre-trained model's sentence embedding). The router is an
MLP D -> H -> H -> T (leaky ReLU, dropout between layers; H = 2 D by
default) trained with optax (AdamW, learning rate decaying linearly to 0) by
cross-entropy to predict the task id of each row (``task_ids=``), on
validation data. Routing is per input, as in the reference code
(LZY-the-boys/Twin-Merging), which evaluates one example at a time, each
with its own merged parameters.

API (a `Merge`, plus the per-input pieces)::

  m = merging.get("twin", shared_scale=0.3, rank_fraction=0.1)
  coeffs = m.init(stacked, features=phi_val, task_ids=t_val, key=key)
  w = twin.route(coeffs, phi_x)          # [B, T], rows sum to 1
  tau_x = twin.compose(coeffs, w[0])     # one input's task vector
  taus = twin.compose(coeffs, w)         # [B, ...] per leaf: B task vectors
  tau_u = m.apply(coeffs, stacked)       # = compose(coeffs, [1/T] * T)

``apply`` returns the merge under *uniform* routing weights 1/T (what the
router outputs for an input it cannot place); the input-independent shared
part alone is ``coeffs["shared"]``. ``apply`` reads only the structure and T
of ``stacked`` (the knowledge is in ``coeffs``) and is leaf-local, as is
``compose``. ``coeffs``: ``{"shared": tau_s, "residuals": r~, "router":
{"params", "mean", "std"}}`` where a compressed leaf of ``r~`` is a
``LowRank(u [T, d_0, k], v [T, k, d_1])`` (u v = U_k S_k V_k^T; S_k sits in
the factor on the longer side) and a dense one is ``[T, ...]``.
``densify(coeffs)`` expands the factors once, so that many ``compose`` calls
cost one weighted sum each (T model-sized buffers instead of the factors).

Defaults follow the reference's discriminative (RoBERTa / GLUE) setup:
shared expert = task arithmetic (its tuned lambda there is 0.29; 0.3 here),
exclusive knowledge kept at rank fraction 0.1 (``mask_rate`` 0.9 of its SVD
sparsifier), router lr 5e-4 (HF ``Trainer``: AdamW, no weight decay, linear
decay), batch 1024, dropout 0.5, H = 2 D. The reference trains 50 epochs;
here ``router_steps`` (500) counts optimizer steps.

Deliberate differences from the reference:
- Its router has BatchNorm after each hidden layer; here the inputs are
  standardised with the training features' mean / std instead (stored in
  ``coeffs``), so the router has no running statistics to carry.
- It keeps the router epoch with the best accuracy on the *test* set; here
  the last step is returned.
- Its router reads the mean-pooled last hidden state of the shared expert on
  the training split; here the features are the caller's (the merge table
  passes the pre-trained model's sentence embeddings of the validation
  split, so routing needs no pass of the merged model).
- The truncated SVD comes from an eigendecomposition of the smaller Gram
  matrix (x^T x or x x^T): the same rank-k truncation (Eckart-Young) up to
  float32 round-off in the discarded directions, and far cheaper than XLA's
  CPU SVD. Rank 0 (the reference's int() of a small fraction) is raised
  to 1.
- It excludes biases (and the heads) from the merge; here every leaf takes
  part and 1-D residuals stay dense, as its sparsifier does for 1-D tensors.

Memory: ``coeffs`` hold tau_s (one model-sized buffer), the factors (T k
(d_0 + d_1) per matrix) and the dense small leaves; ``init`` materialises
the residuals of one leaf at a time inside its program.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.merging import hparams
from research.merging import learned
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.merging.task_arithmetic import task_arithmetic
from research.merging.ties import ties

PyTree = Any
SHARED = ("task_arithmetic", "ties")


class LowRank(NamedTuple):
  """A compressed stacked residual: task t's matrix is ``u[t] @ v[t]``."""
  u: jax.Array   # [T, d_0, k]
  v: jax.Array   # [T, k, d_1]


def _is_lowrank(x) -> bool:
  return isinstance(x, LowRank)


def rank_of(shape: tuple[int, ...], rank: int, rank_fraction: float) -> int:
  """The kept rank k of a per-task leaf of ``shape`` (>= 2 dims, seen as [d_0, prod(rest)])."""
  d0, d1 = shape[0], int(np.prod(shape[1:]))
  full = min(d0, d1)
  k = rank if rank else int(rank_fraction * full)
  return max(1, min(k, full))


def truncated_svd(x: jax.Array, k: int) -> LowRank:
  """Rank-``k`` truncation of every task's matrix of ``x`` [T, d_0, d_1], as factors.

  Top-k eigenvectors of the smaller Gram matrix span the top-k singular
  subspace, so ``u @ v`` is U_k S_k V_k^T: with V_k from x^T x,
  (x V_k) V_k^T; with U_k from x x^T, U_k (U_k^T x).
  """
  x = x.astype(stacked_lib.compute_dtype(x.dtype))
  _, d0, d1 = x.shape
  if d1 <= d0:
    _, vecs = jnp.linalg.eigh(jnp.einsum("tio,tip->top", x, x))
    top = vecs[..., ::-1][..., :k]                                   # [T, d1, k]
    return LowRank(jnp.einsum("tio,tok->tik", x, top), jnp.swapaxes(top, 1, 2))
  _, vecs = jnp.linalg.eigh(jnp.einsum("tio,tjo->tij", x, x))
  top = vecs[..., ::-1][..., :k]                                     # [T, d0, k]
  return LowRank(top, jnp.einsum("tik,tio->tko", top, x))


def _compress(r: jax.Array, rank: int, rank_fraction: float):
  """Residual leaf [T, ...] -> LowRank (>= 2 dims per task) or itself (dense)."""
  if r.ndim < 3:
    return r
  t = r.shape[0]
  mat = r.reshape(t, r.shape[1], -1)
  return truncated_svd(mat, rank_of(r.shape[1:], rank, rank_fraction))


def _expand(res, like: jax.Array) -> jax.Array:
  """[T, ...] dense residuals of one leaf shaped like ``like`` (per task)."""
  if _is_lowrank(res):
    full = jnp.einsum("tik,tko->tio", res.u, res.v)
    return full.reshape((full.shape[0],) + like.shape)
  return res


# ----------------------------------------------------------------------------- router

def _mlp_init(key, sizes) -> list[dict]:
  layers = []
  for k, (d_in, d_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    layers.append({"w": jax.random.normal(k, (d_in, d_out), jnp.float32) / np.sqrt(d_in),
                   "b": jnp.zeros((d_out,), jnp.float32)})
  return layers


def _mlp(layers, x, dropout: float = 0.0, key=None):
  for i, layer in enumerate(layers):
    x = x @ layer["w"] + layer["b"]
    if i + 1 < len(layers):
      x = jax.nn.leaky_relu(x)
      if dropout and key is not None:
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0.0)
  return x


def _train_router(key, x, y, n_tasks, *, hidden, dropout, lr, steps, batch, weight_decay):
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  n, d = x.shape
  k_init, k_loop = jax.random.split(key)
  params = _mlp_init(k_init, (d, hidden, hidden, n_tasks))
  opt = optax.adamw(optax.linear_schedule(lr, 0.0, steps), weight_decay=weight_decay)

  def loss_fn(p, xb, yb, k):
    return learned.cross_entropy(_mlp(p, xb, dropout, k), yb)

  def step(carry, i):
    p, state = carry
    k_batch, k_drop = jax.random.split(jax.random.fold_in(k_loop, i))
    if batch < n:   # static: a fresh minibatch per step, without replacement within it
      idx = jax.random.choice(k_batch, n, (batch,), replace=False)
      xb, yb = x[idx], y[idx]
    else:
      xb, yb = x, y
    value, grads = jax.value_and_grad(loss_fn)(p, xb, yb, k_drop)
    updates, state = opt.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), value

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
  return params


def route(coeffs: PyTree, features: jax.Array) -> jax.Array:
  """Routing weights softmax(MLP(z(x))) [B, T] for ``features`` [B, D] (no dropout)."""
  r = coeffs["router"]
  features = jnp.asarray(features)
  d = r["mean"].shape[0]
  if features.ndim != 2 or features.shape[1] != d:
    raise ValueError(f"twin.route: features must be [B, {d}] (the router was trained on "
                     f"{d}-dim features), got shape {features.shape}.")
  z = (features.astype(jnp.float32) - r["mean"]) / r["std"]
  return jax.nn.softmax(_mlp(r["params"], z), axis=-1)


# ----------------------------------------------------------------------------- compose

def _compose_one(coeffs, w):
  def one(res, s):
    dt = stacked_lib.compute_dtype(s.dtype)
    wt = w.astype(dt)
    if _is_lowrank(res):
      # sum_t w_t u_t v_t = [u_1 w_1 | ... | u_T w_T] [v_1; ...; v_T]: one matmul.
      out = jnp.einsum("t,tik,tko->io", wt, res.u.astype(dt), res.v.astype(dt))
      out = out.reshape(s.shape)
    else:
      out = jnp.tensordot(wt, res.astype(dt), axes=1)
    return (s.astype(dt) + out).astype(s.dtype)
  return jax.tree.map(one, coeffs["residuals"], coeffs["shared"], is_leaf=_is_lowrank)


def _num_tasks(coeffs) -> int:
  return int(coeffs["router"]["params"][-1]["b"].shape[0])


def compose(coeffs: PyTree, weights: jax.Array) -> PyTree:
  """tau_s + sum_t weights[t] r~_t; ``weights`` [T] -> one tau, [B, T] -> leaves [B, ...].

  Leaf-local and differentiable in ``weights``. With [B, T] weights the
  output holds B model-sized task vectors: for many inputs, loop (or
  ``jax.lax.map``) over rows instead.
  """
  weights = jnp.asarray(weights)
  t = _num_tasks(coeffs)
  if weights.ndim not in (1, 2) or weights.shape[-1] != t:
    raise ValueError(f"twin.compose: weights must be [T] or [B, T] with T={t}, got shape "
                     f"{weights.shape}. Fix: pass twin.route(coeffs, features) or a row of it.")
  if weights.ndim == 1:
    return _compose_one(coeffs, weights)
  return jax.vmap(lambda w: _compose_one(coeffs, w))(weights)


def densify(coeffs: PyTree) -> PyTree:
  """``coeffs`` with every low-rank residual expanded to dense [T, ...] (for repeated compose)."""
  residuals = jax.tree.map(_expand, coeffs["residuals"], coeffs["shared"], is_leaf=_is_lowrank)
  return {**coeffs, "residuals": residuals}


# ----------------------------------------------------------------------------- factory

def _int_arg(value, name: str, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
  return int(value)


def _check_data(features, task_ids, key, t):
  if features is None or task_ids is None:
    raise ValueError(
        "twin.init needs features= ([N, D] input features, e.g. the pre-trained model's "
        "embeddings of validation inputs) and task_ids= ([N] ints in [0, T): the task of each "
        "row), to train the router.")
  if key is None:
    raise ValueError("twin.init needs key= (a jax.random key) for the router's initialisation "
                     "and dropout: init(stacked, features=..., task_ids=..., key=key).")
  if jnp.ndim(features) != 2:
    raise ValueError(f"features must be [N, D], got shape {jnp.shape(features)}.")
  if jnp.shape(task_ids) != (jnp.shape(features)[0],):
    raise ValueError(f"task_ids must be [N] = ({jnp.shape(features)[0]},) like the rows of "
                     f"features, got shape {jnp.shape(task_ids)}.")
  try:   # values are checkable only outside jit
    ids = np.asarray(task_ids)
  except jax.errors.TracerArrayConversionError:
    return
  if ids.size and (ids.min() < 0 or ids.max() >= t):
    raise ValueError(f"task_ids must lie in [0, T) = [0, {t}) (T = number of task vectors), got "
                     f"values in [{ids.min()}, {ids.max()}].")


@register("twin")
def twin(shared: str = "task_arithmetic", shared_scale: float = 0.3,
         shared_density: float = 0.2, rank_fraction: float = 0.1, rank: int = 0,
         router_hidden: int = 0, router_dropout: float = 0.5, router_lr: float = 5e-4,
         router_steps: int = 500, router_batch: int = 1024, weight_decay: float = 0.0) -> Merge:
  """Twin-Merging: shared merge + per-input routed low-rank exclusive residuals.

  ``shared_density`` is TIES' density (``shared="ties"`` only); ``rank`` > 0
  overrides ``rank_fraction``; ``router_hidden`` = 0 means 2 D.
  """
  shared = learned.check_choice(shared, "shared", SHARED)
  shared_scale = hparams.real(shared_scale, "shared_scale")
  shared_density = hparams.fraction(shared_density, "shared_density")
  rank_fraction = hparams.fraction(rank_fraction, "rank_fraction")
  rank = _int_arg(rank, "rank", 0)
  router_hidden = _int_arg(router_hidden, "router_hidden", 0)
  router_dropout = hparams.fraction(router_dropout, "router_dropout", low_open=False,
                                    high_open=True)
  router_lr = learned.positive(router_lr, "router_lr")
  router_steps = learned.steps_arg(router_steps, "router_steps")
  router_batch = _int_arg(router_batch, "router_batch", 1)
  weight_decay = hparams.real(weight_decay, "weight_decay")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  shared_merge = (task_arithmetic(shared_scale) if shared == "task_arithmetic"
                  else ties(shared_density, shared_scale))

  def init(stacked, *, features=None, task_ids=None, key=None, **kwargs):
    del kwargs
    t = stacked_lib.check(stacked)
    _check_data(features, task_ids, key, t)
    tau_s = shared_merge.apply(shared_merge.init(stacked), stacked)
    residuals = jax.tree.map(
        lambda x, s: _compress(x.astype(stacked_lib.compute_dtype(x.dtype)) - s[None],
                               rank, rank_fraction),
        stacked, tau_s)
    x = jnp.asarray(features, jnp.float32)
    mean, std = jnp.mean(x, 0), jnp.std(x, 0) + 1e-6
    params = _train_router(
        key, (x - mean) / std, jnp.asarray(task_ids, jnp.int32), t,
        hidden=router_hidden or 2 * x.shape[1], dropout=router_dropout, lr=router_lr,
        steps=router_steps, batch=min(router_batch, x.shape[0]), weight_decay=weight_decay)
    return {"shared": tau_s, "residuals": residuals,
            "router": {"params": params, "mean": mean, "std": std}}

  def apply(coeffs, stacked):
    t = stacked_lib.check(stacked)
    if t != _num_tasks(coeffs):
      raise ValueError(f"twin.apply: the coeffs were built for {_num_tasks(coeffs)} tasks, the "
                       f"stacked task vectors have {t}. Fix: pass this merge's own init output.")
    return compose(coeffs, jnp.full((t,), 1.0 / t, jnp.float32))

  return Merge(init, apply)


twin.requires = ("features", "task_ids", "key")
# The per-input pieces hang off the factory too, so that `merging.twin.route` works
# whether `merging.twin` names this module or (after `from ... import twin`) the factory.
twin.route, twin.compose, twin.densify, twin.LowRank = route, compose, densify, LowRank
