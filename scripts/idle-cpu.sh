#!/usr/bin/env bash
# Idle cost: `dcam-stream run` with no input for SECONDS (default 60), control topic on and off,
# against librdkafka's mock cluster (long-polls like Apache Kafka) and against noida-db (answers an
# empty fetch at once, so every consumer against it spins; docs/DESIGN.md §5). Prints the operator
# process's CPU as % of one core (and the broker's, for noida-db) from /proc/PID/stat.
#   scripts/idle-cpu.sh [SECONDS]        BIN=target/release/dcam-stream for a release build
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_IDLE="${1:-60}"
BIN="${BIN:-target/debug/dcam-stream}"
PY=.venv/bin/python
[ -x "$BIN" ] || { echo "no $BIN: cargo build first" >&2; exit 1; }
TICKS=$(getconf CLK_TCK)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 -- "-$p" 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
exec 2> >(grep -v Killed >&2)

cpu_ticks() { # utime + stime of a process and its waited-for children
  awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"
}
group_ticks() { # every process of a process group
  local sum=0
  for p in $(pgrep -g "$1"); do sum=$((sum + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
  echo "$sum"
}
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# measure NAME BROKERS CONTROL_TOPIC [BROKER_PGID]
measure() {
  local name=$1 brokers=$2 control=$3 broker_pg=${4:-}
  local port; port=$(free_port)
  DCAM__KAFKA__BROKERS="$brokers" DCAM__KAFKA__INPUT_TOPICS=idle-images DCAM__KAFKA__GROUP_ID="idle-$RANDOM" \
  DCAM__TOPICS__SCORES=idle-scores DCAM__TOPICS__DEAD_LETTER=idle-dlq DCAM__TOPICS__CONTROL="$control" DCAM__TOPICS__CONTROL_AUDIT=idle-audit \
  DCAM__KAFKA__SESSION_TIMEOUT_MS=10000 DCAM__TELEMETRY__HTTP_ADDR="127.0.0.1:$port" DCAM__TELEMETRY__LOG_LEVEL=warn \
    setsid "$BIN" run >"$work/$name.log" 2>&1 &
  local op=$!
  pids+=("$op")
  for _ in $(seq 1 600); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
  # Past start-up: model warm-up, group join, control topic read, and the exit of tokio's idle
  # blocking threads (10 s keep-alive), whose start-up CPU would otherwise land in the window.
  sleep "${SETTLE:-30}"
  local t0 b0 t1 b1
  t0=$(cpu_ticks "$op"); b0=${broker_pg:+$(group_ticks "$broker_pg")}
  sleep "$SECONDS_IDLE"
  t1=$(cpu_ticks "$op"); b1=${broker_pg:+$(group_ticks "$broker_pg")}
  kill -TERM "$op"; wait "$op" 2>/dev/null || true
  local op_pct broker_pct="-"
  op_pct=$(awk -v d=$((t1 - t0)) -v t="$TICKS" -v s="$SECONDS_IDLE" 'BEGIN {printf "%.1f", 100 * d / t / s}')
  [ -n "$broker_pg" ] && broker_pct=$(awk -v d=$((b1 - b0)) -v t="$TICKS" -v s="$SECONDS_IDLE" 'BEGIN {printf "%.1f", 100 * d / t / s}')
  printf '| %s | %s | %s | %s |\n' "$name" "${control:-off}" "$op_pct" "$broker_pct"
}

echo "idle cost over ${SECONDS_IDLE} s, $BIN; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| broker | control topic | operator % of a core | broker % of a core |"
echo "|---|---|---|---|"

setsid $PY scripts/idle_mock_broker.py idle-images idle-scores idle-dlq idle-control idle-audit >"$work/mock.addr" 2>"$work/mock.log" &
mock=$!
pids+=("$mock")
for _ in $(seq 1 100); do [ -s "$work/mock.addr" ] && break; sleep 0.1; done
mock_brokers=$(head -1 "$work/mock.addr")
measure "mock cluster" "$mock_brokers" idle-control
measure "mock cluster" "$mock_brokers" ""
kill -9 -- "-$mock" 2>/dev/null; wait "$mock" 2>/dev/null || true

nport=$(free_port)
setsid .venv/bin/noida-db start --only kafka --kafka-port "$nport" --data-dir "$work/noida" >"$work/noida.log" 2>&1 &
noida=$!
pids+=("$noida")
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$nport") 2>/dev/null && break; sleep 0.1; done
$PY - "127.0.0.1:$nport" <<'PY'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({"bootstrap.servers": sys.argv[1]})
for f in admin.create_topics([NewTopic(t, 3, 1) for t in ("idle-images", "idle-scores", "idle-dlq")]).values():
    f.result()
PY
measure "noida-db" "127.0.0.1:$nport" idle-control "$noida"
measure "noida-db" "127.0.0.1:$nport" "" "$noida"
