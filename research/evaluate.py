"""Evaluation protocols of the tangent-space paper on families of edited models.

Every protocol evaluates a family `params0 + sum_k c_k d_k` (directions `d_k`,
a grid of coefficient rows `c`) on labelled inputs:
  * task addition: one direction (the sum of the task vectors), a shared alpha;
  * task negation: one direction (-tau_t) per task, control constraint;
  * weight disentanglement: two directions, a 2-D alpha grid.
In `standard` mode each grid row is a forward pass of the edited model. In
`linear` / `posthoc` mode the model is the linearization around `params0`, whose
outputs are `f0 + sum_k c_k J d_k`, so a whole grid costs one primal pass plus
one JVP per direction (`tangent.precompute` / `tangent.combine`).
"""
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research import tangent
from research import task_vectors
from research.models import heads
from research.train import TEXT_INPUTS

EVAL_MODES = ("standard", "linear", "posthoc")


@dataclasses.dataclass(frozen=True)
class LabeledSet:
  """Inputs of one task split, with its labels and frozen head."""
  inputs: dict  # arrays [N, ...]: input_ids / attention_mask [N, L] (text) or image [N, H, W, 3]
  labels: np.ndarray  # [N]
  head: Any  # [C, D]

  def take(self, n: int) -> "LabeledSet":
    """The first `n` examples."""
    return LabeledSet({k: v[:n] for k, v in self.inputs.items()}, self.labels[:n], self.head)


def _bucket(n: int, cap: int, smallest: int = 8) -> int:
  """The smallest power of two >= n (at least `smallest`), capped at `cap`."""
  return min(cap, max(smallest, 1 << (int(n) - 1).bit_length()))


def _batched(fn, inputs, batch_size):
  """Applies `fn(batch) -> [..., b, D]` over batches of `inputs`; returns [..., N, D].

  Text inputs (with an `attention_mask`) are batched in order of length and
  each batch is cut to a power-of-two number of tokens: right padding is
  masked out, so the result is exact, and short inputs (single words,
  glosses) cost a fraction of `max_len`; the last batch is padded to a
  power-of-two number of rows, so a handful of shapes keeps recompilation
  rare. Other inputs (images) are batched in order, every batch padded to
  `batch_size` rows: one shape.
  """
  mask = inputs.get("attention_mask")
  n = len(next(iter(inputs.values())))
  if mask is not None:
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind="stable")
  else:
    order = np.arange(n)
  outs = []
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    # Images cost the same whatever the split: full batches only, so one shape ever compiles.
    rows = _bucket(len(idx), batch_size, smallest=1) if mask is not None else batch_size
    idx = np.concatenate([idx, np.repeat(idx[-1:], rows - len(idx))])
    if mask is not None:
      width = _bucket(lengths[idx].max(), mask.shape[1])
      batch = {k: v[idx, :width] for k, v in inputs.items()}
    else:
      batch = {k: v[idx] for k, v in inputs.items()}
    outs.append(np.asarray(fn(batch))[..., :min(batch_size, n - start), :])
  out = np.empty_like(np.concatenate(outs, axis=-2))
  out[..., order, :] = np.concatenate(outs, axis=-2)
  return out


class FamilyEvaluator:
  """Embeddings of `params0 + sum_k c_k d_k` for coefficient grids, per mode.

  `apply_fn(params, *[inputs[k] for k in input_keys]) -> [B, D]`: by default
  a text encoder fed `input_ids` and `attention_mask`; `input_keys=("image",)`
  for an image encoder.
  """

  def __init__(self, apply_fn: Callable, params0, *, batch_size: int = 128,
               input_keys: Sequence[str] = TEXT_INPUTS):
    self.params0 = params0
    self.batch_size = batch_size
    keys = tuple(input_keys)

    @jax.jit
    def forward(params, inputs):
      return apply_fn(params, *(inputs[k] for k in keys))

    @jax.jit
    def tangent_cache(params0, stacked, inputs):
      cache = tangent.precompute(apply_fn, params0, stacked, *(inputs[k] for k in keys))
      return jnp.concatenate([cache.f0[None], cache.jvps], axis=0)

    @jax.jit
    def edit(params0, stacked, coeffs):
      scaled = jax.tree.map(
          lambda d: jnp.tensordot(coeffs.astype(d.dtype), d, axes=1), stacked)
      return task_vectors.apply(params0, scaled)

    self._forward, self._tangent_cache, self._edit = forward, tangent_cache, edit

  def embeddings(self, mode: str, directions: Sequence[Any], grid, inputs) -> np.ndarray:
    """Returns [G, N, D] embeddings for the coefficient grid [G, K]."""
    grid = np.asarray(grid, np.float32).reshape(-1, len(directions))
    stacked = task_vectors.stack(list(directions))
    if mode == "standard":
      rows = []
      for coeffs in grid:
        params = self._edit(self.params0, stacked, jnp.asarray(coeffs))
        rows.append(_batched(lambda b: self._forward(params, b), inputs,
                             self.batch_size))
      return np.stack(rows)
    if mode in ("linear", "posthoc"):
      cache = _batched(lambda b: self._tangent_cache(self.params0, stacked, b),
                       inputs, self.batch_size)  # [1 + K, N, D]
      return cache[0][None] + np.einsum("gk,knd->gnd", grid, cache[1:])
    raise ValueError(f"Unknown evaluation mode {mode!r}; expected one of {EVAL_MODES}.")

  def accuracy(self, mode, directions, grid, data: LabeledSet) -> np.ndarray:
    """Accuracy [G] of each grid row on `data`."""
    return np.mean(self.predictions(mode, directions, grid, data) == data.labels, -1)

  def predictions(self, mode, directions, grid, data: LabeledSet) -> np.ndarray:
    emb = self.embeddings(mode, directions, grid, data.inputs)
    return np.asarray(jnp.argmax(heads.logits(emb, data.head), -1))

  def zeroshot_accuracy(self, data: LabeledSet) -> float:
    emb = _batched(lambda b: self._forward(self.params0, b), data.inputs, self.batch_size)
    return float(np.mean(np.argmax(np.asarray(heads.logits(emb, data.head)), -1) == data.labels))


def _summary(per_task: dict) -> dict:
  """The per-task values and their mean "avg"; undefined values (None) stay out of the mean."""
  defined = [v for v in per_task.values() if v is not None]
  return {**per_task, "avg": float(np.mean(defined)) if defined else None}


def single_task(ev: FamilyEvaluator, mode, taus: dict, sets: dict) -> dict:
  """{task: accuracy} of params0 + tau_t on task t."""
  return {t: float(ev.accuracy(mode, [taus[t]], [[1.0]], sets[t])[0]) for t in taus}


def task_addition(ev, mode, taus: dict, val: dict, test: dict, alphas,
                  single_val: dict, single_test: dict) -> dict:
  """Shared alpha maximising mean normalized val accuracy; test report at it.

  Normalized accuracy divides by the task's single-task accuracy, so a task
  whose fine-tuned model gets nothing right (tiny smoke data) has none: it is
  None and stays out of the means (if no task has one, alpha maximises the
  mean absolute validation accuracy).
  """
  total = task_vectors.add(*taus.values())
  grid = np.asarray(alphas)[:, None]
  val_acc = {t: ev.accuracy(mode, [total], grid, val[t]) for t in taus}
  defined = [t for t in taus if single_val[t] > 0]
  normalized = (np.mean([val_acc[t] / single_val[t] for t in defined], axis=0) if defined
                else np.mean([val_acc[t] for t in taus], axis=0))
  best = int(np.argmax(normalized))
  alpha = round(float(alphas[best]), 6)
  absolute = {t: float(ev.accuracy(mode, [total], [[alpha]], test[t])[0]) for t in taus}
  return {
      "alpha": alpha,
      "absolute": _summary(absolute),
      "normalized": _summary({t: absolute[t] / single_test[t] if single_test[t] > 0 else None
                              for t in taus}),
      "val_normalized_curve": normalized.tolist(),
  }


def task_negation(ev, mode, taus: dict, val: dict, test: dict, control_val,
                  control_test, alphas, zeroshot_control_val: float,
                  control_ratio: float = 0.95) -> dict:
  """Per task: alpha minimising target val accuracy with control >= ratio x zero-shot."""
  grid = np.asarray(alphas)[:, None]
  chosen, target, control = {}, {}, {}
  for t, tau in taus.items():
    neg = task_vectors.negate(tau)
    target_val = ev.accuracy(mode, [neg], grid, val[t])
    control_ok = ev.accuracy(mode, [neg], grid, control_val) >= (
        control_ratio * zeroshot_control_val)
    # alpha = 0 is the zero-shot model: always admissible unless val noise says
    # otherwise, in which case fall back to it explicitly.
    candidates = np.where(control_ok)[0]
    best = int(candidates[np.argmin(target_val[candidates])]) if len(candidates) else 0
    chosen[t] = round(float(alphas[best]), 6)
    target[t] = float(ev.accuracy(mode, [neg], [[chosen[t]]], test[t])[0])
    control[t] = float(ev.accuracy(mode, [neg], [[chosen[t]]], control_test)[0])
  return {"alpha": chosen, "target": _summary(target), "control": _summary(control)}


def disentanglement(ev, mode, tau_a, tau_b, data_a: LabeledSet, data_b: LabeledSet,
                    alphas) -> np.ndarray:
  """Weight disentanglement error xi(alpha_a, alpha_b) on the grid [A, A].

  xi = sum_t E_{x in D_t}[ pred(params0 + alpha_t tau_t) != pred(params0 + alpha_a tau_a + alpha_b tau_b) ]
  (Ortiz-Jimenez et al. 2023, eq. 5, prediction-disagreement distance).
  """
  alphas = np.asarray(alphas, np.float32)
  n = len(alphas)
  pairs = np.stack(np.meshgrid(alphas, alphas, indexing="ij"), -1).reshape(-1, 2)
  xi = np.zeros((n, n))
  for which, data in ((0, data_a), (1, data_b)):
    joint = ev.predictions(mode, [tau_a, tau_b], pairs, data).reshape(n, n, -1)
    solo_grid = np.zeros((n, 2), np.float32)
    solo_grid[:, which] = alphas
    solo = ev.predictions(mode, [tau_a, tau_b], solo_grid, data)  # [A, N]
    solo = solo[:, None] if which == 0 else solo[None, :]
    xi += np.mean(joint != solo, -1)
  return xi
