//! Queue invariants under backlog, concurrency and failure: per key commit order whatever the
//! heap order, every delivery ends, one endpoint's backlog starves no other, retention keeps
//! up and steps over held work, and the worker's own bookkeeping (latch, statistics) stays
//! right when it exits. Each test that needs particular settings or stops the worker has a
//! cluster of its own.

mod common;

use common::{shared_cluster, wait_for, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn shared() -> &'static Cluster {
    shared_cluster("queue", &["webhooks.retry_schedule = '200ms,200ms'"])
}

fn subscribe(c: &mut Client, rx: &Receiver, path: &str, patterns: &str, answers: Value) -> i64 {
    let row = c
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, $2::text::text[])",
            &[&rx.url(path), &patterns],
        )
        .expect("subscribe");
    let mut config = json!({"path": path, "secret": row.get::<_, String>(1)});
    if let (Some(obj), Some(more)) = (config.as_object_mut(), answers.as_object()) {
        obj.extend(more.clone());
    }
    rx.configure(config);
    row.get(0)
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).expect(sql).get(0)
}

/// A subscription's deliveries that succeeded, and those still queued.
fn succeeded(c: &mut Client, sub: i64) -> i64 {
    count(c, &format!("SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = {sub} AND status = 'succeeded'"))
}

fn queued(c: &mut Client, sub: i64) -> i64 {
    count(c, &format!("SELECT count(*) FROM webhooks._queue WHERE subscription_id = {sub}"))
}

/// Per key, the `data.step` values in arrival order.
fn steps_by_key(log: &[Value]) -> HashMap<String, Vec<i64>> {
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for r in log {
        let d = &r["json"]["data"];
        by_key
            .entry(d["k"].to_string())
            .or_default()
            .push(d["step"].as_i64().unwrap_or(-1));
    }
    by_key
}

#[test]
fn a_backlog_in_shuffled_heap_order_is_delivered_per_key_in_commit_order() {
    // The worker serves another database while the backlog is made, so nothing is fanned out.
    let own = Cluster::start(
        "backlog",
        &["webhooks.database = 'not_yet'", "webhooks.batch_size = 5"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let sub = subscribe(&mut c, &rx, "/backlog", "{bk.*}", json!({}));
    c.batch_execute(
        "CREATE TABLE bk_orders (id int PRIMARY KEY, k int, step int, status text);
         SELECT webhooks.track('bk_orders', entity => 'bk', status_column => 'status');",
    )
    .expect("table");
    // 12 keys x 30 steps, one transaction each, interleaved: some steps are row changes,
    // some are keyed emits (another entity, ordered on their own key). 360 transactions are
    // 72 fan-out batches, more than one turn of the worker's loop fans out.
    let (keys, steps) = (12, 30);
    for step in 0..steps {
        for k in 0..keys {
            if step == 0 {
                c.execute("INSERT INTO bk_orders VALUES ($1, $1, 0, 'pending')", &[&k])
                    .expect("insert");
            } else if step % 3 == 0 {
                c.execute(
                    "SELECT webhooks.emit('bk.note', jsonb_build_object('k', 1000 + $1::int, 'step', $2::int), (1000 + $1::int)::text)",
                    &[&k, &step],
                )
                .expect("emit");
            } else {
                c.execute(
                    "UPDATE bk_orders SET step = $2::int, status = 's' || $2::int WHERE id = $1",
                    &[&k, &step],
                )
                .expect("update");
            }
        }
    }
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM webhooks._deliveries"),
        0,
        "no worker has fanned anything out"
    );
    let events = count(&mut c, "SELECT count(*) FROM webhooks._events");
    assert!(events >= keys as i64 * steps as i64, "every transaction wrote events");
    // Heap order is not commit order once vacuum lets rows reuse space: reverse it outright
    // (the rows keep their seqs and transaction ids).
    c.batch_execute(
        "BEGIN;
         CREATE TEMP TABLE shuffled AS SELECT * FROM webhooks._events;
         DELETE FROM webhooks._events;
         INSERT INTO webhooks._events SELECT * FROM shuffled ORDER BY seq DESC;
         COMMIT;",
    )
    .expect("shuffle");
    let first_in_heap: i64 = count(&mut c, "SELECT seq FROM webhooks._events LIMIT 1");
    let lowest: i64 = count(&mut c, "SELECT min(seq) FROM webhooks._events");
    assert_ne!(
        first_in_heap, lowest,
        "the heap must start with a later event"
    );

    c.batch_execute("ALTER SYSTEM SET webhooks.database = 'postgres'")
        .expect("serve this database");
    drop(c);
    own.restart();
    let mut c = own.connect();
    let expected = count(
        &mut c,
        "SELECT count(*) FROM webhooks.events e WHERE e.type LIKE 'bk.%'",
    );
    wait_for("every delivery to succeed", WAIT, || {
        let done = count(
            &mut c,
            &format!("SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = {sub} AND status = 'succeeded'"),
        );
        (done == expected).then_some(())
    });
    assert_eq!(count(&mut c, "SELECT count(*) FROM webhooks._queue"), 0);
    let log = rx.log("/backlog");
    assert_eq!(log.len() as i64, expected, "each delivered once");
    // Fan-out is bounded per turn: the first deliveries went out while the backlog was still
    // being fanned out, not after all of it.
    let interleaved: bool = c
        .query_one(
            "SELECT (SELECT min(a.started_at) FROM webhooks.attempts a JOIN webhooks._deliveries d ON d.id = a.delivery_id
                      WHERE d.subscription_id = $1)
                  < (SELECT max(d.created_at) FROM webhooks._deliveries d WHERE d.subscription_id = $1)",
            &[&sub],
        )
        .expect("timing")
        .get(0);
    assert!(
        interleaved,
        "no delivery was attempted before the whole backlog was fanned out"
    );
    for (key, got) in steps_by_key(&log) {
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted, "key {key} arrived out of commit order");
    }
}

#[test]
fn concurrent_emits_for_one_key_are_delivered_in_commit_order() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    let sub = subscribe(&mut c, &rx, "/emit-order", "{eo.*}", json!({}));
    let mut t1 = shared().connect();
    t1.batch_execute("BEGIN; SELECT webhooks.emit('eo.first', '{\"n\": 1}', 'same');")
        .expect("t1 emits");
    let t2 = std::thread::spawn(|| {
        let mut t2 = shared().connect();
        t2.batch_execute("BEGIN; SELECT webhooks.emit('eo.second', '{\"n\": 2}', 'same'); COMMIT;")
            .expect("t2 emits and commits");
    });
    // t2's emit waits for t1's: it could otherwise take the later seq yet commit first.
    wait_for("t2 to wait for t1", WAIT, || {
        let waiting = count(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%eo.second%'",
        );
        (waiting == 1).then_some(())
    });
    // Other keys do not wait.
    c.batch_execute("SELECT webhooks.emit('eo.other', '{\"n\": 3}', 'other')")
        .expect("another key");
    t1.batch_execute("COMMIT").expect("t1 commits");
    t2.join().expect("t2");
    let log = rx.wait_for_requests("/emit-order", 3, WAIT);
    let same: Vec<&str> = log
        .iter()
        .filter(|r| r["json"]["type"] != "eo.other")
        .map(|r| r["json"]["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(same, ["eo.first", "eo.second"]);
    let _ = sub;
}

#[test]
fn a_slow_endpoint_with_a_deep_backlog_does_not_starve_the_others() {
    // Window of the landed claim: 4 x batch = 16 due heads of all subscriptions.
    let own = Cluster::start(
        "starve",
        &[
            "webhooks.concurrency = 4",
            "webhooks.max_in_flight_per_endpoint = 2",
            "webhooks.batch_size = 4",
        ],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    subscribe(&mut c, &rx, "/slow", "{slow.*}", json!({"delay_ms": 400}));
    subscribe(&mut c, &rx, "/fast", "{fast.*}", json!({}));
    c.batch_execute(
        "SELECT webhooks.emit('slow.e', jsonb_build_object('i', i)) FROM generate_series(1, 60) i",
    )
    .expect("the slow endpoint's backlog");
    rx.wait_for_requests("/slow", 1, WAIT);
    c.batch_execute(
        "SELECT webhooks.emit('fast.e', jsonb_build_object('i', i)) FROM generate_series(1, 10) i",
    )
    .expect("work for the fast endpoint");
    rx.wait_for_requests("/fast", 10, WAIT);
    let slow_so_far = rx.log("/slow").len();
    // 2 in flight x 400 ms: the slow one gets about 5 a second. Had the fast endpoint waited
    // until the slow backlog fit the window, the slow one would have had 44 or more first.
    assert!(
        slow_so_far < 30,
        "the fast endpoint waited for {slow_so_far} slow deliveries"
    );
}

#[test]
fn retention_keeps_up_with_a_large_history_and_steps_over_held_deliveries() {
    let own = Cluster::start("retention_bulk", &["webhooks.retention = '1s'"]);
    let mut c = own.connect();
    // History made directly: 30 held deliveries (a paused subscription's backlog) at the
    // lowest ids, then 60,000 finished ones, all old. Their events have transaction id 0, as
    // send_test's: in no fan-out batch (they are delivered already).
    c.batch_execute(
        "SELECT webhooks.pause(id) FROM webhooks.subscribe('http://127.0.0.1:9/held', '{ret.*}') ;
         SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/done', '{other.*}');
         INSERT INTO webhooks._events (type, entity, data, created_at, xid)
         SELECT 'ret.held', 'ret', jsonb_build_object('i', i), now() - interval '1 hour', '0' FROM generate_series(1, 30) i;
         INSERT INTO webhooks._deliveries (event_seq, subscription_id, created_at)
         SELECT e.seq, 1, now() - interval '1 hour' FROM webhooks._events e WHERE e.type = 'ret.held' ORDER BY e.seq;
         INSERT INTO webhooks._queue (delivery_id, subscription_id, event_seq)
         SELECT d.id, d.subscription_id, d.event_seq FROM webhooks._deliveries d;
         INSERT INTO webhooks._events (type, entity, data, created_at, xid)
         SELECT 'other.done', 'other', jsonb_build_object('i', i), now() - interval '1 hour', '0' FROM generate_series(1, 60000) i;
         INSERT INTO webhooks._deliveries (event_seq, subscription_id, status, attempts, created_at, delivered_at)
         SELECT e.seq, 2, 'succeeded', 1, now() - interval '1 hour', now() - interval '1 hour'
           FROM webhooks._events e WHERE e.type = 'other.done' ORDER BY e.seq;
         INSERT INTO webhooks._attempts (delivery_id, attempt, started_at, duration_ms, status_code)
         SELECT d.id, 1, d.created_at, 1, 200 FROM webhooks._deliveries d WHERE d.status = 'succeeded';",
    )
    .expect("history");
    // The landed retention deleted at most 5,000 a minute; this must be gone in well under one.
    wait_for("the finished history to be deleted", WAIT, || {
        let left = count(
            &mut c,
            "SELECT count(*) FROM webhooks._deliveries WHERE status = 'succeeded'",
        ) + count(&mut c, "SELECT count(*) FROM webhooks._attempts")
            + count(
                &mut c,
                "SELECT count(*) FROM webhooks._events WHERE type = 'other.done'",
            );
        (left == 0).then_some(())
    });
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM webhooks._deliveries"),
        30,
        "held deliveries stay"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM webhooks._queue"), 30);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM webhooks._events WHERE type = 'ret.held'"
        ),
        30,
        "their events stay"
    );
}

#[test]
fn the_worker_reports_table_statistics_so_autovacuum_sees_its_deletes() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    subscribe(&mut c, &rx, "/stats", "{stats.*}", json!({}));
    c.batch_execute("SELECT webhooks.emit('stats.e', '{}') FROM generate_series(1, 5)")
        .expect("emit");
    rx.wait_for_requests("/stats", 5, WAIT);
    // The worker deleted 5 _queue rows, and only the worker deletes from it; without
    // pgstat_report_stat() a background worker reports its table statistics only when it exits.
    wait_for("the worker's deletes to be counted", WAIT, || {
        let deleted = count(
            &mut c,
            "SELECT coalesce(sum(n_tup_del), 0)::int8 FROM pg_stat_all_tables
              WHERE relid = 'webhooks._queue'::regclass",
        );
        (deleted >= 5).then_some(())
    });
}

#[test]
fn a_worker_that_fails_withdraws_its_latch_and_its_successor_delivers() {
    let own = Cluster::start("worker_exit", &[]);
    let rx = Receiver::start();
    let mut c = own.connect();
    subscribe(&mut c, &rx, "/exit", "{exit.*}", json!({}));
    let worker_pid = |c: &mut Client| -> Option<i32> {
        c.query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_webhooks worker'",
            &[],
        )
        .ok()
        .map(|r| r.get(0))
    };
    let first = wait_for("the worker", WAIT, || worker_pid(&mut c));
    let published: Option<i32> = c
        .query_one("SELECT webhooks._worker_pid()", &[])
        .expect("pid")
        .get(0);
    assert_eq!(published, Some(first), "backends wake the running worker");

    // Make the worker's fan-out fail: it exits with an ERROR, not through its loop.
    c.batch_execute(
        "CREATE FUNCTION fail_fan_out() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'injected fan-out failure'; END $$;
         CREATE TRIGGER fail_fan_out BEFORE INSERT ON webhooks._deliveries
             FOR EACH ROW EXECUTE FUNCTION fail_fan_out();
         SELECT webhooks.emit('exit.e', '{\"n\": 1}');",
    )
    .expect("break fan-out");
    wait_for("the worker to exit with the error", WAIT, || {
        own.server_log()
            .contains("injected fan-out failure")
            .then_some(())
    });
    wait_for("the failed worker to be gone", WAIT, || {
        (worker_pid(&mut c) != Some(first)).then_some(())
    });
    // Whatever runs now, the published pid is never the dead worker's.
    for _ in 0..20 {
        let published: Option<i32> = c
            .query_one("SELECT webhooks._worker_pid()", &[])
            .expect("pid")
            .get(0);
        assert_ne!(
            published,
            Some(first),
            "a dead worker's latch is still published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.batch_execute("DROP TRIGGER fail_fan_out ON webhooks._deliveries")
        .expect("repair");
    let got = rx.wait_for_requests("/exit", 1, WAIT);
    assert_eq!(got[0]["json"]["type"], "exit.e", "the event was not lost");
    let now = wait_for("a new worker", WAIT, || worker_pid(&mut c));
    let published: Option<i32> = c
        .query_one("SELECT webhooks._worker_pid()", &[])
        .expect("pid")
        .get(0);
    assert_eq!(published, Some(now));
}

#[test]
fn an_emit_and_a_write_of_the_same_tracked_row_keep_commit_order() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    subscribe(&mut c, &rx, "/mixed", "{mix.*}", json!({}));
    c.batch_execute(
        "CREATE TABLE mix_orders (id int PRIMARY KEY, status text);
         SELECT webhooks.track('mix_orders', entity => 'mix', status_column => 'status');
         INSERT INTO mix_orders VALUES (1, 'a');",
    )
    .expect("table");
    // B emits for order 1 and stays open; A's write of order 1 must wait for it.
    let mut b = shared().connect();
    b.batch_execute("BEGIN; SELECT webhooks.emit('mix.flagged', '{\"n\": 1}', '1');")
        .expect("b emits");
    let a = std::thread::spawn(|| {
        shared()
            .connect()
            .batch_execute("UPDATE mix_orders SET status = 'b' WHERE id = 1")
            .expect("a writes");
    });
    wait_for("a to wait for b", WAIT, || {
        let waiting = count(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE mix_orders%'",
        );
        (waiting == 1).then_some(())
    });
    b.batch_execute("COMMIT").expect("b commits");
    a.join().expect("a");
    let log = rx.wait_for_requests("/mixed", 3, WAIT);
    let types: Vec<&str> = log
        .iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["mix.created", "mix.flagged", "mix.status_updated"]);
}

#[test]
fn unsubscribing_during_an_attempt_leaves_the_delivery_dead() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    let sub = subscribe(
        &mut c,
        &rx,
        "/unsub",
        "{unsub.*}",
        json!({"default_status": 500, "delay_ms": 1500}),
    );
    c.batch_execute("SELECT webhooks.emit('unsub.e', '{}')")
        .expect("emit");
    rx.wait_for_requests("/unsub", 1, WAIT);
    c.execute("SELECT webhooks.unsubscribe($1)", &[&sub])
        .expect("unsubscribe while the attempt is in flight");
    // The attempt's outcome (500, would be retried) is recorded after the unsubscribe.
    wait_for("the attempt to be recorded", WAIT, || {
        let n = count(
            &mut c,
            &format!("SELECT count(*) FROM webhooks.attempts a JOIN webhooks._deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = {sub}"),
        );
        (n == 1).then_some(())
    });
    let status: String = c
        .query_one(
            "SELECT status FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("delivery")
        .get(0);
    assert_eq!(
        status, "dead",
        "an ended delivery is not brought back to retrying"
    );
}

#[test]
fn two_replays_in_one_transaction_keep_per_key_order() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    let sub = subscribe(&mut c, &rx, "/replay2", "{rp2.*}", json!({}));
    c.batch_execute(
        "SELECT webhooks.emit('rp2.a', jsonb_build_object('k', 1, 'step', 1), '1');
         SELECT webhooks.emit('rp2.a', jsonb_build_object('k', 1, 'step', 2), '1');
         SELECT webhooks.emit('rp2.a', jsonb_build_object('k', 1, 'step', 3), '1');",
    )
    .expect("events");
    rx.wait_for_requests("/replay2", 3, WAIT);
    c.execute(
        "SELECT webhooks.replay($1, now() - interval '1 hour'), webhooks.replay($1, now() - interval '1 hour')",
        &[&sub],
    )
    .expect("two replays in one statement");
    let log = rx.wait_for_requests("/replay2", 9, WAIT);
    // The receiver logs a request before it answers: wait for the outcomes to be recorded.
    wait_for("every replayed delivery to end", WAIT, || {
        let queued = count(
            &mut c,
            &format!("SELECT count(*) FROM webhooks._queue WHERE subscription_id = {sub}"),
        );
        (queued == 0).then_some(())
    });
    // Each replay is ordered within itself.
    let replays: Vec<&Value> = log[3..].iter().collect();
    let ids: std::collections::HashSet<&str> = replays
        .iter()
        .map(|r| r["json"]["id"].as_str().unwrap_or(""))
        .collect();
    let steps: Vec<i64> = replays
        .iter()
        .map(|r| r["json"]["data"]["step"].as_i64().unwrap_or(0))
        .collect();
    // Two interleavings are possible between the replays, but within one replay a step
    // never precedes a smaller one: every step appears twice and, counting occurrences, the
    // n-th occurrence of step s comes after the n-th occurrence of step s-1.
    for s in 2..=3 {
        for nth in 0..2 {
            let pos = |v: i64| {
                steps
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x == v)
                    .nth(nth)
                    .map(|(i, _)| i)
            };
            assert!(
                pos(s - 1) < pos(s),
                "replayed steps out of order: {steps:?}"
            );
        }
    }
    assert_eq!(ids.len(), 3, "the same three webhook-ids, twice each");
}

#[test]
fn deliveries_queued_for_a_subscription_removed_meanwhile_end_dead() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    let other = subscribe(&mut c, &rx, "/orphan-other", "{orph.*}", json!({}));
    let sub = subscribe(&mut c, &rx, "/orphan", "{orph.*}", json!({}));
    c.execute("SELECT webhooks.pause($1)", &[&sub])
        .expect("pause");
    // A test delivery and a replay in a transaction that commits after the unsubscribe.
    let mut t1 = shared().connect();
    t1.execute("BEGIN", &[]).expect("begin");
    t1.execute("SELECT webhooks.send_test($1)", &[&sub])
        .expect("send_test");
    // An unsubscribe left open does not hold up the other subscriptions' deliveries.
    let mut t2 = shared().connect();
    t2.execute("BEGIN", &[]).expect("begin");
    t2.execute("SELECT webhooks.unsubscribe($1)", &[&sub])
        .expect("unsubscribe");
    c.batch_execute("SELECT webhooks.emit('orph.e', '{}')")
        .expect("emit");
    rx.wait_for_requests("/orphan-other", 1, WAIT);
    t2.execute("COMMIT", &[]).expect("unsubscribe commits");
    t1.execute("COMMIT", &[]).expect("send_test commits");
    wait_for("the orphaned test delivery to end dead", WAIT, || {
        let left = count(
            &mut c,
            &format!("SELECT count(*) FROM webhooks._queue WHERE subscription_id = {sub}"),
        );
        let dead = count(
            &mut c,
            &format!(
                "SELECT count(*) FROM webhooks._deliveries WHERE subscription_id = {sub}
                  AND status = 'dead' AND last_error = 'subscription removed'"
            ),
        );
        (left == 0 && dead >= 1).then_some(())
    });
    assert!(rx.log("/orphan").is_empty());
    let _ = other;
}

#[test]
fn an_emit_takes_its_place_in_commit_order_at_commit() {
    let mut c = shared().connect();
    c.batch_execute(
        "CREATE TABLE late_orders (id int PRIMARY KEY);
         SELECT webhooks.track('late_orders', entity => 'lateo');
         CREATE ROLE emitter LOGIN; GRANT webhooks_admin TO emitter;",
    )
    .expect("table");
    // T1 inserts order 7 and stays open; T2 emits about order 7 (it cannot see the row).
    let mut t1 = shared().connect();
    t1.batch_execute("BEGIN; INSERT INTO late_orders VALUES (7);")
        .expect("t1");
    let mut t2 = shared().connect_as("postgres", "emitter");
    t2.batch_execute("BEGIN; SELECT webhooks.emit('lateo.note', '{\"n\": 1}', '7');")
        .expect("t2");
    t1.batch_execute("COMMIT").expect("t1 commits first");
    t2.batch_execute("COMMIT").expect("t2 commits second");
    let types: Vec<String> = c
        .query(
            "SELECT type FROM webhooks.events WHERE entity = 'lateo' ORDER BY seq",
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["lateo.created", "lateo.note"]);
    // Without UPDATE on the table, an emit does not lock its row: the writer does not wait.
    let mut holder = shared().connect_as("postgres", "emitter");
    holder
        .batch_execute("BEGIN; SELECT webhooks.emit('lateo.note', '{\"n\": 2}', '7');")
        .expect("emit and stay open");
    c.batch_execute(
        "SET lock_timeout = '5s'; UPDATE late_orders SET id = 7 WHERE id = 7; RESET lock_timeout;",
    )
    .expect("the writer is not blocked by an emit of a role that cannot write the row");
    holder.batch_execute("COMMIT").expect("commit");
}

#[test]
fn a_replay_in_the_transaction_that_emits_leaves_nothing_stuck() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    let sub = subscribe(&mut c, &rx, "/replay-emit", "{rpe.*}", json!({}));
    c.batch_execute("SELECT webhooks.emit('rpe.before', '{}', 'A')")
        .expect("an earlier event");
    rx.wait_for_requests("/replay-emit", 1, WAIT);
    c.batch_execute(
        "BEGIN;
         SELECT webhooks.emit('rpe.x', '{}', 'A');
         SELECT webhooks.emit('rpe.y', '{}', 'A');",
    )
    .expect("emits");
    c.execute(
        "SELECT webhooks.replay($1, now() - interval '1 hour', now() + interval '1 hour')",
        &[&sub],
    )
    .expect("replay in the same transaction");
    c.batch_execute("COMMIT").expect("commit");
    // before, then x and y (fanned out), and the replay of before (own emits are not replayed).
    rx.wait_for_requests("/replay-emit", 4, WAIT);
    wait_for("nothing left queued", WAIT, || {
        let queued = count(
            &mut c,
            &format!("SELECT count(*) FROM webhooks._queue WHERE subscription_id = {sub}"),
        );
        (queued == 0).then_some(())
    });
    let dangling = count(
        &mut c,
        "SELECT count(*) FROM webhooks._deliveries d WHERE NOT EXISTS (SELECT 1 FROM webhooks._events e WHERE e.seq = d.event_seq)",
    );
    assert_eq!(
        dangling, 0,
        "a delivery refers to an event that does not exist"
    );
}

#[test]
fn an_idle_worker_with_a_subscription_writes_nothing() {
    // Each fan-out step that writes uses a transaction id, so the next snapshot differs from
    // the last one fanned out: a worker that wrote whenever the snapshot moved would go round
    // for ever, a core busy and thousands of transaction ids a second, with nothing to do.
    let own = Cluster::start("idle", &[]);
    let rx = Receiver::start();
    let mut c = own.connect();
    subscribe(&mut c, &rx, "/idle", "{*}", json!({}));
    c.batch_execute("SELECT webhooks.emit('idle.tick', '{}')").expect("emit");
    rx.wait_for_requests("/idle", 1, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    // pg_current_snapshot takes no transaction id of its own.
    let xmax = |c: &mut Client| -> i64 {
        c.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8", &[])
            .expect("xmax")
            .get(0)
    };
    let before = xmax(&mut c);
    std::thread::sleep(Duration::from_secs(3));
    let used = xmax(&mut c) - before;
    // Autovacuum's ANALYZE of the webhooks tables may take an id or two.
    assert!(used <= 5, "{used} transaction ids used in 3 s by an idle system");
    // And it still wakes: the next event is delivered.
    c.batch_execute("SELECT webhooks.emit('idle.tick', '{}')").expect("emit");
    rx.wait_for_requests("/idle", 2, WAIT);
}

#[test]
fn a_new_subscription_held_by_a_transaction_gets_its_events_once_released() {
    let rx = Receiver::start();
    let mut c = shared().connect();
    let other = subscribe(&mut c, &rx, "/held-other", "{held.*}", json!({}));
    let sub = subscribe(&mut c, &rx, "/held", "{held.*}", json!({}));
    // Its row is held (as an open pause or unsubscribe would) when its first events commit:
    // fan-out goes on for the others and gives it its events later.
    let mut t = shared().connect();
    t.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM webhooks._subscriptions WHERE id = {sub} FOR UPDATE"
    ))
    .expect("hold");
    c.batch_execute("SELECT webhooks.emit('held.a', '{\"n\": 1}', 'k')")
        .expect("emit");
    rx.wait_for_requests("/held-other", 1, WAIT);
    c.batch_execute("SELECT webhooks.emit('held.b', '{\"n\": 2}', 'k')")
        .expect("emit");
    rx.wait_for_requests("/held-other", 2, WAIT);
    assert!(rx.log("/held").is_empty(), "nothing while held");
    t.batch_execute("COMMIT").expect("release");
    c.batch_execute("SELECT webhooks.emit('held.c', '{\"n\": 3}', 'k')")
        .expect("emit");
    let got = rx.wait_for_requests("/held", 3, WAIT);
    let ns: Vec<i64> = got
        .iter()
        .map(|r| r["json"]["data"]["n"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(ns, [1, 2, 3], "each once, in commit order");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.log("/held").len(), 3);
    let _ = other;
}

#[test]
fn several_workers_share_the_queue_keep_per_key_order_and_the_endpoint_cap() {
    // Three workers; the cap of 4 is shared out 2, 1, 1, so together they never exceed it.
    let own = Cluster::start(
        "workers",
        &[
            "webhooks.workers = 3",
            "webhooks.concurrency = 9",
            "webhooks.max_in_flight_per_endpoint = 4",
        ],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let names: Vec<String> = c
        .query(
            "SELECT application_name FROM pg_stat_activity
              WHERE application_name LIKE 'pg_webhooks worker%' ORDER BY 1",
            &[],
        )
        .expect("workers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["pg_webhooks worker", "pg_webhooks worker 1", "pg_webhooks worker 2"]);
    let sub = subscribe(&mut c, &rx, "/mw", "{mw.*}", json!({"delay_ms": 20}));
    c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
    // 20 keys with 5 steps each, in 5 transactions, and 200 events without a key.
    for step in 0..5 {
        c.batch_execute(&format!(
            "SELECT count(webhooks.emit('mw.k', jsonb_build_object('k', k, 'step', {step}), 'k' || k))
               FROM generate_series(1, 20) k;
             SELECT count(webhooks.emit('mw.u', jsonb_build_object('k', 'none', 'step', {step}, 'u', u)))
               FROM generate_series(1, 40) u"
        ))
        .expect("emit");
    }
    wait_queued(&mut c, sub, 300);
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    // Which workers hold claims, while the backlog drains.
    let mut claimers = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + WAIT;
    while rx.log("/mw").len() < 300 && std::time::Instant::now() < deadline {
        for r in c
            .query(
                "SELECT DISTINCT claimed_by FROM webhooks._queue WHERE claimed_at IS NOT NULL",
                &[],
            )
            .expect("claims")
        {
            claimers.insert(r.get::<_, Option<i16>>(0));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = rx.wait_for_requests("/mw", 300, WAIT);
    assert_eq!(
        claimers.into_iter().collect::<Vec<_>>(),
        [Some(0), Some(1), Some(2)],
        "every worker claimed"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.log("/mw").len(), 300, "each delivered once");
    for (key, steps) in steps_by_key(&log) {
        if key == "\"none\"" {
            assert_eq!(steps.len(), 200);
            continue;
        }
        assert_eq!(steps, [0, 1, 2, 3, 4], "key {key} out of commit order or duplicated");
    }
    // Each request is answered 20 ms after it arrives: never more than 4 open at once.
    let starts: Vec<f64> = log
        .iter()
        .map(|r| r["received_at"].as_f64().unwrap_or(0.0))
        .collect();
    for (i, s) in starts.iter().enumerate() {
        let open = starts.iter().filter(|t| **t <= *s && *s < **t + 0.019).count();
        assert!(open <= 4, "request {i} had {open} in flight (cap 4)");
    }
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM webhooks._queue"),
        0,
        "nothing left queued or claimed"
    );
}

/// A keyed backlog of `keys` × `steps` emits (one transaction per step) plus `unkeyed` events
/// without a key, queued for `sub` while it is paused; returns how many deliveries that is.
fn queue_backlog(c: &mut Client, sub: i64, prefix: &str, keys: i32, steps: i32, unkeyed: i32) -> i64 {
    c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
    for step in 0..steps {
        c.batch_execute(&format!(
            "SELECT count(webhooks.emit('{prefix}.k', jsonb_build_object('k', k, 'step', {step}), '{prefix}' || k))
               FROM generate_series(1, {keys}) k;
             SELECT count(webhooks.emit('{prefix}.u', jsonb_build_object('k', 'none', 'step', {step}, 'u', u)))
               FROM generate_series(1, {unkeyed}) u"
        ))
        .expect("emit");
    }
    let total = i64::from((keys + unkeyed) * steps);
    wait_for("the backlog to be queued", WAIT, || {
        (queued(c, sub) == total).then_some(())
    });
    total
}

/// Per key, steps in first-arrival order, each once: a delivery attempted again after its
/// worker died may arrive twice, but never out of commit order.
fn assert_each_key_in_order_once_or_more(log: &[Value], steps: i64) {
    for (key, arrived) in steps_by_key(log) {
        if key == "\"none\"" {
            continue;
        }
        let mut firsts: Vec<i64> = Vec::new();
        for s in arrived {
            if !firsts.contains(&s) {
                firsts.push(s);
            }
        }
        assert_eq!(firsts, (0..steps).collect::<Vec<_>>(), "key {key}: out of commit order or lost");
    }
}

#[test]
fn one_of_several_workers_killed_mid_job_loses_nothing_and_keeps_per_key_order() {
    let own = Cluster::start(
        "worker_killed",
        &["webhooks.workers = 3", "webhooks.concurrency = 9", "webhooks.max_in_flight_per_endpoint = 6"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let sub = subscribe(&mut c, &rx, "/kill", "{kw.*}", json!({"delay_ms": 30}));
    let total = queue_backlog(&mut c, sub, "kw", 30, 4, 30);
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    // Worker 1 holds claims (some sent, some on the wire, some waiting in its job): kill it.
    let victim: i32 = wait_for("worker 1 to hold claims", WAIT, || {
        let held = count(&mut c, "SELECT count(*) FROM webhooks._queue WHERE claimed_by = 1");
        let pid: Option<i32> = c
            .query_one("SELECT pid FROM webhooks.worker_status() WHERE worker = 1", &[])
            .expect("status")
            .get(0);
        pid.filter(|_| held > 0)
    });
    c.execute("SELECT pg_terminate_backend($1)", &[&victim]).expect("terminate worker 1");
    // Its successor releases what it had claimed; everything arrives, per key in order.
    wait_for("a new worker 1", WAIT, || {
        let pid: Option<i32> = c
            .query_one("SELECT pid FROM webhooks.worker_status() WHERE worker = 1", &[])
            .expect("status")
            .get(0);
        pid.filter(|p| *p != victim)
    });
    wait_for("the queue to drain", WAIT, || {
        (queued(&mut c, sub) == 0).then_some(())
    });
    let log = rx.log("/kill");
    let ids: std::collections::HashSet<String> =
        log.iter().map(|r| r["headers"]["webhook-id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(ids.len() as i64, total, "every event arrived");
    assert!(log.len() as i64 - total <= 6 * 16, "only what worker 1 held can arrive twice: {} extra", log.len() as i64 - total);
    assert_each_key_in_order_once_or_more(&log, 4);
    assert_eq!(
        succeeded(&mut c, sub),
        total
    );
}

#[test]
fn lowering_the_number_of_workers_releases_the_claims_of_the_ones_gone() {
    let own = Cluster::start(
        "workers_lowered",
        &["webhooks.workers = 3", "webhooks.concurrency = 9", "webhooks.max_in_flight_per_endpoint = 6"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let sub = subscribe(&mut c, &rx, "/lower", "{lw.*}", json!({"delay_ms": 200}));
    let total = queue_backlog(&mut c, sub, "lw", 20, 3, 20);
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    wait_for("worker 2 to hold claims", WAIT, || {
        (count(&mut c, "SELECT count(*) FROM webhooks._queue WHERE claimed_by = 2") > 0).then_some(())
    });
    // A crash with claims outstanding, and the server comes back with two workers.
    c.batch_execute("ALTER SYSTEM SET webhooks.workers = 2").expect("alter system");
    drop(c);
    own.crash_and_restart();
    let mut c = own.connect();
    let workers: Vec<i32> = c
        .query("SELECT worker FROM webhooks.worker_status() ORDER BY 1", &[])
        .expect("status")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(workers, [0, 1]);
    wait_for("the queue to drain", WAIT, || {
        (queued(&mut c, sub) == 0).then_some(())
    });
    let log = rx.log("/lower");
    let ids: std::collections::HashSet<String> =
        log.iter().map(|r| r["headers"]["webhook-id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(ids.len() as i64, total, "every event arrived, worker 2's claims included");
    assert_each_key_in_order_once_or_more(&log, 3);
}

/// One key's backlog of `n` emits (steps 0..n, one transaction: their seqs are in call order)
/// queued for `sub` while it is paused.
fn queue_hot_key(c: &mut Client, sub: i64, prefix: &str, n: i32) -> i64 {
    c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
    c.batch_execute(&format!(
        "SELECT count(webhooks.emit('{prefix}.k', jsonb_build_object('k', 'hot', 'step', g), '{prefix}hot'))
           FROM generate_series(0, {n} - 1) g"
    ))
    .expect("emit");
    wait_queued(c, sub, i64::from(n));
    i64::from(n)
}

fn wait_queued(c: &mut Client, sub: i64, n: i64) {
    wait_for("the backlog to be queued", WAIT, || (queued(c, sub) == n).then_some(()));
}

#[test]
fn a_hot_key_backlog_of_many_chains_is_sent_once_each_in_order_as_its_chain_grows() {
    // Three times the longest claimed chain, twelve times a growing chain's report: the chain
    // is given its next deliveries while it runs, its head moves on at every report, and one
    // failure in the middle (the 1,501st request) stops it and hands back what it held.
    let own = Cluster::start(
        "hot_key_grows",
        &["webhooks.workers = 2", "webhooks.concurrency = 8", "webhooks.retry_schedule = '200ms,200ms'"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let mut answers = vec![json!(200); 1500];
    answers.push(json!(500));
    let sub = subscribe(&mut c, &rx, "/hot", "{hg.*}", json!({"responses": answers}));
    let total = queue_hot_key(&mut c, sub, "hg", 6000);
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    wait_for("the queue to drain", WAIT * 2, || {
        (queued(&mut c, sub) == 0).then_some(())
    });
    let log = rx.log("/hot");
    let steps: Vec<i64> = log.iter().map(|r| r["json"]["data"]["step"].as_i64().unwrap_or(-1)).collect();
    // Exactly one request twice (the one answered 500, sent again after its retry delay), and
    // every other once, in commit order.
    assert_eq!(steps.len() as i64, total + 1, "one request per delivery, plus the retried one");
    let mut expected: Vec<i64> = (0..total).collect();
    expected.insert(1501, 1500);
    assert_eq!(steps, expected, "in commit order, the failed one sent again before the next");
    assert!(log.iter().all(|r| r["verified"] == json!(true)), "every signature verified");
    assert_eq!(
        succeeded(&mut c, sub),
        total
    );
    assert_eq!(
        count(&mut c, &format!(
            "SELECT count(*) FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = {sub}"
        )),
        total + 1,
        "every attempt logged"
    );
}

#[test]
fn a_worker_killed_while_its_hot_key_chain_grows_loses_nothing_and_keeps_order() {
    let own = Cluster::start(
        "hot_key_killed",
        &["webhooks.workers = 2", "webhooks.concurrency = 8"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let sub = subscribe(&mut c, &rx, "/hotkill", "{hk.*}", json!({"delay_ms": 1}));
    let total = queue_hot_key(&mut c, sub, "hk", 6000);
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    // Once the chain has moved its head on (a report was recorded) and holds more: kill the
    // worker that holds it.
    let victim: (i32, i32) = wait_for("a chain to have moved on", WAIT, || {
        let row = c
            .query_opt(
                &format!(
                    "SELECT s.pid, s.worker::int4 FROM webhooks._queue q JOIN webhooks.worker_status() s ON s.worker = q.claimed_by
                      WHERE q.subscription_id = {sub} AND q.head AND q.claimed_at IS NOT NULL
                        AND (SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = {sub} AND status = 'succeeded') >= 600"
                ),
                &[],
            )
            .expect("claimed head");
        row.and_then(|r| r.get::<_, Option<i32>>(0).map(|pid| (pid, r.get::<_, i32>(1))))
    });
    c.execute("SELECT pg_terminate_backend($1)", &[&victim.0]).expect("terminate the worker");
    wait_for("the queue to drain", WAIT * 2, || {
        (queued(&mut c, sub) == 0).then_some(())
    });
    let log = rx.log("/hotkill");
    let mut firsts: Vec<i64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in &log {
        let s = r["json"]["data"]["step"].as_i64().unwrap_or(-1);
        if seen.insert(s) {
            firsts.push(s);
        }
    }
    assert_eq!(firsts, (0..total).collect::<Vec<_>>(), "every step, first arrivals in commit order");
    // Only what the killed worker held (a growing chain holds 2,000 at most) can come twice.
    let extra = log.len() as i64 - total;
    assert!(extra <= 2000, "{extra} sent twice");
    assert_eq!(
        succeeded(&mut c, sub),
        total
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM webhooks._queue WHERE claimed_at IS NOT NULL"), 0, "no claim left behind");
}

#[test]
fn a_failing_endpoint_holds_one_request_in_flight_not_its_whole_cap() {
    // One worker, eight HTTP threads, a cap of eight per endpoint: before its first outcome an
    // endpoint gets up to eight requests at once; once its jobs fail, one at a time (each answer
    // takes 100 ms, so serialized requests arrive at least 100 ms apart), until one succeeds.
    let own = Cluster::start(
        "failing_one_in_flight",
        &[
            "webhooks.workers = 1",
            "webhooks.concurrency = 8",
            "webhooks.max_in_flight_per_endpoint = 8",
            "webhooks.retry_schedule = '100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms'",
        ],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    let sub = subscribe(&mut c, &rx, "/failing", "{fo.*}", json!({"default_status": 500, "delay_ms": 100}));
    c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
    c.batch_execute("SELECT count(webhooks.emit('fo.u', jsonb_build_object('u', u))) FROM generate_series(1, 16) u")
        .expect("emit");
    wait_for("16 queued", WAIT, || {
        (queued(&mut c, sub) == 16).then_some(())
    });
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    let log = rx.wait_for_requests("/failing", 30, WAIT);
    let mut at: Vec<f64> = log.iter().map(|r| r["received_at"].as_f64().unwrap_or(0.0)).collect();
    at.sort_by(|a, b| a.total_cmp(b));
    // The first wave (claimed before any outcome) is at most the cap; every request after it
    // came after the one before had been answered.
    let first_wave = at.iter().take_while(|t| **t < at[0] + 0.09).count();
    assert!(first_wave <= 8, "{first_wave} at once, more than the cap");
    for pair in at[first_wave..].windows(2) {
        assert!(pair[1] - pair[0] >= 0.095, "two requests {:.3} s apart: more than one in flight to a failing endpoint", pair[1] - pair[0]);
    }
    // It recovers: once it answers 200 again, everything is delivered.
    let secret: String = c
        .query_one("SELECT secret FROM webhooks._secrets WHERE subscription_id = $1", &[&sub])
        .expect("secret")
        .get(0);
    rx.configure(json!({"path": "/failing", "secret": secret}));
    wait_for("all 16 delivered", WAIT, || {
        (succeeded(&mut c, sub) == 16).then_some(())
    });
}

#[test]
fn the_other_workers_claim_as_soon_as_worker_0_queues_not_at_their_poll() {
    // The safety poll is a minute: had worker 1 waited for it, worker 0 alone would have sent
    // everything (a slot each, 100 ms an answer: 40 deliveries in ~4 s over 16-head jobs).
    let own = Cluster::start(
        "others_claim",
        &[
            "webhooks.workers = 2",
            "webhooks.concurrency = 4",
            "webhooks.max_in_flight_per_endpoint = 2",
            "webhooks.poll_interval = '60s'",
        ],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    wait_for("both workers ready", WAIT, || {
        (count(&mut c, "SELECT count(*) FROM webhooks.worker_status() WHERE state IN ('idle', 'delivering')") == 2).then_some(())
    });
    let sub = subscribe(&mut c, &rx, "/others", "{oc.*}", json!({"delay_ms": 100}));
    c.batch_execute("SELECT count(webhooks.emit('oc.u', jsonb_build_object('u', u))) FROM generate_series(1, 40) u")
        .expect("emit");
    wait_for("all 40 delivered", WAIT, || {
        (succeeded(&mut c, sub) == 40).then_some(())
    });
    let per_worker: Vec<i64> = c
        .query("SELECT attempts::int8 FROM webhooks.worker_status() ORDER BY worker", &[])
        .expect("status")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per_worker.len(), 2);
    assert!(per_worker.iter().all(|n| *n > 0), "both workers sent: {per_worker:?}");
    assert_eq!(per_worker.iter().sum::<i64>(), 40);
}

#[test]
fn keys_released_by_some_workers_while_fan_out_queues_more_never_lose_their_head() {
    // Three workers record (and release keys) while worker 0 fans out new deliveries of the same
    // few keys: a key whose new delivery was queued behind rows another worker was deleting
    // must still get a head. Writers emit for 5 s; then everything must drain, each once.
    let own = Cluster::start(
        "heads_race",
        &["webhooks.workers = 3", "webhooks.concurrency = 6", "webhooks.max_in_flight_per_endpoint = 6"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    wait_for("the workers ready", WAIT, || {
        (count(&mut c, "SELECT count(*) FROM webhooks.worker_status() WHERE state IN ('idle', 'delivering')") == 3).then_some(())
    });
    let sub = subscribe(&mut c, &rx, "/race", "{hr.*}", json!({}));
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let mut wc = own.connect();
            std::thread::spawn(move || {
                let mut n = 0i64;
                while std::time::Instant::now() < until {
                    wc.execute(
                        "SELECT webhooks.emit('hr.k', jsonb_build_object('w', $1::int, 'n', $2::int8), 'key' || ($2 % 4)::text)",
                        &[&w, &n],
                    )
                    .expect("emit");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: i64 = writers.into_iter().map(|t| t.join().expect("writer")).sum();
    assert!(total > 100, "only {total} emitted");
    wait_for("the queue to drain (a key without a head never would)", WAIT, || {
        (queued(&mut c, sub) == 0).then_some(())
    });
    assert_eq!(
        succeeded(&mut c, sub),
        total
    );
    let log = rx.log("/race");
    let ids: std::collections::HashSet<String> =
        log.iter().map(|r| r["headers"]["webhook-id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(ids.len() as i64, total, "every event arrived");
    assert_eq!(log.len() as i64, total, "each once");
}

#[test]
fn an_open_migration_that_dropped_something_does_not_stop_delivery() {
    // DROP runs the extension's drop handler once something is tracked, and track, untrack and
    // that handler hold a lock of the extension's to the end of their transaction. The
    // lock between fan-out and records once reused that very key: a migration that dropped a
    // column and went on for minutes stopped every worker. And advisory locks are anybody's:
    // the heads lock is a table lock now, which an application role cannot take.
    let own = Cluster::start("open_migration", &["webhooks.workers = 2"]);
    let rx = Receiver::start();
    let mut c = own.connect();
    c.batch_execute(
        "CREATE TABLE mig_orders (id int PRIMARY KEY, status text, note text);
         SELECT webhooks.track('mig_orders', status_column => 'status');
         CREATE ROLE mig_app LOGIN; GRANT USAGE ON SCHEMA webhooks TO mig_app;",
    )
    .expect("track");
    let sub = subscribe(&mut c, &rx, "/mig", "{mig.*}", json!({}));
    let mut migration = own.connect();
    migration
        .batch_execute("BEGIN; ALTER TABLE mig_orders DROP COLUMN note;")
        .expect("the migration's DROP");
    // While it is open (holding what DROP took): keyed events, so records release keys and
    // fan-out decides heads.
    c.batch_execute(
        "SELECT count(webhooks.emit('mig.k', jsonb_build_object('k', g % 5, 'step', g), 'mk' || (g % 5)))
           FROM generate_series(0, 199) g",
    )
    .expect("emit");
    wait_for("200 delivered while the migration is open", WAIT, || {
        (succeeded(&mut c, sub) == 200).then_some(())
    });
    migration.batch_execute("COMMIT").expect("commit the migration");
    let log = rx.log("/mig");
    assert_eq!(log.len(), 200, "each once");
    for (k, steps) in steps_by_key(&log) {
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "key {k} in commit order: {steps:?}");
    }
    // An application role cannot hold the heads lock.
    let mut app = own.connect_as("postgres", "mig_app");
    let err = app
        .batch_execute("BEGIN; LOCK TABLE webhooks._fanout IN EXCLUSIVE MODE")
        .expect_err("refused");
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
}

#[test]
fn a_delivery_fanned_out_after_later_ones_of_its_key_waits_for_the_chain_in_flight() {
    // Events of one key are serialized by the tracked row's lock, or by emit's lock on
    // the key where the row does not exist or the emitter may not update it: two emitters of
    // one key that take different locks are not. Here a role without UPDATE emits for a row's
    // key (emit's lock) and prepares: its seq is taken, and its event becomes visible only
    // at COMMIT PREPARED, after 3,000 later events of the key (emitted under the row lock)
    // were fanned out and a chain of them is in flight. The key's head used to move on to the
    // earliest seq left at the chain's next report, that one rather than the chain's next
    // delivery: a second head, claimed with a chain of what the first was sending.
    let own = Cluster::start(
        "straggler",
        &["webhooks.workers = 2", "webhooks.concurrency = 8", "max_prepared_transactions = 2"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    c.batch_execute(
        "CREATE TABLE sg_orders (id int PRIMARY KEY, status text);
         SELECT webhooks.track('sg_orders', status_column => 'status');
         INSERT INTO sg_orders VALUES (1, 'new');
         CREATE ROLE sg_reader LOGIN; GRANT SELECT ON sg_orders TO sg_reader;
         GRANT USAGE ON SCHEMA webhooks TO sg_reader;
         GRANT EXECUTE ON FUNCTION webhooks.emit(text, jsonb, text) TO sg_reader;",
    )
    .expect("track");
    let sub = subscribe(&mut c, &rx, "/straggler", "{sg_order.noted}", json!({"delay_ms": 1}));
    c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
    let mut p = own.connect_as("postgres", "sg_reader");
    p.batch_execute(
        "BEGIN; SELECT webhooks.emit('sg_order.noted', jsonb_build_object('step', -1), '1');
         PREPARE TRANSACTION 'sg_straggler'",
    )
    .expect("prepare");
    let total: i64 = 3000;
    c.batch_execute(&format!(
        "SELECT count(webhooks.emit('sg_order.noted', jsonb_build_object('step', g), '1'))
           FROM generate_series(0, {total} - 1) g"
    ))
    .expect("emit under the row lock");
    wait_queued(&mut c, sub, total);
    c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
    wait_for("the chain to have moved on", WAIT, || {
        (succeeded(&mut c, sub) >= 600).then_some(())
    });
    c.batch_execute("COMMIT PREPARED 'sg_straggler'").expect("commit prepared");
    wait_for("the queue to drain", WAIT * 2, || {
        (queued(&mut c, sub) == 0
            && count(&mut c, &format!("SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = {sub}")) == total + 1)
            .then_some(())
    });
    let log = rx.log("/straggler");
    let steps: Vec<i64> = log.iter().map(|r| r["json"]["data"]["step"].as_i64().unwrap_or(-2)).collect();
    let mut times: HashMap<i64, usize> = HashMap::new();
    for s in &steps {
        *times.entry(*s).or_default() += 1;
    }
    let twice: Vec<i64> = times.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).collect();
    let missing = (-1..total).filter(|s| !times.contains_key(s)).count();
    assert!(
        twice.is_empty() && missing == 0 && steps.len() as i64 == total + 1,
        "every delivery once: {} requests, {} sent more than once (the lowest {:?}), {missing} missing",
        steps.len(),
        twice.len(),
        twice.iter().min()
    );
    let later: Vec<i64> = steps.iter().copied().filter(|s| *s >= 0).collect();
    assert!(later.windows(2).all(|w| w[0] < w[1]), "the others in commit order");
    assert!(log.iter().all(|r| r["verified"] == json!(true)), "every signature verified");
}

#[test]
fn unsubscribing_while_a_record_holds_the_subscription_row_does_not_deadlock() {
    // The worker records a failing endpoint's outcomes in one statement whose UPDATE of the
    // subscription (its failure streak) runs before its queue and delivery changes. Played here
    // in that order by hand, so that the interleaving is certain: the record's transaction has
    // updated the subscription row when an admin's unsubscribe starts; then it deletes the
    // queue rows. unsubscribe used to take the queue rows first: a deadlock, one of the two
    // aborted (seen at the end of bench/delivery.sh).
    let rx = Receiver::start();
    let own = shared();
    let mut c = own.connect();
    c.batch_execute(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unsubscriber') THEN
                 CREATE ROLE unsubscriber LOGIN;
             END IF;
         END $$;
         GRANT webhooks_admin TO unsubscriber;",
    )
    .expect("role");
    let sub = subscribe(&mut c, &rx, "/unsub_lock", "{ul.*}", json!({}));
    c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
    c.batch_execute("SELECT count(webhooks.emit('ul.e', jsonb_build_object('i', i), i::text)) FROM generate_series(1, 3) i")
        .expect("emit");
    wait_for("three queued", WAIT, || (queued(&mut c, sub) == 3).then_some(()));

    let mut record = own.connect();
    record.batch_execute("BEGIN").expect("begin");
    record
        .execute("UPDATE webhooks._subscriptions SET consecutive_failures = consecutive_failures + 1 WHERE id = $1", &[&sub])
        .expect("the record's update of the subscription");
    let (tx, done) = std::sync::mpsc::channel();
    let mut admin = own.connect_as("postgres", "unsubscriber");
    let unsubscribing = std::thread::spawn(move || {
        let r = admin.execute("SELECT webhooks.unsubscribe($1)", &[&sub]).map(|_| ()).map_err(|e| e.to_string());
        tx.send(r).expect("send");
    });
    wait_for("unsubscribe to wait for the record", WAIT, || {
        (count(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'unsubscriber' AND wait_event_type = 'Lock'") == 1)
            .then_some(())
    });
    // The record goes on: its queue rows and deliveries, then its commit.
    record
        .execute("DELETE FROM webhooks._queue WHERE subscription_id = $1", &[&sub])
        .expect("the record's delete of the queue rows (deadlocked before)");
    record
        .execute("UPDATE webhooks._deliveries SET status = 'succeeded' WHERE subscription_id = $1", &[&sub])
        .expect("the record's update of the deliveries");
    record.batch_execute("COMMIT").expect("commit");
    let result = done.recv_timeout(WAIT).expect("unsubscribe returned");
    unsubscribing.join().expect("thread");
    assert_eq!(result, Ok(()), "unsubscribe waited for the record, then went on");
    assert_eq!(count(&mut c, &format!("SELECT count(*) FROM webhooks._subscriptions WHERE id = {sub}")), 0);
    assert_eq!(
        count(&mut c, &format!("SELECT count(*) FROM webhooks._deliveries WHERE subscription_id = {sub} AND status = 'succeeded'")),
        3,
        "what the record ended stays as it ended it"
    );
}

#[test]
fn unsubscribing_subscriptions_while_their_deliveries_are_sent_and_recorded_never_deadlocks() {
    // The records the workers really make, not played by hand: a hot key's chain growing while
    // it is sent (its next delivery claimed before the reported ones are deleted), spread keys
    // recorded in the order their jobs finished, a failing endpoint whose records update the
    // subscription's streak; unsubscribed by an admin in the middle of it, one at a time in
    // either order, or all in one transaction in id order, round after round. A deadlock
    // aborts one side: an error from unsubscribe, or "deadlock detected" and a restarted
    // worker in the log.
    let own = Cluster::start(
        "unsub_stress",
        &[
            "webhooks.workers = 2",
            "webhooks.retry_schedule = '100ms,100ms,100ms'",
            "log_min_messages = error",
        ],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    c.batch_execute("CREATE ROLE unsubscriber LOGIN; GRANT webhooks_admin TO unsubscriber;")
        .expect("role");
    let mut admin = own.connect_as("postgres", "unsubscriber");
    // A hang fails the test here, not at the harness's timeout.
    admin.batch_execute("SET statement_timeout = '60s'").expect("timeout");
    let workers = |c: &mut Client| -> Vec<i32> {
        c.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pg_webhooks worker%' ORDER BY 1",
            &[],
        )
        .expect("workers")
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let before = wait_for("two workers", WAIT, || {
        let w = workers(&mut c);
        (w.len() == 2).then_some(w)
    });
    for round in 0..12 {
        let healthy = subscribe(&mut c, &rx, &format!("/us_ok{round}"), "{us.*}", json!({}));
        let failing = subscribe(&mut c, &rx, &format!("/us_fail{round}"), "{us.*}", json!({"default_status": 500}));
        let hot = subscribe(&mut c, &rx, &format!("/us_hot{round}"), "{uh.*}", json!({}));
        let subs = [healthy, failing, hot];
        // Everything queued first (held), so that no fan-out is left to race the unsubscribes.
        for sub in subs {
            c.execute("SELECT webhooks.pause($1)", &[&sub]).expect("pause");
        }
        c.batch_execute(&format!(
            "SELECT count(webhooks.emit('us.e', jsonb_build_object('i', i),
                    CASE WHEN i % 2 = 0 THEN 'hot' ELSE (i % 40)::text END))
               FROM generate_series(1, 6000) i;
             SELECT count(webhooks.emit('uh.e', jsonb_build_object('i', i), 'one'))
               FROM generate_series(1, 12000) i -- round {round}"
        ))
        .expect("emit");
        for (sub, n) in [(healthy, 6000), (failing, 6000), (hot, 12000)] {
            wait_queued(&mut c, sub, n);
        }
        for sub in subs {
            c.execute("SELECT webhooks.resume($1)", &[&sub]).expect("resume");
        }
        rx.wait_for_requests(&format!("/us_ok{round}"), 600, WAIT);
        rx.wait_for_requests(&format!("/us_fail{round}"), 20, WAIT);
        // Past GROW_FROM: the one key's chain grows while it is sent. Over 11,000 of its
        // requests are left: still being sent when the unsubscribes come, however slow the
        // machine (checked below).
        rx.wait_for_requests(&format!("/us_hot{round}"), 700, WAIT);
        let unsubscribed: Result<Vec<u64>, postgres::Error> = match round % 3 {
            0 => subs.iter().map(|sub| admin.execute("SELECT webhooks.unsubscribe($1)", &[sub])).collect(),
            1 => subs.iter().rev().map(|sub| admin.execute("SELECT webhooks.unsubscribe($1)", &[sub])).collect(),
            _ => admin
                .execute(
                    "SELECT webhooks.unsubscribe(id) FROM unnest($1::int8[]) id ORDER BY id",
                    &[&subs.to_vec()],
                )
                .map(|_| vec![]),
        };
        unsubscribed.unwrap_or_else(|e| panic!("unsubscribe in round {round}: {e:?}"));
        assert_eq!(queued_any(&mut c, &subs), 0, "round {round}: nothing of theirs is queued");
        assert!(
            rx.log(&format!("/us_hot{round}")).len() < 12000,
            "round {round}: the hot key's chain was still being sent when it was unsubscribed"
        );
    }
    let log = own.server_log();
    assert!(!log.contains("deadlock detected"), "no deadlock:\n{log}");
    assert_eq!(workers(&mut c), before, "no worker ended and was restarted");
    own.stop();
}

#[test]
fn an_open_transaction_that_changed_a_subscription_does_not_hold_its_deliveries() {
    // Every record takes its subscriptions' rows FOR KEY SHARE first (so that an unsubscribe
    // waits for it instead of deadlocking). The functions that change a subscription and leave
    // it in place take its row FOR NO KEY UPDATE, which that does not wait for: an admin's
    // transaction left open after them holds no delivery of a healthy subscription up (a
    // failing one's records update its streak, and wait). (set_shape took FOR UPDATE, and held
    // every record of that subscription, and with it the worker, until it ended.)
    let rx = Receiver::start();
    let own = shared();
    let mut c = own.connect();
    let sub = subscribe(&mut c, &rx, "/open_change", "{oc.*}", json!({}));
    // Delivered to once first: a new subscription is first given what it is owed by a fan-out
    // that leaves it for later while a transaction holds it.
    c.batch_execute("SELECT webhooks.emit('oc.e', '{}', 'first')").expect("emit");
    rx.wait_for_requests("/open_change", 1, WAIT);
    let mut admin = own.connect();
    admin.batch_execute("SET statement_timeout = '60s'; BEGIN").expect("begin");
    admin.execute("SELECT webhooks.set_shape($1, NULL)", &[&sub]).expect("set_shape");
    admin.execute("SELECT webhooks.set_tls($1, NULL)", &[&sub]).expect("set_tls");
    admin
        .execute("SELECT webhooks.set_signature($1, 'standard')", &[&sub])
        .expect("set_signature");
    c.batch_execute("SELECT count(webhooks.emit('oc.e', jsonb_build_object('i', i), (i % 5)::text)) FROM generate_series(1, 50) i")
        .expect("emit");
    rx.wait_for_requests("/open_change", 51, WAIT);
    wait_for("all 50 recorded while the change is open", WAIT, || (succeeded(&mut c, sub) == 51).then_some(()));
    admin.batch_execute("COMMIT").expect("commit");
}

fn queued_any(c: &mut Client, subs: &[i64]) -> i64 {
    c.query_one("SELECT count(*) FROM webhooks._queue WHERE subscription_id = ANY($1)", &[&subs])
        .expect("queued")
        .get(0)
}
