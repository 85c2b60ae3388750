"""The test files a pytest run skipped tests of for want of an extra (torch, peft, wandb).

    python .ci/skipped.py JUNIT_XML   # e.g. "tests/test_causal_lm.py tests/test_tables.py"

.ci/run runs the README's test command before the extras are installed
(with --junitxml through PYTEST_ADDOPTS), then these files again once they are.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import List

EXTRAS = re.compile(r"torch|peft|wandb", re.I)


def _file(dotted: str) -> str:
  """'tests.test_x.TestCase' or 'tests.test_x' -> 'tests/test_x.py' (the longest that exists)."""
  parts = dotted.split(".")
  for k in range(len(parts), 0, -1):
    path = os.path.join(*parts[:k]) + ".py"
    if os.path.isfile(path):
      return path
  return ""


def skipped_files(xml_text: str) -> List[str]:
  """The files of the test cases skipped with a reason naming an extra, sorted, once each.

  Args:
    xml_text: pytest's --junitxml report.

  Returns:
    The test files (a test module skipped whole is named by its module).
  """
  out = set()
  for case in ET.fromstring(xml_text).iter("testcase"):
    skip = case.find("skipped")
    if skip is None or not EXTRAS.search(skip.get("message", "") + (skip.text or "")):
      continue
    path = _file(case.get("classname") or case.get("name", ""))
    if path:
      out.add(path.replace(os.sep, "/"))
  return sorted(out)


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    print(" ".join(skipped_files(f.read())))
