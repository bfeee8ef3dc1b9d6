"""experiments/train_recommender.py end to end on a tiny synthetic dataset, and its flag errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "experiments", "train_recommender.py")


def _run(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def test_one_epoch_smoke_run(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--dataset=synthetic", f"--workdir={workdir}", "--model=sasrec",
          "--seeds=0,1", "--epochs=1", "--batch_size=64", "--max_len=12", "--hidden_size=16",
          "--noprogress"]
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| sasrec | bce | 2 |" in proc.stdout
  assert os.path.exists(os.path.join(workdir, "data", "negatives.npz"))
  for model in ("sasrec",):
    with open(os.path.join(workdir, model, "metrics.json")) as f:
      metrics = json.load(f)
    assert set(metrics["per_seed"]) == {"0", "1"}
    summary = metrics["summary"]["test"]
    assert set(summary) == {"ndcg@10", "hr@10", "hr@20"}
    assert 0.0 <= summary["ndcg@10"]["mean"] <= summary["hr@10"]["mean"] <= 1.0
    assert summary["ndcg@10"]["n"] == 2
    assert os.path.isdir(os.path.join(workdir, model, "seed_0", "checkpoints", "1"))
  # A second run with the same settings reuses every seed's result instead of training.
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("not training again") + again.stdout.count("not training again") == 2


@pytest.mark.parametrize("flag,message", [
    ("--model=gru4rec,bert4rec", "unknown ['bert4rec']"),
    ("--seeds=0,x", "--seeds"),
    ("--loss=bpr", "loss"),
    ("--num_heads=3", "not divisible by --num_heads=3"),
])
def test_bad_flags_fail_before_any_work(tmp_path, flag, message):
  workdir = tmp_path / "run"
  proc = _run("--dataset=synthetic", f"--workdir={workdir}", flag, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not workdir.exists()  # nothing was prepared
