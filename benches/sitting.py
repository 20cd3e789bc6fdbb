#!/usr/bin/env python3
"""One benchmark sitting: the shapes of issue 21's goals, builds alternated round by round.

Each round runs every shape on one build, then on the next, the order of the builds reversed
every round, so that a machine slowing down or speeding up during the sitting weighs on all
of them alike. Every run is started by the same load generator (the first --loadgen), which
starts `taskd --port 0 --simulate-ms 0 --outbox FILE --log-file FILE` from the build's
directory, otherwise with taskd's defaults (2 workers, 4 task processes, log level info).

  cargo build --release --bins --examples
  mkdir -p /tmp/now && cp target/release/taskd target/release/examples/{loadgen,ipc_baseline} /tmp/now
  (the same for the build to compare against, in /tmp/before)
  python3 benches/sitting.py --rounds 4 --out sit.jsonl now=/tmp/now before=/tmp/before
  python3 benches/sitting.py --summary sit.jsonl

Shapes (loadgen flags): 8 x 64 at the default and at --log-level warn (--seconds 4), 1,000 x 8
(--seconds 4), 1 x 1 (--seconds 3) followed by `ipc_baseline --seconds 1 --repeat 1` (the
one-hop stream and the cross-CPU ping-pong of that moment), and durable: 8 x 64 against a
fresh `redis-server --save "" --appendonly yes --appendfsync everysec` (--seconds 4; skipped
when redis-server is not on PATH), and the same with `--taskd-arg=--durable-pack` for a build
whose `taskd --help` names it. `--durable-only` runs only the durable shapes. Timing, so run it
on a quiet machine: every run's `other_cores` says how much the rest of the machine used.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TICKS = os.sysconf("SC_CLK_TCK")


def loadgen(lg, taskd, flags):
    out = subprocess.run([lg, "--taskd", taskd, "--json", *flags], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[0])


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def durable(lg, taskd, extra=()):
    port = free_port()
    work = tempfile.mkdtemp(prefix="sit-redis-")
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", work,
         "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        c0, t0 = cpu_seconds(redis.pid), time.monotonic()
        r = loadgen(lg, taskd, ["--conns", "8", "--window", "64", "--seconds", "4",
                                f"--taskd-arg=--redis-url=redis://127.0.0.1:{port}",
                                "--taskd-arg=--node-id=bench", *extra])
        c1, t1 = cpu_seconds(redis.pid), time.monotonic()
        # Over the whole loadgen run, its start and warm-up included: a floor of the cores
        # Redis used while jobs flowed.
        r["redis_cpu_s"] = c1 - c0
        r["redis_cores"] = (c1 - c0) / (t1 - t0)
        return r
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(work, ignore_errors=True)


def packs(taskd):
    """Whether this build has --durable-pack."""
    help = subprocess.run([taskd, "--help"], capture_output=True, text=True).stdout
    return "--durable-pack" in help


def run_build(lg, ipc, name, d, rnd, durable_only=False):
    taskd = os.path.join(d, "taskd")
    rec = {"round": rnd, "build": name, "dir": d, "start": time.strftime("%H:%M:%S", time.gmtime())}
    if durable_only:
        if shutil.which("redis-server"):
            rec["dur"] = durable(lg, taskd)
            if packs(taskd):
                rec["durp"] = durable(lg, taskd, ["--taskd-arg=--durable-pack"])
        return rec
    rec["d864"] = loadgen(lg, taskd, ["--seconds", "4"])
    rec["w864"] = loadgen(lg, taskd, ["--seconds", "4", "--taskd-arg=--log-level=warn"])
    rec["c1000"] = loadgen(lg, taskd, ["--conns", "1000", "--window", "8", "--seconds", "4"])
    rec["one"] = loadgen(lg, taskd, ["--conns", "1", "--window", "1", "--seconds", "3"])
    rec["ipc"] = json.loads(subprocess.run([ipc, "--seconds", "1", "--repeat", "1", "--json"],
                                           check=True, capture_output=True, text=True).stdout)
    if shutil.which("redis-server"):
        rec["dur"] = durable(lg, taskd)
        if packs(taskd):
            rec["durp"] = durable(lg, taskd, ["--taskd-arg=--durable-pack"])
    return rec


def sitting(args):
    builds = []
    for spec in args.builds:
        name, _, d = spec.partition("=")
        if not d or not os.path.isfile(os.path.join(d, "taskd")):
            sys.exit(f"error: {spec!r} is not NAME=DIR with DIR/taskd in it")
        builds.append((name, d))
    lg = args.loadgen or os.path.join(builds[0][1], "loadgen")
    ipc = args.ipc or os.path.join(builds[0][1], "ipc_baseline")
    with open(args.out, "a") as out:
        for rnd in range(args.rounds):
            order = builds if rnd % 2 == 0 else builds[::-1]
            for name, d in order:
                rec = run_build(lg, ipc, name, d, rnd, args.durable_only)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                first = rec.get("d864") or rec.get("dur")
                if first:
                    print(f"round {rnd} {name}: {first['jobs_per_s']:.0f} jobs/s, "
                          f"others {first['other_cores']:.2f} cores", file=sys.stderr)


def span(xs, fmt):
    xs = sorted(xs)
    return f"{fmt(xs[0])}–{fmt(xs[-1])} ({fmt(statistics.median(xs))})"


def summary(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    k = lambda v: f"{v / 1000:.0f}k"
    us = lambda v: f"{v:.2f}"
    r2 = lambda v: f"{v:.2f}"
    n0 = lambda v: f"{v:.0f}"
    for name in dict.fromkeys(r["build"] for r in recs):
        rs = [r for r in recs if r["build"] == name]
        print(f"== {name}: {len(rs)} rounds, {rs[0]['start']}–{rs[-1]['start']} UTC")
        shapes = ("d864", "w864", "c1000", "one", "dur", "durp")
        others = [r[s]["other_cores"] for r in rs for s in shapes if s in r]
        print(f"others' cores: {min(others):.2f}–{max(others):.2f}")
        ms = [r for r in rs if "d864" in r]
        rows = [] if not ms else [
            ("8x64 default jobs/s", [r["d864"]["jobs_per_s"] for r in ms], k),
            ("8x64 warn jobs/s", [r["w864"]["jobs_per_s"] for r in ms], k),
            ("default / warn", [r["d864"]["jobs_per_s"] / r["w864"]["jobs_per_s"] for r in ms], r2),
            ("one-hop stream msg/s", [r["ipc"]["stream_1_per_write_msgs_per_s"] for r in ms], k),
            ("default / one-hop", [r["d864"]["jobs_per_s"] / r["ipc"]["stream_1_per_write_msgs_per_s"] for r in ms], r2),
            ("CPU/job default us", [r["d864"]["taskd_cpu_us_per_job"] for r in ms], us),
            ("CPU/job warn us", [r["w864"]["taskd_cpu_us_per_job"] for r in ms], us),
            ("1000x8 jobs/s", [r["c1000"]["jobs_per_s"] for r in ms], k),
            ("1000x8 / 8x64", [r["c1000"]["jobs_per_s"] / r["d864"]["jobs_per_s"] for r in ms], r2),
            ("1000x8 CPU/job us", [r["c1000"]["taskd_cpu_us_per_job"] for r in ms], us),
            ("1x1 p50 us", [r["one"]["latency_p50_us"] for r in ms], n0),
            ("ping-pong cross p50 us", [r["ipc"]["ping_pong_cross_cpu"]["p50_us"] for r in ms], n0),
            ("1x1 / ping-pong", [r["one"]["latency_p50_us"] / r["ipc"]["ping_pong_cross_cpu"]["p50_us"] for r in ms], r2),
            ("1x1 taskd cores", [r["one"]["taskd_cpu_cores"] for r in ms], r2),
        ]
        ds = [r for r in rs if "dur" in r]
        if ds:
            rows += [
                ("durable jobs/s", [r["dur"]["jobs_per_s"] for r in ds], k),
                ("durable taskd CPU/job us", [r["dur"]["taskd_cpu_us_per_job"] for r in ds], us),
                ("durable taskd cores", [r["dur"]["taskd_cpu_cores"] for r in ds], r2),
                ("durable redis cores", [r["dur"]["redis_cores"] for r in ds], r2),
                # Cores over the whole run (start included) per job of the measured seconds: a
                # rough figure, for comparing shapes of one sitting.
                ("durable redis CPU/job us", [1e6 * r["dur"]["redis_cores"] / r["dur"]["jobs_per_s"] for r in ds], us),
                ("durable machine busy", [r["dur"]["machine_busy_cores"] for r in ds], r2),
            ]
            dm = [r for r in ds if "d864" in r]
            if dm:
                rows.append(("durable / in memory", [r["dur"]["jobs_per_s"] / r["d864"]["jobs_per_s"] for r in dm], r2))
        ps = [r for r in rs if "durp" in r]
        if ps:
            rows += [
                ("packed durable jobs/s", [r["durp"]["jobs_per_s"] for r in ps], k),
                ("packed / durable", [r["durp"]["jobs_per_s"] / r["dur"]["jobs_per_s"] for r in ps], r2),
                ("packed taskd CPU/job us", [r["durp"]["taskd_cpu_us_per_job"] for r in ps], us),
                ("packed taskd cores", [r["durp"]["taskd_cpu_cores"] for r in ps], r2),
                ("packed redis cores", [r["durp"]["redis_cores"] for r in ps], r2),
                ("packed redis CPU/job us", [1e6 * r["durp"]["redis_cores"] / r["durp"]["jobs_per_s"] for r in ps], us),
                ("packed machine busy", [r["durp"]["machine_busy_cores"] for r in ps], r2),
            ]
            pm = [r for r in ps if "d864" in r]
            if pm:
                rows.append(("packed / in memory", [r["durp"]["jobs_per_s"] / r["d864"]["jobs_per_s"] for r in pm], r2))
        for label, xs, fmt in rows:
            print(f"  {label:28} {span(xs, fmt)}   runs: {' '.join(fmt(x) for x in xs)}")
        for kind in ("master", "manager", "worker", "task"):
            for when in ("rss_idle", "rss_end"):
                kb = [p["rss_kb"] for r in ms for p in (r["d864"].get(when) or [])
                      if p["name"].split(" ")[:2] == ["taskd:", kind]]
                if kb:
                    print(f"  RSS {kind} {when} MB".ljust(31) + f"{min(kb) / 1024:.1f}–{max(kb) / 1024:.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="sitting.jsonl")
    p.add_argument("--loadgen", help="the load generator every run uses (default: the first build's)")
    p.add_argument("--ipc", help="ipc_baseline (default: the first build's)")
    p.add_argument("--durable-only", action="store_true", help="only the durable shapes")
    p.add_argument("--summary", metavar="JSONL", help="print ranges (medians) of a sitting's file")
    p.add_argument("builds", nargs="*", metavar="NAME=DIR")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    elif args.builds:
        sitting(args)
    else:
        p.error("give NAME=DIR builds, or --summary FILE")


if __name__ == "__main__":
    main()
