"""Merges straight from Orbax checkpoints, leaf by leaf, for task vectors larger than memory.

`merge_checkpoints(method, params0_dir, finetuned_dirs, out_dir)` never holds
more than one *chunk* of leaves (about `max_chunk_bytes` per task) of the
pre-trained model and of every fine-tuned model at once:

  1. shapes first: the leaf paths, shapes and dtypes of every checkpoint are
     read from Orbax metadata and checked against each other;
  2. global statistics (a `Merge.init` that reduces over all leaves, e.g. the
     TIES top-k threshold over the whole task vector) are computed by
     streaming passes over the chunks; methods whose `init` reads only
     shapes skip this;
  3. per chunk: the leaves are read with `checkpoints.restore_leaves`
     (partial restore), stacked as task vectors `finetuned - params0`
     (the `task` axis first), merged with the method's leaf-local `apply`,
     added to `params0` and written out.

Peak memory is therefore about (tasks + 3) x chunk, not tasks x model. The
merged model is written as one Orbax checkpoint step in the layout of
`research.checkpoints` (`<out_dir>/<step>/state` + `meta`), added chunk by
chunk with Orbax's partial save (`orbax.checkpoint.experimental.v1.partial`)
and committed at the end by a rename, so a killed merge leaves no step
behind. Optionally the same leaves go to a safetensors file, written
incrementally (its header is known from the shapes up front).

Exact top-k in a stream (TIES): the k-th largest |tau| of a task is found
with two histogram passes over the uint32 bit patterns of |tau| (monotone
in the value): the top 16 bits first, then the low 16 bits inside the one
bucket that holds the k-th entry. The result is the same float32 value
`research.merging.selection.topk_threshold` computes in memory.

>>> merge_checkpoints('ties', 'ckpt/params0', ['ckpt/mnli', 'ckpt/qqp'], 'ckpt/merged',
...                   hparams={'density': 0.2}, prefix='params/')   # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import struct
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from research import checkpoints

Chunk = list[str]

# Methods whose `init` reads only shapes (never values): it can run on each chunk.
LEAF_LOCAL = ("task_arithmetic", "average")


# ----------------------------------------------------------------------------- reading

def _leaf_name(path) -> str:
  """'a/0/b' for a key path of an Orbax metadata tree (the names `Checkpointer.leaf_paths` uses)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class Source:
  """Leaves under `prefix` of step `step` (None: latest) of one `research.checkpoints` directory.

  Keeps one Orbax `CheckpointManager` open and reads the checkpoint's
  metadata once. (`checkpoints.restore_leaves` reopens the checkpoint and
  rereads its metadata on every call; Orbax keeps ~1.7 MB of each metadata
  read alive, which over the thousands of reads of a streamed merge grew a
  benchmark run by gigabytes.) Each `read` is the same partial restore:
  every other leaf is an Orbax placeholder and is not read. Call `close()`.
  """

  def __init__(self, directory: str, prefix: str = "", step: Optional[int] = None):
    self.directory, self.prefix, self.step = str(directory), prefix, step
    self._manager = None
    self._metadata = None

  def _open(self):
    if self._manager is None:
      import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
      with checkpoints.Checkpointer(self.directory, read_only=True) as ckpt:
        steps = ckpt.all_steps()
      if not steps or (self.step is not None and self.step not in steps):
        raise FileNotFoundError(f"No complete checkpoint{'' if self.step is None else f' step {self.step}'} "
                                f"in {self.directory} (steps: {steps or 'none'}).")
      self.step = steps[-1] if self.step is None else self.step
      self._manager = ocp.CheckpointManager(
          epath.Path(self.directory), options=ocp.CheckpointManagerOptions(create=False),
          item_handlers={checkpoints.STATE: ocp.PyTreeCheckpointHandler(),
                         checkpoints.META: ocp.JsonCheckpointHandler()})
      tree = self._manager.item_metadata(self.step)[checkpoints.STATE]
      self._metadata = getattr(tree, "tree", tree)
    return self._manager, self._metadata

  def spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """{relative leaf path: shape and dtype}, in checkpoint order."""
    _, metadata = self._open()
    paths = {_leaf_name(path): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
             for path, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    out = {p[len(self.prefix):]: s for p, s in paths.items() if p.startswith(self.prefix)}
    if not out:
      raise KeyError(f"Checkpoint {self.directory} has no leaves under prefix {self.prefix!r}; "
                     f"it has e.g. {list(paths)[:4]}. Set the prefix (e.g. 'params/' for a "
                     "fine-tuning checkpoint's TrainState).")
    return out

  def read(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """{path: numpy array} of the given leaves only."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    manager, metadata = self._open()
    wanted = {self.prefix + p for p in paths}

    def target(path, m):
      if _leaf_name(path) not in wanted:
        return ocp.PLACEHOLDER, ocp.PLACEHOLDER
      return (jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
              ocp.RestoreArgs(restore_type=np.ndarray))

    pairs = jax.tree_util.tree_map_with_path(target, metadata)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2
    item = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    args = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    restored = manager.restore(self.step, args=ocp.args.Composite(**{
        checkpoints.STATE: ocp.args.PyTreeRestore(item=item, restore_args=args)}))
    flat = {_leaf_name(path): x for path, x in
            jax.tree_util.tree_flatten_with_path(restored[checkpoints.STATE])[0]}
    return {p: np.asarray(flat[self.prefix + p]) for p in paths}

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None


def _check_sources(params0: Source, finetuned: Sequence[Source]) -> dict[str, jax.ShapeDtypeStruct]:
  spec = params0.spec()
  for src in finetuned:
    other = src.spec()
    missing, extra = sorted(set(spec) - set(other)), sorted(set(other) - set(spec))
    if missing or extra:
      raise ValueError(f"Checkpoint {src.directory} (prefix {src.prefix!r}) does not match "
                       f"params0 {params0.directory}: missing leaves {missing[:5]}, extra leaves "
                       f"{extra[:5]}. Fix the prefixes or pass checkpoints of the same model.")
    for p, s in spec.items():
      if (other[p].shape, other[p].dtype) != (s.shape, s.dtype):
        raise ValueError(f"Leaf {p!r}: {src.directory} has {other[p].shape} {other[p].dtype}, "
                         f"params0 has {s.shape} {s.dtype}; pass checkpoints of the same model.")
  return spec


def chunk_leaves(spec: Mapping[str, jax.ShapeDtypeStruct], max_chunk_bytes: int) -> list[Chunk]:
  """Consecutive leaves grouped up to `max_chunk_bytes` (a larger leaf is a chunk of its own)."""
  chunks, current, size = [], [], 0
  for path, s in spec.items():
    nbytes = math.prod(s.shape) * np.dtype(s.dtype).itemsize
    if current and size + nbytes > max_chunk_bytes:
      chunks.append(current)
      current, size = [], 0
    current.append(path)
    size += nbytes
  if current:
    chunks.append(current)
  return chunks


def _floating(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)


def read_chunk(params0: Source, finetuned: Sequence[Source], paths: Chunk
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(params0 leaves, stacked task vectors [T, ...]) of one chunk.

  One fine-tuned checkpoint is held at a time: its difference to params0
  goes straight into the preallocated stack. Non-floating leaves give
  zeros, as in `task_vectors.task_vector`.
  """
  p0 = params0.read(paths)
  stacked = {p: np.zeros((len(finetuned),) + x.shape, x.dtype) for p, x in p0.items()}
  for t, src in enumerate(finetuned):
    ft = src.read(paths)
    for p in paths:
      if _floating(p0[p].dtype):
        np.subtract(ft[p], p0[p], out=stacked[p][t])
    del ft
  return p0, stacked


# ------------------------------------------------------------------ streamed statistics

def _abs_keys(x: np.ndarray) -> np.ndarray:
  """uint32 keys ordered like |x| (as `merging.selection.abs_key`)."""
  return np.abs(x.astype(np.float32, copy=False)).view(np.uint32)


def _locate(hist: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per task: the bucket holding the k-th largest key, and how many keys lie above it."""
  above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]        # above[t, b] = #keys in buckets >= b
  bucket = np.sum(above >= k[:, None], axis=1) - 1         # the last bucket with >= k at or above
  strictly_above = np.where(bucket + 1 < hist.shape[1],
                            above[np.arange(len(k)), np.minimum(bucket + 1, hist.shape[1] - 1)], 0)
  return bucket.astype(np.uint32), strictly_above


def _histogram(read_taus, num_tasks: int, bucket_of) -> np.ndarray:
  """int64 [T, 2^16]: counts of `bucket_of(t, keys of task t)` over every streamed leaf."""
  hist = np.zeros((num_tasks, 1 << 16), np.int64)
  for chunk in read_taus():
    for path in list(chunk):
      x = chunk.pop(path)  # Freed leaf by leaf: at most one chunk is alive.
      for t in range(num_tasks):
        buckets = bucket_of(t, _abs_keys(x[t]).ravel())
        hist[t] += np.bincount(buckets, minlength=1 << 16)
        del buckets
      del x
  return hist


def stream_kth_largest_abs(read_taus: Callable[[], Iterator[dict[str, np.ndarray]]],
                           num_tasks: int, k: np.ndarray) -> np.ndarray:
  """float32 [T]: the k[t]-th largest |entry| of task t over every leaf `read_taus()` yields.

  `read_taus` is called twice (two streaming passes); each call yields
  chunks `{path: stacked leaf [T, ...]}` of floating leaves. Exact.
  """
  k = np.asarray(k, np.int64).reshape(num_tasks)
  hist = _histogram(read_taus, num_tasks, lambda t, keys: keys >> 16)
  n = hist.sum(axis=1)
  if np.any(k < 1) or np.any(k > n):
    raise ValueError(f"k={k.tolist()} is outside [1, {n.tolist()}] (entries per task).")
  high, above = _locate(hist, k)
  hist = _histogram(read_taus, num_tasks,
                    lambda t, keys: keys[(keys >> 16) == high[t]] & 0xFFFF)
  low, _ = _locate(hist, k - above)
  return ((high << 16) | low).astype(np.uint32).view(np.float32)


# ----------------------------------------------------------------------------- writing

def _nest(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  out: dict = {}
  for path, x in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


class OrbaxWriter:
  """Writes one `research.checkpoints` step chunk by chunk (Orbax partial save), then commits.

  The step is assembled in a hidden staging directory beside it and renamed
  into place only after its metadata is written, so readers never see a
  partial merge and a killed merge leaves only the staging directory (which
  the next writer replaces).
  """

  def __init__(self, directory: str, step: int = 0):
    from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=import-outside-toplevel
    self._partial = partial
    self.directory = epath.Path(directory)
    self.final = self.directory / str(int(step))
    if self.final.exists():
      raise FileExistsError(f"{self.final} exists already; merge into a new directory or step, "
                            "or delete it first (checkpoints are never overwritten).")
    # Not hidden (Orbax globs the partial-save versions with '*'), not a step name.
    self.staging = self.directory / f"tmp-streaming-merge-{int(step)}"
    if self.directory.exists():
      for stale in self.directory.glob(f"tmp-streaming-merge-{int(step)}*"):
        shutil.rmtree(stale)  # Left by a killed merge; ours is the only writer.
    self.directory.mkdir(parents=True, exist_ok=True)

  def write(self, leaves: Mapping[str, np.ndarray]) -> None:
    self._partial.save(str(self.staging), _nest(leaves))

  def commit(self, metadata: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._partial.finalize(str(self.staging))
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
        self.staging / checkpoints.META, args=ocp.args.JsonSave(dict(metadata)))
    self.staging.rename(self.final)


_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


class SafetensorsWriter:
  """Writes a safetensors file leaf by leaf: the header is known from the shapes up front."""

  def __init__(self, path: str, spec: Mapping[str, jax.ShapeDtypeStruct],
               metadata: Optional[Mapping[str, str]] = None):
    header: dict[str, Any] = {}
    offset = 0
    for name, s in spec.items():
      dtype = np.dtype(s.dtype).name
      if dtype not in _SAFETENSORS_DTYPES:
        raise TypeError(f"Leaf {name!r} has dtype {dtype}, which safetensors cannot store.")
      nbytes = math.prod(s.shape) * np.dtype(s.dtype).itemsize
      header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(s.shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    self._order = list(spec)
    self._next = 0
    self._tmp = f"{path}.tmp"
    self._path = path
    self._file = open(self._tmp, "wb")  # pylint: disable=consider-using-with
    self._file.write(struct.pack("<Q", len(text)) + text)

  def write(self, leaves: Mapping[str, np.ndarray]) -> None:
    for name, x in leaves.items():
      if self._order[self._next] != name:
        raise ValueError(f"Leaves must be written in spec order: expected "
                         f"{self._order[self._next]!r}, got {name!r}.")
      self._file.write(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
      self._next += 1

  def commit(self) -> None:
    if self._next != len(self._order):
      raise ValueError(f"Only {self._next} of {len(self._order)} leaves were written.")
    self._file.close()
    os.replace(self._tmp, self._path)


# ----------------------------------------------------------------------------- merging

def peak_rss_gb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _global_coeffs(method: str, hparams: Mapping[str, Any], merge, taus: Callable,
                   spec: Mapping[str, jax.ShapeDtypeStruct], num_tasks: int):
  """`coeffs_for(stacked_chunk)`: the method's `init` result, valid for any chunk."""
  if method in LEAF_LOCAL:
    return lambda stacked: merge.init(stacked), 0
  if method in STREAMED_INIT:
    return STREAMED_INIT[method](hparams, merge, taus, spec, num_tasks)
  raise NotImplementedError(
      f"Merge method {method!r} has global statistics that have no streaming pass yet; "
      f"streamable methods: {sorted(LEAF_LOCAL + tuple(STREAMED_INIT))}. Merge in memory with "
      "research.merging, or add a pass to research.streaming.STREAMED_INIT.")


def _ties_init(hparams, merge, taus, spec, num_tasks):
  """TIES' trim threshold over the whole task vector, by two streamed histogram passes."""
  from research import merging  # pylint: disable=import-outside-toplevel
  from research.merging import selection  # pylint: disable=import-outside-toplevel
  hp = {**merging.defaults("ties"), **hparams}
  if hp["per_leaf"]:  # One threshold per leaf: init is leaf-local.
    return lambda stacked: merge.init(stacked), 0
  n = sum(math.prod(s.shape) for s in spec.values() if _floating(s.dtype))
  k = np.full(num_tasks, selection.topk_count(n, hp["density"]))
  threshold = jnp.asarray(stream_kth_largest_abs(taus, num_tasks, k))
  # ties = chain(trim, disjoint_mean, scale): only trim has coeffs, the threshold.
  coeffs = ({"threshold": threshold}, (), ())
  checked = []

  def coeffs_for(stacked):
    if checked:
      return coeffs
    checked.append(True)
    expected = jax.eval_shape(merge.init, stacked)
    got = jax.eval_shape(lambda: coeffs)
    if jax.tree.structure(expected) != jax.tree.structure(got) or jax.tree.leaves(
        expected)[0].shape != (num_tasks,):
      raise NotImplementedError(
          f"research.merging.ties' coeffs changed to {expected}; update "
          "research.streaming._ties_init to build them from the streamed threshold.")
    return coeffs

  return coeffs_for, 2


# Method name -> fn(hparams, merge, taus, spec, num_tasks) -> (coeffs_for, streaming passes).
STREAMED_INIT: dict[str, Callable] = {"ties": _ties_init}


def merge_checkpoints(method: str, params0: str | Source, finetuned: Sequence[str | Source],
                      out_dir: str, *, hparams: Optional[Mapping[str, Any]] = None,
                      prefix: str = "", params0_prefix: Optional[str] = None, step: int = 0,
                      max_chunk_bytes: int = 64 << 20, safetensors_path: Optional[str] = None,
                      log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
  """Merges the task vectors of `finetuned` around `params0` without loading whole models.

  Args:
    method: a `research.merging` method name ('task_arithmetic', 'ties', ...).
    params0: the pre-trained checkpoint directory (or a `Source`).
    finetuned: one checkpoint directory (or `Source`) per task.
    out_dir: where the merged params are written as step `step`.
    hparams: the method's hyper-parameters (`merging.get(method, **hparams)`).
    prefix: the params' path inside the fine-tuned checkpoints, e.g.
      'params/' for `train.finetune`'s TrainState checkpoints.
    params0_prefix: the same for params0 (default: `prefix`).
    max_chunk_bytes: bytes of one task's share of a chunk; peak memory is
      about (tasks + 3) x this (or the largest leaf, if larger).
    safetensors_path: also write the merged params there.
    log: progress messages (e.g. `print`).
  Returns:
    Figures of the run: leaves, chunks, passes over the inputs, bytes read,
    wall time and peak resident memory.
  """
  from research import merging  # pylint: disable=import-outside-toplevel
  start = time.time()
  hparams = dict(hparams or {})
  merge = merging.get(method, **hparams)
  p0_src = params0 if isinstance(params0, Source) else Source(
      str(params0), prefix if params0_prefix is None else params0_prefix)
  ft_src = [s if isinstance(s, Source) else Source(str(s), prefix) for s in finetuned]
  if not ft_src:
    raise ValueError("merge_checkpoints needs at least one fine-tuned checkpoint.")
  try:
    return _merge(method, hparams, merge, p0_src, ft_src, out_dir, prefix, step,
                  max_chunk_bytes, safetensors_path, log, start)
  finally:
    for src in (p0_src, *ft_src):
      src.close()


def _merge(method, hparams, merge, p0_src, ft_src, out_dir, prefix, step, max_chunk_bytes,
           safetensors_path, log, start):
  from research import task_vectors  # pylint: disable=import-outside-toplevel
  spec = _check_sources(p0_src, ft_src)
  chunks = chunk_leaves(spec, max_chunk_bytes)
  num_tasks = len(ft_src)
  bytes_per_pass = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                       for s in spec.values()) * (num_tasks + 1)

  def taus():
    for paths in chunks:
      _, stacked = read_chunk(p0_src, ft_src, paths)
      # The consumer pops leaves from this dict; no other reference keeps them alive.
      floating = {p: stacked.pop(p) for p in paths if _floating(spec[p].dtype)}
      del stacked
      yield floating

  coeffs_for, stat_passes = _global_coeffs(method, hparams, merge, taus, spec, num_tasks)
  log(f"{method}: {len(spec)} leaves in {len(chunks)} chunks; {stat_passes} statistics passes "
      f"done after {time.time() - start:.1f} s")

  # Chunks go in as lists (no leaf names), so chunks of equal shapes share one compilation.
  @jax.jit
  def merged_params(p0, stacked, coeffs):
    return task_vectors.apply(p0, merge.apply(coeffs, stacked))

  writer = OrbaxWriter(out_dir, step)
  st_writer = None
  if safetensors_path:
    st_writer = SafetensorsWriter(safetensors_path, spec, {"method": method})
  for i, paths in enumerate(chunks):
    p0, stacked = read_chunk(p0_src, ft_src, paths)
    # Integer / bool buffers are frozen (task_vectors' policy): params0's value is kept.
    floating = [p for p in paths if _floating(spec[p].dtype)]
    out = dict(p0)
    if floating:
      chunk = [stacked.pop(p) for p in floating]
      new = merged_params([p0[p] for p in floating], chunk, coeffs_for(chunk))
      del chunk
      out.update({p: np.asarray(x) for p, x in zip(floating, new)})
      del new
    del stacked
    writer.write(out)
    if st_writer is not None:
      st_writer.write(out)
    del p0, out
    log(f"chunk {i + 1}/{len(chunks)} merged ({time.time() - start:.1f} s)")
  metadata = {"method": method, "hparams": hparams, "params0": p0_src.directory,
              "finetuned": [s.directory for s in ft_src], "prefix": prefix}
  writer.commit(metadata)
  if st_writer is not None:
    st_writer.commit()
  wall = time.time() - start
  return {"leaves": len(spec), "chunks": len(chunks), "tasks": num_tasks,
          "passes": stat_passes + 1, "bytes_read": bytes_per_pass * (stat_passes + 1),
          "wall_s": wall, "peak_rss_gb": peak_rss_gb(), "out": str(writer.final)}
