r"""Fine-tuning CLIP's image encoder on one task in one mode, as in the tangent-space paper.

  python -m experiments.paper_finetune --config=configs/paper/finetune.py:task=Cars,mode=linear,model=B/32 \
      --workdir=results/paper/finetune/B32-Cars-linear
  # prints e.g. "B/32 Cars linear: 2004 updates of 128; accuracy val .. test .. (zero-shot val ..
  #              test ..); .. s; wrote results/paper/finetune/B32-Cars-linear/results.json"
  python -m launch.sweep --config=configs/paper/finetune.py --entry=experiments.paper_finetune \
      --workdir=results/paper/finetune --target=tpu --tpu_name=... --zone=... --dry_run   # 48 runs

Arguments: task (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN),
mode (standard | linear), model (B/32 | B/16 | L/14), runlocal (a random
tiny CLIP, one step of batch 4 on 32-pixel images: what the smoke test
runs on mock data), data_dir (TFDS data_dir; '' = TFDS's default). The
frozen zero-shot head is built from `vision.class_names(task)` x
`vision.templates(task)` with the pre-trained text tower; validation is the
held-out 10% of train (max 5,000). The run writes the train state's Orbax
checkpoints (`<workdir>/checkpoints`, resumed after preemption), the
fine-tuned image-encoder Params (`<workdir>/params`, convert_clip's layout)
and results.json with the fine-tuned and zero-shot accuracy on validation and
test; configs/paper/evaluate.py reads them.
"""
import ml_collections

from configs import common as config_args
from configs.paper import common


def get_config(arg=None):
  arg = config_args.parse_arg(arg, task="Cars", mode="standard", model="B/32", runlocal=False,
                              data_dir="")
  common.check_task(arg.task)
  if arg.mode not in common.MODES:
    raise ValueError(f"Unknown mode {arg.mode!r}; use one of {common.MODES}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = f"results/paper/finetune/{arg.model.replace('/', '')}-{arg.task}-{arg.mode}"
  config.task = arg.task
  config.model = common.model_config(arg.model, arg.runlocal)
  config.data = common.data_config(arg.runlocal)
  config.data.data_dir = arg.data_dir
  config.train = common.train_config(arg.task, arg.runlocal, arg.model)
  config.train.mode = arg.mode
  config.mesh = common.mesh_config(arg.runlocal)
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8 if arg.runlocal else 512
  # Examples of the validation / test split evaluated after training (0: all).
  config.eval.max_val_examples = 8 if arg.runlocal else 0
  config.eval.max_test_examples = 8 if arg.runlocal else 0
  return config


def get_sweep(h):
  """The paper's 48 fine-tuning runs: each task (with its epochs) x {standard, linear} x {B/32, B/16, L/14}.

  The model's checkpoint path, precision and micro-batching follow the model,
  so they are swept with it.
  """
  tasks = h.zip(h.sweep("task", common.TASKS), h.sweep("train.epochs", [common.EPOCHS[t] for t in common.TASKS]))
  return h.product(common.model_points(with_train=True), tasks, h.sweep("train.mode", common.MODES))
