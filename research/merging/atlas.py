"""aTLAS (Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling", NeurIPS 2024).

Task vectors are composed block by block with learned coefficients
(anisotropic scaling; a "block" is one parameter tensor, i.e. a leaf):

  tau^(j) = sum_t lambda_t^(j) tau_t^(j)          (eq. 2: Lambda_t block-diagonal)
  theta   = theta0 + tau

and the coefficients are learned by gradient descent on few labeled examples
(supervised cross-entropy, ``objective="cross_entropy"``) or, for test-time
adaptation, on unlabeled inputs (``objective="entropy"``). The same
coefficients apply to linearized task vectors: pass a ``logits_fn`` that
evaluates the tangent model ``tangent.linearize(apply_fn)(params0 + tau,
params0, ...)``, as the paper's ``WeightedLinearizedModel`` does.

Defaults follow the official code (fredzzhang/atlas): coefficients
initialised at 0 (the zero-shot model), AdamW with lr 1e-3 and weight decay
0.1, gradients clipped at global norm 1. The paper trains for a number of
epochs over the few-shot / validation set (10 for few-shot recognition, 20
for task addition); here the number of steps is ``steps`` (default 200) over
the caller's batches. Deliberate differences: the official task-addition
script keeps the epoch with the best validation accuracy; here the last
coefficients are returned (select ``steps`` on validation instead). Its
optional Lp regulariser on the coefficients and the random-partition
variant (several coefficients per block) are not implemented.

``init(stacked, *, logits_fn | loss_fn, batches, aux=None)`` returns
``{"lambdas": tree of [T]}``; ``apply`` is ``learned.weighted_sum``,
leaf-local and differentiable. See ``learned.py`` for the data contract
(batches of ``(inputs, labels)`` for cross-entropy, ``inputs`` for entropy).
"""
from __future__ import annotations

import optax

from research.merging import hparams
from research.merging import learned
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


@register("atlas")
def atlas(objective: str = "cross_entropy", lr: float = 1e-3, weight_decay: float = 0.1,
          steps: int = 200, init_value: float = 0.0, clip_norm: float = 1.0) -> Merge:
  """aTLAS: one learned coefficient per task and parameter block (leaf)."""
  objective = learned.check_choice(objective, "objective", learned.OBJECTIVES)
  lr = learned.positive(lr, "lr")
  weight_decay = hparams.real(weight_decay, "weight_decay")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  steps = learned.steps_arg(steps)
  init_value = hparams.real(init_value, "init_value")
  clip_norm = learned.positive(clip_norm, "clip_norm")

  def init(stacked, *, logits_fn=None, loss_fn=None, batches=None, aux=None, **kwargs):
    del kwargs
    stacked_lib.check(stacked)
    loss = learned.make_loss(objective, logits_fn=logits_fn, loss_fn=loss_fn, method="atlas")
    source = learned.batch_source(batches, "atlas")
    raw0 = learned.full_like_tasks(stacked, init_value, per_leaf=True)
    opt = optax.chain(optax.clip_by_global_norm(clip_norm),
                      optax.adamw(lr, weight_decay=weight_decay))
    lambdas, _ = learned.fit(raw0, stacked, learned.weighted_sum, loss, source,
                             optimizer=opt, steps=steps, aux=aux)
    return {"lambdas": lambdas}

  def apply(coeffs, stacked):
    return learned.weighted_sum(coeffs["lambdas"], stacked)

  return Merge(init, apply)


atlas.requires = ("logits_fn or loss_fn", "batches")
