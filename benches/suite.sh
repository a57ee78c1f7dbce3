#!/usr/bin/env bash
# The benchmark figures of benches/README.md (and the README's summary), measured on this machine.
#
#   benches/suite.sh [section ...]
#
# Sections (all by default): ratios open-loop notify waiters memory list
# durable churn overload callgrind readcache postgres traces auth. Servers run pinned to core 0 and the load generator to core 1
# (`taskset`), so neither takes CPU from the other and the server's CPU per
# call is measured cleanly; every opsd figure is printed next to the no-op
# ceiling measured in the same run and layout (opsd-ceiling, bench/src/bin). Set
# ROUNDS (default 5) for more alternating rounds, SERVER_CPU and LOAD_CPU to
# pin elsewhere. Builds the release binaries first. On a shared machine, run it
# as `flock -o /work/bench.lock benches/suite.sh ...` (-o: the servers it
# starts, the PostgreSQL cluster too, do not inherit the lock).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(ratios open-loop notify waiters memory list durable churn overload callgrind readcache postgres traces auth)

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
pg_cleanup=:
trap 'cleanup; eval "$pg_cleanup"' EXIT

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

if has overload; then
  # Load shedding (README, Limits and hostile clients): GetOperation over
  # 1,000 connections × 8 streams from the raw HTTP/2 generator, memory
  # store. The saturation rate first (closed loop, shedding off), then each
  # load with shedding off (--max-in-flight 0) and at the default.
  echo "## overload: 1,000 connections × 8 streams of GetOperation, 10 s per run"
  overload() {
    local name=$1 port=$2 limit=$3
    shift 3
    serve "$name" "$port" "$opsd" serve --listen "127.0.0.1:$port" --store memory --max-in-flight "$limit"
    local pid_var="pid_$name"
    local out
    out=$(load overload --target "http://127.0.0.1:$port" --server-pid "${!pid_var}" --duration 10s "$@")
    stop "${!pid_var}"
    echo "$name: $out" >&2
    sed -E 's/.*goodput ([0-9]+).*/\1/' <<<"$out"
  }
  # Ports below the ephemeral range: the generator's 1,000 client sockets
  # linger in TIME_WAIT on ports of that range and would block a bind.
  shed=128 # the default --max-in-flight
  sat=$(overload saturation 31181 0)
  overload closed_shed 31182 $shed >/dev/null
  overload closed_retry 31183 $shed --retry-after 1s >/dev/null
  overload closed_retry_1024 31188 1024 --retry-after 1s >/dev/null
  for x in 1 2; do
    overload "open_${x}x_off" $((31182 + 2 * x)) 0 --rate $((sat * x)) >/dev/null
    overload "open_${x}x_shed" $((31183 + 2 * x)) $shed --rate $((sat * x)) >/dev/null
  done
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

if has readcache; then
  # The redb store's read cache: GetOperation CPU per call against the
  # memory store's, alternating rounds (the memory store as the reference).
  echo "## GetOperation: redb (read cache) vs the memory store, 16 clients, $ROUNDS rounds of 4 s"
  serve memory 50191 "$opsd" serve --listen 127.0.0.1:50191 --store memory
  serve redb 50192 "$opsd" serve --listen 127.0.0.1:50192 --store "redb:$work/readcache/opsd.redb"
  load get --target http://127.0.0.1:50192 --server-pid "$pid_redb" --ceiling http://127.0.0.1:50191 \
    --ceiling-pid "$pid_memory" --rounds "$ROUNDS" --concurrency 16 --duration 4s
  stop "$pid_memory"; stop "$pid_redb"
fi

if has postgres; then
  # A PostgreSQL cluster of its own (the machine's, `pg_config --bindir`;
  # fsync on), started pinned to the servers' core like opsd, under target/.
  pgbin=$(pg_config --bindir)
  pgdir="$PWD/target/bench-pg"
  pgport=55432
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  as_pg "$pgbin/pg_ctl" -D "$pgdir/data" stop -m immediate >/dev/null 2>&1 || true
  rm -rf "$pgdir"
  mkdir -p "$pgdir"
  [ "$(id -u)" = 0 ] && chown postgres "$pgdir"
  as_pg "$pgbin/initdb" -D "$pgdir/data" -U postgres -A trust -E UTF8 --locale=C >/dev/null
  pg_ctl=("$pgbin/pg_ctl")
  [ "$(id -u)" = 0 ] && pg_ctl=(runuser -u postgres -- "$pgbin/pg_ctl")
  taskset -c "$SERVER_CPU" "${pg_ctl[@]}" -D "$pgdir/data" -l "$pgdir/log" -w \
    -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB" \
    start >/dev/null
  pg_cleanup='as_pg "$pgbin/pg_ctl" -D "$pgdir/data" stop -m fast >/dev/null 2>&1 || true'
  psql() { "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -qAt "$@"; }
  echo "## PostgreSQL: $("$pgbin/postgres" --version), one replica and two replicas (both on core $SERVER_CPU with the database)"
  pgurl() { psql -c "CREATE DATABASE $1" postgres; echo "postgres://postgres@127.0.0.1:$pgport/$1"; }
  db=$(pgurl opsd_bench)
  serve redb 50201 "$opsd" serve --listen 127.0.0.1:50201 --store "redb:$work/pg/opsd.redb"
  serve pga 50202 "$opsd" serve --listen 127.0.0.1:50202 --store "$db"
  serve pgb 50203 "$opsd" serve --listen 127.0.0.1:50203 --store "$db"
  redb=(--target http://127.0.0.1:50201 --server-pid "$pid_redb")
  pg1=(--target http://127.0.0.1:50202 --server-pid "$pid_pga")
  pg2=(--target http://127.0.0.1:50202 --target http://127.0.0.1:50203 --server-pid "$pid_pga" --server-pid "$pid_pgb")
  echo "### GetOperation, 16 clients, 5 s (server CPU is opsd's, not PostgreSQL's)"
  for what in "" --done; do
    for round in $(seq 1 "$ROUNDS"); do
      echo -n "redb          "; load get "${redb[@]}" --concurrency 16 --duration 5s $what
      echo -n "postgres, 1   "; load get "${pg1[@]}" --concurrency 16 --duration 5s $what
      echo -n "postgres, 2   "; load get "${pg2[@]}" --concurrency 16 --duration 5s $what
    done
  done
  echo "### durable create+complete, 10 s"
  for clients in 1 64; do
    echo -n "redb, $clients          "; load create-complete "${redb[@]}" --concurrency $clients --duration 10s
    echo -n "postgres 1, $clients    "; load create-complete "${pg1[@]}" --concurrency $clients --duration 10s
    echo -n "postgres 2, $clients    "; load create-complete "${pg2[@]}" --concurrency $clients --duration 10s
  done
  echo "### wake-up: the operation finished on A, its Wait parked on B (1,000 parked)"
  echo -n "postgres, A = B   "; load waiters --target http://127.0.0.1:50202 --waiters 1000 --sample 1000
  echo -n "postgres, A ≠ B   "; load waiters --target http://127.0.0.1:50202 --target http://127.0.0.1:50203 --waiters 1000 --sample 1000
  echo "### cancel on B → worker stream on A"
  echo -n "postgres, A = B   "; load cancel-notify --target http://127.0.0.1:50202 --count 1000
  echo -n "postgres, A ≠ B   "; load cancel-notify --target http://127.0.0.1:50202 --target http://127.0.0.1:50203 --count 1000
  echo "### List pages of 100 (postgres): cost at 10,000 and at 1,000,000 operations"
  t=http://127.0.0.1:50202
  load fill --target $t --concurrency 16 --count 10000 --parent projects/small >/dev/null
  echo -n "10k store, projects/small     "; load list --target $t --parent projects/small --page-size 100 --duration 5s
  # 990,000 more rows, copies of one that opsd wrote, by SQL (opsd would
  # take several minutes to create them one by one).
  psql -d opsd_bench -c "INSERT INTO opsd_operations (name, parent, revision, done, error_code,
      metadata_type, response_type, create_s, create_ns, update_s, update_ns, next_deadline, record)
    SELECT 'projects/big/operations/' || lpad(i::text, 7, '0'), 'projects/big', revision, done,
      error_code, metadata_type, response_type, create_s, create_ns, update_s, update_ns,
      next_deadline, record
    FROM generate_series(1, 990000) AS i,
      (SELECT * FROM opsd_operations WHERE parent = 'projects/small' LIMIT 1) AS t;
    ANALYZE opsd_operations;"
  echo -n "1M store,  projects/small     "; load list --target $t --parent projects/small --page-size 100 --duration 5s
  echo -n "1M store,  projects/big       "; load list --target $t --parent projects/big --page-size 100 --duration 5s
  echo -n "1M store,  big, filtered      "; load list --target $t --parent projects/big --page-size 100 --duration 5s --filter "done = true AND response:*"
  stop "$pid_redb"; stop "$pid_pga"; stop "$pid_pgb"
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

if has auth; then
  # Auth on (an RS256 JWKS, a policy of a few principals, every call's name
  # checked) with the client reusing one token, against auth off as the
  # ceiling: the cost of the token cache's lookup and the per-name check.
  echo "## auth: GetOperation with a reused RS256 bearer token vs auth off, $ROUNDS rounds"
  mkdir -p "$work/auth"
  openssl genrsa -out "$work/auth/key.pem" 2048 2>/dev/null
  b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
  n=$(openssl rsa -in "$work/auth/key.pem" -noout -modulus | cut -d= -f2 | xxd -r -p | b64url)
  printf '{"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": "%s", "e": "AQAB"}]}' "$n" >"$work/auth/jwks.json"
  cat >"$work/auth/policy.yaml" <<'EOF'
principals:
  - subject: alice@example.com
    grants:
      - names: ["projects/a/**"]
        permissions: ["operations.*"]
  - subject: worker-a
    grants:
      - names: ["projects/a/**"]
        permissions: ["workers.*"]
  - subject: bench
    grants:
      - names: ["projects/a/**", "projects/b/**"]
        permissions: ["operations.list"]
      - names: ["operations/*"]
        permissions: ["operations.get", "workers.*"]
EOF
  now=$(date +%s)
  header=$(printf '{"alg":"RS256","typ":"JWT","kid":"k1"}' | b64url)
  claims=$(printf '{"iss":"https://issuer.bench","aud":"opsd","sub":"bench","scope":"https://www.googleapis.com/auth/cloud-platform","iat":%d,"exp":%d}' \
    "$now" $((now + 86400)) | b64url)
  token="$header.$claims.$(printf '%s.%s' "$header" "$claims" | openssl dgst -sha256 -sign "$work/auth/key.pem" | b64url)"
  serve authed 50116 "$opsd" serve --listen 127.0.0.1:50116 --store memory \
    --auth-jwks "$work/auth/jwks.json" --auth-issuer https://issuer.bench --auth-audience opsd \
    --auth-policy "$work/auth/policy.yaml"
  serve open 50117 "$opsd" serve --listen 127.0.0.1:50117 --store memory
  # The token goes to both servers (the open one ignores it), so the
  # client's work and the bytes on the wire are the same.
  load --token "$token" get --target http://127.0.0.1:50116 --server-pid "$pid_authed" \
    --ceiling http://127.0.0.1:50117 --ceiling-pid "$pid_open" \
    --rounds "$ROUNDS" --concurrency 16 --duration 4s
  stop "$pid_authed"; stop "$pid_open"
fi
