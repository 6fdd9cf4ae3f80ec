"""Self-Positioning: interpolation coefficients over task vectors learned on a small task-balanced probe set.

Which paper. We could not pin down a publication that defines
"Self-Positioning" merging; the only public implementation we found
(``tools/merge_self_positioning.py`` in izhx/vibe_emb) learns positive
per-task weights and a global scale of the merged task vector by gradient
descent on a small probe set drawn equally from every task. This module
implements that recipe with linear (not spherical) interpolation:

  a_t    = softplus(r_t),  w_t = a_t / sum_s a_s       (interpolation weights, on the simplex)
  lambda = softplus(r_0)                                (global position along the merged direction)
  tau    = lambda * sum_t w_t tau_t

  min_{r}  sum_k CE(f(x; theta0 + tau), y)  over a task-balanced labeled probe set
           + mu * lambda

Defaults (from that implementation): w_t and lambda start at a_t = 1 and
lambda = 1 (the plain average of the task vectors), Adam with lr 5e-3 for
1000 steps, mu = 0 (no pull towards theta0). ``optimizer="sgd"`` uses plain SGD with the same
learning rate instead. Deviations: the reference merges the task vectors
sequentially by spherical interpolation (SLERP) of the running merge with
the next one; here the merge is the linear interpolation above, which is
order-independent and leaf-local. Its probe loss is a retrieval contrastive
loss (embedding models); here it is the classification cross-entropy of the
caller's ``logits_fn`` (or any ``loss_fn``).

``init(stacked, *, logits_fn | loss_fn, batches, aux=None)`` trains on
batches of ``(inputs, labels)`` (one batch should hold examples of every
task: a list of logits / labels, one per task) and returns
``{"lambdas": lambda * w}`` ([T]); ``apply`` is ``learned.weighted_sum``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from research.merging import hparams
from research.merging import learned
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register

OPTIMIZERS = ("adam", "sgd")


def _inverse_softplus(v: float) -> float:
  return math.log(math.expm1(v))


def coefficients(raw) -> jax.Array:
  """lambda * w (shape [T]) from the raw parameters {"weights": r [T], "scale": r_0}."""
  a = jax.nn.softplus(raw["weights"]) + 1e-8
  lam = jax.nn.softplus(raw["scale"]) + 1e-8
  return lam * a / jnp.sum(a)


@register("self_positioning")
def self_positioning(lr: float = 5e-3, steps: int = 1000, init_scale: float = 1.0,
                     mu: float = 0.0, optimizer: str = "adam") -> Merge:
  """Self-Positioning: learned simplex weights and scale of the task-vector interpolation."""
  lr = learned.positive(lr, "lr")
  steps = learned.steps_arg(steps)
  init_scale = learned.positive(init_scale, "init_scale")
  mu = hparams.real(mu, "mu")
  if mu < 0:
    raise ValueError(f"mu (the penalty on the scale) must be >= 0, got {mu!r}.")
  optimizer = learned.check_choice(optimizer, "optimizer", OPTIMIZERS)

  def init(stacked, *, logits_fn=None, loss_fn=None, batches=None, aux=None, **kwargs):
    del kwargs
    t = stacked_lib.check(stacked)
    loss = learned.make_loss("cross_entropy", logits_fn=logits_fn, loss_fn=loss_fn,
                             method="self_positioning")
    source = learned.batch_source(batches, "self_positioning")
    raw0 = {"weights": jnp.full((t,), _inverse_softplus(1.0), jnp.float32),
            "scale": jnp.asarray(_inverse_softplus(init_scale), jnp.float32)}
    opt = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
    combine = lambda raw, st: learned.weighted_sum(coefficients(raw), st)
    penalty = (lambda raw: mu * jax.nn.softplus(raw["scale"])) if mu else None
    raw, _ = learned.fit(raw0, stacked, combine, loss, source, optimizer=opt, steps=steps,
                         aux=aux, penalty=penalty)
    return {"lambdas": coefficients(raw)}

  def apply(coeffs, stacked):
    return learned.weighted_sum(coeffs["lambdas"], stacked)

  return Merge(init, apply)


self_positioning.requires = ("logits_fn or loss_fn", "batches")
