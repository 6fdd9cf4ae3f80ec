"""A tiny random BERT and a learnable text task, for fast fine-tuning tests."""
import jax
import numpy as np

from research.models import minilm


def task(config, n: int = 32, length: int = 8, classes: int = 3):
  """(apply_fn, params0, head, inputs, labels): the label is the first token mod `classes`."""
  apply_fn, params0 = minilm.split_model(minilm.random_init(config, seed=0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, config.vocab_size, (n, length)).astype(np.int32)
  mask = np.ones((n, length), np.int32)
  mask[::3, length // 2:] = 0  # Some padding, so masking takes part.
  labels = (ids[:, 0] % classes).astype(np.int32)
  head = jax.random.normal(jax.random.key(1), (classes, config.hidden))
  return apply_fn, params0, head, {"input_ids": ids, "attention_mask": mask}, labels
