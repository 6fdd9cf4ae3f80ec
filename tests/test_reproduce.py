"""Smoke test of the main job end to end on a tiny preset (2 tasks, 2 steps)."""
import json
import os

import jax
import numpy as np
import pytest
from absl import flags

from configs import reproduce as reproduce_config
from experiments import reproduce as entry
from research import reproduce
from research import task_vectors
from research import train

CONFIG_FILE = os.path.join(os.path.dirname(reproduce_config.__file__), "reproduce.py")


ARG = "tiny,tasks=topic+language"


@pytest.mark.slow
def test_pipeline_end_to_end_then_resume_through_entry_point(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # A relative workdir, as configs give it.
  results = reproduce.run(reproduce_config.get_config(ARG), "run")
  with open("run/results.json") as f:
    saved = json.load(f)
  assert saved["tasks"] == ["topic", "language"] and saved["control_task"] == "noun_category"
  for key in ("zeroshot", "single_task", "task_addition", "task_negation", "disentanglement"):
    assert key in saved, key
  assert set(saved["single_task"]) == {"standard", "linear", "posthoc"}
  for mode, r in saved["task_addition"].items():
    assert 0.0 <= r["alpha"] <= 1.0, mode
    assert set(r["absolute"]) == {"topic", "language", "avg"}
  for mode, r in saved["task_negation"].items():
    assert set(r["target"]) == set(r["control"]) == {"topic", "language", "avg"}
  xi = saved["disentanglement"]["linear"]["pairs"]["topic+language"]["xi"]
  assert len(xi) == 3 and xi[1][1] == 0.0  # alpha = (0, 0) is the pre-trained model for both.
  assert os.path.getsize("run/disentanglement.png") > 0 and os.path.getsize("run/accuracy.png") > 0
  assert results["results_path"] == os.path.join("run", "results.json")

  # A rerun through the entry point restores every fine-tuned model instead of training.
  monkeypatch.setattr(train, "make_train_step", lambda *a, **k: pytest.fail("retrained"))
  # Parse only this entry point's flags: other modules' required flags (from
  # other tests in this process) must not be validated here.
  flags.FLAGS["config"].parse(f"{CONFIG_FILE}:{ARG}")
  flags.FLAGS["workdir"].parse("run")
  flags.FLAGS.mark_as_parsed()
  entry.main([])
  out = capsys.readouterr().out
  assert "Task addition" in out and "Task negation" in out and "run/results.json" in out
  with open("run/results.json") as f:
    again = json.load(f)
  assert again["task_addition"] == saved["task_addition"]
  assert again["task_negation"] == saved["task_negation"]


def test_finetune_all_over_a_mesh_matches_one_device(tmp_path):
  """`config.mesh.mesh_shape` shards fine-tuning (data x FSDP on 8 fake devices); same task vectors."""
  config = reproduce_config.get_config("tiny,tasks=topic")
  config.train.modes = ("linear",)
  apply_fn, params0, sets = reproduce.prepare(config)
  single = reproduce.finetune_all(config, str(tmp_path / "single"), apply_fn, params0, sets)
  config.mesh.mesh_shape = (2, -1)
  sharded = reproduce.finetune_all(config, str(tmp_path / "sharded"), apply_fn, params0, sets)
  a, b = single["linear"]["topic"], sharded["linear"]["topic"]
  assert task_vectors.norm(a) > 0
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_finetune_all_lora_mode_gives_low_rank_task_vectors(tmp_path):
  config = reproduce_config.get_config("tiny,tasks=topic")
  config.train.modes = ("lora",)
  apply_fn, params0, sets = reproduce.prepare(config)
  factors = {}
  taus = reproduce.finetune_all(config, str(tmp_path), apply_fn, params0, sets, lora_factors=factors)
  tau = taus["lora"]["topic"]
  kernel = np.asarray(tau["layers"][0]["attention"]["query"]["kernel"])
  assert np.abs(kernel).max() > 0
  assert np.linalg.matrix_rank(kernel, tol=1e-7) <= config.train.lora_rank
  # Embeddings are not adapted; the factors come back too.
  assert not np.any(np.asarray(tau["embeddings"]["word"]["embedding"]))
  assert set(factors) == {"topic"}
