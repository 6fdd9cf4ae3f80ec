"""BERT encoder in Flax NNX (Devlin et al., 2019), numerically equal to Hugging Face `BertModel`.

Post-LayerNorm blocks, exact (erf) GELU, padding masked by adding a large
negative number to the attention scores, no pooler and no dropout: the encoder
is deterministic, so `apply_fn(params, ...)` is a pure function whose
linearization (`research.tangent`) is exact.

Parameter leaf names (what task vectors, LiNeS and the sharding rules see):

    embeddings/{word,position,token_type}/embedding
    embeddings/norm/{scale,bias}
    layers/<i>/attention/{query,key,value,output}/{kernel,bias}
    layers/<i>/attention_norm/{scale,bias}
    layers/<i>/intermediate/{kernel,bias}
    layers/<i>/output/{kernel,bias}
    layers/<i>/output_norm/{scale,bias}

Every Param carries logical axis names (see `LOGICAL_AXIS_NAMES`).

>>> config = BertConfig(vocab_size=100, hidden=32, layers=2, heads=4, intermediate=64)
>>> model = Bert(config, rngs=nnx.Rngs(0))
>>> ids = jnp.ones((2, 8), jnp.int32); mask = jnp.ones((2, 8), jnp.int32)
>>> model(ids, mask).shape, encode(model, ids, mask).shape
((2, 8, 32), (2, 32))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.param_tree import axes_metadata, logical_axes  # noqa: F401  (re-exported)

# Logical axis names used on the parameters; a sharding config needs one rule
# for each (map a name to None to replicate that dimension).
LOGICAL_AXIS_NAMES = ("vocab", "position", "token_type", "embed", "heads", "mlp")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters; the defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_position: int = 512
  type_vocab: int = 2
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32          # computation dtype (e.g. jnp.bfloat16)
  param_dtype: Any = jnp.float32    # storage dtype of the parameters
  initializer_range: float = 0.02   # std of BERT's normal initialisation

  def __post_init__(self):
    if self.hidden % self.heads:
      raise ValueError(f"BertConfig: hidden={self.hidden} is not divisible by heads={self.heads}.")


def _linear(config: BertConfig, n_in: int, n_out: int, axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      n_in, n_out, dtype=config.dtype, param_dtype=config.param_dtype,
      kernel_init=nnx.initializers.normal(config.initializer_range),
      kernel_metadata=axes_metadata(*axes), bias_metadata=axes_metadata(axes[1]), rngs=rngs)


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] as torch computes it; the
  # E[x^2] - mean^2 shortcut costs ~1e-6 of agreement with the reference.
  return nnx.LayerNorm(
      config.hidden, epsilon=config.layer_norm_eps, dtype=config.dtype,
      param_dtype=config.param_dtype, use_fast_variance=False,
      scale_metadata=axes_metadata("embed"), bias_metadata=axes_metadata("embed"), rngs=rngs)


def _embed(config: BertConfig, n: int, axis: str, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(
      n, config.hidden, dtype=config.dtype, param_dtype=config.param_dtype,
      embedding_init=nnx.initializers.normal(config.initializer_range),
      embedding_metadata=axes_metadata(axis, "embed"), rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + absolute position + token type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.word = _embed(config, config.vocab_size, "vocab", rngs)
    self.position = _embed(config, config.max_position, "position", rngs)
    self.token_type = _embed(config, config.type_vocab, "token_type", rngs)
    self.norm = _layer_norm(config, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
    return self.norm(x)


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention with the output projection (HF `BertAttention` less its LayerNorm)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden
    self.heads = config.heads
    self.query = _linear(config, h, h, ("embed", "heads"), rngs)
    self.key = _linear(config, h, h, ("embed", "heads"), rngs)
    self.value = _linear(config, h, h, ("embed", "heads"), rngs)
    self.output = _linear(config, h, h, ("heads", "embed"), rngs)

  def __call__(self, x: jax.Array, score_bias: jax.Array) -> jax.Array:
    batch, length, hidden = x.shape
    head_dim = hidden // self.heads

    def split_heads(y):
      return y.reshape(batch, length, self.heads, head_dim)

    q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    # Softmax in float32 whatever the compute dtype: masked scores are ~-3e38.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + score_bias, axis=-1).astype(v.dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, hidden)
    return self.output(context)


class BertLayer(nnx.Module):
  """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.attention = BertSelfAttention(config, rngs=rngs)
    self.attention_norm = _layer_norm(config, rngs)
    self.intermediate = _linear(config, config.hidden, config.intermediate, ("embed", "mlp"), rngs)
    self.output = _linear(config, config.intermediate, config.hidden, ("mlp", "embed"), rngs)
    self.output_norm = _layer_norm(config, rngs)

  def __call__(self, x: jax.Array, score_bias: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, score_bias))
    mlp = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.output_norm(x + mlp)


class Bert(nnx.Module):
  """BERT encoder: `model(input_ids, attention_mask, token_type_ids=None) -> [B, L, hidden]`."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    # nnx.List keeps the index in the leaf paths: layers/0/..., layers/1/...
    self.layers = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(
          f"Bert expects input_ids and attention_mask of the same shape [batch, length]; got "
          f"{input_ids.shape} and {attention_mask.shape}.")
    if input_ids.shape[1] > self.config.max_position:
      raise ValueError(f"Bert: sequence length {input_ids.shape[1]} exceeds max_position="
                       f"{self.config.max_position}; tokenize with a smaller max_len.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    # Additive mask as in HF: 0 where attended, the most negative float32 elsewhere.
    keep = attention_mask.astype(jnp.float32)[:, None, None, :]
    score_bias = (1.0 - keep) * jnp.finfo(jnp.float32).min
    x = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      x = layer(x, score_bias)
    return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Attention-masked mean over tokens: [B, L, H], [B, L] -> [B, H] (not normalised).

  As sentence-transformers' Pooling(mean): padding is excluded and the token
  count is clamped at 1e-9, so an all-padding row gives zeros, not NaN.
  """
  mask = attention_mask.astype(hidden.dtype)[..., None]
  total = jnp.sum(hidden * mask, axis=-2)
  count = jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
  return total / count


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def encode(model: Bert, input_ids: jax.Array, attention_mask: jax.Array,
           token_type_ids: jax.Array | None = None) -> jax.Array:
  """Sentence embedding [B, H]: L2-normalised masked mean of the last hidden states."""
  hidden = model(input_ids, attention_mask, token_type_ids)
  return l2_normalize(mean_pool(hidden, attention_mask).astype(jnp.float32))
