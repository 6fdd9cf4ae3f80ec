"""The tangent-space paper at full scale: CLIP image encoders fine-tuned on eight image tasks, then edited.

Two runs, each driven by one config of `configs/paper/`:

* `finetune(config, workdir)`: the converted CLIP checkpoint (or, in
  `runlocal`, a random tiny CLIP) -> the task's TFDS splits -> its frozen
  zero-shot head from the text tower -> `train.finetune` in `standard` or
  `linear` mode (sharded over the config's mesh, batches streamed from disk,
  resumable) -> the fine-tuned image-encoder Params as an Orbax checkpoint in
  `<workdir>/params` (the layout `experiments.convert_clip` writes, so the
  task-vector papers' published encoders load the same way) -> results.json
  with the fine-tuned and zero-shot accuracy on validation and test.
* `evaluate(config, workdir)`: the pre-trained CLIP, the heads and
  validation / test splits of the eight tasks and of ImageNet, and the task
  vector of every task, read from the fine-tuning runs found under
  `config.finetune_root` -> the protocols of `research.evaluate` (single-task,
  task addition, task negation) for one mode (`standard`, `linear`,
  `posthoc`), or zero-shot accuracy (`none`) -> results.json.

Evaluation runs on one device per process, every process computing the same
numbers and process 0 writing them; the evaluation splits are decoded once
into host memory (uint8, about 25 GB at 224 pixels for all the splits,
ImageNet's 50,000 included) and task vectors are kept on the host.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from research import checkpoints
from research import distributed
from research import evaluate as protocols
from research import sharding
from research import task_vectors
from research import train
from research.data import vision
from research.models import clip
from research.models import clip_convert
from research.models import clip_tokenizer
from research.models import heads

RESULTS_FILE = "results.json"
PARAMS_DIR = "params"
CHECKPOINT_DIR = "checkpoints"
IMAGE_INPUTS = ("image",)
# runlocal's tiny CLIP: one block per tower (the smoke runs compile fast) and CLIP's 77-token
# context, so that prompts are not cut before the class name and the heads' rows differ.
TINY = dict(vision_layers=1, text_layers=1, context_length=clip_tokenizer.CONTEXT_LENGTH)
# Evaluation mode -> the fine-tuning mode whose task vectors it reads.
TAU_SOURCE = {"standard": "standard", "linear": "linear", "posthoc": "standard"}


# --------------------------------------------------------------------------------------
# Model, tokenizer, heads.


def build_model(model_config: ml_collections.ConfigDict, seed: int = 0) -> clip.CLIP:
  """The pre-trained CLIP of `config.model`, on this process's first device.

  A converted checkpoint (`model.checkpoint`) must hold both towers and match
  `model.variant`; `model.dtype` and `model.remat` override what it recorded.
  With no checkpoint, `variant='tiny'` is a random tiny CLIP (seeded, see `TINY`).
  """
  dtype = jnp.dtype(model_config.dtype)
  if not model_config.checkpoint:
    if model_config.variant != "tiny":
      raise ValueError(f"config.model.checkpoint is empty for model {model_config.variant!r}; convert "
                       "OpenAI's weights with `python -m experiments.convert_clip` and point "
                       "--config.model.checkpoint at the output (see research/models/CLIP.md).")
    return clip.init(clip.tiny_config(image_size=model_config.image_size, dtype=dtype,
                                      remat=model_config.remat, **TINY), seed=seed)
  params, config, meta = clip_convert.restore(model_config.checkpoint, dtype=dtype)
  if set(meta["towers"]) != set(clip_convert.TOWERS):
    raise ValueError(f"{model_config.checkpoint} holds only the towers {meta['towers']}; the zero-shot "
                     "heads need the text tower too: convert the full pre-trained model.")
  expected = clip.get_config(model_config.variant)
  for field in ("patch_size", "vision_width", "vision_layers", "embed_dim"):
    if getattr(config, field) != getattr(expected, field):
      raise ValueError(f"{model_config.checkpoint} is not a {model_config.variant} CLIP ({field}="
                       f"{getattr(config, field)}, expected {getattr(expected, field)}); fix "
                       "config.model.checkpoint or config.model.variant.")
  if config.image_size != model_config.image_size:
    raise ValueError(f"{model_config.checkpoint} takes {config.image_size}-pixel images but "
                     f"config.model.image_size={model_config.image_size}.")
  model = clip.abstract(dataclasses.replace(config, remat=model_config.remat))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def make_tokenizer(spec: str) -> clip_tokenizer.CLIPTokenizer:
  """CLIP's tokenizer: '' (its vocabulary found as `CLIPTokenizer` does), a vocabulary path, or 'bytes'."""
  if spec != "bytes":
    return clip_tokenizer.CLIPTokenizer(spec or None)
  with tempfile.TemporaryDirectory() as folder:
    # A vocabulary file with no merges: byte tokens only (the tokenizer reads it at construction).
    path = os.path.join(folder, "bytes.txt.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write("#version: 0.2\n")
    return clip_tokenizer.CLIPTokenizer(path, num_merges=0)


def zeroshot_heads(model: clip.CLIP, tokenizer, tasks, max_templates: int = 0) -> dict[str, np.ndarray]:
  """{task: frozen head [classes, embed_dim]} from the text tower: class names x the task's prompts."""
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the CLIP's vocabulary "
                     f"{model.config.vocab_size}; use the tokenizer the model was trained with "
                     "(config.model.tokenizer).")
  embed_fn = clip.text_embedder(model, tokenizer)
  out = {}
  for task in tasks:
    templates = vision.templates(task)
    templates = templates[:max_templates] if max_templates > 0 else templates
    out[task] = np.asarray(heads.zeroshot_head(embed_fn, vision.class_names(task), templates))
  return out


def image_encoder(model: clip.CLIP) -> tuple[Callable, nnx.State]:
  """`(apply_fn, params0)` of the image tower; embeddings come out in float32 whatever the compute dtype."""
  apply_fn, params0 = clip.split_image_encoder(model)

  def encode(params, images):
    return apply_fn(params, images).astype(jnp.float32)

  return encode, params0


def load_image_params(directory: str, like: nnx.State) -> nnx.State:
  """Image-encoder Params from a checkpoint in `convert_clip`'s layout, read into the placement of `like`.

  `like` is the pre-trained image tower's Params (`image_encoder(model)[1]`):
  it gives the tree, shapes and devices, so nothing else is built to read it.
  """
  target = {"visual": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                   nnx.to_pure_dict(like))}
  restored, meta = checkpoints.restore(directory, target=target)
  if meta.get("format") != clip_convert.FORMAT:
    raise ValueError(f"{directory} is not an image-encoder checkpoint in convert_clip's layout (format "
                     f"{meta.get('format')!r}); write it with `python -m experiments.convert_clip`.")
  params = jax.tree.map(lambda x: x, like)
  nnx.replace_by_pure_dict(params, restored["visual"])
  return params


def labeled(split: vision.Split, head, model_config, data_config, max_examples: int) -> protocols.LabeledSet:
  """An evaluation split decoded into memory, as `research.evaluate` takes it."""
  arrays = vision.eval_arrays(split, image_size=model_config.image_size, max_examples=max_examples,
                              num_threads=data_config.num_threads)
  return protocols.LabeledSet({"image": arrays["image"]}, arrays["label"], head)


def load_splits(task: str, data_config) -> dict[str, vision.Split]:
  return vision.load_splits(task, data_dir=data_config.data_dir or None, seed=data_config.split_seed)


# --------------------------------------------------------------------------------------
# Fine-tuning.


class StreamedBatches:
  """`batches(step) -> host batch` over `vision.train_batches`, for `train.finetune(batches=...)`.

  Called with consecutive steps it reads one prefetched stream; any other step
  restarts the stream there. A batch depends on (seed, step) alone, so a
  resumed run sees exactly the batches of an uninterrupted one. With a
  process share `(index, count)` only this process's rows of the global batch
  are decoded; the other rows are zeros (`train.finetune` keeps only its
  own rows of every host batch).
  """

  def __init__(self, split: vision.Split, batch_size: int, *, seed: int, steps: int, image_size: int,
               augment: bool, num_threads: int, share: tuple[int, int] = (0, 1)):
    self._args = dict(seed=seed, steps=steps, image_size=image_size, augment=augment,
                      num_threads=num_threads, process_index=share[0], process_count=share[1])
    self._split, self._batch_size, self._share = split, batch_size, share
    self._stream, self._next = None, None

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if step != self._next:
      self.close()
      self._stream = vision.train_batches(self._split, self._batch_size, start_step=step, **self._args)
    self._next = step + 1
    batch = next(self._stream)
    index, count = self._share
    if count == 1:
      return batch
    local = self._batch_size // count
    full = {k: np.zeros((self._batch_size,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    for k, v in batch.items():
      full[k][index * local:(index + 1) * local] = v
    return full

  def close(self) -> None:
    if self._stream is not None:
      self._stream.close()
    self._stream, self._next = None, None


def process_share(batch_sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
  """(index, count) of the pipeline's per-process rows when they are the rows this process feeds.

  `vision.train_batches` gives process p rows [p B/P, (p + 1) B/P); when the
  train step's batch sharding puts exactly those rows on this process's
  devices, each process decodes only its share. Otherwise (0, 1): every
  process decodes the whole batch.
  """
  count, index = jax.process_count(), jax.process_index()
  if count == 1 or batch_size % count:
    return 0, 1
  rows = set()
  for idx in batch_sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*idx[0].indices(batch_size)[:2]))
  local = batch_size // count
  return (index, count) if rows == set(range(index * local, (index + 1) * local)) else (0, 1)


def run_train_config(t: ml_collections.ConfigDict, num_train: int) -> ml_collections.ConfigDict:
  """The paper config's train leaves (counted in updates) as `train.finetune` takes them (in micro-batches)."""
  k = t.grad_accum_steps
  if k < 1 or t.batch_size % k:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={k}.")
  updates = t.steps if t.steps > 0 else (t.epochs * num_train) // t.batch_size
  if updates < 1:
    raise ValueError(f"{t.epochs} epoch(s) of {num_train} training examples do not fill one batch of "
                     f"{t.batch_size}; lower train.batch_size or set train.steps.")
  return ml_collections.ConfigDict(dict(
      steps=updates * k, batch_size=t.batch_size // k, grad_accum_steps=k, lr=t.lr,
      weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, clip_norm=t.clip_norm,
      checkpoint_every=t.checkpoint_every * k))


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes the image encoder on `config.task` in `config.train.mode`; writes params and results.json.

  A finished run (its checkpoint at the last step) is restored rather than
  retrained, an interrupted one resumes. Returns the results dict.
  """
  start = time.time()
  task, mode = config.task, config.train.mode
  model = build_model(config.model, config.seed)
  head = zeroshot_heads(model, make_tokenizer(config.model.tokenizer), [task],
                        config.model.max_templates)[task]
  apply_fn, params0 = image_encoder(model)
  splits = load_splits(task, config.data)
  run = run_train_config(config.train, len(splits["train"]))
  mesh = sharding.make_mesh(config.mesh.mesh_shape, config.mesh.mesh_axes)
  rules = config.mesh.logical_axis_rules
  shardings = train.train_shardings(train.make_optimizer(run), params0, mesh, rules,
                                    batch_size=run.batch_size)
  batches = StreamedBatches(
      splits["train"], run.batch_size, seed=config.seed, steps=run.steps,
      image_size=config.model.image_size, augment=config.train.augment,
      num_threads=config.data.num_threads, share=process_share(shardings.batch, run.batch_size))
  try:
    tuned = train.finetune(apply_fn, params0, head, mode=mode, config=run, seed=config.seed,
                           checkpoint_dir=os.path.join(workdir, CHECKPOINT_DIR),
                           temperature=clip.temperature(model), mesh=mesh, rules=rules,
                           batches=batches, input_keys=IMAGE_INPUTS)
  finally:
    batches.close()
  params_dir = os.path.join(workdir, PARAMS_DIR)
  save_params(params_dir, tuned, model.config,
              {"task": task, "mode": mode, "pretrained": config.model.checkpoint})
  # Evaluate on this process's first device, with the params as saved.
  tau = jax.device_get(task_vectors.task_vector(load_image_params(params_dir, params0), params0))
  ev = protocols.FamilyEvaluator(apply_fn, params0, batch_size=config.eval.batch_size,
                                 input_keys=IMAGE_INPUTS)
  limits = {"val": config.eval.max_val_examples, "test": config.eval.max_test_examples}
  sets = {s: labeled(splits[s], head, config.model, config.data, n) for s, n in limits.items()}
  results = {
      "task": task, "mode": mode, "model": config.model.variant, "checkpoint": config.model.checkpoint,
      "seed": config.seed, "steps": run.steps // run.grad_accum_steps,
      "batch_size": config.train.batch_size, "grad_accum_steps": run.grad_accum_steps,
      "examples": {"train": len(splits["train"]), **{s: len(d.labels) for s, d in sets.items()}},
      "accuracy": {s: protocols.single_task(ev, mode, {task: tau}, {task: d})[task]
                   for s, d in sets.items()},
      "zeroshot": {s: ev.zeroshot_accuracy(d) for s, d in sets.items()},
      "params_dir": PARAMS_DIR,
  }
  results["wall_time_s"] = time.time() - start
  write_results(workdir, results)
  return results


def save_params(directory: str, params: nnx.State, config: clip.CLIPConfig, metadata: dict) -> None:
  """The fine-tuned image tower as step 0 of `directory` in `convert_clip`'s layout (kept if already there)."""
  if os.path.isdir(directory):
    with checkpoints.Checkpointer(directory, read_only=True) as ckpt:
      if ckpt.latest_step() is not None:
        return
  clip_convert.save(directory, {"visual": nnx.to_pure_dict(params)}, config, towers=("visual",),
                    source="research.paper.finetune", extra_metadata=metadata)


# --------------------------------------------------------------------------------------
# Evaluation.


def find_finetuned(root: str, variant: str, checkpoint: str, task: str, mode: str) -> str:
  """The workdir under `root` whose results.json is the finished fine-tuning run of (variant, task, mode).

  Any folder name works (`launch.sweep` names them after the swept values);
  the run's results.json says what it is. Two matches, or a run fine-tuned
  from another pre-trained checkpoint, are errors.
  """
  found, seen = [], 0
  for path in sorted(glob.glob(os.path.join(root, "*", RESULTS_FILE))):
    with open(path) as f:
      r = json.load(f)
    seen += 1
    if (r.get("model"), r.get("task"), r.get("mode")) == (variant, task, mode):
      found.append((os.path.dirname(path), r))
  if not found:
    raise FileNotFoundError(
        f"No finished fine-tuning run of {variant} on {task} in mode {mode} under {root!r} ({seen} "
        f"finished runs there). Run `python -m experiments.paper_finetune --config=configs/paper/"
        f"finetune.py:task={task},mode={mode},model=...` with --workdir under that folder, or point "
        "--config.finetune_root at the --workdir of the fine-tuning sweep.")
  if len(found) > 1:
    raise ValueError(f"Several fine-tuning runs of {variant} on {task} ({mode}) under {root!r}: "
                     f"{[d for d, _ in found]}; keep one.")
  workdir, r = found[0]
  if os.path.abspath(r.get("checkpoint") or "") != os.path.abspath(checkpoint or ""):
    raise ValueError(f"{workdir} was fine-tuned from {r.get('checkpoint')!r}, not from "
                     f"config.model.checkpoint={checkpoint!r}: its task vector would be wrong.")
  return workdir


def _summary(per_task: dict) -> dict:
  return {**per_task, "avg": float(np.mean(list(per_task.values())))}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The paper's evaluation of one model in one mode (`config.mode`); writes and returns results.json."""
  start = time.time()
  tasks, control = list(config.tasks), config.control_task
  model = build_model(config.model, config.seed)
  task_heads = zeroshot_heads(model, make_tokenizer(config.model.tokenizer), tasks + [control],
                              config.model.max_templates)
  apply_fn, params0 = image_encoder(model)
  sets = {}
  for name in tasks + [control]:
    splits = load_splits(name, config.data)
    sets[name] = {"val": labeled(splits["val"], task_heads[name], config.model, config.data,
                                 config.eval.max_val_examples),
                  "test": labeled(splits["test"], task_heads[name], config.model, config.data,
                                  config.eval.max_test_examples)}
  ev = protocols.FamilyEvaluator(apply_fn, params0, batch_size=config.eval.batch_size,
                                 input_keys=IMAGE_INPUTS)
  results = {"model": config.model.variant, "checkpoint": config.model.checkpoint, "mode": config.mode,
             "tasks": tasks, "control_task": control, "control_ratio": config.eval.control_ratio,
             "seed": config.seed,
             "examples": {s: {t: len(sets[t][s].labels) for t in sets} for s in ("val", "test")}}
  if config.mode == "none":
    results["zeroshot"] = _summary({t: ev.zeroshot_accuracy(sets[t]["test"]) for t in tasks})
    results["zeroshot_control"] = ev.zeroshot_accuracy(sets[control]["test"])
  else:
    results.update(_edit_protocols(config, ev, params0, sets))
  results["wall_time_s"] = time.time() - start
  write_results(workdir, results)
  return results


def _edit_protocols(config, ev: protocols.FamilyEvaluator, params0, sets: dict) -> dict:
  """Single-task, task addition and task negation accuracy in `config.mode`, via `research.evaluate`."""
  tasks, control, mode = list(config.tasks), config.control_task, config.mode
  if mode not in TAU_SOURCE:
    raise ValueError(f"Unknown evaluation mode {mode!r}; use one of {sorted(TAU_SOURCE)} or 'none'.")
  runs, taus = {}, {}
  for t in tasks:
    runs[t] = find_finetuned(config.finetune_root, config.model.variant, config.model.checkpoint, t,
                             TAU_SOURCE[mode])
    tuned = load_image_params(os.path.join(runs[t], PARAMS_DIR), params0)
    # Task vectors wait on the host; each protocol step moves what it uses.
    taus[t] = jax.device_get(task_vectors.task_vector(tuned, params0))
  val = {t: sets[t]["val"] for t in tasks}
  test = {t: sets[t]["test"] for t in tasks}
  alphas = np.linspace(0.0, 1.0, config.eval.num_alphas)
  zs_control_val = ev.zeroshot_accuracy(sets[control]["val"])
  single_val = protocols.single_task(ev, mode, taus, val)
  single_test = protocols.single_task(ev, mode, taus, test)
  return {
      "finetune_runs": runs,
      "zeroshot_control_val": zs_control_val,
      "single_task": _summary(single_test),
      "task_addition": protocols.task_addition(ev, mode, taus, val, test, alphas, single_val, single_test),
      "task_negation": protocols.task_negation(
          ev, mode, taus, val, test, sets[control]["val"], sets[control]["test"], alphas,
          zs_control_val, config.eval.control_ratio),
  }


# --------------------------------------------------------------------------------------
# Output.


def write_results(workdir: str, results: dict) -> Optional[str]:
  """Writes results.json atomically on process 0 (the file a sweep checks to skip a finished point)."""
  path = os.path.join(workdir, RESULTS_FILE)
  results["results_path"] = path
  if not distributed.is_main_process():
    return None
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return path


def _pct(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}"


def format_finetune(r: dict) -> str:
  a, z = r["accuracy"], r["zeroshot"]
  return (f"{r['model']} {r['task']} {r['mode']}: {r['steps']} updates of {r['batch_size']}; accuracy "
          f"val {_pct(a['val'])} test {_pct(a['test'])} (zero-shot val {_pct(z['val'])} "
          f"test {_pct(z['test'])}); {r['wall_time_s']:.0f} s; wrote {r['results_path']}")


def format_evaluate(r: dict) -> str:
  """Table 1 / Table 2 numbers of one model and mode, in percent."""
  head = f"{r['model']} {r['mode']}"
  if r["mode"] == "none":
    return (f"{head}: zero-shot {_pct(r['zeroshot']['avg'])} (ImageNet {_pct(r['zeroshot_control'])})"
            f"; wrote {r['results_path']}")
  add, neg = r["task_addition"], r["task_negation"]
  return (f"{head}: single-task {_pct(r['single_task']['avg'])}; task addition alpha {add['alpha']:.2f} "
          f"absolute {_pct(add['absolute']['avg'])} normalized {_pct(add['normalized']['avg'])}; "
          f"task negation target {_pct(neg['target']['avg'])} control {_pct(neg['control']['avg'])}"
          f"; wrote {r['results_path']}")


__all__ = ["build_model", "evaluate", "find_finetuned", "finetune", "format_evaluate", "format_finetune",
           "image_encoder", "labeled", "load_image_params", "make_tokenizer", "process_share",
           "run_train_config", "save_params", "StreamedBatches", "write_results", "zeroshot_heads"]
