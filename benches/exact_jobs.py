#!/usr/bin/env python3
"""Sends exactly N bare-address jobs to taskd over C connections, W in flight on each, and
waits for every `done`: a fixed amount of work, so that instruction counts (callgrind) of two
runs can be subtracted. Usage: exact_jobs.py HOST:PORT N C W"""
import selectors
import socket
import sys
import time

addr, n, conns, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
host, port = addr.rsplit(":", 1)
per = n // conns
sel = selectors.DefaultSelector()
state = []
for c in range(conns):
    s = socket.create_connection((host, int(port)))
    s.setblocking(False)
    st = {"s": s, "sent": 0, "done": 0, "buf": b"", "c": c}
    state.append(st)
    sel.register(s, selectors.EVENT_READ, st)


def refill(st):
    k = min(window - (st["sent"] - st["done"]), per - st["sent"])
    if k > 0:
        first = st["c"] * per + st["sent"]
        data = b"".join(b"user%d@example.com\n" % (first + i) for i in range(k))
        st["s"].setblocking(True)
        st["s"].sendall(data)
        st["s"].setblocking(False)
        st["sent"] += k


for st in state:
    refill(st)
left, errors, t0 = conns, 0, time.time()
while left:
    events = sel.select(timeout=120)
    if not events:
        sys.exit("no answer from taskd for 120 s")
    for key, _ in events:
        st = key.data
        data = st["s"].recv(65536)
        if not data:
            sys.exit("taskd closed a connection")
        st["buf"] += data
        *lines, st["buf"] = st["buf"].split(b"\n")
        for line in lines:
            if b'"event":"done"' in line:
                st["done"] += 1
            elif b'"event":"accepted"' not in line:
                errors += 1
                print(line[:200].decode(errors="replace"), file=sys.stderr)
        refill(st)
        if st["done"] == per:
            sel.unregister(st["s"])
            left -= 1
print(f"{per * conns} jobs in {time.time() - t0:.1f} s, {errors} unexpected lines")
sys.exit(1 if errors else 0)
