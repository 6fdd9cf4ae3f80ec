r"""Task addition and task negation on the eight tasks with the paper's protocols, per model and mode.

  python -m experiments.paper_evaluate --config=configs/paper/evaluate.py:model=B/32,mode=linear \
      --workdir=results/paper/evaluate/B32-linear
  # prints e.g. "B/32 linear: single-task ..; task addition alpha .. absolute .. normalized ..;
  #              task negation target .. control ..; wrote results/paper/evaluate/B32-linear/results.json"
  python -m launch.sweep --config=configs/paper/evaluate.py --entry=experiments.paper_evaluate \
      --workdir=results/paper/evaluate --dry_run                    # 3 models x 4 modes = 12 runs
  python -m launch.collect 'results/paper/evaluate/*'

Arguments: model (B/32 | B/16 | L/14), mode (below), runlocal (tiny CLIP,
8 examples per split: what the smoke test runs), finetune_root (where the
fine-tuning runs are: every folder under it with a results.json of this
model, one per task and mode; default results/paper/finetune), data_dir
(TFDS data_dir; '' = TFDS's default). Arguments go to every point of a sweep
(`--config=configs/paper/evaluate.py:finetune_root=/mnt/shared/finetune`).

Modes: standard (non-linear fine-tuning, non-linear evaluation), linear
(linearized fine-tuning, evaluated through the linearization), posthoc
(non-linear task vectors evaluated through the linearization), none
(zero-shot). Task addition: one alpha for the sum of the 8 task vectors,
chosen on the validation splits from linspace(0, 1, 21) to maximise the mean
normalized accuracy (merged accuracy / the mode's own single-task fine-tuned
accuracy); absolute and normalized test accuracy reported. Task negation:
per task, alpha from -linspace(0, 1, 21) minimising validation accuracy on
the task subject to ImageNet (control) accuracy >= 0.95 x its zero-shot
accuracy; test accuracies on the task and on ImageNet reported.
"""
import ml_collections

from configs import common as config_args
from configs.paper import common

EVAL_MODES = ("standard", "linear", "posthoc", "none")


def get_config(arg=None):
  arg = config_args.parse_arg(arg, model="B/32", mode="standard", runlocal=False,
                              finetune_root="results/paper/finetune", data_dir="")
  if arg.mode not in EVAL_MODES:
    raise ValueError(f"Unknown mode {arg.mode!r}; use one of {EVAL_MODES}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = f"results/paper/evaluate/{arg.model.replace('/', '')}-{arg.mode}"
  config.mode = arg.mode
  config.model = common.model_config(arg.model, arg.runlocal)
  config.data = common.data_config(arg.runlocal)
  config.data.data_dir = arg.data_dir
  config.mesh = common.mesh_config(arg.runlocal)
  # The --workdir root of configs/paper/finetune.py's runs: any folder under it whose results.json
  # is a finished run of this model (research.paper.find_finetuned), one per task and mode.
  config.finetune_root = arg.finetune_root
  config.tasks = common.TASKS
  config.control_task = common.CONTROL
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8 if arg.runlocal else 512
  config.eval.num_alphas = 21                  # linspace(0, 1, 21), as in the paper
  config.eval.control_ratio = 0.95
  # Examples per split used for the alpha search (0: all); the paper uses the full validation splits.
  config.eval.max_val_examples = 8 if arg.runlocal else 0
  config.eval.max_test_examples = 8 if arg.runlocal else 0
  return config


def get_sweep(h):
  """Every model x evaluation mode (12 runs after the 48 fine-tuning runs)."""
  return h.product(common.model_points(), h.sweep("mode", EVAL_MODES))
