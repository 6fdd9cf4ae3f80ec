"""Deduplication and class-balanced, disjoint train / val / test splits."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def dedupe(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], np.ndarray]:
  """One example per distinct text; a text seen with two different labels is dropped."""
  label_of: dict[str, int] = {}
  for t, y in zip(texts, labels):
    label_of[t] = y if label_of.get(t, y) == y else -1
  kept = [(t, y) for t, y in label_of.items() if y >= 0]  # dicts keep first-seen order
  return [t for t, _ in kept], np.asarray([y for _, y in kept], np.int32)


def balanced_quota(available: Sequence[int], n: int) -> np.ndarray:
  """Per-class counts summing to `n`, as equal as the availability allows (water filling).

  Every class gets the same share, capped at what it has; what a small class
  cannot take goes to the others in equal parts. A remainder smaller than the
  number of open classes goes one each to the classes with most to spare
  (ties to the lower class index). Raises ValueError when `n` exceeds the total.
  """
  available = np.asarray(available, np.int64)
  if n < 0:
    raise ValueError(f"a split size must be >= 0, got {n}")
  if n > available.sum():
    raise ValueError(f"asked for {n} examples but only {int(available.sum())} are left")
  quota = np.zeros_like(available)
  while (left := n - int(quota.sum())) > 0:
    open_ = np.flatnonzero(quota < available)
    share = left // len(open_)
    if share == 0:
      spare = available[open_] - quota[open_]
      order = open_[np.lexsort((open_, -spare))]
      quota[order[:left]] += 1
    else:
      quota[open_] = np.minimum(quota[open_] + share, available[open_])
  return quota


def split_indices(labels: np.ndarray, num_classes: int, sizes: Sequence[int],
                  seed_seq: Sequence[int]) -> list[np.ndarray]:
  """Disjoint index arrays, one per requested size, each class-balanced.

  The splits are filled last to first (test, then val, then train for sizes
  `(train, val, test)`), each from what the later ones left, so evaluation
  splits are as balanced as possible and do not change when only an earlier
  size (the training set) changes. Deterministic in `seed_seq`.
  """
  labels = np.asarray(labels)
  perm_rng = np.random.default_rng([*seed_seq, 0])
  by_class = [perm_rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  taken = np.zeros(num_classes, np.int64)
  out = [None] * len(sizes)
  for k in reversed(range(len(sizes))):
    avail = np.array([len(ix) for ix in by_class]) - taken
    quota = balanced_quota(avail, sizes[k])
    idx = np.concatenate([by_class[c][taken[c]:taken[c] + quota[c]] for c in range(num_classes)])
    taken += quota
    out[k] = np.random.default_rng([*seed_seq, 1 + k]).permutation(idx)
  return out
