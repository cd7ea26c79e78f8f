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
