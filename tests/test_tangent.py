"""Tests for research.tangent: linearize, precompute / combine."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import tangent
from research import task_vectors as tv

PROPERTY = settings(max_examples=25, deadline=None)


def _close(a, b, atol=1e-5, rtol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def _mlp(params, x, *, temperature=1.0):
  """A small non-linear model with a dict output: features and logits."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return {"features": h, "logits": (h @ params["w2"]) / temperature}


def _mlp_params(key, scale=1.0):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "w1": scale * jax.random.normal(k1, (3, 8)),
      "b1": scale * jax.random.normal(k2, (8,)),
      "w2": scale * jax.random.normal(k3, (8, 2)),
  }


def _direction(key, like):
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# --------------------------------------------------------------------------
# Hand-computed cases.


def _quad(p, x):
  return p["a"] * x**2 + jnp.sin(p["b"])


def test_linearize_hand():
  f_lin = tangent.linearize(_quad)
  p0 = {"a": jnp.array(1.0), "b": jnp.array(0.0)}
  p = {"a": jnp.array(3.0), "b": jnp.array(0.5)}
  # f(p0) + (a - a0) x^2 + cos(b0) (b - b0) = 4 + 2 * 4 + 0.5
  assert float(f_lin(p, p0, jnp.array(2.0))) == 12.5
  assert float(_quad(p, jnp.array(2.0))) == pytest.approx(12 + np.sin(0.5))
  assert f_lin.__name__ == "linearized__quad"


def test_linearize_keeps_output_structure_and_kwargs():
  p0 = _mlp_params(jax.random.key(0))
  x = jnp.ones((4, 3))
  out = tangent.linearize(_mlp)(p0, p0, x, temperature=2.0)
  _close(out, _mlp(p0, x, temperature=2.0))
  tuple_fn = lambda p, x: (p["a"] * x, [p["a"]])
  out = tangent.linearize(tuple_fn)({"a": jnp.array(2.0)}, {"a": jnp.array(1.0)}, jnp.ones(3))
  assert isinstance(out, tuple) and isinstance(out[1], list)
  np.testing.assert_array_equal(out[0], [2.0, 2.0, 2.0])


def test_linearize_non_float_leaves():
  # Integer buffers come from params0; integer outputs are f(params0)'s.
  def f(p, x):
    y = p["w"] * x + p["n"]
    return {"y": y, "argmax": jnp.argmax(y)}
  p0 = {"w": jnp.array([2.0, 0.0]), "n": jnp.array([1, 3], jnp.int32)}
  p = {"w": jnp.array([3.0, 5.0]), "n": jnp.array([10, 10], jnp.int32)}
  out = tangent.linearize(f)(p, p0, jnp.array(2.0))
  np.testing.assert_array_equal(out["y"], [7.0, 13.0])  # [5, 3] + [1, 5] * 2
  assert int(out["argmax"]) == 0  # argmax of f(p0) = [5, 3], not of the tangent output


def test_combine_hand():
  # f(p) = p["a"] * x + p["c"]; jvp of tau is tau["a"] * x + tau["c"].
  f = lambda p, x: p["a"] * x + p["c"]
  p0 = {"a": jnp.array(1.0), "c": jnp.array(0.0)}
  taus = tv.stack([{"a": jnp.array(1.0), "c": jnp.array(0.0)},
                   {"a": jnp.array(0.0), "c": jnp.array(10.0)}])
  x = jnp.array([1.0, 2.0])
  cache = tangent.precompute(f, p0, taus, x)
  np.testing.assert_array_equal(cache.f0, [1.0, 2.0])
  np.testing.assert_array_equal(cache.jvps, [[1.0, 2.0], [10.0, 10.0]])
  np.testing.assert_array_equal(tangent.combine(cache, jnp.array([2.0, 0.5])), [8.0, 11.0])
  grid = tangent.combine(cache, jnp.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]))
  np.testing.assert_array_equal(grid, [[1.0, 2.0], [12.0, 14.0], [0.0, 0.0]])


def test_combine_is_differentiable_in_coeffs():
  p0 = _mlp_params(jax.random.key(1))
  taus = tv.stack([_direction(jax.random.key(i), p0) for i in range(3)])
  x = jnp.ones((2, 3))
  cache = tangent.precompute(_mlp, p0, taus, x)
  loss = lambda c: jnp.sum(tangent.combine(cache, c)["logits"])
  g = jax.grad(loss)(jnp.zeros(3))
  # d/dc_t sum(f0 + sum c_t jvp_t) = sum(jvp_t).
  np.testing.assert_allclose(g, jnp.sum(cache.jvps["logits"], axis=(1, 2)), rtol=1e-5)


def test_linear_fine_tuning_gradient_is_gradient_at_params0():
  # f_lin is linear in params, so its gradient is the same everywhere: J(params0)^T.
  p0 = _mlp_params(jax.random.key(2))
  p = tv.apply(p0, _direction(jax.random.key(3), p0), 0.3)
  x = jax.random.normal(jax.random.key(4), (5, 3))
  f_lin = tangent.linearize(_mlp)
  g_lin = jax.grad(lambda q: jnp.sum(f_lin(q, p0, x)["logits"]))(p)
  g_at_p0 = jax.grad(lambda q: jnp.sum(_mlp(q, x)["logits"]))(p0)
  _close(g_lin, g_at_p0)


def test_precompute_task_chunk_matches_vmap():
  p0 = _mlp_params(jax.random.key(5))
  taus = tv.stack([_direction(jax.random.key(i), p0) for i in range(5)])
  x = jnp.ones((2, 3))
  full = tangent.precompute(_mlp, p0, taus, x)
  chunked = tangent.precompute(_mlp, p0, taus, x, task_chunk=2)
  _close(full, chunked)
  assert full.jvps["logits"].shape == (5, 2, 2)
  assert full.f0["logits"].shape == (2, 2)


def test_precompute_non_float_leaves_and_outputs():
  f = lambda p, x: {"y": p["w"] * x + p["n"], "k": jnp.argmax(p["w"] * x)}
  p0 = {"w": jnp.array([2.0, 0.0]), "n": jnp.array([1, 3], jnp.int32)}
  taus = tv.stack([tv.task_vector({"w": jnp.array([3.0, 5.0]), "n": p0["n"] + 9}, p0)])
  cache = tangent.precompute(f, p0, taus, jnp.array(2.0))
  np.testing.assert_array_equal(cache.jvps["k"], [0])
  out = tangent.combine(cache, jnp.array([[1.0], [2.0]]))
  np.testing.assert_array_equal(out["y"], [[7.0, 13.0], [9.0, 23.0]])
  np.testing.assert_array_equal(out["k"], [0, 0])


def test_module_doctest():
  assert doctest.testmod(tangent).failed == 0


# --------------------------------------------------------------------------
# Errors.


def test_linearize_mismatch_names_leaf():
  p0 = _mlp_params(jax.random.key(0))
  bad = dict(p0, w2=jnp.ones((8, 3)))
  with pytest.raises(ValueError, match=r"\['w2'\]: shape \(8, 3\) in params vs \(8, 2\) in params0"):
    tangent.linearize(_mlp)(bad, p0, jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"\['b1'\]: dtype bfloat16"):
    tangent.linearize(_mlp)(dict(p0, b1=p0["b1"].astype(jnp.bfloat16)), p0, jnp.ones((1, 3)))
  missing = {k: v for k, v in p0.items() if k != "b1"}
  with pytest.raises(ValueError, match=r"only in params0: \['b1'\]"):
    tangent.linearize(_mlp)(missing, p0, jnp.ones((1, 3)))


def test_precompute_and_combine_errors():
  p0 = _mlp_params(jax.random.key(0))
  x = jnp.ones((1, 3))
  with pytest.raises(ValueError, match=r"\['w1'\].*scalar"):
    tangent.precompute(_mlp, p0, dict(p0, w1=jnp.ones(())), x)
  wrong = tv.stack([dict(p0, w2=jnp.ones((8, 3)))] * 2)
  with pytest.raises(ValueError, match=r"\['w2'\]: shape \(8, 2\) in params0 vs \(8, 3\)"):
    tangent.precompute(_mlp, p0, wrong, x)
  cache = tangent.precompute(_mlp, p0, tv.stack([p0, p0]), x)
  with pytest.raises(ValueError, match=r"T=2 tasks.*\(3,\)"):
    tangent.combine(cache, jnp.ones(3))
  with pytest.raises(ValueError, match=r"T=2"):
    tangent.combine(cache, jnp.array(1.0))
  with pytest.raises(ValueError, match="task_chunk"):
    tangent.precompute(_mlp, p0, tv.stack([p0]), x, task_chunk=0)


# --------------------------------------------------------------------------
# Properties.

_seeds = st.integers(0, 2**31 - 1)


@PROPERTY
@given(_seeds)
def test_f_lin_at_params0_is_f(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  p0 = _mlp_params(k1)
  x = jax.random.normal(k2, (4, 3))
  _close(tangent.linearize(_mlp)(p0, p0, x), _mlp(p0, x))


@PROPERTY
@given(_seeds)
def test_tangent_error_is_second_order(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  p0 = _mlp_params(k1, scale=0.5)
  d = _direction(k2, p0)
  x = jax.random.normal(k3, (4, 3))
  f_lin = tangent.linearize(_mlp)

  def err(eps):
    p = tv.apply(p0, d, eps)
    diff = jax.tree.map(lambda a, b: a - b, _mlp(p, x), f_lin(p, p0, x))
    return float(tv.norm(diff))

  e1, e2 = err(0.04), err(0.02)
  # Halving eps divides a second-order error by 4 (a first-order one by 2).
  assert 3.0 < e1 / e2 < 5.0, (e1, e2)


@PROPERTY
@given(_seeds, st.floats(-3, 3), st.floats(-3, 3))
def test_f_lin_is_linear_in_displacement(seed, a, b):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  p0 = _mlp_params(k1)
  d1, d2 = _direction(k2, p0), _direction(k3, p0)
  x = jax.random.normal(k4, (4, 3))
  f_lin = tangent.linearize(_mlp)
  f0 = _mlp(p0, x)
  moved = lambda p: jax.tree.map(jnp.subtract, f_lin(p, p0, x), f0)
  lhs = moved(tv.apply(p0, tv.add(tv.scale(d1, a), tv.scale(d2, b))))
  r1, r2 = moved(tv.apply(p0, d1)), moved(tv.apply(p0, d2))
  rhs = jax.tree.map(lambda u, v: a * u + b * v, r1, r2)
  _close(lhs, rhs, atol=1e-4, rtol=1e-4)


@PROPERTY
@given(_seeds, st.integers(1, 4))
def test_combine_equals_f_lin(seed, num_tasks):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  p0 = _mlp_params(k1)
  taus = [_direction(k, p0) for k in jax.random.split(k2, num_tasks)]
  x = jax.random.normal(k3, (4, 3))
  alphas = jax.random.uniform(k4, (3, num_tasks), minval=-1.0, maxval=1.0)
  cache = tangent.precompute(_mlp, p0, tv.stack(taus), x)
  grid = tangent.combine(cache, alphas)
  f_lin = tangent.linearize(_mlp)
  for g in range(alphas.shape[0]):
    merged = tv.add(*[tv.scale(t, alphas[g, i]) for i, t in enumerate(taus)])
    direct = f_lin(tv.apply(p0, merged), p0, x)
    _close(jax.tree.map(lambda y: y[g], grid), direct, atol=1e-4, rtol=1e-4)
  _close(tangent.combine(cache, alphas[0]), jax.tree.map(lambda y: y[0], grid))


# --------------------------------------------------------------------------
# Under a sharded jit on a 2-D mesh.

# Explicit sharding needs an unambiguous output sharding for every matmul, so
# the second layer is replicated (a model would pass out_sharding instead).
_PARAM_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P()}
_OUT_SPECS = {"features": P("data", "model"), "logits": P("data", None)}


def _mesh(axis_type):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _named(mesh, specs, prefix=()):
  return {k: NamedSharding(mesh, P(*prefix, *s)) for k, s in specs.items()}


def _assert_sharded_as(out, shardings):
  for leaf, want in zip(jax.tree.leaves(out), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
def test_sharded_f_lin(axis_type):
  mesh = _mesh(axis_type)
  p0 = _mlp_params(jax.random.key(0))
  p = tv.apply(p0, _direction(jax.random.key(1), p0), 0.1)
  x = jax.random.normal(jax.random.key(2), (8, 3))
  expected = tangent.linearize(_mlp)(p, p0, x)
  ps, xs = _named(mesh, _PARAM_SPECS), NamedSharding(mesh, P("data", None))
  out_sh = _named(mesh, _OUT_SPECS)
  with jax.set_mesh(mesh):
    f = jax.jit(tangent.linearize(_mlp), in_shardings=(ps, ps, xs), out_shardings=out_sh)
    out = f(jax.device_put(p, ps), jax.device_put(p0, ps), jax.device_put(x, xs))
  _close(out, expected, atol=1e-5)
  _assert_sharded_as(out, out_sh)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
def test_sharded_precompute_and_combine(axis_type):
  mesh = _mesh(axis_type)
  p0 = _mlp_params(jax.random.key(0))
  taus = tv.stack([_direction(jax.random.key(i), p0) for i in range(3)])
  x = jax.random.normal(jax.random.key(9), (8, 3))
  coeffs = jnp.linspace(0.0, 1.0, 6).reshape(2, 3)
  expected_cache = tangent.precompute(_mlp, p0, taus, x)
  expected = tangent.combine(expected_cache, coeffs)

  ps, xs = _named(mesh, _PARAM_SPECS), NamedSharding(mesh, P("data", None))
  ts = _named(mesh, _PARAM_SPECS, prefix=(None,))
  cache_sh = tangent.TangentCache(_named(mesh, _OUT_SPECS), _named(mesh, _OUT_SPECS, (None,)))
  grid_sh = _named(mesh, _OUT_SPECS, prefix=(None,))
  rep = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    pre = jax.jit(lambda p0, t, x: tangent.precompute(_mlp, p0, t, x),
                  in_shardings=(ps, ts, xs), out_shardings=cache_sh)
    cache = pre(jax.device_put(p0, ps), jax.device_put(taus, ts), jax.device_put(x, xs))
    comb = jax.jit(tangent.combine, in_shardings=(cache_sh, rep), out_shardings=grid_sh)
    out = comb(cache, jax.device_put(coeffs, rep))
  _close(cache, expected_cache, atol=1e-5)
  _assert_sharded_as(cache, cache_sh)
  _close(out, expected, atol=1e-5)
  _assert_sharded_as(out, grid_sh)
