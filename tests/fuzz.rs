//! SQL API fuzz (issue #10): hostile values into every argument of every public function (and
//! the `status_events` table), as `webhooks_admin` and as a plain application role. Each call
//! succeeds sensibly or fails with a clear SQLSTATE outside class XX, changes nothing when it
//! fails, and never takes the backend down. Seeded: the seed is printed, `FUZZ_SEED=<n>`
//! replays a run. Also: `track` on a schema, table and columns whose names need quoting.
//!
//! The cluster's workers serve another database, so nothing but the calls changes the tables
//! fingerprinted here.

mod common;

use common::{events, shared_cluster, Cluster};
use postgres::Client;
use serde_json::json;

fn cluster() -> &'static Cluster {
    shared_cluster("fuzz", &["webhooks.database = 'elsewhere'"])
}

/// xorshift64*: enough randomness for picking cases, replayable from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Regclass,
    Text,
    Name,
    Jsonb,
    TextArray,
    Bigint,
    Interval,
    Timestamptz,
    Url,
    /// A subscription's request shape (jsonb).
    Shape,
}

/// Hostile values every argument gets (as text, cast to the argument's type by the server).
fn common_values() -> Vec<Option<String>> {
    let big = "x".repeat(1 << 20);
    let mut v: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some(" ".into()),
        Some("'".into()),
        Some("''".into()),
        Some("\\".into()),
        Some("\\'".into()),
        Some("'; DROP TABLE fuzz_victim; --".into()),
        Some("\"; DROP TABLE fuzz_victim; --".into()),
        Some("$$; DROP TABLE fuzz_victim; $$".into()),
        Some("$x$".into()),
        Some("%s %I %L %%".into()),
        Some("a\0b".into()),
        Some("E'\\x00'".into()),
        Some("\\x00".into()),
        Some(big.clone()),
        Some(format!("'{big}")),
        Some("\u{202E}gro.live\u{200F}".into()),
        Some("😀🛒📦".into()),
        Some("e\u{301}\u{301}\u{301}".into()),
        Some("\u{FEFF}order".into()),
        Some("NULL".into()),
        Some("null".into()),
        Some("*".into()),
        Some("order.*".into()),
        Some("{}".into()),
        Some("[]".into()),
        Some("{\"a\": \"\\u0000\"}".into()),
        Some("{\"a\": \"\\ud800\"}".into()),
        Some("{\"\\ud83d\\ude00\": \"\\udfff\"}".into()),
        Some("{\"a\": 1e999999}".into()),
        Some("-1".into()),
        Some("0".into()),
        Some("9223372036854775807".into()),
        Some("-9223372036854775808".into()),
        Some("99999999999999999999999".into()),
        Some("-1 day".into()),
        Some("infinity".into()),
        Some("-infinity".into()),
        Some("1000000 years".into()),
        Some("pg_catalog.pg_class".into()),
        Some("webhooks._secrets".into()),
        Some("\"Order Lines\"".into()),
        Some("\"select\"".into()),
        Some("MixedCase".into()),
        Some("\r\n".into()),
    ];
    v.push(Some("a".repeat(64)));
    v
}

/// Values aimed at one kind of argument.
fn kind_values(kind: Kind) -> Vec<Option<String>> {
    let s = |x: &str| Some(x.to_string());
    match kind {
        Kind::Url => vec![
            s("https://example.com/\r\nX-Injected: 1"),
            s("https://example.com/a\nb"),
            s("https://user:p%40ss@example.com/hook"),
            s("https://user:pass@127.0.0.1/hook"),
            s("https://[::1]/hook"),
            s("https://[::ffff:169.254.169.254]/hook"),
            s("https://[fe80::1%25eth0]/hook"),
            s("https://[::1/hook"),
            s("https://bücher.example/hook"),
            s("https://xn--bcher-kva.example/hook"),
            s("https://例え.テスト/フック"),
            s("https://example.com:0/"),
            s("https://example.com:99999/"),
            s("https://169.254.169.254/latest/meta-data"),
            s("javascript:alert(1)"),
            s("file:///etc/passwd"),
            s("gopher://example.com/"),
            s("https://"),
            s("https:///path"),
            s("//example.com/"),
            s("https://example.com/\u{0}"),
            s(&format!("https://example.com/{}", "a".repeat(1 << 20))),
            s("https://exa mple.com/"),
            s("https://example.com/#frag"),
            s("HTTPS://EXAMPLE.COM/"),
        ],
        Kind::TextArray => vec![
            s("{}"),
            s("{NULL}"),
            s("{\"\"}"),
            s("{*,*}"),
            s("{\"order.*\",\"'; DROP TABLE fuzz_victim; --\"}"),
            s("{\"a\\\"b\"}"),
            s("{{order.created}}"),
            s("{order.}"),
            s("{.created}"),
            s("{order.*.x}"),
            s("{ORDER.CREATED}"),
            s("{\"order.créé\"}"),
            s(&format!("{{{}}}", vec!["order.created"; 10_000].join(","))),
            s("not an array"),
        ],
        Kind::Jsonb => vec![
            s("\"string\""),
            s("42"),
            s("true"),
            s("{\"a\": {\"b\": [1, 2, {\"c\": null}]}}"),
            s("{\"Authorization\": \"Bearer x\\r\\nX-Evil: 1\"}"),
            s("{\"Host\": \"evil.example\"}"),
            s("{\"X-A\": 1}"),
            s("{\"bad header\": \"v\"}"),
            s("{\"items\": {\"table\": \"pg_authid\", \"foreign_key\": \"oid\"}}"),
            s("{\"items\": {\"table\": \"'; DROP TABLE fuzz_victim; --\", \"foreign_key\": \"id\"}}"),
            s("{\"items\": {\"table\": \"fuzz_items\", \"foreign_key\": \"\\\"; DROP TABLE x; --\"}}"),
            s("{\"items\": {\"table\": \"fuzz_items\", \"foreign_key\": \"order_id\"}}"),
            s("{\"items\": {\"table\": \"fuzz_orders\", \"foreign_key\": \"id\"}}"),
            s(&format!("{{\"deep\": {}1{}}}", "[".repeat(5000), "]".repeat(5000))),
            s(&format!("{{\"k\": \"{}\"}}", "v".repeat(1 << 20))),
            s("{\"a\": \"\\u202e\\u0301\"}"),
            s("{"),
            // signature_options and tls
            s("{\"header\": \"X-A\\r\\nX-B: 1\"}"),
            s("{\"encoding\": \"base64\", \"timestamp_format\": \"iso8601\"}"),
            s("{\"signed\": \"timestamp.body\", \"timestamp_header\": \"webhook-signature\"}"),
            s("{\"prefix\": \"\\u0000\"}"),
            s("{\"client_certificate\": \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\", \"client_key\": \"-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\\n\"}"),
            s(&format!("{{\"ca_bundle\": \"-----BEGIN CERTIFICATE-----\\n{}\\n-----END CERTIFICATE-----\\n\"}}", "A".repeat(1 << 20))),
            s("{\"ca_bundle\": \"-----BEGIN CERTIFICATE-----\\n-----END CERTIFICATE-----\\n\"}"),
            s("{\"client_key\": \"x\"}"),
        ],
        Kind::Shape => {
            let mut v = vec![
                s("{\"event_names\": {\"order.created\": \"ORDER\\r\\nX-Evil: 1\"}}"),
                s("{\"event_names\": {\"order.created\": \"\"}}"),
                s("{\"event_names\": {\"\": \"X\"}}"),
                s("{\"event_names\": [\"order.created\"]}"),
                s("{\"event_names\": {\"order.created\": null}}"),
                s("{\"event_type_header\": \"Webhook-Signature\"}"),
                s("{\"event_type_header\": \"Host\"}"),
                s("{\"event_type_header\": \"Authorization\"}"),
                s("{\"delivery_id_header\": \"X-A\\r\\nX-B\"}"),
                s("{\"delivery_id_header\": \"\"}"),
                s("{\"event_type_header\": \"X-A\", \"delivery_id_header\": \"x-a\"}"),
                s("{\"json\": \"python\"}"),
                s("{\"json\": null}"),
                s("{\"body\": \"{{ data\"}"),
                s("{\"body\": \"{{ pg_read_file('/etc/passwd') }}\"}"),
                s("{\"body\": \"{{ data | nope }}\"}"),
                s("{\"body\": \"{{ data.x | iso8601('+99:00') }}\"}"),
                s("{\"body\": \"{{ data[99999999999999999999] }}\"}"),
                s("{\"body\": \"{{ data.x | default('a', 'b') }}\"}"),
                s("{\"body\": {\"$each\": \"{{ data.items }}\"}}"),
                s("{\"body\": {\"$eval\": \"1+1\"}}"),
                s("{\"body\": {\"$merge\": 1}}"),
                s("{\"body\": {\"$literal\": 1, \"x\": 2}}"),
                s("{\"body\": {\"a\": \"}}\"}}"),
                s("{\"body\": \"{{ '\\u0000' }}\"}"),
                s("{\"unknown\": 1}"),
                s("[]"),
                s("\"{{ data }}\""),
            ];
            v.push(s(&format!("{{\"body\": {}1{}}}", "[".repeat(40), "]".repeat(40))));
            v.push(s(&format!("{{\"body\": \"{}\"}}", "{{ data }}".repeat(10_000))));
            v.push(s(&format!(
                "{{\"event_names\": {{{}}}}}",
                (0..1500).map(|i| format!("\"order.e{i}\": \"E{i}\"")).collect::<Vec<_>>().join(",")
            )));
            v
        }
        Kind::Interval => vec![
            s("1 second"),
            s("0"),
            s("-1 day"),
            s("infinity"),
            s("P1D"),
            s("1 ms"),
            s("0.5 ms"),
            s("10 minutes 1 second"),
            s("178000000 years"),
            s("1 fortnight"),
        ],
        Kind::Timestamptz => vec![
            s("epoch"),
            s("infinity"),
            s("-infinity"),
            s("294277-01-01"),
            s("4714-11-24 BC"),
            s("2026-02-30"),
            s("now"),
            s("allballs"),
        ],
        Kind::Bigint => vec![s("1"), s("1e3"), s("0x10"), s(" 7 ")],
        Kind::Regclass => vec![
            s("fuzz_orders"),
            s("public.fuzz_orders"),
            s("FUZZ_ORDERS"),
            s("\"fuzz_orders\""),
            s("fuzz_items"),
            s("fuzz_view"),
            s("pg_catalog.pg_authid"),
            s("webhooks._subscriptions"),
            s("12345678"),
            s("a.b.c.d"),
        ],
        Kind::Name | Kind::Text => vec![
            s("id"),
            s("status"),
            s("ctid"),
            s("xmin"),
            s("tableoid"),
            s("order"),
            s("webhook"),
            s("inventory.adjusted"),
            s("a.b"),
            s("A.B"),
            s("a..b"),
        ],
    }
}

struct Func {
    name: &'static str,
    sql: &'static str,
    args: Vec<(Kind, Option<String>)>,
    management: bool,
}

/// A shape that subscribe and set_shape accept.
const VALID_SHAPE: &str = r#"{"event_names": {"order.created": "ORDER_CREATED"}, "body": {"id": "evt_{{ id }}", "at": "{{ created_at | unix }}", "items": {"$each": "{{ data.items }}", "to": {"productSku": "{{ item.sku }}"}}}, "event_type_header": "X-Event-Type", "json": "javascript"}"#;

/// Every public function, with arguments that work.
fn functions(sub: i64, delivery: i64, orders_oid: u32, poll_sub: i64) -> Vec<Func> {
    let s = |x: &str| Some(x.to_string());
    let sub = sub.to_string();
    let poll_sub = poll_sub.to_string();
    let delivery = delivery.to_string();
    let orders_oid = orders_oid.to_string();
    vec![
        Func {
            name: "track",
            sql: "SELECT webhooks.track(tbl => $1::text::regclass, entity => $2::text, key_column => $3::text::name, status_column => $4::text::name, children => $5::text::jsonb)::text",
            args: vec![
                (Kind::Regclass, s("fuzz_orders")),
                (Kind::Text, s("fuzzorder")),
                (Kind::Name, s("id")),
                (Kind::Name, s("status")),
                (Kind::Jsonb, s("{\"items\": {\"table\": \"fuzz_items\", \"foreign_key\": \"order_id\"}}")),
            ],
            management: true,
        },
        Func {
            name: "untrack",
            sql: "SELECT webhooks.untrack($1::text::regclass)::text",
            args: vec![(Kind::Regclass, s("fuzz_tracked"))],
            management: true,
        },
        Func {
            name: "emit",
            sql: "SELECT webhooks.emit($1::text, $2::text::jsonb, $3::text)::text",
            args: vec![
                (Kind::Text, s("inventory.adjusted")),
                (Kind::Jsonb, s("{\"sku\": \"A-1\"}")),
                (Kind::Text, s("A-1")),
            ],
            management: true,
        },
        Func {
            name: "subscribe",
            sql: "SELECT id::text FROM webhooks.subscribe(url => $1::text, event_types => $2::text::text[], description => $3::text, headers => $4::text::jsonb, filter => $5::text::jsonb, signature => $6::text, signature_header => $7::text, timeout => $8::text::interval, retry_schedule => $9::text, secret => $10::text, signature_options => $11::text::jsonb, tls => $12::text::jsonb, shape => $13::text::jsonb, delivery => $14::text)",
            args: vec![
                (Kind::Url, s("https://hooks.example.com/in")),
                (Kind::TextArray, s("{order.*}")),
                (Kind::Text, s("fuzz")),
                (Kind::Jsonb, s("{\"Authorization\": \"Bearer t\"}")),
                (Kind::Jsonb, s("{\"currency\": \"EUR\"}")),
                (Kind::Text, s("hmac")),
                (Kind::Text, s("X-Sig")),
                (Kind::Interval, s("10 seconds")),
                (Kind::Text, s("1s,1m")),
                (Kind::Text, s("fuzz-secret-123")),
                (Kind::Jsonb, s("{\"encoding\": \"base64\", \"prefix\": \"sha256=\"}")),
                (Kind::Jsonb, None),
                (Kind::Shape, s(VALID_SHAPE)),
                (Kind::Text, s("push")),
            ],
            management: true,
        },
        Func {
            name: "set_shape",
            sql: "SELECT webhooks.set_shape($1::text::bigint, $2::text::jsonb)::text",
            args: vec![(Kind::Bigint, s(&sub)), (Kind::Shape, s(VALID_SHAPE))],
            management: true,
        },
        Func {
            name: "pause",
            sql: "SELECT webhooks.pause($1::text::bigint)::text",
            args: vec![(Kind::Bigint, s(&sub))],
            management: true,
        },
        Func {
            name: "resume",
            sql: "SELECT webhooks.resume($1::text::bigint)::text",
            args: vec![(Kind::Bigint, s(&sub))],
            management: true,
        },
        Func {
            name: "rotate_secret",
            sql: "SELECT length(webhooks.rotate_secret($1::text::bigint, $2::text::interval))::text",
            args: vec![(Kind::Bigint, s(&sub)), (Kind::Interval, s("1 hour"))],
            management: true,
        },
        Func {
            name: "rotate_secret to a brought secret",
            sql: "SELECT length(webhooks.rotate_secret($1::text::bigint, $2::text::interval, secret => $3::text))::text",
            args: vec![
                (Kind::Bigint, s(&sub)),
                (Kind::Interval, s("1 hour")),
                (Kind::Text, s("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            ],
            management: true,
        },
        Func {
            name: "set_signature",
            sql: "SELECT webhooks.set_signature($1::text::bigint, $2::text, $3::text, $4::text::jsonb)::text",
            args: vec![
                (Kind::Bigint, s(&sub)),
                (Kind::Text, s("hmac")),
                (Kind::Text, s("X-Hub-Signature-256")),
                (Kind::Jsonb, s("{\"prefix\": \"sha256=\", \"signed\": \"timestamp.body\", \"timestamp_header\": \"X-Ts\"}")),
            ],
            management: true,
        },
        Func {
            name: "set_tls",
            sql: "SELECT webhooks.set_tls($1::text::bigint, $2::text::jsonb)::text",
            args: vec![(Kind::Bigint, s(&sub)), (Kind::Jsonb, None)],
            management: true,
        },
        Func {
            name: "send_test",
            sql: "SELECT webhooks.send_test($1::text::bigint)::text",
            args: vec![(Kind::Bigint, s(&sub))],
            management: true,
        },
        Func {
            name: "send_test sample",
            sql: "SELECT webhooks.send_test($1::text::bigint, $2::text)::text",
            args: vec![(Kind::Bigint, s(&sub)), (Kind::Text, s("tracked.created"))],
            management: true,
        },
        Func {
            name: "subscribe poll",
            sql: "SELECT id::text FROM webhooks.subscribe(url => NULL, event_types => $1::text::text[], delivery => $2::text)",
            args: vec![(Kind::TextArray, s("{fuzzorder.*}")), (Kind::Text, s("poll"))],
            management: true,
        },
        Func {
            name: "poll",
            sql: "SELECT count(*)::text FROM webhooks.poll($1::text::bigint, $2::text::bigint, $3::text::int)",
            args: vec![(Kind::Bigint, s(&poll_sub)), (Kind::Bigint, s("1")), (Kind::Bigint, s("10"))],
            management: true,
        },
        Func {
            name: "grant_poll",
            sql: "SELECT webhooks.grant_poll($1::text::bigint, $2::text::regrole)::text",
            args: vec![(Kind::Bigint, s(&poll_sub)), (Kind::Text, s("webhooks_reader"))],
            management: true,
        },
        Func {
            name: "revoke_poll",
            sql: "SELECT webhooks.revoke_poll($1::text::bigint, $2::text::regrole)::text",
            args: vec![(Kind::Bigint, s(&poll_sub)), (Kind::Text, s("webhooks_reader"))],
            management: true,
        },
        Func {
            name: "request",
            sql: "SELECT webhooks.request($1::text::bigint)::text",
            args: vec![(Kind::Bigint, s(&delivery))],
            management: true,
        },
        Func {
            name: "redeliver",
            sql: "SELECT webhooks.redeliver($1::text::bigint)::text",
            args: vec![(Kind::Bigint, s(&delivery))],
            management: true,
        },
        Func {
            name: "replay",
            sql: "SELECT webhooks.replay($1::text::bigint, $2::text::timestamptz, $3::text::timestamptz, $4::text::text[])::text",
            args: vec![
                (Kind::Bigint, s(&sub)),
                (Kind::Timestamptz, s("2000-01-01")),
                (Kind::Timestamptz, s("2100-01-01")),
                (Kind::TextArray, s("{inventory.*}")),
            ],
            management: true,
        },
        Func {
            name: "status_events insert",
            sql: "INSERT INTO webhooks.status_events (entity, status, event_type) VALUES ($1::text, $2::text, $3::text) RETURNING event_type",
            args: vec![(Kind::Text, s("fuzzent")), (Kind::Text, s("picked")), (Kind::Text, s("fuzzent.picked"))],
            management: true,
        },
        Func {
            name: "status_events update",
            sql: "UPDATE webhooks.status_events SET event_type = $3::text, status = $2::text WHERE entity = $1::text RETURNING event_type",
            args: vec![(Kind::Text, s("fixed")), (Kind::Text, s("paid")), (Kind::Text, s("fixed.paid"))],
            management: true,
        },
        Func {
            name: "status_events delete",
            sql: "DELETE FROM webhooks.status_events WHERE entity = $1::text AND status = $2::text RETURNING event_type",
            args: vec![(Kind::Text, s("nothing")), (Kind::Text, s("nothing"))],
            management: true,
        },
        // Helpers granted to webhooks_admin (track/untrack call the first two).
        Func {
            name: "_register_tracked",
            sql: "SELECT webhooks._register_tracked($1::text::oid, $2::text, $3::text::smallint, $4::text::smallint, $5::text::jsonb)::text",
            args: vec![
                (Kind::Bigint, s(&orders_oid)),
                (Kind::Text, s("fuzzreg")),
                (Kind::Bigint, s("1")),
                (Kind::Bigint, s("2")),
                (Kind::Jsonb, s("[]")),
            ],
            management: true,
        },
        Func {
            name: "_unregister_tracked",
            sql: "SELECT webhooks._unregister_tracked($1::text::oid)::text",
            args: vec![(Kind::Bigint, s("1"))],
            management: true,
        },
        Func {
            name: "_singular",
            sql: "SELECT webhooks._singular($1::text)",
            args: vec![(Kind::Text, s("orders"))],
            management: true,
        },
        Func {
            name: "_mask_url",
            sql: "SELECT webhooks._mask_url($1::text)",
            args: vec![(Kind::Url, s("https://a:b@example.com/?token=x"))],
            management: true,
        },
        Func {
            name: "_matches",
            sql: "SELECT webhooks._matches($1::text::text[], $2::text::jsonb, $3::text, $4::text::jsonb)::text",
            args: vec![
                (Kind::TextArray, s("{order.*}")),
                (Kind::Jsonb, s("{\"a\": 1}")),
                (Kind::Text, s("order.created")),
                (Kind::Jsonb, s("{\"a\": 1, \"b\": 2}")),
            ],
            management: true,
        },
        Func {
            name: "_matches with names",
            sql: "SELECT webhooks._matches($1::text::text[], $2::text::jsonb, $3::text, $4::text::jsonb, $5::text::jsonb)::text",
            args: vec![
                (Kind::TextArray, s("{ORDER_CREATED}")),
                (Kind::Jsonb, s("{\"a\": 1}")),
                (Kind::Text, s("order.created")),
                (Kind::Jsonb, s("{\"a\": 1, \"b\": 2}")),
                (Kind::Jsonb, s("{\"order.created\": \"ORDER_CREATED\"}")),
            ],
            management: true,
        },
        Func {
            name: "unsubscribe",
            sql: "SELECT webhooks.unsubscribe($1::text::bigint)::text",
            args: vec![(Kind::Bigint, s(&sub))],
            management: true,
        },
    ]
}

/// A digest of everything the extension keeps (and of the triggers `track` creates): per table
/// its rows, the transactions that wrote them and the last row version, so any row inserted,
/// updated or deleted changes it (cheap with megabyte rows, unlike hashing their text).
fn fingerprint(su: &mut Client) -> String {
    let tables = [
        "_tracked",
        "status_events",
        "_events",
        "_fanout",
        "_subscriptions",
        "_secrets",
        "_deliveries",
        "_queue",
        "_attempts",
    ];
    let parts: Vec<String> = tables
        .iter()
        .map(|t| {
            format!(
                "(SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) || ':' || coalesce(max(ctid)::text, '-') FROM webhooks.{t})"
            )
        })
        .collect();
    let sql = format!(
        "SELECT concat_ws('|', {}, (SELECT string_agg(tgname || tgrelid::regclass::text, ',' ORDER BY tgname, tgrelid) FROM pg_trigger WHERE NOT tgisinternal), \
         (SELECT count(*) FROM pg_class WHERE relname = 'fuzz_victim'))",
        parts.join(", ")
    );
    su.query_one(&sql, &[]).expect("fingerprint").get(0)
}

fn short(v: &Option<String>) -> String {
    match v {
        None => "NULL".into(),
        Some(s) if s.len() > 60 => format!(
            "{:?}... ({} bytes)",
            &s.chars().take(40).collect::<String>(),
            s.len()
        ),
        Some(s) => format!("{s:?}"),
    }
}

struct Stats {
    calls: usize,
    ok: usize,
    failed: std::collections::BTreeMap<String, usize>,
}

/// One call: it succeeds, or it fails with a SQLSTATE outside class XX and changes nothing.
/// Returns whether it succeeded.
fn call(
    c: &mut Client,
    su: &mut Client,
    before: &mut String,
    f: &Func,
    args: &[Option<String>],
    stats: &mut Stats,
) -> Result<Vec<Option<String>>, String> {
    let params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
        .iter()
        .map(|a| a as &(dyn postgres::types::ToSql + Sync))
        .collect();
    let what = format!(
        "{}({})",
        f.name,
        args.iter().map(short).collect::<Vec<_>>().join(", ")
    );
    stats.calls += 1;
    let result = c.query(f.sql, &params);
    // The backend is alive, whatever happened.
    c.query_one("SELECT 1", &[])
        .unwrap_or_else(|e| panic!("{what}: the connection is gone afterwards: {e}"));
    match result {
        Ok(rows) => {
            stats.ok += 1;
            *before = fingerprint(su);
            Ok(rows.iter().map(|r| r.get::<_, Option<String>>(0)).collect())
        }
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("{what}: not an error from the server: {e}"));
            let code = db.code().code().to_string();
            assert!(
                !code.starts_with("XX"),
                "{what}: internal error {code}: {}",
                db.message()
            );
            assert!(!db.message().is_empty(), "{what}: {code} without a message");
            *stats.failed.entry(code.clone()).or_default() += 1;
            let after = fingerprint(su);
            assert_eq!(
                &after,
                before,
                "{what} failed with {code} ({}) but changed something",
                db.message()
            );
            Err(format!("{code}: {}", db.message()))
        }
    }
}

/// What a success must look like; undoes what would stop the next cases from running.
fn after_success(
    c: &mut Client,
    f: &Func,
    args: &[Option<String>],
    rows: &[Option<String>],
    sub: &mut i64,
    delivery: &mut i64,
) {
    let what = format!(
        "{}({})",
        f.name,
        args.iter().map(short).collect::<Vec<_>>().join(", ")
    );
    match f.name {
        "track" => {
            let tbl = args[0].clone().unwrap_or_default();
            c.execute("SELECT webhooks.untrack($1::text::regclass)", &[&tbl])
                .unwrap_or_else(|e| panic!("{what} succeeded, then untrack failed: {e}"));
        }
        "status_events insert" => {
            c.execute(
                "DELETE FROM webhooks.status_events WHERE entity = $1 AND status = $2",
                &[&args[0], &args[1]],
            )
            .unwrap_or_else(|e| panic!("{what} succeeded, then deleting the row failed: {e}"));
        }
        "untrack" => {
            c.batch_execute("SELECT webhooks.track('fuzz.fuzz_tracked', entity => 'tracked')")
                .unwrap_or_else(|e| panic!("{what} succeeded, then tracking again failed: {e}"));
        }
        "_register_tracked" => {
            let tbl = args[0].clone().unwrap_or_default();
            c.execute(
                "SELECT webhooks._unregister_tracked($1::text::oid)",
                &[&tbl],
            )
            .unwrap_or_else(|e| panic!("{what} succeeded, then unregistering failed: {e}"));
        }
        "subscribe" => {
            let url = args[0].clone().unwrap_or_default();
            assert!(
                !url.chars().any(char::is_control),
                "{what}: a URL with a control character was accepted"
            );
            let id: i64 = rows[0]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .expect("an id");
            let shown: String = c
                .query_one(
                    "SELECT url FROM webhooks.subscriptions WHERE id = $1",
                    &[&id],
                )
                .expect("the subscription is listed")
                .get(0);
            if let Some(at) = url.find('@') {
                let userinfo = &url[..at];
                if let Some(colon) = userinfo.rfind(':').filter(|i| *i > "https://".len()) {
                    let password = &userinfo[colon + 1..];
                    assert!(
                        !shown.contains(&format!(":{password}@")),
                        "{what}: password shown: {shown}"
                    );
                }
            }
        }
        "set_shape" => {
            // What was accepted is what the subscription now shows, and it sends no header
            // value or name that could split a request.
            let same: bool = c
                .query_one(
                    "SELECT shape IS NOT DISTINCT FROM $2::text::jsonb FROM webhooks.subscriptions WHERE id = $1::text::bigint",
                    &[&args[0], &args[1]],
                )
                .unwrap_or_else(|e| panic!("{what} succeeded, then reading the shape failed: {e}"))
                .get(0);
            assert!(same, "{what}: the subscription does not show the shape set");
            let shape = args[1].clone().unwrap_or_default();
            assert!(
                !shape.contains("\\r") && !shape.contains("\\n") || !shape.contains("header") && !shape.contains("event_names"),
                "{what}: a shape with CR/LF in a header or an event name was accepted"
            );
        }
        "unsubscribe" => {
            let row = c
                .query_one(
                    "SELECT id FROM webhooks.subscribe('https://hooks.example.com/in')",
                    &[],
                )
                .expect("a new subscription");
            *sub = row.get(0);
            *delivery = c
                .query_one("SELECT webhooks.send_test($1)", &[&*sub])
                .expect("a new delivery")
                .get(0);
        }
        "emit" => {
            let t = args[0].clone().unwrap_or_default();
            assert!(
                t.split('.').count() >= 2
                    && t.chars().all(|ch| ch.is_ascii_lowercase()
                        || ch.is_ascii_digit()
                        || "._-".contains(ch)),
                "{what}: an odd event type was accepted"
            );
        }
        _ => {}
    }
}

fn setup(su: &mut Client, db: &str) -> (Client, Client) {
    su.batch_execute(&format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fuzz_admin') THEN
                 CREATE ROLE fuzz_admin LOGIN; GRANT webhooks_admin TO fuzz_admin;
                 CREATE ROLE fuzz_app LOGIN;
             END IF;
         END $$;
         GRANT CREATE ON DATABASE {db} TO fuzz_admin;"
    ))
    .expect("roles");
    let mut admin = cluster().connect_as(db, "fuzz_admin");
    admin
        .batch_execute(
            "CREATE SCHEMA fuzz AUTHORIZATION fuzz_admin;
             SET search_path = fuzz, public;
             ALTER ROLE fuzz_admin SET search_path = fuzz, public;
             CREATE TABLE fuzz.fuzz_orders (id bigint PRIMARY KEY, status text, note text);
             CREATE TABLE fuzz.fuzz_items (id bigint PRIMARY KEY, order_id bigint, sku text);
             CREATE TABLE fuzz.fuzz_tracked (id bigint PRIMARY KEY);
             CREATE VIEW fuzz.fuzz_view AS SELECT 1 AS id;
             SELECT webhooks.track('fuzz.fuzz_tracked', entity => 'tracked');",
        )
        .expect("the admin's tables");
    let app = cluster().connect_as(db, "fuzz_app");
    (admin, app)
}

fn seed() -> u64 {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        .max(1);
    println!("FUZZ_SEED={seed}");
    eprintln!("FUZZ_SEED={seed}");
    seed
}

#[test]
fn hostile_arguments_fail_cleanly_change_nothing_and_crash_nothing() {
    let seed = seed();
    let mut rng = Rng(seed);
    let mut su = cluster().connect();
    su.batch_execute("CREATE DATABASE fuzz1").expect("db");
    let mut su = cluster().connect_db("fuzz1");
    su.batch_execute("CREATE EXTENSION pg_webhooks")
        .expect("extension");
    let (mut admin, mut app) = setup(&mut su, "fuzz1");
    let mut sub: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.subscribe('https://hooks.example.com/in')",
            &[],
        )
        .expect("subscription")
        .get(0);
    let mut delivery: i64 = admin
        .query_one("SELECT webhooks.send_test($1)", &[&sub])
        .expect("a delivery")
        .get(0);
    let poll_sub: i64 = admin
        .query_one(
            "SELECT id FROM webhooks.subscribe(NULL, delivery => 'poll')",
            &[],
        )
        .expect("poll subscription")
        .get(0);
    let orders_oid: u32 = admin
        .query_one("SELECT 'fuzz.fuzz_orders'::regclass::oid", &[])
        .expect("oid")
        .get(0);
    let mut stats = Stats {
        calls: 0,
        ok: 0,
        failed: Default::default(),
    };
    let mut before = fingerprint(&mut su);
    let common = common_values();

    // Every argument of every function, one at a time, the others valid.
    let names: Vec<&str> = functions(sub, delivery, orders_oid, poll_sub)
        .iter()
        .map(|f| f.name)
        .collect();
    for name in names {
        for i in 0.. {
            let fs = functions(sub, delivery, orders_oid, poll_sub);
            let f = fs.iter().find(|f| f.name == name).expect("function");
            if i >= f.args.len() {
                break;
            }
            let mut values = common.clone();
            values.extend(kind_values(f.args[i].0));
            for v in values {
                let fs = functions(sub, delivery, orders_oid, poll_sub);
                let f = fs.iter().find(|f| f.name == name).expect("function");
                let mut args: Vec<Option<String>> = f.args.iter().map(|(_, v)| v.clone()).collect();
                args[i] = v;
                if let Ok(rows) = call(&mut admin, &mut su, &mut before, f, &args, &mut stats) {
                    after_success(&mut admin, f, &args, &rows, &mut sub, &mut delivery);
                    before = fingerprint(&mut su);
                }
            }
        }
    }

    // Random combinations: each argument valid or hostile at random.
    for _ in 0..400 {
        let fs = functions(sub, delivery, orders_oid, poll_sub);
        let f = &fs[rng.below(fs.len())];
        let args: Vec<Option<String>> = f
            .args
            .iter()
            .map(|(kind, valid)| match rng.below(3) {
                0 => valid.clone(),
                1 => common[rng.below(common.len())].clone(),
                _ => {
                    let v = kind_values(*kind);
                    v[rng.below(v.len())].clone()
                }
            })
            .collect();
        if let Ok(rows) = call(&mut admin, &mut su, &mut before, f, &args, &mut stats) {
            after_success(&mut admin, f, &args, &rows, &mut sub, &mut delivery);
            before = fingerprint(&mut su);
        }
    }

    // The valid calls work as the admin (so that the failures above were the values' doing).
    // (_unregister_tracked has no table to forget here: its baseline is an oid that is none.)
    for f in functions(sub, delivery, orders_oid, poll_sub)
        .into_iter()
        .filter(|f| f.name != "_unregister_tracked")
    {
        let args: Vec<Option<String>> = f.args.iter().map(|(_, v)| v.clone()).collect();
        let rows = call(&mut admin, &mut su, &mut before, &f, &args, &mut stats)
            .unwrap_or_else(|e| panic!("{} with valid arguments: {e}", f.name));
        after_success(&mut admin, &f, &args, &rows, &mut sub, &mut delivery);
        before = fingerprint(&mut su);
    }

    // A plain application role may call none of them: 42501, nothing changed.
    for f in functions(sub, delivery, orders_oid, poll_sub)
        .iter()
        .filter(|f| f.management)
    {
        let args: Vec<Option<String>> = f.args.iter().map(|(_, v)| v.clone()).collect();
        let err = call(&mut app, &mut su, &mut before, f, &args, &mut stats)
            .expect_err(&format!("{} as an application role", f.name));
        assert!(
            err.starts_with("42501"),
            "{} as an application role: {err}",
            f.name
        );
    }

    let log = cluster().server_log();
    for bad in ["PANIC", "terminated by signal", "TRAP:", "server process"] {
        assert!(!log.contains(bad), "the server log has {bad:?}:\n{log}");
    }
    println!(
        "FUZZ_SEED={seed}: {} calls, {} succeeded, failures by SQLSTATE: {:?}",
        stats.calls, stats.ok, stats.failed
    );
}

#[test]
fn track_works_on_names_that_need_quoting() {
    let mut su = cluster().connect();
    su.batch_execute("CREATE DATABASE fuzz2").expect("db");
    let mut c = cluster().connect_db("fuzz2");
    c.batch_execute(
        r#"CREATE EXTENSION pg_webhooks;
           CREATE SCHEMA "My Shop";
           CREATE TABLE "My Shop"."Orders" ("Order Id" bigint PRIMARY KEY, "select" text, "Status" text, "Total ""€""" numeric);
           CREATE TABLE "My Shop"."Order Lines" ("Line Id" bigint PRIMARY KEY,
                                                 "Order Id" bigint REFERENCES "My Shop"."Orders" ON DELETE CASCADE,
                                                 "SKU" text);
           CREATE TABLE "select" ("From" text PRIMARY KEY, "where" int);
           SELECT webhooks.track('"My Shop"."Orders"', entity => 'shop_order', key_column => 'Order Id',
                                 status_column => 'Status',
                                 children => '{"Lines": {"table": "\"My Shop\".\"Order Lines\"", "foreign_key": "Order Id"}}');
           SELECT webhooks.track('"select"', key_column => 'From');"#,
    )
    .expect("track tables with names that need quoting");
    c.batch_execute(
        r#"BEGIN;
           INSERT INTO "My Shop"."Orders" VALUES (1, 'it''s', 'pending', 9.90);
           INSERT INTO "My Shop"."Order Lines" VALUES (10, 1, 'A-1'), (11, 1, 'B "2"');
           COMMIT;"#,
    )
    .expect("insert");
    // One transaction each (a batch of several statements would be one).
    for write in [
        r#"UPDATE "My Shop"."Orders" SET "Status" = 'paid' WHERE "Order Id" = 1"#,
        r#"UPDATE "My Shop"."Order Lines" SET "SKU" = 'A-1x' WHERE "Line Id" = 10"#,
        r#"DELETE FROM "My Shop"."Orders" WHERE "Order Id" = 1"#,
        r#"INSERT INTO "select" VALUES ('k''1', 1)"#,
        r#"UPDATE "select" SET "where" = 2"#,
    ] {
        c.batch_execute(write).expect(write);
    }
    let got = events(&mut c, "shop_order");
    let lines = json!([
        {"Line Id": 10, "Order Id": 1, "SKU": "A-1"},
        {"Line Id": 11, "Order Id": 1, "SKU": "B \"2\""}
    ]);
    let row = |status: &str, lines: serde_json::Value| json!({"Order Id": 1, "select": "it's", "Status": status, "Total \"€\"": 9.90, "Lines": lines});
    let types: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "shop_order.created",
            "shop_order.status_updated",
            "shop_order.paid",
            "shop_order.updated",
            "shop_order.deleted"
        ]
    );
    assert_eq!(got[0].1, row("pending", lines.clone()));
    assert_eq!(got[1].1["previous_status"], "pending");
    assert_eq!(got[1].1["status"], "paid");
    assert_eq!(got[3].1["Lines"][0]["SKU"], "A-1x");
    assert_eq!(got[4].1["Order Id"], 1);
    assert!(
        got[4].1.get("Lines").is_none(),
        "a deleted row has no children"
    );
    let keys: Vec<String> = c
        .query(
            "SELECT key FROM webhooks.events WHERE entity = 'select' ORDER BY seq",
            &[],
        )
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, ["k'1", "k'1"]);
    let sel = events(&mut c, "select");
    assert_eq!(
        sel[0],
        (
            "select.created".to_string(),
            json!({"From": "k'1", "where": 1})
        )
    );
    assert_eq!(
        sel[1],
        (
            "select.updated".to_string(),
            json!({"From": "k'1", "where": 2})
        )
    );
    c.batch_execute(
        r#"SELECT webhooks.untrack('"My Shop"."Orders"'); SELECT webhooks.untrack('"select"');"#,
    )
    .expect("untrack");
}
