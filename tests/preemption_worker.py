"""One fine-tuning run for tests/test_preemption.py (not a test module itself).

    python tests/preemption_worker.py CHECKPOINT_DIR OUT_NPZ [SECONDS_PER_STEP]

Fine-tunes a tiny BERT in `linear` mode, sharded over a (2, 2) mesh of 4 CPU
devices, and writes the final params to OUT_NPZ. SECONDS_PER_STEP > 0 makes
the input pipeline slow, so the test can kill the process between two
checkpoints. Prints `resuming_from=<step or None>` first.
"""
import sys
import time

import jax
import ml_collections
import numpy as np


class _SlowLabels(np.ndarray):
  """Labels whose batch reads take a while, like a slow input pipeline."""
  delay = 0.0

  def __getitem__(self, idx):
    if isinstance(idx, np.ndarray):
      time.sleep(type(self).delay)
    return super().__getitem__(idx)


def main(checkpoint_dir: str, out: str, delay: float) -> None:
  jax.config.update("jax_num_cpu_devices", 4)
  from research import checkpoints, sharding, train  # pylint: disable=import-outside-toplevel
  from research.models import bert, minilm  # pylint: disable=import-outside-toplevel

  config = bert.BertConfig(vocab_size=64, hidden=32, layers=1, heads=4, intermediate=64,
                           max_position=16)
  apply_fn, params0 = minilm.split_model(minilm.random_init(config, seed=0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, config.vocab_size, (32, 8)).astype(np.int32)
  inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  labels = (ids[:, 0] % 3).astype(np.int32).view(_SlowLabels)
  _SlowLabels.delay = delay
  head = jax.random.normal(jax.random.key(1), (3, config.hidden))
  train_config = ml_collections.ConfigDict(dict(
      steps=10, batch_size=8, lr=1e-2, weight_decay=0.1, warmup_steps=1, clip_norm=1.0,
      checkpoint_every=2))
  try:
    with checkpoints.Checkpointer(checkpoint_dir, read_only=True) as ckpt:
      latest = ckpt.latest_step()
  except FileNotFoundError:
    latest = None
  print(f"resuming_from={latest}", flush=True)
  mesh = sharding.make_mesh((2, 2), ("data", "fsdp"))
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
           ("vocab", None), ("position", None), ("token_type", None)]
  params = train.finetune(apply_fn, params0, head, inputs, labels, mode="linear",
                          config=train_config, checkpoint_dir=checkpoint_dir, temperature=20.0,
                          progress=False, mesh=mesh, rules=rules)
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(out, **flat)
  print("done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
