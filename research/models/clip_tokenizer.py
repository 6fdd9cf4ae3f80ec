"""CLIP's byte-level BPE tokenizer (Radford et al., 2021), as open_clip's `SimpleTokenizer`, without torch or `regex`.

It reads OpenAI's vocabulary file `bpe_simple_vocab_16e6.txt.gz` (a header
line, then one merge "a b" per line; the first 48,894 merges are used). The
vocabulary is the 256 byte symbols, the same with the end-of-word marker
`</w>`, one token per merge, then <start_of_text> (49406) and <end_of_text>
(49407): 49,408 ids. `tokenize` gives [sot] + tokens + [eot], cut to the
context length with the last id forced to eot, and padded with 0.

Text cleaning as open_clip: `ftfy.fix_text` when ftfy is installed (otherwise
NFC normalisation and straight quotes, which is what ftfy does to ordinary
text), HTML entities unescaped twice, runs of whitespace collapsed, lower
case. The pre-tokenizer (open_clip's regex
`'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`) is written
out with `unicodedata` categories, so the `regex` package is not needed.

>>> tok = CLIPTokenizer()   # doctest: +SKIP  (needs the vocabulary file)
>>> tok.tokenize(["a photo of a cat."], 8)   # doctest: +SKIP
array([[49406,   320,  1125,   539,   320,  2368,   269, 49407]], dtype=int32)
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import unicodedata
from typing import Sequence

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "CLIP_BPE_VOCAB"
NUM_MERGES = 49152 - 256 - 2   # the merges OpenAI's vocabulary uses (of ~262k in the file)
CONTEXT_LENGTH = 77
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# Unicode White_Space, which is what `\s` matches in the `regex` package.
_WHITESPACE = frozenset(
    [chr(c) for c in (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                      0x2028, 0x2029, 0x202F, 0x205F, 0x3000)])
_CONTRACTIONS = ("re", "ve", "ll", "s", "t", "m", "d")
# Case-insensitive matching of the contractions also accepts characters whose
# simple case folding is one of these letters and that `lower()` leaves alone.
_FOLD = {"\u017f": "s"}   # LATIN SMALL LETTER LONG S
_CURLY_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                               "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def default_vocab_file() -> str:
  """`$CLIP_BPE_VOCAB`, else the copy inside an installed `open-clip-torch` (found without importing it)."""
  path = os.environ.get(VOCAB_ENV)
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"${VOCAB_ENV}={path} does not exist; point it at {VOCAB_FILE}.")
    return path
  spec = importlib.util.find_spec("open_clip")
  if spec is not None and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), VOCAB_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"CLIP's BPE vocabulary {VOCAB_FILE} was not found: pass vocab_file=, set ${VOCAB_ENV}, or "
      "install open-clip-torch (its wheel ships the file; `pip install --no-deps open-clip-torch` "
      "avoids pulling torch).")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """Byte -> printable character, reversible: printable Latin-1 bytes map to themselves, the rest to U+0100 on.

  The order of the entries is the order of the vocabulary's first 256 ids:
  the printable bytes first, then the others.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  table = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in table]
  table.update((b, chr(256 + k)) for k, b in enumerate(others))
  return table


def _char_class(ch: str) -> str:
  if ch in _WHITESPACE:
    return "space"
  category = unicodedata.category(ch)
  if category[0] == "L":
    return "letter"
  if category[0] == "N":
    return "number"
  return "other"


def pre_tokenize(text: str) -> list[str]:
  """Splits cleaned text into the pieces BPE runs on (open_clip's regex, alternative by alternative)."""
  pieces, i, n = [], 0, len(text)
  while i < n:
    special = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
    if special:
      pieces.append(special)
      i += len(special)
      continue
    if text[i] == "'":
      rest = "".join(_FOLD.get(c, c) for c in text[i + 1:i + 3].lower())
      match = next((c for c in _CONTRACTIONS if rest.startswith(c)), None)
      if match:
        pieces.append(text[i:i + 1 + len(match)])
        i += 1 + len(match)
        continue
    kind = _char_class(text[i])
    if kind == "space":
      i += 1
      continue
    if kind == "number":   # one digit at a time
      pieces.append(text[i])
      i += 1
      continue
    j = i + 1
    while j < n and _char_class(text[j]) == kind:   # greedy, as the regex: specials do not cut a run
      j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


def clean(text: str) -> str:
  """open_clip's 'lower' cleaning: fix text, unescape HTML twice, collapse whitespace, lower-case."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    text = unicodedata.normalize("NFC", text).translate(_CURLY_QUOTES)
  text = html.unescape(html.unescape(text)).strip()
  collapsed, space = [], False
  for ch in text:
    if ch in _WHITESPACE:
      space = True
      continue
    if space and collapsed:
      collapsed.append(" ")
    space = False
    collapsed.append(ch)
  return "".join(collapsed).lower()


class CLIPTokenizer:
  """Byte-level BPE with CLIP's vocabulary; `tokenize(texts, context_length) -> int32 [N, context_length]`."""

  def __init__(self, vocab_file: str | None = None, num_merges: int = NUM_MERGES):
    self.vocab_file = vocab_file or default_vocab_file()
    if not os.path.isfile(self.vocab_file):
      raise FileNotFoundError(f"{self.vocab_file} does not exist; expected CLIP's {VOCAB_FILE}.")
    with gzip.open(self.vocab_file, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise ValueError(f"{self.vocab_file}: merge lines must hold two symbols; got e.g. {bad[0]}.")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.sot_id, self.eot_id = (self.encoder[t] for t in SPECIAL_TOKENS)
    self.vocab_size = len(self.encoder)
    self._cache: dict[str, tuple[str, ...]] = {t: (t,) for t in SPECIAL_TOKENS}

  def bpe(self, piece: str) -> tuple[str, ...]:
    """Merges the symbols of one pre-token (its last symbol marked `</w>`) by rank until none applies."""
    if piece in self._cache:
      return self._cache[piece]
    word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without the start / end tokens."""
    ids = []
    for piece in pre_tokenize(clean(text)):
      mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[token] for token in self.bpe(mapped))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids (special and padding ids dropped); words end at `</w>`."""
    skip = {0, self.sot_id, self.eot_id}
    text = "".join(self.decoder[int(i)] for i in ids if int(i) not in skip)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def tokenize(self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """int32 [N, context_length]: [sot] + ids + [eot], truncated (last id kept eot) and 0-padded."""
    if isinstance(texts, str):
      raise TypeError("tokenize expects a list of strings; wrap a single text as [text].")
    if context_length < 2:
      raise ValueError(f"context_length={context_length} leaves no room for the start and end tokens.")
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id, *self.encode(text), self.eot_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.eot_id
      out[row, :len(ids)] = ids
    return out
