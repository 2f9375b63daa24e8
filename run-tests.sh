#!/usr/bin/env bash
# The full test suite, from a fresh machine: set up with the test extras, then run pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh test
exec .venv/bin/python -m pytest "$@"
