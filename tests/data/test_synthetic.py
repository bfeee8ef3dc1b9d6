"""Synthetic Amazon data: both formats agree, injected faults are handled, the structure is
learnable (a transition model beats popularity by a wide margin)."""

import os

import numpy as np
import pytest

from slim_jax.data import amazon
from slim_jax.data import prepare
from slim_jax.data import raw
from slim_jax.data import sequences
from slim_jax.data import synthetic
from slim_jax.train import metrics

_SMALL = synthetic.SyntheticConfig(num_users=200, num_items=160, num_clusters=8,
                                   max_length=20)


def _load(folder, **kwargs):
  return prepare.build(amazon.load(folder, **kwargs), core=5)


def test_both_releases_give_the_same_dataset(tmp_path):
  folders = synthetic.write_amazon(str(tmp_path), _SMALL)
  assert sorted(os.listdir(folders["2014"])) == ["meta_Synthetic_Goods.json.gz",
                                                 "reviews_Synthetic_Goods_5.json.gz"]
  assert sorted(os.listdir(folders["2018"])) == ["Synthetic_Goods_5.json.gz",
                                                 "meta_Synthetic_Goods.json.gz"]
  old, old_summary = _load(folders["2014"])
  new, _ = _load(folders["2018"])
  assert old.user_raw_ids == new.user_raw_ids and old.items == new.items
  for a, b in zip(old.sequences, new.sequences):
    np.testing.assert_array_equal(a, b)
  assert old.items[0].brand.startswith("Brand") and old.items[0].title
  assert "Categories: Synthetic Goods" in old.items[0].text
  # The loaded sequences are the planted walks (no 5-core loss at this size).
  planted = synthetic.planted_sequences(_SMALL)
  assert old_summary["removed_by_core"]["interactions"] == 0
  for user, seq in zip(old.user_raw_ids, old.sequences):
    assert [old.item(i).raw_id for i in seq] == planted[user]


@pytest.mark.parametrize("release", ["2014", "2018"])
def test_injected_faults_are_reported_and_skipped(tmp_path, release):
  clean, _ = _load(synthetic.write_amazon(str(tmp_path / "clean"), _SMALL)[release])
  faulty = synthetic.SyntheticConfig(**{
      **_SMALL.__dict__, "bad_review_lines": 4, "bad_meta_lines": 3, "duplicate_reviews": 10,
      "missing_title": 5, "missing_brand": 7, "items_without_meta": 2})
  folder = synthetic.write_amazon(str(tmp_path / "faulty"), faulty)[release]
  with pytest.raises(raw.MalformedLineError, match=r"_5\.json\.gz:\d+: "):
    _load(folder)
  ds, summary = _load(folder, skip_bad_lines=True)
  for a, b in zip(clean.sequences, ds.sequences):
    np.testing.assert_array_equal(a, b)
  assert summary["lines_skipped"]["total"] == 4 + 3
  assert summary["duplicates_removed"] == 10
  assert summary["out_of_order_interactions"] > 0  # shuffled file
  assert summary["items_without_metadata"] == 2
  assert summary["items_missing_title"] == 5 + 2
  assert summary["items_missing_brand"] == 7 + 2


def test_planted_structure_beats_popularity(tmp_path):
  config = synthetic.SyntheticConfig()  # the default that --dataset=synthetic uses
  ds, _ = _load(synthetic.write_amazon(str(tmp_path), config)["2014"])
  negs = sequences.sample_eval_negatives(ds, 100, seed=0)
  ev = sequences.eval_set(ds, "test", negs, max_len=50)
  # Transition counts and popularity from the training prefixes only.
  v = ds.num_items + 1
  transitions = np.zeros((v, v))
  popularity = np.zeros(v)
  for u in range(ds.num_users):
    prefix = ds.train_prefix(u)
    np.add.at(transitions, (prefix[:-1], prefix[1:]), 1)
    np.add.at(popularity, prefix, 1)
  last = ev.inputs[:, -1]  # [U] most recent item before the test target
  tiny = 1e-3 * popularity[ev.candidates]  # break ties by popularity
  by_transition = transitions[last[:, None], ev.candidates] + tiny
  transition_hr = float(metrics.sampled_ranking_metrics(by_transition)["hr@10"].mean())
  popular_hr = float(metrics.sampled_ranking_metrics(popularity[ev.candidates])["hr@10"].mean())
  assert transition_hr > 0.7, transition_hr
  assert popular_hr < 0.25, popular_hr
