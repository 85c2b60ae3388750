"""Assets for an offline machine, in a small transfer: float16 copies, restored to float32.

  python experiments/gpu_assets.py pack DEST minilm rt-polarity   # here: DEST/NAME/...
  python experiments/gpu_assets.py unpack SRC                      # there: into $DPJAX_HOME

`pack` copies each fetched asset's files, writing every `.safetensors` with
its float32 tensors rounded to float16 (MiniLM: 88 MB -> 44 MB);
`unpack` writes them back as float32 into `dpjax.assets.asset_dir(NAME)`
with the completion marker, so `dpjax train` finds them offline. The
rounding (relative 5e-4) makes the weights differ slightly from the
fetched ones: figures from unpacked assets say so.
"""

import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

from dpjax import assets


def _copy(src_dir, dst_dir, cast):
  for root, _, files in os.walk(src_dir):
    out = os.path.join(dst_dir, os.path.relpath(root, src_dir))
    os.makedirs(out, exist_ok=True)
    for f in files:
      src, dst = os.path.join(root, f), os.path.join(out, f)
      if f.endswith(".safetensors"):
        save_file({k: cast(v) for k, v in load_file(src).items()}, dst)
      else:
        shutil.copy2(src, dst)


def pack(dest, names):
  """Float16 copies of the fetched assets `names` under `dest`.

  Args:
    dest: the folder to write.
    names: asset names (fetched here first when missing).
  """
  for name in names:
    src = assets.fetch(name, quiet=True)
    _copy(
      src, os.path.join(dest, name), lambda v: v.astype(np.float16) if v.dtype == np.float32 else v
    )


def unpack(src):
  """Every asset packed under `src`, restored to float32 in $DPJAX_HOME.

  Args:
    src: a folder written by `pack`.
  """
  for name in sorted(os.listdir(src)):
    dest = assets.asset_dir(name)
    _copy(
      os.path.join(src, name), dest, lambda v: v.astype(np.float32) if v.dtype == np.float16 else v
    )
    print(f"{name} -> {dest}")


if __name__ == "__main__":
  if len(sys.argv) >= 3 and sys.argv[1] == "pack":
    pack(sys.argv[2], sys.argv[3:])
  elif len(sys.argv) == 3 and sys.argv[1] == "unpack":
    unpack(sys.argv[2])
  else:
    raise SystemExit(__doc__)
