"""Exact k-th largest entry of each task of a stacked pytree, without concatenating its leaves.

``topk_threshold(stacked, density)`` returns, per task, the k-th largest
``|entry|`` over the *whole* task vector (all leaves together, k =
ceil(density * n)), as TIES-Merging's trim step needs (Yadav et al. 2023);
``per_leaf=True`` gives one threshold per leaf and task instead.
``kth_largest`` is the general form (signed order, derived scores, any k).

Algorithm (exact; one jitted program; the tree is only ever read):
  Keys. float32 values map to uint32 keys with the same order: the bit
  pattern of ``|x|`` (monotone for non-negative floats), or for signed order
  the pattern with the sign bit flipped (negatives: all bits flipped). The
  answer is found by narrowing a key bracket ``[lo, hi]`` that contains it,
  tracking ``#keys >= lo`` and ``#keys > hi``.

  1. Sample: about 32k entries per task (runs of 16 contiguous entries at
     regular strides along every axis), sorted; their ranks k_s -/+ 4 sigma
     (binomial) give keys ``L <= H`` that contain the answer with high
     probability.
  2. Cutting passes (``counting.histogram``: one read of the data, 8 buckets
     of width 2^s): the first puts 6 buckets on [L, H] and one on each side,
     so a misleading sample only costs passes, never correctness; later ones
     cut [lo, hi] in 8. A pass divides the width by 4 to 8.
  3. Compaction, once the bracket holds few entries: one pass folds each
     leaf 24 slices at a time, keeping per slot the two largest keys in the
     bracket (15-bit offsets) and whether there were more. When no slot saw
     three, this 1/24-size array holds every bracket entry and cutting passes
     over it finish the job. Otherwise step 2 continues on the full data to
     a one-key bracket.

Cost, measured on ViT-B/32-sized task vectors (88M entries per task): the
sample, three cutting passes, one compaction pass and about five passes
over the compacted array (1/24 of the data): roughly 4.5 reads of the data,
against 32 for a plain bisection on the bit pattern. Worst case (many
ties): ~16 cutting passes. No model-sized buffer is created as long as
``keys_fn`` fuses into its consumers; the compacted array is 1/24 of the
data (1/F for fold factor F).

Ties at the threshold: ``topk_threshold`` returns the k-th largest value v;
callers keep ``|x| >= v``: exactly k entries when v is unique, and every
entry equal to v otherwise.

Limits: counts are int32, so a group holds at most 2^31 - 1 entries per
task. NaN keys sort above +inf.
"""
from __future__ import annotations

import fractions
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research.merging import counting

PyTree = Any
_U32_MAX = np.uint32(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)
_FULL_WORDS = 1                            # packed words per pass: 8 buckets (more words cost more than they save on XLA:CPU)
_COMPACT_WORDS = 1
_OFFSET_BITS = 15                          # compaction: two offsets + a 2-bit count
_COMPACT_WIDTH = (1 << _OFFSET_BITS) - 1
_COMPACT_FOLD = 24
_MAX_PASSES = 64                           # safety cap; the worst case needs ~17
_SAMPLE_SIZE = 1 << 15                     # sampled entries per task and group
_SAMPLE_RUN = 16                           # contiguous entries per sample run
_DEBUG_STATS = None                        # tests set a list here to receive the loop state


# ----------------------------------------------------------------------------- keys

def abs_key(v: jax.Array) -> jax.Array:
  """uint32 keys ordered like ``|v|``."""
  return lax.bitcast_convert_type(jnp.abs(v.astype(jnp.float32)), jnp.uint32)


def signed_key(v: jax.Array) -> jax.Array:
  """uint32 keys ordered like ``v`` (-0.0 sorts just below +0.0)."""
  u = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
  return jnp.where(u >= _SIGN, ~u, u | _SIGN)


def key_to_value(key: jax.Array, signed: bool = False) -> jax.Array:
  """Inverse of ``abs_key`` (on non-negative values) or of ``signed_key``."""
  key = jnp.asarray(key, jnp.uint32)
  if signed:
    key = jnp.where(key >= _SIGN, key & ~_SIGN, ~key)
  return lax.bitcast_convert_type(key, jnp.float32)


# ------------------------------------------------------------------- bracket cuts

def _ceil_log2(x):
  """ceil(log2(x)) for uint32 x >= 1 (0 for x = 1)."""
  return jnp.where(x <= 1, np.uint32(0), np.uint32(32) - lax.clz(x - np.uint32(1)))


def _plan(lo, hi, low, high, first, n_buckets):
  """(base, shift) of the next pass.

  ``n_buckets`` buckets of width 2^s over [lo, hi]; on the first pass,
  ``n_buckets - 2`` over [low, high] with one bucket on each side of it.
  """
  log_b = n_buckets.bit_length() - 1                 # n_buckets is a power of two
  # Later passes: n_buckets * 2^s >= hi - lo + 1.
  width_bits = jnp.where(hi == lo, np.uint32(0), np.uint32(32) - lax.clz(hi - lo))
  s_cut = jnp.maximum(width_bits, np.uint32(log_b)) - np.uint32(log_b)
  # First pass: (n_buckets - 2) * 2^s >= high - low + 1, bucket 0 ends at `low`.
  s_first = _ceil_log2((high - low) // np.uint32(n_buckets - 2) + np.uint32(1))
  # (n_buckets - 1) * 2^s must fit in 32 bits; the last bucket is open-ended.
  shift = jnp.minimum(jnp.where(first, s_first, s_cut), np.uint32(32 - log_b))
  step = jnp.left_shift(np.uint32(1), shift)
  base = jnp.where(first, jnp.where(low >= step, low - step, np.uint32(0)), lo)
  # Keep base + (n_buckets - 1) * step from overflowing.
  return jnp.minimum(base, _U32_MAX - np.uint32(n_buckets - 1) * step), shift


def _cut(state, k, base, shift, hist):
  """Narrows the bracket with a histogram; keeps lo <= answer <= hi and the two counts."""
  lo, hi, atleast, above = state
  n_edges = hist.shape[-1] - 1
  step = jnp.left_shift(np.uint32(1), shift)
  j = jnp.arange(1, n_edges + 1, dtype=jnp.uint32)
  edges = base[..., None] + step[..., None] * j                      # bucket starts
  counts = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # #keys >= edge
  n_in = jnp.sum(counts >= k[..., None], axis=-1)                   # edges at or below the answer
  take = lambda a, i: jnp.take_along_axis(
      a, jnp.clip(i, 0, n_edges - 1)[..., None], -1)[..., 0]
  e_lo, c_lo = take(edges, n_in - 1), take(counts, n_in - 1)
  e_hi, c_hi = take(edges, n_in), take(counts, n_in)
  raise_lo = (n_in > 0) & (e_lo > lo)
  lower_hi = (n_in < n_edges) & (e_hi - np.uint32(1) < hi)
  return (jnp.where(raise_lo, e_lo, lo), jnp.where(lower_hi, e_hi - np.uint32(1), hi),
          jnp.where(raise_lo, c_lo, atleast), jnp.where(lower_hi, c_hi, above))


# ---------------------------------------------------------------------- compaction

def _compact(source, keys_fn, lo, hi):
  """Per fold slot: (#keys in [lo, hi], largest and second largest ``key - lo + 1``) packed.

  ``lo``, ``hi``: uint32 [T, m] for m groups at once; returns uint32
  [T, ..., m] (one pass over the source for all of them).
  """
  t, m = lo.shape
  count = m1 = m2 = None
  for part in counting.fold_parts(source, _COMPACT_FOLD):
    bshape = (t,) + (1,) * (part.ndim - 1) + (m,)
    l, h = lo.reshape(bshape), hi.reshape(bshape)
    (key,) = keys_fn(part)
    key = key[..., None]
    off = jnp.where((key >= l) & (key <= h), key - l + np.uint32(1), np.uint32(0))
    hit = (off > 0).astype(jnp.uint32)
    if count is None:
      count, m1, m2 = hit, off, jnp.zeros_like(off)
    else:
      count = jnp.minimum(count + hit, np.uint32(3))     # 3 means "3 or more"
      m2 = jnp.maximum(m2, jnp.minimum(m1, off))
      m1 = jnp.maximum(m1, off)
  return (count << (2 * _OFFSET_BITS)) | (m1 << _OFFSET_BITS) | m2


def _compacted_offsets(r):
  mask = np.uint32(_COMPACT_WIDTH)
  return [(r >> _OFFSET_BITS) & mask, r & mask]


def _compacted_count(r):
  return [r >> (2 * _OFFSET_BITS)]


def _compact_budget(n: int) -> int:
  """Most entries a bracket may hold for compaction to overflow with probability ~1%.

  A slot of F = 24 entries overflows when 3 fall in the bracket: expected
  (n / F) * C(F, 3) * (c / n)^3 slots for c bracket entries.
  """
  f = _COMPACT_FOLD
  return max(64, int((0.01 * n * n * f / math.comb(f, 3)) ** (1 / 3)))


# -------------------------------------------------------------------------- sample

def _largest_divisor(d, limit):
  for f in range(int(min(max(limit, 1), d)), 0, -1):
    if d % f == 0:
      return f
  return 1


def _subsample(x: jax.Array, factor: float) -> jax.Array:
  """About 1/``factor`` of x's entries, flattened to [T, m]: runs of contiguous entries.

  Every axis is split as ``(d / s, s, ...)`` and index 0 of ``s`` is kept
  (the minor axis in runs of 16 entries), which reads ~1/factor of the
  memory and is local to each device when the axes are block-sharded.
  """
  t = x.shape[0]
  if x.ndim == 2 or math.prod(x.shape[1:]) < counting.FOLD_MIN_SIZE:
    x = x.reshape(t, -1)
    step = max(1, int(factor))
    return x[:, ::step] if step > 1 else x
  axes = list(range(1, x.ndim))
  remaining = float(factor)
  for i, ax in enumerate(axes):
    d = x.shape[ax]
    run = _SAMPLE_RUN if (ax == x.ndim - 1 and d % _SAMPLE_RUN == 0) else 1
    want = remaining ** (1.0 / (len(axes) - i))
    s = _largest_divisor(d // run, want)
    if s > 1:
      split = (d // (s * run), s) + ((run,) if run > 1 else ())
      new = x.shape[:ax] + split + x.shape[ax + 1:]
      x = lax.index_in_dim(x.reshape(new), 0, ax + 1, keepdims=False)
      remaining /= s
  return x.reshape(t, -1)


def _sample_bracket(sources, groups, sizes, k, keys_fn, sigmas):
  """Keys (L, H), [T, G], from the sorted sample (L = 0, H = max where no sample)."""
  t, num_groups = k.shape
  target = max(_SAMPLE_SIZE // 32, _SAMPLE_SIZE // num_groups)
  parts = {}
  for src, grps in zip(sources, groups):
    for g in counting.members(grps):
      if sizes[g] >= 4 * target:
        parts.setdefault(g, []).append(_subsample(src, sizes[g] / target))
  low = [jnp.zeros((t,), jnp.uint32)] * num_groups
  high = [jnp.full((t,), _U32_MAX, jnp.uint32)] * num_groups
  if not parts:
    return jnp.stack(low, 1), jnp.stack(high, 1)
  keys = {g: keys_fn(jnp.concatenate(p, axis=1))[0] for g, p in parts.items()}
  m = max(v.shape[1] for v in keys.values())
  # Zero keys pad at the bottom, below every rank we read.
  padded = jnp.stack([jnp.pad(v, ((0, 0), (0, m - v.shape[1]))) for v in keys.values()], 1)
  ordered = jnp.sort(padded, axis=-1)                                   # [T, G', m]
  gs = list(keys)
  m_g = np.array([keys[g].shape[1] for g in gs], np.float32)
  n_g = np.array([sizes[g] for g in gs], np.float32)
  ks = k[:, gs].astype(jnp.float32) * (m_g / n_g)
  sd = jnp.sqrt(ks * jnp.maximum(1.0 - ks / m_g, 0.0))
  r_hi = jnp.clip(jnp.floor(ks - sigmas * sd - 1.0), 1, m_g).astype(jnp.int32)
  r_lo = jnp.clip(jnp.ceil(ks + sigmas * sd + 1.0), 1, m_g).astype(jnp.int32)
  at = lambda r: jnp.take_along_axis(ordered, (m - r)[..., None], -1)[..., 0]
  lo_s, hi_s = at(r_lo), at(r_hi)
  for i, g in enumerate(gs):
    low[g], high[g] = lo_s[:, i], hi_s[:, i]
  return jnp.stack(low, 1), jnp.stack(high, 1)


# ------------------------------------------------------------------------ selection

def select_keys(
    sources: Sequence[jax.Array],
    groups: Sequence,
    num_groups: int,
    k: jax.Array,
    keys_fn: Callable[[jax.Array], Sequence[jax.Array]],
    *,
    sample: bool = True,
    sigmas: float = 4.0,
) -> jax.Array:
  """uint32 [T, G]: the k[t, g]-th largest key among group g's entries of task t.

  The low-level entry point: ``sources`` are arrays with a leading task
  axis, each in group ``groups[i]`` (or in each group of a tuple: e.g. two
  ranks of the same leaf), ``keys_fn`` maps a slice of one to a one-element
  list of uint32 keys (it must act entry by entry). ``k`` (int, broadcast to [T, G]) is
  clipped to [1, n_g]. ``sample=False`` skips step 1 (tests use it).
  """
  t = sources[0].shape[0]
  sizes = np.zeros(num_groups, np.int64)
  for s, grps in zip(sources, groups):
    for g in counting.members(grps):
      sizes[g] += s.size // t
  if sizes.max() >= 2**31:
    raise ValueError(
        f"A selection group holds {int(sizes.max())} entries per task, but counts are "
        "int32 (at most 2^31 - 1). Fix: select per leaf (per_leaf=True) or on a "
        "masked subset of the leaves.")
  shape = (t, num_groups)
  k = jnp.clip(jnp.broadcast_to(jnp.asarray(k, jnp.int32), shape),
               1, jnp.asarray(np.maximum(sizes, 1), jnp.int32))
  sources, groups = counting.merge_small(sources, groups)

  if sample:
    low, high = _sample_bracket(sources, groups, sizes, k, keys_fn, sigmas)
  else:
    low, high = jnp.zeros(shape, jnp.uint32), jnp.full(shape, _U32_MAX, jnp.uint32)
  budget = jnp.asarray([_compact_budget(int(n)) for n in sizes], jnp.int32)

  def full_pass(s):
    base, shift = _plan(s["lo"], s["hi"], low, high, s["first"], 8 * _FULL_WORDS)
    hist = counting.histogram(sources, groups, base, shift, keys_fn, words=_FULL_WORDS)
    lo, hi, atleast, above = _cut((s["lo"], s["hi"], s["atleast"], s["above"]), k, base,
                                  shift, hist)
    return dict(s, lo=lo, hi=hi, atleast=atleast, above=above, first=jnp.array(False))

  def compaction(s):
    lo, hi = s["lo"], s["hi"]
    packed, p_groups = [], []
    for src, grps in zip(sources, groups):
      gs = list(counting.members(grps))
      both = _compact(src, keys_fn, lo[:, gs], hi[:, gs])
      packed += [both[..., j] for j in range(len(gs))]
      p_groups += gs
    # Buckets of width 1 from 0: bucket j counts slots that saw j bracket keys.
    zero = jnp.zeros(shape, jnp.uint32)
    crowded = jnp.sum(counting.histogram(packed, p_groups, zero, zero, _compacted_count)[..., 3:],
                      axis=-1)
    rank = k - s["above"]
    # Offsets of bracket entries are 1 .. hi - lo + 1 (0 marks an empty offset).
    r0 = (jnp.ones(shape, jnp.uint32), hi - lo + np.uint32(1),
          jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))

    def r_body(c):
      base, shift = _plan(c[0], c[1], c[0], c[1], False, 8 * _COMPACT_WORDS)
      # Under a loop-dependent cond so that XLA does not hoist the decoded keys
      # out of the loop (that would materialise them).
      hist = lax.cond(
          jnp.any(c[0] != c[1]),
          lambda: counting.histogram(packed, p_groups, base, shift, _compacted_offsets, 2,
                                     words=_COMPACT_WORDS),
          lambda: jnp.zeros(shape + (8 * _COMPACT_WORDS,), jnp.int32))
      return _cut(c, rank, base, shift, hist)

    off = lax.while_loop(lambda c: jnp.any(c[0] != c[1]), r_body, r0)[0]
    ok = (crowded == 0) & (lo != hi)
    key = lo + off - np.uint32(1)
    return dict(s, lo=jnp.where(ok, key, lo), hi=jnp.where(ok, key, hi),
                compacted=jnp.array(True))

  def body(s):
    active = s["lo"] != s["hi"]
    small = ((s["hi"] - s["lo"]) < np.uint32(_COMPACT_WIDTH)) & (s["atleast"] - s["above"] <= budget)
    ready = jnp.all(small | ~active) & ~s["compacted"] & ~s["first"]
    s = lax.cond(ready, compaction, full_pass, s)
    return dict(s, passes=s["passes"] + 1)

  state = dict(
      lo=jnp.zeros(shape, jnp.uint32), hi=jnp.full(shape, _U32_MAX, jnp.uint32),
      atleast=jnp.broadcast_to(jnp.asarray(sizes, jnp.int32), shape),
      above=jnp.zeros(shape, jnp.int32), first=jnp.array(True),
      compacted=jnp.array(False), passes=jnp.array(0, jnp.int32))
  final = lax.while_loop(
      lambda s: jnp.any(s["lo"] != s["hi"]) & (s["passes"] < _MAX_PASSES), body, state)
  if _DEBUG_STATS is not None:
    _DEBUG_STATS.append(final)
  return final["lo"]


# ------------------------------------------------------------------------ pytree API

def _leaves(stacked):
  leaves = jax.tree_util.tree_leaves(stacked)
  if not leaves:
    raise ValueError("Selection needs a stacked tree with at least one leaf.")
  return leaves


def kth_largest(
    stacked: PyTree,
    k: Any,
    *,
    per_leaf: bool = False,
    signed: bool = False,
    values: Callable[[jax.Array], jax.Array] | None = None,
    **options,
) -> PyTree:
  """float32 k-th largest entry per task: [T] (global) or a tree of [T] (``per_leaf``).

  Args:
    stacked: pytree of arrays with a leading task axis T.
    k: rank (1 = largest): an int, or ints broadcastable to [T, G] (G = 1,
      or the number of leaves with ``per_leaf``).
    per_leaf: one answer per leaf instead of one over all leaves.
    signed: rank the values themselves; by default their magnitudes.
    values: optional map applied to slices of each stacked leaf before
      ranking (e.g. a score). It sees slices along parameter axes with all
      tasks kept, so it must act position by position: elementwise maps and
      reductions over the task axis are fine.
    **options: ``sample``, ``sigmas`` (see ``select_keys``).
  """
  leaves = _leaves(stacked)
  values = (lambda p: p) if values is None else values
  to_key = signed_key if signed else abs_key
  keys_fn = lambda p: [to_key(values(p))]
  g = len(leaves) if per_leaf else 1
  groups = list(range(g)) if per_leaf else [0] * len(leaves)
  keys = select_keys(leaves, groups, g, k, keys_fn, **options)
  out = key_to_value(keys, signed)
  if not per_leaf:
    return out[:, 0]
  treedef = jax.tree_util.tree_structure(stacked)
  return jax.tree_util.tree_unflatten(treedef, [out[:, i] for i in range(g)])


def topk_count(n: int, density: float) -> int:
  """Entries kept at ``density``: ceil(density * n), at least 1.

  The product is taken on the decimal value of ``density`` (``0.2`` is 1/5,
  not the nearest binary float), so ``topk_count(10, 0.2) == 2``.
  """
  exact = fractions.Fraction(repr(float(density))) * n
  return max(1, min(n, math.ceil(exact)))


def topk_threshold(stacked: PyTree, density: float, *, per_leaf: bool = False,
                   **options) -> PyTree:
  """Per task, the k-th largest |entry| with k = ceil(density * n) (see module doc).

  n is the number of entries of one task's whole vector (or of one leaf with
  ``per_leaf=True``). Keeping ``|x| >= threshold`` keeps the top ``density``
  fraction (more only on exact ties at the threshold).
  """
  leaves = _leaves(stacked)
  t = leaves[0].shape[0]
  if per_leaf:
    k = np.array([[topk_count(x.size // t, density) for x in leaves]], np.int32)
  else:
    k = topk_count(sum(x.size for x in leaves) // t, density)
  return kth_largest(stacked, k, per_leaf=per_leaf, **options)
