"""Amazon loader on small hand-written files of both releases (.json and .json.gz)."""

import gzip
import json
import os

import pytest

from slim_jax.data import amazon
from slim_jax.data import prepare
from slim_jax.data import raw

# Three users; U1 and U2 reviewed out of time order; (U1, I1) is reviewed twice.
_REVIEWS = [
    ("U2", "I3", 300), ("U1", "I2", 200), ("U1", "I1", 100), ("U3", "I1", 50),
    ("U2", "I1", 100), ("U1", "I3", 300), ("U1", "I1", 400), ("U2", "I2", 200),
    ("U3", "I2", 60), ("U3", "I3", 70), ("U1", "I4", 500),
]
_META = [
    {"asin": "I1", "title": "Space &amp; Time", "brand": "Acme",
     "categories": [["Games", "PC"], ["Games"]]},
    {"asin": "I2", "brand": "Acme", "categories": [["Games"]]},  # no title
    {"asin": "I3", "title": "Third <b>thing</b>", "categories": [["Toys"]]},  # no brand
    # I4 has no metadata line at all.
]


def _review_line(release, user, item, time):
  record = {"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": 5.0,
            "reviewText": "ok", "summary": "ok"}
  if release == "2014":
    record["helpful"] = [0, 0]
  else:
    record["verified"] = True
  return json.dumps(record)


def _meta_line(release, meta):
  if release == "2014":
    return repr(meta)  # Python literal, single quotes
  meta = dict(meta)
  paths = meta.pop("categories")
  meta["category"] = paths[0]
  return json.dumps(meta)


def write_category(folder, release, reviews=_REVIEWS, metas=_META, extra_review_lines=(),
                   extra_meta_lines=(), gz=True, category="Games"):
  os.makedirs(folder, exist_ok=True)
  suffix = ".json.gz" if gz else ".json"
  review_lines = [_review_line(release, *r) for r in reviews]
  for position, line in extra_review_lines:
    review_lines.insert(position, line)
  meta_lines = [_meta_line(release, m) for m in metas]
  for position, line in extra_meta_lines:
    meta_lines.insert(position, line)
  reviews_name = (f"reviews_{category}_5" if release == "2014" else f"{category}_5") + suffix
  opener = gzip.open if gz else open
  for name, lines in ((reviews_name, review_lines), (f"meta_{category}{suffix}", meta_lines)):
    with opener(os.path.join(folder, name), "wt", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  return folder


@pytest.mark.parametrize("release", ["2014", "2018"])
@pytest.mark.parametrize("gz", [True, False])
def test_both_releases_load_the_same(tmp_path, release, gz):
  folder = write_category(str(tmp_path / release), release, gz=gz)
  data = amazon.load(folder)
  assert data.report["release"] == release and data.report["category"] == "Games"
  ds, summary = prepare.build(data, core=0, name="games")
  assert ds.user_raw_ids == ["U1", "U2", "U3"]
  assert [it.raw_id for it in ds.items] == ["I1", "I2", "I3", "I4"]
  # Time order restored; the later repeat of (U1, I1) dropped.
  assert [ds.item(i).raw_id for i in ds.sequences[0]] == ["I1", "I2", "I3", "I4"]
  assert ds.timestamps[0].tolist() == [100, 200, 300, 500]
  assert [ds.item(i).raw_id for i in ds.sequences[1]] == ["I1", "I2", "I3"]
  assert summary["duplicates_removed"] == 1
  assert summary["out_of_order_interactions"] == 2  # steps back: U1 200 -> 100, U2 300 -> 100
  assert summary["items_missing_title"] == 2  # I2 and I4
  assert summary["items_missing_brand"] == 2  # I3 and I4
  assert summary["items_without_metadata"] == 1
  i1, i2, i3, i4 = ds.items
  assert i1.title == "Space & Time" and i1.brand == "Acme"
  assert i1.categories == ("Games", "PC")
  assert i1.text == "Title: Space & Time; Brand: Acme; Categories: Games, PC"
  assert i2.text == "Brand: Acme; Categories: Games"
  assert i3.title == "Third thing" and i3.text == "Title: Third thing; Categories: Toys"
  assert i4.title == "" and i4.text == "Item I4"


@pytest.mark.parametrize("release", ["2014", "2018"])
def test_malformed_review_line_names_file_and_line(tmp_path, release):
  folder = write_category(str(tmp_path), release,
                          extra_review_lines=[(3, '{"reviewerID": "U9", "asin": ')])
  with pytest.raises(raw.MalformedLineError) as error:
    amazon.load(folder)
  name = "reviews_Games_5.json.gz" if release == "2014" else "Games_5.json.gz"
  assert f"{name}:4:" in str(error.value)
  assert "--skip_bad_lines" in str(error.value)


@pytest.mark.parametrize("release", ["2014", "2018"])
def test_skip_bad_lines_counts_and_reports(tmp_path, release):
  folder = write_category(
      str(tmp_path), release,
      extra_review_lines=[(0, "garbage"), (5, '{"reviewerID": "U9", "asin": "I1"}'),
                          (7, '{"reviewerID": "U9", "asin": "I1", "unixReviewTime": "x"}'),
                          (8, "")],
      extra_meta_lines=[(1, "{'asin': 'I2', 'title': 'unclosed"), (2, "[1, 2]")])
  data = amazon.load(folder, skip_bad_lines=True)
  ds, summary = prepare.build(data, core=0)
  skipped = summary["lines_skipped"]
  assert skipped["total"] == 5
  reviews_name = "reviews_Games_5.json.gz" if release == "2014" else "Games_5.json.gz"
  assert sum(skipped["by_file"][reviews_name].values()) == 3
  assert skipped["by_file"][reviews_name]["missing unixReviewTime"] == 1
  assert skipped["by_file"][reviews_name]["unixReviewTime is not an integer"] == 1
  assert sum(skipped["by_file"]["meta_Games.json.gz"].values()) == 2
  assert summary["source"]["blank_lines"] == 1
  assert ds.num_interactions == 10


@pytest.mark.parametrize("release", ["2014", "2018"])
def test_malformed_meta_line_names_file_and_line(tmp_path, release):
  folder = write_category(str(tmp_path), release,
                          extra_meta_lines=[(1, "{'asin': 'I2', 'title': 'unclosed")])
  data = amazon.load(folder)
  with pytest.raises(raw.MalformedLineError, match=r"meta_Games\.json\.gz:2: "):
    prepare.build(data, core=0)


def test_strict_mode_fails_on_first_bad_review_line(tmp_path):
  folder = write_category(str(tmp_path), "2018", extra_review_lines=[(0, "garbage")])
  with pytest.raises(raw.MalformedLineError, match=r"Games_5\.json\.gz:1: .*invalid JSON"):
    amazon.load(folder)


def test_meta_of_filtered_items_is_not_parsed(tmp_path):
  # A malformed metadata line of an item that filtering removes does not matter.
  metas = _META + [{"asin": "I9", "title": "never reviewed"}]
  folder = write_category(str(tmp_path), "2014", metas=metas,
                          extra_meta_lines=[(3, "{'asin': 'I9', 'title': broken")])
  ds, _ = prepare.build(amazon.load(folder), core=0)
  assert "I9" not in [it.raw_id for it in ds.items]


def test_2014_meta_is_never_evaluated(tmp_path):
  marker = tmp_path / "pwned"
  line = f"{{'asin': 'I1', 'title': __import__('pathlib').Path('{marker}').touch()}}"
  folder = write_category(str(tmp_path / "d"), "2014", extra_meta_lines=[(0, line)])
  with pytest.raises(raw.MalformedLineError, match="meta_Games.json.gz:1"):
    prepare.build(amazon.load(folder), core=0)
  assert not marker.exists()


def test_missing_files_give_actionable_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    amazon.find_files(str(tmp_path / "nope"))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"reviews_<Category>_5\.json\.gz"):
    amazon.find_files(str(tmp_path))
  folder = write_category(str(tmp_path / "only_reviews"), "2018")
  os.remove(os.path.join(folder, "meta_Games.json.gz"))
  with pytest.raises(FileNotFoundError, match="meta_Games.json.gz"):
    amazon.find_files(folder)


def test_two_categories_need_a_choice(tmp_path):
  write_category(str(tmp_path), "2018", category="Games")
  write_category(str(tmp_path), "2018", category="Food")
  with pytest.raises(ValueError, match="--category"):
    amazon.find_files(str(tmp_path))
  release, category, reviews, meta = amazon.find_files(str(tmp_path), category="Food")
  assert (release, category) == ("2018", "Food")
  assert reviews.endswith("Food_5.json.gz") and meta.endswith("meta_Food.json.gz")


def test_truncated_gzip_is_reported(tmp_path):
  folder = write_category(str(tmp_path), "2018")
  path = os.path.join(folder, "Games_5.json.gz")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="Games_5.json.gz: the compressed file is damaged"):
    amazon.load(folder)


def test_python_literal_review_lines_are_accepted(tmp_path):
  line = repr({"reviewerID": "U4", "asin": "I1", "unixReviewTime": 7, "summary": "it's ok"})
  folder = write_category(str(tmp_path), "2014", extra_review_lines=[(0, line)])
  data = amazon.load(folder)
  assert len(data.log) == len(_REVIEWS) + 1
  assert data.log.users.names[0] == "U4"
