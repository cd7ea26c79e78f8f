//! Operating it from SQL (#12): webhooks.subscription_health, webhooks.event_stats and
//! webhooks.request(), end to end on a live cluster with two delivery workers sharing the
//! queue, and tests/receiver.py on 127.0.0.1 verifying every signature. Each test has its
//! own event types, receiver paths and subscriptions; every wait is for a positive signal.

mod common;

use common::{fails, shared_cluster, wait_for, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn cluster() -> &'static Cluster {
    shared_cluster(
        "operate",
        &[
            "webhooks.workers = 2",
            "webhooks.retry_schedule = '100ms,100ms'",
            "webhooks.max_in_flight_per_endpoint = 4",
            "webhooks.timeout = '5s'",
        ],
    )
}

fn db() -> Client {
    cluster().connect()
}

/// Subscribe `path` of `rx` to `patterns` (extra named arguments in `extra`); the receiver
/// verifies with the returned secret and answers as `answers` says. Returns (id, secret).
fn subscribe(
    c: &mut Client,
    rx: &Receiver,
    path: &str,
    patterns: &str,
    extra: &str,
    answers: Value,
) -> (i64, String) {
    let url = rx.url(path);
    let row = c
        .query_one(
            &format!("SELECT id, secret FROM webhooks.subscribe($1, $2::text::text[]{extra})"),
            &[&url, &patterns],
        )
        .expect("subscribe");
    let (id, secret): (i64, String) = (row.get(0), row.get(1));
    let path_only = path.split('?').next().unwrap_or(path);
    let mut config = json!({"path": path_only, "secret": secret, "style": "standard"});
    if let (Some(obj), Some(more)) = (config.as_object_mut(), answers.as_object()) {
        obj.extend(more.clone());
    }
    rx.configure(config);
    (id, secret)
}

/// Wait until subscription `sub` has `n` deliveries, all with `status`.
fn wait_all(c: &mut Client, sub: i64, n: i64, status: &str) {
    wait_for(
        &format!("{n} deliveries of subscription {sub} to be {status}"),
        WAIT,
        || {
            let row = c
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE status = $2)
                       FROM webhooks.deliveries WHERE subscription_id = $1",
                    &[&sub, &status],
                )
                .expect("deliveries");
            (row.get::<_, i64>(0) == n && row.get::<_, i64>(1) == n).then_some(())
        },
    )
}

fn health(c: &mut Client, sub: i64) -> postgres::Row {
    c.query_one(
        "SELECT * FROM webhooks.subscription_health WHERE subscription_id = $1",
        &[&sub],
    )
    .expect("health row")
}

/// Durations of the subscription's attempts, sorted.
fn durations(c: &mut Client, sub: i64) -> Vec<f64> {
    c.query(
        "SELECT a.duration_ms FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
          WHERE d.subscription_id = $1 ORDER BY a.duration_ms",
        &[&sub],
    )
    .expect("durations")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The estimate is in the histogram bucket of the exact nearest-rank percentile: within
/// 2^(1/8) of it (0.05 ms below 0.1 ms), plus the rounding to 0.001 ms.
fn assert_percentile(what: &str, estimate: Option<f64>, sorted: &[f64], q: f64) {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    let exact = sorted[rank - 1];
    let est = estimate.unwrap_or_else(|| panic!("{what}: no estimate"));
    let tolerance = (exact * (2f64.powf(0.125) - 1.0)).max(0.05) + 0.001;
    assert!(
        (est - exact).abs() <= tolerance,
        "{what}: estimate {est} ms, exact {exact} ms (of {} attempts)",
        sorted.len()
    );
}

#[test]
fn a_healthy_endpoint_shows_its_attempts_rate_and_response_times() {
    let rx = Receiver::start();
    let mut c = db();
    let (fast, _) = subscribe(&mut c, &rx, "/hok", "{hok.*}", "", json!({}));
    let (slow, _) = subscribe(
        &mut c,
        &rx,
        "/hslow",
        "{hslow.*}",
        "",
        json!({"delay_ms": 120}),
    );
    c.batch_execute(
        "SELECT webhooks.emit('hok.tested', jsonb_build_object('n', i)) FROM generate_series(1, 40) i;
         SELECT webhooks.emit('hslow.tested', jsonb_build_object('n', i)) FROM generate_series(1, 6) i;",
    )
    .expect("emit");
    wait_all(&mut c, fast, 40, "succeeded");
    wait_all(&mut c, slow, 6, "succeeded");
    for (sub, n) in [(fast, 40i64), (slow, 6)] {
        let h = health(&mut c, sub);
        for window in ["1h", "24h"] {
            assert_eq!(h.get::<_, i64>(format!("attempts_{window}").as_str()), n);
            assert_eq!(h.get::<_, i64>(format!("delivered_{window}").as_str()), n);
            assert_eq!(h.get::<_, i64>(format!("failed_{window}").as_str()), 0);
            assert_eq!(h.get::<_, i64>(format!("dead_{window}").as_str()), 0);
            let rate: Option<String> = c
                .query_one(
                    &format!("SELECT success_rate_{window}::text FROM webhooks.subscription_health WHERE subscription_id = $1"),
                    &[&sub],
                )
                .expect("rate")
                .get(0);
            assert_eq!(rate.as_deref(), Some("1.0000"));
            let sorted = durations(&mut c, sub);
            let p: Vec<Option<f64>> = ["p50", "p95", "p99"]
                .iter()
                .map(|p| h.get::<_, Option<f64>>(format!("{p}_ms_{window}").as_str()))
                .collect();
            assert!(p[0] <= p[1] && p[1] <= p[2], "percentiles in order: {p:?}");
            for (q, est) in [0.5, 0.95, 0.99].iter().zip(&p) {
                assert_percentile(&format!("sub {sub} q {q} {window}"), *est, &sorted, *q);
            }
        }
        assert_eq!(h.get::<_, i64>("backlog"), 0);
        assert_eq!(
            h.get::<_, Option<std::time::SystemTime>>("oldest_queued_at"),
            None
        );
        assert_eq!(h.get::<_, i32>("consecutive_failures"), 0);
        assert_eq!(h.get::<_, Option<String>>("last_error"), None);
        assert_eq!(h.get::<_, Option<i32>>("last_status_code"), None);
        assert_eq!(h.get::<_, String>("state"), "active");
        assert_eq!(
            h.get::<_, String>("url"),
            rx.url(if sub == fast { "/hok" } else { "/hslow" })
        );
    }
    let slow_p50: f64 = health(&mut c, slow).get("p50_ms_1h");
    assert!(
        slow_p50 >= 120.0 / 1.1,
        "a 120 ms endpoint: p50 {slow_p50} ms"
    );
}

#[test]
fn a_failing_endpoint_shows_its_streak_and_last_error_until_it_recovers() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, secret) = subscribe(
        &mut c,
        &rx,
        "/hfail",
        "{hfail.*}",
        "",
        json!({"default_status": 500}),
    );
    c.batch_execute("SELECT webhooks.emit('hfail.tested', jsonb_build_object('n', i)) FROM generate_series(1, 4) i")
        .expect("emit");
    // Three attempts each (two retries), every one failing, recorded by either worker.
    wait_all(&mut c, sub, 4, "dead");
    let h = health(&mut c, sub);
    assert_eq!(h.get::<_, i64>("attempts_1h"), 12);
    assert_eq!(h.get::<_, i64>("failed_1h"), 12);
    assert_eq!(h.get::<_, i64>("dead_1h"), 4);
    assert_eq!(h.get::<_, i64>("delivered_1h"), 0);
    assert_eq!(h.get::<_, i64>("dead_24h"), 4);
    assert_eq!(h.get::<_, i32>("consecutive_failures"), 12);
    assert_eq!(
        h.get::<_, Option<String>>("last_error").as_deref(),
        Some("HTTP 500")
    );
    assert_eq!(h.get::<_, Option<i32>>("last_status_code"), Some(500));
    assert!(h
        .get::<_, Option<std::time::SystemTime>>("failing_since")
        .is_some());
    let last_failure_is_the_last_attempt: bool = c
        .query_one(
            "SELECT h.last_error_at = (SELECT max(a.started_at) FROM webhooks.attempts a
                                         JOIN webhooks.deliveries d ON d.id = a.delivery_id
                                        WHERE d.subscription_id = h.subscription_id)
               FROM webhooks.subscription_health h WHERE h.subscription_id = $1",
            &[&sub],
        )
        .expect("last_error_at")
        .get(0);
    assert!(last_failure_is_the_last_attempt);
    let rate: Option<String> = c
        .query_one("SELECT success_rate_1h::text FROM webhooks.subscription_health WHERE subscription_id = $1", &[&sub])
        .expect("rate")
        .get(0);
    assert_eq!(rate.as_deref(), Some("0.0000"));

    // It recovers: one success ends the streak; the last error stays, as history.
    rx.configure(json!({"path": "/hfail", "secret": secret, "default_status": 200}));
    let test: i64 = c
        .query_one("SELECT webhooks.send_test($1)", &[&sub])
        .expect("send_test")
        .get(0);
    wait_for("the test delivery to succeed", WAIT, || {
        let st: String = c
            .query_one(
                "SELECT status FROM webhooks.deliveries WHERE id = $1",
                &[&test],
            )
            .expect("status")
            .get(0);
        (st == "succeeded").then_some(())
    });
    let h = health(&mut c, sub);
    assert_eq!(h.get::<_, i32>("consecutive_failures"), 0);
    assert_eq!(
        h.get::<_, Option<String>>("last_error").as_deref(),
        Some("HTTP 500")
    );
    assert_eq!(h.get::<_, i64>("attempts_1h"), 13);
    assert_eq!(h.get::<_, i64>("delivered_1h"), 1);
    assert_eq!(
        h.get::<_, Option<std::time::SystemTime>>("failing_since"),
        None
    );
}

#[test]
fn a_paused_subscription_shows_its_backlog_and_the_age_of_its_oldest_delivery() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(&mut c, &rx, "/hheld", "{hheld.*}", "", json!({}));
    c.execute("SELECT webhooks.pause($1)", &[&sub])
        .expect("pause");
    c.batch_execute("SELECT webhooks.emit('hheld.first', '{}')")
        .expect("emit");
    c.batch_execute("SELECT webhooks.emit('hheld.later', jsonb_build_object('n', i)) FROM generate_series(1, 4) i")
        .expect("emit");
    wait_for("5 held deliveries", WAIT, || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1",
                &[&sub],
            )
            .expect("count")
            .get(0);
        (n == 5).then_some(())
    });
    let row = c
        .query_one(
            "SELECT h.state, h.backlog, h.oldest_queued_at = (SELECT min(d.created_at) FROM webhooks.deliveries d
                                                             WHERE d.subscription_id = h.subscription_id),
                    h.oldest_queued_age >= interval '0' AND h.oldest_queued_age = now() - h.oldest_queued_at,
                    h.attempts_1h
               FROM webhooks.subscription_health h WHERE h.subscription_id = $1",
            &[&sub],
        )
        .expect("health");
    assert_eq!(row.get::<_, String>(0), "paused");
    assert_eq!(row.get::<_, i64>(1), 5);
    assert!(
        row.get::<_, bool>(2),
        "oldest_queued_at is the oldest delivery's created_at"
    );
    assert!(row.get::<_, bool>(3), "oldest_queued_age is its age");
    assert_eq!(row.get::<_, i64>(4), 0);
    c.execute("SELECT webhooks.resume($1)", &[&sub])
        .expect("resume");
    wait_all(&mut c, sub, 5, "succeeded");
    let h = health(&mut c, sub);
    assert_eq!(h.get::<_, i64>("backlog"), 0);
    assert_eq!(
        h.get::<_, Option<std::time::SystemTime>>("oldest_queued_at"),
        None
    );
    assert_eq!(h.get::<_, i64>("delivered_1h"), 5);
}

/// (emitted, delivered, retried, dead) of `event_type`, over every hour.
fn event_stats(c: &mut Client, event_type: &str) -> (i64, i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT COALESCE(sum(emitted), 0)::int8, COALESCE(sum(delivered), 0)::int8,
                    COALESCE(sum(retried), 0)::int8, COALESCE(sum(dead), 0)::int8
               FROM webhooks.event_stats WHERE event_type = $1",
            &[&event_type],
        )
        .expect("event_stats");
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[test]
fn event_stats_count_emitted_delivered_retried_and_dead_per_type() {
    let rx = Receiver::start();
    let mut c = db();
    let (ok, _) = subscribe(&mut c, &rx, "/evok", "{evs.ok}", "", json!({}));
    let (flaky, _) = subscribe(
        &mut c,
        &rx,
        "/evflaky",
        "{evs.flaky}",
        "",
        json!({"responses": [500]}),
    );
    let (dead, _) = subscribe(
        &mut c,
        &rx,
        "/evdead",
        "{evs.dead}",
        ", retry_schedule => '100ms'",
        json!({"default_status": 503}),
    );
    // One transaction: fanned out in one step, so once any of them has a delivery, every
    // one of them has been counted (evs.none goes to nobody).
    c.batch_execute(
        "BEGIN;
         SELECT webhooks.emit('evs.ok', jsonb_build_object('n', i)) FROM generate_series(1, 3) i;
         SELECT webhooks.emit('evs.flaky', '{}');
         SELECT webhooks.emit('evs.dead', jsonb_build_object('n', i)) FROM generate_series(1, 2) i;
         SELECT webhooks.emit('evs.none', jsonb_build_object('n', i)) FROM generate_series(1, 2) i;
         COMMIT;",
    )
    .expect("emit");
    wait_all(&mut c, ok, 3, "succeeded");
    wait_all(&mut c, flaky, 1, "succeeded");
    wait_all(&mut c, dead, 2, "dead");
    assert_eq!(event_stats(&mut c, "evs.ok"), (3, 3, 0, 0));
    assert_eq!(event_stats(&mut c, "evs.flaky"), (1, 1, 1, 0));
    assert_eq!(event_stats(&mut c, "evs.dead"), (2, 0, 2, 2));
    assert_eq!(event_stats(&mut c, "evs.none"), (2, 0, 0, 0));
    // Hours are whole UTC hours.
    let whole: bool = c
        .query_one(
            "SELECT bool_and(hour = date_trunc('hour', hour, 'UTC')) FROM webhooks.event_stats WHERE event_type LIKE 'evs.%'",
            &[],
        )
        .expect("hours")
        .get(0);
    assert!(whole);
    let test: i64 = c
        .query_one("SELECT webhooks.send_test($1)", &[&ok])
        .expect("send_test")
        .get(0);
    wait_for("the test delivery", WAIT, || {
        let st: String = c
            .query_one(
                "SELECT status FROM webhooks.deliveries WHERE id = $1",
                &[&test],
            )
            .expect("status")
            .get(0);
        (st == "succeeded").then_some(())
    });
    let (emitted, delivered, _, _) = event_stats(&mut c, "webhook.test");
    assert!(
        emitted >= 1 && delivered >= 1,
        "webhook.test counted: {emitted} {delivered}"
    );
}

#[test]
fn the_rollup_is_exact_with_two_workers_sharing_one_endpoint() {
    let rx = Receiver::start();
    let mut c = db();
    // Both workers ready before anything is queued (a fresh cluster's worker looks for the
    // extension once a second): both must have their part in what follows.
    wait_for("both workers ready", WAIT, || {
        let ready: i64 = c
            .query_one("SELECT count(*) FROM webhooks.worker_status() WHERE state IN ('idle', 'delivering')", &[])
            .expect("status")
            .get(0);
        (ready == 2).then_some(())
    });
    // Every third of the first 150 requests fails; enough retries that none ends dead.
    let answers: Vec<u16> = (0..150)
        .map(|i| if i % 3 == 0 { 500 } else { 200 })
        .collect();
    let schedule = vec!["50ms"; 20].join(",");
    let (sub, _) = subscribe(
        &mut c,
        &rx,
        "/hpair",
        "{hpair.*}",
        &format!(", retry_schedule => '{schedule}'"),
        json!({"responses": answers}),
    );
    c.batch_execute("SELECT webhooks.emit('hpair.tested', jsonb_build_object('n', i)) FROM generate_series(1, 400) i")
        .expect("emit");
    wait_all(&mut c, sub, 400, "succeeded");
    let exact = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299),
                    count(*) FILTER (WHERE a.status_code IS DISTINCT FROM 200),
                    max(a.started_at) FILTER (WHERE a.status_code IS DISTINCT FROM 200) =
                        (SELECT last_error_at FROM webhooks.subscription_health WHERE subscription_id = $1)
               FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
              WHERE d.subscription_id = $1",
            &[&sub],
        )
        .expect("exact");
    let (attempts, ok, failed): (i64, i64, i64) = (exact.get(0), exact.get(1), exact.get(2));
    assert_eq!(ok, 400);
    assert!(failed >= 50, "the endpoint failed {failed} times");
    let h = health(&mut c, sub);
    assert_eq!(h.get::<_, i64>("attempts_1h"), attempts);
    assert_eq!(h.get::<_, i64>("delivered_1h"), ok);
    assert_eq!(h.get::<_, i64>("failed_1h"), failed);
    assert_eq!(h.get::<_, i64>("attempts_24h"), attempts);
    assert_eq!(h.get::<_, i64>("dead_24h"), 0);
    // Every failure was retried later and succeeded: the streak is over, whichever worker
    // recorded what first, and the last error is the failure that started last.
    assert_eq!(h.get::<_, i32>("consecutive_failures"), 0);
    assert!(
        exact.get::<_, bool>(3),
        "last_error_at is the last failure's start"
    );
    assert_eq!(event_stats(&mut c, "hpair.tested"), (400, 400, failed, 0));
    // Both workers recorded outcomes, each into rows of its own.
    let workers: Vec<i16> = c
        .query(
            "SELECT DISTINCT worker FROM webhooks._delivery_stats WHERE subscription_id = $1 ORDER BY 1",
            &[&sub],
        )
        .expect("workers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(workers, [0, 1], "both workers delivered");
}

fn header<'a>(req: &'a Value, name: &str) -> &'a str {
    req["headers"][name].as_str().unwrap_or("")
}

/// (method, url, headers, body) of webhooks.request(id) as `c`'s role.
fn request(c: &mut Client, id: i64) -> (String, String, Value, String) {
    let r = c
        .query_one(
            "SELECT method, url, headers, body FROM webhooks.request($1)",
            &[&id],
        )
        .expect("request()");
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// What request() shows agrees with what the receiver got: the body byte for byte, every
/// header the receiver got but the transport's own (host, content-length, accept), with the
/// same value unless masked. Returns the headers shown.
fn assert_same_request(shown: &(String, String, Value, String), got: &Value, masked: &[&str]) {
    let (method, _, headers, body) = shown;
    assert_eq!(method, "POST");
    assert_eq!(got["method"], "POST");
    assert_eq!(
        body.as_bytes(),
        got["body"].as_str().unwrap_or("").as_bytes(),
        "the body, byte for byte"
    );
    let shown_names: Vec<&String> = headers
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let mut got_names: Vec<&String> = got["headers"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| !["host", "content-length", "accept"].contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default();
    got_names.sort();
    let mut sorted = shown_names.clone();
    sorted.sort();
    assert_eq!(sorted, got_names, "the same headers");
    for name in shown_names {
        let value = headers[name.as_str()].as_str().unwrap_or("");
        if masked.contains(&name.as_str()) {
            assert!(
                value
                    .split([' ', ','])
                    .all(|p| p.is_empty() || p == "***" || p == "v1"),
                "{name} masked: {value}"
            );
            assert_ne!(value, header(got, name), "{name} is not shown");
        } else {
            assert_eq!(value, header(got, name), "header {name}");
        }
    }
}

#[test]
fn request_shows_what_was_sent_byte_for_byte_with_secrets_masked() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, secret) = subscribe(
        &mut c,
        &rx,
        "/hreq?access_token=t0k-SECRET&page=2",
        "{hreq.*}",
        r#", headers => '{"X-Api-Key": "k-123-SECRET", "Authorization": "Bearer b-456-SECRET"}'"#,
        json!({}),
    );
    c.batch_execute(
        r#"SELECT webhooks.emit('hreq.tested', '{"note": "a: b, \"c\" d\\n", "total": 59.90, "big": 123456789012345678901234567890.5, "uni": "é☃ 𝄞", "nested": {"z": [1, 2.50, null, true]}}', 'k1')"#,
    )
    .expect("emit");
    let got = rx.wait_for_requests("/hreq", 1, WAIT);
    assert_eq!(got[0]["verified"], true);
    let id: i64 = c
        .query_one(
            "SELECT id FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&sub],
        )
        .expect("delivery")
        .get(0);
    wait_all(&mut c, sub, 1, "succeeded");
    let shown = request(&mut c, id);
    assert_same_request(
        &shown,
        &got[0],
        &["webhook-signature", "x-api-key", "authorization"],
    );
    assert_eq!(shown.2["webhook-signature"], "v1,***");
    assert_eq!(shown.2["x-api-key"], "***");
    assert!(
        shown.1.contains("access_token=***") && shown.1.contains("page=2"),
        "URL masked: {}",
        shown.1
    );
    let all = format!("{shown:?}");
    for secret_text in ["SECRET", &secret, header(&got[0], "webhook-signature")] {
        assert!(!all.contains(secret_text), "request() shows {secret_text}");
    }

    // The hex style, a test delivery, read as a webhooks_reader.
    let (hex, hex_secret) = subscribe(
        &mut c,
        &rx,
        "/hreqhex",
        "{hreqhex.*}",
        ", signature => 'hex', signature_header => 'X-Sig'",
        json!({"style": "hex", "header": "X-Sig"}),
    );
    let test: i64 = c
        .query_one("SELECT webhooks.send_test($1)", &[&hex])
        .expect("send_test")
        .get(0);
    let got = rx.wait_for_requests("/hreqhex", 1, WAIT);
    assert_eq!(got[0]["verified"], true);
    wait_all(&mut c, hex, 1, "succeeded");
    c.batch_execute("CREATE ROLE obs_reader LOGIN; GRANT webhooks_reader TO obs_reader;")
        .expect("reader role");
    let mut reader = cluster().connect_as("postgres", "obs_reader");
    let shown = request(&mut reader, test);
    assert_same_request(&shown, &got[0], &["x-sig"]);
    assert!(shown.2.get("webhook-signature").is_none());
    assert!(!format!("{shown:?}").contains(&hex_secret));

    // Not attempted yet (paused): what will be sent, signed now; with a rotation's grace,
    // two signatures. Then it is sent, and is what was shown.
    c.execute("SELECT webhooks.pause($1)", &[&sub])
        .expect("pause");
    c.query_one("SELECT webhooks.rotate_secret($1, '1 hour')", &[&sub])
        .expect("rotate");
    c.batch_execute("SELECT webhooks.emit('hreq.later', '{\"n\": 2}')")
        .expect("emit");
    let later: i64 = wait_for("the held delivery", WAIT, || {
        c.query_opt(
            "SELECT id FROM webhooks.deliveries WHERE subscription_id = $1 AND event_type = 'hreq.later'",
            &[&sub],
        )
        .expect("held")
        .map(|r| r.get::<_, i64>(0))
    });
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ahead = request(&mut reader, later);
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ts: u64 = ahead.2["webhook-timestamp"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        before <= ts && ts <= after,
        "signed now: {ts} in [{before}, {after}]"
    );
    assert_eq!(ahead.2["webhook-signature"], "v1,*** v1,***");
    c.execute("SELECT webhooks.resume($1)", &[&sub])
        .expect("resume");
    let got = rx.wait_for_requests("/hreq", 2, WAIT);
    assert_eq!(header(&got[1], "webhook-signature").split(' ').count(), 2);
    let sent = request(&mut reader, later);
    assert_same_request(
        &sent,
        &got[1],
        &["webhook-signature", "x-api-key", "authorization"],
    );
    assert_eq!(sent.3, ahead.3, "the body shown ahead is the body sent");
}

#[test]
fn request_is_for_readers_only_and_refuses_hostile_input() {
    let rx = Receiver::start();
    let mut c = db();
    let (sub, _) = subscribe(&mut c, &rx, "/hpriv", "{hpriv.*}", "", json!({}));
    let id: i64 = c
        .query_one("SELECT webhooks.send_test($1)", &[&sub])
        .expect("send_test")
        .get(0);
    c.batch_execute(
        "CREATE ROLE obs_nobody LOGIN;
         CREATE ROLE obs_reader2 LOGIN; GRANT webhooks_reader TO obs_reader2;",
    )
    .expect("roles");
    let mut nobody = cluster().connect_as("postgres", "obs_nobody");
    for sql in [
        format!("SELECT * FROM webhooks.request({id})"),
        "SELECT * FROM webhooks.subscription_health".to_string(),
        "SELECT * FROM webhooks.event_stats".to_string(),
    ] {
        fails(&mut nobody, &sql, SqlState::INSUFFICIENT_PRIVILEGE);
    }
    let mut reader = cluster().connect_as("postgres", "obs_reader2");
    reader
        .batch_execute(
            "SELECT * FROM webhooks.subscription_health; SELECT * FROM webhooks.event_stats;",
        )
        .expect("a reader reads both views");
    // The function behind request() is not the reader's to call.
    fails(
        &mut reader,
        &format!("SELECT * FROM webhooks._request({id})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut reader,
        "SELECT * FROM webhooks._delivery_stats",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    request(&mut reader, id);
    for (sql, state) in [
        (
            "SELECT * FROM webhooks.request(NULL)",
            SqlState::NO_DATA_FOUND,
        ),
        (
            "SELECT * FROM webhooks.request(-1)",
            SqlState::NO_DATA_FOUND,
        ),
        ("SELECT * FROM webhooks.request(0)", SqlState::NO_DATA_FOUND),
        (
            "SELECT * FROM webhooks.request(9223372036854775807)",
            SqlState::NO_DATA_FOUND,
        ),
        (
            "SELECT * FROM webhooks.request(-9223372036854775808)",
            SqlState::NO_DATA_FOUND,
        ),
        (
            "SELECT * FROM webhooks.request('99999999999999999999')",
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        ),
        (
            "SELECT * FROM webhooks.request('1; DROP TABLE webhooks._queue')",
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
    ] {
        let msg = fails(&mut reader, sql, state);
        assert!(!msg.contains("panic"), "{sql}: {msg}");
    }
    // Its subscription removed: said so, not guessed.
    wait_all(&mut c, sub, 1, "succeeded");
    c.execute("SELECT webhooks.unsubscribe($1)", &[&sub])
        .expect("unsubscribe");
    let msg = fails(
        &mut reader,
        &format!("SELECT * FROM webhooks.request({id})"),
        SqlState::NO_DATA_FOUND,
    );
    assert!(msg.contains("no longer exists"), "{msg}");
}

#[test]
fn an_event_type_too_long_for_an_index_entry_stops_neither_fan_out_nor_recording() {
    // An admin may map a status to any type status_events' check allows, however long; the
    // rollup keyed by type keeps its first 200 characters (an index entry holds 2704 bytes).
    let mut c = db();
    c.batch_execute(
        "CREATE ROLE longtype_admin LOGIN; GRANT webhooks_admin TO longtype_admin;
         CREATE TABLE lt_orders (id int PRIMARY KEY, status text);
         SELECT webhooks.track('lt_orders', entity => 'lt', status_column => 'status');",
    )
    .expect("setup");
    let rx = Receiver::start();
    let (sub, _) = subscribe(&mut c, &rx, "/longtype", "{lt.*,ltafter.*}", "", json!({}));
    let long = format!("lt.{}", "x".repeat(6000));
    let mut admin = cluster().connect_as("postgres", "longtype_admin");
    admin
        .execute("INSERT INTO webhooks.status_events (entity, status, event_type) VALUES ('lt', 'weird', $1)", &[&long])
        .expect("a long event type");
    c.batch_execute("INSERT INTO lt_orders VALUES (1, 'weird')").expect("a write in that status");
    c.batch_execute("SELECT webhooks.emit('ltafter.done', '{}')").expect("an unrelated later event");
    let got = rx.wait_for_requests("/longtype", 3, WAIT);
    let types: Vec<String> = got.iter().map(|r| r["json"]["type"].as_str().unwrap_or_default().to_string()).collect();
    assert!(types.contains(&long) && types.contains(&"ltafter.done".to_string()), "{:?}", types.iter().map(|t| t.len()).collect::<Vec<_>>());
    wait_all(&mut c, sub, 3, "succeeded");
    let kept: i64 = c
        .query_one(
            "SELECT max(length(event_type))::int8 FROM webhooks.event_stats WHERE event_type LIKE 'lt.x%'",
            &[],
        )
        .expect("stats")
        .get(0);
    assert_eq!(kept, 200);
}
