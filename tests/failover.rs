//! Failover (issue 10): a primary with a synchronous streaming standby, writers committing as
//! an application role, the primary killed (-m immediate) while they write, the standby
//! promoted. Every event of a transaction acknowledged to a writer must be on the new primary
//! and delivered (by the old primary before the crash or by the new one after it), nothing
//! that never committed may arrive, and delivery resumes on the promoted standby with no
//! manual step (its worker, not running during recovery, starts at promotion).

mod chaos;
mod common;

use chaos::Chaos;
use common::{wait_for, Cluster};
use postgres::Client;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ENDPOINTS: [&str; 2] = ["erp", "warehouse"];
const WAIT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Ledger {
    acked: HashSet<String>,
    unknown: HashSet<String>,
    aborted: HashSet<String>,
}

/// One transaction: a tracked order with an item, an emit, and the token's soak_txns row.
fn transaction(c: &mut Client, w: i64, n: i64, token: &str) -> Result<(), (bool, postgres::Error)> {
    let mut t = c.transaction().map_err(|e| (false, e))?;
    let id = w * 10_000_000 + n;
    let work = (|| {
        t.execute(
            "INSERT INTO orders (id, txn) VALUES ($1, $2)",
            &[&id, &token],
        )?;
        t.execute(
            "INSERT INTO order_items (order_id, sku, txn) VALUES ($1, 'sku-1', $2)",
            &[&id, &token],
        )?;
        t.execute(
            "SELECT webhooks.emit('inventory.adjusted', jsonb_build_object('txn', $1::text), 'sku-' || ($2::int8 % 3))",
            &[&token, &n],
        )?;
        t.execute("INSERT INTO soak_txns (token) VALUES ($1)", &[&token])?;
        Ok(())
    })();
    work.map_err(|e| (false, e))?;
    // An error from COMMIT itself leaves the outcome unknown.
    t.commit().map_err(|e| (true, e))
}

fn writer(primary: Arc<Cluster>, w: i64, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let Ok(mut c) = primary.connect_as_result("postgres", "shop") else {
        return;
    };
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let token = format!("w{w}-{n}");
        let result = transaction(&mut c, w, n, &token);
        let mut l = ledger.lock().expect("ledger");
        match result {
            Ok(()) => {
                l.acked.insert(token);
            }
            Err((true, _)) => {
                l.unknown.insert(token);
            }
            Err((false, _)) => {
                l.aborted.insert(token);
            }
        }
        drop(l);
        if c.is_closed() {
            // The primary is gone: this writer is done.
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn webhook_processes(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'pg_webhooks%'",
        &[],
    )
    .expect("pg_stat_activity")
    .get(0)
}

#[test]
fn acknowledged_events_survive_failover_to_a_synchronous_standby_and_delivery_resumes() {
    let primary = Arc::new(Cluster::start(
        "fo_sync_primary",
        &[
            "webhooks.retry_schedule = '200ms,500ms,1s,1s,1s,1s,1s,1s,1s,1s'",
            "webhooks.timeout = '2s'",
        ],
    ));
    let rx = Chaos::start(&ENDPOINTS);
    let mut p = primary.connect();
    p.batch_execute(
        r#"CREATE ROLE shop LOGIN; GRANT webhooks_admin TO shop;
           CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending', txn text);
           CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders (id),
                                     sku text, txn text);
           CREATE TABLE soak_txns (token text PRIMARY KEY);
           GRANT SELECT, INSERT, UPDATE ON orders, order_items, soak_txns TO shop;
           GRANT USAGE ON SEQUENCE order_items_id_seq TO shop;
           SELECT webhooks.track('orders', entity => 'order', status_column => 'status',
                  children => '{"items": {"table": "order_items", "foreign_key": "order_id"}}');"#,
    )
    .expect("schema");
    for ep in ENDPOINTS {
        let row = p
            .query_one(
                "SELECT id, secret FROM webhooks.subscribe($1, '{*}')",
                &[&rx.url(ep)],
            )
            .expect("subscribe");
        rx.set_secret(ep, &row.get::<_, String>(1));
    }
    let standby = primary.start_standby("fo_sync_standby");
    // Synchronous from now on (set after the base backup, so that the standby, once promoted
    // and alone, does not wait for a standby of its own).
    p.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .expect("synchronous_standby_names");
    p.batch_execute("SELECT pg_reload_conf()").expect("reload");
    wait_for("the standby to be synchronous", WAIT, || {
        p.query_opt(
            "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
            &[],
        )
        .expect("pg_stat_replication")
        .map(|_| ())
    });
    let mut s = standby.connect();
    assert_eq!(
        webhook_processes(&mut s),
        0,
        "no pg_webhooks process runs in recovery"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (primary, stop, ledger) = (primary.clone(), stop.clone(), ledger.clone());
            std::thread::spawn(move || writer(primary, w, stop, ledger))
        })
        .collect();
    // Let them write and the old primary deliver some, then crash it mid-stream.
    wait_for("deliveries on the primary", WAIT, || {
        (rx.log().iter().filter(|e| e["acked"] == true).count() >= 400).then_some(())
    });
    assert_eq!(
        webhook_processes(&mut s),
        0,
        "still none on the standby while the primary runs"
    );
    // One endpoint fails from now on, so that the crash leaves it a backlog of retrying
    // deliveries (with the claims the old worker held) for the new primary to carry on.
    rx.set_mode("warehouse", "500");
    wait_for("failed attempts at the warehouse", WAIT, || {
        (rx.log()
            .iter()
            .filter(|e| e["endpoint"] == "warehouse" && e["mode"] == "500")
            .count()
            >= 5)
            .then_some(())
    });
    primary.kill();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    drop(p);
    let promoted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    s.batch_execute("SELECT pg_promote()").expect("promote");

    rx.set_mode("warehouse", "ok");
    // No manual step: the promoted standby's worker starts and delivers the backlog.
    wait_for("the worker to start on the promoted standby", WAIT, || {
        (webhook_processes(&mut s) == 2).then_some(())
    });
    s.batch_execute("SELECT webhooks.emit('failover.after', '{\"txn\": \"after\"}')")
        .expect("emit after promotion");
    wait_for("every delivery on the new primary to finish", WAIT, || {
        let row = s
            .query_one(
                "SELECT (SELECT count(*) FROM webhooks.events),
                        (SELECT count(*) FROM webhooks.deliveries WHERE status IN ('succeeded', 'dead'))",
                &[],
            )
            .expect("progress");
        (row.get::<_, i64>(1) == row.get::<_, i64>(0) * ENDPOINTS.len() as i64).then_some(())
    });

    let ledger = ledger.lock().expect("ledger");
    let committed: HashSet<String> = s
        .query("SELECT token FROM soak_txns", &[])
        .expect("soak_txns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked_lost: Vec<&String> = ledger
        .acked
        .iter()
        .filter(|t| !committed.contains(*t))
        .collect();
    let aborted_committed = ledger.aborted.intersection(&committed).count();
    let mut event_token: HashMap<String, String> = HashMap::new();
    for r in s
        .query(
            "SELECT id::text, coalesce(data->>'txn', '') FROM webhooks.events",
            &[],
        )
        .expect("events")
    {
        event_token.insert(r.get(0), r.get(1));
    }
    let mut per_token: HashMap<&str, usize> = HashMap::new();
    for t in event_token.values() {
        *per_token.entry(t.as_str()).or_default() += 1;
    }
    // order.created and inventory.adjusted: two events per committed transaction.
    let acked_without_events = ledger
        .acked
        .iter()
        .filter(|t| per_token.get(t.as_str()) != Some(&2))
        .count();
    let events_uncommitted = event_token
        .values()
        .filter(|t| *t != "after" && !committed.contains(*t))
        .count();
    let log = rx.log();
    let mut got: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut never_committed = 0;
    for e in &log {
        let id = e["webhook_id"].as_str().unwrap_or_default();
        if !event_token.contains_key(id) {
            never_committed += 1;
        }
        if e["acked"] == true {
            assert_eq!(e["verified"], true, "{e}");
            got.entry(e["endpoint"].as_str().unwrap_or_default())
                .or_default()
                .insert(id);
        }
    }
    let by_new_primary = log
        .iter()
        .filter(|e| e["acked"] == true && e["t"].as_f64().unwrap_or(0.0) > promoted_at)
        .count();
    let lost: usize = ENDPOINTS
        .iter()
        .map(|ep| {
            event_token
                .keys()
                .filter(|id| !got.get(ep).is_some_and(|g| g.contains(id.as_str())))
                .count()
        })
        .sum();
    let dead: i64 = s
        .query_one(
            "SELECT count(*) FROM webhooks.deliveries WHERE status = 'dead'",
            &[],
        )
        .expect("dead")
        .get(0);
    report!(
        "failover: {} acknowledged, {} unknown ({} committed), {} aborted; {} events on the new primary; \
         {} requests received ({by_new_primary} acknowledged after the promotion); lost {lost}, acknowledged but missing {}, never-committed delivered {never_committed}, dead {dead}",
        ledger.acked.len(),
        ledger.unknown.len(),
        ledger.unknown.intersection(&committed).count(),
        ledger.aborted.len(),
        event_token.len(),
        log.len(),
        acked_lost.len()
    );
    let failed_before: HashSet<&str> = log
        .iter()
        .filter(|e| e["endpoint"] == "warehouse" && e["mode"] == "500")
        .filter_map(|e| e["webhook_id"].as_str())
        .collect();
    let carried_on: HashSet<&str> = log
        .iter()
        .filter(|e| e["acked"] == true && e["t"].as_f64().unwrap_or(0.0) > promoted_at)
        .filter(|e| failed_before.contains(e["webhook_id"].as_str().unwrap_or_default()))
        .filter_map(|e| e["webhook_id"].as_str())
        .collect();
    report!("failover: {} events failed at the warehouse before the crash, {} of them delivered by the new primary", failed_before.len(), carried_on.len());
    assert!(
        !carried_on.is_empty(),
        "the new primary delivered the backlog the old one left"
    );
    assert!(
        ledger.acked.len() >= 50,
        "the writers got work through before the crash"
    );
    assert!(
        acked_lost.is_empty(),
        "acknowledged transactions missing after failover: {acked_lost:?}"
    );
    assert_eq!(
        acked_without_events, 0,
        "acknowledged transactions without both their events"
    );
    assert_eq!(
        aborted_committed, 0,
        "transactions that failed before COMMIT but committed"
    );
    assert_eq!(
        events_uncommitted, 0,
        "events of transactions that did not commit"
    );
    assert_eq!(
        never_committed, 0,
        "requests for events the new primary does not have"
    );
    assert_eq!(dead, 0, "dead deliveries");
    assert_eq!(lost, 0, "events not delivered to every endpoint");
    assert!(got.values().all(|g| event_token
        .iter()
        .any(|(id, t)| t == "after" && g.contains(id.as_str()))));
}
