"""Test-wide settings: exact float32 matmuls for parity, 8 fake CPU devices, no hub access.

The device count must be set before JAX starts, so it lives here, ahead of every import of
jax in the tests. Code that is not sharded runs on device 0 as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
