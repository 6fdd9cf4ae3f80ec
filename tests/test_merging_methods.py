"""Data-free merge methods beyond TIES: DARE, Breadcrumbs, PCB, Consensus, Model Stock, LiNeS."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import merging


def _run(method, stacked, key=0):
  return jax.jit(lambda s, k: method.apply(method.init(s, key=k), s))(
      stacked, jax.random.key(key))


# --------------------------------------------------------------------------- DARE

def test_dare_drops_and_rescales():
  x = np.linspace(1.0, 2.0, 20000, dtype=np.float32).reshape(1, 200, 100)
  out = np.asarray(_run(merging.dare(p=0.75), {"w": x})["w"])
  kept = out != 0
  assert abs(kept.mean() - 0.25) < 0.02
  # Every kept entry is tau / (1 - p) exactly (x4 is exact in binary).
  np.testing.assert_array_equal(out[kept], 4.0 * x[0][kept])
  # rescale=False keeps the surviving values unchanged.
  plain = np.asarray(_run(merging.dare(p=0.75, rescale=False), {"w": x})["w"])
  np.testing.assert_array_equal(plain[kept], x[0][kept])


def test_dare_masks_come_from_the_key():
  x = {"a": np.ones((2, 50, 40), np.float32), "b": np.ones((2, 30), np.float32)}
  m = merging.dare(p=0.5)
  first, again, other = _run(m, x, 1), _run(m, x, 1), _run(m, x, 2)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first["a"], other["a"])
  with pytest.raises(ValueError, match="key"):
    m.init(x)


def test_dare_without_drop_is_task_arithmetic_and_ties():
  rng = np.random.default_rng(0)
  x = {"w": rng.standard_normal((3, 6, 7)).astype(np.float32)}
  np.testing.assert_array_equal(_run(merging.dare(p=0.0, scale=0.5), x)["w"],
                                _run(merging.task_arithmetic(0.5), x)["w"])
  np.testing.assert_array_equal(_run(merging.dare_ties(p=0.0), x)["w"],
                                _run(merging.ties(density=1.0), x)["w"])


# -------------------------------------------------------------------- Breadcrumbs

def test_breadcrumbs_hand_computed():
  # One leaf of 10 entries per task; beta 0.3, gamma 0.1: drop floor(0.1*10) = 1
  # largest magnitude, keep the next ceil(0.3*10) = 3, drop the rest.
  t0 = np.array([10, -9, 8, -7, 6, 5, 4, 3, 2, 1], np.float32)      # keeps -9, 8, -7
  t1 = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, -10], np.float32)       # keeps 9, 8, 7
  leaf2 = np.array([[0.5, -4.0], [3.0, 1.0]], np.float32)           # n = 2: drop 0, keep 1
  out = _run(merging.breadcrumbs(beta=0.3, gamma=0.1), {"a": np.stack([t0, t1]), "b": leaf2})
  np.testing.assert_array_equal(out["a"], [0, -9, 8, -7, 0, 0, 7, 8, 9, 0])
  np.testing.assert_array_equal(out["b"], [3.0, -4.0])      # task 0 keeps -4, task 1 keeps 3


@pytest.mark.parametrize("hp,match", [
    ({"beta": 0.0}, r"beta .*\(0, 1\]"), ({"gamma": 1.0}, r"gamma .*\[0, 1\)"),
    ({"beta": 0.9, "gamma": 0.2}, "beta \\+ gamma"), ({"scale": float("nan")}, "scale")])
def test_breadcrumbs_bad_hparams(hp, match):
  with pytest.raises(ValueError, match=match):
    merging.get("breadcrumbs", **hp)


# ---------------------------------------------------------------------- Consensus

def test_consensus_hand_computed():
  x = np.array([[1.0, 1.0, 0.1, 1.0],
                [1.0, -0.1, 0.1, 1.0],
                [1.0, 0.0, 2.0, -1.0]], np.float32)
  # total = [3, 0.9, 2.2, 1]; TALL masks |tau_t| > 0.4 |total - tau_t|:
  #   entry 0: 1 > 0.8 for all three tasks      -> 3 votes, kept
  #   entry 1: only task 0 (1 > 0.04)           -> 1 vote
  #   entry 2: only task 2 (2 > 0.08)           -> 1 vote
  #   entry 3: 1 > 0, 1 > 0, 1 > 0.8            -> 3 votes, kept
  out = _run(merging.consensus(k=2, tall_lambda=0.4), {"w": x})["w"]
  np.testing.assert_allclose(out, [3.0, 0.0, 0.0, 1.0])
  out = _run(merging.consensus(k=1, tall_lambda=0.4, scale=0.5), {"w": x})["w"]
  np.testing.assert_allclose(out, 0.5 * np.array([3.0, 0.9, 2.2, 1.0]), rtol=1e-6)


@pytest.mark.parametrize("hp", [{"k": -1}, {"k": 1.5}, {"tall_lambda": -0.1}])
def test_consensus_bad_hparams(hp):
  with pytest.raises(ValueError, match=next(iter(hp))):
    merging.get("consensus", **hp)


# -------------------------------------------------------------------- Model Stock

def test_model_stock_hand_computed():
  stacked = {
      "orth": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),   # cos 0 -> t = 0
      "diag": np.array([[1.0, 0.0], [1.0, 1.0]], np.float32),   # cos 1/sqrt(2)
      "same": np.array([[2.0, -1.0], [2.0, -1.0]], np.float32),  # cos 1 -> t = 1
  }
  out = _run(merging.model_stock(), stacked)
  c = 1 / math.sqrt(2)
  t = 2 * c / (1 + c)                                          # N cos / (1 + (N - 1) cos)
  np.testing.assert_allclose(out["orth"], [0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(out["diag"], t * np.array([1.0, 0.5]), rtol=1e-6)
  np.testing.assert_allclose(out["same"], [2.0, -1.0], rtol=1e-6)
  # Three tasks: the mean pairwise cosine.
  three = {"w": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)}
  c3 = (0 + c + c) / 3
  np.testing.assert_allclose(_run(merging.model_stock(), three)["w"],
                             3 * c3 / (1 + 2 * c3) * np.array([2 / 3, 2 / 3]), rtol=1e-6)


# -------------------------------------------------------------------------- LiNeS

@pytest.mark.parametrize("path,depth", [
    ("['layers_3']['w']", 3), ("['layer']['3']['w']", 3), ("['blocks.7']['mlp']", 7),
    ("['transformer']['resblocks_11']['attn']", 11), ("['h'][0]['w']", 0),
    ("['conv1']['kernel']", None), ("['fc2']['kernel']", None)])
def test_depth_from_path(path, depth):
  keys = []
  for part in path.strip("[]").split("]["):
    keys.append(jax.tree_util.SequenceKey(int(part)) if part.isdigit()
                else jax.tree_util.DictKey(part.strip("'")))
  assert merging.depth_from_path(tuple(keys)) == depth


def test_layer_scaling_hand_computed():
  tau = {"layers_0": {"w": jnp.ones(2)}, "layers_1": {"w": jnp.ones(2)},
         "layers_2": {"w": jnp.ones(2)}, "embed": jnp.ones(3)}
  post = merging.layer_scaling(alpha=0.2, beta=1.0)
  out = post.apply(post.init(tau), tau)
  # L = 3: lambda = 0.2 + 0.8 * d / 2 = 0.2, 0.6, 1.0; unlayered leaves get alpha.
  for d, s in enumerate([0.2, 0.6, 1.0]):
    np.testing.assert_allclose(out[f"layers_{d}"]["w"], [s, s], rtol=1e-6)
  np.testing.assert_allclose(out["embed"], [0.2] * 3, rtol=1e-6)
  with pytest.raises(ValueError, match=r"\['layers_2'\].*depth 2"):
    merging.layer_scaling(num_layers=2).init(tau)


def test_lines_composes_with_any_merge():
  rng = np.random.default_rng(1)
  stacked = {f"layers_{i}": rng.standard_normal((3, 4, 5)).astype(np.float32) for i in range(3)}
  out = _run(merging.chain(merging.ties(density=0.5), merging.layer_scaling(0.0, 1.0)), stacked)
  ref = _run(merging.ties(density=0.5), stacked)
  for d, s in enumerate([0.0, 0.5, 1.0]):
    np.testing.assert_allclose(out[f"layers_{d}"], s * np.asarray(ref[f"layers_{d}"]), rtol=1e-6)
  # The registered method: LiNeS over a base method with its default hparams.
  reg = _run(merging.get("lines", alpha=0.5, beta=1.0, base_method="ties"), stacked)
  base = _run(merging.ties(), stacked)
  np.testing.assert_allclose(reg["layers_0"], 0.5 * np.asarray(base["layers_0"]), rtol=1e-6)
  np.testing.assert_allclose(reg["layers_2"], np.asarray(base["layers_2"]), rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown merge method"):
    merging.get("lines", base_method="nope")


# ---------------------------------------------------------------------------- PCB

def pcb_reference(flat, ratio):
  """The reference PCB_merge on flattened task vectors, in float64."""
  t, n = flat.shape
  a = np.abs(flat)
  srt = np.sort(a, axis=1)
  lo, hi = srt[:, int(n * 1e-4)][:, None], srt[:, int(n * (1 - 1e-4)) - 1][:, None]
  ac = np.clip(a, lo, hi)
  clipped = np.sign(flat) * ac
  intra = np.exp(t * ((ac - lo) / (hi - lo)) ** 2)
  inter = np.tanh(flat * flat.sum(0))
  b = intra * inter
  sb = np.sort(b, axis=1)
  cut, top = sb[:, int(n * (1 - ratio))][:, None], sb[:, -1:]
  s = (np.maximum(b, cut) - cut) / (top - cut)
  return (s * clipped).sum(0) / np.maximum(s.sum(0), 1e-12)


def test_pcb_hand_computed():
  # n = 4 entries, 2 tasks, ratio 0.5: clip bounds are the smallest and the
  # second largest magnitude (positions int(4e-4) = 0 and int(4 * 0.9999) - 1 = 2).
  x = np.array([[2.0, -1.0, 0.5, 4.0], [1.0, 1.0, -0.5, 3.0]], np.float32)
  # task 0: |x| = [2, 1, .5, 4] -> clip to [.5, 2] -> a = [2, 1, .5, 2]
  # task 1: |x| = [1, 1, .5, 3] -> clip to [.5, 1] -> a = [1, 1, .5, 1]
  # intra = exp(2 ((a - lo) / (hi - lo))^2): task 0 [e^2, e^(2/9), 1, e^2], task 1 [e^2, e^2, 1, e^2]
  # inter = tanh(x * (x0 + x1)) with sums [3, 0, 0, 7]: task 0 [tanh 6, 0, 0, tanh 28], task 1 [tanh 3, 0, 0, tanh 21]
  # scores b: task 0 [e^2 tanh 6, 0, 0, e^2 tanh 28], task 1 [e^2 tanh 3, 0, 0, e^2 tanh 21]
  # cut = sorted b at position int(4 * 0.5) = 2 -> the smaller nonzero score; top = the largest:
  #   task 0: cut = e^2 tanh 6, top = e^2 tanh 28 -> s0 = [0, 0, 0, 1]
  #   task 1: cut = e^2 tanh 3, top = e^2 tanh 21 -> s1 = [0, 0, 0, 1]
  # merged entry 3 = (1 * 2 + 1 * 1) / 2 = 1.5; others 0 / 1e-12 = 0.
  out = _run(merging.pcb(ratio=0.5), {"w": x})["w"]
  np.testing.assert_allclose(out, [0.0, 0.0, 0.0, 1.5], rtol=1e-5)
  np.testing.assert_allclose(out, pcb_reference(x.astype(np.float64), 0.5), rtol=1e-5)


def test_pcb_matches_reference_on_random_trees():
  rng = np.random.default_rng(2)
  tree = {"a": rng.standard_normal((3, 70, 520)) * 0.01, "b": rng.laplace(size=(3, 300)) * 0.02}
  tree = jax.tree.map(lambda v: v.astype(np.float32), tree)
  out = _run(merging.pcb(ratio=0.1, scale=0.5), tree)
  flat = np.concatenate([np.asarray(v, np.float64).reshape(3, -1) for v in tree.values()], 1)
  ref = 0.5 * pcb_reference(flat, 0.1)
  got = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"]).ravel()])
  # Scores within float32 rounding of the cut may flip in or out; nothing else may differ.
  close = np.isclose(got, ref, rtol=1e-4, atol=1e-7)
  assert close.mean() > 0.999


@pytest.mark.parametrize("hp,match", [({"ratio": 0}, "ratio"), ({"ratio": 2}, "ratio"),
                                      ({"scale": "big"}, "scale")])
def test_pcb_bad_hparams(hp, match):
  with pytest.raises(ValueError, match=match):
    merging.get("pcb", **hp)


@pytest.mark.parametrize("name,hp,match", [
    ("dare", {"p": 1.0}, r"p .*\[0, 1\)"), ("dare", {"p": -0.1}, r"p "),
    ("dare", {"rescale": 1}, "rescale"), ("dare_ties", {"p": float("nan")}, "p "),
    ("lines", {"alpha": float("inf")}, "alpha"), ("lines", {"num_layers": 0}, "num_layers"),
    ("ties", {"per_leaf": "yes"}, "per_leaf")])
def test_more_bad_hparams(name, hp, match):
  with pytest.raises(ValueError, match=match):
    merging.get(name, **hp)
