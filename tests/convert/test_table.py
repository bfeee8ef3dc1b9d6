"""A bfloat16 load of a 1B LLaMA shape holds about one copy of the weights: tensors are
read one at a time from the safetensors file and cast as they come, never a float32 model
and never the whole file beside the tree (slim_jax/convert/table.py SafetensorsFolder)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from slim_jax.convert import pretrained

def high_water():  # bytes; VmHWM starts afresh at exec, unlike ru_maxrss
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

base = high_water()
config, params, _ = pretrained.load_llama(sys.argv[2], param_dtype="bfloat16")
peak = high_water()
leaves = jax.tree.leaves(params)
print(json.dumps({"base": base, "peak": peak, "dtypes": sorted({str(x.dtype) for x in leaves}),
                  "bytes": int(sum(x.nbytes for x in leaves))}))
"""


@pytest.mark.slow  # writes and reads a 2.2 GB checkpoint
def test_a_bfloat16_load_of_a_1b_shape_stays_near_its_bytes(tmp_path):
  import ml_dtypes
  from safetensors.numpy import save_file
  from slim_jax import memory_plan
  from slim_jax.convert import llama_hf
  from slim_jax.models import llama
  config = memory_plan.PRESETS["llama-1b"]
  folder = tmp_path / "llama-1b"
  folder.mkdir()
  rng = np.random.default_rng(0)
  tensors = {}
  for path, (hf_key, _, _) in llama_hf.table(config).items():
    shape = llama.param_shapes(config)[path]
    if path[-1] == "kernel":
      shape = shape[::-1]  # torch Linear [out, in]
    tensors[hf_key] = rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)
  save_file(tensors, str(folder / "model.safetensors"))
  expected = sum(t.nbytes for t in tensors.values())
  del tensors
  config.to_hf_config().save_pretrained(str(folder))  # config.json
  out = subprocess.run([sys.executable, "-c", CHILD, ROOT, str(folder)], capture_output=True,
                       text=True, timeout=900, check=False,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["dtypes"] == ["bfloat16"] and result["bytes"] == expected
  grown = result["peak"] - result["base"]
  print(f"bfloat16 weights {expected / 2**30:.2f} GiB, peak RSS growth {grown / 2**30:.2f} GiB "
        f"({grown / expected:.2f}x)")
  assert grown < 1.3 * expected
