"""Sharded fine-tuning on 8 fake CPU devices: equal to one device, parameters split 8 ways."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research import sharding
from research import train
from tests import tiny_text
from research.models import bert

# Every BERT parameter dimension named 'embed', 'mlp' or 'heads' may take the
# fsdp axis (the first one that divides wins), so no leaf stays replicated.
RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
         ("vocab", None), ("position", None), ("token_type", None)]
CONFIG = bert.BertConfig(vocab_size=64, hidden=32, layers=1, heads=4, intermediate=64,
                         max_position=16)
N, L, C = 32, 8, 3


@pytest.fixture(scope="module")
def setup():
  return tiny_text.task(CONFIG, N, L, C)


def _config(steps=3, every=2):
  return ml_collections.ConfigDict(dict(
      steps=steps, batch_size=8, lr=1e-2, weight_decay=0.1, warmup_steps=1,
      clip_norm=1.0, checkpoint_every=every))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                      rtol=2e-5, atol=2e-6), a, b)


def _device_bytes(tree):
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return per_device


@pytest.mark.parametrize("mode", train.FINETUNE_MODES)
def test_sharded_step_equals_single_device_step(setup, mode):
  apply_fn, params0, head, inputs, labels = setup
  optimizer = train.make_optimizer(_config())
  step = train.make_train_step(apply_fn, mode, optimizer, temperature=20.0)
  batch = {**{k: v[:8] for k, v in inputs.items()}, "label": labels[:8]}

  state, metrics = train.jit_train_step(step)(train.init_state(optimizer, params0),
                                               params0, head, batch)

  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  sh = train.train_shardings(optimizer, params0, mesh, RULES, batch_size=8)
  sharded_params0 = train.place(params0, sh.params)
  sharded = train.init_state(optimizer, sharded_params0, sh)
  gbatch = train.global_batch(batch, sh.batch)
  assert gbatch["input_ids"].sharding == sh.batch
  assert sh.batch.spec == P(("data", "fsdp"))
  out, out_metrics = train.jit_train_step(step, sh)(sharded, sharded_params0,
                                                    train.place(head, sh.head), gbatch)

  np.testing.assert_allclose(out_metrics["loss"], metrics["loss"], rtol=1e-5)
  _close(out.params, state.params)
  _close(out.opt_state, state.opt_state)
  # params0 is sharded like params, and the state keeps its shardings.
  jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"),
               sharded_params0, sh.params)
  jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"),
               out.params, sh.params)


def test_params_and_optimizer_state_split_eight_ways(setup):
  _, params0, _, _, _ = setup
  optimizer = train.make_optimizer(_config())
  mesh = sharding.make_mesh((1, 8), ("data", "fsdp"))
  sh = train.train_shardings(optimizer, params0, mesh, RULES)
  state = train.init_state(optimizer, train.place(params0, sh.params), sh)
  total = sum(x.nbytes for x in jax.tree.leaves(params0))
  for name, tree in [("params", state.params), ("adam mu", state.opt_state[1][0].mu),
                     ("adam nu", state.opt_state[1][0].nu)]:
    per_device = _device_bytes(tree)
    assert len(per_device) == 8, name
    for device, nbytes in per_device.items():
      assert nbytes == pytest.approx(total / 8, rel=0.02), (name, device, nbytes, total)
  # Every parameter leaf is split (none replicated) under these rules.
  for leaf in jax.tree.leaves(state.params):
    assert not leaf.sharding.is_fully_replicated, leaf.sharding


def test_sharded_finetune_matches_single_device_and_resumes(setup, tmp_path):
  apply_fn, params0, head, inputs, labels = setup
  kw = dict(mode="linear", config=_config(steps=3, every=2), temperature=20.0, progress=False)
  single = train.finetune(apply_fn, params0, head, inputs, labels,
                          checkpoint_dir=str(tmp_path / "single"), **kw)
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  sharded = train.finetune(apply_fn, params0, head, inputs, labels, mesh=mesh, rules=RULES,
                           checkpoint_dir=str(tmp_path / "sharded"), **kw)
  _close(sharded, single)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  # A finished sharded run is restored into its shardings, not retrained.
  again = train.finetune(apply_fn, params0, head, inputs, labels, mesh=mesh, rules=RULES,
                         checkpoint_dir=str(tmp_path / "sharded"), **kw)
  jax.tree.map(lambda a, b: (np.testing.assert_array_equal(a, b),
                             a.sharding == b.sharding or pytest.fail("sharding changed")),
               sharded, again)


def test_default_axes_for_plain_params_and_fallback_batch_spec():
  params = {"w": jnp.zeros((512, 1024)), "b": jnp.zeros((1024,))}
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  axes = train.default_param_axes(params, mesh)
  assert axes == {"w": P(None, "fsdp"), "b": P(None)}  # Only leaves >= 1 MiB are split.
  optimizer = train.make_optimizer(_config())
  sh = train.train_shardings(optimizer, params, mesh, rules=[("fsdp", "fsdp")])
  assert sh.params["w"].spec == P(None, "fsdp") and sh.batch.spec == P(("data", "fsdp"))
  assert sh.state.step == NamedSharding(mesh, P())


def test_global_batch_equals_host_batch():
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  batch = {"x": np.arange(16 * 3).reshape(16, 3), "y": np.arange(16)}
  out = train.global_batch(batch, NamedSharding(mesh, P("data")))
  np.testing.assert_array_equal(out["x"], batch["x"])
  np.testing.assert_array_equal(out["y"], batch["y"])
  assert out["x"].sharding.spec == P("data")
