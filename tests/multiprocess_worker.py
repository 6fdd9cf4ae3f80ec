"""One process of the 2-process CPU test in tests/test_distributed.py (not a test module itself).

Run by that test as `python tests/multiprocess_worker.py WORKDIR` with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set; writes
WORKDIR/result_<process>.json for the test to compare with one process.
"""
import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research import checkpoints, distributed, sharding

GLOBAL_BATCH = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
PARAMS = {"w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 7.0,
          "b": np.linspace(0.0, 1.0, 16, dtype=np.float32)}


def main(workdir: str) -> None:
  # 4 CPU devices per process and gloo for cross-process CPU collectives;
  # both before the backend starts (nothing above touches a device).
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert distributed.initialize() is True
  assert distributed.initialize() is True   # idempotent
  pid, n = jax.process_index(), jax.process_count()
  assert n == 2 and jax.device_count() == 8 and jax.local_device_count() == 4, (
      n, jax.device_count(), jax.local_device_count())

  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  # Each process holds its own half of the batch rows.
  rows = GLOBAL_BATCH.shape[0] // n
  local = GLOBAL_BATCH[pid * rows:(pid + 1) * rows]
  batch = sharding.shard_batch({"x": local}, mesh, P(("data", "fsdp")))["x"]
  assert batch.shape == GLOBAL_BATCH.shape and not batch.is_fully_addressable
  replicated = NamedSharding(mesh, P())
  col_sum = jax.jit(lambda x: x.sum(0), out_shardings=replicated)(batch)
  total = jax.jit(lambda x: (x * x).sum(), out_shardings=replicated)(batch)
  gathered = multihost_utils.process_allgather(batch, tiled=True)

  rules = [("fsdp", ("data", "fsdp"))]
  axes = sharding.fsdp_axes(PARAMS, mesh.size, min_bytes=0)
  params = sharding.put(PARAMS, sharding.logical_sharding(axes, mesh, rules, shapes=PARAMS))
  with checkpoints.Checkpointer(f"{workdir}/ckpt", max_to_keep=2) as ckpt:
    ckpt.save(1, params, {"processes": n})
    ckpt.wait()
    latest = ckpt.latest_step()
  target_sh = {"w": NamedSharding(mesh, P(("data", "fsdp"), None)), "b": NamedSharding(mesh, P())}
  target = sharding.abstract_with_sharding(PARAMS, target_sh)
  restored, meta = checkpoints.restore(f"{workdir}/ckpt", target=target)
  assert restored["w"].sharding == target_sh["w"] and restored["b"].sharding == target_sh["b"]
  assert all(s.data.shape == (1, 16) for s in restored["w"].addressable_shards)
  w = multihost_utils.process_allgather(restored["w"], tiled=True)
  leaf = checkpoints.restore_leaves(f"{workdir}/ckpt", 1, ["b"])["b"]

  result = {
      "process": pid, "is_main": distributed.is_main_process(),
      "col_sum": np.asarray(col_sum).tolist(), "total": float(total),
      "gathered_equal": bool(np.array_equal(gathered, GLOBAL_BATCH)),
      "latest": latest, "meta": meta,
      "w_equal": bool(np.array_equal(w, PARAMS["w"])),
      "b_equal": bool(np.array_equal(np.asarray(restored["b"]), PARAMS["b"])),
      "leaf_equal": bool(np.array_equal(leaf, PARAMS["b"])),
  }
  with open(f"{workdir}/result_{pid}.json", "w") as f:
    json.dump(result, f)
  multihost_utils.sync_global_devices("worker done")


if __name__ == "__main__":
  main(sys.argv[1])
