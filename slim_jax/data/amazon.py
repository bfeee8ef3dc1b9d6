"""Amazon reviews (2014 and 2018 releases): review files plus item metadata, streamed.

`data_dir` holds one category's two files under their download names:

  2014: reviews_<Category>_5.json[.gz]  and  meta_<Category>.json[.gz]
  2018: <Category>_5.json[.gz]          and  meta_<Category>.json[.gz]

Reviews are one JSON object per line; the loader keeps reviewerID, asin and
unixReviewTime. Metadata gives title, brand and categories: 2014 lines are Python
literals (parsed with `ast.literal_eval`, never `eval`) with `categories` a list of
category paths; 2018 lines are JSON with `category` a flat list.

Both files are read one line at a time through gzip, so a multi-gigabyte category never
sits in memory as Python objects: interactions go into compact integer arrays, and
metadata lines are fully parsed only for items that survive filtering (a cheap regex
finds each line's asin first).
"""

from __future__ import annotations

import ast
import html
import json
import os
import re

from slim_jax.data import raw

RELEASES = ("2014", "2018")
_SUFFIX = r"\.json(?:\.gz)?$"
_REVIEWS = {"2014": re.compile(r"^reviews_(.+)_5" + _SUFFIX),
            "2018": re.compile(r"^(?!reviews_|meta_)(.+)_5" + _SUFFIX)}
_META = re.compile(r"^meta_(.+)" + _SUFFIX)
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def _expected_names(category: str = "<Category>") -> str:
  return (f"2014: reviews_{category}_5.json.gz and meta_{category}.json.gz; "
          f"2018: {category}_5.json.gz and meta_{category}.json.gz (.json also accepted)")


def find_files(data_dir: str, release: str | None = None,
               category: str | None = None) -> tuple[str, str, str, str]:
  """(release, category, reviews path, metadata path) found in `data_dir`."""
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data_dir {data_dir!r} is not a folder; it must hold one "
                            f"Amazon category's review and metadata files ({_expected_names()})")
  if release is not None and release not in RELEASES:
    raise ValueError(f"release {release!r} is not one of {RELEASES}")
  names = sorted(os.listdir(data_dir))
  found = []
  for rel in (release,) if release else RELEASES:
    for name in names:
      match = _REVIEWS[rel].match(name)
      if match and (category is None or match.group(1) == category):
        found.append((rel, match.group(1), name))
  if not found:
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") or "nothing"
    raise FileNotFoundError(
        f"no Amazon review file in {data_dir} (it holds: {shown}). Expected "
        f"{_expected_names(category or '<Category>')}")
  if len(found) > 1:
    raise ValueError(f"{data_dir} holds several review files {[f[2] for f in found]}; "
                     "choose one with --category (and --release)")
  rel, cat, reviews = found[0]
  metas = [n for n in names if (m := _META.match(n)) and m.group(1) == cat]
  if not metas:
    raise FileNotFoundError(f"{data_dir} has {reviews} but no metadata file "
                            f"meta_{cat}.json.gz (or .json) next to it")
  return rel, cat, os.path.join(data_dir, reviews), os.path.join(data_dir, metas[0])


def _parse_review(line: str) -> tuple[str, str, int] | str:
  """(user, item, time) or the reason the line is malformed."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    if not line.lstrip().startswith("{'"):
      return f"invalid JSON ({e.msg})"
    try:  # some 2014 dumps hold Python literals: parse them, never eval
      record = ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      return f"invalid JSON ({e.msg}) and not a Python literal"
  if not isinstance(record, dict):
    return "not a JSON object"
  for key in ("reviewerID", "asin", "unixReviewTime"):
    if record.get(key) in (None, ""):
      return f"missing {key}"
  try:
    timestamp = int(record["unixReviewTime"])
  except (TypeError, ValueError):
    return "unixReviewTime is not an integer"
  return str(record["reviewerID"]), str(record["asin"]), timestamp


def _parse_meta(line: str, release: str) -> dict | str:
  """The metadata record or the reason the line is malformed."""
  record = None
  parsers = (ast.literal_eval, json.loads) if release == "2014" else (json.loads,
                                                                     ast.literal_eval)
  for parse in parsers:
    try:
      record = parse(line)
      break
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
  if record is None:
    return "neither JSON nor a Python literal"
  if not isinstance(record, dict):
    return "not a dict"
  if not record.get("asin"):
    return "missing asin"
  return record


def _clean(text) -> str:
  if not isinstance(text, str):
    return ""
  return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()


def _categories(record: dict) -> tuple[str, ...]:
  """2014 'categories' (list of paths) or 2018 'category' (list), flattened, deduplicated."""
  value = record.get("categories", record.get("category")) or []
  flat = []
  for entry in value if isinstance(value, list) else []:
    flat.extend(entry if isinstance(entry, list) else [entry])
  out = []
  for name in map(_clean, flat):
    if name and name not in out:
      out.append(name)
  return tuple(out)


def meta_from_record(record: dict) -> raw.ItemMeta:
  title, brand = _clean(record.get("title")), _clean(record.get("brand"))
  categories = _categories(record)
  return raw.ItemMeta(title=title, brand=brand, categories=categories,
                      text=raw.describe((("Title", title), ("Brand", brand),
                                         ("Categories", categories))))


def load(data_dir: str, skip_bad_lines: bool = False, release: str | None = None,
         category: str | None = None) -> raw.RawData:
  """Streams one category's reviews; metadata is read later for the items kept."""
  release, category, reviews_path, meta_path = find_files(data_dir, release, category)
  bad_lines = raw.BadLines(skip_bad_lines)
  log = raw.InteractionLog()
  lines_read = blank = 0
  for line_number, line in raw.read_lines(reviews_path):
    lines_read += 1
    if not line.strip():
      blank += 1
      continue
    parsed = _parse_review(line)
    if isinstance(parsed, str):
      bad_lines.report(reviews_path, line_number, parsed)
      continue
    log.add(*parsed)
  report = {"source": "amazon", "release": release, "category": category,
            "files": [reviews_path, meta_path], "review_lines_read": lines_read,
            "blank_lines": blank}

  def read_meta(keep: set[str]) -> dict[str, raw.ItemMeta]:
    meta: dict[str, raw.ItemMeta] = {}
    duplicates = 0
    for line_number, line in raw.read_lines(meta_path):
      if not line.strip():
        continue
      asins = _ASIN.findall(line)
      if asins and not any(a in keep for a in asins):
        continue  # an item filtered out: not worth parsing
      record = _parse_meta(line, release)
      if isinstance(record, str):
        bad_lines.report(meta_path, line_number, record)
        continue
      asin = str(record["asin"])
      if asin not in keep:
        continue
      if asin in meta:
        duplicates += 1
        continue
      meta[asin] = meta_from_record(record)
    report["duplicate_meta_lines"] = duplicates
    return meta

  return raw.RawData(log=log, read_meta=read_meta, bad_lines=bad_lines, report=report)
