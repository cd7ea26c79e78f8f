//! Delivery end to end: a live cluster with the worker, and tests/receiver.py on 127.0.0.1
//! verifying every signature with the official `standardwebhooks` library (or Python's hmac
//! for the hex style). Each test has its own entity, receiver paths and subscriptions.

mod common;

use common::{shared_cluster, wait_for, Cluster, Receiver};
use postgres::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn cluster() -> &'static Cluster {
    shared_cluster(
        "delivery",
        &[
            "webhooks.retry_schedule = '300ms,600ms'",
            "webhooks.max_in_flight_per_endpoint = 3",
            "webhooks.timeout = '5s'",
        ],
    )
}

fn db() -> Client {
    cluster().connect()
}

/// `<e>_orders` tracked as entity `<e>` with a status column.
fn orders(c: &mut Client, e: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE {e}_orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending', customer text, total numeric);
         SELECT webhooks.track('{e}_orders', entity => '{e}', status_column => 'status');"
    ))
    .expect("orders table");
}

/// Subscribe `path` of `rx` to `patterns` with extra named arguments; configures the
/// receiver to verify with the returned secret. Returns (id, secret).
fn subscribe(
    c: &mut Client,
    rx: &Receiver,
    path: &str,
    patterns: &str,
    extra: &str,
    answers: Value,
) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT id, secret FROM webhooks.subscribe($1, $2::text::text[]{extra})"),
            &[&rx.url(path), &patterns],
        )
        .expect("subscribe");
    let (id, secret): (i64, String) = (row.get(0), row.get(1));
    let mut config = json!({"path": path, "secret": secret, "style": "standard"});
    if let (Some(obj), Some(more)) = (config.as_object_mut(), answers.as_object()) {
        obj.extend(more.clone());
    }
    rx.configure(config);
    (id, secret)
}

fn delivery_states(c: &mut Client, sub: i64) -> Vec<(String, i32)> {
    c.query(
        "SELECT status, attempts FROM webhooks.deliveries WHERE subscription_id = $1 ORDER BY id",
        &[&sub],
    )
    .expect("deliveries")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn wait_until_all(c: &mut Client, sub: i64, n: usize, status: &str) -> Vec<(String, i32)> {
    let mut last = Vec::new();
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            &format!("{n} deliveries of subscription {sub} to be {status}"),
            WAIT,
            || {
                last = delivery_states(c, sub);
                (last.len() == n && last.iter().all(|(st, _)| st == status)).then(|| last.clone())
            },
        )
    }));
    done.unwrap_or_else(|e| {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (st, _) in &last {
            *seen.entry(st.clone()).or_default() += 1;
        }
        panic!(
            "{:?}; last seen: {seen:?} of {}",
            e.downcast_ref::<String>(),
            last.len()
        )
    })
}

/// A positive signal that the worker has taken every event committed so far as far as it
/// would: a fence event, committed now, reaches a subscription of its own only after the
/// worker has fanned out and claimed everything committed before it (fan-out goes in commit
/// order, claims look at every subscription). Use it to show that something did *not* happen.
fn fence(c: &mut Client, rx: &Receiver, name: &str) {
    let path = format!("/fence-{name}");
    let pattern = format!("{{fence_{name}.*}}");
    subscribe(c, rx, &path, &pattern, "", json!({}));
    c.batch_execute(&format!(
        "SELECT webhooks.emit('fence_{name}.passed', '{{}}')"
    ))
    .expect("emit the fence");
    rx.wait_for_requests(&path, 1, WAIT);
}

fn header<'a>(req: &'a Value, name: &str) -> &'a str {
    req["headers"][name].as_str().unwrap_or("")
}

#[test]
fn committed_events_arrive_signed_with_the_contract_headers_and_body() {
    let rx = Receiver::start();
    let mut c = db();
    orders(&mut c, "sig");
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/sig",
        "{sig.*}",
        ", headers => '{\"X-Api-Key\": \"k-123\"}'",
        json!({}),
    );
    c.batch_execute("INSERT INTO sig_orders (id, customer, total) VALUES (1, 'ada', 59.90)")
        .expect("insert");
    c.batch_execute("UPDATE sig_orders SET status = 'paid' WHERE id = 1")
        .expect("update");
    let got = rx.wait_for_requests("/sig", 3, WAIT);
    let types: Vec<&str> = got
        .iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["sig.created", "sig.status_updated", "sig.paid"]);
    let ids: Vec<String> = c
        .query(
            "SELECT id::text FROM webhooks.events WHERE entity = 'sig' ORDER BY seq",
            &[],
        )
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (req, id) in got.iter().zip(&ids) {
        assert_eq!(req["verified"], true, "signature must verify: {req}");
        assert_eq!(header(req, "webhook-id"), id);
        assert_eq!(req["json"]["id"], id.as_str());
        assert_eq!(header(req, "content-type"), "application/json");
        assert!(header(req, "user-agent").starts_with("pg_webhooks/"));
        assert_eq!(header(req, "x-api-key"), "k-123");
        let body = req["body"].as_str().unwrap_or("");
        assert!(!body.contains(": "), "compact JSON: {body}");
        assert!(
            body.contains(r#""total":59.90"#),
            "numbers exactly as stored: {body}"
        );
        assert!(
            body.starts_with(&format!(r#"{{"id":"{id}","type":"#)),
            "{body}"
        );
        assert!(req["json"]["created_at"]
            .as_str()
            .unwrap_or("")
            .ends_with('Z'));
        assert_eq!(req["json"]["data"]["customer"], "ada");
    }
    assert_eq!(
        wait_until_all(&mut c, sub, 3, "succeeded"),
        vec![("succeeded".to_string(), 1); 3]
    );
    let logged: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
              WHERE d.subscription_id = $1 AND a.status_code = 200 AND a.response_body = 'ok' AND a.error IS NULL",
            &[&sub],
        )
        .expect("attempts")
        .get(0);
    assert_eq!(logged, 3);
    let leaked: i64 = c
        .query_one("SELECT count(*) FROM webhooks.attempts WHERE response_body LIKE '%k-123%' OR error LIKE '%k-123%'", &[])
        .expect("leak check")
        .get(0);
    assert_eq!(leaked, 0);
    assert!(
        !cluster().server_log().contains("k-123"),
        "a header value reached the server log"
    );
}

#[test]
fn rolled_back_transactions_never_arrive() {
    let rx = Receiver::start();
    let mut c = db();
    orders(&mut c, "rbk");
    subscribe(&mut c, &rx, "/rbk", "{rbk.*}", "", json!({}));
    c.batch_execute("BEGIN; INSERT INTO rbk_orders (id) VALUES (1); ROLLBACK;")
        .expect("rollback");
    c.batch_execute("BEGIN; INSERT INTO rbk_orders (id) VALUES (2); SAVEPOINT s; INSERT INTO rbk_orders (id) VALUES (3); ROLLBACK TO s; COMMIT;")
        .expect("savepoint");
    let got = rx.wait_for_requests("/rbk", 1, WAIT);
    fence(&mut c, &rx, "rbk");
    let got_after = rx.log("/rbk");
    assert_eq!(got.len(), got_after.len());
    let keys: Vec<i64> = got_after
        .iter()
        .map(|r| r["json"]["data"]["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(keys, [2]);
}

#[test]
fn failures_are_retried_on_the_schedule_then_dead_and_redeliverable() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/retry",
        "{retry.*}",
        ", retry_schedule => '300ms,600ms'",
        json!({"default_status": 500}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('retry.tested', '{"n": 1}')"#)
        .expect("emit");
    let got = rx.wait_for_requests("/retry", 3, WAIT);
    let states = wait_until_all(&mut c, sub, 1, "dead");
    assert_eq!(states[0].1, 3, "attempts = 1 + number of waits");
    let at: Vec<f64> = got
        .iter()
        .map(|r| r["received_at"].as_f64().unwrap_or(0.0))
        .collect();
    assert!(
        at[1] - at[0] >= 0.27,
        "first wait ~300ms, was {}",
        at[1] - at[0]
    );
    assert!(
        at[2] - at[1] >= 0.54,
        "second wait ~600ms, was {}",
        at[2] - at[1]
    );
    let same_id = got
        .iter()
        .all(|r| header(r, "webhook-id") == header(&got[0], "webhook-id"));
    assert!(same_id, "webhook-id is the same on every attempt");
    assert!(got.iter().all(|r| r["verified"] == true));
    let row = c
        .query_one("SELECT id, last_status_code, last_error FROM webhooks.deliveries WHERE subscription_id = $1", &[&sub])
        .expect("dead row");
    let (dead_id, code, error): (i64, Option<i32>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(code, Some(500));
    assert_eq!(error.as_deref(), Some("HTTP 500"));
    let attempts: Vec<i32> = c
        .query(
            "SELECT attempt FROM webhooks.attempts WHERE delivery_id = $1 ORDER BY attempt",
            &[&dead_id],
        )
        .expect("attempts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, [1, 2, 3]);

    rx.configure(
        json!({"path": "/retry", "secret": rx_secret(&mut c, sub), "default_status": 200}),
    );
    let again: i64 = c
        .query_one("SELECT webhooks.redeliver($1)", &[&dead_id])
        .expect("redeliver")
        .get(0);
    let got = rx.wait_for_requests("/retry", 4, WAIT);
    assert_eq!(header(&got[3], "webhook-id"), header(&got[0], "webhook-id"));
    wait_for("the redelivery to succeed", WAIT, || {
        let row = c
            .query_one(
                "SELECT status, redelivery_of FROM webhooks.deliveries WHERE id = $1",
                &[&again],
            )
            .expect("redelivery");
        (row.get::<_, String>(0) == "succeeded")
            .then(|| assert_eq!(row.get::<_, Option<i64>>(1), Some(dead_id)))
    });
}

/// The current secret, read as the superuser the tests connect as.
fn rx_secret(c: &mut Client, sub: i64) -> String {
    c.query_one(
        "SELECT secret FROM webhooks._secrets WHERE subscription_id = $1",
        &[&sub],
    )
    .expect("secret")
    .get(0)
}

#[test]
fn retry_after_on_503_is_honoured() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/later",
        "{later.*}",
        ", retry_schedule => '100ms'",
        json!({"responses": [503], "retry_after": "2"}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('later.tested', '{}')"#)
        .expect("emit");
    let got = rx.wait_for_requests("/later", 2, WAIT);
    let gap = got[1]["received_at"].as_f64().unwrap_or(0.0)
        - got[0]["received_at"].as_f64().unwrap_or(0.0);
    assert!(
        gap >= 1.9,
        "Retry-After: 2 must beat the 100ms schedule, waited {gap}"
    );
    wait_until_all(&mut c, sub, 1, "succeeded");
}

#[test]
fn deliveries_of_one_order_keep_commit_order_under_failures_and_concurrency() {
    let rx = Receiver::start();
    let mut c = db();
    orders(&mut c, "ord");
    // Every third of the first 90 requests fails, so retries interleave with new events; a
    // schedule longer than the number of failures means none can end dead.
    let answers: Vec<u16> = (0..90)
        .map(|i| if i % 3 == 0 { 500 } else { 200 })
        .collect();
    let schedule = vec!["50ms"; 31].join(",");
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/ord",
        "{ord.*}",
        &format!(", retry_schedule => '{schedule}'"),
        json!({"responses": answers}),
    );
    let writers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut c = cluster().connect();
                for k in 0..5 {
                    let id = w * 100 + k;
                    c.batch_execute(&format!("INSERT INTO ord_orders (id) VALUES ({id})"))
                        .expect("insert");
                    for s in ["paid", "shipped", "delivered"] {
                        c.batch_execute(&format!(
                            "UPDATE ord_orders SET status = '{s}' WHERE id = {id}"
                        ))
                        .expect("update");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let events: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks.events WHERE entity = 'ord'",
            &[],
        )
        .expect("n")
        .get(0);
    assert_eq!(events, 20 * 7);
    wait_until_all(&mut c, sub, events as usize, "succeeded");
    let seq_of: HashMap<String, i64> = c
        .query(
            "SELECT id::text, seq FROM webhooks.events WHERE entity = 'ord'",
            &[],
        )
        .expect("seqs")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for req in rx.log("/ord") {
        let key = req["json"]["data"]["id"].to_string();
        by_key
            .entry(key)
            .or_default()
            .push(seq_of[header(&req, "webhook-id")]);
    }
    assert_eq!(by_key.len(), 20);
    for (key, seqs) in by_key {
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "order {key} arrived out of commit order: {seqs:?}"
        );
    }
}

#[test]
fn a_410_disables_the_subscription_and_keeps_its_backlog_for_resume() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, secret) = subscribe(
        &mut c,
        &rx,
        "/gone",
        "{gone.*}",
        "",
        json!({"responses": [410]}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('gone.first', '{}')"#)
        .expect("emit");
    wait_for("the subscription to be disabled", WAIT, || {
        let row = c
            .query_one(
                "SELECT state, disabled_reason FROM webhooks.subscriptions WHERE id = $1",
                &[&sub],
            )
            .expect("sub");
        (row.get::<_, String>(0) == "disabled").then(|| row.get::<_, Option<String>>(1))
    });
    c.batch_execute(r#"SELECT webhooks.emit('gone.second', '{}')"#)
        .expect("emit while disabled");
    fence(&mut c, &rx, "gone");
    assert_eq!(rx.log("/gone").len(), 1, "held while disabled");
    rx.configure(json!({"path": "/gone", "secret": secret, "default_status": 200}));
    c.execute("SELECT webhooks.resume($1)", &[&sub])
        .expect("resume");
    let got = rx.wait_for_requests("/gone", 3, WAIT);
    let mut types: Vec<&str> = got
        .iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or(""))
        .collect();
    types.sort();
    assert_eq!(
        types,
        ["gone.first", "gone.first", "gone.second"],
        "the held backlog flows again"
    );
    wait_until_all(&mut c, sub, 2, "succeeded");
}

#[test]
fn paused_subscriptions_hold_deliveries_until_resumed() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(&mut c, &rx, "/pause", "{pause.*}", "", json!({}));
    c.execute("SELECT webhooks.pause($1)", &[&sub])
        .expect("pause");
    c.batch_execute(
        r#"SELECT webhooks.emit('pause.one', '{}'); SELECT webhooks.emit('pause.two', '{}');"#,
    )
    .expect("emit");
    wait_for("deliveries to be queued", WAIT, || {
        (delivery_states(&mut c, sub).len() == 2).then_some(())
    });
    fence(&mut c, &rx, "pause");
    assert!(rx.log("/pause").is_empty(), "nothing goes out while paused");
    c.execute("SELECT webhooks.resume($1)", &[&sub])
        .expect("resume");
    rx.wait_for_requests("/pause", 2, WAIT);
    wait_until_all(&mut c, sub, 2, "succeeded");
}

#[test]
fn patterns_and_filters_select_events_and_new_subscriptions_get_only_later_events() {
    let rx = Receiver::start();
    let mut c = db();
    c.batch_execute(r#"SELECT webhooks.emit('flt.before', '{"region": "eu"}')"#)
        .expect("before");
    let (_exact, _) = subscribe(&mut c, &rx, "/exact", "{flt.shipped}", "", json!({}));
    let (_filtered, _) = subscribe(
        &mut c,
        &rx,
        "/eu",
        "{flt.*}",
        r#", filter => '{"region": "eu"}'"#,
        json!({}),
    );
    c.batch_execute(
        r#"SELECT webhooks.emit('flt.shipped', '{"region": "us"}');
           SELECT webhooks.emit('flt.paid', '{"region": "eu"}');
           SELECT webhooks.emit('flt.shipped', '{"region": "eu"}');"#,
    )
    .expect("emit");
    let exact = rx.wait_for_requests("/exact", 2, WAIT);
    let eu = rx.wait_for_requests("/eu", 2, WAIT);
    fence(&mut c, &rx, "flt");
    assert_eq!(rx.log("/exact").len(), 2);
    assert_eq!(
        rx.log("/eu").len(),
        2,
        "flt.before was committed before the subscription"
    );
    assert!(exact.iter().all(|r| r["json"]["type"] == "flt.shipped"));
    assert!(eu.iter().all(|r| r["json"]["data"]["region"] == "eu"));
}

#[test]
fn hex_signatures_verify_with_plain_hmac_of_the_body() {
    let rx = Receiver::start();
    let mut c = db();
    let row = c
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, '{hex.*}', signature => 'hex', signature_header => 'X-Shop-Signature')",
            &[&rx.url("/hex")],
        )
        .expect("subscribe");
    let secret: String = row.get(1);
    rx.configure(
        json!({"path": "/hex", "secret": secret, "style": "hex", "header": "X-Shop-Signature"}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('hex.tested', '{"a": 1}')"#)
        .expect("emit");
    let got = rx.wait_for_requests("/hex", 1, WAIT);
    assert_eq!(got[0]["verified"], true, "{}", got[0]);
    assert_eq!(header(&got[0], "x-shop-signature").len(), 64);
}

#[test]
fn during_a_rotation_grace_both_secrets_sign() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, old) = subscribe(&mut c, &rx, "/rot-old", "{rot.*}", "", json!({}));
    let new: String = c
        .query_one("SELECT webhooks.rotate_secret($1, '1 hour')", &[&sub])
        .expect("rotate")
        .get(0);
    // The same subscription URL path is verified by the old secret; a copy of the request
    // is not possible, so check the header carries two signatures and the old one verifies.
    c.batch_execute(r#"SELECT webhooks.emit('rot.tested', '{}')"#)
        .expect("emit");
    let got = rx.wait_for_requests("/rot-old", 1, WAIT);
    assert_eq!(
        got[0]["verified"], true,
        "the old secret still verifies during the grace"
    );
    let sigs: Vec<&str> = header(&got[0], "webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 2);
    assert!(sigs.iter().all(|s| s.starts_with("v1,")));
    // Now verify with the new secret only.
    rx.configure(json!({"path": "/rot-old", "secret": new, "style": "standard"}));
    c.execute("SELECT webhooks.send_test($1)", &[&sub])
        .expect("send_test");
    let got = rx.wait_for_requests("/rot-old", 2, WAIT);
    assert_eq!(got[1]["verified"], true, "the new secret verifies");
    assert_eq!(got[1]["json"]["type"], "webhook.test");
    assert_ne!(old, new);
}

#[test]
fn replay_redelivers_a_window_in_commit_order_with_the_same_ids() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(&mut c, &rx, "/replay", "{rpl.*}", "", json!({}));
    for i in 0..5 {
        c.batch_execute(&format!(
            r#"SELECT webhooks.emit('rpl.n', '{{"i": {i}}}', 'k')"#
        ))
        .expect("emit");
    }
    let first = rx.wait_for_requests("/replay", 5, WAIT);
    wait_until_all(&mut c, sub, 5, "succeeded");
    let n: i32 = c
        .query_one(
            "SELECT webhooks.replay($1, now() - interval '1 hour')",
            &[&sub],
        )
        .expect("replay")
        .get(0);
    assert_eq!(n, 5);
    let all = rx.wait_for_requests("/replay", 10, WAIT);
    let ids = |reqs: &[Value]| {
        reqs.iter()
            .map(|r| header(r, "webhook-id").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&all[5..]), ids(&first));
    let is: Vec<i64> = all[5..]
        .iter()
        .map(|r| r["json"]["data"]["i"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(is, [0, 1, 2, 3, 4]);
}

#[test]
fn an_event_committed_late_is_not_skipped() {
    let rx = Receiver::start();
    let mut c = db();
    subscribe(&mut c, &rx, "/late", "{late.*}", "", json!({}));
    let mut slow = cluster().connect();
    slow.batch_execute(r#"BEGIN; SELECT webhooks.emit('late.first_taken', '{}');"#)
        .expect("open txn");
    c.batch_execute(r#"SELECT webhooks.emit('late.second_taken', '{}')"#)
        .expect("emit");
    rx.wait_for_requests("/late", 1, WAIT);
    slow.batch_execute("COMMIT").expect("commit late");
    let got = rx.wait_for_requests("/late", 2, WAIT);
    assert_eq!(got[1]["json"]["type"], "late.first_taken");
}

#[test]
fn a_slow_endpoint_gets_at_most_its_cap_in_flight_and_does_not_starve_others() {
    let rx = Receiver::start();
    let mut c = db();
    subscribe(
        &mut c,
        &rx,
        "/slow",
        "{cap.*}",
        "",
        json!({"delay_ms": 700}),
    );
    subscribe(&mut c, &rx, "/fast", "{cap.*}", "", json!({}));
    for i in 0..9 {
        c.batch_execute(&format!(r#"SELECT webhooks.emit('cap.n', '{{"i": {i}}}')"#))
            .expect("emit");
    }
    // All nine reach the fast endpoint long before the slow one is done (9 x 700ms / 3).
    let fast = rx.wait_for_requests("/fast", 9, WAIT);
    let slow_so_far = rx.log("/slow").len();
    assert!(
        slow_so_far < 9,
        "the fast endpoint was not held back by the slow one"
    );
    assert_eq!(fast.len(), 9);
    let slow = rx.wait_for_requests("/slow", 9, WAIT);
    let starts: Vec<f64> = slow
        .iter()
        .map(|r| r["received_at"].as_f64().unwrap_or(0.0))
        .collect();
    for (i, s) in starts.iter().enumerate() {
        let overlapping = starts
            .iter()
            .filter(|t| **t <= *s && *s < **t + 0.69)
            .count();
        assert!(
            overlapping <= 3,
            "request {i} had {overlapping} in flight (cap 3)"
        );
    }
}

#[test]
fn the_worker_recovers_claimed_work_after_being_killed() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/crash",
        "{crash.*}",
        "",
        json!({"responses": [], "delay_ms": 1500}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('crash.tested', '{}')"#)
        .expect("emit");
    rx.wait_for_requests("/crash", 1, WAIT);
    let killed: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                   WHERE application_name = 'pg_webhooks worker') t",
            &[],
        )
        .expect("kill")
        .get(0);
    assert_eq!(
        killed, 1,
        "the worker shows in pg_stat_activity under its name"
    );
    rx.configure(
        json!({"path": "/crash", "secret": rx_secret(&mut c, sub), "default_status": 200}),
    );
    let got = rx.wait_for_requests("/crash", 2, WAIT);
    assert_eq!(
        header(&got[0], "webhook-id"),
        header(&got[1], "webhook-id"),
        "at-least-once, same id"
    );
    wait_until_all(&mut c, sub, 1, "succeeded");
}

#[test]
fn an_endpoint_failing_for_disable_after_is_disabled() {
    let own = Cluster::start(
        "disable",
        &[
            "webhooks.disable_after = '1s'",
            "webhooks.retry_schedule = '400ms,400ms,400ms,400ms,400ms,400ms'",
        ],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/failing",
        "{dis.*}",
        "",
        json!({"default_status": 500}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('dis.tested', '{}')"#)
        .expect("emit");
    let reason: String = wait_for("the subscription to be disabled", WAIT, || {
        let row = c
            .query_one(
                "SELECT state, disabled_reason FROM webhooks.subscriptions WHERE id = $1",
                &[&sub],
            )
            .expect("sub");
        (row.get::<_, String>(0) == "disabled").then(|| row.get(1))
    });
    assert!(reason.contains("failing"), "{reason}");
    let states = delivery_states(&mut c, sub);
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].0, "retrying", "the backlog is kept");
}

#[test]
fn nothing_is_lost_when_the_server_crashes() {
    let own = Cluster::start("crash", &["webhooks.retry_schedule = '200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms'"]);
    let rx = Receiver::start();
    let mut c = own.connect();
    let (sub, secret) = subscribe(
        &mut c,
        &rx,
        "/down",
        "{down.*}",
        "",
        json!({"default_status": 503}),
    );
    for i in 0..3 {
        c.batch_execute(&format!(
            r#"SELECT webhooks.emit('down.n', '{{"i": {i}}}', 'k')"#
        ))
        .expect("emit");
    }
    rx.wait_for_requests("/down", 1, WAIT);
    drop(c);
    own.crash_and_restart();
    rx.configure(json!({"path": "/down", "secret": secret, "default_status": 200}));
    let mut c = own.connect();
    wait_until_all(&mut c, sub, 3, "succeeded");
    let delivered: Vec<i64> = rx
        .log("/down")
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| r["json"]["data"]["i"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(delivered, [0, 1, 2], "all three, in commit order");
}

#[test]
fn one_deadline_per_attempt_capped_bodies_and_no_redirects() {
    let rx = Receiver::start();
    let mut c = db();
    let big = "x".repeat(20_000);
    let (slow, _) = subscribe(
        &mut c,
        &rx,
        "/deadline",
        "{deadline.*}",
        ", timeout => '300ms', retry_schedule => ''",
        json!({"delay_ms": 2000}),
    );
    let (chatty, _) = subscribe(
        &mut c,
        &rx,
        "/chatty",
        "{chatty.*}",
        ", retry_schedule => ''",
        json!({"body": big}),
    );
    let (moved, _) = subscribe(
        &mut c,
        &rx,
        "/moved",
        "{moved.*}",
        ", retry_schedule => ''",
        json!({"responses": [302]}),
    );
    c.batch_execute(
        r#"SELECT webhooks.emit('deadline.t', '{}'); SELECT webhooks.emit('chatty.t', '{}'); SELECT webhooks.emit('moved.t', '{}');"#,
    )
    .expect("emit");
    wait_until_all(&mut c, slow, 1, "dead");
    wait_until_all(&mut c, chatty, 1, "succeeded");
    wait_until_all(&mut c, moved, 1, "dead");
    let attempt = |c: &mut Client, sub: i64| {
        c.query_one(
            "SELECT a.duration_ms, a.status_code, a.error, length(a.response_body)
               FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = $1",
            &[&sub],
        )
        .expect("attempt")
    };
    let row = attempt(&mut c, slow);
    let (ms, code, error): (f64, Option<i32>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(code, None);
    assert_eq!(error.as_deref(), Some("timeout"));
    assert!(
        (250.0..1900.0).contains(&ms),
        "the 300ms deadline ended the attempt, not the 2s answer: {ms}"
    );
    let row = attempt(&mut c, chatty);
    assert_eq!(
        row.get::<_, Option<i32>>(3),
        Some(4096),
        "webhooks.max_response_bytes caps the kept body"
    );
    let row = attempt(&mut c, moved);
    assert_eq!(
        row.get::<_, Option<i32>>(1),
        Some(302),
        "a redirect is an answer, not followed"
    );
    assert_eq!(rx.log("/moved").len(), 1);
}

#[test]
fn the_worker_waits_for_its_database_and_the_extension_without_crashing() {
    let own = Cluster::start("latedb", &["webhooks.database = 'shop_later'"]);
    wait_for("the launcher to wait for the database", WAIT, || {
        own.server_log()
            .contains("waiting for database \"shop_later\"")
            .then_some(())
    });
    own.connect()
        .batch_execute("CREATE DATABASE shop_later")
        .expect("create database");
    // The worker is connected to the new database and waits for the extension there.
    wait_for("the worker to wait in the new database", WAIT, || {
        let n: i64 = own
            .connect()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE backend_type = 'pg_webhooks worker' AND datname = 'shop_later'",
                &[],
            )
            .expect("pg_stat_activity")
            .get(0);
        (n == 1).then_some(())
    });
    let rx = Receiver::start();
    let mut c = own.connect_db("shop_later");
    c.batch_execute("CREATE EXTENSION pg_webhooks")
        .expect("create extension");
    let (sub, _) = subscribe(&mut c, &rx, "/later-db", "{shop.*}", "", json!({}));
    c.batch_execute(r#"SELECT webhooks.emit('shop.opened', '{}')"#)
        .expect("emit");
    rx.wait_for_requests("/later-db", 1, WAIT);
    wait_until_all(&mut c, sub, 1, "succeeded");
    let log = own.server_log();
    assert!(
        !log.contains("FATAL"),
        "no worker crashed while waiting:\n{log}"
    );
    assert!(
        !log.contains("exited with exit code"),
        "no worker exited while waiting:\n{log}"
    );
}

/// pg_webhooks processes running on a server.
fn webhook_processes(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'pg_webhooks%'",
        &[],
    )
    .expect("pg_stat_activity")
    .get(0)
}

#[test]
fn a_standby_delivers_nothing_until_promoted_then_carries_on() {
    let primary = Cluster::start(
        "primary",
        &["webhooks.retry_schedule = '300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms'"],
    );
    let rx = Receiver::start();
    let mut p = primary.connect();
    let (sub, secret) = subscribe(&mut p, &rx, "/failover", "{fo.*}", "", json!({}));
    p.batch_execute(r#"SELECT webhooks.emit('fo.before', '{}')"#)
        .expect("emit");
    rx.wait_for_requests("/failover", 1, WAIT);
    let standby = primary.start_standby("standby");
    let mut s = standby.connect();
    assert_eq!(
        webhook_processes(&mut p),
        2,
        "launcher and worker on the primary"
    );
    rx.configure(json!({"path": "/failover", "secret": secret, "default_status": 503}));
    p.batch_execute(r#"SELECT webhooks.emit('fo.during', '{}')"#)
        .expect("emit");
    rx.wait_for_requests("/failover", 2, WAIT);
    // The failing delivery reached the standby through WAL; nothing runs there.
    wait_for("the standby to replay the delivery", WAIT, || {
        let n: i64 = s
            .query_one("SELECT count(*) FROM webhooks.deliveries", &[])
            .expect("count")
            .get(0);
        (n == 2).then_some(())
    });
    assert_eq!(
        webhook_processes(&mut s),
        0,
        "no pg_webhooks process on a standby"
    );
    primary.kill();
    rx.configure(json!({"path": "/failover", "secret": secret, "default_status": 200}));
    s.batch_execute("SELECT pg_promote()").expect("promote");
    wait_for("the worker to start on the promoted standby", WAIT, || {
        (webhook_processes(&mut s) == 2).then_some(())
    });
    s.batch_execute(r#"SELECT webhooks.emit('fo.after', '{}')"#)
        .expect("emit after promotion");
    wait_until_all(&mut s, sub, 3, "succeeded");
    let types: Vec<String> = rx
        .log("/failover")
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| r["json"]["type"].to_string())
        .collect();
    assert!(
        types.contains(&"\"fo.during\"".to_string()) && types.contains(&"\"fo.after\"".to_string()),
        "{types:?}"
    );
}

#[test]
fn retention_deletes_finished_history_and_keeps_what_is_still_queued() {
    let own = Cluster::start("retention", &["webhooks.retention = '1s'"]);
    let rx = Receiver::start();
    let mut c = own.connect();
    let (done, _) = subscribe(&mut c, &rx, "/kept-short", "{ret.*}", "", json!({}));
    let (stuck, _) = subscribe(
        &mut c,
        &rx,
        "/still-failing",
        "{ret.*}",
        ", retry_schedule => '1h'",
        json!({"default_status": 500}),
    );
    c.batch_execute(r#"SELECT webhooks.emit('ret.old', '{}')"#)
        .expect("emit");
    wait_until_all(&mut c, done, 1, "succeeded");
    wait_until_all(&mut c, stuck, 1, "retrying");
    std::thread::sleep(Duration::from_millis(1500));
    // Housekeeping runs when a worker starts, then once a minute: start a new one.
    c.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_webhooks worker'")
        .expect("restart the worker");
    wait_for("the finished delivery to be deleted", WAIT, || {
        delivery_states(&mut c, done).is_empty().then_some(())
    });
    let counts: (i64, i64) = {
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM webhooks.events WHERE type = 'ret.old'),
                        (SELECT count(*) FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
                          WHERE d.subscription_id = $1)",
                &[&stuck],
            )
            .expect("counts");
        (row.get(0), row.get(1))
    };
    assert_eq!(
        counts,
        (1, 1),
        "the event and attempt of the still-queued delivery are kept"
    );
    assert_eq!(delivery_states(&mut c, stuck).len(), 1);
}
