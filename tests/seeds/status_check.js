// What seed 002's payload example and header list promise, checked by both of its receivers
// (status_express.js here; status_flask.py has the same checks in Python).
'use strict';
const ISO_OFFSET = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$/;
function problems(b, headers) {
  const p = [];
  if (b.event !== 'order.status_updated') p.push('event ' + b.event);
  if (headers['x-webhook-event'] !== 'order.status_updated') p.push('X-Webhook-Event header ' + headers['x-webhook-event']);
  if (!ISO_OFFSET.test(b.timestamp || '')) p.push('timestamp must be ISO 8601 with offset: ' + b.timestamp);
  const o = b.order || {};
  for (const k of ['reference', 'old_status', 'new_status', 'currency']) if (typeof o[k] !== 'string') p.push('order.' + k);
  if (o.old_status === o.new_status) p.push('old_status equals new_status');
  if (typeof o.amount !== 'number') p.push('order.amount must be a number');
  if (!ISO_OFFSET.test(o.created_at || '')) p.push('order.created_at must be ISO 8601 with offset: ' + o.created_at);
  if (!('tracking_number' in o) || !('delivery_notes' in o)) p.push('order.tracking_number and delivery_notes must be present');
  const c = b.customer || {};
  for (const k of ['name', 'phone', 'city', 'address']) if (typeof c[k] !== 'string') p.push('customer.' + k);
  const pr = b.product || {};
  if (typeof pr.name !== 'string' || typeof pr.sku !== 'string') p.push('product.name and product.sku');
  if (!Array.isArray(b.items) || b.items.length === 0) p.push('items');
  for (const it of b.items || []) {
    if (typeof it.product_name !== 'string' || typeof it.sku !== 'string' || typeof it.quantity !== 'number' || typeof it.price !== 'number') p.push('item ' + JSON.stringify(it));
  }
  return p;
}
module.exports = { problems };
