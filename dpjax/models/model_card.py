"""The model card an export carries: what the weights are and the guarantee they were trained under.

`dpjax export` writes it as the exported directory's `README.md` (the file
the Hugging Face hub shows) beside a copy of the run's `privacy.json`, so the
statement travels with the weights: the epsilon, its delta and unit, the
accountant, each ledger segment, and what the guarantee assumes.
"""

from __future__ import annotations

from typing import Any, Dict

from dpjax.models.hf import HUB_ID


def model_card(privacy: Dict[str, Any], *, base: str, how: str, run_dir: str) -> str:
  """The card's Markdown (YAML metadata first, as the hub reads it).

  Args:
    privacy: the run's `privacy.json`.
    base: the base model (asset name, path or hub id).
    how: what was exported, e.g. "LoRA merged into the base weights".
    run_dir: the run directory exported.

  Returns:
    The text of README.md.
  """
  meta = ["---", "library_name: transformers", "tags:", "- differential-privacy", "- dpjax"]
  if HUB_ID.match(base):
    meta.append(f"base_model: {base.partition('@')[0]}")
  meta.append("---")
  lines = [
    *meta,
    "",
    f"# Fine-tuned from `{base}` with differential privacy"
    if privacy.get("private")
    else f"# Fine-tuned from `{base}` (not private)",
    "",
    f"Trained by `dpjax train` (run directory `{run_dir}`, {privacy.get('steps')} steps); "
    f"exported by `dpjax export`: {how}.",
    "",
    "## Privacy guarantee",
    "",
  ]
  if not privacy.get("private"):
    lines += ["None: the run was not private (`private=False`); these weights carry no guarantee."]
    return "\n".join(lines) + "\n"
  unit = privacy["privacy_unit"]
  lines += [
    f"**({privacy['epsilon']:.4g}, {privacy['delta']:g})-differential privacy per {unit}**: "
    f"adding or removing one {unit} of the training data changes the distribution of these "
    f"weights, and of anything computed from them, by at most that much. The epsilon is "
    f"{'an upper bound' if privacy.get('upper_bound') else 'an estimate'} from the "
    f"`{privacy['accountant']}` accountant over every release the run made (its ledger, below).",
    "",
  ]
  if privacy.get("tuning"):
    t = privacy["tuning"]
    lines += [
      f"The run was selected as the best of K random runs, K ~ TNB(eta={t['eta']:g}, "
      f"gamma={t['gamma']:g}) (E[K] = {t['expected_runs']:.3g}), by `dpjax tune`: the "
      "epsilon covers the whole tuning (Papernot-Steinke's selection bound over one run's "
      "RDP curve), not this run alone.",
      "",
    ]
  lines += [
    f"It assumes: {privacy.get('assumes', 'see privacy.json')}. The base model and anything "
    "public it was given are outside the guarantee; it covers the private training data only.",
    "",
    "| segment | mechanism | noise multiplier | sampling rate | unit | steps | extra releases |",
    "|---|---|---|---|---|---|---|",
  ]
  for i, seg in enumerate(privacy.get("ledger", [])):
    sigma = seg.get("noise_multiplier")
    lines.append(
      f"| {i} | {seg['mechanism']} | {'-' if sigma is None else f'{sigma:.4g}'} | "
      f"{seg['sampling_rate']:.4g} | {seg['unit']} | {seg['steps']} | "
      f"{seg.get('extra_releases', 0)} |"
    )
  lines += ["", "The whole record is `privacy.json`, beside this card."]
  return "\n".join(lines) + "\n"
