"""Fisher merging, RegMean, DOGE and the data statistics helpers: hand-computed cases, references, sharding, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research.merging import data_stats
from research.merging.doge import doge, layer_loss, shared_basis, task_coefficients
from research.merging.fisher import fisher
from research.merging.regmean import regmean
from research.models import minilm
from research.models.bert import Bert, BertConfig


def _run(method, stacked, **kwargs):
  return method.apply(method.init(stacked, **kwargs), stacked)


# ------------------------------------------------------------------ Fisher merging

def test_fisher_hand_computed():
  stacked = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
  fishers = {"w": np.array([[1.0, 0.0], [3.0, 1.0]], np.float32)}
  # entry 0: (1*1 + 3*3) / (1 + 3) = 2.5; entry 1: F = [0 -> floor 0.5, 1]:
  # (0.5*2 + 1*4) / 1.5 = 10/3.
  out = _run(fisher(floor=0.5), stacked, fishers=fishers)
  np.testing.assert_allclose(out["w"], [2.5, 10.0 / 3.0], rtol=1e-6)
  out = _run(fisher(floor=0.5, scale=2.0), stacked, fishers=fishers)
  np.testing.assert_allclose(out["w"], [5.0, 20.0 / 3.0], rtol=1e-6)
  # normalize: F_0 / ||F_0|| = [1, 0] -> floored [1, .5]; F_1 / sqrt(10) = [.9487, .3162]
  # -> floored [.9487, .5]: entry 0: (1*1 + .9487*3) / 1.9487; entry 1: (.5*2 + .5*4) / 1.
  out = _run(fisher(floor=0.5, normalize=True), stacked, fishers=fishers)
  a = 3 / np.sqrt(10)
  np.testing.assert_allclose(out["w"], [(1 + 3 * a) / (1 + a), 3.0], rtol=1e-6)


def test_fisher_equal_fishers_is_average_and_matches_weight_space():
  rng = np.random.default_rng(0)
  taus = {"w": rng.standard_normal((3, 4, 5)).astype(np.float32)}
  f = {"w": np.abs(rng.standard_normal((3, 4, 5))).astype(np.float32) + 0.1}
  same = {"w": np.ones((3, 4, 5), np.float32)}
  np.testing.assert_allclose(_run(fisher(), taus, fishers=same)["w"], taus["w"].mean(0),
                             rtol=1e-6)
  # theta* = sum F theta / sum F in weight space equals theta0 + the task-vector merge.
  theta0 = rng.standard_normal((4, 5)).astype(np.float32)
  thetas = theta0 + taus["w"]
  weight_space = (f["w"] * thetas).sum(0) / f["w"].sum(0)
  np.testing.assert_allclose(theta0 + _run(fisher(), taus, fishers=f)["w"], weight_space,
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ RegMean

def test_regmean_hand_computed():
  stacked = {"kernel": np.array([[[1.0], [0.0]], [[0.0], [1.0]]], np.float32),
             "bias": np.array([[1.0], [3.0]], np.float32)}
  grams = {"kernel": np.array([[[2.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]],
                              np.float32)}
  # alpha = 1: sum G = [[3, 1], [1, 4]], sum G W = [[2], [4]] -> solve = [[4/11], [10/11]].
  out = _run(regmean(alpha=1.0), stacked, grams=grams)
  np.testing.assert_allclose(out["kernel"], [[4 / 11], [10 / 11]], rtol=1e-6)
  np.testing.assert_allclose(out["bias"], [2.0])          # averaged
  # alpha = 0.5: G_0 off-diagonal halved -> sum G = [[3, .5], [.5, 4]], sum G W = [[2], [3.5]].
  out = _run(regmean(alpha=0.5, scale=2.0), stacked, grams=grams)
  np.testing.assert_allclose(out["kernel"], 2 * np.array([[6.25], [9.5]]) / 11.75, rtol=1e-6)
  np.testing.assert_allclose(out["bias"], [4.0])


def test_regmean_alpha_one_is_least_squares():
  rng = np.random.default_rng(1)
  xs = [rng.standard_normal((20, 6)) for _ in range(3)]
  ws = rng.standard_normal((3, 6, 4))
  grams = {"k": np.stack([x.T @ x for x in xs]).astype(np.float32)}
  out = _run(regmean(alpha=1.0), {"k": ws.astype(np.float32)}, grams=grams)["k"]
  # argmin_W sum_t ||X_t W - X_t W_t||^2 by stacking the systems.
  ref = np.linalg.lstsq(np.concatenate(xs), np.concatenate([x @ w for x, w in zip(xs, ws)]),
                        rcond=None)[0]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ data statistics

@functools.lru_cache(maxsize=None)
def _tiny_bert():
  cfg = BertConfig(vocab_size=50, hidden=16, layers=1, heads=2, intermediate=24, max_position=8)
  model = Bert(cfg, rngs=nnx.Rngs(0))
  apply_fn, params = minilm.split_model(model)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (3, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], jnp.int32)
  return model, apply_fn, params, ids, mask


def test_kernel_input_grams_bert_matches_manual_activations():
  model, apply_fn, params, ids, mask = _tiny_bert()
  grams = data_stats.kernel_input_grams(apply_fn, params, [(ids, mask)],
                                        weights_fn=lambda i, m: m)
  assert sorted(grams) == sorted(
      f"layers/0/{m}/kernel" for m in ("attention/query", "attention/key", "attention/value",
                                       "attention/output", "intermediate", "output"))
  keep = np.asarray(mask).reshape(-1) == 1
  def gram(x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])[keep]
    return x.T @ x / len(x)
  emb = model.embeddings(ids, jnp.zeros_like(ids))          # input of q, k, v
  for m in ("query", "key", "value"):
    np.testing.assert_allclose(grams[f"layers/0/attention/{m}/kernel"], gram(emb),
                               rtol=1e-4, atol=1e-5)
  layer = model.layers[0]
  score_bias = (1.0 - mask.astype(jnp.float32)[:, None, None, :]) * jnp.finfo(jnp.float32).min
  h = layer.attention_norm(emb + layer.attention(emb, score_bias))   # input of intermediate
  np.testing.assert_allclose(grams["layers/0/intermediate/kernel"], gram(h), rtol=1e-4,
                             atol=1e-5)
  mid = jax.nn.gelu(layer.intermediate(h), approximate=False)       # input of output
  np.testing.assert_allclose(grams["layers/0/output/kernel"], gram(mid), rtol=1e-4, atol=1e-5)
  # Without weights every position counts; two batches average over all rows.
  two = data_stats.kernel_input_grams(apply_fn, params, [(ids[:1], mask[:1]), (ids, mask)])
  x = np.concatenate([np.asarray(emb[:1]).reshape(-1, 16), np.asarray(emb).reshape(-1, 16)])
  np.testing.assert_allclose(two["layers/0/attention/query/kernel"], x.T @ x / len(x),
                             rtol=1e-4, atol=1e-5)


def test_kernel_input_grams_sees_through_jit_and_casts():
  @jax.jit
  def inner(x, w):
    return jnp.tanh(x @ w.astype(jnp.float32))

  def apply_fn(params, x):
    h = inner(x, params["a"])
    return jnp.einsum("bi,io->bo", h, params["b"]) + jnp.sum(params["b"] @ params["c"])

  params = {"a": jnp.ones((3, 4), jnp.bfloat16) * 0.1, "b": jnp.full((4, 2), 0.5),
            "c": jnp.ones((2, 2)), "bias": jnp.zeros((2,))}
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  grams = data_stats.kernel_input_grams(apply_fn, params, [x], select=lambda n: n != "c")
  np.testing.assert_allclose(grams["a"], x.T @ x / 2)
  h = np.tanh(x @ np.full((3, 4), np.float32(jnp.bfloat16(0.1))))
  # "b" is read as x @ W by h only: b @ c contracts b's second axis (c would be the
  # kernel there, with b its inputs, but c is not selected).
  np.testing.assert_allclose(grams["b"], h.T @ h / 2, rtol=1e-5)
  assert "c" not in grams and "bias" not in grams


def _softmax_regression():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((3, 4)).astype(np.float32) * 0.5
  x = rng.standard_normal((5, 3)).astype(np.float32)
  return {"w": w}, x, lambda p, inputs: inputs @ p["w"]


def test_diagonal_fisher_exact_closed_form():
  params, x, logits_fn = _softmax_regression()
  got = data_stats.diagonal_fisher(logits_fn, params, [x[:2], x[2:]])["w"]
  # d log p_c / dW_ij = x_i (delta_cj - p_j);  F = mean_n sum_c p_c (x_i (delta_cj - p_j))^2.
  logits = x @ params["w"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = np.zeros((3, 4))
  for n in range(5):
    for c in range(4):
      g = np.outer(x[n], np.eye(4)[c] - p[n])
      want += p[n, c] * g ** 2 / 5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Empirical Fisher with the argmax label; sampled Fisher runs and is non-negative.
  labels = np.argmax(logits, 1)
  emp = data_stats.diagonal_fisher(logits_fn, params, [(x, labels)], kind="empirical")["w"]
  want_emp = sum(np.outer(x[n], np.eye(4)[labels[n]] - p[n]) ** 2 for n in range(5)) / 5
  np.testing.assert_allclose(emp, want_emp, rtol=1e-5, atol=1e-7)
  smp = data_stats.diagonal_fisher(logits_fn, params, [x], kind="sampled",
                                   key=jax.random.key(0))["w"]
  assert smp.shape == (3, 4) and bool(jnp.all(smp >= 0))


# ------------------------------------------------------------------ DOGE

def _doge_reference(taus, lam, density, subspace, lr, steps):
  """numpy transcription of the official algorithm, in torch layout ([d_out, d_in] per layer)."""
  leaves = [np.asarray(t, np.float64).transpose(0, 2, 1) for t in taus]  # [T, out, in]
  n_tasks = leaves[0].shape[0]
  out = []
  flat = np.concatenate([l.reshape(n_tasks, -1) for l in leaves], 1)
  k_keep = int(np.ceil(density * flat.shape[1]))
  thr = -np.sort(-np.abs(flat), 1)[:, k_keep - 1]
  for v in leaves:
    lamdas = lam / np.linalg.norm(v.reshape(n_tasks, -1), axis=1)
    k = min(v.shape[1:])
    r = k // n_tasks
    sum_u = np.concatenate([np.linalg.svd(v[i], full_matrices=False)[0][:, :r]
                            for i in range(n_tasks)], 1)
    u_u = np.linalg.svd(sum_u, full_matrices=False)[0][:, :max(k // subspace, 1)]
    proj = u_u @ u_u.T
    delta, m, s = np.zeros(v.shape[1:]), np.zeros(v.shape[1:]), np.zeros(v.shape[1:])
    for step in range(1, steps + 1):
      merged = np.tensordot(lamdas, v, 1) + lamdas.sum() * delta
      sj = np.einsum("toi,toi->to", v, v - merged)                      # row sums over in
      grad = -2 * lamdas.sum() * np.einsum("to,toi->oi", sj, v)
      grad = grad - proj @ grad
      m = 0.9 * m + 0.1 * grad
      s = 0.999 * s + 0.001 * grad ** 2
      delta -= lr * (m / (1 - 0.9 ** step)) / (np.sqrt(s / (1 - 0.999 ** step)) + 1e-8)
    mask = np.abs(v) >= thr[:, None, None]
    out.append(np.einsum("t,toi->oi", lamdas, (v + delta) * mask).T)
  return out


def test_doge_matches_reference_transcription():
  rng = np.random.default_rng(3)
  stacked = {"a": rng.standard_normal((3, 6, 7)).astype(np.float32),
             "b": rng.standard_normal((3, 5, 4)).astype(np.float32),
             "bias": rng.standard_normal((3, 4)).astype(np.float32)}
  hp = dict(lam=0.5, density=0.4, subspace=2, lr=0.05, steps=30)
  out = jax.jit(lambda s: _run(doge(**hp), s))(stacked)
  want = _doge_reference([stacked["a"], stacked["b"]], **hp)
  np.testing.assert_allclose(out["a"], want[0], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(out["b"], want[1], rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(out["bias"], np.zeros(4))    # not a matrix: no update


def test_doge_hand_computed_pieces():
  x = jnp.array([[[3.0, 0.0], [4.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])   # ||x_0|| = 5, ||x_1|| = 1
  np.testing.assert_allclose(task_coefficients(x, 0.5), [0.1, 0.5])
  # Loss at delta = 0 with lambdas [1, 1]: merged = [[3, 1], [4, 0]];
  # column sums <x_j[:, r], x_j[:, r] - merged[:, r]>: task 0 -> [0, 0]; task 1 -> [0, 1*(1-1)] = 0.
  assert float(layer_loss(jnp.zeros((2, 2)), x, jnp.ones(2))) == 0.0
  # lambdas [1, 0]: merged = x_0 -> task 1 column 1: 1 * (1 - 0) = 1; loss 1.
  assert float(layer_loss(jnp.zeros((2, 2)), x, jnp.array([1.0, 0.0]))) == 1.0
  # One step: Adam's first update is -lr * sign(g), g the loss gradient projected out of
  # the shared output subspace: g - g U U^T.
  rng = np.random.default_rng(4)
  st = {"w": rng.standard_normal((2, 8, 6)).astype(np.float32)}
  coeffs = jax.jit(doge(lam=0.2, subspace=2, steps=1, lr=1e-2).init)(st)
  w = jnp.asarray(st["w"])
  basis = shared_basis(w, 2)
  assert basis.shape == (6, 3)                     # min(8, 6) // 2 directions
  np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
  lams = task_coefficients(w, 0.2)
  g = jax.grad(layer_loss)(jnp.zeros((8, 6)), w, lams)
  g = g - (g @ basis) @ basis.T
  np.testing.assert_allclose(coeffs["delta"]["w"], -1e-2 * np.sign(g), atol=1e-7)
  np.testing.assert_allclose(coeffs["lambdas"]["w"], lams)


# ------------------------------------------------------------------ sharded jit

def _mesh():
  return jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))


def _sharded_case():
  rng = np.random.default_rng(5)
  stacked = {"k": rng.standard_normal((4, 16, 8)).astype(np.float32),
             "b": rng.standard_normal((4, 8)).astype(np.float32)}
  fishers = jax.tree.map(lambda a: np.abs(a) + 0.01, stacked)
  xs = rng.standard_normal((4, 32, 16))
  grams = {"k": np.einsum("tni,tnj->tij", xs, xs).astype(np.float32) / 32}
  specs = {"k": P(None, "x", "y"), "b": P(None, "y")}
  return stacked, fishers, grams, specs


@pytest.mark.parametrize("name", ["fisher", "regmean", "doge"])
def test_sharded_jit_matches_unsharded(name):
  stacked, fishers, grams, specs = _sharded_case()
  mesh = _mesh()
  sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
  out_sh = {"k": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P("y"))}
  method = {"fisher": fisher(normalize=True), "regmean": regmean(),
            "doge": doge(lam=0.3, subspace=2, steps=50, lr=1e-2)}[name]
  kwargs = {"fisher": {"fishers": fishers}, "regmean": {"grams": grams}, "doge": {}}[name]

  def merge(s, kw):
    return method.apply(method.init(s, **kw), s)

  want = jax.jit(merge)(stacked, kwargs)
  kw_sh = {"fisher": {"fishers": sh},
           "regmean": {"grams": {"k": NamedSharding(mesh, P(None, "y", None))}},
           "doge": {}}[name]
  placed = jax.device_put((stacked, kwargs), (sh, kw_sh))
  got = jax.jit(merge, in_shardings=(sh, kw_sh), out_shardings=out_sh)(*placed)
  for leaf in ("k", "b"):
    assert got[leaf].sharding.is_equivalent_to(out_sh[leaf], got[leaf].ndim)
    # DOGE's Adam steps turn tiny reduction-order differences of the sharded Grams into
    # ~1e-6 differences of the correction.
    tol = dict(rtol=1e-4, atol=1e-5) if name == "doge" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[leaf], want[leaf], **tol)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("factory,kwargs,match", [
    (fisher, {"floor": 0.0}, "floor"),
    (fisher, {"normalize": 1}, "normalize"),
    (fisher, {"scale": float("nan")}, "scale"),
    (regmean, {"alpha": 1.5}, "alpha"),
    (regmean, {"alpha": -0.1}, "alpha"),
    (doge, {"lam": 0.0}, "lam"),
    (doge, {"density": 0.0}, "density"),
    (doge, {"subspace": 0}, "subspace"),
    (doge, {"steps": 0}, "steps"),
    (doge, {"lr": -1.0}, "lr"),
])
def test_bad_hparams_rejected(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


def test_missing_or_mismatched_statistics_rejected():
  stacked = {"k": np.ones((2, 3, 4), np.float32), "b": np.ones((2, 4), np.float32)}
  with pytest.raises(ValueError, match="fishers="):
    fisher().init(stacked)
  with pytest.raises(ValueError, match=r"\['b'\]"):
    fisher().init(stacked, fishers={"k": stacked["k"], "b": np.ones((2, 5), np.float32)})
  with pytest.raises(ValueError, match="grams="):
    regmean().init(stacked)
  with pytest.raises(ValueError, match="leaves that the task vectors do not have"):
    regmean().init(stacked, grams={"q": np.ones((2, 3, 3))})
  with pytest.raises(ValueError, match="grams\\['k'\\]"):
    regmean().init(stacked, grams={"k": np.ones((2, 4, 4))})
  with pytest.raises(ValueError, match="kind"):
    data_stats.diagonal_fisher(lambda p, x: x, {}, [], kind="full")
  with pytest.raises(ValueError, match="key="):
    data_stats.diagonal_fisher(lambda p, x: x, {}, [], kind="sampled")
  assert fisher.requires == ("fishers",) and regmean.requires == ("grams",)
