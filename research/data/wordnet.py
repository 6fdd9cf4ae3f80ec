"""WordNet 3.0 `data.<pos>` file parser (Debian package `wordnet-base`).

Format (wndb(5WN)): after a license header whose lines start with two spaces,
one synset per line:

  offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt
  [ptr_symbol offset pos source/target...] [frames...] | gloss

`w_cnt` and `lex_id` are hexadecimal, `p_cnt` is decimal, `lex_filenum`
indexes `LEXNAMES` (the lexicographer files, the "supersenses").
"""
from __future__ import annotations

import dataclasses
import os
import re

from research.data import sources

POS_FILES = ("noun", "verb", "adj", "adv")

# The 45 lexicographer file names, by lex_filenum (WordNet 3.0 lexnames(5WN)).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape",
    "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)

# Adjective syntactic markers glued to a word: `big(a)`, `galore(ip)`.
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


@dataclasses.dataclass(frozen=True)
class Synset:
  """One synset line: `pos` is the ss_type folded to n/v/a/r (satellites `s` -> `a`)."""
  offset: int
  pos: str
  lexname: str
  words: tuple[str, ...]
  pointers: tuple[tuple[str, int, str], ...]  # (symbol, target offset, target pos)
  gloss: str

  @property
  def definition(self) -> str:
    return gloss_definition(self.gloss)


def gloss_definition(gloss: str) -> str:
  """The definition part of a gloss: the text before its first `; "example"`."""
  text = gloss.split('; "', 1)[0].strip()
  if text.startswith('"'):  # the gloss is only an example sentence
    return ""
  return text.strip(' ;"').strip()


def _word(raw: str) -> str:
  return _ADJ_MARKER.sub("", raw).replace("_", " ")


def parse_line(line: str) -> Synset:
  """Parses one synset line; raises ValueError naming the line if malformed."""
  head, sep, gloss = line.partition(" | ")
  if not sep:
    head, gloss = line.rstrip().rstrip("|"), ""
  fields = head.split()
  try:
    offset, lex_filenum, ss_type = int(fields[0]), int(fields[1]), fields[2]
    w_cnt = int(fields[3], 16)
    words = tuple(_word(fields[4 + 2 * i]) for i in range(w_cnt))
    i = 4 + 2 * w_cnt
    p_cnt = int(fields[i])
    pointers = tuple(
        (fields[i + 1 + 4 * k], int(fields[i + 2 + 4 * k]), fields[i + 3 + 4 * k])
        for k in range(p_cnt))
    lexname = LEXNAMES[lex_filenum]
  except (IndexError, ValueError) as e:
    raise ValueError(f"malformed WordNet synset line: {line[:80]!r}") from e
  pos = "a" if ss_type == "s" else ss_type
  pointers = tuple((s, o, "a" if p == "s" else p) for s, o, p in pointers)
  return Synset(offset, pos, lexname, words, pointers, gloss.strip())


def parse_data_file(path: str | os.PathLike) -> tuple[Synset, ...]:
  """All synsets of one `data.<pos>` file, in file order (license header skipped)."""
  text = sources.read_text(path, "wordnet-base", encoding="latin-1")
  return tuple(parse_line(l) for l in text.splitlines() if l.strip() and not l.startswith("  "))


def load(root: str | os.PathLike, pos: str) -> tuple[Synset, ...]:
  """Synsets of `root/data.<pos>` for pos in POS_FILES (cached per file version)."""
  if pos not in POS_FILES:
    raise ValueError(f"unknown WordNet part of speech {pos!r}; expected one of {POS_FILES}")
  return sources.cached(os.path.join(root, f"data.{pos}"), parse_data_file)
