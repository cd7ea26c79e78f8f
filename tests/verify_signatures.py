#!/usr/bin/env python3
"""Verifies deliveries the way each platform's receivers do, independently of pg_webhooks'
Rust: Python's hmac/hashlib and Node's crypto, following each platform's documented steps.

Reads a JSON array on stdin: [{"name", "check", "secret", "headers" (lower-cased names),
"body" (text, the raw body as received)} ...] and prints a JSON object {name: true/false or
an error text}. Each check also makes sure that a tampered body or a wrong secret does NOT
verify, so a check that accepts anything fails.

Checks:
  github      X-Hub-Signature-256: "sha256=" + hex HMAC-SHA256(secret, body)
  shopify     X-Shopify-Hmac-Sha256: base64 HMAC-SHA256(secret, raw body), in Node's crypto
  stripe      Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>[,v1=...]
              (Stripe's "verify manually" steps); any v1 may match; t within 5 minutes
  stripe_old  as stripe, with the secret of an earlier rotation: one of the v1 must match
  iso_ts      X-Signature: hex HMAC-SHA256(secret, X-Webhook-Timestamp + "." + body), the
              timestamp an ISO 8601 UTC time within 5 minutes
  unix_ts     X-Signature: "v1=" + base64 HMAC-SHA256(secret, webhook-timestamp + "." + body)
  seed002     X-Webhook-Signature: seed 002's Python snippet, to the letter
"""
import base64
import datetime
import hashlib
import hmac
import json
import subprocess
import sys
import time


def github(secret, headers, body):
    signature = headers.get("x-hub-signature-256")
    if not signature:
        return False
    expected = "sha256=" + hmac.new(secret.encode("utf-8"), body.encode("utf-8"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


NODE_SHOPIFY = r"""
const crypto = require('crypto');
let input = '';
process.stdin.on('data', (d) => (input += d));
process.stdin.on('end', () => {
  const { secret, hmacHeader, rawBody } = JSON.parse(input);
  const digest = crypto.createHmac('sha256', secret).update(Buffer.from(rawBody, 'utf8')).digest('base64');
  const ok = hmacHeader !== undefined && hmacHeader !== null &&
    Buffer.from(digest).length === Buffer.from(hmacHeader).length &&
    crypto.timingSafeEqual(Buffer.from(digest), Buffer.from(hmacHeader));
  process.stdout.write(ok ? 'true' : 'false');
});
"""


def shopify(secret, headers, body):
    out = subprocess.run(
        ["node", "-e", NODE_SHOPIFY],
        input=json.dumps({"secret": secret, "hmacHeader": headers.get("x-shopify-hmac-sha256"), "rawBody": body}),
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip() == "true"


def stripe(secret, headers, body):
    header = headers.get("stripe-signature")
    if not header:
        return False
    # Split on ',' then each element on '=': t is the timestamp, v1 the signature(s).
    pairs = [item.split("=", 1) for item in header.split(",")]
    timestamp = [v for k, v in pairs if k == "t"]
    signatures = [v for k, v in pairs if k == "v1"]
    if len(timestamp) != 1 or not signatures:
        return False
    if abs(time.time() - int(timestamp[0])) > 300:
        return False
    signed_payload = timestamp[0] + "." + body
    expected = hmac.new(secret.encode("utf-8"), signed_payload.encode("utf-8"), hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in signatures)


def iso_ts(secret, headers, body):
    ts = headers.get("x-webhook-timestamp")
    signature = headers.get("x-signature")
    if not ts or not signature:
        return False
    when = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    if abs(time.time() - when.timestamp()) > 300:
        return False
    expected = hmac.new(secret.encode("utf-8"), (ts + "." + body).encode("utf-8"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def unix_ts(secret, headers, body):
    ts = headers.get("webhook-timestamp")
    signature = headers.get("x-signature")
    if not ts or not signature:
        return False
    mac = hmac.new(secret.encode("utf-8"), (ts + "." + body).encode("utf-8"), hashlib.sha256).digest()
    return hmac.compare_digest("v1=" + base64.b64encode(mac).decode(), signature)


def seed002(secret, headers, body):
    # Seed 002's Flask example: verify_webhook(request.get_data(as_text=True), signature, secret)
    def verify_webhook(body, signature, secret):
        expected = hmac.new(secret.encode('utf-8'), body.encode('utf-8'), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, signature)

    signature = headers.get("x-webhook-signature")
    return signature is not None and verify_webhook(body, signature, secret)


CHECKS = {"github": github, "shopify": shopify, "stripe": stripe, "stripe_old": stripe,
          "iso_ts": iso_ts, "unix_ts": unix_ts, "seed002": seed002}


def main():
    results = {}
    for case in json.load(sys.stdin):
        check = CHECKS[case["check"]]
        secret, headers, body = case["secret"], case["headers"], case["body"]
        try:
            ok = check(secret, headers, body)
            # Controls: neither a changed body nor another secret may verify.
            if check(secret, headers, body + " ") or check(secret + "x", headers, body):
                ok = "a tampered body or a wrong secret verified too"
        except Exception as e:  # noqa: BLE001 - reported as the case's result
            ok = "%s: %s" % (type(e).__name__, e)
        results[case["name"]] = ok
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
