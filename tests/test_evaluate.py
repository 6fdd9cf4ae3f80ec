"""Evaluation protocols: the tangent shortcut equals direct evaluation; selections by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import evaluate
from research import tangent

V, D, L = 11, 4, 5


def bag_of_words(params, input_ids, attention_mask):
  """A model linear in its params: masked mean of token embeddings."""
  mask = attention_mask[..., None].astype(jnp.float32)
  return (params["emb"][input_ids] * mask).sum(1) / mask.sum(1)


def tanh_bag(params, input_ids, attention_mask):
  return jnp.tanh(bag_of_words(params, input_ids, attention_mask) @ params["w"])


def _inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (n, L)).astype(np.int32)
  mask = (np.arange(L)[None] < rng.integers(1, L + 1, (n, 1))).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask}


def _params(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"emb": jax.random.normal(k1, (V, D)), "w": jax.random.normal(k2, (D, D))}


def test_linear_mode_equals_standard_for_model_linear_in_params():
  ev = evaluate.FamilyEvaluator(bag_of_words, _params(0), batch_size=4)
  dirs = [_params(1), _params(2)]
  grid = np.array([[0.0, 0.0], [1.0, -0.5], [0.3, 2.0]])
  inputs = _inputs(10)  # 10 is not a multiple of 4: exercises the padded batch.
  std = ev.embeddings("standard", dirs, grid, inputs)
  lin = ev.embeddings("linear", dirs, grid, inputs)
  assert std.shape == (3, 10, D)
  np.testing.assert_allclose(lin, std, rtol=1e-5, atol=1e-5)


def test_tangent_family_equals_direct_linearized_evaluation():
  params0 = _params(0)
  ev = evaluate.FamilyEvaluator(tanh_bag, params0, batch_size=8)
  dirs = [_params(1), _params(2)]
  grid = np.array([[0.5, 0.0], [0.2, -0.7]])
  inputs = _inputs(8)
  got = ev.embeddings("posthoc", dirs, grid, inputs)
  f_lin = tangent.linearize(tanh_bag)
  for row, (a, b) in enumerate(grid):
    params = jax.tree.map(lambda p, x, y: p + a * x + b * y, params0, *dirs)
    want = f_lin(params, params0, inputs["input_ids"], inputs["attention_mask"])
    np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)
  # ... and it is not the non-linear model (the test can fail).
  assert not np.allclose(got, ev.embeddings("standard", dirs, grid, inputs), atol=1e-3)


def test_unknown_mode_is_rejected():
  ev = evaluate.FamilyEvaluator(bag_of_words, _params(0))
  with pytest.raises(ValueError, match="Unknown evaluation mode 'nonlinear'"):
    ev.embeddings("nonlinear", [_params(1)], [[1.0]], _inputs(2))


class StubEvaluator:
  """Accuracies / predictions from tables, keyed by the data set's name."""

  def __init__(self, table=None, predict=None):
    self.table, self.predict = table, predict

  def accuracy(self, mode, directions, grid, data):
    grid = np.asarray(grid, np.float64).reshape(-1, 1)
    return np.array([self.table[data](float(c)) for c in grid[:, 0]])

  def predictions(self, mode, directions, grid, data):
    return self.predict(np.asarray(grid, np.float64), data)


def test_task_negation_picks_lowest_target_within_control_budget():
  alphas = np.linspace(0, 1, 5)  # 0, .25, .5, .75, 1
  # Target accuracy falls with alpha; control collapses past alpha = 0.5.
  table = {"target_val": lambda a: 0.9 - 0.8 * a, "control_val": lambda a: 0.8 if a <= 0.5 else 0.5,
           "target_test": lambda a: 0.85 - 0.8 * a, "control_test": lambda a: 0.78 if a <= 0.5 else 0.4}
  out = evaluate.task_negation(
      StubEvaluator(table), "standard", {"t": {"w": jnp.ones(2)}},
      {"t": "target_val"}, {"t": "target_test"}, "control_val", "control_test",
      alphas, zeroshot_control_val=0.8, control_ratio=0.95)
  assert out["alpha"] == {"t": 0.5}
  assert out["target"]["t"] == pytest.approx(0.45)
  assert out["control"]["avg"] == pytest.approx(0.78)


def test_task_addition_picks_alpha_by_mean_normalized_validation_accuracy():
  alphas = np.array([0.0, 0.5, 1.0])
  # Normalized by single-task val accuracy (a: 0.5, b: 1.0): a -> [.2, 1, .6],
  # b -> [.5, .3, .5]; mean [.35, .65, .55] -> alpha 0.5.
  curves = {"a": {0.0: 0.1, 0.5: 0.5, 1.0: 0.3}, "b": {0.0: 0.5, 0.5: 0.3, 1.0: 0.5}}
  table = {f"{t}_{s}": (lambda a, t=t: curves[t][a]) for t in "ab" for s in ("val", "test")}
  taus = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}
  out = evaluate.task_addition(
      StubEvaluator(table), "standard", taus, {"a": "a_val", "b": "b_val"},
      {"a": "a_test", "b": "b_test"}, alphas, single_val={"a": 0.5, "b": 1.0},
      single_test={"a": 1.0, "b": 0.6})
  assert out["alpha"] == 0.5
  np.testing.assert_allclose(out["val_normalized_curve"], [0.35, 0.65, 0.55])
  assert out["absolute"] == pytest.approx({"a": 0.5, "b": 0.3, "avg": 0.4})
  assert out["normalized"] == pytest.approx({"a": 0.5, "b": 0.5, "avg": 0.5})


def test_disentanglement_error_hand_case():
  # Predict class 1 iff alpha_a + alpha_b > 0.5, on every input of both tasks.
  predict = lambda grid, data: np.repeat((grid.sum(1) > 0.5).astype(int)[:, None], 3, 1)
  tau = {"w": jnp.ones(2)}
  xi = evaluate.disentanglement(StubEvaluator(predict=predict), "standard", tau, tau,
                                "a", "b", alphas=[0.0, 1.0])
  # Joint predictions [[0, 1], [1, 1]]; solo a: [0, 1] by row, solo b: [0, 1] by
  # column. Task a disagrees at (0, 1), task b at (1, 0).
  np.testing.assert_array_equal(xi, [[0, 1], [1, 0]])


def test_length_bucketed_batches_equal_one_full_batch():
  params0 = _params(0)
  inputs = _inputs(21, seed=3)  # Mixed lengths, 21 = 2 x 8 + 5 rows.
  inputs = {k: np.pad(v, ((0, 0), (0, 11))) for k, v in inputs.items()}  # Long right padding.
  ev = evaluate.FamilyEvaluator(tanh_bag, params0, batch_size=8)
  got = ev.embeddings("standard", [_params(1)], [[0.0]], inputs)[0]
  want = tanh_bag(params0, inputs["input_ids"], inputs["attention_mask"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
