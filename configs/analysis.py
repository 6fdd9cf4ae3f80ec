r"""The tangent-space paper's analyses: NTK eigenfunction localization, kernel-regime test, pre-training.

Run (after `make reproduce`, whose checkpoints and results.json it reuses):
  python -m experiments.analysis --config=configs/analysis.py

The config is the main job's (configs/reproduce.py, same preset: same model,
tasks, data and fine-tuning recipe, so the main job's checkpoints in
`reproduce_workdir` are reused), with a new `workdir` and three new blocks:
`ntk`, `kernel_regime`, `random_init`. Presets: `quick` (default; ~10 min on a
2-core CPU when `results/reproduce-quick` is complete), `full`, `tiny` (two
tasks, seconds per step; the smoke test). Override leaves as usual:
  python -m experiments.analysis --config=configs/analysis.py:quick \
      --config.ntk.examples_per_task=16 --config.workdir=/tmp/analysis

It prints three tables and writes `<workdir>/results.json` plus figures:
  NTK eigenfunction localization (pretrained / random init): for each of the
    top-k eigenfunctions of the kernel over inputs of all tasks, its energy
    on each task; "localization" = the mean over the top-k of the largest
    share (1 = every eigenfunction on one task; printed beside what a random
    vector scores), by task and by input source (tasks reading the same kind
    of text: WordNet glosses, fortunes, dictionary words);
  Kernel-regime test: per task, test accuracy of zero-shot, standard
    fine-tuning, the same tau through the linearized model (posthoc) and
    linear fine-tuning; non-linear advantage = standard - posthoc;
  Weight disentanglement error: mean xi over the alpha grid, per pair and mode,
    pre-trained vs randomly initialised encoder (and the single-task
    accuracies of the random-init model, to read xi against).
"""
from configs import reproduce

# NTK inputs per task, output directions sketched, top-k eigenfunctions
# reported, inputs per block of Jacobian rows; `pair_only`: keep only the tasks
# of the (first) disentanglement pair, so the smoke test fine-tunes two tasks.
PRESETS = {
    "tiny": dict(examples_per_task=4, outputs=1, top_k=4, ntk_batch=4, pair_only=True),
    "quick": dict(examples_per_task=32, outputs=1, top_k=12, ntk_batch=8, pair_only=False),
    "full": dict(examples_per_task=48, outputs=4, top_k=24, ntk_batch=8, pair_only=False),
}


def get_config(arg=None):
  # The main job's checkpoints and results.json are reused (config.reproduce_workdir).
  config, p = reproduce.derived_config(arg, PRESETS, "analysis")
  if p["pair_only"]:
    pair = tuple(config.eval.disentangle_pairs[0])
    config.data.tasks = pair
    config.eval.disentangle_pairs = (pair,)

  config.ntk = dict(
      # Inputs pooled from every task of the main job (first examples of the split).
      examples_per_task=p["examples_per_task"],
      split="train",
      # Output sketch: k random orthonormal directions of the 384-d embedding
      # (scaled so the kernel is an unbiased estimate of the trace NTK);
      # 0 means all outputs (exact, 384 backward passes per input).
      outputs=p["outputs"],
      top_k=p["top_k"],
      models=("pretrained", "random"),
      method="auto",  # research.ntk.choose_method: Jacobian contraction for MiniLM.
      batch_size=p["ntk_batch"],
      memory_mb=4096,  # Jacobian rows held at once (the contraction panel).
  )
  config.kernel_regime = dict(
      split="test",
      # Take the main job's single-task accuracies from its results.json when it
      # exists and was made with the same preset, seed and tasks.
      reuse_main_results=True,
  )
  config.random_init = dict(
      seed=0,  # research.models.minilm.random_init(seed=...)
      # Fine-tuned from random init: the tasks of config.eval.disentangle_pairs.
      # Same recipe as the pre-trained model (config.train), except lr, a leaf
      # of its own so that the comparison can be rerun with a better-suited one.
      lr=config.train.lr,
  )
  return config
