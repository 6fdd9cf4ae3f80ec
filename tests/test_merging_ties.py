"""TIES-Merging: a worked example by hand and a brute-force numpy reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import merging
from research.merging import selection

# Three tasks, two leaves, n = 6 entries per task.
HAND = {
    "a": np.array([[4.0, -1.0, 0.5, 2.0],
                   [-2.0, 3.0, 1.0, -0.5],
                   [1.0, 2.0, -3.0, 5.0]], np.float32),
    "b": np.array([[-3.0, 0.1],
                   [1.5, -4.0],
                   [0.2, -0.1]], np.float32),
}


def _run(method, stacked):
  return jax.jit(lambda s: method.apply(method.init(s), s))(stacked)


def test_worked_example_global_threshold():
  # density 0.5 -> k = ceil(0.5 * 6) = 3 entries kept per task, over both leaves.
  #   task 0 |.| = 4, 1, .5, 2 | 3, .1   -> 3rd largest 2 -> a = [4, 0, 0, 2],  b = [-3, 0]
  #   task 1 |.| = 2, 3, 1, .5 | 1.5, 4  -> 3rd largest 2 -> a = [-2, 3, 0, 0], b = [0, -4]
  #   task 2 |.| = 1, 2, 3, 5  | .2, .1  -> 3rd largest 2 -> a = [0, 2, -3, 5], b = [0, 0]
  # mass a = [4-2, 3+2, -3, 2+5] = [2, 5, -3, 7] -> signs [+, +, -, +]; mass b = [-3, -4].
  # disjoint means: a = [4/1, (3+2)/2, -3/1, (2+5)/2]; b = [-3/1, -4/1].
  out = _run(merging.ties(density=0.5), HAND)
  np.testing.assert_array_equal(out["a"], [4.0, 2.5, -3.0, 3.5])
  np.testing.assert_array_equal(out["b"], [-3.0, -4.0])
  # The trim stage on its own.
  thr = jax.jit(merging.trim(0.5).init)(HAND)["threshold"]
  np.testing.assert_array_equal(thr, [2.0, 2.0, 2.0])


def test_worked_example_per_leaf_threshold():
  # per leaf: k = ceil(0.5 * 4) = 2 in a, ceil(0.5 * 2) = 1 in b.
  #   a: task 0 keeps 4, 2; task 1 keeps -2, 3; task 2 keeps -3, 5 (2nd largest is 3)
  #   b: task 0 keeps -3; task 1 keeps -4; task 2 keeps 0.2
  # mass a = [4-2, 3, -3, 2+5] = [2, 3, -3, 7]; mass b = [-3+0.2, -4] = [-2.8, -4].
  # a = [4, 3, -3, (2+5)/2]; b: task 2's 0.2 disagrees with the elected minus -> [-3, -4].
  out = _run(merging.ties(density=0.5, per_leaf=True, scale=2.0), HAND)
  np.testing.assert_array_equal(out["a"], 2.0 * np.array([4.0, 3.0, -3.0, 3.5]))
  np.testing.assert_array_equal(out["b"], 2.0 * np.array([-3.0, -4.0]))


def test_no_agreeing_task_gives_zero():
  stacked = {"w": np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)}   # masses 0 and 0
  np.testing.assert_array_equal(_run(merging.ties(density=1.0), stacked)["w"], [0.0, 0.0])


def ties_reference(stacked, density, scale=1.0, per_leaf=False):
  """Brute force: concatenate, sort, threshold, elect, disjoint mean."""
  leaves, treedef = jax.tree.flatten(stacked)
  t = leaves[0].shape[0]
  flat = [np.asarray(x, np.float64).reshape(t, -1) for x in leaves]
  groups = [[f] for f in flat] if per_leaf else [flat]
  trimmed = []
  for group in groups:
    cat = np.concatenate(group, axis=1)
    k = selection.topk_count(cat.shape[1], density)
    thr = -np.sort(-np.abs(cat), axis=1)[:, k - 1:k]
    trimmed += [np.where(np.abs(f) >= thr, f, 0.0) for f in group]
  out = []
  for x, tr in zip(leaves, trimmed):
    gamma = np.sign(tr.sum(0))
    agree = (tr != 0) & (np.sign(tr) == gamma)
    merged = np.where(agree, tr, 0).sum(0) / np.maximum(agree.sum(0), 1)
    out.append((scale * merged).reshape(x.shape[1:]))
  return jax.tree.unflatten(treedef, out)


def _random_tree(seed):
  rng = np.random.default_rng(seed)
  tree = {
      "embed": rng.standard_normal((5, 70, 520)),          # folded (> 32k entries per task)
      "blocks": [{"w": rng.standard_normal((5, 12, 31)) * 3, "b": rng.standard_normal((5, 31))}
                 for _ in range(3)],
      "head": rng.laplace(size=(5, 7)),
  }
  if seed % 2:   # plateaus: ties at the threshold
    tree["embed"] = np.round(tree["embed"] * 2) / 2
  return jax.tree.map(lambda x: x.astype(np.float32), tree)


@functools.lru_cache(maxsize=None)
def _jitted(density, per_leaf):
  m = merging.ties(density=density, scale=0.8, per_leaf=per_leaf)
  return jax.jit(lambda s: m.apply(m.init(s), s))


@pytest.mark.parametrize("density,per_leaf", [(0.03, False), (0.2, False), (0.9, True),
                                              (0.2, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_bruteforce_reference(seed, density, per_leaf):
  tree = _random_tree(seed)
  got = _jitted(density, per_leaf)(tree)
  want = ties_reference(tree, density, 0.8, per_leaf)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)


def test_bfloat16_leaves():
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _random_tree(2))
  got = _jitted(0.2, False)(tree)
  want = ties_reference(jax.tree.map(lambda x: np.asarray(x, np.float32), tree), 0.2, 0.8)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      np.asarray(g, np.float32), w, rtol=1e-2, atol=1e-2), got, want)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
