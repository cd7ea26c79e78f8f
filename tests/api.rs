//! Every bad input gets a clear error with a fitting SQLSTATE and changes nothing; roles see
//! what they should and no more. Runs against a live cluster through its own connections.

mod common;

use common::{fails, shared_cluster, Cluster};
use postgres::error::SqlState;
use postgres::Client;

fn cluster() -> &'static Cluster {
    shared_cluster("api", &[])
}

/// Counts of everything a failed call could have left half-written.
fn state(c: &mut Client) -> Vec<i64> {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM webhooks._subscriptions), (SELECT count(*) FROM webhooks._secrets),
                    (SELECT count(*) FROM webhooks._tracked), (SELECT count(*) FROM webhooks._events),
                    (SELECT count(*) FROM webhooks._deliveries), (SELECT count(*) FROM webhooks.status_events),
                    (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'webhooks_%')",
            &[],
        )
        .expect("state");
    (0..7).map(|i| row.get(i)).collect()
}

fn setup_tables(c: &mut Client, p: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE {p}_orders (id int PRIMARY KEY, status text, code text);
         CREATE TABLE {p}_nokey (id int, status text);
         CREATE TABLE {p}_items (id serial PRIMARY KEY, order_id int, sku text);
         CREATE VIEW {p}_view AS SELECT * FROM {p}_orders;"
    ))
    .expect("tables");
}

#[test]
fn bad_track_calls_fail_clearly_and_change_nothing() {
    let mut c = cluster().fresh_db("bad_track");
    setup_tables(&mut c, "bt");
    c.batch_execute("SELECT webhooks.track('bt_orders', status_column => 'status')")
        .expect("first track");
    let before = state(&mut c);
    fails(
        &mut c,
        "SELECT webhooks.track('no_such_table')",
        SqlState::UNDEFINED_TABLE,
    );
    let m = fails(
        &mut c,
        "SELECT webhooks.track('bt_items', key_column => 'nope')",
        SqlState::UNDEFINED_COLUMN,
    );
    assert!(m.contains("nope"), "{m}");
    let m = fails(
        &mut c,
        "SELECT webhooks.track('bt_nokey')",
        SqlState::INVALID_COLUMN_REFERENCE,
    );
    assert!(m.contains("unique"), "{m}");
    fails(
        &mut c,
        "SELECT webhooks.track('bt_items', status_column => 'nope')",
        SqlState::UNDEFINED_COLUMN,
    );
    let m = fails(
        &mut c,
        "SELECT webhooks.track('bt_orders')",
        SqlState::DUPLICATE_OBJECT,
    );
    assert!(m.contains("untrack"), "hint says what to do: {m}");
    fails(
        &mut c,
        "SELECT webhooks.track('bt_view')",
        SqlState::WRONG_OBJECT_TYPE,
    );
    fails(
        &mut c,
        "SELECT webhooks.track('bt_items', entity => 'Bad Name')",
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        r#"SELECT webhooks.track('bt_items', children => '[1]')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        r#"SELECT webhooks.track('bt_items', children => '{"x": {"table": "bt_orders"}}')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        r#"SELECT webhooks.track('bt_items', children => '{"x": {"table": "nope", "foreign_key": "id"}}')"#,
        SqlState::UNDEFINED_TABLE,
    );
    // A failure after the first trigger was created must not leave that trigger behind.
    fails(
        &mut c,
        r#"SELECT webhooks.track('bt_items', children => '{"x": {"table": "bt_orders", "foreign_key": "nope"}}')"#,
        SqlState::UNDEFINED_COLUMN,
    );
    fails(
        &mut c,
        "SELECT webhooks.untrack('bt_items')",
        SqlState::UNDEFINED_OBJECT,
    );
    assert_eq!(state(&mut c), before);
}

#[test]
fn bad_subscriptions_fail_clearly_and_change_nothing() {
    let mut c = cluster().fresh_db("bad_subscriptions");
    let before = state(&mut c);
    let bad_urls = [
        "ftp://example.com/x",
        "not a url",
        "",
        "https://",
        "javascript:alert(1)",
    ];
    for url in bad_urls {
        let m = fails(
            &mut c,
            &format!("SELECT webhooks.subscribe('{url}')"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
        assert!(m.to_lowercase().contains("url"), "{url}: {m}");
    }
    for patterns in ["{}", "{order}", "{\"\"}", "{Order.*}", "{order.*.x}"] {
        fails(
            &mut c,
            &format!("SELECT webhooks.subscribe('https://example.com/h', '{patterns}')"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
    }
    fails(
        &mut c,
        "SELECT webhooks.subscribe('https://example.com/h', NULL)",
        SqlState::INVALID_PARAMETER_VALUE,
    );
    for headers in [
        r#"'[]'"#,
        r#"'{"A": 1}'"#,
        r#"'{"webhook-id": "x"}'"#,
        r#"'{"bad name": "x"}'"#,
        "NULL",
    ] {
        fails(
            &mut c,
            &format!("SELECT webhooks.subscribe('https://example.com/h', headers => {headers})"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
    }
    for extra in [
        "filter => '[1]'",
        "signature => 'md5'",
        "signature_header => 'X-Sig'",
        "retry_schedule => '5x'",
        "retry_schedule => '5s,,10s'",
        "timeout => '0'",
        "timeout => '1 hour'",
    ] {
        fails(
            &mut c,
            &format!("SELECT webhooks.subscribe('https://example.com/h', {extra})"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
    }
    assert_eq!(state(&mut c), before);
}

#[test]
fn plain_http_and_private_addresses_need_the_superuser_settings() {
    let mut c = cluster().connect();
    c.batch_execute("SET webhooks.allow_http = off; SET webhooks.allow_private_network = off;")
        .expect("set");
    let m = fails(
        &mut c,
        "SELECT webhooks.subscribe('http://example.com/h')",
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert!(m.contains("webhooks.allow_http"), "{m}");
    for ip in [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "[::1]",
        "100.64.0.1",
        "[::ffff:192.168.0.1]",
    ] {
        let m = fails(
            &mut c,
            &format!("SELECT webhooks.subscribe('https://{ip}/h')"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
        assert!(m.contains("allow_private_network"), "{ip}: {m}");
    }
    c.batch_execute("SELECT webhooks.subscribe('https://example.com/h')")
        .expect("public https is fine");
    c.batch_execute("RESET webhooks.allow_http; RESET webhooks.allow_private_network;")
        .expect("reset");
}

#[test]
fn unknown_ids_and_bad_arguments_fail_clearly() {
    let mut c = cluster().fresh_db("bad_arguments");
    for call in [
        "webhooks.pause(999999)",
        "webhooks.resume(999999)",
        "webhooks.unsubscribe(999999)",
        "webhooks.rotate_secret(999999)",
        "webhooks.send_test(999999)",
        "webhooks.redeliver(999999)",
        "webhooks.replay(999999, now() - interval '1 day')",
    ] {
        let m = fails(&mut c, &format!("SELECT {call}"), SqlState::NO_DATA_FOUND);
        assert!(m.contains("999999"), "{call}: {m}");
    }
    let id: i64 = c
        .query_one(
            "SELECT id FROM webhooks.subscribe('https://example.com/h')",
            &[],
        )
        .expect("sub")
        .get(0);
    fails(
        &mut c,
        &format!("SELECT webhooks.rotate_secret({id}, '-1 hour')"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        &format!("SELECT webhooks.replay({id}, now(), now() - interval '1 day')"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        &format!("SELECT webhooks.replay({id}, now() - interval '1 day', now(), '{{nope}}')"),
        SqlState::INVALID_PARAMETER_VALUE,
    );
    let before = state(&mut c);
    fails(
        &mut c,
        r#"SELECT webhooks.emit('inventory.adjusted', '[1, 2]')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        r#"SELECT webhooks.emit('inventory.adjusted', '"text"')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        r#"SELECT webhooks.emit('Inventory Adjusted', '{}')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    fails(
        &mut c,
        r#"SELECT webhooks.emit('inventory', '{}')"#,
        SqlState::INVALID_PARAMETER_VALUE,
    );
    assert_eq!(state(&mut c), before);
}

#[test]
fn roles_manage_and_read_without_ever_seeing_secrets() {
    let mut c = cluster().connect();
    c.batch_execute(
        "DROP ROLE IF EXISTS ops_admin; DROP ROLE IF EXISTS ops_reader; DROP ROLE IF EXISTS nobody_special;
         CREATE ROLE ops_admin LOGIN IN ROLE webhooks_admin;
         CREATE ROLE ops_reader LOGIN IN ROLE webhooks_reader;
         CREATE ROLE nobody_special LOGIN;",
    )
    .expect("roles");
    let connect = |user: &str| {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres",
                cluster().port
            ),
            postgres::NoTls,
        )
        .expect("connect")
    };
    let mut admin = connect("ops_admin");
    let row = admin
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe('https://example.com/roles', '{order.*}')",
            &[],
        )
        .expect("an admin subscribes");
    let (id, secret): (i64, String) = (row.get(0), row.get(1));
    admin
        .execute("SELECT webhooks.pause($1)", &[&id])
        .expect("an admin pauses");
    admin
        .execute("SELECT webhooks.rotate_secret($1)", &[&id])
        .expect("an admin rotates");
    fails(
        &mut admin,
        "SELECT * FROM webhooks._secrets",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );

    let mut reader = connect("ops_reader");
    let rows = reader
        .query(
            "SELECT to_jsonb(s)::text FROM webhooks.subscriptions s",
            &[],
        )
        .expect("a reader reads");
    assert!(!rows.is_empty());
    for r in rows {
        let text: String = r.get(0);
        assert!(
            !text.contains(&secret[6..]) && !text.contains("whsec_"),
            "{text}"
        );
    }
    reader
        .query(
            "SELECT * FROM webhooks.deliveries, webhooks.attempts, webhooks.events LIMIT 1",
            &[],
        )
        .expect("logs");
    fails(
        &mut reader,
        "SELECT * FROM webhooks._secrets",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut reader,
        "SELECT webhooks.subscribe('https://example.com/x')",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut reader,
        &format!("SELECT webhooks.resume({id})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );

    let mut nobody = connect("nobody_special");
    fails(
        &mut nobody,
        "SELECT * FROM webhooks.deliveries",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut nobody,
        "SELECT webhooks.emit('x.y', '{}')",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
}

#[test]
fn bad_settings_are_refused_when_set() {
    let mut c = cluster().connect();
    for (name, bad) in [
        ("webhooks.retry_schedule", "5x,10s"),
        ("webhooks.retry_schedule", "5s,,10s"),
        ("webhooks.disable_after", "soon"),
        ("webhooks.retention", "30 dayz"),
    ] {
        let m = fails(
            &mut c,
            &format!("ALTER SYSTEM SET {name} = '{bad}'"),
            SqlState::INVALID_PARAMETER_VALUE,
        );
        assert!(m.contains(name), "{m}");
    }
    c.batch_execute("ALTER SYSTEM SET webhooks.retry_schedule = 'immediate,1m,5m,30m,2h'")
        .expect("a good schedule is accepted");
    c.batch_execute("ALTER SYSTEM SET webhooks.retention = '7 days'")
        .expect("a good interval is accepted");
    c.batch_execute("ALTER SYSTEM RESET webhooks.retry_schedule")
        .expect("reset");
    c.batch_execute("ALTER SYSTEM RESET webhooks.retention")
        .expect("reset");
}

#[test]
fn changing_a_subscription_that_an_unsubscribe_removes_meanwhile_fails_with_no_data_found() {
    // The call finds the subscription, then waits for its row, which a concurrent unsubscribe
    // holds; when that commits, the row is gone. The call says so (set_shape used to return as
    // if it had done its work; set_signature read the row without locking it).
    let mut c = cluster().fresh_db("changed_while_removed");
    for call in ["webhooks.set_shape($1, NULL)", "webhooks.set_signature($1, 'hex')"] {
        let id: i64 = c
            .query_one("SELECT id FROM webhooks.subscribe('https://example.com/h')", &[])
            .expect("sub")
            .get(0);
        let mut remover = cluster().connect_db("changed_while_removed");
        remover.batch_execute("BEGIN").expect("begin");
        remover.execute("SELECT webhooks.unsubscribe($1)", &[&id]).expect("unsubscribe");
        let mut changer = cluster().connect_db("changed_while_removed");
        let pid: i32 = changer.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
        let sql = format!("SELECT {call}");
        let changing = std::thread::spawn(move || changer.execute(&sql, &[&id]));
        common::wait_for("the call to wait for the subscription's row", std::time::Duration::from_secs(60), || {
            let waiting: bool = c
                .query_one(
                    "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .expect("activity")
                .get(0);
            waiting.then_some(())
        });
        remover.batch_execute("COMMIT").expect("commit");
        let err = changing.join().expect("thread").expect_err(call);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{call}: {err:?}"));
        assert_eq!(db.code(), &SqlState::NO_DATA_FOUND, "{call}: {}", db.message());
        assert!(db.message().contains(&id.to_string()), "{call}: {}", db.message());
    }
}
