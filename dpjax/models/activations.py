"""Activation functions by their Hugging Face config names (`hidden_act`)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn


def activation(name: str) -> Callable:
  """`"gelu"` is the exact (erf) GELU; the tanh-approximate names are the approximate one.

  Args:
    name: an HF `hidden_act` name ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", ...).

  Returns:
    The activation function.
  """
  if name == "gelu":
    return lambda x: nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
    return lambda x: nn.gelu(x, approximate=True)
  if name == "silu":
    return nn.silu
  if name == "relu":
    return nn.relu
  raise ValueError(f"unsupported hidden_act {name!r}")
