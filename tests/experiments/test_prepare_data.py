"""experiments/prepare_data.py end to end, as a user runs it (its own process, absl flags)."""

import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCRIPT = os.path.join(_REPO, "experiments", "prepare_data.py")


def _run(*flags):
  env = {**os.environ, "PYTHONPATH": _REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, _SCRIPT, *flags], capture_output=True, text=True,
                        env=env, cwd=_REPO, timeout=300, check=False)


def test_synthetic_end_to_end_then_reload(tmp_path):
  workdir = str(tmp_path / "run")
  result = _run("--dataset=synthetic", f"--workdir={workdir}", "--max_len=20", "--seed=3")
  assert result.returncode == 0, result.stderr[-3000:]
  data = os.path.join(workdir, "data")
  with open(os.path.join(data, "data_summary.json")) as f:
    summary = json.load(f)
  for key in ("users", "items", "interactions", "sparsity", "mean_length", "lines_skipped",
              "duplicates_removed"):
    assert key in summary, key
  assert summary["users"] == 400 and summary["max_len"] == 20
  assert summary["negatives"]["seed"] == 3
  assert f'"users": {summary["users"]}' in result.stdout  # printed too
  assert sorted(os.listdir(data)) == ["data_summary.json", "items.jsonl", "manifest.json",
                                      "negatives.npz", "users.jsonl"]
  assert os.path.exists(os.path.join(workdir, "raw", "synthetic", "2014"))
  stamps = {n: os.stat(os.path.join(data, n)).st_mtime_ns for n in os.listdir(data)}
  again = _run("--dataset=synthetic", f"--workdir={workdir}", "--max_len=20", "--seed=3")
  assert again.returncode == 0, again.stderr[-3000:]
  assert stamps == {n: os.stat(os.path.join(data, n)).st_mtime_ns for n in os.listdir(data)}


def test_missing_amazon_folder_names_the_expected_files(tmp_path):
  result = _run("--dataset=amazon", f"--data_dir={tmp_path / 'nowhere'}",
                f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0
  assert "reviews_<Category>_5.json.gz" in result.stderr
  assert "meta_<Category>.json.gz" in result.stderr
  result = _run("--dataset=amazon", f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0 and "--data_dir" in result.stderr
