#!/usr/bin/env python3
"""Writes link/pool_text.ld: the functions a worker or a task process runs, grouped by the linker,
then those the manager runs besides, then those the master runs besides (its start-up included).

Usage: benches/pool_text.py [--taskd PATH] [--jobs N]   (needs valgrind; about a minute)

Runs taskd (default target/release/taskd) under callgrind, each process's counts dumped (to
callgrind.out.PID.1) and zeroed when it names itself (`process::set_title`, the first call of
a child after the fork), sends N bare-address jobs at 8 x 64 and a few requests of every other
kind, waits idle, stops it, and reads which functions of the binary the workers and task
processes ran, then the manager, from their title on, and the master from its start (its part
1 too: it runs its start-up once, but the pages stay mapped). It writes them as linker-script
patterns, hottest first, without the hash legacy mangling appends (so that the
list holds while code around them changes), each as `.text.NAME` and `.text.unlikely.NAME`
(where LLVM puts a function it thinks cold, such as RawVec's finish_grow).

Why (README, Performance: RSS): a pool process maps, besides what it touches, the whole page
cache folio around it, and a binary written by `cp` or `install` is held in folios of up to
128 kB; spread over 6 MB of text, the ~150 kB a pool process runs touched ~20 of them. Grouped
at the start of the text, they fill four. The manager and the master (one each) come after them:
spread among the rest, their code had them map 3.0 and 3.5 MB of text; grouped, 1.0 and 1.9 MB.
"""
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "link", "pool_text.ld")


def parse_args(argv):
    opts = {"taskd": os.path.join(ROOT, "target/release/taskd"), "jobs": "4000"}
    it = iter(argv)
    for a in it:
        key = a.lstrip("-")
        if key not in opts:
            sys.exit(__doc__)
        opts[key] = next(it, None) or sys.exit(f"{a} needs a value")
    return opts


def other_requests(addr):
    """One of each kind of request a client may send (a valid job of each form, stats, errors)."""
    host, port = addr.rsplit(":", 1)
    lines = [
        '{"type":"email","to":"a@example.com","subject":"hi","body":"there"}',
        '{"type":"sms","to":"+8613800138000","text":"x"}',
        "email b@example.com hello",
        "sms +8613800138000 hi",
        "+8613800138000",
        "stats",
        "not a job",
        '{"bad json',
    ]
    with socket.create_connection((host, int(port))) as s:
        s.sendall("".join(l + "\n" for l in lines * 3).encode())
        s.settimeout(3)
        try:
            while s.recv(65536):
                pass
        except socket.timeout:
            pass


def self_costs(path, binary):
    """Self cost per function of `binary` in one callgrind.out file (compressed names). Valgrind
    names the object of the code in .text.pool `???`: counted as the binary's (but not code it
    cannot name, `0x…`, such as the vDSO's)."""
    names, objs, cost = {}, {}, collections.Counter()
    fn = obj = None
    after_calls = False
    for line in open(path):
        key, eq, val = line.rstrip("\n").partition("=")
        if eq and key in ("ob", "fn", "cob", "cfn", "calls", "fl", "fi", "fe", "cfi", "cfl"):
            m = re.match(r"\((\d+)\)(?: (.*))?", val)
            table = objs if key in ("ob", "cob") else names
            if m and m.group(2) and key in ("ob", "cob", "fn", "cfn"):
                table[m.group(1)] = m.group(2)
            if key == "ob":
                obj = objs.get(m.group(1)) if m else val
            elif key == "fn":
                fn = (names.get(m.group(1)) if m else val, obj)
            after_calls = key == "calls"
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if after_calls:
                after_calls = False
            elif fn and fn[1] in (binary, "???") and fn[0] and not fn[0].startswith("0x") and len(line.split()) > 1:
                cost[fn[0]] += int(line.split()[1])
    return cost


def profile(binary, jobs):
    work = tempfile.mkdtemp(prefix="taskd-pool-text.")
    out = open(f"{work}/stdout", "w+")
    cmd = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--demangle=no",
           "--dump-before=_ZN5taskd7process9set_title*", binary, "--port", "0", "--simulate-ms", "0",
           "--outbox", f"{work}/outbox", "--log-file", f"{work}/log"]
    daemon = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        first = ""
        while "listening" not in first:
            if time.monotonic() > deadline or daemon.poll() is not None:
                sys.exit(f"taskd did not start under valgrind; see {work}")
            time.sleep(0.1)
            out.seek(0)
            first = out.readline()
        addr = first.split()[-1]
        time.sleep(2)
        subprocess.run([sys.executable, f"{HERE}/exact_jobs.py", addr, jobs, "8", "64"], check=True)
        other_requests(addr)
        time.sleep(2)
        roles = {}
        for pid in os.listdir("/proc"):
            try:
                title = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
                sid = os.getsid(int(pid))
            except (OSError, ValueError):
                continue
            if sid == daemon.pid and title.startswith("taskd: "):
                roles[pid] = title.split()[1]
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait()
    # Each process writes its counts when it exits, some after the master.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in roles):
        time.sleep(0.1)
    # The pool's (worker, task), the manager's and the master's, each from the process's title on.
    total = {"pool": collections.Counter(), "manager": collections.Counter(), "master": collections.Counter()}
    for pid, role in roles.items():
        group = "pool" if role in ("worker", "task") else role
        if group in total and os.path.exists(f"{work}/callgrind.out.{pid}"):
            total[group] += self_costs(f"{work}/callgrind.out.{pid}", binary)
        # Its start-up, before it named itself (a child's part 1 is what its parent ran): the
        # master runs it once, but the pages it touched stay mapped.
        if group == "master" and os.path.exists(f"{work}/callgrind.out.{pid}.1"):
            total[group] += self_costs(f"{work}/callgrind.out.{pid}.1", binary)
    subprocess.run(["rm", "-rf", work])
    return total


def pattern(name):
    name = re.sub(r"'\d+$", "", name)  # callgrind's mark of a recursive call
    name = re.sub(r"\.llvm\.\d+$", "", name)  # ThinLTO's suffix of a promoted local
    name = re.sub(r"17h[0-9a-f]{16}E$", "17h", name)  # the legacy mangling's hash
    return name + "*"


def main():
    opts = parse_args(sys.argv[1:])
    binary = os.path.realpath(opts["taskd"])
    costs = profile(binary, opts["jobs"])
    if not costs["pool"]:
        sys.exit("no function of the binary was counted in a worker or task process")
    # The pool's first (there are many pool processes: their few folios matter most), then what
    # the manager runs besides, then what the master runs besides: each process's code in a few
    # folios, the pool's still at the start.
    patterns, counts = {}, {}
    for group in ("pool", "manager", "master"):
        before = len(patterns)
        for n, _ in costs[group].most_common():
            if re.fullmatch(r"[\w$.']+", n):  # not valgrind's own names, such as `(below main)`
                patterns.setdefault(pattern(n), group)
        counts[group] = len(patterns) - before
    with open(OUT, "w") as f:
        f.write("/* Generated by benches/pool_text.py: the functions a worker or a task process runs, at the\n"
                "   start of the text, so that they share a few page cache folios (README, Performance: RSS);\n"
                "   then those the manager runs besides, then those the master runs besides.\n"
                "   A function missing here still links, only elsewhere. INSERT keeps the default layout. */\n")
        f.write("SECTIONS\n{\n  .text.pool :\n  {\n")
        last = None
        for p, group in patterns.items():
            if group != last:
                f.write(f"    /* {group} */\n")
                last = group
            f.write(f"    *(.text.{p} .text.unlikely.{p})\n")
        f.write("  }\n}\nINSERT BEFORE .text;\n")
    print(f"{OUT}: {counts['pool']} patterns of the pool, {counts['manager']} more of the manager, "
          f"{counts['master']} more of the master")


if __name__ == "__main__":
    main()
