"""Config parsing and every experiment config's get_config."""
import importlib

import pytest

from configs import common
from research.data import tasks


def test_parse_arg_types_and_positional():
  arg = common.parse_arg("full,seed=3,runlocal", preset="quick", seed=0, runlocal=False)
  assert (arg.preset, arg.seed, arg.runlocal) == ("full", 3, True)


def test_parse_arg_defaults_when_empty():
  arg = common.parse_arg(None, preset="quick", lr=0.5)
  assert (arg.preset, arg.lr) == ("quick", 0.5)


def test_parse_arg_rejects_unknown_key():
  with pytest.raises(ValueError, match="Unknown config arg 'sed'.*known args"):
    common.parse_arg("sed=3", preset="quick", seed=0)


def test_parse_arg_rejects_bad_type():
  with pytest.raises(ValueError, match="'seed' expects int"):
    common.parse_arg("seed=x", preset="quick", seed=0)


@pytest.mark.parametrize("preset", ["tiny", "quick", "full"])
def test_reproduce_presets(preset):
  config = importlib.import_module("configs.reproduce").get_config(preset)
  assert config.workdir == f"results/reproduce-{preset}"
  assert config.train.weight_decay == 0.1 and config.train.clip_norm == 1.0
  assert config.eval.num_alphas == 21 and config.eval.control_ratio == 0.95
  assert config.data.control_task not in config.data.tasks
  # Every task has the examples the preset asks for (the Debian data of `make data`).
  d = config.data
  for name in (*d.tasks, d.control_task):
    available = len(tasks.pool(name)[0])
    assert d.n_train + d.n_val + d.n_test <= available, (preset, name, available)


def test_reproduce_rejects_unknown_preset():
  with pytest.raises(ValueError, match="Unknown preset 'huge'"):
    importlib.import_module("configs.reproduce").get_config("huge")


def test_reproduce_task_subset():
  config = importlib.import_module("configs.reproduce").get_config("tiny,tasks=pos+language")
  assert config.data.tasks == ("pos", "language")
  assert config.eval.disentangle_pairs == (("pos", "language"),)
