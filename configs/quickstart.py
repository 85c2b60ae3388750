"""The default run: DP fine-tuning of MiniLM on Rotten-Tomatoes sentences at eps = 3.

Sized for a 2-core CPU in under 10 minutes: MiniLM's 6 layers are frozen
(run once over every split and cached), and a cosine classifier (a linear
head on the unit-norm mean-pooled embedding, scaled by 3) is trained with
DP-SGD (Poisson sampling, per-example clipping, Gaussian noise calibrated
with the PLD accountant to (3, 1e-5)-DP per example). Training the top layer
too (`--set task.train_layers=1`) is 40x slower on CPU and was not better at
this budget (experiments/RESULTS.md).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(
    dict(
      name="text_classification",
      model="minilm",
      data="rt-polarity",
      max_length=48,
      pooling="mean_l2",
      pool_scale=3.0,
      train_layers=0,
      train_embeddings=False,
      prefix_tokens=0,
      prefix_layers=None,
      dtype="float32",  # compute dtype; "bfloat16" keeps float32 weights, norms and noise
      remat=False,  # recompute each block in the backward pass (less memory; vmap clipping)
    )
  )
  c.private = True
  c.privacy_unit = "example"
  c.target_epsilon = 3.0
  c.noise_multiplier = None  # None: calibrated to target_epsilon for the whole run
  c.delta = 1e-5
  c.accountant = "pld"
  c.mechanism = "gaussian"
  c.l2_clip_norm = 1.0
  c.batch_size = 1024  # expected batch size; sampling_rate = batch_size / N
  c.physical_batch_size = 128
  c.microbatch_size = None
  c.clipping_method = "vmap"  # or "ghost": ghost norms + book-keeping (same sums, one backward)
  c.steps = 300  # ~36 epochs of 8,441 training sentences
  c.optimizer = "adam"
  c.learning_rate = 0.01
  c.learning_rates = None  # e.g. {"layer_": 1e-3}: own lr per top-level parameter-name prefix
  c.weight_decay = 0.0
  c.warmup_steps = 0
  c.seed = 0
  c.log_every = 20
  c.checkpoint_every = 100
  c.dp_sam = None  # e.g. {"rho": 0.05, "mode": "free"}: DP-Flat's in-layer min-max
  c.weight_anchor = None  # e.g. {"lam": 0.01, "reference": "init" | "ref.npz"}
  return c
