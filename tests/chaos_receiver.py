#!/usr/bin/env python3
"""Misbehaving webhook receivers for pg_webhooks' soak and hostile-peer tests.

Each endpoint listens on a port of its own on 127.0.0.1 (so that one can stop listening
while the others go on) and behaves as its current mode says. Requests are parsed by hand
(raw sockets, HTTP/1.1 keep-alive, Content-Length or chunked bodies); signatures are
verified with the official `standardwebhooks` library, independently of the extension.

    python3 tests/chaos_receiver.py --endpoints a,b,c --port-file PATH

Once every listener and the control listener are bound, PATH gets (atomically) one JSON
object: {"control": port, "endpoints": {"a": port, ...}}.

Control (plain HTTP on the control port, JSON in and out):
  POST /mode    {"endpoint": "a", "mode": "...", "secret": "whsec_..." (optional)}
  GET  /log     every request received: [{"endpoint", "webhook_id", "mode", "acked",
                 "verified", "verify_error", "t"}] in arrival order; "acked" is true only when a
                 whole 2xx response was written (the sender saw it acknowledged, unless it
                 gave up first, which a prompt answer does not give it cause to).
  GET  /counts  {"endpoint": {"mode": n}} of requests and connections seen.

Modes:
  ok             answer 200 at once
  500            answer 500
  429            answer 429 with Retry-After: 1
  hang           read the request, never answer (until the sender hangs up)
  close          read the request, send half a status line and close
  trickle        answer 200 with a chunked body of one byte every 200 ms, forever
  down           not listening at all (connections refused); open connections are closed
  slow_headers   read the request, send a status line and headers one byte every 200 ms, forever
  garbage        read the request, answer bytes that are not HTTP, keep the connection open
  flood          answer 500 with a chunked body sent as fast as the sender takes it, forever
  silent         accept the connection, never read or write (a TLS handshake never finishes;
                 a request body beyond the socket buffers is never taken)
"""
import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks

LOCK = threading.Lock()
LOG = []
COUNTS = {}


class Endpoint:
    def __init__(self, name):
        self.name = name
        self.mode = "ok"
        self.secret = None
        self.port = None
        self.listener = None
        self.conns = set()
        self.changed = threading.Condition(LOCK)

    def bind(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Small buffers, so that a receiver that never reads soon stops taking a large body.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind(("127.0.0.1", self.port or 0))
        s.listen(128)
        self.port = s.getsockname()[1]
        self.listener = s
        threading.Thread(target=self.accept_loop, args=(s,), daemon=True).start()

    def accept_loop(self, s):
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return  # closed: mode "down"
            with LOCK:
                self.conns.add(conn)
                count(self.name, "connections")
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def set_mode(self, mode, secret):
        with LOCK:
            was = self.mode
            self.mode = mode
            if secret:
                self.secret = secret
            self.changed.notify_all()
            conns = list(self.conns)
        if mode == "down" and was != "down":
            # shutdown() first: a close() alone leaves the socket listening while the accept
            # thread is blocked in accept(2) on it, and the port could not be bound again.
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        elif was == "down" and mode != "down":
            # The port is ours to bind again (SO_REUSEADDR); retry briefly if the kernel lags.
            for _ in range(200):
                try:
                    self.bind()
                    break
                except OSError as e:
                    error = e
                    time.sleep(0.05)
            else:
                print("cannot listen again on %d: %s" % (self.port, error), file=sys.stderr,
                      flush=True)

    def serve(self, conn):
        try:
            with LOCK:
                mode = self.mode
            if mode == "silent":
                return hold(conn, reading=False)
            reader = conn.makefile("rb")
            while True:
                req = read_request(reader)
                if req is None:
                    return
                headers, body = req
                with LOCK:
                    mode = self.mode
                    secret = self.secret
                    count(self.name, mode)
                if mode == "down":
                    return
                verified, error = verify(secret, body, headers)
                entry = {"endpoint": self.name, "webhook_id": headers.get("webhook-id"),
                         "mode": mode, "acked": False, "verified": verified,
                         "verify_error": error}
                # Logged before answering, so that the log is in the order requests arrived
                # (a key's next delivery may come on another connection as soon as this one
                # is answered); "acked" once the whole answer is written.
                log(entry)
                if mode == "ok":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    with LOCK:
                        entry["acked"] = True
                    continue
                if mode == "500":
                    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail")
                elif mode == "429":
                    conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                                 b"Content-Length: 4\r\n\r\nslow")
                elif mode == "hang":
                    return hold(conn, reading=True)
                elif mode == "close":
                    conn.sendall(b"HTTP/1.1 20")
                    return
                elif mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    while True:
                        conn.sendall(b"1\r\nx\r\n")
                        time.sleep(0.2)
                elif mode == "slow_headers":
                    head = b"HTTP/1.1 200 OK\r\n"
                    while True:
                        for b in head:
                            conn.sendall(bytes([b]))
                            time.sleep(0.2)
                        head = b"X-Slow: yes\r\n"
                elif mode == "garbage":
                    conn.sendall(b"\x16\x03\x01 THIS IS NOT HTTP \x00\xff\r\n\r\n")
                    return hold(conn, reading=True)
                elif mode == "flood":
                    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n%s\r\n" % (8192, b"y" * 8192)
                    while True:
                        conn.sendall(chunk)
                else:
                    return
        except (OSError, ValueError):
            return
        finally:
            with LOCK:
                self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass


def hold(conn, reading):
    """Keep the connection open, answering nothing, until the peer closes it (or 10 minutes)."""
    deadline = time.time() + 600
    if not reading:
        # Never read: the peer's bytes stay in the kernel's buffers.
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                # MSG_PEEK: see whether the peer hung up without taking anything.
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return
            except BlockingIOError:
                pass
            except OSError:
                return
        return
    conn.settimeout(1.0)
    while time.time() < deadline:
        try:
            if conn.recv(65536) == b"":
                return
        except socket.timeout:
            continue
        except OSError:
            return


def read_request(reader):
    """(headers, body) of the next request, or None at the end of the connection."""
    line = reader.readline(65536)
    if not line:
        return None
    while line in (b"\r\n", b"\n"):
        line = reader.readline(65536)
        if not line:
            return None
    headers = {}
    while True:
        h = reader.readline(65536)
        if not h:
            return None
        if h in (b"\r\n", b"\n"):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(reader.read(size))
            reader.readline()
        body = b"".join(chunks)
    else:
        n = int(headers.get("content-length") or 0)
        body = reader.read(n) if n else b""
        if len(body) < n:
            return None
    return headers, body


def verify(secret, body, headers):
    if not secret:
        return None, None
    try:
        standardwebhooks.Webhook(secret).verify(body, headers, json_parse=False)
        return True, None
    except Exception as e:  # noqa: BLE001 - any failure means "not verified"
        return False, "%s: %s" % (type(e).__name__, e)


def log(entry):
    entry["t"] = time.time()
    with LOCK:
        LOG.append(entry)


def count(name, what):
    per = COUNTS.setdefault(name, {})
    per[what] = per.get(what, 0) + 1


ENDPOINTS = {}


class Control(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/log":
            with LOCK:
                return self.reply(200, list(LOG))
        if self.path == "/counts":
            with LOCK:
                return self.reply(200, json.loads(json.dumps(COUNTS)))
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            spec = json.loads(self.rfile.read(n) or b"{}")
            ep = ENDPOINTS[spec["endpoint"]]
            mode = spec.get("mode", ep.mode)
            if mode not in MODES:
                raise ValueError("unknown mode %r" % mode)
            if spec.get("secret"):
                standardwebhooks.Webhook(spec["secret"])
        except Exception as e:  # noqa: BLE001
            return self.reply(400, {"error": "%s: %s" % (type(e).__name__, e)})
        ep.set_mode(mode, spec.get("secret"))
        self.reply(200, {"ok": True})


class ControlServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up is normal
            super().handle_error(request, client_address)


MODES = {"ok", "500", "429", "hang", "close", "trickle", "down", "slow_headers", "garbage",
         "flood", "silent"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", required=True, help="comma-separated endpoint names")
    ap.add_argument("--port-file", required=True)
    args = ap.parse_args(argv)
    for name in args.endpoints.split(","):
        ep = Endpoint(name)
        ep.bind()
        ENDPOINTS[name] = ep
    server = ControlServer(("127.0.0.1", 0), Control)
    ports = {"control": server.server_address[1],
             "endpoints": {n: e.port for n, e in ENDPOINTS.items()}}
    directory = os.path.dirname(os.path.abspath(args.port_file))
    fd, tmp = tempfile.mkstemp(prefix=".chaos-port-", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
