#!/usr/bin/env python3
"""Submits one job to taskd and prints its replies until the final one.

    python3 examples/clients/submit.py [HOST:PORT] [JOB_JSON]
"""
import json
import socket
import sys

addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9501"
job = sys.argv[2] if len(sys.argv) > 2 else '{"type":"wordcount","text":"hello from python"}'
host, port = addr.rsplit(":", 1)

with socket.create_connection((host, int(port))) as sock:
    sock.sendall(job.encode() + b"\n")                 # one request per line
    for line in sock.makefile(encoding="utf-8"):       # one reply per line
        print(line, end="")
        reply = json.loads(line)
        if reply["event"] in ("done", "failed", "cancelled", "error"):
            break                                      # accepted, [retrying…], then the final one
