//! Receivers already written for other platforms accept pg_webhooks' deliveries unchanged
//! (issue 11): for each webhook document in ../shared/seeds, a receiver written to the letter of
//! that document (tests/seeds/: its verification code as written, its field and event names,
//! under Express or Flask as the document uses) gets every event of an order's life cycle,
//! from a subscription configured through the SQL API only, by a non-superuser
//! `webhooks_admin`, while an application role writes the orders.

mod common;

use common::{private_dir, wait_for, Cluster};
use postgres::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// One receiver process of tests/seeds/, serving on 127.0.0.1: its hooks on `port` (HTTPS for
/// the ShipEdge one), its request log on `log_port` (plain HTTP).
struct SeedReceiver {
    name: &'static str,
    port: u16,
    log_port: u16,
    child: Child,
    dir: PathBuf,
}

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seeds")
}

impl SeedReceiver {
    fn start(name: &'static str, script: &str, env: &[(&str, String)]) -> SeedReceiver {
        let dir = private_dir(&format!("pg_webhooks_seed_{name}"));
        let port_file = dir.join("port");
        let program = if script.ends_with(".py") { "python3" } else { "node" };
        let mut command = Command::new(program);
        command
            .current_dir(seeds_dir())
            .arg(script)
            .arg(&port_file)
            .stdout(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} tests/seeds/{script}: {e}"));
        let (port, log_port) = wait_for(
            &format!("the {name} receiver to listen"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("tests/seeds/{script} exited before listening: {status}");
                }
                let text = std::fs::read_to_string(&port_file).ok()?;
                let mut ports = text.split_whitespace().map(|p| p.parse::<u16>());
                match (ports.next(), ports.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => Some((a, b)),
                    _ => None,
                }
            },
        );
        SeedReceiver {
            name,
            port,
            log_port,
            child,
            dir,
        }
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// Every request the receiver got, with the status it answered, in arrival order.
    fn log(&self) -> Vec<Value> {
        let mut resp = ureq::get(&format!("http://127.0.0.1:{}/_log", self.log_port))
            .call()
            .unwrap_or_else(|e| panic!("{} receiver log: {e}", self.name));
        let text = resp.body_mut().read_to_string().expect("log body");
        serde_json::from_str(&text).expect("log json")
    }
}

impl Drop for SeedReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate signed by a
/// second CA (the one the ShipEdge receiver trusts), all made here with openssl. Returns the
/// directory holding ca.pem, server.pem, server.key, client-ca.pem, client.pem, client.key.
fn certificates() -> PathBuf {
    let dir = private_dir("pg_webhooks_seed_pki");
    let run = |args: &[&str]| {
        let out = Command::new("/usr/bin/openssl")
            .current_dir(&dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (ca, cn) in [("ca", "seed server CA"), ("client-ca", "seed client CA")] {
        run(&[
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", &format!("/CN={cn}"), "-keyout", &format!("{ca}.key"),
            "-out", &format!("{ca}.pem"),
        ]);
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        .expect("server.ext");
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
        .expect("client.ext");
    for (name, ca, cn) in [("server", "ca", "127.0.0.1"), ("client", "client-ca", "pg_webhooks shop")] {
        run(&[
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj",
            &format!("/CN={cn}"), "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"),
        ]);
        run(&[
            "x509", "-req", "-in", &format!("{name}.csr"), "-CA", &format!("{ca}.pem"), "-CAkey",
            &format!("{ca}.key"), "-CAcreateserial", "-days", "2", "-extfile",
            &format!("{name}.ext"), "-out", &format!("{name}.pem"),
        ]);
    }
    // pg_webhooks takes PKCS#8 keys ("BEGIN PRIVATE KEY").
    run(&["pkcs8", "-topk8", "-nocrypt", "-in", "client.key", "-out", "client.pk8"]);
    dir
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The shop: orders with the columns the five documents' payloads are made of, and their
/// items, owned by `shop_admin` (the integrations role, a webhooks_admin, which tracks them and
/// subscribes), written by the application role `shop_app`, with the default status events.
const SHOP: &str = "
    CREATE ROLE shop_app LOGIN;
    CREATE ROLE shop_admin LOGIN IN ROLE webhooks_admin;
    CREATE SCHEMA shop AUTHORIZATION shop_admin;
    GRANT USAGE ON SCHEMA shop TO shop_app;
    SET ROLE shop_admin;
    CREATE TABLE shop.orders (
        id bigint PRIMARY KEY,
        reference text NOT NULL,
        customer_name text, customer_email text, customer_phone text,
        address1 text, city text, state text, zip text, country text,
        status text NOT NULL DEFAULT 'pending',
        payment_status text NOT NULL DEFAULT 'unpaid',
        shipment_status text NOT NULL DEFAULT 'not_shipped',
        total numeric(12,2) NOT NULL, shipping_cost numeric(12,2) NOT NULL DEFAULT 0,
        currency text NOT NULL DEFAULT 'EUR',
        tracking_number text, carrier text, shipping_method text, delivery_notes text,
        created_at timestamptz NOT NULL DEFAULT now(), shipped_at timestamptz);
    CREATE TABLE shop.order_items (
        id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES shop.orders,
        sku text NOT NULL, product_name text NOT NULL, quantity int NOT NULL, price numeric(12,2) NOT NULL);
    CREATE INDEX ON shop.order_items (order_id);
    GRANT SELECT, INSERT, UPDATE, DELETE ON shop.orders, shop.order_items TO shop_app;
    GRANT USAGE ON SEQUENCE shop.order_items_id_seq TO shop_app;
    SELECT webhooks.track('shop.orders', entity => 'order', status_column => 'status',
        children => '{\"items\": {\"table\": \"shop.order_items\", \"foreign_key\": \"order_id\"}}');
    RESET ROLE;
";

/// An order's life, as the application writes it (each statement its own transaction).
const LIFE: &[&str] = &[
    // Order 1: created, paid, an item changed, shipped with tracking, delivered.
    "WITH o AS (INSERT INTO shop.orders (id, reference, customer_name, customer_email, customer_phone,
                 address1, city, state, zip, country, total, shipping_cost, currency, delivery_notes)
               VALUES (129, 'ORD-000129', 'Karim Mansouri', 'karim@example.com', '+212661234567',
                 '123 Bd Mohammed V', 'Casablanca', 'CS', '20250', 'MA', 1858.90, 5.99, 'MAD',
                 'Call before delivery') RETURNING id)
     INSERT INTO shop.order_items (order_id, sku, product_name, quantity, price)
     SELECT id, sku, name, q, p FROM o, (VALUES ('MA-ArgivitClassic', 'Argivit Classic Tablets', 1, 1799.00),
                                                 ('MA-Vit-C', 'Vitamin C 500', 1, 59.90)) AS v(sku, name, q, p)",
    "UPDATE shop.orders SET status = 'paid', payment_status = 'paid' WHERE id = 129",
    "UPDATE shop.order_items SET quantity = 2 WHERE order_id = 129 AND sku = 'MA-Vit-C'",
    "UPDATE shop.orders SET status = 'shipped', shipment_status = 'shipped', tracking_number = 'F-CSA6SFJ6EMY',
            carrier = 'UPS', shipping_method = 'Ground', shipped_at = now() WHERE id = 129",
    "UPDATE shop.orders SET status = 'delivered', shipment_status = 'delivered' WHERE id = 129",
    // Order 2: created, cancelled.
    "WITH o AS (INSERT INTO shop.orders (id, reference, customer_name, customer_email, customer_phone,
                 address1, city, state, zip, country, total)
               VALUES (130, 'ORD-000130', 'John Doe', 'customer@example.com', '+15550100',
                 '123 Main St', 'Los Angeles', 'CA', '90001', 'USA', 59.98) RETURNING id)
     INSERT INTO shop.order_items (order_id, sku, product_name, quantity, price)
     SELECT id, 'PROD-001', 'Product Description', 2, 29.99 FROM o",
    "UPDATE shop.orders SET status = 'cancelled' WHERE id = 130",
    // Order 3: created already paid, refunded.
    "WITH o AS (INSERT INTO shop.orders (id, reference, customer_name, customer_email, customer_phone,
                 address1, city, state, zip, country, total, status, payment_status)
               VALUES (131, 'ORD-000131', 'Ada Lovelace', 'ada@example.com', '+441234567',
                 '12 St James Sq', 'London', 'LDN', 'SW1Y 4JH', 'UK', 120.00, 'paid', 'paid') RETURNING id)
     INSERT INTO shop.order_items (order_id, sku, product_name, quantity, price)
     SELECT id, 'BOOK-1', 'Notes on the Analytical Engine', 1, 120.00 FROM o",
    "UPDATE shop.orders SET status = 'refunded', payment_status = 'refunded' WHERE id = 131",
];

/// Subscribes as `shop_admin` (a webhooks_admin, not a superuser); returns the id.
fn subscribe(admin: &mut Client, url: &str, args: &str) -> i64 {
    admin
        .query_one(
            &format!("SELECT id FROM webhooks.subscribe(url => $1, {args})"),
            &[&url],
        )
        .unwrap_or_else(|e| panic!("subscribe {url}: {e}"))
        .get(0)
}

/// The event types a receiver accepted (answered 2xx), sorted, and every request it refused.
fn accepted(rx: &SeedReceiver, type_of: impl Fn(&Value) -> String) -> (Vec<String>, Vec<Value>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for entry in rx.log() {
        let status = entry["status"].as_i64().unwrap_or(0);
        if (200..300).contains(&status) {
            // The raw body where the receiver kept it, else what its JSON parser made of it.
            let body: Value = match entry["raw"].as_str() {
                Some(raw) => serde_json::from_str(raw).unwrap_or(Value::Null),
                None => entry["parsed"].clone(),
            };
            ok.push(type_of(&body));
        } else {
            refused.push(entry);
        }
    }
    ok.sort();
    (ok, refused)
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn receivers_written_for_five_other_platforms_accept_an_order_life_cycle_unchanged() {
    let pki = certificates();
    let veendo = SeedReceiver::start("veendo", "veendo.js", &[("SEED_SECRET", "vnd_live_7f3a9c2e41".into())]);
    let opentiendas = SeedReceiver::start("opentiendas", "opentiendas.py", &[("SEED_SECRET", "your_webhook_secret".into())]);
    let status_express = SeedReceiver::start("status-express", "status_express.js", &[("SEED_SECRET", "your_secret_key".into())]);
    let status_flask = SeedReceiver::start("status-flask", "status_flask.py", &[("SEED_SECRET", "your_secret_key".into())]);
    let shipedge = SeedReceiver::start(
        "shipedge",
        "shipedge.js",
        &[
            ("SEED_SECRET", "your-secret-token".into()),
            ("SEED_CERT", pki.join("server.pem").display().to_string()),
            ("SEED_KEY", pki.join("server.key").display().to_string()),
            ("SEED_CLIENT_CA", pki.join("client-ca.pem").display().to_string()),
        ],
    );
    let smartwms = SeedReceiver::start("smartwms", "smartwms.js", &[("SEED_SECRET", "whsec_smartwms_test_secret".into())]);

    let cluster = Cluster::start("seeds", &["webhooks.retry_schedule = '1s,1s'"]);
    let mut su = cluster.connect();
    su.batch_execute(SHOP).expect("the shop");
    let mut admin = cluster.connect_as("postgres", "shop_admin");

    // Seed 000, Veendo: its own event names (subscribed by those names), the order as the
    // body with a timestamp, an HMAC-SHA256 hex signature in X-Veendo-Signature, its retry
    // policy (5 attempts, 5s to 80s) and 30 s timeout.
    let veendo_sub = subscribe(
        &mut admin,
        &veendo.url("http", "/veendo"),
        r#"event_types => '{ORDER_CREATED, ORDER_STATUS_UPDATED, ORDER_SHIPPED, ORDER_CANCELLED, ORDER_REFUNDED}',
           signature => 'hmac', secret => 'vnd_live_7f3a9c2e41',
           signature_options => '{"header": "X-Veendo-Signature", "encoding": "hex"}',
           timeout => '30 seconds', retry_schedule => '5s,10s,20s,40s,80s',
           shape => $${
             "event_names": {"order.created": "ORDER_CREATED", "order.status_updated": "ORDER_STATUS_UPDATED",
                             "order.shipped": "ORDER_SHIPPED", "order.cancelled": "ORDER_CANCELLED",
                             "order.refunded": "ORDER_REFUNDED"},
             "body": {"event": "{{ type }}", "timestamp": "{{ timestamp | iso8601 }}",
                      "order": {"$merge": ["{{ data }}", {
                        "customer": {"name": "{{ data.customer_name }}", "email": "{{ data.customer_email }}",
                                     "phone": "{{ data.customer_phone }}"},
                        "address": {"line1": "{{ data.address1 }}", "city": "{{ data.city }}",
                                    "zip": "{{ data.zip }}", "country": "{{ data.country }}"}}]}}
           }$$"#,
    );
    // Seed 001, OpenTiendas: its envelope (event_id, type, created_at, data), its American
    // spelling and "fulfilled" for shipped, X-Signature: sha256=<hex> of the raw body, 5 s.
    let opentiendas_sub = subscribe(
        &mut admin,
        &opentiendas.url("http", "/opentiendas"),
        r#"event_types => '{order.created, order.paid, order.fulfilled, order.canceled}',
           signature => 'hmac', secret => 'your_webhook_secret',
           signature_options => '{"header": "X-Signature", "encoding": "hex", "prefix": "sha256="}',
           timeout => '5 seconds',
           shape => $${
             "event_names": {"order.shipped": "order.fulfilled", "order.cancelled": "order.canceled"},
             "body": {"event_id": "{{ id }}", "type": "{{ type }}", "created_at": "{{ created_at | iso8601 }}",
                      "data": "{{ data }}"}
           }$$"#,
    );
    // Seed 002, status webhooks for WhatsApp and CRM tools: its payload, built from the order
    // and its items; X-Webhook-Event; X-Webhook-Signature, hex of the body as JavaScript
    // re-serializes it (the Express receiver signs JSON.stringify(req.body)); the same
    // subscription for the Flask receiver, which verifies the raw body.
    let status_args = r#"event_types => '{order.status_updated}',
           signature => 'hex', secret => 'your_secret_key',
           shape => $${
             "event_type_header": "X-Webhook-Event",
             "json": "javascript",
             "body": {
               "event": "{{ type }}",
               "timestamp": "{{ created_at | iso8601('+02:00') }}",
               "order": {"reference": "{{ data.reference }}", "old_status": "{{ data.previous_status }}",
                         "new_status": "{{ data.status }}", "amount": "{{ data.total }}",
                         "currency": "{{ data.currency }}", "tracking_number": "{{ data.tracking_number }}",
                         "delivery_notes": "{{ data.delivery_notes }}",
                         "created_at": "{{ data.created_at | iso8601('+01:00') }}"},
               "customer": {"name": "{{ data.customer_name }}", "phone": "{{ data.customer_phone }}",
                            "city": "{{ data.city }}", "address": "{{ data.address1 }}"},
               "product": {"name": "{{ data.items[0].product_name }}", "sku": "{{ data.items[0].sku }}"},
               "items": {"$each": "{{ data.items }}", "to": {"product_name": "{{ item.product_name }}",
                         "sku": "{{ item.sku }}", "quantity": "{{ item.quantity }}", "price": "{{ item.price }}"}}
             }
           }$$"#;
    let status_express_sub = subscribe(&mut admin, &status_express.url("http", "/webhook"), status_args);
    let status_flask_sub = subscribe(&mut admin, &status_flask.url("http", "/webhook"), status_args);
    // Seed 003, ShipEdge: orders/shipped_v2's flat body, its "YYYY-MM-DD HH:MM:SS" dates, a
    // custom Authorization header, and certificate identification: HTTPS with a client
    // certificate (mutual TLS), the receiver's CA trusted for this subscription only; 10 s.
    let shipedge_sub = subscribe(
        &mut admin,
        &shipedge.url("https", "/webhooks/order-shipped"),
        &format!(
            r#"event_types => '{{orders/shipped_v2}}',
               headers => '{{"Authorization": "Bearer your-secret-token"}}',
               timeout => '10 seconds',
               tls => jsonb_build_object('client_certificate', $pem${}$pem$, 'client_key', $pem${}$pem$,
                                         'ca_bundle', $pem${}$pem$),
               shape => $${{
                 "event_names": {{"order.shipped": "orders/shipped_v2"}},
                 "body": {{
                   "event": "{{{{ type }}}}", "account_id": 100, "order_id": "{{{{ data.id }}}}",
                   "order_number": "{{{{ data.reference }}}}", "order_reference": "REF-{{{{ data.id }}}}",
                   "status": "{{{{ data.status }}}}", "shipped_date": "{{{{ data.shipped_at | datetime }}}}",
                   "tracking_number": "{{{{ data.tracking_number }}}}", "carrier": "{{{{ data.carrier }}}}",
                   "shipping_method": "{{{{ data.shipping_method }}}}",
                   "customer": {{"email": "{{{{ data.customer_email }}}}", "name": "{{{{ data.customer_name }}}}",
                                "address": {{"address1": "{{{{ data.address1 }}}}", "city": "{{{{ data.city }}}}",
                                            "state": "{{{{ data.state }}}}", "zip": "{{{{ data.zip }}}}",
                                            "country": "{{{{ data.country }}}}"}}}},
                   "items": {{"$each": "{{{{ data.items }}}}", "to": {{"sku": "{{{{ item.sku }}}}",
                             "quantity": "{{{{ item.quantity }}}}", "description": "{{{{ item.product_name }}}}"}}}},
                   "total": "{{{{ data.total }}}}", "shipping_cost": "{{{{ data.shipping_cost }}}}"
                 }}
               }}$$"#,
            read(&pki, "client.pem"),
            read(&pki, "client.pk8"),
            read(&pki, "ca.pem"),
        ),
    );
    // Seed 004, SmartWMS: {id: evt_…, type, timestamp (UTC, Z), data: camelCase fields},
    // X-SmartWMS-Signature (hex HMAC of the payload), its retry policy (1 min to 2 h).
    let smartwms_sub = subscribe(
        &mut admin,
        &smartwms.url("http", "/smartwms"),
        r#"event_types => '{order.created, order.updated, order.shipped, order.cancelled}',
           signature => 'hmac', secret => 'whsec_smartwms_test_secret',
           signature_options => '{"header": "X-SmartWMS-Signature", "encoding": "hex"}',
           retry_schedule => '1m,5m,30m,2h',
           shape => $${
             "body": {"id": "evt_{{ id }}", "type": "{{ type }}", "timestamp": "{{ created_at | iso8601 }}",
                      "data": {"orderId": "ord_{{ data.id }}", "orderNumber": "{{ data.reference }}",
                               "status": "{{ data.status }}", "trackingNumber": "{{ data.tracking_number }}",
                               "carrier": "{{ data.carrier }}"}}
           }$$"#,
    );

    let mut app = cluster.connect_as("postgres", "shop_app");
    for statement in LIFE {
        app.batch_execute(statement)
            .unwrap_or_else(|e| panic!("the application's write failed: {e}\n{statement}"));
    }

    let subs = [
        veendo_sub,
        opentiendas_sub,
        status_express_sub,
        status_flask_sub,
        shipedge_sub,
        smartwms_sub,
    ];
    let expected_deliveries: i64 = 11 + 7 + 5 + 5 + 1 + 6;
    let mut reader = cluster.connect();
    let states = wait_for("every delivery to end", WAIT, || {
        let rows = reader
            .query(
                "SELECT subscription_id, status, attempts, last_error FROM webhooks.deliveries
                  WHERE subscription_id = ANY($1) ORDER BY id",
                &[&&subs[..]],
            )
            .expect("deliveries");
        let ended = rows
            .iter()
            .filter(|r| r.get::<_, String>(1) != "pending" && r.get::<_, String>(1) != "retrying")
            .count() as i64;
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, Option<String>>(3).is_some())
            .map(|r| format!("subscription {}: {:?}", r.get::<_, i64>(0), r.get::<_, Option<String>>(3)))
            .collect();
        assert!(failed.is_empty(), "a receiver refused a delivery: {failed:?}");
        (rows.len() as i64 == expected_deliveries && ended == expected_deliveries).then_some(rows)
    });
    for r in &states {
        assert_eq!(r.get::<_, String>(1), "succeeded");
        assert_eq!(r.get::<_, i32>(2), 1, "accepted at the first attempt");
    }

    let (got, refused) = accepted(&veendo, |b| b["event"].as_str().unwrap_or("?").to_string());
    assert!(refused.is_empty(), "veendo refused: {refused:?}");
    assert_eq!(
        got,
        sorted(&[
            "ORDER_CREATED", "ORDER_CREATED", "ORDER_CREATED",
            "ORDER_STATUS_UPDATED", "ORDER_STATUS_UPDATED", "ORDER_STATUS_UPDATED",
            "ORDER_STATUS_UPDATED", "ORDER_STATUS_UPDATED",
            "ORDER_SHIPPED", "ORDER_CANCELLED", "ORDER_REFUNDED",
        ])
    );
    let (got, refused) = accepted(&opentiendas, |b| b["type"].as_str().unwrap_or("?").to_string());
    assert!(refused.is_empty(), "opentiendas refused: {refused:?}");
    assert_eq!(
        got,
        sorted(&[
            "order.created", "order.created", "order.created", "order.paid", "order.paid",
            "order.fulfilled", "order.canceled",
        ])
    );
    for rx in [&status_express, &status_flask] {
        let (got, refused) = accepted(rx, |b| {
            format!("{} -> {}", b["order"]["old_status"].as_str().unwrap_or("?"), b["order"]["new_status"].as_str().unwrap_or("?"))
        });
        assert!(refused.is_empty(), "{} refused: {refused:?}", rx.name);
        assert_eq!(
            got,
            sorted(&[
                "pending -> paid", "paid -> shipped", "shipped -> delivered",
                "pending -> cancelled", "paid -> refunded",
            ]),
            "{}",
            rx.name
        );
    }
    let (got, refused) = accepted(&shipedge, |b| b["event"].as_str().unwrap_or("?").to_string());
    assert!(refused.is_empty(), "shipedge refused: {refused:?}");
    assert_eq!(got, sorted(&["orders/shipped_v2"]));
    let (got, refused) = accepted(&smartwms, |b| b["type"].as_str().unwrap_or("?").to_string());
    assert!(refused.is_empty(), "smartwms refused: {refused:?}");
    assert_eq!(
        got,
        sorted(&[
            "order.created", "order.created", "order.created", "order.updated",
            "order.shipped", "order.cancelled",
        ])
    );
    let _ = std::fs::remove_dir_all(&pki);
}

/// The first attempt of a subscription's first delivery: (status code, error).
fn first_attempt(c: &mut Client, sub: i64) -> (Option<i32>, String) {
    wait_for(&format!("an attempt of subscription {sub}"), WAIT, || {
        c.query_opt(
            "SELECT a.status_code, a.error FROM webhooks.attempts a
               JOIN webhooks.deliveries d ON d.id = a.delivery_id
              WHERE d.subscription_id = $1 ORDER BY a.delivery_id, a.attempt LIMIT 1",
            &[&sub],
        )
        .expect("attempts")
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
    })
}

/// The receivers are strict where their documents are, so the test above can fail: the
/// Express receiver refuses a body spelled as stored (`59.90` is `59.9` once JavaScript
/// re-serializes it), OpenTiendas' refuses another secret, ShipEdge's refuses a connection
/// without the client certificate, and pg_webhooks refuses ShipEdge's server certificate
/// without the subscription's CA bundle.
#[test]
fn the_seed_receivers_refuse_what_their_documents_refuse() {
    let pki = certificates();
    let status_express = SeedReceiver::start("status-express", "status_express.js", &[("SEED_SECRET", "your_secret_key".into())]);
    let opentiendas = SeedReceiver::start("opentiendas", "opentiendas.py", &[("SEED_SECRET", "your_webhook_secret".into())]);
    let shipedge = SeedReceiver::start(
        "shipedge",
        "shipedge.js",
        &[
            ("SEED_SECRET", "your-secret-token".into()),
            ("SEED_CERT", pki.join("server.pem").display().to_string()),
            ("SEED_KEY", pki.join("server.key").display().to_string()),
            ("SEED_CLIENT_CA", pki.join("client-ca.pem").display().to_string()),
        ],
    );
    let cluster = Cluster::start("seeds_refuse", &["webhooks.retry_schedule = '1h'"]);
    let mut su = cluster.connect();
    su.batch_execute(SHOP).expect("the shop");
    let mut admin = cluster.connect_as("postgres", "shop_admin");
    let as_stored = subscribe(
        &mut admin,
        &status_express.url("http", "/webhook"),
        r#"event_types => '{order.status_updated}', signature => 'hex', secret => 'your_secret_key',
           shape => '{"event_type_header": "X-Webhook-Event", "body": {"event": "{{ type }}", "amount": "{{ data.total }}"}}'"#,
    );
    let wrong_secret = subscribe(
        &mut admin,
        &opentiendas.url("http", "/opentiendas"),
        r#"event_types => '{order.status_updated}', signature => 'hmac', secret => 'not_the_webhook_secret',
           signature_options => '{"header": "X-Signature", "encoding": "hex", "prefix": "sha256="}'"#,
    );
    let no_client_cert = subscribe(
        &mut admin,
        &shipedge.url("https", "/webhooks/order-shipped"),
        &format!(
            "event_types => '{{order.status_updated}}', tls => jsonb_build_object('ca_bundle', $pem${}$pem$)",
            read(&pki, "ca.pem")
        ),
    );
    let untrusted_server = subscribe(
        &mut admin,
        &shipedge.url("https", "/webhooks/order-shipped"),
        &format!(
            "event_types => '{{order.status_updated}}',
             tls => jsonb_build_object('client_certificate', $pem${}$pem$, 'client_key', $pem${}$pem$)",
            read(&pki, "client.pem"),
            read(&pki, "client.pk8")
        ),
    );
    let mut app = cluster.connect_as("postgres", "shop_app");
    for statement in &LIFE[..2] {
        app.batch_execute(statement).expect("the application's write");
    }
    let mut c = cluster.connect();
    let (code, error) = first_attempt(&mut c, as_stored);
    assert_eq!(code, Some(401), "Express re-serializes 1858.90 as 1858.9: {error}");
    let (code, error) = first_attempt(&mut c, wrong_secret);
    assert_eq!(code, Some(401), "another secret: {error}");
    let (code, error) = first_attempt(&mut c, no_client_cert);
    assert_eq!(code, None);
    assert!(error.contains("client certificate"), "the receiver wants a client certificate: {error}");
    let (code, error) = first_attempt(&mut c, untrusted_server);
    assert_eq!(code, None);
    assert!(error.starts_with("TLS certificate verification failed"), "{error}");
    let _ = std::fs::remove_dir_all(&pki);
}
