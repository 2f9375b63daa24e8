#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs routelens with the given extras. torch is pinned in every
# install: a machine without torch gets constraints.txt's torch==2.13.0 (the CPU wheel on a CPU box, so no CUDA
# packages are pulled); a venv that already has a torch (a GPU box's own CUDA build) keeps exactly that one.
# Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PY" -m venv ${VENV_FLAGS:-} .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
PIN=.venv/routelens-constraints.txt
HAVE_TORCH=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -n "$HAVE_TORCH" ]; then
  sed "s/^torch==.*/torch==${HAVE_TORCH}/" constraints.txt > "$PIN"
else
  cp constraints.txt "$PIN"
  .venv/bin/python -m pip install -q -c "$PIN" torch
fi
SPEC="."
[ -n "$EXTRAS" ] && SPEC=".[${EXTRAS}]"
.venv/bin/python -m pip install -q -c "$PIN" -e "$SPEC"
