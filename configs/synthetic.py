"""A seconds-long private run on a generated task: smoke test of the loop."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(
    dict(
      name="synthetic", data_seed=0, num_classes=4, dim=16, hidden=32, num_train=4000, num_eval=1000
    )
  )
  c.private = True
  c.privacy_unit = "example"
  c.target_epsilon = 3.0
  c.noise_multiplier = None  # None: calibrated to target_epsilon
  c.delta = 1e-5
  c.accountant = "pld"
  c.mechanism = "gaussian"
  c.l2_clip_norm = 1.0
  c.batch_size = 200  # expected batch size under Poisson sampling
  c.physical_batch_size = 128
  c.microbatch_size = None
  c.clipping_method = "vmap"  # or "ghost" (same sums, one backward pass)
  c.steps = 100
  c.optimizer = "adam"
  c.learning_rate = 1e-2
  c.weight_decay = 0.0
  c.warmup_steps = 0
  c.seed = 0
  c.log_every = 20
  c.checkpoint_every = 50
  return c
