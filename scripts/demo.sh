#!/usr/bin/env bash
# Set up (first run only), make small SD1.5-layout checkpoints and merge them; prints the output path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/astolfo-dist demo "$@"
