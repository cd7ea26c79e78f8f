//! Upgrades: a database created at the previous version (its full script is archived in
//! sql/archive/), holding tracked tables, subscriptions and undelivered events, is updated with
//! `ALTER EXTENSION pg_webhooks UPDATE` while the new library runs, and then delivers everything;
//! and the updated schema is the one a fresh install gives, object by object.

mod common;

use common::{wait_for, Cluster, Receiver};
use postgres::Client;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const OLD: &str = "0.1.0";

/// Every object of the extension with what defines it: definitions, columns, constraints,
/// indexes, triggers, options, privileges and comments. Two databases with equal maps have the
/// same extension schema.
fn schema_of(c: &mut Client) -> BTreeMap<String, String> {
    let rows = c
        .query(
            r#"
WITH members AS (
    SELECT d.classid, d.objid
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass
       AND e.extname = 'pg_webhooks' AND d.deptype = 'e'
)
SELECT pg_catalog.pg_describe_object(m.classid, m.objid, 0),
       CASE m.classid
       WHEN 'pg_catalog.pg_proc'::regclass THEN
            (SELECT CASE WHEN p.prokind = 'a' THEN
                        (SELECT format('aggregate %s(%s) sfunc %s stype %s final %s combine %s init %s',
                                       p.oid::regproc, pg_catalog.pg_get_function_arguments(p.oid), a.aggtransfn,
                                       a.aggtranstype::regtype, a.aggfinalfn, a.aggcombinefn, a.agginitval)
                           FROM pg_catalog.pg_aggregate a WHERE a.aggfnoid = p.oid)
                    ELSE pg_catalog.pg_get_functiondef(p.oid) END
               FROM pg_catalog.pg_proc p WHERE p.oid = m.objid)
            || ' acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text)
                                      FROM pg_catalog.pg_proc p, unnest(p.proacl) a WHERE p.oid = m.objid), '-')
            || ' comment=' || coalesce(pg_catalog.obj_description(m.objid, 'pg_proc'), '-')
       WHEN 'pg_catalog.pg_class'::regclass THEN
            (SELECT concat_ws(E'\n',
                'kind=' || c.relkind::text || ' options=' || coalesce(c.reloptions::text, '-'),
                'acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(c.relacl) a), '-'),
                'comment=' || coalesce(pg_catalog.obj_description(c.oid, 'pg_class'), '-'),
                (SELECT string_agg(format('col %s %s %s %s notnull=%s identity=%s default=%s compression=%s acl=%s comment=%s',
                                          (SELECT count(*) FROM pg_catalog.pg_attribute b WHERE b.attrelid = c.oid AND b.attnum > 0
                                             AND NOT b.attisdropped AND b.attnum <= a.attnum), a.attname,
                                          pg_catalog.format_type(a.atttypid, a.atttypmod),
                                          coalesce(a.attcollation::regcollation::text, '-'),
                                          a.attnotnull, a.attidentity,
                                          coalesce(pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '-'),
                                          coalesce(nullif(a.attcompression::text, ''), '-'),
                                          coalesce(a.attacl::text, '-'),
                                          coalesce(pg_catalog.col_description(c.oid, a.attnum), '-')),
                                   E'\n' ORDER BY a.attnum)
                   FROM pg_catalog.pg_attribute a
                   LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                (SELECT string_agg('constraint ' || conname || ' ' || pg_catalog.pg_get_constraintdef(oid), E'\n' ORDER BY conname)
                   FROM pg_catalog.pg_constraint WHERE conrelid = c.oid),
                (SELECT string_agg('index ' || pg_catalog.pg_get_indexdef(indexrelid), E'\n'
                                   ORDER BY pg_catalog.pg_get_indexdef(indexrelid))
                   FROM pg_catalog.pg_index WHERE indrelid = c.oid),
                (SELECT string_agg('trigger ' || pg_catalog.pg_get_triggerdef(oid), E'\n' ORDER BY tgname)
                   FROM pg_catalog.pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal),
                CASE WHEN c.relkind = 'v' THEN 'view ' || pg_catalog.pg_get_viewdef(c.oid) END,
                CASE WHEN c.relkind = 'S' THEN
                    (SELECT format('sequence %s %s %s %s %s', seqtypid::regtype, seqstart, seqincrement, seqmin, seqmax)
                       FROM pg_catalog.pg_sequence WHERE seqrelid = c.oid) END)
               FROM pg_catalog.pg_class c WHERE c.oid = m.objid)
       WHEN 'pg_catalog.pg_event_trigger'::regclass THEN
            (SELECT format('%s %s %s %s', evtevent, evtfoid::regproc, evtenabled, evttags)
               FROM pg_catalog.pg_event_trigger WHERE oid = m.objid)
       WHEN 'pg_catalog.pg_type'::regclass THEN
            (SELECT format('%s %s', typtype, typrelid::regclass) FROM pg_catalog.pg_type WHERE oid = m.objid)
       ELSE 'member'
       END
  FROM members m
"#,
            &[],
        )
        .expect("schema of the extension");
    let mut map = BTreeMap::new();
    for r in rows {
        let name: String = r.get(0);
        // `cargo pgrx test` installs a build with the #[pg_test] functions (schema `tests`),
        // which no release has.
        if name == "schema tests" || name.starts_with("function tests.") {
            continue;
        }
        map.insert(name, r.get::<_, Option<String>>(1).unwrap_or_default());
    }
    // Which tables pg_dump keeps the rows of.
    let dumped: Vec<String> = c
        .query(
            "SELECT unnest(extconfig)::regclass::text || ' ' || unnest(extcondition)
               FROM pg_catalog.pg_extension WHERE extname = 'pg_webhooks' ORDER BY 1",
            &[],
        )
        .expect("extconfig")
        .iter()
        .map(|r| r.get(0))
        .collect();
    map.insert("config dump".into(), dumped.join("\n"));
    map
}

fn version(c: &mut Client) -> String {
    c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_webhooks'", &[])
        .expect("extversion")
        .get(0)
}

fn worker_state(c: &mut Client, db: &str) -> Option<String> {
    c.query_opt("SELECT state FROM webhooks.worker_status() WHERE database = $1 AND worker = 0", &[&db])
        .expect("worker_status")
        .map(|r| r.get(0))
}

#[test]
fn a_database_at_the_previous_version_updates_and_delivers_what_it_captured_before() {
    common::install_archived_script(OLD);
    let cluster = Cluster::start(
        "upgrade",
        &["webhooks.database = 'postgres, shop'", "webhooks.poll_interval = '200ms'"],
    );
    let rx = Receiver::start();
    let mut su = cluster.connect();
    su.batch_execute("CREATE DATABASE shop").expect("create database");
    su.batch_execute("CREATE ROLE app LOGIN; CREATE ROLE integrator LOGIN").expect("roles");
    let mut shop = cluster.connect_db("shop");
    shop.batch_execute(&format!("CREATE EXTENSION pg_webhooks VERSION '{OLD}'")).expect("create old version");
    assert_eq!(version(&mut shop), OLD);
    // What a shop has at the old version: an application role writing tracked orders with
    // items, an integrator managing subscriptions.
    shop.batch_execute(
        "GRANT webhooks_admin TO integrator;
         CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending', total numeric);
         CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint REFERENCES orders, sku text);
         ALTER TABLE orders OWNER TO app; ALTER TABLE order_items OWNER TO app;
         SELECT webhooks.track('orders', status_column => 'status',
                children => '{\"items\": {\"table\": \"order_items\", \"foreign_key\": \"order_id\"}}');",
    )
    .expect("tracked orders");
    let mut integrator = cluster.connect_as("shop", "integrator");
    let row = integrator
        .query_one("SELECT id, secret FROM webhooks.subscribe($1)", &[&rx.url("/erp")])
        .expect("subscribe");
    let (sub, secret): (i64, String) = (row.get(0), row.get(1));
    rx.configure(json!({"path": "/erp", "secret": secret, "style": "standard"}));

    // The worker of the old database waits for the update, and says so.
    let state = wait_for("shop's worker to wait for the update", WAIT, || {
        worker_state(&mut su, "shop").filter(|s| s.contains("UPDATE"))
    });
    assert_eq!(state, "waiting for ALTER EXTENSION UPDATE");
    assert_eq!(worker_state(&mut su, "postgres").as_deref(), Some("idle"));
    wait_for("the warning in the log", WAIT, || {
        cluster.server_log().contains("is version 0.1.0 and the library is").then_some(())
    });

    // Capture keeps working at the old version: events are written, nothing is sent yet.
    let mut app = cluster.connect_as("shop", "app");
    app.batch_execute(
        "BEGIN; INSERT INTO orders VALUES (1, 'pending', 10); INSERT INTO order_items (order_id, sku) VALUES (1, 'A'); COMMIT;
         UPDATE orders SET status = 'paid' WHERE id = 1;",
    )
    .expect("writes before the update");
    let before: i64 = shop.query_one("SELECT count(*) FROM webhooks.events", &[]).expect("events").get(0);
    assert_eq!(before, 3, "created, status_updated, paid");
    assert!(rx.log("/erp").is_empty(), "nothing is delivered before the update");

    // The update, as the DBA runs it; then everything flows, old events and new.
    shop.batch_execute("ALTER EXTENSION pg_webhooks UPDATE").expect("update");
    assert_eq!(version(&mut shop), env!("CARGO_PKG_VERSION"));
    app.batch_execute("UPDATE orders SET status = 'shipped' WHERE id = 1").expect("write after the update");
    let got = rx.wait_for_requests("/erp", 5, WAIT);
    let types: Vec<String> = got
        .iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(types, ["order.created", "order.status_updated", "order.paid", "order.status_updated", "order.shipped"]);
    assert!(got.iter().all(|r| r["verified"] == json!(true)), "{got:?}");
    assert_eq!(got[0]["json"]["data"]["items"][0]["sku"], "A");
    wait_for("5 succeeded deliveries recorded", WAIT, || {
        let n: i64 = shop
            .query_one(
                "SELECT count(*) FROM webhooks.deliveries WHERE subscription_id = $1 AND status = 'succeeded'",
                &[&sub],
            )
            .expect("deliveries")
            .get(0);
        (n == 5).then_some(())
    });
    let state = wait_for("shop's worker to deliver", WAIT, || {
        worker_state(&mut su, "shop").filter(|s| s == "idle" || s == "delivering")
    });
    assert!(state == "idle" || state == "delivering");

    // The updated schema is exactly a fresh install's.
    let mut fresh = cluster.fresh_db("fresh");
    let (updated, installed) = (schema_of(&mut shop), schema_of(&mut fresh));
    let keys: std::collections::BTreeSet<&String> = updated.keys().chain(installed.keys()).collect();
    let mut differences = Vec::new();
    for k in keys {
        let (u, i) = (updated.get(k), installed.get(k));
        if u != i {
            differences.push(format!("{k}:\n  updated: {u:?}\n  fresh:   {i:?}"));
        }
    }
    assert!(differences.is_empty(), "the update script differs from a fresh install:\n{}", differences.join("\n"));
    assert!(installed.len() > 40, "the comparison saw the extension's objects: {}", installed.len());
}

#[test]
fn the_update_script_cannot_be_run_by_hand_and_an_unknown_version_is_refused() {
    common::install_archived_script(OLD);
    let cluster = Cluster::start("upgrade_refusals", &[]);
    let mut c = cluster.connect();
    let err = c
        .batch_execute("ALTER EXTENSION pg_webhooks UPDATE TO '9.9.9'")
        .expect_err("no such version");
    let db = err.as_db_error().expect("database error");
    assert_eq!(db.code(), &postgres::error::SqlState::INVALID_PARAMETER_VALUE, "{}", db.message());
    // Already current: a no-op with a notice, nothing changed.
    c.batch_execute("ALTER EXTENSION pg_webhooks UPDATE").expect("no-op update");
    assert_eq!(version(&mut c), env!("CARGO_PKG_VERSION"));
    // The update path from the previous version is known to PostgreSQL.
    let path: Option<String> = c
        .query_one(
            "SELECT path FROM pg_extension_update_paths('pg_webhooks') WHERE source = $1 AND target = $2",
            &[&OLD, &env!("CARGO_PKG_VERSION")],
        )
        .expect("update paths")
        .get(0);
    assert_eq!(path.as_deref(), Some(format!("{OLD}--{}", env!("CARGO_PKG_VERSION")).as_str()));
}

/// The update sets `_events.data`'s compression last and waits for `_events`' lock at most
/// 100 ms: it already holds `_tracked` and `_subscriptions`, and a session holding `_events`
/// that then needs one of those would deadlock with it. With `_events` busy the update still
/// commits, says so with a WARNING and its fix, and capture stores data uncompressed; the
/// DBA's ALTER later makes it compress.
#[test]
fn an_update_with_the_events_table_busy_commits_without_compression_and_says_so() {
    common::install_archived_script(OLD);
    let cluster = Cluster::start("upgrade_busy", &[]);
    let mut c = cluster.connect();
    c.batch_execute(&format!(
        "DROP EXTENSION pg_webhooks; CREATE EXTENSION pg_webhooks VERSION '{OLD}';
         CREATE TABLE busy_orders (id int PRIMARY KEY, note text);
         SELECT webhooks.track('busy_orders', entity => 'busy');"
    ))
    .expect("old version");
    let mut holder = cluster.connect();
    holder
        .batch_execute("BEGIN; LOCK TABLE webhooks._events IN ROW EXCLUSIVE MODE")
        .expect("hold _events");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = notices.clone();
    let mut config = postgres::Config::new();
    config.host("127.0.0.1").port(cluster.port).user("postgres").dbname("postgres");
    config.notice_callback(move |n| seen.lock().unwrap().push(format!("{} {}", n.message(), n.hint().unwrap_or(""))));
    let mut updater = config.connect(postgres::NoTls).expect("connect");
    updater.batch_execute("ALTER EXTENSION pg_webhooks UPDATE").expect("the update commits");
    holder.batch_execute("COMMIT").expect("release");
    assert_eq!(version(&mut c), env!("CARGO_PKG_VERSION"));
    let said = notices.lock().unwrap().join("\n");
    assert!(
        said.contains("webhooks._events is busy") && said.contains("SET COMPRESSION lz4"),
        "{said}"
    );
    assert_eq!(common::events_data_method(&mut c), "", "no method set while _events was busy");
    let note = "repeat('please leave the parcel at the door; ', 10)";
    c.batch_execute(&format!("INSERT INTO busy_orders VALUES (1, {note})")).expect("insert");
    c.batch_execute("ALTER TABLE webhooks._events ALTER COLUMN data SET COMPRESSION lz4").expect("the hint's fix");
    c.batch_execute(&format!("INSERT INTO busy_orders VALUES (2, {note})")).expect("insert");
    assert_eq!(common::stored_compression(&mut c, "busy"), [None, Some("lz4".to_string())]);
}
