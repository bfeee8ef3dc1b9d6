"""Copies a run folder (experiments/run_slim.py --workdir) into the repository, so that a
long run made in pieces (the full MovieLens-100k grid) continues in a later session from
what earlier sessions committed.

  python scripts/snapshot_run.py runs/ml100k_full docs/results/slim_ml100k_full/workdir
  mkdir -p runs/ml100k_full && cp -a docs/results/slim_ml100k_full/workdir/. runs/ml100k_full/

Kept: the prepared data, the rationales, the embeddings, the stage manifests, every seed's
result.json and the checkpoints the interpretability page may read (every backbone's
slim/seed_0). Left out, as rebuildable or large: the XLA cache, the encoder's text cache,
the distillation checkpoints, the other recommender checkpoints, locks and in-progress
markers, and any file over 2 MiB (the LoRA adapter, the item vectors, a large
recommend/results.json: the run folder keeps them; without the first two their stages
run again, and results.json is rebuilt from the seeds' results). The stage manifests name
absolute paths: restore the folder at the same path (the repository's runs/), or its
stages run again. Files already in the destination are overwritten; files the run no
longer has are removed from it; a destination inside the run (or around it), or a
non-empty folder that is not an earlier snapshot, is refused, and so is a run that a
stage is running in (it holds the workdir's lock): its files would change mid-copy.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys

from slim_jax.pipeline import runner

ALWAYS_LEFT_OUT = ("*.lock", "*.tmp", "pipeline/lock", "pipeline/*.started.json")
LEFT_OUT = ("cache/*", "embeddings/cache/*", "distill/checkpoints/*",
            "recommend/*/checkpoints/*")
# Files over this stay out of git (weights and data belong to set-up): the LoRA adapter, the
# item vectors, the full grid's results.json; a continuing session keeps or rebuilds them.
MAX_BYTES = 2 * 2**20
KEPT = ("recommend/*/slim/seed_0/checkpoints/*",)  # every backbone's: the page reads the
# first backbone of the run's --backbones


def wanted(relative: str) -> bool:
  match = lambda patterns: any(fnmatch.fnmatch(relative, p) for p in patterns)  # noqa: E731
  return not match(ALWAYS_LEFT_OUT) and (match(KEPT) or not match(LEFT_OUT))


def _is_run(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "pipeline", "prepare.json"))


def snapshot(source: str, destination: str) -> list[str]:
  """Mirrors the wanted files of `source` into `destination`; returns their paths."""
  if not _is_run(source):
    raise SystemExit(f"{source} is not a run folder (no pipeline/prepare.json): pass the "
                     "--workdir of experiments/run_slim.py")
  src, dst = os.path.realpath(source), os.path.realpath(destination)
  if os.path.commonpath([src, dst]) in (src, dst):
    raise SystemExit(f"{destination} and {source} are inside one another: pass a folder "
                     "of its own (e.g. docs/results/<run>/workdir)")
  if os.path.isdir(dst) and os.listdir(dst) and not _is_run(dst):
    raise SystemExit(f"{destination} is not empty and holds no earlier snapshot (no "
                     "pipeline/prepare.json); nothing was written: pass an empty or new "
                     "folder")
  try:
    with runner.workdir_lock(source):  # a stage running would change files mid-copy
      return _mirror(source, destination)
  except runner.WorkdirLocked as e:
    raise SystemExit(f"{e}; nothing was written to {destination}") from None


def _mirror(source: str, destination: str) -> list[str]:
  copied = []
  for folder, _, files in os.walk(source):
    for name in files:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, source)
      if wanted(relative) and os.path.getsize(path) <= MAX_BYTES:
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(path, target)
        copied.append(relative)
  keep = set(copied)
  for folder, _, files in os.walk(destination, topdown=False):
    for name in files:
      relative = os.path.relpath(os.path.join(folder, name), destination)
      if relative not in keep:
        os.remove(os.path.join(folder, name))
    if folder != destination and not os.listdir(folder):
      os.rmdir(folder)
  return copied


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(__doc__)
  copied = snapshot(argv[1], argv[2])
  size = sum(os.path.getsize(os.path.join(argv[2], p)) for p in copied)
  print(f"{len(copied)} files, {size / 2**20:.1f} MiB in {argv[2]}")


if __name__ == "__main__":
  main(sys.argv)
