//! Pull instead of push (`delivery => 'poll'`, `webhooks.poll()`) and samples
//! (`webhooks.send_test(id, event_type)`), end to end: a live cluster with the worker, orders
//! written by an application role, a consumer role that polls (dying and restarting with its
//! cursor while writers keep committing), and tests/receiver.py on 127.0.0.1 verifying the
//! signatures of the pushes and samples with the official `standardwebhooks` library.

mod common;

use common::{fails, shared_cluster, wait_for, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn cluster() -> &'static Cluster {
    shared_cluster("poll", &["webhooks.timeout = '5s'"])
}

/// Roles as a shop would have them: `<p>_admin` (webhooks_admin), `<p>_app` (writes orders,
/// nothing else), `<p>_consumer` (webhooks_consumer: polls what it is granted). Tables
/// `<p>_orders` (status column) and `<p>_items` tracked as entity `<p>` with `items`.
fn shop(c: &mut Client, p: &str) {
    c.batch_execute(&format!(
        "CREATE ROLE {p}_admin LOGIN; GRANT webhooks_admin TO {p}_admin;
         CREATE ROLE {p}_app LOGIN;
         CREATE ROLE {p}_consumer LOGIN; GRANT webhooks_consumer TO {p}_consumer;
         CREATE TABLE {p}_orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                                  customer text, email text, currency char(3), total numeric(10,2),
                                  placed_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE {p}_items (id serial PRIMARY KEY, order_id bigint NOT NULL REFERENCES {p}_orders,
                                 sku text NOT NULL, qty integer NOT NULL, price numeric(10,2));
         CREATE INDEX ON {p}_items (order_id);
         GRANT SELECT, INSERT, UPDATE, DELETE ON {p}_orders, {p}_items TO {p}_app;
         GRANT USAGE ON SEQUENCE {p}_items_id_seq TO {p}_app;
         SELECT webhooks.track('{p}_orders', entity => '{p}', status_column => 'status',
                               children => '{{\"items\": {{\"table\": \"{p}_items\", \"foreign_key\": \"order_id\"}}}}');"
    ))
    .expect("shop");
}

fn poll_subscription(admin: &mut Client, patterns: &str) -> i64 {
    admin
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, $1::text::text[], delivery => 'poll')",
            &[&patterns],
        )
        .expect("poll subscription")
        .get(0)
}

/// One row of poll(): (cursor, event id, type, body).
#[derive(Clone, Debug)]
struct Polled {
    cursor: i64,
    id: String,
    event_type: String,
    body: String,
}

fn poll(c: &mut Client, sub: i64, after: Option<i64>, limit: i32) -> Vec<Polled> {
    c.query(
        "SELECT cursor, event_id::text, event_type, body FROM webhooks.poll($1, $2, $3)",
        &[&sub, &after, &limit],
    )
    .expect("poll")
    .iter()
    .map(|r| Polled {
        cursor: r.get(0),
        id: r.get(1),
        event_type: r.get(2),
        body: r.get(3),
    })
    .collect()
}

/// Writer `w` of `n` orders: each created, paid, then (every other one) shipped with an item
/// changed, in separate transactions, as the application role.
fn write_orders(cluster: &Cluster, p: &str, w: i64, n: i64) {
    let mut app = cluster.connect_as("postgres", &format!("{p}_app"));
    for i in 0..n {
        let id = w * 100_000 + i;
        app.batch_execute(&format!(
            "BEGIN;
             INSERT INTO {p}_orders (id, customer, total) VALUES ({id}, 'c{id}', 10.50);
             INSERT INTO {p}_items (order_id, sku, qty) VALUES ({id}, 'A', 1), ({id}, 'B', 2);
             COMMIT;
             UPDATE {p}_orders SET status = 'paid' WHERE id = {id};"
        ))
        .expect("write");
        if i % 2 == 0 {
            app.batch_execute(&format!(
                "BEGIN; UPDATE {p}_items SET qty = qty + 1 WHERE order_id = {id} AND sku = 'A';
                        UPDATE {p}_orders SET status = 'shipped' WHERE id = {id}; COMMIT;"
            ))
            .expect("ship");
        }
    }
}

/// The consumer: polls `limit` at a time and "processes" each delivery (records it), persisting
/// its cursor after each one. Every few batches it dies: mid-batch (after processing only part
/// of the batch) or between batches, and a new connection goes on from the persisted cursor.
/// Returns when `until` says the stream is complete and a poll comes back empty.
fn consume(
    cluster: &Cluster,
    role: &str,
    sub: i64,
    limit: i32,
    mut until: impl FnMut() -> bool,
) -> (Vec<Polled>, usize) {
    let mut processed: Vec<Polled> = Vec::new();
    let mut cursor: Option<i64> = None; // what the consumer persisted
    let mut restarts = 0;
    let mut batch_no = 0u64;
    let mut complete = false;
    let mut c = cluster.connect_as("postgres", role);
    loop {
        let rows = poll(&mut c, sub, cursor, limit);
        if rows.is_empty() {
            // Empty after everything was fanned out: that call (with the last cursor)
            // acknowledged the last batch, and nothing more can come.
            if complete {
                return (processed, restarts);
            }
            complete = until();
            if !complete {
                std::thread::sleep(Duration::from_millis(20));
            }
            continue;
        }
        batch_no += 1;
        // Dies after processing a part of every 3rd batch; the rest comes again.
        let take = if batch_no % 3 == 0 {
            rows.len() / 2
        } else {
            rows.len()
        };
        for r in &rows[..take] {
            processed.push(r.clone());
            cursor = Some(r.cursor);
        }
        if batch_no % 3 == 0 || batch_no % 5 == 0 {
            drop(c);
            restarts += 1;
            c = cluster.connect_as("postgres", role);
        }
    }
}

#[test]
fn a_consumer_that_dies_and_restarts_with_its_cursor_gets_every_event_once_in_commit_order() {
    let cluster = cluster();
    let mut su = cluster.connect();
    shop(&mut su, "pe");
    let rx = Receiver::start();
    let mut admin = cluster.connect_as("postgres", "pe_admin");
    let sub = poll_subscription(&mut admin, "{pe.*}");
    admin
        .batch_execute(&format!("SELECT webhooks.grant_poll({sub}, 'pe_consumer')"))
        .expect("grant_poll");
    // A push subscription to the same events: the polled bodies must be what it receives.
    let row = admin
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, '{pe.*}')",
            &[&rx.url("/pe")],
        )
        .expect("push subscription");
    let (push, secret): (i64, String) = (row.get(0), row.get(1));
    rx.configure(json!({"path": "/pe", "secret": secret, "style": "standard"}));

    // Four writers commit concurrently while the consumer polls 7 at a time (the backlog is
    // hundreds of events, many times the limit).
    let writers: Vec<_> = (1..=4)
        .map(|w| std::thread::spawn(move || write_orders(cluster, "pe", w, 15)))
        .collect();
    let mut watcher = cluster.connect();
    let mut writers = Some(writers);
    let (processed, restarts) = consume(cluster, "pe_consumer", sub, 7, || {
        if let Some(ws) = writers.take() {
            if ws.iter().all(|w| w.is_finished()) {
                for w in ws {
                    w.join().expect("writer");
                }
            } else {
                writers = Some(ws);
                return false;
            }
        }
        // Everything committed has been fanned out to the poll subscription.
        let row = watcher
            .query_one(
                "SELECT (SELECT count(*) FROM webhooks.events WHERE entity = 'pe'),
                        (SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1)",
                &[&sub],
            )
            .expect("counts");
        row.get::<_, i64>(0) == row.get::<_, i64>(1)
    });
    assert!(restarts >= 5, "the consumer restarted {restarts} times");

    // Every event exactly once, in commit order per order (seq order of its events).
    let events: Vec<(String, String, String)> = su
        .query(
            "SELECT id::text, key, type FROM webhooks.events WHERE entity = 'pe' ORDER BY seq",
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        events.len(),
        4 * 15 * 3 + 4 * 8 * 2,
        "created, status_updated, paid each; status_updated, shipped every other"
    );
    let ids: Vec<&String> = processed.iter().map(|p| &p.id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event was processed twice");
    assert_eq!(
        unique,
        events.iter().map(|e| &e.0).collect::<HashSet<_>>(),
        "every event, none skipped"
    );
    let key_of: HashMap<&String, &String> = events.iter().map(|e| (&e.0, &e.1)).collect();
    let mut per_key_polled: HashMap<&String, Vec<&String>> = HashMap::new();
    for p in &processed {
        per_key_polled.entry(key_of[&p.id]).or_default().push(&p.id);
    }
    let mut per_key_committed: HashMap<&String, Vec<&String>> = HashMap::new();
    for e in &events {
        per_key_committed.entry(&e.1).or_default().push(&e.0);
    }
    assert_eq!(per_key_polled, per_key_committed, "per-order commit order");
    // Cursors only grow within what the consumer processed after each restart's re-poll.
    assert!(
        processed.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "cursors in order"
    );

    // Acknowledged: every delivery succeeded, with an attempt saying it was polled; the
    // health view counts them as delivered and nothing is left queued.
    let row = su
        .query_one(
            "SELECT count(*) FILTER (WHERE d.status = 'succeeded'), count(*),
                    (SELECT count(*) FROM webhooks.attempts a JOIN webhooks.deliveries x ON x.id = a.delivery_id
                      WHERE x.subscription_id = $1 AND a.response_body = 'acknowledged through webhooks.poll()'
                        AND a.status_code IS NULL AND a.error IS NULL),
                    (SELECT backlog FROM webhooks.subscription_health WHERE subscription_id = $1),
                    (SELECT delivered_1h FROM webhooks.subscription_health WHERE subscription_id = $1)
               FROM webhooks.deliveries d WHERE d.subscription_id = $1",
            &[&sub],
        )
        .expect("outcome");
    let n = events.len() as i64;
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
            row.get::<_, i64>(4)
        ),
        (n, n, n, 0, n)
    );
    // Those re-handed out after a mid-batch death were handed out twice.
    let twice: i64 = su
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1 AND attempts > 1",
            &[&sub],
        )
        .expect("twice")
        .get(0);
    assert!(
        twice > 0,
        "some deliveries were handed out again after a death"
    );

    // The same ids and bodies as the pushes of the same events, byte for byte.
    let pushed = rx.wait_for_requests("/pe", events.len(), WAIT);
    assert!(
        pushed.iter().all(|r| r["verified"] == json!(true)),
        "push signatures verify"
    );
    let pushed_bodies: HashMap<String, String> = pushed
        .iter()
        .map(|r| {
            (
                r["headers"]["webhook-id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["body"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for p in &processed {
        assert_eq!(
            pushed_bodies.get(&p.id),
            Some(&p.body),
            "poll body of {} equals the push",
            p.id
        );
        let body: Value = serde_json::from_str(&p.body).expect("body json");
        assert_eq!(body["type"], json!(p.event_type));
        assert_eq!(body["id"], json!(p.id));
    }
    let _ = push;
}

#[test]
fn two_pollers_of_one_subscription_take_turns_and_see_each_others_acknowledgements() {
    let cluster = cluster();
    let mut su = cluster.connect();
    shop(&mut su, "pt");
    let mut admin = cluster.connect_as("postgres", "pt_admin");
    let sub = poll_subscription(&mut admin, "{pt.*}");
    admin
        .batch_execute(&format!("SELECT webhooks.grant_poll({sub}, 'pt_consumer')"))
        .expect("grant");
    write_orders(cluster, "pt", 1, 10); // 10 x (created, status_updated, paid) + 5 x (status_updated, shipped)
    wait_for("fan-out", WAIT, || {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .expect("count")
            .get(0);
        (n == 40).then_some(())
    });
    let mut a = cluster.connect_as("postgres", "pt_consumer");
    a.batch_execute("BEGIN").expect("begin");
    let first = poll(&mut a, sub, None, 5);
    assert_eq!(first.len(), 5);
    // B polls while A's transaction holds the subscription: it waits for A.
    let b = std::thread::spawn(move || {
        let mut b = cluster.connect_as("postgres", "pt_consumer");
        b.batch_execute("SET application_name = 'poller_b'")
            .expect("name");
        poll(&mut b, sub, None, 5)
    });
    wait_for("poller B to wait for A's lock", WAIT, || {
        let waiting: bool = su
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'poller_b' AND wait_event_type = 'Lock')",
                &[],
            )
            .expect("activity")
            .get(0);
        waiting.then_some(())
    });
    // A acknowledges its five and takes the next five, then commits.
    let second = poll(&mut a, sub, Some(first[4].cursor), 5);
    a.batch_execute("COMMIT").expect("commit");
    let seen_by_b = b.join().expect("poller B");
    // B starts after A's acknowledgement: its first is A's sixth, and nothing is lost.
    assert_eq!(
        seen_by_b.iter().map(|p| p.cursor).collect::<Vec<_>>(),
        second.iter().map(|p| p.cursor).collect::<Vec<_>>()
    );
    let acked: i64 = su
        .query_one("SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1 AND status = 'succeeded'", &[&sub])
        .expect("acked")
        .get(0);
    assert_eq!(acked, 5);
}

#[test]
fn only_admins_and_granted_consumers_poll_and_bad_values_are_refused() {
    let cluster = cluster();
    let mut su = cluster.connect();
    shop(&mut su, "pp");
    su.batch_execute("CREATE ROLE pp_other LOGIN; GRANT webhooks_consumer TO pp_other;")
        .expect("roles");
    let mut admin = cluster.connect_as("postgres", "pp_admin");
    let sub = poll_subscription(&mut admin, "{pp.*}");
    let sub2 = poll_subscription(&mut admin, "{pp.*}");
    let rx = Receiver::start();
    let push: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.subscribe($1, '{pp.*}')",
            &[&rx.url("/pp")],
        )
        .expect("push")
        .get(0);
    let mut consumer = cluster.connect_as("postgres", "pp_consumer");
    let mut app = cluster.connect_as("postgres", "pp_app");
    let mut other = cluster.connect_as("postgres", "pp_other");
    // Not granted yet: refused.
    let msg = fails(
        &mut consumer,
        &format!("SELECT * FROM webhooks.poll({sub})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    assert!(msg.contains("grant_poll"), "{msg}");
    admin
        .batch_execute(&format!("SELECT webhooks.grant_poll({sub}, 'pp_consumer')"))
        .expect("grant");
    assert!(poll(&mut consumer, sub, None, 10).is_empty());
    // Granted one subscription, not the other; another consumer nothing; the application
    // role (not a consumer) cannot even call it.
    fails(
        &mut consumer,
        &format!("SELECT * FROM webhooks.poll({sub2})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut other,
        &format!("SELECT * FROM webhooks.poll({sub})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut app,
        &format!("SELECT * FROM webhooks.poll({sub})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    // Consumers cannot grant themselves, nor reach the private half.
    fails(
        &mut consumer,
        &format!("SELECT webhooks.grant_poll({sub2}, 'pp_consumer')"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut consumer,
        &format!("SELECT * FROM webhooks._poll({sub2}, NULL, 10)"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut admin,
        &format!("SELECT * FROM webhooks._poll({sub2}, NULL, 10)"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    // The view shows who may poll.
    let roles: Vec<String> = admin
        .query_one(
            "SELECT poll_roles::text[] FROM webhooks.subscriptions WHERE id = $1",
            &[&sub],
        )
        .expect("view")
        .get(0);
    assert_eq!(roles, vec!["pp_consumer".to_string()]);
    admin
        .batch_execute(&format!(
            "SELECT webhooks.revoke_poll({sub}, 'pp_consumer')"
        ))
        .expect("revoke");
    fails(
        &mut consumer,
        &format!("SELECT * FROM webhooks.poll({sub})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );

    // Bad values: 22023, nothing written.
    for sql in [
        format!("SELECT * FROM webhooks.poll({push})"),
        format!("SELECT * FROM webhooks.poll({sub}, NULL, 0)"),
        format!("SELECT * FROM webhooks.poll({sub}, NULL, 10001)"),
        format!("SELECT * FROM webhooks.poll({sub}, NULL, NULL)"),
        "SELECT * FROM webhooks.poll(NULL)".to_string(),
        format!("SELECT webhooks.grant_poll({push}, 'pp_consumer')"),
        format!("SELECT webhooks.grant_poll({sub}, NULL)"),
        "SELECT webhooks.subscribe('http://127.0.0.1:1/x', delivery => 'poll')".to_string(),
        "SELECT webhooks.subscribe(NULL, delivery => 'push')".to_string(),
        "SELECT webhooks.subscribe(NULL, delivery => 'pull''); DROP TABLE pp_orders; --')"
            .to_string(),
        "SELECT webhooks.subscribe(NULL, delivery => NULL)".to_string(),
        "SELECT webhooks.subscribe(NULL, headers => '{\"X-A\": \"b\"}', delivery => 'poll')"
            .to_string(),
        "SELECT webhooks.subscribe(NULL, retry_schedule => '1s', delivery => 'poll')".to_string(),
        "SELECT webhooks.subscribe(NULL, signature => 'hex', delivery => 'poll')".to_string(),
        format!(
            "SELECT webhooks.subscribe(NULL, delivery => 'poll{}')",
            "\u{1}".repeat(3)
        ),
    ] {
        fails(&mut admin, &sql, SqlState::INVALID_PARAMETER_VALUE);
    }
    fails(
        &mut admin,
        "SELECT * FROM webhooks.poll(987654321)",
        SqlState::NO_DATA_FOUND,
    );
    let subs: i64 = su
        .query_one("SELECT count(*) FROM webhooks.subscriptions", &[])
        .expect("n")
        .get(0);
    let polls: i64 = su
        .query_one(
            "SELECT count(*) FROM webhooks.subscriptions WHERE delivery = 'poll' AND url IS NULL",
            &[],
        )
        .expect("n")
        .get(0);
    assert!(subs >= 3 && polls >= 2);
    su.query_one("SELECT 1 FROM pp_orders LIMIT 1", &[]).ok();
}

#[test]
fn pause_resume_redeliver_replay_and_unsubscribe_behave_for_poll_subscriptions() {
    let cluster = cluster();
    let mut su = cluster.connect();
    shop(&mut su, "pl");
    let mut admin = cluster.connect_as("postgres", "pl_admin");
    let sub = poll_subscription(&mut admin, "{pl.created}");
    let start: std::time::SystemTime = su.query_one("SELECT now()", &[]).expect("now").get(0);
    write_orders(cluster, "pl", 1, 3);
    wait_for("fan-out", WAIT, || {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .expect("count")
            .get(0);
        (n == 3).then_some(())
    });
    // Never pushed: the worker leaves them queued, no attempt made.
    let first = poll(&mut admin, sub, None, 100);
    assert_eq!(first.len(), 3);
    // Paused: acknowledges what it is told, hands out nothing (held until resumed).
    admin
        .batch_execute(&format!("SELECT webhooks.pause({sub})"))
        .expect("pause");
    assert!(poll(&mut admin, sub, Some(first[0].cursor), 100).is_empty());
    let backlog: i64 = admin
        .query_one(
            "SELECT backlog FROM webhooks.subscription_health WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("health")
        .get(0);
    assert_eq!(backlog, 2);
    admin
        .batch_execute(&format!("SELECT webhooks.resume({sub})"))
        .expect("resume");
    let rest = poll(&mut admin, sub, None, 100);
    assert_eq!(
        rest.iter().map(|p| p.cursor).collect::<Vec<_>>(),
        vec![first[1].cursor, first[2].cursor]
    );
    assert!(poll(&mut admin, sub, Some(rest[1].cursor), 100).is_empty());

    // Redeliver an acknowledged one: a new delivery, same event id, out of poll().
    let again: i64 = admin
        .query_one("SELECT webhooks.redeliver($1)", &[&first[0].cursor])
        .expect("redeliver")
        .get(0);
    let got = poll(&mut admin, sub, None, 100);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].cursor, &got[0].id), (again, &first[0].id));
    // Replay the window: the three events again, in commit order, same ids.
    let n: i32 = admin
        .query_one("SELECT webhooks.replay($1, $2)", &[&sub, &start])
        .expect("replay")
        .get(0);
    assert_eq!(n, 3);
    let replayed = poll(&mut admin, sub, Some(got[0].cursor), 100);
    assert_eq!(
        replayed.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        first.iter().map(|p| p.id.clone()).collect::<Vec<_>>()
    );
    // No attempts by the worker, ever: only the acknowledgements.
    let http: i64 = su
        .query_one(
            "SELECT count(*) FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
              WHERE d.subscription_id = $1 AND a.response_body IS DISTINCT FROM 'acknowledged through webhooks.poll()'",
            &[&sub],
        )
        .expect("attempts")
        .get(0);
    assert_eq!(http, 0);
    // Unsubscribe: what was not acknowledged ends dead, poll() says the subscription is gone.
    admin
        .batch_execute(&format!("SELECT webhooks.unsubscribe({sub})"))
        .expect("unsubscribe");
    let states: Vec<String> = su
        .query(
            "SELECT status FROM webhooks.deliveries WHERE subscription_id = $1 ORDER BY id",
            &[&sub],
        )
        .expect("states")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        states,
        vec![
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "dead",
            "dead",
            "dead"
        ]
    );
    fails(
        &mut admin,
        &format!("SELECT * FROM webhooks.poll({sub}, {})", replayed[2].cursor),
        SqlState::NO_DATA_FOUND,
    );
}

#[test]
fn retention_keeps_what_a_poll_subscription_has_not_acknowledged() {
    let own = Cluster::start("poll_retention", &["webhooks.retention = '1s'"]);
    let mut c = own.connect();
    let sub: i64 = c
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, '{ret.*}', delivery => 'poll')",
            &[],
        )
        .expect("subscribe")
        .get(0);
    c.batch_execute(
        "SELECT webhooks.emit('ret.one', '{}'); SELECT webhooks.emit('ret.two', '{}');",
    )
    .expect("emit");
    wait_for("fan-out", WAIT, || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .expect("count")
            .get(0);
        (n == 2).then_some(())
    });
    let got = poll(&mut c, sub, None, 1);
    assert!(poll(&mut c, sub, Some(got[0].cursor), 1).len() == 1);
    std::thread::sleep(Duration::from_millis(1500));
    c.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_webhooks worker'")
        .expect("restart the worker");
    wait_for("the acknowledged delivery to be deleted", WAIT, || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .expect("count")
            .get(0);
        (n == 1).then_some(())
    });
    // The unacknowledged one, and its event, are still there and still come out of poll().
    let left = poll(&mut c, sub, None, 10);
    assert_eq!(
        left.iter()
            .map(|p| p.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["ret.two"]
    );
}

/// The received requests of `path` by type.
fn received(rx: &Receiver, path: &str, n: usize) -> HashMap<String, Value> {
    rx.wait_for_requests(path, n, WAIT)
        .into_iter()
        .map(|r| {
            assert_eq!(r["verified"], json!(true), "signature verified: {r}");
            (
                r["json"]["type"].as_str().unwrap_or_default().to_string(),
                r["json"].clone(),
            )
        })
        .collect()
}

#[test]
fn send_test_sends_realistic_samples_of_the_tracked_tables_event_types_to_one_subscription() {
    let cluster = cluster();
    let mut su = cluster.connect();
    shop(&mut su, "ps");
    let rx = Receiver::start();
    let mut admin = cluster.connect_as("postgres", "ps_admin");
    let row = admin
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, '{ps.*}')",
            &[&rx.url("/ps")],
        )
        .expect("subscribe");
    let (sub, secret): (i64, String) = (row.get(0), row.get(1));
    rx.configure(json!({"path": "/ps", "secret": secret, "style": "standard"}));
    let bystander = admin
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, '{ps.*}')",
            &[&rx.url("/bystander")],
        )
        .expect("subscribe");
    let _: i64 = bystander.get(0);
    let types = [
        "ps.created",
        "ps.updated",
        "ps.status_updated",
        "ps.shipped",
        "ps.paid",
        "ps.deleted",
    ];
    for t in types {
        admin
            .query_one("SELECT webhooks.send_test($1, $2)", &[&sub, &t])
            .expect("send_test");
    }
    admin
        .query_one("SELECT webhooks.send_test($1)", &[&sub])
        .expect("send_test webhook.test");
    let got = received(&rx, "/ps", types.len() + 1);
    assert!(got.contains_key("webhook.test"));

    // A receiver written for these types finds what capture would send.
    let created = &got["ps.created"]["data"];
    assert_eq!(created["id"], json!(1001));
    assert_eq!(created["status"], json!("pending"));
    assert_eq!(created["currency"], json!("EUR"));
    assert!(created["email"].as_str().is_some_and(|e| e.contains('@')));
    assert!(
        created["total"].is_number() && created["placed_at"].is_string(),
        "{created}"
    );
    let items = created["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    for (n, item) in items.iter().enumerate() {
        assert_eq!(item["order_id"], json!(1001));
        assert_eq!(item["id"], json!(n + 1));
        assert!(item["sku"].is_string() && item["qty"].is_number());
    }
    let shipped = &got["ps.shipped"]["data"];
    assert_eq!(
        (&shipped["status"], &shipped["previous_status"]),
        (&json!("shipped"), &json!("pending"))
    );
    assert!(shipped["items"].is_array());
    let status = &got["ps.status_updated"]["data"];
    assert_eq!(
        (&status["status"], &status["previous_status"]),
        (&json!("paid"), &json!("pending"))
    );
    assert_eq!(got["ps.paid"]["data"]["status"], json!("paid"));
    assert!(got["ps.updated"]["data"].get("previous_status").is_none());
    let deleted = &got["ps.deleted"]["data"];
    assert!(
        deleted.get("items").is_none() && deleted["id"] == json!(1001),
        "{deleted}"
    );
    // Its body is exactly what capture's keys are: the columns, the children, status fields.
    let mut keys: Vec<&String> = shipped.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "currency",
            "customer",
            "email",
            "id",
            "items",
            "placed_at",
            "previous_status",
            "status",
            "total"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .iter()
        .collect::<Vec<_>>()
    );
    // Delivered to this subscription only, never fanned out, never replayed: no other
    // subscription has a delivery of a sample, and the bystander, which does get the next
    // real event, got nothing before it.
    let elsewhere: i64 = su
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries d JOIN webhooks.events e ON e.id = d.event_id
              WHERE e.entity = 'webhook' AND e.type LIKE 'ps.%' AND d.subscription_id <> $1",
            &[&sub],
        )
        .expect("deliveries")
        .get(0);
    assert_eq!(elsewhere, 0);
    su.batch_execute("INSERT INTO ps_orders (id, customer) VALUES (1, 'real')")
        .expect("a real order");
    let real = rx.wait_for_requests("/bystander", 1, WAIT);
    assert_eq!(real.len(), 1);
    assert_eq!(real[0]["json"]["type"], json!("ps.created"));
    assert_eq!(real[0]["json"]["data"]["customer"], json!("real"));
    let replayed: i32 = admin
        .query_one(
            "SELECT webhooks.replay($1, now() - interval '1 hour')",
            &[&sub],
        )
        .expect("replay")
        .get(0);
    assert_eq!(replayed, 1, "the real order's event, none of the samples");
    // The samples are marked as made by pg_webhooks (entity 'webhook', no key).
    let marked: i64 = su
        .query_one("SELECT count(*) FROM webhooks.events WHERE entity = 'webhook' AND key IS NULL AND type LIKE 'ps.%'", &[])
        .expect("events")
        .get(0);
    assert_eq!(marked, types.len() as i64);

    // Unknown types and entities: 22023 with the valid ones in the hint; nothing queued.
    let before: i64 = su
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("n")
        .get(0);
    for bad in [
        "ps.exploded",
        "nosuch.created",
        "ps",
        "",
        "ps.created'; DROP TABLE ps_orders; --",
        "ps.\u{7f}",
    ] {
        let msg = fails(
            &mut admin,
            &format!(
                "SELECT webhooks.send_test({sub}, '{}')",
                bad.replace('\'', "''")
            ),
            SqlState::INVALID_PARAMETER_VALUE,
        );
        assert!(
            msg.contains("ps.shipped")
                && msg.contains("ps.status_updated")
                && msg.contains("webhook.test"),
            "{msg}"
        );
    }
    let huge = "x".repeat(100_000);
    fails(
        &mut admin,
        &format!("SELECT webhooks.send_test({sub}, '{huge}')"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    let after: i64 = su
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("n")
        .get(0);
    assert_eq!(before, after);
    su.query_one("SELECT count(*) FROM ps_orders", &[])
        .expect("the table is still there");

    // For a poll subscription, the sample comes out of poll(), shaped as its other deliveries.
    let polled = poll_subscription(&mut admin, "{ps.*}");
    let d: i64 = admin
        .query_one("SELECT webhooks.send_test($1, 'ps.shipped')", &[&polled])
        .expect("send")
        .get(0);
    let rows = poll(&mut admin, polled, None, 10);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].cursor, rows[0].event_type.as_str()),
        (d, "ps.shipped")
    );
    let body: Value = serde_json::from_str(&rows[0].body).expect("json");
    assert_eq!(body["data"]["status"], json!("shipped"));
    assert_eq!(body["data"]["items"].as_array().map(Vec::len), Some(2));
}

#[test]
fn samples_follow_the_column_types_enums_and_a_table_without_children() {
    let cluster = cluster();
    let mut su = cluster.connect();
    su.batch_execute(
        "CREATE TYPE pk_state AS ENUM ('new', 'paid', 'gone');
         CREATE DOMAIN pk_money AS numeric(8,3) CHECK (VALUE >= 0);
         CREATE TABLE pk_tickets (code uuid PRIMARY KEY, state pk_state NOT NULL, price pk_money,
                                  tags text[], meta jsonb, due date, flag boolean, ratio float8,
                                  note varchar(4));
         SELECT webhooks.track('pk_tickets', entity => 'pk', key_column => 'code', status_column => 'state');
         INSERT INTO webhooks.status_events VALUES ('pk', 'gone', 'pk.vanished');",
    )
    .expect("table");
    let sub: i64 = su
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, '{pk.*}', delivery => 'poll')",
            &[],
        )
        .expect("subscribe")
        .get(0);
    for t in ["pk.created", "pk.status_updated", "pk.vanished"] {
        su.query_one("SELECT webhooks.send_test($1, $2)", &[&sub, &t])
            .expect("send_test");
    }
    let rows = poll(&mut su, sub, None, 10);
    let by_type: HashMap<String, Value> = rows
        .iter()
        .map(|r| {
            (
                r.event_type.clone(),
                serde_json::from_str::<Value>(&r.body).expect("json")["data"].clone(),
            )
        })
        .collect();
    let created = &by_type["pk.created"];
    assert!(
        created["code"].as_str().is_some_and(|s| s.len() == 36),
        "{created}"
    );
    assert_eq!(created["state"], json!("new"));
    // numeric(8,3) through the domain: its scale kept, as capture writes it (the raw body).
    let raw = &rows
        .iter()
        .find(|r| r.event_type == "pk.created")
        .expect("created")
        .body;
    assert!(raw.contains("\"price\":29.950"), "{raw}");
    assert_eq!(
        (&created["tags"], &created["meta"], &created["flag"]),
        (&json!([]), &json!({}), &json!(true))
    );
    assert!(created["due"].is_string() && created["ratio"].is_number());
    assert_eq!(created["note"].as_str().map(str::len), Some(4));
    let status = &by_type["pk.status_updated"];
    assert_eq!(
        (&status["previous_status"], &status["status"]),
        (&json!("new"), &json!("paid"))
    );
    assert_eq!(by_type["pk.vanished"]["state"], json!("gone"));
    // The table has no children: no other keys than its columns (and the status pair).
    assert_eq!(created.as_object().map(|o| o.len()), Some(9));
}

/// The README's shell loop, as written there: it consumes a backlog larger than its limit,
/// is killed and started again, and ends with every event, in order, none lost.
#[test]
fn the_readme_shell_loop_consumes_a_poll_subscription_across_a_kill() {
    let cluster = cluster();
    let mut su = cluster.connect();
    su.batch_execute("CREATE ROLE pr_consumer LOGIN; GRANT webhooks_consumer TO pr_consumer;")
        .expect("role");
    let sub: i64 = su
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, '{pr.*}', delivery => 'poll')",
            &[],
        )
        .expect("subscribe")
        .get(0);
    su.batch_execute(&format!("SELECT webhooks.grant_poll({sub}, 'pr_consumer')"))
        .expect("grant");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let block = readme
        .split("<!-- poll-loop: tests/poll.rs runs this block -->\n```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the loop in the README");
    assert!(block.starts_with("sub=7\n"));
    let script = block.replacen("sub=7", &format!("sub={sub}"), 1);
    let dir = std::env::temp_dir().join(format!("pg_webhooks_poll_loop_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("loop.sh"), script).expect("script");
    let path = format!(
        "{}:{}",
        common::pg_bindir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let start = || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("bash")
            .arg("loop.sh")
            .current_dir(&dir)
            .env("PATH", &path)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", cluster.port.to_string())
            .env("PGDATABASE", "postgres")
            .env("PGUSER", "pr_consumer")
            .process_group(0)
            .spawn()
            .expect("bash loop.sh")
    };
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a body per line"))
            .collect()
    };
    let kill = |child: &mut std::process::Child| {
        // The loop's process group: bash and its psql or sleep.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    };
    su.batch_execute("SELECT webhooks.emit('pr.tick', jsonb_build_object('n', n), 'k') FROM generate_series(1, 150) n")
        .expect("emit");
    let mut child = start();
    wait_for("the first batch to be processed", WAIT, || {
        (lines().len() >= 100).then_some(())
    });
    kill(&mut child);
    su.batch_execute("SELECT webhooks.emit('pr.tick', jsonb_build_object('n', n), 'k') FROM generate_series(151, 200) n")
        .expect("emit");
    let mut child = start();
    let got = wait_for("every event in events.jsonl", WAIT, || {
        let l = lines();
        let unique: HashSet<String> = l.iter().map(|b| b["id"].to_string()).collect();
        (unique.len() >= 200).then_some(l)
    });
    kill(&mut child);
    // In order (one key), at most the one line processed when the kill came twice.
    let mut ns: Vec<i64> = got
        .iter()
        .map(|b| b["data"]["n"].as_i64().expect("n"))
        .collect();
    assert!(got.len() <= 201, "{} lines", got.len());
    ns.dedup();
    assert_eq!(ns, (1..=200).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A poll subscription with a shape gets what a push subscription with the same shape is sent:
/// the renamed type (also subscribed to by that name) and the body from the template, in
/// JavaScript's spelling; delivery_id is the cursor.
#[test]
fn a_shaped_poll_subscription_gets_the_renamed_types_and_bodies_pushes_get() {
    let mut su = cluster().connect();
    shop(&mut su, "pshape");
    let mut admin = cluster().connect_as("postgres", "pshape_admin");
    let shape = r#"{"event_names": {"pshape.created": "ORDER_CREATED", "pshape.paid": "ORDER_PAID"},
                    "json": "javascript",
                    "body": {"event": "{{ type }}", "order": "ORD-{{ data.id }}", "total": "{{ data.total }}",
                             "skus": {"$each": "{{ data.items }}", "to": "{{ item.sku }}"},
                             "n": "{{ delivery_id }}"}}"#;
    let sub: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, '{ORDER_CREATED, pshape.paid}', shape => $1::text::jsonb,
                                               delivery => 'poll')",
            &[&shape],
        )
        .expect("a shaped poll subscription")
        .get(0);
    let rx = Receiver::start();
    let push: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.subscribe($1, '{ORDER_CREATED, pshape.paid}', shape => $2::text::jsonb)",
            &[&rx.url("/pshape"), &shape],
        )
        .expect("the same shape, pushed")
        .get(0);
    let mut app = cluster().connect_as("postgres", "pshape_app");
    app.batch_execute(
        "BEGIN; INSERT INTO pshape_orders (id, total) VALUES (7, 59.90);
                INSERT INTO pshape_items (order_id, sku, qty) VALUES (7, 'A', 1), (7, 'B', 2); COMMIT;",
    )
    .expect("order 7");
    app.batch_execute("UPDATE pshape_orders SET status = 'paid' WHERE id = 7")
        .expect("paid");
    let got = wait_for("both events to be pollable", WAIT, || {
        let rows = poll(&mut admin, sub, None, 10);
        (rows.len() == 2).then_some(rows)
    });
    let types: Vec<&str> = got.iter().map(|p| p.event_type.as_str()).collect();
    assert_eq!(types, ["ORDER_CREATED", "ORDER_PAID"]);
    for p in &got {
        let body: Value = serde_json::from_str(&p.body).expect("a JSON body");
        assert_eq!(body["event"], p.event_type.as_str());
        assert_eq!(body["order"], "ORD-7");
        assert_eq!(body["skus"], json!(["A", "B"]));
        assert_eq!(body["n"], json!(p.cursor), "delivery_id is the cursor");
        assert!(
            p.body.contains("\"total\":59.9") && !p.body.contains("59.90"),
            "JavaScript's spelling: {}",
            p.body
        );
    }
    // The pushes of the same shape: the same bodies but for the delivery id.
    let pushed = rx.wait_for_requests("/pshape", 2, WAIT);
    for (p, r) in got.iter().zip(&pushed) {
        let mut a: Value = serde_json::from_str(&p.body).expect("polled body");
        let mut b: Value = r["json"].clone();
        a["n"] = Value::Null;
        b["n"] = Value::Null;
        assert_eq!(a, b, "polled and pushed bodies");
        assert_eq!(r["headers"]["webhook-id"].as_str(), Some(p.id.as_str()));
    }
    let _ = push;
}

/// send_test warns when the subscription would not receive the type it samples; a
/// subscription that names the type by its shape's name receives it, so no warning.
#[test]
fn send_test_knows_a_subscription_that_names_the_type_by_its_shape_receives_it() {
    let mut su = cluster().connect();
    shop(&mut su, "pnotice");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = notices.clone();
    let mut admin = postgres::Config::new()
        .host("127.0.0.1")
        .port(cluster().port)
        .user("pnotice_admin")
        .dbname("postgres")
        .notice_callback(move |n| seen.lock().expect("notices").push(n.message().to_string()))
        .connect(postgres::NoTls)
        .expect("admin with notices");
    let renamed: i64 = admin
        .query_one(
            r#"SELECT id FROM webhooks.subscribe(NULL, '{ORDER_CREATED}', delivery => 'poll',
                   shape => '{"event_names": {"pnotice.created": "ORDER_CREATED"}}')"#,
            &[],
        )
        .expect("a subscription by the renamed type")
        .get(0);
    let other: i64 = admin
        .query_one("SELECT id FROM webhooks.subscribe(NULL, '{pnotice.deleted}', delivery => 'poll')", &[])
        .expect("a subscription to another type")
        .get(0);
    admin
        .execute("SELECT webhooks.send_test($1, 'pnotice.created')", &[&renamed])
        .expect("sample to the renamed subscription");
    assert!(
        notices.lock().expect("notices").is_empty(),
        "no warning for a subscription that receives the type by its renamed name: {:?}",
        notices.lock().expect("notices")
    );
    admin
        .execute("SELECT webhooks.send_test($1, 'pnotice.created')", &[&other])
        .expect("sample to the other subscription");
    let got = notices.lock().expect("notices").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("would not receive"), "{got:?}");
    let polled = poll(&mut admin, renamed, None, 10);
    assert_eq!(polled.len(), 1);
    assert_eq!(polled[0].event_type, "ORDER_CREATED", "the sample is shaped as the subscription's events");
}
