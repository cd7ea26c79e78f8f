// Seed 000 (Veendo, ../shared/seeds/000_*.txt): events ORDER_CREATED, ORDER_STATUS_UPDATED,
// ORDER_SHIPPED, ORDER_CANCELLED, ORDER_REFUNDED; "Each event contains the complete JSON body
// of the order: ID, customer, items, prices, address, payment status and shipment status";
// "HMAC-SHA256 signature (header: X-Veendo-Signature)"; "verify timestamp to avoid replay
// attack". The document gives no code: this receiver checks the hex HMAC-SHA256 of the raw
// body under the secret, and rejects a timestamp more than 5 minutes from now.
// Usage: node veendo.js PORT_FILE   (secret in SEED_SECRET)
'use strict';
const crypto = require('crypto');
const express = require('express');
const { recorded, keepRaw, listen } = require('./harness');
const secret = process.env.SEED_SECRET;

const EVENTS = ['ORDER_CREATED', 'ORDER_STATUS_UPDATED', 'ORDER_SHIPPED', 'ORDER_CANCELLED', 'ORDER_REFUNDED'];

const app = express();
app.use(express.json({ verify: keepRaw }));
app.post('/veendo', recorded('veendo', (req, res) => {
  const signature = req.headers['x-veendo-signature'] || '';
  const expected = crypto.createHmac('sha256', secret).update(req.rawBody).digest('hex');
  if (signature.length !== expected.length || !crypto.timingSafeEqual(Buffer.from(signature), Buffer.from(expected))) {
    return res.status(401).send('Invalid signature');
  }
  const e = req.body;
  const p = [];
  if (!EVENTS.includes(e.event)) p.push('unknown event ' + e.event);
  const at = Date.parse(e.timestamp);
  if (!(Math.abs(Date.now() - at) <= 5 * 60 * 1000)) p.push('timestamp missing or stale: ' + e.timestamp);
  const o = e.order || {};
  if (o.id === undefined) p.push('order.id');
  if (!o.customer) p.push('order.customer');
  if (!o.address) p.push('order.address');
  if (typeof o.payment_status !== 'string') p.push('order.payment_status');
  if (typeof o.shipment_status !== 'string') p.push('order.shipment_status');
  if (!Array.isArray(o.items) || o.items.some((i) => i.price === undefined)) p.push('order.items with prices');
  if (e.event === 'ORDER_SHIPPED' && !o.tracking_number) p.push('ORDER_SHIPPED needs tracking info');
  if (p.length) return res.status(400).send(p.join('; '));
  res.status(200).send('ok');
}));
listen(app);
