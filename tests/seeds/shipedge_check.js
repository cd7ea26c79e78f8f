// What seed 003's orders/shipped_v2 example promises (field names and types).
'use strict';
function problems(d) {
  const p = [];
  for (const k of ['account_id', 'order_id']) if (typeof d[k] !== 'number') p.push(k + ' must be a number');
  for (const k of ['order_number', 'order_reference', 'status', 'tracking_number', 'carrier', 'shipping_method']) if (typeof d[k] !== 'string') p.push(k);
  if (!/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/.test(d.shipped_date || '')) p.push('shipped_date must be YYYY-MM-DD HH:MM:SS: ' + d.shipped_date);
  const c = d.customer || {};
  if (typeof c.email !== 'string' || typeof c.name !== 'string') p.push('customer.email and customer.name');
  const a = c.address || {};
  for (const k of ['address1', 'city', 'state', 'zip', 'country']) if (typeof a[k] !== 'string') p.push('customer.address.' + k);
  if (!Array.isArray(d.items) || d.items.length === 0) p.push('items');
  for (const it of d.items || []) if (typeof it.sku !== 'string' || typeof it.quantity !== 'number' || typeof it.description !== 'string') p.push('item ' + JSON.stringify(it));
  if (typeof d.total !== 'number' || typeof d.shipping_cost !== 'number') p.push('total and shipping_cost must be numbers');
  return p;
}
module.exports = { problems };
