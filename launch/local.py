"""Running a sweep on this machine: N points at a time, one workdir each, finished points skipped.

A point is finished when its workdir holds `results.json` (the entry point
writes it last, atomically). Killing the launcher and starting it again
reruns only the unfinished points, and those resume from their latest Orbax
checkpoints inside the entry point.
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys
from typing import Callable, Sequence

from launch import expand


def run_local(runs: Sequence[expand.Run], *, parallel: int = 1, python: str = sys.executable,
              dry_run: bool = False, root: os.PathLike | str = expand.REPO_ROOT,
              echo: Callable[[str], None] = print) -> dict[str, int]:
  """Runs the unfinished `runs`, `parallel` at a time; returns counts of done / skipped / failed.

  Each run's stdout and stderr go to `<workdir>/log.txt`; with `dry_run` the
  commands are printed and nothing runs.
  """
  if parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {parallel}.")
  todo = []
  for run in runs:
    if run.finished(root):
      echo(f"# [{run.index}] finished, skipped: {run.workdir}")
    else:
      echo(run.command("python" if dry_run else python))
      todo.append(run)
  counts = {"done": 0, "skipped": len(runs) - len(todo), "failed": 0}
  if dry_run or not todo:
    return counts

  def one(run: expand.Run) -> int:
    expand.write_point(run, root)
    log = pathlib.Path(root) / run.workdir / "log.txt"
    with open(log, "ab") as f:
      return subprocess.run(run.argv(python), cwd=root, stdout=f, stderr=subprocess.STDOUT,
                            check=False).returncode

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {pool.submit(one, run): run for run in todo}
    for future in concurrent.futures.as_completed(futures):
      run, code = futures[future], future.result()
      ok = code == 0 and run.finished(root)
      counts["done" if ok else "failed"] += 1
      echo(f"# [{run.index}] {'done' if ok else f'FAILED (exit {code})'}: {run.workdir}"
           + ("" if ok else f"; see {run.workdir}/log.txt"))
  return counts
