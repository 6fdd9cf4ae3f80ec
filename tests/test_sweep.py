"""The sweep algebra of research.sweep: hand-computed grids, errors, and a round trip through flags."""
import pathlib

import ml_collections
import pytest
from absl import flags
from hypothesis import given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from configs import reproduce
from research import sweep as h

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sweep_product_zip_chain_by_hand():
  lr, seed = h.sweep("train.lr", [0.1, 0.2]), h.sweep("config.seed", [0, 1, 2])
  assert lr == [{"train.lr": 0.1}, {"train.lr": 0.2}]
  assert seed[0] == {"seed": 0}  # Scenic's 'config.' prefix is dropped.
  grid = h.product(lr, seed)
  assert len(grid) == 6
  assert grid[:3] == [{"train.lr": 0.1, "seed": s} for s in (0, 1, 2)]  # First varies slowest.
  assert h.product([lr, seed]) == grid  # Scenic's list form.
  assert h.zip(h.sweep("a", [1, 2]), h.sweep("b", ["x", "y"])) == [{"a": 1, "b": "x"},
                                                                    {"a": 2, "b": "y"}]
  assert h.chain(lr, h.fixed("seed", 7)) == [{"train.lr": 0.1}, {"train.lr": 0.2}, {"seed": 7}]
  nested = h.chain(h.product(h.fixed("m", "ties"), h.sweep("d", [0.1, 0.2])),
                   h.fixed("m", "average"))
  assert nested == [{"m": "ties", "d": 0.1}, {"m": "ties", "d": 0.2}, {"m": "average"}]


@pytest.mark.parametrize("build,error,match", [
    (lambda: h.product(h.sweep("a", [1]), h.sweep("a", [2])), ValueError, r"\['a'\].*more than one"),
    (lambda: h.zip(h.sweep("a", [1, 2]), h.sweep("b", [1])), ValueError, r"lengths \[2, 1\]"),
    (lambda: h.sweep("a", []), ValueError, "no values"),
    (lambda: h.sweep("train lr", [1]), ValueError, "dotted config path"),
    (lambda: h.sweep("a", [[1, 2]]), TypeError, "plain data"),
    (lambda: h.sweep("a", [None]), TypeError, "plain data"),
    (lambda: h.product(h.sweep("a", [1]), {"b": 2}), TypeError, "#1 is dict"),
])
def test_bad_sweeps_raise_clear_errors(build, error, match):
  with pytest.raises(error, match=match):
    build()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(), min_size=1, max_size=4, unique=True),
       st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=4, unique=True))
def test_sizes_and_names_are_unique(xs, ys):
  a, b = h.sweep("x", xs), h.sweep("y", ys)
  grid = h.product(a, b)
  assert len(grid) == len(xs) * len(ys) and len(h.chain(a, b)) == len(xs) + len(ys)
  assert len({h.name(p) for p in grid}) == len(grid)


def test_flags_and_names():
  point = {"train.lr": 1e-05, "seed": 3, "train.modes": ("linear",), "runlocal": True}
  assert h.to_flags(point) == ["--config.train.lr=1e-05", "--config.seed=3",
                               "--config.train.modes=('linear',)", "--config.runlocal=true"]
  assert h.name({"train.lr": 1e-05, "seed": 3}) == "lr=1e-05_seed=3"
  # Keys sharing a last component keep their full path.
  assert h.name({"train.lr": 0.1, "merge.lr": 0.2}) == "train.lr=0.1_merge.lr=0.2"
  assert h.name({}) == "default"


def test_validate_names_the_unknown_key_and_the_bad_type():
  config = reproduce.get_config("tiny")
  h.validate(reproduce.get_sweep(h), config)
  with pytest.raises(KeyError, match=r"'train.lrr'.*did you mean \['train.lr'"):
    h.validate(h.sweep("train.lrr", [0.1]), config)
  with pytest.raises(KeyError, match="'train'"):  # A subtree is not a leaf.
    h.validate(h.sweep("train", [1]), config)
  with pytest.raises(TypeError, match="train.steps='many'"):
    h.validate(h.sweep("train.steps", ["many"]), config)


def test_points_round_trip_through_config_flags():
  """What launch.sweep puts on a command line is what the entry point's config becomes."""
  base = reproduce.get_config("tiny")
  for point in reproduce.get_sweep(h) + [{"train.modes": ("linear",), "data.n_train": 64}]:
    argv = ["prog", f"--config={ROOT / 'configs' / 'reproduce.py'}:tiny", *h.to_flags(point)]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    expected = h.apply(base, point)
    assert fv.config.to_dict() == expected.to_dict(), point
    for key, value in point.items():
      node = fv.config
      for part in key.split("."):
        node = node[part]
      assert node == value and type(node) is type(value), (key, node, value)


def test_apply_copies():
  base = ml_collections.ConfigDict({"train": {"lr": 0.1}, "seed": 0})
  out = h.apply(base, {"train.lr": 0.5})
  assert out.train.lr == 0.5 and base.train.lr == 0.1
