"""The tangent-space paper's analyses of *why* task arithmetic works, on the main job's suite.

Ortiz-Jimenez et al. (NeurIPS 2023) back their method with three analyses;
`run(config, workdir)` redoes each on MiniLM and the text tasks of
`research.reproduce`, reusing its model, data, heads, fine-tuned checkpoints
and (when compatible) its results.json:

1. NTK eigenfunction localization: the empirical NTK
   (`research.ntk`, trace over outputs, sketched) of the encoder at the
   pre-trained weights over inputs pooled from every task; the energy of its
   top eigenfunctions on each task. Also at a random initialisation, for
   contrast.
2. The kernel-regime test ("non-linear advantage"): per task, the
   single-task accuracy of standard fine-tuning, of the *same* task vector
   through the linearized model (posthoc) and of linear fine-tuning. If
   standard fine-tuning stayed in the kernel regime, standard == posthoc.
3. Disentanglement needs pre-training: the weight disentanglement
   error of standard and linear task vectors of a *randomly initialised*
   encoder of the same architecture, fine-tuned on the same tasks with the
   same recipe, beside the pre-trained one.

Random-init heads. The paper's heads are zero-shot heads from the model's
own text encoder. The consistent counterpart for a random encoder is the
same construction with *its* class-name embeddings: a head is part of the
model at theta_0, and every edit is then read through the head of the model
it edits. (Reusing the pre-trained heads would pair a random encoder with
directions from another model's embedding space, and a random fixed head
would change the protocol.) Such heads are nearly useless at init, so
zero-shot accuracy is near chance and all of the task is in the task vector:
`random_init.single_task` reports how much fine-tuning achieved, and
`solo_change` (how often a single task vector changes predictions on its own
task over the alpha grid) is the scale to read the disentanglement error
against: a task vector that changes nothing is trivially "disentangled".
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from research import analysis_figures
from research import data as data_lib
from research import evaluate
from research import ntk
from research import reproduce
from research.models import heads
from research.models import minilm

KERNEL_REGIME_MODES = ("standard", "posthoc", "linear")


def _with(config, **leaves):
  """A copy of `config` with dotted leaves replaced ("data.tasks": (...))."""
  new = config.copy_and_resolve_references()
  with new.unlocked():
    for path, value in leaves.items():
      *parents, leaf = path.split(".")
      node = new
      for part in parents:
        node = node[part]
      node[leaf] = value
  return new


def _pairs(config):
  return [tuple(p) for p in config.eval.disentangle_pairs]


def _pair_tasks(config):
  return list(dict.fromkeys(t for pair in _pairs(config) for t in pair))


# ----------------------------------------------------------------------------
# Reusing the main job.


def load_main_results(config) -> dict | None:
  """The main job's results.json if it was made with this preset, seed and tasks, else None."""
  path = os.path.join(config.reproduce_workdir, "results.json")
  if not (config.kernel_regime.reuse_main_results and os.path.isfile(path)):
    return None
  with open(path) as f:
    main = json.load(f)
  same = (main.get("preset") == config.preset and main.get("seed") == config.seed
          and set(config.data.tasks) <= set(main.get("tasks", ())))
  if not same:
    logging.info("%s is from another preset / seed / task list; recomputing.", path)
    return None
  return main


def _main_kernel_regime(main, config):
  if config.kernel_regime.split != "test":  # The main job reports test accuracy.
    return None
  try:
    return {t: {"zeroshot": main["zeroshot"][t],
                **{m: main["single_task"][m][t] for m in KERNEL_REGIME_MODES}}
            for t in config.data.tasks}
  except KeyError:
    return None


def _main_disentanglement(main, config):
  """The main job's xi grids for our pairs and modes, if its alpha grid is ours."""
  try:
    out = {}
    for mode in config.train.modes:
      d = main["disentanglement"][mode]
      alphas, grid = np.asarray(d["alphas"]), reproduce.disentangle_grid(config)
      if alphas.shape != grid.shape or not np.allclose(alphas, grid):
        return None
      out[mode] = {"alphas": d["alphas"],
                   "pairs": {f"{a}+{b}": d["pairs"][f"{a}+{b}"] for a, b in _pairs(config)}}
    return out
  except (KeyError, TypeError):
    return None


# ----------------------------------------------------------------------------
# The random-init model.


def random_init_model(config, sets, tasks):
  """`(apply_fn, params0, sets)` of a randomly initialised MiniLM-architecture encoder.

  Inputs and labels are the pre-trained model's; each head is rebuilt from the
  random encoder's own class-name embeddings (see the module docstring).
  """
  path = config.model.path or minilm.default_path()
  model = minilm.random_init(minilm.minilm_config(path), seed=config.random_init.seed)
  apply_fn, params0 = minilm.split_model(model)
  tokenizer = minilm.MiniLMTokenizer(os.path.join(path, minilm.TOKENIZER_FILE))
  embed = minilm.text_embedder(apply_fn, params0, tokenizer, max_len=config.model.max_len)
  random_sets = {}
  for t in tasks:
    spec = data_lib.spec(t)
    head = heads.zeroshot_head(embed, spec.class_names, spec.templates)
    random_sets[t] = {split: evaluate.LabeledSet(s.inputs, s.labels, head)
                      for split, s in sets[t].items()}
  return apply_fn, params0, random_sets


def head_similarity(sets) -> dict:
  """Mean pairwise cosine between the class rows of each task's head (1 = indistinguishable)."""
  out = {}
  for t, splits in sets.items():
    h = np.asarray(splits["test"].head, np.float64)
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    c = h @ h.T
    out[t] = float(c[~np.eye(len(c), dtype=bool)].mean())
  return out


# ----------------------------------------------------------------------------
# 1. NTK eigenfunction localization.


def ntk_inputs(config, sets):
  """Token ids, mask and task index of the NTK's inputs: the first n of each task's split."""
  n, split = config.ntk.examples_per_task, config.ntk.split
  ids, mask, groups = [], [], []
  for i, t in enumerate(config.data.tasks):
    inputs = sets[t][split].inputs
    if len(inputs["input_ids"]) < n:
      raise ValueError(f"ntk.examples_per_task={n} but task {t!r} has only "
                       f"{len(inputs['input_ids'])} {split} examples; lower it.")
    ids.append(inputs["input_ids"][:n])
    mask.append(inputs["attention_mask"][:n])
    groups += [i] * n
  return np.concatenate(ids), np.concatenate(mask), np.asarray(groups)


def _spectrum(kernel, groups, num_groups, sources, num_sources, top_k):
  values, vectors = ntk.top_eigenpairs(kernel, min(top_k, len(kernel)))
  energy = ntk.localization(vectors, groups, num_groups)
  by_source = ntk.localization(vectors, sources, num_sources)
  return {"eigenvalues": values.tolist(),
          "explained": (values / np.trace(kernel)).tolist(),
          "energy": energy.tolist(),
          "dominant_task": np.argmax(energy, -1).tolist(),
          "localization": float(energy.max(-1).mean()),
          "energy_by_source": by_source.tolist(),
          "localization_by_source": float(by_source.max(-1).mean())}


def ntk_analysis(config, workdir, models: dict, sets) -> dict:
  """Kernel, top eigenfunctions and their energy per task, for each model in `models`.

  Kernels are cached in `<workdir>/ntk/<model>.npz` with the settings that
  made them, so a rerun with the same settings skips the computation.
  """
  c = config.ntk
  ids, mask, groups = ntk_inputs(config, sets)
  tasks = list(config.data.tasks)
  # Tasks that read the same kind of text (WordNet glosses, fortunes, words)
  # share an input domain; localization can only separate domains.
  task_source = [data_lib.spec(t).source for t in tasks]
  source_names = list(dict.fromkeys(task_source))
  sources = np.asarray([source_names.index(task_source[g]) for g in groups])
  out = {"tasks": tasks, "examples_per_task": c.examples_per_task, "split": c.split,
         "outputs": c.outputs, "input_share": (np.bincount(groups) / len(groups)).tolist(),
         "chance_localization": ntk.chance_localization(groups, seed=config.seed),
         "sources": source_names, "task_source": task_source,
         "chance_localization_by_source": ntk.chance_localization(sources, seed=config.seed)}
  os.makedirs(os.path.join(workdir, "ntk"), exist_ok=True)
  settings = dict(tasks=tasks, n=c.examples_per_task, split=c.split, outputs=c.outputs,
                  seed=config.seed, max_len=config.model.max_len)
  for name in c.models:
    apply_fn, params = models[name]
    cache = os.path.join(workdir, "ntk", f"{name}.npz")
    start = time.time()
    kernel = _load_kernel(cache, settings, ids)
    if kernel is None:
      dim = jax.eval_shape(apply_fn, params, ids[:1], mask[:1]).shape[-1]
      projection = (None if c.outputs == 0 else
                    ntk.output_projection(jax.random.key(config.seed), dim, c.outputs))
      method = c.method
      if method == "auto":
        method = ntk.choose_method(
            apply_fn, params, ids, mask,
            projection=None if projection is None else projection[:1],
            batch_size=c.batch_size, memory_bytes=c.memory_mb * 2 ** 20)
      kernel = ntk.empirical_ntk(apply_fn, params, ids, mask, projection=projection,
                                 method=method, batch_size=c.batch_size,
                                 memory_bytes=c.memory_mb * 2 ** 20, output_chunk=1,
                                 progress=logging.info)
      np.savez(cache, kernel=kernel, ids=ids, method=method,
               settings=json.dumps(settings, sort_keys=True))
    else:
      method = str(np.load(cache)["method"])
    diag = np.diagonal(kernel)
    out[name] = {
        "method": method, "seconds": time.time() - start,
        "diag_mean": {t: float(diag[groups == i].mean()) for i, t in enumerate(tasks)},
        "raw": _spectrum(kernel, groups, len(tasks), sources, len(source_names), c.top_k),
        "cosine": _spectrum(ntk.cosine_normalize(kernel), groups, len(tasks), sources,
                            len(source_names), c.top_k),
    }
    logging.info("ntk %s: localization %.3f (raw), %.3f (cosine), %.0f s", name,
                 out[name]["raw"]["localization"], out[name]["cosine"]["localization"],
                 out[name]["seconds"])
  return out


def _load_kernel(path, settings, ids):
  if not os.path.isfile(path):
    return None
  with np.load(path) as f:
    if (str(f["settings"]) != json.dumps(settings, sort_keys=True)
        or not np.array_equal(f["ids"], ids)):
      return None
    return np.asarray(f["kernel"])


# ----------------------------------------------------------------------------
# 2. The kernel-regime test.


def kernel_regime(ev, taus, sets, split="test") -> dict:
  """Per task: accuracy of zero-shot, standard, posthoc (standard tau, linearized model), linear."""
  tasks = list(taus["standard"])
  data = {t: sets[t][split] for t in tasks}
  per_task = {t: {"zeroshot": ev.zeroshot_accuracy(data[t])} for t in tasks}
  for mode in KERNEL_REGIME_MODES:
    acc = evaluate.single_task(ev, mode, taus[reproduce.TAU_SOURCE[mode]], data)
    for t in tasks:
      per_task[t][mode] = acc[t]
  return per_task


def summarize_kernel_regime(per_task: dict) -> dict:
  """Adds the gaps (non-linear advantage = standard - posthoc) and the average row."""
  rows = {}
  for t, r in per_task.items():
    rows[t] = {**r, "nonlinear_advantage": r["standard"] - r["posthoc"],
               "linear_gap": r["standard"] - r["linear"]}
  keys = list(next(iter(rows.values())))
  rows["avg"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
  return rows


# ----------------------------------------------------------------------------
# 3. Disentanglement with and without pre-training.


def solo_change(config, ev, taus, sets) -> dict:
  """{mode: {task: share of val predictions alpha * tau_t changes, mean over alpha != 0}}."""
  n, grid = config.eval.disentangle_examples, reproduce.disentangle_grid(config)
  grid = np.concatenate([[0.0], grid[grid != 0]])[:, None]
  out = {}
  for mode in config.train.modes:
    out[mode] = {}
    for t in _pair_tasks(config):
      preds = ev.predictions(mode, [taus[mode][t]], grid, sets[t]["val"].take(n))
      out[mode][t] = float(np.mean(preds[1:] != preds[:1]))
  return out


# ----------------------------------------------------------------------------
# The pipeline.


def run(config, workdir: str) -> dict:
  """Runs the three analyses; returns the results dict written to `<workdir>/results.json`."""
  start, timings = time.time(), {}
  os.makedirs(workdir, exist_ok=True)
  apply_fn, params0, sets = reproduce.prepare(config)
  main = load_main_results(config)
  pair_tasks = _pair_tasks(config)
  r_apply, r_params0, r_sets = random_init_model(config, sets, pair_tasks)
  timings["prepare"] = time.time() - start
  results = {"preset": config.preset, "seed": config.seed, "tasks": list(config.data.tasks),
             "pairs": [f"{a}+{b}" for a, b in _pairs(config)],
             "reproduce_workdir": config.reproduce_workdir}

  t0 = time.time()
  results["ntk"] = ntk_analysis(
      config, workdir, {"pretrained": (apply_fn, params0), "random": (r_apply, r_params0)}, sets)
  timings["ntk"] = time.time() - t0

  # The pre-trained model: the main job's numbers where it has them, its
  # checkpoints (restored, or fine-tuned into its workdir) for the rest.
  t0 = time.time()
  regime = _main_kernel_regime(main, config) if main else None
  pre_dis = _main_disentanglement(main, config) if main else None
  needed = list(config.data.tasks) if regime is None else pair_tasks
  taus = reproduce.finetune_all(_with(config, **{"data.tasks": tuple(needed)}),
                                config.reproduce_workdir, apply_fn, params0, sets)
  timings["pretrained_finetune"] = time.time() - t0
  t0 = time.time()
  ev = evaluate.FamilyEvaluator(apply_fn, params0, batch_size=config.eval.batch_size)
  results["kernel_regime_source"] = "main results.json" if regime else "recomputed"
  if regime is None:
    regime = kernel_regime(ev, taus, sets, config.kernel_regime.split)
  results["kernel_regime"] = summarize_kernel_regime(regime)
  results["pretrained"] = {
      "disentanglement": pre_dis or reproduce.disentanglement_all(config, ev, taus, sets),
      "solo_change": solo_change(config, ev, taus, sets),
      "head_similarity": head_similarity({t: sets[t] for t in pair_tasks}),
  }
  timings["pretrained_eval"] = time.time() - t0

  # The random-init model: fine-tuned on the pair tasks, same recipe.
  t0 = time.time()
  r_config = _with(config, **{"data.tasks": tuple(pair_tasks), "train.lr": config.random_init.lr})
  r_taus = reproduce.finetune_all(r_config, os.path.join(workdir, "random_init"),
                                  r_apply, r_params0, r_sets)
  timings["random_finetune"] = time.time() - t0
  t0 = time.time()
  r_ev = evaluate.FamilyEvaluator(r_apply, r_params0, batch_size=config.eval.batch_size)
  results["random_init"] = {
      "seed": config.random_init.seed, "lr": config.random_init.lr,
      "single_task": summarize_kernel_regime(
          kernel_regime(r_ev, r_taus, r_sets, config.kernel_regime.split)),
      "disentanglement": reproduce.disentanglement_all(config, r_ev, r_taus, r_sets),
      "solo_change": solo_change(config, r_ev, r_taus, r_sets),
      "head_similarity": head_similarity({t: r_sets[t] for t in pair_tasks}),
  }
  timings["random_eval"] = time.time() - t0

  results["timings_s"] = timings
  results["wall_time_s"] = time.time() - start
  results["figures"] = analysis_figures.write_all(results, workdir)
  path = os.path.join(workdir, "results.json")
  with open(path + ".tmp", "w") as f:  # Write then rename: a kill never leaves half a file.
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)
  results["results_path"] = path
  return results


def format_report(results) -> str:
  """The three analyses as text tables."""
  n = results["ntk"]
  lines = [f"NTK eigenfunction localization ({len(n['tasks'])} tasks x "
           f"{n['examples_per_task']} inputs, {n['outputs'] or 'all'} output direction(s)); "
           "energy share of each top eigenfunction on its dominant task, mean over the top "
           f"{len(n['pretrained']['raw']['energy']) if 'pretrained' in n else ''} "
           f"(1 = localized; a random vector scores {n['chance_localization']:.2f})"]
  for name in ("pretrained", "random"):
    if name in n:
      r = n[name]
      lines.append(f"  {name:<11} by task: raw {r['raw']['localization']:.3f}  cosine "
                   f"{r['cosine']['localization']:.3f} | by source "
                   f"({n['chance_localization_by_source']:.2f} by chance): raw "
                   f"{r['raw']['localization_by_source']:.3f}  cosine "
                   f"{r['cosine']['localization_by_source']:.3f} | top eigenvalue "
                   f"{100 * r['raw']['explained'][0]:.0f}% of the trace")
      lines.append(f"  {'':<11} raw shares on the dominant task: "
                   f"{' '.join(f'{max(e):.2f}' for e in r['raw']['energy'])}")
  lines += ["", "Kernel-regime test: single-task test accuracy (%); non-linear advantage = "
            "standard - posthoc" + f" [{results['kernel_regime_source']}]",
            f"  {'task':<18}{'zero-shot':>10}{'standard':>10}{'posthoc':>9}{'linear':>8}"
            f"{'advantage':>11}"]
  for t, r in results["kernel_regime"].items():
    lines.append(f"  {t:<18}{100 * r['zeroshot']:>10.1f}{100 * r['standard']:>10.1f}"
                 f"{100 * r['posthoc']:>9.1f}{100 * r['linear']:>8.1f}"
                 f"{100 * r['nonlinear_advantage']:>+11.1f}")
  lines += ["", "Weight disentanglement error xi (mean over the alpha grid; lower is better), "
            "pre-trained vs random init; solo = share of predictions one task vector changes"]
  for name in ("pretrained", "random_init"):
    r = results[name]
    for mode, d in r["disentanglement"].items():
      xi = " ".join(f"{p}={v['mean']:.3f}" for p, v in d["pairs"].items())
      solo = " ".join(f"{t}={v:.2f}" for t, v in r["solo_change"][mode].items())
      lines.append(f"  {name:<12}{mode:<9} xi {xi}   solo {solo}")
  st = results["random_init"]["single_task"]["avg"]
  lines.append(f"  random-init single-task accuracy (avg over pair tasks, %): zero-shot "
               f"{100 * st['zeroshot']:.1f}, standard {100 * st['standard']:.1f}, posthoc "
               f"{100 * st['posthoc']:.1f}, linear {100 * st['linear']:.1f}")
  return "\n".join(lines)
