"""Tests for research.checkpoints: round trips, sharded restore, keep-N, atomicity, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research import checkpoints, sharding


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((2, 4), ("data", "fsdp"))


def _tree():
  return {"enc": {"kernel": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
                  "bias": jnp.linspace(-1, 1, 16).astype(jnp.bfloat16)},
          "count": jnp.int32(7)}


META = {"task": "mnli", "mode": "linear", "alpha": 0.35, "tasks": ["a", "b"], "nested": {"k": 1}}


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_values_dtypes_metadata(tmp_path):
  tree = _tree()
  with checkpoints.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(10, tree, META)
    ckpt.wait()
    assert ckpt.latest_step() == 10
    restored, meta = ckpt.restore()
  _assert_same(restored, tree)
  assert meta == META
  # One-shot read-only restore, with an abstract target.
  restored, meta = checkpoints.restore(tmp_path / "ckpt", 10, target=jax.eval_shape(_tree))
  _assert_same(restored, tree)
  assert meta == META


def test_sharded_restore_lands_in_target_shardings(tmp_path, mesh):
  tree = _tree()
  saved_sh = {"enc": {"kernel": NamedSharding(mesh, P("data", "fsdp")), "bias": NamedSharding(mesh, P())},
              "count": NamedSharding(mesh, P())}
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, sharding.put(tree, saved_sh), {"note": "sharded"})
  target_sh = {"enc": {"kernel": NamedSharding(mesh, P(None, ("data", "fsdp"))),
                       "bias": NamedSharding(mesh, P("fsdp"))},
               "count": NamedSharding(mesh, P())}
  target = sharding.abstract_with_sharding(jax.eval_shape(_tree), target_sh)
  restored, meta = checkpoints.restore(tmp_path, target=target)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target_sh)):
    assert x.sharding == s
  kernel = restored["enc"]["kernel"]
  assert all(sh.data.shape == (8, 2) for sh in kernel.addressable_shards)
  _assert_same(restored, tree)
  assert meta == {"note": "sharded"}


def test_nnx_state_round_trip(tmp_path, mesh):
  from flax import nnx

  _, params = nnx.split(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Param)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, params)
  target = sharding.abstract_with_sharding(
      params, jax.tree.map(lambda _: NamedSharding(mesh, P()), params))
  restored, meta = checkpoints.restore(tmp_path, 0, target)
  assert type(restored) is type(params) and meta == {}
  _assert_same(restored, params)


def test_latest_step_and_keep_n(tmp_path):
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
      ckpt.save(step, {"x": jnp.full((2,), step)}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
  restored, meta = checkpoints.restore(tmp_path, 2)
  assert meta == {"step": 2} and np.asarray(restored["x"]).tolist() == [2, 2]


def test_incomplete_checkpoints_are_ignored(tmp_path):
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"x": jnp.ones(3)}, {"ok": True})
  # A preempted save (Orbax's temporary directory) and an interrupted copy.
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"\0" * 10)
  (tmp_path / "3" / "state").mkdir(parents=True)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    restored, meta = ckpt.restore()
    with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[1\]"):
      ckpt.restore(3)
  assert meta == {"ok": True}
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.ones(3))


def test_a_checkpoint_written_later_is_seen_after_reload(tmp_path):
  with checkpoints.Checkpointer(tmp_path) as reader, checkpoints.Checkpointer(tmp_path) as writer:
    writer.save(5, {"x": jnp.zeros(2)})
    writer.wait()
    assert reader.latest_step() is None
    assert reader.latest_step(reload=True) == 5


def test_missing_directory_and_step_errors(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
    checkpoints.restore(missing)
  assert not missing.exists()
  with checkpoints.Checkpointer(tmp_path, read_only=True) as ckpt:
    with pytest.raises(PermissionError, match="read_only"):
      ckpt.save(0, {"x": jnp.ones(1)})
  with checkpoints.Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="No complete checkpoint in .*empty"):
      ckpt.restore()
    ckpt.save(4, {"x": jnp.ones(1)})
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available steps: \[4\]"):
      ckpt.restore(7)


def test_saving_an_existing_step_raises_and_keeps_it(tmp_path):
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, {"x": jnp.ones(2)}, {"v": 1})
    with pytest.raises(FileExistsError, match="step 3 already exists"):
      ckpt.save(3, {"x": jnp.zeros(2)}, {"v": 2})
  with checkpoints.Checkpointer(tmp_path) as ckpt:   # also from a fresh manager
    with pytest.raises(FileExistsError):
      ckpt.save(3, {"x": jnp.zeros(2)}, {"v": 2})
  restored, meta = checkpoints.restore(tmp_path, 3)
  assert meta == {"v": 1}
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.ones(2))


def test_metadata_must_be_json(tmp_path):
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(0, {"x": jnp.ones(1)}, {"bad": object()})


def test_restore_leaves_reads_a_subset(tmp_path, mesh):
  tree = {**_tree(), "layers": [jnp.ones(2), jnp.zeros(3)]}
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, tree)
    ckpt.wait()
    paths = ckpt.leaf_paths()
  assert set(paths) == {"enc/kernel", "enc/bias", "count", "layers/0", "layers/1"}
  assert paths["enc/kernel"].shape == (8, 16) and paths["enc/bias"].dtype == jnp.bfloat16
  out = checkpoints.restore_leaves(tmp_path, 2, ["enc/bias"])
  assert list(out) == ["enc/bias"] and isinstance(out["enc/bias"], np.ndarray)
  np.testing.assert_array_equal(out["enc/bias"], np.asarray(tree["enc"]["bias"]))
  target = NamedSharding(mesh, P("data", "fsdp"))
  out = checkpoints.restore_leaves(tmp_path, None, ["enc/kernel", "count"], {"enc/kernel": target})
  assert out["enc/kernel"].sharding == target
  np.testing.assert_array_equal(np.asarray(out["enc/kernel"]), np.asarray(tree["enc"]["kernel"]))
  assert int(out["count"]) == 7
  out = checkpoints.restore_leaves(tmp_path, 2, ["layers/1"])
  np.testing.assert_array_equal(out["layers/1"], np.zeros(3))
  with pytest.raises(KeyError, match="enc/kernal"):
    checkpoints.restore_leaves(tmp_path, 2, ["enc/kernal"])


def test_relative_directory_round_trip(tmp_path, monkeypatch):
  """Configs give workdirs relative to the repo; Orbax itself wants absolute paths."""
  monkeypatch.chdir(tmp_path)
  tree = {"w": np.arange(4.0, dtype=np.float32)}
  with checkpoints.Checkpointer("rel/ckpt") as ckpt:
    ckpt.save(1, tree, {"note": "relative"})
  restored, meta = checkpoints.restore("rel/ckpt", target=tree)
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert meta == {"note": "relative"}
  assert checkpoints.restore_leaves("rel/ckpt", 1, ["w"])["w"].tolist() == [0, 1, 2, 3]
