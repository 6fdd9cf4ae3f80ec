"""launch.sweep / launch.collect: a real local sweep on a fake entry point, exact TPU and SLURM commands."""
import csv
import io
import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import pytest

from launch import collect
from launch import expand
from launch import local
from launch import slurm
from launch import tpu

ROOT = pathlib.Path(__file__).resolve().parents[1]

FAKE_CONFIG = '''
import ml_collections

def get_config(arg=None):
  return ml_collections.ConfigDict(dict(lr=0.1, seed=0, fail=False, workdir="unused",
                                        train=dict(steps=1)))

def get_sweep(h):
  return h.chain(h.product(h.sweep("lr", [0.1, 0.2]), h.sweep("config.seed", [0, 1])),
                 h.fixed("fail", True))
'''

# A stand-in for experiments/<name>.py: config flags in, results.json out.
FAKE_ENTRY = '''
import json, os
from absl import app, flags
from ml_collections import config_flags
_CONFIG = config_flags.DEFINE_config_file("config", None, "", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "")

def main(argv):
  c = _CONFIG.value
  if c.fail:
    raise SystemExit("failing on purpose")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "calls.txt"), "a") as f:
    f.write("ran\\n")
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump({"score": {"avg": c.lr * 10 + c.seed}, "curve": [1, 2], "wall_time_s": 1.5}, f)

if __name__ == "__main__":
  app.run(main)
'''


@pytest.fixture
def fake_repo(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "fake.py").write_text(FAKE_CONFIG)
  (tmp_path / "experiments").mkdir()
  (tmp_path / "experiments" / "__init__.py").write_text("")
  (tmp_path / "experiments" / "fake.py").write_text(FAKE_ENTRY)
  return tmp_path


def test_expand_builds_one_command_per_point(fake_repo):
  runs = expand.expand("configs/fake.py:x", root=fake_repo, workdir="out")
  assert [r.name for r in runs] == ["lr=0.1_seed=0", "lr=0.1_seed=1", "lr=0.2_seed=0",
                                    "lr=0.2_seed=1", "fail=true"]
  assert runs[1].command() == ("python -m experiments.fake --config=configs/fake.py:x "
                               "--config.lr=0.1 --config.seed=1 --workdir=out/lr=0.1_seed=1")
  assert len(expand.expand("configs/fake.py", root=fake_repo, limit=2)) == 2
  assert runs[0].workdir == "out/lr=0.1_seed=0"
  assert expand.default_workdir("configs/reproduce.py:quick") == "results/sweeps/reproduce-quick"


def test_expand_rejects_bad_configs(fake_repo):
  (fake_repo / "configs" / "nosweep.py").write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(AttributeError, match="defines no get_sweep"):
    expand.expand("configs/nosweep.py", root=fake_repo)
  (fake_repo / "configs" / "typo.py").write_text(
      FAKE_CONFIG.replace('h.sweep("lr"', 'h.sweep("lrate"'))
  with pytest.raises(KeyError, match="'lrate'"):
    expand.expand("configs/typo.py", root=fake_repo, entry="experiments.fake")
  with pytest.raises(FileNotFoundError, match="experiments/typo.py"):
    expand.default_entry("configs/typo.py", root=fake_repo)
  with pytest.raises(ValueError, match="Python config file"):
    expand.split_spec("configs/fake")


@pytest.mark.slow
def test_local_sweep_runs_skips_finished_and_collects(fake_repo):
  runs = expand.expand("configs/fake.py", root=fake_repo, workdir="sweep")
  echoed = []
  counts = local.run_local(runs, parallel=2, root=fake_repo, echo=echoed.append)
  assert counts == {"done": 4, "skipped": 0, "failed": 1}
  assert any("FAILED" in line and "fail=true" in line for line in echoed)
  assert "failing on purpose" in (fake_repo / "sweep/fail=true/log.txt").read_text()

  # A rerun skips the finished points; a lost result is recomputed.
  (fake_repo / "sweep/lr=0.2_seed=1/results.json").unlink()
  counts = local.run_local(runs[:4], parallel=2, root=fake_repo, echo=echoed.append)
  assert counts == {"done": 1, "skipped": 3, "failed": 0}
  assert (fake_repo / "sweep/lr=0.1_seed=0/calls.txt").read_text() == "ran\n"
  assert (fake_repo / "sweep/lr=0.2_seed=1/calls.txt").read_text() == "ran\nran\n"
  point = json.loads((fake_repo / "sweep/lr=0.2_seed=1/sweep_point.json").read_text())
  assert point["point"] == {"lr": 0.2, "seed": 1}

  # Dry run: prints, runs nothing.
  dry = []
  local.run_local(runs, dry_run=True, root=fake_repo, echo=dry.append)
  assert sum(line.startswith("# [") for line in dry) == 4
  assert dry[-1].startswith("python -m experiments.fake") and "fail=true" in dry[-1]

  # Collect: one row per finished point, swept values and matching metrics.
  lines = []
  assert collect.report([str(fake_repo / "sweep" / "*")], echo=lines.append) == 4
  out = "\n".join(lines)
  assert out.splitlines()[0] == "| name | lr | seed | score.avg | wall_time_s |"
  assert "| lr=0.2_seed=1 | 0.2 | 1 | 3 | 1.5 |" in out
  assert "unfinished (no results.json)" in out and "fail=true" in out
  rows = list(csv.DictReader(io.StringIO((fake_repo / "sweep" / "results.csv").read_text())))
  assert len(rows) == 4 and float(rows[1]["score.avg"]) == pytest.approx(2.0)
  assert (fake_repo / "sweep" / "results.md").read_text().count("\n") == 6


def test_tpu_commands_are_exact():
  runs = expand.expand("configs/reproduce.py:quick", limit=2)
  target = tpu.TpuTarget(name="my-v4-32", zone="us-central2-b", project="proj")
  cmds = [expand.shell_join(c) for c in tpu.commands(runs, target)]
  assert len(cmds) == 5
  assert cmds[1] == ("gcloud compute tpus tpu-vm scp /tmp/research-code.tar.gz "
                     "my-v4-32:/tmp/research-code.tar.gz --zone=us-central2-b --project=proj "
                     "--worker=all")
  assert cmds[2].startswith("gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b "
                            "--project=proj --worker=all --command='mkdir -p ~/research && "
                            "tar xzf /tmp/research-code.tar.gz -C ~/research && cd ~/research && "
                            "make venv data")
  assert cmds[4] == (
      "gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --project=proj --worker=all "
      "--command='cd ~/research && (test -f results/sweeps/reproduce-quick/lr=3e-05_seed=1/"
      "results.json || .venv/bin/python -m experiments.reproduce "
      "--config=configs/reproduce.py:quick --config.train.lr=3e-05 --config.seed=1 "
      "--workdir=results/sweeps/reproduce-quick/lr=3e-05_seed=1)'")
  with pytest.raises(ValueError, match="--tpu_name and --zone"):
    tpu.TpuTarget(name=None, zone=None)


def test_slurm_script_runs_the_right_point(fake_repo, tmp_path):
  runs = expand.expand("configs/fake.py", root=fake_repo, workdir="sweep")
  text = slurm.script(runs, slurm.SlurmTarget(job_name="fake", partition="gpu", max_parallel=2,
                                              gpus_per_node=4, setup=""),
                      sweep_root="sweep")
  assert "#SBATCH --array=0-4%2" in text and "#SBATCH --gpus-per-node=4" in text
  assert "#SBATCH --partition=gpu" in text and "#SBATCH --requeue" in text
  path = tmp_path / "sweep.sbatch"
  path.write_text(text)
  subprocess.run(["bash", "-n", str(path)], check=True)
  # Run array task 2 with a stand-in srun that records its arguments.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
  srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="2",
             SLURM_SUBMIT_DIR=str(fake_repo), SRUN_LOG=str(tmp_path / "srun.log"))
  subprocess.run(["bash", str(path)], check=True, env=env)
  assert (tmp_path / "srun.log").read_text().splitlines() == [
      "--kill-on-bad-exit=1", "python", "-m", "experiments.fake", "--config=configs/fake.py",
      "--config.lr=0.2", "--config.seed=0", "--workdir=sweep/lr=0.2_seed=0"]
  # A finished point exits without srun.
  (fake_repo / "sweep/lr=0.2_seed=0/results.json").write_text("{}")
  (tmp_path / "srun.log").unlink()
  out = subprocess.run(["bash", str(path)], check=True, env=env, capture_output=True, text=True)
  assert "finished: sweep/lr=0.2_seed=0" in out.stdout and not (tmp_path / "srun.log").exists()


@pytest.mark.parametrize("target,extra,expect", [
    ("tpu", ["--tpu_name=my-v4-32", "--zone=us-central2-b"],
     "--worker=all --command='cd ~/research && (test -f"),
    ("slurm", ["--partition=gpu"], 'srun --kill-on-bad-exit=1 python -m experiments.reproduce'),
    ("local", [], "python -m experiments.reproduce --config=configs/reproduce.py:quick"),
])
def test_cli_dry_run(target, extra, expect):
  out = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "--config=configs/reproduce.py:quick",
       f"--target={target}", "--dry_run", "--workdir=/tmp/never-written", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
  assert out.startswith(f"# 6 points of configs/reproduce.py:quick -> /tmp/never-written/<name> "
                        f"(target {target})")
  assert expect in out
  assert not pathlib.Path("/tmp/never-written").exists()
