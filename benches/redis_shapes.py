#!/usr/bin/env python3
"""What Redis's CPU per job would be for other shapes of the job stream: a model of Redis's side
alone, not taskd, to choose a design before building it (issue 21: several jobs per entry).

A raw-RESP client against a fresh redis-server of its own (AOF everysec, no rewrite, no RDB),
in rounds of B jobs (default 64), each round as taskd's durable path does it: the jobs stored,
one read by a consumer, the outcomes' script and the acknowledgement in one MULTI; every 16
rounds the streams trimmed. What is measured is redis-server's user + system CPU over the run
(/proc), divided by the jobs: the client's own speed does not enter it.

Shapes:
  entry       one entry per job, the five fields taskd writes (o t s w d); read with a PEL
  entry2      the same with two fields (the metadata in one)
  noack       one entry per job, read NOACK; the batch held by one HSET of its id range
  packfields  B jobs per entry, each job's five fields laid end to end in it
  pack        B jobs per entry in one field (length-prefixed jobs in one value)

  benches/redis_shapes.py [--jobs N] [--batch B] [--repeat R] [SHAPE ...]
Needs redis-server. Takes about 10 s per shape and repeat at 64,000 jobs.
"""
import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

SHAPES = ["entry", "entry2", "noack", "packfields", "pack"]
DATA = b'{"type":"email","to":"user@example.com","subject":"hello","body":"' + b"x" * 120 + b'"}'
# The outcomes' script as taskd's (one reply entry per origin, the batch in one field).
OUTCOMES = "if redis.call('EXISTS', KEYS[2]) >= 0 then return redis.call('XADD', KEYS[1], '*', 'b', ARGV[1]) end"
PACK_END = """if redis.call('XACK', KEYS[1], 'g', ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'b', ARGV[2]); return 1"""
LEASE_END = "redis.call('HDEL', KEYS[2], ARGV[1]); redis.call('XADD', KEYS[3], '*', 'b', ARGV[2]); return 1"


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def _fill(self):
        got = self.sock.recv(1 << 20)
        if not got:
            raise ConnectionError("redis-server closed the connection")
        self.buf += got

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in b"+:":
            return rest
        n = int(rest)
        if n < 0:
            return None
        if kind == b"$":
            while len(self.buf) < n + 2:
                self._fill()
            value, self.buf = self.buf[:n], self.buf[n + 2:]
            return value
        return [self._read() for _ in range(n)]

    def pipe(self, cmds):
        self.sock.sendall(b"".join(cmds))
        return [self._read() for _ in cmds]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_fields(shape, task_id):
    if shape == "entry2":
        return ["o", b"web1 %d %d 0" % (task_id, task_id), "d", DATA]
    return ["o", "web1", "t", task_id, "s", task_id, "w", 0, "d", DATA]


def run(shape, jobs, batch):
    work = tempfile.mkdtemp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", work, "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--auto-aof-rewrite-percentage", "0"],
        stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                r = Conn(port)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        r.pipe([enc("XGROUP", "CREATE", "s", "g", "$", "MKSTREAM")])
        outcomes = b"y" * (40 * batch)
        rounds = jobs // batch
        task_id = 0
        before = cpu_seconds(server.pid)
        for k in range(rounds):
            if shape in ("pack", "packfields"):
                fields = []
                for _ in range(batch):
                    task_id += 1
                    fields += job_fields(shape, task_id)
                if shape == "pack":
                    parts = [f if isinstance(f, bytes) else str(f).encode() for f in fields]
                    fields = ["p", b"".join(b"%d:%s" % (len(p), p) for p in parts)]
                r.pipe([enc("XADD", "s", "*", *fields)])
                got = r.pipe([enc("XREADGROUP", "GROUP", "g", "c1", "COUNT", 1, "STREAMS", "s", ">")])[0]
                r.pipe([enc("EVAL", PACK_END, 2, "s", "r:web1", got[0][1][0][0], outcomes)])
            else:
                r.pipe([enc("XADD", "s", "*", *job_fields(shape, task_id + i + 1)) for i in range(batch)])
                task_id += batch
                if shape == "noack":
                    got = r.pipe([enc("XREADGROUP", "GROUP", "g", "c1", "COUNT", batch, "NOACK", "STREAMS", "s", ">")])[0]
                    first, last = got[0][1][0][0], got[0][1][-1][0]
                    r.pipe([enc("HSET", "held", first, last)])
                    r.pipe([enc("EVAL", LEASE_END, 3, "s", "held", "r:web1", first, outcomes)])
                else:
                    got = r.pipe([enc("XREADGROUP", "GROUP", "g", "c1", "COUNT", batch, "STREAMS", "s", ">")])[0]
                    ids = [e[0] for e in got[0][1]]
                    r.pipe([enc("MULTI"), enc("EVAL", OUTCOMES, 2, "r:web1", "x", outcomes),
                            enc("XACK", "s", "g", *ids), enc("EXEC")])
            if k % 16 == 15:
                r.pipe([enc("XTRIM", "s", "MAXLEN", "~", 1000), enc("XTRIM", "r:web1", "MAXLEN", "~", 100)])
        return (cpu_seconds(server.pid) - before) / (rounds * batch) * 1e6
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=64000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("shapes", nargs="*", metavar="SHAPE", help=" ".join(SHAPES) + " (default: all)")
    a = ap.parse_args()
    a.shapes = a.shapes or SHAPES
    unknown = [s for s in a.shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]}: one of {' '.join(SHAPES)}")
    results = {s: [] for s in a.shapes}
    # Alternated shape by shape: a busy moment of the machine falls on all of them.
    for _ in range(a.repeat):
        for s in a.shapes:
            results[s].append(run(s, a.jobs, a.batch))
    for s, v in results.items():
        print(f"{s:11} {min(v):6.2f}-{max(v):6.2f} us of redis-server CPU per job "
              f"({a.jobs} jobs, {a.batch} per round)")


if __name__ == "__main__":
    main()
