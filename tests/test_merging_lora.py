"""LoRA merges: LoRA-LEGO by hand (clusters, both reweightings), ScaLearn recovering known scalings, sharding, errors."""
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import lora
from research import merging
from research import task_vectors
# The package re-exports the factories under the module names, so fetch the modules themselves.
lego_lib = importlib.import_module("research.merging.lora_lego")
scalearn_lib = importlib.import_module("research.merging.scalearn")

# ----------------------------------------------------------------- LoRA-LEGO
# Two tasks, rank 2, a 2 -> 2 kernel. Unit i of task t is [A_t[:, i] ; B_t[i, :]]:
#   task 0: u00 = [1, 0 | 2, 0]      u01 = [0, 1 | 0, -1]
#   task 1: u10 = [1, 0 | 1.6, 0.4]  u11 = [0, 1.2 | 0.2, -1]
# Cluster {u00, u10} and {u01, u11} are far apart (|u00 - u01|^2 = 7 vs 0.32 and 0.08 inside).
A = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.2]]], np.float32)   # [T, d_in, r]
B = np.array([[[2.0, 0.0], [0.0, -1.0]], [[1.6, 0.4], [0.2, -1.0]]], np.float32)  # [T, r, d_out]
UNITS = {"u00": [1, 0, 2, 0], "u01": [0, 1, 0, -1], "u10": [1, 0, 1.6, 0.4],
         "u11": [0, 1.2, 0.2, -1]}


def _factors():
  return {"layers_0": {"dense": {"kernel": {"a": jnp.asarray(A), "b": jnp.asarray(B)}}}}


def _taus(factors, alpha=None):
  params0 = {"layers_0": {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}}
  return lora.densify(factors, params0, alpha=alpha)


def _lego(stacked, factors, key=0, alpha=None, **hp):
  m = merging.get("lora_lego", **hp)
  run = jax.jit(lambda s, f, k: m.apply(m.init(s, factors=f, key=k, alpha=alpha), s))
  return run(stacked, factors, jax.random.key(key))


def _product(*units, reweight=True):
  """The rank-1 update of the (reweighted) centroid of these units."""
  u = np.array([UNITS[n] for n in units], np.float64)
  c = u.mean(0)
  if reweight:
    c = c * np.linalg.norm(u, axis=1).mean() / np.linalg.norm(c)
  return np.outer(c[:2], c[2:])


def test_lora_lego_hand_computed_two_clusters():
  factors = _factors()
  stacked = _taus(factors)
  np.testing.assert_allclose(stacked["layers_0"]["dense"]["kernel"][1], A[1] @ B[1])
  # k = r = 2: the clusters {u00, u10}, {u01, u11}; centroid [1, 0, 1.8, 0.2] (norm sqrt 4.28)
  # rescaled to (sqrt 5 + sqrt 3.72) / 2, and [0, 1.1, 0.1, -1] (norm sqrt 2.22) to
  # (sqrt 2 + sqrt 2.48) / 2; output reweighting sqrt(r / k) = 1.
  want = _product("u00", "u10") + _product("u01", "u11")
  for key in range(3):   # Any seeding finds the obvious clusters.
    out = _lego(stacked, factors, key=key, k=2)
    np.testing.assert_allclose(out["layers_0"]["dense"]["kernel"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["layers_0"]["dense"]["bias"], [0.0, 0.0])
  c = np.array([1, 0, 1.8, 0.2])
  scale = (math.sqrt(5) + math.sqrt(3.72)) / 2 / math.sqrt(4.28)
  np.testing.assert_allclose(_product("u00", "u10"), scale ** 2 * np.outer(c[:2], c[2:]))
  # Without parameter reweighting the centroids are the plain means.
  out = _lego(stacked, factors, k=2, param_reweight=False)
  np.testing.assert_allclose(
      out["layers_0"]["dense"]["kernel"],
      _product("u00", "u10", reweight=False) + _product("u01", "u11", reweight=False),
      rtol=1e-5, atol=1e-6)
  # The LoRA scale alpha / r multiplies everything (alpha 4, r 2: x2).
  out = _lego(_taus(factors, alpha=4.0), factors, k=2, alpha=4.0)
  np.testing.assert_allclose(out["layers_0"]["dense"]["kernel"], 2 * want, rtol=1e-5, atol=1e-6)


def test_lora_lego_output_reweighting_and_concatenation_equivalence():
  factors = _factors()
  stacked = _taus(factors)
  total = A[0] @ B[0] + A[1] @ B[1]
  # k = T r = 4: every unit is its own cluster (reweighting is a no-op), so the merged
  # LoRA is the concatenation of the two, i.e. their sum, times sqrt(r / k) = sqrt(1/2).
  out = _lego(stacked, factors, k=4)
  np.testing.assert_allclose(out["layers_0"]["dense"]["kernel"], total / math.sqrt(2), rtol=1e-5)
  out = _lego(stacked, factors, k=4, output_reweight=False)
  np.testing.assert_allclose(out["layers_0"]["dense"]["kernel"], total, rtol=1e-5)
  # k = 1: one centroid of all four units, reweighted, times sqrt(2 / 1).
  out = _lego(stacked, factors, k=1)
  np.testing.assert_allclose(out["layers_0"]["dense"]["kernel"],
                             math.sqrt(2) * _product("u00", "u01", "u10", "u11"),
                             rtol=1e-5, atol=1e-6)


def test_lora_lego_on_lora_init_factors_exposes_the_merged_lora():
  params0 = {"layers_0": {"q": {"kernel": jnp.zeros((6, 5))}},
             "layers_1": {"q": {"kernel": jnp.zeros((6, 5))}, "norm": jnp.ones(5)}}
  trees = []
  for t in range(3):   # Three "fine-tuned" LoRAs of rank 2 (B moved off zero).
    f = lora.init(params0, 2, jax.random.key(t))
    trees.append(jax.tree.map(lambda x, t=t: x + 0.1 * (t + 1) * jnp.ones_like(x), f))
  stacked_factors = task_vectors.stack(trees)
  stacked = lora.densify(stacked_factors, params0, alpha=4.0)
  m = lego_lib.lora_lego(k=3)
  coeffs = m.init(stacked, factors=stacked_factors, key=jax.random.key(0), alpha=4.0)
  tau = m.apply(coeffs, stacked)
  task_vectors.check_same_structure(tau, params0)
  merged = lora.named(coeffs["factors"])
  assert {n: (a.shape, b.shape) for n, (a, b) in merged.items()} == {
      "layers_0/q/kernel": ((6, 3), (3, 5)), "layers_1/q/kernel": ((6, 3), (3, 5))}
  # The merged factors carry all the scaling: densify them with the default alpha.
  jax.tree.map(np.testing.assert_allclose, lora.densify(coeffs["factors"], params0), tau)
  np.testing.assert_array_equal(tau["layers_1"]["norm"], np.zeros(5))
  # Deterministic given the key.
  again = m.init(stacked, factors=stacked_factors, key=jax.random.key(0), alpha=4.0)
  jax.tree.map(np.testing.assert_array_equal, coeffs, again)


def test_lora_lego_sharded_jit_matches_unsharded():
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))
  rng = np.random.default_rng(0)
  t, d_in, d_out, r = 4, 16, 8, 2
  factors = {"layers_0": {"w": {"kernel": {
      "a": jnp.asarray(rng.standard_normal((t, d_in, r)), jnp.float32),
      "b": jnp.asarray(rng.standard_normal((t, r, d_out)), jnp.float32)}}}}
  params0 = {"layers_0": {"w": {"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros(d_out)}}}
  stacked = lora.densify(factors, params0)
  m = lego_lib.lora_lego(k=3)
  run = lambda s, f, k: m.apply(m.init(s, factors=f, key=k), s)
  want = jax.jit(run)(stacked, factors, jax.random.key(1))
  tau_sh = {"layers_0": {"w": {"kernel": NamedSharding(mesh, P(None, "x", "y")),
                               "bias": NamedSharding(mesh, P(None, "y"))}}}
  f_sh = {"layers_0": {"w": {"kernel": {"a": NamedSharding(mesh, P(None, "x", None)),
                                        "b": NamedSharding(mesh, P(None, None, "y"))}}}}
  out_sh = {"layers_0": {"w": {"kernel": NamedSharding(mesh, P("x", "y")),
                               "bias": NamedSharding(mesh, P("y"))}}}
  got = jax.jit(run, in_shardings=(tau_sh, f_sh, None), out_shardings=out_sh)(
      jax.device_put(stacked, tau_sh), jax.device_put(factors, f_sh), jax.random.key(1))
  leaf = got["layers_0"]["w"]["kernel"]
  assert leaf.sharding.is_equivalent_to(out_sh["layers_0"]["w"]["kernel"], 2)
  np.testing.assert_allclose(leaf, want["layers_0"]["w"]["kernel"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hp,match", [
    ({"k": 0}, "k must be"), ({"k": 1.5}, "k must be"), ({"iters": 0}, "iters"),
    ({"param_reweight": "yes"}, "param_reweight"), ({"output_reweight": 1}, "output_reweight")])
def test_lora_lego_bad_hparams(hp, match):
  with pytest.raises(ValueError, match=match):
    merging.get("lora_lego", **hp)


def test_lora_lego_bad_inputs():
  factors = _factors()
  stacked = _taus(factors)
  m = lego_lib.lora_lego()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="needs factors="):
    m.init(stacked, key=key)
  with pytest.raises(ValueError, match="needs key="):
    m.init(stacked, factors=factors)
  with pytest.raises(ValueError, match=r"k=5 exceeds the T\*r = 4 .*'layers_0/dense/kernel'"):
    lego_lib.lora_lego(k=5).init(stacked, factors=factors, key=key)
  one_task = jax.tree.map(lambda x: x[:1], factors)
  with pytest.raises(ValueError, match=r"expected stacked factors A \[T=2"):
    m.init(stacked, factors=one_task, key=key)
  other = {"layers_0": {"dense": {"kernel": jnp.zeros((2, 3, 2)), "bias": jnp.zeros((2, 2))}}}
  with pytest.raises(ValueError, match=r"stacked task vectors have \(2, 3, 2\)"):
    m.init(other, factors=factors, key=key)
  assert "lora_lego" in merging.METHODS and "scalearn" in merging.METHODS


# ----------------------------------------------------------------- ScaLearn
# A linear "model" with two layers that each see x: out_l = x @ (W0_l + tau_l), and T = 2
# source task vectors per layer. The target is made with known omegas; MSE recovers them.
RNG = np.random.default_rng(3)
T, D_IN, D_OUT = 2, 5, 3
W0 = {f"layers_{l}": {"kernel": jnp.asarray(RNG.standard_normal((D_IN, D_OUT)), jnp.float32)}
      for l in range(2)}
STACKED = {f"layers_{l}": {"kernel": jnp.asarray(RNG.standard_normal((T, D_IN, D_OUT)),
                                                  jnp.float32)} for l in range(2)}
X = jnp.asarray(RNG.standard_normal((64, D_IN)), jnp.float32)


def _outputs(tau, x):
  return [x @ (W0[k]["kernel"] + tau[k]["kernel"]) for k in sorted(W0)]


def _mse(tau, batch):
  x, targets = batch
  return sum(jnp.mean((o - y) ** 2) for o, y in zip(_outputs(tau, x), targets))


def _target(omega):
  return (X, _outputs(scalearn_lib.scaled_sum(omega, STACKED), X))


def _fit(variant, target, steps=400, **kw):
  kw = {"lr": 0.05, "dropout": 0.0, **kw}
  return merging.get("scalearn", variant=variant, steps=steps, **kw).init(
      STACKED, loss_fn=_mse, batches=[target])


def test_scaled_sum_hand_computed():
  x = {"w": np.array([[[1.0, 2.0]], [[3.0, 4.0]]], np.float32),       # [T=2, 1, 2]
       "b": np.array([[1.0, 1.0], [2.0, -1.0]], np.float32)}
  omega = {"w": jnp.array([[1.0, 0.5], [2.0, 0.0]]), "b": jnp.array([0.5, 1.0])}
  out = scalearn_lib.scaled_sum(omega, x)
  np.testing.assert_allclose(out["w"], [[1 + 6.0, 1.0 + 0.0]])   # columns scaled per task
  np.testing.assert_allclose(out["b"], [2.5, -0.5])
  assert scalearn_lib.layer_role("layers/3/attention/query/kernel") == \
      "layers/*/attention/query/kernel"
  assert (scalearn_lib.layer_role("visual/blocks_11/mlp_in/kernel")
          == "visual/blocks_*/mlp_in/kernel")
  assert scalearn_lib.layer_role("embeddings/word/embedding") == "embeddings/word/embedding"


def test_scalearn_recovers_known_vector_scaling_and_reduces_loss():
  true = {"layers_0": {"kernel": jnp.array([[0.5, -1.0, 2.0], [1.5, 0.0, 0.3]])},
          "layers_1": {"kernel": jnp.array([[1.0, 1.0, -0.5], [0.2, 0.7, 1.2]])}}
  target = _target(true)
  coeffs = _fit("scalearn", target)
  for k in true:
    np.testing.assert_allclose(coeffs["omega"][k]["kernel"], true[k]["kernel"], atol=2e-3)
  start = jax.tree.map(lambda o: jnp.full(o.shape, 2.0 / T), true)   # the "avg" init, 2 / T
  m = merging.get("scalearn")
  assert _mse(m.apply(coeffs, STACKED), target) < 1e-4 * _mse(m.apply({"omega": start}, STACKED),
                                                              target)


def test_scalearn_uniform_and_shared_variants():
  uniform = {"layers_0": {"kernel": jnp.array([0.5, -1.0])},
             "layers_1": {"kernel": jnp.array([2.0, 0.25])}}
  coeffs = _fit("scalearn_uniform", _target(uniform))
  for k in uniform:
    assert coeffs["omega"][k]["kernel"].shape == (T,)
    np.testing.assert_allclose(coeffs["omega"][k]["kernel"], uniform[k]["kernel"], atol=2e-3)
  # ++: one omega for layers_0/kernel and layers_1/kernel (same role); recovers a shared truth.
  shared = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.0, 0.3]])
  coeffs = _fit("scalearn++", _target({k: {"kernel": shared} for k in W0}))
  np.testing.assert_array_equal(coeffs["omega"]["layers_0"]["kernel"],
                                coeffs["omega"]["layers_1"]["kernel"])
  np.testing.assert_allclose(coeffs["omega"]["layers_0"]["kernel"], shared, atol=2e-3)
  coeffs = _fit("scalearn_uniform++", _target({k: {"kernel": jnp.array([0.7, 1.3])} for k in W0}))
  np.testing.assert_allclose(coeffs["omega"]["layers_1"]["kernel"], [0.7, 1.3], atol=2e-3)


def test_scalearn_dropout_needs_a_key_and_is_deterministic():
  target = _target({k: {"kernel": jnp.ones((T, D_OUT))} for k in W0})
  m = merging.get("scalearn", steps=5)                       # dropout 0.3 by default
  with pytest.raises(ValueError, match="key="):
    m.init(STACKED, loss_fn=_mse, batches=[target])
  first = m.init(STACKED, loss_fn=_mse, batches=[target], key=jax.random.key(0))
  again = m.init(STACKED, loss_fn=_mse, batches=[target], key=jax.random.key(0))
  other = m.init(STACKED, loss_fn=_mse, batches=[target], key=jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first["omega"]["layers_0"]["kernel"],
                            other["omega"]["layers_0"]["kernel"])


def test_scalearn_trains_through_a_lora_model_with_labels():
  # Cross-entropy on labels through params0 + tau, with params0 passed as aux (not captured).
  params0 = {"layers_0": {"dense": {"kernel": jnp.zeros((4, 3))}}}
  factors = [lora.init(params0, 2, jax.random.key(t)) for t in range(2)]
  factors = [jax.tree.map(lambda x, t=t: x + (t + 1.0), f) for t, f in enumerate(factors)]
  stacked = lora.densify(task_vectors.stack(factors), params0)
  x = jnp.asarray(RNG.standard_normal((16, 4)), jnp.float32)
  y = jnp.asarray(RNG.integers(0, 3, 16), jnp.int32)
  logits_fn = lambda tau, inputs, aux: inputs @ (aux["layers_0"]["dense"]["kernel"] +
                                                 tau["layers_0"]["dense"]["kernel"])
  m = merging.get("scalearn", steps=30, lr=0.05, dropout=0.0)
  coeffs = m.init(stacked, logits_fn=logits_fn, batches=[(x, y)], aux=params0)
  ce = lambda tau: float(jnp.mean(jax.nn.logsumexp(logits_fn(tau, x, params0), -1)
                                  - jnp.take_along_axis(logits_fn(tau, x, params0),
                                                        y[:, None], -1)[:, 0]))
  start = {"omega": jax.tree.map(lambda o: jnp.full(o.shape, 1.0), coeffs["omega"])}
  assert ce(m.apply(coeffs, stacked)) < ce(m.apply(start, stacked))


def test_scalearn_apply_under_sharded_jit():
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))
  rng = np.random.default_rng(1)
  stacked = {"k": jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)}
  omega = {"k": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
           "b": jnp.array([1.0, -1.0, 0.5, 0.0])}
  apply = merging.get("scalearn").apply
  want = jax.jit(apply)({"omega": omega}, stacked)
  sh = {"k": NamedSharding(mesh, P(None, "x", "y")), "b": NamedSharding(mesh, P(None, "y"))}
  out_sh = {"k": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P("y"))}
  got = jax.jit(apply, in_shardings=(None, sh), out_shardings=out_sh)(
      {"omega": omega}, jax.device_put(stacked, sh))
  for leaf in ("k", "b"):
    assert got[leaf].sharding.is_equivalent_to(out_sh[leaf], got[leaf].ndim)
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-6)
  np.testing.assert_allclose(want["b"], stacked["b"][0] - stacked["b"][1] + 0.5 * stacked["b"][2],
                             rtol=1e-6)


@pytest.mark.parametrize("hp,match", [
    ({"variant": "scalearn+"}, "variant"), ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"), ({"lr": 0.0}, "lr"), ({"steps": 0}, "steps"),
    ({"init_scale": float("nan")}, "init_scale"), ({"objective": "mse"}, "objective"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"clip_norm": 0.0}, "clip_norm")])
def test_scalearn_bad_hparams(hp, match):
  with pytest.raises(ValueError, match=match):
    merging.get("scalearn", **hp)


def test_scalearn_bad_inputs():
  m = merging.get("scalearn", dropout=0.0, steps=1)
  with pytest.raises(ValueError, match="loss_fn="):
    m.init(STACKED, batches=[_target({k: {"kernel": jnp.ones(2)} for k in W0})])
  with pytest.raises(ValueError, match="batches="):
    m.init(STACKED, loss_fn=_mse)
  with pytest.raises(ValueError, match=r"omega of leaf 'layers_0/kernel' has shape \(3,\)"):
    m.apply({"omega": {k: {"kernel": jnp.ones(3)} for k in W0}}, STACKED)
