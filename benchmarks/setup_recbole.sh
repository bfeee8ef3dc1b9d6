#!/usr/bin/env bash
# Builds RecBole 1.2.1's own virtual environment, .venv-recbole, for benchmarks/recommenders.py.
#
# RecBole 1.2.1 pins ray (no wheel here, needed only by its quick_start) and needs numpy < 2,
# which the project's .venv (numpy 2, JAX) cannot share. So: torch pinned to the project's
# 2.13.0, numpy < 2 and RecBole's small dependencies installed explicitly, then recbole and
# thop with --no-deps so that pip never pulls another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv-recbole/bin/python ] || "$PY" -m venv .venv-recbole
.venv-recbole/bin/pip install --quiet "torch==2.13.0" "numpy<2" "scipy<1.14" "pandas<2.3" \
  tqdm "colorlog==4.7.2" "colorama==0.4.4" scikit-learn pyyaml tabulate texttable psutil \
  tensorboard plotly
.venv-recbole/bin/pip install --quiet --no-deps "recbole==1.2.1" thop
.venv-recbole/bin/python -c "import recbole, torch; print('recbole', recbole.__version__, 'torch', torch.__version__)"
