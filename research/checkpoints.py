"""Orbax checkpoints: a pytree plus a JSON metadata dict per step, restored into target shardings.

Layout of one checkpoint directory (an Orbax `CheckpointManager`)::

    <directory>/<step>/state/   the pytree (StandardSave: sharded, OCDBT)
    <directory>/<step>/meta/    the metadata dict (JsonSave)

Guarantees, and what they rest on:
  * Atomic steps. Orbax writes a step into `<step>.orbax-checkpoint-tmp...`
    and renames it when every process has finished (on GCS it writes
    `commit_success.txt` last instead). Temporary directories are never
    listed as steps. On top of that `latest_step` skips a step directory
    without Orbax's `_CHECKPOINT_METADATA` file or with an empty item folder
    (e.g. an interrupted copy of a checkpoint), so a half-written
    checkpoint is never taken for a good one.
  * No overwrite. Saving a step that already exists raises FileExistsError
    and leaves the old checkpoint untouched; pick a new step or delete the
    old one first.
  * Clear errors. A missing directory or step raises FileNotFoundError that
    names the path and the steps that do exist.

All processes call every method (Orbax coordinates who writes what); only
the values differ per process. Saves are asynchronous by default: `save`
returns once the arrays are copied off the devices; `wait()` (or `close()`,
or the next `save`) blocks until the step is on disk.

>>> with Checkpointer('/tmp/ckpt', max_to_keep=3) as ckpt:   # doctest: +SKIP
...   ckpt.save(100, params, {'task': 'mnli', 'mode': 'linear'})
...   params, meta = ckpt.restore(target=abstract_params_with_shardings)
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE = "state"
META = "meta"
_ITEMS = (STATE, META)
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


def _is_complete(step_dir: epath.Path) -> bool:
  if not (step_dir / _STEP_METADATA_FILE).exists():
    return False
  for item in _ITEMS:
    d = step_dir / item
    if not d.is_dir() or not any(True for _ in d.iterdir()):
      return False
  return True


def _manager(directory: epath.Path, options: ocp.CheckpointManagerOptions,
             state_handler: ocp.CheckpointHandler) -> ocp.CheckpointManager:
  # Handlers named up front so metadata can be read before any save/restore.
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      STATE: state_handler, META: ocp.JsonCheckpointHandler()})


class Checkpointer:
  """Saves and restores (pytree, metadata) pairs per integer step in `directory`.

  Args:
    directory: where the steps live; created unless `read_only`.
    max_to_keep: keep only the newest N steps (None keeps all).
    async_save: write in a background thread (see the module docstring).
    read_only: never create, write or delete anything; a missing directory
      is a FileNotFoundError.
    cleanup_tmp: delete leftover temporary step directories (from a
      preempted save) when opening. Off by default: another job writing to
      the same directory would lose its in-progress step.
  """

  def __init__(self, directory: os.PathLike | str, *, max_to_keep: Optional[int] = None,
               async_save: bool = True, read_only: bool = False, cleanup_tmp: bool = False):
    # Orbax needs absolute paths; workdirs in configs are relative to the repo.
    self._directory = epath.Path(os.path.abspath(directory))
    if read_only and not self._directory.exists():
      raise FileNotFoundError(
          f"Checkpoint directory {self._directory} does not exist; check the path "
          "(it is the workdir's checkpoint folder written by training) or train first.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
    self._read_only = read_only
    # Read-only is enforced here (save raises) rather than by Orbax's option,
    # which logs warnings on every open; Orbax writes nothing without a save.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=cleanup_tmp and not read_only,
    )
    self._manager = _manager(self._directory, options, ocp.StandardCheckpointHandler())

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def all_steps(self, *, reload: bool = False) -> list[int]:
    """Finalized, complete steps in ascending order (`reload` re-reads the directory).

    A step whose asynchronous save is still running is not listed until it
    is on disk; call `wait()` first to include it.
    """
    if reload:
      self._manager.reload()
    return sorted(s for s in self._manager.all_steps() if _is_complete(self._step_dir(s)))

  def latest_step(self, *, reload: bool = False) -> Optional[int]:
    """The newest complete step, or None when there is none."""
    steps = self.all_steps(reload=reload)
    return steps[-1] if steps else None

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def save(self, step: int, pytree: Any, metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Writes `pytree` (any tree of arrays, e.g. params or an NNX State) and JSON `metadata` as `step`.

    Raises FileExistsError if `step` exists already; the existing checkpoint
    is left intact. Older steps beyond `max_to_keep` are deleted after the
    save.
    """
    if self._read_only:
      raise PermissionError(f"Checkpointer for {self._directory} was opened read_only; "
                            "open it with read_only=False to save.")
    step = int(step)
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except TypeError as e:
      raise TypeError(f"Checkpoint metadata must be JSON-serialisable ({e}); convert values "
                      "to str / int / float / list / dict.") from None
    if step in self._manager.all_steps():
      raise FileExistsError(
          f"Checkpoint step {step} already exists at {self._step_dir(step)}; save under a new "
          "step or delete that directory first (it is never overwritten).")
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(pytree), META: ocp.args.JsonSave(metadata)})
    try:
      # force: our caller decides when to save; Orbax's interval policy is not used.
      self._manager.save(step, args=args, force=True)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      raise FileExistsError(f"Checkpoint step {step} already exists at {self._step_dir(step)}.") from None

  def restore(self, step: Optional[int] = None, target: Any = None) -> tuple[Any, dict]:
    """Returns `(pytree, metadata)` of `step` (default: the latest complete step).

    `target` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` (see
    `sharding.abstract_with_sharding`) or of arrays: each leaf is read
    straight into that sharding, shape and dtype, and the result has the
    target's tree type (e.g. an NNX State). Without a target the tree comes
    back as nested dicts, with the shardings recorded at save time (which
    needs the same devices as when it was saved).
    """
    step = self._check_step(step)
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        META: ocp.args.JsonRestore(),
    })
    restored = self._manager.restore(step, args=args)
    return restored[STATE], dict(restored[META] or {})

  def _check_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(
            f"No complete checkpoint in {self._directory}; check the path or train first.")
      return steps[-1]
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(
          f"No complete checkpoint for step {step} at {self._step_dir(step)}; available steps: "
          f"{steps or 'none'}. Pass one of them, or step=None for the latest.")
    return step

  def leaf_paths(self, step: Optional[int] = None) -> dict[str, jax.ShapeDtypeStruct]:
    """'a/b/c' path -> shape and dtype of every saved leaf (read from metadata, no arrays)."""
    step = self._check_step(step)
    leaves = jax.tree_util.tree_flatten_with_path(self._metadata_tree(step))[0]
    return {_join(path): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for path, m in leaves}

  def _metadata_tree(self, step: int) -> Any:
    tree = self._manager.item_metadata(step)[STATE]
    return getattr(tree, "tree", tree)

  def wait(self) -> None:
    """Blocks until every asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _join(path) -> str:
  return "/".join(_key_name(k) for k in path)


def restore(directory: os.PathLike | str, step: Optional[int] = None, target: Any = None) -> tuple[Any, dict]:
  """One-shot read-only `Checkpointer(directory).restore(step, target)`."""
  with Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.restore(step, target)


def restore_leaves(directory: os.PathLike | str, step: Optional[int], paths: Iterable[str],
                   shardings: Optional[Mapping[str, jax.sharding.Sharding]] = None) -> dict[str, Any]:
  """Reads only the leaves at `paths` ('encoder/layer_0/kernel') of one step: `{path: array}`.

  For merges streamed leaf by leaf over checkpoints larger than memory
  (list the paths with `Checkpointer.leaf_paths`). A leaf comes back as a
  numpy array, or as a jax.Array placed on `shardings[path]` when given.
  """
  paths = list(paths)
  shardings = dict(shardings or {})
  with Checkpointer(directory, read_only=True) as ckpt:
    step = ckpt._check_step(step)  # pylint: disable=protected-access
    metadata = ckpt._metadata_tree(step)  # pylint: disable=protected-access
  available = {_join(path) for path, _ in jax.tree_util.tree_flatten_with_path(metadata)[0]}
  missing = [p for p in paths if p not in available]
  if missing:
    raise KeyError(f"Leaves {missing} are not in checkpoint {epath.Path(directory) / str(step)}; "
                   f"it has e.g. {sorted(available)[:5]} (see Checkpointer.leaf_paths).")
  wanted = set(paths)

  def target(path, m):
    # Unwanted leaves are placeholders: the full structure (lists included) is
    # kept, and Orbax skips reading them.
    p = _join(path)
    if p not in wanted:
      return ocp.PLACEHOLDER, ocp.PLACEHOLDER
    if p in shardings:
      return (jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=shardings[p]),
              ocp.ArrayRestoreArgs(sharding=shardings[p], dtype=m.dtype))
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), ocp.RestoreArgs(restore_type=np.ndarray)

  pairs = jax.tree_util.tree_map_with_path(target, metadata)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2
  item = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
  restore_args = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
  # PyTreeRestore reads StandardSave's on-disk format and accepts placeholders.
  reader = _manager(epath.Path(os.path.abspath(directory)), ocp.CheckpointManagerOptions(create=False),
                    ocp.PyTreeCheckpointHandler())
  try:
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)})
    restored = reader.restore(step, args=args)[STATE]
  finally:
    reader.close()
  flat = {_join(path): x for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
  return {p: flat[p] for p in paths}
