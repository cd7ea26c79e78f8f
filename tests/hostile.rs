//! Hostile receivers: peers that trickle headers, answer garbage, send a body forever, never
//! finish a TLS handshake or never read the request. Each attempt must end by its deadline (the
//! subscription's timeout) with a clear error in webhooks.attempts, and a healthy endpoint must
//! keep being delivered to meanwhile. No timings are asserted: the healthy endpoint must get
//! all its deliveries while the hostile attempts, with a deadline far longer than that takes,
//! are still outstanding; then every hostile attempt must end, none before its deadline.

mod chaos;
mod common;

use chaos::Chaos;
use common::{wait_for, Cluster};
use postgres::Client;
use std::time::Duration;

/// The hostile subscriptions' deadline: long against the healthy endpoint's deliveries.
const HOSTILE_TIMEOUT_S: i64 = 30;
const HEALTHY: i64 = 40;

fn subscribe(c: &mut Client, url: &str, pattern: &str, timeout: &str) -> (i64, String) {
    let row = c
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, ARRAY[$2], timeout => $3::text::interval, retry_schedule => '')",
            &[&url, &pattern, &timeout],
        )
        .expect("subscribe");
    (row.get(0), row.get(1))
}

fn attempts(c: &mut Client, sub: i64) -> Vec<(f64, Option<i32>, Option<String>)> {
    c.query(
        "SELECT a.duration_ms, a.status_code, a.error FROM webhooks.attempts a
           JOIN webhooks.deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = $1",
        &[&sub],
    )
    .expect("attempts")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[test]
fn hostile_receivers_end_at_their_deadline_and_do_not_slow_a_healthy_endpoint() {
    let cluster = Cluster::start(
        "hostile",
        &[
            // Room for a request body larger than any socket buffer (the peer that never reads).
            "webhooks.max_payload_bytes = '16MB'",
            "webhooks.concurrency = 32",
            "webhooks.max_in_flight_per_endpoint = 4",
        ],
    );
    let rx = Chaos::start(&[
        "healthy",
        "slow_headers",
        "garbage",
        "trickle",
        "flood",
        "tls_silent",
        "no_read",
    ]);
    let mut su = cluster.connect();
    su.batch_execute("CREATE ROLE integrations LOGIN; GRANT webhooks_admin TO integrations;")
        .expect("roles");
    let mut c = cluster.connect_as("postgres", "integrations");
    let timeout = format!("{HOSTILE_TIMEOUT_S}s");
    // (endpoint, URL, mode, what its attempt's error must say, whether it ends at the deadline)
    let hostile = [
        (
            "slow_headers",
            rx.url("slow_headers"),
            "slow_headers",
            "timeout",
            true,
        ),
        ("garbage", rx.url("garbage"), "garbage", "", false),
        ("trickle", rx.url("trickle"), "trickle", "timeout", true),
        ("flood", rx.url("flood"), "flood", "HTTP 500", false),
        (
            "tls_silent",
            rx.https_url("tls_silent"),
            "silent",
            "timeout",
            true,
        ),
        ("no_read", rx.url("no_read"), "silent", "timeout", true),
    ];
    let mut subs = Vec::new();
    for (name, url, mode, _, _) in &hostile {
        rx.set_mode(name, mode);
        let (id, _) = subscribe(&mut c, url, &format!("hostile.{name}"), &timeout);
        subs.push(id);
    }
    let (healthy, secret) = subscribe(&mut c, &rx.url("healthy"), "healthy.*", "5s");
    rx.set_secret("healthy", &secret);

    // The hostile events first, each endpoint with one delivery per slot it has, so that all
    // of them hold HTTP threads while the healthy events come.
    for (name, _, _, _, _) in &hostile {
        let pad = if *name == "no_read" { 8_000_000 } else { 10 };
        for _ in 0..4 {
            c.execute(
                "SELECT webhooks.emit($1, jsonb_build_object('pad', repeat('x', $2)))",
                &[&format!("hostile.{name}"), &pad],
            )
            .expect("emit a hostile event");
        }
    }
    // Wait until every deadline-bound endpoint has its requests (connections) outstanding.
    wait_for(
        "the hostile endpoints to be reached",
        Duration::from_secs(60),
        || {
            let counts = rx.counts();
            hostile
                .iter()
                .filter(|h| h.4)
                .all(|(name, ..)| counts[*name]["connections"].as_i64().unwrap_or(0) >= 4)
                .then_some(())
        },
    );
    for i in 0..HEALTHY {
        c.execute(
            "SELECT webhooks.emit('healthy.ping', jsonb_build_object('i', $1::int8))",
            &[&i],
        )
        .expect("emit a healthy event");
    }
    wait_for(
        "every healthy delivery to succeed",
        Duration::from_secs(HOSTILE_TIMEOUT_S as u64 * 3),
        || {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1 AND status = 'succeeded'",
                    &[&healthy],
                )
                .expect("count")
                .get(0);
            (n == HEALTHY).then_some(())
        },
    );
    // Meanwhile no deadline-bound hostile attempt had ended: the healthy endpoint was served
    // while they all held their threads.
    for ((name, _, _, _, deadline_bound), sub) in hostile.iter().zip(&subs) {
        if *deadline_bound {
            assert_eq!(
                attempts(&mut c, *sub),
                vec![],
                "{name}'s attempts were still outstanding when the healthy endpoint had everything"
            );
        }
    }
    let log = rx.log();
    let healthy_log: Vec<_> = log.iter().filter(|e| e["endpoint"] == "healthy").collect();
    assert_eq!(healthy_log.len() as i64, HEALTHY, "each healthy event once");
    assert!(healthy_log
        .iter()
        .all(|e| e["verified"] == true && e["acked"] == true));

    // Then every hostile attempt ends, by its deadline, with a clear error, and is dead
    // (retry_schedule '': one attempt).
    for ((name, _, _, error, deadline_bound), sub) in hostile.iter().zip(&subs) {
        let got = wait_for(
            &format!("{name}'s 4 attempts to end"),
            Duration::from_secs(HOSTILE_TIMEOUT_S as u64 * 4),
            || {
                let a = attempts(&mut c, *sub);
                (a.len() == 4).then_some(a)
            },
        );
        for (ms, status, err) in &got {
            let err = err.as_deref().unwrap_or_default();
            report!("{name}: {ms:.0} ms, status {status:?}: {err}");
            assert!(!err.is_empty(), "{name}: an error is recorded");
            assert!(err.contains(error), "{name}: {err:?} should say {error:?}");
            if *deadline_bound {
                assert!(
                    *ms >= (HOSTILE_TIMEOUT_S * 1000) as f64 * 0.95,
                    "{name}: ended by the deadline, not by something else: {ms} ms"
                );
            }
        }
        let dead: i64 = c
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1 AND status = 'dead'",
                &[sub],
            )
            .expect("dead")
            .get(0);
        assert_eq!(dead, 4, "{name}: every delivery ends dead");
    }
    // The worker's threads are all free again: a new healthy event is delivered.
    c.execute("SELECT webhooks.emit('healthy.after', '{}')", &[])
        .expect("emit after");
    wait_for(
        "the delivery after the hostile ones",
        Duration::from_secs(30),
        || {
            (rx.log()
                .iter()
                .filter(|e| e["endpoint"] == "healthy")
                .count() as i64
                == HEALTHY + 1)
                .then_some(())
        },
    );
}
