r"""Prepares a dataset into <workdir>/data/ and prints its data_summary.json.

Writes items.jsonl, users.jsonl, data_summary.json (users, items, interactions, sparsity,
mean length, lines skipped and why, ...), negatives.npz (the fixed evaluation candidates)
and a manifest; run again with the same inputs and flags, it loads instead of recomputing
(flags left unset accept what the folder already holds).

  python experiments/prepare_data.py --dataset=ml-100k --workdir=/tmp/run
  python experiments/prepare_data.py --dataset=amazon \
      --data_dir=~/data/Video_Games --workdir=/tmp/games --skip_bad_lines
  python experiments/prepare_data.py --dataset=synthetic --workdir=/tmp/synth
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from slim_jax.data import prepare
from slim_jax.data import raw

_DATASET = flags.DEFINE_enum("dataset", "ml-100k", list(prepare.DATASETS), "Which data.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Source folder. ml-100k: default the set-up's cache; amazon: one "
    "category's review + metadata files; synthetic: ignored (generated into the workdir).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; the data goes to <workdir>/data.")
_CORE = flags.DEFINE_integer(
    "core", None, "k-core filter on users and items (0: none; users always keep >= 3). "
    "Default: 0 for ml-100k (as RecBole), 5 for amazon and synthetic.")
_MAX_LEN = flags.DEFINE_integer("max_len", prepare.DEFAULT_MAX_LEN, "Maximum sequence length of the models.")
_SKIP_BAD_LINES = flags.DEFINE_bool(
    "skip_bad_lines", False, "Count, report and skip malformed lines instead of failing.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the stored evaluation negatives "
                             "(default 0).")
_NUM_NEGATIVES = flags.DEFINE_integer("num_negatives", None,
                                      "Negatives per validation/test user (default 100).")
_RELEASE = flags.DEFINE_enum("release", None, ["2014", "2018"],
                             "Amazon release when the folder is ambiguous.")
_CATEGORY = flags.DEFINE_string("category", None,
                                "Amazon category when the folder holds several.")
_MAX_USERS = flags.DEFINE_integer(
    "max_users", None, "Keep a uniform sample of this many users (drawn with --seed, before "
    "the k-core filter); default 0: every user.")
_TRAIN_FRACTION = flags.DEFINE_float(
    "train_fraction", None, "Sparsity analysis: keep this fraction of each user's training "
    "prefix (the validation and test items stay); default 1: all of it.")
_FORCE = flags.DEFINE_bool("force", False, "Recompute even if the prepared data matches.")

flags.mark_flag_as_required("workdir")


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(flags.FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DATASET.value == "amazon" and not _DATA_DIR.value:
    raise app.UsageError("--dataset=amazon needs --data_dir: a folder with one category's "
                         "files (2014: reviews_<Category>_5.json.gz + meta_<Category>.json.gz;"
                         " 2018: <Category>_5.json.gz + meta_<Category>.json.gz)")
  try:
    prepare.prepare_or_load(
        _DATASET.value, _DATA_DIR.value, _WORKDIR.value, core=_CORE.value,
        max_len=_MAX_LEN.value, skip_bad_lines=_SKIP_BAD_LINES.value, seed=_SEED.value,
        num_negatives=_NUM_NEGATIVES.value, release=_RELEASE.value,
        category=_CATEGORY.value, max_users=_MAX_USERS.value,
        train_fraction=_TRAIN_FRACTION.value, force=_FORCE.value)
  except (FileNotFoundError, ValueError, raw.MalformedLineError) as e:  # the message says what to do
    print(f"prepare_data.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  summary = prepare.load_summary(_WORKDIR.value)
  print(json.dumps(summary, indent=2, ensure_ascii=False))
  print(f"prepared data in {prepare.prepared_dir(_WORKDIR.value)}")


if __name__ == "__main__":
  app.run(main)
