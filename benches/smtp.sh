#!/usr/bin/env bash
# 1,000 emails to a local SMTP relay (Debian's aiosmtpd, tests/common/smtp_relay.py), in
# messages/s: through taskd with the seed settings (worker_num 2, task_worker_num 4, its
# pooled connections) vs one SMTP connection per message sent in sequence (what the seeds' PHP
# does), by Python's smtplib. Both in clear (?tls=none) and with STARTTLS (a test CA made by
# openssl). The relay only counts (--count-only: it parses and stores nothing), so that it is
# less of the limit: it is one Python process, on the same 2 cores as the client and taskd.
# Needs python3-aiosmtpd and openssl. Run by hand, on a quiet machine:
#   benches/smtp.sh [emails, default 1000]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
# Extra taskd flags for the taskd runs (default: none, the seed settings).
extra=(${TASKD_BENCH_ARGS:-})
# The relay's flags (SMTP_RELAY_FLAGS= for one that parses and stores every message).
relay_flags=(${SMTP_RELAY_FLAGS---count-only})
cargo build --release --bins -q
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$work" &&
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
  openssl req -newkey rsa:2048 -nodes -keyout relay.key -out relay.csr -subj /CN=127.0.0.1 2>/dev/null &&
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >relay.ext &&
  openssl x509 -req -in relay.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out relay.pem -days 2 \
    -extfile relay.ext 2>/dev/null)

start_relay() { # $@: relay flags; sets $port
  mkdir -p "$work/relay-$1"
  local dir="$work/relay-$1"; shift
  # stdin from a fifo kept open: the relay runs until killed.
  mkfifo "$dir/in"
  /usr/bin/python3 tests/common/smtp_relay.py --dir "$dir" "$@" <"$dir/in" >"$dir/out" 2>"$dir/err" &
  pids+=($!)
  exec {keep}>"$dir/in"
  for _ in $(seq 200); do grep -q '^port ' "$dir/out" 2>/dev/null && break; sleep 0.05; done
  port="$(sed -n 's/^port //p' "$dir/out")"
}

# One connection per message, in sequence.
per_message() { # $1: port, $2: starttls or clear
  python3 - "$1" "$2" "$n" "$work/ca.pem" <<'EOF'
import email.utils, smtplib, ssl, sys, time
port, mode, n, ca = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
start = time.monotonic()
for i in range(n):
    with smtplib.SMTP("127.0.0.1", port) as s:
        if mode == "starttls":
            s.starttls(context=ctx)
        # The headers taskd's email has: the relay parses as much.
        s.sendmail("noreply@shop.test", ["user%d@example.com" % i],
                   ("From: Shop <noreply@shop.test>\r\nTo: user%d@example.com\r\nSubject: Order %d\r\n"
                    "Message-ID: <seq.%d@shop.test>\r\nDate: %s\r\n"
                    "Content-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: 7bit\r\n"
                    "\r\nThanks!\r\n") % (i, i, i, email.utils.formatdate(usegmt=True)))
took = time.monotonic() - start
print("%d emails in %.2f s: %.0f messages/s" % (n, took, n / took))
EOF
}

# Through taskd: every job sent at once on one connection, until the last done.
through_taskd() { # $1: smtp url, rest: taskd flags
  local url="$1"; shift
  target/release/taskd --port 0 --outbox "$work/outbox.log" --log-level warn --smtp-url "$url" \
    --mail-from 'Shop <noreply@shop.test>' "$@" "${extra[@]}" >"$work/taskd.out" 2>"$work/taskd.log" &
  local taskd=$!
  pids+=($taskd)
  for _ in $(seq 200); do grep -q 'listening on' "$work/taskd.out" 2>/dev/null && break; sleep 0.05; done
  local addr; addr="$(grep -o '127.0.0.1:[0-9]*' "$work/taskd.out" | head -1)"
  python3 - "$addr" "$n" <<'EOF'
import json, socket, sys, time
host, port = sys.argv[1].split(":")
n = int(sys.argv[2])
s = socket.create_connection((host, int(port)))
lines = b"".join(json.dumps({"type": "email", "to": "user%d@example.com" % i, "subject": "Order %d" % i,
                              "body": "Thanks!"}).encode() + b"\n" for i in range(n))
start = time.monotonic()
s.sendall(lines)
f = s.makefile("rb")
done = failed = 0
while done + failed < n:
    event = json.loads(f.readline())["event"]
    done += event == "done"
    failed += event == "failed"
took = time.monotonic() - start
print("%d emails in %.2f s: %.0f messages/s (%d failed)" % (n, took, n / took, failed))
EOF
  kill "$taskd"; wait "$taskd" 2>/dev/null || true
}

start_relay clear "${relay_flags[@]}"
echo "in clear (?tls=none), aiosmtpd relay on 127.0.0.1:$port"
echo -n "  one connection per message, in sequence (smtplib): "; per_message "$port" clear
echo -n "  taskd, seed settings (2 workers, 4 task processes): "
through_taskd "smtp://127.0.0.1:$port?tls=none"
start_relay tls "${relay_flags[@]}" --cert "$work/relay.pem" --key "$work/relay.key"
echo "STARTTLS, aiosmtpd relay on 127.0.0.1:$port"
echo -n "  one connection per message, in sequence (smtplib): "; per_message "$port" starttls
echo -n "  taskd, seed settings (2 workers, 4 task processes): "
through_taskd "smtp://127.0.0.1:$port" --smtp-ca-file "$work/ca.pem"
