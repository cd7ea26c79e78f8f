// Database rules that hold inside one transaction. Anything that needs a commit (capture,
// delivery) is tested end to end in `tests/`, against a cluster of its own.

use pgrx::prelude::*;

fn setup_orders() {
    Spi::run(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending', total numeric);
         CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint REFERENCES orders ON DELETE CASCADE, sku text, qty int);",
    )
    .expect("tables");
}

fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).expect(sql)
}

#[pg_test]
fn track_installs_triggers_and_default_status_events() {
    setup_orders();
    Spi::run(
        r#"SELECT webhooks.track('orders', status_column => 'status',
               children => '{"items": {"table": "order_items", "foreign_key": "order_id"}}')"#,
    )
    .expect("track");
    assert_eq!(one::<String>("SELECT entity FROM webhooks._tracked WHERE relid = 'orders'::regclass"), Some("order".into()));
    assert_eq!(
        one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND tgname = 'webhooks_capture'"),
        Some(1)
    );
    assert_eq!(
        one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'order_items'::regclass AND tgname LIKE 'webhooks_child_%'"),
        Some(1)
    );
    assert_eq!(
        one::<String>("SELECT event_type FROM webhooks.status_events WHERE entity = 'order' AND status = 'shipped'"),
        Some("order.shipped".into())
    );
    assert_eq!(
        one::<String>("SELECT event_type FROM webhooks.status_events WHERE entity = 'order' AND status = 'canceled'"),
        Some("order.cancelled".into())
    );
}

#[pg_test]
fn untrack_removes_triggers() {
    setup_orders();
    Spi::run(
        r#"SELECT webhooks.track('orders', children => '{"items": {"table": "order_items", "foreign_key": "order_id"}}');
           SELECT webhooks.untrack('orders');"#,
    )
    .expect("track and untrack");
    assert_eq!(one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'webhooks_%' AND NOT tgisinternal"), Some(0));
    assert_eq!(one::<i64>("SELECT count(*) FROM webhooks._tracked"), Some(0));
}

#[pg_test]
fn entity_defaults_to_the_singular_of_the_table_name() {
    assert_eq!(one::<String>("SELECT webhooks._singular('orders')"), Some("order".into()));
    assert_eq!(one::<String>("SELECT webhooks._singular('categories')"), Some("category".into()));
    assert_eq!(one::<String>("SELECT webhooks._singular('boxes')"), Some("box".into()));
    assert_eq!(one::<String>("SELECT webhooks._singular('addresses')"), Some("address".into()));
    assert_eq!(one::<String>("SELECT webhooks._singular('status')"), Some("status".into()));
    assert_eq!(one::<String>("SELECT webhooks._singular('inventory')"), Some("inventory".into()));
}

#[pg_test]
fn dropping_a_tracked_table_forgets_it() {
    setup_orders();
    Spi::run("SELECT webhooks.track('orders'); DROP TABLE order_items; DROP TABLE orders;").expect("drop");
    assert_eq!(one::<i64>("SELECT count(*) FROM webhooks._tracked"), Some(0));
}

#[pg_test]
fn subscribe_returns_id_and_a_whsec_secret_once() {
    let (id, secret) = Spi::get_two::<i64, String>(
        "SELECT id, secret FROM webhooks.subscribe('http://127.0.0.1:9/hook', '{order.*}', 'erp')",
    )
    .expect("subscribe");
    let secret = secret.expect("secret");
    assert!(id.is_some());
    assert!(secret.starts_with("whsec_"), "{secret}");
    // base64 of 24 bytes is 32 characters.
    assert_eq!(secret.len(), "whsec_".len() + 32);
    let other = one::<String>("SELECT secret FROM webhooks.subscribe('http://127.0.0.1:9/hook')").expect("secret");
    assert_ne!(secret, other);
}

#[pg_test]
fn subscriptions_view_shows_no_secret_and_no_header_values() {
    Spi::run(
        r#"SELECT webhooks.subscribe('https://bob:hunter2@hooks.example.com/in?token=abc&x=1', '{*}',
               headers => '{"Authorization": "Bearer sk_live_123"}')"#,
    )
    .expect("subscribe");
    let row = one::<pgrx::JsonB>("SELECT to_jsonb(s) FROM webhooks.subscriptions s").expect("row").0.to_string();
    for hidden in ["hunter2", "sk_live_123", "abc", "whsec_"] {
        assert!(!row.contains(hidden), "{hidden} leaked in {row}");
    }
    assert!(row.contains("Authorization"), "header names are shown: {row}");
    assert!(row.contains("bob:***@"), "{row}");
}

#[pg_test]
fn pause_resume_and_unsubscribe_change_state() {
    let id = one::<i64>("SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/hook')").expect("id");
    Spi::run(&format!("SELECT webhooks.pause({id})")).expect("pause");
    assert_eq!(one::<bool>(&format!("SELECT active FROM webhooks.subscriptions WHERE id = {id}")), Some(false));
    assert_eq!(one::<String>(&format!("SELECT state FROM webhooks.subscriptions WHERE id = {id}")), Some("paused".into()));
    Spi::run(&format!("SELECT webhooks.resume({id})")).expect("resume");
    assert_eq!(one::<bool>(&format!("SELECT active FROM webhooks.subscriptions WHERE id = {id}")), Some(true));
    Spi::run(&format!("SELECT webhooks.unsubscribe({id})")).expect("unsubscribe");
    assert_eq!(one::<i64>(&format!("SELECT count(*) FROM webhooks.subscriptions WHERE id = {id}")), Some(0));
}

#[pg_test]
fn rotate_secret_keeps_the_old_one_for_the_grace_period() {
    let (id, old) = Spi::get_two::<i64, String>("SELECT id, secret FROM webhooks.subscribe('http://127.0.0.1:9/h')").expect("sub");
    let (id, old) = (id.expect("id"), old.expect("secret"));
    let new = one::<String>(&format!("SELECT webhooks.rotate_secret({id}, '1 hour')")).expect("new");
    assert_ne!(old, new);
    assert_eq!(one::<String>(&format!("SELECT secret FROM webhooks._secrets WHERE subscription_id = {id}")), Some(new.clone()));
    assert_eq!(one::<String>(&format!("SELECT previous_secret FROM webhooks._secrets WHERE subscription_id = {id}")), Some(old));
    let newest = one::<String>(&format!("SELECT webhooks.rotate_secret({id}, '0')")).expect("newest");
    assert_eq!(one::<String>(&format!("SELECT previous_secret FROM webhooks._secrets WHERE subscription_id = {id}")), None);
    assert_ne!(newest, new);
}

#[pg_test]
fn send_test_queues_one_webhook_test_delivery() {
    let id = one::<i64>("SELECT id FROM webhooks.subscribe('http://127.0.0.1:9/hook', '{order.*}')").expect("id");
    let delivery = one::<i64>(&format!("SELECT webhooks.send_test({id})")).expect("delivery");
    assert_eq!(
        one::<String>(&format!("SELECT event_type || ' ' || status FROM webhooks.deliveries WHERE id = {delivery}")),
        Some("webhook.test pending".into())
    );
    assert_eq!(one::<i64>(&format!("SELECT count(*) FROM webhooks._queue WHERE delivery_id = {delivery}")), Some(1));
    // A test event is for this subscription only: transaction 0, in no fan-out batch.
    assert_eq!(one::<bool>("SELECT xid = '0'::xid8 FROM webhooks._events WHERE type = 'webhook.test'"), Some(true));
}

#[pg_test]
fn emit_returns_the_event_id_and_queues_it() {
    let id = one::<pgrx::Uuid>(r#"SELECT webhooks.emit('inventory.adjusted', '{"sku": "A-1", "delta": -2}', 'A-1')"#).expect("id");
    assert_eq!(
        one::<String>(&format!("SELECT type || ' ' || key || ' ' || (data->>'sku') FROM webhooks.events WHERE id = '{id}'")),
        Some("inventory.adjusted A-1 A-1".into())
    );
    // Fan-out finds it by its transaction once that commits.
    assert_eq!(one::<bool>(&format!("SELECT xid = pg_current_xact_id() FROM webhooks._events WHERE id = '{id}'")), Some(true));
}

#[pg_test]
fn matching_is_exact_prefix_star_and_filter_containment() {
    let m = |p: &str, f: &str, t: &str| {
        one::<bool>(&format!(r#"SELECT webhooks._matches('{p}', {f}, '{t}', '{{"currency": "EUR", "total": 5}}')"#)).expect("bool")
    };
    assert!(m("{*}", "NULL", "order.created"));
    assert!(m("{order.*}", "NULL", "order.shipped"));
    assert!(!m("{order.*}", "NULL", "orders.shipped"));
    assert!(m("{order.shipped,order.paid}", "NULL", "order.paid"));
    assert!(!m("{order.shipped}", "NULL", "order.paid"));
    assert!(m("{*}", r#"'{"currency": "EUR"}'"#, "order.paid"));
    assert!(!m("{*}", r#"'{"currency": "USD"}'"#, "order.paid"));
}

#[pg_test]
fn url_masking_hides_credentials() {
    assert_eq!(
        one::<String>("SELECT webhooks._mask_url('https://u:p@h.example/x?token=t&a=1')"),
        Some("https://u:***@h.example/x?token=***&a=1".into())
    );
}
