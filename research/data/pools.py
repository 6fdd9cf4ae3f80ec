"""Example pools: every (text, label) a task can draw from, built from parsed sources.

WordNet synsets are partitioned once, independent of any seed, so that no gloss
feeds two tasks (see `WordNet.owner`): a synset with a topic-domain label
belongs to `topic`; adjectives, adverbs and one hash shard of nouns and verbs
to `pos`; the remaining verbs to `verb_category` and nouns to the control
task. A definition text shared by synsets of two owners is dropped from both.
The two fortune tasks read disjoint files and drop texts found in the other's.
"""
from __future__ import annotations

import os
import re
import zlib

from research.data import fortunes, sources, wordlists, wordnet

# Coarse topic -> lemmas whose synset (a topic domain or one of its hypernyms)
# stands for it. The nearest matching ancestor of a domain decides.
TOPIC_ROOTS = {
    "law": ("law",),
    "military": ("military",),
    "sport": ("sport",),
    "music": ("music",),
    "religion": ("religion",),
    "medicine": ("medicine", "medical science", "medical care"),
    "biology": ("biology",),
    "chemistry": ("chemistry",),
    "physics": ("physics",),
    "mathematics": ("mathematics",),
    "computing": ("computer science", "computer"),
    "mythology": ("mythology",),
}
TOPICS = tuple(TOPIC_ROOTS)
_TOPIC_OF_LEMMA = {lemma: t for t, lemmas in TOPIC_ROOTS.items() for lemma in lemmas}

POS_SHARD = 0  # nouns / verbs with crc32 % NUM_SHARDS == POS_SHARD go to `pos`
NUM_SHARDS = 8

MIN_GLOSS_WORDS = 2  # one-word "definitions" are synonyms (and collide with word lists)
_LEADING_LABEL = re.compile(r"^\([^()]*\)\s*")


def shard(s: wordnet.Synset) -> int:
  return zlib.crc32(f"{s.pos}{s.offset:08d}".encode()) % NUM_SHARDS


def gloss_text(s: wordnet.Synset) -> str:
  """The definition without a leading usage label such as `(law)` or `(botany)`.

  The label often names the answer (a topic domain or a supersense), so it is
  dropped. "" when fewer than MIN_GLOSS_WORDS words are left.
  """
  text = _LEADING_LABEL.sub("", s.definition).strip()
  return text if len(text.split()) >= MIN_GLOSS_WORDS else ""


class WordNet:
  """All four data files of a WordNet root, indexed by (offset, pos)."""

  def __init__(self, root: str | os.PathLike):  # parsing is memoised by sources.cached
    self.by_key = {}
    self._domain_topic = {}  # (offset, pos) of a domain synset -> topic or None
    for pos in wordnet.POS_FILES:
      for s in wordnet.load(root, pos):
        self.by_key[(s.offset, s.pos)] = s
    self._owners_of_text: dict[str, set[str]] = {}
    for s in self.by_key.values():
      self._owners_of_text.setdefault(gloss_text(s), set()).add(self.owner(s))

  @classmethod
  def load(cls, root: str | os.PathLike) -> "WordNet":
    """The index of `root`, memoised on the versions of its four data files."""
    paths = [os.path.join(root, f"data.{p}") for p in wordnet.POS_FILES]
    return sources.cached(paths[0], _build_wordnet, os.fspath(root),
                          depends_on=tuple(paths[1:]))

  def synsets(self, pos: str | None = None):
    return [s for s in self.by_key.values() if pos is None or s.pos == pos]

  def ancestors(self, s: wordnet.Synset):
    """`s` and its hypernyms (instance hypernyms too), breadth first."""
    seen, frontier, out = {(s.offset, s.pos)}, [s], [s]
    while frontier:
      nxt = []
      for x in frontier:
        for sym, off, pos in x.pointers:
          key = (off, pos)
          if sym in ("@", "@i") and key in self.by_key and key not in seen:
            seen.add(key)
            nxt.append(self.by_key[key])
      out.extend(nxt)
      frontier = nxt
    return out

  def topic_of(self, s: wordnet.Synset) -> str | None:
    """The coarse topic of `s`'s topic-domain pointers (`;c`): None if none, "" if conflicting.

    A domain maps to the topic of its nearest ancestor (itself first) whose
    first lemma is in TOPIC_ROOTS, so `psychiatry -> medicine -> medical
    science -> ...` maps to medicine and `baseball -> ... -> sport` to sport.
    """
    found = set()
    for sym, off, pos in s.pointers:
      domain = self.by_key.get((off, pos)) if sym == ";c" else None
      if domain is None:
        continue
      key = (off, pos)
      if key not in self._domain_topic:
        self._domain_topic[key] = next((_TOPIC_OF_LEMMA[a.words[0]] for a in self.ancestors(domain)
                                        if a.words[0] in _TOPIC_OF_LEMMA), None)
      if self._domain_topic[key] is not None:
        found.add(self._domain_topic[key])
    if not found:
      return None
    return found.pop() if len(found) == 1 else ""  # "": conflicting topics

  def owner(self, s: wordnet.Synset) -> str:
    """Which task's pool a synset belongs to: 'topic', 'pos', 'verb', or 'noun'."""
    if self.topic_of(s) is not None:
      return "topic"
    if s.pos in ("a", "r") or shard(s) == POS_SHARD:
      return "pos"
    return {"n": "noun", "v": "verb"}[s.pos]

  def exclusive_text(self, s: wordnet.Synset) -> str:
    """`gloss_text(s)` if no synset of another owner has the same text, else ""."""
    t = gloss_text(s)
    return t if len(self._owners_of_text[t]) == 1 else ""


def _build_wordnet(_, root: str) -> WordNet:
  return WordNet(root)


def lexname_pool(root, pos: str, lexnames: tuple[str, ...], owner: str):
  """Gloss -> index of its lexicographer file, for synsets owned by `owner`."""
  wn = WordNet.load(root)
  label = {name: i for i, name in enumerate(lexnames)}
  texts, labels = [], []
  for s in wn.synsets(pos):
    if s.lexname in label and wn.owner(s) == owner:
      t = wn.exclusive_text(s)
      if t:
        texts.append(t)
        labels.append(label[s.lexname])
  return texts, labels


def pos_pool(root):
  """Gloss -> part of speech (0 noun, 1 verb, 2 adjective, 3 adverb)."""
  wn = WordNet.load(root)
  label = {"n": 0, "v": 1, "a": 2, "r": 3}
  texts, labels = [], []
  for s in wn.synsets():
    t = wn.exclusive_text(s)
    if t and wn.owner(s) == "pos":
      texts.append(t)
      labels.append(label[s.pos])
  return texts, labels


def topic_pool(root):
  """Gloss -> index of its coarse topic in TOPICS (synsets with one topic only)."""
  wn = WordNet.load(root)
  label = {t: i for i, t in enumerate(TOPICS)}
  texts, labels = [], []
  for s in wn.synsets():
    topic = wn.topic_of(s)
    t = wn.exclusive_text(s)
    if t and topic in label:
      texts.append(t)
      labels.append(label[topic])
  return texts, labels


def fortune_pool(root, categories: tuple[str, ...], max_chars: int,
                 exclude: tuple[str, ...] = ()):
  """Fortune text -> index of its category file.

  Entries longer than `max_chars` are dropped, and so are entries that also
  occur in one of the `exclude` files (another task's).
  """
  excluded = {e for cat in exclude for e in fortunes.load(root, cat)}
  texts, labels = [], []
  for i, cat in enumerate(categories):
    for e in fortunes.load(root, cat):
      if len(e) <= max_chars and e not in excluded:
        texts.append(e)
        labels.append(i)
  return texts, labels


def language_pool(root, languages: tuple[str, ...], min_length: int):
  """Word -> language, words found in two lists dropped."""
  per_lang = wordlists.load_languages(root, languages, min_length)
  texts, labels = [], []
  for i, lang in enumerate(languages):
    texts.extend(per_lang[lang])
    labels.extend([i] * len(per_lang[lang]))
  return texts, labels
