#!/usr/bin/env bash
# Instructions per job of every taskd process, counted by valgrind's callgrind: repeatable on a
# noisy machine, unlike time. Two runs of the real daemon under callgrind, one with 1,000 jobs
# and one with 1,000 + N; the difference over N is each process's cost per job (start-up and
# warm-up cancel out). No-op jobs, 8 connections x 64 in flight (CW="C W" to change).
#   benches/callgrind.sh [N, default 8000] [taskd flags, e.g. --log-level warn]
# Needs valgrind and python3. Takes a few minutes (callgrind runs ~50 x slower). KEEP=1 keeps
# the callgrind.out files (per process, roles in run-*/roles) for callgrind_annotate. CACHE=1
# also simulates the data caches (--cache-sim=yes; the last level as one core's 2 MB L2 of this
# machine, 16-way) and adds each process's data misses per job: first level, last level.
started="$PWD"
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-8000}"
shift || true
# TASKD_BIN=PATH: that binary instead of this tree's release build (to compare two builds).
# A relative path is taken from where the script was started (each run works in a directory
# of its own).
if [ -n "${TASKD_BIN:-}" ]; then
  bin="$(cd "$started" && realpath "$TASKD_BIN")"
else
  cargo build --release --bins --examples -q
  bin="$PWD/target/release/taskd"
fi
work="$(mktemp -d)"
vpid=""
cleanup() {
  [ -n "$vpid" ] && kill -9 "$vpid" 2>/dev/null || true
  pkill -9 -f "valgrind.*$work" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
read -r conns window <<<"${CW:-8 64}"

run() { # $1: jobs, then taskd flags; prints "ROLE INSTRUCTIONS" per process, sorted
  local jobs=$1 dir="$work/run-$1"
  shift
  mkdir -p "$dir"
  # A session of its own: its processes are told apart from any other taskd on the machine.
  local sim=()
  [ -n "${CACHE:-}" ] && sim=(--cache-sim=yes --LL=2097152,16,64)
  (cd "$dir" && exec setsid valgrind --tool=callgrind --dump-instr=no "${sim[@]}" \
    "$bin" --port 0 --simulate-ms 0 --outbox "$dir/outbox" --log-file "$dir/log" "$@" \
    >"$dir/stdout" 2>"$dir/stderr") &
  vpid=$!
  for _ in $(seq 1200); do grep -q 'listening on' "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
  local addr
  addr="$(grep -o 'listening on [0-9.:]*' "$dir/stdout" | awk '{print $3}')"
  [ -n "$addr" ] || { echo "taskd did not start under valgrind: $(cat "$dir/stderr")" >&2; exit 1; }
  python3 benches/exact_jobs.py "$addr" "$jobs" "$conns" "$window" >&2
  # Each process's role from its title, before they exit.
  ps -eo pid=,sid=,comm= | awk -v sid="$vpid" '$2 == sid && $3 == "taskd:" {print $1, $4 $5}' >"$dir/roles"
  kill -TERM "$vpid"
  wait "$vpid" || true
  # Each process writes its counts when it exits, some after the master.
  for _ in $(seq 600); do
    ps -eo sid= | grep -qx " *$vpid" || break
    sleep 0.1
  done
  vpid=""
  while read -r pid role; do
    [ -f "$dir/callgrind.out.$pid" ] || continue
    # Ir, and with CACHE=1 the data misses: D1mr + D1mw, DLmr + DLmw.
    echo "$role $(grep -m1 '^summary:\|^totals:' "$dir/callgrind.out.$pid" |
      awk '{ if (NF >= 10) print $2, $6 + $7, $9 + $10; else print $2, 0, 0 }')"
  done <"$dir/roles" | sort
}

echo "taskd${*:+ $*} at $conns x $window, $n jobs after 1,000 (callgrind)" >&2
run 1000 "$@" >"$work/a"
run $((1000 + n)) "$@" >"$work/b"
# Jobs spread unevenly over the task processes (and workers) from one run to the other: sum
# each kind of process (master, manager, workers, task processes, bridge) before subtracting.
kinds() {
  awk '{k = $1; sub(/[0-9]+$/, "", k); ir[k] += $2; d1[k] += $3; ll[k] += $4}
    END {for (k in ir) print k, ir[k], d1[k], ll[k]}' "$1" | sort
}
join <(kinds "$work/a") <(kinds "$work/b") | awk -v n="$n" -v cache="${CACHE:-}" '
  { d = ($5 - $2) / n; t += d; d1 = ($6 - $3) / n; ll = ($7 - $4) / n; t1 += d1; tl += ll
    printf "%-12s %8.0f instructions/job", $1, d
    if (cache != "") printf "  %7.1f D1 misses/job  %6.1f LL misses/job", d1, ll
    printf "\n" }
  END { printf "%-12s %8.0f instructions/job", "all", t
    if (cache != "") printf "  %7.1f D1 misses/job  %6.1f LL misses/job", t1, tl
    printf "\n" }'
