"""Zero-shot heads from CLIP's text tower (the paper's frozen classification heads), on a tiny CLIP."""
import gzip

import jax.numpy as jnp
import numpy as np
import pytest

from research.data import vision
from research.models import clip, clip_tokenizer, heads


@pytest.fixture(scope="module")
def tiny():
  config = clip.tiny_config(vision_layers=1, text_layers=1)
  return clip.init(config, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "vocab.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\ns a\nsa t\n")
  return clip_tokenizer.CLIPTokenizer(str(path))


def test_text_embedder_is_normalised_and_batch_independent(tiny, tokenizer):
  embed_fn = clip.text_embedder(tiny, tokenizer, batch_size=4)
  texts = [f"a centered satellite photo of {c}." for c in vision.class_names("EuroSAT")]
  out = embed_fn(texts)
  assert out.shape == (10, tiny.config.embed_dim) and out.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  direct = clip.l2_normalize(tiny.encode_text(jnp.asarray(tokenizer.tokenize(texts[:3], 12))))
  np.testing.assert_allclose(out[:3], direct, atol=1e-5)
  np.testing.assert_allclose(clip.text_embedder(tiny, tokenizer, batch_size=16)(texts), out, atol=1e-5)


def test_zeroshot_head_averages_the_datasets_templates(tiny, tokenizer):
  embed_fn = clip.text_embedder(tiny, tokenizer, batch_size=32)
  names, templates = vision.class_names("EuroSAT"), vision.templates("EuroSAT")
  head = heads.zeroshot_head(embed_fn, names, templates)
  assert head.shape == (10, tiny.config.embed_dim)
  # Row c by hand: mean of the normalised prompt embeddings of class c, normalised.
  per_prompt = embed_fn([t.format(names[3]) for t in templates])
  row = per_prompt.mean(0) / np.linalg.norm(per_prompt.mean(0))
  np.testing.assert_allclose(head[3], row, atol=1e-5)
  apply_fn, params = clip.split_image_encoder(tiny)
  images = np.zeros((2, 32, 32, 3), np.uint8)
  logits = heads.logits(apply_fn(params, images), head, clip.temperature(tiny))
  assert logits.shape == (2, 10)
  assert float(jnp.abs(logits).max()) <= clip.temperature(tiny) + 1e-3
