"""`python -m dpjax ...`: the same as the `dpjax` command."""

import sys

from dpjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
