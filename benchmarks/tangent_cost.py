"""Cost of one `linear` (tangent-space) training step over one `standard` step.

  python -m benchmarks.tangent_cost [--batch=32 --seq=32 --repeats=10]

Uses the MiniLM architecture (6-layer BERT, hidden 384, randomly initialised:
timing does not depend on the weights) with the project's own train step
(forward, backward, AdamW update) and a frozen head. Last line:
`linear_over_standard=<x>`; target <= 1.3 (the paper's PyTorch code pays 2-3x).
"""
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags

from research import train
from research.models import minilm

_BATCH = flags.DEFINE_integer("batch", 32, "Examples per step.")
_SEQ = flags.DEFINE_integer("seq", 32, "Tokens per example.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per mode (median).")
_CLASSES = 10


def time_mode(mode, apply_fn, params0, head, batch, repeats):
  config = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=1, steps=100,
                                          weight_decay=0.1, clip_norm=1.0))
  optimizer = train.make_optimizer(config)
  step = jax.jit(train.make_train_step(apply_fn, mode, optimizer, temperature=20.0),
                 donate_argnums=0)
  params = jax.tree.map(jnp.copy, params0)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  state, _ = step(state, params0, head, batch)  # Compile.
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, params0, head, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  apply_fn, params0 = minilm.split_model(minilm.random_init(seed=0))
  rng = np.random.default_rng(0)
  batch = {
      "input_ids": rng.integers(1000, 30000, (_BATCH.value, _SEQ.value)).astype(np.int32),
      "attention_mask": np.ones((_BATCH.value, _SEQ.value), np.int32),
      "label": rng.integers(0, _CLASSES, _BATCH.value).astype(np.int32),
  }
  head = jax.random.normal(jax.random.key(1), (_CLASSES, 384))
  seconds = {mode: time_mode(mode, apply_fn, params0, head, batch, _REPEATS.value)
             for mode in train.FINETUNE_MODES}
  for mode, s in seconds.items():
    print(f"{mode:<9} train step: {1e3 * s:.1f} ms (batch {_BATCH.value} x {_SEQ.value} tokens)")
  print(f"linear_over_standard={seconds['linear'] / seconds['standard']:.2f}")


if __name__ == "__main__":
  app.run(main)
