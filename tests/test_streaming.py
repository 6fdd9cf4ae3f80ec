"""Merges streamed from checkpoints leaf by leaf: exact statistics, bounded reads, same result as in memory."""
import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from research import checkpoints
from research import streaming
from research import task_vectors

try:  # Built concurrently; the merge tests need its registry.
  from research import merging
  HAVE_MERGING = hasattr(merging, "get")
except ImportError:
  HAVE_MERGING = False
needs_merging = pytest.mark.skipif(not HAVE_MERGING, reason="research.merging not available")


# --- exact streamed top-k ----------------------------------------------------


def _chunks_of(stacked: dict, split: int):
  """A `read_taus` factory yielding the leaves `split` at a time."""
  items = list(stacked.items())
  return lambda: iter([dict(items[i:i + split]) for i in range(0, len(items), split)])


def _kth_by_sort(stacked: dict, k):
  flat = np.concatenate([np.abs(x.astype(np.float32)).reshape(x.shape[0], -1)
                         for x in stacked.values()], axis=1)
  return np.array([np.sort(row)[::-1][kt - 1] for row, kt in zip(flat, k)], np.float32)


def test_stream_kth_by_hand():
  stacked = {"a": np.array([[3.0, -1.0], [0.5, 0.5]], np.float32),
             "b": np.array([[-2.0, 0.0, 7.0], [-0.5, 4.0, 0.0]], np.float32)}
  # Task 0: |x| = 3 1 2 0 7 -> 2nd largest 3; task 1: 0.5 0.5 0.5 4 0 -> 3rd largest 0.5.
  got = streaming.stream_kth_largest_abs(_chunks_of(stacked, 1), 2, np.array([2, 3]))
  np.testing.assert_array_equal(got, np.array([3.0, 0.5], np.float32))
  with pytest.raises(ValueError, match="outside"):
    streaming.stream_kth_largest_abs(_chunks_of(stacked, 1), 2, np.array([6, 1]))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(1, 40), min_size=1, max_size=4), st.integers(0, 2**31),
       st.floats(0.01, 1.0), st.booleans())
def test_stream_kth_equals_sorting(tasks, sizes, seed, density, coarse):
  rng = np.random.default_rng(seed)
  # Coarse values force many ties at the threshold.
  draw = (lambda s: rng.integers(-3, 4, s).astype(np.float32)) if coarse else (
      lambda s: rng.standard_normal(s).astype(np.float32) * 10.0 ** rng.integers(-8, 8))
  stacked = {f"l{i}": draw((tasks, n)) for i, n in enumerate(sizes)}
  n = sum(sizes)
  k = np.array([max(1, int(np.ceil(density * n)))] * tasks)
  got = streaming.stream_kth_largest_abs(_chunks_of(stacked, 2), tasks, k)
  np.testing.assert_array_equal(got, _kth_by_sort(stacked, k))


def test_stream_kth_equals_merging_selection():
  from research.merging import selection  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  stacked = {"w": rng.standard_normal((3, 64, 48)).astype(np.float32),
             "b": rng.standard_normal((3, 48)).astype(np.float32)}
  n = 64 * 48 + 48
  for density in (0.013,):
    k = np.full(3, selection.topk_count(n, density))
    expected = np.asarray(selection.topk_threshold(stacked, density))
    got = streaming.stream_kth_largest_abs(_chunks_of(stacked, 1), 3, k)
    np.testing.assert_array_equal(got, expected)


# --- chunking and writers ----------------------------------------------------


def test_chunk_leaves_respects_the_budget():
  spec = {"a": jax.ShapeDtypeStruct((10,), np.float32), "b": jax.ShapeDtypeStruct((10,), np.float32),
          "big": jax.ShapeDtypeStruct((100,), np.float32), "c": jax.ShapeDtypeStruct((5,), np.int8)}
  assert streaming.chunk_leaves(spec, 80) == [["a", "b"], ["big"], ["c"]]
  assert streaming.chunk_leaves(spec, 1 << 20) == [["a", "b", "big", "c"]]


def test_orbax_writer_commits_a_step_readable_by_checkpoints(tmp_path):
  w = streaming.OrbaxWriter(str(tmp_path / "out"), step=3)
  w.write({"enc/w": np.ones((2, 3), np.float32), "enc/b": np.zeros(3, np.float32)})
  assert checkpoints.Checkpointer(tmp_path / "out", read_only=True).latest_step() is None
  w.write({"head/w": np.arange(4, dtype=np.int32)})
  w.commit({"method": "x"})
  tree, meta = checkpoints.restore(tmp_path / "out")
  assert meta == {"method": "x"}
  np.testing.assert_array_equal(tree["enc"]["w"], np.ones((2, 3)))
  np.testing.assert_array_equal(tree["head"]["w"], np.arange(4))
  assert checkpoints.restore_leaves(tmp_path / "out", 3, ["enc/b"])["enc/b"].shape == (3,)
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["3"]  # Staging is gone.
  with pytest.raises(FileExistsError, match="never overwritten"):
    streaming.OrbaxWriter(str(tmp_path / "out"), step=3)


def test_safetensors_writer_streams_in_spec_order(tmp_path):
  leaves = {"a/w": np.arange(6, dtype=np.float32).reshape(2, 3), "a/i": np.array([1, 2], np.int32),
            "z": np.array(3.5, np.float64)}
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in leaves.items()}
  w = streaming.SafetensorsWriter(str(tmp_path / "m.safetensors"), spec, {"method": "ties"})
  w.write({"a/w": leaves["a/w"]})
  with pytest.raises(ValueError, match="spec order"):
    w.write({"z": leaves["z"]})
  w.write({"a/i": leaves["a/i"], "z": leaves["z"]})
  w.commit()
  back = safetensors.numpy.load_file(str(tmp_path / "m.safetensors"))
  for k, v in leaves.items():
    np.testing.assert_array_equal(back[k], v)
    assert back[k].dtype == v.dtype


# --- whole merges ------------------------------------------------------------


def _model(rng):
  return {"enc": {"w": rng.standard_normal((32, 16)).astype(np.float32),
                  "b": rng.standard_normal(16).astype(np.float32)},
          "head": {"w": rng.standard_normal((16, 8)).astype(np.float32),
                   "ids": np.arange(8, dtype=np.int32)}}


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory):
  """params0 saved bare, fine-tuned models saved inside a TrainState-like tree (prefix 'params/')."""
  root = tmp_path_factory.mktemp("ckpts")
  rng = np.random.default_rng(0)
  params0 = _model(rng)
  finetuned = []
  with checkpoints.Checkpointer(root / "params0") as c:
    c.save(0, params0)
  for t in range(3):
    ft = jax.tree.map(lambda x, t=t: x + (rng.standard_normal(x.shape) * (t + 1) * 0.1).astype(
        x.dtype) if x.dtype == np.float32 else x + 1, params0)
    finetuned.append(ft)
    with checkpoints.Checkpointer(root / f"task{t}") as c:
      c.save(7, {"step": np.int32(7), "params": ft, "opt_state": {"mu": ft}})
  return root, params0, finetuned


def _in_memory(method, hparams, params0, finetuned):
  """The merge in memory, of the floating leaves (integer buffers stay as in params0)."""
  floats = lambda tree: {"enc": tree["enc"], "head": {"w": tree["head"]["w"]}}
  stacked = task_vectors.stack([task_vectors.task_vector(floats(f), floats(params0))
                                for f in finetuned])
  m = merging.get(method, **hparams)
  merged = task_vectors.apply(floats(params0), m.apply(m.init(stacked), stacked))
  merged["head"]["ids"] = params0["head"]["ids"]
  return jax.tree.map(np.asarray, merged)


@needs_merging
@pytest.mark.parametrize("method,hparams", [("task_arithmetic", {"scale": 0.4}),
                                            ("ties", {"density": 0.2, "scale": 1.0})])
def test_streamed_merge_equals_in_memory_merge(three_tasks, tmp_path, monkeypatch, method, hparams):
  root, params0, finetuned = three_tasks
  reads = []
  real = streaming.Source.read

  def counting(self, paths):
    out = real(self, paths)
    reads.append(sum(x.nbytes for x in out.values()))
    return out

  monkeypatch.setattr(streaming.Source, "read", counting)
  budget = 32 * 16 * 4  # One enc/w leaf per chunk: four chunks.
  stats = streaming.merge_checkpoints(
      method, str(root / "params0"), [str(root / f"task{t}") for t in range(3)],
      str(tmp_path / "merged"), hparams=hparams, prefix="params/", params0_prefix="",
      max_chunk_bytes=budget, safetensors_path=str(tmp_path / "merged.safetensors"))
  assert stats["chunks"] == 3 and stats["tasks"] == 3
  assert stats["passes"] == (3 if method == "ties" else 1)
  assert max(reads) <= budget  # Never more than one chunk of one checkpoint per read.
  assert len(reads) == stats["passes"] * stats["chunks"] * 4

  expected = _in_memory(method, hparams, params0, finetuned)
  merged, meta = checkpoints.restore(tmp_path / "merged")
  assert meta["method"] == method and meta["hparams"] == hparams
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               merged, expected)
  np.testing.assert_array_equal(merged["head"]["ids"], params0["head"]["ids"])  # Frozen leaf.
  st_back = safetensors.numpy.load_file(str(tmp_path / "merged.safetensors"))
  np.testing.assert_array_equal(st_back["enc/w"], merged["enc"]["w"])


@needs_merging
def test_streamed_merge_rejects_mismatched_checkpoints(three_tasks, tmp_path):
  root, _, _ = three_tasks
  with pytest.raises(ValueError, match="missing leaves"):
    streaming.merge_checkpoints("task_arithmetic", str(root / "params0"), [str(root / "task0")],
                                str(tmp_path / "m"), prefix="")  # Forgot 'params/'.
  with pytest.raises(KeyError, match="no leaves under prefix 'parms/'"):
    streaming.merge_checkpoints("task_arithmetic", str(root / "params0"), [str(root / "task0")],
                                str(tmp_path / "m"), prefix="parms/", params0_prefix="")
