"""Multi-process setup: one guarded `jax.distributed.initialize()` and process-0-only helpers.

The same command runs on every host (TPU pod via `gcloud ... --worker=all`,
SLURM via `srun`, or by hand with JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID set). Entry points call `initialize()`
first, before anything touches a device; on a single machine it does nothing.

Only process 0 logs and writes metrics (`log_main`, `main_only`), but every
process takes part in checkpointing and in every jitted computation:
never wrap those in `main_only`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, TypeVar

import jax
from absl import logging

F = TypeVar("F", bound=Callable[..., Any])


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from None


def cluster_detected() -> Optional[str]:
  """Name of a multi-process cluster that JAX can auto-configure from this environment, if any.

  Looks only at environment variables (no network): SLURM with several
  tasks, Open MPI with several ranks, a multi-host Cloud TPU (GKE / queued
  resources set TPU_WORKER_HOSTNAMES or MEGASCALE_COORDINATOR_ADDRESS).
  On plain TPU VMs the environment may not say; pass `auto=True` there.
  """
  if "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or _env_int("SLURM_NPROCS") or 1) > 1:
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "ompi"
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "cloud_tpu"
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: Optional[bool] = None,
               timeout_s: int = 300) -> bool:
  """Joins the multi-process JAX cluster once; returns whether JAX runs distributed.

  Arguments left as None are read from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. Then:
    * a coordinator address given, with more than one process (or the count
      left to JAX): `jax.distributed.initialize(address, n, id)`;
    * otherwise, when `auto` is True, or None and `cluster_detected()` finds a
      SLURM / Open MPI / Cloud TPU cluster: `jax.distributed.initialize()`
      with no arguments, so JAX reads the cluster itself;
    * otherwise (one process): nothing.
  Calling it again is a no-op. It must run before the first JAX computation;
  JAX raises a RuntimeError otherwise.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
  if num_processes == 1:
    return False
  if coordinator_address is not None:
    logging.info("Initializing JAX distributed: coordinator=%s, num_processes=%s, process_id=%s",
                 coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
    return True
  if num_processes is not None or process_id is not None:
    raise ValueError(
        f"num_processes={num_processes} / process_id={process_id} given without a coordinator "
        "address; set JAX_COORDINATOR_ADDRESS=host:port (process 0's host) or pass "
        "coordinator_address.")
  cluster = cluster_detected() if auto is None else ("requested" if auto else None)
  if cluster is None:
    return False
  logging.info("Initializing JAX distributed from the %s environment.", cluster)
  jax.distributed.initialize(initialization_timeout=timeout_s)
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that logs and writes metrics)."""
  return jax.process_index() == 0


def main_only(fn: F) -> F:
  """Decorator: `fn` runs on process 0 only and returns None elsewhere (logging, metrics, plots)."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if is_main_process():
      return fn(*args, **kwargs)
    return None
  return wrapper  # type: ignore[return-value]


def log_main(msg: str, *args: Any) -> None:
  """`absl.logging.info(msg, *args)` on process 0 only."""
  if is_main_process():
    logging.info(msg, *args)
