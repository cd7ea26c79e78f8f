//! Dump and restore: `pg_dump` of a shop database, restored into a new cluster, keeps tracking
//! (children included), subscriptions and their secrets and headers, and sends nothing of the
//! history again.

mod common;

use common::{wait_for, Cluster, Receiver};
use postgres::Client;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

const SHOP: &str = "
    CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending', total numeric);
    CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint REFERENCES orders ON DELETE CASCADE,
                              sku text, qty int);
    CREATE TABLE shipments (id bigserial PRIMARY KEY, order_id bigint REFERENCES orders, carrier text);
    CREATE TABLE products (sku text PRIMARY KEY, name text);
    ALTER TABLE orders OWNER TO app; ALTER TABLE order_items OWNER TO app;
    ALTER TABLE shipments OWNER TO app; ALTER TABLE products OWNER TO app;
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO clerk;
    GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO clerk;
    SELECT webhooks.track('orders', status_column => 'status',
        children => '{\"items\": {\"table\": \"order_items\", \"foreign_key\": \"order_id\"},
                      \"shipments\": {\"table\": \"shipments\", \"foreign_key\": \"order_id\"}}');
    SELECT webhooks.track('products', key_column => 'sku');
";

fn roles(c: &mut Client) {
    c.batch_execute(
        "CREATE ROLE app LOGIN; CREATE ROLE clerk LOGIN; CREATE ROLE integrator LOGIN;
         GRANT webhooks_admin TO integrator;",
    )
    .expect("roles");
}

fn types_of(reqs: &[Value]) -> Vec<String> {
    reqs.iter()
        .map(|r| r["json"]["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The requests about one order (or product, by sku), in arrival order: per key, commit order.
fn of_key<'a>(reqs: &'a [Value], key: Value) -> Vec<&'a Value> {
    reqs.iter()
        .filter(|r| r["json"]["data"]["id"] == key || r["json"]["data"]["sku"] == key)
        .collect()
}

#[test]
fn a_dump_restored_into_a_new_cluster_keeps_tracking_and_subscriptions_and_resends_no_history() {
    let rx = Receiver::start();
    let old = Cluster::start("restore_src", &["webhooks.database = 'shop'", "webhooks.poll_interval = '200ms'"]);
    let mut su = old.connect();
    roles(&mut su);
    su.batch_execute("CREATE DATABASE shop").expect("shop");
    let mut shop = old.connect_db("shop");
    shop.batch_execute("CREATE EXTENSION pg_webhooks").expect("extension");
    // The old cluster is further along in transaction ids than the new one will be, as a
    // production server is: its subscriptions' creation snapshots lie in the new one's future.
    shop.batch_execute("DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
        .expect("use up transaction ids");
    shop.batch_execute(SHOP).expect("shop schema");
    let mut integrator = old.connect_as("shop", "integrator");
    let row = integrator
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, headers => '{\"X-Shop-Token\": \"t0k3n\"}')",
            &[&rx.url("/erp")],
        )
        .expect("subscribe the erp");
    let (erp, erp_secret): (i64, String) = (row.get(0), row.get(1));
    rx.configure(json!({"path": "/erp", "secret": erp_secret, "style": "standard"}));
    let row = integrator
        .query_one(
            "SELECT id, secret FROM webhooks.subscribe($1, '{order.paid,order.shipped}',
                    signature => 'hex', signature_header => 'X-Warehouse-Signature')",
            &[&rx.url("/warehouse")],
        )
        .expect("subscribe the warehouse");
    let wh_secret: String = row.get(1);
    rx.configure(json!({"path": "/warehouse", "secret": wh_secret, "style": "hex", "header": "x-warehouse-signature"}));

    // History: delivered before the dump.
    let mut clerk = old.connect_as("shop", "clerk");
    for sql in [
        "BEGIN; INSERT INTO orders VALUES (1, 'pending', 20); INSERT INTO order_items (order_id, sku, qty) VALUES (1, 'A', 2); COMMIT",
        "UPDATE orders SET status = 'paid' WHERE id = 1",
        "INSERT INTO products VALUES ('A', 'Apple')",
    ] {
        clerk.batch_execute(sql).expect("history");
    }
    let history = rx.wait_for_requests("/erp", 4, WAIT);
    let mut kinds = types_of(&history);
    kinds.sort();
    assert_eq!(kinds, ["order.created", "order.paid", "order.status_updated", "product.created"]);
    rx.wait_for_requests("/warehouse", 1, WAIT);
    wait_for("the history recorded as delivered", WAIT, || {
        let n: i64 = shop
            .query_one("SELECT count(*) FROM webhooks.deliveries WHERE status = 'succeeded'", &[])
            .expect("deliveries")
            .get(0);
        (n == 5).then_some(())
    });

    let dump = old.dump("shop");
    drop(shop);
    drop(clerk);
    drop(integrator);
    old.stop();

    // A new cluster, as after a migration: roles first (pg_dumpall --roles-only would bring
    // them), then the database.
    let new = Cluster::start("restore_dst", &["webhooks.database = 'shop'", "webhooks.poll_interval = '200ms'"]);
    let mut su = new.connect();
    roles(&mut su);
    su.batch_execute("CREATE DATABASE shop").expect("shop");
    new.restore("shop", &dump);
    let mut shop = new.connect_db("shop");

    // The configuration came along: tables with their children (by name), subscriptions with
    // their secrets and headers, and the restored subscriptions belong to this cluster now.
    let tracked: Vec<(String, String)> = shop
        .query("SELECT relid::text, child_tables::text FROM webhooks._tracked ORDER BY 1", &[])
        .expect("tracked")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        tracked,
        [("orders".to_string(), "{order_items,shipments}".to_string()), ("products".to_string(), "{}".to_string())]
    );
    let stale: i64 = shop
        .query_one(
            "SELECT count(*) FROM webhooks._tracked t, jsonb_array_elements(t.children) WITH ORDINALITY c(value, n)
              WHERE (c.value ->> 'relid')::oid IS DISTINCT FROM t.child_tables[c.n]::oid
                 OR t.child_tables[c.n]::text NOT IN ('order_items', 'shipments')",
            &[],
        )
        .expect("children")
        .get(0);
    assert_eq!(stale, 0, "every child's OID is this cluster's");
    let future: i64 = shop
        .query_one(
            "SELECT count(*) FROM webhooks._subscriptions
              WHERE pg_snapshot_xmax(created_snapshot) > pg_snapshot_xmax(pg_current_snapshot())",
            &[],
        )
        .expect("snapshots")
        .get(0);
    assert_eq!(future, 0, "no subscription was created in this cluster's future");
    let subs: Vec<(i64, String)> = shop
        .query("SELECT id, url FROM webhooks.subscriptions ORDER BY id", &[])
        .expect("subscriptions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0].0, erp);

    // Writes by the application's roles are captured, children included; the restored
    // subscriptions receive them, signed with the secrets they had.
    let mut clerk = new.connect_as("shop", "clerk");
    // (One transaction each: a multi-statement string would be one implicit transaction.)
    for sql in [
        "BEGIN; INSERT INTO orders VALUES (2, 'pending', 30);
                INSERT INTO order_items (order_id, sku, qty) VALUES (2, 'B', 1), (2, 'C', 3); COMMIT",
        "UPDATE order_items SET qty = 5 WHERE order_id = 1",
        "INSERT INTO shipments (order_id, carrier) VALUES (2, 'DHL')",
        "UPDATE orders SET status = 'shipped' WHERE id = 2",
        "UPDATE products SET name = 'Green apple' WHERE sku = 'A'",
    ] {
        clerk.batch_execute(sql).expect("writes after the restore");
    }
    let got = rx.wait_for_requests("/erp", 4 + 6, WAIT);
    let after = &got[4..];
    let order2: Vec<Value> = of_key(after, json!(2)).into_iter().cloned().collect();
    assert_eq!(
        types_of(&order2),
        ["order.created", "order.updated", "order.status_updated", "order.shipped"],
        "order 2, in commit order"
    );
    let order1: Vec<Value> = of_key(after, json!(1)).into_iter().cloned().collect();
    assert_eq!(types_of(&order1), ["order.updated"]);
    assert_eq!(types_of(&of_key(after, json!("A")).into_iter().cloned().collect::<Vec<_>>()), ["product.updated"]);
    assert!(after.iter().all(|r| r["verified"] == json!(true)), "signed with the restored secret: {after:?}");
    assert!(after.iter().all(|r| r["headers"]["x-shop-token"] == json!("t0k3n")), "custom header restored");
    assert_eq!(order2[0]["json"]["data"]["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(order1[0]["json"]["data"]["items"][0]["qty"], json!(5));
    assert_eq!(order2[1]["json"]["data"]["shipments"][0]["carrier"], json!("DHL"));
    let wh = rx.wait_for_requests("/warehouse", 2, WAIT);
    assert_eq!(types_of(&wh), ["order.paid", "order.shipped"]);
    assert!(wh.iter().all(|r| r["verified"] == json!(true)));

    // Nothing of the history was sent again: only the new events, once each.
    wait_for("the new deliveries recorded", WAIT, || {
        let n: i64 = shop
            .query_one("SELECT count(*) FROM webhooks.deliveries WHERE status = 'succeeded'", &[])
            .expect("deliveries")
            .get(0);
        (n == 7).then_some(())
    });
    let fence = new.connect_db("shop").query_one("SELECT webhooks.emit('shop.fence', '{}')", &[]).map(|_| ());
    fence.expect("emit");
    rx.wait_for_requests("/erp", 11, WAIT);
    assert_eq!(rx.log("/erp").len(), 11, "4 before, 6 after the restore, the fence");
    assert_eq!(rx.log("/warehouse").len(), 2);

    // The restored child triggers (named after the old cluster's OIDs) go with untrack, and
    // the children are written as before.
    let mut app = new.connect_as("shop", "app");
    app.batch_execute("SELECT webhooks.untrack('orders')").expect_err("untrack needs webhooks_admin's EXECUTE");
    shop.batch_execute("GRANT webhooks_admin TO app").expect("grant");
    let mut app = new.connect_as("shop", "app");
    app.batch_execute("SELECT webhooks.untrack('orders')").expect("untrack after a restore");
    let left: i64 = shop
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgfoid = 'webhooks._capture_child'::regproc",
            &[],
        )
        .expect("triggers")
        .get(0);
    assert_eq!(left, 0, "no child trigger left behind");
    clerk
        .batch_execute("INSERT INTO order_items (order_id, sku, qty) VALUES (2, 'D', 1)")
        .expect("children are written as before");
}

#[test]
fn a_restore_finds_columns_by_name_after_drops_and_renames_and_keeps_a_0_1_0_dump_writable() {
    common::install_archived_script("0.1.0");
    let old = Cluster::start("restore_cols_src", &[]);
    let mut src = old.connect();
    // Dropped columns before the key, the status and the foreign key: pg_dump renumbers the
    // columns. A renamed column: its new name is what the restore must find.
    src.batch_execute(
        "CREATE TABLE orders (legacy text, id int PRIMARY KEY, gone int, state text, note text);
         ALTER TABLE orders DROP COLUMN legacy; ALTER TABLE orders DROP COLUMN gone;
         CREATE TABLE order_items (junk int, id int PRIMARY KEY, order_ref int, sku text);
         ALTER TABLE order_items DROP COLUMN junk;
         SELECT webhooks.track('orders', status_column => 'state',
                children => '{\"items\": {\"table\": \"order_items\", \"foreign_key\": \"order_ref\"}}');
         ALTER TABLE orders RENAME COLUMN state TO status;
         ALTER TABLE order_items RENAME COLUMN order_ref TO order_id;",
    )
    .expect("source");
    let names: (String, String, String) = {
        let r = src
            .query_one("SELECT key_column::text, status_column::text, child_fk_columns::text FROM webhooks._tracked", &[])
            .expect("names");
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(names, ("id".into(), "status".into(), "{order_id}".into()), "renames are followed");
    // And a database at 0.1.0, whose dump has its children by OID only.
    src.batch_execute("CREATE DATABASE legacy").expect("legacy db");
    let mut legacy = old.connect_db("legacy");
    legacy
        .batch_execute(
            "DROP EXTENSION IF EXISTS pg_webhooks; CREATE EXTENSION pg_webhooks VERSION '0.1.0';
             CREATE TABLE orders (id int PRIMARY KEY, status text);
             CREATE TABLE order_items (id int PRIMARY KEY, order_id int, sku text);
             SELECT webhooks.track('orders', status_column => 'status',
                    children => '{\"items\": {\"table\": \"order_items\", \"foreign_key\": \"order_id\"}}');",
        )
        .expect("0.1.0 source");
    let (dump, legacy_dump) = (old.dump("postgres"), old.dump("legacy"));
    drop((src, legacy));
    old.stop();

    let new = Cluster::start("restore_cols_dst", &[]);
    let mut su = new.connect();
    su.batch_execute("CREATE DATABASE shop").expect("shop");
    su.batch_execute("CREATE DATABASE legacy").expect("legacy");
    new.restore("shop", &dump);
    let mut shop = new.connect_db("shop");
    shop.batch_execute("INSERT INTO orders VALUES (1, 'new', 'hello')").expect("order 1");
    shop.batch_execute("INSERT INTO orders VALUES (2, 'new', 'hello')").expect("order 2");
    shop.batch_execute("INSERT INTO order_items VALUES (5, 1, 'x')").expect("item");
    shop.batch_execute("UPDATE orders SET status = 'paid' WHERE id = 2").expect("pay");
    let evs: Vec<(String, Option<String>, serde_json::Value)> = shop
        .query("SELECT type, key, data FROM webhooks.events ORDER BY seq", &[])
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let summary: Vec<(String, Option<String>)> = evs.iter().map(|(t, k, _)| (t.clone(), k.clone())).collect();
    let s = |t: &str, k: &str| (t.to_string(), Some(k.to_string()));
    assert_eq!(
        summary,
        [s("order.created", "1"), s("order.created", "2"), s("order.updated", "1"), s("order.status_updated", "2"), s("order.paid", "2")],
        "keyed by id, the status column found, the item under its order"
    );
    assert_eq!(evs[2].2["items"][0]["sku"], json!("x"));
    assert_eq!(evs[3].2["previous_status"], json!("new"));

    // The 0.1.0 dump: restored with a warning, its children left out, every write working.
    new.restore("legacy", &legacy_dump);
    let mut l = new.connect_db("legacy");
    let children: String = l.query_one("SELECT children::text FROM webhooks._tracked", &[]).expect("tracked").get(0);
    assert_eq!(children, "[]");
    l.batch_execute("INSERT INTO orders VALUES (1, 'new')").expect("an order");
    l.batch_execute("INSERT INTO order_items VALUES (1, 1, 'x')").expect("an item: the old child trigger does nothing");
    let types: Vec<String> =
        l.query("SELECT type FROM webhooks.events ORDER BY seq", &[]).expect("events").iter().map(|r| r.get(0)).collect();
    assert_eq!(types, ["order.created"]);
    assert!(new.server_log().contains("was dumped by pg_webhooks 0.1.0"), "the restore warned");
}
