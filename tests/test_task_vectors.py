"""Tests for research.task_vectors: hand-computed cases, properties, sharded jit, errors."""
import doctest

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import task_vectors as tv

PROPERTY = settings(max_examples=25, deadline=None)


def _params0():
  return {
      "w": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
      "b": jnp.array([0.5, -1.0]),
      "ids": jnp.array([0, 1, 2], jnp.int32),
  }


def _params1():
  return {
      "w": jnp.array([[2.0, 2.0], [1.0, 5.0]]),
      "b": jnp.array([0.5, 1.0]),
      "ids": jnp.array([5, 5, 5], jnp.int32),
  }


def _tau():  # _params1() - _params0(), ids zeroed by policy.
  return {
      "w": jnp.array([[1.0, 0.0], [-2.0, 1.0]]),
      "b": jnp.array([0.0, 2.0]),
      "ids": jnp.zeros(3, jnp.int32),
  }


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_tree_close(a, b, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------
# Hand-computed cases.


def test_task_vector_hand():
  _assert_tree_equal(tv.task_vector(_params1(), _params0()), _tau())


def test_apply_hand():
  out = tv.apply(_params0(), _tau(), scale=0.5)
  _assert_tree_equal(out, {
      "w": jnp.array([[1.5, 2.0], [2.0, 4.5]]),
      "b": jnp.array([0.5, 0.0]),
      "ids": jnp.array([0, 1, 2], jnp.int32),
  })
  _assert_tree_equal(tv.apply(_params0(), _tau()), tv.apply(_params0(), _tau(), 1.0))


def test_add_scale_negate_hand():
  tau2 = {"w": jnp.array([[0.0, 1.0], [1.0, 1.0]]), "b": jnp.array([1.0, 1.0]),
          "ids": jnp.zeros(3, jnp.int32)}
  _assert_tree_equal(tv.add(_tau(), tau2), {
      "w": jnp.array([[1.0, 1.0], [-1.0, 2.0]]), "b": jnp.array([1.0, 3.0]),
      "ids": jnp.zeros(3, jnp.int32)})
  _assert_tree_equal(tv.add(_tau(), tau2, tau2)["b"], jnp.array([2.0, 4.0]))
  _assert_tree_equal(tv.add(_tau()), _tau())
  _assert_tree_equal(tv.scale(_tau(), 3.0)["w"], jnp.array([[3.0, 0.0], [-6.0, 3.0]]))
  _assert_tree_equal(tv.scale(_tau(), jnp.array(-1.0))["b"], jnp.array([0.0, -2.0]))
  _assert_tree_equal(tv.negate(_tau())["w"], jnp.array([[-1.0, -0.0], [2.0, -1.0]]))


def test_dot_norm_cosine_hand():
  tau = _tau()
  assert float(tv.dot(tau, tau)) == 10.0  # 1 + 4 + 1 + 4
  np.testing.assert_allclose(float(tv.norm(tau)), np.sqrt(10.0), rtol=1e-6)
  np.testing.assert_allclose(float(tv.cosine(tau, tv.negate(tau))), -1.0, rtol=1e-6)
  np.testing.assert_allclose(float(tv.cosine(tau, tv.scale(tau, 2.0))), 1.0, rtol=1e-6)
  a = {"x": jnp.array([1.0, 0.0])}
  b = {"x": jnp.array([0.0, 3.0])}
  c = {"x": jnp.array([1.0, 1.0])}
  assert float(tv.dot(a, b)) == 0.0
  assert float(tv.cosine(a, b)) == 0.0
  np.testing.assert_allclose(float(tv.cosine(a, c)), 1 / np.sqrt(2), rtol=1e-6)
  zero = {"x": jnp.zeros(2)}
  assert float(tv.cosine(a, zero)) == 0.0  # defined as 0, not nan
  assert np.isfinite(jax.grad(lambda z: tv.cosine(a, z))(zero)["x"]).all()


def test_dot_accumulates_in_float32():
  # (1 + 2^-7)^2 = 1 + 2^-6 + 2^-14: the last term is lost in bfloat16.
  x = {"x": jnp.array([1 + 2**-7], jnp.bfloat16)}
  out = tv.dot(x, x)
  assert out.dtype == jnp.float32
  assert float(out) == 1 + 2**-6 + 2**-14
  assert tv.norm(x).dtype == jnp.float32


def test_low_precision_keeps_dtypes():
  p0 = {"w": jnp.array([1.0, 2.0], jnp.bfloat16)}
  p1 = {"w": jnp.array([1.5, 1.0], jnp.bfloat16)}
  tau = tv.task_vector(p1, p0)
  assert tau["w"].dtype == jnp.bfloat16
  assert tv.apply(p0, tau, jnp.array(0.5, jnp.float32))["w"].dtype == jnp.bfloat16
  assert tv.scale(tau, jnp.array(2.0))["w"].dtype == jnp.bfloat16


def test_scale_traced_and_differentiable():
  tau = _tau()
  f = jax.jit(lambda c: tv.dot(tv.scale(tau, c), tau))
  assert float(f(2.0)) == 20.0
  assert float(jax.grad(f)(2.0)) == 10.0  # d/dc <c tau, tau> = |tau|^2
  g = jax.grad(lambda c: tv.norm(tv.apply(_params0(), tau, c)))(0.0)
  assert np.isfinite(g)


def test_stack_unstack_hand():
  stacked = tv.stack([_tau(), tv.negate(_tau()), _params0()])
  assert stacked["w"].shape == (3, 2, 2)
  assert stacked["ids"].shape == (3, 3) and stacked["ids"].dtype == jnp.int32
  np.testing.assert_array_equal(stacked["b"], [[0.0, 2.0], [0.0, -2.0], [0.5, -1.0]])
  back = tv.unstack(stacked)
  assert len(back) == 3
  _assert_tree_equal(back[2], _params0())
  assert tv.num_tasks(stacked) == 3


def test_module_doctest():
  assert doctest.testmod(tv).failed == 0


# --------------------------------------------------------------------------
# Non-floating leaves: frozen buffers, carried from pretrained.


def test_non_float_policy():
  p0, p1 = _params0(), _params1()
  tau = tv.task_vector(p1, p0)
  np.testing.assert_array_equal(tau["ids"], [0, 0, 0])  # fine-tuned value dropped
  assert tau["ids"].dtype == jnp.int32
  weird = dict(tau, ids=jnp.array([7, 7, 7], jnp.int32))
  np.testing.assert_array_equal(tv.apply(p0, weird, 2.0)["ids"], [0, 1, 2])
  # Arithmetic ignores them.
  assert float(tv.dot(weird, weird)) == float(tv.dot(tau, tau))
  np.testing.assert_array_equal(tv.scale(weird, 2.0)["ids"], [7, 7, 7])
  np.testing.assert_array_equal(tv.negate(weird)["ids"], [7, 7, 7])
  np.testing.assert_array_equal(tv.add(weird, tau)["ids"], [7, 7, 7])
  bools = {"mask": jnp.array([True, False]), "x": jnp.ones(2)}
  assert tv.task_vector(bools, bools)["mask"].dtype == jnp.bool_


def test_prng_key_leaf_rejected():
  p = {"w": jnp.ones(2), "key": jax.random.key(0)}
  with pytest.raises(TypeError, match=r"\['key'\].*nnx.Param"):
    tv.task_vector(p, p)


# --------------------------------------------------------------------------
# Errors name the leaf path, both shapes / dtypes and the fix.


def test_mismatched_structure():
  p0 = {"enc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  p1 = {"enc": {"kernel": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match=r"only in pretrained: \['enc'\]\['bias'\].*Fix"):
    tv.task_vector(p1, p0)
  with pytest.raises(ValueError, match=r"container types differ"):
    tv.add({"x": [jnp.ones(2)]}, {"x": (jnp.ones(2),)})


def test_mismatched_shape():
  p0 = {"enc": {"kernel": jnp.ones((2, 3))}}
  p1 = {"enc": {"kernel": jnp.ones((2, 4))}}
  with pytest.raises(ValueError, match=r"\['enc'\]\['kernel'\]: shape \(2, 4\) in finetuned "
                     r"vs \(2, 3\) in pretrained.*Fix"):
    tv.task_vector(p1, p0)
  with pytest.raises(ValueError, match=r"\['enc'\]\['kernel'\]"):
    jax.jit(tv.dot)(p0, p1)  # raised at trace time


def test_mismatched_dtype():
  p0 = {"w": jnp.ones(3, jnp.float32)}
  p1 = {"w": jnp.ones(3, jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"\['w'\]: dtype float32 in pretrained vs bfloat16 "
                     r"in tau.*astype"):
    tv.apply(p0, p1)


def test_stack_errors():
  with pytest.raises(ValueError, match="empty list"):
    tv.stack([])
  good = {"a": {"w": jnp.ones(2)}}
  bad = {"a": {"w": jnp.ones(3)}}
  with pytest.raises(ValueError, match=r"taus\[2\].*\['a'\]\['w'\]|\['a'\]\['w'\].*taus\[2\]"):
    tv.stack([good, good, bad])


def test_add_and_scale_errors():
  with pytest.raises(ValueError, match="at least one task vector"):
    tv.add()
  with pytest.raises(ValueError, match=r"\['w'\].*taus\[1\]"):
    tv.add({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="scalar"):
    tv.scale({"w": jnp.ones(2)}, jnp.ones(2))


def test_unstack_errors():
  with pytest.raises(ValueError, match="no leaves"):
    tv.unstack({})
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tv.unstack({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match=r"\['s'\].*scalar"):
    tv.unstack({"s": jnp.ones(())})


def test_check_on_abstract_shapes():
  abstract = jax.eval_shape(_params0)
  tv.check_same_structure(abstract, _params0())
  with pytest.raises(ValueError, match=r"\['b'\]: shape \(2,\) in x vs \(5,\) in y"):
    tv.check_same_structure(abstract, dict(_params0(), b=jnp.ones(5)), ("x", "y"))


# --------------------------------------------------------------------------
# Properties.

_finite = st.floats(-8, 8, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def _trees(draw, n):
  """``n`` float32 dict trees with one random structure (nested, scalars allowed)."""
  shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
                         min_size=1, max_size=3))
  def one():
    leaves = [draw(hnp.arrays(np.float32, s, elements=_finite)) for s in shapes]
    return {"enc": {f"p{i}": jnp.asarray(x) for i, x in enumerate(leaves[1:])},
            "head": jnp.asarray(leaves[0])}
  return [one() for _ in range(n)]


@PROPERTY
@given(_trees(2))
def test_apply_inverts_task_vector(trees):
  p1, p0 = trees
  _assert_tree_close(tv.apply(p0, tv.task_vector(p1, p0)), p1)


@PROPERTY
@given(_trees(1))
def test_negate_is_involution(trees):
  _assert_tree_equal(tv.negate(tv.negate(trees[0])), trees[0])


@PROPERTY
@given(_trees(2))
def test_add_commutes(trees):
  a, b = trees
  _assert_tree_equal(tv.add(a, b), tv.add(b, a))


@PROPERTY
@given(_trees(2), _finite)
def test_cosine_bounded_and_dot_bilinear(trees, c):
  a, b = trees
  cos = float(tv.cosine(a, b))
  assert -1.0 <= cos <= 1.0
  scale = 1 + float(tv.norm(a)) * float(tv.norm(b))
  np.testing.assert_allclose(float(tv.dot(tv.scale(a, c), b)), c * float(tv.dot(a, b)),
                             atol=1e-4 * abs(c) * scale)
  np.testing.assert_allclose(float(tv.norm(a)) ** 2, float(tv.dot(a, a)), rtol=1e-4, atol=1e-4)


@PROPERTY
@given(st.integers(1, 4).flatmap(_trees))
def test_stack_unstack_round_trip(trees):
  back = tv.unstack(tv.stack(trees))
  assert len(back) == len(trees)
  for x, y in zip(back, trees):
    _assert_tree_equal(x, y)


# --------------------------------------------------------------------------
# Under a sharded jit on a 2-D mesh.

AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]


def _sharded_setup(axis_type):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  specs = {"w": P("data", "model"), "b": P("model"), "ids": P()}
  shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  rng = np.random.default_rng(0)
  def tree():
    return {"w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
            "ids": jnp.arange(4, dtype=jnp.int32)}
  return mesh, shard, [tree() for _ in range(3)]


_SCALAR = P()
_STACKED = {"w": P(None, "data", "model"), "b": P(None, "model"), "ids": P()}

# name -> (function of three trees, output specs as a function of the param specs)
_CASES = {
    "task_vector": (lambda a, b, c: tv.task_vector(a, b), "params"),
    "apply": (lambda a, b, c: tv.apply(a, b, jnp.float32(0.3)), "params"),
    "add": (lambda a, b, c: tv.add(a, b, c), "params"),
    "scale": (lambda a, b, c: tv.scale(a, jnp.float32(-2.0)), "params"),
    "negate": (lambda a, b, c: tv.negate(a), "params"),
    "dot": (lambda a, b, c: tv.dot(a, b), "scalar"),
    "norm": (lambda a, b, c: tv.norm(a), "scalar"),
    "cosine": (lambda a, b, c: tv.cosine(a, b), "scalar"),
    "stack": (lambda a, b, c: tv.stack([a, b, c]), "stacked"),
    "unstack": (lambda a, b, c: tv.unstack(tv.stack([a, b, c])), "list"),
}


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("name", list(_CASES))
def test_sharded_jit_matches_single_device(name, axis_type):
  fn, kind = _CASES[name]
  mesh, shard, trees = _sharded_setup(axis_type)
  expected = fn(*trees)
  out_shard = {
      "params": shard,
      "scalar": NamedSharding(mesh, _SCALAR),
      "stacked": {k: NamedSharding(mesh, s) for k, s in _STACKED.items()},
      "list": [shard] * 3,
  }[kind]
  with jax.set_mesh(mesh):
    placed = [jax.device_put(t, shard) for t in trees]
    out = jax.jit(fn, in_shardings=(shard,) * 3, out_shardings=out_shard)(*placed)
  _assert_tree_close(out, expected)
  for leaf, want in zip(jax.tree.leaves(out), jax.tree.leaves(out_shard)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
