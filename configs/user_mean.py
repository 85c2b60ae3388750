"""User-level private mean estimation: users with diverse vs identical examples."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(
    dict(
      name="user_mean",
      data_seed=0,
      dim=16,
      num_users=2000,
      examples_per_user=16,
      mean_norm=0.5,
      user_spread=0.5,
      diverse=True,
    )
  )
  c.private = True
  c.privacy_unit = "user"
  c.user_sampling = "els"
  c.max_examples_per_user = 16
  c.users_per_step = 16.0
  c.batch_size = 256  # expected examples per step (both schemes)
  c.target_epsilon = 3.0
  c.noise_multiplier = None
  c.delta = 1e-5
  c.accountant = "pld"
  c.mechanism = "gaussian"
  c.l2_clip_norm = 1.0
  c.physical_batch_size = 512
  c.microbatch_size = None
  c.clipping_method = "vmap"  # or "ghost" (same sums, one backward pass)
  c.steps = 50
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.weight_decay = 0.0
  c.warmup_steps = 0
  c.seed = 0
  c.log_every = 50
  c.checkpoint_every = 1000
  return c
