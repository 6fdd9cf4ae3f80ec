r"""Runs the sweep a config file defines with `get_sweep(h)`: locally, on a TPU pod, or on SLURM.

  python -m launch.sweep --config=configs/reproduce.py:quick --target=local --parallel=2
  python -m launch.sweep --config=configs/reproduce.py:quick --target=tpu \
      --tpu_name=my-v4-32 --zone=us-central2-b --project=my-project --dry_run
  python -m launch.sweep --config=configs/reproduce.py:quick --target=slurm \
      --partition=gpu --gpus_per_node=8 --dry_run

Every point becomes one command
`python -m experiments.<config stem> --config=<spec> --config.<leaf>=<value>... --workdir=<root>/<name>`.
`--dry_run` prints every command (or the sbatch script) and runs nothing.
Gather the results with `python -m launch.collect '<root>/*'`.
"""
import pathlib
import shlex
import subprocess
import sys

from absl import app
from absl import flags

from launch import expand
from launch import local
from launch import slurm
from launch import tpu

_CONFIG = flags.DEFINE_string("config", None, "Config file[:arg], e.g. configs/reproduce.py:quick.",
                              required=True)
_TARGET = flags.DEFINE_enum("target", "local", ["local", "tpu", "slurm"], "Where to run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands / script; run nothing.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Root of the points' workdirs (default results/sweeps/<stem>-<arg>).")
_ENTRY = flags.DEFINE_string("entry", None, "Entry module (default experiments.<config stem>).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Run only the first N points (0: all).")
# local
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local: points run at the same time.")
# tpu
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "tpu: the TPU VM (pod slice) name.")
_ZONE = flags.DEFINE_string("zone", None, "tpu: its zone.")
_PROJECT = flags.DEFINE_string("project", None, "tpu: its Google Cloud project (default: gcloud's).")
_REPO_DIR = flags.DEFINE_string("repo_dir", "~/research", "tpu: where the code goes on each worker.")
_TPU_SETUP = flags.DEFINE_string("tpu_setup", tpu.DEFAULT_SETUP,
                                 "tpu: shell command that builds the environment on each worker.")
# slurm
_PARTITION = flags.DEFINE_string("partition", None, "slurm: partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "slurm: account.")
_NODES = flags.DEFINE_integer("nodes", 1, "slurm: nodes per point.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node (0: CPU only).")
_CPUS = flags.DEFINE_integer("cpus_per_task", 16, "slurm: CPUs per process.")
_TIME = flags.DEFINE_string("time", "04:00:00", "slurm: time limit per point.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 0, "slurm: points at once (0: no limit).")
_SLURM_SETUP = flags.DEFINE_string("slurm_setup", "source .venv/bin/activate",
                                   "slurm: shell line run before srun (modules, venv).")
_SCRIPT = flags.DEFINE_string("script", None, "slurm: script path (default <workdir>/sweep.sbatch).")


def _run(argv, echo=print) -> None:
  echo(f"$ {expand.shell_join(argv)}")
  subprocess.run(argv, check=True, cwd=expand.REPO_ROOT)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  runs = expand.expand(_CONFIG.value, workdir=_WORKDIR.value, entry=_ENTRY.value,
                       limit=_LIMIT.value)
  root = (_WORKDIR.value or expand.default_workdir(_CONFIG.value)).rstrip("/")
  print(f"# {len(runs)} points of {_CONFIG.value} -> {root}/<name> (target {_TARGET.value})")

  if _TARGET.value == "local":
    counts = local.run_local(runs, parallel=_PARALLEL.value, dry_run=_DRY_RUN.value)
    print(f"# done={counts['done']} skipped={counts['skipped']} failed={counts['failed']}")
    return 1 if counts["failed"] else 0

  if _TARGET.value == "tpu":
    target = tpu.TpuTarget(name=_TPU_NAME.value, zone=_ZONE.value, project=_PROJECT.value,
                           repo_dir=_REPO_DIR.value, setup=_TPU_SETUP.value)
    for cmd in tpu.commands(runs, target):
      if _DRY_RUN.value:
        print(expand.shell_join(cmd))
      else:
        _run(cmd)
    return 0

  target = slurm.SlurmTarget(
      job_name=pathlib.Path(root).name, partition=_PARTITION.value, account=_ACCOUNT.value,
      nodes=_NODES.value, gpus_per_node=_GPUS.value, cpus_per_task=_CPUS.value,
      time=_TIME.value, max_parallel=_MAX_PARALLEL.value, setup=_SLURM_SETUP.value)
  text = slurm.script(runs, target, sweep_root=root,
                      generated_by=expand.shell_join(["python", "-m", "launch.sweep", *sys.argv[1:]]))
  path = _SCRIPT.value or f"{root}/sweep.sbatch"
  if _DRY_RUN.value:
    print(f"# {path}:")
    print(text, end="")
    print(f"sbatch {shlex.quote(path)}")
    return 0
  full = expand.REPO_ROOT / path
  full.parent.mkdir(parents=True, exist_ok=True)
  full.write_text(text)
  _run(["sbatch", path])
  return 0


if __name__ == "__main__":
  app.run(main)
