"""Reading a Flax NNX model's Param tree: leaf names, logical axes, size summaries.

Model code puts logical axis names on every parameter as the Variable metadata
`out_sharding` (the key flax 0.12 reads in `nnx.get_partition_spec` under
`nnx.logical_axis_rules`), with `eager_sharding=False` so that building a model
needs no mesh. The sharding module maps the names to mesh axes with rules from
the config, as MaxText / T5X do.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def axes_metadata(*names: str | None) -> dict[str, Any]:
  """Variable metadata that records one logical axis name per array dimension.

  >>> axes_metadata('embed', 'mlp')
  {'out_sharding': ('embed', 'mlp'), 'eager_sharding': False}
  """
  return {"out_sharding": tuple(names), "eager_sharding": False}


def _param_state(model_or_state: Any) -> Any:
  if isinstance(model_or_state, nnx.Module):
    return nnx.state(model_or_state, nnx.Param)
  return model_or_state


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes(model_or_state: Any) -> Any:
  """Logical axis names of every parameter, as a tree shaped like the Param state.

  Args:
    model_or_state: an `nnx.Module` (its `nnx.Param` state is read) or a state
      from `nnx.split(model, nnx.Param)` / `nnx.state(model, nnx.Param)`,
      concrete or abstract (`nnx.eval_shape`).

  Returns:
    The state's tree with each Param replaced by its tuple of names (one per
    array dimension, e.g. `('embed', 'mlp')`), or by None where the Param has
    no names. It is a prefix of the Param state; map it with
    `jax.tree.map(f, axes, params, is_leaf=lambda x: x is None or isinstance(x, tuple))`.
  """
  def names(variable):
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)

  return jax.tree.map(names, _param_state(model_or_state), is_leaf=_is_variable)


def leaf_name(path: tuple[Any, ...]) -> str:
  """'layers/3/attention/query/kernel' for a `jax.tree_util` key path.

  The trailing `.value` attribute of an NNX Variable is dropped, so the name is
  the same whether the tree holds Variables or plain arrays.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        parts.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_summary(model_or_state: Any) -> list[tuple[str, tuple[int, ...], int]]:
  """(leaf name, shape, element count) of every parameter, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(_param_state(model_or_state))[0]
  return [(leaf_name(path), tuple(leaf.shape), int(np.prod(leaf.shape))) for path, leaf in leaves]


def param_count(model_or_state: Any) -> int:
  """Total number of parameter elements."""
  return sum(count for _, _, count in param_summary(model_or_state))
