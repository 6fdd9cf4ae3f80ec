"""Tests for research.ntk: the empirical NTK against explicit J J^T, eigenpairs, localization."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import ntk
from research.models import bert

PROPERTY = settings(max_examples=15, deadline=None)
N, I, H, D = 7, 4, 5, 3


def _mlp(params, x, mask):
  """[N, I], [N] -> [N, D]; `params` also holds an int leaf (never differentiated)."""
  h = jnp.tanh(x @ params["w1"] + params["b1"]) * mask[:, None]
  return h @ params["w2"] + params["shift"].astype(x.dtype).sum()


def _setup(seed=0, n=N):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {"w1": jax.random.normal(k1, (I, H)), "b1": jax.random.normal(k2, (H,)),
            "w2": jax.random.normal(k3, (H, D)), "shift": jnp.arange(2, dtype=jnp.int32)}
  x = np.asarray(jax.random.normal(k4, (n, I)))
  mask = np.linspace(0.5, 1.0, n).astype(np.float32)
  return params, x, mask


def _explicit_jacobian(params, x, mask):
  """[N, D, P]: the Jacobian built by differentiating the flattened float params."""
  floats = {k: v for k, v in params.items() if k != "shift"}
  flat, unravel = ravel_pytree(floats)
  f = lambda v: _mlp({**unravel(v), "shift": params["shift"]}, x, mask)
  return np.asarray(jax.jacrev(f)(flat), np.float64)


def _explicit_kernel(params, x, mask, projection=None):
  jac = _explicit_jacobian(params, x, mask)
  if projection is not None:
    jac = np.einsum("kd,ndp->nkp", np.asarray(projection, np.float64), jac)
  return np.einsum("nap,map->nm", jac, jac)


def _assert_kernel_close(kernel, expected):
  scale = np.abs(expected).max()
  np.testing.assert_allclose(kernel / scale, expected / scale, atol=2e-6)


# --------------------------------------------------------------------------
# Hand-computed cases.


def test_linear_model_hand_case():
  """f(x) = W x + b with D outputs: J_d(x) = (e_d x^T, e_d), so K = D (x . x' + 1)."""
  w = jnp.arange(6.0).reshape(2, 3)
  params = {"w": w, "b": jnp.zeros(3)}
  x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
  kernel = ntk.empirical_ntk(lambda p, x: x @ p["w"] + p["b"], params, x)
  np.testing.assert_allclose(kernel, 3 * (x @ x.T + 1), rtol=1e-6)


def test_localization_hand_case():
  vectors = np.array([[0.6, 0.5], [0.8, 0.5], [0.0, 0.5], [0.0, 0.5]])
  energy = ntk.localization(vectors, [0, 0, 1, 1])
  np.testing.assert_allclose(energy, [[1.0, 0.0], [0.5, 0.5]])
  # An empty third task gets zero energy; an unnormalized vector is normalized.
  np.testing.assert_allclose(ntk.localization(2 * vectors[:, 1], [0, 1, 1, 1], 3),
                             [[0.25, 0.75, 0.0]])


def test_chance_localization_lies_between_uniform_and_one():
  groups = np.repeat([0, 1, 2], 20)
  chance = ntk.chance_localization(groups)
  assert 1 / 3 < chance < 0.6
  assert ntk.chance_localization(np.zeros(5, int)) == pytest.approx(1.0)


def test_cosine_normalize_hand_case():
  kernel = np.array([[4.0, 2.0], [2.0, 9.0]])
  np.testing.assert_allclose(ntk.cosine_normalize(kernel), [[1.0, 1 / 3], [1 / 3, 1.0]])


def test_doctests():
  assert doctest.testmod(ntk, raise_on_error=False).failed == 0


# --------------------------------------------------------------------------
# The kernel equals J J^T built explicitly.


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "auto"])
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_kernel_equals_explicit_jjt(method, batch_size):
  params, x, mask = _setup()
  kernel = ntk.empirical_ntk(_mlp, params, x, mask, method=method, batch_size=batch_size)
  assert kernel.shape == (N, N) and kernel.dtype == np.float64
  _assert_kernel_close(kernel, _explicit_kernel(params, x, mask))


def test_jacobian_panel_streams_rows_when_memory_is_short():
  """A memory budget of 2 blocks holds a panel of 1: every other block is streamed past it."""
  params, x, mask = _setup()
  size = I * H + H + H * D
  tight = ntk.empirical_ntk(_mlp, params, x, mask, method="jacobian", batch_size=2,
                            memory_bytes=2 * 4 * 2 * D * size)
  _assert_kernel_close(tight, _explicit_kernel(params, x, mask))


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
@pytest.mark.parametrize("output_chunk", [None, 1, 2])
def test_projection_and_output_chunks(method, output_chunk):
  params, x, mask = _setup(1)
  projection = jax.random.normal(jax.random.key(2), (2, D))
  kernel = ntk.empirical_ntk(_mlp, params, x, mask, projection=projection, method=method,
                             batch_size=3, output_chunk=output_chunk)
  _assert_kernel_close(kernel, _explicit_kernel(params, x, mask, projection))
  exact = ntk.empirical_ntk(_mlp, params, x, mask, method=method, output_chunk=output_chunk)
  _assert_kernel_close(exact, _explicit_kernel(params, x, mask))


def test_output_projection_is_unbiased_and_exact_at_full_width():
  p = np.asarray(ntk.output_projection(jax.random.key(0), D, D), np.float64)
  np.testing.assert_allclose(p.T @ p, np.eye(D), atol=1e-5)
  params, x, mask = _setup(3)
  _assert_kernel_close(ntk.empirical_ntk(_mlp, params, x, mask, projection=p),
                       _explicit_kernel(params, x, mask))
  # E[P^T P] = I for k < D: average over many draws.
  keys = jax.random.split(jax.random.key(1), 1000)
  draws = jax.vmap(lambda k: ntk.output_projection(k, D, 1))(keys)
  mean = np.asarray(jnp.einsum("nki,nkj->ij", draws, draws)) / len(draws)
  np.testing.assert_allclose(mean, np.eye(D), atol=0.12)  # ~4 standard errors.


def test_tiny_bert_kernel_equals_explicit_jjt():
  """The real architecture (NNX params, int attention mask input) at toy size."""
  config = bert.BertConfig(vocab_size=17, hidden=8, layers=1, heads=2, intermediate=16,
                           max_position=8)
  model = bert.Bert(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  apply_fn = lambda p, ids, m: bert.mean_pool(nnx.merge(graphdef, p, rest)(ids, m), m)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 17, (5, 6)).astype(np.int32)
  mask = np.ones((5, 6), np.int32)
  mask[1, 4:] = 0
  kernel = ntk.empirical_ntk(apply_fn, params, ids, mask, batch_size=2)
  flat, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jit(jax.jacrev(lambda v: apply_fn(unravel(v), ids, mask)))(flat), np.float64)
  _assert_kernel_close(kernel, np.einsum("nap,map->nm", jac, jac))


# --------------------------------------------------------------------------
# Properties: symmetric PSD; the eigen-decomposition reconstructs the kernel.


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n=st.sampled_from([1, 2, 5]))
def test_kernel_is_symmetric_psd(seed, n):
  params, x, mask = _setup(seed, n)
  kernel = ntk.empirical_ntk(_mlp, params, x, mask, batch_size=4)
  np.testing.assert_array_equal(kernel, kernel.T)
  assert np.linalg.eigvalsh(kernel).min() >= -1e-5 * max(np.abs(kernel).max(), 1e-12)


@PROPERTY
@given(seed=st.integers(0, 10 ** 6))
def test_eigendecomposition_reconstructs_kernel(seed):
  params, x, mask = _setup(seed)
  kernel = ntk.empirical_ntk(_mlp, params, x, mask)
  values, vectors = ntk.top_eigenpairs(kernel)
  assert np.all(np.diff(values) <= 0)
  np.testing.assert_allclose(vectors.T @ vectors, np.eye(N), atol=1e-10)
  np.testing.assert_allclose((vectors * values) @ vectors.T, kernel,
                             atol=1e-9 * np.abs(kernel).max())
  # Sign convention: the largest-magnitude entry of each eigenvector is positive.
  assert np.all(vectors[np.argmax(np.abs(vectors), 0), np.arange(N)] > 0)
  top_values, top_vectors = ntk.top_eigenpairs(kernel, 3)
  np.testing.assert_allclose(top_values, values[:3])
  np.testing.assert_allclose(top_vectors, vectors[:, :3])


@PROPERTY
@given(seed=st.integers(0, 10 ** 6), k=st.integers(1, 6), tasks=st.integers(1, 4))
def test_localization_rows_sum_to_one(seed, k, tasks):
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(8, k))
  groups = rng.integers(0, tasks, 8)
  energy = ntk.localization(vectors, groups, tasks)
  assert energy.shape == (k, tasks) and np.all(energy >= 0)
  np.testing.assert_allclose(energy.sum(-1), 1.0)


# --------------------------------------------------------------------------
# NTK-vector products, the method choice, errors.


def test_matvec_equals_kernel_times_vector():
  params, x, mask = _setup(4)
  v = np.random.default_rng(0).normal(size=N).astype(np.float32)
  projection = jax.random.normal(jax.random.key(5), (2, D))
  for proj in (None, projection):
    expected = _explicit_kernel(params, x, mask, proj) @ v
    mv = ntk.ntk_matvec(_mlp, params, x, mask, projection=proj)
    np.testing.assert_allclose(mv(v), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_matvec_under_sharded_inputs():
  """Inputs and v sharded over a mesh's batch axis: same product, sharded like v."""
  # Auto axes: the vjp sums over the sharded batch, which the partitioner resolves.
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
  params, x, mask = _setup(6, n=8)
  v = np.arange(8, dtype=np.float32) / 8
  expected = ntk.ntk_matvec(_mlp, params, x, mask)(v)
  rows = NamedSharding(mesh, P("batch"))
  sharded = [jax.device_put(a, rows) for a in (x, mask, v)]
  got = ntk.ntk_matvec(_mlp, params, *sharded[:2])(sharded[2])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_choose_method_follows_the_cost_model():
  x = np.zeros((4, 3), np.int32)
  # A big table and a gather: almost free per input, so pushing rows forward wins.
  table = {"emb": jnp.ones((5000, 8))}
  gather = lambda p, ids: p["emb"][ids].sum(1)
  assert ntk.choose_method(gather, table, x) == "ntvp"
  # Few params reused many times: a forward pass costs far more than 2P flops.
  small = {"w": jnp.eye(8) / 2}
  def deep(p, ids):
    h = jnp.ones((ids.shape[0], 64, 8))
    for _ in range(20):
      h = jnp.tanh(h @ p["w"])
    return h.sum(1)
  assert ntk.choose_method(deep, small, x) == "jacobian"
  # Rows that do not fit in memory force NTK-vector products.
  assert ntk.choose_method(deep, small, x, memory_bytes=64) == "ntvp"


def test_errors_name_the_problem():
  params, x, mask = _setup()
  with pytest.raises(ValueError, match="same leading"):
    ntk.empirical_ntk(_mlp, params, x, mask[:3])
  with pytest.raises(ValueError, match=r"projection must be \[k, D\] with D=3"):
    ntk.empirical_ntk(_mlp, params, x, mask, projection=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="Unknown NTK method"):
    ntk.empirical_ntk(_mlp, params, x, mask, method="exact")
  with pytest.raises(ValueError, match="one task index per input"):
    ntk.localization(np.ones((4, 2)), [0, 1])
  with pytest.raises(ValueError, match="1 <= k <= N"):
    ntk.top_eigenpairs(np.eye(3), 4)
