"""Task registry and load_task on fake WordNet / fortune / word-list roots, and on the real files."""
import itertools
import os

import numpy as np
import pytest

from research import data
from research.data import fortunes, pools, sources, tasks, wordnet

HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n")

# Offsets are chosen for their hash shard (pools.shard): nouns 5000/9000 and
# verb 2000 fall in the `pos` shard, the others do not (checked below).
FAKE_WORDNET = {
    "data.noun": HEADER + (
        '00001000 05 n 02 dog 0 domestic_dog 0 001 @ 00002000 n 0000 | a member of the genus Canis; "the dog barked"  \n'
        "00002000 05 n 01 animal 0 000 | a living organism characterized by voluntary movement  \n"
        "00003000 13 n 01 bread 0 000 | (baking) food made from dough of flour or meal  \n"
        "00004000 06 n 01 gavel 0 001 ;c 00006000 n 0000 | a small mallet used by a presiding officer  \n"
        "00005000 06 n 01 hammer 0 000 | a hand tool with a heavy head  \n"
        "00006000 14 n 02 law 0 jurisprudence 0 000 | the collection of rules imposed by authority  \n"
        "00007000 04 n 01 sport 0 000 | an active diversion requiring physical exertion  \n"
        "00008000 04 n 01 baseball 0 001 @ 00007000 n 0000 | a ball game played with a bat and ball  \n"
        "00009000 09 n 01 idea 0 000 | the content of cognition  \n"
        "00010000 06 n 01 mallet 0 000 | a hand tool with a heavy head  \n"
        "00011000 13 n 01 pud 0 000 | pudding  \n"
        "00012000 03 n 01 entity 0 000 | that which is perceived to have its own distinct existence  \n"),
    "data.verb": HEADER + (
        "00001000 38 v 01 run 0 001 @ 00003000 v 0000 01 + 02 00 | move fast by using one's feet; \"Don't run\"  \n"
        "00002000 29 v 01 breathe 0 000 01 + 02 00 | draw air into, and expel out of, the lungs  \n"
        "00003000 38 v 01 travel 0 000 01 + 02 00 | change location; move, travel, or proceed  \n"
        "00004000 43 v 01 rain 0 000 01 + 01 00 | precipitate as rain  \n"
        "00005000 33 v 01 bunt 0 001 ;c 00008000 n 0000 01 + 02 00 | hit a baseball lightly  \n"),
    "data.adj": HEADER + (
        "00001000 00 a 01 able(a) 0 000 | (usually followed by `to') having the necessary means; \"able to swim\"  \n"
        "00002000 00 s 01 big(p) 0 000 | above average in size; \"a big car\"  \n"
        "00003000 01 a 01 legal 0 001 ;c 00006000 n 0000 | established by law  \n"),
    "data.adv": HEADER + "00001000 02 r 01 quickly 0 000 | with rapid movements; \"he works quickly\"  \n",
}


@pytest.fixture
def wordnet_root(tmp_path):
  for name, text in FAKE_WORDNET.items():
    (tmp_path / name).write_text(text)
  return tmp_path


def _fortune_files(root, per_file=10, sizes=None):
  for cat in tasks.FORTUNE_TOPICS + tasks.FORTUNE_GENRES:
    n = (sizes or {}).get(cat, per_file)
    (root / cat).write_text("".join(f"Fortune number {i} from the {cat} file.\n%\n" for i in range(n)))
  return root


FAKE_DICT = {"american-english": "house\nhouse's\ntable\nhand\nBoston\ndoor\n",
             "ngerman": "Haus\nTisch\nHand\n", "french": "maison\ntable\n", "spanish": "casa\nmesa\n",
             "italian": "casa\ntavolo\n"}


@pytest.fixture
def dict_root(tmp_path):
  for name, text in FAKE_DICT.items():
    (tmp_path / name).write_text(text)
  return tmp_path


# ---------------------------------------------------------------- registry

def test_registry_complete():
  assert len(data.TASKS) >= 6 and len(set(data.TASKS)) == len(data.TASKS)
  assert data.CONTROL_TASK not in data.TASKS
  assert data.task_names() == data.TASKS
  assert data.task_names(include_control=True) == data.TASKS + (data.CONTROL_TASK,)
  for name in data.task_names(include_control=True):
    s = data.spec(name)
    assert s.name == name and s.source in data.DEFAULT_ROOTS
    assert len(s.class_names) >= 2 and len(set(s.class_names)) == len(s.class_names)
    assert s.templates and all(t.count("{}") == 1 for t in s.templates)
  assert len(data.spec("verb_category").class_names) == 15
  assert len(data.spec(data.CONTROL_TASK).class_names) == 25


def test_unknown_task():
  with pytest.raises(KeyError, match="unknown task 'nope'; known tasks: verb_category"):
    data.load_task("nope")


# ---------------------------------------------------------------- pools on fake files

def test_fake_offsets_land_in_intended_shards():
  def shard(pos, offset):
    return pools.shard(wordnet.Synset(offset, pos, "noun.act", ("w",), (), "a gloss"))
  assert [shard("n", o) == pools.POS_SHARD for o in (1000, 2000, 3000, 5000, 9000, 10000)] == [
      False, False, False, True, True, False]
  assert [shard("v", o) == pools.POS_SHARD for o in (1000, 2000, 3000, 4000)] == [False, True, False, False]


def test_wordnet_pools_exact(wordnet_root):
  noun = tasks.NOUN_LEXNAMES.index
  # Dropped: hammer/mallet (same text, two owners), pud (one word), entity (noun.Tops),
  # gavel (topic-owned), idea (pos shard).
  texts, labels = data.pool(data.CONTROL_TASK, wordnet_root)
  assert texts == [
      "a member of the genus Canis", "a living organism characterized by voluntary movement",
      "food made from dough of flour or meal", "the collection of rules imposed by authority",
      "an active diversion requiring physical exertion", "a ball game played with a bat and ball"]
  assert labels.tolist() == [noun("noun.animal"), noun("noun.animal"), noun("noun.food"),
                             noun("noun.group"), noun("noun.act"), noun("noun.act")]
  texts, labels = data.pool("verb_category", wordnet_root)
  verb = tasks.VERB_LEXNAMES.index
  assert texts == ["move fast by using one's feet", "change location; move, travel, or proceed",
                   "precipitate as rain"]
  assert labels.tolist() == [verb("verb.motion"), verb("verb.motion"), verb("verb.weather")]
  texts, labels = data.pool("pos", wordnet_root)
  assert texts == ["the content of cognition", "draw air into, and expel out of, the lungs",
                   "having the necessary means", "above average in size", "with rapid movements"]
  assert labels.tolist() == [0, 1, 2, 2, 3]
  texts, labels = data.pool("topic", wordnet_root)
  assert texts == ["a small mallet used by a presiding officer", "hit a baseball lightly",
                   "established by law"]
  assert [pools.TOPICS[y] for y in labels] == ["law", "sport", "law"]  # bunt -> baseball -> sport
  assert labels.dtype == np.int32


def test_fortune_pools_exclude_other_task_and_junk(tmp_path):
  root = _fortune_files(tmp_path, per_file=2)
  shared = "A fortune that is in two files."
  with open(root / "food", "a") as f:
    f.write(f"{shared}\n%\n+--+--+\n|##|##|\n+--+--+\n%\n{'x' * 401}\n%\n")
  with open(root / "riddles", "a") as f:
    f.write(f"{shared}\n%\n")
  texts, labels = data.pool("fortune_topic", root)
  assert len(texts) == 16 and shared not in texts
  assert texts[:2] == ["Fortune number 0 from the computers file.", "Fortune number 1 from the computers file."]
  np.testing.assert_array_equal(labels, np.repeat(np.arange(8), 2))
  texts, labels = data.pool("fortune_genre", root)
  assert len(texts) == 10 and shared not in texts


def test_language_pool_exact(dict_root):
  texts, labels = data.pool("language", dict_root)
  assert texts == ["house", "door", "haus", "tisch", "maison", "mesa", "tavolo"]
  assert labels.tolist() == [0, 0, 1, 1, 2, 3, 4]


def test_class_counts(dict_root):
  assert data.class_counts("language", dict_root) == {
      "English": 2, "German": 2, "French": 1, "Spanish": 1, "Italian": 1}


# ---------------------------------------------------------------- load_task

def test_load_task_shapes_and_types(tmp_path):
  task = data.load_task("fortune_topic", (16, 8, 24), seed=0, root=_fortune_files(tmp_path))
  assert isinstance(task, data.Task) and task.name == "fortune_topic"
  assert task.class_names == data.spec("fortune_topic").class_names and task.num_classes == 8
  for split, n in ((task.train, 16), (task.val, 8), (task.test, 24)):
    texts, labels = split
    assert isinstance(texts, list) and len(texts) == n
    assert labels.dtype == np.int32 and labels.shape == (n,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=8), np.full(8, n // 8))
    for t, y in zip(texts, labels):  # each text keeps its own label
      assert f"the {tasks.FORTUNE_TOPICS[y]} file" in t


def test_load_task_disjoint_deterministic_and_seeded(tmp_path):
  root = _fortune_files(tmp_path)
  a = data.load_task("fortune_genre", (20, 10, 15), seed=0, root=root)
  b = data.load_task("fortune_genre", n_train=20, n_val=10, n_test=15, seed=0, root=root)
  c = data.load_task("fortune_genre", (20, 10, 15), seed=1, root=root)
  for name in ("train", "val", "test"):
    assert getattr(a, name).texts == getattr(b, name).texts
    np.testing.assert_array_equal(getattr(a, name).labels, getattr(b, name).labels)
  assert a.test.texts != c.test.texts
  for x, y in itertools.combinations((a.train, a.val, a.test), 2):
    assert not set(x.texts) & set(y.texts)
  # Evaluation splits are drawn first: changing n_train leaves them unchanged.
  d = data.load_task("fortune_genre", (25, 10, 15), seed=0, root=root)
  assert d.test.texts == a.test.texts and d.val.texts == a.val.texts


def test_load_task_balance_cap_with_small_class(tmp_path):
  root = _fortune_files(tmp_path, per_file=12, sizes={"riddles": 3})
  task = data.load_task("fortune_genre", (30, 5, 10), seed=0, root=root)
  np.testing.assert_array_equal(np.bincount(task.test.labels, minlength=5), [2, 2, 2, 2, 2])
  np.testing.assert_array_equal(np.bincount(task.val.labels, minlength=5), [1, 1, 1, 1, 1])
  # riddles has 0 left for train; the other four share 30 equally (each <= 9 left).
  np.testing.assert_array_equal(np.bincount(task.train.labels, minlength=5), [0, 8, 8, 7, 7])


def test_load_task_too_many(tmp_path):
  root = _fortune_files(tmp_path, per_file=3)
  with pytest.raises(ValueError, match=r"task 'fortune_genre' has 15 examples .* asks for 16"):
    data.load_task("fortune_genre", (10, 3, 3), root=root)
  with pytest.warns(UserWarning, match=r"using \(9, 3, 3\)"):
    task = data.load_task("fortune_genre", (10, 3, 3), root=root, allow_fewer=True)
  assert len(task.train.texts) == 9


@pytest.mark.parametrize("sizes", [(1, 2), (-1, 2, 3), (1.5, 2, 3)])
def test_load_task_bad_sizes(tmp_path, sizes):
  with pytest.raises(ValueError, match="split"):
    data.load_task("fortune_genre", sizes, root=_fortune_files(tmp_path))


def test_wordnet_task_splits_by_synset(wordnet_root):
  task = data.load_task("verb_category", (1, 1, 1), seed=0, root=wordnet_root)
  texts = task.train.texts + task.val.texts + task.test.texts
  assert sorted(texts) == sorted(data.pool("verb_category", wordnet_root)[0])


# ---------------------------------------------------------------- missing files

@pytest.mark.parametrize("task,missing,package", [
    ("fortune_topic", "computers", "fortunes"),
    ("fortune_genre", "riddles", "fortunes-min"),
    ("language", "ngerman", "wngerman"),
    ("language", "italian", "witalian"),
    ("pos", "data.adv", "wordnet-base"),
])
def test_missing_file_names_path_and_package(tmp_path, task, missing, package):
  source = data.spec(task).source
  root = tmp_path / source
  root.mkdir()
  if source == "fortunes":
    _fortune_files(root)
  write = {"wordnet": FAKE_WORDNET, "dict": FAKE_DICT}.get(source, {})
  for name, text in write.items():
    (root / name).write_text(text)
  os.remove(root / missing)
  with pytest.raises(FileNotFoundError) as e:
    data.load_task(task, (1, 1, 1), root=root)
  assert str(root / missing) in str(e.value)
  assert f"apt-get install {package}" in str(e.value)
  assert isinstance(e.value, sources.MissingDataError)


def test_fortune_package_table():
  assert set(fortunes.MIN_FILES) == {"fortunes", "literature", "riddles"}


# ---------------------------------------------------------------- the real installed files

_REAL = all(os.path.isfile(p) for p in (
    "/usr/share/wordnet/data.noun", "/usr/share/games/fortunes/food", "/usr/share/games/fortunes/riddles",
    "/usr/share/dict/american-english", "/usr/share/dict/ngerman", "/usr/share/dict/french",
    "/usr/share/dict/spanish", "/usr/share/dict/italian"))


@pytest.mark.skipif(not _REAL, reason="Debian data packages not installed (make data)")
def test_real_tasks_load_and_pools_are_disjoint():
  texts = {}
  for name in data.task_names(include_control=True):
    task = data.load_task(name, (96, 48, 60), seed=0)
    k = task.num_classes
    for split, n in ((task.train, 96), (task.val, 48), (task.test, 60)):
      assert len(split.texts) == n and split.labels.shape == (n,)
      counts = np.bincount(split.labels, minlength=k)
      assert counts.max() - counts.min() <= 1, (name, counts)  # every class has enough here
      assert all(isinstance(t, str) and t.strip() for t in split.texts)
    texts[name] = set(data.pool(name)[0])
  for a, b in itertools.combinations(texts, 2):
    assert not texts[a] & texts[b], (a, b, sorted(texts[a] & texts[b])[:3])
