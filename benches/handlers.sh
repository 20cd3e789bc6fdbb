#!/usr/bin/env bash
# A no-op Python handler (benches/noop_handler.py) against a built-in no-op job, in one run:
# jobs/s, p50 round trip and CPU per job at 8 x 64 and 1 x 1. Run by hand, on a quiet machine
# (the load is printed with the figures):
#   benches/handlers.sh [seconds per run, default 5] [extra loadgen flags…]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
shift || true
# The daemon too: loadgen starts target/release/taskd, which --examples alone does not build.
cargo build --release --bins --examples -q
echo "load before: $(uptime)"
run() { # $1: label, rest: loadgen flags
  local label="$1"; shift
  for shape in "--conns 8 --window 64 --seconds $secs" "--conns 1 --window 1 --seconds $((secs < 3 ? secs : 3))"; do
    # shellcheck disable=SC2086
    out="$(target/release/examples/loadgen $shape "$@")"
    echo "$label | ${out%%$'\n'*}"
  done
}
run "built-in no-op        " "$@"
run "python handler, no-op " --job-type noop "--taskd-arg=--handler=noop=python3 benches/noop_handler.py" "$@"
echo "load after: $(uptime)"
