#!/usr/bin/env bash
# Durable jobs over plain TCP, over TLS, and with --redis-wait-replicas 1, in one run: jobs/s
# and round trip at 8 x 64 and 1 x 1, no-op jobs, one redis-server (AOF everysec) listening on
# a plain and a TLS port (certificates made here with openssl), and one replica of it.
# Needs redis-server and openssl. Run by hand, on a quiet machine:
#   benches/redis_prod.sh [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
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

echo "uptime before: $(uptime)"
run "redis, plain TCP       " "--taskd-arg=--redis-url=redis://127.0.0.1:$port" "--taskd-arg=--node-id=bench"
run "redis, TLS             " "--taskd-arg=--redis-url=rediss://127.0.0.1:$tls_port" \
  "--taskd-arg=--redis-ca-file=$work/ca.crt" "--taskd-arg=--node-id=bench"
run "redis, WAIT 1 replica  " "--taskd-arg=--redis-url=redis://127.0.0.1:$port" "--taskd-arg=--node-id=bench" \
  "--taskd-arg=--redis-wait-replicas=1"
echo "uptime after: $(uptime)"
