"""One process of the 2-process test in tests/test_multihost_train.py (not a test module itself).

    python tests/multihost_train_worker.py WORKDIR
    (with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set)

With 1 process (no cluster variables) it is the single-process reference on
8 CPU devices. Every process: sharded fine-tuning of a tiny BERT on two
tasks (data x fsdp mesh over all devices), an Orbax save + sharded restore,
task vectors stacked and merged on the mesh (research.merging, when present),
results gathered and written as WORKDIR/result_<process>.npz.
"""
import json
import os
import sys

import jax
import ml_collections
import numpy as np

METHODS = (("task_arithmetic", {"scale": 0.5}), ("ties", {"density": 0.3, "scale": 1.0}))


def _flat(tree, prefix):
  return {f"{prefix}/" + "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                                  for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(workdir: str) -> None:
  multi = "JAX_COORDINATOR_ADDRESS" in os.environ
  jax.config.update("jax_num_cpu_devices", 4 if multi else 8)
  if multi:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils
  from research import checkpoints, distributed, sharding, task_vectors, train
  from research.models import bert, minilm
  assert distributed.initialize() is multi
  pid = jax.process_index()
  assert jax.device_count() == 8

  config = bert.BertConfig(vocab_size=64, hidden=32, layers=1, heads=4, intermediate=64,
                           max_position=16)
  apply_fn, params0 = minilm.split_model(minilm.random_init(config, seed=0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, config.vocab_size, (32, 8)).astype(np.int32)
  inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  head = jax.random.normal(jax.random.key(1), (3, config.hidden))
  train_config = ml_collections.ConfigDict(dict(
      steps=3, batch_size=8, lr=1e-2, weight_decay=0.1, warmup_steps=1, clip_norm=1.0,
      checkpoint_every=2))
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
           ("vocab", None), ("position", None), ("token_type", None), ("task", None)]

  out, info = {}, {"process": pid, "processes": jax.process_count()}
  finetuned = []
  for task, column in enumerate((0, 1)):
    labels = (ids[:, column] % 3).astype(np.int32)
    params = train.finetune(apply_fn, params0, head, inputs, labels, mode="linear",
                            config=train_config, checkpoint_dir=f"{workdir}/ckpt/task{task}",
                            temperature=20.0, progress=False, mesh=mesh, rules=rules)
    finetuned.append(params)
    out.update(_flat(multihost_utils.process_allgather(params, tiled=True), f"ft{task}"))

  # Orbax round trip: every process saves its shards, then restores into the shardings.
  shardings = jax.tree.map(lambda x: x.sharding, finetuned[0])
  with checkpoints.Checkpointer(f"{workdir}/merged_inputs", max_to_keep=1) as ckpt:
    ckpt.save(1, finetuned[0], {"processes": jax.process_count()})
    ckpt.wait()
  target = sharding.abstract_with_sharding(finetuned[0], shardings)
  restored, meta = checkpoints.restore(f"{workdir}/merged_inputs", target=target)
  info["meta"] = meta
  info["restore_shardings_equal"] = all(
      a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(finetuned[0])))
  info["restore_equal"] = all(
      np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(multihost_utils.process_allgather(restored, tiled=True)),
          jax.tree.leaves(multihost_utils.process_allgather(finetuned[0], tiled=True))))

  # Merging on the mesh: stacked task vectors keep the parameter shardings.
  params0_sh = train.place(params0, shardings)
  taus = [task_vectors.task_vector(p, params0_sh) for p in (restored, finetuned[1])]
  stacked = task_vectors.stack(taus)
  stacked_sh = sharding.stacked_sharding(shardings, mesh, rules, stacked)
  stacked = jax.jit(lambda x: x, out_shardings=stacked_sh)(stacked)
  try:
    from research import merging
  except ImportError:
    merging = None
  if not hasattr(merging, "get"):  # Not written yet (merging is built concurrently).
    merging = None
  info["merged"], info["merge_vs_one_device"] = [], {}
  host_stacked = multihost_utils.process_allgather(stacked, tiled=True)
  if merging is not None:
    for name, hparams in METHODS:
      method = merging.get(name, **hparams)
      run = lambda s, m=method: m.apply(m.init(s), s)
      merged = jax.jit(run, in_shardings=(stacked_sh,), out_shardings=shardings)(stacked)
      merged = multihost_utils.process_allgather(merged, tiled=True)
      out.update(_flat(merged, f"merged_{name}"))
      info["merged"].append(name)
      # The same merge of the same task vectors on one local device.
      local = jax.jit(run)(jax.device_put(host_stacked, jax.local_devices()[0]))
      info["merge_vs_one_device"][name] = max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
          for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(local)))

  np.savez(f"{workdir}/result_{pid}.npz", **out)
  with open(f"{workdir}/result_{pid}.json", "w") as f:
    json.dump(info, f)
  if multi:
    multihost_utils.sync_global_devices("worker done")


if __name__ == "__main__":
  main(sys.argv[1])
