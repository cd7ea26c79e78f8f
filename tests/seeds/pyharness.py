"""Plumbing shared by the Flask seed receivers (tests/seeds.rs starts them): serve on a free
port of 127.0.0.1 only, write "<hook port> <log port>" to the file named by argv[1], keep a log
of every request and the status answered, served by GET /_log on the second port. The
receivers' handlers, in the seed files, are the documents' code."""
import json
import logging
import os
import signal
import sys
import threading

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

# The request log is ours (GET /_log); werkzeug's line per request is noise in test output.
logging.getLogger("werkzeug").setLevel(logging.ERROR)

LOG = []
_lock = threading.Lock()


def record(app, name):
    @app.after_request
    def _after(response):
        with _lock:
            LOG.append({
                "receiver": name,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "raw": request.get_data(as_text=True),
                "status": response.status_code,
                "reply": response.get_data(as_text=True),
            })
        return response


def serve(app):
    control = Flask("control")

    @control.get("/_log")
    def _log():
        with _lock:
            return jsonify(LOG)

    hooks = make_server("127.0.0.1", 0, app, threaded=True)
    ctl = make_server("127.0.0.1", 0, control, threaded=True)
    path = sys.argv[1]
    with open(path + ".tmp", "w") as f:
        f.write(f"{hooks.server_port} {ctl.server_port}")
    os.rename(path + ".tmp", path)
    print(f"listening on 127.0.0.1: {hooks.server_port} {ctl.server_port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=ctl.serve_forever, daemon=True).start()
    hooks.serve_forever()
