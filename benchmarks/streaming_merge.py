"""Merging 8 fine-tuned checkpoints whose total size exceeds this machine's RAM, leaf by leaf.

  python -m benchmarks.streaming_merge [--dir=/work/streaming_bench --total_gb=0 --keep]

Builds a synthetic pre-trained checkpoint and 8 fine-tuned ones (float32
leaves of 4096 x 4096 plus small ones; each fine-tuned model = params0 + a
task-specific perturbation), written leaf by leaf so building needs little
memory either. Their total size defaults to 1.2 x RAM (float32 data of
random mantissas compresses by under 10% in Orbax's zstd). Then each method
(`task_arithmetic`, `ties`) runs in its own process with
`research.streaming.merge_checkpoints`, which reports that process's peak
resident memory. Everything under --dir is deleted at the end unless --keep.
It takes a while (tens of GB are written once and read 2-4 times). Last line:
`peak_rss_gb=<max over methods> total_input_gb=<8 fine-tuned checkpoints>`.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

_DIR = flags.DEFINE_string("dir", "/work/streaming_bench", "Scratch directory (deleted after).")
_TOTAL_GB = flags.DEFINE_float("total_gb", 0.0,
                               "Size of the 8 fine-tuned checkpoints together (0: 1.2 x RAM).")
_TASKS = flags.DEFINE_integer("tasks", 8, "Fine-tuned checkpoints.")
_METHODS = flags.DEFINE_list("methods", ["task_arithmetic", "ties"], "Methods to run.")
_CHUNK_MB = flags.DEFINE_integer("chunk_mb", 64, "max_chunk_bytes of the merge, in MiB.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints.")
_REUSE = flags.DEFINE_bool("reuse", False, "Reuse the checkpoints a --keep run left in --dir.")
_STAGE = flags.DEFINE_enum("stage", "all", ["all", "build", "merge"], "Internal: one stage.")
_METHOD = flags.DEFINE_string("method", None, "Internal: the method of a merge stage.")

SIDE = 4096  # 64 MiB float32 leaves.


def ram_gb() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemTotal:"):
        return int(line.split()[1]) / 2**20
  raise RuntimeError("No MemTotal in /proc/meminfo.")


def du_gb(path: str) -> float:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total / 2**30


def build(directory: str, total_gb: float, tasks: int) -> dict:
  """Writes params0 and `tasks` fine-tuned checkpoints, one leaf at a time."""
  from research import streaming  # pylint: disable=import-outside-toplevel
  per_model = total_gb * 2**30 / tasks
  n_big = max(1, math.ceil(per_model / (SIDE * SIDE * 4)))
  writers = [streaming.OrbaxWriter(f"{directory}/params0")] + [
      streaming.OrbaxWriter(f"{directory}/task{t}") for t in range(tasks)]
  rng = np.random.default_rng(0)
  for i in range(n_big):
    base = rng.random((SIDE, SIDE), dtype=np.float32) - np.float32(0.5)
    noise = rng.random((SIDE, SIDE), dtype=np.float32) - np.float32(0.5)
    small = {f"layer_{i:03d}/bias": base[0] * np.float32(0.1),
             f"layer_{i:03d}/scale": np.ones(SIDE, np.float32)}
    writers[0].write({f"layer_{i:03d}/kernel": base, **small})
    for t, w in enumerate(writers[1:]):
      # Task t: a shifted copy of one noise block, so tasks differ without more RNG.
      finetuned = np.roll(noise, 97 * t, axis=1)
      finetuned *= np.float32(0.01 * (t + 1))
      finetuned += base
      w.write({f"layer_{i:03d}/kernel": finetuned,
               **{k: v + np.float32(1e-3 * (t + 1)) for k, v in small.items()}})
      del finetuned
    print(f"built leaf {i + 1}/{n_big}", flush=True)
  for w in writers:
    w.commit({"synthetic": True})
  return {"leaves_per_model": 3 * n_big,
          "model_gb": n_big * (SIDE * SIDE + 2 * SIDE) * 4 / 2**30}


def merge(directory: str, tasks: int, method: str, chunk_mb: int) -> dict:
  from research import streaming  # pylint: disable=import-outside-toplevel
  hparams = {"ties": {"density": 0.2, "scale": 1.0},
             "task_arithmetic": {"scale": 0.3}}.get(method, {})
  stats = streaming.merge_checkpoints(
      method, f"{directory}/params0", [f"{directory}/task{t}" for t in range(tasks)],
      f"{directory}/merged_{method}", hparams=hparams, max_chunk_bytes=chunk_mb << 20,
      log=lambda m: print(m, flush=True))
  if method == "task_arithmetic":  # Spot check one leaf against the formula.
    from research import checkpoints  # pylint: disable=import-outside-toplevel
    leaf = "layer_000/kernel"
    p0 = checkpoints.restore_leaves(f"{directory}/params0", None, [leaf])[leaf]
    expected = p0.copy()
    for t in range(tasks):
      expected += 0.3 * (checkpoints.restore_leaves(f"{directory}/task{t}", None, [leaf])[leaf] - p0)
    got = checkpoints.restore_leaves(f"{directory}/merged_{method}", None, [leaf])[leaf]
    stats["spot_check_max_abs_err"] = float(np.max(np.abs(got - expected)))
  return stats


def _stage(args) -> dict:
  out = subprocess.run([sys.executable, "-m", "benchmarks.streaming_merge", *args],
                       stdout=subprocess.PIPE, text=True, check=True)
  sys.stdout.write("".join(line + "\n" for line in out.stdout.splitlines()[:-1][-3:]))
  return json.loads(out.stdout.splitlines()[-1])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO.
  directory, tasks = _DIR.value, _TASKS.value
  if _STAGE.value == "build":
    print(json.dumps(build(directory, _TOTAL_GB.value, tasks)))
    return
  if _STAGE.value == "merge":
    print(json.dumps(merge(directory, tasks, _METHOD.value, _CHUNK_MB.value)))
    return

  total_gb = _TOTAL_GB.value or 1.2 * ram_gb()
  reuse = _REUSE.value and os.path.exists(f"{directory}/params0")
  if not reuse:
    free_gb = shutil.disk_usage(os.path.dirname(os.path.abspath(directory))).free / 2**30
    needed = total_gb * (tasks + 2) / tasks * 1.05
    if free_gb < needed:
      raise SystemExit(f"Needs ~{needed:.0f} GB free next to {directory}, has {free_gb:.0f} GB.")
    if os.path.exists(directory):
      raise SystemExit(f"{directory} exists; remove it, pass --reuse, or pass another --dir.")
  try:
    if not reuse:
      print(f"RAM {ram_gb():.1f} GiB; building {tasks} fine-tuned checkpoints of "
            f"{total_gb / tasks:.2f} GiB each (+ params0) in {directory}", flush=True)
      start = time.time()
      _stage(["--stage=build", f"--dir={directory}", f"--total_gb={total_gb}", f"--tasks={tasks}"])
      print(f"built in {time.time() - start:.0f} s")
    input_gb = sum(du_gb(f"{directory}/task{t}") for t in range(tasks))
    print(f"inputs: {tasks} checkpoints, {input_gb:.1f} GiB on disk (+ params0 "
          f"{du_gb(f'{directory}/params0'):.1f} GiB); RAM {ram_gb():.1f} GiB", flush=True)
    peaks = []
    for method in _METHODS.value:
      stats = _stage(["--stage=merge", f"--dir={directory}", f"--tasks={tasks}",
                      f"--method={method}", f"--chunk_mb={_CHUNK_MB.value}"])
      peaks.append(stats["peak_rss_gb"])
      print(f"{method:<16} wall {stats['wall_s']:.0f} s, {stats['passes']} pass(es) over "
            f"{stats['bytes_read'] / stats['passes'] / 2**30:.1f} GiB, {stats['chunks']} chunks, "
            f"peak RSS {stats['peak_rss_gb']:.2f} GiB"
            + (f", spot check max |error| {stats['spot_check_max_abs_err']:.1e}"
               if "spot_check_max_abs_err" in stats else ""), flush=True)
      shutil.rmtree(f"{directory}/merged_{method}")  # Disk: keep only the inputs.
  finally:
    if not _KEEP.value and os.path.exists(directory):
      shutil.rmtree(directory)
  print(f"peak_rss_gb={max(peaks):.2f} total_input_gb={input_gb:.1f}")


if __name__ == "__main__":
  app.run(main)
