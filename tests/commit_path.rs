//! The commit path's subtle cases: the worker finds committed events by their transaction
//! (PgQ's batches), so a transaction that stays open long, or commits after later ones, must
//! neither be skipped nor hold anybody else's events back; many writers at once must each be
//! delivered once, per key in commit order; a transaction of many events is fanned out in
//! pieces, whole and in order; and the rows at commit are right after savepoint rollbacks of
//! the versions the trigger saw.

mod common;

use common::{events, shared_cluster, wait_for, Cluster, Receiver};
use postgres::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn cluster() -> &'static Cluster {
    shared_cluster("commit_path", &["webhooks.batch_size = 50"])
}

fn subscribe(c: &mut Client, rx: &Receiver, path: &str, patterns: &str) -> i64 {
    let row = c
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, $2::text::text[])",
            &[&rx.url(path), &patterns],
        )
        .expect("subscribe");
    rx.configure(json!({"path": path, "secret": row.get::<_, String>(1)}));
    row.get(0)
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).expect(sql).get(0)
}

/// `data.<field>` of each request received at `path`, grouped by `data.<group>`, in arrival order.
fn arrivals(rx: &Receiver, path: &str, group: &str, field: &str) -> HashMap<String, Vec<i64>> {
    let mut by: HashMap<String, Vec<i64>> = HashMap::new();
    for r in rx.log(path) {
        let d: &Value = &r["json"]["data"];
        by.entry(d[group].to_string())
            .or_default()
            .push(d[field].as_i64().unwrap_or(-1));
    }
    by
}

#[test]
fn a_long_open_transaction_delays_nobody_else_and_is_delivered_when_it_commits() {
    let rx = Receiver::start();
    let mut c = cluster().connect();
    subscribe(&mut c, &rx, "/long", "{lng.*}");
    c.batch_execute(
        "CREATE TABLE lng_orders (id int PRIMARY KEY, status text);
         SELECT webhooks.track('lng_orders', entity => 'lng', status_column => 'status');",
    )
    .expect("table");
    // Opened first (lowest xid), writes first, commits last.
    let mut long = cluster().connect();
    long.batch_execute("BEGIN; INSERT INTO lng_orders VALUES (0, 'pending');")
        .expect("long transaction writes");
    for i in 1..=20 {
        c.execute("INSERT INTO lng_orders VALUES ($1, 'pending')", &[&i])
            .expect("short transaction");
    }
    // The 20 short ones arrive while the long one is still open.
    rx.wait_for_requests("/long", 20, WAIT);
    assert!(
        rx.log("/long").iter().all(|r| r["json"]["data"]["id"] != 0),
        "nothing of the open transaction may be delivered"
    );
    long.batch_execute("COMMIT").expect("long commits");
    let log = rx.wait_for_requests("/long", 21, WAIT);
    assert_eq!(log.len(), 21, "each delivered once");
    assert_eq!(log[20]["json"]["data"]["id"], 0, "the late commit comes last");
}

#[test]
fn transactions_committing_out_of_xid_order_are_all_delivered_once() {
    let rx = Receiver::start();
    let mut c = cluster().connect();
    subscribe(&mut c, &rx, "/ooo", "{ooo.*}");
    // Ten transactions take their xids in one order (an emit each, held open) and commit in
    // the reverse order, each after the worker has fanned out the ones committed before.
    let mut open = Vec::new();
    for i in 0..10 {
        let mut t = cluster().connect();
        t.batch_execute(&format!(
            "BEGIN; SELECT webhooks.emit('ooo.e', jsonb_build_object('i', {i}))"
        ))
        .expect("emit");
        open.push(t);
    }
    for (n, mut t) in open.into_iter().rev().enumerate() {
        t.batch_execute("COMMIT").expect("commit");
        rx.wait_for_requests("/ooo", n + 1, WAIT);
    }
    let got: Vec<i64> = rx
        .log("/ooo")
        .iter()
        .map(|r| r["json"]["data"]["i"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(got, (0..10).rev().collect::<Vec<_>>(), "one each, in commit order");
}

#[test]
fn many_concurrent_writers_are_delivered_once_each_in_commit_order_per_key() {
    let rx = Receiver::start();
    let mut c = cluster().connect();
    subscribe(&mut c, &rx, "/many", "{mny.status_updated}");
    c.batch_execute(
        "CREATE TABLE mny_orders (id int PRIMARY KEY, status text, step int NOT NULL DEFAULT 0);
         INSERT INTO mny_orders SELECT g, 's0', 0 FROM generate_series(1, 10) g;
         SELECT webhooks.track('mny_orders', entity => 'mny', status_column => 'status');",
    )
    .expect("table");
    // 8 writers, 60 transactions each, on 10 shared keys: every update bumps the key's step
    // and sets a new status, so each is one status_updated event; per key the steps must
    // arrive in commit order, which is step order.
    let (writers, per_writer) = (8, 60);
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            std::thread::spawn(move || {
                let mut t = cluster().connect();
                for i in 0..per_writer {
                    let key = 1 + (w * 7 + i * 3) % 10;
                    t.execute(
                        "UPDATE mny_orders SET step = step + 1, status = 's' || (step + 1) WHERE id = $1",
                        &[&key],
                    )
                    .expect("update");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    let total = (writers * per_writer) as usize;
    rx.wait_for_requests("/many", total, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let log = rx.log("/many");
    assert_eq!(log.len(), total, "each delivered once");
    let ids: std::collections::HashSet<String> = log
        .iter()
        .map(|r| r["headers"]["webhook-id"].to_string())
        .collect();
    assert_eq!(ids.len(), total, "no event delivered twice");
    for (key, steps) in arrivals(&rx, "/many", "id", "step") {
        let expected: Vec<i64> = (1..=steps.len() as i64).collect();
        assert_eq!(steps, expected, "key {key}: every step once, in commit order");
    }
}

#[test]
fn a_transaction_of_many_events_is_fanned_out_in_pieces_whole_and_in_order() {
    let rx = Receiver::start();
    let mut c = cluster().connect();
    subscribe(&mut c, &rx, "/big", "{big.*}");
    // 2,000 events in one transaction (40 pieces of batch_size 50), keyed on 7 keys, and a
    // small transaction on one of the keys committed after it.
    c.batch_execute(
        "BEGIN;
         SELECT webhooks.emit('big.e', jsonb_build_object('k', g % 7, 'n', g), (g % 7)::text)
           FROM generate_series(1, 2000) g;
         COMMIT;
         SELECT webhooks.emit('big.e', jsonb_build_object('k', 3, 'n', 2001), '3');",
    )
    .expect("emit");
    rx.wait_for_requests("/big", 2001, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.log("/big").len(), 2001, "each delivered once");
    for (key, ns) in arrivals(&rx, "/big", "k", "n") {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "key {key} out of commit order");
        sorted.dedup();
        assert_eq!(sorted.len(), ns.len(), "key {key} has a duplicate");
    }
    // The worker's place is past everything.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM webhooks._fanout WHERE batch IS NOT NULL"
        ),
        0
    );
}

#[test]
fn versions_the_trigger_saw_and_a_savepoint_undid_are_read_again_at_commit() {
    let mut c = cluster().connect();
    c.batch_execute(
        "CREATE TABLE sv_orders (id int PRIMARY KEY, status text, note text);
         INSERT INTO sv_orders VALUES (1, 'pending', 'a'), (2, 'pending', 'a');
         SELECT webhooks.track('sv_orders', entity => 'sv', status_column => 'status');
         BEGIN;
         UPDATE sv_orders SET note = 'b' WHERE id = 1;
         SAVEPOINT s;
         UPDATE sv_orders SET note = 'c', status = 'paid' WHERE id = 1;
         ROLLBACK TO SAVEPOINT s;
         UPDATE sv_orders SET note = 'x' WHERE id = 2;
         SAVEPOINT t;
         UPDATE sv_orders SET note = 'a' WHERE id = 2;
         ROLLBACK TO SAVEPOINT t;
         COMMIT;",
    )
    .expect("txn");
    let ev = events(&mut c, "sv");
    assert_eq!(ev.len(), 2, "{ev:?}");
    let by_id: HashMap<i64, &Value> = ev
        .iter()
        .map(|(t, d)| {
            assert_eq!(t, "sv.updated", "{ev:?}");
            (d["id"].as_i64().unwrap_or(0), d)
        })
        .collect();
    assert_eq!(by_id[&1]["note"], "b");
    assert_eq!(by_id[&1]["status"], "pending");
    assert_eq!(by_id[&2]["note"], "x");
}

#[test]
fn a_large_value_stored_out_of_line_compares_by_value() {
    let mut c = cluster().connect();
    c.batch_execute(
        "CREATE TABLE tst_orders (id int PRIMARY KEY, status text, doc text);
         ALTER TABLE tst_orders ALTER COLUMN doc SET STORAGE EXTERNAL;
         INSERT INTO tst_orders VALUES (1, 'pending', repeat('x', 100000));
         SELECT webhooks.track('tst_orders', entity => 'tst', status_column => 'status');
         -- The same value, stored again (a new out-of-line copy): no change.
         UPDATE tst_orders SET doc = repeat('x', 100000) WHERE id = 1;
         -- A different value of the same length: a change.
         UPDATE tst_orders SET doc = repeat('x', 99999) || 'y' WHERE id = 1;",
    )
    .expect("txns");
    let ev = events(&mut c, "tst");
    assert_eq!(ev.len(), 1, "only the real change: {:?}", ev.iter().map(|e| &e.0).collect::<Vec<_>>());
    assert_eq!(ev[0].0, "tst.updated");
    assert!(ev[0].1["doc"].as_str().unwrap_or("").ends_with('y'));
}

#[test]
fn nothing_subscribed_means_the_worker_only_moves_on() {
    // A cluster of its own: no subscription at all.
    let own = Cluster::start("commit_path_idle", &[]);
    let mut c = own.connect();
    c.batch_execute(
        "CREATE TABLE idl_orders (id int PRIMARY KEY, status text);
         SELECT webhooks.track('idl_orders', entity => 'idl', status_column => 'status');
         INSERT INTO idl_orders SELECT g, 'pending' FROM generate_series(1, 100) g;",
    )
    .expect("writes");
    // The worker's snapshot passes these transactions (within about a second), and no
    // delivery is made.
    wait_for("the worker to move past the writes", WAIT, || {
        let behind = count(
            &mut c,
            "SELECT count(*) FROM webhooks._events e
              WHERE NOT pg_visible_in_snapshot(e.xid, (SELECT done FROM webhooks._fanout))",
        );
        (behind == 0).then_some(())
    });
    assert_eq!(count(&mut c, "SELECT count(*) FROM webhooks._deliveries"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM webhooks._events"), 100);
}

#[test]
fn children_read_through_their_foreign_key_index_are_in_primary_key_order_and_compare_right() {
    // With an index led by the foreign key, capture reads the items by an index scan, in
    // primary key order whatever their order in the heap or the index.
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE TABLE ix_orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending');
           CREATE TABLE ix_items (id int PRIMARY KEY, order_id int REFERENCES ix_orders, sku text, qty int);
           CREATE INDEX ON ix_items (order_id);
           INSERT INTO ix_orders VALUES (1, 'pending');
           INSERT INTO ix_items VALUES (30, 1, 'C', 1), (10, 1, 'A', 1), (20, 1, 'B', 1);
           SELECT webhooks.track('ix_orders', entity => 'ix', status_column => 'status',
                  children => '{"items": {"table": "ix_items", "foreign_key": "order_id"}}');
           -- Moves item 10 to the end of the heap.
           UPDATE ix_items SET qty = 2 WHERE id = 10;
           -- A change undone in the same transaction: nothing.
           BEGIN; UPDATE ix_items SET qty = 5 WHERE id = 20; UPDATE ix_items SET qty = 1 WHERE id = 20; COMMIT;
           -- A status change: the payload has the items as they are.
           UPDATE ix_orders SET status = 'paid' WHERE id = 1;
           -- A new order with its items, the parent first: created, with its items.
           BEGIN; INSERT INTO ix_orders VALUES (2, 'pending');
                  INSERT INTO ix_items VALUES (5, 2, 'Z', 1), (4, 2, 'Y', 1); COMMIT;
           -- Items of another order are not this one's.
           UPDATE ix_items SET order_id = 2 WHERE id = 30;"#,
    )
    .expect("writes");
    let ev = events(&mut c, "ix");
    let summary: Vec<(String, i64, Vec<(i64, i64)>)> = ev
        .iter()
        .map(|(t, d)| {
            let items = d["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| (i["id"].as_i64().unwrap_or(0), i["qty"].as_i64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            (t.clone(), d["id"].as_i64().unwrap_or(0), items)
        })
        .collect();
    let expected: Vec<(String, i64, Vec<(i64, i64)>)> = vec![
        ("ix.updated".into(), 1, vec![(10, 2), (20, 1), (30, 1)]),
        ("ix.status_updated".into(), 1, vec![(10, 2), (20, 1), (30, 1)]),
        ("ix.paid".into(), 1, vec![(10, 2), (20, 1), (30, 1)]),
        ("ix.created".into(), 2, vec![(4, 1), (5, 1)]),
        ("ix.updated".into(), 1, vec![(10, 2), (20, 1)]),
        ("ix.updated".into(), 2, vec![(4, 1), (5, 1), (30, 1)]),
    ];
    let mut got = summary.clone();
    let mut want = expected.clone();
    // The last transaction's two events are in either order.
    got[4..].sort();
    want[4..].sort();
    assert_eq!(got, want, "{summary:?}");
}

#[test]
fn a_larger_batch_size_mid_transaction_skips_no_other_transactions_events() {
    let own = Cluster::start("commit_path_resize", &["webhooks.batch_size = 20"]);
    let mut c = own.connect();
    c.batch_execute("SELECT webhooks.pause(id) FROM webhooks.subscribe('http://127.0.0.1:9/x', '{rs.*}')")
        .expect("subscribe");
    // Hold the worker (it locks _fanout in each step) while two transactions commit: X with
    // 4,000 events at even seqs, Y with one event at an odd seq inside X's range (as a
    // transaction committing during X's pre-commit gets). Y's first event comes after X's,
    // so Y is taken after the whole of X.
    let mut hold = own.connect();
    hold.batch_execute("BEGIN; SELECT 1 FROM webhooks._fanout FOR UPDATE")
        .expect("hold");
    c.batch_execute(
        "INSERT INTO webhooks._events (seq, type, entity, key, data)
         SELECT 1000000 + 2 * g, 'rs.x', 'rs', 'x', jsonb_build_object('g', g) FROM generate_series(0, 3999) g;
         INSERT INTO webhooks._events (seq, type, entity, key, data) VALUES (1004001, 'rs.y', 'rs', 'y', '{}');",
    )
    .expect("events");
    hold.batch_execute("COMMIT").expect("release");
    // Let the worker take X in pieces of 20, a step or two at a time, until it is past Y's
    // seq, then hold it there.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        hold.batch_execute("BEGIN").expect("begin");
        let row = hold
            .query_one(
                "SELECT batch_first_seq, batch_seq FROM webhooks._fanout FOR UPDATE",
                &[],
            )
            .expect("fanout");
        let (first, seq): (i64, i64) = (row.get(0), row.get(1));
        if first == 1_000_000 && seq > 1_004_001 && seq < i64::MAX {
            break;
        }
        assert!(
            seq <= 1_004_001 || first != 1_000_000,
            "the worker went past X before it could be held (at {first}, {seq})"
        );
        assert!(std::time::Instant::now() < deadline, "the worker did not take X");
        hold.batch_execute("COMMIT").expect("commit");
        std::thread::sleep(Duration::from_millis(1));
    }
    c.batch_execute("ALTER SYSTEM SET webhooks.batch_size = 10000")
        .expect("set");
    c.batch_execute("SELECT pg_reload_conf()").expect("reload");
    std::thread::sleep(Duration::from_millis(500));
    hold.batch_execute("COMMIT").expect("release");
    wait_for("every event to have its delivery", WAIT, || {
        let missing = count(
            &mut c,
            "SELECT count(*) FROM webhooks._events e WHERE e.type LIKE 'rs.%'
                AND NOT EXISTS (SELECT 1 FROM webhooks._deliveries d WHERE d.event_seq = e.seq)",
        );
        (missing == 0).then_some(())
    });
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM webhooks._deliveries"),
        4001,
        "each once"
    );
}

#[test]
fn a_version_undone_by_a_savepoint_whose_slot_is_reused_is_looked_up_by_key() {
    let mut c = cluster().connect();
    c.batch_execute(
        "CREATE TABLE reuse_orders (id int PRIMARY KEY, status text, note text);
         INSERT INTO reuse_orders VALUES (1, 'pending', ''), (2, 'pending', '');
         SELECT webhooks.track('reuse_orders', entity => 'reuse', status_column => 'status');",
    )
    .expect("table");
    let mut s1 = cluster().connect();
    s1.batch_execute(
        "BEGIN;
         UPDATE reuse_orders SET status = 'paid' WHERE id = 1;
         SAVEPOINT s;
         UPDATE reuse_orders SET note = 'undone' WHERE id = 1;
         ROLLBACK TO SAVEPOINT s;",
    )
    .expect("s1");
    let undone: String = s1
        .query_one("SELECT ctid::text FROM reuse_orders WHERE id = 1", &[])
        .expect("ctid")
        .get(0);
    // The undone version is dead at once: vacuum frees its slot, and an insert reuses it.
    c.batch_execute("VACUUM reuse_orders").expect("vacuum");
    c.batch_execute("INSERT INTO reuse_orders VALUES (3, 'pending', '')")
        .expect("insert");
    let reused: String = c
        .query_one("SELECT ctid::text FROM reuse_orders WHERE id = 3", &[])
        .expect("ctid")
        .get(0);
    s1.batch_execute("COMMIT").expect("commit");
    let ev: Vec<(String, String)> = c
        .query(
            "SELECT type, key FROM webhooks.events WHERE entity = 'reuse' ORDER BY seq",
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut types: Vec<String> = ev.iter().map(|(t, k)| format!("{t} {k}")).collect();
    types.sort();
    assert_eq!(
        types,
        ["reuse.created 3", "reuse.paid 1", "reuse.status_updated 1"],
        "undone version at {undone}, row 3 at {reused}"
    );
}

#[test]
fn a_subscription_still_being_created_gets_the_events_committed_after_it_was_created() {
    let rx = Receiver::start();
    let mut c = cluster().connect();
    // The subscribing transaction stays open while an event commits and the worker moves on.
    let mut admin = cluster().connect();
    admin.batch_execute("BEGIN").expect("begin");
    let row = admin
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, '{late.*}')",
            &[&rx.url("/late-sub")],
        )
        .expect("subscribe");
    rx.configure(json!({"path": "/late-sub", "secret": row.get::<_, String>(1)}));
    // One ordering key: delivered in commit order.
    c.batch_execute("SELECT webhooks.emit('late.e', '{\"n\": 1}', 'k')")
        .expect("emit");
    // The worker fans that transaction out (to the other subscriptions) before the
    // subscription commits.
    wait_for("the worker to pass the event", WAIT, || {
        let behind = count(
            &mut c,
            "SELECT count(*) FROM webhooks._events e WHERE e.type = 'late.e'
                AND NOT pg_visible_in_snapshot(e.xid, (SELECT done FROM webhooks._fanout))",
        );
        (behind == 0).then_some(())
    });
    admin.batch_execute("COMMIT").expect("commit");
    c.batch_execute("SELECT webhooks.emit('late.e', '{\"n\": 2}', 'k')")
        .expect("emit");
    let log = rx.wait_for_requests("/late-sub", 2, WAIT);
    let ns: Vec<i64> = log
        .iter()
        .map(|r| r["json"]["data"]["n"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ns, [1, 2], "owed by its created_snapshot, in commit order");
}

#[test]
fn commit_prepared_wakes_the_worker() {
    // The safety poll is an hour here: only a wake delivers within the wait below.
    let own = Cluster::start(
        "commit_path_2pc",
        &["max_prepared_transactions = 2", "webhooks.poll_interval = '1h'"],
    );
    let rx = Receiver::start();
    let mut c = own.connect();
    subscribe(&mut c, &rx, "/2pc", "{tpc.*}");
    c.batch_execute("SELECT webhooks.emit('tpc.first', '{}')")
        .expect("emit");
    rx.wait_for_requests("/2pc", 1, WAIT);
    c.batch_execute(
        "BEGIN; SELECT webhooks.emit('tpc.prepared', '{}'); PREPARE TRANSACTION 'pgwh_2pc';",
    )
    .expect("prepare");
    // Let the worker go idle, then commit the prepared transaction from another session.
    std::thread::sleep(Duration::from_millis(300));
    let mut other = own.connect();
    other
        .batch_execute("COMMIT PREPARED 'pgwh_2pc'")
        .expect("commit prepared");
    let log = rx.wait_for_requests("/2pc", 2, Duration::from_secs(20));
    assert_eq!(log[1]["json"]["type"], "tpc.prepared");
}

#[test]
fn a_column_added_with_a_default_reads_the_same_before_and_at_commit() {
    let mut c = cluster().connect();
    c.batch_execute(
        "CREATE TABLE add_orders (id int PRIMARY KEY, note text);
         INSERT INTO add_orders VALUES (1, '');
         ALTER TABLE add_orders ADD COLUMN status text NOT NULL DEFAULT 'pending';
         SELECT webhooks.track('add_orders', entity => 'add', status_column => 'status');
         -- Rows looked up by key at commit (their version was undone): no change.
         BEGIN; SAVEPOINT s; UPDATE add_orders SET note = 'x' WHERE id = 1; ROLLBACK TO s; COMMIT;
         BEGIN; SAVEPOINT s; DELETE FROM add_orders WHERE id = 1; ROLLBACK TO s; COMMIT;
         UPDATE add_orders SET status = 'paid' WHERE id = 1;",
    )
    .expect("writes");
    let ev = events(&mut c, "add");
    let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(types, ["add.status_updated", "add.paid"], "{ev:?}");
    assert_eq!(ev[0].1["previous_status"], "pending");
}

/// `<e>_orders` tracked with `<e>_items` as children, the items with an index on order_id
/// (the direct read) and `pk` as their primary key clause.
fn indexed_orders(e: &str, pk: &str) -> Client {
    let mut c = cluster().connect();
    c.batch_execute(&format!(
        r#"CREATE TABLE {e}_orders (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending');
           CREATE TABLE {e}_items (id int {pk}, order_id int REFERENCES {e}_orders, sku text);
           CREATE INDEX {e}_items_order_idx ON {e}_items (order_id);
           SELECT webhooks.track('{e}_orders', entity => '{e}', status_column => 'status',
                  children => '{{"items": {{"table": "{e}_items", "foreign_key": "order_id"}}}}');"#
    ))
    .expect("tables");
    c
}

fn item_ids(ev: &(String, Value)) -> Vec<i64> {
    ev.1["items"]
        .as_array()
        .map(|a| a.iter().map(|i| i["id"].as_i64().unwrap_or(0)).collect())
        .unwrap_or_default()
}

#[test]
fn dropping_the_childrens_index_while_a_writer_is_open_does_not_fail_its_commit() {
    let mut c = indexed_orders("dix", "PRIMARY KEY");
    c.batch_execute("INSERT INTO dix_orders VALUES (1)").expect("order");
    c.batch_execute("INSERT INTO dix_items VALUES (1, 1, 'a'), (2, 1, 'b')")
        .expect("items");
    let mut writer = cluster().connect();
    writer
        .batch_execute("BEGIN; UPDATE dix_orders SET status = 'paid' WHERE id = 1;")
        .expect("writer");
    c.batch_execute("DROP INDEX dix_items_order_idx").expect("drop index");
    writer.batch_execute("COMMIT").expect("commit succeeds");
    let ev = events(&mut c, "dix");
    let last = ev.iter().find(|e| e.0 == "dix.status_updated").expect("status_updated");
    assert_eq!(item_ids(last), [1, 2]);
}

#[test]
fn a_deferrable_primary_key_still_orders_the_children_and_inheriting_tables_are_read() {
    let mut c = indexed_orders("dpk", "PRIMARY KEY DEFERRABLE");
    // One transaction each (a multi-statement string is one implicit transaction).
    for sql in [
        "INSERT INTO dpk_orders VALUES (1)",
        "INSERT INTO dpk_items VALUES (2, 1, 'b'), (1, 1, 'a')",
        "UPDATE dpk_items SET sku = 'B' WHERE id = 2", // moves item 2 in the heap
        "UPDATE dpk_orders SET status = 'paid' WHERE id = 1",
    ] {
        c.batch_execute(sql).expect(sql);
    }
    let ev = events(&mut c, "dpk");
    let last = ev.iter().rev().find(|e| e.0 == "dpk.status_updated").expect("status_updated");
    assert_eq!(item_ids(last), [1, 2], "primary key order");

    let mut c = indexed_orders("inh", "PRIMARY KEY");
    for sql in [
        "CREATE TABLE inh_special_items (note text) INHERITS (inh_items)",
        "INSERT INTO inh_orders VALUES (1)",
        "INSERT INTO inh_items VALUES (1, 1, 'a')",
        "INSERT INTO inh_special_items VALUES (2, 1, 'b', 'gift')",
        "UPDATE inh_orders SET status = 'paid' WHERE id = 1",
    ] {
        c.batch_execute(sql).expect(sql);
    }
    let ev = events(&mut c, "inh");
    let last = ev.iter().rev().find(|e| e.0 == "inh.status_updated").expect("status_updated");
    assert_eq!(item_ids(last), [1, 2], "rows of inheriting tables, as FROM inh_items reads them");
}

#[test]
fn a_parent_insert_undone_by_a_savepoint_does_not_skip_the_parent_lock() {
    let mut c = indexed_orders("lck", "PRIMARY KEY");
    let mut t1 = cluster().connect();
    t1.batch_execute(
        "BEGIN; SAVEPOINT a; INSERT INTO lck_orders VALUES (7); ROLLBACK TO SAVEPOINT a;",
    )
    .expect("t1");
    c.batch_execute("INSERT INTO lck_orders VALUES (7)").expect("another session inserts 7");
    t1.batch_execute("INSERT INTO lck_items VALUES (1, 7, 'x')").expect("t1 writes an item");
    // t1 holds the parent's row lock, as for any parent it did not insert itself.
    let err = c
        .batch_execute("SELECT 1 FROM lck_orders WHERE id = 7 FOR UPDATE NOWAIT")
        .expect_err("the parent row is locked");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    t1.batch_execute("COMMIT").expect("commit");
}

/// A status change's `previous_status` and `status` are built into the row's jsonb at commit:
/// they still win over columns of those names, the mapped event carries the same data, and the
/// payload is the one the text path (a column of a user's type sends a table there) writes.
#[test]
fn a_status_changes_keys_win_over_columns_of_their_names_on_both_paths() {
    let mut c = cluster().connect();
    let table = |t: &str, extra: &str| {
        format!(
            r#"CREATE TABLE {t} (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                   previous_status text, note text{extra});
               CREATE TABLE {t}_items (id int PRIMARY KEY, order_id int REFERENCES {t}, sku text);
               CREATE INDEX {t}_items_order_idx ON {t}_items (order_id);
               SELECT webhooks.track('{t}', entity => '{t}', status_column => 'status',
                      children => '{{"items": {{"table": "{t}_items", "foreign_key": "order_id"}}}}');
               INSERT INTO {t} VALUES (1, 'pending', 'mine', 'n');
               INSERT INTO {t}_items VALUES (1, 1, 'a'), (2, 1, 'b');"#
        )
    };
    c.batch_execute("CREATE TYPE psk_mood AS ENUM ('ok', 'sad')").expect("type");
    c.batch_execute(&table("psk_direct", "")).expect("direct table");
    c.batch_execute(&table("psk_text", ", mood psk_mood DEFAULT 'ok'")).expect("text table");
    for t in ["psk_direct", "psk_text"] {
        // One transaction each (one simple query's statements would share one).
        for sql in [
            format!("UPDATE {t} SET status = 'paid', note = 'x' WHERE id = 1"),
            format!("BEGIN; UPDATE {t} SET status = 'shipped' WHERE id = 1; UPDATE {t}_items SET sku = 'c' WHERE id = 2; COMMIT"),
            format!("BEGIN; UPDATE {t} SET status = 'delivered' WHERE id = 1; UPDATE {t} SET status = 'weird' WHERE id = 1; COMMIT"),
        ] {
            c.batch_execute(&sql).expect(&sql);
        }
    }
    let strip = |mut v: Value| {
        v.as_object_mut().map(|o| o.remove("mood"));
        v
    };
    let direct = events(&mut c, "psk_direct");
    let text: Vec<(String, Value)> = events(&mut c, "psk_text")
        .into_iter()
        .map(|(t, v)| (t.replacen("psk_text", "psk_direct", 1), strip(v)))
        .collect();
    let types: Vec<&str> = direct.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "psk_direct.created",
            "psk_direct.status_updated",
            "psk_direct.paid",
            "psk_direct.status_updated",
            "psk_direct.shipped",
            "psk_direct.status_updated",
        ],
        "{direct:?}"
    );
    assert_eq!(direct, text, "the direct and the text path write the same payloads");
    assert_eq!(direct[0].1["previous_status"], "mine", "a created row's column is its own");
    for (i, (previous, status)) in [(1, ("pending", "paid")), (3, ("paid", "shipped")), (5, ("shipped", "weird"))] {
        assert_eq!(direct[i].1["previous_status"], previous, "{:?}", direct[i]);
        assert_eq!(direct[i].1["status"], status, "{:?}", direct[i]);
        assert_eq!(direct[i].1["note"], "x");
        assert_eq!(direct[i].1["id"], 1);
    }
    assert_eq!(direct[1].1, direct[2].1, "the mapped event has the status change's data");
    assert_eq!(direct[3].1, direct[4].1);
    assert_eq!(item_ids(&direct[3]), [1, 2]);
    assert_eq!(direct[3].1["items"][1]["sku"], "c");
}

/// Capture keeps the relids of `_events` and its sequence per backend: a backend that wrote
/// events before the extension was dropped and created again (by itself, or by another
/// session while it sat idle or in an open transaction) writes its next ones into the new
/// table, with the new sequence's seqs.
#[test]
fn a_backend_writes_into_a_recreated_extensions_tables() {
    let cl = cluster();
    let mut a = cl.fresh_db("recreated");
    let mut b = cl.connect_db("recreated");
    let setup = "CREATE TABLE IF NOT EXISTS rc_orders (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending');
                 SELECT webhooks.track('rc_orders', entity => 'rc', status_column => 'status');";
    a.batch_execute(setup).expect("track");
    a.batch_execute("INSERT INTO rc_orders VALUES (1); INSERT INTO rc_orders VALUES (2)").expect("first events");
    let recreate = |c: &mut Client| {
        c.batch_execute(&format!(
            "SELECT webhooks.untrack('rc_orders'); DROP EXTENSION pg_webhooks; CREATE EXTENSION pg_webhooks; {setup}"
        ))
        .expect("drop and create the extension again");
    };
    let seqs = |c: &mut Client| -> Vec<(i64, String)> {
        c.query("SELECT seq, key FROM webhooks._events ORDER BY seq", &[])
            .expect("events")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    // Another session recreates it while `a` is idle.
    recreate(&mut b);
    a.batch_execute("UPDATE rc_orders SET status = 'paid' WHERE id = 1").expect("write after another session's recreate");
    assert_eq!(seqs(&mut b), [(1, "1".to_string()), (2, "1".to_string())], "status_updated and paid, in the new table");
    // `a` recreates it itself, then writes.
    recreate(&mut a);
    a.batch_execute("UPDATE rc_orders SET status = 'shipped' WHERE id = 2").expect("write after its own recreate");
    assert_eq!(seqs(&mut a), [(1, "2".to_string()), (2, "2".to_string())]);
    // Recreated while `a` has a transaction open that wrote nothing yet (it has a snapshot, and
    // no lock on the table, which untrack would wait for).
    a.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SELECT 1;").expect("open");
    recreate(&mut b);
    a.batch_execute("UPDATE rc_orders SET status = 'delivered' WHERE id = 2; COMMIT;")
        .expect("commit after a recreate during the transaction");
    assert_eq!(seqs(&mut b), [(1, "2".to_string()), (2, "2".to_string())]);
    let types: Vec<String> = events(&mut b, "rc").into_iter().map(|e| e.0).collect();
    assert_eq!(types, ["rc.status_updated", "rc.delivered"]);
}

/// `webhooks._events` renamed away and a new one made in its place (by another session, with
/// a writer that had already written, and with one that was waiting for the table's lock
/// when the swap committed): the writer's next events go into the new table.
#[test]
fn a_backend_writes_into_the_events_table_that_has_the_name_now() {
    let cl = cluster();
    let mut admin = cl.fresh_db("swapped");
    admin
        .batch_execute(
            "CREATE TABLE sw_orders (id int PRIMARY KEY);
             SELECT webhooks.track('sw_orders', entity => 'sw');
             DO $$ BEGIN CREATE ROLE sw_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT INSERT, SELECT ON sw_orders TO sw_app;",
        )
        .expect("track");
    let swap = |c: &mut Client, n: usize| {
        c.batch_execute(&format!(
            "ALTER TABLE webhooks._events RENAME TO _events_old{n};
             CREATE TABLE webhooks._events (LIKE webhooks._events_old{n} INCLUDING ALL);"
        ))
        .expect("swap");
    };
    let keys_in = |c: &mut Client, table: &str| -> Vec<String> {
        c.query(&format!("SELECT key FROM webhooks.{table} ORDER BY key"), &[])
            .expect("keys")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // A writer that has written (and so kept the table's relid), then the swap. The writers
    // are an application's role, with no privilege on the extension's schema.
    let mut writer = cl.connect_as("swapped", "sw_app");
    writer.batch_execute("INSERT INTO sw_orders VALUES (1)").expect("first");
    swap(&mut admin, 1);
    writer.batch_execute("INSERT INTO sw_orders VALUES (2)").expect("after the swap");
    assert_eq!(keys_in(&mut admin, "_events_old1"), ["1"]);
    assert_eq!(keys_in(&mut admin, "_events"), ["2"], "the new table has the event");
    // A writer waiting for the table's lock at its commit while the swap commits.
    admin.batch_execute("BEGIN").expect("begin");
    swap(&mut admin, 2);
    let mut waiting = cl.connect_as("swapped", "sw_app");
    let pid: i32 = waiting.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
    let t = std::thread::spawn(move || {
        waiting.batch_execute("INSERT INTO sw_orders VALUES (3)").expect("commit after the wait");
        waiting.batch_execute("INSERT INTO sw_orders VALUES (4)").expect("the next one");
    });
    let mut observer = cl.connect_db("swapped");
    wait_for("the writer to wait for _events' lock", WAIT, || {
        let r = observer
            .query_one("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .expect("activity");
        r.get::<_, Option<bool>>(0).unwrap_or(false).then_some(())
    });
    admin.batch_execute("COMMIT").expect("swap commits");
    t.join().expect("writer");
    assert_eq!(keys_in(&mut admin, "_events_old2"), ["2"], "nothing went into the renamed table");
    assert_eq!(keys_in(&mut admin, "_events"), ["3", "4"]);
    // Invalidations that change nothing the name resolves to (ANALYZE's statistics), between
    // two transactions and inside one: the events go where they went.
    writer.batch_execute("INSERT INTO sw_orders VALUES (5)").expect("after the second swap");
    admin.batch_execute("ANALYZE webhooks._events").expect("analyze");
    writer.batch_execute("INSERT INTO sw_orders VALUES (6)").expect("after analyze");
    writer.batch_execute("BEGIN; INSERT INTO sw_orders VALUES (7);").expect("open");
    admin.batch_execute("ANALYZE webhooks._events").expect("analyze");
    writer.batch_execute("COMMIT").expect("commit after analyze");
    assert_eq!(keys_in(&mut admin, "_events"), ["3", "4", "5", "6", "7"]);
    // A view put in its place: an error, not a crash (the direct insert needs a table).
    admin
        .batch_execute(
            "ALTER TABLE webhooks._events RENAME TO _events_old3;
             CREATE VIEW webhooks._events AS SELECT * FROM webhooks._events_old3;",
        )
        .expect("a view");
    let err = writer
        .batch_execute("INSERT INTO sw_orders VALUES (8)")
        .expect_err("a view is no table");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::WRONG_OBJECT_TYPE), "{err:?}");
    writer.batch_execute("SELECT 1").expect("the session is fine");
    let mut fresh = cl.connect_as("swapped", "sw_app");
    let err = fresh
        .batch_execute("INSERT INTO sw_orders VALUES (9)")
        .expect_err("a view is no table, from a new session either");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::WRONG_OBJECT_TYPE), "{err:?}");
    assert_eq!(keys_in(&mut admin, "_events_old3"), ["3", "4", "5", "6", "7"], "nothing half-written");
    let orders: i64 = admin.query_one("SELECT count(*) FROM sw_orders", &[]).expect("count").get(0);
    assert_eq!(orders, 7, "the failed commits wrote no order either");
}

/// Capture stores an event's data of 256 bytes to 2 kB compressed (`_events.data`'s method, lz4
/// where the server has it), so a commit writes and flushes less. The data reads back, and is
/// delivered and signed, as it was written; a status change and its mapped event share one
/// compressed value; small data, data that does not compress and data large enough for
/// PostgreSQL's own toaster are stored as before; the column's method, changed by the DBA, is
/// the one used, and with none the data is stored as before. The writer is an application
/// role with no privilege on the extension.
#[test]
fn event_data_is_stored_compressed_and_reads_and_is_delivered_as_written() {
    let cl = cluster();
    let mut c = cl.connect();
    let rx = Receiver::start();
    c.batch_execute(
        r#"CREATE TABLE cmp_orders (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending', note text);
           CREATE TABLE cmp_items (id int PRIMARY KEY, order_id int REFERENCES cmp_orders, sku text);
           CREATE INDEX cmp_items_order_idx ON cmp_items (order_id);
           SELECT webhooks.track('cmp_orders', entity => 'cmp', status_column => 'status',
                  children => '{"items": {"table": "cmp_items", "foreign_key": "order_id"}}');
           DO $$ BEGIN CREATE ROLE cmp_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
           GRANT SELECT, INSERT, UPDATE ON cmp_orders, cmp_items TO cmp_app;"#,
    )
    .expect("tables");
    subscribe(&mut c, &rx, "/cmp", "{cmp.*}");
    let lz4: bool = c
        .query_one(
            "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
            &[],
        )
        .expect("lz4?")
        .get(0);
    let method = common::events_data_method(&mut c);
    assert_eq!(method, if lz4 { "l" } else { "" }, "the extension sets lz4 where it can");
    let expected = if lz4 { "lz4" } else { "pglz" };
    // Incompressible text: hex digits of chained md5s (lz4 finds no repeats worth a match).
    let noise = "(SELECT string_agg(md5(i::text || 'cmp'), '') FROM generate_series(1, 12) i)";
    let mut app = cl.connect_as("postgres", "cmp_app");
    for sql in [
        // 1: an order with three items, some 400 bytes of data.
        "BEGIN; INSERT INTO cmp_orders VALUES (1, 'pending', 'please leave the parcel at the door');
         INSERT INTO cmp_items VALUES (1, 1, 'SKU-RED-SHIRT-M'), (2, 1, 'SKU-RED-SHIRT-L'), (3, 1, 'SKU-BLUE-SOCKS');
         COMMIT"
            .to_string(),
        // 2: small data.
        "INSERT INTO cmp_orders VALUES (2, 'pending', 'x')".to_string(),
        // 3: data that does not compress.
        format!("INSERT INTO cmp_orders VALUES (3, 'pending', {noise})"),
        // 4: data over 2 kB (PostgreSQL's toaster compresses the row itself).
        "INSERT INTO cmp_orders VALUES (4, 'pending', repeat('abc', 2000))".to_string(),
        // 1 again: a status change and its mapped event (paid), one value for both.
        "UPDATE cmp_orders SET status = 'paid' WHERE id = 1".to_string(),
    ] {
        app.batch_execute(&sql).expect(&sql);
    }
    let stored: Vec<(String, String, Option<String>, i32, i32, Value)> = c
        .query(
            "SELECT type, key, pg_column_compression(data), pg_column_size(data),
                    pg_column_size(data::text::jsonb), data
               FROM webhooks._events WHERE entity = 'cmp' ORDER BY seq",
            &[],
        )
        .expect("stored")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let summary: Vec<(&str, &str, Option<&str>)> =
        stored.iter().map(|s| (s.0.as_str(), s.1.as_str(), s.2.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("cmp.created", "1", Some(expected)),
            ("cmp.created", "2", None),
            ("cmp.created", "3", None),
            ("cmp.created", "4", Some(expected)),
            ("cmp.status_updated", "1", Some(expected)),
            ("cmp.paid", "1", Some(expected)),
        ],
        "{stored:?}"
    );
    let (_, _, _, size, plain_size, data) = &stored[0];
    assert!(plain_size >= &256, "the order with its items is {plain_size} bytes of jsonb");
    assert!(size * 10 < plain_size * 8, "compressed to {size} of {plain_size} bytes");
    assert_eq!(data["note"], "please leave the parcel at the door");
    assert_eq!(data["items"][2]["sku"], "SKU-BLUE-SOCKS");
    assert_eq!(item_ids(&(String::new(), data.clone())), [1, 2, 3]);
    assert!(stored[1].4 < 256, "small data stays as it is: {:?}", stored[1]);
    assert!(stored[2].4 >= 256 && stored[2].3 >= stored[2].4, "{:?}", stored[2]);
    assert!(stored[3].4 >= 2032, "{:?}", stored[3]);
    assert_eq!(stored[4].5, stored[5].5, "the mapped event has the status change's data");
    assert_eq!(stored[4].5["status"], "paid");
    assert_eq!(stored[4].5["previous_status"], "pending");
    // What SQL reads (the view, as text) is the data as written.
    let as_text: Vec<String> = c
        .query("SELECT data::text FROM webhooks.events WHERE entity = 'cmp' ORDER BY seq", &[])
        .expect("as text")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (t, s) in as_text.iter().zip(&stored) {
        assert_eq!(&serde_json::from_str::<Value>(t).expect("json"), &s.5);
    }
    // Delivered: each body's data is the stored data, signed as it was sent.
    let got = rx.wait_for_requests("/cmp", stored.len(), WAIT);
    let mut by_key_and_type: HashMap<(String, String), Value> = HashMap::new();
    for r in &got {
        assert_eq!(r["verified"], true, "signature must verify: {r}");
        let key = r["json"]["data"]["id"].to_string();
        by_key_and_type.insert((key, r["json"]["type"].as_str().unwrap_or("").to_string()), r["json"]["data"].clone());
    }
    for s in &stored {
        assert_eq!(by_key_and_type.get(&(s.1.clone(), s.0.clone())), Some(&s.5), "delivered {} {}", s.0, s.1);
    }
    // The DBA's method is the one used (in a database of its own: the ALTER's lock on
    // _events would hold up the other tests' writers and the worker).
    let mut own = cl.fresh_db("cmp_method");
    // One transaction each (one simple query's statements would share one).
    for sql in [
        "CREATE TABLE cmpm_orders (id int PRIMARY KEY, note text);
         SELECT webhooks.track('cmpm_orders', entity => 'cmpm');",
        "ALTER TABLE webhooks._events ALTER COLUMN data SET COMPRESSION pglz",
        "INSERT INTO cmpm_orders VALUES (1, repeat('please leave the parcel at the door; ', 10))",
        "ALTER TABLE webhooks._events ALTER COLUMN data SET COMPRESSION DEFAULT",
        "INSERT INTO cmpm_orders VALUES (2, repeat('please leave the parcel at the door; ', 10))",
    ] {
        own.batch_execute(sql).expect(sql);
    }
    assert_eq!(
        common::stored_compression(&mut own, "cmpm"),
        [Some("pglz".to_string()), None],
        "pglz as the DBA set it; with no method on the column, stored as PostgreSQL would"
    );
}
