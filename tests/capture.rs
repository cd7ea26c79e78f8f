//! Capture rules of DESIGN.md, checked through real commits on a live cluster: each test
//! has its own tables and entity name, and reads what `webhooks.events` holds after commit.

mod common;

use common::{events, shared_cluster, wait_for, Cluster, Receiver};
use postgres::Client;
use std::time::Duration;

fn cluster() -> &'static Cluster {
    shared_cluster("capture", &[])
}

/// Tables `<e>_orders` and `<e>_items`, tracked as entity `<e>` with status and items.
fn orders(entity: &str) -> Client {
    let mut c = cluster().connect();
    c.batch_execute(&format!(
        r#"CREATE TABLE {e}_orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                                    customer text, total numeric);
           CREATE TABLE {e}_items (id bigserial PRIMARY KEY, order_id bigint REFERENCES {e}_orders ON DELETE CASCADE,
                                   sku text, qty int);
           SELECT webhooks.track('{e}_orders', entity => '{e}', status_column => 'status',
                  children => '{{"items": {{"table": "{e}_items", "foreign_key": "order_id"}}}}');"#,
        e = entity
    ))
    .expect("create and track tables");
    c
}

fn types(c: &mut Client, entity: &str) -> Vec<String> {
    events(c, entity).into_iter().map(|(t, _)| t).collect()
}

#[test]
fn order_inserted_with_three_items_is_one_created_event_with_the_items() {
    let mut c = orders("ins3");
    c.batch_execute(
        "BEGIN;
         INSERT INTO ins3_orders (id, customer, total) VALUES (1, 'ada', 30);
         INSERT INTO ins3_items (order_id, sku, qty) VALUES (1, 'A', 1), (1, 'B', 2), (1, 'C', 3);
         COMMIT;",
    )
    .expect("txn");
    let ev = events(&mut c, "ins3");
    assert_eq!(ev.len(), 1, "{ev:?}");
    let (t, data) = &ev[0];
    assert_eq!(t, "ins3.created");
    assert_eq!(data["id"], 1);
    assert_eq!(data["customer"], "ada");
    let skus: Vec<&str> = data["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["sku"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(skus, ["A", "B", "C"]);
}

#[test]
fn a_row_born_in_a_mapped_status_also_gets_its_status_event() {
    let mut c = orders("born");
    c.batch_execute("INSERT INTO born_orders (id, status) VALUES (1, 'paid')")
        .expect("insert");
    assert_eq!(types(&mut c, "born"), ["born.created", "born.paid"]);
}

#[test]
fn pending_paid_shipped_in_one_transaction_is_one_status_update_and_shipped() {
    let mut c = orders("pps");
    c.batch_execute("INSERT INTO pps_orders (id) VALUES (1)")
        .expect("insert");
    c.batch_execute(
        "BEGIN;
         UPDATE pps_orders SET status = 'paid' WHERE id = 1;
         UPDATE pps_orders SET status = 'shipped' WHERE id = 1;
         COMMIT;",
    )
    .expect("txn");
    let ev = events(&mut c, "pps");
    let t: Vec<&str> = ev.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(t, ["pps.created", "pps.status_updated", "pps.shipped"]);
    assert_eq!(ev[1].1["previous_status"], "pending");
    assert_eq!(ev[1].1["status"], "shipped");
    assert_eq!(ev[2].1["status"], "shipped");
}

#[test]
fn each_committed_status_change_is_its_own_event() {
    let mut c = orders("steps");
    c.batch_execute("INSERT INTO steps_orders (id) VALUES (1)")
        .expect("insert");
    c.batch_execute("UPDATE steps_orders SET status = 'paid' WHERE id = 1")
        .expect("paid");
    c.batch_execute("UPDATE steps_orders SET status = 'packing' WHERE id = 1")
        .expect("unmapped status");
    c.batch_execute("UPDATE steps_orders SET status = 'refunded' WHERE id = 1")
        .expect("refunded");
    assert_eq!(
        types(&mut c, "steps"),
        [
            "steps.created",
            "steps.status_updated",
            "steps.paid",
            "steps.status_updated",
            "steps.status_updated",
            "steps.refunded"
        ]
    );
}

#[test]
fn status_events_mapping_is_editable() {
    let mut c = orders("remap");
    c.batch_execute(
        "INSERT INTO webhooks.status_events VALUES ('remap', 'picked_up', 'remap.picked_up')",
    )
    .expect("map");
    c.batch_execute("INSERT INTO remap_orders (id) VALUES (1)")
        .expect("insert");
    c.batch_execute("UPDATE remap_orders SET status = 'picked_up' WHERE id = 1")
        .expect("update");
    assert_eq!(
        types(&mut c, "remap"),
        ["remap.created", "remap.status_updated", "remap.picked_up"]
    );
}

#[test]
fn insert_then_delete_in_one_transaction_gives_nothing() {
    let mut c = orders("insdel");
    c.batch_execute(
        "BEGIN;
         INSERT INTO insdel_orders (id) VALUES (1);
         INSERT INTO insdel_items (order_id, sku) VALUES (1, 'A');
         DELETE FROM insdel_orders WHERE id = 1;
         COMMIT;",
    )
    .expect("txn");
    assert!(types(&mut c, "insdel").is_empty());
}

#[test]
fn a_no_op_update_or_a_change_and_its_reversal_gives_nothing() {
    let mut c = orders("noop");
    c.batch_execute("INSERT INTO noop_orders (id, total) VALUES (1, 10); INSERT INTO noop_items (order_id, sku, qty) VALUES (1, 'A', 1);")
        .expect("insert");
    c.batch_execute("UPDATE noop_orders SET status = status, total = total WHERE id = 1")
        .expect("no-op");
    c.batch_execute(
        "BEGIN;
         UPDATE noop_orders SET total = 99, status = 'paid' WHERE id = 1;
         UPDATE noop_orders SET total = 10, status = 'pending' WHERE id = 1;
         UPDATE noop_items SET qty = 5 WHERE order_id = 1;
         UPDATE noop_items SET qty = 1 WHERE order_id = 1;
         COMMIT;",
    )
    .expect("change and reversal");
    assert_eq!(types(&mut c, "noop"), ["noop.created"]);
}

#[test]
fn work_rolled_back_to_a_savepoint_leaves_no_event() {
    let mut c = orders("svp");
    c.batch_execute("INSERT INTO svp_orders (id) VALUES (1)")
        .expect("insert");
    c.batch_execute(
        "BEGIN;
         SAVEPOINT a;
         UPDATE svp_orders SET status = 'shipped' WHERE id = 1;
         INSERT INTO svp_orders (id) VALUES (2);
         INSERT INTO svp_items (order_id, sku) VALUES (1, 'X');
         ROLLBACK TO SAVEPOINT a;
         COMMIT;",
    )
    .expect("txn");
    assert_eq!(types(&mut c, "svp"), ["svp.created"]);
}

#[test]
fn a_rolled_back_transaction_gives_nothing() {
    let mut c = orders("rb");
    c.batch_execute("BEGIN; INSERT INTO rb_orders (id) VALUES (1); ROLLBACK;")
        .expect("rollback");
    let mut tx = c.transaction().expect("begin");
    tx.batch_execute("INSERT INTO rb_orders (id) VALUES (2)")
        .expect("insert");
    drop(tx); // rolled back
    assert!(types(&mut c, "rb").is_empty());
}

#[test]
fn other_changes_are_updated_events_with_the_payload_at_commit() {
    let mut c = orders("upd");
    c.batch_execute("INSERT INTO upd_orders (id, total) VALUES (1, 10); INSERT INTO upd_items (order_id, sku, qty) VALUES (1, 'A', 1);")
        .expect("insert");
    c.batch_execute("UPDATE upd_orders SET total = 12 WHERE id = 1")
        .expect("row change");
    c.batch_execute("INSERT INTO upd_items (order_id, sku, qty) VALUES (1, 'B', 2)")
        .expect("child insert");
    c.batch_execute("BEGIN; UPDATE upd_items SET qty = 7 WHERE sku = 'A'; UPDATE upd_orders SET total = 20 WHERE id = 1; COMMIT;")
        .expect("both");
    let ev = events(&mut c, "upd");
    let t: Vec<&str> = ev.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        t,
        ["upd.created", "upd.updated", "upd.updated", "upd.updated"]
    );
    assert_eq!(ev[1].1["total"], 12);
    assert_eq!(ev[2].1["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(ev[3].1["total"], 20);
    assert_eq!(ev[3].1["items"][0]["qty"], 7);
}

#[test]
fn delete_gives_deleted_with_the_old_row_and_no_children() {
    let mut c = orders("del");
    c.batch_execute("INSERT INTO del_orders (id, customer) VALUES (1, 'bo'); INSERT INTO del_items (order_id, sku) VALUES (1, 'A');")
        .expect("insert");
    c.batch_execute("DELETE FROM del_orders WHERE id = 1")
        .expect("delete");
    let ev = events(&mut c, "del");
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].0, "del.deleted");
    assert_eq!(ev[1].1["customer"], "bo");
    assert!(ev[1].1.get("items").is_none(), "{:?}", ev[1].1);
}

#[test]
fn changing_the_key_deletes_the_old_key_and_creates_the_new_one() {
    let mut c = orders("rekey");
    c.batch_execute("INSERT INTO rekey_orders (id) VALUES (1)")
        .expect("insert");
    c.batch_execute("UPDATE rekey_orders SET id = 2 WHERE id = 1")
        .expect("rekey");
    let mut got: Vec<(String, String)> = c
        .query(
            "SELECT type, key FROM webhooks.events WHERE entity = 'rekey' ORDER BY seq",
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    got.remove(0);
    assert_eq!(
        got,
        [
            ("rekey.deleted".to_string(), "1".to_string()),
            ("rekey.created".to_string(), "2".to_string())
        ]
    );
}

#[test]
fn events_are_keyed_by_the_row_key() {
    let mut c = orders("keys");
    c.batch_execute("INSERT INTO keys_orders (id) VALUES (41), (42)")
        .expect("insert");
    let keys: Vec<String> = c
        .query(
            "SELECT key FROM webhooks.events WHERE entity = 'keys' ORDER BY seq",
            &[],
        )
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, ["41", "42"]);
}

#[test]
fn editing_an_item_locks_its_order_so_the_last_event_has_the_current_items() {
    let mut c = orders("lock");
    c.batch_execute("INSERT INTO lock_orders (id) VALUES (1); INSERT INTO lock_items (order_id, sku, qty) VALUES (1, 'A', 1), (1, 'B', 1);")
        .expect("insert");
    let mut t1 = cluster().connect();
    t1.batch_execute("BEGIN; UPDATE lock_items SET qty = 2 WHERE sku = 'A';")
        .expect("t1");
    // The order row is locked by t1: another writer of its items must wait.
    let mut probe = cluster().connect();
    let err = probe
        .batch_execute("BEGIN; SELECT 1 FROM lock_orders WHERE id = 1 FOR NO KEY UPDATE NOWAIT;")
        .expect_err("the order row must be locked");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE)
    );
    let t2 = std::thread::spawn(|| {
        let mut t2 = cluster().connect();
        t2.batch_execute("UPDATE lock_items SET qty = 3 WHERE sku = 'B'")
            .expect("t2");
    });
    // t2 is seen waiting on a lock (not merely slow) before t1 commits.
    common::wait_for("t2 to wait for t1's lock", Duration::from_secs(30), || {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE lock_items%'",
                &[],
            )
            .expect("pg_stat_activity")
            .get(0);
        (waiting == 1).then_some(())
    });
    assert!(!t2.is_finished(), "t2 should wait for t1");
    t1.batch_execute("COMMIT").expect("commit t1");
    t2.join().expect("t2 thread");
    let ev = events(&mut c, "lock");
    let last = &ev.last().expect("events").1;
    let qty: Vec<i64> = last["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["qty"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(qty, [2, 3], "the last event carries both changes");
    assert_eq!(ev.len(), 3);
}

#[test]
fn the_writing_role_needs_no_grant_on_the_webhooks_schema() {
    let mut c = orders("app");
    c.batch_execute(
        "DROP ROLE IF EXISTS app_writer;
         CREATE ROLE app_writer LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON app_orders, app_items TO app_writer;
         GRANT USAGE ON SEQUENCE app_items_id_seq TO app_writer;",
    )
    .expect("role");
    let mut app = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=app_writer dbname=postgres",
            cluster().port
        ),
        postgres::NoTls,
    )
    .expect("connect as app");
    app.batch_execute("BEGIN; INSERT INTO app_orders (id) VALUES (1); INSERT INTO app_items (order_id, sku) VALUES (1, 'A'); COMMIT;")
        .expect("app writes");
    app.batch_execute("UPDATE app_items SET qty = 2")
        .expect("app edits an item");
    let err = app
        .batch_execute("SELECT * FROM webhooks._events")
        .expect_err("no access to the queue");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    assert_eq!(types(&mut c, "app"), ["app.created", "app.updated"]);
}

#[test]
fn untrack_stops_capture() {
    let mut c = orders("untr");
    c.batch_execute("INSERT INTO untr_orders (id) VALUES (1)")
        .expect("insert");
    c.batch_execute("SELECT webhooks.untrack('untr_orders')")
        .expect("untrack");
    c.batch_execute("INSERT INTO untr_orders (id) VALUES (2)")
        .expect("insert untracked");
    assert_eq!(types(&mut c, "untr"), ["untr.created"]);
}

#[test]
fn emit_enqueues_any_other_event_at_commit_only() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"BEGIN; SELECT webhooks.emit('review.published', '{"stars": 5}', 'r-1'); ROLLBACK;"#,
    )
    .expect("rolled back");
    let id: String = c
        .query_one(
            r#"SELECT webhooks.emit('review.published', '{"stars": 4}', 'r-2')::text"#,
            &[],
        )
        .expect("emit")
        .get(0);
    let rows = c
        .query("SELECT id::text, key, data->>'stars' FROM webhooks.events WHERE type = 'review.published'", &[])
        .expect("events");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), id);
    assert_eq!(rows[0].get::<_, String>(1), "r-2");
    assert_eq!(rows[0].get::<_, String>(2), "4");
}

/// `DROP EXTENSION` locks every table of the extension before it finds the tracked table's
/// trigger; the delivery worker's transactions lock several of them too. While the worker
/// delivers a backlog, the DROP is refused with its own error every time: it waits for the
/// worker's transaction (which first takes a share lock on the extension), never deadlocks.
#[test]
fn drop_extension_while_the_worker_delivers_is_refused_and_never_deadlocks() {
    let rx = Receiver::start();
    // One worker: `started_with` below is read once worker 0 is up (a second could still be
    // starting on a machine whose default is more).
    let c = Cluster::start("dropbusy", &["webhooks.workers = 1"]);
    let mut db = c.connect();
    db.batch_execute("CREATE TABLE t_orders (id int PRIMARY KEY, status text); SELECT webhooks.track('t_orders');")
        .expect("track");
    let row = db
        .query_one("SELECT id, secret FROM webhooks.subscribe($1, '{t_order.*}')", &[&rx.url("/busy")])
        .expect("subscribe");
    rx.configure(serde_json::json!({"path": "/busy", "secret": row.get::<_, String>(1), "style": "standard"}));
    wait_for("the worker", Duration::from_secs(60), || worker_pid(&mut db));
    let workers = |db: &mut postgres::Client| -> Vec<i32> {
        db.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_webhooks worker' ORDER BY pid", &[])
            .expect("workers")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let started_with = workers(&mut db);
    db.batch_execute("INSERT INTO t_orders SELECT g, 'new' FROM generate_series(1, 20000) g")
        .expect("backlog");
    let delivered = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM webhooks.deliveries WHERE status = 'succeeded'", &[])
            .expect("count")
            .get(0)
    };
    // DROPs for as long as the backlog is being delivered (and 300 at least), from two
    // sessions: a conflicting request is nearly always held or queued, and the worker, queued
    // with them, must not starve.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let stop = stop.clone();
        let mut db2 = c.connect();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                refused_drop(&mut db2, n);
                n += 1;
            }
            n
        })
    };
    let started = std::time::Instant::now();
    let (mut attempts, mut while_delivering) = (0, 0);
    // Progress is read from the receiver: a reader of the extension's tables during a DROP
    // can deadlock with it (it locks them in another order), as any session's could.
    let mut received = 0;
    let mut checked = std::time::Instant::now();
    loop {
        if checked.elapsed() >= Duration::from_millis(200) {
            received = rx.count("/busy");
            checked = std::time::Instant::now();
        }
        if received >= 20000 && attempts >= 300 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "the backlog was not delivered: {received} of 20000");
        for _ in 0..10 {
            refused_drop(&mut db, attempts);
            attempts += 1;
        }
        if received > 0 && received < 20000 {
            while_delivering += 10;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let others = other.join().expect("the other session's DROPs");
    assert!(others > 0);
    assert!(while_delivering >= 10, "the DROPs overlapped the delivery ({while_delivering} of {attempts})");
    wait_for("every delivery recorded", Duration::from_secs(60), || (delivered(&mut db) == 20000).then_some(()));
    // Nothing of the worker's was lost or stuck, and it never failed.
    assert_eq!(workers(&mut db), started_with, "the same workers delivered throughout");
    let log = c.server_log();
    assert!(!log.contains("deadlock detected"), "{log}");
}

/// A `DROP EXTENSION` that must be refused for the tracked table (2BP01, nothing else).
fn refused_drop(c: &mut postgres::Client, attempt: usize) {
    let err = c.batch_execute("DROP EXTENSION pg_webhooks").expect_err("must refuse");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST),
        "attempt {attempt}: {err:?}"
    );
}

fn worker_pid(c: &mut postgres::Client) -> Option<i32> {
    c.query_one("SELECT webhooks._worker_pid()", &[]).expect("worker pid").get(0)
}

/// Wait until the worker `pid` waits for the extension's lock (a lock on a `pg_extension` object).
fn wait_for_extension_lock_wait(c: &mut postgres::Client, pid: i32) {
    wait_for("the worker to wait for the lock", Duration::from_secs(30), || {
        let waits: Option<String> = c
            .query_one("SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .expect("activity")
            .get(0);
        (waits.as_deref() == Some("Lock:object")).then_some(())
    });
}

/// A `DROP EXTENSION` left open in a transaction holds the extension's lock: the worker waits
/// for it holding nothing, and still stops at once when told to (a fast shutdown, or
/// `pg_terminate_backend`). When the DROP rolls back, delivery goes on.
#[test]
fn a_worker_waiting_behind_an_open_drop_extension_stops_when_told() {
    let rx = Receiver::start();
    let c = Cluster::start("dropopen", &["webhooks.workers = 1"]);
    let mut db = c.connect();
    let row = db
        .query_one("SELECT id, secret FROM webhooks.subscribe($1, '{thing.*}')", &[&rx.url("/open-drop")])
        .expect("subscribe");
    let worker = wait_for("the worker", Duration::from_secs(60), || worker_pid(&mut db));
    // The receiver answers after 3 s: the DROP begins while the worker waits for it, and the
    // worker's record of the answer finds the lock taken.
    rx.configure(serde_json::json!({"path": "/open-drop", "secret": row.get::<_, String>(1), "style": "standard", "delay_ms": 3000}));
    db.batch_execute("SELECT webhooks.emit('thing.sent', '{\"n\": 0}')").expect("emit");
    rx.wait_for_requests("/open-drop", 1, Duration::from_secs(60));
    let mut dba = c.connect();
    dba.batch_execute("BEGIN; DROP EXTENSION pg_webhooks;").expect("an open DROP");
    let mut su = c.connect();
    wait_for_extension_lock_wait(&mut su, worker);
    su.execute("SELECT pg_terminate_backend($1)", &[&worker]).expect("terminate");
    wait_for("the worker to stop", Duration::from_secs(5), || {
        let alive: bool = su
            .query_one("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", &[&worker])
            .expect("activity")
            .get(0);
        (!alive).then_some(())
    });
    dba.batch_execute("ROLLBACK").expect("roll the DROP back");
    rx.configure(serde_json::json!({"path": "/open-drop", "secret": row.get::<_, String>(1), "style": "standard"}));
    db.batch_execute("SELECT webhooks.emit('thing.kept', '{\"n\": 1}')").expect("emit");
    let kept = wait_for("the next event delivered", Duration::from_secs(60), || {
        rx.log("/open-drop").into_iter().find(|r| r["json"]["type"] == "thing.kept")
    });
    assert_eq!(kept["verified"], true, "{kept}");
    let again = worker_pid(&mut db).expect("a worker");
    assert_ne!(again, worker, "the launcher started a new worker");
}

/// No session can keep a delivery worker from running. A role with no rights on the extension
/// can hold the extension's lock (`ALTER FUNCTION ... DEPENDS ON EXTENSION` on a function of
/// its own, left open) while the worker waits for it, and any role can take any advisory lock:
/// the worker's one-per-number lock is none, so the role neither deadlocks the waiting worker
/// (it waited for the role, the role for the worker's key) nor keeps a restarted one out.
#[test]
fn no_role_can_keep_the_worker_out() {
    let rx = Receiver::start();
    let c = Cluster::start("workerkey", &["webhooks.workers = 1", "deadlock_timeout = '100ms'"]);
    let mut db = c.connect();
    db.batch_execute("CREATE ROLE mallory LOGIN").expect("role");
    let row = db
        .query_one("SELECT id, secret FROM webhooks.subscribe($1, '{thing.*}')", &[&rx.url("/key")])
        .expect("subscribe");
    rx.configure(serde_json::json!({"path": "/key", "secret": row.get::<_, String>(1), "style": "standard"}));
    let worker = wait_for("the worker", Duration::from_secs(60), || worker_pid(&mut db));
    let delivered = |db: &mut postgres::Client, n: i32| {
        db.execute("SELECT webhooks.emit('thing.sent', jsonb_build_object('n', $1::int))", &[&n]).expect("emit");
        let got = wait_for("the event delivered", Duration::from_secs(60), || {
            rx.log("/key").into_iter().find(|r| r["json"]["data"]["n"] == n)
        });
        assert_eq!(got["verified"], true, "{got}");
    };
    delivered(&mut db, 1);
    let mut m = c.connect_as("postgres", "mallory");
    m.batch_execute(
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1';
         BEGIN; ALTER FUNCTION pg_temp.f() DEPENDS ON EXTENSION pg_webhooks;",
    )
    .expect("mallory holds the extension's lock");
    db.execute("SELECT webhooks.emit('thing.sent', '{\"n\": 2}')", &[]).expect("emit");
    wait_for_extension_lock_wait(&mut db, worker);
    // Were the worker's key an advisory lock, this would wait for the worker, which waits for
    // mallory: a deadlock, detected after 100 ms in the worker (or here).
    m.batch_execute("SELECT pg_advisory_lock(1885828969, 1); SELECT pg_sleep(0.5); ROLLBACK;")
        .expect("mallory takes the advisory key at once");
    let got = wait_for("the event delivered", Duration::from_secs(60), || {
        rx.log("/key").into_iter().find(|r| r["json"]["data"]["n"] == 2)
    });
    assert_eq!(got["verified"], true, "{got}");
    assert_eq!(worker_pid(&mut db), Some(worker), "the same worker delivered it");
    // A restarted worker starts although mallory holds the advisory key (a session lock).
    m.batch_execute("SELECT pg_advisory_lock(1885828969, 1)").expect("advisory key");
    db.execute("SELECT pg_terminate_backend($1)", &[&worker]).expect("terminate");
    let again = wait_for("a new worker", Duration::from_secs(60), || {
        worker_pid(&mut db).filter(|p| *p != worker)
    });
    delivered(&mut db, 3);
    let held: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'userlock' AND pid = $1 AND granted
                AND classid = 1885828969::oid AND objid = 1 AND mode = 'ExclusiveLock'",
            &[&again],
        )
        .expect("locks")
        .get(0);
    assert_eq!(held, 1, "the worker holds its own key");
    assert!(!c.server_log().contains("another delivery worker"), "no worker was refused");
}

/// The extension dropped and created again while the worker delivers, once in two
/// transactions and once in one: the worker notices at its next transaction, says so and
/// starts again, and delivers the new extension's events (it fails on no missing relation).
#[test]
fn the_worker_starts_again_when_the_extension_is_dropped_and_created_again() {
    let rx = Receiver::start();
    let c = Cluster::start("recreate", &[]);
    let mut db = c.connect();
    let round = |db: &mut postgres::Client, n: usize| {
        let path = format!("/recreated-{n}");
        let row = db
            .query_one("SELECT id, secret FROM webhooks.subscribe($1, '{r_order.*}')", &[&rx.url(&path)])
            .expect("subscribe");
        rx.configure(serde_json::json!({"path": path, "secret": row.get::<_, String>(1), "style": "standard"}));
        db.batch_execute(&format!("INSERT INTO r_orders VALUES ({n})")).expect("insert");
        rx.wait_for_requests(&path, 1, Duration::from_secs(60));
        assert_eq!(rx.log(&path)[0]["verified"], true, "{:?}", rx.log(&path));
    };
    db.batch_execute("CREATE TABLE r_orders (id int PRIMARY KEY); SELECT webhooks.track('r_orders', entity => 'r_order');")
        .expect("track");
    round(&mut db, 1);
    let first = worker_pid(&mut db).expect("a worker");
    db.batch_execute("SELECT webhooks.untrack('r_orders'); DROP EXTENSION pg_webhooks;").expect("drop");
    wait_for("the worker to notice", Duration::from_secs(30), || {
        c.server_log().contains("pg_webhooks: the extension was dropped; the delivery worker restarts").then_some(())
    });
    db.batch_execute("CREATE EXTENSION pg_webhooks; SELECT webhooks.track('r_orders', entity => 'r_order');")
        .expect("create again");
    round(&mut db, 2);
    let second = worker_pid(&mut db).expect("a worker");
    assert_ne!(second, first);
    db.batch_execute(
        "BEGIN; SELECT webhooks.untrack('r_orders'); DROP EXTENSION pg_webhooks; CREATE EXTENSION pg_webhooks;
         SELECT webhooks.track('r_orders', entity => 'r_order'); COMMIT;",
    )
    .expect("drop and create in one transaction");
    round(&mut db, 3);
    assert!(
        c.server_log().contains("pg_webhooks: the extension was dropped and created again; the delivery worker restarts"),
        "{}",
        c.server_log()
    );
    let log = c.server_log();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("ERROR") && !l.contains("canceling autovacuum task")) || l.contains("does not exist"))
        .collect();
    assert!(failed.is_empty(), "the worker failed on nothing:\n{log}");
}

#[test]
fn drop_extension_with_tracked_tables_fails_with_a_hint() {
    let c = Cluster::start("dropext", &[]);
    let mut db = c.connect();
    db.batch_execute(
        "CREATE TABLE t_orders (id int PRIMARY KEY); SELECT webhooks.track('t_orders');",
    )
    .expect("track");
    let err = db
        .batch_execute("DROP EXTENSION pg_webhooks")
        .expect_err("must refuse");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST)
    );
    let hint = err
        .as_db_error()
        .and_then(|e| e.hint())
        .unwrap_or_default()
        .to_string();
    assert!(hint.contains("CASCADE"), "{hint}");
    db.batch_execute("SELECT webhooks.untrack('t_orders'); DROP EXTENSION pg_webhooks;")
        .expect("clean uninstall");
    // PostgreSQL keeps the (now empty) schema it created for the extension.
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'webhooks')
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'webhooks')
                  + (SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'webhooks%')",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "nothing of the extension is left behind");
    db.batch_execute("INSERT INTO t_orders VALUES (1)")
        .expect("the table still works");
}

#[test]
fn a_transaction_touching_many_rows_is_captured_whole() {
    let mut c = orders("bulk");
    c.batch_execute(
        "INSERT INTO bulk_orders (id, total) SELECT g, g FROM generate_series(1, 12000) g",
    )
    .expect("bulk insert");
    c.batch_execute("UPDATE bulk_orders SET total = total + 1 WHERE id % 2 = 0")
        .expect("bulk update");
    let counts: Vec<(String, i64)> = c
        .query("SELECT type, count(*) FROM webhooks.events WHERE entity = 'bulk' GROUP BY type ORDER BY type", &[])
        .expect("counts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        counts,
        [
            ("bulk.created".to_string(), 12000),
            ("bulk.updated".to_string(), 6000)
        ]
    );
}

#[test]
fn truncating_a_tracked_table_is_refused_with_a_way_out() {
    let mut c = orders("trunc");
    c.batch_execute("INSERT INTO trunc_orders (id) VALUES (1)")
        .expect("insert");
    let err = c
        .batch_execute("TRUNCATE trunc_orders CASCADE")
        .expect_err("TRUNCATE must be refused");
    let db = err.as_db_error().expect("database error");
    assert_eq!(
        db.code(),
        &postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
    );
    assert!(
        db.hint().unwrap_or_default().contains("untrack"),
        "{:?}",
        db.hint()
    );
    c.batch_execute("SELECT webhooks.untrack('trunc_orders')")
        .expect("untrack");
    c.batch_execute("TRUNCATE trunc_orders CASCADE")
        .expect("untracked tables truncate as usual");
}

#[test]
fn a_repeatable_read_writer_sees_children_committed_while_it_ran() {
    let mut c = orders("rr");
    c.batch_execute("INSERT INTO rr_orders (id) VALUES (1); INSERT INTO rr_items (order_id, sku) VALUES (1, 'A');")
        .expect("setup");
    let mut t1 = cluster().connect();
    t1.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM rr_items;")
        .expect("t1 takes its snapshot");
    // Committed after t1's snapshot: t1 cannot see it, but it exists when t1 commits.
    c.batch_execute("INSERT INTO rr_items (order_id, sku) VALUES (1, 'B')")
        .expect("t2");
    t1.batch_execute("UPDATE rr_orders SET status = 'paid' WHERE id = 1; COMMIT;")
        .expect("t1");
    let ev = events(&mut c, "rr");
    let (t, data) = ev.last().expect("events");
    assert_eq!(t, "rr.paid");
    let skus: Vec<&str> = data["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["sku"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(skus, ["A", "B"], "the payload is the order as at commit");
    assert_eq!(ev[ev.len() - 2].0, "rr.status_updated");
}

#[test]
fn a_child_written_before_its_parent_in_one_transaction_gives_created() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE TABLE cbp_orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending');
           CREATE TABLE cbp_items (id bigserial PRIMARY KEY,
                                   order_id bigint REFERENCES cbp_orders DEFERRABLE INITIALLY DEFERRED, sku text);
           SELECT webhooks.track('cbp_orders', entity => 'cbp', status_column => 'status',
                  children => '{"items": {"table": "cbp_items", "foreign_key": "order_id"}}');
           BEGIN;
           INSERT INTO cbp_items (order_id, sku) VALUES (1, 'A');
           INSERT INTO cbp_orders (id) VALUES (1);
           INSERT INTO cbp_items (order_id, sku) VALUES (1, 'B');
           COMMIT;"#,
    )
    .expect("child first");
    let ev = events(&mut c, "cbp");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, "cbp.created");
    assert_eq!(ev[0].1["items"].as_array().map(Vec::len), Some(2));
}

#[test]
fn partitioned_tables_and_partitioned_children_are_captured_as_one_table() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE TABLE part_orders (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending', note text)
               PARTITION BY RANGE (id);
           CREATE TABLE part_orders_low PARTITION OF part_orders FOR VALUES FROM (0) TO (100);
           -- A partition whose columns are numbered differently from its parent's.
           CREATE TABLE part_orders_high (note text, extra int, status text NOT NULL DEFAULT 'pending', id int NOT NULL);
           ALTER TABLE part_orders_high DROP COLUMN extra;
           ALTER TABLE part_orders ATTACH PARTITION part_orders_high FOR VALUES FROM (100) TO (200);
           CREATE TABLE part_items (order_id int, id int, sku text, PRIMARY KEY (order_id, id)) PARTITION BY RANGE (order_id);
           CREATE TABLE part_items_low PARTITION OF part_items FOR VALUES FROM (0) TO (100);
           CREATE TABLE part_items_high PARTITION OF part_items FOR VALUES FROM (100) TO (200);
           SELECT webhooks.track('part_orders', entity => 'part', status_column => 'status',
                  children => '{"items": {"table": "part_items", "foreign_key": "order_id"}}');"#,
    )
    .expect("partitioned tables");
    c.batch_execute(
        "BEGIN; INSERT INTO part_orders (id) VALUES (1), (150);
         INSERT INTO part_items VALUES (1, 1, 'A'), (150, 1, 'B'); COMMIT;",
    )
    .expect("insert");
    c.batch_execute("UPDATE part_orders SET status = 'paid' WHERE id = 150")
        .expect("status");
    c.batch_execute("UPDATE part_items SET sku = 'C' WHERE order_id = 150")
        .expect("child");
    c.batch_execute("UPDATE part_orders SET note = note WHERE id IN (1, 150)")
        .expect("no-op, also in the partition whose columns are numbered differently");
    c.batch_execute(
        "DELETE FROM part_items WHERE order_id = 150; DELETE FROM part_orders WHERE id = 150",
    )
    .expect("delete");
    let ev = events(&mut c, "part");
    let summary: Vec<(String, i64)> = ev
        .iter()
        .map(|(t, d)| (t.clone(), d["id"].as_i64().unwrap_or(-1)))
        .collect();
    assert_eq!(
        summary,
        [
            ("part.created".to_string(), 1),
            ("part.created".to_string(), 150),
            ("part.status_updated".to_string(), 150),
            ("part.paid".to_string(), 150),
            ("part.updated".to_string(), 150),
            ("part.deleted".to_string(), 150),
        ]
    );
    let deleted_keys: Vec<&String> = ev[5].1.as_object().expect("row").keys().collect();
    assert_eq!(
        deleted_keys,
        ["id", "note", "status"],
        "the parent's columns (jsonb orders keys)"
    );
    assert_eq!(ev[1].1["items"][0]["sku"], "B");
    assert_eq!(ev[2].1["previous_status"], "pending");
    assert_eq!(ev[4].1["items"][0]["sku"], "C");
}

#[test]
fn awkward_schemas_are_captured_right() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE TYPE awk_mood AS ENUM ('ok', 'sad');
           CREATE TYPE awk_mood2 AS ENUM ('ok', 'sad');
           -- Columns named like capture's aliases; a dropped column; a column of a user type.
           CREATE TABLE awk_orders (id int PRIMARY KEY, t int, gone int, mood awk_mood, x float8, at timestamptz);
           ALTER TABLE awk_orders DROP COLUMN gone;
           CREATE TABLE awk_items (id int PRIMARY KEY, c text, order_id bigint);
           SELECT webhooks.track('awk_orders', entity => 'awk',
                  children => '{"items": {"table": "awk_items", "foreign_key": "order_id"}}');
           -- Another table whose row JSON query has the same text but another row type.
           CREATE TABLE awk_other (id int PRIMARY KEY, t int, gone int, mood awk_mood2, x float8, at timestamptz);
           ALTER TABLE awk_other DROP COLUMN gone;
           SELECT webhooks.track('awk_other', entity => 'awko');
           INSERT INTO awk_orders VALUES (1, 5, 'ok', 0.1, '2026-01-01 00:00:00+00');
           INSERT INTO awk_items VALUES (1, 'hello', 1);
           INSERT INTO awk_other VALUES (1, 5, 'ok', 0.1, '2026-01-01 00:00:00+00');"#,
    )
    .expect("tables");
    // Both tables in one session, one after the other (their trigger-side plans differ).
    c.batch_execute("UPDATE awk_orders SET mood = 'sad'; UPDATE awk_other SET mood = 'sad';")
        .expect("updates of two tables with look-alike queries");
    // A foreign key wider than the key, out of the key's range: no parent, no failure.
    c.batch_execute("INSERT INTO awk_items VALUES (2, 'far', 3000000000)")
        .expect("a child whose key no parent can have");
    // Settings changed between the write and the commit neither invent nor lose events.
    c.batch_execute(
        "BEGIN; UPDATE awk_orders SET at = at; SET LOCAL TimeZone = 'Asia/Tokyo'; COMMIT;",
    )
    .expect("no-op, then another time zone");
    c.batch_execute("BEGIN; UPDATE awk_orders SET x = 0.1000000000000001; SET LOCAL extra_float_digits = 0; COMMIT;")
        .expect("a change, then fewer float digits");
    let ev = events(&mut c, "awk");
    let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    // created; the mood; nothing for the far child or the no-op; the float.
    assert_eq!(
        types,
        ["awk.created", "awk.updated", "awk.updated"],
        "{ev:?}"
    );
    assert_eq!(ev[0].1["t"], 5, "a column named t is a column");
    assert_eq!(
        ev[0].1["items"][0]["c"], "hello",
        "a child column named c is a column"
    );
    assert_eq!(ev[1].1["mood"], "sad");
    assert!(ev[1].1.get("gone").is_none());
    assert_eq!(ev[2].1["x"].to_string(), "0.1000000000000001");
    assert_eq!(
        ev[2].1["at"], "2026-01-01T00:00:00+00:00",
        "timestamps in UTC"
    );
    let other: Vec<String> = events(&mut c, "awko").into_iter().map(|e| e.0).collect();
    assert_eq!(other, ["awko.created", "awko.updated"]);
}

#[test]
fn a_partition_owned_by_another_role_is_not_read_with_the_owners_rights() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE ROLE part_o; CREATE ROLE part_p;
           GRANT CREATE, USAGE ON SCHEMA public TO part_o, part_p;
           CREATE TABLE part_log (who text); GRANT INSERT ON part_log TO PUBLIC;
           CREATE TABLE pown (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
           CREATE TABLE pown_1 PARTITION OF pown FOR VALUES FROM (0) TO (100);
           CREATE TABLE pown_2 PARTITION OF pown FOR VALUES FROM (100) TO (200);
           ALTER TABLE pown OWNER TO part_o; ALTER TABLE pown_1 OWNER TO part_o;
           SELECT webhooks.track('pown', entity => 'pown');
           INSERT INTO pown VALUES (1, 'a');"#,
    )
    .expect("setup");
    c.batch_execute(
        r#"-- Given away to another role, whose index expression would run as the owner.
           ALTER TABLE pown_2 OWNER TO part_p;
           SET ROLE part_p;
           CREATE FUNCTION part_log_it() RETURNS void LANGUAGE sql VOLATILE AS
               'INSERT INTO part_log VALUES (current_user)';
           CREATE FUNCTION part_seen() RETURNS int LANGUAGE plpgsql IMMUTABLE AS
               $$ BEGIN PERFORM part_log_it(); RETURN 0; END $$;
           CREATE INDEX ON pown_2 ((id + part_seen()));
           RESET ROLE;
           DELETE FROM part_log;"#,
    )
    .expect("setup");
    let e = c
        .batch_execute("INSERT INTO pown VALUES (2, 'b')")
        .expect_err("capture refuses to read it");
    assert_eq!(
        e.code(),
        Some(&postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{e:?}"
    );
    let ran_as_owner: i64 = c
        .query_one("SELECT count(*) FROM part_log WHERE who = 'part_o'", &[])
        .expect("log")
        .get(0);
    assert_eq!(
        ran_as_owner, 0,
        "the other role's code ran with the owner's rights"
    );
}

#[test]
fn a_partitioned_child_and_one_of_its_partitions_listed_by_two_tables_capture_for_both() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE TABLE pp_orders (id int PRIMARY KEY, status text);
           CREATE TABLE pp_returns (id int PRIMARY KEY, status text);
           CREATE TABLE pp_items (id int, order_id int, return_id int, sku text) PARTITION BY LIST (sku);
           CREATE TABLE pp_items_a PARTITION OF pp_items FOR VALUES IN ('a');
           CREATE TABLE pp_items_b PARTITION OF pp_items FOR VALUES IN ('b');
           SELECT webhooks.track('pp_orders', entity => 'ppo',
                  children => '{"items": {"table": "pp_items", "foreign_key": "order_id"}}');
           SELECT webhooks.track('pp_returns', entity => 'ppr',
                  children => '{"items": {"table": "pp_items_a", "foreign_key": "return_id"}}');"#,
    )
    .expect("tables");
    c.batch_execute("INSERT INTO pp_orders VALUES (1, 'new'); INSERT INTO pp_returns VALUES (10, 'new');")
        .expect("parents");
    c.batch_execute("INSERT INTO pp_items VALUES (1, 1, 10, 'a')").expect("an item in the partition both see");
    c.batch_execute("INSERT INTO pp_items VALUES (2, 1, 10, 'b')").expect("an item only the orders see");
    assert_eq!(types(&mut c, "ppo"), ["ppo.created", "ppo.updated", "ppo.updated"]);
    assert_eq!(types(&mut c, "ppr"), ["ppr.created", "ppr.updated"]);
    let last = events(&mut c, "ppo").pop().expect("an event").1;
    assert_eq!(last["items"].as_array().map(Vec::len), Some(2));
    // The parent row lock is taken for both parents: a second writer of an item of order 1
    // waits for the first.
    let mut other = cluster().connect();
    c.batch_execute("BEGIN; UPDATE pp_items SET id = id WHERE id = 1").expect("hold");
    let err = other
        .batch_execute("SET lock_timeout = '200ms'; SELECT * FROM pp_orders WHERE id = 1 FOR UPDATE NOWAIT")
        .expect_err("the order is locked by the item's writer");
    assert_eq!(err.as_db_error().map(|e| e.code().clone()), Some(postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    let err = other
        .batch_execute("SELECT * FROM pp_returns WHERE id = 10 FOR UPDATE NOWAIT")
        .expect_err("the return is locked too");
    assert_eq!(err.as_db_error().map(|e| e.code().clone()), Some(postgres::error::SqlState::LOCK_NOT_AVAILABLE));
    c.batch_execute("ROLLBACK").expect("rollback");
}

#[test]
fn a_child_table_listed_twice_by_one_table_counts_under_both_foreign_keys() {
    let mut c = cluster().connect();
    c.batch_execute(
        r#"CREATE TABLE tw_stock (id int PRIMARY KEY);
           CREATE TABLE tw_moves (id int PRIMARY KEY, from_id int, to_id int);
           SELECT webhooks.track('tw_stock', entity => 'tw', children =>
                  '{"outgoing": {"table": "tw_moves", "foreign_key": "from_id"},
                    "incoming": {"table": "tw_moves", "foreign_key": "to_id"}}');
           INSERT INTO tw_stock VALUES (1), (2);"#,
    )
    .expect("tables");
    c.batch_execute("INSERT INTO tw_moves VALUES (1, 1, 2)").expect("a move");
    let evs = events(&mut c, "tw");
    let updated: Vec<(i64, usize, usize)> = evs
        .iter()
        .filter(|(t, _)| t == "tw.updated")
        .map(|(_, d)| {
            (
                d["id"].as_i64().unwrap_or(0),
                d["outgoing"].as_array().map(Vec::len).unwrap_or(9),
                d["incoming"].as_array().map(Vec::len).unwrap_or(9),
            )
        })
        .collect();
    let mut updated = updated;
    updated.sort();
    assert_eq!(updated, [(1, 1, 0), (2, 0, 1)], "both ends of the move: {evs:?}");
}
