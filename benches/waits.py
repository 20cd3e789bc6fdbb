#!/usr/bin/env python3
"""Where a durable run waits: for each thread of taskd and of redis-server, the share of the
wall time it spent on a CPU, runnable but waiting for a CPU, and asleep (waiting for a read,
a reply, a timer), from the kernel's /proc/PID/task/TID/schedstat over the middle of a run.

A process that is asleep most of the time waits on its peers (a round trip); one that is
runnable and not running waits for a CPU, which no pipelining gives it. Issue 21 asked which:
on the 2-core box, redis-server was asleep 4-13% of the time and waiting for a CPU 23-36%
(README, "Durable jobs and many hosts" -> "Figures").

    benches/waits.py [--taskd DIR] [--seconds 8] [--memory]

DIR holds `taskd` and `loadgen` (default: this tree's target/release, built first). It starts
its own redis-server (`--appendonly yes --appendfsync everysec`, nothing saved) and
`loadgen --conns 8 --window 64` with `--redis-url` and `--node-id bench`; `--memory` runs the
in-memory path instead. Needs redis-server, redis-cli and Linux's schedstat."""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads(pids):
    """(pid, tid) -> a name: the process's title, and the thread's name when not the main one."""
    out = {}
    for pid, title in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            except OSError:
                continue
            out[(pid, tid)] = title if tid == str(pid) else f"{title} [{comm}]"
    return out


def schedstat(pid, tid):
    """Nanoseconds on a CPU, nanoseconds runnable waiting for one, and time slices."""
    try:
        run, wait, slices = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[:3]
        return int(run), int(wait), int(slices)
    except (OSError, ValueError):
        return None


def descendants_titles(root):
    """The live processes of the run: redis-server and every taskd process under loadgen."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if len(line.split(None, 2)) == 3]
    children = {}
    for pid, ppid, args in rows:
        children.setdefault(int(ppid), []).append((int(pid), args))
    found, todo = {}, [root]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            if "<defunct>" not in args:
                found[pid] = args
                todo.append(pid)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--taskd", help="a directory with taskd and loadgen (default: build this tree)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--memory", action="store_true", help="the in-memory path, no Redis")
    a = ap.parse_args()
    if a.seconds < 4:
        sys.exit("--seconds: at least 4 (the sample is taken from 2 s in, for seconds - 3)")
    d = a.taskd
    if d is None:
        subprocess.run(["cargo", "build", "--release", "--bins", "--examples", "-q"], cwd=ROOT, check=True)
        d = os.path.join(ROOT, "target", "release")
        loadgen = os.path.join(d, "examples", "loadgen")
    else:
        loadgen = os.path.join(d, "loadgen")
    work = tempfile.mkdtemp(prefix="taskd-waits-")
    redis = None
    run = None
    try:
        cmd = [loadgen, "--taskd", os.path.join(d, "taskd"), "--conns", "8", "--window", "64",
               "--seconds", str(a.seconds)]
        if not a.memory:
            port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", work, "--save", "",
                 "--appendonly", "yes", "--appendfsync", "everysec"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(100):
                ping = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
                if ping.returncode == 0:
                    break
                time.sleep(0.05)
            cmd += [f"--taskd-arg=--redis-url=redis://127.0.0.1:{port}", "--taskd-arg=--node-id=bench"]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Past the daemon's start and loadgen's warm-up: inside the counted run.
        time.sleep(2.0)
        procs = descendants_titles(run.pid)
        if redis is not None:
            procs[redis.pid] = "redis-server"
        names = threads(procs)
        before = {k: schedstat(*k) for k in names}
        t0 = time.monotonic()
        time.sleep(a.seconds - 3)
        after = {k: schedstat(*k) for k in names}
        wall = (time.monotonic() - t0) * 1e9
        out, err = run.communicate()
        rows = []
        for k, name in names.items():
            if before[k] is None or after[k] is None:
                continue
            on = (after[k][0] - before[k][0]) / wall
            waiting = (after[k][1] - before[k][1]) / wall
            slices = (after[k][2] - before[k][2]) / (wall / 1e9)
            if on + waiting >= 0.005:
                rows.append((name, on, waiting, slices))
        print(f"{'thread':42s} {'on a CPU':>9s} {'waiting for a CPU':>18s} {'asleep':>7s} {'slices/s':>9s}")
        for name, on, waiting, slices in sorted(rows):
            print(f"{name[:42]:42s} {on:9.2f} {waiting:18.2f} {max(0.0, 1 - on - waiting):7.2f} {slices:9.0f}")
        print(f"{'all':42s} {sum(r[1] for r in rows):9.2f} {sum(r[2] for r in rows):18.2f}")
        print(out.strip().splitlines()[0] if out.strip() else err.strip())
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        if redis is not None:
            redis.kill()
            redis.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
