"""DistilDP on Shakespeare (CPU scale): DP teacher -> synthetic text -> smaller student.

Teacher: the 2-layer byte-level decoder of `user_shakespeare.py` (pretrained
on PUBLIC Rotten-Tomatoes text), DP-fine-tuned per EXAMPLE on speeches
prefixed by their genre ("tragedy\\t..."), its noise calibrated so that
teacher + the DP genre histogram compose to `total_epsilon`. It then writes
`generation.num_samples` synthetic speeches (top-k 50, top-p 0.9), prompted
by genre in the histogram's proportions. Student: the first layer of the
public pretrained decoder, trained on the synthetic text only with
0.6 CE + 0.4 KL(teacher || student).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.total_epsilon = 2.0
  c.delta = 1e-5
  t = ml_collections.ConfigDict()
  t.task = ml_collections.ConfigDict(
    dict(
      name="shakespeare_lm",
      data="shakespeare",
      seq_len=64,
      heldout_fraction=0.1,
      max_eval=1024,
      pretrain_steps=1500,
      init_seed=0,
      control_code=True,
      model=dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384),
    )
  )
  t.private = True
  t.privacy_unit = "example"
  t.target_epsilon = None  # set by the pipeline from total_epsilon
  t.noise_multiplier = None
  t.delta = 1e-5
  t.accountant = "pld"
  t.mechanism = "gaussian"
  t.l2_clip_norm = 1.0
  t.batch_size = 256
  t.physical_batch_size = 128
  t.microbatch_size = None
  t.clipping_method = "vmap"  # "ghost": the same clipped sums from one backward pass
  t.steps = 60
  t.optimizer = "adam"
  t.learning_rate = 1e-3
  t.weight_decay = 0.0
  t.warmup_steps = 0
  t.seed = 0
  t.log_every = 30
  t.checkpoint_every = 30
  c.teacher = t
  c.histogram = ml_collections.ConfigDict(dict(epsilon=0.1, mechanism="gaussian"))
  c.generation = ml_collections.ConfigDict(
    dict(num_samples=4096, batch_size=256, top_k=50, top_p=0.9, temperature=1.0, seed=0)
  )
  c.student = ml_collections.ConfigDict(
    dict(
      model=dict(hidden_size=128, num_layers=1, num_heads=4, intermediate_size=384),
      init_from_public=True,
      lam=0.4,
      temperature=1.0,
      alpha=0.0,
      steps=300,
      batch_size=64,
      learning_rate=1e-3,
      seed=0,
    )
  )
  return c
