"""Seed 002 (order status webhooks, ../shared/seeds/002_*.txt), the document's Flask receiver:
it verifies X-Webhook-Signature over the raw body, request.get_data(as_text=True).
Usage: python3 status_flask.py PORT_FILE   (secret in SEED_SECRET)"""
import json
import os
import re

from flask import Flask, request

from pyharness import record, serve

app = Flask(__name__)
record(app, "status-flask")
SECRET = os.environ["SEED_SECRET"]

# The document's code, as written (its 'your_secret_key' is SECRET here):
import hmac, hashlib
def verify_webhook(body, signature, secret):
    expected = hmac.new(
        secret.encode('utf-8'),
        body.encode('utf-8'),
        hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, signature)
# Usage in Flask
@app.route('/webhook', methods=['POST'])
def handle_webhook():
    signature = request.headers.get('X-Webhook-Signature')
    if not verify_webhook(
        request.get_data(as_text=True),
        signature or '',
        SECRET
    ):
        return 'Invalid', 401
    # Process the webhook...
    problems = check(json.loads(request.get_data(as_text=True)), request.headers)
    if problems:
        return "; ".join(problems), 400
    return "ok", 200
# (end of the document's code)

ISO_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")


def check(b, headers):
    """What the document's payload example and header list promise (as status_check.js)."""
    p = []
    if b.get("event") != "order.status_updated":
        p.append(f"event {b.get('event')}")
    if headers.get("X-Webhook-Event") != "order.status_updated":
        p.append(f"X-Webhook-Event header {headers.get('X-Webhook-Event')}")
    if not ISO_OFFSET.match(b.get("timestamp") or ""):
        p.append(f"timestamp must be ISO 8601 with offset: {b.get('timestamp')}")
    o = b.get("order") or {}
    for k in ("reference", "old_status", "new_status", "currency"):
        if not isinstance(o.get(k), str):
            p.append(f"order.{k}")
    if o.get("old_status") == o.get("new_status"):
        p.append("old_status equals new_status")
    if not isinstance(o.get("amount"), (int, float)) or isinstance(o.get("amount"), bool):
        p.append("order.amount must be a number")
    if not ISO_OFFSET.match(o.get("created_at") or ""):
        p.append(f"order.created_at must be ISO 8601 with offset: {o.get('created_at')}")
    if "tracking_number" not in o or "delivery_notes" not in o:
        p.append("order.tracking_number and delivery_notes must be present")
    c = b.get("customer") or {}
    for k in ("name", "phone", "city", "address"):
        if not isinstance(c.get(k), str):
            p.append(f"customer.{k}")
    pr = b.get("product") or {}
    if not isinstance(pr.get("name"), str) or not isinstance(pr.get("sku"), str):
        p.append("product.name and product.sku")
    items = b.get("items")
    if not isinstance(items, list) or not items:
        p.append("items")
    for it in items or []:
        if not (isinstance(it.get("product_name"), str) and isinstance(it.get("sku"), str)
                and isinstance(it.get("quantity"), int) and isinstance(it.get("price"), (int, float))):
            p.append(f"item {json.dumps(it)}")
    return p


if __name__ == "__main__":
    serve(app)
