"""Smoke test: benchmarks/merge_throughput.py runs on a tiny tree and prints its ratio line."""
import re

from benchmarks import merge_throughput


def test_tiny_run_prints_the_ratio_line(capsys):
  seconds = merge_throughput.run(tasks=2, width=32, layers=1, repeats=1,
                                 methods=["average"])
  assert {"task_arithmetic", "ties", "average", "memcpy"} <= set(seconds)
  assert all(s > 0 for s in seconds.values())
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert re.fullmatch(r"ratio_to_memcpy=\d+\.\d+ ties_over_task_arithmetic=\d+\.\d+", last)


def test_vit_shapes_are_vit_b32_sized():
  import math
  import jax
  shapes = merge_throughput.vit_shapes()
  n = sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
  assert 87e6 < n < 89e6
