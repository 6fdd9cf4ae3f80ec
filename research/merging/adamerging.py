"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024).

Task-wise AdaMerging (``adamerging_task``):

  tau = sum_t lambda_t tau_t                                   (eq. 3)

Layer-wise AdaMerging (``adamerging_layer``), one coefficient per task and
layer, where a "layer" is one parameter tensor (a leaf), as in the official
code:

  tau^l = sum_t lambda_t^l tau_t^l                             (eq. 4)

The coefficients minimise the Shannon entropy of the merged model's
predictions on unlabeled test inputs of every task (a surrogate for the
multi-task loss, eqs. 5-6):

  min_lambda  sum_k  E_{x in D_k^test} H(f(x; theta0 + tau(lambda)))

Defaults are the paper's / official code's: lambda initialised at 0.3
(``prior``), Adam with lr 1e-3 (betas 0.9, 0.999), 500 steps, and the
coefficients clipped to [0, 1] in the forward pass (``clip``; the gradient
is zero outside, as with ``torch.clamp``). The official code draws two
batches of 16 test inputs per task per step; here the batches are the
caller's (``batches=``).

``init(stacked, *, logits_fn | loss_fn, batches, aux=None)`` trains and
returns ``{"lambdas": lambda}`` (clipped): [T] (task-wise) or a tree of [T]
like the task vectors (layer-wise). ``logits_fn(tau, inputs)`` maps a merged
task vector to logits (a list of them for several tasks: the entropies are
summed), see ``learned.py``; for linearized task vectors pass a
``logits_fn`` that evaluates ``tangent.linearize(apply_fn)``. ``apply`` is
``learned.weighted_sum``: leaf-local and differentiable in the coefficients.

AdaMerging++ (the TIES-trimmed variant) is
``chain(trim(0.2), adamerging_task())``: ``chain`` runs the trim before
training the coefficients on the trimmed task vectors.

Memory: training holds the stacked task vectors, one merged tau and the
model's activations; ``apply`` creates only the output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.merging import hparams
from research.merging import learned
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register

DATA_KWARGS = ("logits_fn or loss_fn", "batches")


def _adamerging(per_leaf: bool, prior, lr, steps, clip, name) -> Merge:
  prior = hparams.real(prior, "prior")
  lr = learned.positive(lr, "lr")
  steps = learned.steps_arg(steps)
  clip = hparams.boolean(clip, "clip")
  if clip and not 0.0 <= prior <= 1.0:
    raise ValueError(f"prior must be in [0, 1] when clip=True (coefficients are clipped to "
                     f"[0, 1]), got {prior!r}.")

  def effective(raw):
    return jax.tree.map(lambda x: jnp.clip(x, 0.0, 1.0), raw) if clip else raw

  def init(stacked, *, logits_fn=None, loss_fn=None, batches=None, aux=None, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    loss = learned.make_loss("entropy", logits_fn=logits_fn, loss_fn=loss_fn, method=name)
    source = learned.batch_source(batches, name)
    raw0 = learned.full_like_tasks(stacked, prior, per_leaf)
    combine = lambda raw, st: learned.weighted_sum(effective(raw), st)
    opt = optax.adam(lr, b1=0.9, b2=0.999)
    raw, _ = learned.fit(raw0, stacked, combine, loss, source, optimizer=opt, steps=steps,
                         aux=aux)
    return {"lambdas": effective(raw)}

  def apply(coeffs, stacked):
    return learned.weighted_sum(coeffs["lambdas"], stacked)

  return Merge(init, apply)


@register("adamerging_task")
def adamerging_task(prior: float = 0.3, lr: float = 1e-3, steps: int = 500,
                    clip: bool = True) -> Merge:
  """Task-wise AdaMerging: one coefficient per task, trained by entropy minimisation."""
  return _adamerging(False, prior, lr, steps, clip, "adamerging_task")


@register("adamerging_layer")
def adamerging_layer(prior: float = 0.3, lr: float = 1e-3, steps: int = 500,
                     clip: bool = True) -> Merge:
  """Layer-wise AdaMerging: one coefficient per task and leaf, trained by entropy minimisation."""
  return _adamerging(True, prior, lr, steps, clip, "adamerging_layer")


adamerging_task.requires = adamerging_layer.requires = DATA_KWARGS
