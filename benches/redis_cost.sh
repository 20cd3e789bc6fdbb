#!/usr/bin/env bash
# What durable jobs cost Redis, per job and per command: calls and microseconds of Redis's own
# CPU (INFO commandstats, scripts included) over exactly N no-op jobs, divided by N. Like
# callgrind.sh, repeatable on a noisy machine: it counts Redis's work, not the time it waited.
# A fresh redis-server (AOF everysec) and a release taskd (2 workers, 4 task processes), the
# jobs sent at C connections x W in flight (CW="C W", default 8 64) after 2,000 of warm-up.
#   benches/redis_cost.sh [N, default 100000] [taskd flags]
# Needs redis-server, redis-cli and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
shift || true
# TASKD_BIN=PATH: that binary instead of this tree's release build (to compare two builds).
bin="${TASKD_BIN:-$PWD/target/release/taskd}"
[ -n "${TASKD_BIN:-}" ] || cargo build --release --bins --examples -q
work="$(mktemp -d)"
redis_pid=""
taskd_pid=""
cleanup() {
  [ -n "$taskd_pid" ] && kill -9 -- "-$taskd_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill -9 "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
read -r conns window <<<"${CW:-8 64}"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$work/redis"
redis-server --port "$port" --bind 127.0.0.1 --dir "$work/redis" --save "" \
  --appendonly yes --appendfsync everysec >"$work/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
cli() { redis-cli -p "$port" "$@"; }

# Its own session, so that the whole daemon is killed at the end.
setsid "$bin" --port 0 --simulate-ms 0 --outbox "$work/outbox" --log-file "$work/log" \
  --redis-url "redis://127.0.0.1:$port" --node-id bench "$@" >"$work/stdout" 2>"$work/stderr" &
taskd_pid=$!
for _ in $(seq 200); do grep -q 'listening on' "$work/stdout" 2>/dev/null && break; sleep 0.05; done
addr="$(grep -o 'listening on [0-9.:]*' "$work/stdout" | awk '{print $3}')"
[ -n "$addr" ] || { echo "taskd did not start: $(cat "$work/stderr")" >&2; exit 1; }

python3 benches/exact_jobs.py "$addr" 2000 "$conns" "$window" >&2
# The last outcomes' replies are trimmed by the bridge's next round: let it run.
sleep 1
stats() { cli info commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2 \3/p' | sort; }
cpu() { cli info cpu | tr -d '\r' | awk -F: '/used_cpu_(sys|user):/ {s += $2} END {printf "%.6f\n", s}'; }
stats >"$work/a"
cpu_a="$(cpu)"
python3 benches/exact_jobs.py "$addr" "$n" "$conns" "$window" >&2
sleep 1
stats >"$work/b"
cpu_b="$(cpu)"
echo "Redis per job over $n jobs at $conns x $window${*:+ (taskd $*)}:"
join -a 2 -e 0 -o 0,1.2,1.3,2.2,2.3 "$work/a" "$work/b" | awk -v n="$n" '
  { c = ($4 - $2) / n; u = ($5 - $3) / n; if (c > 0) { printf "  %-14s %7.3f calls/job %7.3f usec/job\n", $1, c, u }; tc += c; tu += u }
  END { printf "  %-14s %7.3f calls/job %7.3f usec/job (in commands)\n", "all", tc, tu }'
awk -v a="$cpu_a" -v b="$cpu_b" -v n="$n" 'BEGIN { printf "  redis-server CPU (user+sys): %.2f usec/job\n", (b - a) * 1e6 / n }'
