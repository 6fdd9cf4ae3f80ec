"""Parsers, splits and batching of research.data on tiny hand-written files."""
import numpy as np
import pytest

from research.data import batching, fortunes, splits, wordlists, wordnet

HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
    "  3   \n")


# ---------------------------------------------------------------- WordNet

def test_lexnames_table():
  assert len(wordnet.LEXNAMES) == 45
  assert wordnet.LEXNAMES[0] == "adj.all"
  assert wordnet.LEXNAMES[3] == "noun.Tops"
  assert wordnet.LEXNAMES[4] == "noun.act"
  assert wordnet.LEXNAMES[28] == "noun.time"
  assert wordnet.LEXNAMES[29] == "verb.body"
  assert wordnet.LEXNAMES[43] == "verb.weather"
  assert wordnet.LEXNAMES[44] == "adj.ppl"
  assert len(set(wordnet.LEXNAMES)) == 45


def test_parse_verb_line_with_frames():
  line = ("00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 "
          "@ 00002325 v 0000 + 00831191 n 0303 02 + 02 00 + 08 00 | draw air into, "
          "and expel out of, the lungs; \"I can breathe better now\"; \"Breathe!\"  \n")
  s = wordnet.parse_line(line)
  assert s.offset == 1740 and s.pos == "v" and s.lexname == "verb.body"
  assert s.words == ("breathe", "take a breath", "respire", "suspire")
  assert s.pointers == (("@", 2325, "v"), ("+", 831191, "n"))
  assert s.gloss == 'draw air into, and expel out of, the lungs; "I can breathe better now"; "Breathe!"'
  assert s.definition == "draw air into, and expel out of, the lungs"


def test_parse_adjective_satellite_and_markers():
  s = wordnet.parse_line("00002000 00 s 02 big(p) 0 large 1 001 & 00001000 s 0000 | above average "
                         "in size; \"a big car\"  \n")
  assert s.pos == "a" and s.lexname == "adj.all"
  assert s.words == ("big", "large")
  assert s.pointers == (("&", 1000, "a"),)
  assert s.definition == "above average in size"


def test_hex_word_count():
  words = " ".join(f"w{i} 0" for i in range(11))
  s = wordnet.parse_line(f"00000100 04 n 0b {words} 000 | many words here  \n")
  assert s.words == tuple(f"w{i}" for i in range(11))


@pytest.mark.parametrize("gloss,expected", [
    ('move fast; "he ran"', "move fast"),
    ("a definition; with a second clause", "a definition; with a second clause"),
    ('"only an example"', ""),
    ('"quoted definition"; "an example"', ""),
    ("trailing semicolon;", "trailing semicolon"),
])
def test_gloss_definition(gloss, expected):
  assert wordnet.gloss_definition(gloss) == expected


def test_parse_data_file_skips_license_header(tmp_path):
  path = tmp_path / "data.adv"
  path.write_text(HEADER + "00001000 02 r 01 quickly 0 000 | with rapid movements; \"he works quickly\"  \n"
                  "00001100 02 r 01 slowly 0 000 | without speed  \n")
  synsets = wordnet.parse_data_file(path)
  assert [(s.offset, s.pos, s.words, s.definition) for s in synsets] == [
      (1000, "r", ("quickly",), "with rapid movements"),
      (1100, "r", ("slowly",), "without speed")]


def test_malformed_line_names_line():
  with pytest.raises(ValueError, match="malformed WordNet synset line: '00001000 99"):
    wordnet.parse_line("00001000 99 n 01 dog 0 000 | a dog\n")  # lex_filenum out of range


# ---------------------------------------------------------------- fortunes

def test_fortune_split_entries_and_cleaning(tmp_path):
  path = tmp_path / "food"
  path.write_text(
      "Eat, drink, and be merry.\n"
      "\t\t-- Anon\n"
      "%\n"
      "%\n"
      "   \n"
      "%\n"
      "+----+----+\n"
      "| ## | ## |\n"
      "+----+----+\n"
      "%\n"
      "A second   one.\n"
      "%\n"
      "Last, without a final separator.")
  assert fortunes.split_entries(path.read_text()) == [
      "Eat, drink, and be merry.\n\t\t-- Anon",
      "+----+----+\n| ## | ## |\n+----+----+",
      "A second   one.",
      "Last, without a final separator."]
  assert fortunes.parse_file(path) == (
      "Eat, drink, and be merry. -- Anon", "A second one.", "Last, without a final separator.")


def test_is_prose():
  assert fortunes.is_prose("Hello, world.")
  assert not fortunes.is_prose("|_|_|_| ** ## @@ -- ==")
  assert not fortunes.is_prose("   ")


# ---------------------------------------------------------------- word lists

def test_wordlist_parse(tmp_path):
  path = tmp_path / "american-english"
  path.write_text("house\nhouse's\nHouse\nBoston\nwell-known\nabc1\nzebra\nhouse\n")
  assert wordlists.parse_file(path, keep_capitalised=False) == ("house", "zebra")
  assert wordlists.parse_file(path, keep_capitalised=True) == ("house", "boston", "zebra")
  assert wordlists.parse_file(path, min_length=6, keep_capitalised=True) == ("boston",)


def test_languages_drop_shared_words(tmp_path):
  files = {"american-english": "house\ntable\nhand\nBoston\n", "ngerman": "Haus\nTisch\nHand\n",
           "french": "maison\ntable\n", "spanish": "casa\nmesa\n", "italian": "casa\ntavolo\n"}
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  got = wordlists.load_languages(tmp_path, tuple(wordlists.LANGUAGES), min_length=4)
  assert got == {"English": ("house",), "German": ("haus", "tisch"), "French": ("maison",),
                 "Spanish": ("mesa",), "Italian": ("tavolo",)}


# ---------------------------------------------------------------- splits

def test_dedupe_keeps_first_and_drops_conflicts():
  texts, labels = splits.dedupe(["a", "b", "a", "c", "b", "d"], [0, 1, 0, 2, 3, 1])
  assert texts == ["a", "c", "d"]
  np.testing.assert_array_equal(labels, [0, 2, 1])
  assert labels.dtype == np.int32


@pytest.mark.parametrize("available,n,expected", [
    ([5, 5, 5], 6, [2, 2, 2]),
    ([5, 5, 5], 7, [3, 2, 2]),
    ([1, 10, 10], 9, [1, 4, 4]),
    ([1, 10, 3], 12, [1, 8, 3]),
    ([2, 9, 9], 5, [1, 2, 2]),  # the remainder goes to the classes with most to spare
    ([4, 4], 0, [0, 0]),
    ([3, 0, 3], 6, [3, 0, 3]),
])
def test_balanced_quota(available, n, expected):
  np.testing.assert_array_equal(splits.balanced_quota(available, n), expected)


def test_balanced_quota_too_many():
  with pytest.raises(ValueError, match="asked for 8 examples but only 7"):
    splits.balanced_quota([3, 4], 8)


def _labels(counts):
  return np.repeat(np.arange(len(counts)), counts)


def test_split_indices_disjoint_balanced_deterministic():
  labels = _labels([30, 30, 12])
  parts = splits.split_indices(labels, 3, (30, 15, 15), seed_seq=(0, 7))
  again = splits.split_indices(labels, 3, (30, 15, 15), seed_seq=(0, 7))
  other = splits.split_indices(labels, 3, (30, 15, 15), seed_seq=(1, 7))
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
  assert [len(p) for p in parts] == [30, 15, 15]
  all_idx = np.concatenate(parts)
  assert len(np.unique(all_idx)) == len(all_idx)
  np.testing.assert_array_equal(np.bincount(labels[parts[2]], minlength=3), [5, 5, 5])
  np.testing.assert_array_equal(np.bincount(labels[parts[1]], minlength=3), [5, 5, 5])
  # The small class has 2 left for train; the others share the rest equally.
  np.testing.assert_array_equal(np.bincount(labels[parts[0]], minlength=3), [14, 14, 2])


def test_eval_splits_do_not_depend_on_train_size():
  labels = _labels([20, 20, 20])
  small = splits.split_indices(labels, 3, (6, 9, 9), seed_seq=(3,))
  large = splits.split_indices(labels, 3, (30, 9, 9), seed_seq=(3,))
  np.testing.assert_array_equal(small[1], large[1])
  np.testing.assert_array_equal(small[2], large[2])


# ---------------------------------------------------------------- batching

def test_batches_fixed_shape_and_epoch_coverage():
  out = list(batching.batches(12, 4, seed=0, epochs=2))
  assert len(out) == 6 == batching.num_batches(12, 4, 2)
  assert all(b.shape == (4,) and b.dtype == np.int32 for b in out)
  for epoch in (out[:3], out[3:]):
    assert sorted(np.concatenate(epoch).tolist()) == list(range(12))
  assert not np.array_equal(np.concatenate(out[:3]), np.concatenate(out[3:]))


def test_batches_drop_last_partial_and_span_epochs():
  out = list(batching.batches(5, 2, seed=1, epochs=3))
  assert len(out) == 7  # 15 indices -> 7 full batches, one index dropped
  stream = np.concatenate(out)
  assert sorted(stream[:5].tolist()) == list(range(5))
  assert sorted(stream[5:10].tolist()) == list(range(5))


def test_batches_steps_seed_and_resume():
  a = list(batching.batches(7, 3, seed=4, steps=10))
  b = list(batching.batches(7, 3, seed=4, steps=10))
  c = list(batching.batches(7, 3, seed=5, steps=10))
  resumed = list(batching.batches(7, 3, seed=4, steps=10, start_step=6))
  assert len(a) == 10
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert len(resumed) == 4 and all(np.array_equal(x, y) for x, y in zip(a[6:], resumed))


def test_batches_smaller_dataset_than_batch():
  (b,) = batching.batches(2, 5, seed=0, steps=1)
  assert b.shape == (5,) and set(b.tolist()) == {0, 1}


@pytest.mark.parametrize("kwargs", [{}, {"epochs": 1, "steps": 3}, {"epochs": 1}])
def test_batches_argument_errors(kwargs):
  with pytest.raises(ValueError):
    batching.batches(3, 4, seed=0, **kwargs)  # epochs=1 of 3 cannot fill a batch of 4


def test_eval_batches_pad_and_mask():
  out = list(batching.eval_batches(5, 2))
  assert [i.tolist() for i, _ in out] == [[0, 1], [2, 3], [4, 0]]
  assert [m.tolist() for _, m in out] == [[True, True], [True, True], [True, False]]
  assert list(batching.eval_batches(0, 2)) == []


def test_gather():
  texts, labels = batching.gather((["a", "b", "c"], np.array([0, 1, 2], np.int32)), np.array([2, 0]))
  assert texts == ["c", "a"]
  np.testing.assert_array_equal(labels, [2, 0])
