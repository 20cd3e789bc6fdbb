#!/usr/bin/python3
"""A real SMTP relay for the tests (Debian's python3-aiosmtpd, for Debian's /usr/bin/python3).

    smtp_relay.py --dir DIR [--cert CERT --key KEY [--implicit]] [--auth USER:PASS] [--idle-timeout S]
                  [--count-only] [--port N]

Listens on 127.0.0.1 (a port of its choice), prints `port N` on stdout once it accepts, and
appends one JSON line per message that reached DATA to DIR/messages.jsonl: envelope, every
header (Message-ID among them), body, whether the session was under TLS and who logged in,
and how it was answered. With --cert/--key it offers STARTTLS (--implicit: TLS from the first
byte, as smtps://); with --auth it offers AUTH (PLAIN, LOGIN; only under TLS) and accepts only
USER:PASS.

Scripted answers, by the recipient's local part:
  temp421-…   421 at RCPT (the relay closes the connection)
  temp451-…   451 at RCPT
  grey-…      451 at RCPT the first time this address is seen, accepted after (greylisting)
  perm550-…   550 at RCPT, "5.1.1 mailbox unavailable: no such user here"
  hold-…      the first message with a given Message-ID is recorded ("held") and not answered
              until DIR/release exists; every later one is accepted at once
Everyone else: 250 Ok: queued as N.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Relay:
    def __init__(self, directory, count_only=False):
        self.dir = directory
        self.count_only = count_only
        self.count = 0
        self.held_ids = set()
        self.greylisted = set()

    def record(self, server, session, envelope, message, outcome):
        body = message.get_body(preferencelist=("plain",))
        transport = server.transport
        auth = getattr(session, "auth_data", None)
        entry = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "message_id": message.get("Message-ID"),
            "subject": message.get("Subject"),
            "from": message.get("From"),
            "to": message.get("To"),
            "headers": {k: str(v) for k, v in message.items()},
            "body": body.get_content() if body is not None else None,
            "tls": transport is not None and transport.get_extra_info("ssl_object") is not None,
            "login": auth.login.decode() if isinstance(auth, LoginPassword) else None,
            "outcome": outcome,
            "peer": list(session.peer) if session.peer else None,
            "at": time.time(),
        }
        with open(os.path.join(self.dir, "messages.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def refusals(self, address, answer):
        with open(os.path.join(self.dir, "refused.jsonl"), "a") as f:
            f.write(json.dumps({"rcpt": address, "answer": answer, "at": time.time()}) + "\n")

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0]
        for prefix, answer in (
            ("temp421-", "421 4.3.2 Service not available, closing channel"),
            ("temp451-", "451 4.3.0 Try again later: greylisted"),
            ("perm550-", "550 5.1.1 mailbox unavailable: no such user here"),
        ):
            if local.startswith(prefix):
                self.refusals(address, answer)
                return answer
        if local.startswith("grey-") and address not in self.greylisted:
            self.greylisted.add(address)
            answer = "451 4.7.1 Greylisted, try again later"
            self.refusals(address, answer)
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.count_only:
            self.count += 1
            return "250 2.0.0 Ok: queued as Q%d" % self.count
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        message_id = message.get("Message-ID")
        if any(r.split("@", 1)[0].startswith("hold-") for r in envelope.rcpt_tos) and message_id not in self.held_ids:
            self.held_ids.add(message_id)
            self.record(server, session, envelope, message, "held")
            release = os.path.join(self.dir, "release")
            deadline = time.time() + 120
            while not os.path.exists(release) and time.time() < deadline:
                if server.transport is None or server.transport.is_closing():
                    # The client is gone (killed mid-send): nothing to answer.
                    return "421 4.4.2 gone"
                await asyncio.sleep(0.05)
        self.count += 1
        answer = "250 2.0.0 Ok: queued as Q%d" % self.count
        self.record(server, session, envelope, message, answer)
        return answer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--auth")
    parser.add_argument("--count-only", action="store_true", help="answer without parsing or storing (benches)")
    parser.add_argument("--idle-timeout", type=float, help="close a connection idle this many seconds (421)")
    parser.add_argument("--port", type=int, default=0, help="listen on this port (0: a free one)")
    args = parser.parse_args()

    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    kwargs = {}
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user \
                and auth_data.password.decode() == password
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        kwargs["authenticator"] = authenticator
        kwargs["auth_require_tls"] = True
        kwargs["auth_required"] = True
    if context is not None and args.implicit:
        kwargs["ssl_context"] = context
    elif context is not None:
        kwargs["tls_context"] = context

    if args.idle_timeout:
        kwargs["timeout"] = args.idle_timeout
    relay = Relay(args.dir, args.count_only)
    # Port 0 is not taken by aiosmtpd's readiness check: find a free port first.
    import socket
    port = args.port
    if port == 0:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
    controller = Controller(relay, hostname="127.0.0.1", port=port, server_hostname="relay.test", **kwargs)
    controller.start()
    print("port %d" % port, flush=True)
    try:
        # Until the test closes stdin (or kills it).
        sys.stdin.read()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
