"""Tests for research.merging: the Merge type, combinators, registry, simple methods, sharding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import merging
from research.merging import selection

T = 4
# The data-free methods (others may be registered by other modules and need data).
METHODS = tuple(m for m in merging.DATA_FREE if m in merging.METHODS)


def _stacked(seed=0):
  rng = np.random.default_rng(seed)
  return {
      # >= 32k entries per task: the selection folds this leaf.
      "big": rng.standard_normal((T, 64, 520)).astype(np.float32),
      "layers_0": {"w": rng.standard_normal((T, 16, 24)).astype(np.float32)},
      "layers_1": {"w": rng.standard_normal((T, 16, 24)).astype(np.float32),
                   "b": rng.standard_normal((T, 24)).astype(np.float32)},
  }


def _merge(method, stacked, **kwargs):
  return method.apply(method.init(stacked, key=jax.random.key(0), **kwargs), stacked)


# ------------------------------------------------------------------ hand-computed

def test_average_hand_computed():
  stacked = {"w": jnp.array([[1.0, 2.0], [3.0, -4.0]]), "b": jnp.array([[0.5], [1.5]])}
  out = _merge(merging.average(), stacked)
  # (1 + 3) / 2 = 2, (2 - 4) / 2 = -1, (0.5 + 1.5) / 2 = 1.
  np.testing.assert_allclose(out["w"], [2.0, -1.0])
  np.testing.assert_allclose(out["b"], [1.0])


def test_task_arithmetic_hand_computed():
  stacked = {"w": jnp.array([[1.0, 2.0], [3.0, -4.0], [0.0, 1.0]])}
  out = _merge(merging.task_arithmetic(scale=0.5), stacked)
  # 0.5 * (1 + 3 + 0) = 2, 0.5 * (2 - 4 + 1) = -0.5.
  np.testing.assert_allclose(out["w"], [2.0, -0.5])
  np.testing.assert_allclose(_merge(merging.task_arithmetic(), stacked)["w"], [4.0, -1.0])


def test_output_keeps_leaf_dtype():
  stacked = {"w": jnp.ones((3, 5), jnp.bfloat16)}
  for name in METHODS:
    out = jax.jit(lambda s: _merge(merging.get(name), s))(stacked)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].shape == (5,), name


# ----------------------------------------------------------------- combinators

def test_chain_threads_stages_and_coeffs():
  stacked = {"w": jnp.array([[1.0, -2.0], [3.0, 4.0]])}
  m = merging.chain(merging.scale(2.0), merging.average(), merging.scale(-1.0))
  coeffs = m.init(stacked)
  assert isinstance(coeffs, tuple) and len(coeffs) == 3
  # 2 * mean = (1 + 3, -2 + 4) = (4, 2); times -1.
  np.testing.assert_allclose(m.apply(coeffs, stacked)["w"], [-4.0, -2.0])
  with pytest.raises(ValueError, match="coeffs"):
    m.apply(coeffs[:2], stacked)
  with pytest.raises(TypeError, match="not a Merge"):
    merging.chain(merging.average(), "ties")


def test_chain_gives_each_stage_its_own_key():
  seen = []
  def spy(x, key=None, **kwargs):
    seen.append(key)
    return ()
  stage = merging.Merge(spy, lambda c, x: x)
  merging.chain(stage, stage).init({"w": jnp.zeros((2, 3))}, key=jax.random.key(3))
  assert len(seen) == 2
  assert not np.array_equal(jax.random.key_data(seen[0]), jax.random.key_data(seen[1]))


def test_ties_is_a_chain_of_its_stages():
  stacked = _stacked(1)
  direct = jax.jit(lambda s: _merge(merging.ties(density=0.3, scale=0.7), s))(stacked)
  composed = jax.jit(lambda s: _merge(merging.chain(
      merging.trim(0.3), merging.disjoint_mean(), merging.scale(0.7)), s))(stacked)
  jax.tree.map(np.testing.assert_array_equal, direct, composed)


def test_masked_uses_inner_on_selected_leaves_only():
  stacked = _stacked(2)
  is_matrix = jax.tree.map(lambda x: x.ndim == 3, stacked)
  m = merging.masked(merging.ties(density=0.1), is_matrix, otherwise=merging.average())
  out = jax.jit(lambda s: _merge(m, s))(stacked)
  # The bias is averaged ...
  np.testing.assert_allclose(out["layers_1"]["b"], stacked["layers_1"]["b"].mean(0), rtol=1e-6)
  # ... and TIES' global threshold is taken over the matrices only.
  matrices = {k: v for k, v in stacked.items() if k != "layers_1"}
  matrices["layers_1"] = {"w": stacked["layers_1"]["w"]}
  ref = jax.jit(lambda s: _merge(merging.ties(density=0.1), s))(matrices)
  np.testing.assert_array_equal(out["big"], ref["big"])
  np.testing.assert_array_equal(out["layers_1"]["w"], ref["layers_1"]["w"])
  # A mask function works too, and the default `otherwise` passes leaves through.
  trimmed = merging.masked(merging.trim(0.5), lambda t: jax.tree.map(lambda x: x.ndim == 2, t))
  kept = jax.jit(lambda s: _merge(trimmed, s))(stacked)
  np.testing.assert_array_equal(kept["big"], stacked["big"])
  assert (np.asarray(kept["layers_1"]["b"]) == 0).mean() == pytest.approx(0.5, abs=0.05)


def test_masked_rejects_a_mismatched_mask():
  with pytest.raises(ValueError, match="mask"):
    merging.masked(merging.average(), {"w": True}).init({"v": jnp.zeros((2, 3))})


# ---------------------------------------------------------------------- registry

def test_registry_lists_and_builds_methods():
  assert set(merging.DATA_FREE) <= set(merging.METHODS)
  assert merging.defaults("ties") == {"density": 0.2, "scale": 1.0, "per_leaf": False}
  m = merging.get("ties", density=0.5)
  assert isinstance(m, merging.Merge)


def test_unknown_method_lists_known_ones():
  with pytest.raises(ValueError, match=r"Unknown merge method 'tie'.*task_arithmetic.*ties"):
    merging.get("tie")


def test_unknown_hparam_lists_valid_ones():
  with pytest.raises(ValueError, match=r"'dens'.*density=0.2"):
    merging.get("ties", dens=0.5)


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan"), "high", None])
def test_bad_density(density):
  with pytest.raises(ValueError, match=r"density .*\(0, 1\]"):
    merging.get("ties", density=density)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), "x"])
def test_bad_scale(scale):
  with pytest.raises(ValueError, match="scale"):
    merging.task_arithmetic(scale=scale)


# ------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("name", ["average", "task_arithmetic", "ties"])
def test_leaves_with_different_task_counts(name):
  stacked = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((2, 4))}}
  with pytest.raises(ValueError, match=r"\['b'\]\['c'\]|\['a'\]"):
    merging.get(name).init(stacked)


def test_non_float_leaf_is_named():
  stacked = {"w": jnp.zeros((2, 4)), "step": jnp.zeros((2,), jnp.int32)}
  for name in METHODS:
    with pytest.raises(ValueError, match=r"\['step'\].*int32"):
      merging.get(name).init(stacked, key=jax.random.key(0))


def test_scalar_leaf_and_empty_tree():
  with pytest.raises(ValueError, match="scalar"):
    merging.ties().init({"w": jnp.zeros(())})
  with pytest.raises(ValueError, match="no leaves"):
    merging.average().init({})


# ---------------------------------------------------------------- abstract init

@pytest.mark.parametrize("name", METHODS)
def test_init_works_on_abstract_shapes(name):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _stacked())
  m = merging.get(name)
  coeffs = jax.eval_shape(functools.partial(m.init, key=jax.random.key(0)), abstract)
  out = jax.eval_shape(m.apply, coeffs, abstract)
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape[1:], abstract)


# ------------------------------------------------------------------ sharded jit

def _mesh():
  return jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))


# Leaves sharded over parameter axes only ("params"), over the task axis
# (T = 4 over "x") and parameter axes ("tasks"), or a mix of both ("mixed").
_IN_SPECS = {
    "params": {"big": P(None, "x", "y"), "layers_0": {"w": P(None, "y", "x")},
               "layers_1": {"w": P(None, None, "y"), "b": P(None, "y")}},
    "tasks": {"big": P("x", None, "y"), "layers_0": {"w": P("x", "y")},
              "layers_1": {"w": P("x"), "b": P("x", "y")}},
    "mixed": {"big": P(None, "x", "y"), "layers_0": {"w": P("x", "y")},
              "layers_1": {"w": P("x"), "b": P(None, "y")}},
}
_OUT_SPECS = {"big": P("x", "y"), "layers_0": {"w": P("y", "x")},
              "layers_1": {"w": P(None, "y"), "b": P("y")}}


def _shardings(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


@functools.lru_cache(maxsize=None)
def _unsharded(name):
  return jax.jit(lambda s: _merge(merging.get(name), s))(_stacked(3))


# Every method on the mixed layout; the selection-based TIES on the pure ones too.
@pytest.mark.parametrize("name,layout", [(m, "mixed") for m in METHODS]
                         + [("ties", "params"), ("ties", "tasks")])
def test_sharded_jit_matches_unsharded(name, layout):
  mesh = _mesh()
  in_sh = _shardings(mesh, _IN_SPECS[layout])
  out_sh = _shardings(mesh, _OUT_SPECS)
  stacked = jax.device_put(_stacked(3), in_sh)
  f = jax.jit(lambda s: _merge(merging.get(name), s), in_shardings=(in_sh,),
              out_shardings=out_sh)
  out = f(stacked)
  ref = _unsharded(name)
  for (path, got), want, sh in zip(jax.tree_util.tree_flatten_with_path(out)[0],
                                   jax.tree.leaves(ref), jax.tree.leaves(out_sh)):
    assert got.sharding.is_equivalent_to(sh, got.ndim), path
    if name == "pcb":
      # PCB's score goes through exp and tanh, which may round differently
      # (by an ulp) in the two programs; an entry whose score sits exactly at
      # the cut can then switch between "one task survives" and "none".
      close = np.isclose(got, want, rtol=1e-5, atol=1e-6)
      assert close.mean() > 0.999, (path, close.mean())
    elif name in ("ties", "average", "task_arithmetic", "consensus", "dare", "dare_ties"):
      np.testing.assert_array_equal(got, want, err_msg=str(path))
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_sharded_threshold_is_exact():
  mesh = _mesh()
  in_sh = _shardings(mesh, _IN_SPECS["params"])
  stacked = _stacked(4)
  f = jax.jit(lambda s: selection.topk_threshold(s, 0.05), in_shardings=(in_sh,))
  got = f(jax.device_put(stacked, in_sh))
  flat = np.concatenate([np.abs(x).reshape(T, -1) for x in jax.tree.leaves(stacked)], 1)
  k = selection.topk_count(flat.shape[1], 0.05)
  np.testing.assert_array_equal(got, -np.sort(-flat, 1)[:, k - 1])
