"""ScaLearn (Frohmann et al., "ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to Scale", Findings of ACL 2024).

ScaLearn transfers T frozen source modules to a target task by learning
only how much of each module's output to use. In every layer l with source
modules a_(l,t) it computes (ScaLearn)

  o_l(h) = sum_t omega_(l,t) (.) a_(l,t)(h) + h,        omega_(l,t) in R^(d_out)

with (.) elementwise over the output features; ScaLearnUniform uses one
scalar omega_(l,t) per layer and task; ScaLearn++ / ScaLearnUniform++ share
the omegas across layers. The omegas are trained on labeled examples of the
target task (cross-entropy), the sources stay frozen.

Here the source modules are the tasks' LoRA updates. For an adapted kernel
W0 with LoRA update dW_t = s A_t B_t (``research.lora``), the module output
is x dW_t, and scaling that output per output feature is scaling the columns
of dW_t:

  sum_t omega_(l,t) (.) (x dW_t)  =  x (sum_t dW_t diag(omega_(l,t)))

so ScaLearn on LoRA modules is exactly a learned per-(layer, task)
combination of the densified LoRA task vectors, and it takes the standard
stacked task vectors (``lora.densify(stacked_factors, params0)``; any task
vectors work, e.g. full fine-tuning ones):

  tau^(l) = sum_t omega_(l,t) (.) tau_t^(l)     (omega broadcast over the last axis of the leaf)

A "layer" l is one leaf (one adapted kernel; the LoRA modules sit inside each
dense layer, where the paper's adapters sit after each transformer block).
The ++ variants share omega between the leaves that play the same role in
every layer: leaf names equal up to the layer index (``layers/3/attention/
query/kernel`` and ``layers/5/...`` share; embeddings keep their own).
Variants (``variant=``): ``"scalearn"`` (vector per leaf and task),
``"scalearn_uniform"`` (scalar), ``"scalearn++"``, ``"scalearn_uniform++"``.

Defaults are those of the official code's default configuration
(CPJKU/ScaLearn, ``scalearn_2_avg_d03``) and its few-shot runs: omega
initialised at 2 / T ("avg" init with scale 2), dropout 0.3 on the omegas
during training (rescaled by 1 / (1 - p), a fresh mask per step and leaf,
drawn from ``key``), learning rate 6e-3 decayed linearly to 0, AdamW without
weight decay, gradient clipping at norm 1 (HuggingFace Trainer defaults),
1000 steps. Deliberate differences: the official code adds N(0, 0.001) noise
to the initial omegas (not needed here: every omega has its own gradient)
and keeps the checkpoint with the best validation score (here: the last
omegas; choose ``steps`` on validation instead).

``init(stacked, *, logits_fn | loss_fn, batches, aux=None, key=None)``
trains and returns ``{"omega": tree like stacked}`` with one omega array per
leaf ([T, d_last] or [T]); ``key`` is required while ``dropout > 0``. The data
contract is ``learned.py``'s (batches of ``(inputs, labels)`` for the
cross-entropy objective). ``apply`` is the leaf-local weighted sum above,
differentiable in omega. Memory: training holds one merged tau and the
model's activations; ``apply`` creates only the output.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from research.merging import hparams
from research.merging import learned
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.models.param_tree import leaf_name

VARIANTS = ("scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++")
_LAYER_PART = re.compile(
    r"^(layers?|blocks?|resblocks?|h|stages?|encoder_layers?|decoder_layers?)([_\-.]?)\d+$")


def layer_role(name: str) -> str:
  """The leaf name with its layer index replaced by ``*`` (what ++ variants share over)."""
  parts = []
  for part in name.split("/"):
    if part.isdigit():
      parts.append("*")
    else:
      m = _LAYER_PART.match(part)
      parts.append(m.group(1) + m.group(2) + "*" if m else part)
  return "/".join(parts)


def _omega_shape(x, t: int, vector: bool) -> tuple[int, ...]:
  leaf_shape = tuple(x.shape[1:])
  return (t,) + leaf_shape[-1:] if vector and leaf_shape else (t,)


def scaled_sum(omega, stacked):
  """Per leaf ``sum_t omega[t] (.) stacked[t]``; omega: a tree like stacked of [T] or [T, d]."""
  t = stacked_lib.check(stacked)

  def one(path, w, x):
    w = jnp.asarray(w)
    if w.shape not in ((t,), (t,) + tuple(x.shape[-1:])):
      raise ValueError(
          f"scalearn: omega of leaf {leaf_name(path)!r} has shape {w.shape}; expected ({t},) or "
          f"{(t,) + tuple(x.shape[-1:])}. Fix: pass the coeffs returned by this method's init.")
    return learned.weighted_leaf(w, x)

  try:
    return jax.tree_util.tree_map_with_path(one, omega, stacked)
  except ValueError as e:
    if "scalearn:" in str(e):
      raise
    raise ValueError("scalearn: omega must be a tree with the structure of the stacked task "
                     f"vectors (one array per leaf): {e}") from e


@register("scalearn")
def scalearn(variant: str = "scalearn", init_scale: float = 2.0, lr: float = 6e-3,
             steps: int = 1000, dropout: float = 0.3, objective: str = "cross_entropy",
             clip_norm: float = 1.0, weight_decay: float = 0.0) -> Merge:
  """ScaLearn: learned output scaling of each source LoRA module, per layer (and feature)."""
  variant = learned.check_choice(variant, "variant", VARIANTS)
  init_scale = hparams.real(init_scale, "init_scale")
  lr = learned.positive(lr, "lr")
  steps = learned.steps_arg(steps)
  dropout = hparams.fraction(dropout, "dropout", low_open=False, high_open=True)
  objective = learned.check_choice(objective, "objective", learned.OBJECTIVES)
  clip_norm = learned.positive(clip_norm, "clip_norm")
  weight_decay = hparams.real(weight_decay, "weight_decay")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  vector = "uniform" not in variant
  shared = variant.endswith("++")

  def init(stacked, *, logits_fn=None, loss_fn=None, batches=None, aux=None, key=None,
           **kwargs):
    del kwargs
    t = stacked_lib.check(stacked)
    inner = learned.make_loss(objective, logits_fn=logits_fn, loss_fn=loss_fn, method="scalearn")
    source = learned.batch_source(batches, "scalearn")
    if dropout > 0 and key is None:
      raise ValueError(f"scalearn.init needs key= (a jax.random key) for the omega dropout "
                       f"(dropout={dropout}); or build it with dropout=0.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    groups, shapes = [], {}
    for path, x in flat:
      name = leaf_name(path)
      shape = _omega_shape(x, t, vector)
      group = f"{layer_role(name) if shared else name}|{shape}"
      groups.append(group)
      shapes[group] = shape
    raw0 = {g: jnp.full(s, init_scale / t, jnp.float32) for g, s in shapes.items()}

    def expand(raw):
      return jax.tree_util.tree_unflatten(treedef, [raw[g] for g in groups])

    def loss(pair, batch_and_key, aux):
      raw, st = pair
      batch, step_key = batch_and_key
      omega = expand(raw)
      if step_key is not None:
        leaves, tdef = jax.tree.flatten(omega)
        kept = [w * jax.random.bernoulli(jax.random.fold_in(step_key, i), 1 - dropout, w.shape)
                / (1 - dropout) for i, w in enumerate(leaves)]
        omega = jax.tree.unflatten(tdef, kept)
      return inner(scaled_sum(omega, st), batch, aux)

    def batches_with_keys(step):
      return source(step), (jax.random.fold_in(key, step) if dropout > 0 else None)

    opt = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(optax.linear_schedule(lr, 0.0, steps), weight_decay=weight_decay))
    raw, _ = learned.fit(raw0, stacked, lambda raw, st: (raw, st), loss, batches_with_keys,
                         optimizer=opt, steps=steps, aux=aux)
    return {"omega": expand(raw)}

  def apply(coeffs, stacked):
    return scaled_sum(coeffs["omega"], stacked)

  return Merge(init, apply)


scalearn.requires = ("logits_fn or loss_fn", "batches", "key (while dropout > 0)")
