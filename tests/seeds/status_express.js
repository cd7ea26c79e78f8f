// Seed 002 (order status webhooks for WhatsApp/CRM tools, ../shared/seeds/002_*.txt), the
// document's Express receiver: it verifies X-Webhook-Signature over JSON.stringify(req.body),
// the body as express.json() parsed and JavaScript re-serializes it, not the bytes received.
// Event order.status_updated, payload {"event", "timestamp": "2026-05-09T12:00:00+02:00",
// "order": {"reference", "old_status", "new_status", "amount", "currency", "tracking_number",
// "delivery_notes", "created_at"}, "customer": {"name", "phone", "city", "address"},
// "product": {"name", "sku"}, "items": [{"product_name", "sku", "quantity", "price"}]}.
// Usage: node status_express.js PORT_FILE   (secret in SEED_SECRET)
'use strict';
const express = require('express');
const { recorded, keepRaw, listen } = require('./harness');
const secretKey = process.env.SEED_SECRET;

// The document's code, as written (its 'your_secret_key' is SEED_SECRET here):
const crypto = require('crypto'); function verifyWebhook(body, signature, secret) { const expected = crypto .createHmac('sha256', secret) .update(body) .digest('hex'); return crypto.timingSafeEqual( Buffer.from(expected), Buffer.from(signature) ); }
// (end of the document's code)

const app = express();
app.use(express.json({ verify: keepRaw }));
app.post('/webhook', recorded('status-express', (req, res) => {
  const signature = req.headers['x-webhook-signature'];
  let isValid = false;
  try {
    isValid = verifyWebhook( JSON.stringify(req.body), signature, secretKey );
  } catch (_) { isValid = false; }   // timingSafeEqual throws on a length mismatch
  if (!isValid) return res.status(401).send('Invalid signature');
  // Process the webhook...
  const problems = require('./status_check').problems(req.body, req.headers);
  if (problems.length) return res.status(400).send(problems.join('; '));
  res.status(200).send('ok');
}));
listen(app);
