"""Hyper-parameter sweeps: lists of config-leaf overrides built with a small algebra (Scenic style).

A config file may define `get_sweep(h)` beside `get_config`; `h` is this
module, and the function returns the grid as a list of *points*, each a dict
`{'train.lr': 1e-5, 'seed': 0}` of overrides of config leaves (a leading
`config.` is accepted and dropped, as in Scenic's `get_hyper`)::

    def get_sweep(h):
      return h.product(h.sweep('train.lr', [1e-5, 1e-4]),
                       h.zip(h.sweep('seed', [0, 1]), h.sweep('data.n_train', [512, 1024])))

    >>> product(sweep('a', [1, 2]), sweep('b', ['x']))
    [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]

`python -m launch.sweep` turns every point into one command line
(`to_flags`: `--config.train.lr=1e-05`) with its own workdir (`name`).
Values are plain data (bool, int, float, str, tuples of those) so that every
point serialises and survives the command line; `validate` checks each key
against the config before anything runs.
"""
from __future__ import annotations

import builtins
import copy
import difflib
import itertools
import re
from typing import Any, Iterable, Sequence

import ml_collections

Point = dict[str, Any]
Sweep = list[Point]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SCALARS = (bool, int, float, str)


def _key(key: str) -> str:
  if not isinstance(key, str) or not _KEY.match(key):
    raise ValueError(f"Sweep key {key!r} must be a dotted config path such as 'train.lr'.")
  return key[len("config."):] if key.startswith("config.") else key


def _check_value(key: str, value: Any) -> Any:
  ok = isinstance(value, _SCALARS) or (
      isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value))
  if not ok:
    raise TypeError(f"Sweep value {value!r} for {key!r} must be a bool, int, float, str or a "
                    "tuple of those (plain data that survives the command line).")
  return value


def sweep(key: str, values: Iterable[Any]) -> Sweep:
  """One point per value of the config leaf `key`."""
  key = _key(key)
  values = list(values)
  if not values:
    raise ValueError(f"sweep({key!r}, ...) got no values.")
  return [{key: _check_value(key, v)} for v in values]


def fixed(key: str, value: Any) -> Sweep:
  """A single point setting `key` (`product` it with a sweep to pin a leaf)."""
  return sweep(key, [value])


def _sweeps(args: Sequence[Any], name: str) -> list[Sweep]:
  # Scenic passes one list of sweeps (`h.product([a, b])`); plain varargs work too.
  if len(args) == 1 and isinstance(args[0], (list, tuple)) and args[0] and all(
      isinstance(s, list) for s in args[0]):
    args = tuple(args[0])
  for i, s in enumerate(args):
    if not isinstance(s, list) or not all(isinstance(p, dict) for p in s):
      raise TypeError(f"{name}: argument #{i} is {type(s).__name__}, not a sweep (a list of "
                      "dicts from sweep / product / zip / chain).")
  return list(args)


def _merge(points: Sequence[Point], name: str) -> Point:
  out: Point = {}
  for p in points:
    shared = sorted(set(out) & set(p))
    if shared:
      raise ValueError(f"{name}: key(s) {shared} are set by more than one of its sweeps; "
                       "each key may appear in only one factor.")
    out.update(p)
  return out


def product(*sweeps: Any) -> Sweep:
  """The Cartesian product; the first sweep varies slowest."""
  sweeps = _sweeps(sweeps, "product")
  return [_merge(points, "product") for points in itertools.product(*sweeps)]


def zip(*sweeps: Any) -> Sweep:  # pylint: disable=redefined-builtin
  """Points taken in lockstep; the sweeps must have equal lengths."""
  sweeps = _sweeps(sweeps, "zip")
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip: sweeps have different lengths {lengths}; zip needs equal lengths "
                     "(use product for all combinations).")
  return [_merge(points, "zip") for points in builtins.zip(*sweeps)]


def chain(*sweeps: Any) -> Sweep:
  """The points of every sweep one after the other."""
  return [dict(p) for s in _sweeps(sweeps, "chain") for p in s]


# ---------------------------------------------------------------------------
# Points against configs and command lines.


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys += _leaf_keys(v, f"{prefix}{k}.")
    else:
      keys.append(f"{prefix}{k}")
  return keys


def validate(points: Sweep, config: ml_collections.ConfigDict) -> None:
  """Raises if a point names a key that is not a leaf of `config`, or a value of the wrong type."""
  leaves = set(_leaf_keys(config))
  for i, point in enumerate(points):
    for key in point:
      if key not in leaves:
        close = difflib.get_close_matches(key, sorted(leaves), n=3)
        raise KeyError(f"Sweep point #{i} sets {key!r}, which is not a leaf of the config"
                       + (f"; did you mean {close}?" if close else "; see the config's leaves."))
    apply(config, point)


def apply(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's overrides (ml_collections type-checks each one)."""
  config = copy.deepcopy(config)
  for key, value in point.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f"Sweep override {key}={value!r}: {e}") from None
  return config


def format_value(value: Any) -> str:
  """A value as `ml_collections.config_flags` parses it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def to_flags(point: Point, prefix: str = "config") -> list[str]:
  """`['--config.train.lr=1e-05', '--config.seed=0']` (unquoted argv entries)."""
  return [f"--{prefix}.{k}={format_value(v)}" for k, v in point.items()]


def name(point: Point) -> str:
  """A short, filesystem-safe, deterministic name: 'lr=1e-05_seed=0'.

  Keys are shortened to their last component unless two keys share it. The
  name depends only on the point, so a rerun finds the workdirs of finished
  points whatever the order of the sweep.
  """
  if not point:
    return "default"
  last = [k.rsplit(".", 1)[-1] for k in point]
  parts = []
  for key, short in builtins.zip(point, last):
    label = short if last.count(short) == 1 else key
    value = format_value(point[key])
    parts.append(f"{label}={value}")
  return re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-")
