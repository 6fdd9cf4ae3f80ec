"""LiNeS (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025).

Scales the update of layer l (depth d = 0 .. L-1, input side first)
linearly with depth:

  tau^(l) <- lambda(d) * tau^(l),   lambda(d) = alpha + (beta - alpha) * d / (L - 1)

so shallow layers, which hold general features, move less than deep ones.
``layer_scaling(alpha, beta)`` is that post-transform and composes with
any merge like ``optax.chain``: ``chain(ties(), layer_scaling(0.2, 1.0))``.
The registered method ``lines`` is ``chain(get(base), layer_scaling(...))``
with task arithmetic as the default base. Defaults alpha = 0, beta = 1:
the paper's post-training editing setting (first layer kept at the
pre-trained weights, last layer fully updated); for multi-task merging the
paper tunes alpha and beta on validation data.

Depth comes from the leaf path: ``depth_fn(path) -> int | None``. The
default ``depth_from_path`` reads the first integer that labels a layer,
e.g. ``layers_3``, ``layer/3``, ``blocks.7``, ``resblocks_11``, ``h.0`` or a
bare list index; L is one more than the largest depth found (or
``num_layers``). Leaves without a depth (embeddings, final norms, heads)
get ``unlayered_scale``, by default alpha (treated as the shallowest layer).
Entrywise: no statistics, no extra buffer.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax

from research.merging import base
from research.merging import hparams
from research.merging import registry
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register
from research.models.param_tree import leaf_name

_LAYER_NAME = re.compile(
    r"^(?:layers?|blocks?|resblocks?|h|stages?|encoder_layers?|decoder_layers?)[_\-]?(\d+)$")


def _key_names(path) -> list[str]:
  """The parts of a key path's leaf name, with dotted / slashed keys split ("blocks.7" -> blocks, 7)."""
  return [p for p in re.split(r"[./]", leaf_name(path)) if p]


def depth_from_path(path) -> int | None:
  """Layer index of a leaf from its key path (see module doc), or None."""
  parts = _key_names(path)
  for i, part in enumerate(parts):
    m = _LAYER_NAME.match(part.lower())
    if m:
      return int(m.group(1))
    if part.isdigit() and i > 0 and _LAYER_NAME.match(parts[i - 1].lower() + "0"):
      return int(part)           # "layers/3", "blocks.7"
  for part in parts:
    if part.isdigit():
      return int(part)           # a bare list index: [block0, block1, ...]
  return None


def layer_scaling(alpha: float = 0.0, beta: float = 1.0,
                  depth_fn: Callable[[Any], int | None] = depth_from_path,
                  num_layers: int | None = None,
                  unlayered_scale: float | None = None) -> Merge:
  """Post-transform: multiply the leaf at depth d by alpha + (beta - alpha) d / (L - 1)."""
  alpha = hparams.real(alpha, "alpha")
  beta = hparams.real(beta, "beta")
  if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
    raise ValueError(f"num_layers must be a positive int, got {num_layers!r}.")
  other = alpha if unlayered_scale is None else hparams.real(unlayered_scale, "unlayered_scale")

  def scales(tree):
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    depths = [depth_fn(p) for p, _ in paths]
    found = [d for d in depths if d is not None]
    n_layers = num_layers if num_layers is not None else (max(found) + 1 if found else 1)
    out = []
    for (p, _), d in zip(paths, depths):
      if d is None:
        out.append(other)
      elif not 0 <= d < n_layers:
        raise ValueError(
            f"leaf {jax.tree_util.keystr(p)} has depth {d}, outside [0, {n_layers}). "
            "Fix: pass num_layers= or a depth_fn that returns depths in that range.")
      else:
        frac = d / (n_layers - 1) if n_layers > 1 else 1.0
        out.append(alpha + (beta - alpha) * frac)
    return out

  def init(tree, **kwargs):
    del kwargs
    scales(tree)      # validates depths early
    return ()

  def apply(coeffs, tree):
    del coeffs
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = []
    for x, s in zip(leaves, scales(tree)):
      out.append((x.astype(stacked_lib.compute_dtype(x.dtype)) * s).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return Merge(init, apply)


@register("lines")
def lines(alpha: float = 0.0, beta: float = 1.0, base_method: str = "task_arithmetic",
          num_layers: int | None = None, unlayered_scale: float | None = None) -> Merge:
  """LiNeS on top of ``base_method`` (any registered name, with its default hparams)."""
  if base_method == "lines":
    raise ValueError("base_method must be a merge method other than 'lines'.")
  return base.chain(registry.get(base_method),
                    layer_scaling(alpha, beta, num_layers=num_layers,
                                  unlayered_scale=unlayered_scale))
