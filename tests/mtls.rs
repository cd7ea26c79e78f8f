//! Mutual TLS end to end (issue #11): a CA, a server certificate and client certificates made
//! by openssl in the test; tests/receiver.py serves HTTPS on 127.0.0.1 and requires a client
//! certificate issued by that CA (Python's ssl, CERT_REQUIRED). The right certificate is
//! accepted; one of another CA, or none, is refused by the receiver, and the attempt's error
//! says so; a subscription's ca_bundle trusts the test CA for that subscription only. The
//! settings are validated at subscribe time and never shown. Subscriptions are made by a
//! webhooks_admin member.

mod common;

use common::{fails, shared_cluster, wait_for, Cluster, Receiver};
use postgres::error::SqlState;
use postgres::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn cluster() -> &'static Cluster {
    static ROLES: std::sync::Once = std::sync::Once::new();
    let cluster = shared_cluster(
        "mtls",
        &[
            "webhooks.retry_schedule = '200ms,400ms'",
            "webhooks.timeout = '5s'",
        ],
    );
    ROLES.call_once(|| {
        cluster
            .connect()
            .batch_execute("CREATE ROLE mtls_admin LOGIN IN ROLE webhooks_admin")
            .expect("roles");
    });
    cluster
}

fn admin() -> Client {
    cluster().connect_as("postgres", "mtls_admin")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("/usr/bin/openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`{name}.pem`, `{name}.key`), P-256 keys.
fn make_ca(dir: &Path, name: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
}

/// A certificate `{name}.pem` with key `{name}.key`, issued by the CA `ca`.
fn make_cert(dir: &Path, ca: &str, name: &str, subject: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server and client certificates of its, and another CA with a client
    /// certificate, in a directory of the test's own (`name`).
    fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("pg_webhooks_mtls_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        make_ca(&dir, "ca", "Test CA A");
        make_ca(&dir, "other_ca", "Test CA B");
        make_cert(
            &dir,
            "ca",
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        let client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
        make_cert(&dir, "ca", "client", "/O=Shop/CN=shop-client", client_ext);
        make_cert(&dir, "other_ca", "intruder", "/CN=intruder", client_ext);
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn pem(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).expect("pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn subscribe(c: &mut Client, url: &str, pattern: &str, tls: Option<Value>) -> i64 {
    c.query_one(
        "SELECT id FROM webhooks.subscribe($1, ARRAY[$2], tls => $3::text::jsonb)",
        &[&url, &pattern, &tls.map(|t| t.to_string())],
    )
    .expect("subscribe")
    .get(0)
}

/// (status, attempts' errors) of the subscription's first delivery, once it has ended.
fn outcome(c: &mut Client, sub: i64) -> (String, Vec<Option<String>>) {
    let id: i64 = wait_for("a delivery", WAIT, || {
        c.query_opt(
            "SELECT min(id) FROM webhooks.deliveries WHERE subscription_id = $1 HAVING count(*) > 0",
            &[&sub],
        )
        .expect("deliveries")
        .map(|r| r.get(0))
    });
    ended(c, id)
}

/// (status, attempts' errors) of a delivery, once it has ended.
fn ended(c: &mut Client, id: i64) -> (String, Vec<Option<String>>) {
    let status = wait_for("the delivery to end", WAIT, || {
        c.query_opt(
            "SELECT status FROM webhooks.deliveries WHERE id = $1 AND status IN ('succeeded', 'dead')",
            &[&id],
        )
        .expect("deliveries")
        .map(|r| r.get::<_, String>(0))
    });
    let errors = c
        .query(
            "SELECT error FROM webhooks.attempts WHERE delivery_id = $1 ORDER BY attempt",
            &[&id],
        )
        .expect("attempts")
        .iter()
        .map(|r| r.get(0))
        .collect();
    (status, errors)
}

#[test]
fn client_certificates_are_shown_per_subscription_and_refusals_are_said_plainly() {
    let pki = Pki::new("e2e");
    let rx = Receiver::start_mtls(
        &pki.path("server.pem"),
        &pki.path("server.key"),
        &pki.path("ca.pem"),
    );
    let port = rx.tls_port.expect("HTTPS port");
    let url = |p: &str| format!("https://127.0.0.1:{port}{p}");
    let mut c = admin();
    let good = json!({"client_certificate": pki.pem("client.pem"), "client_key": pki.pem("client.key"), "ca_bundle": pki.pem("ca.pem")});
    let wrong = json!({"client_certificate": pki.pem("intruder.pem"), "client_key": pki.pem("intruder.key"), "ca_bundle": pki.pem("ca.pem")});
    let none = json!({"ca_bundle": pki.pem("ca.pem")});
    let s_good = subscribe(&mut c, &url("/good"), "mtls.*", Some(good.clone()));
    let s_wrong = subscribe(&mut c, &url("/wrong"), "mtls.*", Some(wrong));
    let s_none = subscribe(&mut c, &url("/none"), "mtls.*", Some(none));
    let s_plain = subscribe(&mut c, &url("/plain"), "mtls.*", None);

    cluster()
        .connect()
        .batch_execute("SELECT webhooks.emit('mtls.ping', '{\"n\": 1}')")
        .expect("emit");

    // The right certificate: delivered, and the receiver saw who it was.
    let (status, errors) = outcome(&mut c, s_good);
    assert_eq!(status, "succeeded", "{errors:?}");
    let log = rx.wait_for_requests("/good", 1, WAIT);
    assert_eq!(log[0]["client_subject"], "shop-client");

    // A certificate of another CA: refused by the receiver, every attempt says so.
    let (status, errors) = outcome(&mut c, s_wrong);
    assert_eq!(status, "dead");
    assert_eq!(errors.len(), 3, "{errors:?}");
    for e in &errors {
        let e = e.as_deref().unwrap_or_default();
        assert!(
            e.contains("the server refused the client certificate"),
            "{e}"
        );
    }
    // No certificate: the receiver requires one.
    let (status, errors) = outcome(&mut c, s_none);
    assert_eq!(status, "dead");
    for e in &errors {
        let e = e.as_deref().unwrap_or_default();
        assert!(
            e.contains("requires a client certificate and none was sent"),
            "{e}"
        );
    }
    // Without the subscription's CA bundle the test CA is not trusted.
    let (status, errors) = outcome(&mut c, s_plain);
    assert_eq!(status, "dead");
    for e in &errors {
        let e = e.as_deref().unwrap_or_default();
        assert!(e.contains("TLS certificate verification failed"), "{e}");
    }
    for path in ["/wrong", "/none", "/plain"] {
        assert!(rx.log(path).is_empty(), "{path}: no request got through");
    }
    let failures = rx.tls_failures();
    assert!(
        failures.len() >= 9,
        "the receiver refused the handshakes: {failures:?}"
    );

    // The view shows who the certificate is, never the key.
    let row = c
        .query_one(
            "SELECT tls, row_to_json(s)::text FROM webhooks.subscriptions s WHERE id = $1",
            &[&s_good],
        )
        .expect("view");
    let tls: Value = row.get(0);
    assert_eq!(
        tls["client_certificate"]["subject"], "O=Shop, CN=shop-client",
        "{tls}"
    );
    assert_eq!(tls["client_certificate"]["issuer"], "CN=Test CA A", "{tls}");
    assert!(
        tls["client_certificate"]["not_after"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{tls}"
    );
    assert_eq!(tls["ca_bundle"]["certificates"], 1, "{tls}");
    let text: String = row.get(1);
    let key_body: String = pki
        .pem("client.key")
        .lines()
        .nth(1)
        .unwrap_or("?")
        .to_string();
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains(&key_body),
        "{text}"
    );

    // The wrong subscription gets the right certificate: the worker makes its connection
    // anew, and a redelivery goes through.
    c.execute(
        "SELECT webhooks.set_tls($1, $2::text::jsonb)",
        &[&s_wrong, &good.to_string()],
    )
    .expect("set_tls");
    let dead: i64 = c
        .query_one(
            "SELECT id FROM webhooks.deliveries WHERE subscription_id = $1",
            &[&s_wrong],
        )
        .expect("delivery")
        .get(0);
    let again: i64 = c
        .query_one("SELECT webhooks.redeliver($1)", &[&dead])
        .expect("redeliver")
        .get(0);
    let (status, errors) = ended(&mut c, again);
    assert_eq!(status, "succeeded", "{errors:?}");
    let log = rx.wait_for_requests("/wrong", 1, WAIT);
    assert_eq!(log[0]["client_subject"], "shop-client");

    // Removing the settings: the public roots again, which do not know the test CA.
    c.execute("SELECT webhooks.set_tls($1, NULL)", &[&s_good])
        .expect("clear");
    let tls: Option<Value> = c
        .query_one(
            "SELECT tls FROM webhooks.subscriptions WHERE id = $1",
            &[&s_good],
        )
        .expect("view")
        .get(0);
    assert_eq!(tls, None);
    let test: i64 = c
        .query_one("SELECT webhooks.send_test($1)", &[&s_good])
        .expect("send_test")
        .get(0);
    let (status, errors) = ended(&mut c, test);
    assert_eq!(status, "dead", "{errors:?}");
    assert!(
        errors.iter().all(|e| e
            .as_deref()
            .unwrap_or_default()
            .contains("TLS certificate verification failed")),
        "{errors:?}"
    );
}

#[test]
fn tls_settings_are_validated_at_subscribe_time_without_echoing_keys() {
    let pki = Pki::new("validation");
    let mut c = admin();
    let before: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks.subscriptions WHERE url LIKE 'http%://127.0.0.1:9/x'",
            &[],
        )
        .expect("count")
        .get(0);
    let key = pki.pem("client.key");
    let cert = pki.pem("client.pem");
    let key_line = key.lines().nth(1).unwrap_or("?").to_string();
    let broken_key = key.replace(&key_line, &key_line.chars().rev().collect::<String>());
    let cases = [
        (
            json!({"client_certificate": cert, "client_key": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"}),
            "\"client_key\"",
        ),
        (
            json!({"client_certificate": cert, "client_key": broken_key}),
            "\"client_key\"",
        ),
        (
            json!({"client_certificate": cert, "client_key": pki.pem("intruder.key")}),
            "\"client_key\" is not the key of \"client_certificate\"",
        ),
        (
            json!({"client_certificate": "hello", "client_key": key}),
            "\"client_certificate\" has no PEM certificate",
        ),
        (
            json!({"client_certificate": key, "client_key": key}),
            "\"client_certificate\" has no PEM certificate",
        ),
        (json!({"client_certificate": cert}), "go together"),
        (json!({"client_key": key}), "go together"),
        (
            json!({"ca_bundle": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
            "\"ca_bundle\"",
        ),
        (json!({"ca_bundle": 42}), "\"ca_bundle\" must be a string"),
        (json!({"ca": cert}), "unknown key \"ca\""),
        (json!({}), "names nothing"),
        (json!(["x"]), "must be a JSON object"),
        (json!({"ca_bundle": "A".repeat(2 << 20)}), "at most"),
    ];
    for (tls, want) in &cases {
        let err = c
            .query_one(
                "SELECT id FROM webhooks.subscribe('https://127.0.0.1:9/x', tls => $1::text::jsonb)",
                &[&tls.to_string()],
            )
            .expect_err(want);
        let db = err.as_db_error().expect("db error");
        assert_eq!(
            db.code(),
            &SqlState::INVALID_PARAMETER_VALUE,
            "{want}: {}",
            db.message()
        );
        assert!(db.message().contains(want), "{want}: {}", db.message());
        let shown = format!("{} {}", db.message(), db.hint().unwrap_or_default());
        assert!(
            !shown.contains(&key_line) && !shown.contains("not a key"),
            "{shown}"
        );
    }
    let e = fails(
        &mut c,
        &format!(
            "SELECT webhooks.subscribe('http://127.0.0.1:9/x', tls => '{}')",
            json!({"ca_bundle": pki.pem("ca.pem")})
        ),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(e.contains("https:// URLs only"), "{e}");
    let after: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks.subscriptions WHERE url LIKE 'http%://127.0.0.1:9/x'",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(after, before, "nothing was written");
    // set_tls refuses the same way and leaves the settings as they were.
    let id = subscribe(
        &mut c,
        "https://127.0.0.1:9/ok",
        "mtlsbad.*",
        Some(json!({"ca_bundle": pki.pem("ca.pem")})),
    );
    let err = c
        .execute(
            "SELECT webhooks.set_tls($1, $2::text::jsonb)",
            &[&id, &json!({"client_certificate": cert}).to_string()],
        )
        .expect_err("no key");
    assert_eq!(
        err.as_db_error().map(|d| d.code().clone()),
        Some(SqlState::INVALID_PARAMETER_VALUE)
    );
    let tls: Value = c
        .query_one(
            "SELECT tls FROM webhooks.subscriptions WHERE id = $1",
            &[&id],
        )
        .expect("view")
        .get(0);
    assert_eq!(tls, json!({"ca_bundle": {"certificates": 1}}));
}
