"""Your own labelled text (CSV, JSONL, parquet, saved datasets): checked row by row, trained on."""

import hashlib
import json

import datasets
import numpy as np
import pytest

from dpjax import cli
from dpjax.data.tables import SPLITS, hash_split, load_labelled_text

WORDS = ["one", "two", "three", "four", "five", "film", "plot", "the", "a"]


def _rows(n=200, seed=0):
  """Reviews whose star count (0..4) is the word they contain: learnable, 5 classes."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    stars = i % 5
    words = [WORDS[stars], *rng.choice(WORDS[5:], 2)]
    rng.shuffle(words)
    out.append({"id": i, "review": f"{' '.join(words)} {i}", "stars": stars})
  return out


def _write(rows, path):
  ds = datasets.Dataset.from_list(rows)
  if path.endswith(".csv"):
    ds.to_csv(path, index=False)
  elif path.endswith(".jsonl"):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif path.endswith(".parquet"):
    ds.to_parquet(path)
  return path


def test_hash_split_is_the_unsalted_sha1_bucket():
  for text in ["a fine film", "dull", "x" * 300, "é"]:
    b = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10
    assert hash_split(text) == ("test" if b == 0 else "dev" if b == 1 else "train")
  texts = [f"t{i}" for i in range(5000)]
  share = {s: sum(hash_split(t) == s for t in texts) / len(texts) for s in SPLITS}
  assert abs(share["train"] - 0.8) < 0.02 and abs(share["test"] - 0.1) < 0.015
  salted = sum(hash_split(t) != hash_split(t, seed=1) for t in texts)
  assert salted > 1000  # another seed, another split


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_formats_give_the_same_examples(tmp_path, ext):
  rows = _rows()
  d = load_labelled_text(
    _write(rows, str(tmp_path / f"my{ext}")),
    text_column="review",
    label_column="stars",
    num_labels=5,
  )
  got = {(t, y) for s in SPLITS for t, y in zip(d[s]["sentence"], d[s]["label"])}
  assert got == {(r["review"], r["stars"]) for r in rows}
  for s in SPLITS:
    assert all(hash_split(t) == s for t in d[s]["sentence"])


def test_string_labels_split_column_pairs_and_saved_splits(tmp_path):
  rows = [
    {"q": f"q{i}", "a": f"a{i}", "y": ["neg", "pos"][i % 2], "part": SPLITS[i % 3]}
    for i in range(30)
  ]
  d = load_labelled_text(
    _write(rows, str(tmp_path / "p.jsonl")),
    text_column="q",
    text_pair_column="a",
    label_column="y",
    labels=["neg", "pos"],
    split_column="part",
  )
  assert d["dev"]["sentence"] == [f"q{i}" for i in range(1, 30, 3)]
  assert d["dev"]["sentence_pair"] == [f"a{i}" for i in range(1, 30, 3)]
  assert d["dev"]["label"] == [i % 2 for i in range(1, 30, 3)]
  saved = datasets.DatasetDict(
    {
      name: datasets.Dataset.from_list(_rows(20, seed=k))
      for k, name in enumerate(["train", "validation", "test"])
    }
  )
  saved.save_to_disk(str(tmp_path / "saved"))
  d = load_labelled_text(
    str(tmp_path / "saved"), text_column="review", label_column="stars", num_labels=5
  )
  assert d["dev"]["sentence"] == [r["review"] for r in _rows(20, seed=1)]


@pytest.mark.parametrize(
  "change,kwargs,match",
  [
    (
      None,
      {"text_column": "text"},
      r"task.text_column='text' is not a column of my.csv "
      r"\(columns: id, review, stars\)",
    ),
    ({"stars": 5}, {}, r"my.csv record 4: label 5 is not an integer in \[0, 5\)"),
    ({"stars": -1}, {}, r"record 4: label -1 is not an integer in \[0, 5\)"),
    ({"stars": 1.5}, {}, r"record 4: label 1.5 is not an integer"),
    ({"stars": None}, {}, r"record 4: the label is missing"),
    ({"review": ""}, {}, r"record 4: 'review' is empty or not text"),
    (None, {"num_labels": None}, r"task.num_labels must be an integer >= 2 .*got None"),
    (None, {"labels": ["a", "b"]}, r"task.num_labels=5 but task.labels has 2 values"),
    (None, {"labels": [0, 1, 2, 3, 9], "num_labels": None}, r"label 4 is not one of task.labels"),
  ],
)
def test_bad_rows_and_settings_are_one_clear_line(tmp_path, change, kwargs, match):
  rows = _rows(40)
  if change:
    rows[3].update(change)
  path = _write(rows, str(tmp_path / "my.csv"))
  args = dict(text_column="review", label_column="stars", num_labels=5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match) as e:
    load_labelled_text(path, **args)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [{"num_labels": 2}, {"labels": [0, 1]}])
def test_a_text_label_among_integers_is_blamed_on_its_own_record(tmp_path, kwargs):
  # One text label makes the CSV reader read every label as text ("0", "1"):
  # the record named is the one with the text, not the first.
  path = tmp_path / "mixed.csv"
  path.write_text("text,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(5)) + "r5,pos\n")
  with pytest.raises(ValueError, match=r"^mixed.csv record 6: label 'pos' is not"):
    load_labelled_text(str(path), text_column="text", **kwargs)
  path.write_text("text,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(40)))
  quoted = tmp_path / "quoted.csv"  # integers as text everywhere: read as the integers
  quoted.write_text("text,label\n" + "".join(f'r{i},"{i % 2}"\n' for i in range(40)))
  for p in (path, quoted):
    d = load_labelled_text(str(p), text_column="text", **kwargs)
    assert sorted(sum((list(d[s]["label"]) for s in d), [])) == [0] * 20 + [1] * 20


def test_bad_sources_are_one_clear_line(tmp_path):
  (tmp_path / "x.xlsx").write_text("")
  with pytest.raises(ValueError, match=r"unknown file type '.xlsx'; allowed: .csv, .json"):
    load_labelled_text(str(tmp_path / "x.xlsx"), num_labels=2)
  for missing in [str(tmp_path / "nope.csv"), "./data/nope", "nope.parquet"]:
    with pytest.raises(ValueError, match=r"no such file or directory$"):
      load_labelled_text(missing, num_labels=2)
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ValueError, match="not a saved dataset"):
    load_labelled_text(str(tmp_path / "empty_dir"), num_labels=2)
  path = _write(_rows(3), str(tmp_path / "tiny.csv"))
  with pytest.raises(ValueError, match="no examples in the .* split of the 80/10/10 hash split"):
    load_labelled_text(path, text_column="review", label_column="stars", num_labels=5)
  rows = [dict(r, part="training") for r in _rows(10)]
  with pytest.raises(ValueError, match=r"record 1: 'part' = 'training', allowed"):
    load_labelled_text(
      _write(rows, str(tmp_path / "s.csv")),
      text_column="review",
      label_column="stars",
      num_labels=5,
      split_column="part",
    )
  saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(10))})
  saved.save_to_disk(str(tmp_path / "only_train"))
  with pytest.raises(ValueError, match="has splits \\['train'\\]: no dev, test"):
    load_labelled_text(
      str(tmp_path / "only_train"), text_column="review", label_column="stars", num_labels=5
    )


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_dpjax_train_on_your_own_table(tmp_path, tiny_bert, monkeypatch, ext):
  """The acceptance command, on a table this test writes."""
  model = tiny_bert(WORDS)
  # 600 rows and 100 steps: over fresh noise seeds test accuracy was 0.84-0.96 (300 rows and
  # 40 steps gave 0.48-0.88 on 25 test rows, too close to the bar below)
  data = _write(_rows(600), str(tmp_path / f"my{ext}"))
  monkeypatch.chdir(tmp_path)
  argv = ["train", "configs/text_classification.py", "--workdir", "run", "--no-progress"]
  for kv in [
    f"task.data={data}",
    "task.text_column=review",
    "task.label_column=stars",
    "task.num_labels=5",
    f"task.model={model}",
    "task.max_length=8",
    "steps=100",
    "batch_size=64",
    "physical_batch_size=64",
    "learning_rate=0.1",
    "target_epsilon=8.0",
  ]:
    argv += ["--set", kv]
  assert cli.main(argv) == 0
  privacy = json.load(open(tmp_path / "run" / "privacy.json"))
  assert privacy["epsilon"] <= 8.0
  final = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
  assert final["test_accuracy"] > 0.5  # 5 classes: chance is 0.2


def test_dpjax_train_bad_column_is_one_line(tmp_path, tiny_bert, capsys):
  model = tiny_bert(WORDS)
  data = _write(_rows(50), str(tmp_path / "my.csv"))
  argv = ["train", "configs/text_classification.py", "--workdir", str(tmp_path / "run")]
  for kv in [
    f"task.data={data}",
    "task.text_column=body",
    "task.num_labels=5",
    f"task.model={model}",
  ]:
    argv += ["--set", kv]
  capsys.readouterr()  # the fixture's own output
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    "dpjax: error: task.text_column='body' is not a column of my.csv (columns: id, review, stars)"
  ]


def test_a_hub_id_is_tried_only_when_no_such_path_exists(tmp_path, monkeypatch):
  asked = []

  def hub(name, *a, **k):
    asked.append(name)
    if name == "someone/reviews":
      return datasets.DatasetDict(
        {s: datasets.Dataset.from_list(_rows(20, seed=i)) for i, s in enumerate(SPLITS)}
      )
    raise ConnectionError("offline\nsecond line")

  monkeypatch.setattr(datasets, "load_dataset", hub)
  monkeypatch.chdir(tmp_path)
  d = load_labelled_text(
    "someone/reviews", text_column="review", label_column="stars", num_labels=5
  )
  assert asked == ["someone/reviews"] and len(d["test"]) == 20
  with pytest.raises(
    ValueError,
    match=r"as a hub dataset id it could not be loaded "
    r"\(ConnectionError: offline\)$",
  ):
    load_labelled_text("nobody/nothing", num_labels=2)


@pytest.mark.parametrize(
  "name, content, msg",
  [
    ("empty.csv", b"", "is empty (no header, no records)"),
    ("header.csv", b"text,label\n", "holds no records"),
    ("binary.csv", bytes(range(256)) * 50, "cannot be read as csv"),
    ("torn.jsonl", b'{"text": "a", "label": 1}\n{"text": \n', "cannot be read as jsonl"),
  ],
)
def test_unreadable_data_files_are_one_line_naming_the_file(tmp_path, capfd, name, content, msg):
  from dpjax.data.tables import read_table

  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError) as e:
    read_table(str(path))
  assert str(path) in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)
  assert capfd.readouterr().err == ""  # the reader's own log lines are not printed too


def _own_data_argv(data, model, *more):
  argv = ["train", "configs/text_classification.py", "--workdir", "run", "--no-progress"]
  for kv in [
    f"task.data={data}",
    "task.text_column=review",
    "task.label_column=stars",
    f"task.model={model}",
    "task.max_length=8",
    *more,
  ]:
    argv += ["--set", kv]
  return argv


def test_own_table_of_1000_rows_without_a_batch_size_runs_and_the_plan_says_its_batch(
  tmp_path, tiny_bert, monkeypatch, capsys
):
  # The guide's command as written: no batch_size. The config's batch follows the data
  # (N / 8 of the training rows, at most 1024) instead of the quickstart's 1024 for RT's 8,441.
  model = tiny_bert(WORDS)
  data = _write(_rows(1000), str(tmp_path / "my.csv"))
  monkeypatch.chdir(tmp_path)
  capsys.readouterr()
  argv = _own_data_argv(data, model, "task.num_labels=5", "steps=3", "noise_multiplier=1.0")
  assert cli.main(argv + ["--set", "target_epsilon=None"]) == 0
  plan = capsys.readouterr().err  # the plan line
  (segment,) = json.load(open(tmp_path / "run" / "privacy.json"))["ledger"]
  n = sum(hash_split(r["review"]) == "train" for r in _rows(1000))  # the training rows, N
  assert segment["sampling_rate"] == pytest.approx((n // 8) / n, rel=1e-12), (segment, n)
  assert f"expected batch {n // 8} = N / 8, at most 1024: batch_size=None" in plan


def test_a_batch_the_data_cannot_hold_is_refused_before_any_feature_is_computed(
  tmp_path, tiny_bert, monkeypatch, capsys
):
  from dpjax.tasks import text_classification

  model = tiny_bert(WORDS)
  data = _write(_rows(300), str(tmp_path / "my.csv"))
  monkeypatch.chdir(tmp_path)
  computed = []
  real = text_classification._frozen_features
  monkeypatch.setattr(
    text_classification, "_frozen_features", lambda *a, **k: computed.append(1) or real(*a, **k)
  )
  capsys.readouterr()
  argv = _own_data_argv(data, model, "task.num_labels=5", "batch_size=500")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "from batch_size with" in err[0] and "lower batch_size" in err[0], err
  assert computed == []  # nothing derived from the data before the check
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_missing_data_file_is_said_before_a_missing_num_labels(tmp_path, tiny_bert, capsys):
  model = tiny_bert(WORDS)
  capsys.readouterr()
  argv = _own_data_argv(str(tmp_path / "typo.csv"), model)
  argv[argv.index("run")] = str(tmp_path / "run")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no such file" in err[0] and "typo.csv" in err[0], err


def test_features_of_your_own_data_stay_in_the_run_directory_owner_only(
  tmp_path, tiny_bert, monkeypatch, capsys
):
  # Frozen features computed from the training rows are private data: they live in the run
  # directory (owner-only, removed with it), never in the shared cache of $DPJAX_HOME; a run
  # stopped by bad input found after they were computed leaves none of them.
  model = tiny_bert(WORDS)
  data = _write(_rows(300), str(tmp_path / "my.csv"))
  monkeypatch.chdir(tmp_path)
  argv = _own_data_argv(data, model, "task.num_labels=5", "steps=2", "batch_size=32")
  assert cli.main(argv) == 0
  features = sorted((tmp_path / "run" / "features").iterdir())
  assert len(features) == 3  # train, dev, test
  assert oct((tmp_path / "run" / "features").stat().st_mode & 0o777) == "0o700"
  assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in features)
  home = tmp_path / "home"  # DPJAX_HOME (the fixture's)
  assert not [p for p in home.rglob("features-*")], "features of private data in the cache"
  written = [f.stat().st_mtime_ns for f in features]
  assert cli.main(argv + ["--allow-privacy-change", "--set", "steps=3"]) == 0  # a resume
  assert [f.stat().st_mtime_ns for f in features] == written  # reused, not recomputed
  assert sorted((tmp_path / "run" / "features").iterdir()) == features
  capsys.readouterr()
  late = ["--workdir", "late", "--set", "mechanism=laplace", "--set", "l1_clip_norm=1.0"]
  late += ["--set", "accountant=rdp"]  # found by the plan, after the features
  from dpjax.tasks import text_classification

  computed = []
  real = text_classification._frozen_features
  monkeypatch.setattr(
    text_classification, "_frozen_features", lambda *a, **k: computed.append(1) or real(*a, **k)
  )
  assert cli.main(argv[:2] + late + argv[4:]) == 2
  assert computed  # they were written, then removed
  assert "accountant 'rdp' does not support" in capsys.readouterr().err
  assert not (tmp_path / "late").exists()
