#!/usr/bin/env python3
"""A settlement receiver written apart from the gateway, with Python's
standard library only, and strict the way downstream systems are.

It is the independent check of issue 15: `onecard sink-sim` shares the
gateway's code and accepted what a strict server refuses. This one:

- serves HTTPS (the `ssl` module) with HTTP/1.1 keep-alive;
- routes on the request target exactly as `http.server` gives it, so an
  absolute-form target (`POST https://host:port/v1/batches`) is not
  `/v1/batches` and gets 404, as it did at the receiver that found the
  defect; a request without `Host` is 400 (RFC 9112 section 3.2);
- checks the `X-Onecard-Signature` HMAC-SHA256 over the exact body, and
  that `count` and `total_fen` add up over the events;
- books a batch once (the same id again gets the same acknowledgement),
  appending it to a ledger file that is fsynced before the answer;
- refuses, with 422 and nothing booked, a batch that charges an auth_id
  it has booked before under another batch id, or that carries a reversal
  of a charge it has not booked: a refund of money it never received.

Usage: strict_receiver.py --cert C --key K --hmac-key S --ledger L
       --port-file P [--lifetime-s N]
It listens on 127.0.0.1 on a port the OS picks, writes that port to P once
it is listening, and stops by itself after --lifetime-s (default 600).
"""

import argparse
import hashlib
import hmac
import http.server
import json
import os
import ssl
import sys
import threading


class Ledger:
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.acks = {}  # batch_id -> ack
        self.charged = set()  # auth_ids booked as charges
        self.reversed = set()  # auth_ids of charges given back
        self.totals = {"batches": 0, "events": 0, "total_fen": 0, "reversals": 0}
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f.read().split(b"\n"):
                    if line.strip():
                        self._apply(json.loads(line))
        self.file = open(path, "ab")

    def _apply(self, booked):
        ack = booked["ack"]
        self.acks[ack["batch_id"]] = ack
        self.totals["batches"] += 1
        self.totals["events"] += ack["count"]
        self.totals["total_fen"] += ack["total_fen"]
        for e in booked["events"]:
            if e.get("type") == "reversal":
                self.reversed.add(e["reverses"])
                self.totals["reversals"] += 1
            elif e.get("type") == "charge":
                self.charged.add(e["auth_id"])

    def book(self, doc):
        """Returns (status, answer)."""
        with self.lock:
            known = self.acks.get(doc["batch_id"])
            if known is not None:
                return 200, known
            seen = set()
            for e in doc["events"]:
                kind = e.get("type")
                if kind == "charge":
                    auth = e["auth_id"]
                    if auth in self.charged or auth in seen:
                        return 422, error("DUPLICATE_CHARGE", "a charge booked before")
                    seen.add(auth)
                elif kind == "reversal":
                    target = e.get("reverses")
                    if target not in self.charged or target in self.reversed:
                        return 422, error(
                            "UNKNOWN_CHARGE",
                            "a reversal of a charge this receiver has not booked",
                        )
            ack = {
                "batch_id": doc["batch_id"],
                "count": doc["count"],
                "total_fen": doc["total_fen"],
            }
            booked = {"ack": ack, "events": doc["events"]}
            self.file.write(json.dumps(booked, separators=(",", ":")).encode() + b"\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self._apply(booked)
            return 200, ack


def error(code, message):
    return {"error": {"code": code, "message": message}}


def handler_for(ledger, key):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, doc):
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/v1/ledger":
                return self.answer(404, error("NOT_FOUND", "no such resource"))
            with ledger.lock:
                return self.answer(200, dict(ledger.totals))

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path != "/v1/batches":
                return self.answer(404, error("NOT_FOUND", "no such resource"))
            if not self.headers.get("Host"):
                return self.answer(400, error("INVALID_REQUEST", "HTTP/1.1 needs Host"))
            sig = self.headers.get("X-Onecard-Signature", "")
            want = "hmac-sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(sig, want):
                return self.answer(401, error("INVALID_SIGNATURE", "bad signature"))
            try:
                doc = json.loads(body)
                events = doc["events"]
                ok = doc["count"] == len(events) and doc["total_fen"] == sum(
                    e["amount_fen"] for e in events
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                return self.answer(400, error("INVALID_REQUEST", "not a batch that adds up"))
            if self.headers.get("Idempotency-Key") != doc["batch_id"]:
                return self.answer(400, error("INVALID_REQUEST", "Idempotency-Key is not the batch id"))
            status, doc = ledger.book(doc)
            return self.answer(status, doc)

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--hmac-key", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--lifetime-s", type=float, default=600)
    a = p.parse_args()
    ledger = Ledger(a.ledger)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), handler_for(ledger, a.hmac_key.encode())
    )
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["http/1.1"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, a.port_file)
    threading.Timer(a.lifetime_s, server.shutdown).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
