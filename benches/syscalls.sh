#!/usr/bin/env bash
# System calls per job of every kind of taskd process, counted by the kernel's tracepoints
# (perf stat, which slows nothing down the way strace does), over an exact number of jobs:
# taskd starts, takes 1,000 jobs of warm-up, then perf counts while benches/exact_jobs.py sends
# N more (default 100,000) over C connections with W in flight on each (CW="C W", default
# "8 64"). Also counts the context switches (wake-ups) of each kind. With LOADGEN=SECONDS, the
# load generator (target/release/examples/loadgen) is the client instead, for that long, and its
# own calls are counted too (row "client"; LOADGEN_BIN=PATH for another build of it). The first column is CPU time (task-clock), in µs
# per job.
#   CW="1000 8" benches/syscalls.sh [N] [taskd flags, e.g. --log-level warn]
# Needs perf (tracepoints, no hardware counters) and python3; a release build of taskd.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
shift || true
bin="${TASKD:-$PWD/target/release/taskd}"
[ -x "$bin" ] || { echo "build it first: cargo build --release" >&2; exit 1; }
read -r conns window <<<"${CW:-8 64}"
work="$(mktemp -d)"
tpid=""
cleanup() {
  [ -n "$tpid" ] && kill -TERM "$tpid" 2>/dev/null && wait "$tpid" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
"$bin" --port 0 --simulate-ms 0 --outbox "$work/outbox" --log-file "$work/log" "$@" >"$work/stdout" 2>"$work/stderr" &
tpid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/stdout" 2>/dev/null && break; sleep 0.1; done
addr="$(grep -o 'listening on [0-9.:]*' "$work/stdout" | awk '{print $3}')"
[ -n "$addr" ] || { echo "taskd did not start: $(cat "$work/stderr")" >&2; exit 1; }
python3 benches/exact_jobs.py "$addr" 1000 "$conns" "$window" >/dev/null
pids="$(ps -eo pid=,ppid= | awk -v m="$tpid" '$1 == m || $2 == m {print $1}')"
pids="$pids $(ps -eo pid=,ppid= | awk -v p="$(echo $pids | tr ' ' '|')" '$2 ~ "^(" p ")$" {print $1}')"
pids="$(echo $pids | tr ' ' '\n' | sort -un | paste -sd,)"
events=task-clock,raw_syscalls:sys_enter,context-switches
for s in read write recvfrom sendto epoll_wait epoll_pwait epoll_ctl sched_yield; do events="$events,syscalls:sys_enter_$s"; done
perf stat --per-thread -x, -e "$events" -p "$pids" -o "$work/perf" &
ppid=$!
sleep 0.3
if [ -n "${LOADGEN:-}" ]; then
  # The load generator for LOADGEN seconds instead, itself counted too (as "client"); N is the
  # number of jobs it saw done, warm-up and drain included, as perf counted all of them.
  perf stat -x, -e "$events" -o "$work/client" -- "${LOADGEN_BIN:-target/release/examples/loadgen}" --addr "$addr" \
    --conns "$conns" --window "$window" --seconds "$LOADGEN" --json >"$work/lg"
  n="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["done"])' "$work/lg")"
  awk -F, '/^[^#]/ && NF > 3 {printf "client-0,%s,,%s\n", $1, $3}' "$work/client" >"$work/perf-client"
  echo "0 client" >"$work/roles"
else
  python3 benches/exact_jobs.py "$addr" "$n" "$conns" "$window" >&2
  : >"$work/roles"
  : >"$work/perf-client"
fi
kill -INT "$ppid"
wait "$ppid" || true
# Each process's role from its title.
for p in ${pids//,/ }; do echo "$p $(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | awk '{print $2}')"; done >>"$work/roles"
echo "taskd${*:+ $*} at $conns x $window: per job, over $n jobs (perf stat)"
awk -F, -v n="$n" '
  FNR == NR { split($0, f, " "); role[f[1]] = f[2]; next }
  /^[^#]/ && NF > 3 {
    split($1, t, "-"); pid = t[length(t)]; r = role[pid]; if (r == "") next
    ev = $4; sub(/^syscalls:sys_enter_/, "", ev); sub(/^raw_syscalls:sys_enter/, "all syscalls", ev)
    # task-clock is in ms: shown in µs per job
    sum[r, ev] += (ev == "task-clock" ? 1000 * $2 : $2 + 0); evs[ev] = 1; roles[r] = 1
  }
  END {
    ne = split("task-clock,all syscalls,context-switches,recvfrom,sendto,read,write,epoll_wait,epoll_pwait,epoll_ctl,sched_yield", e, ",")
    printf "%-8s", "kind"; for (i = 1; i <= ne; i++) printf " %12s", e[i]; printf "\n"
    # The redis bridge (durable jobs) is titled "taskd: redis bridge": its role reads "redis".
    nr = split("master,redis,worker,task,manager,client", rs, ",")
    for (k = 1; k <= nr; k++) { r = rs[k]; if (!(r in roles)) continue
      printf "%-8s", (r == "redis" ? "bridge" : r); for (i = 1; i <= ne; i++) printf " %12.3f", sum[r, e[i]] / n; printf "\n" }
  }' "$work/roles" "$work/perf" "$work/perf-client"
