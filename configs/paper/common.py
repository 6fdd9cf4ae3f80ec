"""Pieces shared by the paper's configs: models, tasks, the fine-tuning recipe, mesh and sharding rules.

Values are plain data. `runlocal` swaps in a tiny CLIP, 32-pixel images and
batches of 4 so that every config runs one step on a CPU (the smoke test).
"""
import ml_collections

from research.data.vision.datasets import CONTROL, DATASETS, TASKS

MODELS = ("B/32", "B/16", "L/14")
MODES = ("standard", "linear")
# The fine-tuning epochs of the paper's public code (tangent_task_arithmetic), per task.
EPOCHS = {name: DATASETS[name].epochs for name in TASKS}

# Logical axis rules for CLIP's parameter names (research.models.clip.LOGICAL_AXIS_NAMES)
# plus the batch: data parallel over 'data', parameters FSDP-sharded over 'fsdp'.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("vocab", None),
    ("position", None),
    ("joint", None),
    ("task", None),
    ("fsdp", "fsdp"),
)


def model_config(variant: str, runlocal: bool) -> ml_collections.ConfigDict:
  if variant not in MODELS:
    raise ValueError(f"Unknown model {variant!r}; the paper's models are {MODELS}.")
  m = ml_collections.ConfigDict()
  m.variant = "tiny" if runlocal else variant
  # Orbax checkpoint written by `python -m experiments.convert_clip` from OpenAI's weights
  # (see research/models/CLIP.md); empty in runlocal (random tiny CLIP).
  stem = variant.replace("/", "").lower()
  m.checkpoint = "" if runlocal else f"checkpoints/clip-vit-{stem}"
  m.image_size = 32 if runlocal else 224
  m.dtype = "float32" if runlocal else "bfloat16"   # parameters stay float32
  m.remat = variant == "L/14" and not runlocal
  # '' = CLIP's BPE vocabulary ($CLIP_BPE_VOCAB or open-clip-torch's copy), or a path to it;
  # 'bytes' = byte tokens without merges (ids < 514: they fit runlocal's tiny CLIP's 600-token vocabulary).
  m.tokenizer = "bytes" if runlocal else ""
  # Prompt templates per class in the zero-shot heads (0 = all, as the paper). runlocal keeps
  # one, so ImageNet's head is 1,000 prompts instead of 80,000.
  m.max_templates = 1 if runlocal else 0
  return m


def model_points(with_train: bool = False) -> list[dict]:
  """Sweep points for the three models: the leaves that change with the model, together."""
  points = []
  for variant in MODELS:
    m = model_config(variant, False)
    point = {"model.variant": variant, "model.checkpoint": m.checkpoint, "model.remat": m.remat}
    if with_train:
      point["train.grad_accum_steps"] = train_config("Cars", False, variant).grad_accum_steps
    points.append(point)
  return points


def train_config(task: str, runlocal: bool, variant: str) -> ml_collections.ConfigDict:
  """AdamW lr 1e-5, weight decay 0.1, batch 128, 500 warmup steps then cosine, clip 1.0, the task's epochs.

  Steps count optimizer updates (`steps`, `warmup_steps`, `checkpoint_every`);
  `batch_size` is the examples per update, fed as `grad_accum_steps`
  micro-batches of `batch_size // grad_accum_steps`.
  """
  t = ml_collections.ConfigDict()
  t.epochs = 1 if runlocal else EPOCHS[task]
  t.steps = 1 if runlocal else -1          # -1: (epochs x train examples) // batch_size, computed by the run
  t.batch_size = 4 if runlocal else 128
  # The public code fits L/14 with micro-batches of 64 and two accumulation steps.
  t.grad_accum_steps = 2 if variant == "L/14" and not runlocal else 1
  t.lr = 1e-5
  t.weight_decay = 0.1
  t.warmup_steps = 0 if runlocal else 500
  t.clip_norm = 1.0
  t.augment = True                          # open_clip's random resized crop (scale 0.9-1)
  t.checkpoint_every = 500
  return t


def mesh_config(runlocal: bool) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.mesh_shape = (1, -1)                   # all devices on 'fsdp'; e.g. (4, -1) for data x fsdp
  m.mesh_axes = ("data", "fsdp")
  m.logical_axis_rules = LOGICAL_AXIS_RULES
  return m


def data_config(runlocal: bool) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.data_dir = ""                          # TFDS data_dir ('' = TFDS default ~/tensorflow_datasets)
  d.split_seed = 0
  d.num_threads = 2 if runlocal else 32
  return d


def check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; the paper's tasks are {TASKS}.")
  return task


__all__ = ["CONTROL", "EPOCHS", "LOGICAL_AXIS_RULES", "MODELS", "MODES", "TASKS", "check_task",
           "data_config", "mesh_config", "model_config", "model_points", "train_config"]
