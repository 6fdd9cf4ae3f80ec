r"""Fine-tuning CLIP's image encoder on one task in one mode, as in the tangent-space paper.

  python -m experiments.paper_finetune --config=configs/paper/finetune.py:task=Cars,mode=linear,model=B/32 \
      --workdir=results/paper/finetune/B32-Cars-linear
  python -m launch.sweep --config=configs/paper/finetune.py --entry=experiments.paper_finetune \
      --target=tpu --tpu_name=... --zone=... --dry_run        # 8 tasks x 2 modes x 3 models = 48 runs

Arguments: task (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN),
mode (standard | linear), model (B/32 | B/16 | L/14), runlocal (tiny CLIP on
mock-sized data: what the smoke test runs). The frozen zero-shot head is
built from `vision.class_names(task)` x `vision.templates(task)` with the
pre-trained text tower; validation is the held-out 10% of train (max 5,000).
The run writes an Orbax checkpoint of the fine-tuned image-encoder Params and
results.json with the validation / test accuracy.
"""
import ml_collections

from configs import common as config_args
from configs.paper import common


def get_config(arg=None):
  arg = config_args.parse_arg(arg, task="Cars", mode="standard", model="B/32", runlocal=False)
  common.check_task(arg.task)
  if arg.mode not in common.MODES:
    raise ValueError(f"Unknown mode {arg.mode!r}; use one of {common.MODES}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = f"results/paper/finetune/{arg.model.replace('/', '')}-{arg.task}-{arg.mode}"
  config.task = arg.task
  config.model = common.model_config(arg.model, arg.runlocal)
  config.data = common.data_config(arg.runlocal)
  config.train = common.train_config(arg.task, arg.runlocal, arg.model)
  config.train.mode = arg.mode
  config.mesh = common.mesh_config(arg.runlocal)
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8 if arg.runlocal else 512
  return config


def get_sweep(h):
  """The paper's 48 fine-tuning runs: each task (with its epochs) x {standard, linear} x {B/32, B/16, L/14}.

  The model's checkpoint path, precision and micro-batching follow the model,
  so they are swept with it.
  """
  tasks = h.zip(h.sweep("task", common.TASKS), h.sweep("train.epochs", [common.EPOCHS[t] for t in common.TASKS]))
  return h.product(common.model_points(with_train=True), tasks, h.sweep("train.mode", common.MODES))
