"""The fastest compute dtype on this machine, for flags and presets that say 'auto'.

bfloat16 on GPUs and TPUs, and on CPUs with bf16 matrix instructions (AMX-BF16 or
AVX512-BF16, read from /proc/cpuinfo), where XLA:CPU runs bf16 x bf16 -> f32 products
about 3x faster than float32 ones (slim_jax/models/layers.py; benchmarks/distill.py);
float32 elsewhere, where bf16 products are emulated and slower than float32.
"""

from __future__ import annotations

import functools

DTYPES = ("float32", "bfloat16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul(cpuinfo: str = "/proc/cpuinfo") -> bool:
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    return False
  flags = set()
  for line in text.splitlines():
    if line.startswith("flags"):
      flags.update(line.split(":", 1)[-1].split())
  return any(flag in flags for flag in BF16_CPU_FLAGS)


def fast_dtype() -> str:
  """'bfloat16' or 'float32': see the module doc."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() != "cpu":
    return "bfloat16"
  return "bfloat16" if cpu_has_bf16_matmul() else "float32"


def resolve(name: str) -> str:
  """A dtype flag's value: 'auto' -> fast_dtype(); 'float32' and 'bfloat16' as given."""
  if name == "auto":
    return fast_dtype()
  if name not in DTYPES:
    raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
  return name
