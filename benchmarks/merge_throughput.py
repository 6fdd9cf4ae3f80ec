"""Throughput of the merge methods on 8 ViT-B/32-sized task vectors, against a memory copy.

  python -m benchmarks.merge_throughput [--tasks=8 --width=768 --layers=12 --repeats=5]

Builds T task vectors with the shapes of CLIP's ViT-B/32 image tower (patch
embedding, 12 pre-LN blocks with fused qkv, out projection and a 4x MLP,
layer norms, projection: ~88M float32 entries each, random normals),
stacked [T, ...] (2.8 GB for T = 8). Each method runs as one jitted
``apply(init(stacked), stacked)``; after a warm-up, rounds alternate between
the methods and the median is reported. Throughput counts the bytes of the
stacked input read once, per second; the memory copy is ``np.copyto`` of an
array of that size, counted the same way (bytes read per second). Last line:

  ratio_to_memcpy=<task_arithmetic GB/s / memcpy GB/s> ties_over_task_arithmetic=<ties s / ta s>

Targets: ratio_to_memcpy >= 0.7, ties_over_task_arithmetic <= 5.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from research import merging

_TASKS = flags.DEFINE_integer("tasks", 8, "Number of stacked task vectors.")
_WIDTH = flags.DEFINE_integer("width", 768, "Transformer width (ViT-B: 768).")
_LAYERS = flags.DEFINE_integer("layers", 12, "Transformer blocks (ViT-B: 12).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median reported).")
_METHODS = flags.DEFINE_list("methods", None,
                             "Methods to time (default: every data-free method).")

_FIRST = ("task_arithmetic", "ties")


def vit_shapes(width: int = 768, layers: int = 12, patch: int = 32, tokens: int = 50,
               out: int = 512) -> dict:
  """Parameter shapes of a CLIP ViT image tower (ViT-B/32 with the defaults)."""
  def ln():
    return {"scale": (width,), "bias": (width,)}
  def dense(i, o):
    return {"kernel": (i, o), "bias": (o,)}
  blocks = {
      f"resblocks_{i}": {
          "ln_1": ln(),
          "attn": {"in_proj": dense(width, 3 * width), "out_proj": dense(width, width)},
          "ln_2": ln(),
          "mlp": {"c_fc": dense(width, 4 * width), "c_proj": dense(4 * width, width)},
      } for i in range(layers)}
  return {
      "conv1": {"kernel": (patch, patch, 3, width)},
      "class_embedding": (width,),
      "positional_embedding": (tokens, width),
      "ln_pre": ln(),
      "transformer": blocks,
      "ln_post": ln(),
      "proj": (width, out),
  }


def random_stacked(shapes: dict, tasks: int, seed: int = 0) -> dict:
  """Stacked [tasks, ...] normal task vectors (scale 1e-2) for a tree of shapes."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  makers = {}
  out = []
  for key, shape in zip(keys, leaves):
    if shape not in makers:
      makers[shape] = jax.jit(
          lambda k, s=shape: 0.01 * jax.random.normal(k, (tasks,) + s, jnp.float32))
    out.append(makers[shape](key))
  return jax.tree.unflatten(treedef, out)


def _merge_fn(method: merging.Merge):
  def run(stacked, key):
    return method.apply(method.init(stacked, key=key), stacked)
  return jax.jit(run)


def _memcpy_seconds(nbytes: int, repeats: int) -> float:
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run(tasks: int = 8, width: int = 768, layers: int = 12, repeats: int = 5,
        methods: Sequence[str] | None = None, verbose: bool = True) -> dict[str, float]:
  """Median seconds per merge for each method (and ``memcpy``); prints a report."""
  names = list(methods) if methods else list(_FIRST) + [
      m for m in merging.DATA_FREE if m not in _FIRST]
  for required in _FIRST:
    if required not in names:
      names.insert(0, required)
  say = print if verbose else (lambda *a, **k: None)
  stacked = random_stacked(vit_shapes(width, layers), tasks)
  jax.block_until_ready(stacked)
  leaves = jax.tree.leaves(stacked)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  say(f"stacked task vectors: {len(leaves)} leaves, {nbytes // 4 // tasks:,} params/task x "
      f"{tasks} tasks = {nbytes / 1e9:.2f} GB float32")

  key = jax.random.key(1)
  fns = {}
  for name in names:
    start = time.perf_counter()
    fns[name] = _merge_fn(merging.get(name))
    jax.block_until_ready(fns[name](stacked, key))     # compile + warm up
    say(f"  {name}: compiled and warmed up in {time.perf_counter() - start:.1f} s")

  times = {name: [] for name in names}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(stacked, key))
      times[name].append(time.perf_counter() - start)
  seconds = {name: float(np.median(ts)) for name, ts in times.items()}
  seconds["memcpy"] = _memcpy_seconds(nbytes, repeats)

  gbps = lambda s: nbytes / s / 1e9
  ta = seconds["task_arithmetic"]
  say(f"{'memcpy (np.copyto)':<20} {seconds['memcpy']:8.4f} s  {gbps(seconds['memcpy']):6.2f} GB/s")
  for name in names:
    s = seconds[name]
    say(f"{name:<20} {s:8.4f} s/merge  {gbps(s):6.2f} GB/s  {s / ta:6.2f} x task_arithmetic")
  say(f"ratio_to_memcpy={seconds['memcpy'] / ta:.3f} "
      f"ties_over_task_arithmetic={seconds['ties'] / ta:.3f}")
  return seconds


def main(argv):
  del argv
  run(_TASKS.value, _WIDTH.value, _LAYERS.value, _REPEATS.value, _METHODS.value)


if __name__ == "__main__":
  app.run(main)
