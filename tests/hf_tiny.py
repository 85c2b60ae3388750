"""Tiny decoders of every family dpjax loads, all parameters random (models need torch)."""

import numpy as np

V = 101
# The shape of every tiny checkpoint compared with transformers (6 heads of 8, 2 KV heads).
SMALL = dict(
  vocab_size=V,
  hidden_size=48,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=6,
  num_key_value_heads=2,
)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Llama 3's rope scaling at the tiny checkpoints' 64 positions (changes the logits of 12 tokens).
LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 64,
}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gpt2")


def randomise(model, seed=0):
  """Every parameter random, biases and norm weights included (inits zero or one them).

  Args:
    model: a torch module.
    seed: the generator's seed.

  Returns:
    The module, in eval mode.
  """
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def gemma_config(kind, tie, **over):
  """A tiny Gemma 1/2/3 config whose every feature changes the logits of 12 tokens.

  Args:
    kind: "gemma", "gemma2" or "gemma3".
    tie: tied embeddings.
    **over: fields replaced.

  Returns:
    The transformers config.
  """
  import transformers

  common = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    tie_word_embeddings=tie,
    **IDS,
  )
  if kind == "gemma":
    return transformers.GemmaConfig(**{**common, "rope_theta": 500.0, **over})
  common.update(sliding_window=4, query_pre_attn_scalar=24)  # the window < 12 tokens
  if kind == "gemma2":
    return transformers.Gemma2Config(
      **{
        **common,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "rope_theta": 500.0,
        **over,
      }
    )
  return transformers.Gemma3TextConfig(
    **{
      **common,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
      "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
      },
      **over,
    }
  )


def config(family, tie=False, **over):
  """The tiny transformers config of `family` (one of FAMILIES).

  Args:
    family: the model_type (gemma3 means gemma3_text).
    tie: tied embeddings (GPT-2 always ties).
    **over: fields replaced.

  Returns:
    The config.
  """
  import transformers

  if family.startswith("gemma"):
    return gemma_config(family, tie, **over)
  if family == "gpt2":
    kw = dict(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64, **IDS)
    return transformers.GPT2Config(**{**kw, **over})
  kind = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "phi3": transformers.Phi3Config,
  }[family]
  kw = dict(SMALL, max_position_embeddings=64, tie_word_embeddings=tie, rope_theta=500.0, **IDS)
  if family == "qwen3":
    kw["head_dim"] = 16  # Qwen3 sets it apart from hidden / heads
  if family in ("mistral", "phi3"):
    kw["sliding_window"] = 5
  return kind(**{**kw, **over})


def model(family, tie=False, seed=0, **over):
  """A randomised tiny torch causal LM of `family`.

  Args:
    family: one of FAMILIES.
    tie: tied embeddings.
    seed: the parameters' seed.
    **over: config fields replaced.

  Returns:
    The transformers model, in eval mode.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  return randomise(transformers.AutoModelForCausalLM.from_config(config(family, tie, **over)), seed)


def ids(shape, seed=0):
  """Random token ids above the special ones.

  Args:
    shape: the array's shape.
    seed: the generator's seed.

  Returns:
    int32 ids in [3, V).
  """
  return np.random.default_rng(seed).integers(3, V, shape).astype(np.int32)


def logits(ref, tokens):
  """transformers' logits of `tokens`.

  Args:
    ref: a torch causal LM.
    tokens: int ids [B, T].

  Returns:
    numpy logits [B, T, V].
  """
  import torch

  with torch.no_grad():
    return ref(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def preset_config(directory):
  """A tiny config.json of the llama-3.2-1b preset's kind (2 layers, width 64), no weights.

  Args:
    directory: where to write it (a pathlib.Path).

  Returns:
    The file's path.
  """
  import json
  import os

  from dpjax.pipelines import plan_memory

  with open(os.path.join(plan_memory.PRESETS, "llama-3.2-1b.json")) as f:
    fields = json.load(f)
  fields.update(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    bos_token_id=1,
    eos_token_id=2,
  )
  path = directory / "config.json"
  path.write_text(json.dumps(fields))
  return str(path)
