//! Request shapes end to end (#11, part A): renamed event types and subscribing by either
//! name, body templates, the shape's headers, JSON as JavaScript spells it (checked by a Node
//! receiver verifying JSON.stringify(req.body)), webhooks.request() and _render() showing the
//! shaped request, set_shape, and malformed shapes refused. A webhooks_admin member subscribes,
//! an application role writes orders with items; tests/receiver.py on 127.0.0.1 verifies the
//! Standard Webhooks signatures independently. Each test has its own customer (the
//! subscriptions' filter), order ids and receiver paths.

mod common;

use common::{fails, shared_cluster, wait_for, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn cluster() -> &'static Cluster {
    let c = shared_cluster("shape", &["webhooks.retry_schedule = '100ms,100ms'"]);
    static SETUP: OnceLock<()> = OnceLock::new();
    SETUP.get_or_init(|| {
        c.connect()
            .batch_execute(
                "CREATE ROLE shape_admin LOGIN; GRANT webhooks_admin TO shape_admin;
                 CREATE ROLE shape_app LOGIN;
                 CREATE SCHEMA shop AUTHORIZATION shape_admin;",
            )
            .expect("roles");
        c.connect_as("postgres", "shape_admin")
            .batch_execute(
                r#"CREATE TABLE shop.orders (id bigint PRIMARY KEY, customer text, status text NOT NULL DEFAULT 'pending',
                                        total numeric, placed_at timestamptz DEFAULT '2026-05-08 12:25:44.5+01', extra jsonb);
                   CREATE TABLE shop.order_items (id bigserial PRIMARY KEY, order_id bigint REFERENCES shop.orders ON DELETE CASCADE,
                                             sku text, qty int);
                   SELECT webhooks.track('shop.orders', entity => 'order', status_column => 'status',
                          children => '{"items": {"table": "shop.order_items", "foreign_key": "order_id"}}');
                   GRANT USAGE ON SCHEMA shop TO shape_app;
                   GRANT SELECT, INSERT, UPDATE, DELETE ON shop.orders, shop.order_items TO shape_app;
                   GRANT USAGE ON SEQUENCE shop.order_items_id_seq TO shape_app;"#,
            )
            .expect("tables");
    });
    c
}

fn admin() -> Client {
    cluster().connect_as("postgres", "shape_admin")
}

fn app() -> Client {
    cluster().connect_as("postgres", "shape_app")
}

/// Subscribe `rx`'s `path` as shape_admin for `customer`'s orders; the receiver verifies the
/// Standard Webhooks signature with the secret. Returns (id, secret).
fn subscribe(
    rx: &Receiver,
    path: &str,
    customer: &str,
    patterns: &str,
    shape: Option<Value>,
    extra: &str,
) -> (i64, String) {
    let shape = shape.map(|s| s.to_string());
    let row = admin()
        .query_one(
            &format!(
                "SELECT id, secret FROM webhooks.subscribe($1, $2::text::text[], filter => jsonb_build_object('customer', $3::text),
                        shape => $4::text::jsonb{extra})"
            ),
            &[&rx.url(path), &patterns, &customer, &shape],
        )
        .expect("subscribe");
    let (id, secret): (i64, String) = (row.get(0), row.get(1));
    rx.configure(json!({"path": path, "secret": secret, "style": "standard"}));
    (id, secret)
}

/// A new order of `customer` with two items, written by the application role.
fn order(id: i64, customer: &str, status: &str) {
    app()
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO shop.orders (id, customer, status, total) VALUES ({id}, '{customer}', '{status}', 59.90);
             INSERT INTO shop.order_items (order_id, sku, qty) VALUES ({id}, 'A-1', 2), ({id}, 'B-7', 1);
             COMMIT;"
        ))
        .expect("order");
}

fn received(rx: &Receiver, path: &str, n: usize) -> Vec<Value> {
    let log = rx.wait_for_requests(path, n, WAIT);
    for r in &log {
        assert_eq!(r["verified"], true, "signature of {r}");
    }
    log
}

fn header<'a>(r: &'a Value, name: &str) -> &'a str {
    r["headers"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} header in {r}"))
}

#[test]
fn renamed_event_types_and_subscribing_by_either_name() {
    let rx = Receiver::start();
    let names = json!({"order.created": "ORDER_CREATED", "order.cancelled": "order.canceled"});
    let shape = json!({"event_names": names, "event_type_header": "X-Event-Type", "delivery_id_header": "X-Delivery-Id"});
    // By the new names, by the stored name, and by a prefix that matches both spellings.
    let (a, _) = subscribe(
        &rx,
        "/by-new-name",
        "renames",
        "{ORDER_CREATED,order.canceled}",
        Some(shape.clone()),
        "",
    );
    let (b, _) = subscribe(
        &rx,
        "/by-stored-name",
        "renames",
        "{order.created}",
        Some(shape.clone()),
        "",
    );
    let (_c, _) = subscribe(
        &rx,
        "/by-prefix",
        "renames",
        "{order.*}",
        Some(json!({"event_names": names})),
        "",
    );
    order(101, "renames", "pending");
    app()
        .batch_execute("UPDATE shop.orders SET status = 'cancelled' WHERE id = 101")
        .expect("cancel");

    let by_new = received(&rx, "/by-new-name", 2);
    let types: Vec<&str> = by_new
        .iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(types, ["ORDER_CREATED", "order.canceled"]);
    for r in &by_new {
        assert_eq!(header(r, "x-event-type"), r["json"]["type"]);
        assert_eq!(header(r, "x-delivery-id"), header(r, "webhook-id"));
        assert_eq!(header(r, "x-delivery-id"), r["json"]["id"]);
        assert_eq!(r["json"]["data"]["total"], 59.9);
        assert!(
            r["body"]
                .as_str()
                .unwrap_or_default()
                .contains("\"total\":59.90"),
            "as stored: {r}"
        );
    }
    let by_stored = received(&rx, "/by-stored-name", 1);
    assert_eq!(by_stored[0]["json"]["type"], "ORDER_CREATED");
    assert_eq!(
        by_stored[0]["json"]["id"], by_new[0]["json"]["id"],
        "the same event"
    );
    let by_prefix = received(&rx, "/by-prefix", 3);
    let types: Vec<&str> = by_prefix
        .iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        types,
        ["ORDER_CREATED", "order.status_updated", "order.canceled"]
    );
    assert!(
        by_prefix[0]["headers"].get("x-event-type").is_none(),
        "no header unless asked for"
    );
    // The stored events keep their types; the delivery log keeps the stored one too.
    let mut c = admin();
    let stored: Vec<String> = c
        .query(
            "SELECT event_type FROM webhooks.deliveries WHERE subscription_id = $1 ORDER BY id",
            &[&a],
        )
        .expect("deliveries")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["order.created", "order.cancelled"]);
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&b],
        )
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "order.created only");
}

#[test]
fn every_template_construct_end_to_end() {
    let rx = Receiver::start();
    let shape = json!({
        "event_names": {"order.created": "orders/created_v2"},
        "event_type_header": "X-Topic",
        "body": {
            "event": "{{ type }}",
            "stored": "{{ stored_type }}",
            "id": "evt_{{ id }}",
            "constants": {"currency": "EUR", "version": 2, "live": true, "none": null, "list": [1, "a"]},
            "order": {
                "ref": "ORD-{{ data.id }}/{{ data.status | upper }}",
                "amount": "{{ data.total }}",
                "amount_text": "{{ data.total | string }}",
                "customer": "{{ data['customer'] }}",
                "missing": "{{ data.nope.deeper }}",
                "fallback": "{{ data.nope | default('n/a') }}"
            },
            "first_sku": "{{ data.items[0].sku }}",
            "last_item": "{{ data.items[-1] }}",
            "items": {"$each": "{{ data.items }}", "as": "line", "to": {"productSku": "{{ line.sku }}", "quantity": "{{ line.qty }}", "order": "{{ data.id }}"}},
            "camel": "{{ data.items | camel_case }}",
            "merged": {"$merge": [{"a": 1, "b": 1}, {"b": 2}, "{{ data.nope }}"]},
            "literal": {"$literal": {"$keep": "{{ not evaluated }}"}},
            "times": {
                "iso_utc": "{{ created_at | iso8601 }}",
                "iso_ms": "{{ created_at | iso8601('Z', 3) }}",
                "iso_offset": "{{ created_at | iso8601('+02:00') }}",
                "unix": "{{ created_at | unix }}",
                "unix_ms": "{{ created_at | unix_ms }}",
                "sql": "{{ created_at | datetime }}",
                "placed": "{{ data.placed_at | iso8601('-05:00') }}",
                "sent": "{{ timestamp | iso8601 }}"
            },
            "delivery": {"id": "{{ delivery_id }}", "attempt": "{{ attempt }}", "subscription": "{{ subscription_id }}"}
        }
    });
    let (sub, _) = subscribe(
        &rx,
        "/template",
        "template",
        "{orders/created_v2}",
        Some(shape),
        "",
    );
    order(201, "template", "pending");
    let r = &received(&rx, "/template", 1)[0];
    let body = &r["json"];
    let raw = r["body"].as_str().expect("body");

    // The expected values, from the stored event by SQL (not by our Rust).
    let mut c = admin();
    let e = c
        .query_one(
            "SELECT e.id::text, e.data,
                    to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    to_char(e.created_at AT TIME ZONE 'UTC' + interval '2 hours', 'YYYY-MM-DD\"T\"HH24:MI:SS\"+02:00\"'),
                    floor(extract(epoch FROM e.created_at))::int8,
                    floor(extract(epoch FROM e.created_at) * 1000)::int8,
                    to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'),
                    d.id, s.id
               FROM webhooks.deliveries d JOIN webhooks.events e ON e.id = d.event_id
               JOIN webhooks.subscriptions s ON s.id = d.subscription_id
              WHERE d.subscription_id = $1",
            &[&sub],
        )
        .expect("the event");
    let (event_id, data): (String, Value) = (e.get(0), e.get(1));
    assert_eq!(body["event"], "orders/created_v2");
    assert_eq!(header(r, "x-topic"), "orders/created_v2");
    assert_eq!(body["stored"], "order.created");
    assert_eq!(body["id"], format!("evt_{event_id}"));
    assert_eq!(
        body["constants"],
        json!({"currency": "EUR", "version": 2, "live": true, "none": null, "list": [1, "a"]})
    );
    assert_eq!(body["order"]["ref"], "ORD-201/PENDING");
    assert!(
        raw.contains("\"amount\":59.90"),
        "numbers exactly as stored: {raw}"
    );
    assert_eq!(body["order"]["amount_text"], "59.90");
    assert_eq!(body["order"]["customer"], "template");
    assert!(body["order"]["missing"].is_null());
    assert_eq!(body["order"]["fallback"], "n/a");
    assert_eq!(body["first_sku"], "A-1");
    assert_eq!(body["last_item"], data["items"][1]);
    let items: Vec<Value> = data["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| json!({"productSku": i["sku"], "quantity": i["qty"], "order": 201}))
        .collect();
    assert_eq!(body["items"], json!(items));
    assert_eq!(body["camel"][0]["orderId"], 201);
    assert_eq!(body["camel"][1]["sku"], "B-7");
    assert!(body["camel"][0].get("order_id").is_none());
    assert_eq!(body["merged"], json!({"a": 1, "b": 2}));
    assert_eq!(body["literal"], json!({"$keep": "{{ not evaluated }}"}));
    let t = &body["times"];
    assert_eq!(t["iso_utc"], e.get::<_, String>(2));
    assert_eq!(t["iso_ms"], e.get::<_, String>(3));
    assert_eq!(t["iso_offset"], e.get::<_, String>(4));
    assert_eq!(t["unix"], e.get::<_, i64>(5));
    assert_eq!(t["unix_ms"], e.get::<_, i64>(6));
    assert_eq!(t["sql"], e.get::<_, String>(7));
    assert_eq!(t["placed"], "2026-05-08T06:25:44-05:00");
    let sent: i64 = header(r, "webhook-timestamp").parse().expect("timestamp");
    let sent_iso: String = c
        .query_one("SELECT to_char(to_timestamp($1::float8) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')", &[&(sent as f64)])
        .expect("iso")
        .get(0);
    assert_eq!(t["sent"], sent_iso);
    let delivery: i64 = e.get(8);
    assert_eq!(
        body["delivery"],
        json!({"id": delivery, "attempt": 1, "subscription": sub})
    );

    // webhooks.request() shows the body byte for byte as it was sent (once the attempt is
    // recorded: until then its timestamp is now), and the shape's header.
    wait_for("the attempt to be recorded", WAIT, || {
        let st: String = c
            .query_one(
                "SELECT status FROM webhooks.deliveries WHERE id = $1",
                &[&delivery],
            )
            .ok()?
            .get(0);
        (st == "succeeded").then_some(())
    });
    let req = c
        .query_one(
            "SELECT headers, body FROM webhooks.request($1)",
            &[&delivery],
        )
        .expect("request");
    assert_eq!(req.get::<_, String>(1), raw);
    let headers: Value = req.get(0);
    assert_eq!(headers["x-topic"], "orders/created_v2");
    assert_eq!(headers["webhook-signature"], "v1,***");
}

#[test]
fn javascript_json_is_what_json_stringify_gives_checked_by_node() {
    let dir = std::env::temp_dir().join(format!("pg_webhooks_js_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (port_file, secrets_file) = (dir.join("port"), dir.join("secrets.json"));
    std::fs::write(&secrets_file, "{}").expect("secrets");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js_receiver.js");
    struct Node(Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut node = Node(
        Command::new("node")
            .arg(&script)
            .arg(&port_file)
            .arg(&secrets_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("node"),
    );
    let port: u16 = wait_for("the Node receiver", WAIT, || {
        if let Ok(Some(s)) = node.0.try_wait() {
            panic!("node exited: {s}");
        }
        std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let mut c = admin();
    let mut secrets = serde_json::Map::new();
    let mut sub = |path: &str, shape: Option<Value>| -> i64 {
        let row = c
            .query_one(
                "SELECT id, secret FROM webhooks.subscribe($1, '{order.created}', signature => 'hex',
                        filter => '{\"customer\": \"javascript\"}', retry_schedule => '', shape => $2::text::jsonb)",
                &[&url(path), &shape.map(|s| s.to_string())],
            )
            .expect("subscribe");
        secrets.insert(path.to_string(), Value::String(row.get(1)));
        std::fs::write(&secrets_file, Value::Object(secrets.clone()).to_string()).expect("secrets");
        row.get(0)
    };
    let envelope = sub("/js-envelope", Some(json!({"json": "javascript"})));
    let templated = sub(
        "/js-template",
        Some(
            json!({"json": "javascript", "body": {"order": "{{ data }}", "amount": "{{ data.total }}", "at": "{{ created_at | unix_ms }}"}}),
        ),
    );
    let as_stored = sub("/as-stored", None);
    // Tricky numbers and strings (unicode, control characters, U+2028, quotes, keys that are
    // array indices), written by the application.
    app()
        .execute(
            "INSERT INTO shop.orders (id, customer, total, extra) VALUES (301, 'javascript', 59.90, $1::text::jsonb)",
            &[&r#"{"price": 59.90, "one": 1.0, "big": 1e21, "tenth": 0.1, "negzero": -0, "huge": 12345678901234567890,
                   "tiny": 1.5e-7, "text": "é ✓ 😀 \u0001\t\n\u2028\u2029 \"q\" \\ / \u007f", "10": 1, "2": 2, "b": [1.50, -0.0, 100]}"#],
        )
        .expect("order");
    let log = wait_for("three requests at the Node receiver", WAIT, || {
        let text = ureq::get(&url("/_log"))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let log: Vec<Value> = serde_json::from_str(&text).ok()?;
        (log.len() >= 3).then_some(log)
    });
    let at = |p: &str| {
        log.iter()
            .find(|r| r["path"] == p)
            .unwrap_or_else(|| panic!("no request on {p}: {log:?}"))
    };
    for p in ["/js-envelope", "/js-template"] {
        let r = at(p);
        assert_eq!(
            r["same"], true,
            "{p}: JSON.stringify(JSON.parse(body)) differs from the body: {r}"
        );
        assert_eq!(
            r["verified"], true,
            "{p}: the JSON.stringify(req.body) signature fails: {r}"
        );
        let raw = r["raw"].as_str().expect("raw");
        for spelled in [
            "59.9,",
            "\"one\":1,",
            "\"big\":1e+21",
            "\"tenth\":0.1",
            "\"negzero\":0",
            "12345678901234567000",
            "\"tiny\":1.5e-7",
            "\\u0001\\t\\n\u{2028}\u{2029}",
            "\\\"q\\\" \\\\ / \u{7f}",
            "\"b\":[1.5,0,100]",
        ] {
            assert!(raw.contains(spelled), "{p}: {spelled} not in {raw}");
        }
        assert!(
            raw.contains("{\"2\":2,\"10\":1,"),
            "{p}: array-index keys first: {raw}"
        );
    }
    // The control: the body as stored is not what JSON.stringify gives, and that receiver
    // refuses it (so the check above can fail).
    let r = at("/as-stored");
    assert_eq!(r["same"], false, "{r}");
    assert_eq!(r["verified"], false, "{r}");
    let mut c = admin();
    for (s, status) in [
        (envelope, "succeeded"),
        (templated, "succeeded"),
        (as_stored, "dead"),
    ] {
        wait_for(&format!("subscription {s} {status}"), WAIT, || {
            let st: String = c
                .query_one(
                    "SELECT status FROM webhooks.deliveries WHERE subscription_id = $1",
                    &[&s],
                )
                .ok()?
                .get(0);
            (st == status).then_some(())
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn set_shape_applies_to_attempts_made_after_it() {
    let rx = Receiver::start();
    let (sub, _) = subscribe(&rx, "/later", "later", "{order.created}", None, "");
    order(401, "later", "pending");
    let first = received(&rx, "/later", 1);
    assert_eq!(first[0]["json"]["type"], "order.created");
    assert!(first[0]["json"]["data"].is_object(), "the envelope");
    let mut c = admin();
    let shape = json!({"event_names": {"order.created": "ORDER_CREATED"}, "body": {"evt": "evt_{{ id }}", "type": "{{ type }}"}});
    c.execute(
        "SELECT webhooks.set_shape($1, $2::text::jsonb)",
        &[&sub, &shape.to_string()],
    )
    .expect("set_shape");
    let shown: Value = c
        .query_one(
            "SELECT shape FROM webhooks.subscriptions WHERE id = $1",
            &[&sub],
        )
        .expect("view")
        .get(0);
    assert_eq!(shown, shape);
    order(402, "later", "pending");
    let second = received(&rx, "/later", 2);
    let id = header(&second[1], "webhook-id");
    assert_eq!(
        second[1]["json"],
        json!({"evt": format!("evt_{id}"), "type": "ORDER_CREATED"})
    );
    // Removed again: a redelivery of the first event is the envelope again.
    c.execute("SELECT webhooks.set_shape($1, NULL)", &[&sub])
        .expect("unset");
    let d: i64 = c
        .query_one(
            "SELECT min(id) FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("delivery")
        .get(0);
    c.execute("SELECT webhooks.redeliver($1)", &[&d])
        .expect("redeliver");
    let third = received(&rx, "/later", 3);
    assert_eq!(third[2]["body"], first[0]["body"]);
    let shown: Option<Value> = c
        .query_one(
            "SELECT shape FROM webhooks.subscriptions WHERE id = $1",
            &[&sub],
        )
        .expect("view")
        .get(0);
    assert!(shown.is_none());
}

#[test]
fn a_value_a_filter_cannot_take_fails_the_attempt_and_is_retried() {
    let rx = Receiver::start();
    let (sub, _) = subscribe(
        &rx,
        "/bad-value",
        "badvalue",
        "{order.created}",
        Some(json!({"body": {"at": "{{ data.customer | unix }}"}})),
        "",
    );
    order(501, "badvalue", "pending");
    let mut c = admin();
    wait_for("the delivery to end dead", WAIT, || {
        let st: String = c
            .query_one(
                "SELECT status FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .ok()?
            .get(0);
        (st == "dead").then_some(())
    });
    let errors: Vec<String> = c
        .query(
            "SELECT a.error FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
              WHERE d.subscription_id = $1 ORDER BY a.attempt",
            &[&sub],
        )
        .expect("attempts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(errors.len(), 3, "retried per schedule: {errors:?}");
    for e in &errors {
        assert!(
            e.contains("shaping the body failed: unix: \"badvalue\" is not a timestamp"),
            "{e}"
        );
    }
    assert!(rx.log("/bad-value").is_empty(), "nothing was sent");
}

#[test]
fn replay_and_render_match_either_name_and_give_the_pushed_shape() {
    let rx = Receiver::start();
    let shape = json!({"event_names": {"order.paid": "ORDER_PAID"}, "delivery_id_header": "X-Delivery-Id",
                       "body": {"event": "{{ type }}", "order": "{{ data.id }}", "delivery": "{{ delivery_id }}"}});
    let (sub, _) = subscribe(&rx, "/replay", "replay", "{ORDER_PAID}", Some(shape), "");
    order(601, "replay", "paid"); // order.created (not subscribed) and order.paid
    let first = received(&rx, "/replay", 1);
    assert_eq!(first[0]["json"]["event"], "ORDER_PAID");
    let mut c = admin();
    for patterns in ["{ORDER_PAID}", "{order.paid}"] {
        let n: i32 = c
            .query_one(
                "SELECT webhooks.replay($1, now() - interval '1 hour', now(), $2::text::text[])",
                &[&sub, &patterns],
            )
            .expect("replay")
            .get(0);
        assert_eq!(n, 1, "replay by {patterns}");
    }
    let all = received(&rx, "/replay", 3);
    for r in &all {
        assert_eq!(header(r, "webhook-id"), header(&first[0], "webhook-id"));
        assert_eq!(header(r, "x-delivery-id"), header(&first[0], "webhook-id"));
    }
    fails(
        &mut c,
        &format!(
            "SELECT webhooks.replay({sub}, now() - interval '1 hour', now(), '{{ORDER_SHIPPED}}')"
        ),
        SqlState::INVALID_PARAMETER_VALUE,
    );

    // _render, as a pull API would call it, gives the pushed body; owner only.
    let mut su = cluster().connect();
    let row = su
        .query_one(
            "SELECT r.event_type, r.body, r.headers FROM webhooks._deliveries d, webhooks._render(d.subscription_id, d.event_seq, d.id) r
              WHERE d.subscription_id = $1 ORDER BY d.id LIMIT 1",
            &[&sub],
        )
        .expect("_render");
    assert_eq!(row.get::<_, String>(0), "ORDER_PAID");
    assert_eq!(
        row.get::<_, String>(1),
        first[0]["body"].as_str().expect("body")
    );
    assert_eq!(
        row.get::<_, Value>(2),
        json!({"X-Delivery-Id": header(&first[0], "webhook-id")})
    );
    fails(
        &mut c,
        "SELECT * FROM webhooks._render(1, 1)",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    let e = fails(
        &mut su,
        "SELECT * FROM webhooks._render(999999, 1)",
        SqlState::NO_DATA_FOUND,
    );
    assert!(e.contains("subscription 999999 does not exist"), "{e}");
}

#[test]
fn malformed_shapes_are_refused_and_nothing_is_written() {
    let mut c = admin();
    let count = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM webhooks.subscriptions WHERE url = 'http://127.0.0.1:9/x'", &[])
            .expect("count")
            .get(0)
    };
    let before = count(&mut c);
    let try_subscribe = |c: &mut Client, shape: &str, extra: &str| -> String {
        fails(
            c,
            &format!(
                "SELECT * FROM webhooks.subscribe('http://127.0.0.1:9/x', event_types => '{{order.*}}', shape => $q${shape}$q$::jsonb{extra})"
            ),
            SqlState::INVALID_PARAMETER_VALUE,
        )
    };
    for (shape, says) in [
        (r#"[]"#, "shape must be a JSON object"),
        (r#"null"#, "shape must be a JSON object"),
        (r#"{"bogus": 1}"#, "unknown key \"bogus\""),
        (
            r#"{"event_names": {"order.created": 7}}"#,
            "shape.event_names[\"order.created\"] must be a string",
        ),
        (
            r#"{"event_names": {"order.created": "X\r\nInjected: 1"}}"#,
            "printable ASCII",
        ),
        (
            r#"{"event_type_header": "Webhook-Id"}"#,
            "set by pg_webhooks",
        ),
        (
            r#"{"delivery_id_header": "bad header"}"#,
            "invalid header name",
        ),
        (r#"{"json": "ruby"}"#, "shape.json must be"),
        (
            r#"{"body": {"order": {"at": "{{ created_at | iso8601('+25:00') }}"}}}"#,
            "shape.body.order.at: iso8601: the offset",
        ),
        (
            r#"{"body": "{{ pg_read_file('/etc/passwd') }}"}"#,
            "unknown name \"pg_read_file\"",
        ),
        (
            r#"{"body": {"$function": "x"}}"#,
            "unknown operator \"$function\"",
        ),
        (
            r#"{"body": {"items": {"$each": "{{ data.items }}", "to": "{{ item.sku }}", "bad": 1}}}"#,
            "shape.body.items: \"bad\" does not belong",
        ),
        (r#"{"body": "{{ data.total"}"#, "without \"}}\""),
    ] {
        let e = try_subscribe(&mut c, shape, "");
        assert!(e.contains(says), "{shape}: {e}");
    }
    let deep = format!("{{\"body\": {}1{}}}", "[".repeat(40), "]".repeat(40));
    assert!(try_subscribe(&mut c, &deep, "").contains("deeper than 32"));
    let big = format!("{{\"body\": \"{}\"}}", "x".repeat(70_000));
    assert!(try_subscribe(&mut c, &big, "").contains("at most 65536"));
    // Headers that collide with the subscription's own.
    let e = try_subscribe(
        &mut c,
        r#"{"event_type_header": "x-tenant"}"#,
        ", headers => '{\"X-Tenant\": \"a\"}'",
    );
    assert!(
        e.contains("already one of this subscription's headers"),
        "{e}"
    );
    let e = try_subscribe(
        &mut c,
        r#"{"delivery_id_header": "X-Sig"}"#,
        ", signature => 'hex', signature_header => 'X-Sig'",
    );
    assert!(
        e.contains("already one of this subscription's headers"),
        "{e}"
    );
    // event_types may name renamed types, only those of the shape.
    let e = fails(&mut c, "SELECT * FROM webhooks.subscribe('http://127.0.0.1:9/x', event_types => '{ORDER_CREATED}')", SqlState::INVALID_PARAMETER_VALUE);
    assert!(
        e.contains("invalid event type pattern \"ORDER_CREATED\""),
        "{e}"
    );
    let e = fails(
        &mut c,
        r#"SELECT * FROM webhooks.subscribe('http://127.0.0.1:9/x', event_types => '{ORDER_CREATED}', shape => '{"event_names": {"order.created": "ORDER_NEW"}}')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(
        e.contains("invalid event type pattern \"ORDER_CREATED\""),
        "{e}"
    );
    assert_eq!(count(&mut c), before, "nothing was written");

    // set_shape: the same checks, against the subscription as it is; nothing changes.
    let shape = r#"{"event_names": {"order.created": "ORDER_CREATED"}}"#;
    let id: i64 = c
        .query_one(
            &format!("SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/x', event_types => '{{ORDER_CREATED}}', headers => '{{\"X-Tenant\": \"a\"}}', shape => '{shape}')"),
            &[],
        )
        .expect("subscribe")
        .get(0);
    for (bad, says) in [
        (
            r#"{"event_names": {"order.created": "ORDER_NEW"}}"#,
            "invalid event type pattern \"ORDER_CREATED\"",
        ),
        (
            r#"{"event_names": {"order.created": "ORDER_CREATED"}, "event_type_header": "X-TENANT"}"#,
            "already one of",
        ),
        (r#"{"body": "}}"}"#, "without \"{{\""),
    ] {
        let e = fails(
            &mut c,
            &format!("SELECT webhooks.set_shape({id}, '{bad}')"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
        assert!(e.contains(says), "{bad}: {e}");
    }
    let e = fails(
        &mut c,
        &format!("SELECT webhooks.set_shape({id}, NULL)"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(
        e.contains("ORDER_CREATED"),
        "removing the names its event_types use: {e}"
    );
    let kept: Value = c
        .query_one(
            "SELECT shape FROM webhooks.subscriptions WHERE id = $1",
            &[&id],
        )
        .expect("view")
        .get(0);
    assert_eq!(kept, serde_json::from_str::<Value>(shape).expect("json"));
    fails(
        &mut c,
        "SELECT webhooks.set_shape(999999, '{}')",
        SqlState::NO_DATA_FOUND,
    );
    // An application role may not change shapes.
    fails(
        &mut app(),
        &format!("SELECT webhooks.set_shape({id}, '{{}}')"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    c.execute("SELECT webhooks.unsubscribe($1)", &[&id])
        .expect("unsubscribe");
}

#[test]
fn a_template_whose_body_would_pass_max_payload_bytes_stops_and_is_never_sent() {
    let rx = Receiver::start();
    // Every element repeats the whole data: 300 items make a body of megabytes.
    let (sub, _) = subscribe(
        &rx,
        "/huge",
        "huge",
        "{order.created}",
        Some(json!({"body": {"$each": "{{ data.items }}", "to": "{{ data }}"}})),
        "",
    );
    app()
        .batch_execute(
            "BEGIN;
             INSERT INTO shop.orders (id, customer, total) VALUES (701, 'huge', 1);
             INSERT INTO shop.order_items (order_id, sku, qty) SELECT 701, 'SKU-' || g, g FROM generate_series(1, 300) g;
             COMMIT;",
        )
        .expect("order");
    let mut c = admin();
    wait_for("the delivery to end dead", WAIT, || {
        let st: String = c
            .query_one(
                "SELECT status FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .ok()?
            .get(0);
        (st == "dead").then_some(())
    });
    let errors: Vec<String> = c
        .query(
            "SELECT a.error FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = $1",
            &[&sub],
        )
        .expect("attempts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(errors.len(), 1, "dead at once, no retries: {errors:?}");
    assert!(
        errors[0].starts_with("payload of at least ")
            && errors[0].ends_with("bytes exceeds webhooks.max_payload_bytes (262144); not sent"),
        "{}",
        errors[0]
    );
    assert!(rx.log("/huge").is_empty(), "nothing was sent");
}
