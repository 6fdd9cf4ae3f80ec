"""Index batches of fixed shape: shuffled training streams and padded, masked evaluation."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
  # One generator per epoch, so a resumed run can jump straight to any step.
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def num_batches(n: int, batch_size: int, epochs: int) -> int:
  """Full batches in `epochs` passes over `n` examples (the last partial batch is dropped)."""
  return (n * epochs) // batch_size


def batches(n: int, batch_size: int, *, seed: int, epochs: int | None = None,
            steps: int | None = None, start_step: int = 0) -> Iterator[np.ndarray]:
  """Training index batches, each an int32 array of shape [batch_size].

  The stream is the concatenation of one fresh permutation of range(n) per
  epoch, cut into consecutive batches, so every batch is full and a batch may
  span an epoch boundary. Give exactly one of `epochs` (then the final partial
  batch is dropped: `num_batches(n, batch_size, epochs)` batches) or `steps`.
  `start_step` skips that many batches without computing them (resuming after
  preemption yields exactly the batches an uninterrupted run would have).
  Deterministic in `seed`.

  >>> [b.tolist() for b in batches(3, 2, seed=0, steps=3)]
  [[2, 0], [1, 2], [0, 1]]
  """
  if n <= 0 or batch_size <= 0:
    raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
  if (epochs is None) == (steps is None):
    raise ValueError("give exactly one of epochs= or steps=")
  if epochs is not None:
    steps = num_batches(n, batch_size, epochs)
    if steps == 0:
      raise ValueError(f"{epochs} epoch(s) of {n} examples do not fill one batch of {batch_size}")
  if steps < 0 or start_step < 0:
    raise ValueError(f"steps and start_step must be >= 0, got {steps}, {start_step}")
  return _stream(n, batch_size, seed, start_step, steps)  # arguments checked eagerly


def _stream(n: int, batch_size: int, seed: int, start: int, stop: int) -> Iterator[np.ndarray]:
  perms: dict[int, np.ndarray] = {}  # the (at most two) epochs the current batch touches
  for step in range(start, stop):
    epoch, pos = divmod(step * batch_size, n)
    parts, need = [], batch_size
    while need:
      if epoch not in perms:
        perms = {e: p for e, p in perms.items() if e >= epoch}
        perms[epoch] = _epoch_perm(n, seed, epoch)
      take = perms[epoch][pos:pos + need]
      parts.append(take)
      need -= len(take)
      epoch, pos = epoch + 1, 0
    yield np.concatenate(parts)


def eval_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """In-order `(indices, mask)` pairs of shape [batch_size] covering range(n) once.

  The last batch is padded with index 0 (a valid index, so gathers work) and
  `mask` is False on the padding; weight per-example metrics by the mask.
  """
  if n < 0 or batch_size <= 0:
    raise ValueError(f"need n >= 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
  return _padded(n, batch_size)


def _padded(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, min(lo + batch_size, n), dtype=np.int32)
    mask = np.ones(batch_size, bool)
    mask[len(idx):] = False
    yield np.pad(idx, (0, batch_size - len(idx))), mask


def gather(split: tuple[Sequence[str], np.ndarray], idx: np.ndarray) -> tuple[list[str], np.ndarray]:
  """The texts and labels of `split` (a `(texts, labels)` pair) at `idx`."""
  texts, labels = split
  return [texts[i] for i in idx], np.asarray(labels)[idx]
