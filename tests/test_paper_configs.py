"""The paper's configs: their sweeps, and one fine-tuning step of every task x mode on mock data with a tiny CLIP."""
import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.paper import common, evaluate, finetune
from research import sweep, train
from research.data import vision
from research.models import clip, clip_tokenizer, heads


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "vocab.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nt h\nth e</w>\na </w>\n")
  return clip_tokenizer.CLIPTokenizer(str(path))


def build(config):
  """What a paper run builds from its config, with the tiny CLIP of `runlocal` (one block per tower, for speed)."""
  assert config.model.variant == "tiny" and config.model.checkpoint == ""
  clip_config = clip.tiny_config(image_size=config.model.image_size, dtype=jnp.dtype(config.model.dtype),
                                 remat=config.model.remat, vision_layers=1, text_layers=1)
  return clip.init(clip_config, seed=config.seed)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
  """The tiny CLIP (all runlocal configs build the same one) and a cached zero-shot head per task."""
  model = build(finetune.get_config("runlocal"))
  embed_fn = clip.text_embedder(model, tiny_tokenizer, batch_size=64)
  cache = {}

  def head(task):
    if task not in cache:
      # ImageNet's 1000 classes x 80 prompts would dominate the test: its first prompt suffices here.
      templates = vision.templates(task)[:1] if task == "ImageNet" else vision.templates(task)
      cache[task] = heads.zeroshot_head(embed_fn, vision.class_names(task), templates)
    return cache[task]

  return model, head


def test_finetune_sweep_covers_tasks_modes_models():
  points = finetune.get_sweep(sweep)
  sweep.validate(points, finetune.get_config())
  assert len(points) == 8 * 2 * 3
  assert {(p["task"], p["train.mode"], p["model.variant"]) for p in points} == {
      (t, m, v) for t in common.TASKS for m in common.MODES for v in common.MODELS}
  assert all(p["train.epochs"] == common.EPOCHS[p["task"]] for p in points)
  assert common.EPOCHS == {"Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15,
                           "SUN397": 14, "SVHN": 4}


def test_evaluate_sweep_and_protocol_constants():
  points = evaluate.get_sweep(sweep)
  sweep.validate(points, evaluate.get_config())
  assert len(points) == 3 * 4
  config = evaluate.get_config("model=L/14,mode=posthoc")
  assert config.eval.num_alphas == 21 and config.eval.control_ratio == 0.95
  assert config.control_task == "ImageNet" and tuple(config.tasks) == common.TASKS


def test_recipe_and_full_scale_values():
  config = finetune.get_config("task=DTD,mode=linear,model=L/14")
  t = config.train
  assert (t.lr, t.weight_decay, t.batch_size, t.warmup_steps, t.clip_norm, t.epochs) == (
      1e-5, 0.1, 128, 500, 1.0, 76)
  assert t.grad_accum_steps == 2 and config.model.remat and config.model.image_size == 224
  assert clip.get_config(config.model.variant).vision_layers == 24
  for name, _ in config.mesh.logical_axis_rules:
    assert name in clip.LOGICAL_AXIS_NAMES + ("batch", "task", "fsdp")
  assert set(clip.LOGICAL_AXIS_NAMES) <= {name for name, _ in config.mesh.logical_axis_rules}


def test_configs_reject_unknown_values():
  with pytest.raises(ValueError, match="Unknown task"):
    finetune.get_config("task=CIFAR10")
  with pytest.raises(ValueError, match="Unknown mode"):
    finetune.get_config("mode=posthoc")
  with pytest.raises(ValueError, match="Unknown model"):
    finetune.get_config("model=H/14")


@pytest.mark.slow
def test_one_step_of_every_task_and_mode_on_mock_data(tiny):
  """Config -> mock TFDS splits -> zero-shot head -> one train step, for each task x mode.

  The steps run eagerly: eight class counts would mean sixteen compilations of
  the jitted step, while eager primitives are compiled once and reused.
  """
  model, head_of = tiny
  apply_fn, params0 = clip.split_image_encoder(model)
  # train.make_train_step feeds batch['input_ids'], batch['attention_mask'] to apply_fn;
  # images ride in the first slot until it takes an input-key list (see research/models/CLIP.md).
  image_fn = lambda p, images, _unused: apply_fn(p, images)
  for mode in common.MODES:
    for task in common.TASKS:
      config = finetune.get_config(f"task={task},mode={mode},runlocal")
      head = head_of(task)
      with tfds.testing.mock_data(num_examples=24):
        splits = vision.load_splits(task, seed=config.data.split_seed)
        batch = next(iter(vision.train_batches(
            splits["train"], config.train.batch_size, seed=config.seed, steps=config.train.steps,
            image_size=config.model.image_size, augment=config.train.augment,
            num_threads=config.data.num_threads)))
      assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
      assert head.shape == (len(vision.label_names(task)), model.config.embed_dim)
      optimizer = train.make_optimizer(config.train)
      step = train.make_train_step(image_fn, config.train.mode, optimizer, clip.temperature(model))
      state = train.TrainState(jnp.zeros((), jnp.int32), params0, jax.jit(optimizer.init)(params0))
      state, metrics = step(state, params0, head, {"input_ids": batch["image"],
                                                   "attention_mask": batch["label"], "label": batch["label"]})
      assert np.isfinite(float(metrics["loss"])), (task, mode)
      assert int(state.step) == 1, (task, mode)


@pytest.mark.parametrize("mode", evaluate.EVAL_MODES)
def test_evaluate_config_smoke(mode, tiny):
  """One validation batch of a task and of the control through the evaluated model of each mode."""
  from research import tangent
  config = evaluate.get_config(f"mode={mode},runlocal")
  model, head_of = tiny
  apply_fn, params0 = clip.split_image_encoder(model)
  tau = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params0)
  edited = jax.tree.map(lambda p, t: p + 0.5 * t, params0, tau)
  for task in (config.tasks[0], config.control_task):
    with tfds.testing.mock_data(num_examples=12):
      split = vision.load_splits(task)["val"]
      batch = next(iter(vision.eval_batches(split, config.eval.batch_size, image_size=config.model.image_size,
                                            num_threads=config.data.num_threads)))
    if mode in ("standard", "none"):
      emb = jax.jit(apply_fn)(params0 if mode == "none" else edited, batch["image"])
    else:
      emb = jax.jit(tangent.linearize(apply_fn))(edited, params0, batch["image"])
    logits = heads.logits(emb, head_of(task), clip.temperature(model))
    assert logits.shape == (config.eval.batch_size, len(vision.label_names(task)))
    assert np.isfinite(np.asarray(logits)).all()
