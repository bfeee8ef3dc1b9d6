#!/usr/bin/env bash
# The README's main command on a machine set up by scripts/setup.sh alone: a second clone of
# this commit gets a run-time-only .venv (no --test), where `import torch` must fail, and
# runs experiments/run_slim.py --preset=smoke to the end. The terminal must stay readable:
# no per-request httpx lines and no library INFO lines.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d -t slim-fresh.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
# Its own cache: the GGUF tokenizer is built here, without torch, not read from a cache an
# environment with torch wrote.
export SLIM_JAX_CACHE="$tmp/cache"
git clone -q "$top" "$tmp/clone"
cd "$tmp/clone"
start=$(date +%s)
bash scripts/setup.sh
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "fresh-machine check: torch imports in the run-time environment" >&2
  exit 1
fi
echo "fresh-machine check: set up in $(( $(date +%s) - start )) s; torch is absent"
.venv/bin/python experiments/run_slim.py --workdir=runs/smoke --preset=smoke 2>&1 \
  | tee "$tmp/terminal.log"
test -s runs/smoke/report/results.md
if grep -E "HTTP Request:|^I[0-9]{4} .*(checkpoint|orbax|jax\._src)" "$tmp/terminal.log"; then
  echo "fresh-machine check: library INFO lines reached the terminal (above)" >&2
  exit 1
fi
for f in rationales/teacher.jsonl rationales/student_train.jsonl distill/peft_adapter \
         embeddings/items.npy recommend/results.json report/claims.csv report/results.csv; do
  test -e "runs/smoke/$f" || { echo "fresh-machine check: runs/smoke/$f is missing" >&2; exit 1; }
done
echo "fresh-machine check: the smoke run finished in $(( $(date +%s) - start )) s in all"
# An unchanged rerun must skip every stage (the stage fingerprints).
.venv/bin/python experiments/run_slim.py --workdir=runs/smoke --preset=smoke > "$tmp/rerun.log" 2>&1
.venv/bin/python - <<'PY'
import json, sys
record = json.load(open("runs/smoke/pipeline/last_run.json"))
statuses = [r["status"] for r in record]
if statuses != ["skipped"] * 7:
  sys.exit(f"fresh-machine check: an unchanged rerun did not skip every stage: {record}")
PY
echo "fresh-machine check: an unchanged rerun skipped all 7 stages"
