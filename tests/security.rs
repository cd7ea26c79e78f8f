//! Safe to install: no caller can make capture run SQL of its choosing, application roles'
//! DDL works as without the extension, and bad header values are refused. Every test here
//! acts as a non-superuser role: an application owning its tables, a member of
//! `webhooks_admin` with CREATE on a schema of its own, and `webhooks_reader`.

mod common;

use common::{events, fails, shared_cluster, Cluster};
use postgres::error::SqlState;
use postgres::Client;
use std::time::Duration;

fn cluster() -> &'static Cluster {
    shared_cluster("security", &[])
}

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .expect("role")
        .get(0)
}

fn role_exists(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&role])
        .expect("role")
        .get::<_, i64>(0)
        == 1
}

/// A login role that is a member of webhooks_admin (and so webhooks_reader) and owns a schema
/// it can create tables, functions and triggers in: the attacker of the review.
fn mallory(su: &mut Client, name: &str) -> Client {
    su.batch_execute(&format!(
        "CREATE ROLE {name} LOGIN; GRANT webhooks_admin TO {name};
         CREATE SCHEMA {name} AUTHORIZATION {name};"
    ))
    .expect("create the attacker role");
    cluster().connect_as("postgres", name)
}

#[test]
fn forged_capture_trigger_arguments_run_no_sql_and_are_refused() {
    let mut su = cluster().connect();
    let mut m = mallory(&mut su, "mal1");
    // What the landed code spliced into SQL run as the bootstrap superuser at commit: a
    // function of the attacker's in the children's ORDER BY, and SQL in the key type.
    m.batch_execute(
        r#"CREATE FUNCTION mal1.escalate() RETURNS int LANGUAGE plpgsql AS $$
           BEGIN
               EXECUTE 'ALTER ROLE mal1 SUPERUSER';
               RETURN 1;
           END $$;
           CREATE TABLE mal1.t (id int PRIMARY KEY, note text);
           CREATE TABLE mal1.c (id int PRIMARY KEY, t_id int);
           INSERT INTO mal1.c VALUES (1, 1);"#,
    )
    .expect("an attacker's own tables");
    let child: u32 = m
        .query_one("SELECT 'mal1.c'::regclass::oid", &[])
        .expect("oid")
        .get(0);
    m.batch_execute(&format!(
        r#"CREATE TRIGGER forged AFTER INSERT OR UPDATE OR DELETE ON mal1.t FOR EACH ROW
               EXECUTE FUNCTION webhooks._capture_row('order', 'id', 'int', '',
                   '[{{"name": "x", "relid": {child}, "fk": "t_id", "order_by": "mal1.escalate()"}}]');"#
    ))
    .expect("attach a forged capture trigger to an own table");
    let result = m.batch_execute("INSERT INTO mal1.t VALUES (1, 'x')");
    // On the landed code this INSERT succeeded, and at its commit mal1.escalate() ran as the
    // bootstrap superuser: mal1 became a superuser.
    assert!(
        !is_superuser(&mut su, "mal1"),
        "the forged arguments ran as a superuser"
    );
    let e = result.expect_err("a forged capture trigger must not run");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert_eq!(
        e.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{msg}"
    );
    assert!(msg.contains("not tracked"), "{msg}");
    assert!(
        !is_superuser(&mut su, "mal1"),
        "the forged arguments ran as a superuser"
    );

    // The child trigger, pointed at a table that really is tracked (by someone else).
    su.batch_execute(
        "CREATE TABLE victim_orders (id int PRIMARY KEY, status text);
         CREATE TABLE victim_items (id int PRIMARY KEY, order_id int);
         SELECT webhooks.track('victim_orders', entity => 'victim', status_column => 'status',
                children => '{\"items\": {\"table\": \"victim_items\", \"foreign_key\": \"order_id\"}}');",
    )
    .expect("a tracked table");
    let victim: u32 = su
        .query_one("SELECT 'victim_orders'::regclass::oid", &[])
        .expect("oid")
        .get(0);
    m.batch_execute(&format!(
        "CREATE TRIGGER forged_child BEFORE INSERT ON mal1.c FOR EACH ROW
             EXECUTE FUNCTION webhooks._capture_child('{victim}', 'mal1.escalate()', 'int', 'status', '[]', '{victim}', 't_id');"
    ))
    .expect("attach a forged child trigger");
    // Its arguments are ignored and no tracked table lists mal1.c: it does nothing at all
    // (a child trigger no tracked table needs never fails a write).
    let before: i64 = su.query_one("SELECT count(*) FROM webhooks._events", &[]).expect("events").get(0);
    m.batch_execute("INSERT INTO mal1.c VALUES (1001, 1)")
        .expect("a write through a forged child trigger");
    let after: i64 = su.query_one("SELECT count(*) FROM webhooks._events", &[]).expect("events").get(0);
    assert_eq!(after, before, "no event for anyone's table");
    assert!(!is_superuser(&mut su, "mal1"));

    // The configuration is not writable by hand, and its writer checks the caller's rights.
    fails(
        &mut m,
        "INSERT INTO webhooks._tracked (relid, entity, key_attnum) VALUES ('mal1.t'::regclass, 'x', 1)",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut m,
        "DELETE FROM webhooks._tracked",
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut m,
        &format!("SELECT webhooks._register_tracked({victim}, 'x', 1::int2, NULL, '[]')"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    fails(
        &mut m,
        &format!("SELECT webhooks._unregister_tracked({victim})"),
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    // Tracking someone else's table as a child of one's own would copy it into events.
    su.batch_execute("CREATE TABLE secrets (id int PRIMARY KEY, t_id int, password text); INSERT INTO secrets VALUES (1, 1, 'hunter2')")
        .expect("a table mal1 cannot read");
    let msg = fails(
        &mut m,
        r#"SELECT webhooks.track('mal1.t', entity => 'mal1', children => '{"s": {"table": "public.secrets", "foreign_key": "t_id"}}')"#,
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    assert!(
        msg.contains("secrets") || msg.contains("permission"),
        "{msg}"
    );
    assert_eq!(
        su.query_one(
            "SELECT count(*) FROM webhooks._tracked WHERE relid = 'mal1.t'::regclass",
            &[]
        )
        .expect("count")
        .get::<_, i64>(0),
        0
    );
    // The victim's capture still works, for its own writer.
    su.batch_execute("INSERT INTO victim_orders VALUES (1, 'pending')")
        .expect("victim writes");
    su.batch_execute("INSERT INTO victim_items VALUES (1, 1)")
        .expect("victim writes");
    let types: Vec<String> = events(&mut su, "victim").into_iter().map(|e| e.0).collect();
    assert_eq!(types, ["victim.created", "victim.updated"]);
}

#[test]
fn capture_of_an_attackers_own_table_runs_its_code_with_its_own_rights_only() {
    let mut su = cluster().connect();
    let mut m = mallory(&mut su, "mal2");
    // Code the table owner controls, on every path capture reads: a key domain whose CHECK
    // calls a function, a column default, children under a policy. Capture must never run
    // any of it with more rights than the owner has.
    m.batch_execute(
        r#"CREATE FUNCTION mal2.escalate(v int) RETURNS boolean LANGUAGE plpgsql AS $$
           BEGIN
               BEGIN
                   EXECUTE 'ALTER ROLE mal2 SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
               RETURN true;
           END $$;
           CREATE DOMAIN mal2.key AS int CHECK (mal2.escalate(VALUE));
           CREATE TABLE mal2.t (id mal2.key PRIMARY KEY, status text, note text DEFAULT (mal2.escalate(1))::text);
           CREATE TABLE mal2.c (id int PRIMARY KEY, t_id int, qty int CHECK (mal2.escalate(qty)));
           CREATE POLICY p ON mal2.c USING (mal2.escalate(id));
           ALTER TABLE mal2.c ENABLE ROW LEVEL SECURITY;
           SELECT webhooks.track('mal2.t', entity => 'mal', status_column => 'status',
                  children => '{"c": {"table": "mal2.c", "foreign_key": "t_id"}}');
           BEGIN;
           INSERT INTO mal2.t (id, status) VALUES (1, 'pending');
           INSERT INTO mal2.c VALUES (1, 1, 2);
           COMMIT;"#,
    )
    .expect("track and write an own table");
    m.batch_execute("UPDATE mal2.t SET status = 'paid'")
        .expect("status");
    m.batch_execute("UPDATE mal2.c SET qty = 3").expect("child");
    assert!(!is_superuser(&mut su, "mal2"));
    let ev = events(&mut su, "mal");
    let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "mal.created",
            "mal.status_updated",
            "mal.paid",
            "mal.updated"
        ]
    );
    assert_eq!(ev[0].1["c"][0]["qty"], 2);
    assert_eq!(ev[3].1["c"][0]["qty"], 3);
}

#[test]
fn readers_and_admins_cannot_reach_what_is_not_theirs() {
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE ROLE rdr LOGIN; GRANT webhooks_reader TO rdr;
         CREATE TABLE rdr_orders (id int PRIMARY KEY);",
    )
    .expect("reader");
    let mut r = cluster().connect_as("postgres", "rdr");
    for sql in [
        "SELECT webhooks.track('rdr_orders')",
        "SELECT webhooks.emit('x.y', '{}')",
        "SELECT webhooks.subscribe('https://example.com/')",
        "SELECT * FROM webhooks._secrets",
        "SELECT * FROM webhooks._events",
        "UPDATE webhooks._fanout SET batch = NULL",
        "SELECT webhooks._register_tracked('rdr_orders'::regclass::oid, 'x', 1::int2, NULL, '[]')",
    ] {
        fails(&mut r, sql, SqlState::INSUFFICIENT_PRIVILEGE);
    }
    r.batch_execute(
        "SELECT count(*) FROM webhooks.events; SELECT count(*) FROM webhooks.deliveries;",
    )
    .expect("a reader reads the logs");
    // The capture role writes events but cannot log in, and is nobody's member.
    let e = cluster()
        .connect_as_result("postgres", "webhooks_capture")
        .err()
        .expect("webhooks_capture must not log in");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("not permitted to log in"), "{e:?}");
    assert_eq!(
        su.query_one("SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid WHERE r.rolname = 'webhooks_capture'", &[])
            .expect("members")
            .get::<_, i64>(0),
        0
    );
    // Header values that would split a request are refused like bad header names.
    let mut admin = mallory(&mut su, "adm3");
    for value in ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\u{1}b", "a\u{7f}b"] {
        let headers = serde_json::json!({ "X-Custom": value }).to_string();
        let e = admin
            .query_one(
                "SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/x', headers => $1::text::jsonb)",
                &[&headers],
            )
            .expect_err("a header value with a control character");
        assert_eq!(
            e.code(),
            Some(&SqlState::INVALID_PARAMETER_VALUE),
            "{value:?}: {e}"
        );
    }
    admin
        .query_one(
            "SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/x', headers => '{\"X-Tab\": \"a\\tb\"}')",
            &[],
        )
        .expect("a tab is a legal header value character");
}

#[test]
fn application_ddl_of_every_kind_works_for_a_non_superuser() {
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE ROLE app LOGIN; CREATE SCHEMA app AUTHORIZATION app;
         CREATE ROLE clerk LOGIN; GRANT USAGE ON SCHEMA app TO clerk;
         ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA app GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO clerk;",
    )
    .expect("roles");
    let mut app = cluster().connect_as("postgres", "app");
    // Untracked tables: every kind of DDL, including every kind of DROP.
    app.batch_execute(
        "CREATE TABLE app.plain (id int PRIMARY KEY, a text, b text);
         CREATE INDEX plain_a ON app.plain (a);
         ALTER TABLE app.plain ADD COLUMN c int;
         ALTER TABLE app.plain DROP COLUMN b;
         ALTER TABLE app.plain RENAME COLUMN a TO aa;
         ALTER TABLE app.plain ALTER COLUMN c TYPE bigint;
         DROP INDEX app.plain_a;
         CREATE VIEW app.v AS SELECT * FROM app.plain;
         DROP VIEW app.v;
         CREATE SEQUENCE app.s; DROP SEQUENCE app.s;
         CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'SELECT 1'; DROP FUNCTION app.f();
         CREATE TYPE app.mood AS ENUM ('ok'); DROP TYPE app.mood;
         ALTER TABLE app.plain RENAME TO plain2;
         TRUNCATE app.plain2;
         DROP TABLE app.plain2;",
    )
    .expect("DDL on untracked tables");

    // Tracked tables (tracked by an admin; the application owns them).
    app.batch_execute(
        "CREATE TABLE app.orders (id int PRIMARY KEY, status text NOT NULL DEFAULT 'pending', customer text, junk text);
         CREATE TABLE app.items (id int PRIMARY KEY, order_id int REFERENCES app.orders, sku text);
         CREATE TABLE app.notes (id int PRIMARY KEY, order_id int, body text);",
    )
    .expect("tables");
    su.batch_execute(
        r#"SELECT webhooks.track('app.orders', entity => 'ddl', status_column => 'status',
               children => '{"items": {"table": "app.items", "foreign_key": "order_id"},
                             "notes": {"table": "app.notes", "foreign_key": "order_id"}}')"#,
    )
    .expect("track");
    let mut clerk = cluster().connect_as("postgres", "clerk");
    let mut write = |sql: &str| {
        clerk
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    write("INSERT INTO app.orders (id, customer) VALUES (1, 'ada'); INSERT INTO app.items VALUES (1, 1, 'A');");

    app.batch_execute(
        "ALTER TABLE app.orders ADD COLUMN note text;
         CREATE INDEX orders_customer ON app.orders (customer);
         DROP INDEX app.orders_customer;
         ALTER TABLE app.orders RENAME COLUMN customer TO client;
         ALTER TABLE app.orders RENAME COLUMN id TO order_no;
         ALTER TABLE app.orders DROP COLUMN junk;
         ALTER TABLE app.orders RENAME TO purchases;
         ALTER TABLE app.items RENAME COLUMN sku TO article;",
    )
    .expect("DDL on tracked tables");
    write("UPDATE app.purchases SET client = 'grace', status = 'paid' WHERE order_no = 1");
    app.batch_execute("ALTER TABLE app.purchases ALTER COLUMN order_no TYPE bigint")
        .expect("retype the key");
    write("INSERT INTO app.purchases (order_no, client) VALUES (2, 'linus')");

    // Dropping a child table, the status column, then the key (refused) and the table.
    app.batch_execute("DROP TABLE app.notes; ALTER TABLE app.purchases DROP COLUMN status;")
        .expect("drop a child table and the status column");
    write("UPDATE app.purchases SET client = 'barbara' WHERE order_no = 2");
    let msg = fails(
        &mut app,
        "ALTER TABLE app.purchases DROP COLUMN order_no CASCADE",
        SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
    );
    assert!(msg.contains("untrack"), "{msg}");
    let ev = events(&mut su, "ddl");
    let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "ddl.created",
            "ddl.status_updated",
            "ddl.paid",
            "ddl.created",
            "ddl.updated"
        ]
    );
    assert_eq!(ev[0].1["customer"], "ada");
    assert_eq!(ev[0].1["items"][0]["sku"], "A");
    assert_eq!(ev[1].1["client"], "grace", "renamed columns are followed");
    assert_eq!(ev[1].1["order_no"], 1);
    assert_eq!(ev[1].1["items"][0]["article"], "A");
    assert!(ev[1].1.get("junk").is_none());
    assert_eq!(ev[4].1["client"], "barbara");
    assert!(
        ev[4].1.get("notes").is_none(),
        "the dropped child left the payload"
    );
    assert!(ev[4].1.get("items").is_some());

    let oid: u32 = su
        .query_one("SELECT 'app.purchases'::regclass::oid", &[])
        .expect("oid")
        .get(0);
    app.batch_execute("DROP TABLE app.items; DROP TABLE app.purchases;")
        .expect("drop the tracked tables");
    assert_eq!(
        su.query_one(
            "SELECT count(*) FROM webhooks._tracked WHERE relid = $1",
            &[&oid]
        )
        .expect("count")
        .get::<_, i64>(0),
        0,
        "a dropped table is forgotten"
    );
    app.batch_execute("DROP SCHEMA app CASCADE")
        .expect("drop the schema");
    assert!(role_exists(&mut su, "app"));
}

#[test]
fn no_users_code_runs_inside_capture_casts_policies_or_settings() {
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE ROLE mal4 LOGIN; CREATE SCHEMA mal4 AUTHORIZATION mal4;
         GRANT USAGE ON SCHEMA mal4 TO PUBLIC;",
    )
    .expect("role");
    let mut m = cluster().connect_as("postgres", "mal4");
    m.batch_execute(
        r#"CREATE TYPE mal4.st AS ENUM ('pending', 'paid');
           CREATE TABLE mal4.seen (who text);
           GRANT INSERT ON mal4.seen TO PUBLIC;"#,
    )
    .expect("a type of the attacker's");
    // A superuser's table uses the attacker's type; the attacker may write to it.
    su.batch_execute(
        "CREATE TABLE cast_orders (id int PRIMARY KEY, status mal4.st NOT NULL DEFAULT 'pending',
                                   tags mal4.st[] DEFAULT '{paid}');
         GRANT INSERT, UPDATE, SELECT ON cast_orders TO mal4;
         SELECT webhooks.track('cast_orders', entity => 'castord', status_column => 'status');
         INSERT INTO cast_orders VALUES (1);",
    )
    .expect("track a superuser's table");
    // A transaction of the superuser is open when the cast appears.
    let mut open = cluster().connect();
    open.batch_execute("BEGIN; UPDATE cast_orders SET status = 'paid' WHERE id = 1;")
        .expect("an open write");
    m.batch_execute(
        r#"CREATE FUNCTION mal4.st_json(v mal4.st) RETURNS json LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO mal4.seen VALUES (current_user);
               PERFORM set_config('search_path', 'mal4, pg_catalog, public', false);
               BEGIN
                   EXECUTE 'ALTER ROLE mal4 SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
               RETURN to_json('cast:' || v::text);
           END $$;
           GRANT EXECUTE ON FUNCTION mal4.st_json(mal4.st) TO PUBLIC;
           CREATE CAST (mal4.st AS json) WITH FUNCTION mal4.st_json(mal4.st);
           CREATE CAST (mal4.st AS jsonb) WITH INOUT;"#,
    )
    .expect("casts to json on the attacker's type");
    open.batch_execute("COMMIT")
        .expect("the superuser's commit");
    m.batch_execute("INSERT INTO cast_orders VALUES (2)")
        .expect("the attacker's write");
    su.batch_execute("UPDATE cast_orders SET status = 'paid' WHERE id = 2; DELETE FROM cast_orders WHERE id = 1;")
        .expect("the superuser's writes");
    assert!(
        !is_superuser(&mut su, "mal4"),
        "the cast ran as a superuser"
    );
    let ran: i64 = su
        .query_one("SELECT count(*) FROM mal4.seen", &[])
        .expect("seen")
        .get(0);
    assert_eq!(ran, 0, "capture ran the attacker's cast");
    for c in [&mut su, &mut m, &mut open] {
        let path: String = c.query_one("SHOW search_path", &[]).expect("path").get(0);
        assert_eq!(path, "\"$user\", public");
    }
    let ev = events(&mut su, "castord");
    let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "castord.created",
            "castord.status_updated",
            "castord.paid",
            "castord.created",
            "castord.status_updated",
            "castord.paid",
            "castord.deleted"
        ]
    );
    // A type users made is sent as its text form.
    assert_eq!(ev[1].1["status"], "paid");
    assert_eq!(ev[1].1["tags"], "{paid}");
    assert_eq!(ev[6].1["status"], "paid", "the deleted row, as it was");

    // A child owned by another role is refused.
    m.batch_execute("CREATE TABLE mal4.lines (id int PRIMARY KEY, order_id int)")
        .expect("the attacker's child table");
    let msg = fails(
        &mut su,
        r#"CREATE TABLE own_orders (id int PRIMARY KEY);
           SELECT webhooks.track('own_orders', entity => 'ownord',
                  children => '{"lines": {"table": "mal4.lines", "foreign_key": "order_id"}}')"#,
        SqlState::INSUFFICIENT_PRIVILEGE,
    );
    assert!(msg.contains("not owned by the owner"), "{msg}");
}

#[test]
fn row_level_security_neither_runs_nor_hides_anything_from_capture() {
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE ROLE alice LOGIN; CREATE SCHEMA alice AUTHORIZATION alice; CREATE ROLE bob LOGIN;",
    )
    .expect("roles");
    let mut a = cluster().connect_as("postgres", "alice");
    a.batch_execute(
        r#"CREATE TABLE alice.calls (n int);
           GRANT USAGE ON SCHEMA alice TO bob; GRANT INSERT ON alice.calls TO bob;
           CREATE FUNCTION alice.peek(v int) RETURNS boolean LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO alice.calls VALUES (v); RETURN v <> 0; END $$;
           CREATE TABLE alice.t (id int PRIMARY KEY, v int);
           CREATE TABLE alice.items (id int PRIMARY KEY, t_id int, v int);
           ALTER TABLE alice.t ENABLE ROW LEVEL SECURITY;
           ALTER TABLE alice.items ENABLE ROW LEVEL SECURITY;
           CREATE POLICY p ON alice.t USING (alice.peek(v)) WITH CHECK (true);
           CREATE POLICY p ON alice.items USING (alice.peek(v)) WITH CHECK (true);
           GRANT SELECT, INSERT, UPDATE ON alice.t, alice.items TO bob;
           INSERT INTO alice.t VALUES (1, 1);"#,
    )
    .expect("tables under row-level security");
    su.batch_execute(
        r#"SELECT webhooks.track('alice.t', entity => 'rls',
                  children => '{"items": {"table": "alice.items", "foreign_key": "t_id"}}')"#,
    )
    .expect("track");
    // bob writes under the policies; capture reads as the owner, who bypasses them.
    let mut b = cluster().connect_as("postgres", "bob");
    b.batch_execute("INSERT INTO alice.t VALUES (2, 1); INSERT INTO alice.items VALUES (1, 2, 0);")
        .expect("insert");
    b.batch_execute("UPDATE alice.t SET v = 5 WHERE id = 1")
        .expect("update");
    let ev = events(&mut su, "rls");
    let types: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        ["rls.created", "rls.updated"],
        "nothing is hidden from capture"
    );
    assert_eq!(
        ev[0].1["items"][0]["v"], 0,
        "a child the policy hides is in the payload"
    );
    // bob's statements never ask the policy about v = 0 (the insert is checked by WITH CHECK
    // (true)); a read of the item at commit under the policy would.
    let capture_calls: i64 = a
        .query_one("SELECT count(*) FROM alice.calls WHERE n = 0", &[])
        .expect("calls")
        .get(0);
    assert_eq!(capture_calls, 0, "capture ran the owner's policy");
    // Forcing row-level security on the owner stops capture (it would run the policy).
    a.batch_execute("ALTER TABLE alice.t FORCE ROW LEVEL SECURITY")
        .expect("force");
    let msg = fails(
        &mut b,
        "UPDATE alice.t SET v = 2 WHERE id = 2",
        SqlState::FEATURE_NOT_SUPPORTED,
    );
    assert!(msg.contains("row-level security"), "{msg}");
}

#[test]
fn a_child_spelling_its_key_otherwise_still_updates_its_parent() {
    let mut su = cluster().connect();
    su.batch_execute(
        r#"CREATE TABLE sp_orders (code char(4) PRIMARY KEY, note text);
           CREATE TABLE sp_items (id int PRIMARY KEY, code char(8), qty int);
           SELECT webhooks.track('sp_orders', entity => 'spell', key_column => 'code',
                  children => '{"items": {"table": "sp_items", "foreign_key": "code"}}');
           INSERT INTO sp_orders VALUES ('ab', 'x');"#,
    )
    .expect("tables");
    su.batch_execute("INSERT INTO sp_items VALUES (1, 'ab', 1)")
        .expect("child insert");
    su.batch_execute("UPDATE sp_items SET qty = 2")
        .expect("child update");
    let types: Vec<String> = events(&mut su, "spell").into_iter().map(|e| e.0).collect();
    assert_eq!(types, ["spell.created", "spell.updated", "spell.updated"]);
}

#[test]
fn extension_types_mismatched_foreign_keys_and_unsupported_keys() {
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS citext;
         CREATE TABLE ci_customers (id int PRIMARY KEY, email citext);
         SELECT webhooks.track('ci_customers', entity => 'cicust');
         INSERT INTO ci_customers VALUES (1, 'Ada@Example.com');",
    )
    .expect("a citext column (its cast to text is no user code) is captured");
    assert_eq!(events(&mut su, "cicust")[0].1["email"], "Ada@Example.com");
    fails(
        &mut su,
        r#"CREATE TABLE fk_orders (id int PRIMARY KEY);
           CREATE TABLE fk_items (id int PRIMARY KEY, order_id text);
           SELECT webhooks.track('fk_orders', entity => 'fkord',
                  children => '{"items": {"table": "fk_items", "foreign_key": "order_id"}}')"#,
        SqlState::DATATYPE_MISMATCH,
    );
    // Keys are noted as text: types whose text depends on settings, or whose input could run
    // a domain's CHECK inside a composite, are refused.
    su.batch_execute("CREATE TYPE ci_pair AS (a int)")
        .expect("type");
    su.batch_execute("CREATE COLLATION IF NOT EXISTS ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
        .expect("a nondeterministic collation");
    for (i, ty) in [
        "timestamptz",
        "date",
        "ci_pair",
        "numeric",
        "text COLLATE ci",
    ]
    .iter()
    .enumerate()
    {
        fails(
            &mut su,
            &format!(
                "CREATE TABLE bad_key{i} (k {ty} PRIMARY KEY);
                 SELECT webhooks.track('bad_key{i}', entity => 'badkey{i}', key_column => 'k')"
            ),
            SqlState::FEATURE_NOT_SUPPORTED,
        );
    }
}

#[test]
fn capture_functions_only_run_as_row_triggers_and_only_on_permanent_tables() {
    let mut su = cluster().connect();
    let mut m = mallory(&mut su, "adm5");
    m.batch_execute(
        "CREATE TABLE adm5.t (id int PRIMARY KEY);
         SELECT webhooks.track('adm5.t', entity => 'adm');
         CREATE TRIGGER boom AFTER INSERT ON adm5.t FOR EACH STATEMENT EXECUTE FUNCTION webhooks._capture_row();",
    )
    .expect("a statement-level trigger on the capture function");
    // On the landed code this crashed the server (SIGSEGV: no row in a statement trigger).
    fails(
        &mut m,
        "INSERT INTO adm5.t VALUES (1)",
        SqlState::TRIGGERED_ACTION_EXCEPTION,
    );
    m.batch_execute("DROP TRIGGER boom ON adm5.t; INSERT INTO adm5.t VALUES (1)")
        .expect("the server is up and capture works");
    fails(
        &mut m,
        "CREATE TEMP TABLE tmp_orders (id int PRIMARY KEY); SELECT webhooks.track('tmp_orders', entity => 'tmp')",
        SqlState::WRONG_OBJECT_TYPE,
    );
    let msg = fails(
        &mut m,
        "CREATE TABLE adm5.t2 (id int PRIMARY KEY); SELECT webhooks.track('adm5.t2', entity => 'adm')",
        SqlState::DUPLICATE_OBJECT,
    );
    assert!(msg.contains("entity"), "{msg}");
}

#[test]
fn dropping_a_parent_or_a_foreign_key_leaves_no_trigger_that_breaks_the_child() {
    let mut su = cluster().connect();
    su.batch_execute("CREATE ROLE app6 LOGIN; CREATE SCHEMA app6 AUTHORIZATION app6;")
        .expect("role");
    let mut app = cluster().connect_as("postgres", "app6");
    app.batch_execute(
        r#"CREATE TABLE app6.o1 (id int PRIMARY KEY);
           CREATE TABLE app6.i1 (id int PRIMARY KEY, order_id int);
           CREATE TABLE app6.o2 (id int PRIMARY KEY);
           CREATE TABLE app6.i2 (id int PRIMARY KEY, order_id int, note text);"#,
    )
    .expect("tables");
    su.batch_execute(
        r#"SELECT webhooks.track('app6.o1', entity => 'o1', children => '{"i": {"table": "app6.i1", "foreign_key": "order_id"}}');
           SELECT webhooks.track('app6.o2', entity => 'o2', children => '{"i": {"table": "app6.i2", "foreign_key": "order_id"}}');"#,
    )
    .expect("track");
    app.batch_execute("DROP TABLE app6.o1; ALTER TABLE app6.i2 DROP COLUMN order_id;")
        .expect("a migration drops a parent and a foreign key");
    app.batch_execute("INSERT INTO app6.i1 VALUES (1, 1); INSERT INTO app6.i2 VALUES (1, 'x');")
        .expect("the children are written as before");
    let left: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('app6.i1'::regclass, 'app6.i2'::regclass)",
            &[],
        )
        .expect("triggers")
        .get(0);
    assert_eq!(left, 0);
    // The remaining tracked parent still captures.
    app.batch_execute("INSERT INTO app6.o2 VALUES (1)")
        .expect("o2");
    assert_eq!(events(&mut su, "o2").len(), 1);
    // A schema rename seen by a session that has captured before.
    su.batch_execute("ALTER SCHEMA app6 RENAME TO app6b")
        .expect("rename the schema");
    app.batch_execute("INSERT INTO app6b.o2 VALUES (2)")
        .expect("the session follows the rename");
    assert_eq!(events(&mut su, "o2").len(), 2);
}

#[test]
fn a_dump_restored_into_a_new_database_keeps_capturing() {
    let mut su = cluster().connect();
    su.batch_execute("CREATE DATABASE dump_src").expect("db");
    let mut src = cluster().connect_db("dump_src");
    src.batch_execute(
        "CREATE EXTENSION pg_webhooks;
         CREATE TABLE filler (id int); DROP TABLE filler;
         CREATE TABLE d_orders (id int PRIMARY KEY, status text);
         SELECT webhooks.track('d_orders', entity => 'dord', status_column => 'status');
         SELECT webhooks.subscribe('http://127.0.0.1:9/x');
         INSERT INTO d_orders VALUES (1, 'new');",
    )
    .expect("source");
    su.batch_execute("CREATE DATABASE dump_dst").expect("db");
    cluster().restore("dump_dst", &cluster().dump("dump_src"));
    let mut dst = cluster().connect_db("dump_dst");
    dst.batch_execute(
        "UPDATE d_orders SET status = 'paid' WHERE id = 1; INSERT INTO d_orders VALUES (2, 'new');",
    )
    .expect("the restored table is written and captured");
    let types: Vec<String> = dst
        .query(
            "SELECT type FROM webhooks.events WHERE entity = 'dord' ORDER BY seq",
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["dord.status_updated", "dord.paid", "dord.created"]);
    dst.query_one(
        "SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/y')",
        &[],
    )
    .expect("a new subscription after the restore (its id sequence was restored too)");
}

#[test]
fn a_superuser_calling_track_or_untrack_runs_no_function_or_operator_another_role_planted() {
    // A role that may create objects in a schema on the superuser's search_path plants
    // look-alikes of what track and untrack call (format, ||, jsonb_each), each
    // a better match than pg_catalog's for the argument types used, each making it superuser.
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE ROLE planter LOGIN; CREATE SCHEMA planted AUTHORIZATION planter;
         CREATE TABLE hj_orders (id int PRIMARY KEY, status text);
         CREATE TABLE hj_items (id int PRIMARY KEY, hj_id int);",
    )
    .expect("setup");
    let mut p = cluster().connect_as("postgres", "planter");
    p.batch_execute(
        "CREATE FUNCTION planted.escalate() RETURNS void LANGUAGE plpgsql SECURITY INVOKER AS
             $$BEGIN EXECUTE 'ALTER ROLE planter SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END$$;
         CREATE FUNCTION planted.format(f text, a name, b text) RETURNS text LANGUAGE plpgsql AS
             $$BEGIN PERFORM planted.escalate(); RETURN pg_catalog.format(f, a, b); END$$;
         CREATE FUNCTION planted.format(f text, a text, b regclass) RETURNS text LANGUAGE plpgsql AS
             $$BEGIN PERFORM planted.escalate(); RETURN pg_catalog.format(f, a, b); END$$;
         CREATE FUNCTION planted.format(f text, a regclass) RETURNS text LANGUAGE plpgsql AS
             $$BEGIN PERFORM planted.escalate(); RETURN pg_catalog.format(f, a); END$$;
         CREATE FUNCTION planted.cat(a text, b oid) RETURNS text LANGUAGE plpgsql AS
             $$BEGIN PERFORM planted.escalate(); RETURN a || b::text; END$$;
         CREATE OPERATOR planted.|| (LEFTARG = text, RIGHTARG = oid, FUNCTION = planted.cat);
         CREATE FUNCTION planted.jsonb_each(j jsonb, OUT key text, OUT value jsonb) RETURNS SETOF record
             LANGUAGE plpgsql AS $$BEGIN PERFORM planted.escalate(); RETURN QUERY SELECT * FROM pg_catalog.jsonb_each(j); END$$;",
    )
    .expect("plant");
    // (One transaction each: a multi-statement string is one implicit transaction.)
    for sql in [
        "SET search_path = planted, public",
        "SELECT webhooks.track('hj_orders', entity => 'hj', status_column => 'status',
                children => '{\"items\": {\"table\": \"hj_items\", \"foreign_key\": \"hj_id\"}}')",
        "INSERT INTO hj_orders VALUES (1, 'new')",
        "INSERT INTO hj_items VALUES (1, 1)",
        "SELECT webhooks.untrack('hj_orders')",
        "RESET search_path",
    ] {
        su.batch_execute(sql).expect("track and untrack with the planted schema first on the path");
    }
    assert!(!is_superuser(&mut su, "planter"), "a planted function or operator ran as the superuser");
    // track still resolved the child as the caller named it, on the caller's path.
    let types: Vec<String> = su
        .query("SELECT type FROM webhooks.events WHERE entity = 'hj' ORDER BY seq", &[])
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["hj.created", "hj.updated"]);
}

#[test]
fn concurrent_track_and_untrack_of_tables_sharing_a_child_leave_exactly_the_trigger_needed() {
    let mut su = cluster().connect();
    su.batch_execute(
        "CREATE TABLE rc_a (id int PRIMARY KEY); CREATE TABLE rc_b (id int PRIMARY KEY);
         CREATE TABLE rc_items (id int PRIMARY KEY, a_id int, b_id int);
         SELECT webhooks.track('rc_a', entity => 'rca', children => '{\"items\": {\"table\": \"rc_items\", \"foreign_key\": \"a_id\"}}');",
    )
    .expect("setup");
    let child_triggers = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'rc_items'::regclass AND tgfoid = 'webhooks._capture_child'::regproc",
            &[],
        )
        .expect("triggers")
        .get(0)
    };
    // Session 1 tracks rc_b (listing rc_items) and holds its transaction; session 2 untracks
    // rc_a meanwhile. Without one-at-a-time, session 2 would drop the trigger session 1's
    // rc_b needs (it saw no other table listing rc_items).
    let mut s1 = cluster().connect();
    s1.batch_execute(
        "BEGIN; SELECT webhooks.track('rc_b', entity => 'rcb', children => '{\"items\": {\"table\": \"rc_items\", \"foreign_key\": \"b_id\"}}')",
    )
    .expect("track rc_b");
    let port = cluster().port;
    let s2 = std::thread::spawn(move || {
        let mut c = Client::connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"), postgres::NoTls)
            .expect("connect");
        c.batch_execute("SELECT webhooks.untrack('rc_a')").expect("untrack rc_a");
    });
    common::wait_for("the untrack to wait for the track", Duration::from_secs(30), || {
        let waiting: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%untrack(''rc_a'')%'",
                &[],
            )
            .expect("activity")
            .get(0);
        (waiting == 1).then_some(())
    });
    s1.batch_execute("COMMIT").expect("commit");
    s2.join().expect("untrack");
    assert_eq!(child_triggers(&mut su), 1, "rc_b still needs its child trigger");
    su.batch_execute("INSERT INTO rc_b VALUES (1); INSERT INTO rc_items VALUES (1, NULL, 1);").expect("writes");
    assert_eq!(events(&mut su, "rcb").iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["rcb.created"]);
    su.batch_execute("INSERT INTO rc_items VALUES (2, NULL, 1)").expect("a child write");
    assert_eq!(events(&mut su, "rcb").len(), 2, "the child write is captured for rc_b");
    su.batch_execute("SELECT webhooks.untrack('rc_b')").expect("untrack rc_b");
    assert_eq!(child_triggers(&mut su), 0, "nothing needs it now");
    su.batch_execute("INSERT INTO rc_items VALUES (3, 1, 1)").expect("writes work untracked");
}

/// Waits until session `pid` waits for a lock of `locktype` (and, if given, the class and
/// number of the extension's user lock: pg_locks' classid and objid).
fn wait_for_lock_wait(c: &mut Client, pid: i32, locktype: &str, class: Option<i64>, n: Option<i64>) {
    common::wait_for("the session to wait for the lock", Duration::from_secs(30), || {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted AND locktype = $2
                    AND ($3::bigint IS NULL OR classid = $3::bigint::oid) AND ($4::bigint IS NULL OR objid = $4::bigint::oid)",
                &[&pid, &locktype, &class, &n],
            )
            .expect("pg_locks")
            .get(0);
        (waiting == 1).then_some(())
    });
}

/// Any role can take any advisory lock and keep it. track, untrack and the drop handler (which
/// runs for every DROP once something is tracked) once serialized on advisory key
/// (1885828969, 0), and a keyed emit on (0x70677768, hashtext(entity:key)): a role with no
/// rights at all could make every DROP in the database, every track, and an application's
/// emits for a key wait as long as it liked. They take locks of the extension's own now (user
/// locks, which no SQL takes): the advisory keys hold up nobody, only webhooks_admin may take
/// the tracking lock, and both locks still serialize what they serialized. Nor can a role take
/// the tracking lock through the drop handler by dropping an object of its own in a
/// transaction it keeps open: only a DROP that concerns what is tracked takes it.
#[test]
fn no_role_can_hold_up_ddl_tracking_or_emits_with_an_advisory_lock() {
    let own = Cluster::start("userlocks", &[]);
    let mut su = own.connect();
    su.batch_execute(
        "CREATE ROLE ul_app LOGIN; CREATE SCHEMA ul_app AUTHORIZATION ul_app;
         GRANT USAGE ON SCHEMA webhooks TO ul_app;
         GRANT EXECUTE ON FUNCTION webhooks.emit(text, jsonb, text) TO ul_app;
         CREATE ROLE ul_admin LOGIN; GRANT webhooks_admin TO ul_admin;
         CREATE SCHEMA ul_admin AUTHORIZATION ul_admin;
         CREATE ROLE ul_mallory LOGIN; GRANT USAGE ON SCHEMA webhooks TO ul_mallory;
         CREATE TABLE ul_app.parts (id int PRIMARY KEY, note text, spare text);
         ALTER TABLE ul_app.parts OWNER TO ul_app;
         SELECT webhooks.track('ul_app.parts');",
    )
    .expect("roles");
    let mut admin = own.connect_as("postgres", "ul_admin");
    admin
        .batch_execute(
            "CREATE TABLE ul_admin.orders (id int PRIMARY KEY, status text);
             SELECT webhooks.track('ul_admin.orders', status_column => 'status');",
        )
        .expect("track");
    let mut mallory = own.connect_as("postgres", "ul_mallory");
    mallory
        .batch_execute(
            "SELECT pg_advisory_lock(1885828969, 0), pg_advisory_lock(1885828968, hashtext('thing:k1')),
                    pg_advisory_lock(1885828968, hashtext('order:7'))",
        )
        .expect("anybody takes advisory locks");
    // And keeps DROPs of her own open: a temporary table, and a column of one that has a child
    // capture trigger (anybody may create one).
    let mut dropping = own.connect_as("postgres", "ul_mallory");
    dropping
        .batch_execute(
            "CREATE TEMP TABLE also (id int, y int);
             CREATE TRIGGER t BEFORE INSERT ON also FOR EACH ROW EXECUTE FUNCTION webhooks._capture_child();
             BEGIN; CREATE TEMP TABLE mine (id int); DROP TABLE mine; ALTER TABLE also DROP COLUMN y;",
        )
        .expect("mallory's DROPs, left open");
    // With mallory's keys held: a lock wait would fail after 10 s (55P03) instead of hanging.
    let mut app = own.connect_as("postgres", "ul_app");
    app.batch_execute(
        "SET lock_timeout = '10s';
         CREATE TABLE ul_app.scratch (id int PRIMARY KEY, note text);
         ALTER TABLE ul_app.scratch DROP COLUMN note; DROP TABLE ul_app.scratch;
         SELECT webhooks.emit('thing.noted', '{\"n\": 1}', 'k1');
         SELECT webhooks.emit('order.noted', '{\"n\": 2}', '7');",
    )
    .expect("DDL and emits do not wait for mallory");
    admin
        .batch_execute(
            "SET lock_timeout = '10s';
             CREATE TABLE ul_admin.more (id int PRIMARY KEY);
             SELECT webhooks.track('ul_admin.more'); SELECT webhooks.untrack('ul_admin.more');
             DROP TABLE ul_admin.more;",
        )
        .expect("track, untrack and DROP do not wait for mallory");
    for call in [
        "SELECT webhooks._lock_tracking()",
        "SELECT webhooks._lock_tables_for_tracking(ARRAY['pg_class'::regclass::oid])",
        "SELECT webhooks._lock_for_untracking('pg_class'::regclass::oid)",
        "SELECT webhooks._lock_tracking_for_dropping()",
    ] {
        fails(&mut mallory, call, SqlState::INSUFFICIENT_PRIVILEGE);
        fails(&mut app, call, SqlState::INSUFFICIENT_PRIVILEGE);
    }
    dropping.batch_execute("COMMIT").expect("mallory's DROP");

    // The tracking lock still puts track and a DROP of a tracked table's column one after the
    // other.
    admin
        .batch_execute("BEGIN; CREATE TABLE ul_admin.later (id int PRIMARY KEY); SELECT webhooks.track('ul_admin.later');")
        .expect("track, left open");
    app.batch_execute("RESET lock_timeout").expect("reset");
    let app_pid: i32 = app.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
    let dropper = std::thread::spawn(move || {
        app.batch_execute("ALTER TABLE ul_app.parts DROP COLUMN spare").expect("the DROP, once track committed");
        app
    });
    wait_for_lock_wait(&mut su, app_pid, "userlock", Some(1885828969), Some(0));
    admin.batch_execute("COMMIT").expect("commit track");
    let mut app = dropper.join().expect("dropper");

    // And emit's lock still puts two emits of one key one after the other.
    let mut first = own.connect_as("postgres", "ul_app");
    first.batch_execute("BEGIN; SELECT webhooks.emit('thing.noted', '{\"n\": 3}', 'k1')").expect("first emit, left open");
    let second = std::thread::spawn(move || {
        app.batch_execute("SELECT webhooks.emit('thing.noted', '{\"n\": 4}', 'k1')").expect("second emit");
    });
    wait_for_lock_wait(&mut su, app_pid, "userlock", Some(0x7067_7768), None);
    first.batch_execute("COMMIT").expect("commit the first");
    second.join().expect("second");
    let seqs: Vec<i64> = su
        .query(
            "SELECT seq FROM webhooks._events WHERE type = 'thing.noted' AND key = 'k1' ORDER BY (data ->> 'n')::int",
            &[],
        )
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs.len(), 3, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one key's events in commit order: {seqs:?}");

    // At REPEATABLE READ, a snapshot older than a track committed since would decide from a
    // _tracked that is no more: refused (40001), and nothing changed.
    su.batch_execute(
        "CREATE TABLE ul_admin.rr_a (id int PRIMARY KEY); CREATE TABLE ul_admin.rr_b (id int PRIMARY KEY);
         CREATE TABLE ul_admin.rr_items (id int PRIMARY KEY, a_id int, b_id int);
         ALTER TABLE ul_admin.rr_a OWNER TO ul_admin; ALTER TABLE ul_admin.rr_b OWNER TO ul_admin;
         ALTER TABLE ul_admin.rr_items OWNER TO ul_admin;
         SELECT webhooks.track('ul_admin.rr_a', entity => 'rra',
                children => '{\"items\": {\"table\": \"ul_admin.rr_items\", \"foreign_key\": \"a_id\"}}');",
    )
    .expect("rr tables");
    // track and untrack refuse to run from a transaction's snapshot.
    let mut stale = own.connect_as("postgres", "ul_admin");
    for call in ["SELECT webhooks.untrack('ul_admin.rr_a')", "SELECT webhooks.track('ul_admin.rr_b')"] {
        for level in ["REPEATABLE READ", "SERIALIZABLE"] {
            stale.batch_execute(&format!("BEGIN ISOLATION LEVEL {level}")).expect("begin");
            let message = fails(&mut stale, call, SqlState::INVALID_TRANSACTION_STATE);
            assert!(message.contains("runs at READ COMMITTED only"), "{message}");
            stale.batch_execute("ROLLBACK").expect("rollback");
        }
    }
    // (READ UNCOMMITTED is READ COMMITTED in PostgreSQL.)
    stale
        .batch_execute("BEGIN ISOLATION LEVEL READ UNCOMMITTED; SELECT webhooks.untrack('ul_admin.rr_a'); ROLLBACK;")
        .expect("untrack at read uncommitted");
    admin
        .batch_execute(
            "SELECT webhooks.track('ul_admin.rr_b', entity => 'rrb',
                    children => '{\"items\": {\"table\": \"ul_admin.rr_items\", \"foreign_key\": \"b_id\"}}')",
        )
        .expect("track rr_b");
    // A DROP of a table tracked after the snapshot was taken is refused too (its handler would
    // not see the table's row).
    su.batch_execute("CREATE TABLE ul_admin.rr_c (id int PRIMARY KEY); ALTER TABLE ul_admin.rr_c OWNER TO ul_admin;")
        .expect("rr_c");
    let mut drops = own.connect_as("postgres", "ul_admin");
    drops.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM ul_admin.rr_a").expect("snapshot");
    admin.batch_execute("SELECT webhooks.track('ul_admin.rr_c', entity => 'rrc')").expect("track rr_c, committed");
    let message = fails(&mut drops, "DROP TABLE ul_admin.rr_c", SqlState::T_R_SERIALIZATION_FAILURE);
    assert!(message.contains("concurrent change of what pg_webhooks tracks"), "{message}");
    drops.batch_execute("ROLLBACK").expect("rollback");
    drops.batch_execute("DROP TABLE ul_admin.rr_c").expect("at READ COMMITTED");
    let left: i64 = su
        .query_one("SELECT count(*) FROM webhooks._tracked WHERE entity = 'rrc'", &[])
        .expect("tracked")
        .get(0);
    assert_eq!(left, 0, "the dropped table is forgotten");
    drops.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM ul_admin.rr_a").expect("snapshot");
    admin.batch_execute("SELECT webhooks.untrack('ul_admin.rr_b')").expect("untrack rr_b, committed");
    fails(&mut drops, "DROP TABLE ul_admin.rr_a", SqlState::T_R_SERIALIZATION_FAILURE);
    drops.batch_execute("ROLLBACK").expect("rollback");
    // At READ COMMITTED untrack sees what committed, and the child keeps no trigger.
    stale.batch_execute("SELECT webhooks.untrack('ul_admin.rr_a')").expect("untrack at read committed");
    let triggers: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'ul_admin.rr_items'::regclass
                AND tgfoid = 'webhooks._capture_child'::regproc",
            &[],
        )
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, 0, "no tracked table lists rr_items");
}

/// track locks the table and each child before it reads their columns (as its CREATE TRIGGER
/// would, which it skips for a child that already has a capture trigger). Once it read a
/// column's number first: a DROP of that column committed before the lock (its handler did not
/// know of the table yet) left a configuration naming a dropped column, and every write to both
/// tables failing. Now the track sees the column gone (42703) and leaves nothing behind. And a
/// DROP of a child that had a trigger already, while a track of its parent is open, waits for
/// it, and then takes the child out of the payload.
#[test]
fn a_column_dropped_while_track_reads_it_fails_the_track() {
    let own = Cluster::start("trackrace", &[]);
    let mut su = own.connect();
    su.batch_execute(
        "CREATE TABLE race_other (id int PRIMARY KEY); SELECT webhooks.track('race_other');
         CREATE TABLE race_p (id int PRIMARY KEY); CREATE TABLE race_c (id int PRIMARY KEY, p_id int);",
    )
    .expect("tables");
    let pid = |c: &mut Client| -> i32 { c.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0) };
    let mut holder = own.connect();
    holder.batch_execute("BEGIN; LOCK TABLE race_c IN ROW EXCLUSIVE MODE").expect("hold the child");
    let mut dropper = own.connect();
    let dropper_pid = pid(&mut dropper);
    let dropping = std::thread::spawn(move || dropper.batch_execute("ALTER TABLE race_c DROP COLUMN p_id"));
    wait_for_lock_wait(&mut su, dropper_pid, "relation", None, None);
    let mut tracker = own.connect();
    let tracker_pid = pid(&mut tracker);
    let tracking = std::thread::spawn(move || {
        tracker.batch_execute(
            r#"SELECT webhooks.track('race_p', children => '{"items": {"table": "race_c", "foreign_key": "p_id"}}')"#,
        )
    });
    wait_for_lock_wait(&mut su, tracker_pid, "relation", None, None);
    holder.batch_execute("COMMIT").expect("release the child");
    dropping.join().expect("dropper").expect("the DROP COLUMN");
    let err = tracking.join().expect("tracker").expect_err("the track fails");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_COLUMN), "{err}");
    let tracked: i64 = su.query_one("SELECT count(*) FROM webhooks._tracked WHERE relid = 'race_p'::regclass", &[]).expect("tracked").get(0);
    assert_eq!(tracked, 0);
    su.batch_execute("INSERT INTO race_p VALUES (1); INSERT INTO race_c VALUES (1)").expect("both tables take writes");
    su.batch_execute(
        r#"ALTER TABLE race_c ADD COLUMN p_id int;
           SELECT webhooks.track('race_p', children => '{"items": {"table": "race_c", "foreign_key": "p_id"}}');
           INSERT INTO race_p VALUES (2); INSERT INTO race_c VALUES (2, 2);"#,
    )
    .expect("tracked again");
    let data = events(&mut su, "race_p");
    assert_eq!(data.len(), 1, "{data:?}");

    su.batch_execute(
        "CREATE TABLE race_q (id int PRIMARY KEY); CREATE TABLE race_d (id int PRIMARY KEY, q_id int);
         CREATE TRIGGER by_hand BEFORE INSERT ON race_d FOR EACH ROW EXECUTE FUNCTION webhooks._capture_child();",
    )
    .expect("a child with a capture trigger already");
    let mut tracker = own.connect();
    tracker
        .batch_execute(
            r#"BEGIN; SELECT webhooks.track('race_q', children => '{"lines": {"table": "race_d", "foreign_key": "q_id"}}')"#,
        )
        .expect("track, left open");
    let mut dropper = own.connect();
    let dropper_pid = pid(&mut dropper);
    let dropping = std::thread::spawn(move || dropper.batch_execute("DROP TABLE race_d"));
    wait_for_lock_wait(&mut su, dropper_pid, "relation", None, None);
    tracker.batch_execute("COMMIT").expect("commit the track");
    dropping.join().expect("dropper").expect("the DROP, after the track");
    let children: serde_json::Value = su
        .query_one("SELECT children FROM webhooks._tracked WHERE relid = 'race_q'::regclass", &[])
        .expect("tracked")
        .get(0);
    assert_eq!(children, serde_json::json!([]), "the dropped child left the payload");
    su.batch_execute("INSERT INTO race_q VALUES (1)").expect("the table takes writes");
    assert_eq!(events(&mut su, "race_q").len(), 1);

    // A track waiting for its table (a writer holds it) holds no lock a DROP needs: it takes
    // its tables before the tracking lock, as a DROP does. Taken the other way round, a DROP
    // COLUMN of a child it shares with a tracked table waited for the track's tracking lock,
    // and the track then for the child: a deadlock.
    su.batch_execute(
        r#"CREATE TABLE dl_q (id int PRIMARY KEY); CREATE TABLE dl_p (id int PRIMARY KEY);
           CREATE TABLE dl_c (id int PRIMARY KEY, q_id int, p_id int, extra int);
           SELECT webhooks.track('dl_q', children => '{"l": {"table": "dl_c", "foreign_key": "q_id"}}');"#,
    )
    .expect("a shared child");
    let mut writer = own.connect();
    writer.batch_execute("BEGIN; INSERT INTO dl_p VALUES (1)").expect("a writer holds dl_p");
    let mut tracker = own.connect();
    let tracker_pid = pid(&mut tracker);
    let tracking = std::thread::spawn(move || {
        tracker.batch_execute(r#"SELECT webhooks.track('dl_p', children => '{"l": {"table": "dl_c", "foreign_key": "p_id"}}')"#)
    });
    wait_for_lock_wait(&mut su, tracker_pid, "relation", None, None);
    let mut dropper = own.connect();
    dropper
        .batch_execute("SET lock_timeout = '10s'; ALTER TABLE dl_c DROP COLUMN extra")
        .expect("the DROP COLUMN does not wait for the waiting track");
    writer.batch_execute("COMMIT").expect("the writer commits");
    tracking.join().expect("tracker").expect("the track, once the writer committed");
    su.batch_execute("INSERT INTO dl_c VALUES (1, NULL, 1)").expect("the child takes writes");
}

/// track, untrack and the drop handler take their tables and then the tracking lock without
/// ever waiting for one while holding another they took: each waits holding nothing of its
/// own. Before, they deadlocked with each other (40P01: one held tables and waited for the
/// tracking lock, the other held that and waited for a table) and held up applications
/// behind a migration. Each case stops the sessions at the lock that decides it (a writer
/// holds a table, or a migration the tracking lock), checks what each waits for and holds,
/// then lets them go.
#[test]
fn track_untrack_and_drops_sharing_children_wait_for_each_other_without_a_deadlock() {
    let own = Cluster::start("lockorder", &["deadlock_timeout = '100ms'"]);
    let mut su = own.connect();
    // Children first: a restored dump gives them lower OIDs than their parents too.
    su.batch_execute(
        "CREATE TABLE dl_c (id int PRIMARY KEY, a_id int, b_id int);
         CREATE TABLE dl_c2 (id int PRIMARY KEY, b_id int);
         CREATE TABLE dl_c3 (id int PRIMARY KEY, d_id int, e_id int);
         CREATE TABLE dl_c4 (id int PRIMARY KEY, e_id int);
         CREATE TABLE dl_c5 (id int PRIMARY KEY, f_id int, g_id int);
         CREATE TABLE dl_c6 (id int PRIMARY KEY, f_id int, g_id int);
         CREATE TABLE dl_c7 (id int PRIMARY KEY, k_id int);
         CREATE TABLE dl_c8 (id int PRIMARY KEY, p1_id int, p2_id int, z_id int);
         CREATE TABLE dl_c9 (id int PRIMARY KEY, np_id int, nr_id int);
         CREATE TABLE dl_qc (id int PRIMARY KEY, q_id int, s_id int);
         CREATE TABLE dl_lc (id int PRIMARY KEY, l_id int);
         CREATE TABLE dl_tc (id int PRIMARY KEY, t_id int);
         CREATE TABLE dl_wc (id int PRIMARY KEY, w_id int);
         CREATE TABLE dl_rc (id int PRIMARY KEY, r_id int);
         CREATE TABLE dl_uc (id int PRIMARY KEY, u_id int);
         CREATE TABLE dl_vc (id int PRIMARY KEY, v_id int);
         CREATE TABLE dl_a (id int PRIMARY KEY); CREATE TABLE dl_b (id int PRIMARY KEY);
         CREATE TABLE dl_d (id int PRIMARY KEY); CREATE TABLE dl_e (id int PRIMARY KEY);
         CREATE TABLE dl_f (id int PRIMARY KEY); CREATE TABLE dl_g (id int PRIMARY KEY);
         CREATE TABLE dl_k (id int PRIMARY KEY); CREATE TABLE dl_h (id int PRIMARY KEY);
         CREATE TABLE dl_p1 (id int PRIMARY KEY); CREATE TABLE dl_p2 (id int PRIMARY KEY);
         CREATE TABLE dl_z (id int PRIMARY KEY); CREATE TABLE dl_y (id int PRIMARY KEY);
         CREATE TABLE dl_np (id int PRIMARY KEY, nr_id int); CREATE TABLE dl_nr (id int PRIMARY KEY);
         CREATE TABLE dl_m (id int PRIMARY KEY, extra int);
         CREATE TABLE dl_q (id int PRIMARY KEY); CREATE TABLE dl_s (id int PRIMARY KEY);
         CREATE TABLE dl_l (id int PRIMARY KEY); CREATE TABLE dl_t (id int PRIMARY KEY);
         CREATE TABLE dl_w (id int PRIMARY KEY); CREATE TABLE dl_r (id int PRIMARY KEY);
         CREATE TABLE dl_u (id int PRIMARY KEY); CREATE TABLE dl_v (id int PRIMARY KEY);
         CREATE TABLE dl_x (id int PRIMARY KEY);
         SELECT webhooks.track('dl_a', entity => 'dla', children => '{\"items\": {\"table\": \"dl_c\", \"foreign_key\": \"a_id\"}}');
         SELECT webhooks.track('dl_d', entity => 'dld', children => '{\"items\": {\"table\": \"dl_c3\", \"foreign_key\": \"d_id\"}}');
         SELECT webhooks.track('dl_p1', entity => 'dlp1', children => '{\"items\": {\"table\": \"dl_c8\", \"foreign_key\": \"p1_id\"}}');
         SELECT webhooks.track('dl_p2', entity => 'dlp2', children => '{\"items\": {\"table\": \"dl_c8\", \"foreign_key\": \"p2_id\"}}');
         SELECT webhooks.track('dl_m', entity => 'dlm');
         SELECT webhooks.track('dl_q', entity => 'dlq', children => '{\"items\": {\"table\": \"dl_qc\", \"foreign_key\": \"q_id\"}}');
         SELECT webhooks.track('dl_l', entity => 'dll', children => '{\"items\": {\"table\": \"dl_lc\", \"foreign_key\": \"l_id\"}}');
         SELECT webhooks.track('dl_w', entity => 'dlw', children => '{\"items\": {\"table\": \"dl_wc\", \"foreign_key\": \"w_id\"}}');
         SELECT webhooks.track('dl_r', entity => 'dlr', children => '{\"items\": {\"table\": \"dl_rc\", \"foreign_key\": \"r_id\"}}');
         SELECT webhooks.track('dl_x', entity => 'dlx');",
    )
    .expect("setup");
    let oid = |c: &mut Client, t: &str| -> u32 { c.query_one("SELECT $1::text::regclass::oid", &[&t]).expect("oid").get(0) };
    let ascending: Vec<u32> = ["dl_c", "dl_c2", "dl_c3", "dl_c4", "dl_c5", "dl_c6", "dl_c7", "dl_c8", "dl_c9", "dl_a", "dl_np", "dl_nr"]
        .iter()
        .map(|t| oid(&mut su, t))
        .collect();
    assert!(ascending.windows(2).all(|w| w[0] < w[1]), "the cases rely on the OIDs ascending: {ascending:?}");
    let child_triggers = |c: &mut Client, t: &str| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgfoid = 'webhooks._capture_child'::regproc",
            &[&t],
        )
        .expect("triggers")
        .get(0)
    };
    // Session `pid` waits for a table (`Some`) or the tracking lock (`None`), and holds no
    // lock on any of `tables`.
    let waits_holding_none = |c: &mut Client, pid: i32, t: Option<&str>, tables: &[&str]| {
        common::wait_for(&format!("session {pid} to wait for {t:?}"), Duration::from_secs(30), || {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted
                        AND CASE WHEN $2::text IS NULL THEN locktype = 'userlock'
                                 ELSE locktype = 'relation' AND relation = $2::text::regclass END",
                    &[&pid, &t],
                )
                .expect("pg_locks")
                .get(0);
            (n == 1).then_some(())
        });
        let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
        let held: Vec<String> = c
            .query(
                "SELECT relation::regclass::text FROM pg_locks
                  WHERE pid = $1 AND granted AND locktype = 'relation' AND relation::regclass::text = ANY ($2)",
                &[&pid, &tables],
            )
            .expect("pg_locks")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(held.is_empty(), "session {pid} waits for {t:?} holding {held:?}");
    };
    // A session running `sql` in a thread; the thread hands its connection back.
    let session = |sql: &'static str| {
        let mut c = own.connect();
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
        (pid, std::thread::spawn(move || c.batch_execute(sql).map(|_| c).map_err(|e| format!("{sql}: {e:?}"))))
    };
    // A session that has read `read` in a transaction it keeps open, then runs `sql` and
    // commits, in a thread.
    let after_reading = |read: &str, sql: &str| {
        let mut c = own.connect();
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
        c.batch_execute(&format!("BEGIN; SELECT count(*) FROM {read}")).expect("the read");
        let sql = format!("{sql}; COMMIT");
        (pid, std::thread::spawn(move || c.batch_execute(&sql).map_err(|e| format!("{e:?}"))))
    };
    let tracked = |c: &mut Client| -> Vec<String> {
        c.query("SELECT relid::text FROM webhooks._tracked ORDER BY 1", &[]).expect("tracked").iter().map(|r| r.get(0)).collect()
    };
    // What must not wait while sessions queue: it fails after 5 s (55P03) if it does.
    let mut app = own.connect();
    app.batch_execute("SET lock_timeout = '5s'").expect("lock_timeout");
    let mut writer = own.connect();
    let mut writer2 = own.connect();
    let mut holder = own.connect();
    // It drops a column of a tracked table: it keeps the tracking lock until it commits.
    const MIGRATION: &str = "BEGIN; ALTER TABLE dl_m ADD COLUMN IF NOT EXISTS extra int; ALTER TABLE dl_m DROP COLUMN extra";

    // 1. track of dl_b (children dl_c, dl_c2) waits for dl_c2, which a writer holds, holding
    // neither dl_b nor dl_c; so an untrack of dl_a, whose child trigger on dl_c it drops, goes
    // through at once. (Before, track held dl_c and waited for the tracking lock, which the
    // untrack held waiting for dl_c: 40P01.) The track then waits for dl_c, holding nothing,
    // until the untrack commits, and puts the child trigger back.
    writer.batch_execute("BEGIN; INSERT INTO dl_c2 VALUES (0, NULL)").expect("writer");
    let (track_pid, track) = session(
        "SELECT webhooks.track('dl_b', entity => 'dlb', children => '{\"a\": {\"table\": \"dl_c\", \"foreign_key\": \"b_id\"},
                                                                      \"b\": {\"table\": \"dl_c2\", \"foreign_key\": \"b_id\"}}')",
    );
    waits_holding_none(&mut su, track_pid, Some("dl_c2"), &["dl_b", "dl_c"]);
    let mut untracking = own.connect();
    untracking
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'; SELECT webhooks.untrack('dl_a')")
        .expect("untrack of dl_a, at once");
    assert_eq!(child_triggers(&mut untracking, "dl_c"), 0, "nothing tracked lists dl_c");
    writer.batch_execute("ROLLBACK").expect("writer");
    waits_holding_none(&mut su, track_pid, Some("dl_c"), &["dl_b", "dl_c2"]);
    untracking.batch_execute("COMMIT").expect("commit");
    track.join().expect("track").expect("track of dl_b");
    assert_eq!(child_triggers(&mut su, "dl_c"), 1, "dl_b's child trigger on dl_c");
    for sql in ["INSERT INTO dl_b VALUES (1)", "INSERT INTO dl_c VALUES (1, NULL, 1)", "INSERT INTO dl_c2 VALUES (1, 1)"] {
        su.batch_execute(sql).expect("writes");
    }
    assert_eq!(events(&mut su, "dlb").len(), 3, "dl_b and both its children are captured");
    assert!(events(&mut su, "dla").is_empty(), "dl_a is untracked");

    // 2. The same with a DROP of dl_d, whose handler drops its child trigger on dl_c3, while a
    // track of dl_e (children dl_c3, dl_c4) waits for dl_c4.
    writer.batch_execute("BEGIN; INSERT INTO dl_c4 VALUES (0, NULL)").expect("writer");
    let (track_pid, track) = session(
        "SELECT webhooks.track('dl_e', entity => 'dle', children => '{\"a\": {\"table\": \"dl_c3\", \"foreign_key\": \"e_id\"},
                                                                      \"b\": {\"table\": \"dl_c4\", \"foreign_key\": \"e_id\"}}')",
    );
    waits_holding_none(&mut su, track_pid, Some("dl_c4"), &["dl_e", "dl_c3"]);
    app.batch_execute("DROP TABLE dl_d").expect("DROP TABLE dl_d, at once");
    writer.batch_execute("ROLLBACK").expect("writer");
    track.join().expect("track").expect("track of dl_e");
    assert_eq!(child_triggers(&mut su, "dl_c3"), 1, "dl_e's child trigger on dl_c3");
    assert!(!tracked(&mut su).contains(&"dl_d".to_string()), "dl_d is forgotten");
    for sql in ["INSERT INTO dl_e VALUES (1)", "INSERT INTO dl_c3 VALUES (1, NULL, 1)"] {
        su.batch_execute(sql).expect("writes");
    }
    assert_eq!(events(&mut su, "dle").len(), 2, "dl_e and its child are captured");

    // 3. Two tracks list dl_c5 and dl_c6 in opposite orders (jsonb_each gives "a" first); one
    // writer holds each. Both wait for dl_c5, the lower OID, holding nothing of their own.
    writer.batch_execute("BEGIN; INSERT INTO dl_c5 VALUES (0, NULL, NULL)").expect("writer");
    writer2.batch_execute("BEGIN; INSERT INTO dl_c6 VALUES (0, NULL, NULL)").expect("writer 2");
    let (f_pid, track_f) = session(
        "SELECT webhooks.track('dl_f', entity => 'dlf', children => '{\"a\": {\"table\": \"dl_c6\", \"foreign_key\": \"f_id\"},
                                                                      \"b\": {\"table\": \"dl_c5\", \"foreign_key\": \"f_id\"}}')",
    );
    waits_holding_none(&mut su, f_pid, Some("dl_c5"), &["dl_f", "dl_c6"]);
    let (g_pid, track_g) = session(
        "SELECT webhooks.track('dl_g', entity => 'dlg', children => '{\"a\": {\"table\": \"dl_c5\", \"foreign_key\": \"g_id\"},
                                                                      \"b\": {\"table\": \"dl_c6\", \"foreign_key\": \"g_id\"}}')",
    );
    waits_holding_none(&mut su, g_pid, Some("dl_c5"), &["dl_g", "dl_c6"]);
    writer.batch_execute("ROLLBACK").expect("writer");
    writer2.batch_execute("ROLLBACK").expect("writer 2");
    track_f.join().expect("track").expect("track of dl_f");
    track_g.join().expect("track").expect("track of dl_g");
    assert_eq!((child_triggers(&mut su, "dl_c5"), child_triggers(&mut su, "dl_c6")), (1, 1));
    for sql in ["INSERT INTO dl_f VALUES (1)", "INSERT INTO dl_g VALUES (1)", "INSERT INTO dl_c5 VALUES (1, 1, 1)"] {
        su.batch_execute(sql).expect("writes");
    }
    assert_eq!((events(&mut su, "dlf").len(), events(&mut su, "dlg").len()), (2, 2), "both see the child write");

    // 4. An application transaction writes dl_k and then its child dl_c7 (lower OID) while
    // dl_k is being tracked: the track waits for dl_k holding nothing, and the child write
    // does not wait for it.
    writer.batch_execute("BEGIN; INSERT INTO dl_k VALUES (1)").expect("writer");
    let (k_pid, track_k) = session(
        "SELECT webhooks.track('dl_k', entity => 'dlk', children => '{\"items\": {\"table\": \"dl_c7\", \"foreign_key\": \"k_id\"}}')",
    );
    waits_holding_none(&mut su, k_pid, Some("dl_k"), &["dl_c7"]);
    writer.batch_execute("SET lock_timeout = '5s'; INSERT INTO dl_c7 VALUES (1, 1); COMMIT; RESET lock_timeout")
        .expect("the application's child write");
    track_k.join().expect("track").expect("track of dl_k");
    su.batch_execute("INSERT INTO dl_c7 VALUES (2, 1)").expect("a child write");
    assert_eq!(events(&mut su, "dlk").len(), 1, "the child write after the track is captured");

    // 5. A tracked table that is also a child: dl_np (child dl_c9) and dl_nr (children dl_c9
    // and dl_np), dl_c9 < dl_np < dl_nr. With a writer holding dl_np, both tracks wait for it,
    // holding nothing; before, the first took dl_np and waited for dl_c9, which the second held
    // waiting for dl_np (40P01).
    writer.batch_execute("BEGIN; INSERT INTO dl_np VALUES (0, NULL)").expect("writer");
    let (np_pid, track_np) = session(
        "SELECT webhooks.track('dl_np', entity => 'dlnp', children => '{\"items\": {\"table\": \"dl_c9\", \"foreign_key\": \"np_id\"}}')",
    );
    waits_holding_none(&mut su, np_pid, Some("dl_np"), &["dl_c9"]);
    let (nr_pid, track_nr) = session(
        "SELECT webhooks.track('dl_nr', entity => 'dlnr', children => '{\"a\": {\"table\": \"dl_c9\", \"foreign_key\": \"nr_id\"},
                                                                        \"b\": {\"table\": \"dl_np\", \"foreign_key\": \"nr_id\"}}')",
    );
    waits_holding_none(&mut su, nr_pid, Some("dl_np"), &["dl_c9", "dl_nr"]);
    writer.batch_execute("ROLLBACK").expect("writer");
    track_np.join().expect("track").expect("track of dl_np");
    track_nr.join().expect("track").expect("track of dl_nr");
    for sql in ["INSERT INTO dl_nr VALUES (1)", "INSERT INTO dl_np VALUES (1, 1)"] {
        su.batch_execute(sql).expect("writes");
    }
    assert_eq!(events(&mut su, "dlnr").len(), 2, "dl_nr sees its child dl_np's row");
    assert_eq!(events(&mut su, "dlnp").len(), 1, "dl_np is tracked itself");

    // 6. A migration keeps the tracking lock (it dropped a column of tracked dl_m). An untrack
    // of dl_q and a track of dl_s (sharing dl_q's child dl_qc) wait for it holding nothing:
    // the application reads and writes all three meanwhile.
    holder.batch_execute(MIGRATION).expect("the migration");
    let (q_pid, untrack_q) = session("SELECT webhooks.untrack('dl_q')");
    waits_holding_none(&mut su, q_pid, None, &["dl_q", "dl_qc"]);
    let (s_pid, track_s) = session(
        "SELECT webhooks.track('dl_s', entity => 'dls', children => '{\"items\": {\"table\": \"dl_qc\", \"foreign_key\": \"s_id\"}}')",
    );
    waits_holding_none(&mut su, s_pid, None, &["dl_s", "dl_qc"]);
    // (A DROP holds what it drops; its handler waits holding nothing of the child.)
    let (w_pid, drop_w) = session("DROP TABLE dl_w");
    waits_holding_none(&mut su, w_pid, None, &["dl_wc"]);
    app.batch_execute(
        "BEGIN; INSERT INTO dl_q VALUES (1); INSERT INTO dl_qc VALUES (1, 1, NULL); INSERT INTO dl_s VALUES (1);
         SELECT count(*) FROM dl_q; COMMIT;",
    )
    .expect("the application does not wait for the untrack or the track");
    holder.batch_execute("COMMIT").expect("the migration commits");
    untrack_q.join().expect("untrack").expect("untrack of dl_q");
    track_s.join().expect("track").expect("track of dl_s");
    drop_w.join().expect("drop").expect("DROP TABLE dl_w");
    assert_eq!(child_triggers(&mut su, "dl_wc"), 0, "nothing tracked lists dl_wc");
    assert_eq!(child_triggers(&mut su, "dl_qc"), 1, "dl_s's child trigger on dl_qc");
    su.batch_execute("INSERT INTO dl_qc VALUES (2, NULL, 1)").expect("a child write");
    assert_eq!(events(&mut su, "dls").len(), 1, "dl_s sees its child's write");

    // 7. What an untrack decides before the tracking lock is stale under it. A migration holds
    // the tracking lock; untracks of dl_p1 and dl_p2 (both list dl_c8) queue for it, each
    // having seen dl_c8 shared; a writer holds dl_c8, and a track of dl_z (child dl_c8) waits
    // for it. Once dl_p1 is untracked, dl_p2's untrack finds dl_c8 unshared and busy: it lets
    // the tracking lock go (an unrelated track gets it at once) and waits for dl_c8 behind the
    // track of dl_z, which then commits first: the untrack keeps the trigger dl_z needs.
    holder.batch_execute(MIGRATION).expect("the migration");
    let (u_pid, untrack_p1) = session("SELECT webhooks.untrack('dl_p1')");
    waits_holding_none(&mut su, u_pid, None, &["dl_p1", "dl_c8"]);
    let (v_pid, untrack_p2) = session("SELECT webhooks.untrack('dl_p2')");
    waits_holding_none(&mut su, v_pid, None, &["dl_p2", "dl_c8"]);
    writer.batch_execute("BEGIN; INSERT INTO dl_c8 VALUES (0, NULL, NULL, NULL)").expect("writer");
    let (z_pid, track_z) = session(
        "SELECT webhooks.track('dl_z', entity => 'dlz', children => '{\"items\": {\"table\": \"dl_c8\", \"foreign_key\": \"z_id\"}}')",
    );
    waits_holding_none(&mut su, z_pid, Some("dl_c8"), &["dl_z"]);
    holder.batch_execute("COMMIT").expect("the migration commits");
    untrack_p1.join().expect("untrack").expect("untrack of dl_p1");
    waits_holding_none(&mut su, v_pid, Some("dl_c8"), &["dl_p2"]);
    app.batch_execute("SELECT webhooks.track('dl_y', entity => 'dly')").expect("the tracking lock is free");
    writer.batch_execute("ROLLBACK").expect("writer");
    track_z.join().expect("track").expect("track of dl_z");
    untrack_p2.join().expect("untrack").expect("untrack of dl_p2");
    let kept: String = su
        .query_one(
            "SELECT string_agg(tgname, ',') FROM pg_trigger
              WHERE tgrelid = 'dl_c8'::regclass AND tgfoid = 'webhooks._capture_child'::regproc",
            &[],
        )
        .expect("triggers")
        .get(0);
    assert_eq!(kept, format!("webhooks_child_{}", oid(&mut su, "dl_p1")), "the untrack kept the trigger dl_z needs");
    let now = tracked(&mut su);
    assert!(["dl_z", "dl_y"].iter().all(|t| now.contains(&t.to_string())), "{now:?}");
    assert!(!now.contains(&"dl_p1".to_string()) && !now.contains(&"dl_p2".to_string()), "{now:?}");
    for sql in ["INSERT INTO dl_z VALUES (1)", "INSERT INTO dl_c8 VALUES (1, NULL, NULL, 1)"] {
        su.batch_execute(sql).expect("writes");
    }
    assert_eq!(events(&mut su, "dlz").len(), 2, "dl_z and its child are captured");
    assert!(events(&mut su, "dlp2").is_empty(), "dl_p2 is untracked");

    // 8. An admin who does not own a tracked table is refused by untrack before it takes any
    // lock: it waits neither for the tracking lock (a migration holds it) nor for a writer.
    // The functions that take the locks check what they lock as track and untrack would.
    su.batch_execute("CREATE ROLE dl_admin LOGIN IN ROLE webhooks_admin").expect("role");
    holder.batch_execute(MIGRATION).expect("the migration");
    writer.batch_execute("BEGIN; INSERT INTO dl_z VALUES (2)").expect("writer");
    let mut stranger = own.connect_as("postgres", "dl_admin");
    stranger.batch_execute("SET lock_timeout = '5s'").expect("lock_timeout");
    let message = fails(&mut stranger, "SELECT webhooks.untrack('dl_z')", SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(message.contains("must be owner of relation dl_z"), "{message}");
    for call in [
        "SELECT webhooks._lock_for_untracking('dl_z'::regclass::oid)",
        "SELECT webhooks._lock_tables_for_tracking(ARRAY['dl_z'::regclass::oid])",
        "SELECT webhooks._lock_tables_for_tracking(ARRAY['pg_catalog.pg_authid'::regclass::oid])",
    ] {
        fails(&mut stranger, call, SqlState::INSUFFICIENT_PRIVILEGE);
    }
    fails(&mut stranger, "SELECT webhooks._lock_tracking_for_dropping()", SqlState::INSUFFICIENT_PRIVILEGE);
    writer.batch_execute("ROLLBACK").expect("writer");
    holder.batch_execute("COMMIT").expect("the migration commits");
    assert!(tracked(&mut su).contains(&"dl_z".to_string()), "dl_z is still tracked");

    // 9. Trying again is bounded. Two writers take turns to hold dl_l and its child dl_lc,
    // each taking its table back as soon as the untrack of dl_l let go of it: every try finds
    // the other table busy. After a few rounds (locks.rs BACKOFFS) the untrack takes the
    // tracking lock and then each table in turn, as DDL does, and goes through once the
    // writers stop.
    let tables = ["dl_l", "dl_lc"];
    let take = ["BEGIN; INSERT INTO dl_l VALUES (100)", "BEGIN; INSERT INTO dl_lc VALUES (100, NULL)"];
    let mut writers = [own.connect(), own.connect()];
    for (w, sql) in writers.iter_mut().zip(take) {
        w.batch_execute(sql).expect("a writer takes its table");
    }
    let (l_pid, untrack_l) = session("SELECT webhooks.untrack('dl_l')");
    let waiting_for = |c: &mut Client| -> Option<(String, Vec<String>, bool)> {
        let waits: Vec<String> = c
            .query(
                "SELECT relation::regclass::text FROM pg_locks WHERE pid = $1 AND NOT granted AND locktype = 'relation'",
                &[&l_pid],
            )
            .expect("pg_locks")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let held: Vec<String> = c
            .query(
                "SELECT relation::regclass::text FROM pg_locks
                  WHERE pid = $1 AND granted AND locktype = 'relation' AND relation::regclass::text IN ('dl_l', 'dl_lc')",
                &[&l_pid],
            )
            .expect("pg_locks")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let tracking: bool = c
            .query_one("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND granted AND locktype = 'userlock')", &[&l_pid])
            .expect("pg_locks")
            .get(0);
        waits.first().map(|w| (w.clone(), held, tracking))
    };
    // Until the untrack waits for `tables[w]`: whether it holds anything then (of the two
    // tables, or the tracking lock).
    let mut observe = |w: usize| -> (Vec<String>, bool) {
        common::wait_for(&format!("the untrack to wait for {}", tables[w]), Duration::from_secs(30), || {
            waiting_for(&mut su).filter(|(t, _, _)| *t == tables[w]).map(|(_, held, tracking)| (held, tracking))
        })
    };
    assert_eq!(observe(0), (vec![], false), "it waits for dl_l holding nothing");
    let (mut waits, mut rounds) = (0, 0);
    loop {
        // The writer of the table it waits for lets go: it takes that one and finds the other
        // busy.
        writers[waits].batch_execute("ROLLBACK").expect("writer lets go");
        let next = 1 - waits;
        let (held, tracking) = observe(next);
        if tracking {
            // The tracking lock (taken first, holding nothing), then each table in turn:
            // dl_l, which is free now, before dl_lc.
            let first: Vec<String> = if next == 1 { vec!["dl_l".to_string()] } else { vec![] };
            assert_eq!(held, first, "it waits for {} holding the tracking lock", tables[next]);
            break;
        }
        assert!(held.is_empty(), "it waits for {} holding {held:?}", tables[next]);
        rounds += 1;
        assert!(rounds <= 20, "the untrack still lets go of everything after {rounds} rounds");
        writers[waits].batch_execute(take[waits]).expect("writer takes its table back");
        waits = next;
    }
    assert!(rounds >= 3, "it tried again before it waited holding a lock ({rounds} rounds)");
    writers[1 - waits].batch_execute("ROLLBACK").expect("writer stops");
    untrack_l.join().expect("untrack").expect("untrack of dl_l");
    assert_eq!(child_triggers(&mut su, "dl_lc"), 0, "nothing tracked lists dl_lc");

    // 10. A track in a transaction that has read its tables, while DDL of each waits for that
    // transaction: a try fails (somebody waits), a wait is granted at once (they wait for this
    // transaction). It takes them and goes through, and the DDL after it.
    let mut reader = own.connect();
    reader.batch_execute("BEGIN; SELECT count(*) FROM dl_t; SELECT count(*) FROM dl_tc").expect("reads");
    let (t_pid, alter_t) = session("ALTER TABLE dl_t ADD COLUMN n int");
    waits_holding_none(&mut su, t_pid, Some("dl_t"), &[]);
    let (tc_pid, alter_tc) = session("ALTER TABLE dl_tc ADD COLUMN n int");
    waits_holding_none(&mut su, tc_pid, Some("dl_tc"), &[]);
    reader
        .batch_execute(
            "SET statement_timeout = '30s';
             SELECT webhooks.track('dl_t', entity => 'dlt', children => '{\"items\": {\"table\": \"dl_tc\", \"foreign_key\": \"t_id\"}}');
             COMMIT",
        )
        .expect("the track goes through");
    alter_t.join().expect("alter").expect("ALTER TABLE dl_t");
    alter_tc.join().expect("alter").expect("ALTER TABLE dl_tc");
    su.batch_execute("INSERT INTO dl_t VALUES (1, 1)").expect("writes");
    assert_eq!(events(&mut su, "dlt").len(), 1, "dl_t is tracked");

    // 11. An application transaction reads dl_r and then writes it while dl_r is untracked:
    // the untrack, which needs ACCESS EXCLUSIVE, waits for the reader holding nothing and
    // queueing for nothing, and the write goes through.
    writer.batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'; SELECT count(*) FROM dl_r").expect("the read");
    let writer_pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
    let (r_pid, untrack_r) = session("SELECT webhooks.untrack('dl_r')");
    common::wait_for("the untrack to wait for the reader", Duration::from_secs(30), || {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_locks w JOIN pg_locks h ON h.locktype = 'virtualxid' AND h.virtualxid = w.virtualxid
                  WHERE w.pid = $1 AND NOT w.granted AND w.locktype = 'virtualxid' AND h.pid = $2 AND h.granted",
                &[&r_pid, &writer_pid],
            )
            .expect("pg_locks")
            .get(0);
        (n == 1).then_some(())
    });
    let held: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND locktype IN ('relation', 'userlock')
                AND (locktype = 'userlock' OR relation IN ('dl_r'::regclass, 'dl_rc'::regclass))",
            &[&r_pid],
        )
        .expect("pg_locks")
        .get(0);
    assert_eq!(held, 0, "the untrack waits for the reader holding nothing");
    writer
        .batch_execute("INSERT INTO dl_r VALUES (1); INSERT INTO dl_rc VALUES (1, 1); COMMIT")
        .expect("the reader writes without waiting");
    untrack_r.join().expect("untrack").expect("untrack of dl_r");
    assert_eq!(child_triggers(&mut su, "dl_rc"), 0, "nothing tracked lists dl_rc");

    // 12. A track in a transaction that has read a child a writer holds: the track waits for
    // that child first, holding nothing of its own, and the writer goes on to write the table.
    writer.batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'; INSERT INTO dl_uc VALUES (1, NULL)").expect("writer");
    let (tracker_pid, track_u) = after_reading(
        "dl_uc",
        "SELECT webhooks.track('dl_u', entity => 'dlu', children => '{\"items\": {\"table\": \"dl_uc\", \"foreign_key\": \"u_id\"}}')",
    );
    waits_holding_none(&mut su, tracker_pid, Some("dl_uc"), &["dl_u"]);
    writer.batch_execute("INSERT INTO dl_u VALUES (1); COMMIT").expect("the writer writes the table without waiting");
    track_u.join().expect("track").expect("track of dl_u");
    su.batch_execute("INSERT INTO dl_uc VALUES (2, 1)").expect("a child write");
    assert_eq!(events(&mut su, "dlu").len(), 1, "dl_u sees its child's write");

    // 13. The other way round: the transaction read the table, and a writer holds the child.
    // The track waits for the child holding nothing stronger than its own read of the table,
    // and the writer goes on to write the table.
    let stronger_than_reads = |c: &mut Client, pid: i32, t: &str| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND locktype = 'relation'
                AND relation = $2::text::regclass AND mode <> 'AccessShareLock'",
            &[&pid, &t],
        )
        .expect("pg_locks")
        .get(0)
    };
    writer.batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'; INSERT INTO dl_vc VALUES (1, NULL)").expect("writer");
    let (tracker_pid, track_v) = after_reading(
        "dl_v",
        "SELECT webhooks.track('dl_v', entity => 'dlv', children => '{\"items\": {\"table\": \"dl_vc\", \"foreign_key\": \"v_id\"}}')",
    );
    waits_holding_none(&mut su, tracker_pid, Some("dl_vc"), &[]);
    assert_eq!(stronger_than_reads(&mut su, tracker_pid, "dl_v"), 0, "the track holds only its read of dl_v");
    writer.batch_execute("INSERT INTO dl_v VALUES (1); COMMIT").expect("the writer writes the table without waiting");
    track_v.join().expect("track").expect("track of dl_v");

    // 14. A transaction that read tracked dl_x untracks it while a migration holds the
    // tracking lock: it waits for the lock holding nothing stronger than its read, and the
    // application writes dl_x meanwhile.
    holder.batch_execute(MIGRATION).expect("the migration");
    let (untracker_pid, untrack_x) = after_reading("dl_x", "SELECT webhooks.untrack('dl_x')");
    waits_holding_none(&mut su, untracker_pid, None, &[]);
    assert_eq!(stronger_than_reads(&mut su, untracker_pid, "dl_x"), 0, "the untrack holds only its read of dl_x");
    app.batch_execute("INSERT INTO dl_x VALUES (1)").expect("the application writes dl_x without waiting");
    holder.batch_execute("COMMIT").expect("the migration commits");
    untrack_x.join().expect("untrack").expect("untrack of dl_x");
    assert!(!tracked(&mut su).contains(&"dl_x".to_string()), "dl_x is untracked");
}
