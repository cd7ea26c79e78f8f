#!/usr/bin/env python3
"""Webhook receiver for pg_webhooks end-to-end tests and the demo.

Verifies signatures independently of the extension: Standard Webhooks via the
official `standardwebhooks` library, hex style via Python's hmac/hashlib.
Listens on 127.0.0.1 only.

    python3 tests/receiver.py [--port N] [--port-file PATH] [--quiet]
                              [--tls-cert PEM --tls-key PEM --tls-port-file PATH
                               [--tls-client-ca PEM]]

--port 0 (default) picks a free port. Once bound, the port number is written to
--port-file (atomically: temp file + rename) and `listening on 127.0.0.1:PORT`
is printed to stdout. SIGTERM / SIGINT exit cleanly with status 0.

With --tls-cert and --tls-key, a second listener on another free port of 127.0.0.1
serves the same deliveries over HTTPS with that certificate (its port is written
to --tls-port-file); the control API and the log stay on the plain port, and
failed TLS handshakes are listed by GET /_tls_log. With --tls-client-ca, that listener
requires a client certificate issued by that CA (ssl.CERT_REQUIRED): a client without
one, or with another, is refused in the handshake. Each delivery's log entry then has
"client_subject", the verified client certificate's subject (commonName), or null.

Control API (JSON in and out):

  POST /_control/endpoint  {"path": "/hooks/a",            required, exact match
                            "secret": "whsec_...",         enables verification
                            "style": "standard" | "hex",   default "standard"
                            "header": "X-Webhook-Signature",  hex style only
                            "responses": [500, 500, 200],  consumed one per request
                            "default_status": 200,         once responses run out
                            "delay_ms": 0,                 sleep before answering
                            "retry_after": null | "2" | "<http date>",
                                                           Retry-After on 429/503
                            "body": "ok"}                  response body text
      Replaces any earlier config for the path (its log is kept). -> {"ok": true}
  POST /_control/reset     clears all configs and the log. -> {"ok": true}
  GET  /_log[?path=/p]     JSON array of received requests in arrival order:
      {"seq" (1-based, restarts after reset), "method", "path" (no query),
       "target" (raw request target, with query), "received_at", "headers" (lower-cased names),
       "body" (text), "json" (parsed or null), "status" (what we answer),
       "verified" (true/false, null if no secret), "verify_error" (null or text)}
  GET  /_count[?path=/p]   -> {"n": how many requests /_log would list}
  GET  /_health            -> {"ok": true}
  GET  /_tls_log           JSON array of failed TLS handshakes: {"error": text}

Any other POST/PUT/PATCH is a webhook delivery: the body is read raw, verified,
logged (before the response is sent, and before delay_ms), then answered with
the next configured status (200 for unconfigured paths).
"""
import argparse
import hashlib
import hmac
import json
import os
import signal
import ssl
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import standardwebhooks

LOCK = threading.Lock()
CONFIGS = {}  # path -> config dict (with its own mutable "responses" list)
LOG = []
TLS_LOG = []  # failed TLS handshakes of the HTTPS listener


def make_config(spec):
    """Validate a control-API endpoint spec; raises ValueError on bad input."""
    path = spec.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("'path' must be a string starting with '/'")
    style = spec.get("style") or "standard"
    if style not in ("standard", "hex"):
        raise ValueError("'style' must be 'standard' or 'hex'")
    secret = spec.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ValueError("'secret' must be a non-empty string")
    if secret is not None and style == "standard":
        standardwebhooks.Webhook(secret)  # reject undecodable secrets up front
    responses = spec.get("responses") or []
    if not all(isinstance(s, int) and 100 <= s <= 599 for s in responses):
        raise ValueError("'responses' must be a list of HTTP status codes")
    default_status = int(spec.get("default_status", 200))
    if not 100 <= default_status <= 599:
        raise ValueError("'default_status' must be an HTTP status code")
    retry_after = spec.get("retry_after")
    return {
        "path": path,
        "secret": secret,
        "style": style,
        "header": (spec.get("header") or "X-Webhook-Signature").lower(),
        "responses": list(responses),
        "default_status": default_status,
        "delay_ms": max(0, int(spec.get("delay_ms") or 0)),
        "retry_after": None if retry_after is None else str(retry_after),
        "body": "ok" if spec.get("body") is None else str(spec["body"]),
    }


def verify(cfg, raw, headers):
    """Return (verified, error): (None, None) when no secret is configured."""
    if not cfg or not cfg["secret"]:
        return None, None
    try:
        if cfg["style"] == "standard":
            standardwebhooks.Webhook(cfg["secret"]).verify(raw, headers, json_parse=False)
            return True, None
        got = headers.get(cfg["header"])
        if got is None:
            return False, "missing header %s" % cfg["header"]
        want = hmac.new(cfg["secret"].encode("utf-8"), raw, hashlib.sha256).hexdigest()
        if hmac.compare_digest(want.encode(), got.strip().encode("utf-8", "replace")):
            return True, None
        return False, "hex signature mismatch"
    except Exception as e:  # noqa: BLE001 - any failure means "not verified"
        return False, "%s: %s" % (type(e).__name__, e)


def client_subject(conn):
    """The commonName of the verified client certificate of a TLS connection, or None."""
    try:
        cert = conn.getpeercert()
    except (AttributeError, ValueError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The status line and headers, then the body, are separate writes: with Nagle's algorithm
    # the body waits for the client's delayed ACK (40 ms a request on a keep-alive connection).
    # Web servers set TCP_NODELAY (nginx, Node, gunicorn); so does this one.
    disable_nagle_algorithm = True
    server_version = "pg_webhooks-test-receiver"
    quiet = True

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def read_body(self):
        """The body, or None when the client went away before sending all of it (a worker
        killed between a request's headers and its body): a web server drops such a request
        unhandled, and so does this one (it is neither answered nor logged)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line.strip():
                    return None
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    return b"".join(chunks)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    return None
                chunks.append(chunk)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        return body if len(body) == length else None

    def reply(self, status, body, content_type="application/json", extra=()):
        data = body if isinstance(body, bytes) else body.encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client gave up (e.g. timed out)

    def reply_json(self, status, obj):
        self.reply(status, json.dumps(obj))

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/_health":
            return self.reply_json(200, {"ok": True})
        if url.path in ("/_log", "/_count"):
            only = parse_qs(url.query).get("path", [None])[0]
            with LOCK:
                entries = [e for e in LOG if only is None or e["path"] == only]
                return self.reply_json(200, entries if url.path == "/_log" else {"n": len(entries)})
        if url.path == "/_tls_log":
            with LOCK:
                return self.reply_json(200, list(TLS_LOG))
        self.reply_json(404, {"error": "not found"})

    def do_POST(self):
        raw = self.read_body()
        if raw is None:
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        if path == "/_control/reset":
            with LOCK:
                CONFIGS.clear()
                LOG.clear()
            return self.reply_json(200, {"ok": True})
        if path == "/_control/endpoint":
            try:
                spec = json.loads(raw or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("body must be a JSON object")
                cfg = make_config(spec)
            except Exception as e:  # noqa: BLE001
                return self.reply_json(400, {"error": "%s: %s" % (type(e).__name__, e)})
            with LOCK:
                CONFIGS[cfg["path"]] = cfg
            return self.reply_json(200, {"ok": True})
        self.deliver(path, raw)

    do_PUT = do_PATCH = do_POST

    def deliver(self, path, raw):
        received_at = time.time()
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = headers[name] + ", " + value if name in headers else value
        text = raw.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        with LOCK:  # one critical section: lookup, verify, pick status, log
            cfg = CONFIGS.get(path)
            verified, error = verify(cfg, raw, headers)
            status = 200
            if cfg:
                status = cfg["responses"].pop(0) if cfg["responses"] else cfg["default_status"]
            LOG.append({
                "seq": len(LOG) + 1, "method": self.command, "path": path, "target": self.path,
                "received_at": received_at, "headers": headers, "body": text,
                "json": parsed, "status": status, "verified": verified,
                "verify_error": error, "client_subject": client_subject(self.connection),
            })
        extra = []
        if cfg and cfg["retry_after"] is not None and status in (429, 503):
            extra.append(("Retry-After", cfg["retry_after"]))
        if cfg and cfg["delay_ms"]:
            time.sleep(cfg["delay_ms"] / 1000.0)
        self.reply(status, cfg["body"] if cfg else "ok", "text/plain; charset=utf-8", extra)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog; the default of 5 is small for bursts

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up is normal
            super().handle_error(request, client_address)


class TlsServer(Server):
    """The HTTPS listener: each connection is wrapped in TLS, the handshake done on the
    connection's own thread so that a client refusing the certificate stalls nobody."""

    context = None

    def process_request_thread(self, request, client_address):
        # A second descriptor of the connection: wrap_socket closes its own when the
        # handshake fails, and this one keeps the connection open for a lingering close.
        raw = request.dup()
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with LOCK:
                TLS_LOG.append({"error": str(e)})
            # A lingering close, as web servers do: with TLS 1.3 the client may already have
            # sent its request when the handshake fails here, and closing with it unread would
            # reset the connection, the alert just sent lost with it. Read until the client
            # hangs up (it does once it reads the alert), for a few seconds at most.
            try:
                raw.settimeout(5)
                while raw.recv(65536):
                    pass
            except OSError:
                pass
            raw.close()
            self.shutdown_request(request)
            return
        raw.close()
        super().process_request_thread(tls, client_address)


def write_port_file(path, port):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".receiver-port-", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write("%d\n" % port)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port to bind (0 = pick a free one)")
    ap.add_argument("--port-file", help="write the bound port here (atomically)")
    ap.add_argument("--quiet", action="store_true", help="no per-request logging")
    ap.add_argument("--tls-cert", help="PEM certificate of a second, HTTPS listener")
    ap.add_argument("--tls-key", help="PEM private key of the HTTPS listener")
    ap.add_argument("--tls-port-file", help="write the HTTPS listener's port here")
    ap.add_argument("--tls-client-ca", help="PEM CA: the HTTPS listener requires client certificates it issued")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")

    Handler.quiet = args.quiet
    server = Server(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.tls_client_ca)
        tls_server = TlsServer(("127.0.0.1", 0), Handler)
        tls_server.context = context
        threading.Thread(target=tls_server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        tls_port = tls_server.server_address[1]
        if args.tls_port_file:
            write_port_file(args.tls_port_file, tls_port)
        print("listening on https://127.0.0.1:%d" % tls_port, flush=True)
    if args.port_file:
        write_port_file(args.port_file, port)
    print("listening on 127.0.0.1:%d" % port, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
