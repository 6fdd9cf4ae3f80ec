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

Routed methods (`ROUTED`: Twin-Merging) merge a different model for every
input, so they are evaluated per input (`evaluate_routed`): the router,
trained in `init` on the pre-trained model's sentence embeddings of
`merge.router_examples` training inputs per task, gives each validation /
test input its weights w(x), and the input is embedded by its own model
params0 + compose(coeffs, w(x)) (the linearized model in `linear` mode),
exactly, one input after another (16 per compiled call). No alpha is searched
(alpha = 1); their rows add ``"routing": "per_input"`` and
``"router_accuracy"`` ({"val", "test"}: how often argmax w(x) is the input's
own task).

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

import functools
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
from research.merging.twin import twin as twin_lib
from research.models import heads
from research.models.param_tree import leaf_name

REFERENCE_ROWS = ("zeroshot", "single_task")
# The hparams key of the evaluation scaling alpha (params0 + alpha * tau); not "alpha",
# which some methods use for their own hyper-parameters (RegMean, LiNeS).
SCALING = "scaling"
# What each data-dependent method needs (see `_MethodData`); every other method
# only gets a PRNG key.
NEEDS = {"fisher": "fishers", "regmean": "grams", "adamerging_task": "unlabeled",
         "adamerging_layer": "unlabeled", "atlas": "labeled", "self_positioning": "labeled",
         "twin": "router", "lora_lego": "factors", "scalearn": "labeled"}
# Methods that only run on LoRA task vectors (mode `lora`); `config.merge.lora_methods`
# lists what runs in that mode.
LORA_ONLY = ("lora_lego", "scalearn")
# The evaluation mode of each table mode: LoRA task vectors are evaluated like standard
# ones (params0 + alpha * densified update, through the network itself).
EVAL_MODE = {"standard": "standard", "linear": "linear", "lora": "standard"}
# Methods whose merged model depends on the input: evaluated by `evaluate_routed`.
ROUTED = ("twin",)


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

  def __init__(self, config, apply_fn, params0, taus: dict, sets: dict, mode: str,
               lora_factors: dict | None = None):
    self.config, self.apply_fn, self.params0, self.mode = config, apply_fn, params0, mode
    self.lora_factors = lora_factors
    self.tasks = list(config.data.tasks)
    self.taus, self.sets = taus, sets
    self.temperature = config.model.temperature
    self.model = train.model_fn(apply_fn, mode)   # model(params, params0, ids, mask)
    self._cache = {}

  # LoRA-LEGO: the tasks' LoRA factors, stacked, and their alpha.
  def _factors(self) -> dict:
    return {"factors": task_vectors.stack([self.lora_factors[t] for t in self.tasks]),
            "alpha": self.config.train.lora_alpha}

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

  # Twin-Merging's router learns the task of an input from the pre-trained model's sentence
  # embedding, on `router_examples` training inputs per task (as the reference code does):
  # inputs that are neither the validation examples the hparams are selected on nor the
  # test examples.
  def _router(self) -> dict:
    feats = [self.features(t, "train") for t in self.tasks]
    ids = [np.full(len(f), i, np.int32) for i, f in enumerate(feats)]
    return {"features": np.concatenate(feats), "task_ids": np.concatenate(ids)}

  def labeled(self, task: str, split: str) -> evaluate.LabeledSet:
    """The subset of ``split`` of ``task`` the table uses (val / test: as `run`; train: the router's)."""
    m = self.config.merge
    n = {"val": m.n_val, "test": m.n_test, "train": m.router_examples}[split]
    return _subset(self.sets[task][split], n)

  def features(self, task: str, split: str) -> np.ndarray:
    """[N, D] embeddings by the pre-trained model of ``labeled(task, split)`` (the router's input)."""
    key = ("features", task, split)
    if key not in self._cache:
      inputs = self.labeled(task, split).inputs
      size, n = self.config.eval.batch_size, len(inputs["input_ids"])
      if "forward" not in self._cache:
        self._cache["forward"] = jax.jit(self.apply_fn)
      out = []
      for i in range(0, n, size):   # rows padded to one batch shape: one compilation
        rows = np.minimum(np.arange(i, i + size), n - 1)
        emb = self._cache["forward"](self.params0, inputs["input_ids"][rows],
                                     inputs["attention_mask"][rows])
        out.append(np.asarray(emb)[:min(size, n - i)])
      self._cache[key] = np.concatenate(out)
    return self._cache[key]


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
    # LoRA-LEGO's init reads its alpha as a Python number, so it is not traced either.
    init = method.init if need in ("unlabeled", "labeled", "factors") else jax.jit(method.init)
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


# ----------------------------------------------------------------------------- routed (twin)

@functools.lru_cache(maxsize=8)
def _per_input_fn(apply_fn, mode: str):
  """Jitted ``(params0, coeffs, w [n, T], ids [n, L], mask [n, L]) -> [n, D]``, one model per row.

  Row i is embedded by ``model(params0 + compose(coeffs, w_i))``, where ``model`` is the
  network (``standard``) or its linearization around params0 (``linear``: one JVP per row).
  """
  model = train.model_fn(apply_fn, mode)

  @jax.jit
  def embed(params0, coeffs, weights, ids, mask):
    def one(w, i, m):
      params = task_vectors.apply(params0, twin_lib.compose(coeffs, w))
      return model(params, params0, i[None], m[None])[0]
    # A loop, not vmap: one model-sized buffer at a time (and measured faster on CPU).
    return jax.lax.map(lambda args: one(*args), (weights, ids, mask))
  return embed


def _routed_embeddings(mode, data: _MethodData, coeffs, weights, labeled,
                       chunk: int = 16) -> np.ndarray:
  """Embeddings [N, D] of each input under its own routed model params0 + compose(coeffs, w_n).

  Per input, exactly: every input gets its own composed task vector and its own forward
  pass (a JVP in ``linear`` mode), ``chunk`` inputs per compiled call. Inputs keep their
  full (padded, masked) width and the last chunk is padded, so one program serves every
  set. (Caching the T + 1 JVPs of the tangent model would be exact too, but costs T + 1
  JVPs per input instead of one.)
  """
  weights = np.asarray(weights, np.float32)
  ids, mask = labeled.inputs["input_ids"], labeled.inputs["attention_mask"]
  fn = _per_input_fn(data.apply_fn, mode)
  n, out = len(weights), []
  for i in range(0, n, chunk):
    rows = np.minimum(np.arange(i, i + chunk), n - 1)
    emb = fn(data.params0, coeffs, weights[rows], ids[rows], mask[rows])
    out.append(np.asarray(emb)[:min(chunk, n - i)])
  return np.concatenate(out)


def _routed_accuracy(mode, data, coeffs, split: str) -> tuple[dict, float]:
  """({task: accuracy}, router accuracy) of per-input routing on ``split`` of every task."""
  acc, hits, total = {}, 0, 0
  for i, t in enumerate(data.tasks):
    labeled = data.labeled(t, split)
    weights = np.asarray(twin_lib.route(coeffs, data.features(t, split)))
    emb = _routed_embeddings(mode, data, coeffs, weights, labeled)
    pred = np.argmax(np.asarray(heads.logits(jnp.asarray(emb), labeled.head)), -1)
    acc[t] = float(np.mean(pred == labeled.labels))
    hits, total = hits + int(np.sum(np.argmax(weights, 1) == i)), total + len(weights)
  return acc, hits / total


def evaluate_routed(name, mode, stacked, data: _MethodData, single_val, single_test,
                    config) -> dict:
  """Twin-Merging with per-input routing: grid search on validation, report on test."""
  start = time.time()
  kwargs = {**data.get(NEEDS[name]), "key": jax.random.key(config.seed)}
  grids = config.merge.grids.to_dict() if hasattr(config.merge.grids, "to_dict") else dict(
      config.merge.grids)
  best = None
  for point in grid_points(grids.get(name)):
    method = merging.get(name, **point)
    # Dense residuals: every input composes its own task vector, a weighted sum each.
    coeffs = twin_lib.densify(jax.jit(method.init)(stacked, **kwargs))
    acc, routed = _routed_accuracy(mode, data, coeffs, "val")
    score = float(np.mean([acc[t] / single_val[t] for t in acc]))
    logging.info("%s %s %s: val normalized %.3f (router val accuracy %.3f)", name, mode, point,
                 score, routed)
    if best is None or score > best[0]:
      best = (score, point, coeffs, routed)
    del coeffs
  val_score, point, coeffs, routed_val = best
  test_acc, routed_test = _routed_accuracy(mode, data, coeffs, "test")
  row = _row(test_acc, single_test, {**point, SCALING: 1.0}, time.time() - start, val_score)
  row["routing"] = "per_input"
  row["router_accuracy"] = {"val": routed_val, "test": routed_test}
  return row


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

def feedable(name: str) -> bool:
  """Whether the table can build what method ``name``'s init needs (a key, or a `NEEDS` kind)."""
  factory = registry._factory(name)  # pylint: disable=protected-access
  needs = [r for r in getattr(factory, "requires", ()) if r != "key"]
  return not needs or name in NEEDS


def _mode_methods(methods, mode: str, config) -> list[str]:
  """The methods that run in table mode `mode`: `merge.lora_methods` for LoRA task vectors."""
  if mode == "lora":
    return [n for n in methods if n in config.merge.lora_methods]
  return [n for n in methods if n not in LORA_ONLY]


def _methods(config) -> list[str]:
  known = registry.names()   # merging.METHODS, plus anything registered since its import
  unknown = [m for m in config.merge.methods if m not in known]
  if unknown:
    raise ValueError(f"config.merge.methods names unregistered methods {unknown}; registered: "
                     f"{', '.join(known)}.")
  if config.merge.methods:
    chosen = list(config.merge.methods)
    unfed = [m for m in chosen if not feedable(m)]
    if unfed:
      raise ValueError(f"config.merge.methods names {unfed}, whose init needs data this table "
                       "does not build (see merge_table.NEEDS). Fix: leave them out.")
    return chosen
  # Every registered method the table can feed; others (e.g. ones needing LoRA factors) are
  # skipped until the table builds their data.
  skipped = [m for m in known if not feedable(m)]
  if skipped:
    logging.warning("merge table: skipping %s (their data is not built here).", skipped)
  return [m for m in known if feedable(m)]


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
  # Orbax wants absolute checkpoint paths. LoRA runs only when the table has a `lora` mode.
  config = config.copy_and_resolve_references()
  config.train.modes = tuple(mode for mode in ("standard", "linear", "lora")
                             if mode in modes or mode in config.train.modes)
  lora_factors = {}
  taus = reproduce.finetune_all(config, os.path.abspath(config.reproduce_workdir), apply_fn,
                                params0, sets, lora_factors=lora_factors)
  ev = evaluate.FamilyEvaluator(apply_fn, params0, batch_size=config.eval.batch_size)
  tasks = list(config.data.tasks)
  val = {t: _subset(sets[t]["val"], m.n_val) for t in tasks}
  test = {t: _subset(sets[t]["test"], m.n_test) for t in tasks}

  for mode in modes:
    todo = [n for n in _mode_methods(methods, mode, config) if mode not in results.get(n, {})]
    ev_mode = EVAL_MODE[mode]
    if not todo and all(mode in results.get(r, {}) for r in REFERENCE_ROWS):
      continue
    t0 = time.time()
    single_val = evaluate.single_task(ev, ev_mode, taus[mode], val)
    single_test = evaluate.single_task(ev, ev_mode, taus[mode], test)
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
    data = _MethodData(config, apply_fn, params0, taus[mode], sets, ev_mode,
                       lora_factors if mode == "lora" else None)
    for name in tqdm.tqdm(todo, desc=f"merge ({mode})", leave=False):
      if name in ROUTED:
        row = evaluate_routed(name, ev_mode, stacked, data, single_val, single_test, config)
      else:
        row = evaluate_method(name, ev_mode, stacked, data, ev, val, test, single_val,
                              single_test, config)
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
