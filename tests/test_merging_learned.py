"""Learned-coefficient merges (AdaMerging, aTLAS, Self-Positioning): Adam's first steps by hand, linearized models, sharding, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research import tangent
from research.merging import learned
from research.merging.adamerging import adamerging_layer, adamerging_task
from research.merging.atlas import atlas
from research.merging.self_positioning import self_positioning

LR = 1e-2
# Two tasks; leaf "w" holds the 2 logits of a constant classifier, leaf "b" is never read.
# Task 0 pushes class 0; task 1 is a zero task vector.
STACKED = {"w": np.array([[1.0, 0.0], [0.0, 0.0]], np.float32),
           "b": np.array([[5.0, -5.0], [2.0, 2.0]], np.float32)}
INPUTS = np.zeros((4, 3), np.float32)
LABELS = np.zeros((4,), np.int32)


def logits_fn(tau, x):
  return jnp.zeros((x.shape[0], 2)) + tau["w"]


def test_weighted_sum_and_objectives_hand_computed():
  out = learned.weighted_sum(jnp.array([2.0, -1.0]), STACKED)
  np.testing.assert_allclose(out["w"], [2.0, 0.0])
  np.testing.assert_allclose(out["b"], [8.0, -12.0])
  out = learned.weighted_sum({"w": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 0.5])}, STACKED)
  np.testing.assert_allclose(out["b"], [1.0, 1.0])
  np.testing.assert_allclose(learned.entropy(jnp.zeros((3, 2))), math.log(2), rtol=1e-6)
  np.testing.assert_allclose(learned.entropy(jnp.array([[100.0, 0.0]])), 0.0, atol=1e-6)
  # CE of logits [log 3, 0] (p = [.75, .25]) at label 1: -log .25.
  np.testing.assert_allclose(learned.cross_entropy(jnp.array([[math.log(3), 0.0]]),
                                                   jnp.array([1])), math.log(4), rtol=1e-6)


def test_adamerging_first_steps_by_hand():
  # Entropy falls as lambda_0 grows, so Adam's first step raises it by exactly lr; the
  # zero task vector gets a zero gradient and stays at the prior.
  c = adamerging_task(lr=LR, steps=1).init(STACKED, logits_fn=logits_fn, batches=[INPUTS])
  np.testing.assert_allclose(c["lambdas"], [0.3 + LR, 0.3], rtol=1e-6)
  c = adamerging_layer(lr=LR, steps=1).init(STACKED, logits_fn=logits_fn, batches=[INPUTS])
  np.testing.assert_allclose(c["lambdas"]["w"], [0.3 + LR, 0.3], rtol=1e-6)
  np.testing.assert_allclose(c["lambdas"]["b"], [0.3, 0.3])      # "b" is never read
  # Several steps move ~lr each; clipping holds the coefficient at 1.
  c = adamerging_task(lr=LR, steps=5).init(STACKED, logits_fn=logits_fn, batches=[INPUTS])
  np.testing.assert_allclose(c["lambdas"], [0.3 + 5 * LR, 0.3], rtol=1e-3)
  c = adamerging_task(prior=0.995, lr=LR, steps=3).init(
      STACKED, logits_fn=logits_fn, batches=lambda step: INPUTS)
  np.testing.assert_allclose(c["lambdas"], [1.0, 0.995])
  # apply is the weighted sum with the returned coefficients.
  out = adamerging_task().apply({"lambdas": jnp.array([0.5, 2.0])}, STACKED)
  np.testing.assert_allclose(out["b"], [6.5, 1.5])


def test_atlas_supervised_and_unsupervised_first_step():
  # From 0, cross-entropy on label 0 falls as lambda^w_0 grows: AdamW's first step is +lr
  # (weight decay acts on the coefficient, which is still 0).
  c = atlas(lr=LR, steps=1).init(STACKED, logits_fn=logits_fn, batches=[(INPUTS, LABELS)])
  np.testing.assert_allclose(c["lambdas"]["w"], [LR, 0.0], rtol=1e-4)
  np.testing.assert_allclose(c["lambdas"]["b"], [0.0, 0.0])
  # Entropy at lambda = 0 is flat (uniform logits): start from 0.1 to have a gradient.
  c = atlas(objective="entropy", lr=LR, steps=1, init_value=0.1, weight_decay=0.0).init(
      STACKED, logits_fn=logits_fn, batches=[INPUTS])
  np.testing.assert_allclose(c["lambdas"]["w"], [0.1 + LR, 0.1], rtol=1e-6)


def test_atlas_on_linearized_task_vectors_matches_tangent_cache():
  # A non-linear model; the aTLAS coefficients are trained through tangent.linearize. With a
  # single parameter block, per-block = per-task, so the same training can be run on the
  # cached JVPs f0 + sum_t lambda_t J tau_t (tangent.combine): the results must agree.
  rng = np.random.default_rng(0)
  f = lambda p, x: jnp.tanh(x @ p["w"]) * 3.0
  params0 = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
  stacked = {"w": rng.standard_normal((2, 3, 4)).astype(np.float32) * 0.5}
  x = rng.standard_normal((6, 3)).astype(np.float32)
  y = rng.integers(0, 4, 6).astype(np.int32)
  f_lin = tangent.linearize(f)

  def lin_logits(tau, inputs, aux):
    return f_lin(jax.tree.map(jnp.add, aux, tau), aux, inputs)

  steps = 8
  c = atlas(lr=0.05, steps=steps).init(stacked, logits_fn=lin_logits,
                                       batches=[(x, y)], aux=params0)
  cache = tangent.precompute(f, params0, stacked, x)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1))
  lam, state = jnp.zeros(2), None
  state = opt.init(lam)
  loss = lambda l: learned.cross_entropy(tangent.combine(cache, l), y)
  for _ in range(steps):
    updates, state = opt.update(jax.grad(loss)(lam), state, lam)
    lam = optax.apply_updates(lam, updates)
  np.testing.assert_allclose(c["lambdas"]["w"], lam, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(lam).max()) > 0.1


def test_self_positioning_first_step_by_hand():
  r0 = math.log(math.expm1(1.0))                  # softplus^-1(1): weights 1/2 each, scale 1
  c = self_positioning(lr=LR, steps=1).init(STACKED, logits_fn=logits_fn,
                                            batches=[(INPUTS, LABELS)])
  # CE on label 0 falls with more of task 0: its weight's raw parameter and the scale's go
  # up by lr, task 1's goes down by lr (its weight only dilutes task 0).
  sp = lambda v: math.log1p(math.exp(v))
  a0, a1, lam = sp(r0 + LR), sp(r0 - LR), sp(r0 + LR)
  np.testing.assert_allclose(c["lambdas"], [lam * a0 / (a0 + a1), lam * a1 / (a0 + a1)],
                             rtol=1e-5)
  # A large mu pulls the scale down.
  c = self_positioning(lr=LR, steps=1, mu=100.0).init(STACKED, logits_fn=logits_fn,
                                                      batches=[(INPUTS, LABELS)])
  assert float(jnp.sum(c["lambdas"])) < 1.0
  c = self_positioning(lr=LR, steps=2, optimizer="sgd", init_scale=2.0).init(
      STACKED, logits_fn=logits_fn, batches=[(INPUTS, LABELS)])
  assert float(c["lambdas"][0]) > 1.0 > float(c["lambdas"][1]) > 0


def test_lists_of_logits_sum_the_objective():
  two = lambda tau, x: [logits_fn(tau, x), logits_fn(tau, x)]
  loss1 = learned.make_loss("cross_entropy", logits_fn=logits_fn, loss_fn=None, method="m")
  loss2 = learned.make_loss("cross_entropy", logits_fn=two, loss_fn=None, method="m")
  tau = {"w": jnp.array([0.3, -0.2]), "b": jnp.zeros(2)}
  np.testing.assert_allclose(loss2(tau, (INPUTS, [LABELS, LABELS]), None),
                             2 * loss1(tau, (INPUTS, LABELS), None), rtol=1e-6)


# ------------------------------------------------------------------ sharded jit

def test_sharded_jit_matches_unsharded():
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Auto))
  rng = np.random.default_rng(1)
  stacked = {"k": rng.standard_normal((4, 16, 8)).astype(np.float32),
             "b": rng.standard_normal((4, 8)).astype(np.float32)}
  sh = {"k": NamedSharding(mesh, P(None, "x", "y")), "b": NamedSharding(mesh, P("x", "y"))}
  out_sh = {"k": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P("y"))}
  lambdas = {"k": jnp.array([0.1, 0.2, 0.3, 0.4]), "b": jnp.array([1.0, -1.0, 0.5, 0.0])}
  apply = adamerging_layer().apply
  want = jax.jit(apply)({"lambdas": lambdas}, stacked)
  placed = jax.device_put(stacked, sh)
  got = jax.jit(apply, in_shardings=(None, sh), out_shardings=out_sh)({"lambdas": lambdas},
                                                                      placed)
  for leaf in ("k", "b"):
    assert got[leaf].sharding.is_equivalent_to(out_sh[leaf], got[leaf].ndim)
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-6)
  # Training on sharded task vectors gives the unsharded coefficients.
  x = rng.standard_normal((6, 16)).astype(np.float32)
  logits = lambda tau, inputs: inputs @ tau["k"] + tau["b"]
  m = adamerging_task(steps=3)
  c_ref = m.init(stacked, logits_fn=logits, batches=[x])
  c_sh = m.init(placed, logits_fn=logits, batches=[x])
  np.testing.assert_allclose(c_sh["lambdas"], c_ref["lambdas"], rtol=1e-5)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("factory,kwargs,match", [
    (adamerging_task, {"prior": 1.5}, "prior"),
    (adamerging_task, {"lr": 0.0}, "lr"),
    (adamerging_layer, {"steps": 0}, "steps"),
    (adamerging_layer, {"clip": "yes"}, "clip"),
    (atlas, {"objective": "mse"}, "objective"),
    (atlas, {"weight_decay": -1.0}, "weight_decay"),
    (atlas, {"clip_norm": 0.0}, "clip_norm"),
    (atlas, {"steps": 2.5}, "steps"),
    (self_positioning, {"optimizer": "lbfgs"}, "optimizer"),
    (self_positioning, {"mu": -1.0}, "mu"),
    (self_positioning, {"init_scale": 0.0}, "init_scale"),
])
def test_bad_hparams_rejected(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


def test_missing_or_bad_data_rejected():
  m = adamerging_task(steps=1)
  with pytest.raises(ValueError, match="logits_fn="):
    m.init(STACKED, batches=[INPUTS])
  with pytest.raises(ValueError, match="both"):
    m.init(STACKED, logits_fn=logits_fn, loss_fn=lambda t, b: 0.0, batches=[INPUTS])
  with pytest.raises(ValueError, match="batches="):
    m.init(STACKED, logits_fn=logits_fn)
  with pytest.raises(ValueError, match=r"\[batch\]"):
    m.init(STACKED, logits_fn=logits_fn, batches=(INPUTS,))
  with pytest.raises(ValueError, match="inputs, labels"):
    atlas(steps=1).init(STACKED, logits_fn=logits_fn, batches=[INPUTS])
  with pytest.raises(ValueError, match="shape"):
    m.apply({"lambdas": jnp.ones(3)}, STACKED)
  # loss_fn replaces the objective entirely.
  c = m.init(STACKED, loss_fn=lambda tau, b: -jnp.sum(tau["b"]), batches=[INPUTS])
  # -sum(tau_b) = -(0 * lambda_0 + 4 * lambda_1): only lambda_1 moves, by +lr.
  np.testing.assert_allclose(c["lambdas"], [0.3, 0.3 + 1e-3], rtol=1e-6)
  assert "batches" in adamerging_task.requires and "batches" in atlas.requires
