import os

# Sharding tests need several devices; on CPU they are virtual. Must be set
# before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests build a fresh privacy plan (a new static argument of the jitted
# step) for the same shapes: XLA's persistent cache, here one per test session,
# lets the second and later compilations of an identical program be reused.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dpjax-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
