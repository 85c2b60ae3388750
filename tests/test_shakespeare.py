"""The play parser on a small fixture in the Gutenberg layout."""

import pytest

from dpjax.data.shakespeare import load_shakespeare, parse_play

PLAY = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

A Priest.
Hamlet, a Prince.

SCENE: Elsinore.



PROLOGUE.

[Enter CHORUS.]

CHORUS.

O for a Muse of fire, that would ascend
The brightest heaven of invention.

ACT I.

Scene I. A platform.

[Enter Bernardo.]

Ber.
Who's there?

First Clown.
Nay, answer me: stand, [Aside.] and unfold yourself.

Ber.
Long live the king!

[Exit Horatio.]

And so good night.

ACT II. SCENE 2.

THESEUS
Now, fair Hippolyta,
our nuptial hour.

SONG.
Hey nonny.

THE END
"""


def test_parse_play_records():
  recs = parse_play(PLAY, "testing")
  got = [(r["act"], r["scene"], r["character"], r["line"]) for r in recs]
  assert got == [
    (0, 0, "CHORUS", "O for a Muse of fire, that would ascend\nThe brightest heaven of invention."),
    (1, 1, "BER", "Who's there?"),
    (1, 1, "FIRST CLOWN", "Nay, answer me: stand, and unfold yourself."),
    (1, 1, "BER", "Long live the king!\nAnd so good night."),
    (2, 2, "THESEUS", "Now, fair Hippolyta,\nour nuptial hour."),
  ]


def test_load_shakespeare_dataset(tmp_path):
  (tmp_path / "testing_gut.txt").write_text(PLAY)
  (tmp_path / "sonnets_gut.txt").write_text("I\n\nFrom fairest creatures we desire increase,\n")
  (tmp_path / "notes.txt").write_text("ignored")
  ds = load_shakespeare(str(tmp_path))
  rows = [r for split in ds.values() for r in split]
  assert len(rows) == 5 and {r["play"] for r in rows} == {"testing"}
  assert {r["user_id"] for r in rows} == {
    "testing/CHORUS",
    "testing/BER",
    "testing/FIRST CLOWN",
    "testing/THESEUS",
  }
  assert all(r["genre"] == "unknown" for r in rows)


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_shakespeare(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no play files"):
    load_shakespeare(str(tmp_path))
