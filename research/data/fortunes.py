"""Fortune-cookie file parser (Debian packages `fortunes`, `fortunes-min`).

A category file holds entries separated by lines that are exactly `%`.
"""
from __future__ import annotations

import os
import re

from research.data import sources

PACKAGE = "fortunes"
# Files that ship in `fortunes-min` rather than `fortunes`.
MIN_FILES = ("fortunes", "literature", "riddles")
# Entries whose non-space characters are mostly not letters are ASCII art or tables.
MIN_LETTER_FRACTION = 0.6


def split_entries(text: str) -> list[str]:
  """The raw entries of a fortune file: split on `%` lines, stripped, empties dropped."""
  entries, current = [], []
  for line in text.splitlines():
    if line.strip() == "%":
      entries.append("\n".join(current).strip())
      current = []
    else:
      current.append(line)
  entries.append("\n".join(current).strip())
  return [e for e in entries if e]


def is_prose(entry: str) -> bool:
  chars = [c for c in entry if not c.isspace()]
  return bool(chars) and sum(c.isalpha() for c in chars) >= MIN_LETTER_FRACTION * len(chars)


def clean(entry: str) -> str:
  """Whitespace (newlines, tab indents) collapsed to single spaces."""
  return re.sub(r"\s+", " ", entry).strip()


def parse_file(path: str | os.PathLike) -> tuple[str, ...]:
  """Cleaned prose entries of one category file, in file order."""
  package = "fortunes-min" if os.path.basename(path) in MIN_FILES else PACKAGE
  text = sources.read_text(path, package)
  return tuple(clean(e) for e in split_entries(text) if is_prose(e))


def load(root: str | os.PathLike, category: str) -> tuple[str, ...]:
  return sources.cached(os.path.join(root, category), parse_file)
