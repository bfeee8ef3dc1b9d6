"""slim_jax/train/grid.py: the recommend stage's grid, its analyses, resumption, sparsity."""

import json
import os

import numpy as np
import pytest

from planted import planted_dataset
from slim_jax.data import dataset as dataset_lib
from slim_jax.data import prepare, sequences
from slim_jax.train import grid, loop


def _workdir(tmp_path):
  data = planted_dataset(num_users=48, num_items=40)
  dataset_lib.save(data, prepare.prepared_dir(str(tmp_path)))
  sequences.save_negatives(prepare.prepared_dir(str(tmp_path)),
                           sequences.sample_eval_negatives(data, 20, seed=0))
  rng = np.random.default_rng(0)
  emb = tmp_path / "embeddings"
  emb.mkdir()
  items = rng.normal(size=(data.num_items + 1, 8)).astype(np.float32)
  items[0] = 0
  np.save(emb / "items.npy", items)
  np.save(emb / "student.npy", rng.normal(size=(data.num_users, 8)).astype(np.float32))
  return str(tmp_path), data


def _spec(**kw):
  return grid.GridSpec(**{**dict(backbones=("gru4rec",), variants=("slim", "agnostic"),
                                 seeds=(0,), epochs=1, patience=1, hidden=8, batch=16,
                                 max_len=10, cold_max_count=12), **kw})


def test_grid_trains_every_cell_with_analyses_then_reuses_them(tmp_path, monkeypatch):
  work, data = _workdir(tmp_path)
  spec = _spec()
  results, analyses = grid.train_grid(work, spec, log=lambda _: None)
  assert list(results) == [("gru4rec", "slim"), ("none", "agnostic")]
  for cell, per_seed in results.items():
    assert len(per_seed) == 1 and 0.0 <= per_seed[0]["ndcg@10"] <= 1.0
    (summary,) = analyses[cell]
    assert 0.0 <= summary["head_share@10"] <= 1.0
    cold = grid.analysis.cold_users(data, grid.analysis.training_counts(data), 12)
    assert summary["cold"]["users"] == len(cold) > 0
    assert 0.0 <= summary["cold"]["ndcg@10"] <= 1.0
  saved = json.loads((tmp_path / "recommend" / "results.json").read_text())
  assert [(r["backbone"], r["variant"]) for r in saved] == list(results)

  def no_training(*args, **kwargs):
    raise AssertionError("a finished seed was trained again")
  monkeypatch.setattr(loop, "train_and_evaluate", no_training)
  again, again_analyses = grid.train_grid(work, spec, log=lambda _: None)
  assert again == results and again_analyses == analyses

  cases = grid.interpretability_cases(work, spec, {0: {"response": "a rationale"}}, 2)
  assert [c["model"] for c in cases] == ["gru4rec/slim"] * 2
  assert cases[0]["rationale"] == "a rationale" and cases[1]["rationale"] == "(none)"
  assert len(cases[0]["top10"]) == 10


def test_sparsity_runs_keep_their_own_folder(tmp_path):
  work, _ = _workdir(tmp_path)
  spec = _spec(variants=("backbone",), train_fraction=0.5)
  assert grid.recommend_dir(work, spec).endswith("recommend_train0.5")
  grid.train_grid(work, spec, log=lambda _: None)
  assert os.path.exists(os.path.join(work, "recommend_train0.5", "gru4rec", "backbone",
                                     "seed_0", "result.json"))
  assert not os.path.exists(os.path.join(work, "recommend"))
  with pytest.raises(ValueError, match="train_fraction"):
    _spec(train_fraction=1.5)


def test_a_seed_made_under_another_fingerprint_is_trained_again(tmp_path, monkeypatch):
  work, _ = _workdir(tmp_path)
  spec = _spec(variants=("backbone",), epochs=1)
  grid.train_grid(work, spec, log=lambda _: None)
  result = tmp_path / "recommend" / "gru4rec" / "backbone" / "seed_0" / "result.json"
  first = json.loads(result.read_text())
  assert first["fingerprint"] == grid.default_fingerprint(work, spec)

  trained = []
  real = loop.train_and_evaluate
  monkeypatch.setattr(loop, "train_and_evaluate",
                      lambda *a, **k: trained.append(a[3].epochs) or real(*a, **k))
  # New embeddings: same spec, other inputs, so the old result is stale.
  np.save(tmp_path / "embeddings" / "student.npy",
          np.ones((48, 8), np.float32))
  grid.train_grid(work, spec, log=lambda _: None)
  assert trained == [1]
  assert json.loads(result.read_text())["fingerprint"] == grid.default_fingerprint(work, spec)
  # Another --epochs: trained again, and the result carries the new fingerprint.
  spec2 = _spec(variants=("backbone",), epochs=2)
  grid.train_grid(work, spec2, log=lambda _: None)
  assert trained == [1, 2]
  assert json.loads(result.read_text())["fingerprint"] == grid.default_fingerprint(work, spec2)
