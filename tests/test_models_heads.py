"""Tests of research.models.heads (zero-shot heads) and minilm.text_embedder."""
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import bert, heads, minilm


def lookup_embed_fn(table):
  """A fake encoder: each prompt maps to a fixed vector."""
  def embed_fn(texts):
    return np.stack([np.asarray(table[t], np.float32) for t in texts])
  return embed_fn


def test_orthogonal_classes_give_identity_logits():
  classes = ["cat", "dog", "car"]
  # Class c's prompt maps to a positive multiple of basis vector c (scale must not matter).
  embed_fn = lookup_embed_fn({f"a photo of {c}": (i + 2.0) * np.eye(3)[i] for i, c in enumerate(classes)})
  head = heads.zeroshot_head(embed_fn, classes, ["a photo of {}"])
  np.testing.assert_allclose(head, np.eye(3), atol=1e-7)
  out = heads.logits(5.0 * jnp.eye(3), head, temperature=10.0)
  np.testing.assert_allclose(out, 10.0 * np.eye(3), atol=1e-6)
  assert np.argmax(heads.logits(jnp.array([[0.1, 0.2, 3.0]]), head)) == 2


def test_template_average_by_hand():
  # Per template: normalise ([1,0] and [0,2] -> [1,0], [0,1]); mean [.5,.5]; normalise.
  table = {"one x": [1.0, 0.0], "two x": [0.0, 2.0], "one y": [0.0, -3.0], "two y": [0.0, -1.0]}
  head = heads.zeroshot_head(lookup_embed_fn(table), ["x", "y"], ["one {}", lambda c: f"two {c}"])
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(head, [[s, s], [0.0, -1.0]], atol=1e-6)
  # Cosine logits at the default temperature (MiniLM's training scale).
  out = heads.logits(jnp.array([[2.0, 2.0]]), head)
  assert heads.DEFAULT_TEMPERATURE == 20.0
  np.testing.assert_allclose(out, [[20.0, -20.0 * s]], atol=1e-5)


def test_head_errors():
  embed_fn = lookup_embed_fn({"a": [1.0, 0.0]})
  with pytest.raises(ValueError, match="placeholder"):
    heads.zeroshot_head(embed_fn, ["a"], ["no slot"])
  with pytest.raises(ValueError, match="at least one class"):
    heads.zeroshot_head(embed_fn, [], ["{}"])
  with pytest.raises(TypeError, match="not a single string"):
    heads.zeroshot_head(embed_fn, "a", ["{}"])
  with pytest.raises(ValueError, match=r"returned shape \(2,\)"):
    heads.zeroshot_head(lambda texts: np.ones(2), ["a"], ["{}"])
  with pytest.raises(ValueError, match="width 3"):
    heads.logits(jnp.ones((1, 3)), jnp.eye(2))


def test_text_embedder_batches_like_one_batch():
  _, tokenizer = minilm.load_minilm()
  config = bert.BertConfig(hidden=32, layers=1, heads=4, intermediate=64, max_position=32)
  apply_fn, params = minilm.split_model(minilm.random_init(config, seed=0))
  texts = ["first text", "a second, longer text here", "third"]
  small = minilm.text_embedder(apply_fn, params, tokenizer, max_len=16, batch_size=2)(texts)
  whole = minilm.text_embedder(apply_fn, params, tokenizer, max_len=16, batch_size=4)(texts)
  assert small.shape == (3, 32)
  np.testing.assert_allclose(small, whole, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(small, axis=-1), 1.0, atol=1e-5)
  head = heads.zeroshot_head(minilm.text_embedder(apply_fn, params, tokenizer, max_len=16), ["x", "y"], ["{}"])
  assert head.shape == (2, 32)
