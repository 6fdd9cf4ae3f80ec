"""Fine-tuning against a frozen zero-shot head, in the tangent-space paper's modes.

`standard` trains the params of `apply_fn`; `linear` trains the params of
`tangent.linearize(apply_fn)` around the pre-trained `params0`; `lora` trains
low-rank factors of the dense kernels beside the frozen `params0`
(`research.lora`; `finetune` then returns the factors). All use the
paper's recipe (AdamW, weight decay 0.1, linear warmup then cosine decay,
global-norm clipping 1.0). Runs are deterministic given the seed and resume from
the latest Orbax checkpoint, so a rerun after a kill ends in the same params.

Sharded runs (MaxText style): pass `mesh` (and logical axis `rules`) to
`finetune`. Shapes first (`jax.eval_shape`), then a `NamedSharding` tree for
the params from their logical axes (NNX metadata, else `sharding.fsdp_axes`),
the optimizer state sharded like the params it tracks, and the step compiled
as `jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=0)`:
data parallel over the rules' `batch` axes, FSDP over whatever mesh axes the
rules give parameter dimensions. `params0` is placed like `params` (in
`linear` mode it is the expansion point the JVP reads). Each process feeds
only its own rows of every batch (`jax.make_array_from_process_local_data`);
all processes take part in every checkpoint save and restore::

    mesh = sharding.make_mesh((1, -1), ('data', 'fsdp'))
    params = finetune(apply_fn, params0, head, inputs, labels, mode='linear',
                      config=config.train, checkpoint_dir=..., temperature=20.,
                      mesh=mesh, rules=sharding.DEFAULT_RULES)

Without `mesh` everything runs on the default device, as before.
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from research import checkpoints
from research import distributed
from research import lora
from research import sharding
from research import tangent
from research.models import heads

# Modes whose trained tree is the params of `apply_fn` (same structure as params0).
FINETUNE_MODES = ("standard", "linear")
# Every mode `finetune` trains; in `lora` the trained tree is LoRA factors instead.
TRAIN_MODES = FINETUNE_MODES + ("lora",)
# The batch keys fed to `apply_fn`, in order, for the text models (MiniLM / BERT).
TEXT_INPUTS = ("input_ids", "attention_mask")


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


def model_fn(apply_fn: Callable, mode: str, *, lora_alpha: Optional[float] = None) -> Callable:
  """Returns `f(params, params0, *inputs)` for a fine-tuning / evaluation mode.

  `standard` ignores `params0`; `linear` and `posthoc` evaluate the first-order
  Taylor expansion around it; in `lora` mode `params` are LoRA factors and
  `f` evaluates `params0 + lora.densify(params, params0, alpha=lora_alpha)`.
  """
  if mode == "standard":
    return lambda params, params0, *inputs: apply_fn(params, *inputs)
  if mode in ("linear", "posthoc"):
    return tangent.linearize(apply_fn)
  if mode == "lora":
    return lora.model_fn(apply_fn, alpha=lora_alpha)
  raise ValueError(
      f"Unknown mode {mode!r}; expected one of 'standard', 'linear', 'posthoc', 'lora'.")


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping (paper recipe).

  An optional `config.grad_accum_steps` = k > 1 averages the gradients of k
  consecutive train steps (micro-batches) into one update (`optax.MultiSteps`):
  clipping sees the averaged gradient, and the schedule counts updates, so
  `warmup_steps` is in updates and the decay spans `config.steps // k` of them.
  """
  accum = int(getattr(config, "grad_accum_steps", 1) or 1)
  if accum < 1 or config.steps % accum:
    raise ValueError(f"grad_accum_steps={accum} must be >= 1 and divide steps={config.steps} "
                     "(train steps are micro-batches; k of them make one update).")
  updates = config.steps // accum
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=config.warmup_steps,
      decay_steps=max(updates, config.warmup_steps + 1),
  )
  optimizer = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, weight_decay=config.weight_decay),
  )
  if accum == 1:
    return optimizer
  return optax.MultiSteps(optimizer, every_k_schedule=accum).gradient_transformation()


def make_train_step(apply_fn, mode, optimizer, temperature, input_keys=TEXT_INPUTS,
                    lora_alpha=None):
  """A jit-able `step(state, params0, head, batch) -> (state, metrics)`.

  `apply_fn` gets `batch[k]` for each of `input_keys` (e.g. `("image",)` for
  an image encoder); `batch["label"]` holds the int labels. In `lora` mode
  `state.params` are the LoRA factors (`lora_alpha` as in `lora.densify`).
  """
  f = model_fn(apply_fn, mode, lora_alpha=lora_alpha)

  def loss_fn(params, params0, head, batch):
    emb = f(params, params0, *(batch[k] for k in input_keys))
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


class TrainShardings(NamedTuple):
  """Where every input of the train step lives on the mesh."""
  state: TrainState   # of NamedShardings; the optimizer state follows the params.
  params: Any         # of NamedShardings; also used for params0 (in `lora` mode only for
                      # params0: state.params then holds the factors' shardings).
  head: jax.sharding.NamedSharding
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding


def default_param_axes(params, mesh) -> Any:
  """Logical axes of `params`: NNX metadata where present, else `sharding.fsdp_axes`.

  Unannotated leaves get the logical name 'fsdp' on their largest dimension
  divisible by the size of the mesh's 'fsdp' axis (replicated when the mesh
  has none); the rules must map 'fsdp', as `sharding.DEFAULT_RULES` does.
  """
  size = dict(mesh.shape).get("fsdp", 1)
  fallback = lambda value: sharding.fsdp_axes(value, size)
  from flax import nnx  # Lazy: plain-dict users need no flax.
  has_nnx = any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  if has_nnx:
    return sharding.logical_axes_from_nnx(params, default=fallback)
  return fallback(params)


def _batch_spec(mesh, rules, batch_size: Optional[int]):
  """Mesh axes of the batch dimension: the rule for logical 'batch', else every mesh axis."""
  if any(name == "batch" for name, _ in rules):
    return sharding.logical_to_mesh_spec(
        ("batch",), rules, mesh=mesh, shape=None if batch_size is None else (batch_size,))
  return jax.sharding.PartitionSpec(tuple(mesh.axis_names))


def train_shardings(optimizer, params0, mesh, rules: Optional[Sequence] = None,
                    param_axes: Any = None, batch_size: Optional[int] = None) -> TrainShardings:
  """Shardings of the train state, params(0), head and batch on `mesh`.

  Args:
    optimizer: the optax transformation (its state is sharded like the
      params it tracks, via `optax.tree_map_params`; scalars are replicated).
    params0: params or their shapes (`jax.ShapeDtypeStruct` / `nnx.State`).
    mesh: a `jax.sharding.Mesh` (`sharding.make_mesh`).
    rules: logical axis rules (default `sharding.DEFAULT_RULES`).
    param_axes: logical axes tree of the params (default `default_param_axes`).
    batch_size: global batch size, so an indivisible batch falls back to
      fewer mesh axes instead of failing in `jax.jit`.
  """
  rules = sharding.DEFAULT_RULES if rules is None else rules
  abstract = jax.eval_shape(lambda p: p, params0)
  axes = default_param_axes(abstract, mesh) if param_axes is None else param_axes
  params = sharding.logical_sharding(axes, mesh, rules, shapes=abstract)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)
  opt_state = optax.tree_map_params(
      optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, abstract), params,
      transform_non_params=lambda _: replicated, is_leaf=is_sharding)
  batch = jax.sharding.NamedSharding(mesh, _batch_spec(mesh, rules, batch_size))
  return TrainShardings(TrainState(replicated, params, opt_state), params, replicated, batch,
                        replicated)


def init_state(optimizer, params0, shardings: Optional[TrainShardings] = None) -> TrainState:
  """A fresh TrainState holding a copy of `params0` (the step donates its state).

  With `shardings`, params and optimizer state are created directly in their
  shardings (`jax.jit(..., out_shardings=...)`).
  """
  def init(p):
    # A copy inside jit too: an output that is an unchanged input is handed back
    # as the same buffer, and the first donated step would then free params0.
    p = jax.tree.map(jnp.copy, p)
    return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))
  if shardings is None:
    params = jax.tree.map(jnp.copy, params0)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  return jax.jit(init, in_shardings=(shardings.state.params,),
                 out_shardings=shardings.state)(params0)


def jit_train_step(step, shardings: Optional[TrainShardings] = None):
  """`jax.jit` of a train step, donating the state; with `shardings`, pinned in and out."""
  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  s = shardings
  return jax.jit(step, in_shardings=(s.state, s.params, s.head, s.batch),
                 out_shardings=(s.state, s.replicated), donate_argnums=0)


def place(tree, shardings):
  """`tree` on `shardings`; on several processes every process passes the same values.

  Host copies are handed to `jax.device_put` when the target spans processes,
  since an array committed to one local device cannot be sent to another
  host's devices.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s else np.asarray(x),
                        tree, shardings)
  return jax.device_put(tree, shardings)


def _process_rows(batch_sharding, n: int) -> slice:
  """The contiguous rows of a global batch of `n` that this process's devices hold."""
  ranges = sorted({idx[0].indices(n)[:2]
                   for idx in batch_sharding.addressable_devices_indices_map((n,)).values()})
  lo, hi = ranges[0][0], ranges[0][0]
  for start, stop in ranges:
    if start > hi:
      raise ValueError(f"This process's devices hold non-contiguous rows {ranges} of the batch "
                       f"under {batch_sharding}; order the mesh so that each process's devices "
                       "are adjacent along the batch axes.")
    hi = max(hi, stop)
  return slice(lo, hi)


def global_batch(batch, batch_sharding):
  """A global batch (jax.Arrays on `batch_sharding`) from the full host batch.

  Each process keeps only the rows its devices hold and hands them to
  `sharding.shard_batch` (`jax.make_array_from_process_local_data`), so the
  global array equals the host batch row for row on any number of processes.
  """
  n = len(next(iter(jax.tree.leaves(batch))))
  rows = _process_rows(batch_sharding, n)
  local = jax.tree.map(lambda x: np.asarray(x)[rows], batch)
  return sharding.shard_batch(local, batch_sharding.mesh, batch_sharding.spec)


def _in_memory_batches(inputs, labels, plan) -> Callable[[int], dict]:
  def batch(i):
    out = {k: v[plan[i]] for k, v in inputs.items()}
    out["label"] = labels[plan[i]]
    return out
  return batch


def finetune(apply_fn, params0, head, inputs=None, labels=None, *, mode, config,
             checkpoint_dir, seed=0, temperature, progress=True, mesh=None, rules=None,
             param_axes=None, batches=None, input_keys=TEXT_INPUTS):
  """Fine-tunes `params0` on (inputs, labels) or `batches`; returns the fine-tuned params.

  What comes back is always the trained first argument of
  `model_fn(apply_fn, mode)`: the params in `standard` / `linear` mode, and
  the LoRA factors in `lora` mode (a small tree, as in the checkpoints);
  densify them with `lora.densify(factors, params0, alpha=config.lora_alpha)`
  for the task vector, or `lora.apply(params0, factors, alpha=...)` for the
  fine-tuned params.

  Args:
    apply_fn: `apply_fn(params, *[batch[k] for k in input_keys]) -> embeddings [B, D]`.
    params0: the pre-trained params (expansion point in `linear` mode).
    head: frozen class embeddings [C, D].
    inputs: dict of arrays [N, ...] (by default `input_ids`, `attention_mask`),
      held in memory and drawn by `batch_plan`.
    labels: int array [N].
    batches: instead of inputs / labels, `batches(step) -> host batch` (a dict
      with `input_keys` and `label`, `config.batch_size` rows) for data
      streamed from disk. It must be a pure function of the step, so that a
      resumed run sees the batches an uninterrupted one would.
    input_keys: the batch keys `apply_fn` reads, in order.
    mode: 'standard', 'linear' or 'lora'.
    config: ConfigDict with steps, batch_size, lr, weight_decay, warmup_steps,
      clip_norm, checkpoint_every; in `lora` mode also `lora_rank` (default 8)
      and `lora_alpha` (default None: alpha = rank, scale 1). The LoRA
      factors start from `lora.init(params0, lora_rank, jax.random.key(seed))`.
    checkpoint_dir: where the Orbax checkpoints of this run live. A finished run
      is restored instead of retrained; an interrupted one resumes.
    mesh: optional `jax.sharding.Mesh`; the step then runs sharded on it (see
      the module docstring) and the returned params are global arrays in
      their parameter shardings. Every process of a multi-host run calls
      `finetune` with the same arguments.
    rules: logical axis rules for `mesh` (default `sharding.DEFAULT_RULES`).
    param_axes: logical axes of the params (default `default_param_axes`); in
      `lora` mode those of `params0`, while the factors always get
      `default_param_axes` of the factors tree.
  """
  if mode not in TRAIN_MODES:
    raise ValueError(f"Unknown fine-tuning mode {mode!r}; expected one of {TRAIN_MODES}.")
  if (batches is None) == (inputs is None or labels is None):
    raise ValueError("finetune needs either inputs= and labels= (in memory) or batches= "
                     "(a function step -> batch), not both or neither.")
  optimizer = make_optimizer(config)
  # What the optimizer trains: params0 itself, or LoRA factors beside it.
  trainable0, lora_alpha = params0, None
  if mode == "lora":
    trainable0 = lora.init(params0, config.get("lora_rank", 8), jax.random.key(seed))
    lora_alpha = config.get("lora_alpha", None)
  shardings = None
  if mesh is not None:
    shardings = train_shardings(optimizer, params0, mesh, rules, param_axes, config.batch_size)
    if mode == "lora":  # The state holds the factors; params0 keeps its own shardings.
      factor_sh = train_shardings(optimizer, trainable0, mesh, rules, None, config.batch_size)
      shardings = factor_sh._replace(params=shardings.params)
      trainable0 = place(trainable0, shardings.state.params)
    params0 = place(params0, shardings.params)
    head = place(head, shardings.head)
  if mode != "lora":
    trainable0 = params0
  with checkpoints.Checkpointer(checkpoint_dir, max_to_keep=1) as manager:
    state = init_state(optimizer, trainable0, shardings)
    latest = manager.latest_step()
    if latest is not None:  # Resume (or skip) from the last complete checkpoint.
      # A target of arrays: each leaf is read straight into its sharding.
      state, _ = manager.restore(latest, target=state)
    if int(state.step) >= config.steps:
      return state.params
    if batches is None:
      batches = _in_memory_batches(inputs, labels, batch_plan(len(labels), config.batch_size,
                                                              config.steps, seed))
    step_fn = jit_train_step(
        make_train_step(apply_fn, mode, optimizer, temperature, input_keys, lora_alpha),
        shardings)
    start = int(state.step)
    bar = tqdm.tqdm(range(start, config.steps), desc=f"fine-tune {mode}",
                    disable=not progress or not distributed.is_main_process(), leave=False,
                    initial=start, total=config.steps)
    for i in bar:
      batch = batches(i)
      if shardings is not None:
        batch = global_batch(batch, shardings.batch)
      state, metrics = step_fn(state, params0, head, batch)
      done = i + 1
      if done % config.checkpoint_every == 0 or done == config.steps:
        manager.save(done, state, metadata={"mode": mode, "seed": seed,
                                            "loss": float(metrics["loss"])})
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", refresh=False)
  return state.params
