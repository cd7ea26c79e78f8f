// Seed 004 (SmartWMS, ../shared/seeds/004_*.txt): "Signature is in X-SmartWMS-Signature
// header", computed by the document's verifyWebhook below over the payload; events
// order.created, order.updated, order.shipped, order.cancelled; payload
// {"id": "evt_…", "type", "timestamp": "2024-01-15T10:30:00Z", "data": {"orderId",
// "orderNumber", "status", "trackingNumber", "carrier"}}.
// Usage: node smartwms.js PORT_FILE   (secret in SEED_SECRET)
'use strict';
const express = require('express');
const { recorded, keepRaw, listen } = require('./harness');
const secret = process.env.SEED_SECRET;

// The document's code, as written:
const crypto = require('crypto');

function verifyWebhook(payload, signature, secret) { const expected = crypto .createHmac('sha256', secret) .update(payload) .digest('hex');

return crypto.timingSafeEqual( Buffer.from(signature), Buffer.from(expected) ); }
// (end of the document's code)

const EVENTS = ['order.created', 'order.updated', 'order.shipped', 'order.cancelled'];

const app = express();
app.use(express.json({ verify: keepRaw }));
app.post('/smartwms', recorded('smartwms', (req, res) => {
  const signature = req.headers['x-smartwms-signature'];
  // timingSafeEqual throws on a length mismatch: a missing or short signature is invalid too.
  let valid = false;
  try { valid = typeof signature === 'string' && verifyWebhook(req.rawBody, signature, secret); } catch (_) { valid = false; }
  if (!valid) return res.status(401).send('Invalid signature');
  const e = req.body;
  const problems = [];
  if (typeof e.id !== 'string' || !/^evt_/.test(e.id)) problems.push('id must be evt_…');
  if (!EVENTS.includes(e.type)) problems.push('unknown type ' + e.type);
  if (typeof e.timestamp !== 'string' || !/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test(e.timestamp)) problems.push('timestamp must be UTC ISO 8601 with Z: ' + e.timestamp);
  const d = e.data || {};
  if (typeof d.orderId !== 'string' || !/^ord_/.test(d.orderId)) problems.push('data.orderId must be ord_…');
  if (typeof d.orderNumber !== 'string') problems.push('data.orderNumber');
  if (typeof d.status !== 'string') problems.push('data.status');
  if (e.type === 'order.shipped' && (typeof d.trackingNumber !== 'string' || typeof d.carrier !== 'string')) problems.push('shipped needs trackingNumber and carrier');
  if (problems.length) return res.status(400).send(problems.join('; '));
  res.status(200).send('ok');
}));
listen(app);
