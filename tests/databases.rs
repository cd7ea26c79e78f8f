//! Several databases on one server (`webhooks.database` lists them) and what
//! `webhooks.worker_status()` says of their workers: each listed database gets its own workers,
//! waited for until it and its extension exist, woken by its own commits, independent of the
//! others.

mod common;

use common::{wait_for, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// worker 0 of `db`: (state, pid, succeeded, attempts, failed, bytes_sent, claimed, queue_depth).
type Status = (String, Option<i32>, i64, i64, i64, i64, i64, Option<i64>);

fn status(c: &mut Client, db: &str) -> Option<Status> {
    c.query_opt(
        "SELECT state, pid, succeeded, attempts, failed, bytes_sent, claimed, queue_depth
           FROM webhooks.worker_status() WHERE database = $1 AND worker = 0",
        &[&db],
    )
    .expect("worker_status")
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7)))
}

fn shop(c: &mut Client, rx: &Receiver, path: &str) -> i64 {
    c.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending', total numeric);
         SELECT webhooks.track('orders', status_column => 'status');",
    )
    .expect("orders");
    let row = c.query_one("SELECT id, secret FROM webhooks.subscribe($1)", &[&rx.url(path)]).expect("subscribe");
    rx.configure(json!({"path": path, "secret": row.get::<_, String>(1), "style": "standard"}));
    row.get(0)
}

#[test]
fn each_listed_database_has_its_own_workers_woken_by_its_own_commits() {
    // The safety poll is an hour: every delivery below is started by its own database's
    // commit waking its own worker.
    let cluster = Cluster::start(
        "databases",
        &[
            "webhooks.database = 'shop, Billing Dept, later'",
            "webhooks.poll_interval = '1h'",
            "webhooks.workers = 1",
        ],
    );
    let rx = Receiver::start();
    let mut su = cluster.connect();
    // The cluster's own database is not listed: it has the extension but no worker.
    let rows = su.query("SELECT database, worker, state FROM webhooks.worker_status() ORDER BY 1", &[]).expect("status");
    let listed: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(listed, ["Billing Dept", "later", "shop"]);
    for db in ["shop", "Billing Dept", "later"] {
        let state = wait_for(&format!("{db} to be waited for"), WAIT, || {
            status(&mut su, db).map(|s| s.0).filter(|s| s == "waiting for the database")
        });
        assert_eq!(state, "waiting for the database");
    }

    su.batch_execute("CREATE DATABASE shop").expect("shop");
    su.batch_execute("CREATE DATABASE \"Billing Dept\"").expect("billing");
    let state = wait_for("shop's worker to wait for the extension", WAIT, || {
        status(&mut su, "shop").map(|s| s.0).filter(|s| s == "waiting for the extension")
    });
    assert_eq!(state, "waiting for the extension");
    let mut a = cluster.connect_db("shop");
    let mut b = cluster.connect_db("Billing Dept");
    a.batch_execute("CREATE EXTENSION pg_webhooks").expect("extension in shop");
    b.batch_execute("CREATE EXTENSION pg_webhooks").expect("extension in billing");
    let sub_a = shop(&mut a, &rx, "/shop");
    let sub_b = shop(&mut b, &rx, "/billing");
    for db in ["shop", "Billing Dept"] {
        wait_for(&format!("{db}'s worker to be idle"), WAIT, || {
            status(&mut su, db).map(|s| s.0).filter(|s| s == "idle")
        });
    }
    // Two pids, one per database, neither the other's.
    let pid_a = status(&mut su, "shop").and_then(|s| s.1).expect("shop's pid");
    let pid_b = status(&mut su, "Billing Dept").and_then(|s| s.1).expect("billing's pid");
    assert_ne!(pid_a, pid_b);
    let datname: String = su
        .query_one("SELECT datname FROM pg_stat_activity WHERE pid = $1", &[&pid_b])
        .expect("activity")
        .get(0);
    assert_eq!(datname, "Billing Dept");

    // Writers in both databases at once; each database's events reach its own endpoint only.
    let writer = |db: &'static str| {
        let port = cluster.port;
        std::thread::spawn(move || {
            let mut c = Client::connect(&format!("host=127.0.0.1 port={port} user=postgres dbname='{db}'"), postgres::NoTls)
                .expect("connect");
            for i in 1..=20i64 {
                c.execute("INSERT INTO orders VALUES ($1, 'pending', 10)", &[&i]).expect("insert");
                c.execute("UPDATE orders SET status = 'paid' WHERE id = $1", &[&i]).expect("pay");
            }
        })
    };
    let (t1, t2) = (writer("shop"), writer("Billing Dept"));
    t1.join().expect("shop writer");
    t2.join().expect("billing writer");
    // created + status_updated + paid per order.
    let got_a = rx.wait_for_requests("/shop", 60, WAIT);
    let got_b = rx.wait_for_requests("/billing", 60, WAIT);
    assert!(got_a.iter().chain(&got_b).all(|r| r["verified"] == json!(true)));
    let ids = |c: &mut Client| -> Vec<String> {
        c.query("SELECT id::text FROM webhooks.events ORDER BY seq", &[]).expect("ids").iter().map(|r| r.get(0)).collect()
    };
    let sent = |got: &[serde_json::Value]| -> Vec<String> {
        got.iter().map(|r| r["json"]["id"].as_str().unwrap_or_default().to_string()).collect()
    };
    let (mut ids_a, mut ids_b) = (ids(&mut a), ids(&mut b));
    let (mut sent_a, mut sent_b) = (sent(&got_a), sent(&got_b));
    for v in [&mut ids_a, &mut ids_b, &mut sent_a, &mut sent_b] {
        v.sort();
    }
    assert_eq!(sent_a, ids_a, "shop's endpoint got exactly shop's events");
    assert_eq!(sent_b, ids_b, "billing's endpoint got exactly billing's events");

    // The counters: every delivery of each database counted by its own worker.
    for (db, c, sub) in [("shop", &mut a, sub_a), ("Billing Dept", &mut b, sub_b)] {
        wait_for(&format!("{db}'s 60 deliveries recorded"), WAIT, || {
            let n: i64 = c
                .query_one("SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1 AND status = 'succeeded'", &[&sub])
                .expect("deliveries")
                .get(0);
            (n == 60).then_some(())
        });
        let s = wait_for(&format!("{db}'s counters"), WAIT, || status(&mut su, db).filter(|s| s.2 == 60));
        assert_eq!((s.2, s.3, s.4), (60, 60, 0), "{db}: succeeded, attempts, failed");
        assert_eq!(s.6, 60, "{db}: claimed");
        let bytes: i64 = c
            .query_one("SELECT sum(length(e.data::text))::int8 FROM webhooks.events e", &[])
            .expect("sizes")
            .get(0);
        assert!(s.5 > bytes, "{db}: {} bytes sent, more than the {bytes} bytes of data", s.5);
    }

    // Independent: pausing billing's subscription holds billing's deliveries only, and its
    // worker's queue depth shows the backlog.
    b.batch_execute(&format!("SELECT webhooks.pause({sub_b})")).expect("pause");
    b.batch_execute("UPDATE orders SET status = 'shipped' WHERE id <= 5").expect("ship in billing");
    a.batch_execute("UPDATE orders SET status = 'shipped' WHERE id <= 5").expect("ship in shop");
    rx.wait_for_requests("/shop", 70, WAIT);
    let depth = wait_for("billing's queue depth", WAIT, || {
        status(&mut su, "Billing Dept").and_then(|s| s.7).filter(|d| *d == 10)
    });
    assert_eq!(depth, 10);
    assert_eq!(rx.log("/billing").len(), 60, "paused: nothing more sent");

    // A database created later, then its extension: its worker starts delivering.
    su.batch_execute("CREATE DATABASE later").expect("later");
    let mut l = cluster.connect_db("later");
    l.batch_execute("CREATE EXTENSION pg_webhooks").expect("extension in later");
    shop(&mut l, &rx, "/later");
    wait_for("later's worker to be idle", WAIT, || status(&mut su, "later").map(|s| s.0).filter(|s| s == "idle"));
    l.batch_execute("INSERT INTO orders VALUES (1, 'pending', 1)").expect("insert in later");
    rx.wait_for_requests("/later", 1, WAIT);
    assert!(!cluster.server_log().contains("FATAL"), "no worker failed: {}", cluster.server_log());
}

#[test]
fn worker_status_is_for_readers_and_tells_a_worker_that_is_not_running() {
    let cluster = Cluster::start("worker_status", &["webhooks.poll_interval = '200ms'"]);
    let mut su = cluster.connect();
    su.batch_execute(
        "CREATE ROLE analyst LOGIN; GRANT webhooks_reader TO analyst;
         CREATE ROLE app LOGIN; CREATE ROLE admin LOGIN; GRANT webhooks_admin TO admin;",
    )
    .expect("roles");
    let pid = wait_for("the worker", WAIT, || status(&mut su, "postgres").and_then(|s| s.1));
    // A reader and an admin (who is a reader) may look; an application may not.
    for role in ["analyst", "admin"] {
        let mut c = cluster.connect_as("postgres", role);
        let s = status(&mut c, "postgres").expect("a row for the served database");
        assert_eq!(s.1, Some(pid), "{role}");
    }
    let mut app = cluster.connect_as("postgres", "app");
    let err = app.query("SELECT * FROM webhooks.worker_status()", &[]).expect_err("app may not");
    assert_eq!(err.as_db_error().map(|e| e.code().clone()), Some(SqlState::INSUFFICIENT_PRIVILEGE));

    // Columns, as a monitoring system scrapes them.
    let row = su.query_one("SELECT * FROM webhooks.worker_status()", &[]).expect("one worker");
    let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "database", "worker", "pid", "state", "started_at", "last_wake_at", "requests_in_flight", "queue_depth",
            "queue_depth_at", "claimed", "attempts", "succeeded", "failed", "dead", "bytes_sent"
        ]
    );
    let started: Option<std::time::SystemTime> = row.get("started_at");
    assert!(started.is_some());

    // Killed: the dead worker's pid leaves the slot (it withdraws itself on exit), and the
    // launcher's next worker takes the slot.
    su.execute("SELECT pg_terminate_backend($1)", &[&pid]).expect("terminate");
    let new_pid = wait_for("a new worker in the slot", WAIT, || {
        status(&mut su, "postgres").and_then(|s| s.1).filter(|p| *p != pid)
    });
    let alive: bool = su
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", &[&new_pid])
        .expect("activity")
        .get(0);
    assert!(alive, "the pid shown is a live process");
    let gone: bool = su
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", &[&pid])
        .expect("activity")
        .get(0);
    assert!(gone);
}

#[test]
fn idle_workers_sleep_and_say_idle() {
    // Workers 1.. used to spin on a retention timer only worker 0 moves on.
    let cluster = Cluster::start("idle_workers", &["webhooks.workers = 3", "webhooks.poll_interval = '1h'"]);
    let mut su = cluster.connect();
    let wakes = |c: &mut Client| -> Vec<(i32, String, Option<std::time::SystemTime>)> {
        c.query("SELECT worker, state, last_wake_at FROM webhooks.worker_status() ORDER BY worker", &[])
            .expect("status")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let first = wait_for("three idle workers", WAIT, || {
        let w = wakes(&mut su);
        (w.len() == 3 && w.iter().all(|(_, s, _)| s == "idle")).then_some(w)
    });
    // Nothing to do and an hour's poll: they sleep. Looked at every 100 ms for three seconds, a
    // spinning worker has woken (last_wake_at moved) in every interval, one with a timer of a
    // second or less in three or more. A sleeping one may still wake once or twice: PostgreSQL itself sets a backend's latch now and then. Seen
    // here: the catch-up signal of the invalidations CREATE EXTENSION sends at commit, and the
    // deadlock_timeout alarm of a lock wait behind that commit that ended sooner (timeout.c
    // leaves the timer running; its SIGALRM sets the latch a second later, measured by moving
    // deadlock_timeout).
    let mut woke = [0usize; 3];
    let mut before = first;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let now = wakes(&mut su);
        assert_eq!(now.len(), 3);
        for ((i, _, b), (_, state, a)) in before.iter().zip(&now) {
            assert_eq!(state, "idle", "worker {i}");
            if a != b {
                woke[*i as usize] += 1;
            }
        }
        before = now;
    }
    for (i, n) in woke.iter().enumerate() {
        assert!(*n <= 2, "worker {i} woke in {n} of 30 intervals of 100 ms with nothing to do");
    }
}

#[test]
fn a_database_list_that_is_not_one_serves_nothing_and_says_why() {
    let cluster = Cluster::start("bad_list", &["webhooks.database = 'shop,,billing'"]);
    wait_for("the launcher's warning", WAIT, || {
        cluster.server_log().contains("webhooks.database is not a list of databases").then_some(())
    });
    let mut su = cluster.connect();
    let n: i64 = su.query_one("SELECT count(*) FROM webhooks.worker_status()", &[]).expect("status").get(0);
    assert_eq!(n, 0, "no database is served, not even the default one");
    let running: i64 = su
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_webhooks worker'", &[])
        .expect("activity")
        .get(0);
    assert_eq!(running, 0);
    // Set in a session or with ALTER SYSTEM, such a value is refused at once.
    let err = su.batch_execute("ALTER SYSTEM SET webhooks.database = 'a, a'").expect_err("refused");
    assert_eq!(err.as_db_error().map(|e| e.code().clone()), Some(SqlState::INVALID_PARAMETER_VALUE));
}
