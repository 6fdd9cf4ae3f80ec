"""Tests of research.models.clip_tokenizer on a tiny hand-made BPE vocabulary (open_clip's file is checked by `make parity`)."""
import gzip

import numpy as np
import pytest

from research.models import clip_tokenizer as ct

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "p h", "o t", "ph ot", "phot o</w>"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "tiny_vocab.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return ct.CLIPTokenizer(str(path))


def test_vocabulary_layout(tokenizer):
  # 256 bytes, 256 bytes + </w>, one id per merge, then the two special tokens.
  assert tokenizer.vocab_size == 512 + len(MERGES) + 2
  assert (tokenizer.sot_id, tokenizer.eot_id) == (512 + len(MERGES), 513 + len(MERGES))
  assert tokenizer.encoder["!"] == 0 and tokenizer.encoder["!</w>"] == 256
  assert tokenizer.encoder["the</w>"] == 512 + 1


def test_bpe_applies_merges_by_rank(tokenizer):
  assert tokenizer.bpe("the") == ("the</w>",)
  assert tokenizer.bpe("cat") == ("cat</w>",)
  assert tokenizer.bpe("photo") == ("photo</w>",)
  assert tokenizer.bpe("tha") == ("th", "a</w>")
  assert tokenizer.bpe("x") == ("x</w>",)


def test_tokenize_by_hand(tokenizer):
  e = tokenizer.encoder
  ids = tokenizer.tokenize(["The  CAT!", ""], context_length=6)
  expected = [tokenizer.sot_id, e["the</w>"], e["cat</w>"], e["!</w>"], tokenizer.eot_id, 0]
  np.testing.assert_array_equal(ids[0], expected)
  np.testing.assert_array_equal(ids[1], [tokenizer.sot_id, tokenizer.eot_id, 0, 0, 0, 0])
  assert ids.dtype == np.int32


def test_truncation_keeps_the_end_token_last(tokenizer):
  ids = tokenizer.tokenize(["the cat the cat the cat"], context_length=4)[0]
  assert ids[0] == tokenizer.sot_id and ids[-1] == tokenizer.eot_id and (ids != 0).all()


def test_pre_tokenizer_follows_open_clips_pattern():
  assert ct.pre_tokenize("it's 42 cats!!") == ["it", "'s", "4", "2", "cats", "!!"]
  assert ct.pre_tokenize("we're 'sun") == ["we", "'re", "'s", "un"]
  assert ct.pre_tokenize("café_ok") == ["café", "_", "ok"]
  assert ct.pre_tokenize("<end_of_text>x") == ["<end_of_text>", "x"]
  assert ct.pre_tokenize("东京 ½") == ["东京", "½"]


def test_cleaning_unescapes_html_collapses_space_and_lowercases():
  assert ct.clean("  A &amp;amp; B\t\n C\u00a0 ") == "a & b c"


def test_special_tokens_in_text_map_to_their_ids(tokenizer):
  ids = tokenizer.tokenize(["<end_of_text>"], 4)[0]
  assert list(ids[:3]) == [tokenizer.sot_id, tokenizer.eot_id, tokenizer.eot_id]


def test_decode_inverts_encode(tokenizer):
  ids = tokenizer.tokenize(["the photo of a cat"], 12)[0]
  assert tokenizer.decode(ids) == "the photo of a cat"


def test_errors_are_clear(tokenizer, tmp_path, monkeypatch):
  with pytest.raises(TypeError, match="list of strings"):
    tokenizer.tokenize("the cat")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ct.CLIPTokenizer(str(tmp_path / "missing.txt.gz"))
  monkeypatch.setenv(ct.VOCAB_ENV, str(tmp_path / "nope.gz"))
  with pytest.raises(FileNotFoundError, match="CLIP_BPE_VOCAB"):
    ct.default_vocab_file()
