"""'auto' dtype: bfloat16 where the CPU has bf16 matrix instructions, else float32."""

import pytest

from slim_jax import precision


def _cpuinfo(tmp_path, flags: str) -> str:
  path = tmp_path / "cpuinfo"
  path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
                  f"processor\t: 1\nflags\t\t: fpu sse2 avx2 {flags}\n")
  return str(path)


@pytest.mark.parametrize("flags, expected", [("amx_bf16 amx_tile", True),
                                             ("avx512f avx512_bf16", True),
                                             ("avx512f avx512bw", False), ("", False)])
def test_cpu_bf16_detection_reads_the_flags_line(tmp_path, flags, expected):
  assert precision.cpu_has_bf16_matmul(_cpuinfo(tmp_path, flags)) is expected


def test_missing_cpuinfo_means_no_bf16(tmp_path):
  assert precision.cpu_has_bf16_matmul(str(tmp_path / "absent")) is False


def test_resolve_passes_explicit_dtypes_and_rejects_others(monkeypatch):
  assert precision.resolve("float32") == "float32"
  assert precision.resolve("bfloat16") == "bfloat16"
  monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
  assert precision.resolve("auto") == "float32"  # the CPU backend without bf16 units
  monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
  assert precision.resolve("auto") == "bfloat16"
  with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
    precision.resolve("float16")
