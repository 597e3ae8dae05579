#!/usr/bin/env bash
# Set up (first run only), lint, and run the whole default test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check astolfo_dist tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
