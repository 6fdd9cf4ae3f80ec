"""Empirical neural tangent kernel over inputs, its eigenfunctions and their localization on tasks.

The tangent-space paper (Ortiz-Jimenez et al., NeurIPS 2023) explains
weight disentanglement by the *localization* of the NTK's eigenfunctions: if
every eigenfunction of the kernel at the pre-trained weights lives on the
inputs of one task, a linear edit made for one task cannot move the outputs
on another. This module computes the pieces of that analysis for any
``apply_fn(params, *inputs) -> [B, D]``:

* ``empirical_ntk``: the kernel matrix ``K[i, j]`` over ``N`` inputs;
* ``ntk_matvec``: ``K v`` without forming ``K`` (for Lanczos on large ``N``);
* ``top_eigenpairs``: its leading eigenvalues / eigenvectors;
* ``localization``: the fraction of each eigenvector's energy on each task
  (``chance_localization``: what a random vector would score).

Which kernel (vector outputs)
  The NTK of a model with ``D`` outputs is ``[N D, N D]``. Localization is a
  statement about functions of the *input*, so we use the trace over outputs
  (neural-tangents' ``trace_axes=(-1,)``), an ``[N, N]`` kernel:

      K(x, x') = sum_d <d f_d(x)/d theta, d f_d(x')/d theta> = tr(J(x) J(x')^T).

  It is head-free: the raw (unnormalised) encoder output ``apply_fn``, the
  very function ``research.tangent.linearize`` expands, so it is the kernel of
  the tangent model that linear fine-tuning trains. The full kernel would be
  ``384^2`` times larger and its eigenvectors mix inputs with output axes.

Output sketch
  The exact trace costs one backward pass per input *per output* (``N D``
  passes; 384 per sentence for MiniLM). ``projection`` ``P: [k, D]`` replaces
  ``f`` by ``P f``: the kernel is then ``tr(P J(x) J(x')^T P^T)``, itself an
  exact NTK (of the model ``P f``, so symmetric PSD) and, with
  ``output_projection`` (scaled random orthonormal rows, ``E[P^T P] = I``),
  an unbiased estimate of the trace kernel at ``k / D`` of the cost; ``k = D``
  (or ``projection=None``) is exact.

Formulation (``method``): both cost ``N k`` backward passes for the
Jacobian rows ``J_r(x_i)^T`` (one parameter-sized vector each); they differ in
how the rows meet (Novak et al., "Fast finite width NTK", ICML 2022):
  * ``"jacobian"`` (Jacobian contraction): rows are contracted with each
    other, ``N^2 k P`` flops. Rows are held in a *panel* of as many blocks as
    ``memory_bytes`` allows and the rest streamed past it in blocks, so memory
    is bounded and nothing is recomputed when all rows fit.
  * ``"ntvp"`` (NTK-vector products, the implicit form): each block of rows is
    pushed forward with ``jax.jvp`` through all ``N`` inputs (jvp of vjp),
    ``N^2 k`` forward-mode passes, and only one block of rows is ever held.
  * ``"auto"`` compares the two costs: a contraction costs ``2 P`` flops per
    pair of rows, an NTVP a jvp, about 3 forward passes of one input (XLA's
    cost analysis of ``apply_fn``). A transformer reuses its weights on every
    token, so a forward pass costs far more than ``2 P``: for MiniLM at 32
    tokens a jvp is ~3 x 0.71 GFLOP against 2 x 22.6M flops per contraction,
    and the Jacobian contraction is ~47x cheaper as long as a block of rows
    fits in memory (90 MB per row). NTVP wins for models that are cheap per
    input relative to their size (embedding tables), or when rows do not fit.

>>> import jax, jax.numpy as jnp
>>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"])          # [B, 3] -> [B, 2]
>>> params = {"w": jnp.ones((3, 2)) / 3}
>>> x = jnp.array([[1., 0, 0], [0, 1, 0], [0, 0, 2]])
>>> kernel = empirical_ntk(apply_fn, params, x)
>>> kernel.shape
(3, 3)
>>> eigenvalues, eigenvectors = top_eigenpairs(kernel, 2)
>>> localization(eigenvectors, [0, 0, 1]).sum(-1)        # energy on task 0, task 1
array([1., 1.])
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.task_vectors import is_floating

__all__ = ["output_projection", "empirical_ntk", "ntk_matvec", "choose_method",
           "top_eigenpairs", "localization", "chance_localization", "cosine_normalize"]

PyTree = Any
METHODS = ("auto", "jacobian", "ntvp")


def output_projection(key: jax.Array, dim: int, k: int) -> jax.Array:
  """``[k, dim]`` random orthonormal rows scaled by ``sqrt(dim / k)``, so ``E[P^T P] = I``.

  With ``k = dim`` it is orthogonal up to the scale 1, and the sketched kernel
  equals the exact trace kernel.
  """
  if not 1 <= k <= dim:
    raise ValueError(f"output_projection: need 1 <= k <= dim, got k={k}, dim={dim}.")
  q, r = jnp.linalg.qr(jax.random.normal(key, (dim, k), jnp.float32))
  q = q * jnp.sign(jnp.diagonal(r))  # Haar-distributed, not biased by the QR sign convention.
  return math.sqrt(dim / k) * q.T


class _Split:
  """``params`` as (differentiated floating leaves, frozen rest), and back."""

  def __init__(self, params):
    leaves, self.treedef = jax.tree.flatten(params)
    self.floating = [is_floating(x) for x in leaves]
    self.frozen = [None if f else x for f, x in zip(self.floating, leaves)]
    self.diff = [x for f, x in zip(self.floating, leaves) if f]
    self.size = sum(int(np.prod(np.shape(x))) for x in self.diff)

  def merge(self, diff):
    it = iter(diff)
    return jax.tree.unflatten(self.treedef, [next(it) if f else x
                                             for f, x in zip(self.floating, self.frozen)])


def _check_inputs(args) -> int:
  if not args:
    raise ValueError("empirical_ntk needs at least one input array after params, "
                     "e.g. empirical_ntk(apply_fn, params, input_ids, attention_mask).")
  sizes = {int(np.shape(a)[0]) if np.ndim(a) else None for a in args}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"Every input must have the same leading (example) axis; got shapes "
                     f"{[np.shape(a) for a in args]}. Fix: pass arrays [N, ...] for the same "
                     "N inputs.")
  n = sizes.pop()
  if n == 0:
    raise ValueError("empirical_ntk got zero inputs.")
  return n


def _blocks(n: int, batch_size: int):
  return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _take(args, start, stop, batch_size):
  """Rows [start, stop) of every input, padded (repeating the last) to batch_size."""
  out = []
  for a in args:
    a = np.asarray(a)[start:stop]
    if len(a) < batch_size:  # Fixed shapes: one compiled program for every block.
      a = np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), 0)])
    out.append(a)
  return out


class _Kernels:
  """Jitted pieces shared by both formulations; the projection is an argument, not a constant."""

  def __init__(self, apply_fn, split):
    def project(diff, proj, *x):
      out = apply_fn(split.merge(diff), *x)
      out = out.reshape(out.shape[0], -1)
      return out if proj is None else out @ proj.T.astype(out.dtype)

    def one(diff, proj, *x):  # One input -> its projected outputs [k].
      return project(diff, proj, *(a[None] for a in x))[0]

    def rows(diff, proj, *x):
      # J_r(x_i)^T for a block: per leaf [b, k, *leaf], kept as [b, k * leaf_size].
      jac = jax.vmap(jax.jacrev(one), in_axes=(None, None) + (0,) * len(x))(diff, proj, *x)
      return [j.reshape(j.shape[0], -1) for j in jac]

    def contract(rows_a, rows_b):  # sum_r sum_p J_r(x_a)[p] J_r(x_b)[p]
      return sum(a @ b.T for a, b in zip(rows_a, rows_b))

    def push(diff, proj, rows_b, *x):
      # Every row (i, r) of block b pushed forward through the inputs x:
      # [b, k, n, k] outputs, traced over the two output axes -> K[x, i].
      b = rows_b[0].shape[0]
      k = rows_b[0].shape[1] // diff[0].size
      tangents = [r.reshape((b, k) + d.shape) for r, d in zip(rows_b, diff)]
      jvp_row = lambda t: jax.jvp(lambda d: project(d, proj, *x), (diff,), (t,))[1]
      out = jax.vmap(jax.vmap(jvp_row))(tangents)
      return jnp.trace(out, axis1=1, axis2=3).T

    self.rows = jax.jit(rows)
    self.contract = jax.jit(contract)
    self.push = jax.jit(push)


def choose_method(apply_fn: Callable, params: PyTree, *args, projection=None,
                  batch_size: int = 8, memory_bytes: int = 2 ** 31) -> str:
  """``"jacobian"`` or ``"ntvp"``: which formulation is cheaper here (see the module docstring).

  Jacobian contraction needs one panel block plus one streamed block of rows
  in ``memory_bytes``; if that fits it wins when a pair-of-rows contraction
  (``2 P`` flops) is cheaper than a jvp through one input (~3 forward passes).
  """
  n = _check_inputs(args)
  split = _Split(params)
  k = _num_outputs(apply_fn, params, args, projection)
  block_bytes = 4 * min(batch_size, n) * k * split.size
  if 2 * block_bytes > memory_bytes:
    return "ntvp"
  one = [np.asarray(a)[:1] for a in args]
  try:
    cost = jax.jit(apply_fn).lower(params, *one).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    forward_flops = float(cost["flops"])
  except Exception:  # pylint: disable=broad-except  (no cost model: keep the default)
    return "jacobian"
  return "jacobian" if 2 * split.size <= 3 * forward_flops else "ntvp"


def _num_outputs(apply_fn, params, args, projection):
  if projection is not None:
    return int(np.shape(projection)[0])
  one = [jax.ShapeDtypeStruct((1,) + np.shape(a)[1:], np.asarray(a).dtype) for a in args]
  out = jax.eval_shape(apply_fn, params, *one)
  return int(np.prod(out.shape[1:]))


def empirical_ntk(apply_fn: Callable[..., jax.Array], params: PyTree, *args,
                  projection: jax.Array | None = None, method: str = "auto",
                  batch_size: int = 8, memory_bytes: int = 2 ** 31,
                  output_chunk: int | None = None,
                  progress: Callable[[str], None] | None = None) -> np.ndarray:
  """The empirical NTK (trace over outputs) of ``apply_fn`` at ``params`` over ``N`` inputs.

  Args:
    apply_fn: ``apply_fn(params, *args) -> [B, D]`` (trailing output axes are
      flattened; a ``[B]`` output is ``D = 1``). Integer / boolean leaves of
      ``params`` are held fixed (not differentiated).
    params: the expansion point (e.g. the pre-trained ``params0``).
    *args: the inputs, arrays with a leading example axis ``N`` (e.g.
      ``input_ids, attention_mask``), all batched together.
    projection: ``[k, D]`` output sketch (``output_projection``) or None for
      the exact trace over all ``D`` outputs.
    method: ``"jacobian"`` (contraction), ``"ntvp"`` (NTK-vector products)
      or ``"auto"`` (``choose_method``).
    batch_size: inputs per block of Jacobian rows (one compiled program; the
      last block is padded). Memory per block: ``4 batch_size k P`` bytes.
    memory_bytes: how many bytes of Jacobian rows may be held at once
      (the contraction's panel); at least two blocks are always held.
    output_chunk: outputs per pass (default: all ``k``). The trace kernel is a
      sum over outputs, so chunks of the projection's rows (or of the ``D``
      outputs) are computed one after the other and added: memory per block
      shrinks to ``4 batch_size output_chunk P`` bytes, so more inputs fit in
      the panel (fewer rows recomputed) for the same ``memory_bytes``.
    progress: optional callback taking a one-line status string.

  Returns:
    ``float64 [N, N]``: ``K[i, j] = tr(P J(x_i) J(x_j)^T P^T)``, symmetric PSD.

  Example: three inputs of a one-layer model give a ``[3, 3]`` kernel
  (see the module docstring).
  """
  if method not in METHODS:
    raise ValueError(f"Unknown NTK method {method!r}; expected one of {METHODS}.")
  n = _check_inputs(args)
  split = _Split(params)
  d = _num_outputs(apply_fn, params, args, None)
  if projection is not None:
    projection = jnp.asarray(projection)
    if projection.ndim != 2 or projection.shape[1] != d:
      raise ValueError(f"projection must be [k, D] with D={d} (the outputs of apply_fn), "
                       f"got shape {projection.shape}. Fix: output_projection(key, {d}, k).")
  k = d if projection is None else projection.shape[0]
  if output_chunk is not None and output_chunk < 1:
    raise ValueError(f"output_chunk must be a positive int, got {output_chunk}.")
  chunk = k if output_chunk is None else min(output_chunk, k)
  if chunk < k and projection is None:
    projection = jnp.eye(d)
  if method == "auto":
    method = choose_method(apply_fn, params, *args,
                           projection=None if projection is None else projection[:chunk],
                           batch_size=batch_size, memory_bytes=memory_bytes)
  fns = _Kernels(apply_fn, split)
  batch_size = min(batch_size, n)
  kernel = np.zeros((n, n), np.float64)
  log = progress or (lambda _: None)
  for s in range(0, k, chunk):
    proj = None if projection is None else projection[s:s + chunk]
    if proj is not None and proj.shape[0] < chunk:  # Same shapes for every chunk: one compile.
      proj = jnp.concatenate([proj, jnp.zeros((chunk - proj.shape[0], d), proj.dtype)])
    run = _jacobian_contraction if method == "jacobian" else _ntk_vector_products
    kernel += run(fns, split, args, proj, n, batch_size, chunk, memory_bytes, log)
  return (kernel + kernel.T) / 2  # Exact symmetry; rounding differs between the two halves.


def _jacobian_contraction(fns, split, args, proj, n, batch_size, k, memory_bytes, log):
  blocks = _blocks(n, batch_size)
  kernel = np.zeros((n, n), np.float64)
  rows = lambda blk: fns.rows(split.diff, proj, *_take(args, *blk, batch_size))
  block_bytes = 4 * batch_size * k * split.size
  panel = max(1, int(memory_bytes // block_bytes) - 1)  # One block is kept for streaming.
  for p0 in range(0, len(blocks), panel):
    held = [(blk, rows(blk)) for blk in blocks[p0:p0 + panel]]
    for a, (ba, ra) in enumerate(held):
      for bb, rb in held[a:]:
        _fill(kernel, ba, bb, fns.contract(ra, rb))
    for bb in blocks[p0 + panel:]:
      rb = rows(bb)
      for ba, ra in held:
        _fill(kernel, ba, bb, fns.contract(ra, rb))
    log(f"ntk (jacobian contraction): {min(p0 + panel, len(blocks))}/{len(blocks)} blocks")
  return kernel


def _ntk_vector_products(fns, split, args, proj, n, batch_size, k, memory_bytes, log):
  del k, memory_bytes  # One block of rows at a time.
  blocks = _blocks(n, batch_size)
  kernel = np.zeros((n, n), np.float64)
  for i, bb in enumerate(blocks):
    rb = fns.rows(split.diff, proj, *_take(args, *bb, batch_size))
    for ba in blocks:
      cols = np.asarray(fns.push(split.diff, proj, rb, *_take(args, *ba, batch_size)))
      kernel[ba[0]:ba[1], bb[0]:bb[1]] = cols[:ba[1] - ba[0], :bb[1] - bb[0]]
    log(f"ntk (NTK-vector products): {i + 1}/{len(blocks)} blocks")
  return kernel


def _fill(kernel, ba, bb, block):
  block = np.asarray(block, np.float64)[:ba[1] - ba[0], :bb[1] - bb[0]]
  kernel[ba[0]:ba[1], bb[0]:bb[1]] = block
  kernel[bb[0]:bb[1], ba[0]:ba[1]] = block.T


def ntk_matvec(apply_fn: Callable[..., jax.Array], params: PyTree, *args,
               projection: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """``mv(v) -> K v`` for the kernel of ``empirical_ntk``, without forming ``K``.

  ``K v = sum_r J_r (J_r^T v)``: per output ``r`` one vjp over all ``N`` inputs
  and one jvp of the result (the NTK-vector product). Use it with a Lanczos
  solver (``scipy.sparse.linalg.eigsh``) when ``N`` is too large for ``[N, N]``.
  All ``N`` inputs go through the model at once; ``v`` is ``[N]``. ``params``,
  the inputs and the projection are arguments of the compiled function (never
  constants), so they keep their shardings: shard the inputs and ``v`` over a
  mesh's batch axis to spread the work.
  """
  _check_inputs(args)
  split = _Split(params)

  def project(diff, proj, x):
    out = apply_fn(split.merge(diff), *x)
    out = out.reshape(out.shape[0], -1)
    return out if proj is None else out @ proj.T.astype(out.dtype)

  @jax.jit
  def product(diff, proj, x, v):
    out, vjp_fn = jax.vjp(lambda d: project(d, proj, x), diff)

    def per_output(r):
      cot = jnp.zeros_like(out).at[:, r].set(v.astype(out.dtype))
      (tangent,) = vjp_fn(cot)
      return jax.jvp(lambda d: project(d, proj, x), (diff,), (tangent,))[1][:, r]

    return jax.lax.map(per_output, jnp.arange(out.shape[1])).sum(0)

  return lambda v: product(split.diff, projection, tuple(args), v)


def top_eigenpairs(kernel, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Leading eigenvalues ``[k]`` (descending) and unit eigenvectors ``[N, k]`` of a kernel.

  Computed in float64 with ``np.linalg.eigh``; each eigenvector's sign is fixed
  so that its largest-magnitude entry is positive (eigenvectors are defined up
  to sign). ``k=None`` returns all ``N``.
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f"top_eigenpairs expects a square [N, N] kernel, got shape {kernel.shape}.")
  n = kernel.shape[0]
  k = n if k is None else k
  if not 1 <= k <= n:
    raise ValueError(f"top_eigenpairs: need 1 <= k <= N={n}, got k={k}.")
  values, vectors = np.linalg.eigh((kernel + kernel.T) / 2)
  values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
  peak = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(k)]
  return values, vectors * np.where(peak < 0, -1.0, 1.0)


def localization(eigenvectors, groups: Sequence[int], num_groups: int | None = None) -> np.ndarray:
  """``[k, T]``: the fraction of each eigenvector's energy on the inputs of each task.

  The paper's local energy: for a unit eigenvector ``phi`` of the kernel over
  inputs pooled from ``T`` tasks, ``E_t(phi) = sum_{i in task t} phi_i^2 /
  sum_i phi_i^2``. Rows sum to 1. A fully localized eigenfunction has one
  entry 1; a delocalized one spreads like the inputs, ``n_t / N``.

  Args:
    eigenvectors: ``[N, k]`` (columns are eigenvectors), or ``[N]``.
    groups: ``[N]`` task index of each input, in ``0 .. T-1``.
    num_groups: ``T`` (default: ``max(groups) + 1``).
  """
  vectors = np.asarray(eigenvectors, np.float64)
  vectors = vectors[:, None] if vectors.ndim == 1 else vectors
  groups = np.asarray(groups)
  if groups.shape != (vectors.shape[0],):
    raise ValueError(f"groups must give one task index per input: shape ({vectors.shape[0]},), "
                     f"got {groups.shape}.")
  if groups.size and (groups.min() < 0 or not np.issubdtype(groups.dtype, np.integer)):
    raise ValueError("groups must be non-negative integer task indices.")
  t = int(num_groups if num_groups is not None else groups.max() + 1)
  energy = np.zeros((vectors.shape[1], t))
  np.add.at(energy.T, groups, vectors ** 2)
  total = energy.sum(-1, keepdims=True)
  return energy / np.where(total > 0, total, 1.0)


def chance_localization(groups: Sequence[int], draws: int = 2000, seed: int = 0) -> float:
  """Expected largest per-task energy share of a *random* unit vector over these inputs.

  The reference for ``localization(...).max(-1)``: what an eigenfunction with
  no relation to the tasks would score (above ``1 / T``, since the largest of
  ``T`` noisy shares is taken). Monte Carlo over isotropic Gaussian vectors.
  """
  rng = np.random.default_rng(seed)
  energy = localization(rng.normal(size=(len(groups), draws)), groups)
  return float(energy.max(-1).mean())


def cosine_normalize(kernel) -> np.ndarray:
  """``K_ij / sqrt(K_ii K_jj)``: the kernel with every input's tangent feature at unit norm.

  Separates *where* an eigenfunction lives from *how large* the tangent
  features of a task are (a task whose inputs have large Jacobians dominates
  the top of the raw spectrum for that reason alone).
  """
  kernel = np.asarray(kernel, np.float64)
  d = np.sqrt(np.clip(np.diagonal(kernel), 1e-300, None))
  return kernel / d[:, None] / d[None, :]
