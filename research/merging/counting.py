"""Exact 8-bucket histograms of uint32 keys over a stacked pytree, one memory-bound pass each.

``histogram(sources, groups, base, shift, keys_fn)`` counts, for every task
``t`` and group ``g``, the keys of the group's entries in the 8 buckets

  bucket 0: key <  base + 2^shift
  bucket j: base + j 2^shift <= key < base + (j+1) 2^shift      (1 <= j <= 6)
  bucket 7: key >= base + 7 2^shift

(``base``, ``shift``: uint32 [T, G]; ``words=w`` gives 8 w buckets the same
way). It is the inner loop of the exact top-k
selection in ``selection.py``, so it is written for speed on every backend,
including XLA:CPU, where a reduction over a fused comparison runs several
times slower than memory bandwidth:

- No concatenation of large leaves: each is counted where it lives and the
  per-leaf histograms are added (a collective when the leaf is sharded).
  Leaves below ``FOLD_MIN_SIZE`` entries per task (biases, norms) are
  concatenated per group (``merge_small``): cheap, and a smaller program.
- Folding instead of reducing: one non-minor axis of a leaf is split as
  ``(d / F, F)`` and the F interleaved slices are added elementwise, which
  XLA fuses into one vectorised, memory-bound loop. Only the F-times smaller
  result is reduced. The slices stay contiguous in the trailing dimensions,
  and the fold stays on-device when that axis is block-sharded.
- Packed counters: an entry adds ``1 << 4 b`` for its bucket ``b`` (an
  arithmetic shift, no comparisons), i.e. increments one of eight 4-bit
  counters in a uint32. A fold of at most 15 slices cannot overflow them;
  one variadic reduction then sums the eight counters of the small result.

Model-sized buffers created: none (the folded accumulator is 1/F of a leaf,
F >= 8 for usual layer shapes).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BUCKETS = 8
_BITS = 4
_MAX_FOLD = (1 << _BITS) - 1     # slices a 4-bit counter can absorb
# 1-D leaves are viewed as (d / C, C) so that they too have a non-minor axis.
_VECTOR_CHUNKS = (1024, 512, 256, 128, 64)
# Below this many entries per task a plain reduction is cheap, and a smaller
# program compiles much faster.
FOLD_MIN_SIZE = 1 << 15


def _largest_divisor(d: int, limit: int) -> int:
  for f in range(min(limit, d), 1, -1):
    if d % f == 0:
      return f
  return 1


def fold_plan(shape: Sequence[int], max_fold: int) -> tuple[tuple[int, ...], int, int]:
  """How ``fold_parts`` folds an array of ``shape``: ``(view_shape, axis, F)``.

  ``shape`` includes the leading task axis. The fold axis is the non-minor,
  non-task axis with the largest divisor ``F <= max_fold`` (F = 1: no fold,
  also for arrays with fewer than ``FOLD_MIN_SIZE`` entries per task).
  """
  shape = tuple(shape)
  if math.prod(shape[1:]) < FOLD_MIN_SIZE:
    return shape, 1, 1
  if len(shape) == 2:
    d = shape[1]
    for c in _VECTOR_CHUNKS:
      if d % c == 0 and d // c >= 2:
        shape = (shape[0], d // c, c)
        break
  best_axis, best_f = 1, 1
  for ax in range(1, len(shape) - 1):
    f = _largest_divisor(shape[ax], max_fold)
    if f > best_f:
      best_axis, best_f = ax, f
  return shape, best_axis, best_f


def fold_parts(x: jax.Array, max_fold: int) -> list[jax.Array]:
  """The ``F`` interleaved slices of ``x`` whose elementwise sum is a fold (see module doc)."""
  view, ax, f = fold_plan(x.shape, max_fold)
  if f == 1:
    return [x]
  x = x.reshape(view[:ax] + (view[ax] // f, f) + view[ax + 1:])
  return [lax.index_in_dim(x, i, ax + 1, keepdims=False) for i in range(f)]


def members(group) -> tuple[int, ...]:
  """The groups a source belongs to: an int, or a tuple of ints (counted once per group)."""
  return tuple(group) if isinstance(group, (tuple, list)) else (int(group),)


def merge_small(sources: Sequence[jax.Array], groups: Sequence):
  """Concatenates the sources with fewer than ``FOLD_MIN_SIZE`` entries per task.

  Sources that belong to the same groups are concatenated together. Returns
  ``(sources, groups)``; large sources are returned untouched, empty ones
  dropped.
  """
  big, small = [], {}
  for src, g in zip(sources, groups):
    if src.size == 0:
      continue
    if src.size // src.shape[0] < FOLD_MIN_SIZE:
      small.setdefault(members(g), []).append(src.reshape(src.shape[0], -1))
    else:
      big.append((src, members(g)))
  for g, parts in small.items():
    big.append((jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], g))
  return [s for s, _ in big], [g for _, g in big]


def _unpack(acc: jax.Array) -> jax.Array:
  """Totals of the eight 4-bit counters of ``acc`` (uint32 [T, ..., m]) -> int32 [T, m, 8].

  One variadic reduction reads ``acc`` once for all eight counters (eight
  separate sums would each re-read it, or recompute it).
  """
  fields = tuple(((acc >> np.uint32(_BITS * j)) & np.uint32(0xF)).astype(jnp.int32)
                 for j in range(BUCKETS))
  zeros = tuple(np.int32(0) for _ in range(BUCKETS))
  totals = lax.reduce(fields, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)),
                      tuple(range(1, acc.ndim - 1)))
  return jnp.stack(totals, axis=-1)


def bucket(key: jax.Array, base: jax.Array, shift: jax.Array, n_buckets: int = BUCKETS) -> jax.Array:
  """Bucket index (uint32, 0 .. n_buckets - 1) of ``key`` (see module doc); base/shift broadcast."""
  return jnp.minimum((jnp.maximum(key, base) - base) >> shift, np.uint32(n_buckets - 1))


def _leaf_histogram(source, keys_fn, base, shift, keys_per_entry, words):
  """int32 [T, m, 8 words] for one source and m (base, shift) pairs ([T, m] each), in one pass.

  The m histograms share the fold (a trailing axis of the accumulator), so
  a source counted for several groups is read, and its keys computed, once.
  With ``words`` > 1 each entry increments one counter among ``words``
  packed words (a second trailing axis): 8 * words buckets in one pass.
  """
  t, m = base.shape
  n_buckets = BUCKETS * words
  acc = None
  for part in fold_parts(source, _MAX_FOLD // keys_per_entry):
    bshape = (t,) + (1,) * (part.ndim - 1) + (m,)
    b0, s0 = base.reshape(bshape), shift.reshape(bshape)
    for key in keys_fn(part):
      b = bucket(key[..., None], b0, s0, n_buckets)
      one_hot = jnp.left_shift(np.uint32(1), (b & np.uint32(BUCKETS - 1)) * np.uint32(_BITS))
      if words == 1:
        one_hot = one_hot[..., None]
      else:
        word = jnp.arange(words, dtype=jnp.uint32)
        one_hot = jnp.where((b >> 3)[..., None] == word, one_hot[..., None], np.uint32(0))
      acc = one_hot if acc is None else acc + one_hot
  # Without the barrier XLA duplicates the fold into each consumer of `acc`.
  acc = lax.optimization_barrier(acc)
  acc = acc.reshape(acc.shape[:-2] + (m * words,))
  return _unpack(acc).reshape(t, m, n_buckets)


def histogram(
    sources: Sequence[jax.Array],
    groups: Sequence,
    base: jax.Array,
    shift: jax.Array,
    keys_fn: Callable[[jax.Array], Sequence[jax.Array]],
    keys_per_entry: int = 1,
    words: int = 1,
) -> jax.Array:
  """int32 [T, G, 8 words]: per task and group, how many keys fall in each bucket.

  Args:
    sources: arrays with a leading task axis T (leaves, or arrays derived
      from them; XLA fuses an elementwise producer into the fold).
    groups: the group of each source (all 0 for one global count,
      ``range(len(sources))`` for per-leaf counts), or a tuple of groups when
      a source takes part in several counts (it is then read once per group
      in the same pass: cheaper than passing it twice, which would make XLA
      copy it to keep loop operands distinct).
    base, shift: uint32 [T, G]; bucket j >= 1 starts at ``base + j 2^shift``
      (``base + (8 words - 1) 2^shift`` must not overflow).
    keys_fn: maps a slice of a source to a list of ``keys_per_entry`` uint32
      arrays of the same shape (the keys to count).
    keys_per_entry: length of that list (at most 15).
    words: packed counter words per entry; 8 * words buckets.
  """
  base = jnp.asarray(base, jnp.uint32)
  shift = jnp.asarray(shift, jnp.uint32)
  t, g = base.shape
  hist = [jnp.zeros((t, BUCKETS * words), jnp.int32) for _ in range(g)]
  for src, grps in zip(sources, groups):
    if src.size == 0:
      continue
    gs = list(members(grps))
    h = _leaf_histogram(src, keys_fn, base[:, gs], shift[:, gs], keys_per_entry, words)
    for j, grp in enumerate(gs):
      hist[grp] = hist[grp] + h[:, j]
  return jnp.stack(hist, axis=1)
