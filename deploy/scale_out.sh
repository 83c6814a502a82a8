#!/usr/bin/env bash
# Two `duplex serve` replicas behind nginx on loopback (deploy/nginx/duplex.conf).
#
#   deploy/scale_out.sh [-- DUPLEX SERVE ARGS...]     e.g. deploy/scale_out.sh -- --tts none --asr-model none
#
# Env: DUPLEX_PROXY_PORT (8760), DUPLEX_REPLICA_PORTS ("8765 8766"), DUPLEX_RUN_DIR (a new temp dir:
# the rendered config, logs, replica-PORT.pid, nginx.pid), DUPLEX (the duplex command; default: the
# repo's .venv). Prints "ready: ws://127.0.0.1:PORT/ws" once every replica answers /healthz through
# the proxy's upstreams, then runs until Ctrl-C / SIGTERM, which stops nginx and the replicas.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROXY_PORT="${DUPLEX_PROXY_PORT:-8760}"
read -r -a REPLICAS <<< "${DUPLEX_REPLICA_PORTS:-8765 8766}"
RUN_DIR="${DUPLEX_RUN_DIR:-$(mktemp -d -t duplex-scale-out.XXXXXX)}"
if [[ -n "${DUPLEX:-}" ]]; then read -r -a DUPLEX_CMD <<< "$DUPLEX"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then DUPLEX_CMD=("$ROOT/.venv/bin/python" -m duplex.cli.main)
else DUPLEX_CMD=(duplex); fi
[[ "${1:-}" == "--" ]] && shift
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[[ -x "$NGINX" ]] || { echo "scale_out: nginx not found (apt-get install -y nginx)" >&2; exit 1; }

mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  [[ -f "$RUN_DIR/nginx.pid" ]] && kill "$(cat "$RUN_DIR/nginx.pid")" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# the config with this run's ports: the listen port and one `server` line per replica
upstreams=""
for port in "${REPLICAS[@]}"; do
  upstreams+="        server 127.0.0.1:${port} max_fails=1 fail_timeout=10s;\n"
done
sed -e "s/listen 127\.0\.0\.1:8760;/listen 127.0.0.1:${PROXY_PORT};/" \
    -e "/^        server 127\.0\.0\.1:876[56] /d" \
    -e "s/^        hash \$arg_session_id consistent;/&\n${upstreams%\\n}/" \
    "$ROOT/deploy/nginx/duplex.conf" > "$RUN_DIR/duplex.conf"

for port in "${REPLICAS[@]}"; do
  "${DUPLEX_CMD[@]}" serve --host 127.0.0.1 --port "$port" "$@" > "$RUN_DIR/logs/replica-$port.log" 2>&1 &
  PIDS+=("$!")
  echo "$!" > "$RUN_DIR/replica-$port.pid"
done
"$NGINX" -t -q -p "$RUN_DIR" -c "$RUN_DIR/duplex.conf" -e "$RUN_DIR/logs/error.log"
"$NGINX" -p "$RUN_DIR" -c "$RUN_DIR/duplex.conf" -e "$RUN_DIR/logs/error.log" -g 'daemon off;' &
PIDS+=("$!")

wait_up() {  # a replica answers /healthz (the first start may convert the packaged model: minutes)
  for _ in $(seq 1 1800); do
    curl -fsS "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "scale_out: a process exited; logs in $RUN_DIR/logs" >&2; return 1; }
    done
    sleep 0.5
  done
  echo "scale_out: replica $1 not up after 15 min; logs in $RUN_DIR/logs" >&2
  return 1
}
for port in "${REPLICAS[@]}"; do wait_up "$port"; done
echo "ready: ws://127.0.0.1:${PROXY_PORT}/ws  (replicas ${REPLICAS[*]}; run dir $RUN_DIR)"
wait
