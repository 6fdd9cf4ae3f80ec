"""The task registry and `load_task`: text classification tasks with zero-shot class names.

Each task is a pool of (text, label) examples from one Debian-packaged source
plus the class names and prompt templates that build its frozen zero-shot
head (the class-name embedding of `template.format(name)`, averaged over
templates). See research/data/TASKS.md for provenance, sizes and licences.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
import zlib
from typing import Callable, Mapping, NamedTuple

import numpy as np

from research.data import pools, sources, splits

PathLike = str | os.PathLike


class Split(NamedTuple):
  """One split: `texts, labels = task.train`."""
  texts: list[str]
  labels: np.ndarray  # int32, shape [len(texts)]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A loaded task. The zero-shot head embeds `template.format(c)` for each class
  name `c` (averaged over templates); labels index `class_names`."""
  name: str
  class_names: tuple[str, ...]
  templates: tuple[str, ...]
  train: Split
  val: Split
  test: Split

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registry entry: where the examples come from and how the head is prompted."""
  name: str
  source: str  # key of sources.DEFAULT_ROOTS
  class_names: tuple[str, ...]
  templates: tuple[str, ...]
  pool: Callable[[str], tuple[list[str], list[int]]]  # root -> (texts, labels)
  description: str


VERB_LEXNAMES = (
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather")
VERB_CLASS_NAMES = (
    "the body", "changing something", "thinking", "communicating", "competing or fighting",
    "eating and drinking", "touching", "making something", "feeling", "moving",
    "seeing, hearing and sensing", "owning or giving", "social interaction",
    "being or having a state", "the weather")

NOUN_LEXNAMES = (
    "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity",
    "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time")
NOUN_CLASS_NAMES = (
    "an act or activity", "an animal", "a man-made object", "an attribute or quality",
    "a body part", "knowledge or thought", "language and communication", "an event",
    "a feeling or emotion", "food or drink", "a group of people or things", "a place",
    "a motive or reason", "a natural object", "a person", "a natural phenomenon", "a plant",
    "money and possessions", "a natural process", "a quantity or measure", "a relation",
    "a shape", "a condition or state", "a substance or material", "time")

POS_CLASS_NAMES = ("noun (a thing)", "verb (an action)", "adjective (a quality)",
                   "adverb (a manner)")
TOPIC_CLASS_NAMES = tuple({"military": "the military", "sport": "sports"}.get(t, t)
                          for t in pools.TOPICS)

# Fortune files per task; the two tasks use disjoint files, so disjoint texts.
FORTUNE_TOPICS = ("computers", "food", "law", "love", "politics", "science", "sports",
                  "startrek")
FORTUNE_TOPIC_NAMES = ("computers and programming", "food and eating", "lawyers and the law",
                       "love and romance", "politics and government", "science and scientists",
                       "sports", "Star Trek")
FORTUNE_GENRES = ("riddles", "definitions", "songs-poems", "knghtbrd", "zippy")
FORTUNE_GENRE_NAMES = ("a riddle", "a dictionary definition", "a poem or song",
                       "an online chat", "a silly exclamation")
FORTUNE_MAX_CHARS = 400  # longer entries would be truncated by the encoder anyway
LANGUAGES = ("English", "German", "French", "Spanish", "Italian")
MIN_WORD_LENGTH = 4  # short words are too often shared or uninformative

# Templates and class names were chosen for zero-shot accuracy on validation
# examples with all-MiniLM-L6-v2 (research/data/TASKS.md lists the numbers).
_SPECS = (
    TaskSpec("verb_category", "wordnet", VERB_CLASS_NAMES, ("This is about {}.",),
             lambda root: pools.lexname_pool(root, "v", VERB_LEXNAMES, "verb"),
             "WordNet verb gloss -> verb supersense (lexicographer file)"),
    TaskSpec("pos", "wordnet", POS_CLASS_NAMES, ("This is the definition of {}.",),
             pools.pos_pool,
             "WordNet gloss -> part of speech of the defined word"),
    TaskSpec("topic", "wordnet", TOPIC_CLASS_NAMES, ("This is about {}.",),
             pools.topic_pool,
             "WordNet gloss -> coarse topic domain (from ;c pointers)"),
    TaskSpec("fortune_topic", "fortunes", FORTUNE_TOPIC_NAMES, ("This is about {}.",),
             lambda root: pools.fortune_pool(root, FORTUNE_TOPICS, FORTUNE_MAX_CHARS,
                                             exclude=FORTUNE_GENRES),
             "fortune-cookie text -> topical category file"),
    TaskSpec("fortune_genre", "fortunes", FORTUNE_GENRE_NAMES, ("This is {}.",),
             lambda root: pools.fortune_pool(root, FORTUNE_GENRES, FORTUNE_MAX_CHARS,
                                             exclude=FORTUNE_TOPICS),
             "fortune-cookie text -> genre (riddle, definition, verse, chat, exclamation)"),
    TaskSpec("language", "dict", LANGUAGES, ("A word in {}.",),
             lambda root: pools.language_pool(root, LANGUAGES, MIN_WORD_LENGTH),
             "spell-checker word -> language (words in two lists dropped)"),
    TaskSpec("noun_category", "wordnet", NOUN_CLASS_NAMES, ("This is about {}.",),
             lambda root: pools.lexname_pool(root, "n", NOUN_LEXNAMES, "noun"),
             "WordNet noun gloss -> noun supersense; the broad control task"),
)
REGISTRY: Mapping[str, TaskSpec] = {s.name: s for s in _SPECS}
CONTROL_TASK = "noun_category"
TASKS = tuple(s.name for s in _SPECS if s.name != CONTROL_TASK)


def task_names(include_control: bool = False) -> tuple[str, ...]:
  return TASKS + (CONTROL_TASK,) if include_control else TASKS


def spec(name: str) -> TaskSpec:
  if name not in REGISTRY:
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def pool(name: str, root: PathLike | None = None) -> tuple[list[str], np.ndarray]:
  """Every deduplicated example of a task, in a fixed order (before any split)."""
  s = spec(name)
  texts, labels = s.pool(sources.root_for(s.source, root))
  return splits.dedupe(texts, labels)


def class_counts(name: str, root: PathLike | None = None) -> dict[str, int]:
  """Examples available per class name (after deduplication)."""
  _, labels = pool(name, root)
  counts = np.bincount(labels, minlength=len(spec(name).class_names))
  return dict(zip(spec(name).class_names, counts.tolist()))


DEFAULT_SPLIT_SIZES = (1024, 256, 512)


def load_task(name: str, split_sizes: tuple[int, int, int] | None = None, *,
              n_train: int | None = None, n_val: int | None = None,
              n_test: int | None = None, seed: int = 0, root: PathLike | None = None,
              allow_fewer: bool = False) -> Task:
  """Loads a task with class-balanced, disjoint train / val / test splits.

  Sizes come from `split_sizes=(n_train, n_val, n_test)` or the keywords
  (a keyword overrides the tuple; defaults DEFAULT_SPLIT_SIZES). Splits are
  disjoint by example; texts are deduplicated first and, for WordNet, one
  synset is one example, so a gloss never appears in two splits. Each split is
  balanced over classes up to what small classes have (`splits.balanced_quota`);
  test is drawn first, then val, then train, so the evaluation splits do not
  depend on `n_train`. Deterministic in (`name`, `seed`).

  Asking for more examples than the task has raises ValueError (listing what
  is available), unless `allow_fewer=True`, which shrinks train, then val,
  then test to fit and warns.

  `root` is the folder of the task's source (`spec(name).source`: the WordNet,
  fortunes or dict folder); None uses the Debian location. A missing file
  raises FileNotFoundError naming the path and the package to install.
  """
  s = spec(name)
  sizes = list(split_sizes if split_sizes is not None else DEFAULT_SPLIT_SIZES)
  if len(sizes) != 3:
    raise ValueError(f"split_sizes must be (n_train, n_val, n_test), got {split_sizes!r}")
  for i, v in enumerate((n_train, n_val, n_test)):
    if v is not None:
      sizes[i] = v
  if any(int(v) != v or v < 0 for v in sizes):
    raise ValueError(f"split sizes must be non-negative integers, got {tuple(sizes)}")
  sizes = [int(v) for v in sizes]
  texts, labels = pool(name, root)
  total = len(texts)
  if sum(sizes) > total:
    counts = class_counts(name, root)
    msg = (f"task {name!r} has {total} examples but (n_train, n_val, n_test) = "
           f"{tuple(sizes)} asks for {sum(sizes)}; per class: {counts}")
    if not allow_fewer:
      raise ValueError(msg + "; ask for fewer or pass allow_fewer=True")
    excess = sum(sizes) - total
    for i in range(3):
      cut = min(excess, sizes[i])
      sizes[i] -= cut
      excess -= cut
    warnings.warn(msg + f"; using {tuple(sizes)}", stacklevel=2)
  seed_seq = (seed, zlib.crc32(name.encode()))
  parts = splits.split_indices(labels, len(s.class_names), sizes, seed_seq)
  train, val, test = (Split([texts[i] for i in ix], labels[ix]) for ix in parts)
  return Task(name, s.class_names, s.templates, train, val, test)
