"""scripts/snapshot_run.py: a run folder's results copied into the repository, without its
caches, locks and most checkpoints; a later snapshot mirrors the run."""

import os
import sys

import pytest

from slim_jax.pipeline import runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import snapshot_run  # noqa: E402  pylint: disable=wrong-import-position

KEPT = ["pipeline/prepare.json", "pipeline/recommend.json", "data/negatives.npz",
        "rationales/student.jsonl", "distill/peft_adapter/adapter_model.safetensors",
        "embeddings/items.npy", "recommend/gru4rec/slim/seed_0/result.json",
        "recommend/gru4rec/slim/seed_0/checkpoints/12/params",
        "recommend/sasrec/backbone/seed_3/result.json"]
LEFT_OUT = ["cache/xla/abc", "embeddings/cache/9166/chunk-1.npz",
            "recommend/gru4rec/slim/seed_0/checkpoints/12/params.tmp",
            "distill/checkpoints/6/params", "pipeline/lock",
            "pipeline/recommend.started.json", "rationales/teacher.lock",
            "recommend/gru4rec/slim/seed_1/checkpoints/9/params",
            "recommend/sasrec/backbone/seed_3/checkpoints/4/params"]


def _write(root, relative, text="x"):
  path = root / relative
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_snapshot_keeps_results_and_mirrors_the_run(tmp_path):
  run, out = tmp_path / "run", tmp_path / "out"
  for relative in KEPT + LEFT_OUT:
    _write(run, relative)
  _write(run, "embeddings/teacher.npy", "x" * (snapshot_run.MAX_BYTES + 1))  # too big for git
  assert sorted(snapshot_run.snapshot(str(run), str(out))) == sorted(KEPT)
  assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(KEPT)
  # The run moves on: a seed retrained with new results, a stale one removed.
  _write(run, "recommend/sasrec/backbone/seed_3/result.json", "new")
  os.remove(run / "recommend/gru4rec/slim/seed_0/checkpoints/12/params")
  snapshot_run.snapshot(str(run), str(out))
  assert (out / "recommend/sasrec/backbone/seed_3/result.json").read_text() == "new"
  assert not (out / "recommend/gru4rec/slim/seed_0/checkpoints").exists()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
  with pytest.raises(SystemExit, match="not a run folder"):
    snapshot_run.snapshot(str(tmp_path), str(tmp_path / "out"))


def test_destinations_that_would_lose_files_are_refused(tmp_path):
  run = tmp_path / "run"
  _write(run, "pipeline/prepare.json")
  with pytest.raises(SystemExit, match="inside one another"):
    snapshot_run.snapshot(str(run), str(run / "snap"))
  with pytest.raises(SystemExit, match="inside one another"):
    snapshot_run.snapshot(str(run), str(tmp_path))
  _write(tmp_path / "results", "README.md", "the report")  # the folder above workdir/
  with pytest.raises(SystemExit, match="not empty"):
    snapshot_run.snapshot(str(run), str(tmp_path / "results"))
  assert (tmp_path / "results" / "README.md").read_text() == "the report"


def test_a_run_that_a_stage_is_running_in_is_refused(tmp_path):
  """A snapshot taken while the next piece of a grid ran held a half-cleared state (a
  cell's stale seeds deleted, its new ones not yet written)."""
  run, out = tmp_path / "run", tmp_path / "out"
  for relative in KEPT:
    _write(run, relative)
  with runner.workdir_lock(str(run)):
    with pytest.raises(SystemExit, match="in use by another run.*nothing was written"):
      snapshot_run.snapshot(str(run), str(out))
  assert not out.exists()
  assert sorted(snapshot_run.snapshot(str(run), str(out))) == sorted(KEPT)  # lock released
