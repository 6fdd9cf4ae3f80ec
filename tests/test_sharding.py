"""Tests for research.sharding: meshes, logical axis rules, FSDP defaults, stacked task vectors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from research import sharding

RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None), ("heads", None),
         ("vocab", None), ("task", None)]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((2, 4), ("data", "fsdp"))


# --- meshes -----------------------------------------------------------------


def test_make_mesh_shapes_and_default_axis_types(mesh):
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_make_mesh_fills_minus_one():
  assert dict(sharding.make_mesh((-1, 2), ("data", "fsdp")).shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh([1, -1], ["data", "fsdp"]).shape) == {"data": 1, "fsdp": 8}


def test_make_mesh_axis_types_from_strings_and_enums():
  m = sharding.make_mesh((2, 4), ("data", "fsdp"), "explicit")
  assert m.axis_types == (AxisType.Explicit,) * 2
  m = sharding.make_mesh((2, 4), ("data", "fsdp"), ("auto", AxisType.Explicit))
  assert m.axis_types == (AxisType.Auto, AxisType.Explicit)
  with pytest.raises(ValueError, match="Unknown axis type"):
    sharding.make_mesh((2, 4), ("data", "fsdp"), "implicit")
  with pytest.raises(ValueError, match="one entry per mesh axis"):
    sharding.make_mesh((2, 4), ("data", "fsdp"), ("auto",))


@pytest.mark.parametrize("shape,axes,match", [
    ((3, 2), ("data", "fsdp"), r"mesh_shape=\(3, 2\).*8 devices"),
    ((3, -1), ("data", "fsdp"), r"not divisible by 3.*mesh_shape=\(3, -1\)"),
    ((-1, -1), ("data", "fsdp"), "At most one"),
    ((8,), ("data", "fsdp"), "differ in length"),
    ((2, 0), ("data", "fsdp"), "positive"),
    ((2, 4), ("data", "data"), "Duplicate"),
])
def test_make_mesh_bad_shapes_raise_clear_errors(shape, axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape, axes)


def test_make_mesh_on_a_subset_of_devices():
  m = sharding.make_mesh((-1,), ("data",), devices=jax.devices()[:2])
  assert dict(m.shape) == {"data": 2}


# --- logical rules ----------------------------------------------------------


@pytest.mark.parametrize("axes,expected", [
    (("batch", "embed"), P(("data", "fsdp"), None)),   # fsdp already used by batch
    (("embed", "mlp"), P("fsdp", None)),
    (("vocab", "embed"), P(None, "fsdp")),
    ((None, "heads"), P(None, None)),
    ((), P()),
    (P("embed", None), P("fsdp", None)),
])
def test_logical_to_mesh_spec_hand_cases(axes, expected):
  assert sharding.logical_to_mesh_spec(axes, RULES) == expected


def test_rules_are_tried_in_order_and_fall_back():
  rules = [("mlp", "fsdp"), ("embed", "fsdp"), ("embed", "data")]
  assert sharding.logical_to_mesh_spec(("mlp", "embed"), rules) == P("fsdp", "data")
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", None)
  # An explicit None stops the search: replicate.
  assert sharding.logical_to_mesh_spec(("x",), [("x", None), ("x", "data")]) == P(None)


def test_rules_from_config_lists():
  rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"]]
  assert sharding.logical_to_mesh_spec(("batch",), rules) == P(("data", "fsdp"))


def test_indivisible_dims_fall_back_to_replication(mesh):
  spec = lambda axes, shape, **kw: sharding.logical_to_mesh_spec(axes, RULES, mesh=mesh,
                                                                  shape=shape, **kw)
  assert spec(("batch",), (16,)) == P(("data", "fsdp"))
  assert spec(("batch",), (2,)) == P("data")    # longest dividing prefix
  assert spec(("batch",), (3,)) == P(None)
  assert spec(("embed", "mlp"), (6, 8)) == P(None, None)
  with pytest.raises(ValueError, match="not divisible"):
    spec(("embed",), (6,), strict=True)


def test_unknown_names_raise(mesh):
  with pytest.raises(ValueError, match="'embd' has no rule"):
    sharding.logical_to_mesh_spec(("embd",), RULES)
  with pytest.raises(ValueError, match=r"mesh axes \['tensor'\]"):
    sharding.logical_to_mesh_spec(("mlp",), [("mlp", "tensor")], mesh=mesh)
  with pytest.raises(ValueError, match="one name"):
    sharding.logical_to_mesh_spec(("embed",), RULES, shape=(4, 4))
  with pytest.raises(ValueError, match="must be a pair"):
    sharding.logical_to_mesh_spec(("embed",), [("embed",)])


NAMES = ["batch", "embed", "mlp", "heads", "vocab", "task", None]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16])),
                max_size=4))
def test_specs_use_each_mesh_axis_once_and_divide(mesh, dims):
  rules = RULES + [("mlp", "data"), ("heads", "fsdp")]   # extra fallbacks
  axes = tuple(n for n, _ in dims)
  shape = tuple(s for _, s in dims)
  spec = sharding.logical_to_mesh_spec(axes, rules, mesh=mesh, shape=shape)
  used = []
  for entry, size in zip(spec, shape):
    entry = () if entry is None else (entry,) if isinstance(entry, str) else entry
    used.extend(entry)
    assert size % math.prod(mesh.shape[a] for a in entry) == 0
  assert len(used) == len(set(used))


# --- trees ------------------------------------------------------------------


def _params():
  return {"dense": {"kernel": jnp.ones((256, 1024)), "bias": jnp.ones((1024,))},
          "ln": {"scale": jnp.ones((256,))}, "step": jnp.int32(0)}


def test_fsdp_axes_shards_the_largest_divisible_dim():
  params = {"k": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
            "odd": jax.ShapeDtypeStruct((1024, 257), jnp.float32),
            "prime": jax.ShapeDtypeStruct((1031, 257), jnp.float32),
            "tie": jax.ShapeDtypeStruct((512, 512), jnp.float32),
            "bias": jax.ShapeDtypeStruct((1024,), jnp.float32),
            "scalar": jax.ShapeDtypeStruct((), jnp.float32)}
  axes = sharding.fsdp_axes(params, 8, min_bytes=1 << 16)
  assert axes == {"k": P(None, "fsdp"), "odd": P("fsdp", None), "prime": P(None, None),
                  "tie": P("fsdp", None), "bias": P(None), "scalar": P()}
  assert sharding.fsdp_axes(params, 1)["k"] == P(None, None)


def test_params_sharded_over_2d_mesh_hold_one_eighth_per_device(mesh):
  params = _params()
  axes = sharding.fsdp_axes(params, mesh.size, min_bytes=1 << 16)
  shardings = sharding.logical_sharding(axes, mesh, [("fsdp", ("data", "fsdp"))], shapes=params)
  placed = sharding.put(params, shardings)
  kernel = placed["dense"]["kernel"]
  assert kernel.sharding.spec == P(None, ("data", "fsdp"))
  assert len(kernel.addressable_shards) == 8
  for shard in kernel.addressable_shards:
    assert shard.data.nbytes == kernel.nbytes // 8
  bias = placed["dense"]["bias"]
  assert all(s.data.nbytes == bias.nbytes for s in bias.addressable_shards)
  np.testing.assert_array_equal(np.asarray(kernel), np.ones((256, 1024)))


def test_sharded_jit_keeps_target_shardings(mesh):
  params = _params()
  axes = sharding.fsdp_axes(params, 4, min_bytes=1 << 16)
  shardings = sharding.logical_sharding(axes, mesh, sharding.DEFAULT_RULES, shapes=params)
  placed = sharding.put(params, shardings)
  double = jax.jit(lambda p: jax.tree.map(lambda a: a * 2, p),
                   in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)
  out = double(placed)
  for o, s in zip(jax.tree.leaves(out), jax.tree.leaves(shardings)):
    assert o.sharding == s
  np.testing.assert_array_equal(np.asarray(out["dense"]["kernel"]), 2 * np.ones((256, 1024)))


def test_logical_sharding_names_the_leaf_on_error(mesh):
  with pytest.raises(ValueError, match=r"\['a'\]\['b'\].*'nope'"):
    sharding.logical_sharding({"a": {"b": ("nope",)}}, mesh, RULES)


def test_stacked_sharding_prepends_task_axis(mesh):
  axes = {"w": P("embed", "mlp"), "b": P(None)}
  base = sharding.logical_sharding(axes, mesh, RULES)
  for tree in (base, axes):
    stacked = sharding.stacked_sharding(tree, mesh, RULES)
    assert stacked["w"].spec == P(None, "fsdp", None)
    assert stacked["b"].spec == P(None, None)
  rules = RULES[:-1] + [("task", "data")]
  stacked = sharding.stacked_sharding(base, mesh, rules)
  assert stacked["w"].spec == P("data", "fsdp", None)
  # The task axis never reuses a mesh axis of the param, and respects divisibility.
  used = sharding.logical_sharding({"w": P("batch", None)}, mesh, RULES)
  assert sharding.stacked_sharding(used, mesh, rules)["w"].spec == P(None, ("data", "fsdp"), None)
  shapes = {"w": jax.ShapeDtypeStruct((3, 8, 4), jnp.float32), "b": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
  assert sharding.stacked_sharding(base, mesh, rules, shapes)["w"].spec == P(None, "fsdp", None)


def test_stacked_task_vectors_under_sharded_jit(mesh):
  rules = RULES[:-1] + [("task", "data")]
  taus = jnp.arange(4 * 8 * 4, dtype=jnp.float32).reshape(4, 8, 4)
  s = sharding.stacked_sharding({"w": P("embed", "mlp")}, mesh, rules)["w"]
  merged = jax.jit(lambda t: t.sum(0), out_shardings=NamedSharding(mesh, P("fsdp", None)))(
      jax.device_put(taus, s))
  np.testing.assert_allclose(np.asarray(merged), np.asarray(taus).sum(0))
  assert merged.sharding.spec == P("fsdp", None)


def test_abstract_with_sharding(mesh):
  params = _params()
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  abstract = sharding.abstract_with_sharding(jax.eval_shape(lambda: params), shardings)
  kernel = abstract["dense"]["kernel"]
  assert isinstance(kernel, jax.ShapeDtypeStruct)
  assert kernel.shape == (256, 1024) and kernel.sharding == NamedSharding(mesh, P())


def test_shard_batch_single_process(mesh):
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
  out = sharding.shard_batch(batch, mesh)
  assert out["x"].shape == (16, 3) and out["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  out = sharding.shard_batch(batch, mesh, P("data"))
  assert out["y"].sharding.spec == P("data")


def test_logical_constraint_in_jit(mesh):
  f = jax.jit(lambda x: sharding.logical_constraint(x * 2, ("batch", None), mesh, RULES))
  out = f(jnp.ones((16, 4)))
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)


def test_helpers_work_on_an_explicit_mesh():
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"), "explicit")
  params = {"w": jnp.ones((64, 32)), "b": jnp.ones((32,))}
  shardings = sharding.logical_sharding(sharding.fsdp_axes(params, 4, min_bytes=0), mesh,
                                        sharding.DEFAULT_RULES, shapes=params)
  params = sharding.put(params, shardings)
  x = sharding.shard_batch(np.ones((16, 64), np.float32), mesh, P("data"))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda p, x: sharding.logical_constraint(
        x @ p["w"] + p["b"], ("batch", None), mesh, sharding.DEFAULT_RULES))(params, x)
    tau = jax.jit(lambda a, b: jax.tree.map(jnp.subtract, a, b))(params, params)
  assert jax.typeof(y).sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_allclose(np.asarray(y), np.full((16, 32), 65.0))
  assert tau["w"].sharding == shardings["w"]


def test_logical_axes_from_nnx(mesh):
  from flax import nnx

  with nnx.use_eager_sharding(False):
    model = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  axes = sharding.logical_axes_from_nnx(params)
  assert axes["kernel"].get_value() == P("embed", "mlp")
  assert axes["bias"].get_value() == P(None)
  axes = sharding.logical_axes_from_nnx(params, default=lambda v: P("embed"))
  assert axes["bias"].get_value() == P("embed")
  shardings = sharding.logical_sharding(axes, mesh, RULES, shapes=params)
  placed = jax.jit(lambda p: p, out_shardings=shardings)(params)
  assert placed["kernel"].get_value().sharding.spec == P("fsdp", None)
  assert placed["bias"].get_value().sharding.spec == P("fsdp")
