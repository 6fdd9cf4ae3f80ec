"""The analyses pipeline: config presets, reuse of the main job's results, and a tiny end-to-end run."""
import json
import os

import numpy as np
import pytest

from configs import analysis as analysis_config
from configs import reproduce as reproduce_config
from research import analysis
from research import evaluate
from research import reproduce


@pytest.mark.parametrize("preset", ["tiny", "quick", "full"])
def test_presets_derive_from_the_main_job(preset):
  config = analysis_config.get_config(preset)
  main = reproduce_config.get_config(preset)
  # Same model and recipe, so the main job's checkpoints are the right ones.
  assert config.train.to_dict() == main.train.to_dict()
  assert config.model.to_dict() == main.model.to_dict()
  assert config.reproduce_workdir == main.workdir
  expected = "results/analysis" if preset == "quick" else f"results/analysis-{preset}"
  assert config.workdir == expected
  assert set(config.data.tasks) <= set(main.data.tasks)
  assert config.random_init.lr == main.train.lr
  pair_tasks = {t for pair in config.eval.disentangle_pairs for t in pair}
  assert pair_tasks <= set(config.data.tasks)


def test_quick_keeps_the_main_task_list_and_tiny_keeps_its_pair():
  quick = analysis_config.get_config("quick")
  assert quick.data.tasks == reproduce_config.get_config("quick").data.tasks
  tiny = analysis_config.get_config("tiny")
  assert tiny.data.tasks == tuple(reproduce_config.get_config("tiny").eval.disentangle_pairs[0])


def test_unknown_preset_and_arg_raise():
  with pytest.raises(ValueError, match="Unknown preset 'huge'"):
    analysis_config.get_config("huge")
  with pytest.raises(ValueError, match="Unknown config arg"):
    analysis_config.get_config("quick,sed=1")


def test_with_copies_and_leaves_the_original_alone():
  config = analysis_config.get_config("tiny")
  config.lock()
  new = analysis._with(config, **{"data.tasks": ("topic",), "train.lr": 0.5})
  assert new.data.tasks == ("topic",) and new.train.lr == 0.5
  assert config.data.tasks != ("topic",) and config.train.lr != 0.5


def test_summarize_kernel_regime_hand_case():
  rows = analysis.summarize_kernel_regime({
      "a": {"zeroshot": 0.5, "standard": 0.9, "posthoc": 0.7, "linear": 0.8},
      "b": {"zeroshot": 0.3, "standard": 0.6, "posthoc": 0.6, "linear": 0.7}})
  assert rows["a"]["nonlinear_advantage"] == pytest.approx(0.2)
  assert rows["a"]["linear_gap"] == pytest.approx(0.1)
  assert rows["b"]["linear_gap"] == pytest.approx(-0.1)
  assert rows["avg"]["standard"] == pytest.approx(0.75)
  assert rows["avg"]["nonlinear_advantage"] == pytest.approx(0.1)


def test_head_similarity_hand_case():
  head = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  labeled = evaluate.LabeledSet({}, np.zeros(0), head)
  # Pairwise cosines: 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2 / 3.
  assert analysis.head_similarity({"t": {"test": labeled}})["t"] == pytest.approx(np.sqrt(2) / 3)


def _fake_main(config, tmp_path, **changes):
  grid = reproduce.disentangle_grid(config).tolist()
  xi = np.zeros((len(grid), len(grid))).tolist()
  pair = "+".join(config.eval.disentangle_pairs[0])
  main = {"preset": config.preset, "seed": config.seed, "tasks": list(config.data.tasks),
          "zeroshot": {t: 0.1 for t in config.data.tasks},
          "single_task": {m: {t: 0.5 for t in config.data.tasks}
                          for m in analysis.KERNEL_REGIME_MODES},
          "disentanglement": {m: {"alphas": grid, "pairs": {pair: {"xi": xi, "mean": 0.0}}}
                              for m in config.train.modes}}
  main.update(changes)
  with open(tmp_path / "results.json", "w") as f:
    json.dump(main, f)


def test_main_results_are_reused_only_when_compatible(tmp_path):
  config = analysis._with(analysis_config.get_config("tiny"),
                          reproduce_workdir=str(tmp_path))
  assert analysis.load_main_results(config) is None  # No results.json yet.
  _fake_main(config, tmp_path)
  main = analysis.load_main_results(config)
  regime = analysis._main_kernel_regime(main, config)
  assert set(regime) == set(config.data.tasks)
  assert regime[config.data.tasks[0]] == {"zeroshot": 0.1, "standard": 0.5, "posthoc": 0.5,
                                          "linear": 0.5}
  assert set(analysis._main_disentanglement(main, config)) == set(config.train.modes)
  # Another alpha grid: the xi grids are recomputed, the accuracies still reused.
  other = analysis._with(config, **{"eval.disentangle_grid": 5})
  assert analysis._main_disentanglement(main, other) is None
  _fake_main(config, tmp_path, preset="quick")
  assert analysis.load_main_results(config) is None
  _fake_main(config, tmp_path)
  off = analysis._with(config, **{"kernel_regime.reuse_main_results": False})
  assert analysis.load_main_results(off) is None


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  """The tiny preset: every section filled, figures written, kernels cached for a rerun."""
  config = analysis._with(analysis_config.get_config("tiny"),
                          workdir=str(tmp_path / "analysis"),
                          reproduce_workdir=str(tmp_path / "reproduce"))
  try:
    results = analysis.run(config, config.workdir)
  except FileNotFoundError as e:  # Debian data packages missing: `make data`.
    pytest.skip(f"task data not installed: {e}")
  with open(os.path.join(config.workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["tasks"] == list(config.data.tasks)

  n = saved["ntk"]
  num_tasks = len(config.data.tasks)
  for model in config.ntk.models:
    for kind in ("raw", "cosine"):
      energy = np.asarray(n[model][kind]["energy"])
      assert energy.shape == (config.ntk.top_k, num_tasks)
      np.testing.assert_allclose(energy.sum(-1), 1.0, atol=1e-9)
      assert 1 / num_tasks - 1e-9 <= n[model][kind]["localization"] <= 1 + 1e-9
      assert np.all(np.diff(n[model][kind]["eigenvalues"]) <= 1e-9)
  assert n["pretrained"]["method"] == "jacobian"

  regime = saved["kernel_regime"]
  assert set(regime) == set(config.data.tasks) | {"avg"}
  for row in regime.values():
    for mode in ("zeroshot", *analysis.KERNEL_REGIME_MODES):
      assert 0.0 <= row[mode] <= 1.0

  pair = "+".join(config.eval.disentangle_pairs[0])
  for model in ("pretrained", "random_init"):
    for mode in config.train.modes:
      xi = np.asarray(saved[model]["disentanglement"][mode]["pairs"][pair]["xi"])
      assert xi.shape == (config.eval.disentangle_grid,) * 2
      assert np.all((0 <= xi) & (xi <= 2))
  assert os.path.isdir(os.path.join(config.workdir, "random_init", "checkpoints", "linear"))
  for path in results["figures"].values():
    assert os.path.getsize(path) > 0

  # A rerun reads the cached kernels instead of recomputing them.
  kernel_file = os.path.join(config.workdir, "ntk", "pretrained.npz")
  before = os.path.getmtime(kernel_file)
  apply_fn, params0, sets = reproduce.prepare(config)
  again = analysis.ntk_analysis(analysis._with(config, **{"ntk.models": ("pretrained",)}),
                                config.workdir, {"pretrained": (apply_fn, params0)}, sets)
  assert os.path.getmtime(kernel_file) == before
  np.testing.assert_allclose(again["pretrained"]["raw"]["eigenvalues"],
                             n["pretrained"]["raw"]["eigenvalues"])
