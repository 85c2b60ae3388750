"""`dpjax plan-memory`: will a private step of this model fit, before any hardware is rented.

From a Hugging Face `config.json` (or a shipped preset: `PRESETS`), a method
(LoRA rank and targets, or full fine-tuning), dtypes, a physical batch and a
sequence length, it builds the run's real private step -- the plan of a
validated spec (`make_plan`), the loop's `accumulate` (clipped sum) and
`apply_update` (noise -> normalize -> optimizer) -- on abstract shapes
(`jax.ShapeDtypeStruct`: no weight is ever allocated), lowers and compiles
it, and reads XLA's own `memory_analysis` and `cost_analysis`; the same for
the non-private step of the same model and batch.

What the numbers are: XLA's estimate for the backend it compiles for here.
On a CPU that is the CPU compiler's buffer assignment; a GPU or TPU compile
fuses differently (its temporaries are usually smaller, attention kernels
differ), so treat a CPU figure as a planning estimate and leave headroom,
as the output says. Parameters, optimizer state and the batch are exact
(their shapes and dtypes).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dpjax.models import adapters, hf
from dpjax.models.decoder import Decoder, DecoderConfig, init_params
from dpjax.tasks.causal_lm import check_frozen_dtype, lm_loss
from dpjax.training import sharding as shard_lib
from dpjax.training import spec as spec_lib
from dpjax.training.optimizer import make_optimizer
from dpjax.training.plan import Secret, make_plan
from dpjax.training.step import TrainState, accumulate, apply_update
from dpjax.training.task import Task

PRESETS = os.path.join(os.path.dirname(os.path.abspath(hf.__file__)), "presets")
CPU_NOTE = (
  "XLA's estimate for this machine's backend ({backend}); a GPU/TPU compile fuses "
  "differently (temporaries usually smaller): leave headroom"
)


def preset_names() -> list:
  """The shipped model shapes (`config.json` files of public models, no weights).

  Returns:
    Their names, e.g. ["gemma-2-2b", "llama-3.1-8b", ...].
  """
  return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRESETS, "*.json")))


def decoder_config(model: str, dtype: str) -> DecoderConfig:
  """The decoder a preset name, a `config.json` file or a model directory describes.

  Args:
    model: a preset (`preset_names`), a config.json path, or a directory holding one.
    dtype: the compute dtype.

  Returns:
    The DecoderConfig (raises FileNotFoundError, one line, for none of those).
  """
  from transformers import AutoConfig

  path = os.path.join(PRESETS, model + ".json") if model in preset_names() else model
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{model!r} is neither a preset ({', '.join(preset_names())}), a config.json, nor a "
      "directory holding one"
    )
  with open(path) as f:
    fields = json.load(f)
  kind = fields.pop("model_type", None)
  if kind is None:
    raise ValueError(f"{path}: no model_type (a Hugging Face config.json names its model type)")
  return hf.from_hf_config(AutoConfig.for_model(kind, **fields), path, dtype)


def _spec(private: bool, batch: int, clipping: str, optimizer: str):
  cfg = {
    "task": {"name": "plan-memory"},
    "private": private,
    "noise_multiplier": 1.0 if private else None,
    "target_epsilon": None,
    "batch_size": batch,
    "physical_batch_size": batch,
    "clipping_method": clipping,
    "optimizer": optimizer,
    "steps": 1,
  }
  return spec_lib.validate(spec_lib.with_defaults(cfg))


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _device_bytes(tree, mesh: Optional[Mesh]) -> int:
  """One device's share of `tree` as the loop places it (`sharding.param_sharding`)."""
  if mesh is None:
    return _bytes(tree)
  at = shard_lib.param_sharding(tree, mesh)
  return int(
    sum(
      np.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
      for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(at))
    )
  )


def mesh_devices(data: int, model: int) -> Optional[Mesh]:
  """A `("data", "model")` mesh of `data` x `model` devices, virtual CPU ones if need be.

  When this process has fewer devices than the mesh needs and JAX has not
  started yet, CPU devices are made (`jax_num_cpu_devices`, never fewer than
  XLA_FLAGS asks for): the compile then plans a pod from one machine.

  Args:
    data: devices on the batch axis.
    model: devices on the parameter axis (FSDP-style splits).

  Returns:
    The Mesh, or None for one device (raises ValueError, one line, when the
    devices cannot be had).
  """
  if data < 1 or model < 1:
    raise ValueError(f"--mesh must be DATAxMODEL with both >= 1, got {data}x{model}")
  n = data * model
  if n == 1:
    return None
  flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  try:
    jax.config.update("jax_num_cpu_devices", max(n, int(flag.group(1)) if flag else 1))
  except RuntimeError:  # JAX has started: the devices it has are the ones there are
    pass
  devices = jax.devices() if jax.device_count() >= n else jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(
      f"--mesh {data}x{model} needs {n} devices; this process has {len(devices)} "
      f"(virtual CPU devices are made before JAX starts: XLA_FLAGS="
      f"--xla_force_host_platform_device_count={n}, or `dpjax plan-memory` in a fresh process)"
    )
  return shard_lib.make_mesh(devices[:n], model=model)


class Step(NamedTuple):
  """One step of the loop for a model and a batch shape, jitted, not yet compiled."""

  fn: Callable  # (params, opt_state, frozen, examples, mask) -> TrainState, params/state donated
  tx: Any  # the private (or plain) optimizer: tx.init(params) is the optimizer state
  args: tuple  # the arguments' shapes (ShapeDtypeStructs)


def build_step(
  trainable,
  frozen,
  loss_fn,
  *,
  private: bool,
  batch: int,
  seq: int,
  clipping: str,
  optimizer: str,
  mesh: Optional[Mesh] = None,
) -> Step:
  """One step of the loop (the plan's `accumulate` then `apply_update`) on one physical batch.

  The plan is a validated spec's (`make_plan`) with a fresh secret; on a mesh
  the step is jitted as the loop places it: the batch split over "data", the
  trained and frozen parameters and the optimizer state split over "model"
  (`sharding.param_sharding`).

  Args:
    trainable: the trained parameters (or their ShapeDtypeStructs).
    frozen: the frozen parameters (or their shapes).
    loss_fn: the per-example loss.
    private: the DP step, or the non-private one.
    batch: units per physical batch (all devices together).
    seq: tokens per unit.
    clipping: "ghost" or "vmap".
    optimizer: the optimizer's name.
    mesh: the device mesh, or None (one device).

  Returns:
    The `Step`.
  """
  spec = _spec(private, batch, clipping, optimizer)
  ids = np.zeros((batch, seq), np.int32)  # the plan reads the data's size; nothing is run
  data = {"input_ids": ids, "attention_mask": ids + 1, "loss_mask": ids + 1}
  task = Task("plan-memory", trainable, frozen, loss_fn, data, {})
  plan = make_plan(spec, task, secret=Secret.fresh())
  tx = plan.transform(make_optimizer(spec.optimizer, 1e-3))
  shapes = jax.eval_shape(lambda t: t, (trainable, frozen))
  opt_state = jax.eval_shape(tx.init, shapes[0])

  def step(params, opt_state, frozen, examples, mask):
    gsum = jax.tree.map(jnp.zeros_like, params)
    gsum, _ = accumulate(gsum, params, frozen, examples, mask, plan=plan, loss_fn=loss_fn)
    return apply_update(TrainState(params, opt_state, jnp.zeros([], jnp.int32)), gsum, tx)

  examples = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in data}
  mask = jax.ShapeDtypeStruct((batch,), jnp.float32)
  args = (shapes[0], opt_state, shapes[1], examples, mask)
  if mesh is None:
    return Step(jax.jit(step, donate_argnums=(0, 1)), tx, args)
  rows = shard_lib.batch_sharding(mesh)
  params_at = shard_lib.param_sharding(shapes[0], mesh)
  state_at = TrainState(
    params_at, shard_lib.param_sharding(opt_state, mesh), shard_lib.replicated(mesh)
  )
  in_at = (
    params_at,
    state_at.opt_state,
    shard_lib.param_sharding(shapes[1], mesh),
    jax.tree.map(lambda _: rows, examples),
    rows,
  )
  fn = jax.jit(step, donate_argnums=(0, 1), in_shardings=in_at, out_shardings=state_at)
  return Step(fn, tx, args)


def compiled_step(trainable, frozen, loss_fn, **run) -> Dict[str, Any]:
  """XLA's memory and cost analyses of `build_step(trainable, frozen, loss_fn, **run)`.

  Args:
    trainable: the trained parameters' shapes.
    frozen: the frozen parameters' shapes.
    loss_fn: the per-example loss.
    **run: `build_step`'s keywords (private, batch, seq, clipping, optimizer, mesh).

  Returns:
    {"argument", "output", "alias", "temp", "peak", "flops", "bytes_accessed",
    "optimizer_state"} (bytes and FLOPs per device).
  """
  step = build_step(trainable, frozen, loss_fn, **run)
  compiled = step.fn.lower(*step.args).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
    "argument": int(mem.argument_size_in_bytes),
    "output": int(mem.output_size_in_bytes),
    "alias": int(mem.alias_size_in_bytes),
    "temp": int(mem.temp_size_in_bytes),
    "flops": float(cost.get("flops", float("nan"))),
    "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    "optimizer_state": _device_bytes(step.args[1], run.get("mesh")),
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def model_parts(
  model: str, *, lora_rank: int, lora_targets: str, dtype: str, frozen_dtype: str
) -> Tuple[DecoderConfig, Any, Any, Any, Callable]:
  """The decoder a model names and what a run of it trains, as shapes.

  Args:
    model: a preset, a config.json, or a model directory (`decoder_config`).
    lora_rank: LoRA's rank, or 0 for full fine-tuning.
    lora_targets: the LoRA layers (a regex on parameter paths).
    dtype: the compute dtype.
    frozen_dtype: how the frozen base is stored (LoRA).

  Returns:
    (config, every parameter's shape, the trained ones', the frozen ones', the
    per-example loss).
  """
  check_frozen_dtype(frozen_dtype, "frozen_dtype")
  cfg = dataclasses.replace(decoder_config(model, dtype), remat=False)
  params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
  decoder = Decoder(cfg)
  if not lora_rank:
    return cfg, params, params, {}, lm_loss(decoder)
  re.compile(lora_targets)
  trainable = jax.eval_shape(
    lambda p: adapters.init_lora(p, jax.random.PRNGKey(0), rank=lora_rank, targets=lora_targets),
    params,
  )
  frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype), params)
  return cfg, params, trainable, frozen, lm_loss(decoder, float(lora_rank))


def plan_memory(
  model: str,
  *,
  lora_rank: int = 16,
  lora_targets: str = r".*attn/(q|k|v|o)",
  dtype: str = "bfloat16",
  frozen_dtype: str = "bfloat16",
  batch: int = 4,
  seq: int = 256,
  clipping: str = "ghost",
  optimizer: str = "adam",
  mesh: Tuple[int, int] = (1, 1),
) -> Dict[str, Any]:
  """The DP step's and the non-private step's memory and FLOPs, per device.

  Args:
    model: a preset, a config.json, or a model directory (`decoder_config`).
    lora_rank: LoRA's rank, or 0 for full fine-tuning.
    lora_targets: the LoRA layers (a regex on parameter paths).
    dtype: the compute dtype ("float32" or "bfloat16").
    frozen_dtype: how the frozen base is stored (LoRA).
    batch: units per physical batch.
    seq: tokens per unit.
    clipping: "ghost" or "vmap".
    optimizer: the optimizer's name.
    mesh: (data, model) devices (`mesh_devices`); (1, 1) is one device.

  Returns:
    {"model", "parameters", "trained", "trained_bytes", "frozen_bytes", "dp", "non_private",
    "backend", "batch", "seq", "mesh", "device_trained_bytes", "device_frozen_bytes"}: "dp"
    and "non_private" as `compiled_step` gives them; "device_*" one device's share.
  """
  if batch < 1 or seq < 2:
    raise ValueError(f"batch must be >= 1 and seq >= 2, got batch={batch}, seq={seq}")
  devices = mesh_devices(*mesh)  # before compiling anything
  if batch % mesh[0]:
    raise ValueError(f"batch {batch} must divide over the mesh's {mesh[0]} data devices")
  _, params, trainable, frozen, loss_fn = model_parts(
    model,
    lora_rank=lora_rank,
    lora_targets=lora_targets,
    dtype=dtype,
    frozen_dtype=frozen_dtype,
  )
  run = dict(batch=batch, seq=seq, clipping=clipping, optimizer=optimizer, mesh=devices)
  return {
    "model": model,
    "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
    "trained": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))),
    "trained_bytes": _bytes(trainable),
    "frozen_bytes": _bytes(frozen),
    "dp": compiled_step(trainable, frozen, loss_fn, private=True, **run),
    "non_private": compiled_step(trainable, frozen, loss_fn, private=False, **run),
    # the compile's platform: a mesh larger than the accelerators is planned on CPU devices
    "backend": jax.default_backend() if devices is None else devices.devices.flat[0].platform,
    "batch": batch,
    "seq": seq,
    "mesh": list(mesh),
    "device_trained_bytes": _device_bytes(trainable, devices),
    "device_frozen_bytes": _device_bytes(frozen, devices),
  }


def _count(n: int) -> str:
  return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.4g} M"


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def parse_size(text: str) -> int:
  """'16GiB', '80 GB', '512MiB' -> bytes.

  Args:
    text: a number and a unit (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB).

  Returns:
    The bytes (raises ValueError naming what is allowed).
  """
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)\s*", text, flags=re.I)
  if not m:
    raise ValueError(f"--device-memory must look like 16GiB or 80GB, got {text!r}")
  unit = m.group(2).upper()
  power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
  return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


def parse_mesh(text: str) -> Tuple[int, int]:
  """'8x8' -> (8, 8): devices on the data axis and on the model axis.

  Args:
    text: DATAxMODEL.

  Returns:
    (data, model) (raises ValueError naming what is allowed).
  """
  m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f"--mesh must be DATAxMODEL with both >= 1, e.g. 8x8, got {text!r}")
  return int(m.group(1)), int(m.group(2))


def report(r: Dict[str, Any], device_memory: Optional[int] = None) -> str:
  """`plan_memory`'s result as the lines `dpjax plan-memory` prints.

  Args:
    r: the result.
    device_memory: one device's memory in bytes, or None.

  Returns:
    The text.
  """
  dp, base = r["dp"], r["non_private"]
  data, model = r["mesh"]
  where = "one device"
  if data * model > 1:
    where = f"per device of a {data} x {model} (data x model) mesh"
  rows = [
    ("trained parameters", r["device_trained_bytes"], r["device_trained_bytes"]),
    ("frozen parameters", r["device_frozen_bytes"], r["device_frozen_bytes"]),
    ("optimizer state", dp["optimizer_state"], base["optimizer_state"]),
    ("temporaries (activations, gradients)", dp["temp"], base["temp"]),
    ("peak (arguments + outputs - donated + temporaries)", dp["peak"], base["peak"]),
  ]
  lines = [
    f"{r['model']}: {_count(r['parameters'])} parameters, {_count(r['trained'])} trained, "
    f"batch {r['batch']} x {r['seq']} tokens; {where}",
    f"{'':52s} {'DP step':>12s} {'non-private':>12s} {'ratio':>7s}",
  ]
  for name, a, b in rows:
    ratio = f"{a / b:.3f}x" if b else "-"
    lines.append(f"{name:52s} {_size(a):>12s} {_size(b):>12s} {ratio:>7s}")
  for name, key in (("GFLOPs", "flops"), ("GB accessed", "bytes_accessed")):
    a, b = dp[key] / 1e9, base[key] / 1e9
    lines.append(f"{name:52s} {a:12.4g} {b:12.4g} {a / b if b else float('nan'):6.3f}x")
  if device_memory:
    fits = "fits" if dp["peak"] <= device_memory else "does NOT fit"
    lines.append(f"the DP step {fits} a {_size(device_memory)} device (peak {_size(dp['peak'])})")
  lines.append(CPU_NOTE.format(backend=r["backend"]))
  return "\n".join(lines)


def add_arguments(parser) -> None:
  """`dpjax plan-memory`'s arguments.

  Args:
    parser: its argparse parser.
  """
  parser.add_argument(
    "model",
    help="a preset (" + ", ".join(preset_names()) + "), a config.json, or a model directory",
  )
  parser.add_argument("--lora-rank", type=int, default=16, help="LoRA's rank; 0: full fine-tuning")
  parser.add_argument("--lora-targets", default=r".*attn/(q|k|v|o)", help="LoRA layers (a regex)")
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--frozen-dtype", default="bfloat16", help="the frozen base's storage dtype")
  parser.add_argument("--batch", type=int, default=4, help="units per physical batch (all devices)")
  parser.add_argument("--seq", type=int, default=256, help="tokens per unit")
  parser.add_argument("--clipping", default="ghost", choices=["ghost", "vmap"])
  parser.add_argument("--device-memory", default=None, help="one device's memory, e.g. 16GiB, 80GB")
  parser.add_argument(
    "--mesh",
    default="1x1",
    help="DATAxMODEL devices, e.g. 8x8: batch split over data, parameters over model "
    "(virtual CPU devices when this machine has fewer)",
  )


def command(args) -> int:
  """`dpjax plan-memory`: every input checked (one line each), then the compiles, then the table.

  Args:
    args: the parsed arguments (`add_arguments`).

  Returns:
    The exit status.
  """
  device = parse_size(args.device_memory) if args.device_memory else None
  result = plan_memory(
    args.model,
    lora_rank=args.lora_rank,
    lora_targets=args.lora_targets,
    dtype=args.dtype,
    frozen_dtype=args.frozen_dtype,
    batch=args.batch,
    seq=args.seq,
    clipping=args.clipping,
    mesh=parse_mesh(args.mesh),
  )
  print(report(result, device))
  return 0
