#!/usr/bin/env bash
# Issue 12's quality/latency curve on the full en->es test set (eval/data, 107 pairs), as committed
# in bench/results/: every policy over the text source and over speech (Piper joe through the voice
# pipeline's VAD + streaming whisper), then the plot. One policy per `translate eval` call, merged
# into one JSON per source, so a crash loses one policy, not the run. About 30 min per source on
# the 2-core machine. Usage: scripts/translate_curve.sh [text|speech|plot|all]
set -euo pipefail
cd "$(dirname "$0")/.."
DUPLEX=${DUPLEX:-.venv/bin/duplex}
TEXT_POLICIES=(offline wait-k:k=1 wait-k:k=2 wait-k:k=3 wait-k:k=4 wait-k:k=5 wait-k:k=6 wait-k:k=7 local-agreement retranslate)
SPEECH_POLICIES=(wait-k:k=1 wait-k:k=2 wait-k:k=3 wait-k:k=4 wait-k:k=5 wait-k:k=6 wait-k:k=7 local-agreement)
VOICE=${VOICE:-piper:joe}
SPEECH_DIR=${SPEECH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/duplex/translate/speech-${VOICE/:/-}}

run_policies() {  # OUT THREADS EXTRA_ARGS... -- POLICIES...
  local out=$1 threads=$2; shift 2
  local extra=()
  while [ "$1" != "--" ]; do extra+=("$1"); shift; done; shift
  rm -f "$out.new"
  for p in "$@"; do
    local merge=(); [ -f "$out.new" ] && merge=(--merge)
    "$DUPLEX" translate eval --policies "$p" --threads "$threads" "${extra[@]}" --json "$out.new" "${merge[@]}" > /dev/null
  done
  mv "$out.new" "$out"
}

what=${1:-all}
if [ "$what" = text ] || [ "$what" = all ]; then
  run_policies bench/results/translate.json "${TEXT_THREADS:-1}" --instances runs/translate-full/text -- "${TEXT_POLICIES[@]}"
fi
if [ "$what" = speech ] || [ "$what" = all ]; then
  "$DUPLEX" translate render-speech --voice "$VOICE" --out "$SPEECH_DIR"   # kept if already rendered
  run_policies bench/results/translate-speech.json "${SPEECH_THREADS:-2}" --source-audio "$SPEECH_DIR" \
    --instances runs/translate-full/speech -- "${SPEECH_POLICIES[@]}"
fi
if [ "$what" = plot ] || [ "$what" = all ]; then
  "$DUPLEX" translate plot bench/results/translate.json bench/results/translate-speech.json \
    --labels "text source" "speech source (Piper joe)" --latency LAAL StreamLAAL_CA_ms \
    --title "Gemma 3 270M en->es, 107 pairs: quality against latency" --out bench/results/translate.png
fi
