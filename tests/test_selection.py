"""Tests for the exact top-k selection behind TIES (research.merging.selection / counting)."""
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.merging import counting
from research.merging import selection

T = 3
# One leaf large enough to be folded (>= counting.FOLD_MIN_SIZE entries per task),
# small ones that are concatenated, and odd shapes.
SHAPES = {"big": (64, 520), "mat": (24, 40), "conv": (5, 3, 7), "bias": (40,), "odd": (13,)}


def _tree(values):
  out, start = {}, 0
  for name, shape in SHAPES.items():
    size = int(np.prod(shape))
    out[name] = values[:, start:start + size].reshape((T,) + shape)
    start += size
  return out


N = sum(int(np.prod(s)) for s in SHAPES.values())


def _values(seed, kind):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    v = rng.standard_normal((T, N))
  elif kind == "plateaus":       # few distinct magnitudes: ties everywhere
    v = rng.choice([0.0, 0.25, -0.25, 1.0, -3.0], size=(T, N))
  elif kind == "sparse":         # mostly exact zeros
    v = rng.standard_normal((T, N)) * (rng.random((T, N)) < 0.05)
  else:                          # heavy tails over many binades
    v = rng.standard_normal((T, N)) * np.exp(rng.uniform(-30, 30, (T, N)))
  return v.astype(np.float32)


def _kth_largest_abs(values, k):
  mags = -np.sort(-np.abs(values), axis=1)
  return mags[np.arange(values.shape[0]), np.asarray(k) - 1]


@functools.lru_cache(maxsize=None)
def _global_fn(sample):
  return jax.jit(lambda tree, k: selection.kth_largest(tree, k[:, None], sample=sample))


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["normal", "plateaus", "sparse", "wide"]),
    ranks=st.lists(st.integers(1, N), min_size=T, max_size=T),
    sample=st.booleans())
def test_kth_largest_equals_numpy(seed, kind, ranks, sample):
  values = _values(seed, kind)
  got = np.asarray(_global_fn(sample)(_tree(values), np.array(ranks, np.int32)))
  np.testing.assert_array_equal(got, _kth_largest_abs(values, ranks))


@pytest.mark.parametrize("density", [1e-4, 0.2, 0.5, 1.0])
def test_topk_threshold_keeps_ceil_density_n(density):
  values = _values(1, "normal")
  thr = np.asarray(jax.jit(lambda t: selection.topk_threshold(t, density))(_tree(values)))
  k = selection.topk_count(N, density)
  np.testing.assert_array_equal(thr, _kth_largest_abs(values, [k] * T))
  # Distinct values: exactly k entries kept per task.
  np.testing.assert_array_equal((np.abs(values) >= thr[:, None]).sum(1), [k] * T)


def test_topk_count_uses_decimal_density():
  assert selection.topk_count(10, 0.2) == 2       # 0.2 * 10 is 2.0000000000000004 in binary
  assert selection.topk_count(10, 0.21) == 3
  assert selection.topk_count(7, 1e-9) == 1
  assert selection.topk_count(7, 1.0) == 7


def test_per_leaf_threshold_matches_numpy():
  values = _values(2, "plateaus") + _values(3, "normal") * 1e-3
  tree = _tree(values)
  thr = jax.jit(lambda t: selection.topk_threshold(t, 0.3, per_leaf=True))(tree)
  for name, leaf in tree.items():
    flat = leaf.reshape(T, -1)
    k = selection.topk_count(flat.shape[1], 0.3)
    np.testing.assert_array_equal(np.asarray(thr[name]), _kth_largest_abs(flat, [k] * T))


def test_signed_and_values():
  values = _values(4, "normal")
  tree = _tree(values)
  got = jax.jit(lambda t: selection.kth_largest(t, 5, signed=True))(tree)
  np.testing.assert_array_equal(np.asarray(got), -np.sort(-values, axis=1)[:, 4])
  # A score computed position by position, with a reduction over the task axis.
  score = lambda x: x * jnp.sum(x, axis=0, keepdims=True)
  got = jax.jit(lambda t: selection.kth_largest(t, 7, signed=True, values=score))(tree)
  ref = values * values.sum(0, keepdims=True)
  np.testing.assert_array_equal(np.asarray(got), -np.sort(-ref, axis=1)[:, 6])


def test_keys_round_trip_and_order():
  v = np.array([-np.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0, np.inf], np.float32)
  signed = np.asarray(selection.signed_key(v))
  assert (np.diff(signed.astype(np.int64)) > 0).all()
  np.testing.assert_array_equal(np.asarray(selection.key_to_value(signed, signed=True)), v)
  mags = np.asarray(selection.abs_key(v))
  np.testing.assert_array_equal(np.asarray(selection.key_to_value(mags)), np.abs(v))


def _stats(fn, *args):
  """fn(*args) and the final state of the selection loop inside it."""
  def with_stats(*a):
    selection._DEBUG_STATS = []
    try:
      return fn(*a), selection._DEBUG_STATS[0]
    finally:
      selection._DEBUG_STATS = None
  out, stats = jax.jit(with_stats)(*args)
  return out, {k: np.asarray(v) for k, v in stats.items()}


def test_sample_and_compaction_paths(monkeypatch):
  # Shrink the sample so this small tree takes every step of the algorithm.
  monkeypatch.setattr(selection, "_SAMPLE_SIZE", 512)
  values = _values(5, "normal")
  k = selection.topk_count(N, 0.2)
  out, stats = _stats(lambda t: selection.kth_largest(t, k), _tree(values))
  np.testing.assert_array_equal(np.asarray(out), _kth_largest_abs(values, [k] * T))
  assert stats["compacted"] and (stats["lo"] == stats["hi"]).all()
  assert stats["passes"] <= 6


def test_crowded_compaction_falls_back_to_full_passes():
  # The five largest entries are a few ulps apart and share one fold slot of
  # the big leaf (rows 0-4 of one column), so
  # compaction sees 3+ bracket entries in a slot and full passes finish
  # (compaction folds those rows 16 at a time).
  rng = np.random.default_rng(6)
  values = (rng.uniform(-0.1, 0.1, (T, N))).astype(np.float32)
  tree = _tree(values)
  crowd = np.float32(2.0) + np.arange(5, dtype=np.float32) * np.float32(3e-7)
  tree["big"][:, :5, 0] = crowd
  flat = np.concatenate([v.reshape(T, -1) for v in tree.values()], 1)
  out, stats = _stats(lambda t: selection.kth_largest(t, 3, sample=False), tree)
  np.testing.assert_array_equal(np.asarray(out), _kth_largest_abs(flat, [3] * T))
  np.testing.assert_array_equal(np.asarray(out), [crowd[2]] * T)
  assert stats["compacted"]


def test_histogram_matches_numpy():
  rng = np.random.default_rng(7)
  x = rng.integers(0, 2**32, size=(T, 40, 1000), dtype=np.uint64).astype(np.uint32)
  small = rng.integers(0, 2**20, size=(T, 30), dtype=np.uint64).astype(np.uint32)
  base = np.array([[2**31], [0], [5]], np.uint32)
  shift = np.array([[27], [17], [0]], np.uint32)
  hist = jax.jit(lambda a, b, bs, sh: counting.histogram(
      [a, b], [0, 0], bs, sh, lambda p: [p]))(x, small, base, shift)
  keys = np.concatenate([x.reshape(T, -1), small], 1).astype(np.int64)
  b = np.minimum((np.maximum(keys, base) - base) >> shift.astype(np.int64), 7)
  ref = np.stack([(b == j).sum(1) for j in range(8)], 1)
  np.testing.assert_array_equal(np.asarray(hist)[:, 0], ref)


@pytest.mark.parametrize("shape,expect", [
    ((3, 768, 3072), (1, 12)),         # fold the rows 12 at a time
    ((3, 32, 32, 3, 768), (1, 8)),
    ((3, 40, 768), (1, 1)),            # small: no fold
    ((3, 65536), (1, 8)),              # a vector viewed as (64, 1024)
])
def test_fold_plan(shape, expect):
  _, axis, f = counting.fold_plan(shape, 15)
  assert (axis, f) == expect
