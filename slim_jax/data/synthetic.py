"""Synthetic Amazon-format data with planted sequential structure, for fast tests.

Items fall into `num_clusters` brands; each brand is a cycle of items (a chain). A user
starts at a random item and, with probability `follow_prob`, moves to the next unseen item
of the current chain, otherwise jumps to a random unseen item. Item popularity is roughly
uniform, so a popularity ranker scores near chance (HR@10 about 10/101 with 100
negatives) while a sequential model that learns the chains reaches HR@10 near
`follow_prob`: a working model and a broken one are easy to tell apart.

`write_amazon` writes the same interactions and metadata in both releases' layouts:

  <out>/2014/reviews_<Category>_5.json.gz, meta_<Category>.json.gz  (meta: Python literals)
  <out>/2018/<Category>_5.json.gz, meta_<Category>.json.gz           (meta: JSON)

and can inject what real files contain: malformed lines, missing titles/brands, items with
no metadata line, duplicate reviews, and lines out of time order.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import os

import numpy as np

from slim_jax import io


_ADJECTIVES = ("Red", "Swift", "Quiet", "Golden", "Tiny", "Grand", "Bright", "Silent", "Wild",
               "Classic", "Modern", "Rustic", "Electric", "Frozen", "Lucky", "Brave")
_NOUNS = ("Kettle", "Quest", "Lantern", "Garden", "Racer", "Puzzle", "Blender", "Castle",
          "Notebook", "Rocket", "Harbor", "Canvas", "Falcon", "Meadow", "Anchor", "Comet")
_DAY = 86400
_START = 1_300_000_000  # 2011-03-13


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_users: int = 400
  num_items: int = 300
  num_clusters: int = 15  # brands, each a chain (cycle) of items
  min_length: int = 8
  max_length: int = 30
  follow_prob: float = 0.9  # chance of moving to the next item of the chain
  seed: int = 0
  category: str = "Synthetic_Goods"
  shuffle: bool = True  # write reviews in random order (real files are not time-sorted)
  bad_review_lines: int = 0  # malformed lines inserted in the reviews file
  bad_meta_lines: int = 0  # malformed lines inserted in the metadata file
  duplicate_reviews: int = 0  # repeated (user, item) reviews, same or later time
  missing_title: int = 0  # items whose metadata has no title
  missing_brand: int = 0  # items whose metadata has no brand
  items_without_meta: int = 0  # items with no metadata line at all


def _user_id(user: int) -> str:
  return f"A{user:07d}SYNTH"


def _asin(item: int) -> str:
  return f"B{item:09d}"


def _walks(config: SyntheticConfig, rng: np.random.Generator):
  """Per user: item indices (0-based) in time order, and day-resolution timestamps."""
  n, c = config.num_items, config.num_clusters
  if config.max_length > n:
    raise ValueError(f"max_length {config.max_length} > num_items {n}")
  perm = rng.permutation(n)  # chain order does not follow the item ids
  cluster_of = np.empty(n, np.int64)
  successor = np.empty(n, np.int64)
  for k, chain in enumerate(np.array_split(perm, c)):
    cluster_of[chain] = k
    successor[chain] = np.roll(chain, -1)
  users = []
  for _ in range(config.num_users):
    length = int(rng.integers(config.min_length, config.max_length + 1))
    seen = np.zeros(n, bool)
    item = int(rng.integers(n))
    walk = [item]
    seen[item] = True
    while len(walk) < length:
      nxt = int(successor[item])
      if seen[nxt] or rng.random() >= config.follow_prob:
        nxt = int(rng.choice(np.flatnonzero(~seen)))
      walk.append(nxt)
      seen[nxt] = True
      item = nxt
    start = _START + int(rng.integers(0, 700)) * _DAY
    times = start + np.cumsum(rng.integers(1, 30, size=length)) * _DAY
    users.append((walk, times))
  return users, cluster_of


def _title(item: int) -> str:
  return f"{_ADJECTIVES[item % 16]} {_NOUNS[(item // 16) % 16]} {item}"


def _review(release: str, user: int, item: int, time: int, rng) -> dict:
  day = datetime.datetime.fromtimestamp(time, datetime.timezone.utc)
  rating = float(rng.integers(3, 6))
  common = {"reviewerID": _user_id(user), "asin": _asin(item),
            "reviewerName": f"Shopper {user}", "reviewText": f"Review of item {item}.",
            "overall": rating, "summary": "Fine", "unixReviewTime": int(time),
            "reviewTime": day.strftime("%m %d, %Y")}
  if release == "2014":
    return {**common, "helpful": [0, 0]}
  return {**common, "verified": True, "vote": "1"}


def _meta(release: str, item: int, cluster: int, missing_title: set,
          missing_brand: set) -> str:
  path = ["Synthetic Goods", f"Line {cluster % 3}", f"Series {cluster}"]
  record = {"asin": _asin(item)}
  if item not in missing_title:
    record["title"] = _title(item)
  if item not in missing_brand:
    record["brand"] = f"Brand{cluster:02d}"
  if release == "2014":
    record.update({"price": 9.99, "salesRank": {"Synthetic Goods": item + 1},
                   "categories": [path, ["Synthetic Goods"]],
                   "imUrl": f"http://example.invalid/{item}.jpg"})
    return repr(record)  # a Python literal, as in the 2014 release
  record.update({"category": path, "description": [f"Item {item}."], "feature": [],
                 "main_cat": "Synthetic Goods", "rank": f"{item + 1} in Synthetic Goods"})
  return json.dumps(record)


def _write_gz(path: str, lines: list[str]) -> None:
  with io.atomic_open(path, "wb") as raw_file:
    with gzip.GzipFile(fileobj=raw_file, mode="wb", mtime=0) as gz:
      gz.write("".join(line + "\n" for line in lines).encode("utf-8"))


def _insert(lines: list[str], extra: list[str], rng) -> list[str]:
  """`lines` with `extra` inserted at random positions."""
  out = list(lines)
  for line in extra:
    out.insert(int(rng.integers(0, len(out) + 1)), line)
  return out


def write_amazon(out_dir: str, config: SyntheticConfig = SyntheticConfig()) -> dict[str, str]:
  """Writes both releases into <out_dir>/2014 and <out_dir>/2018; returns those folders."""
  rng = np.random.default_rng(config.seed)
  users, cluster_of = _walks(config, rng)
  records = [(u, item, int(t)) for u, (walk, times) in enumerate(users)
             for item, t in zip(walk, times)]
  order = rng.permutation(len(records)) if config.shuffle else np.arange(len(records))
  records = [records[i] for i in order]
  dup_rows = rng.choice(len(records), size=config.duplicate_reviews, replace=False)
  duplicates = [(records[i][0], records[i][1], records[i][2] + (i % 2) * 5 * _DAY)
                for i in dup_rows]  # half exact copies, half a later repeat
  picks = rng.permutation(config.num_items)
  a, b = config.missing_title, config.missing_title + config.missing_brand
  missing_title, missing_brand = set(picks[:a].tolist()), set(picks[a:b].tolist())
  no_meta = set(picks[b:b + config.items_without_meta].tolist())
  folders = {}
  for release in ("2014", "2018"):
    release_rng = np.random.default_rng([config.seed, int(release)])
    reviews = [json.dumps(_review(release, u, i, t, release_rng))
               for u, i, t in records + duplicates]
    bad_reviews = ['{"reviewerID": "ABROKEN", "asin": "B000', "not json at all",
                   '{"reviewerID": "ANOTIME", "asin": "B000000001"}']
    reviews = _insert(reviews, [bad_reviews[k % 3] for k in range(config.bad_review_lines)],
                      release_rng)
    metas = [_meta(release, i, int(cluster_of[i]), missing_title, missing_brand)
             for i in range(config.num_items) if i not in no_meta]
    bad_metas = ["{'title': 'no closing brace'", "[1, 2, 3]", "{'title': 'no asin'}"]
    metas = _insert(metas, [bad_metas[k % 3] for k in range(config.bad_meta_lines)],
                    release_rng)
    folder = os.path.join(out_dir, release)
    os.makedirs(folder, exist_ok=True)
    reviews_name = (f"reviews_{config.category}_5.json.gz" if release == "2014"
                    else f"{config.category}_5.json.gz")
    _write_gz(os.path.join(folder, reviews_name), reviews)
    _write_gz(os.path.join(folder, f"meta_{config.category}.json.gz"), metas)
    folders[release] = folder
  return folders


def planted_sequences(config: SyntheticConfig = SyntheticConfig()) -> dict[str, list[str]]:
  """The generated walk of each user as raw ids (user id -> ASINs in time order)."""
  users, _ = _walks(config, np.random.default_rng(config.seed))
  return {_user_id(u): [_asin(i) for i in walk] for u, (walk, _) in enumerate(users)}
