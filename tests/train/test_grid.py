"""slim_jax/train/grid.py: the recommend stage's grid, its analyses, resumption, sparsity."""

import json
import os

import numpy as np
import pytest

from planted import planted_dataset
from slim_jax.data import dataset as dataset_lib
from slim_jax.data import prepare, sequences
from slim_jax.train import grid, loop, seed_stack


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
  for name in ("student", "student_train"):
    np.save(emb / f"{name}.npy", rng.normal(size=(data.num_users, 8)).astype(np.float32))
    np.save(emb / f"{name}.present.npy", np.ones(data.num_users, bool))
    np.save(emb / f"{name}.cutoff.npy", np.asarray(
        [len(data.train_prefix(u)) - (name == "student_train") for u in range(data.num_users)],
        np.int32))
  teacher = np.arange(data.num_users) % 3 == 0  # a third of the users have one
  np.save(emb / "teacher.present.npy", teacher)
  return str(tmp_path), data


def _spec(**kw):
  return grid.GridSpec(**{**dict(backbones=("gru4rec",), variants=("slim", "agnostic"),
                                 seeds=(0,), epochs=1, patience=1, hidden=8, batch=16,
                                 max_len=10, cold_max_count=12), **kw})


def test_grid_trains_every_cell_with_analyses_then_reuses_them(tmp_path, monkeypatch):
  work, data = _workdir(tmp_path)
  spec = _spec()
  results = grid.train_grid(work, spec, log=lambda _: None)
  assert results["format"] == 2 and results["test_users"] == list(range(data.num_users))
  counts = grid.analysis.training_counts(data)
  assert results["cold_users"] == grid.analysis.cold_users(data, counts, 12).tolist()
  assert results["teacher_users"] == list(range(0, data.num_users, 3))
  keys = [(r["backbone"], r["variant"]) for r in results["rows"]]
  assert keys == [("gru4rec", "slim"), ("none", "agnostic"), ("none", "most-popular")]
  for row in results["rows"]:
    (per_user,) = row["per_user"]
    assert set(per_user) == {"ndcg@10", "hr@10", "hr@20", "head@10"}
    assert all(len(v) == data.num_users for v in per_user.values())
    (test,) = row["test"]
    np.testing.assert_allclose(np.mean(per_user["ndcg@10"]), test["ndcg@10"], rtol=1e-5)
    if row["variant"] != "most-popular":
      (history,) = row["history"]
      assert row["best_epoch"] == [1] and len(history) == row["epochs_run"][0] == 1
      assert {"train_loss", "valid/ndcg@10"} <= set(history[0])
      # The stack's per-user metrics and top-10 equal a separate pass over the checkpoint.
      model = grid.make_model(work, spec, data, row["backbone"], row["variant"])
      run_dir = os.path.join(work, "recommend", row["backbone"], row["variant"], "seed_0")
      test_set = sequences.eval_set(data, "test", sequences.load_negatives(
          prepare.prepared_dir(work)), spec.max_len)
      again = grid.analysis.user_analysis(model, grid.restore_best(run_dir), test_set,
                                          data.num_items, batch_size=spec.batch)
      np.testing.assert_allclose(per_user["ndcg@10"], again["ndcg@10"], rtol=1e-5, atol=1e-6)
      head = grid.analysis.head_items(counts, spec.head_share)
      np.testing.assert_allclose(per_user["head@10"], head[again["top"]].mean(1))
  saved = json.loads((tmp_path / "recommend" / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))

  def no_training(*args, **kwargs):
    raise AssertionError("a finished seed was trained again")
  monkeypatch.setattr(loop, "train_and_evaluate", no_training)
  again = grid.train_grid(work, spec, log=lambda _: None)
  assert again == results and grid.read_results(work, spec) == saved

  cases = grid.interpretability_cases(work, spec, {0: {"response": "a rationale"}}, 2)
  assert [c["model"] for c in cases] == ["gru4rec/slim"] * 2
  assert cases[0]["rationale"] == "a rationale" and cases[1]["rationale"] == "(none)"
  assert len(cases[0]["top10"]) == 10


def test_most_popular_ranks_by_training_counts(tmp_path):
  work, data = _workdir(tmp_path)
  test = sequences.eval_set(data, "test", sequences.load_negatives(
      prepare.prepared_dir(work)), 10)
  head = grid.analysis.head_items(grid.analysis.training_counts(data), 0.2)
  row = grid.most_popular_row(data, test, head, (0, 1))
  counts = grid.analysis.training_counts(data)
  scores = counts[test.candidates]  # [U, C]
  strictly_better = (scores[:, 1:] > scores[:, :1]).sum(1)
  tied = (scores[:, 1:] == scores[:, :1]).sum(1)
  for seed_result in row["per_user"]:  # ties broken at random: rank within the tied block
    hit = np.asarray(seed_result["hr@10"]) > 0
    assert (hit[strictly_better + tied < 10]).all() and not hit[strictly_better >= 10].any()
  assert row["per_user"][0] != row["per_user"][1] or not tied.any()


def test_an_old_results_file_is_refused(tmp_path):
  work, _ = _workdir(tmp_path)
  path = tmp_path / "recommend" / "results.json"
  path.parent.mkdir()
  path.write_text("[]")
  with pytest.raises(ValueError, match="older recommend stage"):
    grid.read_results(work, _spec())


def test_a_thinned_preparation_keeps_head_and_cold_users_of_the_full_data(tmp_path):
  work, data = _workdir(tmp_path)
  full = grid.train_grid(work, _spec(variants=("backbone",)), log=lambda _: None)
  thinned = tmp_path / "thinned"
  counts = grid.analysis.training_counts(data)
  half = grid.analysis.thin_training(data, 0.5)
  dataset_lib.save(half, prepare.prepared_dir(str(thinned)))
  sequences.save_negatives(prepare.prepared_dir(str(thinned)),
                           sequences.load_negatives(prepare.prepared_dir(work)))
  np.save(os.path.join(prepare.prepared_dir(str(thinned)), grid.sparsity.FULL_COUNTS_FILE),
          counts)
  os.symlink(tmp_path / "embeddings", thinned / "embeddings")
  np.testing.assert_array_equal(grid.full_training_counts(str(thinned), half), counts)
  result = grid.train_grid(str(thinned), _spec(variants=("backbone",)), log=lambda _: None)
  assert result["cold_users"] == full["cold_users"]
  own = grid.analysis.cold_users(half, grid.analysis.training_counts(half), 12).tolist()
  assert own != full["cold_users"]  # what recomputing from the thinned data would give


def test_a_seed_made_under_another_fingerprint_is_trained_again(tmp_path, monkeypatch):
  work, _ = _workdir(tmp_path)
  spec = _spec(variants=("backbone",), epochs=1)
  grid.train_grid(work, spec, log=lambda _: None)
  result = tmp_path / "recommend" / "gru4rec" / "backbone" / "seed_0" / "result.json"
  first = json.loads(result.read_text())
  assert first["fingerprint"] == grid.default_fingerprint(work, spec)

  trained = []
  real = seed_stack.train_and_evaluate_seeds
  monkeypatch.setattr(seed_stack, "train_and_evaluate_seeds",
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


def test_a_new_model_version_retrains_only_that_models_cells(tmp_path, monkeypatch):
  work, _ = _workdir(tmp_path)
  spec = _spec(variants=("backbone", "agnostic"), epochs=1)
  grid.train_grid(work, spec, log=lambda _: None)
  trained = []
  real = seed_stack.train_and_evaluate_seeds
  monkeypatch.setattr(seed_stack, "train_and_evaluate_seeds",
                      lambda *a, **k: trained.append(k["name"]) or real(*a, **k))
  # A model without a version entry (GRU4Rec) keeps the fingerprint it had before model
  # versions existed, so results already trained keep it.
  assert grid.default_fingerprint(work, spec, "gru4rec") == grid.default_fingerprint(work, spec)
  monkeypatch.setitem(grid.MODEL_VERSIONS, "id_agnostic", grid.MODEL_VERSIONS["id_agnostic"] + 1)
  grid.train_grid(work, spec, log=lambda _: None)
  assert trained == ["none/agnostic"]
  result = tmp_path / "recommend" / "none" / "agnostic" / "seed_0" / "result.json"
  assert json.loads(result.read_text())["fingerprint"] == grid.default_fingerprint(
      work, spec, grid.model_name("none", "agnostic"))


def test_a_grid_trained_in_pieces_keeps_every_piece_and_retrain_starts_over(tmp_path,
                                                                             monkeypatch):
  work, _ = _workdir(tmp_path)
  trained = []
  real = seed_stack.train_and_evaluate_seeds
  monkeypatch.setattr(seed_stack, "train_and_evaluate_seeds",
                      lambda *a, **k: trained.append((k["name"], tuple(a[4]))) or real(*a, **k))
  grid.train_grid(work, _spec(variants=("backbone",), seeds=(0,)), log=lambda _: None)
  first = (tmp_path / "recommend" / "gru4rec" / "backbone" / "seed_0" / "result.json"
           ).read_text()
  # Another seed, then another variant: only what is new trains; earlier pieces stay.
  grid.train_grid(work, _spec(variants=("backbone",), seeds=(0, 1)), log=lambda _: None)
  whole = grid.train_grid(work, _spec(variants=("backbone", "agnostic"), seeds=(0, 1)),
                          log=lambda _: None)
  assert trained == [("gru4rec/backbone", (0,)), ("gru4rec/backbone", (1,)),
                     ("none/agnostic", (0, 1))]
  assert (tmp_path / "recommend" / "gru4rec" / "backbone" / "seed_0" / "result.json"
          ).read_text() == first
  assert [(r["backbone"], r["variant"], len(r["per_user"])) for r in whole["rows"]] == [
      ("gru4rec", "backbone", 2), ("none", "agnostic", 2), ("none", "most-popular", 2)]
  # Each seed's share of its own stack: seed 0 and seed 1 of backbone were stacks of one.
  shares = whole["rows"][0]["train_seconds"]
  assert len(shares) == 2 and all(s > 0 for s in shares)
  # A fingerprint leaves out the selection, not the training settings.
  assert (grid.default_fingerprint(work, _spec(seeds=(0,)))
          == grid.default_fingerprint(work, _spec(backbones=("sasrec",), seeds=(3, 4))))
  assert grid.default_fingerprint(work, _spec()) != grid.default_fingerprint(
      work, _spec(learning_rate=3e-3))
  grid.train_grid(work, _spec(variants=("backbone",), seeds=(1,)), log=lambda _: None,
                  retrain=True)
  assert trained[-1] == ("gru4rec/backbone", (1,))
