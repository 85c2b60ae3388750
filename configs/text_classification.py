"""Your own labelled text: DP fine-tuning of MiniLM on a CSV / JSONL / parquet file at eps = 3.

  dpjax train configs/text_classification.py --set task.data=my.csv \
      --set task.text_column=review --set task.label_column=stars --set task.num_labels=5

The quickstart's recipe (frozen MiniLM, cosine head, DP-SGD at (3, 1e-5) per
example) on a table of your own (`dpjax.data.tables.load_labelled_text`):
`task.data` is a .csv / .tsv / .json / .jsonl / .parquet file or a
`save_to_disk` directory (its train / validation / test splits are kept);
labels are integers in [0, num_labels), or the values listed in `task.labels`
(`--set "task.labels=['neg','pos']"`). Rows go 80 / 10 / 10 to train / dev /
test by a hash of the text (`task.split_seed` salts it) unless
`task.split_column` names each row's split. Sentence pairs:
`task.text_pair_column`. Left at its default, `task.data` is the RT asset.
The expected batch follows the data (`batch_size=None`: N / 8 training rows,
at most 1024; the plan line says what it chose); set `batch_size` to choose.
Copy this file to change anything else.
"""

import os

from dpjax.training.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "quickstart.py"))
  c.batch_size = None  # follows the data: N / 8, at most 1024
  c.task.update(
    dict(
      data="rt-polarity",
      text_column="text",
      label_column="label",
      num_labels=None,
      labels=None,
      text_pair_column=None,
      split_column=None,
      split_seed=0,
    )
  )
  return c
