"""The privacy plan as an object: everything privacy-relevant of one run (segment), decided.

`PrivacyPlan` holds the run's sampler, clipped-gradient function, mechanism
object (`dpjax.core.mechanisms`), expected batch size, unit, accountant and
the ledger before it; its `transform` is the noise -> [DP-SAM] -> normalize
-> optimizer chain and `ledger_at` / `epsilon_fields` / `privacy_record` what
it released. `dpjax.training.plan.make_plan` makes it from a validated spec.

Randomness: `Secret` holds the entropy of the noise and of the sampler,
from the OS by default (`Secret.fresh()`), kept only in the checkpoint; a
research run may fix `noise_seed`, and every privacy statement then says
that the guarantee assumes the seed is secret. Initialisation, splits and
shuffles use the public `seed`. The noise, the sampler and DP-SAM's ascent
noise are separate streams of the secret, and each ledger segment has its
own (`segment_stream`): a resume that changes the plan never draws a noise
or a batch an earlier segment drew; no key is used twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
import optax

from dpjax.core import accounting
from dpjax.core.accounting.ledger import Ledger, Segment
from dpjax.core.mechanisms import Mechanism, QuantileClipState, find_state, normalize
from dpjax.methods import flatness


@dataclasses.dataclass(frozen=True)
class Secret:
  """The entropy of a run's noise and sampling: an integer, and whether it is secret."""

  entropy: int
  secret: bool  # False when derived from a fixed `noise_seed`

  @classmethod
  def fresh(cls) -> Secret:
    """128 bits of OS entropy, never written outside the run's checkpoints."""
    return cls(secrets.randbits(128), True)

  @classmethod
  def from_seed(cls, noise_seed: int) -> Secret:
    """A secret from a user's `noise_seed` (the guarantee then assumes the seed is secret).

    Args:
      noise_seed: any integer.

    Returns:
      The Secret, marked not generated.
    """
    return cls(int(noise_seed) % 2**128, False)

  def _words(self, kind: int, n: int, stream: int = 0) -> np.ndarray:
    words = [self.entropy, kind] + ([stream] if stream else [])
    return np.random.SeedSequence(words).generate_state(n, np.uint32)

  def noise_key(self, stream: int = 0) -> jax.Array:
    """Raw threefry key of the noise (kind 1) of ledger stream `stream` (`segment_stream`).

    Args:
      stream: 0 for a run's first segment, `segment_stream(...)` for a later one.

    Returns:
      A uint32[2] key.
    """
    return jax.numpy.asarray(self._words(1, 2, stream))

  def ascent_key(self, stream: int = 0) -> jax.Array:
    """Raw threefry key of charged DP-SAM's ascent noise (kind 2) of ledger stream `stream`.

    Args:
      stream: as in `noise_key`.

    Returns:
      A uint32[2] key.
    """
    return jax.numpy.asarray(self._words(2, 2, stream))

  def sampling_seed(self, stream: int = 0) -> int:
    """Seed of the Poisson sampler (kind 3) of ledger stream `stream`, 128 bits.

    Args:
      stream: as in `noise_key`.

    Returns:
      The seed.
    """
    w = self._words(3, 4, stream)
    return int(sum(int(x) << (32 * i) for i, x in enumerate(w)))

  def to_json(self) -> Dict[str, Any]:
    """The secret as a JSON-ready dict (for the checkpoint only)."""
    return {"entropy": str(self.entropy), "secret": self.secret}

  @classmethod
  def from_json(cls, d: Dict[str, Any]) -> Secret:
    """The secret written by `to_json`.

    Args:
      d: the dict read from a checkpoint.

    Returns:
      The Secret.
    """
    return cls(int(d["entropy"]), bool(d["secret"]))


def guarantee_note(secret: bool) -> str:
  """What the printed guarantee assumes about the noise's randomness.

  Args:
    secret: whether the entropy came from the OS (`Secret.secret`).

  Returns:
    One line for privacy.json and the CLI.
  """
  return (
    "noise and sampling from OS entropy, kept only in the checkpoint"
    if secret
    else "noise_seed is fixed: the guarantee assumes that seed is secret"
  )


def segment_stream(earlier: Sequence[Segment], segment: Segment) -> int:
  """The stream of the noise, sampling and ascent draws of `segment`, after `earlier` segments.

  0 for a run's first segment (the streams a fresh run always drew); a
  later segment's stream is a 128-bit hash of its index and of the privacy
  keys of every segment up to it. A resume that continues a segment gets
  its stream again (bit for bit the same steps: no second release); one
  that changes the plan gets a stream no released step drew from, so the
  steps it replays past the last checkpoint are fresh draws.

  Args:
    earlier: the ledger's segments before `segment`.
    segment: the segment (its step counts are ignored).

  Returns:
    The stream (an int).
  """
  if not earlier:
    return 0
  keys = [repr(s.privacy_key()) for s in (*earlier, segment)]
  digest = hashlib.sha256(json.dumps([len(earlier), keys]).encode()).digest()
  return int.from_bytes(digest[:16], "little") | 1  # never 0


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class PrivacyPlan:
  """Everything privacy-relevant of one run (segment), decided once.

  `prior` is what earlier segments released (the checkpoint's ledger, plus
  steps that ran past it if the plan changed); this plan's own segment covers
  steps [start_step, steps).
  """

  private: bool
  mechanism: Optional[Mechanism]  # the noise (None when not private)
  sampling_rate: Optional[float]
  unit: str
  sampling: Optional[str]
  max_examples_per_user: int
  expected_batch_size: float
  accountant: str
  delta: Optional[float]
  steps: int
  start_step: int
  num_units: int
  sampler: Any
  grad_fn: Any  # dpjax.clipped_grad result, None when not private
  sam: Optional[flatness.DPSAM]
  secret: Secret
  prior: Ledger = Ledger()
  origin: Optional[Dict[str, Any]] = None  # the spec values that chose the noise
  bands: int = 1  # BandMF's b (1: independent noise)
  mf_coefs: Optional[tuple] = None  # the b-banded strategy's c_0..c_{b-1}
  mf_buffers: int = 0  # BLT's m (0: no BLT)
  mf_blt: Optional[tuple] = None  # BLT's (decay, scale), fitted to the run's steps and groups
  adaptive: Optional[Dict[str, Any]] = None  # adaptive clipping, count_noise resolved
  stream: int = 0  # this segment's noise, sampling and ascent stream (`segment_stream`)

  @property
  def noise_multiplier(self) -> float:
    """The mechanism's sigma (0 when not private, or for a mechanism without one: LMO)."""
    return 0.0 if self.mechanism is None else float(self.mechanism.noise_multiplier)

  @property
  def gradient_noise_multiplier(self) -> float:
    """sigma on the gradient sum: the accounted sigma, less what the quantile count takes."""
    if self.adaptive is None or not self.private:
      return float(self.noise_multiplier)
    return self.mechanism.gradient_noise_multiplier

  def clip_norm_now(self, opt_state) -> Optional[jax.Array]:
    """The clip norm this step must use (adaptive clipping), or None (the fixed bound).

    Args:
      opt_state: the optimizer state of `transform(...)`.

    Returns:
      The adaptive clip norm (a device scalar), or None.
    """
    if self.adaptive is None or not self.private:
      return None
    return find_state(opt_state, QuantileClipState).clip_norm

  @property
  def mf_sensitivity(self) -> float:
    """BLT: the sensitivity of C x over the run (units in at most ceil(steps / b) steps, b
    apart, `matrix_factorization.toeplitz_sensitivity`); 1 without BLT."""
    return self.mechanism.c_sensitivity if self.mf_buffers else 1.0

  @property
  def per_user(self) -> bool:
    """Whether a unit is a user's group of examples (`PhysicalBatch` of `UserBatch`es)."""
    return self.sampler.per_user

  @property
  def noise_seed_secret(self) -> bool:
    return self.secret.secret

  def ascent_releases(self, start: int, end: int) -> int:
    """Charged DP-SAM's extra releases among steps [start, end).

    Args:
      start: the first step.
      end: one past the last step.

    Returns:
      The number of charged ascent releases.
    """
    if self.sam is None or not self.sam.charged:
      return 0
    active = self.steps if self.sam.active_steps is None else self.sam.active_steps
    return max(0, min(end, active) - start)

  def segment(self, end: int) -> Segment:
    """This plan's releases over steps [start_step, end).

    Args:
      end: one past the last step.

    Returns:
      The ledger Segment.
    """
    return Segment(
      mechanism=self.mechanism.name,
      noise_multiplier=self.noise_multiplier,
      sampling_rate=float(self.sampling_rate),
      unit=self.unit,
      sampling=self.sampling,
      max_examples_per_user=int(self.max_examples_per_user),
      steps=int(end - self.start_step),
      extra_releases=self.ascent_releases(self.start_step, end),
      accountant=self.accountant,
      settings=self.mechanism.settings(),
      num_units=int(self.num_units),
      origin=self.origin,
      bands=int(self.bands),
      mf_buffers=int(self.mf_buffers),
      mf_horizon=int(self.steps) if self.mf_buffers else None,
    )

  def ledger_at(self, step: int) -> Ledger:
    """The ledger after `step` steps: prior segments + this plan's up to `step`.

    Args:
      step: the steps run (start_step or more).

    Returns:
      The Ledger.
    """
    if not self.private:
      return Ledger()
    if step <= self.start_step:
      return self.prior
    return self.prior.record(self.segment(step))

  def event(self, step: int):
    """The `DpEvent` of everything released after `step` steps.

    Args:
      step: the steps run.

    Returns:
      The DpEvent.
    """
    return self.ledger_at(step).event()

  def epsilon_fields(self, step: int) -> Dict[str, Any]:
    """{"epsilon": the bound, "privacy_unit", ["epsilon_<acc>_estimate"]} after `step` steps.

    Args:
      step: the steps run.

    Returns:
      The dict (epsilon inf for a non-private plan).
    """
    if not self.private:
      return {"epsilon": math.inf, "privacy_unit": self.unit}
    ledger = self.ledger_at(step)
    out = {
      "epsilon": ledger.epsilon(self.delta, accounting.bound_accountant(self.accountant)),
      "privacy_unit": self.unit,
    }
    if self.accountant in accounting.ESTIMATES:
      out[f"epsilon_{self.accountant}_estimate"] = ledger.epsilon(self.delta, self.accountant)
    return out

  def privacy_record(self, step: int) -> Dict[str, Any]:
    """What `privacy.json` holds after `step` steps.

    Args:
      step: the steps run.

    Returns:
      The record (guarantee, ledger, noise, sampling, what it assumes).
    """
    fields = self.epsilon_fields(step)
    return {
      "epsilon": fields["epsilon"],
      "delta": self.delta,
      "privacy_unit": self.unit,
      "accountant": accounting.bound_accountant(self.accountant) if self.private else None,
      "upper_bound": True if self.private else None,
      **{k: v for k, v in fields.items() if k.endswith("_estimate")},
      "steps": int(step),
      "private": self.private,
      "noise_seed_secret": self.noise_seed_secret,
      "assumes": guarantee_note(self.noise_seed_secret) if self.private else None,
      "ledger": self.ledger_at(step).to_json(),
    }

  def rekey(self, opt_state, stream: int):
    """`opt_state` restored from a checkpoint of `stream`, its noise key this plan's own.

    The noise transform keeps its key in the optimizer state (the first
    state of `transform`'s chain), so a checkpoint carries the key of the
    segment that wrote it. A plan that continues that segment keeps it (the
    same draws, bit for bit); one on a new segment replaces it with its own
    stream's key, so no released draw is drawn again.

    Args:
      opt_state: the restored optimizer state.
      stream: the stream of the segment that wrote the checkpoint.

    Returns:
      The optimizer state to continue from.
    """
    if not self.private or int(stream) == self.stream:
      return opt_state
    noise, *rest = opt_state
    key = jax.device_put(self.secret.noise_key(self.stream), noise.key.sharding)
    return (noise._replace(key=key), *rest)

  def noise_variance(self, clip_norm: Optional[jax.Array] = None):
    """Per-coordinate variance of the noise in the normalised update (0 when not private).

    What DP-AdamBC subtracts from its second moment: (sigma C / B)^2 for
    Gaussian noise (times sum_k d_k^2 of C^-1 for BandMF: its last step's),
    2 (scale / B)^2 for Laplace, Var Z / B^2 for LMO (the mechanism's
    `noise_variance` / B^2), with B the expected batch size the sum is
    divided by; with adaptive clipping (sigma_g C_t /
    B)^2 at this step's clip norm C_t. Public: a function of the plan's noise,
    its sampling and earlier releases only.

    Args:
      clip_norm: adaptive clipping's C_t (`clip_norm_now`); needed exactly
        when the plan clips adaptively.

    Returns:
      The variance (a device scalar with adaptive clipping).
    """
    if not self.private:
      return 0.0
    sens, batch = self.grad_fn.sensitivity(), self.expected_batch_size
    if (self.adaptive is None) != (clip_norm is None):
      raise ValueError("noise_variance takes this step's clip_norm exactly with adaptive clipping")
    if clip_norm is not None:  # a device scalar: the variance is one too
      return self.mechanism.noise_variance(clip_norm) / batch**2
    return float(self.mechanism.noise_variance(sens) / batch**2)

  def noise_transform(self, key: jax.Array) -> optax.GradientTransformation:
    """The privatiser alone, on the clipped sum.

    Args:
      key: the noise key.

    Returns:
      The mechanism's transform at the plan's sensitivity, or the Gaussian's
      correlated (BandMF with bands > 1, BLT) or adaptive (with its count,
      which `update` then needs as `quantile_count=`) variant.
    """
    return self.mechanism.transform(key, self.grad_fn.sensitivity())

  def transform(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """noise -> [DP-SAM] -> normalize(expected batch) -> optimizer, as one optax chain.

    Args:
      optimizer: the optax optimizer.

    Returns:
      The chained transform (no noise for a non-private plan).
    """
    sam = [self.sam] if self.sam is not None else []
    if not self.private:
      return optax.chain(*sam, normalize(self.expected_batch_size), optimizer)
    after = [*sam, normalize(self.expected_batch_size), optimizer]
    return optax.chain(
      self.noise_transform(self.secret.noise_key(self.stream)),
      *[_released_only(t) for t in after],
    )


PRIVATE_EXTRA_ARGS = ("quantile_count",)  # consumed by the noise, never seen after it


def _released_only(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` without the private extra arguments: what follows the noise sees released values only.

  Adaptive clipping's `quantile_count` (sum_i 1[||g_i|| <= C] - 1/2, a
  function of the private batch) is noised inside the noise transform;
  passed on through `optax.chain` it would reach the optimizer in the
  clear. The state of `tx` is unchanged.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    for k in PRIVATE_EXTRA_ARGS:
      extra_args.pop(k, None)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
