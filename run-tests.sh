#!/usr/bin/env bash
# The full test suite, from a fresh machine: set up with the test extras (pytest, hypothesis, the Triton CPU
# interpreter for the kernel tests, Playwright for the browser test), then run pytest. The browser test also needs
# Debian's chromium (`apt-get install chromium`; .ci/run installs it) and skips with its reason without it.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh "${ROUTELENS_TEST_EXTRAS:-test,triton,ui-test}"
exec .venv/bin/python -m pytest "$@"
