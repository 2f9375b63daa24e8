#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, trace the shipped demo data through the
# shipped model, run every analysis, then open the dashboard on it (http://127.0.0.1:8501; Ctrl-C stops).
# `./quickstart.sh --no-app` stops after the analyses (what CI-like checks use).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh
DB="${ROUTELENS_DEMO_DB:-routelens-demo.duckdb}"
.venv/bin/routelens demo --db "$DB"
if [ "${1:-}" != "--no-app" ]; then
  exec .venv/bin/routelens app --db "$DB" --port "${ROUTELENS_PORT:-8501}"
fi
