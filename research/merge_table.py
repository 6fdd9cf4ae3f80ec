"""The merging results table: every registered merge method on the main job's task vectors, standard and linear.

`run(config, workdir)` reuses the main job (`research.reproduce`): its model,
heads and data (`prepare`) and its fine-tuned task vectors (`finetune_all`,
which restores the checkpoints in `config.reproduce_workdir`). For every
registered method (`research.merging.METHODS`, or `config.merge.methods`) and every
mode (`standard`: task vectors of standard fine-tuning, evaluated with the
model; `linear`: task vectors of linearized fine-tuning, evaluated with the
linearized model through `evaluate.FamilyEvaluator`'s JVP cache) it

1. builds the method's data (Fisher diagonals, kernel-input Grams, the
   entropy / cross-entropy objectives of the learned methods) once per mode;
2. merges for every point of the method's grid (`config.merge.grids`) and
   evaluates `params0 + alpha * tau` on the validation subsets for every
   alpha of `config.merge.alphas` (alpha = 1 for `config.merge.unscaled`);
3. keeps the point with the best mean normalized validation accuracy and
   reports test accuracy there (the row's hparams: the grid point, plus
   ``"scaling"``: the chosen alpha).

results.json is `{method: {mode: {"absolute_avg", "normalized_avg",
"per_task": {task: {"absolute", "normalized"}}, "hparams", "seconds"}}}`,
with two reference rows in the same format: `zeroshot` (params0) and
`single_task` (each task's own fine-tuned model; normalized = 1).
Normalized accuracy is merged / single-task fine-tuned accuracy of the same
mode, per task. `seconds` is the wall time of the method in that mode: data
statistics, every merge of the grid and every evaluation. The file is
rewritten after every (method, mode), and (method, mode) pairs already in it
are skipped, so an interrupted run resumes; `meta.json` records the setup
and a rerun with another setup in the same workdir is refused.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from research import evaluate
from research import merging
from research import reproduce
from research import task_vectors
from research import train
from research.merging import data_stats
from research.merging import registry
# The data-dependent and learned methods register themselves on import (also imported by
# research.merging itself once listed there; registering is idempotent).
from research.merging import adamerging, atlas, doge, fisher, regmean, self_positioning  # noqa: F401  pylint: disable=unused-import
from research.models import heads
from research.models.param_tree import leaf_name

REFERENCE_ROWS = ("zeroshot", "single_task")
# The hparams key of the evaluation scaling alpha (params0 + alpha * tau); not "alpha",
# which some methods use for their own hyper-parameters (RegMean, LiNeS).
SCALING = "scaling"
# What each data-dependent method needs (see `_MethodData`); every other method
# only gets a PRNG key.
NEEDS = {"fisher": "fishers", "regmean": "grams", "adamerging_task": "unlabeled",
         "adamerging_layer": "unlabeled", "atlas": "labeled", "self_positioning": "labeled"}


# ----------------------------------------------------------------------------- data

def _subset(labeled: evaluate.LabeledSet, n: int) -> evaluate.LabeledSet:
  if not n:
    return labeled
  return evaluate.LabeledSet({k: v[:n] for k, v in labeled.inputs.items()},
                             labeled.labels[:n], labeled.head)


def _trim_width(inputs: dict, width: int) -> dict:
  return {k: np.asarray(v)[:, :width] for k, v in inputs.items()}


def _width(*sets: evaluate.LabeledSet) -> int:
  """Tokens needed by the longest example (right padding beyond it is masked, so cutting is exact)."""
  return int(max(np.asarray(s.inputs["attention_mask"]).sum(1).max() for s in sets))


def _batches(labeled: evaluate.LabeledSet, n: int, size: int, width: int) -> list:
  """The first n examples in batches of `size` (n rounded down to a multiple of it)."""
  n = max(size, (min(n, len(labeled.labels)) // size) * size)
  inputs = _trim_width(labeled.inputs, width)
  return [({k: v[i:i + size] for k, v in inputs.items()}, labeled.labels[i:i + size])
          for i in range(0, n, size)]


class _MethodData:
  """The keyword arguments of the data-dependent methods' `init`, for one mode, built on demand."""

  def __init__(self, config, apply_fn, params0, taus: dict, sets: dict, mode: str):
    self.config, self.apply_fn, self.params0, self.mode = config, apply_fn, params0, mode
    self.tasks = list(config.data.tasks)
    self.taus, self.sets = taus, sets
    self.temperature = config.model.temperature
    self.model = train.model_fn(apply_fn, mode)   # model(params, params0, ids, mask)
    self._cache = {}

  def get(self, kind: str) -> dict:
    if kind not in self._cache:
      self._cache[kind] = getattr(self, f"_{kind}")()
    return self._cache[kind]

  # Fisher: exact expectation over classes at each fine-tuned model, on training inputs.
  # Heads are padded to the largest class count (padded logits at -1e9 get probability 0,
  # so they contribute nothing) and passed with the inputs, so one compiled program serves
  # every task.
  def _fishers(self) -> dict:
    m = self.config.merge
    train_sets = [self.sets[t]["train"] for t in self.tasks]
    width = _width(*[_subset(s, m.stats_examples) for s in train_sets])
    c_max = max(s.head.shape[0] for s in train_sets)
    model, temperature, params0 = self.model, self.temperature, self.params0

    def logits_fn(params, inputs):
      emb = model(params, params0, inputs["input_ids"], inputs["attention_mask"])
      logits = jax.vmap(lambda e, h: heads.logits(e[None], h, temperature)[0])(emb, inputs["head"])
      return jnp.where(inputs["valid"], logits, -1e9)

    fishers = []
    for t, s in zip(self.tasks, train_sets):
      head = np.zeros((c_max, s.head.shape[1]), np.float32)
      head[:s.head.shape[0]] = np.asarray(s.head)
      valid = np.arange(c_max) < s.head.shape[0]
      batches = []
      for inputs, _ in _batches(s, m.stats_examples, min(m.stats_examples, 8), width):
        b = len(inputs["input_ids"])
        batches.append({**inputs, "head": np.repeat(head[None], b, 0),
                        "valid": np.repeat(valid[None], b, 0)})
      params_t = task_vectors.apply(self.params0, self.taus[t])
      fishers.append(data_stats.diagonal_fisher(logits_fn, params_t, batches))
    return {"fishers": task_vectors.stack(fishers)}

  # RegMean: Grams of every kernel's inputs at each fine-tuned model (at params0 for
  # linearized task vectors: the tangent model's layer outputs are x(params0) tau).
  def _grams(self) -> dict:
    m = self.config.merge
    grams = []
    for t in self.tasks:
      s = self.sets[t]["train"]
      width = _width(_subset(s, m.stats_examples))
      params = (task_vectors.apply(self.params0, self.taus[t]) if self.mode == "standard"
                else self.params0)
      batches = [(x["input_ids"], x["attention_mask"])
                 for x, _ in _batches(s, m.stats_examples, min(m.stats_examples, 16), width)]
      grams.append(data_stats.kernel_input_grams(self.apply_fn, params, batches,
                                                 weights_fn=_attention_mask))
    return {"grams": data_stats.stack_grams(grams)}

  def _learned(self, split: str, n: int, labeled: bool) -> dict:
    m = self.config.merge
    sources = [_subset(self.sets[t][split], n) for t in self.tasks]
    width = _width(*sources)
    per_task = [_batches(s, n, min(m.learn_batch, n), width) for s in sources]
    steps = min(len(b) for b in per_task)
    # One batch holds learn_batch examples of every task, concatenated along the batch axis
    # so that the model runs once per step; logits_fn splits the embeddings by task.
    batches = []
    for i in range(steps):
      inputs = {k: np.concatenate([b[i][0][k] for b in per_task]) for k in ("input_ids",
                                                                          "attention_mask")}
      labels = [np.asarray(b[i][1]) for b in per_task]
      batches.append((inputs, labels) if labeled else inputs)
    sizes = [len(b[0][1]) for b in per_task]
    model, temperature = self.model, self.temperature

    def logits_fn(tau, inputs, aux):
      params = task_vectors.apply(aux["params0"], tau)
      emb = model(params, aux["params0"], inputs["input_ids"], inputs["attention_mask"])
      out, start = [], 0
      for size, head in zip(sizes, aux["heads"]):
        out.append(heads.logits(emb[start:start + size], head, temperature))
        start += size
      return out

    aux = {"params0": self.params0, "heads": [jnp.asarray(s.head) for s in sources]}
    return {"logits_fn": logits_fn, "batches": batches, "aux": aux}

  def _unlabeled(self) -> dict:
    return self._learned("test", self.config.merge.adapt_examples, labeled=False)

  def _labeled(self) -> dict:
    return self._learned("train", self.config.merge.probe_examples, labeled=True)


def _attention_mask(input_ids, attention_mask):
  del input_ids
  return attention_mask


# ----------------------------------------------------------------------------- search

def grid_points(grid) -> list[dict]:
  """The cartesian product of ``{hparam: values}`` as a list of dicts (``[{}]`` for no grid)."""
  grid = dict(grid or {})
  names = sorted(grid)
  values = [tuple(grid[n]) if isinstance(grid[n], (list, tuple)) else (grid[n],) for n in names]
  return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def build_method(name: str, hparams: dict, kernels_only: bool = False) -> merging.Merge:
  """``merging.get(name, **hparams)``, restricted to the dense kernels when asked (other leaves: 0)."""
  method = merging.get(name, **hparams)
  if not kernels_only:
    return method
  mask = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, _: leaf_name(p).endswith("kernel"), tree)
  return merging.masked(method, mask, otherwise=merging.task_arithmetic(0.0))


def _accuracies(ev, mode, tau, alphas, sets: dict) -> dict:
  grid = np.asarray(alphas, np.float32)[:, None]
  return {t: ev.accuracy(mode, [tau], grid, s) for t, s in sets.items()}


def evaluate_method(name, mode, stacked, data: _MethodData, ev, val, test, single_val,
                    single_test, config) -> dict:
  """Grid search on validation, report on test, for one method and mode."""
  m = config.merge
  start = time.time()
  need = NEEDS.get(name)
  kwargs = dict(data.get(need)) if need else {}
  kwargs["key"] = jax.random.key(config.seed)
  grids = m.grids.to_dict() if hasattr(m.grids, "to_dict") else dict(m.grids)
  alphas = (1.0,) if name in m.unscaled else tuple(m.alphas)
  kernels_only = name in m.kernels_only
  best = None
  for point in grid_points(grids.get(name)):
    method = build_method(name, point, kernels_only)
    # Statistics-only inits compile to one program; learned inits run their own jitted loop.
    init = method.init if need in ("unlabeled", "labeled") else jax.jit(method.init)
    coeffs = init(stacked, **kwargs)
    tau = jax.jit(method.apply)(coeffs, stacked)
    val_acc = _accuracies(ev, mode, tau, alphas, val)
    score = np.mean([val_acc[t] / single_val[t] for t in val], axis=0)
    i = int(np.argmax(score))
    logging.info("%s %s %s: val normalized %s", name, mode, point, np.round(score, 3))
    if best is None or score[i] > best[0]:
      best = (float(score[i]), {**point, SCALING: float(alphas[i])}, tau)
  val_score, hparams, tau = best
  test_acc = {t: float(a[0]) for t, a in
              _accuracies(ev, mode, tau, [hparams[SCALING]], test).items()}
  return _row(test_acc, single_test, hparams, time.time() - start, val_score)


def _row(acc: dict, single: dict, hparams: dict, seconds: float, val_score=None) -> dict:
  per_task = {t: {"absolute": a, "normalized": a / single[t] if single[t] else 0.0}
              for t, a in acc.items()}
  row = {"absolute_avg": float(np.mean([p["absolute"] for p in per_task.values()])),
         "normalized_avg": float(np.mean([p["normalized"] for p in per_task.values()])),
         "per_task": per_task, "hparams": hparams, "seconds": float(seconds)}
  if val_score is not None:
    row["val_normalized_avg"] = val_score
  return row


# ----------------------------------------------------------------------------- files

def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:   # Write then rename: a kill never leaves half a file.
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _check_meta(workdir: str, meta: dict) -> None:
  path = os.path.join(workdir, "meta.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    keys = [k for k in meta if k != "methods" and old.get(k) != meta[k]]
    if keys:
      raise ValueError(
          f"{workdir} holds results made with another setup ({', '.join(keys)} differ: "
          f"{ {k: old.get(k) for k in keys} } vs { {k: meta[k] for k in keys} }). Fix: use "
          "another workdir (--workdir) or delete it.")
  _write_json(path, meta)


def ordered_methods(results: dict) -> list[str]:
  """Reference rows, then task arithmetic, then the other methods alphabetically."""
  rest = sorted(m for m in results if m not in REFERENCE_ROWS + ("task_arithmetic",))
  head = [m for m in REFERENCE_ROWS + ("task_arithmetic",) if m in results]
  return head + rest


def format_table(results: dict, modes) -> str:
  """Markdown: absolute / normalized test accuracy (%) per mode, then the chosen hparams."""
  modes = list(modes)
  head = "| method | " + " | ".join(f"{m} abs. | {m} norm." for m in modes) + " | seconds |"
  lines = [head, "|" + "---|" * (2 * len(modes) + 2)]
  for name in ordered_methods(results):
    cells = []
    for mode in modes:
      r = results[name].get(mode)
      cells += (["", ""] if r is None else
                [f"{100 * r['absolute_avg']:.1f}", f"{100 * r['normalized_avg']:.1f}"])
    secs = sum(r.get("seconds", 0.0) for r in results[name].values())
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
  lines += ["", "| method | " + " | ".join(f"{m} hparams" for m in modes) + " |",
            "|" + "---|" * (len(modes) + 1)]
  for name in ordered_methods(results):
    if name in REFERENCE_ROWS:
      continue
    cells = [", ".join(f"{k}={v}" for k, v in results[name].get(mode, {}).get("hparams", {}).items())
             for mode in modes]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def bar_chart(results: dict, modes, path: str) -> str:
  """Normalized test accuracy per method, one bar per mode."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [n for n in ordered_methods(results) if n != "single_task"]
  modes = list(modes)
  x = np.arange(len(names))
  width = 0.8 / len(modes)
  fig, ax = plt.subplots(figsize=(0.55 * len(names) + 3, 4.2))
  for i, mode in enumerate(modes):
    values = [100 * results[n].get(mode, {}).get("normalized_avg", np.nan) for n in names]
    ax.bar(x + (i - (len(modes) - 1) / 2) * width, values, width, label=mode)
  ax.axhline(100, color="gray", lw=0.8, ls="--")
  ax.set_xticks(x, names, rotation=45, ha="right")
  ax.set_ylabel("normalized test accuracy (%)")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- run

def _methods(config) -> list[str]:
  known = registry.names()   # merging.METHODS, plus anything registered since its import
  chosen = list(config.merge.methods) or list(known)
  unknown = [m for m in chosen if m not in known]
  if unknown:
    raise ValueError(f"config.merge.methods names unregistered methods {unknown}; registered: "
                     f"{', '.join(known)}.")
  return chosen


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the table; returns the results dict written to results.json."""
  start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  methods = _methods(config)
  modes = list(config.merge.modes)
  m = config.merge
  _check_meta(workdir, {"preset": config.preset, "seed": config.seed,
                        "tasks": list(config.data.tasks), "n_val": m.n_val, "n_test": m.n_test,
                        "reproduce_workdir": config.reproduce_workdir, "methods": methods})
  path = os.path.join(workdir, "results.json")
  results = {}
  if os.path.isfile(path):
    with open(path) as f:
      results = json.load(f)

  apply_fn, params0, sets = reproduce.prepare(config)
  # Orbax wants absolute checkpoint paths.
  taus = reproduce.finetune_all(config, os.path.abspath(config.reproduce_workdir), apply_fn,
                                params0, sets)
  ev = evaluate.FamilyEvaluator(apply_fn, params0, batch_size=config.eval.batch_size)
  tasks = list(config.data.tasks)
  val = {t: _subset(sets[t]["val"], m.n_val) for t in tasks}
  test = {t: _subset(sets[t]["test"], m.n_test) for t in tasks}

  for mode in modes:
    todo = [n for n in methods if mode not in results.get(n, {})]
    if not todo and all(mode in results.get(r, {}) for r in REFERENCE_ROWS):
      continue
    t0 = time.time()
    single_val = evaluate.single_task(ev, mode, taus[mode], val)
    single_test = evaluate.single_task(ev, mode, taus[mode], test)
    results.setdefault("single_task", {})[mode] = _row(single_test, single_test, {},
                                                       time.time() - t0)
    if mode not in results.get("zeroshot", {}):
      t0 = time.time()
      zs = {t: ev.zeroshot_accuracy(test[t]) for t in tasks}
      results.setdefault("zeroshot", {})[mode] = _row(zs, single_test, {}, time.time() - t0)
    _write_json(path, results)
    if not todo:
      continue
    stacked = task_vectors.stack([taus[mode][t] for t in tasks])
    data = _MethodData(config, apply_fn, params0, taus[mode], sets, mode)
    for name in tqdm.tqdm(todo, desc=f"merge ({mode})", leave=False):
      row = evaluate_method(name, mode, stacked, data, ev, val, test, single_val, single_test,
                            config)
      results.setdefault(name, {})[mode] = row
      logging.warning("%-18s %-8s normalized %.3f  absolute %.3f  %s  (%.0f s)", name, mode,
                      row["normalized_avg"], row["absolute_avg"], row["hparams"],
                      row["seconds"])
      _write_json(path, results)
    del stacked, data
  _write_json(path, results)

  table = format_table(results, modes)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  figure = bar_chart(results, modes, os.path.join(workdir, "merge_table.png"))
  return {"results": results, "table": table, "results_path": path, "figure": figure,
          "wall_time_s": time.time() - start}
