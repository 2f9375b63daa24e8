#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, then trace the shipped demo data.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh
exec .venv/bin/routelens demo "$@"
