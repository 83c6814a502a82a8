#!/usr/bin/env bash
# Main job: set up what is missing, then run the voice + text server on the embedded models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
exec "${DUPLEX_VENV:-$ROOT/.venv}/bin/duplex" serve "$@"
