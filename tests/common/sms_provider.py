#!/usr/bin/env python3
"""A stand-in for an SMS provider's HTTP API, for tests/delivery_sms.rs.

Usage: sms_provider.py RECORD_FILE SCRIPT_JSON

Prints "listening PORT" on stdout once it listens on 127.0.0.1 (an ephemeral port). Each
request is appended to RECORD_FILE as one JSON line (method, path, headers with lowercase
names, body) before it is answered. SCRIPT_JSON maps a recipient number (the form's `To` or the
JSON's `to`) to a list of answers, used in turn (the last one repeats):
  {"status": 429, "retry_after": "2", "body": "..."}   an answer
  {"hold": true}                                        no answer until POST /_release
Any other recipient gets 200 with {"sid": "SM…"} to a form, {"id": "msg-…"} to JSON.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

RECORD, SCRIPT = sys.argv[1], json.loads(sys.argv[2])
lock = threading.Lock()
released = threading.Event()
counter = {"n": 0, "seen": {}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=()):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        if self.path == "/_release":
            released.set()
            return self.answer(200, "{}")
        headers = {k.lower(): v for k, v in self.headers.items()}
        is_json = headers.get("content-type", "").startswith("application/json")
        if is_json:
            to = json.loads(body).get("to", "")
        else:
            to = parse_qs(body).get("To", [""])[0]
        with lock:
            counter["n"] += 1
            n = counter["n"]
            turn = counter["seen"].get(to, 0)
            counter["seen"][to] = turn + 1
            with open(RECORD, "a") as f:
                f.write(json.dumps({"method": self.command, "path": self.path, "headers": headers, "body": body}) + "\n")
        answers = SCRIPT.get(to, [])
        step = answers[min(turn, len(answers) - 1)] if answers else {}
        if step.get("hold"):
            released.wait(120)
            step = {}
        if "status" in step:
            extra = [("Retry-After", step["retry_after"])] if "retry_after" in step else []
            return self.answer(step["status"], step.get("body", ""), extra)
        if is_json:
            return self.answer(202, json.dumps({"id": f"msg-{n}", "status": "accepted"}))
        return self.answer(201, json.dumps({"sid": f"SM{n:032x}", "status": "queued"}))


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
