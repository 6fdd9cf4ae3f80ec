"""CLIP (Radford et al., 2021) in Flax NNX: the ViT image tower and the text tower, numerically equal to open_clip.

Pre-LayerNorm transformer blocks as in OpenAI's release: the image tower embeds
patches with a bias-free strided convolution, prepends a class token, adds
position embeddings, normalises (`pre_norm`), runs the blocks, normalises the
class token (`post_norm`) and projects it (`proj`); the text tower embeds
tokens, runs causally masked blocks, normalises, and projects the feature of
the end-of-text token (the highest id in each row). No dropout: both towers
are deterministic functions, so their linearization (`research.tangent`) is
exact.

Parameter leaf names (what task vectors, the converter and the sharding rules see):

    visual/patch_embed/kernel                 [p, p, 3, width]  (HWIO; open_clip's conv1)
    visual/class_embedding                    [width]
    visual/position_embedding                 [1 + (size/p)^2, width]
    visual/{pre_norm,post_norm}/{scale,bias}
    visual/proj                               [width, embed_dim]
    text/token_embedding/embedding            [vocab, width]
    text/position_embedding                   [context, width]
    text/final_norm/{scale,bias}
    text/proj                                 [width, embed_dim]
    {visual,text}/blocks/<i>/{attn_norm,mlp_norm}/{scale,bias}
    {visual,text}/blocks/<i>/attn/{query,key,value,out}/{kernel,bias}
    {visual,text}/blocks/<i>/{mlp_in,mlp_out}/{kernel,bias}
    logit_scale                               []  (log of the softmax temperature)

Every Param carries logical axis names (see `LOGICAL_AXIS_NAMES`).

>>> config = tiny_config()
>>> model = CLIP(config, rngs=nnx.Rngs(0))
>>> images = jnp.zeros((2, config.image_size, config.image_size, 3))
>>> model.encode_image(images).shape, model.encode_text(jnp.ones((2, config.context_length), jnp.int32)).shape
((2, 16), (2, 16))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.param_tree import axes_metadata

# Logical axis names used on the parameters; a sharding config needs one rule
# for each (map a name to None to replicate it). 'joint' is the width of the
# shared image-text embedding space (the projections' output).
LOGICAL_AXIS_NAMES = ("vocab", "position", "embed", "heads", "mlp", "joint")

# CLIP's input normalisation (OpenAI's statistics of its training images), RGB.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """CLIP hyper-parameters; the defaults are ViT-B/32 as OpenAI released it.

  `activation`: OpenAI's weights (and every checkpoint fine-tuned from them,
  such as the task-vector papers') use QuickGELU, x * sigmoid(1.702 x);
  open_clip's model names without `-quickgelu` (and its own LAION
  pre-training) use the exact GELU.
  """
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  mlp_ratio: float = 4.0
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32          # computation dtype (e.g. jnp.bfloat16 on TPU)
  param_dtype: Any = jnp.float32    # storage dtype of the parameters
  remat: bool = False               # recompute block activations in the backward pass

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"CLIPConfig: activation={self.activation!r}; use one of {ACTIVATIONS}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPConfig: image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}.")
    for tower, width, heads in (("vision", self.vision_width, self.vision_heads),
                                ("text", self.text_width, self.text_heads)):
      if width % heads:
        raise ValueError(f"CLIPConfig: {tower}_width={width} is not divisible by {tower}_heads={heads}.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def to_dict(self) -> dict[str, Any]:
    """Plain-data form (dtype names as strings), for checkpoint metadata and configs."""
    out = dataclasses.asdict(self)
    out["dtype"] = jnp.dtype(self.dtype).name
    out["param_dtype"] = jnp.dtype(self.param_dtype).name
    return out

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "CLIPConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"CLIPConfig.from_dict: unknown keys {unknown}; known keys: {sorted(known)}.")
    values = dict(values)
    for key in ("dtype", "param_dtype"):
      if isinstance(values.get(key), str):
        values[key] = jnp.dtype(values[key])
    return cls(**values)


# The three models of the tangent-space paper (OpenAI's ViT CLIPs), by short name.
VARIANTS: dict[str, CLIPConfig] = {
    "B/32": CLIPConfig(),
    "B/16": CLIPConfig(patch_size=16),
    "L/14": CLIPConfig(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                       vision_heads=16, text_width=768, text_heads=12),
}
# open_clip's model names for the same architectures.
OPEN_CLIP_NAMES = {"ViT-B-32": "B/32", "ViT-B-16": "B/16", "ViT-L-14": "L/14"}


def get_config(name: str, **overrides: Any) -> CLIPConfig:
  """Config of a named variant: 'B/32', 'B/16', 'L/14' or open_clip's 'ViT-B-32' / 'ViT-B-32-quickgelu' ...

  open_clip's plain names use the exact GELU (as open_clip builds them), the
  short names and the `-quickgelu` names use QuickGELU (OpenAI's weights).

  >>> get_config('ViT-L-14').vision_width, get_config('ViT-B-32').activation
  (1024, 'gelu')
  """
  base, activation = name, None
  if name.endswith("-quickgelu"):
    base, activation = name[: -len("-quickgelu")], "quick_gelu"
  if base in OPEN_CLIP_NAMES:
    activation = activation or "gelu"
    base = OPEN_CLIP_NAMES[base]
  if base not in VARIANTS:
    raise ValueError(f"Unknown CLIP variant {name!r}; use one of {sorted(VARIANTS)} or open_clip's "
                     f"{sorted(OPEN_CLIP_NAMES)} (optionally with -quickgelu).")
  config = VARIANTS[base]
  if activation is not None:
    config = dataclasses.replace(config, activation=activation)
  return dataclasses.replace(config, **overrides)


def tiny_config(**overrides: Any) -> CLIPConfig:
  """A few-thousand-parameter CLIP for tests and smoke runs on a CPU."""
  values = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                vision_heads=2, context_length=12, vocab_size=600, text_width=32, text_layers=2,
                text_heads=2)
  values.update(overrides)
  return CLIPConfig(**values)


# --------------------------------------------------------------------------------------
# Layers.


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  return lambda x: jax.nn.gelu(x, approximate=False)


def _linear(config: CLIPConfig, n_in: int, n_out: int, axes: tuple[str, str], std: float,
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      n_in, n_out, dtype=config.dtype, param_dtype=config.param_dtype,
      kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros_init(),
      kernel_metadata=axes_metadata(*axes), bias_metadata=axes_metadata(axes[1]), rngs=rngs)


def _layer_norm(config: CLIPConfig, width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] as torch computes it.
  return nnx.LayerNorm(
      width, epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
      use_fast_variance=False, scale_metadata=axes_metadata("embed"),
      bias_metadata=axes_metadata("embed"), rngs=rngs)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...],
           dtype: Any) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, **axes_metadata(*axes))


class Attention(nnx.Module):
  """Multi-head self-attention (torch `nn.MultiheadAttention` with q, k, v projections kept apart)."""

  def __init__(self, config: CLIPConfig, width: int, heads: int, layers: int, *, rngs: nnx.Rngs):
    self.heads = heads
    # open_clip's initialisation: in-projections width^-1/2, the output
    # projection scaled down by the depth as well.
    std = width ** -0.5
    self.query = _linear(config, width, width, ("embed", "heads"), std, rngs)
    self.key = _linear(config, width, width, ("embed", "heads"), std, rngs)
    self.value = _linear(config, width, width, ("embed", "heads"), std, rngs)
    self.out = _linear(config, width, width, ("heads", "embed"), std * (2 * layers) ** -0.5, rngs)

  def __call__(self, x: jax.Array, score_bias: jax.Array | None) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.heads

    def split_heads(y):
      return y.reshape(batch, length, self.heads, head_dim)

    q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    # Softmax in float32 whatever the compute dtype.
    scores = scores.astype(jnp.float32)
    if score_bias is not None:
      scores = scores + score_bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, width)
    return self.out(context)


class Block(nnx.Module):
  """Pre-LN residual block: x += attn(LN(x)); x += mlp(LN(x))."""

  def __init__(self, config: CLIPConfig, width: int, heads: int, layers: int, *, rngs: nnx.Rngs):
    hidden = int(width * config.mlp_ratio)
    self.attn_norm = _layer_norm(config, width, rngs)
    self.attn = Attention(config, width, heads, layers, rngs=rngs)
    self.mlp_norm = _layer_norm(config, width, rngs)
    self.mlp_in = _linear(config, width, hidden, ("embed", "mlp"), (2 * width) ** -0.5, rngs)
    self.mlp_out = _linear(config, hidden, width, ("mlp", "embed"),
                           width ** -0.5 * (2 * layers) ** -0.5, rngs)
    self.activation = config.activation

  def __call__(self, x: jax.Array, score_bias: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), score_bias)
    return x + self.mlp_out(_activation(self.activation)(self.mlp_in(self.mlp_norm(x))))


def _run_blocks(blocks: nnx.List, x: jax.Array, score_bias: jax.Array | None, remat: bool) -> jax.Array:
  for block in blocks:
    if remat:
      x = nnx.remat(lambda b, y, s: b(y, s))(block, x, score_bias)
    else:
      x = block(x, score_bias)
  return x


class VisionTower(nnx.Module):
  """ViT image encoder: `tower(images [B, H, W, 3] normalised) -> [B, embed_dim]` (not L2-normalised)."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    width, p = config.vision_width, config.patch_size
    self.patch_embed = nnx.Conv(
        3, width, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
        dtype=config.dtype, param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal((3 * p * p) ** -0.5),
        kernel_metadata=axes_metadata(None, None, None, "embed"), rngs=rngs)
    std = width ** -0.5
    self.class_embedding = _param(rngs, (width,), std, ("embed",), config.param_dtype)
    self.position_embedding = _param(rngs, (config.grid ** 2 + 1, width), std, ("position", "embed"),
                                     config.param_dtype)
    self.pre_norm = _layer_norm(config, width, rngs)
    self.blocks = nnx.List([Block(config, width, config.vision_heads, config.vision_layers, rngs=rngs)
                            for _ in range(config.vision_layers)])
    self.post_norm = _layer_norm(config, width, rngs)
    self.proj = _param(rngs, (width, config.embed_dim), std, ("embed", "joint"), config.param_dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"CLIP image tower expects images [batch, {c.image_size}, {c.image_size}, 3] "
                       f"(NHWC, normalised); got shape {images.shape}. Preprocess with "
                       "research.data.vision.preprocess.")
    x = self.patch_embed(images.astype(c.dtype))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
    x = _run_blocks(self.blocks, self.pre_norm(x), None, c.remat)
    pooled = self.post_norm(x[:, 0])
    return pooled @ self.proj[...].astype(pooled.dtype)


class TextTower(nnx.Module):
  """Causal text encoder: `tower(token_ids [B, context]) -> [B, embed_dim]` (not L2-normalised)."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    width = config.text_width
    self.token_embedding = nnx.Embed(
        config.vocab_size, width, dtype=config.dtype, param_dtype=config.param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        embedding_metadata=axes_metadata("vocab", "embed"), rngs=rngs)
    self.position_embedding = _param(rngs, (config.context_length, width), 0.01,
                                     ("position", "embed"), config.param_dtype)
    self.blocks = nnx.List([Block(config, width, config.text_heads, config.text_layers, rngs=rngs)
                            for _ in range(config.text_layers)])
    self.final_norm = _layer_norm(config, width, rngs)
    self.proj = _param(rngs, (width, config.embed_dim), width ** -0.5, ("embed", "joint"),
                       config.param_dtype)

  def __call__(self, token_ids: jax.Array) -> jax.Array:
    c = self.config
    if token_ids.ndim != 2 or token_ids.shape[1] > c.context_length:
      raise ValueError(f"CLIP text tower expects token ids [batch, length <= {c.context_length}]; "
                       f"got shape {token_ids.shape}. Tokenize with CLIPTokenizer.")
    length = token_ids.shape[1]
    x = self.token_embedding(token_ids) + self.position_embedding[:length].astype(c.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    score_bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)[None, None]
    x = self.final_norm(_run_blocks(self.blocks, x, score_bias, c.remat))
    # The end-of-text token has the highest id in the vocabulary.
    eot = jnp.argmax(token_ids, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return pooled @ self.proj[...].astype(pooled.dtype)


class CLIP(nnx.Module):
  """Both towers and the learned temperature; `encode_image` / `encode_text` give unnormalised embeddings."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.visual = VisionTower(config, rngs=rngs)
    self.text = TextTower(config, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), config.param_dtype), **axes_metadata())

  def encode_image(self, images: jax.Array) -> jax.Array:
    return self.visual(images)

  def encode_text(self, token_ids: jax.Array) -> jax.Array:
    return self.text(token_ids)

  def __call__(self, images: jax.Array, token_ids: jax.Array) -> jax.Array:
    """Image-text logits [B_images, B_texts]: exp(logit_scale) * cosine similarity."""
    img = l2_normalize(self.encode_image(images).astype(jnp.float32))
    txt = l2_normalize(self.encode_text(token_ids).astype(jnp.float32))
    return jnp.exp(self.logit_scale[...]) * img @ txt.T


# --------------------------------------------------------------------------------------
# Functional boundary.


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 RGB [..., 3] in [0, 255] -> CLIP-normalised floats ((x / 255 - mean) / std)."""
  mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
  std = jnp.asarray(IMAGE_STD, jnp.float32)
  return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def init(config: CLIPConfig, seed: int = 0) -> CLIP:
  """A randomly initialised CLIP (open_clip's initialisation scheme), built in one compiled program."""
  return nnx.jit(lambda: CLIP(config, rngs=nnx.Rngs(params=seed)))()


def abstract(config: CLIPConfig) -> CLIP:
  """A CLIP whose Params are `jax.ShapeDtypeStruct`s (no memory): the target for loading weights."""
  return nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))


def split_image_encoder(model: CLIP) -> tuple[Callable[..., jax.Array], nnx.State]:
  """The functional boundary of the image tower: `(apply_fn, params)`, params = the visual Params only.

  `apply_fn(params, images) -> [B, embed_dim]` unnormalised image embeddings
  (the function the tangent-space model linearizes; `heads.logits`
  normalises). `images` are uint8 RGB [B, H, W, 3] as the input pipelines
  yield them, normalised on device, or floating arrays already normalised.
  As in the paper, task vectors live in the image tower only; the text tower
  is used once, to build the frozen zero-shot head.
  """
  graphdef, params, rest = nnx.split(model.visual, nnx.Param, ...)
  dtype = model.config.dtype

  def apply_fn(params: nnx.State, images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
      images = normalize_images(images, dtype)
    return nnx.merge(graphdef, params, rest)(images)

  return apply_fn, params


def text_embedder(model: CLIP, tokenizer: Any, batch_size: int = 256) -> Callable[[Sequence[str]], np.ndarray]:
  """`embed_fn(texts) -> float32 [N, embed_dim]` L2-normalised text embeddings, for `heads.zeroshot_head`.

  Fixed batches of `batch_size` x context (the last one padded), so the jitted
  text tower compiles once. `tokenizer` is a `CLIPTokenizer` (anything with
  `tokenize(texts, context_length) -> int [N, L]`).
  """
  graphdef, state = nnx.split(model.text)
  context = model.config.context_length

  @jax.jit
  def embed(state, ids):
    return l2_normalize(nnx.merge(graphdef, state)(ids).astype(jnp.float32))

  def embed_fn(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    if not texts:
      raise ValueError("embed_fn got no texts.")
    out = []
    for start in range(0, len(texts), batch_size):
      chunk = texts[start:start + batch_size]
      ids = tokenizer.tokenize(chunk + [""] * (batch_size - len(chunk)), context)
      out.append(np.asarray(embed(state, ids))[:len(chunk)])
    return np.concatenate(out)

  return embed_fn


def temperature(model_or_params: Any) -> float:
  """exp(logit_scale): the logit scale of zero-shot heads (100 for OpenAI's CLIPs)."""
  scale = model_or_params.logit_scale if isinstance(model_or_params, CLIP) else model_or_params["logit_scale"]
  return float(jnp.exp(jnp.asarray(scale[...] if hasattr(scale, "get_value") else scale)))
