"""Expanding a config file's `get_sweep(h)` into one run (command line + workdir) per point.

A config spec is what `--config` takes everywhere: `configs/reproduce.py` or
`configs/reproduce.py:quick` (the text after the colon goes to
`get_config`). The entry point defaults to `experiments/<stem>.py`, run as
`python -m experiments.<stem>`; every run gets `--workdir=<root>/<point name>`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shlex
from typing import Any, Optional

from research import sweep as sweep_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_FILE = "results.json"
POINT_FILE = "sweep_point.json"


def shell_join(argv) -> str:
  """`shlex.join`, but `--flag='a b'` rather than `'--flag=a b'` (same meaning, easier to read)."""
  out = []
  for arg in argv:
    flag, sep, value = arg.partition("=")
    if sep and flag.startswith("--") and shlex.quote(flag) == flag:
      out.append(f"{flag}={shlex.quote(value)}" if value else arg)
    else:
      out.append(shlex.quote(arg))
  return " ".join(out)


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep: its overrides, workdir and argv (after the interpreter)."""
  index: int
  name: str
  point: dict[str, Any]
  workdir: str
  args: tuple[str, ...]

  def argv(self, python: str = "python") -> list[str]:
    return [python, *self.args]

  def command(self, python: str = "python") -> str:
    return shell_join(self.argv(python))

  def finished(self, root: os.PathLike | str = REPO_ROOT) -> bool:
    """Whether the run wrote its results (relative workdirs are under `root`)."""
    return (pathlib.Path(root) / self.workdir / RESULTS_FILE).exists()


def split_spec(spec: str) -> tuple[str, Optional[str]]:
  """'configs/x.py:quick' -> ('configs/x.py', 'quick'); the argument is optional."""
  path, sep, arg = spec.partition(".py:")
  if sep:
    return path + ".py", arg
  if not spec.endswith(".py"):
    raise ValueError(f"--config={spec!r} must name a Python config file, e.g. "
                     "configs/reproduce.py or configs/reproduce.py:quick.")
  return spec, None


def load_config_module(path: str, root: os.PathLike | str = REPO_ROOT):
  """Imports a config file by path (relative paths are under `root`)."""
  full = pathlib.Path(root) / path
  if not full.is_file():
    raise FileNotFoundError(f"Config file {full} does not exist; pass --config=configs/<name>.py.")
  module_spec = importlib.util.spec_from_file_location(f"_sweep_config_{full.stem}", full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def default_entry(config_path: str, root: os.PathLike | str = REPO_ROOT) -> str:
  """`experiments.<stem>` for `configs/<stem>.py`, if that entry point exists."""
  stem = pathlib.Path(config_path).stem
  if not (pathlib.Path(root) / "experiments" / f"{stem}.py").is_file():
    raise FileNotFoundError(f"No entry point experiments/{stem}.py for {config_path}; "
                            "pass --entry=<python module>.")
  return f"experiments.{stem}"


def default_workdir(spec: str) -> str:
  path, arg = split_spec(spec)
  suffix = f"-{arg.replace(',', '-').replace('=', '')}" if arg else ""
  return f"results/sweeps/{pathlib.Path(path).stem}{suffix}"


def expand(spec: str, *, workdir: Optional[str] = None, entry: Optional[str] = None,
           limit: int = 0, root: os.PathLike | str = REPO_ROOT) -> list[Run]:
  """The runs of the sweep that the config file at `spec` defines with `get_sweep(h)`.

  Every key is checked against `get_config(arg)` first, so a typo fails
  here rather than in the middle of a sweep. `limit` > 0 keeps the first
  `limit` points.
  """
  path, arg = split_spec(spec)
  module = load_config_module(path, root)
  if not hasattr(module, "get_sweep"):
    raise AttributeError(f"{path} defines no get_sweep(h); add one that returns e.g. "
                         "h.product(h.sweep('train.lr', [...]), h.sweep('seed', [0, 1])).")
  points = module.get_sweep(sweep_lib)
  if not isinstance(points, list) or not points:
    raise ValueError(f"{path}: get_sweep(h) returned {type(points).__name__} "
                     f"{points!r:.80}; it must return a non-empty list of points.")
  config = module.get_config(arg) if arg is not None else module.get_config()
  sweep_lib.validate(points, config)
  if limit > 0:
    points = points[:limit]
  names = [sweep_lib.name(p) for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"{path}: points share the workdir name(s) {dupes}; make the values "
                     "distinct.")
  entry = entry or default_entry(path, root)
  workdir = (workdir or default_workdir(spec)).rstrip("/")
  runs = []
  for i, (point, name) in enumerate(zip(points, names)):
    wd = f"{workdir}/{name}"
    args = ("-m", entry, f"--config={spec}", *sweep_lib.to_flags(point), f"--workdir={wd}")
    runs.append(Run(i, name, dict(point), wd, args))
  return runs


def write_point(run: Run, root: os.PathLike | str = REPO_ROOT) -> None:
  """Records the point and its command in the workdir, for `launch.collect`."""
  wd = pathlib.Path(root) / run.workdir
  wd.mkdir(parents=True, exist_ok=True)
  (wd / POINT_FILE).write_text(json.dumps(
      {"name": run.name, "point": run.point, "command": run.command()}, indent=2))
