"""Fine-tuning against a frozen zero-shot head, in the tangent-space paper's modes.

`standard` trains the params of `apply_fn`; `linear` trains the params of
`tangent.linearize(apply_fn)` around the pre-trained `params0`. Both use the
paper's recipe (AdamW, weight decay 0.1, linear warmup then cosine decay,
global-norm clipping 1.0). Runs are deterministic given the seed and resume from
the latest Orbax checkpoint, so a rerun after a kill ends in the same params.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from research import checkpoints
from research import tangent
from research.models import heads

FINETUNE_MODES = ("standard", "linear")


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


def model_fn(apply_fn: Callable, mode: str) -> Callable:
  """Returns `f(params, params0, *inputs)` for a fine-tuning / evaluation mode.

  `standard` ignores `params0`; `linear` and `posthoc` evaluate the first-order
  Taylor expansion around it.
  """
  if mode == "standard":
    return lambda params, params0, *inputs: apply_fn(params, *inputs)
  if mode in ("linear", "posthoc"):
    return tangent.linearize(apply_fn)
  raise ValueError(
      f"Unknown mode {mode!r}; expected one of 'standard', 'linear', 'posthoc'.")


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping (paper recipe)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=config.warmup_steps,
      decay_steps=max(config.steps, config.warmup_steps + 1),
  )
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, weight_decay=config.weight_decay),
  )


def make_train_step(apply_fn, mode, optimizer, temperature):
  """A jit-able `step(state, params0, head, batch) -> (state, metrics)`."""
  f = model_fn(apply_fn, mode)

  def loss_fn(params, params0, head, batch):
    emb = f(params, params0, batch["input_ids"], batch["attention_mask"])
    logits = heads.logits(emb, head, temperature)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, acc

  def step(state, params0, head, batch):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, params0, head, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss, "accuracy": acc}

  return step


def batch_plan(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """[steps, batch_size] example indices: seeded epoch-wise shuffles, fixed shapes."""
  if num_examples < batch_size:
    raise ValueError(
        f"Training set has {num_examples} examples, fewer than batch_size="
        f"{batch_size}; lower train.batch_size or raise data.n_train.")
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  plan = [rng.permutation(num_examples)[:per_epoch * batch_size]
          for _ in range(epochs)]
  return np.concatenate(plan).reshape(-1, batch_size)[:steps]


def finetune(apply_fn, params0, head, inputs, labels, *, mode, config,
             checkpoint_dir, seed=0, temperature, progress=True):
  """Fine-tunes `params0` on (inputs, labels) and returns the fine-tuned params.

  Args:
    apply_fn: `apply_fn(params, input_ids, attention_mask) -> embeddings [B, D]`.
    params0: the pre-trained params (expansion point in `linear` mode).
    head: frozen class embeddings [C, D].
    inputs: dict of int arrays [N, L] (`input_ids`, `attention_mask`).
    labels: int array [N].
    mode: 'standard' or 'linear'.
    config: ConfigDict with steps, batch_size, lr, weight_decay, warmup_steps,
      clip_norm, checkpoint_every.
    checkpoint_dir: where the Orbax checkpoints of this run live. A finished run
      is restored instead of retrained; an interrupted one resumes.
  """
  if mode not in FINETUNE_MODES:
    raise ValueError(f"Unknown fine-tuning mode {mode!r}; expected one of {FINETUNE_MODES}.")
  optimizer = make_optimizer(config)
  with checkpoints.Checkpointer(checkpoint_dir, max_to_keep=1) as manager:
    # A copy: the step donates its state, and params0 must outlive training.
    params = jax.tree.map(jnp.copy, params0)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    latest = manager.latest_step()
    if latest is not None:  # Resume (or skip) from the last complete checkpoint.
      state, _ = manager.restore(latest, target=state)
    if int(state.step) >= config.steps:
      return state.params
    plan = batch_plan(len(labels), config.batch_size, config.steps, seed)
    step_fn = jax.jit(make_train_step(apply_fn, mode, optimizer, temperature),
                      donate_argnums=0)
    start = int(state.step)
    bar = tqdm.tqdm(range(start, config.steps), desc=f"fine-tune {mode}",
                    disable=not progress, leave=False, initial=start,
                    total=config.steps)
    for i in bar:
      batch = {k: v[plan[i]] for k, v in inputs.items()}
      batch["label"] = labels[plan[i]]
      state, metrics = step_fn(state, params0, head, batch)
      done = i + 1
      if done % config.checkpoint_every == 0 or done == config.steps:
        manager.save(done, state, metadata={"mode": mode, "seed": seed,
                                            "loss": float(metrics["loss"])})
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", refresh=False)
  return state.params
