"""Fine-tuning: both modes learn, runs are deterministic, resumable and skip when done."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import task_vectors
from research import train
from research.models import heads

V, D, C, L = 13, 6, 3, 4


def apply_fn(params, input_ids, attention_mask):
  mask = attention_mask[..., None].astype(jnp.float32)
  pooled = (params["emb"][input_ids] * mask).sum(1) / mask.sum(1)
  return jnp.tanh(pooled @ params["w"])


def _setup(n=48):
  rng = np.random.default_rng(0)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params0 = {"emb": jax.random.normal(k1, (V, D)), "w": jax.random.normal(k2, (D, D))}
  head = jax.random.normal(k3, (C, D))
  ids = rng.integers(0, V, (n, L)).astype(np.int32)
  labels = (ids[:, 0] % C).astype(np.int32)  # Learnable from the first token.
  inputs = {"input_ids": ids, "attention_mask": np.ones((n, L), np.int32)}
  return params0, head, inputs, labels


def _config(steps=12, every=4):
  return ml_collections.ConfigDict(dict(
      steps=steps, batch_size=8, lr=0.05, weight_decay=0.1, warmup_steps=2,
      clip_norm=1.0, checkpoint_every=every))


def _loss(params, params0, head, inputs, labels, mode):
  f = train.model_fn(apply_fn, mode)
  logits = heads.logits(f(params, params0, inputs["input_ids"], inputs["attention_mask"]), head, 20.0)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


@pytest.mark.parametrize("mode", train.FINETUNE_MODES)
def test_finetune_reduces_loss_and_is_deterministic(mode, tmp_path):
  params0, head, inputs, labels = _setup()
  run = lambda d: train.finetune(apply_fn, params0, head, inputs, labels, mode=mode,
                                 config=_config(), checkpoint_dir=str(tmp_path / d),
                                 temperature=20.0, progress=False)
  params = run("a")
  assert _loss(params, params0, head, inputs, labels, mode) < 0.8 * _loss(
      params0, params0, head, inputs, labels, mode)
  again = run("b")
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_linear_mode_trains_the_linearized_model():
  """One step in linear mode follows the gradient of f_lin, not of f."""
  params0, head, inputs, labels = _setup()
  params = task_vectors.apply(params0, jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), params0))
  f_std, f_lin = train.model_fn(apply_fn, "standard"), train.model_fn(apply_fn, "linear")
  args = (inputs["input_ids"], inputs["attention_mask"])
  assert not np.allclose(f_std(params, params0, *args), f_lin(params, params0, *args), atol=1e-3)
  np.testing.assert_allclose(f_lin(params0, params0, *args), f_std(params0, params0, *args), rtol=1e-6)


def test_rerun_skips_finished_run(tmp_path, monkeypatch):
  params0, head, inputs, labels = _setup()
  kw = dict(mode="standard", config=_config(), checkpoint_dir=str(tmp_path),
            temperature=20.0, progress=False)
  first = train.finetune(apply_fn, params0, head, inputs, labels, **kw)
  monkeypatch.setattr(train, "make_train_step", lambda *a, **k: pytest.fail("retrained"))
  second = train.finetune(apply_fn, params0, head, inputs, labels, **kw)
  jax.tree.map(np.testing.assert_array_equal, first, second)


class _Interrupt(Exception):
  pass


class _FailingLabels(np.ndarray):
  """Labels that raise on the n-th batch read, like a process killed mid-run."""
  reads = 0
  fail_at = None

  def __getitem__(self, idx):
    if isinstance(idx, np.ndarray):
      type(self).reads += 1
      if type(self).reads == type(self).fail_at:
        raise _Interrupt()
    return super().__getitem__(idx)


@pytest.mark.parametrize("mode", train.FINETUNE_MODES)
def test_interrupted_run_resumes_to_identical_params(mode, tmp_path):
  params0, head, inputs, labels = _setup()
  kw = dict(mode=mode, config=_config(steps=12, every=4), temperature=20.0, progress=False)
  reference = train.finetune(apply_fn, params0, head, inputs, labels,
                             checkpoint_dir=str(tmp_path / "ref"), **kw)
  failing = labels.view(_FailingLabels)
  _FailingLabels.reads, _FailingLabels.fail_at = 0, 7  # Dies in step 7, after the step-4 save.
  with pytest.raises(_Interrupt):
    train.finetune(apply_fn, params0, head, inputs, failing,
                   checkpoint_dir=str(tmp_path / "run"), **kw)
  _FailingLabels.fail_at = None
  resumed = train.finetune(apply_fn, params0, head, inputs, labels,
                           checkpoint_dir=str(tmp_path / "run"), **kw)
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)


def test_batch_plan_fixed_shapes_and_seeded():
  plan = train.batch_plan(10, 4, steps=5, seed=1)
  assert plan.shape == (5, 4)
  np.testing.assert_array_equal(plan, train.batch_plan(10, 4, steps=5, seed=1))
  assert not np.array_equal(plan, train.batch_plan(10, 4, steps=5, seed=2))
  assert len(set(plan[0]) | set(plan[1])) == 8  # No repeats within an epoch.


def test_bad_inputs_are_rejected(tmp_path):
  params0, head, inputs, labels = _setup()
  with pytest.raises(ValueError, match="fewer than batch_size"):
    train.batch_plan(3, 8, steps=1, seed=0)
  with pytest.raises(ValueError, match="Unknown fine-tuning mode 'posthoc'"):
    train.finetune(apply_fn, params0, head, inputs, labels, mode="posthoc", config=_config(),
                   checkpoint_dir=str(tmp_path), temperature=20.0)
