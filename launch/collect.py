r"""Gathers the results.json of a sweep's workdirs into one table (markdown and CSV).

  python -m launch.collect 'results/sweeps/reproduce-quick/*'

Prints a markdown table (one row per finished point: its name, the swept
values from sweep_point.json, and every numeric result whose dotted path
matches --metrics) and writes results.md and results.csv next to the
workdirs (or to --markdown / --csv). Unfinished workdirs are listed, not
tabulated.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import pathlib
import re
from typing import Any, Iterable, Optional

from absl import app
from absl import flags

RESULTS_FILE = "results.json"
POINT_FILE = "sweep_point.json"
DEFAULT_METRICS = r"(^|\.)(avg|alpha|mean)$|^wall_time_s$"

_METRICS = flags.DEFINE_string("metrics", DEFAULT_METRICS,
                               "Regex over dotted result paths to tabulate.")
_CSV = flags.DEFINE_string("csv", None, "CSV output (default <sweep root>/results.csv).")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Markdown output (default <sweep root>/results.md).")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Numeric (and bool) leaves of nested dicts as {'a.b.c': value}; lists are skipped."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
  elif isinstance(tree, (int, float)) and prefix:
    out[prefix[:-1]] = tree
  return out


def workdirs(patterns: Iterable[str]) -> list[pathlib.Path]:
  """Directories matched by the glob patterns (a results.json match stands for its folder)."""
  found = []
  for pattern in patterns:
    for p in sorted(glob.glob(pattern)):
      path = pathlib.Path(p)
      path = path.parent if path.name == RESULTS_FILE else path
      if path.is_dir() and path not in found:
        found.append(path)
  return found


def collect(dirs: Iterable[pathlib.Path], metrics: str = DEFAULT_METRICS
            ) -> tuple[list[str], list[dict[str, Any]], list[pathlib.Path]]:
  """(columns, rows, unfinished workdirs)."""
  pattern = re.compile(metrics)
  rows, unfinished, point_keys, metric_keys = [], [], [], []
  for d in dirs:
    if not (d / RESULTS_FILE).is_file():
      unfinished.append(d)
      continue
    results = json.loads((d / RESULTS_FILE).read_text())
    point = {}
    if (d / POINT_FILE).is_file():
      point = json.loads((d / POINT_FILE).read_text()).get("point", {})
    values = {k: v for k, v in flatten(results).items() if pattern.search(k)}
    for k in point:
      if k not in point_keys:
        point_keys.append(k)
    for k in values:
      if k not in metric_keys:
        metric_keys.append(k)
    rows.append({"name": d.name, **point, **values})
  return ["name", *point_keys, *metric_keys], rows, unfinished


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, tuple):
    return ",".join(map(str, value))
  return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: row.get(c, "") for c in columns})
  return buf.getvalue()


def _root(dirs: list[pathlib.Path]) -> pathlib.Path:
  return pathlib.Path(os.path.commonpath([str(d.resolve().parent) for d in dirs]))


def report(patterns: Iterable[str], *, metrics: str = DEFAULT_METRICS,
           csv_path: Optional[str] = None, markdown_path: Optional[str] = None,
           echo=print) -> int:
  """Prints the table, writes markdown and CSV; returns the number of finished points."""
  dirs = workdirs(patterns)
  if not dirs:
    raise FileNotFoundError(f"No directories match {list(patterns)}.")
  columns, rows, unfinished = collect(dirs, metrics)
  markdown = to_markdown(columns, rows)
  echo(markdown.rstrip("\n"))
  for d in unfinished:
    echo(f"# unfinished (no {RESULTS_FILE}): {d}")
  root = _root(dirs)
  md_path = pathlib.Path(markdown_path or root / "results.md")
  csv_out = pathlib.Path(csv_path or root / "results.csv")
  md_path.write_text(markdown)
  csv_out.write_text(to_csv(columns, rows))
  echo(f"# {len(rows)} finished, {len(unfinished)} unfinished; wrote {md_path} and {csv_out}")
  return len(rows)


def main(argv) -> int:
  patterns = argv[1:]
  if not patterns:
    raise app.UsageError("Give the sweep's workdirs as a glob, e.g. "
                         "python -m launch.collect 'results/sweeps/reproduce-quick/*'.")
  finished = report(patterns, metrics=_METRICS.value, csv_path=_CSV.value,
                    markdown_path=_MARKDOWN.value)
  return 0 if finished else 1


if __name__ == "__main__":
  app.run(main)
