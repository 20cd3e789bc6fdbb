#!/usr/bin/env bash
# Durable jobs over plain TCP, over TLS, and with --redis-wait-replicas 1, in one run: jobs/s
# and round trip at 8 x 64 and 1 x 1, no-op jobs, one redis-server (AOF everysec) listening on
# a plain and a TLS port (certificates made here with openssl), and one replica of it.
# With `multi`: instead, one task node serving three queues against one serving one queue
# (three web nodes of 1 worker and no task process, three load generators at 8 x 64 at once, one
# task node of 3 task processes; the same load, the queues differ).
# Needs redis-server and openssl. Run by hand, on a quiet machine:
#   benches/redis_prod.sh [seconds per run, default 5] [multi]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
what="${2:-prod}"
[ -n "${TASKD_BENCH_NO_BUILD:-}" ] || cargo build --release --bins --examples -q
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cd "$work"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 -days 2 -subj "/CN=bench ca" -keyout ca.key -out ca.crt "${ec[@]}" 2>/dev/null
openssl req -subj /CN=localhost -keyout server.key -out server.csr "${ec[@]}" 2>/dev/null
echo "subjectAltName=IP:127.0.0.1" >server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext \
  -out server.crt 2>/dev/null
cd - >/dev/null

port="$(free_port)"; tls_port="$(free_port)"; replica_port="$(free_port)"
mkdir -p "$work/m" "$work/r"
redis-server --port "$port" --tls-port "$tls_port" --bind 127.0.0.1 --dir "$work/m" --save "" \
  --appendonly yes --appendfsync everysec --tls-cert-file "$work/server.crt" \
  --tls-key-file "$work/server.key" --tls-ca-cert-file "$work/ca.crt" --tls-auth-clients no \
  >"$work/redis.log" 2>&1 &
pids+=($!)
redis-server --port "$replica_port" --bind 127.0.0.1 --dir "$work/r" --save "" \
  --replicaof 127.0.0.1 "$port" >"$work/replica.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
  redis-cli -p "$port" info replication 2>/dev/null | grep -q 'state=online' && break
  sleep 0.05
done

run() { # $1: label, rest: loadgen flags
  local label="$1"; shift
  for shape in "--conns 8 --window 64 --seconds $secs" "--conns 1 --window 1 --seconds $((secs < 3 ? secs : 3))"; do
    redis-cli -p "$port" flushall >/dev/null
    # shellcheck disable=SC2086
    out="$(target/release/examples/loadgen $shape "$@")"
    echo "$label | ${out%%$'\n'*}"
  done
}

# $1: label; $2: the three web nodes' queues, e.g. "q0 q0 q0" or "q0 q1 q2". Prints the three
# load generators' jobs/s and their sum.
multi() {
  local label="$1" queues="$2" q list i=0
  redis-cli -p "$port" flushall >/dev/null
  list="$(tr ' ' '\n' <<<"$queues" | sort -u | paste -sd,)"
  target/release/taskd task-node --redis-url "redis://127.0.0.1:$port" --redis-queue "$list" \
    --node-id bench-tasks --task-worker-num 3 --simulate-ms 0 --outbox "$work/tasks.outbox" \
    --log-level warn --log-file "$work/tasks.log" >/dev/null &
  local node=$!
  pids+=("$node")
  local gens=()
  for q in $queues; do
    target/release/examples/loadgen --conns 8 --window 64 --seconds "$secs" --json \
      "--taskd-arg=--redis-url=redis://127.0.0.1:$port" "--taskd-arg=--redis-queue=$q" \
      "--taskd-arg=--node-id=bench-web-$i" "--taskd-arg=--task-worker-num=0" \
      "--taskd-arg=--worker-num=1" >"$work/gen-$i.json" &
    gens+=($!)
    i=$((i + 1))
  done
  for g in "${gens[@]}"; do wait "$g"; done
  kill "$node"; wait "$node" 2>/dev/null || true
  python3 - "$label" "$work"/gen-*.json <<'PY'
import json, sys
rates = [json.load(open(f))["jobs_per_s"] for f in sys.argv[2:]]
print(f"{sys.argv[1]} | {' + '.join(f'{r:,.0f}' for r in rates)} = {sum(rates):,.0f} jobs/s")
PY
  rm -f "$work"/gen-*.json
}

echo "uptime before: $(uptime)"
if [ "$what" = multi ]; then
  multi "one queue:    3 web nodes on q0, task node on q0           " "q0 q0 q0"
  multi "three queues: 3 web nodes on q0,q1,q2, task node on all three" "q0 q1 q2"
  echo "uptime after: $(uptime)"
  exit 0
fi
run "redis, plain TCP       " "--taskd-arg=--redis-url=redis://127.0.0.1:$port" "--taskd-arg=--node-id=bench"
run "redis, TLS             " "--taskd-arg=--redis-url=rediss://127.0.0.1:$tls_port" \
  "--taskd-arg=--redis-ca-file=$work/ca.crt" "--taskd-arg=--node-id=bench"
run "redis, WAIT 1 replica  " "--taskd-arg=--redis-url=redis://127.0.0.1:$port" "--taskd-arg=--node-id=bench" \
  "--taskd-arg=--redis-wait-replicas=1"
echo "uptime after: $(uptime)"
