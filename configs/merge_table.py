r"""The merging results table: every registered merge method on the main job's task vectors.

Run (after `make reproduce`, whose fine-tuned checkpoints it reuses; without
them it fine-tunes first, into the main job's workdir):
  python -m experiments.merge_table --config=configs/merge_table.py

The config is the main job's (configs/reproduce.py, same preset: same model,
tasks, data and fine-tuning recipe, so `reproduce_workdir`'s checkpoints are
the right ones) plus a `merge` block. Presets: `quick` (default; its wall
time on a 2-core CPU, once the checkpoints exist, is in the README), `full`,
`tiny` (two tasks, a few methods: the smoke test). Override leaves as usual:
  python -m experiments.merge_table --config=configs/merge_table.py \
      --config.merge.methods="('ties','regmean')" --config.merge.n_test=64

It prints the table (absolute / normalized test accuracy per mode, with the
zero-shot and single-task fine-tuned rows) and writes to `<workdir>`:
results.json ({method: {mode: {absolute_avg, normalized_avg, per_task,
hparams, seconds}}}), table.md, merge_table.png. Methods already in
results.json are skipped, so a killed run resumes.

Hyper-parameter selection (as the papers do): for every method, the grid
`merge.grids.<method>` (cartesian product; values not given keep the
method's defaults) and, for methods that produce a task-arithmetic-like sum,
the scaling alpha of `params0 + alpha * tau` from `merge.alphas`, are
searched on the validation split (mean normalized accuracy); the best point
is reported on the test split. Methods listed in `merge.unscaled` are
averages or learn their own scale (alpha = 1). Grids are small to keep the
quick preset in budget; they include each paper's default.

Data of the data-dependent methods (first examples of each split):
  fisher / regmean: `stats_examples` training inputs per task (Fisher: exact
    expectation over classes at each fine-tuned model; RegMean Grams of the
    kernels' inputs, padding tokens excluded);
  adamerging_*: `adapt_examples` unlabeled test inputs per task (the paper's
    test-time protocol), `learn_batch` of them per task per step;
  atlas / self_positioning: `probe_examples` labeled training examples per
    task (few-shot), `learn_batch` per task per step;
  twin: its router (an MLP predicting the task from the pre-trained model's
    sentence embedding) trains on `router_examples` training inputs per task
    (as the reference code does: inputs that are neither the validation
    examples the grid is selected on nor the test examples), for
    `router_steps` steps of `router_batch`. Twin-Merging is evaluated with
    per-input routing: every validation / test input gets its own merged
    model (see research/merge_table.py).
Learned methods run `learn_steps` steps with `learn_lr` in the quick preset
instead of the papers' 500 steps at 1e-3 (AdaMerging) — a budget choice
recorded in each row's hparams.
"""
import ml_collections

from configs import reproduce

# Subset sizes per task, data of the data-dependent methods, learned-method budget.
PRESETS = {
    "tiny": dict(n_val=16, n_test=16, stats_examples=4, adapt_examples=4, probe_examples=4,
                 learn_batch=4, learn_steps=2, learn_lr=1e-2, doge_steps=2, tasks=2,
                 router_examples=8, router_steps=5, router_batch=8, twin_scales=(0.3,),
                 alphas=(0.5, 1.0), wide=False,
                 methods=("task_arithmetic", "ties", "fisher", "regmean", "adamerging_task",
                          "atlas", "doge", "lora_lego", "scalearn")),
    "quick": dict(n_val=48, n_test=128, stats_examples=16, adapt_examples=32, probe_examples=16,
                  learn_batch=8, learn_steps=30, learn_lr=1e-2, doge_steps=400, tasks=0,
                  router_examples=256, router_steps=200, router_batch=256,
                  twin_scales=(0.3, 0.4),
                  alphas=(0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5), wide=False, methods=()),
    "full": dict(n_val=0, n_test=0, stats_examples=64, adapt_examples=64, probe_examples=32,
                 learn_batch=16, learn_steps=200, learn_lr=1e-3, doge_steps=400, tasks=0,
                 router_examples=1024, router_steps=500, router_batch=1024,
                 twin_scales=(0.2, 0.3, 0.4, 0.5),
                 alphas=tuple(round(0.1 * i, 1) for i in range(1, 21)), wide=True, methods=()),
}

# Methods whose merged task vector is used as is (alpha = 1): averages, and methods that
# learn or set their own scale.
UNSCALED = ("average", "model_stock", "fisher", "regmean", "adamerging_task",
            "adamerging_layer", "atlas", "self_positioning", "doge", "twin", "scalearn")
# What runs on the LoRA task vectors (mode `lora`): the LoRA methods, with task arithmetic
# and TIES on the densified updates for reference.
LORA_METHODS = ("task_arithmetic", "ties", "lora_lego", "scalearn")


def _grids(p):
  """Each paper's default plus a neighbour or two; single points for the slow inits unless `wide`."""
  learn = dict(steps=(p["learn_steps"],), lr=(p["learn_lr"],))
  wide = p["wide"]
  return {
      "ties": dict(density=(0.1, 0.2)),
      "dare": dict(p=(0.5, 0.9)),
      "dare_ties": dict(p=(0.5, 0.9)),
      "breadcrumbs": dict(beta=(0.1, 0.15) if wide else (0.15,)),
      "pcb": dict(ratio=(0.05, 0.1, 0.2) if wide else (0.1,)),
      "consensus": dict(tall_lambda=(0.4, 1.0)),
      "lines": dict(alpha=(0.0, 0.5)),
      "fisher": dict(normalize=(False, True)),
      "regmean": dict(alpha=(0.5, 0.9)),
      "adamerging_task": learn,
      "adamerging_layer": learn,
      "atlas": learn,
      "self_positioning": learn,
      "doge": dict(lam=(0.03, 0.07, 0.15) if wide else (0.07,), steps=(p["doge_steps"],)),
      # The shared expert's lambda (the reference's tuned 0.29, and the table's task-arithmetic
      # optimum region) and the kept rank fraction of the exclusive residuals (reference 0.1).
      # Merged rank k: the tasks' rank (8, the paper's default) or twice it.
      "lora_lego": dict(k=(8, 16)),
      # Output scales start in task arithmetic's region (0.3 per task) rather than at the
      # official single-target 2.0, since six tasks' updates are summed here.
      "scalearn": dict(init_scale=(0.3,), **learn),
      "twin": dict(shared_scale=p["twin_scales"],
                   rank_fraction=(0.05, 0.1, 0.2) if wide else (0.1,),
                   router_steps=(p["router_steps"],), router_batch=(p["router_batch"],)),
  }


def get_config(arg=None):
  # The main job's checkpoints are reused (config.reproduce_workdir).
  config, p = reproduce.derived_config(arg, PRESETS, "merge_table")
  if p["tasks"]:
    config.data.tasks = tuple(config.data.tasks[:p["tasks"]])

  config.merge = ml_collections.ConfigDict()
  # Empty: every registered method (research.merging.METHODS).
  config.merge.methods = tuple(p["methods"])
  config.merge.modes = ("standard", "linear", "lora")
  config.merge.lora_methods = LORA_METHODS
  config.merge.n_val = p["n_val"]          # per task; 0 = the whole split
  config.merge.n_test = p["n_test"]
  config.merge.alphas = tuple(p["alphas"])
  config.merge.unscaled = UNSCALED
  config.merge.grids = _grids(p)
  # DOGE on the encoder's dense kernels only, as the reference restricts itself to the
  # transformer's weight matrices (no embeddings); other leaves stay at params0.
  config.merge.kernels_only = ("doge",)
  config.merge.stats_examples = p["stats_examples"]
  config.merge.adapt_examples = p["adapt_examples"]
  config.merge.probe_examples = p["probe_examples"]
  config.merge.learn_batch = p["learn_batch"]
  config.merge.router_examples = p["router_examples"]   # twin's router: training inputs per task
  return config
