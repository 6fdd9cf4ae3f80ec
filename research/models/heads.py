"""Frozen zero-shot classification heads from class-name embeddings (Radford et al., 2021; Ortiz-Jimenez et al., 2023).

As in the tangent-space paper, the head is built once with the pre-trained
encoder and never trained, so task vectors live only in the encoder:
each class name is put into every template, embedded, L2-normalised, averaged
over templates and normalised again; logits are a scaled cosine similarity.

>>> from research.models.minilm import load_minilm, split_model, text_embedder
>>> model, tokenizer = load_minilm()
>>> apply_fn, params = split_model(model)
>>> embed_fn = text_embedder(apply_fn, params, tokenizer)
>>> head = zeroshot_head(embed_fn, ["sports", "politics"], ["a text about {}.", "{}"])
>>> batch = tokenizer.tokenize(["The match ended 2-1 after extra time."], max_len=32)
>>> logits(apply_fn(params, batch["input_ids"], batch["attention_mask"]), head).shape
(1, 2)
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Cosine similarities lie in [-1, 1], so logits need a scale (an inverse
# temperature). CLIP learns one and ends at 100 (its clip value). MiniLM was
# trained with sentence-transformers' MultipleNegativesRankingLoss, a
# cross-entropy over cosine similarities with scale 20 (the loss's default),
# so 20 keeps the softmax as sharp as the encoder was trained for; at 100 the
# softmax saturates on MiniLM's cosine gaps and cross-entropy gradients of
# well-classified examples vanish sooner. Both work for fine-tuning.
DEFAULT_TEMPERATURE = 20.0

Template = str | Callable[[str], str]


def _l2_normalize(x, axis=-1, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def zeroshot_head(embed_fn: Callable[[Sequence[str]], jax.Array | np.ndarray],
                  class_names: Sequence[str], templates: Sequence[Template]) -> jax.Array:
  """Zero-shot head [C, H]: row c is the normalised mean of the normalised embeddings of class c's prompts.

  Args:
    embed_fn: texts -> [N, H] embeddings of the frozen pre-trained encoder
      (normalised or not), e.g. `research.models.minilm.text_embedder(...)`.
    class_names: C class names, in label order.
    templates: T prompt templates, each a format string with one `{}`
      ("a text about {}.") or a callable name -> prompt.
  """
  if isinstance(class_names, str) or isinstance(templates, str):
    raise TypeError("zeroshot_head expects lists of class names and templates, not a single string.")
  if not class_names or not templates:
    raise ValueError(f"zeroshot_head needs at least one class and one template; got "
                     f"{len(class_names)} classes and {len(templates)} templates.")
  for t in templates:
    if isinstance(t, str) and "{}" not in t:
      raise ValueError(f"Template {t!r} has no '{{}}' placeholder for the class name.")
  prompts = [t.format(c) if isinstance(t, str) else t(c) for c in class_names for t in templates]
  embeddings = jnp.asarray(embed_fn(prompts), dtype=jnp.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
    raise ValueError(f"embed_fn returned shape {embeddings.shape} for {len(prompts)} prompts; "
                     f"expected [{len(prompts)}, hidden].")
  per_prompt = _l2_normalize(embeddings).reshape(len(class_names), len(templates), -1)
  return _l2_normalize(per_prompt.mean(axis=1))


def logits(embeddings: jax.Array, head: jax.Array, temperature: float = DEFAULT_TEMPERATURE) -> jax.Array:
  """`temperature * cosine(embeddings, head rows)`: [B, H], [C, H] -> [B, C].

  Both sides are normalised here, so unnormalised encoder outputs (as from
  `split_model`'s `apply_fn`) can be passed directly.
  """
  if embeddings.shape[-1] != head.shape[-1]:
    raise ValueError(f"logits: embeddings have width {embeddings.shape[-1]} but the head "
                     f"{head.shape} expects {head.shape[-1]}.")
  return temperature * _l2_normalize(embeddings) @ _l2_normalize(head).T
