"""LoRA factors and the `lora` fine-tuning mode: shapes, densify by hand, training, resume, sharding, errors."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import lora
from research import sharding
from research import task_vectors
from research import train
from tests import tiny_text
from research.models import bert
from research.models import heads

CONFIG = bert.BertConfig(vocab_size=64, hidden=32, layers=2, heads=4, intermediate=64,
                         max_position=16)
KERNELS = ("attention/key/kernel", "attention/output/kernel", "attention/query/kernel",
           "attention/value/kernel", "intermediate/kernel", "output/kernel")
# As in test_train_sharded: every BERT parameter dimension may take the fsdp axis.
RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
         ("vocab", None), ("position", None), ("token_type", None), ("fsdp", "fsdp")]
N, L, C = 32, 8, 3


@pytest.fixture(scope="module")
def setup():
  return tiny_text.task(CONFIG, N, L, C)


def _config(steps=12, every=4, **kw):
  return ml_collections.ConfigDict(dict(
      steps=steps, batch_size=8, lr=2e-2, weight_decay=0.0, warmup_steps=1,
      clip_norm=1.0, checkpoint_every=every, lora_rank=4, **kw))


def _loss(factors, params0, apply_fn, head, inputs, labels, alpha=None):
  f = train.model_fn(apply_fn, "lora", lora_alpha=alpha)
  emb = f(factors, params0, inputs["input_ids"], inputs["attention_mask"])
  logits = heads.logits(emb, head, 20.0)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


# --------------------------------------------------------------------- factors

def test_init_shapes_selection_and_determinism(setup):
  _, params0, *_ = setup
  factors = lora.init(params0, 4, jax.random.key(0))
  pairs = lora.named(factors)
  assert sorted(pairs) == sorted(f"layers/{i}/{k}" for i in range(2) for k in KERNELS)
  for name, (a, b) in pairs.items():
    d_in = CONFIG.intermediate if name.endswith("/output/kernel") and "attention" not in name \
        else CONFIG.hidden
    d_out = CONFIG.intermediate if name.endswith("intermediate/kernel") else CONFIG.hidden
    assert a.shape == (d_in, 4) and b.shape == (4, d_out), name
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(b, 0)
    assert 0 < float(jnp.abs(a).max()) <= 1 / math.sqrt(d_in)   # U(-1/sqrt(d_in), 1/sqrt(d_in))
  assert lora.rank(factors) == 4
  # Nested like the leaf names; same key, same factors; another key, other factors.
  assert set(factors["layers"]["0"]["attention"]["query"]["kernel"]) == {"a", "b"}
  again = lora.init(params0, 4, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, factors, again)
  other = lora.init(params0, 4, jax.random.key(1))
  assert not np.array_equal(lora.named(other)["layers/0/intermediate/kernel"][0],
                            pairs["layers/0/intermediate/kernel"][0])
  # A regular expression picks leaves; shapes alone (abstract params0) are enough.
  abstract = jax.eval_shape(lambda p: p, params0)
  qv = lora.init(abstract, 2, jax.random.key(0), select=r"attention/(query|value)/kernel$")
  assert sorted(lora.named(qv)) == [f"layers/{i}/attention/{m}/kernel"
                                    for i in range(2) for m in ("query", "value")]


def test_densify_hand_computed_and_stacked():
  params0 = {"layers_0": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}},
             "embed": jnp.ones((5, 2))}
  factors = {"layers_0": {"dense": {"kernel": {"a": jnp.array([[1.0], [2.0]]),
                                               "b": jnp.array([[3.0, 4.0, 5.0]])}}}}
  tau = jax.jit(lora.densify)(factors, params0)
  np.testing.assert_array_equal(tau["layers_0"]["dense"]["kernel"],
                                [[3.0, 4.0, 5.0], [6.0, 8.0, 10.0]])
  np.testing.assert_array_equal(tau["layers_0"]["dense"]["bias"], np.zeros(3))
  np.testing.assert_array_equal(tau["embed"], np.zeros((5, 2)))
  # alpha = 2 with r = 1: scale 2.
  tau2 = lora.densify(factors, params0, alpha=2.0)
  np.testing.assert_array_equal(tau2["layers_0"]["dense"]["kernel"],
                                2 * np.array([[3.0, 4.0, 5.0], [6.0, 8.0, 10.0]]))
  # apply adds it to params0.
  np.testing.assert_array_equal(lora.apply(params0, factors)["layers_0"]["dense"]["kernel"],
                                1 + np.array([[3.0, 4.0, 5.0], [6.0, 8.0, 10.0]]))
  # Stacked factors -> stacked task vectors, leaf by leaf the stack of the single ones.
  other = jax.tree.map(lambda x: -0.5 * x, factors)
  stacked = lora.densify(task_vectors.stack([factors, other]), params0)
  want = task_vectors.stack([lora.densify(factors, params0), lora.densify(other, params0)])
  jax.tree.map(np.testing.assert_allclose, stacked, want)
  assert stacked["embed"].shape == (2, 5, 2)
  # The default selection finds layers_0/dense/kernel here and nothing else.
  assert list(lora.named(lora.init(params0, 1, jax.random.key(0)))) == ["layers_0/dense/kernel"]


def test_model_fn_equals_apply_fn_at_zero_b_and_differs_after(setup):
  apply_fn, params0, _, inputs, _ = setup
  factors = lora.init(params0, 4, jax.random.key(0))
  f = lora.model_fn(apply_fn)
  args = (inputs["input_ids"], inputs["attention_mask"])
  np.testing.assert_array_equal(f(factors, params0, *args), apply_fn(params0, *args))
  moved = jax.tree.map(lambda x: x + 0.05, factors)
  assert not np.allclose(f(moved, params0, *args), apply_fn(params0, *args), atol=1e-4)
  # The train-mode function is the same function.
  np.testing.assert_array_equal(train.model_fn(apply_fn, "lora")(moved, params0, *args),
                                f(moved, params0, *args))


# --------------------------------------------------------------------- training

def test_lora_finetune_reduces_loss_and_trains_only_factors(setup, tmp_path):
  apply_fn, params0, head, inputs, labels = setup
  factors = train.finetune(apply_fn, params0, head, inputs, labels, mode="lora",
                           config=_config(steps=16), checkpoint_dir=str(tmp_path / "a"),
                           temperature=20.0, progress=False)
  assert sorted(lora.named(factors)) == sorted(lora.named(lora.init(params0, 4,
                                                                    jax.random.key(0))))
  start = lora.init(params0, 4, jax.random.key(0))  # finetune's init: key from seed 0
  before = _loss(start, params0, apply_fn, head, inputs, labels)
  after = _loss(factors, params0, apply_fn, head, inputs, labels)
  assert after < 0.8 * before, (before, after)
  # The task vector lives only at the adapted kernels.
  tau = lora.densify(factors, params0)
  assert float(jnp.abs(tau["embeddings"]["word"]["embedding"]).max()) == 0.0
  assert float(jnp.abs(tau["layers"][1]["intermediate"]["kernel"]).max()) > 0.0
  # lora_alpha reaches the forward pass: alpha = 2r doubles the update.
  tau2 = lora.densify(factors, params0, alpha=8.0)
  np.testing.assert_allclose(tau2["layers"][0]["output"]["kernel"],
                             2 * tau["layers"][0]["output"]["kernel"], rtol=1e-6)


def test_lora_rerun_skips_and_interrupted_run_resumes_identically(setup, tmp_path, monkeypatch):
  apply_fn, params0, head, inputs, labels = setup
  config = _config(steps=6, every=2, lora_alpha=8.0)
  plan = train.batch_plan(N, config.batch_size, config.steps, seed=0)

  def batches(step, fail_at=None):
    if step == fail_at:
      raise KeyboardInterrupt("killed")
    return {"input_ids": inputs["input_ids"][plan[step]],
            "attention_mask": inputs["attention_mask"][plan[step]], "label": labels[plan[step]]}

  kw = dict(mode="lora", config=config, temperature=20.0, progress=False)
  reference = train.finetune(apply_fn, params0, head, batches=batches,
                             checkpoint_dir=str(tmp_path / "ref"), **kw)
  with pytest.raises(KeyboardInterrupt):   # Dies in step 5, after the step-4 save.
    train.finetune(apply_fn, params0, head, batches=lambda s: batches(s, fail_at=4),
                   checkpoint_dir=str(tmp_path / "run"), **kw)
  resumed = train.finetune(apply_fn, params0, head, batches=batches,
                           checkpoint_dir=str(tmp_path / "run"), **kw)
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)
  # The same batches in memory give the same factors; a finished run is not retrained.
  in_memory = train.finetune(apply_fn, params0, head, inputs, labels,
                             checkpoint_dir=str(tmp_path / "mem"), **kw)
  jax.tree.map(np.testing.assert_array_equal, reference, in_memory)
  monkeypatch.setattr(train, "make_train_step", lambda *a, **k: pytest.fail("retrained"))
  again = train.finetune(apply_fn, params0, head, inputs, labels,
                         checkpoint_dir=str(tmp_path / "mem"), **kw)
  jax.tree.map(np.testing.assert_array_equal, reference, again)


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                      rtol=2e-5, atol=2e-6), a, b)


def test_sharded_lora_step_equals_single_device_step(setup):
  apply_fn, params0, head, inputs, labels = setup
  config = _config()
  optimizer = train.make_optimizer(config)
  step = train.make_train_step(apply_fn, "lora", optimizer, temperature=20.0)
  batch = {**{k: v[:8] for k, v in inputs.items()}, "label": labels[:8]}
  factors0 = lora.init(params0, 4, jax.random.key(0))
  single = train.jit_train_step(step)
  state = train.init_state(optimizer, factors0)
  for _ in range(2):  # Step 0 has learning rate 0 (warmup); step 1 moves B off zero.
    state, metrics = single(state, params0, head, batch)
  assert float(jnp.abs(lora.named(state.params)["layers/0/output/kernel"][1]).max()) > 0

  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  sh = train.train_shardings(optimizer, factors0, mesh, RULES, batch_size=8)
  sh = sh._replace(params=train.train_shardings(optimizer, params0, mesh, RULES).params)
  placed0 = train.place(params0, sh.params)
  out = train.init_state(optimizer, train.place(factors0, sh.state.params), sh)
  sharded_step = train.jit_train_step(step, sh)
  for _ in range(2):
    out, out_metrics = sharded_step(out, placed0, train.place(head, sh.head),
                                    train.global_batch(batch, sh.batch))
  np.testing.assert_allclose(out_metrics["loss"], metrics["loss"], rtol=1e-5)
  _close(out.params, state.params)
  _close(out.opt_state, state.opt_state)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed0))


def test_sharded_lora_finetune_matches_single_device_and_resumes(setup, tmp_path):
  apply_fn, params0, head, inputs, labels = setup
  kw = dict(mode="lora", config=_config(steps=3, every=2), temperature=20.0, progress=False)
  single = train.finetune(apply_fn, params0, head, inputs, labels,
                          checkpoint_dir=str(tmp_path / "single"), **kw)
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  sharded = train.finetune(apply_fn, params0, head, inputs, labels, mesh=mesh, rules=RULES,
                           checkpoint_dir=str(tmp_path / "sharded"), **kw)
  _close(sharded, single)
  again = train.finetune(apply_fn, params0, head, inputs, labels, mesh=mesh, rules=RULES,
                         checkpoint_dir=str(tmp_path / "sharded"), **kw)
  jax.tree.map(lambda a, b: (np.testing.assert_array_equal(a, b),
                             a.sharding == b.sharding or pytest.fail("sharding changed")),
               sharded, again)


# --------------------------------------------------------------------- errors

def test_bad_inputs_are_rejected(setup, tmp_path):
  apply_fn, params0, head, inputs, labels = setup
  key = jax.random.key(0)
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="rank must be a positive int"):
      lora.init(params0, bad, key)
  with pytest.raises(ValueError, match=r"rank 40 exceeds .* 'layers/0/attention/key/kernel'"):
    lora.init(params0, 40, key)
  with pytest.raises(ValueError, match=r"no leaf of params0 matches.*embeddings/norm/bias"):
    lora.init(params0, 2, key, select="no_such_leaf")
  with pytest.raises(ValueError, match=r"'embeddings/norm/bias' has shape \(32,\)"):
    lora.init(params0, 2, key, select=r"embeddings/norm/bias")
  with pytest.raises(ValueError, match="select must be"):
    lora.init(params0, 2, key, select=3)
  with pytest.raises(ValueError, match="no leaf of params0 matches"):
    lora.init({"w": jnp.ones((4, 4))}, 2, key)          # no layer index: nothing by default
  factors = lora.init(params0, 2, key)
  with pytest.raises(ValueError, match=r"\['nope/kernel'\] name no leaf of params0"):
    lora.densify({**factors, "nope": {"kernel": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}}},
                 params0)
  wrong = lora.nest({"layers/0/intermediate/kernel": (jnp.ones((3, 2)), jnp.ones((2, 3)))})
  with pytest.raises(ValueError, match=r"'layers/0/intermediate/kernel' has shape \(32, 64\)"):
    lora.densify(wrong, params0)
  with pytest.raises(ValueError, match=r"not a dict of \{'a': A, 'b': B\}"):
    lora.densify({"layers": {"0": {"x": jnp.ones(2)}}}, params0)
  with pytest.raises(ValueError, match="alpha must be"):
    lora.densify(factors, params0, alpha=-1.0)
  with pytest.raises(ValueError, match="Unknown fine-tuning mode 'loraa'.*'lora'"):
    train.finetune(apply_fn, params0, head, inputs, labels, mode="loraa", config=_config(),
                   checkpoint_dir=str(tmp_path), temperature=20.0)
  with pytest.raises(ValueError, match="Unknown mode 'lin'.*'lora'"):
    train.model_fn(apply_fn, "lin")
