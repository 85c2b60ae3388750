"""User-level DP on Shakespeare: each speaking character is a user (issue: ELS vs ULS).

A small byte-level decoder, pretrained on public text, fine-tuned with
user-level DP. `user_sampling` = "els" (sample examples after capping each
user to G) or "uls" (sample users, mean over their <= G examples, clip per
user). Held-out perplexity is on characters never seen in training.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(
    dict(
      name="shakespeare_lm",
      data="shakespeare",
      seq_len=64,
      heldout_fraction=0.1,
      max_eval=1024,
      pretrain_steps=1500,
      init_seed=0,
      model=dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384),
    )
  )
  c.private = True
  c.privacy_unit = "user"
  c.user_sampling = "uls"
  c.max_examples_per_user = "median"
  c.users_per_step = 64  # ULS: expected users per step
  c.batch_size = 256  # ELS: expected examples per step
  c.target_epsilon = 3.0
  c.noise_multiplier = None
  c.delta = 1e-5
  c.accountant = "pld"
  c.mechanism = "gaussian"
  c.l2_clip_norm = 1.0
  c.physical_batch_size = 64
  c.microbatch_size = None
  c.clipping_method = "vmap"  # or "ghost" (same sums, one backward pass)
  c.steps = 100
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.weight_decay = 0.0
  c.warmup_steps = 0
  c.seed = 0
  c.log_every = 25
  c.checkpoint_every = 100
  return c
