import numpy as np
import pytest

from dpjax.data.text import encode, load_rt_polarity

ROWS = [
  ("1", "2.5", "A gorgeous, witty film."),
  ("2", "-1.2", "Tedious and flat."),
  ("3", "0", "It exists."),
  ("4", "-3", "The worst.\tTruly."),
  ("5", "0.4", "Fine."),
]


@pytest.fixture
def rt_file(tmp_path):
  p = tmp_path / "movieReviewSnippets_GroundTruth.txt"
  p.write_bytes("\r\n".join("\t".join(r) for r in ROWS).encode() + b"\r\n")
  return tmp_path


def test_rt_labels_splits_and_zero_drop(rt_file):
  d = load_rt_polarity(str(rt_file))
  rows = {s: r for split in d for s, r in zip(d[split]["sentence"], d[split]["label"])}
  assert rows == {
    "A gorgeous, witty film.": 1,
    "Tedious and flat.": 0,
    "The worst.\tTruly.": 0,
    "Fine.": 1,
  }
  again = load_rt_polarity(str(rt_file))
  assert all(list(d[s]["sentence"]) == list(again[s]["sentence"]) for s in d)


def test_rt_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="RT sentences not found"):
    load_rt_polarity(str(tmp_path))
  (tmp_path / "movieReviewSnippets_GroundTruth.txt").write_text("just one column\n")
  with pytest.raises(ValueError, match="expected id<TAB>rating<TAB>sentence"):
    load_rt_polarity(str(tmp_path))


def test_local_wordpiece_tokenizer_encodes(tmp_path):
  from transformers import BertTokenizer

  from dpjax.data.text import load_tokenizer

  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "film", "witty", "flat", "."]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  # transformers 5 takes the vocabulary as vocab= (a path or a dict).
  BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
  tok = load_tokenizer(str(tmp_path / "tok"))
  enc = encode(tok, ["A witty film.", "flat"], max_length=8)
  assert enc["input_ids"].shape == (2, 8)
  assert enc["attention_mask"].sum(1).tolist() == [6, 3]
  assert enc["input_ids"][0, :6].tolist() == [2, 5, 7, 6, 9, 3]
  assert np.all(enc["input_ids"][1, 3:] == 0)


@pytest.mark.parametrize("rating", ["nan", "inf", "-inf", "7", "good"])
def test_rt_bad_rating_names_the_line(tmp_path, rating):
  rows = ROWS[:2] + [("9", rating, "Odd.")]
  (tmp_path / "movieReviewSnippets_GroundTruth.txt").write_text(
    "\n".join("\t".join(r) for r in rows) + "\n"
  )
  with pytest.raises(
    ValueError, match=rf":3: rating must be a number in \[-4, 4\], got '{rating}'"
  ):
    load_rt_polarity(str(tmp_path))


def test_rt_non_utf8_names_the_line(tmp_path):
  (tmp_path / "movieReviewSnippets_GroundTruth.txt").write_bytes(
    b"1\t2\tFine.\n2\t-1\tCaf\xe9 noir.\n"
  )
  with pytest.raises(ValueError, match=r":2: not UTF-8"):
    load_rt_polarity(str(tmp_path))
