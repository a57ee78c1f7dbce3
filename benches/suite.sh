#!/usr/bin/env bash
# The benchmark figures of benches/README.md (and the README's summary), measured on this machine.
#
#   benches/suite.sh [section ...]
#
# Sections (all by default): ratios open-loop notify waiters memory list
# durable churn callgrind traces. Servers run pinned to core 0 and the load generator to core 1
# (`taskset`), so neither takes CPU from the other and the server's CPU per
# call is measured cleanly; every opsd figure is printed next to the no-op
# ceiling measured in the same run and layout (opsd-ceiling, bench/src/bin). Set
# ROUNDS (default 5) for more alternating rounds, SERVER_CPU and LOAD_CPU to
# pin elsewhere. Builds the release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(ratios open-loop notify waiters memory list durable churn callgrind traces)

cargo build --release --quiet -p opsd -p opsd-bench
opsd=target/release/opsd
bench=target/release/opsd-bench
ceiling=target/release/opsd-ceiling
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# serve NAME PORT COMMAND...: starts a pinned server, waits for its port,
# and records its pid in the variable pid_NAME.
serve() {
  local name=$1 port=$2
  shift 2
  taskset -c "$SERVER_CPU" "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  printf -v "pid_$name" %s "$pid"
  for _ in $(seq 1 200); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server $name did not start:" >&2
  cat "$work/$name.log" >&2
  exit 1
}

stop() {
  local pid=$1
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

load() { taskset -c "$LOAD_CPU" "$bench" "$@"; }

has() { [[ " ${sections[*]} " == *" $1 "* ]]; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, server on core $SERVER_CPU, load on core $LOAD_CPU"

if has ratios || has open-loop; then
  serve ceiling 50101 "$ceiling" --grpc 127.0.0.1:50101 --rest 127.0.0.1:50102
  serve memory 50111 "$opsd" serve --listen 127.0.0.1:50111 --store memory
  serve nometrics 50112 "$opsd" serve --listen 127.0.0.1:50112 --store memory --no-metrics
  serve redb 50113 "$opsd" serve --listen 127.0.0.1:50113 --store "redb:$work/ratios/opsd.redb"
fi

if has ratios; then
  # Each comparison alternates the two servers round by round (the order
  # flips every round) and ends with the median ratios.
  echo "## closed loop, 16 clients, $ROUNDS rounds of 4 s per server"
  compare() {
    local what=$1 workload=$2 target=$3 pid=$4 reference=$5 reference_pid=$6
    echo "### $what"
    load "$workload" --target "$target" --server-pid "$pid" --ceiling "$reference" \
      --ceiling-pid "$reference_pid" --rounds "$ROUNDS" --concurrency 16 --duration 4s
  }
  compare "GetOperation: opsd memory store vs the tonic ceiling" get \
    http://127.0.0.1:50111 "$pid_memory" http://127.0.0.1:50101 "$pid_ceiling"
  compare "GetOperation: opsd redb store vs the tonic ceiling" get \
    http://127.0.0.1:50113 "$pid_redb" http://127.0.0.1:50101 "$pid_ceiling"
  compare "GetOperation: metrics on vs --no-metrics (as the ceiling)" get \
    http://127.0.0.1:50111 "$pid_memory" http://127.0.0.1:50112 "$pid_nometrics"
  compare "REST GET: opsd memory store vs the axum ceiling" rest-get \
    http://127.0.0.1:50111 "$pid_memory" http://127.0.0.1:50102 "$pid_ceiling"
  compare "REST GET: opsd redb store vs the axum ceiling" rest-get \
    http://127.0.0.1:50113 "$pid_redb" http://127.0.0.1:50102 "$pid_ceiling"
fi

if has open-loop; then
  echo "## open loop, 2,000 GetOperation/s over 4 connections, 10 s"
  for round in $(seq 1 "$ROUNDS"); do
    echo -n "ceiling   "; load get --target http://127.0.0.1:50101 --concurrency 4 --rate 2000 --duration 10s
    echo -n "memory    "; load get --target http://127.0.0.1:50111 --concurrency 4 --rate 2000 --duration 10s
    echo -n "redb      "; load get --target http://127.0.0.1:50113 --concurrency 4 --rate 2000 --duration 10s
  done
fi

if has ratios || has open-loop; then
  for pid in "$pid_ceiling" "$pid_memory" "$pid_nometrics" "$pid_redb"; do stop "$pid"; done
fi

if has notify; then
  echo "## cancel → watching worker"
  serve memory 50121 "$opsd" serve --listen 127.0.0.1:50121 --store memory
  serve redb 50122 "$opsd" serve --listen 127.0.0.1:50122 --store "redb:$work/notify/opsd.redb"
  echo -n "memory "; load cancel-notify --target http://127.0.0.1:50121 --count 2000
  echo -n "redb   "; load cancel-notify --target http://127.0.0.1:50122 --count 1000
  stop "$pid_memory"; stop "$pid_redb"
fi

if has waiters; then
  echo "## 100,000 parked Waits (memory store)"
  serve memory 50131 "$opsd" serve --listen 127.0.0.1:50131 --store memory
  load waiters --target http://127.0.0.1:50131 --waiters 100000 --sample 1000 --server-pid "$pid_memory"
  stop "$pid_memory"
fi

if has memory; then
  echo "## memory per stored operation: 1,000,000 in the memory store"
  serve memory 50141 "$opsd" serve --listen 127.0.0.1:50141 --store memory --no-metrics
  load fill --target http://127.0.0.1:50141 --concurrency 16 --count 1000000 --server-pid "$pid_memory"
  stop "$pid_memory"
fi

if has list; then
  echo "## List pages of 100 (memory store): cost at 10,000 and at 1,000,000 operations"
  serve memory 50171 "$opsd" serve --listen 127.0.0.1:50171 --store memory
  t=http://127.0.0.1:50171
  load fill --target $t --concurrency 16 --count 10000 --parent projects/small
  echo -n "10k store, projects/small     "; load list --target $t --parent projects/small --page-size 100 --duration 5s
  load fill --target $t --concurrency 32 --count 990000 --parent projects/big
  echo -n "1M store,  projects/small     "; load list --target $t --parent projects/small --page-size 100 --duration 5s
  echo -n "1M store,  projects/big       "; load list --target $t --parent projects/big --page-size 100 --duration 5s
  echo -n "1M store,  big, filtered      "; load list --target $t --parent projects/big --page-size 100 --duration 5s --filter "done = true AND response:*"
  stop "$pid_memory"
fi

if has durable; then
  echo "## durable create+complete (redb, every write fsynced)"
  serve redb 50151 "$opsd" serve --listen 127.0.0.1:50151 --store "redb:$work/durable/opsd.redb"
  echo -n " 1 client  "; load create-complete --target http://127.0.0.1:50151 --concurrency 1 --duration 10s --server-pid "$pid_redb"
  echo -n "64 clients "; load create-complete --target http://127.0.0.1:50151 --concurrency 64 --duration 10s --server-pid "$pid_redb"
  stop "$pid_redb"
  echo -n "start-up on that store: "; load startup --opsd "$opsd" --store "redb:$work/durable/opsd.redb"
fi

if has churn; then
  echo "## churn: create+complete with --retention 2s for 40 s (redb), store file size"
  serve redb 50181 "$opsd" serve --listen 127.0.0.1:50181 --retention 2s --store "redb:$work/churn/opsd.redb"
  load churn --target http://127.0.0.1:50181 --concurrency 16 --duration 40s --store-file "$work/churn/opsd.redb" |
    awk 'NR % 5 == 0 || /churn:/'
  stop "$pid_redb"
fi

if has callgrind; then
  # Instructions per call, counted by callgrind: repeatable whatever else
  # the machine does, so small CPU ratios are not lost in timing noise.
  echo "## callgrind: server instructions per call (4 clients, 10 s after a 3 s warm-up)"
  counted() {
    local name=$1 port=$2 workload=$3
    shift 3
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name" "$@" >"$work/cg.$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 300); do
      (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
    "$bench" "$workload" --target "http://127.0.0.1:$port" --concurrency 4 --duration 3s >/dev/null
    callgrind_control -z "$pid" >/dev/null
    local out
    out=$("$bench" "$workload" --target "http://127.0.0.1:$port" --concurrency 4 --duration 10s)
    callgrind_control -d "$pid" >/dev/null
    stop "$pid"
    local calls ir
    calls=$(sed -E 's/.*\(([0-9]+) in .*/\1/' <<<"$out")
    ir=$(callgrind_annotate "$(ls -S "$work"/cg."$name"* | grep -v log | head -1)" 2>/dev/null |
      awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "$name: $((ir / calls)) instructions per call ($calls calls)"
  }
  counted ceiling-grpc 50161 get "$ceiling" --grpc 127.0.0.1:50161 --rest 127.0.0.1:50162
  counted opsd-grpc-memory 50163 get "$opsd" serve --listen 127.0.0.1:50163 --store memory
  counted opsd-grpc-redb 50164 get "$opsd" serve --listen 127.0.0.1:50164 --store "redb:$work/cg/opsd.redb"
  counted ceiling-rest 50166 rest-get "$ceiling" --grpc 127.0.0.1:50165 --rest 127.0.0.1:50166
  counted opsd-rest-memory 50167 rest-get "$opsd" serve --listen 127.0.0.1:50167 --store memory
fi

if has traces; then
  # Every call traced (no traceparent: each is a sampled root span) and
  # exported to a sink that takes everything at once, against traces off
  # as the ceiling. The sink runs on the load core: it is the collector, not
  # opsd.
  echo "## traces: GetOperation, every call a span exported over OTLP vs traces off, $ROUNDS rounds"
  taskset -c "$LOAD_CPU" target/release/opsd-otlp-sink 127.0.0.1:50131 >"$work/sink.log" 2>&1 &
  pids+=("$!")
  serve traced 50114 "$opsd" serve --listen 127.0.0.1:50114 --store memory \
    --otlp-endpoint http://127.0.0.1:50131
  serve untraced 50115 "$opsd" serve --listen 127.0.0.1:50115 --store memory
  load get --target http://127.0.0.1:50114 --server-pid "$pid_traced" \
    --ceiling http://127.0.0.1:50115 --ceiling-pid "$pid_untraced" \
    --rounds "$ROUNDS" --concurrency 16 --duration 4s
  sleep 2 # the last batch reaches the sink
  curl -s http://127.0.0.1:50114/metrics | grep '^opsd_trace_spans' || true
  echo "sink: $(tail -1 "$work/sink.log")"
fi
