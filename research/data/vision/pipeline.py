"""Batches of preprocessed images for training and evaluation, sharded per process for multi-host runs.

Every process walks the same global index stream (`research.data.batching`,
deterministic in the seed, resumable at any step) and decodes only its own
contiguous slice of each global batch: rows
`[p * B / P, (p + 1) * B / P)` for process `p` of `P`. Stack the local batches
into one global array with `research.sharding.shard_batch`. The random crop of
an example depends on (seed, step, row in the global batch) alone, so the
global batch is the same whatever the number of processes.

Decoding and preprocessing run in a thread pool (Pillow and the TFDS decoders
release the GIL) and the next batches are prepared while the accelerator
works on the current one.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Iterator

import jax
import numpy as np

from research.data import batching
from research.data.vision import preprocess
from research.data.vision.datasets import Split


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is not in [0, process_count={count}).")
  return index, count


def _local_rows(global_batch: int, index: int, count: int) -> slice:
  if global_batch % count:
    raise ValueError(f"Global batch size {global_batch} is not divisible by the {count} processes; "
                     "choose a multiple of the process count.")
  local = global_batch // count
  return slice(index * local, (index + 1) * local)


def _prefetch(iterator: Iterator, depth: int) -> Iterator:
  """Runs `iterator` in a background thread, `depth` items ahead; stops it when the consumer stops."""
  if depth <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          break
      put(done)
    except BaseException as e:  # re-raised in the consumer
      put(e)
    finally:
      iterator.close()

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def _decode(split: Split, rows: np.ndarray, fn, pool) -> tuple[np.ndarray, np.ndarray]:
  def one(job):
    position, index = job
    example = split.example(index)
    return fn(np.asarray(example["image"]), position), int(example["label"])

  out = list(pool.map(one, enumerate(rows))) if pool else [one(j) for j in enumerate(rows)]
  images = np.stack([image for image, _ in out])
  labels = np.asarray([label for _, label in out], np.int32)
  return images, labels


def train_batches(split: Split, global_batch_size: int, *, seed: int, steps: int, start_step: int = 0,
                  image_size: int = 224, augment: bool = True, process_index: int | None = None,
                  process_count: int | None = None, num_threads: int = 8,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Training batches {'image': uint8 [B_local, S, S, 3], 'label': int32 [B_local]} for steps `start_step..steps-1`.

  Epoch-wise reshuffles of `split` (seeded); `augment` applies the paper's
  random resized crop, otherwise CLIP's evaluation crop.
  """
  index, count = _process(process_index, process_count)
  rows = _local_rows(global_batch_size, index, count)

  def generate():
    stream = batching.batches(len(split), global_batch_size, seed=seed, steps=steps, start_step=start_step)
    with concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else _NoPool() as pool:
      for step, global_idx in enumerate(stream, start=start_step):
        offset = rows.start

        def fn(image, position, step=step, offset=offset):
          if not augment:
            return preprocess.eval_image(image, image_size)
          rng = np.random.default_rng([seed, step, offset + position])
          return preprocess.train_image(image, rng, image_size)

        images, labels = _decode(split, global_idx[rows], fn, pool)
        yield {"image": images, "label": labels}

  return _prefetch(generate(), prefetch)


def eval_batches(split: Split, global_batch_size: int, *, image_size: int = 224,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int = 8, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order: {'image', 'label', 'mask'}; the last global batch is padded (mask False)."""
  index, count = _process(process_index, process_count)
  rows = _local_rows(global_batch_size, index, count)

  def generate():
    with concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else _NoPool() as pool:
      for global_idx, mask in batching.eval_batches(len(split), global_batch_size):
        fn = lambda image, _: preprocess.eval_image(image, image_size)
        images, labels = _decode(split, global_idx[rows], fn, pool)
        yield {"image": images, "label": labels, "mask": mask[rows]}

  return _prefetch(generate(), prefetch)


def eval_arrays(split: Split, *, image_size: int = 224, max_examples: int = 0, batch_size: int = 256,
                num_threads: int = 8) -> dict[str, np.ndarray]:
  """A whole evaluation split decoded once into memory: {'image': uint8 [N, S, S, 3], 'label': int32 [N]}.

  For protocols that pass over the same split many times (an alpha grid):
  every pass then costs model time only. `max_examples` > 0 keeps the first
  that many examples of the split. Every process decodes the whole split.
  """
  if max_examples > 0 and max_examples < len(split):
    split = Split(split.source, split.indices[:max_examples])
  n = len(split)
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  start = 0
  for batch in eval_batches(split, batch_size, image_size=image_size, process_index=0, process_count=1,
                            num_threads=num_threads):
    valid = int(batch["mask"].sum())
    images[start:start + valid] = batch["image"][:valid]
    labels[start:start + valid] = batch["label"][:valid]
    start += valid
  return {"image": images, "label": labels}


class _NoPool:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def num_steps(split: Split, global_batch_size: int, epochs: int) -> int:
  """Optimizer steps of `epochs` passes over `split` (the last partial batch of the stream dropped)."""
  return batching.num_batches(len(split), global_batch_size, epochs)
