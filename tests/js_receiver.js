#!/usr/bin/env node
// A receiver verifying as an Express app with express.json() does (seed 002's snippet): the
// signature is a hex HMAC-SHA256 of JSON.stringify(req.body), keyed by the secret's UTF-8
// bytes, compared with the X-Webhook-Signature header. No Express: the body is parsed with
// JSON.parse, exactly what express.json() does. Listens on 127.0.0.1 only.
//
//   node tests/js_receiver.js PORT_FILE SECRETS_FILE
//
// SECRETS_FILE: JSON {"/path": "secret", ...}, read on every request (the test writes it
// after subscribing). Each request is answered 200 if the signature verifies, 401 if not, and
// logged; GET /_log returns the log: [{path, raw, restringified, same, verified, headers}].
"use strict";
const crypto = require("crypto");
const fs = require("fs");
const http = require("http");

const [portFile, secretsFile] = process.argv.slice(2);
const log = [];

function verifyWebhook(body, signature, secret) {
  const expected = crypto.createHmac("sha256", secret).update(body).digest("hex");
  if (typeof signature !== "string" || signature.length !== expected.length) return false;
  return crypto.timingSafeEqual(Buffer.from(expected), Buffer.from(signature));
}

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/_log") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(log));
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const raw = Buffer.concat(chunks).toString("utf8");
    let secrets = {};
    try {
      secrets = JSON.parse(fs.readFileSync(secretsFile, "utf8"));
    } catch (e) {}
    const entry = { path: req.url, raw, headers: req.headers };
    try {
      const body = JSON.parse(raw); // what express.json() hands the app as req.body
      entry.restringified = JSON.stringify(body);
      entry.same = entry.restringified === raw;
      entry.verified = verifyWebhook(
        JSON.stringify(body),
        req.headers["x-webhook-signature"],
        secrets[req.url] || ""
      );
    } catch (e) {
      entry.error = String(e);
      entry.verified = false;
    }
    log.push(entry);
    res.writeHead(entry.verified ? 200 : 401);
    res.end(entry.verified ? "ok" : "Invalid signature");
  });
});

server.listen(0, "127.0.0.1", () => {
  const tmp = portFile + ".tmp";
  fs.writeFileSync(tmp, String(server.address().port));
  fs.renameSync(tmp, portFile);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
