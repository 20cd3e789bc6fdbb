#!/usr/bin/env bash
# taskd under hostile clients (issue 14), release build, default settings: one blaster that
# never reads beside 8 normal clients (their p50/p99 with and without it, master RSS), SIGTERM
# with the blaster connected, then 1,000 connections each holding a 2 MB unfinished line
# (master RSS against partial_lines_max, and what each connection got), then 100 email jobs
# with a 1 MiB body at once, each taking 20 s (task_queue_bytes_max, master RSS).
# Run by hand, on a quiet machine:
#   benches/hostile.sh [seconds with the blaster, default 60] [extra hostile_bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
cargo build --release --bin taskd --example hostile_bench -q
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/examples/hostile_bench --seconds "$secs" --baseline-seconds 20 --conns 1000 --line-bytes 2000000 "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
