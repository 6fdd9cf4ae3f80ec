"""The exact `gcloud compute tpus tpu-vm` commands that run a sweep on a Cloud TPU VM or pod slice.

Three stages, each one command (run from the repository root):
  1. pack the working tree (without .venv, results, .git) into a tarball;
  2. copy it to every worker (`tpu-vm scp ... --worker=all`), unpack it and
     set up the environment there (`tpu-vm ssh ... --worker=all`): the
     Makefile's venv and data targets, then `jax[tpu]`;
  3. per point, the identical command on every worker
     (`tpu-vm ssh ... --worker=all --command=...`). The entry point's
     `research.distributed.initialize()` joins the workers into one JAX
     cluster; points run one after another, each over the whole slice.
A point whose workdir already holds results.json is skipped on the worker,
so rerunning the launcher after a preemption resumes the sweep; an
interrupted point resumes from its latest Orbax checkpoint. On a multi-host
slice the workdir must be shared by all workers (e.g. a Filestore or
gcsfuse mount), since every process writes its part of each checkpoint.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Optional, Sequence

from launch import expand

DEFAULT_SETUP = ('make venv data PYTHON=python3 && .venv/bin/pip install -q -U "jax[tpu]"')


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """Where the sweep runs: a TPU VM / pod slice and the remote checkout."""
  name: str
  zone: str
  project: Optional[str] = None
  repo_dir: str = "~/research"
  archive: str = "/tmp/research-code.tar.gz"
  setup: str = DEFAULT_SETUP

  def __post_init__(self):
    missing = [flag for flag, value in (("--tpu_name", self.name), ("--zone", self.zone))
               if not value]
    if missing:
      raise ValueError(f"--target=tpu needs {' and '.join(missing)} (the TPU VM and its zone, "
                       "e.g. --tpu_name=my-v4-32 --zone=us-central2-b).")

  def where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def ssh(self, remote_command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.where(),
            "--worker=all", f"--command={remote_command}"]


def _remote_path(path: str) -> str:
  """Quotes a remote path, leaving a leading ~/ for the remote shell to expand."""
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  return shlex.quote(path)


def commands(runs: Sequence[expand.Run], target: TpuTarget) -> list[list[str]]:
  """Every command, as argv lists, in the order they run."""
  repo = _remote_path(target.repo_dir)
  archive = shlex.quote(target.archive)
  pack = ["tar", "czf", target.archive, "--exclude=./.venv", "--exclude=./.venv-*",
          "--exclude=./results", "--exclude=./.git", "--exclude=__pycache__", "."]
  copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", target.archive,
          f"{target.name}:{target.archive}", *target.where(), "--worker=all"]
  setup = target.ssh(f"mkdir -p {repo} && tar xzf {archive} -C {repo} && cd {repo} && "
                     f"{target.setup}")
  out = [pack, copy, setup]
  for run in runs:
    results = shlex.quote(f"{run.workdir}/{expand.RESULTS_FILE}")
    out.append(target.ssh(f"cd {repo} && (test -f {results} || "
                          f"{run.command('.venv/bin/python')})"))
  return out
