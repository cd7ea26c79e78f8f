//! A poll subscription's shape meets data it cannot shape (review of issue #11): one event
//! whose body fails (a `$each` over data that is not an array) or grows past
//! `webhooks.max_payload_bytes` (a nested `$each` over an order's items) must not stop the
//! consumer for good, as an ERROR raised for the whole batch did (every later poll() failed on
//! the same delivery, which could never be acknowledged): such a delivery ends dead at once,
//! as a push of it does, with the reason in its attempt and `last_error`, and the batch goes
//! on with the others. `webhooks.request()` of a delivery whose template explodes stops
//! building at the largest body any setting could send instead of exhausting memory.
//! Consumers and admins are non-superuser roles; events come from `webhooks.emit` by an admin.

mod common;

use common::{fails, shared_cluster, wait_for, Cluster};
use postgres::error::SqlState;
use postgres::Client;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn cluster() -> &'static Cluster {
    static ROLES: std::sync::Once = std::sync::Once::new();
    let cluster = shared_cluster("pollshape", &["webhooks.max_payload_bytes = 4096"]);
    ROLES.call_once(|| {
        cluster
            .connect()
            .batch_execute(
                "CREATE ROLE ps_admin LOGIN IN ROLE webhooks_admin;
                 CREATE ROLE ps_consumer LOGIN IN ROLE webhooks_consumer;
                 CREATE ROLE ps_reader LOGIN IN ROLE webhooks_reader;",
            )
            .expect("roles");
    });
    cluster
}

fn subscribe_poll(admin: &mut Client, pattern: &str, shape: &str) -> i64 {
    let id: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, ARRAY[$1], delivery => 'poll', shape => $2::text::jsonb)",
            &[&pattern, &shape],
        )
        .expect("subscribe")
        .get(0);
    admin
        .execute("SELECT webhooks.grant_poll($1, 'ps_consumer')", &[&id])
        .expect("grant_poll");
    id
}

fn emit(admin: &mut Client, event_type: &str, data: &str) {
    admin
        .execute(
            "SELECT webhooks.emit($1, $2::text::jsonb)",
            &[&event_type, &data],
        )
        .expect("emit");
}

fn queued(c: &mut Client, sub: i64, n: i64) {
    wait_for("fan-out", WAIT, || {
        let k: i64 = c
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .expect("count")
            .get(0);
        (k >= n).then_some(())
    });
}

/// poll() as the consumer: (cursor, event type, body).
fn poll(c: &mut Client, sub: i64, after: Option<i64>) -> Vec<(i64, String, String)> {
    c.query(
        "SELECT cursor, event_type, body FROM webhooks.poll($1, $2, 100)",
        &[&sub, &after],
    )
    .expect("poll")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"))
}

fn status_and_error(c: &mut Client, sub: i64, event_type: &str) -> (String, Option<String>) {
    let r = c
        .query_one(
            "SELECT status, last_error FROM webhooks.deliveries WHERE subscription_id = $1 AND event_type = $2",
            &[&sub, &event_type],
        )
        .expect("delivery");
    (r.get(0), r.get(1))
}

#[test]
fn an_event_its_shape_cannot_shape_ends_dead_and_the_consumer_goes_on() {
    let cluster = cluster();
    let mut admin = cluster.connect_as("postgres", "ps_admin");
    let mut consumer = cluster.connect_as("postgres", "ps_consumer");
    let sub = subscribe_poll(
        &mut admin,
        "bad.*",
        r#"{"body": {"type": "{{ type }}", "skus": {"$each": "{{ data.items }}", "to": "{{ item.sku }}"}}}"#,
    );
    emit(&mut admin, "bad.first", r#"{"items": [{"sku": "A"}]}"#);
    emit(&mut admin, "bad.poison", r#"{"items": "not an array"}"#);
    emit(
        &mut admin,
        "bad.last",
        r#"{"items": [{"sku": "B"}, {"sku": "C"}]}"#,
    );
    queued(&mut admin, sub, 3);

    let batch = poll(&mut consumer, sub, None);
    let types: Vec<&str> = batch.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        ["bad.first", "bad.last"],
        "the two that shape, in order: {batch:?}"
    );
    assert_eq!(
        json(&batch[0].2),
        serde_json::json!({"type": "bad.first", "skus": ["A"]})
    );
    assert_eq!(
        json(&batch[1].2),
        serde_json::json!({"type": "bad.last", "skus": ["B", "C"]})
    );
    let (status, error) = status_and_error(&mut admin, sub, "bad.poison");
    assert_eq!(status, "dead");
    let error = error.expect("last_error");
    assert!(
        error.contains("$each") && error.contains("not an array"),
        "{error}"
    );
    let attempt_error: Option<String> = admin
        .query_one(
            "SELECT a.error FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
              WHERE d.subscription_id = $1 AND d.event_type = 'bad.poison'",
            &[&sub],
        )
        .expect("one attempt of the dead delivery")
        .get(0);
    assert_eq!(attempt_error.as_deref(), Some(error.as_str()));

    // The cursor acknowledges the others; the subscription is then empty, not stuck.
    let last = batch.last().unwrap().0;
    assert!(poll(&mut consumer, sub, Some(last)).is_empty());
    for t in ["bad.first", "bad.last"] {
        assert_eq!(status_and_error(&mut admin, sub, t).0, "succeeded", "{t}");
    }
    // Dead ones are redeliverable once the shape is fixed, like any dead letter.
    admin
        .execute(
            r#"SELECT webhooks.set_shape($1, '{"body": {"type": "{{ type }}", "items": "{{ data.items }}"}}')"#,
            &[&sub],
        )
        .expect("set_shape");
    admin
        .execute(
            "SELECT webhooks.redeliver(id) FROM webhooks.deliveries WHERE subscription_id = $1 AND event_type = 'bad.poison'",
            &[&sub],
        )
        .expect("redeliver");
    let again = poll(&mut consumer, sub, Some(last));
    assert_eq!(again.len(), 1);
    assert_eq!(
        json(&again[0].2),
        serde_json::json!({"type": "bad.poison", "items": "not an array"})
    );
}

#[test]
fn a_shaped_body_past_max_payload_bytes_ends_dead_instead_of_being_built_whole() {
    let cluster = cluster();
    let mut admin = cluster.connect_as("postgres", "ps_admin");
    let mut consumer = cluster.connect_as("postgres", "ps_consumer");
    // Every item with every other item: n² elements from n items.
    let sub = subscribe_poll(
        &mut admin,
        "big.*",
        r#"{"body": {"pairs": {"$each": "{{ data.items }}", "as": "a",
                     "to": {"$each": "{{ data.items }}", "as": "b", "to": ["{{ a.sku }}", "{{ b.sku }}"]}}}}"#,
    );
    let small: Vec<String> = (0..3).map(|i| format!(r#"{{"sku": "S{i}"}}"#)).collect();
    let big: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"sku": "SKU-{i:05}"}}"#))
        .collect();
    emit(
        &mut admin,
        "big.small",
        &format!(r#"{{"items": [{}]}}"#, small.join(",")),
    );
    emit(
        &mut admin,
        "big.huge",
        &format!(r#"{{"items": [{}]}}"#, big.join(",")),
    );
    queued(&mut admin, sub, 2);

    let batch = poll(&mut consumer, sub, None);
    assert_eq!(
        batch.len(),
        1,
        "only the small one: {:?}",
        batch.iter().map(|b| &b.1).collect::<Vec<_>>()
    );
    assert_eq!(batch[0].1, "big.small");
    assert!(batch[0].2.len() < 4096);
    let (status, error) = status_and_error(&mut admin, sub, "big.huge");
    assert_eq!(status, "dead");
    let error = error.expect("last_error");
    assert!(
        error.contains("webhooks.max_payload_bytes (4096)"),
        "{error}"
    );
    assert!(poll(&mut consumer, sub, Some(batch[0].0)).is_empty());
    assert_eq!(
        status_and_error(&mut admin, sub, "big.small").0,
        "succeeded"
    );
}

#[test]
fn request_of_an_exploding_template_is_bounded() {
    let cluster = cluster();
    let mut admin = cluster.connect_as("postgres", "ps_admin");
    let mut reader = cluster.connect_as("postgres", "ps_reader");
    // Three nested $each over 250 items: 15.6 million elements (200 MB); 1000 items would be 13 GB.
    let sub: i64 = admin
        .query_one(
            r#"SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/never', '{boom.*}', shape => '{"body":
                 {"$each": "{{ data.items }}", "as": "a", "to": {"$each": "{{ data.items }}", "as": "b",
                  "to": {"$each": "{{ data.items }}", "as": "c", "to": "{{ a }}{{ b }}{{ c }}"}}}}')"#,
            &[],
        )
        .expect("subscribe")
        .get(0);
    admin
        .execute("SELECT webhooks.pause($1)", &[&sub])
        .expect("pause");
    let items: Vec<String> = (0..250).map(|i| i.to_string()).collect();
    emit(
        &mut admin,
        "boom.now",
        &format!(r#"{{"items": [{}]}}"#, items.join(",")),
    );
    queued(&mut admin, sub, 1);
    let id: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("delivery")
        .get(0);
    let e = fails(
        &mut reader,
        &format!("SELECT body FROM webhooks.request({id})"),
        SqlState::DATA_EXCEPTION,
    );
    assert!(e.contains("exceeds"), "{e}");
    // The backend is still there.
    reader.query_one("SELECT 1", &[]).expect("alive");
}
