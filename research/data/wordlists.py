"""Spell-checker word lists, one word per line (Debian `w*` packages, /usr/share/dict)."""
from __future__ import annotations

import os

from research.data import sources

# Language -> (file name under the dict root, Debian package, keep capitalised words?).
# Only German capitalises common nouns; in the other lists a capital marks a
# proper name or an abbreviation, which says little about the language.
LANGUAGES = {
    "English": ("american-english", "wamerican", False),
    "German": ("ngerman", "wngerman", True),
    "French": ("french", "wfrench", False),
    "Spanish": ("spanish", "wspanish", False),
    "Italian": ("italian", "witalian", False),
}


def parse_file(path: str | os.PathLike, package: str = "wamerican",
               keep_capitalised: bool = True, min_length: int = 1) -> tuple[str, ...]:
  """Distinct lower-cased words of a list, in file order.

  Skipped: possessives and elisions (anything with an apostrophe), words with
  non-letters (hyphens, digits, dots), words shorter than `min_length`, and
  capitalised words unless `keep_capitalised`.
  """
  seen, words = set(), []
  for line in sources.read_text(path, package).splitlines():
    w = line.strip()
    if len(w) < min_length or not w.isalpha():  # isalpha() is False for "'", "-", digits
      continue
    if not keep_capitalised and w[0].isupper():
      continue
    w = w.lower()
    if w not in seen:
      seen.add(w)
      words.append(w)
  return tuple(words)


def load_languages(root: str | os.PathLike, languages: tuple[str, ...],
                   min_length: int) -> dict[str, tuple[str, ...]]:
  """Words per language, with every word found in two or more lists dropped (ambiguous)."""
  per_lang = {}
  for lang in languages:
    if lang not in LANGUAGES:
      raise ValueError(f"unknown language {lang!r}; expected one of {sorted(LANGUAGES)}")
    fname, package, keep_caps = LANGUAGES[lang]
    path = os.path.join(root, fname)
    per_lang[lang] = sources.cached(path, parse_file, package, keep_caps, min_length)
  counts: dict[str, int] = {}
  for words in per_lang.values():
    for w in words:
      counts[w] = counts.get(w, 0) + 1
  return {lang: tuple(w for w in words if counts[w] == 1) for lang, words in per_lang.items()}
