"""The private core: clipping, mechanisms, sampling, accounting and their checks.

It depends on jax, optax, numpy/scipy and dp-accounting only, never on
models, data, paper methods or the training loop; those build on it through
its public extension points (an optax transform, a `DpEvent` and its
accountant).
"""
