"""Paper configs and entry points: sweeps, recipe, one fine-tuning step per task x mode, evaluation.

Everything runs on `tfds.testing.mock_data` with the `runlocal` tiny CLIP.
The fine-tuning runs go through `research.paper.finetune` (the library call
of `experiments.paper_finetune`); the evaluation entry point runs as its own
process, since every entry point defines `--config` and absl allows one
definition per process.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.paper import common, evaluate, finetune
from launch import collect
from research import checkpoints, paper, sharding, sweep, task_vectors, train
from research.models import clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOCK_EXAMPLES = 24   # per TFDS split: train 20-22 / val 2 / test 2-24 after the paper's splits


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
  assert config.model.tokenizer == "" and config.model.max_templates == 0
  assert clip.get_config(config.model.variant).vision_layers == 24
  for name, _ in config.mesh.logical_axis_rules:
    assert name in clip.LOGICAL_AXIS_NAMES + ("batch", "task", "fsdp")
  assert set(clip.LOGICAL_AXIS_NAMES) <= {name for name, _ in config.mesh.logical_axis_rules}
  # 3,760 DTD training images x 76 epochs in updates of 128; two micro-batches of 64 per update.
  run = paper.run_train_config(t, 3760)
  assert (run.steps, run.batch_size, run.grad_accum_steps) == (2 * (76 * 3760 // 128), 64, 2)
  assert run.checkpoint_every == 2 * t.checkpoint_every


def test_configs_reject_unknown_values():
  with pytest.raises(ValueError, match="Unknown task"):
    finetune.get_config("task=CIFAR10")
  with pytest.raises(ValueError, match="Unknown mode"):
    finetune.get_config("mode=posthoc")
  with pytest.raises(ValueError, match="Unknown model"):
    finetune.get_config("model=H/14")
  model_config = finetune.get_config("model=B/32").model
  model_config.checkpoint = ""
  with pytest.raises(ValueError, match="checkpoint is empty"):
    paper.build_model(model_config)


def test_gradient_accumulation_averages_micro_batches_and_counts_updates():
  """k micro-batches make one AdamW update on their mean gradient; the schedule counts updates."""
  base = dict(lr=0.1, weight_decay=0.0, warmup_steps=0, clip_norm=1e9)
  accum = train.make_optimizer(_cfg(steps=8, grad_accum_steps=2, **base))
  plain = train.make_optimizer(_cfg(steps=4, grad_accum_steps=1, **base))
  params = {"w": jnp.zeros(3)}
  g1, g2 = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([3.0, 0.0, -1.0])}
  s_acc, s_plain = accum.init(params), plain.init(params)
  u1, s_acc = accum.update(g1, s_acc, params)
  assert not np.any(np.asarray(u1["w"]))           # first micro-batch: no update yet
  u2, s_acc = accum.update(g2, s_acc, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = plain.update(mean, s_plain, params)
  np.testing.assert_allclose(u2["w"], expected["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="divide steps"):
    train.make_optimizer(_cfg(steps=7, grad_accum_steps=2, **base))


def test_gradient_accumulation_in_a_sharded_finetune(tmp_path):
  """L/14's micro-batching through train.finetune on 8 devices: the accumulator is FSDP-sharded like
  the params, and 4 micro-batches of a streamed `batches(step)` make 2 updates."""
  config = _cfg(steps=4, grad_accum_steps=2, batch_size=8, lr=1e-2, weight_decay=0.1, warmup_steps=0,
                clip_norm=1.0, checkpoint_every=2)
  mesh = sharding.make_mesh((1, -1), ("data", "fsdp"))
  params0 = {"w": jnp.full((4096, 64), 0.01)}   # large enough to be FSDP-sharded
  optimizer = train.make_optimizer(config)
  shardings = train.train_shardings(optimizer, params0, mesh, sharding.DEFAULT_RULES, batch_size=8)
  assert shardings.params["w"].spec == shardings.state.opt_state.acc_grads["w"].spec
  assert "fsdp" in shardings.params["w"].spec
  rng = np.random.default_rng(0)
  data = rng.normal(size=(4, 8, 4096)).astype(np.float32)
  head = rng.normal(size=(3, 64)).astype(np.float32)
  batches = lambda i: {"x": data[i], "label": np.arange(8, dtype=np.int32) % 3}
  tuned = train.finetune(lambda p, x: x @ p["w"], params0, head, mode="standard", config=config,
                         checkpoint_dir=str(tmp_path), temperature=10.0, mesh=mesh, progress=False,
                         batches=batches, input_keys=("x",))
  assert not np.allclose(np.asarray(tuned["w"]), 0.01)
  state, _ = checkpoints.restore(str(tmp_path))
  assert int(state["step"]) == 4 and int(state["opt_state"]["gradient_step"]) == 2


def _cfg(**values):
  return ml_collections.ConfigDict(values)


def test_streamed_batches_are_a_function_of_the_step():
  """Out-of-order calls restart the stream: the batch of a step never depends on the calls before it."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    split = paper.load_splits("MNIST", finetune.get_config("task=MNIST,runlocal").data)["train"]
    kw = dict(seed=0, steps=6, image_size=32, augment=True, num_threads=1)
    in_order = paper.StreamedBatches(split, 4, **kw)
    first = [in_order(i) for i in range(6)]
    jumping = paper.StreamedBatches(split, 4, **kw)
    for i in (3, 4, 0, 5):
      b = jumping(i)
      np.testing.assert_array_equal(b["image"], first[i]["image"])
      np.testing.assert_array_equal(b["label"], first[i]["label"])
    in_order.close()
    jumping.close()
  # One process: every process row is its own; the pipeline decodes whole batches.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert paper.process_share(batch, 16) == (0, 1)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs that differ only in data share compiled programs (JAX's persistent cache, for speed)."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  values = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)
  for k, v in zip(keys, values):
    jax.config.update(k, v)
  yield dict(zip(keys, values))
  for k, v in before.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def tiny_model():
  """runlocal's tiny CLIP from `paper.build_model`, built once and handed to every run in this process
  (the entry point's process builds the same seeded one)."""
  return paper.build_model(finetune.get_config("runlocal").model, seed=0)


@pytest.fixture(scope="module")
def finetuned(tiny_model, tmp_path_factory):
  """One fine-tuning step of every task x mode through `paper.finetune`, in <root>/<task>-<mode>."""
  root = tmp_path_factory.mktemp("finetune")
  results = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(paper, "build_model", lambda model_config, seed=0: tiny_model)
    for mode in common.MODES:
      for task in common.TASKS:
        config = finetune.get_config(f"task={task},mode={mode},runlocal")
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
          results[task, mode] = paper.finetune(config, str(root / f"{task}-{mode}"))
  return root, results


@pytest.mark.slow
def test_one_step_of_every_task_and_mode_on_mock_data(finetuned, tiny_model):
  """Config -> mock TFDS splits -> zero-shot head -> one step of train.finetune -> params + results.json."""
  root, results = finetuned
  _, params0 = paper.image_encoder(tiny_model)
  assert len(results) == len(common.TASKS) * len(common.MODES)
  for (task, mode), r in results.items():
    workdir = root / f"{task}-{mode}"
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["task"] == task and saved["mode"] == mode and saved["model"] == "tiny"
    assert saved["steps"] == 1 and saved["batch_size"] == 4 and saved["grad_accum_steps"] == 1
    for key in ("accuracy", "zeroshot"):
      assert set(saved[key]) == {"val", "test"}
      assert all(0.0 <= v <= 1.0 for v in saved[key].values()), (task, mode, key)
    assert 1 <= saved["examples"]["val"] <= 8 and 1 <= saved["examples"]["test"] <= 8
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]   # the train state after its one step
    tuned = paper.load_image_params(str(workdir / "params"), params0)
    norm = float(task_vectors.norm(task_vectors.task_vector(tuned, params0)))
    assert 0.0 < norm < 1.0, (task, mode, norm)    # one AdamW step of lr 1e-5 moved the encoder a little
    assert r["results_path"] == str(workdir / "results.json")


@pytest.mark.slow
def test_finished_run_is_restored_not_retrained(finetuned, tiny_model, monkeypatch):
  root, results = finetuned
  monkeypatch.setattr(paper, "build_model", lambda model_config, seed=0: tiny_model)
  monkeypatch.setattr(train, "make_train_step", lambda *a, **k: pytest.fail("retrained"))
  config = finetune.get_config("task=MNIST,mode=linear,runlocal")
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    again = paper.finetune(config, str(root / "MNIST-linear"))
  assert again["accuracy"] == results["MNIST", "linear"]["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["standard", "none"])
def test_evaluate_library_protocols(mode, finetuned, tiny_model, tmp_path, monkeypatch):
  root, _ = finetuned
  monkeypatch.setattr(paper, "build_model", lambda model_config, seed=0: tiny_model)
  config = evaluate.get_config(f"mode={mode},runlocal")
  config.finetune_root = str(root)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    r = paper.evaluate(config, str(tmp_path / mode))
  _check_evaluation(json.loads((tmp_path / mode / "results.json").read_text()), mode)
  assert r["mode"] == mode


def _check_evaluation(r: dict, mode: str) -> None:
  tasks = set(common.TASKS)
  in_unit = lambda d: all(0.0 <= v <= 1.0 for v in d.values())
  assert r["model"] == "tiny" and r["mode"] == mode and r["control_task"] == "ImageNet"
  if mode == "none":
    assert set(r["zeroshot"]) == tasks | {"avg"} and in_unit(r["zeroshot"])
    assert 0.0 <= r["zeroshot_control"] <= 1.0
    return
  assert set(r["single_task"]) == tasks | {"avg"} and in_unit(r["single_task"])
  add = r["task_addition"]
  assert add["alpha"] in np.round(np.linspace(0, 1, 21), 6) and len(add["val_normalized_curve"]) == 21
  assert set(add["absolute"]) == set(add["normalized"]) == tasks | {"avg"} and in_unit(add["absolute"])
  # None where the fine-tuned model got no test example right (tiny random models on 8 examples).
  assert all(v is None or v >= 0.0 for v in add["normalized"].values())
  neg = r["task_negation"]
  assert set(neg["alpha"]) == tasks and all(0.0 <= a <= 1.0 for a in neg["alpha"].values())
  assert set(neg["target"]) == set(neg["control"]) == tasks | {"avg"}
  assert in_unit(neg["target"]) and in_unit(neg["control"])
  source = paper.TAU_SOURCE[mode]
  runs = {t: os.path.basename(d) for t, d in r["finetune_runs"].items()}
  assert runs == {t: f"{t}-{source}" for t in tasks}


# The evaluation entry point in its own process, on mock data; it builds the same seeded tiny CLIP.
_ENTRY = """
import sys
import tensorflow_datasets as tfds
from absl import app
from experiments import paper_evaluate
with tfds.testing.mock_data(num_examples={n}):
  app.run(paper_evaluate.main, argv=sys.argv)
"""


@pytest.mark.slow
def test_evaluate_entry_point_writes_results_that_collect_tabulates(finetuned, compilation_cache,
                                                                   tmp_path):
  root, _ = finetuned
  out = tmp_path / "evaluate" / "tiny-posthoc"
  spec = f"{ROOT / 'configs' / 'paper' / 'evaluate.py'}:mode=posthoc,runlocal,finetune_root={root}"
  cmd = [sys.executable, "-c", _ENTRY.format(n=MOCK_EXAMPLES), f"--config={spec}", f"--workdir={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             **{k.upper(): str(v) for k, v in compilation_cache.items()})
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "tiny posthoc: single-task" in proc.stdout and "task negation target" in proc.stdout
  _check_evaluation(json.loads((out / "results.json").read_text()), "posthoc")
  columns, rows, unfinished = collect.collect([out])
  assert not unfinished and len(rows) == 1
  for key in ("task_addition.alpha", "task_addition.absolute.avg", "task_addition.normalized.avg",
              "task_negation.target.avg", "task_negation.control.avg", "single_task.avg"):
    assert key in columns, key
