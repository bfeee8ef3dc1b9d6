"""benchmarks/gpu.py --quick on the CPU: the prepared GPU script runs end to end (LoRA
distillation with remat, student generation) and writes its JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_benchmark_quick_runs_on_cpu(tmp_path):
  out = tmp_path / "gpu_quick.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"),
                           "--quick", f"--out={out}"], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  cases = [(r["model"], r["case"]) for r in report["rows"]]
  assert cases == [("tiny-llama-remat", "distill"), ("tiny-llama", "generate")]
  for row in report["rows"]:
    assert row["tokens_per_s"] > 0
  assert all(0 < r["mfu"] for r in report["rows"] if r["case"] == "distill")
  generation = report["rows"][-1]
  assert generation["batch"] == 4 and generation["new_tokens"] == 8
