//! Bounds end to end (issue #10): an event larger than `webhooks.max_payload_bytes` is
//! captured but never sent (its delivery ends dead at once, its key flows on), and an HTTPS
//! receiver whose certificate does not verify is refused with a clear error.

mod common;

use common::{shared_cluster, wait_for, Cluster, Receiver};
use postgres::Client;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn cluster() -> &'static Cluster {
    // webhooks.max_payload_bytes keeps its default: the test shows what it is.
    shared_cluster(
        "bounds",
        &[
            "webhooks.retry_schedule = '200ms,400ms'",
            "webhooks.timeout = '5s'",
        ],
    )
}

fn db() -> Client {
    cluster().connect()
}

fn subscribe(c: &mut Client, url: &str, patterns: &str, extra: &str) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT id, secret FROM webhooks.subscribe($1, $2::text::text[]{extra})"),
            &[&url, &patterns],
        )
        .expect("subscribe");
    (row.get(0), row.get(1))
}

/// (id, status, attempts, last_error) of a subscription's deliveries, in order.
fn deliveries(c: &mut Client, sub: i64) -> Vec<(i64, String, i32, Option<String>)> {
    c.query(
        "SELECT id, status, attempts, last_error FROM webhooks.deliveries
          WHERE subscription_id = $1 ORDER BY id",
        &[&sub],
    )
    .expect("deliveries")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// (status_code, error) of a delivery's attempts, in order.
fn attempts(c: &mut Client, delivery: i64) -> Vec<(Option<i32>, Option<String>)> {
    c.query(
        "SELECT status_code, error FROM webhooks.attempts WHERE delivery_id = $1 ORDER BY attempt",
        &[&delivery],
    )
    .expect("attempts")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn finished(c: &mut Client, delivery: i64) -> Option<String> {
    c.query_one(
        "SELECT status FROM webhooks.deliveries WHERE id = $1",
        &[&delivery],
    )
    .ok()
    .map(|r| r.get::<_, String>(0))
    .filter(|s| s == "succeeded" || s == "dead")
}

#[test]
fn an_event_over_max_payload_bytes_is_captured_but_never_sent_and_its_key_flows_on() {
    let mut c = db();
    let cap: String = c
        .query_one("SHOW webhooks.max_payload_bytes", &[])
        .expect("show")
        .get(0);
    assert_eq!(cap, "256kB", "the documented default");
    let rx = Receiver::start();
    c.batch_execute(
        "CREATE TABLE big_orders (id bigint PRIMARY KEY, note text);
         SELECT webhooks.track('big_orders', entity => 'big');",
    )
    .expect("track");
    let (sub, secret) = subscribe(&mut c, &rx.url("/big"), "{big.*}", "");
    rx.configure(json!({"path": "/big", "secret": secret}));

    // The writer never fails because of the cap: 300,000 bytes of note commit as usual.
    c.batch_execute("INSERT INTO big_orders VALUES (1, repeat('x', 300000))")
        .expect("a large row commits");
    let stored: i32 = c
        .query_one(
            "SELECT length(data->>'note') FROM webhooks.events WHERE entity = 'big' AND key = '1'",
            &[],
        )
        .expect("the event is captured")
        .get(0);
    assert_eq!(stored, 300_000);
    // The next event of the same key goes out once the large one is dead.
    c.batch_execute("UPDATE big_orders SET note = 'small' WHERE id = 1")
        .expect("update");
    let done = wait_for("both deliveries to finish", WAIT, || {
        let d = deliveries(&mut c, sub);
        (d.len() == 2
            && d.iter()
                .all(|(_, st, _, _)| st == "succeeded" || st == "dead"))
        .then_some(d)
    });
    let (big, ref status, tries, ref last_error) = done[0];
    assert_eq!(
        (status.as_str(), tries),
        ("dead", 1),
        "dead at once, no retries"
    );
    let last_error = last_error.clone().unwrap_or_default();
    let size: usize = last_error
        .strip_prefix("payload of ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("last_error names the size: {last_error}"));
    assert!((300_000..301_000).contains(&size), "{last_error}");
    assert_eq!(
        last_error,
        format!("payload of {size} bytes exceeds webhooks.max_payload_bytes (262144); not sent")
    );
    assert_eq!(
        attempts(&mut c, big),
        [(None, Some(last_error.clone()))],
        "one attempt, no HTTP status"
    );
    assert_eq!(
        (done[1].1.as_str(), done[1].2),
        ("succeeded", 1),
        "the key flows on"
    );
    let got = rx.log("/big");
    assert_eq!(got.len(), 1, "the receiver only saw the small event");
    assert_eq!(got[0]["json"]["type"], "big.updated");
    assert_eq!(got[0]["json"]["data"]["note"], "small");
    assert_eq!(got[0]["verified"], true);

    // Redelivering it ends dead the same way, without a request either.
    let again: i64 = c
        .query_one("SELECT webhooks.redeliver($1)", &[&big])
        .expect("redeliver")
        .get(0);
    wait_for("the redelivery to finish", WAIT, || finished(&mut c, again));
    let row = c
        .query_one(
            "SELECT status, attempts, last_error, redelivery_of FROM webhooks.deliveries WHERE id = $1",
            &[&again],
        )
        .expect("redelivery");
    assert_eq!(row.get::<_, String>(0), "dead");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, Option<String>>(2), Some(last_error.clone()));
    assert_eq!(row.get::<_, Option<i64>>(3), Some(big));
    assert_eq!(attempts(&mut c, again), [(None, Some(last_error.clone()))]);
    assert_eq!(rx.log("/big").len(), 1, "still only the small event");

    // One warning per delivery, with its id and the sizes, never the payload.
    let log = cluster().server_log();
    for id in [big, again] {
        let line = format!(
            "WARNING:  pg_webhooks: delivery {id} not sent and dead: its payload of {size} bytes exceeds webhooks.max_payload_bytes (262144)"
        );
        assert_eq!(
            log.matches(&line).count(),
            1,
            "{line} once in the server log"
        );
    }
    assert!(
        !log.contains("xxxxxxxxxxxxxxxx"),
        "no payload content in the log"
    );
    assert!(!log.contains(&secret), "no secret in the log");
}

#[test]
fn max_payload_bytes_is_bounded_reloadable_and_in_bytes() {
    let mut c = db();
    let row = c
        .query_one(
            "SELECT boot_val, unit, min_val, max_val, context FROM pg_settings
              WHERE name = 'webhooks.max_payload_bytes'",
            &[],
        )
        .expect("pg_settings");
    let got: (String, String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        got,
        (
            "262144".into(),
            "B".into(),
            "1024".into(),
            "67108864".into(),
            "sighup".into()
        )
    );
    for bad in ["100", "'65MB'", "-1", "'lots'"] {
        let err = c
            .batch_execute(&format!(
                "ALTER SYSTEM SET webhooks.max_payload_bytes = {bad}"
            ))
            .expect_err(bad);
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INVALID_PARAMETER_VALUE),
            "{bad}: {err}"
        );
    }
}

/// A self-signed certificate for 127.0.0.1 (the name matches: only the issuer is unknown).
fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("/usr/bin/openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

#[test]
fn a_receiver_with_a_self_signed_certificate_is_refused_and_retried_per_schedule() {
    let dir = std::env::temp_dir().join(format!("pg_webhooks_bounds_tls_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (cert, key) = self_signed(&dir);
    let rx = Receiver::start_tls(&cert, &key);
    let port = rx.tls_port.expect("HTTPS port");
    let mut c = db();
    let url = format!("https://127.0.0.1:{port}/tls");
    let (sub, _) = subscribe(&mut c, &url, "{tlscheck.*}", "");
    c.batch_execute("SELECT webhooks.emit('tlscheck.ping', '{\"n\": 1}')")
        .expect("emit");
    let d = wait_for("the delivery to end dead", WAIT, || {
        let d = deliveries(&mut c, sub);
        (d.len() == 1 && d[0].1 == "dead").then_some(d)
    });
    assert_eq!(d[0].2, 3, "1 attempt + the schedule's 2 retries");
    let tries = attempts(&mut c, d[0].0);
    assert_eq!(tries.len(), 3);
    for (code, error) in &tries {
        assert_eq!(*code, None);
        let e = error.clone().unwrap_or_default();
        // openssl's self-signed certificate is a CA's (basicConstraints CA:TRUE), which rustls
        // reports as CaUsedAsEndEntity.
        assert!(
            e.starts_with("TLS certificate verification failed: it is self-signed or not issued by a trusted certificate authority"),
            "the error names the certificate problem: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(rx.log("/tls").is_empty(), "no request got through");
    let failures = rx.tls_failures();
    // rustls hangs up without an alert: Python sees an EOF in the handshake.
    assert!(
        failures.len() >= 3,
        "the worker reached the receiver and gave up in the handshake each time: {failures:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Bounded backend memory for huge transactions (issue #10 "Bounds", issue #8): capture's
// notes of a transaction move to temporary files beyond `webhooks.capture_memory`, and every
// event is still captured, by the same rules.

/// Peak and current anonymous memory of a backend, sampled from /proc while `f` runs.
struct MemoryProbe {
    pid: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak_kb: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

/// `field` (in kB) of /proc/<pid>/status.
fn proc_status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

impl MemoryProbe {
    fn start(pid: i32) -> MemoryProbe {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let peak_kb = std::sync::Arc::new(AtomicU64::new(proc_status_kb(pid, "RssAnon")));
        let sampler = {
            let (stop, peak_kb) = (stop.clone(), peak_kb.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak_kb.fetch_max(proc_status_kb(pid, "RssAnon"), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        MemoryProbe { pid, stop, peak_kb, sampler: Some(sampler) }
    }

    /// Peak RssAnon seen (kB).
    fn finish(mut self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.take().map(|s| s.join());
        self.peak_kb
            .fetch_max(proc_status_kb(self.pid, "RssAnon"), Ordering::Relaxed)
            .max(proc_status_kb(self.pid, "RssAnon"))
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `sql` (one transaction) on a fresh backend of `app` in `db` with
/// `webhooks.capture_memory = cap`, and returns (baseline RssAnon, peak RssAnon, VmHWM), kB.
fn measured(cluster: &Cluster, db: &str, cap: &str, what: &str, sql: &str) -> (u64, u64, u64) {
    let mut c = cluster.connect_as(db, "bounds_app");
    c.batch_execute(&format!(
        "SET webhooks.capture_memory = '{cap}';
         SELECT count(*) FROM bounds.orders; SELECT count(*) FROM bounds.items"
    ))
    .expect("warm up");
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
    let base = proc_status_kb(pid, "RssAnon");
    let probe = MemoryProbe::start(pid);
    let started = std::time::Instant::now();
    c.batch_execute(sql).unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = started.elapsed();
    let peak = probe.finish();
    let hwm = proc_status_kb(pid, "VmHWM");
    report!(
        "capture memory: {what} (webhooks.capture_memory = {cap}): backend RssAnon {base} kB before, peak {peak} kB (+{} kB); VmHWM {hwm} kB; {took:.1?}",
        peak.saturating_sub(base)
    );
    (base, peak, hwm)
}

fn count_events(c: &mut Client, ty: &str) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT count(*), count(DISTINCT key) FROM webhooks.events WHERE type = $1",
            &[&ty],
        )
        .expect("count");
    (r.get(0), r.get(1))
}

fn event_data(c: &mut Client, ty: &str, key: i64) -> Vec<serde_json::Value> {
    c.query(
        "SELECT data FROM webhooks.events WHERE type = $1 AND key = $2 ORDER BY seq",
        &[&ty, &key.to_string()],
    )
    .expect("event")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A transaction of `BOUNDS_ROWS` (default 100,000; the figure is 1,000,000) inserted
/// orders, one that updates them all, and one of a tenth as many orders with 3 items each, with
/// `webhooks.capture_memory` at `BOUNDS_CAPTURE_MEMORY` (default 4MB in CI, where the notes of
/// these transactions take several times that): every event is captured (counted, one per
/// key, contents sampled) and the backend's memory stays within the cap plus what PostgreSQL
/// itself keeps per row (its queue of AFTER trigger events), printed for each transaction.
/// `BOUNDS_ROWS=1000000 BOUNDS_CAPTURE_MEMORY=64MB` is the run.
#[test]
fn a_huge_transaction_keeps_backend_memory_bounded_and_captures_every_event() {
    let rows = env_usize("BOUNDS_ROWS").unwrap_or(100_000) as i64;
    let cap = std::env::var("BOUNDS_CAPTURE_MEMORY").unwrap_or_else(|_| "4MB".into());
    let cluster = cluster();
    let mut admin = cluster.fresh_db("capture_memory");
    admin
        .batch_execute(
            "CREATE ROLE bounds_app LOGIN;
             CREATE SCHEMA bounds AUTHORIZATION bounds_app;
             SET ROLE bounds_app;
             CREATE TABLE bounds.orders (id bigint PRIMARY KEY, status text NOT NULL, note text);
             CREATE TABLE bounds.items (id bigint PRIMARY KEY,
                                        order_id bigint NOT NULL REFERENCES bounds.orders ON DELETE CASCADE,
                                        sku text NOT NULL);
             CREATE INDEX ON bounds.items (order_id);
             RESET ROLE;
             SELECT webhooks.track('bounds.orders', entity => 'order', status_column => 'status',
                    children => '{\"items\": {\"table\": \"bounds.items\", \"foreign_key\": \"order_id\"}}');",
        )
        .expect("schema");
    let n = rows;
    let (b1, p1, _) = measured(
        cluster,
        "capture_memory",
        &cap,
        &format!("{n} orders inserted"),
        &format!("INSERT INTO bounds.orders SELECT g, 'pending', 'order ' || g FROM generate_series(1, {n}) g"),
    );
    let (b2, p2, _) = measured(
        cluster,
        "capture_memory",
        &cap,
        &format!("{n} orders updated"),
        "UPDATE bounds.orders SET status = 'paid'",
    );
    let m = n / 10;
    let (b3, p3, _) = measured(
        cluster,
        "capture_memory",
        &cap,
        &format!("{m} orders with 3 items each inserted"),
        &format!(
            "BEGIN;
             INSERT INTO bounds.orders SELECT g, 'pending', NULL FROM generate_series({n} + 1, {n} + {m}) g;
             INSERT INTO bounds.items SELECT g, {n} + 1 + (g - 1) / 3, 'sku-' || g FROM generate_series(1, 3 * {m}) g;
             COMMIT;"
        ),
    );
    // Every event, once per key.
    assert_eq!(count_events(&mut admin, "order.created"), (n + m, n + m));
    assert_eq!(count_events(&mut admin, "order.status_updated"), (n, n));
    assert_eq!(count_events(&mut admin, "order.paid"), (n, n));
    assert_eq!(count_events(&mut admin, "order.updated"), (0, 0));
    // Contents, sampled at both ends and in the middle.
    for k in [1, n / 2 + 1, n] {
        assert_eq!(
            event_data(&mut admin, "order.created", k),
            [json!({"id": k, "status": "pending", "note": format!("order {k}"), "items": []})],
            "created {k}"
        );
        let after = json!({"id": k, "status": "paid", "note": format!("order {k}"), "items": [],
                           "previous_status": "pending"});
        assert_eq!(event_data(&mut admin, "order.status_updated", k), [after], "status_updated {k}");
    }
    for k in [n + 1, n + m / 2 + 1, n + m] {
        let first = 3 * (k - n - 1) + 1;
        let items: Vec<_> = (first..first + 3)
            .map(|i| json!({"id": i, "order_id": k, "sku": format!("sku-{i}")}))
            .collect();
        assert_eq!(
            event_data(&mut admin, "order.created", k),
            [json!({"id": k, "status": "pending", "note": null, "items": items})],
            "created {k} with its items"
        );
    }
    // Bounded: within two and a half times the cap (the notes in memory, the sort's memory of
    // a quarter of it, a hash table growing), what PostgreSQL keeps per row by itself (its
    // queue of AFTER trigger events: 16-20 bytes a row; 64 allowed) and 8MB for the rest
    // (generate_series' tuplestore, a chunk of rows read back at commit, contexts). Capture's
    // notes alone took about 440 bytes a row before they could move to disk.
    let cap_kb: i64 = admin
        .query_one(
            &format!("SELECT pg_size_bytes('{cap}') / 1024"),
            &[],
        )
        .expect("cap")
        .get(0);
    for (what, base, peak, touched) in [("insert", b1, p1, n), ("update", b2, p2, n), ("items", b3, p3, 4 * m)] {
        let grew = peak.saturating_sub(base);
        let bound = cap_kb as u64 * 5 / 2 + touched as u64 * 64 / 1024 + 8 * 1024;
        report!(
            "capture memory: {what}: +{grew} kB for {touched} rows ({} bytes a row); bound {bound} kB",
            grew * 1024 / touched as u64
        );
        assert!(grew <= bound, "{what}: the backend grew by {grew} kB, more than {bound} kB");
    }
}

/// With notes moved to disk (`webhooks.capture_memory` at its minimum, crossed many times by
/// the bulk statements in between), every rule still holds for keys touched before and after
/// the notes moved: a change undone gives nothing, several status changes give one
/// `status_updated` from the status before the transaction, insert then delete gives nothing,
/// item changes on both sides give one `updated` with all items, and a deleted order gives
/// `deleted` with its row as it was.
#[test]
fn notes_moved_to_disk_keep_every_capture_rule() {
    let cluster = cluster();
    let mut admin = cluster.fresh_db("capture_spill");
    admin
        .batch_execute(
            "CREATE ROLE spill_app LOGIN;
             CREATE SCHEMA spill AUTHORIZATION spill_app;
             SET ROLE spill_app;
             CREATE TABLE spill.orders (id bigint PRIMARY KEY, status text NOT NULL, note text);
             CREATE TABLE spill.items (id bigint PRIMARY KEY,
                                       order_id bigint NOT NULL REFERENCES spill.orders ON DELETE CASCADE,
                                       sku text NOT NULL);
             RESET ROLE;
             SELECT webhooks.track('spill.orders', entity => 'order', status_column => 'status',
                    children => '{\"items\": {\"table\": \"spill.items\", \"foreign_key\": \"order_id\"}}');",
        )
        .expect("schema");
    let mut c = cluster.connect_as("capture_spill", "spill_app");
    c.batch_execute(
        "INSERT INTO spill.orders VALUES (1, 'pending', 'a'), (2, 'pending', 'b'), (3, 'pending', 'c'), (4, 'paid', 'd');
         INSERT INTO spill.items VALUES (31, 3, 'x'), (41, 4, 'y');",
    )
    .expect("setup");
    let before: i64 = admin
        .query_one("SELECT max(seq) FROM webhooks._events", &[])
        .expect("last seq")
        .get(0);
    let bulk = |from: i64| {
        format!("INSERT INTO spill.orders SELECT g, 'pending', NULL FROM generate_series({from}, {from} + 1999) g;")
    };
    c.batch_execute(&format!(
        "SET webhooks.capture_memory = '64kB';
         BEGIN;
         UPDATE spill.orders SET note = 'changed' WHERE id = 1;
         UPDATE spill.orders SET status = 'paid' WHERE id = 2;
         INSERT INTO spill.orders VALUES (5, 'pending', 'e');
         INSERT INTO spill.items VALUES (32, 3, 'z');
         DELETE FROM spill.items WHERE id = 41;
         {}
         UPDATE spill.orders SET note = 'a' WHERE id = 1;
         UPDATE spill.orders SET status = 'shipped' WHERE id = 2;
         DELETE FROM spill.orders WHERE id = 5;
         INSERT INTO spill.items VALUES (33, 3, 'w');
         UPDATE spill.orders SET note = 'dd' WHERE id = 4;
         {}
         DELETE FROM spill.orders WHERE id = 4;
         INSERT INTO spill.orders VALUES (6, 'paid', 'f');
         {}
         INSERT INTO spill.items VALUES (61, 6, 'v');
         COMMIT;",
        bulk(1000),
        bulk(10000),
        bulk(20000)
    ))
    .expect("the transaction");
    let events: Vec<(String, String, serde_json::Value)> = admin
        .query(
            "SELECT type, key, data FROM webhooks.events WHERE seq > $1 AND key::bigint < 1000 ORDER BY key::bigint, seq",
            &[&before],
        )
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let e = |t: &str, k: &str, d: serde_json::Value| (t.to_string(), k.to_string(), d);
    assert_eq!(
        events,
        [
            e("order.status_updated", "2", json!({"id": 2, "status": "shipped", "note": "b", "items": [],
                                                   "previous_status": "pending"})),
            e("order.shipped", "2", json!({"id": 2, "status": "shipped", "note": "b", "items": [],
                                           "previous_status": "pending"})),
            e("order.updated", "3", json!({"id": 3, "status": "pending", "note": "c", "items": [
                {"id": 31, "order_id": 3, "sku": "x"}, {"id": 32, "order_id": 3, "sku": "z"},
                {"id": 33, "order_id": 3, "sku": "w"}]})),
            e("order.deleted", "4", json!({"id": 4, "status": "paid", "note": "dd"})),
            e("order.created", "6", json!({"id": 6, "status": "paid", "note": "f", "items": [
                {"id": 61, "order_id": 6, "sku": "v"}]})),
            e("order.paid", "6", json!({"id": 6, "status": "paid", "note": "f", "items": [
                {"id": 61, "order_id": 6, "sku": "v"}]})),
        ]
    );
    let bulk_events: (i64, i64) = admin
        .query_one(
            "SELECT count(*), count(DISTINCT key) FROM webhooks.events
              WHERE seq > $1 AND key::bigint >= 1000 AND type = 'order.created'",
            &[&before],
        )
        .map(|r| (r.get(0), r.get(1)))
        .expect("bulk");
    assert_eq!(bulk_events, (6000, 6000));
    // The notes did move to disk (the sort wrote temporary files).
    c.batch_execute("SELECT pg_stat_force_next_flush()").expect("flush");
    c.batch_execute("SELECT 1").expect("flushed at the end of this transaction");
    let spilled: i64 = admin
        .query_one("SELECT temp_files FROM pg_stat_database WHERE datname = 'capture_spill'", &[])
        .map(|r| r.get(0))
        .expect("temp files");
    report!("capture memory: the transaction wrote {spilled} temporary files");
    assert!(spilled > 0, "the notes were expected to move to temporary files");
}

#[test]
fn capture_memory_is_a_session_setting_in_kilobytes_with_a_floor() {
    let mut c = db();
    let row = c
        .query_one(
            "SELECT boot_val, unit, min_val, context FROM pg_settings WHERE name = 'webhooks.capture_memory'",
            &[],
        )
        .expect("pg_settings");
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(got, ("16384".into(), "kB".into(), "64".into(), "user".into()));
    for bad in ["'10kB'", "-1", "'lots'", "'3TB'"] {
        let err = c
            .batch_execute(&format!("SET webhooks.capture_memory = {bad}"))
            .expect_err(bad);
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INVALID_PARAMETER_VALUE),
            "{bad}: {err}"
        );
    }
    c.batch_execute("SET webhooks.capture_memory = '1GB'").expect("a session may set it");
}

/// A text value longer than a jsonb string can be (256 MiB) in a tracked row: the COMMIT
/// fails with SQLSTATE 54000, as `to_jsonb` and `jsonb_in` fail on it, and nothing is written
/// (capture builds event data as jsonb itself, and must not write a value jsonb cannot hold).
#[test]
fn a_value_too_long_for_jsonb_fails_the_commit_and_writes_nothing() {
    let mut c = db();
    c.batch_execute(
        "CREATE TABLE huge_note (id bigint PRIMARY KEY, status text NOT NULL, notes text);
         SELECT webhooks.track('huge_note', entity => 'huge_note', status_column => 'status');
         INSERT INTO huge_note VALUES (1, 'pending', 'short');",
    )
    .expect("table");
    let events = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM webhooks.events WHERE type LIKE 'huge_note.%'", &[])
            .expect("count")
            .get(0)
    };
    assert_eq!(events(&mut c), 1, "the insert's event");
    let err = c
        .batch_execute("UPDATE huge_note SET status = 'paid', notes = repeat('x', 270 * 1024 * 1024) WHERE id = 1")
        .expect_err("a string jsonb cannot hold");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED),
        "{err:?}"
    );
    // Raised where the data is built from the row (the jsonb writer's check), with the value
    // read in that context.
    assert!(
        err.as_db_error().is_some_and(|e| e.message().starts_with("string too long to represent as jsonb string (")),
        "{err:?}"
    );
    assert_eq!(events(&mut c), 1, "no event of the failed commit");
    // The value's copies made while its data was built are not kept by the backend after the
    // ERROR (the context they were made in is reset on the way out too).
    let kept: i64 = c
        .query_one(
            "SELECT coalesce(sum(total_bytes), 0)::bigint FROM pg_backend_memory_contexts
              WHERE name = 'pg_webhooks row jsonb'",
            &[],
        )
        .expect("contexts")
        .get(0);
    assert!(kept < 1024 * 1024, "the row jsonb context keeps {kept} bytes after the failed commit");
    let row: (String, i32) = {
        let r = c
            .query_one("SELECT status, length(notes) FROM huge_note WHERE id = 1", &[])
            .expect("row");
        (r.get(0), r.get(1))
    };
    assert_eq!(row, ("pending".to_string(), 5), "the update rolled back");
    // A long value within the limit commits and is captured whole.
    c.batch_execute("UPDATE huge_note SET status = 'paid', notes = repeat('y', 1024 * 1024) WHERE id = 1")
        .expect("a long string jsonb holds");
    let len: i32 = c
        .query_one(
            "SELECT length(data->>'notes') FROM webhooks.events WHERE type = 'huge_note.status_updated'",
            &[],
        )
        .expect("event")
        .get(0);
    assert_eq!(len, 1024 * 1024);
}
