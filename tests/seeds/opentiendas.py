"""Seed 001 (OpenTiendas, ../shared/seeds/001_*.txt and its Security Guide and Sample Code
pages: "The signature is included in the X-Signature header: X-Signature: sha256=HASH", the
whole raw body signed, HMAC SHA256 with the webhook's secret), envelope {"event_id" (UUID),
"type", "created_at" (ISO 8601), "data"}, events order.canceled, order.created,
order.fulfilled, order.paid.
Usage: python3 opentiendas.py PORT_FILE   (secret in SEED_SECRET)"""
import json
import os
import re
from datetime import datetime

from flask import Flask, request

from pyharness import record, serve

app = Flask(__name__)
record(app, "opentiendas")
SECRET = os.environ["SEED_SECRET"].encode()

# The Sample Code page's code, as written:
import hmac
import hashlib
def is_valid_signature(secret, payload, signature):
    expected_signature = "sha256=" + hmac.new(secret, payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected_signature, signature)
# (end of the document's code)

EVENTS = {"order.canceled", "order.created", "order.fulfilled", "order.paid"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@app.post("/opentiendas")
def webhook():
    payload = request.get_data()
    if not is_valid_signature(SECRET, payload, request.headers.get("X-Signature", "")):
        return "Invalid signature. Ignoring.", 401
    e = json.loads(payload)
    p = []
    if not UUID.match(str(e.get("event_id"))):
        p.append(f"event_id must be a UUID: {e.get('event_id')}")
    if e.get("type") not in EVENTS:
        p.append(f"unknown type {e.get('type')}")
    try:
        datetime.fromisoformat(str(e.get("created_at")).replace("Z", "+00:00"))
    except ValueError:
        p.append(f"created_at must be ISO 8601: {e.get('created_at')}")
    d = e.get("data")
    if not isinstance(d, dict) or not isinstance(d.get("id"), int):
        p.append("data must be the order, with its id")
    if p:
        return "; ".join(p), 400
    return "ok", 200


if __name__ == "__main__":
    serve(app)
