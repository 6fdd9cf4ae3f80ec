"""Tests for research.distributed, and a real 2-process CPU run (gloo) of mesh, collectives and Orbax."""
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from research import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_VARS = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS"]


@pytest.fixture
def clean_env(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_initialize_is_a_noop_single_process_and_idempotent(clean_env):
  assert distributed.initialize() is False
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  clean_env.setenv("JAX_NUM_PROCESSES", "1")
  assert distributed.initialize() is False
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1


def test_initialize_rejects_incomplete_arguments(clean_env):
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
    distributed.initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match=">= 1"):
    distributed.initialize(num_processes=0)
  clean_env.setenv("JAX_PROCESS_ID", "zero")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='zero'"):
    distributed.initialize()


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, "cloud_tpu"),
    ({"TPU_WORKER_HOSTNAMES": "h0"}, None),
])
def test_cluster_detection_from_env(clean_env, env, expected):
  for k, v in env.items():
    clean_env.setenv(k, v)
  assert distributed.cluster_detected() == expected


def test_main_process_helpers(caplog):
  assert distributed.is_main_process()
  calls = []
  write = distributed.main_only(lambda x: calls.append(x) or "done")
  assert write(3) == "done" and calls == [3]
  with caplog.at_level(logging.INFO):
    distributed.log_main("accuracy %.2f", 0.5)
  assert "accuracy 0.50" in caplog.text


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_cpu_match_one_process(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {pid} failed:\n{out[-4000:]}"

  # The single-process reference: the same computation on this process's 8 devices.
  from tests import multiprocess_worker as worker
  batch = jax.numpy.asarray(worker.GLOBAL_BATCH)
  col_sum = np.asarray(jax.jit(lambda x: x.sum(0))(batch))
  total = float(jax.jit(lambda x: (x * x).sum())(batch))
  for pid in range(2):
    r = json.loads((tmp_path / f"result_{pid}.json").read_text())
    assert r["process"] == pid and r["is_main"] == (pid == 0)
    np.testing.assert_allclose(r["col_sum"], col_sum)
    assert r["total"] == pytest.approx(total)
    assert r["gathered_equal"] and r["w_equal"] and r["b_equal"] and r["leaf_equal"]
    assert r["latest"] == 1 and r["meta"] == {"processes": 2}
