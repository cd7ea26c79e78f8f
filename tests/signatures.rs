//! Signature styles end to end (issue #11): `hmac` with its options (GitHub's
//! `X-Hub-Signature-256: sha256=<hex>`, Shopify's base64 `X-Shopify-Hmac-Sha256`, a signed
//! `timestamp.body` with an ISO 8601 or unix timestamp), Stripe's `t=…,v1=…`, secrets the
//! subscriber brings, rotation to a brought secret, `set_signature`, and the masking of all of
//! it. Every signature is checked by tests/verify_signatures.py (Python hmac, Node crypto),
//! never by our Rust; subscriptions are made by a webhooks_admin member, not a superuser.

mod common;

use common::{fails, shared_cluster, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn cluster() -> &'static Cluster {
    static ROLES: std::sync::Once = std::sync::Once::new();
    let cluster = shared_cluster("signatures", &["webhooks.retry_schedule = '200ms,400ms'"]);
    ROLES.call_once(|| {
        cluster
            .connect()
            .batch_execute("CREATE ROLE sig_admin LOGIN IN ROLE webhooks_admin")
            .expect("roles");
    });
    cluster
}

fn admin() -> Client {
    cluster().connect_as("postgres", "sig_admin")
}

fn subscribe(c: &mut Client, url: &str, pattern: &str, extra: &str) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT id, secret FROM webhooks.subscribe($1, ARRAY[$2]{extra})"),
            &[&url, &pattern],
        )
        .expect("subscribe");
    (row.get(0), row.get(1))
}

/// Verifies each case with tests/verify_signatures.py; returns its verdicts by name.
fn verify(cases: &[Value]) -> serde_json::Map<String, Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/verify_signatures.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run verify_signatures.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::Array(cases.to_vec()).to_string().as_bytes())
        .expect("write cases");
    let out = child.wait_with_output().expect("verify_signatures.py");
    assert!(out.status.success(), "verify_signatures.py failed");
    match serde_json::from_slice(&out.stdout).expect("verdicts") {
        Value::Object(m) => m,
        other => panic!("verdicts: {other}"),
    }
}

/// The case for the one request `path` received.
fn case(rx: &Receiver, path: &str, check: &str, secret: &str) -> Value {
    let log = rx.wait_for_requests(path, 1, WAIT);
    json!({
        "name": path, "check": check, "secret": secret,
        "headers": log[0]["headers"], "body": log[0]["body"],
    })
}

#[test]
fn each_style_verifies_as_its_platform_documents() {
    let mut c = admin();
    let rx = Receiver::start();
    let github = r#"{"header": "X-Hub-Signature-256", "prefix": "sha256="}"#;
    let shopify = r#"{"header": "X-Shopify-Hmac-Sha256", "encoding": "base64"}"#;
    let iso = r#"{"header": "X-Signature", "signed": "timestamp.body", "timestamp_header": "X-Webhook-Timestamp", "timestamp_format": "iso8601"}"#;
    let unix = r#"{"header": "X-Signature", "signed": "timestamp.body", "encoding": "base64", "prefix": "v1="}"#;
    let subs = [
        (
            "/github",
            "github",
            "hmac",
            "gh-webhook-secret",
            Some(github),
        ),
        (
            "/shopify",
            "shopify",
            "hmac",
            "shpss_0123456789abcdef",
            Some(shopify),
        ),
        (
            "/iso",
            "iso_ts",
            "hmac",
            "it's a \"quoted\" secret",
            Some(iso),
        ),
        (
            "/unix",
            "unix_ts",
            "hmac",
            "unix-ts-secret-ünïcode",
            Some(unix),
        ),
        (
            "/stripe",
            "stripe",
            "stripe",
            "whsec_stripe_test_0123456789",
            None,
        ),
        ("/seed002", "seed002", "hex", "your_secret_key", None),
    ];
    for (path, _, style, secret, options) in subs {
        let (_, returned) = c
            .query_one(
                "SELECT id, secret FROM webhooks.subscribe($1, '{sigstyle.*}', signature => $2,
                        secret => $3, signature_options => $4::text::jsonb)",
                &[&rx.url(path), &style, &secret, &options],
            )
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
            .expect("subscribe");
        assert_eq!(
            returned, secret,
            "subscribe returns the secret it was given"
        );
    }
    // Standard Webhooks with a brought secret: the receiver checks it with the official library.
    let standard = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    rx.configure(json!({"path": "/standard", "secret": standard}));
    subscribe(
        &mut c,
        &rx.url("/standard"),
        "sigstyle.*",
        &format!(", secret => '{standard}'"),
    );

    let mut app = cluster().connect();
    app.batch_execute(
        r#"SELECT webhooks.emit('sigstyle.paid', '{"total": 59.90, "note": "crème brûlée \"x\"", "n": [1, 2.50]}', 'k1')"#,
    )
    .expect("emit");

    let cases: Vec<Value> = subs
        .iter()
        .map(|(path, check, _, secret, _)| case(&rx, path, check, secret))
        .collect();
    let verdicts = verify(&cases);
    for (path, ..) in subs {
        assert_eq!(
            verdicts[path],
            json!(true),
            "{path}: {verdicts:?} {cases:?}"
        );
    }
    let log = rx.wait_for_requests("/standard", 1, WAIT);
    assert_eq!(
        log[0]["verified"],
        json!(true),
        "{}",
        log[0]["verify_error"]
    );

    // What each platform's receiver reads besides the signature.
    let iso_req = &rx.log("/iso")[0]["headers"];
    let ts = iso_req["x-webhook-timestamp"]
        .as_str()
        .expect("iso timestamp");
    assert!(ts.ends_with('Z') && ts.len() == 20, "{ts}");
    let stripe = rx.log("/stripe")[0]["headers"]["stripe-signature"].clone();
    let stripe = stripe.as_str().expect("stripe header");
    let webhook_ts = rx.log("/stripe")[0]["headers"]["webhook-timestamp"].clone();
    assert!(
        stripe.starts_with(&format!("t={},v1=", webhook_ts.as_str().unwrap_or("?"))),
        "{stripe}"
    );
    assert_eq!(stripe.matches("v1=").count(), 1, "one secret, one v1");
    assert!(rx.log("/github")[0]["headers"]["x-hub-signature-256"]
        .as_str()
        .is_some_and(|s| s.starts_with("sha256=") && s.len() == 71));
}

#[test]
fn rotation_to_a_brought_secret_and_a_new_style() {
    let mut c = admin();
    let rx = Receiver::start();
    let (sub, _) = subscribe(
        &mut c,
        &rx.url("/rot/1"),
        "sigrot.*",
        ", signature => 'stripe', secret => 'whsec_old_secret_1234'",
    );
    let new: String = c
        .query_one(
            "SELECT webhooks.rotate_secret($1, '1 hour', secret => 'whsec_new_secret_5678')",
            &[&sub],
        )
        .expect("rotate")
        .get(0);
    assert_eq!(new, "whsec_new_secret_5678");
    let mut app = cluster().connect();
    app.batch_execute("SELECT webhooks.emit('sigrot.one', '{\"n\": 1}')")
        .expect("emit");
    let log = rx.wait_for_requests("/rot/1", 1, WAIT);
    let header = log[0]["headers"]["stripe-signature"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        header.matches("v1=").count(),
        2,
        "both live secrets sign: {header}"
    );
    let cases = [
        json!({"name": "new", "check": "stripe", "secret": "whsec_new_secret_5678", "headers": log[0]["headers"], "body": log[0]["body"]}),
        json!({"name": "old", "check": "stripe_old", "secret": "whsec_old_secret_1234", "headers": log[0]["headers"], "body": log[0]["body"]}),
    ];
    let verdicts = verify(&cases);
    assert_eq!(verdicts["new"], json!(true), "{}", verdicts["new"]);
    assert_eq!(verdicts["old"], json!(true), "{}", verdicts["old"]);

    // The same subscription now signs as GitHub does, with its newest secret; the view shows
    // the new style and its options.
    c.execute(
        "SELECT webhooks.set_signature($1, 'hmac', signature_options => '{\"header\": \"X-Hub-Signature-256\", \"prefix\": \"sha256=\"}')",
        &[&sub],
    )
    .expect("set_signature");
    let row = c
        .query_one(
            "SELECT signature, signature_header, signature_options FROM webhooks.subscriptions WHERE id = $1",
            &[&sub],
        )
        .expect("view");
    assert_eq!(row.get::<_, String>(0), "hmac");
    assert_eq!(row.get::<_, String>(1), "X-Hub-Signature-256");
    let options: Value = row.get(2);
    assert_eq!(options["prefix"], "sha256=");
    assert_eq!(options["encoding"], "hex");
    app.batch_execute("SELECT webhooks.emit('sigrot.two', '{\"n\": 2}')")
        .expect("emit");
    let log = rx.wait_for_requests("/rot/1", 2, WAIT);
    let cases = [
        json!({"name": "gh", "check": "github", "secret": "whsec_new_secret_5678", "headers": log[1]["headers"], "body": log[1]["body"]}),
    ];
    assert_eq!(verify(&cases)["gh"], json!(true));
    assert!(log[1]["headers"].get("stripe-signature").is_none());

    // Back to standard: the brought secrets are not whsec_ base64 of 24+ bytes, refused.
    let e = fails(
        &mut c,
        &format!("SELECT webhooks.set_signature({sub}, 'standard')"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(
        e.contains("cannot sign with signature => 'standard'"),
        "{e}"
    );
    assert!(
        !e.contains("whsec_new_secret_5678") && !e.contains("whsec_old"),
        "{e}"
    );
}

#[test]
fn secrets_and_signatures_never_leave() {
    let mut c = admin();
    let secret = "never-shown-Secret-1729";
    let (sub, _) = subscribe(
        &mut c,
        "http://127.0.0.1:9/never",
        "signever.*",
        &format!(", signature => 'hmac', secret => '{secret}', signature_options => '{{\"prefix\": \"sha256=\", \"timestamp_header\": \"X-Ts\", \"signed\": \"timestamp.body\"}}'"),
    );
    let (stripe_sub, _) = subscribe(
        &mut c,
        "http://127.0.0.1:9/never2",
        "signever.*",
        &format!(", signature => 'stripe', secret => '{secret}'"),
    );
    c.batch_execute(&format!(
        "SELECT webhooks.pause({sub}); SELECT webhooks.pause({stripe_sub})"
    ))
    .expect("pause");
    let row: Value = c
        .query_one(
            "SELECT json_agg(s)::jsonb FROM webhooks.subscriptions s WHERE id IN ($1, $2)",
            &[&sub, &stripe_sub],
        )
        .expect("view")
        .get(0);
    assert!(!row.to_string().contains(secret), "{row}");
    // The admin cannot read the secrets table.
    let e = fails(
        &mut c,
        "SELECT * FROM webhooks._secrets",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    assert!(e.contains("permission denied"), "{e}");

    // request() shows how the request is signed, never the signature.
    let mut app = cluster().connect();
    app.batch_execute("SELECT webhooks.emit('signever.x', '{}')")
        .expect("emit");
    let deliveries: Vec<i64> = common::wait_for("two deliveries", WAIT, || {
        let ids: Vec<i64> = c
            .query(
                "SELECT id FROM webhooks.deliveries WHERE subscription_id IN ($1, $2) ORDER BY subscription_id",
                &[&sub, &stripe_sub],
            )
            .expect("deliveries")
            .iter()
            .map(|r| r.get(0))
            .collect();
        (ids.len() == 2).then_some(ids)
    });
    let headers = |c: &mut Client, d: i64| -> Value {
        c.query_one("SELECT headers FROM webhooks.request($1)", &[&d])
            .expect("request")
            .get(0)
    };
    let hmac = headers(&mut c, deliveries[0]);
    assert_eq!(hmac["x-webhook-signature"], "sha256=***", "{hmac}");
    assert_eq!(hmac["x-ts"], hmac["webhook-timestamp"], "{hmac}");
    let stripe = headers(&mut c, deliveries[1]);
    let ts = stripe["webhook-timestamp"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    assert_eq!(
        stripe["stripe-signature"],
        format!("t={ts},v1=***"),
        "{stripe}"
    );

    // A refused call's error and the server log hold no secret (the secret travels as a bind
    // parameter, which PostgreSQL does not log by default).
    let bad = format!("{secret}\n");
    let err = c
        .query_one(
            "SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/x', signature => 'hmac', secret => $1)",
            &[&bad],
        )
        .expect_err("control character");
    let db = err.as_db_error().expect("db error");
    assert_eq!(db.code(), &SqlState::INVALID_PARAMETER_VALUE);
    assert!(!db.message().contains(secret), "{}", db.message());
    let err = c
        .query_one(
            "SELECT webhooks.rotate_secret($1, '0', secret => $2)",
            &[&sub, &"short"],
        )
        .expect_err("short");
    assert_eq!(
        err.as_db_error().map(|d| d.code().clone()),
        Some(SqlState::INVALID_PARAMETER_VALUE)
    );
    assert!(
        !cluster().server_log().contains(secret),
        "the server log has the secret"
    );
}

#[test]
fn bad_signature_settings_are_refused_and_nothing_is_written() {
    let mut c = admin();
    let count = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM webhooks.subscriptions WHERE url = 'http://127.0.0.1:9/bad'",
            &[],
        )
        .expect("count")
        .get(0)
    };
    let before = count(&mut c);
    let sub = "SELECT webhooks.subscribe('http://127.0.0.1:9/bad'";
    let cases = [
        (format!("{sub}, signature => 'rot13')"), "signature must be 'standard', 'hex', 'hmac' or 'stripe'"),
        (format!("{sub}, signature => NULL)"), "signature must be"),
        (format!("{sub}, signature_options => '{{}}')"), "applies to signature => 'hmac' only"),
        (format!("{sub}, signature => 'hex', signature_options => '{{}}')"), "applies to signature => 'hmac' only"),
        (format!("{sub}, signature => 'stripe', signature_options => '{{}}')"), "applies to signature => 'hmac' only"),
        (format!("{sub}, signature_header => 'X-Sig')"), "signature_header applies to"),
        (format!("{sub}, signature => 'hmac', signature_options => '[1]')"), "must be a JSON object"),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"algo\": \"sha1\"}}')"), "unknown key \"algo\""),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"encoding\": \"base32\"}}')"), "\"encoding\" must be"),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"encoding\": null}}')"), "\"encoding\" must be a string"),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"header\": \"X-A\\r\\nX-B: c\"}}')"), "invalid header name"),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"header\": \"Content-Type\"}}')"), "set by pg_webhooks"),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"prefix\": \"{}\"}}')", "p".repeat(65)), "\"prefix\""),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"signed\": \"headers\"}}')"), "\"signed\" must be"),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"timestamp_format\": \"iso8601\"}}')"), "needs a \"timestamp_header\""),
        (format!("{sub}, signature => 'hmac', signature_options => '{{\"timestamp_header\": \"X-Webhook-Signature\"}}')"), "must differ"),
        (format!("{sub}, signature => 'hmac', signature_header => 'X-A', signature_options => '{{\"header\": \"X-B\"}}')"), "different headers"),
        (format!("{sub}, signature => 'hmac', signature_options => '{}{}')", "[".repeat(5000), "]".repeat(5000)), "must be a JSON object"),
        (format!("{sub}, signature => 'hex', signature_header => 'bad header')"), "invalid header name"),
        (format!("{sub}, signature => 'hex', secret => 'short')"), "8 to 1024 bytes"),
        (format!("{sub}, signature => 'hmac', secret => '{}')", "s".repeat(1025)), "8 to 1024 bytes"),
        (format!("{sub}, signature => 'hmac', secret => E'tab\\tinside')"), "control character"),
        (format!("{sub}, secret => 'not-a-whsec-secret')"), "does not start with \"whsec_\""),
        (format!("{sub}, secret => 'whsec_aGVsbG8=')"), "24 to 64 bytes"),
        (format!("{sub}, secret => 'whsec_***not base64***')"), "not valid base64"),
        ("SELECT webhooks.subscribe(NULL, delivery => 'poll', secret => 'a-poll-secret')".into(), "apply to push subscriptions only"),
        ("SELECT webhooks.subscribe(NULL, delivery => 'poll', signature_options => '{}')".into(), "apply to push subscriptions only"),
    ];
    for (sql, want) in &cases {
        let e = fails(&mut c, sql, SqlState::INVALID_PARAMETER_VALUE);
        assert!(e.contains(want), "{sql}: {e}");
        for secret in ["not-a-whsec-secret", "tab\tinside", "***not base64***"] {
            assert!(!e.contains(secret), "{sql} echoes the secret: {e}");
        }
    }
    assert_eq!(count(&mut c), before, "nothing was written");

    // set_signature validates the same way and changes nothing when it refuses.
    let (id, _) = subscribe(
        &mut c,
        "http://127.0.0.1:9/ok",
        "sigbad.*",
        ", signature => 'hex'",
    );
    let e = fails(
        &mut c,
        &format!(
            "SELECT webhooks.set_signature({id}, 'hmac', signature_options => '{{\"nope\": 1}}')"
        ),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(e.contains("unknown key"), "{e}");
    let e = fails(
        &mut c,
        "SELECT webhooks.set_signature(999999999, 'hex')",
        SqlState::NO_DATA_FOUND,
    );
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(
        &mut c,
        &format!("SELECT webhooks.rotate_secret({id}, '1 hour', secret => 'x')"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(e.contains("8 to 1024"), "{e}");
    let row = c
        .query_one("SELECT signature, signature_header, signature_options FROM webhooks.subscriptions WHERE id = $1", &[&id])
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "hex");
    assert_eq!(row.get::<_, String>(1), "X-Webhook-Signature");
    assert_eq!(row.get::<_, Option<Value>>(2), None);
}
