"""Twin-Merging: hand-computed SVD compression, the router on a separable toy problem, compose, sharding, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import merging
from research.merging.twin import LowRank, compose, densify, rank_of, route, truncated_svd, twin

KEY = jax.random.key(0)


def _toy_router_data(n_per_task=20, t=3, d=4, seed=0):
  """Task t's features: Gaussian noise plus 4 on coordinate t (linearly separable)."""
  rng = np.random.default_rng(seed)
  ids = np.repeat(np.arange(t), n_per_task).astype(np.int32)
  x = rng.standard_normal((len(ids), d)).astype(np.float32)
  x[np.arange(len(ids)), ids] += 4.0
  return x, ids


def _stacked(seed=0):
  rng = np.random.default_rng(seed)
  return {"k": rng.standard_normal((3, 6, 4)).astype(np.float32),
          "e": rng.standard_normal((3, 4, 2, 3)).astype(np.float32),
          "b": rng.standard_normal((3, 4)).astype(np.float32)}


# ------------------------------------------------------------------ compression

def test_truncated_svd_hand_computed():
  # x = U diag(4, 1) V^T with U = [[1, 1], [1, -1]] / sqrt 2, V = I: the rank-1 truncation
  # keeps 4 u_1 v_1^T = 4 / sqrt 2 [[1, 0], [1, 0]].
  u = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2)
  x = (u @ np.diag([4.0, 1.0])).astype(np.float32)
  lr = truncated_svd(jnp.asarray(x)[None], 1)
  assert lr.u.shape == (1, 2, 1) and lr.v.shape == (1, 1, 2)
  np.testing.assert_allclose(lr.u[0] @ lr.v[0], 4 / np.sqrt(2) * np.array([[1, 0], [1, 0]]),
                             atol=1e-5)
  # Both Gram branches (wide and tall) agree with numpy's SVD truncation.
  rng = np.random.default_rng(1)
  for shape in [(7, 4), (4, 7)]:
    a = rng.standard_normal((2,) + shape).astype(np.float32)
    got = truncated_svd(jnp.asarray(a), 2)
    for t in range(2):
      uu, s, vt = np.linalg.svd(a[t].astype(np.float64), full_matrices=False)
      np.testing.assert_allclose(got.u[t] @ got.v[t], (uu[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


def test_rank_of():
  assert rank_of((384, 1536), 0, 0.1) == 38          # floor(0.1 * 384)
  assert rank_of((384, 12, 32), 0, 0.1) == 38        # trailing dims flattened: [384, 384]
  assert rank_of((2, 384), 0, 0.1) == 1              # floor gives 0: raised to 1
  assert rank_of((10, 6), 4, 0.1) == 4 and rank_of((10, 6), 100, 0.1) == 6


def test_residuals_are_compressed_leafwise():
  st = _stacked()
  x, ids = _toy_router_data()
  c = twin(shared_scale=0.3, rank=1, router_steps=2).init(st, features=x, task_ids=ids, key=KEY)
  shared = {k: 0.3 * v.sum(0) for k, v in st.items()}
  for k in st:
    np.testing.assert_allclose(c["shared"][k], shared[k], rtol=1e-5, atol=1e-6)
  res = c["residuals"]
  assert isinstance(res["k"], LowRank) and res["k"].u.shape == (3, 6, 1)
  assert isinstance(res["e"], LowRank) and res["e"].v.shape == (3, 1, 6)   # [4, 2*3]
  # 1-D leaves keep their dense residual tau_t - tau_s.
  np.testing.assert_allclose(res["b"], st["b"] - shared["b"][None], rtol=1e-5, atol=1e-6)
  # Rank-1 residual of leaf "k" = numpy's truncation of tau_t - tau_s.
  for t in range(3):
    r = (st["k"][t] - shared["k"]).astype(np.float64)
    uu, s, vt = np.linalg.svd(r, full_matrices=False)
    np.testing.assert_allclose(res["k"].u[t] @ res["k"].v[t], s[0] * np.outer(uu[:, 0], vt[0]),
                               atol=1e-4)
  # densify expands the factors, shaped like the leaves.
  dense = densify(c)["residuals"]
  assert dense["e"].shape == (3, 4, 2, 3)
  np.testing.assert_allclose(dense["k"][1], res["k"].u[1] @ res["k"].v[1], rtol=1e-6)


def test_full_rank_residuals_recover_the_task_vectors():
  # With every direction kept, shared + r_t = tau_t: one-hot routing gives task t back.
  st = _stacked(2)
  x, ids = _toy_router_data()
  c = twin(shared="ties", shared_density=0.5, rank_fraction=1.0, router_steps=2).init(
      st, features=x, task_ids=ids, key=KEY)
  ties = merging.ties(density=0.5, scale=0.3)
  np.testing.assert_allclose(c["shared"]["k"], ties.apply(ties.init(st), st)["k"], rtol=1e-6)
  for t in range(3):
    tau = compose(c, jnp.eye(3)[t])
    for k in st:
      np.testing.assert_allclose(tau[k], st[k][t], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ router, compose, apply

def test_router_learns_a_separable_toy_problem():
  x, ids = _toy_router_data(n_per_task=30)
  x_new, ids_new = _toy_router_data(n_per_task=30, seed=7)       # fresh draws, same clusters
  c = twin(router_lr=1e-2, router_steps=200).init(_stacked(), features=x, task_ids=ids, key=KEY)
  w = np.asarray(route(c, x_new))
  assert w.shape == (90, 3)
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
  assert (w.argmax(1) == ids_new).mean() >= 0.95
  assert np.mean(w[np.arange(90), ids_new]) > 0.8                 # confident, not just right
  # Minibatches (batch < N) train too; the same key gives the same router.
  c2 = twin(router_lr=1e-2, router_steps=200, router_batch=16).init(
      _stacked(), features=x, task_ids=ids, key=KEY)
  assert (np.asarray(route(c2, x_new)).argmax(1) == ids_new).mean() >= 0.95
  c3 = twin(router_lr=1e-2, router_steps=200, router_batch=16).init(
      _stacked(), features=x, task_ids=ids, key=KEY)
  np.testing.assert_array_equal(route(c2, x_new), route(c3, x_new))


def test_compose_equals_the_hand_sum_and_apply_is_uniform_routing():
  st = _stacked(3)
  x, ids = _toy_router_data()
  m = twin(rank=2, router_steps=2)
  c = m.init(st, features=x, task_ids=ids, key=KEY)
  w = np.array([0.2, 0.5, 0.3], np.float32)
  tau = compose(c, w)
  res = c["residuals"]
  for k in ("k", "e"):
    want = np.asarray(c["shared"][k]).reshape(res[k].u.shape[1], -1)
    for t in range(3):
      want = want + w[t] * np.asarray(res[k].u[t]) @ np.asarray(res[k].v[t])
    np.testing.assert_allclose(tau[k], want.reshape(st[k].shape[1:]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tau["b"], c["shared"]["b"] + w @ res["b"], rtol=1e-5, atol=1e-6)
  # Dense residuals give the same task vector; rows of [B, T] weights are separate taus.
  dense = compose(densify(c), w)
  for k in st:
    np.testing.assert_allclose(dense[k], tau[k], rtol=1e-5, atol=1e-5)
  ws = np.stack([w, np.eye(3, dtype=np.float32)[1]])
  batched = compose(c, ws)
  assert batched["e"].shape == (2, 4, 2, 3)
  np.testing.assert_allclose(batched["k"][0], tau["k"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched["k"][1], compose(c, ws[1])["k"], rtol=1e-5, atol=1e-6)
  # apply = uniform routing weights.
  uni = m.apply(c, st)
  for k in st:
    np.testing.assert_allclose(uni[k], compose(c, np.full(3, 1 / 3, np.float32))[k], rtol=1e-5,
                               atol=1e-6)
  # The per-input pieces are reachable from the registered factory too.
  assert merging.twin.route is route and merging.twin.compose is compose
  assert "twin" in merging.METHODS and twin.requires == ("features", "task_ids", "key")


def test_compose_is_differentiable_in_the_weights():
  st = _stacked(4)
  x, ids = _toy_router_data()
  c = twin(rank=1, router_steps=2).init(st, features=x, task_ids=ids, key=KEY)
  g = jax.grad(lambda w: jnp.sum(compose(c, w)["b"]))(jnp.full(3, 1 / 3))
  np.testing.assert_allclose(g, np.asarray(c["residuals"]["b"]).sum(1), rtol=1e-5)


# ------------------------------------------------------------------ sharded jit

def test_sharded_jit_matches_unsharded():
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))
  rng = np.random.default_rng(5)
  st = {"k": rng.standard_normal((4, 16, 8)).astype(np.float32),
        "b": rng.standard_normal((4, 8)).astype(np.float32)}
  x, ids = _toy_router_data(n_per_task=8, t=4, d=6)
  sh = {"k": NamedSharding(mesh, P(None, "x", "y")), "b": NamedSharding(mesh, P(None, "y"))}
  out_sh = {"k": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P("y"))}
  m = twin(rank=3, router_steps=5)
  init = lambda s, f, i, k: m.init(s, features=f, task_ids=i, key=k)
  want_c = jax.jit(init)(st, x, ids, KEY)
  placed = jax.device_put(st, sh)
  got_c = jax.jit(init, in_shardings=(sh, None, None, None))(placed, x, ids, KEY)
  w = jnp.array([0.1, 0.6, 0.2, 0.1])
  for fn in (lambda c, s: m.apply(c, s), lambda c, s: compose(c, w)):
    want = jax.jit(fn)(want_c, st)
    got = jax.jit(fn, out_shardings=out_sh)(got_c, placed)
    for leaf in ("k", "b"):
      assert got[leaf].sharding.is_equivalent_to(out_sh[leaf], got[leaf].ndim)
      np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs,match", [
    ({"shared": "dare"}, "shared"),
    ({"shared_scale": float("nan")}, "shared_scale"),
    ({"shared_density": 0.0}, "shared_density"),
    ({"rank_fraction": 0.0}, "rank_fraction"),
    ({"rank_fraction": 1.5}, "rank_fraction"),
    ({"rank": -1}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"router_hidden": True}, "router_hidden"),
    ({"router_dropout": 1.0}, "router_dropout"),
    ({"router_lr": 0.0}, "router_lr"),
    ({"router_steps": 0}, "router_steps"),
    ({"router_batch": 0}, "router_batch"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_bad_hparams_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    twin(**kwargs)
  with pytest.raises(ValueError, match=match):
    merging.get("twin", **kwargs)


def test_missing_or_bad_data_rejected():
  st = _stacked()
  x, ids = _toy_router_data()
  m = twin(router_steps=2)
  with pytest.raises(ValueError, match="features="):
    m.init(st, key=KEY)
  with pytest.raises(ValueError, match="key="):
    m.init(st, features=x, task_ids=ids)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    m.init(st, features=x, task_ids=ids + 1, key=KEY)
  with pytest.raises(ValueError, match="task_ids must be"):
    m.init(st, features=x, task_ids=ids[:5], key=KEY)
  with pytest.raises(ValueError, match="features must be"):
    m.init(st, features=x[:, 0], task_ids=ids, key=KEY)
  c = m.init(st, features=x, task_ids=ids, key=KEY)
  with pytest.raises(ValueError, match="trained on 4-dim"):
    route(c, x[:, :3])
  with pytest.raises(ValueError, match="T=3"):
    compose(c, jnp.ones(4))
  with pytest.raises(ValueError, match="3 tasks"):
    m.apply(c, {k: v[:2] for k, v in st.items()})
