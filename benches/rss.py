#!/usr/bin/env python3
"""Resident memory of every kind of taskd process, by what it is made of, over several starts.

Usage: benches/rss.py [--runs N] [--load SECONDS] [--taskd PATH] [--loadgen PATH] [--copy yes]
                      [-- TASKD FLAGS]

Starts taskd (default target/release/taskd) as loadgen does (`--port 0 --simulate-ms 0`, the
outbox and the log in a temporary directory, then the flags after `--`), waits 1 s, and reads
/proc/PID/smaps of the master, the manager, one worker and one task process; with `--load S`,
it then runs `loadgen --conns 8 --window 64 --seconds S` against it (default
target/release/examples/loadgen) and reads them again. It stops the daemon and starts the next
run: the text and libc figures move from run to run with where the kernel places the binary
(ASLR), as the kernel maps file pages 64 kB around each one a process touches, so one run is
not a figure. With `--copy yes` it first copies the binary with `cp` into a temporary directory
and measures the copy: as an install leaves it, its page cache in folios of up to 128 kB, of
which a process maps every one it touches whole (the linker's output is held in 4-16 kB folios,
mapped 64 kB around a touch). Prints min/median/max in kB, per process kind, of:

  total  the VmRSS (Rss over every mapping)
  text   the binary's code (r-xp)                ro     its read-only data, .rodata, .eh_frame
  relro  its relocated tables and data (.data.rel.ro, .got: written by the loader at start,
         so anonymous; .data, .bss)
  heap   [heap]        stack  [stack]            libc   libc.so.6, every mapping
  other  everything else (ld.so, vdso, anonymous mappings: large buffers, the shared page)
  anon   Anonymous over every mapping: heap, stack, relro, buffers, own or copied at fork

A child maps, copy-on-write, every anonymous page its parent had at the fork (and RSS counts
them in full in each process), but only the file pages it touches itself.
"""
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

KINDS = ["master", "manager", "worker", "task"]
COLUMNS = ["total", "text", "ro", "relro", "heap", "stack", "libc", "other", "anon"]


def parse_args(argv):
    opts = {"runs": 5, "load": None, "taskd": "target/release/taskd", "loadgen": "target/release/examples/loadgen",
            "copy": "no"}
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    it = iter(argv)
    for a in it:
        key = a.lstrip("-")
        if key not in opts:
            sys.exit(__doc__)
        opts[key] = next(it, None)
        if opts[key] is None:
            sys.exit(f"{a} needs a value")
    opts["runs"] = int(opts["runs"])
    return opts, extra


def descendants(pid):
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            kids = open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for kid in kids:
            out += descendants(int(kid))
    return out


def kind(pid):
    title = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    return re.sub(r" \d+$", "", title.replace("taskd: ", ""))


def categories(pid, binary):
    out = collections.Counter()
    name = "other"
    for line in open(f"/proc/{pid}/smaps"):
        words = line.split()
        if "-" in words[0] and not words[0].endswith(":"):
            path = words[5] if len(words) > 5 else ""
            perms, offset = words[1], int(words[2], 16)
            if path and os.path.realpath(path) == binary:
                name = {"r-xp": "text", "rw-p": "relro"}.get(perms, "ro" if offset == 0 else "relro")
            elif os.path.basename(path).startswith("libc."):
                name = "libc"
            elif path in ("[heap]", "[stack]"):
                name = path.strip("[]")
            else:
                name = "other"
        elif words[0] == "Rss:":
            out[name] += int(words[1])
            out["total"] += int(words[1])
        elif words[0] == "Anonymous:":
            out["anon"] += int(words[1])
    return out


def snapshot(master, binary):
    seen = {}
    for pid in descendants(master):
        seen.setdefault(kind(pid), categories(pid, binary))
    return seen


def main():
    opts, extra = parse_args(sys.argv[1:])
    binary = os.path.realpath(opts["taskd"])
    copies = tempfile.TemporaryDirectory(prefix="taskd-rss-copy.")
    if opts["copy"] == "yes":
        subprocess.run(["cp", binary, f"{copies.name}/taskd"], check=True)
        binary = f"{copies.name}/taskd"
    results = collections.defaultdict(lambda: collections.defaultdict(list))
    for _ in range(opts["runs"]):
        with tempfile.TemporaryDirectory(prefix="taskd-rss.") as d:
            out = open(f"{d}/stdout", "w+")
            args = [binary, "--port", "0", "--simulate-ms", "0", "--outbox", f"{d}/outbox", "--log-file", f"{d}/log"]
            daemon = subprocess.Popen(args + extra, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                deadline = time.monotonic() + 10
                first = ""
                while "listening" not in first:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        sys.exit(f"taskd did not start; its log is {d}/log")
                    time.sleep(0.05)
                    out.seek(0)
                    first = out.readline()
                time.sleep(1.0)
                phases = {"idle": snapshot(daemon.pid, binary)}
                if opts["load"]:
                    cmd = [opts["loadgen"], "--addr", first.split()[-1], "--conns", "8", "--window", "64"]
                    subprocess.run(cmd + ["--seconds", opts["load"]], stdout=subprocess.DEVNULL, check=True)
                    time.sleep(0.5)
                    phases["after"] = snapshot(daemon.pid, binary)
            finally:
                os.killpg(daemon.pid, signal.SIGTERM)
                daemon.wait()
        for phase, kinds in phases.items():
            for k, cats in kinds.items():
                for c in COLUMNS:
                    results[(phase, k)][c].append(cats[c])
    order = lambda key: (key[0] != "idle", KINDS.index(key[1]) if key[1] in KINDS else len(KINDS))
    print(f"{opts['runs']} runs, kB min/median/max; {binary} {' '.join(extra)}")
    for (phase, k) in sorted(results, key=order):
        cols = results[(phase, k)]
        figures = "  ".join(f"{c} {min(v)}/{int(statistics.median(v))}/{max(v)}" for c, v in cols.items())
        print(f"{phase:5} {k:8} {figures}")


if __name__ == "__main__":
    main()
