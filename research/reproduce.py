"""The main job: fine-tune per task (standard / linear), edit with task vectors, evaluate.

`run(config, workdir)` is the whole pipeline of the tangent-space paper in
miniature: zero-shot heads, fine-tuning per task and mode (resumable Orbax
checkpoints), single-task / task-addition / task-negation accuracy for the
`standard`, `linear` and `posthoc` modes, weight disentanglement heatmaps, and
`results.json` + figures in `workdir`.
"""
import json
import os
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from research import data as data_lib
from research import distributed
from research import evaluate
from research import figures
from research import lora
from research import sharding
from research import task_vectors
from research import train
from research.models import heads
from research.models import minilm

# Evaluation mode -> the fine-tuning mode whose task vectors it uses.
TAU_SOURCE = {"standard": "standard", "linear": "linear", "posthoc": "standard"}


def _labeled(tokenizer, split, head, max_len):
  texts, labels = split
  return evaluate.LabeledSet(tokenizer.tokenize(texts, max_len),
                             np.asarray(labels), head)


def prepare(config):
  """Model, heads and tokenized splits for every task and the control task."""
  model, tokenizer = minilm.load_minilm(config.model.path or None)
  apply_fn, params0 = minilm.split_model(model)
  embed_texts = minilm.text_embedder(apply_fn, params0, tokenizer,
                                     max_len=config.model.max_len)
  sizes = dict(n_train=config.data.n_train, n_val=config.data.n_val,
               n_test=config.data.n_test)
  tasks = {name: data_lib.load_task(name, seed=config.seed, **sizes)
           for name in (*config.data.tasks, config.data.control_task)}
  sets = {}
  for name, task in tasks.items():
    head = heads.zeroshot_head(embed_texts, task.class_names, task.templates)
    sets[name] = {split: _labeled(tokenizer, getattr(task, split), head,
                                  config.model.max_len)
                  for split in ("train", "val", "test")}
  return apply_fn, params0, sets


def _mesh(config):
  """The fine-tuning mesh of `config.mesh` (None: one device), and its logical axis rules."""
  m = config.get("mesh")
  if m is None or not m.mesh_shape:
    return None, None
  return sharding.make_mesh(m.mesh_shape, m.mesh_axes), m.logical_axis_rules


def _gather(tree):
  """A host copy of `tree` whose leaves may be sharded across devices and processes."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _mode_config(train_config, mode):
  """The train config of one mode: LoRA runs use `lora_lr` (low-rank factors want a larger step)."""
  if mode != "lora":
    return train_config
  out = train_config.copy_and_resolve_references()
  out.lr = train_config.lora_lr
  return out


def finetune_all(config, workdir, apply_fn, params0, sets, lora_factors=None):
  """{mode: {task: tau}}; each run restores from its checkpoint when finished.

  With `config.mesh.mesh_shape` set, each run is sharded over that mesh
  (`train.finetune(mesh=...)`); the task vectors come back gathered on the
  host, for evaluation. In `lora` mode the task vector is the densified
  update; pass a dict as `lora_factors` to also get `{task: factors}`.
  """
  mesh, rules = _mesh(config)
  taus = {}
  for mode in config.train.modes:
    taus[mode] = {}
    train_config = _mode_config(config.train, mode)
    for t in config.data.tasks:
      train_set = sets[t]["train"]
      trained = train.finetune(
          apply_fn, params0, train_set.head, train_set.inputs, train_set.labels,
          mode=mode, config=train_config, seed=config.seed,
          temperature=config.model.temperature,
          checkpoint_dir=os.path.join(workdir, "checkpoints", mode, t), mesh=mesh, rules=rules)
      if mesh is not None:
        trained = _gather(trained)
      if mode == "lora":
        if lora_factors is not None:
          lora_factors[t] = trained
        taus[mode][t] = lora.densify(trained, params0, alpha=train_config.lora_alpha)
      else:
        taus[mode][t] = task_vectors.task_vector(trained, params0)
  return taus


def evaluate_all(config, ev, taus, sets):
  tasks, control = list(config.data.tasks), config.data.control_task
  val = {t: sets[t]["val"] for t in tasks}
  test = {t: sets[t]["test"] for t in tasks}
  alphas = np.linspace(0.0, 1.0, config.eval.num_alphas)
  zs_control_val = ev.zeroshot_accuracy(sets[control]["val"])
  results = {
      "zeroshot": {t: ev.zeroshot_accuracy(test[t]) for t in tasks},
      "zeroshot_control": ev.zeroshot_accuracy(sets[control]["test"]),
      "single_task": {}, "task_addition": {}, "task_negation": {},
  }
  modes = [m for m in evaluate.EVAL_MODES if TAU_SOURCE[m] in taus]
  for mode in tqdm.tqdm(modes, desc="evaluate", leave=False):
    mode_taus = taus[TAU_SOURCE[mode]]
    single_val = evaluate.single_task(ev, mode, mode_taus, val)
    single_test = evaluate.single_task(ev, mode, mode_taus, test)
    results["single_task"][mode] = single_test
    results["task_addition"][mode] = evaluate.task_addition(
        ev, mode, mode_taus, val, test, alphas, single_val, single_test)
    results["task_negation"][mode] = evaluate.task_negation(
        ev, mode, mode_taus, val, test, sets[control]["val"], sets[control]["test"],
        alphas, zs_control_val, config.eval.control_ratio)

  results["disentanglement"] = disentanglement_all(config, ev, taus, sets)
  return results


def disentangle_grid(config) -> np.ndarray:
  """The alpha values of each axis of the xi(alpha_1, alpha_2) heatmaps."""
  return np.linspace(-config.eval.disentangle_max_alpha, config.eval.disentangle_max_alpha,
                     config.eval.disentangle_grid)


def disentanglement_all(config, ev, taus, sets) -> dict:
  """{mode: {"alphas", "pairs": {"a+b": {"xi", "mean"}}}} on validation subsets."""
  n, grid = config.eval.disentangle_examples, disentangle_grid(config)
  out = {}
  modes = [m for m in config.train.modes if m in train.FINETUNE_MODES]  # The paper's two.
  for mode in tqdm.tqdm(modes, desc="disentanglement", leave=False):
    pairs = {}
    for a, b in config.eval.disentangle_pairs:
      xi = evaluate.disentanglement(ev, mode, taus[mode][a], taus[mode][b],
                                    sets[a]["val"].take(n), sets[b]["val"].take(n), grid)
      pairs[f"{a}+{b}"] = {"xi": xi.tolist(), "mean": float(xi.mean())}
    out[mode] = {"alphas": grid.tolist(), "pairs": pairs}
  return out


def format_tables(results) -> str:
  """The paper's two tables as text."""
  lines = ["Task addition (test accuracy, %; alpha chosen on validation)",
           f"{'method':<12}{'alpha':>7}{'absolute':>10}{'normalized':>12}",
           f"{'zero-shot':<12}{'':>7}{100 * np.mean(list(results['zeroshot'].values())):>10.1f}{'':>12}"]
  for mode, r in results["task_addition"].items():
    lines.append(f"{mode:<12}{r['alpha']:>7.2f}{100 * r['absolute']['avg']:>10.1f}"
                 f"{100 * r['normalized']['avg']:>12.1f}")
  lines += ["", "Task negation (test accuracy, %; control >= "
            f"{results['control_ratio']:.2f} x zero-shot on validation)",
            f"{'method':<12}{'target':>8}{'control':>9}",
            f"{'zero-shot':<12}{100 * np.mean(list(results['zeroshot'].values())):>8.1f}"
            f"{100 * results['zeroshot_control']:>9.1f}"]
  for mode, r in results["task_negation"].items():
    lines.append(f"{mode:<12}{100 * r['target']['avg']:>8.1f}{100 * r['control']['avg']:>9.1f}")
  lines += ["", "Single-task fine-tuned accuracy (test, %)"]
  for mode, r in results["single_task"].items():
    per_task = " ".join(f"{t}={100 * a:.1f}" for t, a in r.items())
    lines.append(f"{mode:<12}{100 * np.mean(list(r.values())):>6.1f}  {per_task}")
  lines += ["", "Weight disentanglement error (mean over the alpha grid, lower is better)"]
  for mode, r in results["disentanglement"].items():
    lines.append(f"{mode:<12}" + " ".join(f"{p}={v['mean']:.3f}" for p, v in r["pairs"].items()))
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  """Runs the whole reproduction; returns the results dict written to results.json."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  apply_fn, params0, sets = prepare(config)
  taus = finetune_all(config, workdir, apply_fn, params0, sets)
  ev = evaluate.FamilyEvaluator(apply_fn, params0, batch_size=config.eval.batch_size)
  results = {"tasks": list(config.data.tasks), "control_task": config.data.control_task,
             "control_ratio": config.eval.control_ratio, "preset": config.preset,
             "seed": config.seed}
  results.update(evaluate_all(config, ev, taus, sets))
  results["wall_time_s"] = time.time() - start
  path = os.path.join(workdir, "results.json")
  results["results_path"] = path
  if not distributed.is_main_process():  # Every process computed; one writes.
    return results
  results["figures"] = {
      "disentanglement": figures.disentanglement_heatmaps(
          results["disentanglement"], os.path.join(workdir, "disentanglement.png")),
      "accuracy": figures.accuracy_bars(results, os.path.join(workdir, "accuracy.png")),
  }
  tmp = path + ".tmp"
  with open(tmp, "w") as f:  # Write then rename: a kill never leaves half a file.
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return results
