"""Every `dpjax ...` command the README and the guides show is one the CLI takes as written.

Each command in a fenced shell block is parsed by the CLI's own parser (options, choices);
a `train` or `config` command's config is loaded with its `--set` overrides and validated
(keys, types, ranges) as `dpjax train` does before building anything; `account` and
`plan` commands run (they are cheap). What needs real assets, a finished run or the
network runs no further than that here.
"""

import glob
import os
import re
import shlex

import pytest

from dpjax import cli
from dpjax.training import spec as spec_lib
from dpjax.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _documented():
  out = []
  for path in ["README.md"] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
    with open(os.path.join(ROOT, path)) as f:
      text = f.read()
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
      for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" # ")[0].strip()
        for part in line.split("&&"):
          part = part.strip()
          if part.startswith("dpjax "):
            out.append((os.path.basename(path), part))
  return out


DOCUMENTED = _documented()


def test_the_docs_show_commands_of_every_kind():
  kinds = {shlex.split(c)[1] for _, c in DOCUMENTED}
  kinds_shown = {"train", "config", "account", "export", "plan", "plan-memory", "distill", "audit"}
  kinds_shown |= {"tune"}
  assert kinds_shown <= kinds


@pytest.mark.parametrize("where,command", DOCUMENTED, ids=[c for _, c in DOCUMENTED])
def test_a_documented_command_is_taken_as_written(where, command, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)  # the guides run from a checkout
  if "metric_writers=" in command and "wandb" in command:  # the command names its extra
    pytest.importorskip("wandb", reason="wandb: the command needs the wandb extra")
  argv = shlex.split(command)[1:]
  if argv[:2] == ["account", "lmo"]:
    assert cli.main(argv) == 0, (where, capsys.readouterr().err)
    return
  args = cli.parser().parse_args(argv)  # every option and choice as the CLI declares it
  if args.cmd in ("account", "plan"):  # cheap: they run
    assert cli.main(argv) == 0, (where, capsys.readouterr().err)
  elif args.cmd in ("train", "config") and not getattr(args, "list", False):
    cfg = load_config(args.config or "configs/quickstart.py", args.set or [])
    spec_lib.validate(spec_lib.with_defaults(cfg))  # raises SpecError, as `dpjax train` would
  elif args.cmd == "tune":  # every candidate validated and tunable, as `dpjax tune` checks first
    from dpjax.pipelines import tune as tune_lib

    for c in tune_lib.candidates(tune_lib.parse_grid(args.grid)):
      cfg = load_config(args.config, (args.set or []) + c)
      tune_lib.check_tunable(spec_lib.validate(spec_lib.with_defaults(cfg)))
  elif args.cmd == "plan-memory":
    from dpjax.pipelines import plan_memory

    if args.model in plan_memory.preset_names():
      plan_memory.decoder_config(args.model, args.dtype)
    if args.device_memory:
      plan_memory.parse_size(args.device_memory)
    plan_memory.parse_mesh(args.mesh)
