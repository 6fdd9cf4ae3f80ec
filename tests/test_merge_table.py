"""The merge-table pipeline: config presets, grid and table helpers, and a tiny end-to-end run that resumes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import merge_table as merge_table_config
from configs import reproduce as reproduce_config
from research import merge_table


@pytest.mark.parametrize("preset", ["tiny", "quick", "full"])
def test_presets_derive_from_the_main_job(preset):
  config = merge_table_config.get_config(preset)
  main = reproduce_config.get_config(preset)
  assert config.train.to_dict() == main.train.to_dict()
  assert config.model.to_dict() == main.model.to_dict()
  assert config.reproduce_workdir == main.workdir
  assert set(config.data.tasks) <= set(main.data.tasks)
  assert config.workdir == ("results/merge_table" if preset == "quick"
                            else f"results/merge_table-{preset}")
  # Every grid names a method and a valid hyper-parameter of it.
  from research.merging import registry
  for name, grid in config.merge.grids.items():
    assert name in registry.names(), name
    for hp in grid:
      assert hp in registry.defaults(name), (name, hp)


def test_data_requirements_are_consistent():
  """Every method the table feeds data to declares it; data-free methods declare none."""
  from research import merging
  from research.merging import registry
  for name in merging.DATA_FREE:
    assert not [r for r in getattr(registry._factory(name), "requires", ()) if r != "key"], name
  assert registry._factory("doge").requires == ()
  for name in merge_table.NEEDS:
    assert name in merging.METHODS, name
    assert registry._factory(name).requires, name
  assert set(merge_table.ROUTED) <= set(merge_table.NEEDS)
  assert all(merge_table.feedable(n) for n in (*merging.DATA_FREE, *merge_table.NEEDS))


def test_default_methods_skip_what_the_table_cannot_feed():
  from research.merging import registry
  config = merge_table_config.get_config("quick")
  chosen = merge_table._methods(config)
  assert set(chosen) == {n for n in registry.names() if merge_table.feedable(n)}
  assert "twin" in chosen and "doge" in chosen
  unfed = [n for n in registry.names() if not merge_table.feedable(n)]
  if unfed:   # e.g. LoRA-only methods: refused when named explicitly
    with config.unlocked():
      config.merge.methods = (unfed[0],)
    with pytest.raises(ValueError, match="does not build"):
      merge_table._methods(config)


def _toy_routed_case():
  """A tiny non-linear 'encoder' apply_fn(params, ids, mask) and twin coeffs for it."""
  from types import SimpleNamespace
  from research.merging.twin import twin
  rng = np.random.default_rng(0)
  params0 = {"emb": rng.standard_normal((10, 4)).astype(np.float32),
             "w": rng.standard_normal((4, 3)).astype(np.float32)}

  def apply_fn(params, ids, mask):
    h = jnp.tanh(params["emb"][ids] @ params["w"]) * mask[..., None]
    return h.sum(1) / mask.sum(1, keepdims=True)

  stacked = jax.tree.map(lambda p: rng.standard_normal((2,) + p.shape).astype(np.float32) * 0.3,
                         params0)
  feats = rng.standard_normal((8, 5)).astype(np.float32)
  coeffs = twin(rank=2, router_steps=2).init(stacked, features=feats,
                                             task_ids=np.arange(8) % 2, key=jax.random.key(0))
  ids = rng.integers(0, 10, (5, 6)).astype(np.int32)
  mask = (np.arange(6)[None] < np.array([[6], [3], [1], [4], [2]])).astype(np.int32)
  labeled = SimpleNamespace(inputs={"input_ids": ids, "attention_mask": mask})
  weights = rng.dirichlet(np.ones(2), 5).astype(np.float32)
  return SimpleNamespace(apply_fn=apply_fn, params0=params0), coeffs, weights, labeled


@pytest.mark.parametrize("mode", ["standard", "linear"])
def test_routed_embeddings_are_per_input(mode):
  from research import tangent, task_vectors
  from research.merging.twin import twin
  data, coeffs, weights, labeled = _toy_routed_case()
  ids, mask = labeled.inputs["input_ids"], labeled.inputs["attention_mask"]
  got = merge_table._routed_embeddings(mode, data, coeffs, weights, labeled, chunk=2)
  assert got.shape == (5, 3)
  for n in range(5):
    params = task_vectors.apply(data.params0, twin.compose(coeffs, weights[n]))
    if mode == "standard":
      want = data.apply_fn(params, ids[n:n + 1], mask[n:n + 1])[0]
    else:   # the tangent model, written out: f0 + J (params - params0)
      want = tangent.linearize(data.apply_fn)(params, data.params0, ids[n:n + 1],
                                              mask[n:n + 1])[0]
    np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6)


def test_unknown_preset_and_arg_raise():
  with pytest.raises(ValueError, match="Unknown preset"):
    merge_table_config.get_config("huge")
  with pytest.raises(ValueError, match="Unknown config arg"):
    merge_table_config.get_config("quick,sed=1")


def test_grid_points_and_kernels_only():
  assert merge_table.grid_points(None) == [{}]
  assert merge_table.grid_points({"b": (1, 2), "a": 0.5}) == [{"a": 0.5, "b": 1},
                                                             {"a": 0.5, "b": 2}]
  stacked = {"dense": {"kernel": np.ones((2, 3, 4), np.float32),
                       "bias": np.ones((2, 4), np.float32)}}
  m = merge_table.build_method("task_arithmetic", {"scale": 0.5}, kernels_only=True)
  out = m.apply(m.init(stacked), stacked)
  np.testing.assert_array_equal(out["dense"]["kernel"], np.ones((3, 4)))
  np.testing.assert_array_equal(out["dense"]["bias"], np.zeros(4))


def test_format_table_hand_case():
  row = lambda a, n, hp: {"absolute_avg": a, "normalized_avg": n, "per_task": {},
                          "hparams": hp, "seconds": 2.0}
  results = {"ties": {"standard": row(0.5, 0.6, {"density": 0.2, "scaling": 0.4})},
             "zeroshot": {"standard": row(0.3, 0.4, {})},
             "task_arithmetic": {"standard": row(0.45, 0.55, {"scaling": 0.3})}}
  table = merge_table.format_table(results, ["standard", "linear"]).splitlines()
  assert table[0] == "| method | standard abs. | standard norm. | linear abs. | linear norm. | seconds |"
  assert [line.split(" |")[0] for line in table[2:5]] == ["| zeroshot", "| task_arithmetic",
                                                          "| ties"]
  assert table[4] == "| ties | 50.0 | 60.0 |  |  | 2 |"
  assert "| ties | density=0.2, scaling=0.4 |  |" in table


@pytest.mark.slow
def test_tiny_run_end_to_end_and_resume(tmp_path):
  config = merge_table_config.get_config("tiny")
  with config.unlocked():
    config.reproduce_workdir = str(tmp_path / "reproduce")
    config.merge.methods = ("task_arithmetic", "adamerging_task", "ties", "twin", "lora_lego",
                            "scalearn")
    config.merge.lora_methods = ("task_arithmetic", "lora_lego", "scalearn")
  workdir = str(tmp_path / "table")
  os.makedirs(workdir)
  # A row already present is kept as it is (resume): here a stand-in for ties.
  stand_in = {"absolute_avg": 0.0, "normalized_avg": 0.0, "per_task": {}, "hparams": {},
              "seconds": 0.0}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"ties": {"standard": stand_in, "linear": stand_in}}, f)

  out = merge_table.run(config, workdir)
  with open(out["results_path"]) as f:
    results = json.load(f)
  assert results["ties"] == {"standard": stand_in, "linear": stand_in}
  # LoRA task vectors (fine-tuned for the table): the LoRA methods run there, and only there.
  for name in ("zeroshot", "single_task", "task_arithmetic", "lora_lego", "scalearn"):
    assert 0.0 <= results[name]["lora"]["absolute_avg"] <= 1.0, name
  assert set(results["lora_lego"]) == set(results["scalearn"]) == {"lora"}
  assert results["lora_lego"]["lora"]["hparams"]["k"] in config.merge.grids.lora_lego.k
  tasks = list(config.data.tasks)
  for name in ("zeroshot", "single_task", "task_arithmetic", "adamerging_task", "twin"):
    for mode in ("standard", "linear"):
      row = results[name][mode]
      assert set(row) >= {"absolute_avg", "normalized_avg", "per_task", "hparams", "seconds"}
      assert set(row["per_task"]) == set(tasks)
      assert 0.0 <= row["absolute_avg"] <= 1.0
      np.testing.assert_allclose(
          row["normalized_avg"], np.mean([row["per_task"][t]["normalized"] for t in tasks]))
  assert results["single_task"]["standard"]["normalized_avg"] == pytest.approx(1.0)
  assert results["task_arithmetic"]["standard"]["hparams"]["scaling"] in config.merge.alphas
  assert results["adamerging_task"]["linear"]["hparams"] == {
      "lr": config.merge.grids.adamerging_task.lr[0],
      "steps": config.merge.grids.adamerging_task.steps[0], "scaling": 1.0}
  for mode in ("standard", "linear"):
    row = results["twin"][mode]
    assert row["routing"] == "per_input" and row["hparams"]["scaling"] == 1.0
    assert 0.0 <= row["router_accuracy"]["test"] <= 1.0
  table = open(os.path.join(workdir, "table.md")).read()
  assert "| adamerging_task |" in table and "| single_task | " in table
  assert os.path.getsize(out["figure"]) > 1000

  # Another setup in the same workdir is refused.
  with config.unlocked():
    config.merge.n_test = 3
  with pytest.raises(ValueError, match="n_test"):
    merge_table.run(config, workdir)
  with config.unlocked():
    config.merge.methods = ("no_such_method",)
  with pytest.raises(ValueError, match="no_such_method"):
    merge_table.run(config, str(tmp_path / "other"))
