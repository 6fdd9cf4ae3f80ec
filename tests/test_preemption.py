"""Preemption: a sharded fine-tuning process killed with SIGKILL resumes to identical params."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "preemption_worker.py"
TIMEOUT_S = 120


def _start(checkpoint_dir, out, delay=0.0):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.Popen([sys.executable, str(WORKER), str(checkpoint_dir), str(out), str(delay)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc):
  try:
    out = proc.communicate(timeout=TIMEOUT_S)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    out = proc.communicate()[0]
    pytest.fail(f"worker timed out:\n{out[-3000:]}")
  assert proc.returncode == 0, out[-3000:]
  return out


def _complete_steps(directory: pathlib.Path):
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_params(tmp_path):
  reference = _start(tmp_path / "ref", tmp_path / "ref.npz")
  victim = _start(tmp_path / "run", tmp_path / "killed.npz", delay=0.5)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not _complete_steps(tmp_path / "run"):
      assert victim.poll() is None, victim.communicate()[0][-3000:]
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
  finally:
    if victim.poll() is None:
      victim.kill()
      victim.wait()
  assert victim.returncode == -signal.SIGKILL
  assert not (tmp_path / "killed.npz").exists()
  killed_at = _complete_steps(tmp_path / "run")
  assert killed_at and killed_at[-1] < 10, killed_at

  log = _finish(_start(tmp_path / "run", tmp_path / "resumed.npz"))
  resumed_from = int(log.split("resuming_from=")[1].split()[0])
  assert 2 <= resumed_from < 10, log
  _finish(reference)

  ref, resumed = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(ref.files) == sorted(resumed.files) and len(ref.files) > 10
  for name in ref.files:
    np.testing.assert_array_equal(resumed[name], ref[name], err_msg=name)
