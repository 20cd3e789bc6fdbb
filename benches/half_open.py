#!/usr/bin/env python3
"""Half-open connections against the metrics and WebSocket ports (issue 14's attack): opens N
connections to each that send half a request and wait, then reports how many taskd holds,
how many it refused (503), whether `stats` on the line port answers, and what is left after
handshake_timeout. Run by hand:

    cargo build && benches/half_open.py [--count 450] [--nofile 400] [--taskd target/debug/taskd]

--nofile runs taskd under `prlimit --nofile=N:N` (a low hard open-file limit)."""
import argparse, json, os, re, socket, subprocess, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--count", type=int, default=450)
ap.add_argument("--nofile", type=int)
ap.add_argument("--taskd", default="target/debug/taskd")
args = ap.parse_args()

work = tempfile.mkdtemp()
log_path = os.path.join(work, "taskd.log")
cmd = ([f"prlimit", f"--nofile={args.nofile}:{args.nofile}"] if args.nofile else []) + [
    args.taskd, "--port", "0", "--metrics-addr", "127.0.0.1:0", "--ws-port", "0",
    "--outbox", os.path.join(work, "outbox.log")]
taskd = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True)
try:
    lines = [taskd.stdout.readline() for _ in range(3)]
    addr = lambda text, pattern: (lambda a: (a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])))(
        re.search(pattern, text).group(1))
    tcp = addr(lines[0], r"listening on (\S+)")
    ws = addr(lines[1], r"ws://([^/]+)/")
    metrics = addr(lines[2], r"http://([^/]+)/metrics")
    fds = lambda: len(os.listdir(f"/proc/{taskd.pid}/fd"))
    print(f"taskd master: {fds()} descriptors at start")
    held = {"metrics": [], "ws": []}
    for _ in range(args.count):
        s = socket.create_connection(metrics); s.sendall(b"GET /metr"); held["metrics"].append(s)
        s = socket.create_connection(ws); s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        held["ws"].append(s)
    time.sleep(0.5)

    def status(kind):
        counts = {"refused 503": 0, "held": 0, "closed": 0}
        for s in held[kind]:
            s.setblocking(False)
            try:
                data = s.recv(4096)
                counts["refused 503" if data.startswith(b"HTTP/1.1 503") else "closed"] += 1
            except BlockingIOError:
                counts["held"] += 1
            except ConnectionResetError:
                counts["closed"] += 1
        return counts

    start = time.time()
    s = socket.create_connection(tcp); s.settimeout(10); s.sendall(b"stats\n")
    reply = json.loads(s.makefile().readline()); s.close()
    ms = (time.time() - start) * 1000
    print(f"{args.count} half-open to each: metrics {status('metrics')}, websocket {status('ws')}")
    print(f"stats on a new line-port connection: {reply.get('event')} in {ms:.1f} ms, "
          f"connection_num {reply.get('connection_num')}; master descriptors {fds()}")
    time.sleep(6)
    print(f"6 s later (handshake_timeout 5 s): metrics {status('metrics')}, websocket {status('ws')}; "
          f"master descriptors {fds()}")
    s = socket.create_connection(metrics); s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    print("then a scrape:", s.recv(100).split(b"\r\n")[0].decode())
finally:
    taskd.terminate(); taskd.wait()
log = open(log_path).read()
print(f'log: {log.count("Too many open files")} "Too many open files", {log.count(" WARN ")} warnings')
