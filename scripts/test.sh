#!/usr/bin/env bash
# Test job: set up what is missing, then run the whole suite (unit + integration + browser).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${DUPLEX_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
