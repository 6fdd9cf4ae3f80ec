"""Device meshes and logical-axis sharding rules (MaxText / T5X style).

Model and merge code names array dimensions with *logical* axes ('embed',
'mlp', 'task', ...); the experiment config maps them to *mesh* axes with a
list of rules, so the same code runs on one CPU, a GPU node or a TPU pod::

    mesh = make_mesh(config.mesh_shape, config.mesh_axes)   # e.g. (-1, 1), ('data', 'fsdp')
    rules = config.logical_axis_rules   # [('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ...]
    abstract = jax.eval_shape(init, key)                     # shapes first
    axes = fsdp_axes(abstract, mesh.shape['fsdp'])           # or logical_axes_from_nnx(...)
    shardings = logical_sharding(axes, mesh, rules, shapes=abstract)
    params = jax.jit(init, out_shardings=shardings)(key)

Logical axes of one array are a `PartitionSpec` of logical names (what
`nnx.get_partition_spec` returns); a plain tuple such as ('embed', None) is
accepted too. Functions that build logical-axes trees return PartitionSpecs
because they are pytree leaves, while a tuple of Nones would flatten away.

Resolution of one logical axis (see `logical_to_mesh_spec`):
  * rules are tried in order; the first rule for the name that yields any
    mesh axis wins; a rule mapping to None means "replicate" and stops;
  * mesh axes already used by an earlier dimension of the same array are
    dropped (a mesh axis may shard only one dimension);
  * with a mesh and the array shape, the longest prefix of the remaining mesh
    axes whose total size divides the dimension is kept; if none divides, the
    next rule is tried and finally the dimension is replicated. This is the
    MaxText-like choice: a tiny or odd-sized leaf (a bias of length 10 on an
    fsdp axis of 4) stays replicated rather than failing. `strict=True` makes
    it a ValueError instead;
  * an unknown logical name, or a rule naming a mesh axis that the mesh does
    not have, is a ValueError (a typo in a config must fail loudly).

Meshes default to `AxisType.Auto` (JAX 0.10's own default is Explicit). Our
primitives (task vectors, `jax.jvp` linearization, merges) carry no
sharding-in-types annotations; with Auto axes the compiler propagates the
in/out shardings given to `jax.jit`, which is what logical rules are for.
Explicit axes make every op's sharding part of its type and would require
`out_sharding=` arguments in model code. Pass `axis_types='explicit'` when
code is written for that mode.

`jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=...)` takes
the NamedSharding trees built here directly; no wrapper is needed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

P = PartitionSpec
MeshAxes = Union[None, str, Sequence[str]]
Rules = Sequence[tuple[str, MeshAxes]]

# A reasonable starting point for configs; plain data so it serialises.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("task", None),
    ("fsdp", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("position", None),
    ("token_type", None),
)

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit, "manual": AxisType.Manual}


# ---------------------------------------------------------------------------
# Meshes.


def _axis_type(t: Union[str, AxisType]) -> AxisType:
  if isinstance(t, AxisType):
    return t
  if isinstance(t, str) and t.lower() in _AXIS_TYPES:
    return _AXIS_TYPES[t.lower()]
  raise ValueError(f"Unknown axis type {t!r}; use one of {sorted(_AXIS_TYPES)} "
                   "or a jax.sharding.AxisType.")


def make_mesh(mesh_shape: Sequence[int], mesh_axes: Sequence[str],
              axis_types: Union[None, str, AxisType, Sequence[Union[str, AxisType]]] = None,
              *, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a `Mesh` over `devices` (default: all global devices) from config values.

  Args:
    mesh_shape: sizes per mesh axis, e.g. (2, 4); one entry may be -1 for
      "all remaining devices", e.g. (-1, 1).
    mesh_axes: names per mesh axis, e.g. ('data', 'fsdp').
    axis_types: None (Auto on every axis, see the module docstring), one type
      for every axis, or one per axis; each an `AxisType` or 'auto' /
      'explicit' / 'manual'.
    devices: devices to lay out (default `jax.devices()`).

  >>> make_mesh((-1, 2), ('data', 'fsdp')).shape   # with 8 devices  # doctest: +SKIP
  {'data': 4, 'fsdp': 2}
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = tuple(int(s) for s in mesh_shape)
  axes = tuple(str(a) for a in mesh_axes)
  where = f"mesh_shape={tuple(mesh_shape)}, mesh_axes={axes}, {n} devices"
  if len(shape) != len(axes):
    raise ValueError(f"mesh_shape and mesh_axes differ in length ({where}); give one size per axis name.")
  if len(set(axes)) != len(axes):
    raise ValueError(f"Duplicate mesh axis name ({where}).")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"Mesh sizes must be positive or -1 ({where}).")
  if shape.count(-1) > 1:
    raise ValueError(f"At most one mesh size may be -1 ({where}).")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"Cannot fill -1: {n} devices are not divisible by {known} ({where}); "
                       "change mesh_shape.")
    shape = tuple(n // known if s == -1 else s for s in shape)
  if math.prod(shape) != n:
    raise ValueError(f"Mesh of size {math.prod(shape)} does not match the device count ({where}); "
                     "make the product of mesh_shape equal the device count or use -1 for one axis.")
  if axis_types is None:
    types = (AxisType.Auto,) * len(axes)
  elif isinstance(axis_types, (str, AxisType)):
    types = (_axis_type(axis_types),) * len(axes)
  else:
    types = tuple(_axis_type(t) for t in axis_types)
    if len(types) != len(axes):
      raise ValueError(f"axis_types={tuple(axis_types)} needs one entry per mesh axis ({where}).")
  return jax.make_mesh(shape, axes, axis_types=types, devices=devices)


# ---------------------------------------------------------------------------
# Logical axis rules.


def _normalize_rules(rules: Rules) -> list[tuple[str, tuple[str, ...]]]:
  """Rules from configs arrive as lists or tuples; None maps to ()."""
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"Logical axis rule #{i} {rule!r} must be a pair "
                       "(logical_name, mesh_axis | (mesh_axes...) | None).")
    name, target = rule
    if target is None:
      target = ()
    elif isinstance(target, str):
      target = (target,)
    else:
      target = tuple(target)
      if not all(isinstance(t, str) for t in target):
        raise ValueError(f"Logical axis rule {rule!r}: mesh axes must be strings.")
    out.append((name, target))
  return out


def _is_axes(x: Any) -> bool:
  """Whether x is the logical axes of one array (a leaf of an axes tree)."""
  if isinstance(x, PartitionSpec):
    return True
  return isinstance(x, tuple) and all(
      e is None or isinstance(e, str) or (isinstance(e, tuple) and all(isinstance(f, str) for f in e))
      for e in x)


def _resolve(name: str, rules, mesh: Optional[Mesh], dim: Optional[int], used: set,
             strict: bool) -> tuple[str, ...]:
  """Mesh axes for one logical dimension (possibly empty = replicated)."""
  candidates = [target for lname, target in rules if lname == name]
  if not candidates:
    raise ValueError(f"Logical axis {name!r} has no rule in {[r[0] for r in rules]}; "
                     f"add e.g. ({name!r}, None) to the logical axis rules.")
  indivisible = False
  for target in candidates:
    if not target:
      return ()
    if mesh is not None:
      missing = [a for a in target if a not in mesh.shape]
      if missing:
        raise ValueError(f"Logical axis rule ({name!r}, {target}) names mesh axes {missing} "
                         f"that the mesh {dict(mesh.shape)} lacks; fix the rules or mesh_axes.")
    axes = tuple(a for a in target if a not in used)
    if mesh is not None and dim is not None:
      while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
        indivisible = True
    if axes:
      return axes
  if indivisible and strict:
    raise ValueError(f"Dimension of size {dim} (logical {name!r}) is not divisible by the mesh "
                     f"axes its rules map to {candidates} in mesh {dict(mesh.shape)}.")
  if indivisible:
    logging.debug("Replicating logical axis %r of size %s: not divisible on mesh %s.",
                  name, dim, dict(mesh.shape))
  return ()


def logical_to_mesh_spec(logical_axes: Union[PartitionSpec, Sequence[Optional[str]]], rules: Rules,
                         *, mesh: Optional[Mesh] = None, shape: Optional[Sequence[int]] = None,
                         strict: bool = False) -> PartitionSpec:
  """Maps logical axis names of one array to a mesh `PartitionSpec` (rules in the module docstring).

  Without `mesh` only the rules and the use-once guard apply; with `mesh` the
  mesh axes are checked to exist; with `mesh` and `shape` indivisible
  dimensions fall back (or raise when `strict`).

  >>> logical_to_mesh_spec(('batch', 'embed'), [('batch', ('data', 'fsdp')), ('embed', 'fsdp')])
  PartitionSpec(('data', 'fsdp'), None)
  """
  rules = _normalize_rules(rules)
  logical_axes = tuple(logical_axes)
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"Logical axes {logical_axes} have {len(logical_axes)} entries for an array "
                     f"of shape {tuple(shape)}; give one name (or None) per dimension.")
  used: set = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if not isinstance(name, str):
      raise ValueError(f"Logical axes {logical_axes}: entry {name!r} must be a name or None.")
    axes = _resolve(name, rules, mesh, None if shape is None else int(shape[i]), used, strict)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def logical_sharding(logical_axes_tree: Any, mesh: Mesh, rules: Rules, shapes: Any = None,
                     *, strict: bool = False) -> Any:
  """A `NamedSharding` tree from a tree of logical axes (leaves: PartitionSpec or tuples).

  `shapes` (optional) is a tree of the same structure with arrays or
  `jax.ShapeDtypeStruct`s; give it so indivisible dimensions fall back to
  replication instead of failing later in `jax.jit` / `device_put`.
  """
  def one(path, axes, x=None):
    try:
      spec = logical_to_mesh_spec(axes, rules, mesh=mesh, shape=None if x is None else x.shape,
                                  strict=strict)
    except ValueError as e:
      raise ValueError(f"At leaf {_path_str(path)}: {e}") from None
    return NamedSharding(mesh, spec)

  if shapes is None:
    return jax.tree_util.tree_map_with_path(one, logical_axes_tree, is_leaf=_is_axes)
  return jax.tree_util.tree_map_with_path(one, logical_axes_tree, shapes, is_leaf=_is_axes)


def logical_constraint(x: jax.Array, logical_axes, mesh: Mesh, rules: Rules) -> jax.Array:
  """Shards an activation by logical names inside jitted code.

  `jax.lax.with_sharding_constraint` (a hint to the compiler) on Auto axes;
  `jax.sharding.reshard` when every mesh axis is Explicit, where a constraint
  would only assert the sharding the type already has.
  """
  sharding = NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules, mesh=mesh, shape=x.shape))
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


# ---------------------------------------------------------------------------
# Logical axes for unannotated params and for Flax NNX state.


def fsdp_axes(params: Any, axis_size: int, *, name: str = "fsdp",
              min_bytes: int = 1 << 20) -> Any:
  """Default logical axes for params without annotations (FSDP / ZeRO-3 style).

  Each leaf of at least `min_bytes` gets `name` on its largest dimension
  divisible by `axis_size` (the earliest on ties); smaller leaves (biases,
  LayerNorm scales) and leaves with no divisible dimension are replicated.
  Works on arrays and `jax.ShapeDtypeStruct`s. Returns a PartitionSpec tree;
  the rules must map `name` (e.g. ('fsdp', 'fsdp'), as in DEFAULT_RULES).
  """
  axis_size = int(axis_size)
  if axis_size < 1:
    raise ValueError(f"fsdp_axes: axis_size must be >= 1, got {axis_size}.")

  def one(x):
    shape = tuple(x.shape)
    axes = [None] * len(shape)
    nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize
    if axis_size > 1 and nbytes >= min_bytes:
      for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % axis_size == 0:
          axes[i] = name
          break
    return PartitionSpec(*axes)

  return jax.tree.map(one, params)


def logical_axes_from_nnx(state: Any, default: Optional[Callable[[Any], PartitionSpec]] = None) -> Any:
  """Logical axes from the sharding metadata of a Flax NNX state (e.g. `nnx.split(model, nnx.Param)[1]`).

  A variable created with `nnx.with_partitioning(init, ('embed', 'mlp'))` or
  `nnx.Param(..., sharding_names=...)` yields P('embed', 'mlp'); unannotated
  variables get `default(value)` if given (e.g. `lambda v: fsdp_axes(v, 4)`)
  and are replicated otherwise. The result has the structure of `state`, so
  it feeds `logical_sharding(..., shapes=state)` directly.
  """
  from flax import nnx  # Lazy: flax is only needed for NNX users.

  def one(v):
    if not isinstance(v, nnx.Variable):
      return v
    names = v.get_metadata().get("out_sharding")
    if names is not None:
      axes = PartitionSpec(*names)
    elif default is not None:
      axes = default(v.get_value())
    else:
      axes = PartitionSpec(*([None] * np.ndim(v.get_value())))
    return v.replace(value=axes)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def stacked_sharding(param_shardings_or_axes: Any, mesh: Mesh, rules: Rules,
                     stacked_shapes: Any = None, *, task_axis: str = "task") -> Any:
  """Shardings for stacked task vectors: the leading `task` axis is prepended to every leaf.

  Leaves may be `NamedSharding`s (their spec is kept, the task dimension
  takes the mesh axes `rules` give `task_axis` minus those already used) or
  logical axes (`task_axis` is prepended and the rules applied).
  `stacked_shapes` (optional) are the stacked leaves, for divisibility of
  every dimension including the task count.
  """
  def one(path, leaf, x=None):
    shape = None if x is None else tuple(x.shape)
    try:
      if isinstance(leaf, NamedSharding):
        spec = tuple(leaf.spec)
        used = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
        axes = _resolve(task_axis, _normalize_rules(rules), mesh,
                        None if shape is None else shape[0], used, strict=False)
        head = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(mesh, PartitionSpec(head, *spec))
      # The task dimension is resolved first so it claims its mesh axes,
      # matching the NamedSharding branch only when no param axis uses them.
      return NamedSharding(mesh, logical_to_mesh_spec((task_axis, *tuple(leaf)), rules,
                                                      mesh=mesh, shape=shape))
    except ValueError as e:
      raise ValueError(f"At leaf {_path_str(path)}: {e}") from None

  is_leaf = lambda x: isinstance(x, NamedSharding) or _is_axes(x)
  if stacked_shapes is None:
    return jax.tree_util.tree_map_with_path(one, param_shardings_or_axes, is_leaf=is_leaf)
  return jax.tree_util.tree_map_with_path(one, param_shardings_or_axes, stacked_shapes,
                                          is_leaf=is_leaf)


# ---------------------------------------------------------------------------
# Arrays.


def abstract_with_sharding(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct` tree with `.sharding` set: the target for a sharded Orbax restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def put(tree: Any, shardings: Any) -> Any:
  """Places a (host or device) tree onto `shardings`: `jax.device_put`.

  On several processes every process must pass the same values; use
  `shard_batch` for data that differs per process.
  """
  return jax.device_put(tree, shardings)


def shard_batch(local_batch: Any, mesh: Mesh, spec: Optional[PartitionSpec] = None) -> Any:
  """Global arrays from this process's slice of the batch (`jax.make_array_from_process_local_data`).

  Each process passes its own rows; the global leading dimension is the sum
  over processes. `spec` (mesh axes) defaults to the leading dimension split
  over every mesh axis.
  """
  spec = PartitionSpec(tuple(mesh.axis_names)) if spec is None else spec
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
