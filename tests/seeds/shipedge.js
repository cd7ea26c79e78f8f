// Seed 003 (ShipEdge, ../shared/seeds/003_*.txt): the document's Express handler for
// orders/shipped_v2, behind its two optional protections: a custom header
// "Authorization: Bearer your-secret-token" (Option 1) and "Certificate Identification"
// (SSL client certificates): this receiver is HTTPS with a client certificate required
// (signed by the CA in SEED_CLIENT_CA), its own certificate in SEED_CERT/SEED_KEY.
// Payload: {"event": "orders/shipped_v2", "account_id", "order_id", "order_number",
// "order_reference", "status", "shipped_date": "2024-01-15 10:30:00", "tracking_number",
// "carrier", "shipping_method", "customer": {"email", "name", "address": {...}}, "items":
// [{"sku", "quantity", "description"}], "total", "shipping_cost"}.
// Usage: node shipedge.js PORT_FILE   (token in SEED_SECRET)
'use strict';
const fs = require('fs');
const { recorded, listen } = require('./harness');
const token = process.env.SEED_SECRET;
function updateOrderStatus() {}
function sendCustomerNotification() {}

// The document's code, as written (app.listen is the harness's, over HTTPS):
const express = require('express');
const app = express();
app.use(express.json());
app.post('/webhooks/order-shipped', recorded('shipedge', (req, res) => {
  if (req.headers['authorization'] !== 'Bearer ' + token) return res.status(401).send('Unauthorized');
const data = req.body;
// Validate the data
if (!data.event || !data.order_id) {
return res.status(400).send('Invalid webhook data');
}
// Process the event
if (data.event === 'orders/shipped_v2') {
const { order_id, order_number, tracking_number } = data;
  const p = require('./shipedge_check').problems(data);
  if (p.length) return res.status(400).send(p.join('; '));
// Update your system
updateOrderStatus(order_id, 'shipped', tracking_number);
sendCustomerNotification(order_number, tracking_number);
}
// Always return 200 OK
res.status(200).send('OK');
}));
// (end of the document's code)

listen(app, {
  cert: fs.readFileSync(process.env.SEED_CERT),
  key: fs.readFileSync(process.env.SEED_KEY),
  ca: fs.readFileSync(process.env.SEED_CLIENT_CA),
  requestCert: true,
  rejectUnauthorized: true,
});
