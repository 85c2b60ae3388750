"""`dpjax export`: a finished run as a Hugging Face directory others can load.

The merged model (`dpjax.models.hf_export.export_decoder`) or a PEFT LoRA
adapter (`export_lora_adapter`), each with a model card stating the run's
guarantee and a copy of its `privacy.json`. Releasing the export is
post-processing of the trained weights: it costs no privacy beyond the run's.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Tuple

from dpjax.models.hf_export import export_decoder, export_lora_adapter
from dpjax.models.model_card import model_card
from dpjax.pipelines.tune import tuned_privacy
from dpjax.tasks.causal_lm import DEFAULTS as CAUSAL_LM_DEFAULTS
from dpjax.tasks.causal_lm import base_model, lora_settings, merged_params
from dpjax.training.rundir import TRAINED, check_writable, load_trained
from dpjax.training.task import task_section


def export_run(run_dir: str, out_dir: str, *, adapter: bool = False) -> Tuple[str, str]:
  """A finished causal_lm run as a Hugging Face directory, with its card and privacy record.

  Everything is checked before the base model loads (a run directory, a
  finished run, its privacy.json, `--adapter` on a LoRA run of the whole
  model, nothing exported there already, a writable `out_dir`). The card
  (`README.md`, `dpjax.models.model_card`) and `privacy.json` are written
  first, the weights last (`export_decoder`, `export_lora_adapter`): a
  directory holding weights holds their guarantee.

  Args:
    run_dir: the run directory `dpjax train` wrote.
    out_dir: the directory to write.
    adapter: a LoRA run's factors as a PEFT adapter instead of the merged model.

  Returns:
    (out_dir, what was exported, in words).
  """
  conf = os.path.join(run_dir, "config.json")
  if not os.path.exists(conf):
    raise FileNotFoundError(f"{conf}: not a run directory (no config.json)")
  try:
    with open(conf) as f:
      spec = json.load(f)
    task_name = spec["task"]["name"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{conf} is not a run's config ({type(e).__name__}: {e}): export a run directory that "
      "dpjax train wrote"
    ) from None
  if task_name != "causal_lm":
    raise ValueError(f"dpjax export takes causal_lm runs, got task {task_name!r}")
  trained = os.path.join(run_dir, TRAINED)
  if not os.path.exists(trained):  # before the base model is loaded
    raise FileNotFoundError(
      f"{trained}: no trained parameters (the run has not finished: resume it to its last step)"
    )
  t = task_section(spec["task"], CAUSAL_LM_DEFAULTS)
  privacy = _run_privacy(run_dir)
  if adapter and not t.lora:
    raise ValueError(
      f"{run_dir} fine-tuned every weight (task.lora=None): it has no "
      "LoRA adapter to write; export it without --adapter"
    )
  if adapter and t.num_layers is not None:
    raise ValueError(
      f"{run_dir} trained the first task.num_layers={t.num_layers} layers of "
      f"{t.model}: an adapter on the whole base model is another model; export it merged"
    )
  weights = "adapter_model.safetensors" if adapter else "model.safetensors"
  if os.path.exists(os.path.join(out_dir, weights)):  # before the base model loads
    raise FileExistsError(f"{out_dir} already holds a {weights}; choose a new directory")
  check_writable(out_dir)  # a read-only or full disk is one line before the model loads
  pre, mcfg, params = base_model(t)
  trained = load_trained(run_dir)
  how = (
    "a PEFT LoRA adapter (load it onto the base model with peft.PeftModel.from_pretrained)"
    if adapter
    else ("the LoRA factors merged into the base weights" if t.lora else "every weight")
  )
  # The card and the privacy record first, the weights last: a directory holding weights
  # holds their guarantee.
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(model_card(privacy, base=t.model, how=how, run_dir=run_dir))
  if privacy.get("tuning"):  # the record as released: the tuning's epsilon, the run's ledger
    with open(os.path.join(out_dir, "privacy.json"), "w") as f:
      json.dump(privacy, f, indent=2)
  else:
    shutil.copyfile(os.path.join(run_dir, "privacy.json"), os.path.join(out_dir, "privacy.json"))
  if adapter:
    lora = lora_settings(t)
    out = export_lora_adapter(
      mcfg,
      trained,
      out_dir,
      alpha=float(lora["alpha"]),
      base_model=t.model,
      tokenizer=pre.tokenizer,
    )
  else:
    merged = merged_params(t, params, trained)
    out = export_decoder(mcfg, merged, out_dir, tokenizer=pre.tokenizer)
  return out, how


def _run_privacy(run_dir: str):
  """The run's privacy.json (one line naming the file when it is missing or unreadable)."""
  path = os.path.join(run_dir, "privacy.json")
  try:
    with open(path) as f:
      privacy = json.load(f)
    privacy["private"], privacy["steps"]  # noqa: B018  (the keys the card reads first)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{path}: the run's privacy record is missing or unreadable ({type(e).__name__}: {e}); "
      "an export carries it, so resume the run to its end first"
    ) from None
  return tuned_privacy(run_dir, privacy)  # a tuned run's guarantee is its tuning's
