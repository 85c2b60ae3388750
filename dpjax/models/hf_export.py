"""A dpjax decoder -> a Hugging Face directory (`config.json`, safetensors, tokenizer).

The load rules of `dpjax.models.hf` turned around, so a model loaded, trained
and exported has the names and layouts it was loaded with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Dict, List, Tuple

import jax
import numpy as np

from dpjax.models.decoder import DecoderConfig
from dpjax.models.hf import (
  GPT2_RULES,
  LLAMA_RULES,
  SANDWICH_RULES,
  from_hf_config,
)


def _inverse(rules) -> List[Tuple[str, str, Callable]]:
  """The load rules turned around: (tree-path regex, HF-name template, transform).

  Each group `(...)` of a rule's source regex becomes a reference in the name
  template and each reference of its target a named group; the transforms
  (transpose or identity) are their own inverses. The first match still wins.
  """
  out = []
  for pattern, target, fn in rules:
    count = iter(range(1, 100))
    template = re.sub(r"\([^()]*\)", lambda _: f"\\g<g{next(count)}>", pattern)
    template = template.replace("\\.", ".")
    parts = re.split(r"\\(\d)", target)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<g{p}>[^/]+)" for k, p in enumerate(parts))
    out.append((regex, template, fn))
  return out


def to_hf_weights(cfg: DecoderConfig, params) -> Dict[str, np.ndarray]:
  """The Hugging Face tensors (names, torch layouts) of a decoder's tree, any family.

  Phi-3 trees are written in the Llama layout (separate q/k/v and gate/up
  projections), which transformers' Mistral/Llama classes load as the same model.

  Args:
    cfg: the decoder's config.
    params: its parameter tree (LoRA merged beforehand).

  Returns:
    {name: float32 array}; `params_from_hf(cfg, out, ...)` gives `params` back.
  """
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v, np.float32)
    for path, v in jax.tree_util.tree_leaves_with_path(params)
  }
  out: Dict[str, np.ndarray] = {}
  if cfg.family == "gpt2":
    rules = _inverse(GPT2_RULES)
    for i in range(cfg.num_layers):
      qkv = [f"layer_{i}/attn/{n}/" for n in "qkv"]
      out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
        [flat.pop(q + "kernel") for q in qkv], 1
      )
      out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
        [flat.pop(q + "bias") for q in qkv]
      )
  else:
    rules = _inverse(SANDWICH_RULES if cfg.sandwich_norms else LLAMA_RULES)
  for path, w in flat.items():
    for regex, template, fn in rules:
      m = re.fullmatch(regex, path)
      if m:
        out[m.expand(template)] = fn(w)
        break
    else:
      raise ValueError(f"parameter {path} has no Hugging Face name (a dpjax-only part?)")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_type(cfg: DecoderConfig) -> str:
  """The transformers model_type a decoder is exported as.

  Args:
    cfg: the decoder's config.

  Returns:
    gpt2, gemma3_text, gemma2, gemma, qwen3, qwen2, mistral (a sliding window,
    Phi-3 included) or llama.
  """
  if cfg.family == "gpt2":
    return "gpt2"
  if cfg.sandwich_norms:
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  if cfg.norm_offset or cfg.embed_scale:
    return "gemma"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.bias and not cfg.o_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window is not None else "llama"


def to_hf_config(cfg: DecoderConfig):
  """The transformers config of a decoder; refused when it would not mean the same model.

  Args:
    cfg: the decoder's config.

  Returns:
    A transformers `PretrainedConfig` whose `from_hf_config` is `cfg`.
  """
  from transformers import AutoConfig

  kind = export_type(cfg)
  ids = dict(pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id)
  ids["eos_token_id"] = cfg.eos_token_id
  if kind == "gpt2":
    kw = dict(
      vocab_size=cfg.vocab_size,
      n_embd=cfg.hidden_size,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.intermediate_size,
      n_positions=cfg.max_position,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function=cfg.act,
    )
  else:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
      rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
      rope.update(
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position,
      )
    kw = dict(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads,
      max_position_embeddings=cfg.max_position,
      rms_norm_eps=cfg.norm_eps,
      rope_parameters=rope,
      tie_word_embeddings=cfg.tie_embeddings,
    )
    kw["head_dim"] = cfg.dim_per_head  # Gemma's default is 256, not hidden / heads
    kw["hidden_activation" if kind.startswith("gemma") else "hidden_act"] = cfg.act
    if kind != "qwen2":
      kw["attention_bias"] = cfg.bias
    if kind in ("mistral", "gemma2", "gemma3_text"):
      kw["sliding_window"] = cfg.sliding_window
    if kind in ("gemma2", "gemma3_text"):
      windowed = "sliding_attention" if cfg.sliding_window is not None else "full_attention"
      kw.update(
        layer_types=list(cfg.layer_types or [windowed] * cfg.num_layers),
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head,
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap,
      )
    if kind == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
      kw["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  hf = AutoConfig.for_model(kind, **kw, **ids)
  back = from_hf_config(hf, f"the {kind} export", cfg.dtype)
  differ = [
    f.name
    for f in dataclasses.fields(cfg)
    if getattr(_plain(back), f.name) != getattr(_plain(cfg), f.name)
  ]
  if differ:
    raise ValueError(f"a transformers {kind} config cannot express this decoder's {differ}")
  return hf


def _plain(cfg: DecoderConfig) -> DecoderConfig:
  """`cfg` with its defaults written out and the fields that do not change the model cleared."""
  windows = tuple(
    "sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.num_layers)
  )
  rope = dict(rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
  return dataclasses.replace(
    cfg,
    remat=False,
    hidden_act=cfg.act,
    num_kv_heads=cfg.kv_heads,
    head_dim=cfg.dim_per_head,
    attention_bias=cfg.bias,
    output_bias=cfg.o_bias,
    layer_types=windows if cfg.sliding_window is not None else None,
    query_pre_attn_scalar=cfg.query_pre_attn_scalar
    or (cfg.dim_per_head if cfg.sandwich_norms else None),
    rope_local_theta=cfg.rope_local_theta if cfg.rope_local_theta != cfg.rope_theta else None,
    **(rope if cfg.rope_type == "default" else {}),
    rope_original_max_position=cfg.rope_original_max_position
    if cfg.rope_type == "llama3"
    else None,
  )


def export_decoder(cfg: DecoderConfig, params, out_dir: str, tokenizer=None) -> str:
  """Writes `model.safetensors`, `config.json` (with `architectures`) and
  `generation_config.json` (+ the tokenizer): what transformers and servers load.

  Every family dpjax loads is written (`export_type` names the transformers
  class); `decoder_config(out_dir)` gives `cfg` back.

  Args:
    cfg: the decoder's config.
    params: the parameter tree (LoRA merged).
    out_dir: the directory to write (created; an existing model there is refused).
    tokenizer: a transformers tokenizer to save beside, or None.

  Returns:
    `out_dir`.
  """
  from safetensors.numpy import save_file
  from transformers import GenerationConfig
  from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

  if os.path.exists(os.path.join(out_dir, "model.safetensors")):
    raise FileExistsError(f"{out_dir} already holds a model.safetensors; choose a new directory")
  hf_cfg = to_hf_config(cfg)
  hf_cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf_cfg.model_type]]  # servers read it
  weights = to_hf_weights(cfg, params)
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  save_file(weights, tmp, metadata={"format": "pt"})
  hf_cfg.save_pretrained(out_dir)
  GenerationConfig.from_model_config(hf_cfg).save_pretrained(out_dir)  # bos / eos / pad ids
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))  # the model last: complete or absent
  return out_dir


def export_lora_adapter(
  cfg: DecoderConfig,
  factors,
  out_dir: str,
  *,
  alpha: float,
  base_model: str,
  tokenizer=None,
) -> str:
  """Writes a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).

  `peft.PeftModel.from_pretrained(base, out_dir)` loads it onto the base
  model: dpjax's `W + (alpha / r) A B` on a `[in, out]` kernel is PEFT's
  `W + (lora_alpha / r) B' A'` on the torch `[out, in]` weight with
  `lora_A.weight = A^T` (`[r, in]`) and `lora_B.weight = B^T` (`[out, r]`).
  The adapted modules are named in full (`target_modules`), so exactly the
  layers dpjax trained carry the adapter.

  Args:
    cfg: the base decoder's config.
    factors: the LoRA factors tree (`dpjax.models.adapters.init_lora`'s layout).
    out_dir: the directory to write (created; an existing adapter there is refused).
    alpha: the run's LoRA alpha.
    base_model: the base model's name or path, as the adapter records it.
    tokenizer: a transformers tokenizer to save beside, or None.

  Returns:
    `out_dir` (raises ValueError for a family whose adapted layer is fused in
    transformers' layout: GPT-2's c_attn).
  """
  from safetensors.numpy import save_file

  if os.path.exists(os.path.join(out_dir, "adapter_model.safetensors")):
    raise FileExistsError(f"{out_dir} already holds an adapter; choose a new directory")
  if cfg.family == "gpt2":
    raise ValueError(
      "a PEFT adapter of a GPT-2 model cannot be written: transformers fuses its q, k and v "
      "into one Conv1D (c_attn); export it merged (without --adapter)"
    )
  rules = _inverse(SANDWICH_RULES if cfg.sandwich_norms else LLAMA_RULES)
  tensors, modules, ranks = {}, [], set()
  for path, _ in jax.tree_util.tree_leaves_with_path(factors):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] != "a":  # one visit per layer: its A factor
      continue
    module = "/".join(keys[:-1])
    name = next(
      (m.expand(t) for r, t, _ in rules if (m := re.fullmatch(r, module + "/kernel"))), None
    )
    if name is None or not name.endswith(".weight"):
      raise ValueError(f"LoRA layer {module} has no Hugging Face Linear weight")
    node = factors
    for k in keys[:-1]:
      node = node[k]
    a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
    stem = name[: -len(".weight")]
    tensors[f"base_model.model.{stem}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"base_model.model.{stem}.lora_B.weight"] = np.ascontiguousarray(b.T)
    modules.append(stem)
    ranks.add(a.shape[1])
  if len(ranks) != 1:
    raise ValueError(f"the LoRA factors have ranks {sorted(ranks)}; one adapter has one rank")
  (rank,) = ranks
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": int(rank),
    "lora_alpha": float(alpha),
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "target_modules": sorted(modules),
    "inference_mode": True,
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  tmp = os.path.join(out_dir, "adapter_model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))  # complete or absent
  return out_dir
