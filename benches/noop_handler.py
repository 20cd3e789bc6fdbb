#!/usr/bin/env python3
"""The no-op handler of benches/handlers.sh: does nothing but answer, with the job's "to" (the
load generator names its jobs by it). As a user's handler would be written: json in, json out,
one line each, flushed."""
import json
import sys

for line in sys.stdin:
    msg = json.loads(line)
    print(json.dumps({"task_id": msg["task_id"], "result": {"to": msg["job"].get("to")}}), flush=True)
