#!/usr/bin/env bash
# Durable jobs against the in-memory path, in one run: jobs/s and round trip at 8 x 64 and
# 1 x 1, no-op jobs, Redis on loopback TCP with AOF everysec, then with AOF off.
# Needs redis-server (Debian: apt-get install redis-server). Run by hand, on a quiet machine:
#   benches/durable.sh [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
# The daemon too: loadgen starts target/release/taskd, which --examples alone does not build.
cargo build --release --bins --examples -q
work="$(mktemp -d)"
redis_pid=""
cleanup() {
  [ -n "$redis_pid" ] && kill -9 "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_redis() { # $@: extra settings; sets $url and $redis_pid (not in a subshell: it must be killed)
  local port; port="$(free_port)"
  rm -rf "$work/redis" && mkdir -p "$work/redis"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$work/redis" --save "" "$@" \
    >"$work/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  url="redis://127.0.0.1:$port"
}

stop_redis() { kill -9 "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; redis_pid=""; }

run() { # $1: label, rest: loadgen flags
  local label="$1"; shift
  for shape in "--conns 8 --window 64 --seconds $secs" "--conns 1 --window 1 --seconds $((secs < 3 ? secs : 3))"; do
    # shellcheck disable=SC2086
    out="$(target/release/examples/loadgen $shape "$@")"
    echo "$label | ${out%%$'\n'*}"
  done
}

run "in memory            "
start_redis --appendonly yes --appendfsync everysec
run "redis, AOF everysec  " "--taskd-arg=--redis-url=$url" "--taskd-arg=--node-id=bench"
stop_redis
start_redis --appendonly no
run "redis, AOF off       " "--taskd-arg=--redis-url=$url" "--taskd-arg=--node-id=bench"
stop_redis
