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

/// capture's jsonb built from a row (`crate::jsonb`) is the very value `row_to_json` of the row
/// cast to jsonb gives, which is what capture wrote before: for every kind of column, special
/// values (NaN, infinities, escapes, nulls, duplicate keys in json) included.
#[pg_test]
fn jsonb_built_from_a_row_is_row_to_json_cast_to_jsonb() {
    Spi::run(
        r#"SET extra_float_digits = 1;
           CREATE TABLE j (id int PRIMARY KEY, b bool, s smallint, i int, l bigint, n numeric, n2 numeric(10,3),
               nn numeric, ni numeric, f4 real, f8 double precision, f8n double precision, t text, v varchar(10),
               c char(5), d date, ts timestamp, tz timestamptz, tzi timestamptz, tm time, iv interval, u uuid,
               by bytea, js json, jb jsonb, ia int[], ta text[], ip inet, rg int4range, pt point, bits bit(3),
               oi oid, "we""ird key" text, "ключ" text);
           INSERT INTO j VALUES (1, true, -32768, -2147483648, 9223372036854775807, 123.4500, 1.5, 'NaN', '-Infinity',
               1.5, 1e300, 'NaN', E'quote " backslash \\ tab \t nl \n ctl \x01 é 🎉', 'short', 'ab',
               '2026-12-02', '2026-12-02 10:11:12.123456', '2026-12-02 10:11:12+02', 'infinity', '23:59:59',
               '1 year 2 days 03:04:05', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff', '{"a": 1, "a": 2, "b": [1, {"c": null}]}',
               '{"z": 1, "a": {"b": 2}}', '{1,NULL,3}', '{"x",NULL,"y z"}', '192.168.0.1/24', '[1,5)', '(1,2)', B'101',
               42, 'w', 'значение');
           INSERT INTO j (id) VALUES (2);
           INSERT INTO j (id, n, f4, f8, tz, ts) VALUES (3, 0, '-0', '-Infinity', '-infinity', '1999-01-08 04:05:06');"#,
    )
    .expect("table");
    unsafe {
        let mut built = Vec::new();
        each_row_built("j", |_, jb| {
            let text = pg_sys::OidOutputFunctionCall(
                pg_sys::Oid::from(pg_sys::F_JSONB_OUT),
                crate::jsonb::from_bytes(&jb),
            );
            built.push(std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned());
        });
        assert_eq!(built.len(), 3);
        for text in built {
            let same = Spi::get_one_with_args::<bool>(
                "SELECT $1 = (SELECT (row_to_json(j)::jsonb)::text FROM j WHERE id = ($1::jsonb->>'id')::int)",
                &[text.clone().into()],
            )
            .expect("compare");
            assert_eq!(same, Some(true), "built: {text}");
        }
    }
}

/// Whether `bytes` (a jsonb varlena) are, byte for byte, the jsonb `sql` gives (PostgreSQL's own
/// writer): `*=` compares the two values' stored images.
unsafe fn same_jsonb_bytes(bytes: &[u8], sql: &str) -> bool {
    let arg = pgrx::datum::DatumWithOid::new(crate::jsonb::from_bytes(bytes), pg_sys::JSONBOID);
    Spi::get_one_with_args::<bool>(&format!("SELECT a *= b FROM (SELECT ROW($1::jsonb) AS a, ROW(({sql})) AS b) r"), &[arg])
        .expect("compare")
        .expect("a value")
}

/// `built` is byte for byte `to_jsonb` of `table`'s row `id`; otherwise a panic showing both
/// (`label` first).
unsafe fn assert_row_is_to_jsonb(table: &str, id: &str, built: &[u8], label: &str) {
    let sql = format!("SELECT to_jsonb(whole_row) FROM {table} whole_row WHERE id = {id}");
    if !same_jsonb_bytes(built, &sql) {
        let arg = pgrx::datum::DatumWithOid::new(crate::jsonb::from_bytes(built), pg_sys::JSONBOID);
        let texts = Spi::get_one_with_args::<String>(&format!("SELECT $1::jsonb::text || E'\\n' || ({sql})::text"), &[arg]);
        panic!("{label} row {id}: {texts:?}");
    }
}

/// The jsonb capture writes in jsonb's binary format directly (`crate::jsonb`) is byte for byte
/// the one PostgreSQL's `to_jsonb` writes: every kind of column, objects of more than 32 keys
/// (entries that are offsets), keys of one length in byte order, numerics after strings of
/// every length (alignment), nested jsonb and json values, nulls, integers at their extremes
/// and with zero base-10000 digits.
#[pg_test]
fn jsonb_written_directly_is_to_jsonb_byte_for_byte() {
    // 40 columns of names of several lengths (sorted by length, then bytes, in the jsonb).
    let wide: Vec<String> = (0..40)
        .map(|i| format!("\"{}{i}\" {}", "x".repeat(i % 7), ["numeric", "text", "int"][i % 3]))
        .collect();
    Spi::run(&format!(
        r#"SET extra_float_digits = 1;
           CREATE TABLE jb (id int PRIMARY KEY, b bool, s smallint, i int, l bigint, n numeric, nn numeric, ni numeric,
               f4 real, f8 double precision, t text, v varchar(10), c char(5), d date, ts timestamp, tz timestamptz,
               tm time, iv interval, u uuid, by bytea, js json, j2 jsonb, ia int[], ta text[], ip inet, pt point,
               "a" text, "b2" numeric, "aa" text, "ab" numeric, "é" text);
           INSERT INTO jb VALUES (1, true, -32768, -2147483648, 9223372036854775807, 123.4500, 'NaN', '-Infinity',
               1.5, 1e300, E'q " b \\ t \t n \n é 🎉', 'short', 'ab', '2026-12-02', '2026-12-02 10:11:12.123456',
               '2026-12-02 10:11:12+02', '23:59:59', '1 year 2 days', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff',
               '{{"a": 1, "a": 2, "b": [1, {{"c": null, "n": 1.5}}]}}', '{{"z": 1, "a": {{"b": 2.25, "s": "x"}}, "arr": [1, "a", 3.5]}}',
               '{{1,NULL,3}}', '{{"x",NULL,"y z"}}', '192.168.0.1/24', '(1,2)', 'x', 7.5, 'yy', -0.001, 'u');
           INSERT INTO jb (id) VALUES (2);
           INSERT INTO jb (id, t, n, "a", "b2") VALUES (3, 'odd', 1, 'abc', 12345678901234567890.5);
           INSERT INTO jb (id, s, i, l) VALUES (4, 0, 10000, -9223372036854775808), (5, -1, -100000000, 100000000),
               (6, 9999, 2147483647, 1000000000000), (7, -10000, 99990000, -12340000), (8, 32767, -1, 10001),
               (-9, 1, 20000, 123456789012);
           CREATE TABLE jw (id int PRIMARY KEY, {});
           INSERT INTO jw (id) VALUES (1);
           INSERT INTO jw SELECT 2, {};
           -- Stored out of line (uncompressed, and compressed: the low tuple target moves
           -- `big` out of line after compressing it), a dropped column in the middle, rows
           -- stored before an ADD COLUMN ... DEFAULT (their values come from the descriptor), json
           -- and jsonb scalars and empties, numerics of the long format, a 2-D array.
           CREATE TABLE jx (id int PRIMARY KEY, gone text, ext text, big text, js json, j2 jsonb, e int[], n numeric);
           ALTER TABLE jx ALTER ext SET STORAGE EXTERNAL, SET (toast_tuple_target = 128);
           INSERT INTO jx VALUES (1, 'x', repeat('e', 5000), repeat('compressible ', 2000), '5', '"x"', '{{}}', 1e-70),
               (2, NULL, 'short', NULL, 'null', 'null', '{{{{1,2}},{{3,4}}}}', 1e300),
               (3, NULL, NULL, NULL, '{{}}', '[]', NULL, -123456789.000000001),
               (4, NULL, NULL, NULL, '[]', '{{}}', '{{}}', 0.0001);
           ALTER TABLE jx DROP COLUMN gone;
           ALTER TABLE jx ADD COLUMN dt text DEFAULT 'default text', ADD COLUMN dn numeric DEFAULT 12.5,
               ADD COLUMN di bigint DEFAULT -7;
           INSERT INTO jx (id, dt, dn, di) VALUES (5, 'own', 1, 1);"#,
        wide.join(", "),
        (0..40).map(|i| match i % 3 { 0 => format!("{i}.{i}"), 1 => format!("repeat('s', {i})"), _ => format!("{i}") }).collect::<Vec<_>>().join(", "),
    ))
    .expect("tables");
    unsafe {
        let mut compared = 0;
        for table in ["jb", "jw", "jx"] {
            each_row_built(table, |id, built| {
                assert_row_is_to_jsonb(table, id, &built, table);
                compared += 1;
            });
        }
        assert_eq!(compared, 16);
    }
}

/// Timestamps with time zone, which capture writes itself in a session whose time zone is UTC
/// (`crate::jsonb::utc_timestamptz`), are byte for byte what `to_jsonb` writes: the first and
/// last four-digit years and the days around them, leap days, fractions with trailing zeros,
/// before 2000 (negative values), BC, five-digit years, the infinities, and 20,000 random
/// ones; in UTC, and in another zone (PostgreSQL's own path).
#[pg_test]
fn timestamps_with_time_zone_are_to_jsonb_byte_for_byte() {
    Spi::run(
        "CREATE TABLE jt (id serial PRIMARY KEY, at timestamptz);
         INSERT INTO jt (at) VALUES ('0001-01-01 00:00:00+00'), ('0001-01-01 00:00:00.000001+00'),
             ('0001-12-31 23:59:59.999999+00'), ('0001-01-01 00:00:00+00 BC'), ('0044-03-15 12:00:00+00 BC'),
             ('9999-12-31 23:59:59.999999+00'), ('10000-01-01 00:00:00+00'), ('294276-12-31 23:59:59.999999+00'),
             ('4713-11-24 00:00:00+00 BC'), ('1999-12-31 23:59:59.999999+00'), ('2000-01-01 00:00:00+00'),
             ('2000-02-29 12:34:56.5+00'), ('1900-02-28 23:00:00.05+00'), ('2024-02-29 00:00:00.123+00'),
             ('1970-01-01 00:00:00+00'), ('2026-12-07 16:53:07.100000+00'), ('2026-12-07 16:53:07.000010+00'),
             ('1600-03-01 00:00:00+00'), ('infinity'), ('-infinity'), (NULL);
         INSERT INTO jt (at) SELECT timestamptz '0001-01-01 00:00:00+00'
                 + (random() * 315537897599)::bigint * interval '1 second'
                 + (random() * 999999)::int * interval '1 microsecond'
                 * (g % 2)
             FROM generate_series(1, 20000) g;",
    )
    .expect("table");
    let mut fast = Vec::new();
    assert!(crate::jsonb::utc_timestamptz(0, &mut fast) && fast == b"2000-01-01T00:00:00+00:00", "{:?}", String::from_utf8_lossy(&fast));
    for zone in ["UTC", "Etc/UTC", "America/New_York"] {
        Spi::run(&format!("SET TimeZone = '{zone}'")).expect("zone");
        assert_eq!(crate::capture::session_time_zone_is_utc(), zone != "America/New_York");
        let mut compared = 0;
        unsafe {
            each_row_built("jt", |id, built| {
                assert_row_is_to_jsonb("jt", id, &built, zone);
                compared += 1;
            });
        }
        assert_eq!(compared, 20021, "{zone}");
    }
}

/// Values that together pass jsonb's size limit (256 MB of an object's data) fail with the
/// error `to_jsonb` raises for the same row, not with a value PostgreSQL would not have made.
/// (`to_jsonb_past_its_size_limit_fails_with_this_error` expects the same error of `to_jsonb`.)
#[pg_test(error = "total size of jsonb object elements exceeds the maximum of 268435455 bytes")]
fn jsonb_past_its_size_limit_fails_as_to_jsonb_does() {
    Spi::run(TOO_LARGE_FOR_JSONB).expect("table");
    unsafe { each_row_built("jl", |_, _| ()) };
}

/// `f` of each row of `table` (its first column as text) and the capture builder's jsonb of
/// its columns.
unsafe fn each_row_built(table: &str, mut f: impl FnMut(&str, Vec<u8>)) {
    pg_sys::CommandCounterIncrement();
    let relid = Spi::get_one::<pg_sys::Oid>(&format!("SELECT '{table}'::regclass::oid")).expect("oid").expect("oid");
    let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    let scan = pg_sys::table_beginscan(rel, pg_sys::GetTransactionSnapshot(), 0, std::ptr::null_mut());
    loop {
        let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
        if tuple.is_null() {
            break;
        }
        let mut b = crate::jsonb::Builder::object();
        b.columns(tuple, (*rel).rd_att);
        let built = b.finish();
        let id = std::ffi::CStr::from_ptr(pg_sys::SPI_getvalue(tuple, (*rel).rd_att, 1)).to_string_lossy().into_owned();
        f(&id, built);
    }
    pg_sys::heap_endscan(scan);
    pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
}

/// One value that fits, with its key and the other column's, in an object's data (268,435,452
/// bytes) but not with the object's header and entries (268,435,472): PostgreSQL's check of a
/// container's whole length after its values.
const JUST_TOO_LARGE_FOR_JSONB: &str = "CREATE TABLE jl2 (id int PRIMARY KEY, a text);
    INSERT INTO jl2 VALUES (1, repeat('a', 268435440));";

#[pg_test(error = "total size of jsonb object elements exceeds the maximum of 268435455 bytes")]
fn jsonb_past_its_size_limit_with_its_entries_fails_as_to_jsonb_does() {
    Spi::run(JUST_TOO_LARGE_FOR_JSONB).expect("table");
    unsafe { each_row_built("jl2", |_, _| ()) };
}

#[pg_test(error = "total size of jsonb object elements exceeds the maximum of 268435455 bytes")]
fn to_jsonb_past_its_size_limit_with_its_entries_fails_with_this_error() {
    Spi::run(JUST_TOO_LARGE_FOR_JSONB).expect("table");
    Spi::run("SELECT to_jsonb(r) FROM jl2 r").expect("not reached");
}

/// Two values of 140 MB: 280 MB of an object's data.
const TOO_LARGE_FOR_JSONB: &str = "CREATE TABLE jl (id int PRIMARY KEY, a text, b text);
    INSERT INTO jl VALUES (1, repeat('a', 140000000), repeat('b', 140000000));";

#[pg_test(error = "total size of jsonb object elements exceeds the maximum of 268435455 bytes")]
fn to_jsonb_past_its_size_limit_fails_with_this_error() {
    Spi::run(TOO_LARGE_FOR_JSONB).expect("table");
    Spi::run("SELECT to_jsonb(r) FROM jl r").expect("not reached");
}

/// An event's data with its children, as capture writes it (`row_jsonb`), is byte for byte
/// the jsonb SQL builds from the same rows: no children, one, and more than 32 (an array's
/// entries that are offsets), and a child list whose name is also a column's (the last key wins).
#[pg_test]
fn event_data_with_children_is_the_sql_jsonb_byte_for_byte() {
    Spi::run(
        r#"CREATE TABLE wo (id int PRIMARY KEY, customer text, status text, total numeric, at timestamptz, lines int);
           CREATE TABLE wo_items (id int PRIMARY KEY, order_id int REFERENCES wo, sku text, qty int, price numeric);
           CREATE INDEX ON wo_items (order_id);
           SELECT webhooks.track('wo', status_column => 'status',
                  children => '{"items": {"table": "wo_items", "foreign_key": "order_id"},
                                "lines": {"table": "wo_items", "foreign_key": "order_id"}}');
           INSERT INTO wo VALUES (1, 'c-1', 'paid', 10.50, '2026-12-04 10:00:00+00', 3), (2, NULL, NULL, NULL, NULL, NULL),
                                 (3, 'c-3', 'new', 1, '2026-12-05 10:00:00+00', 40);
           INSERT INTO wo_items VALUES (1, 1, 'SKU-1', 1, 19.99);
           INSERT INTO wo_items SELECT 10 + g, 3, 'SKU-' || repeat('z', g % 5), g, g / 7.0 FROM generate_series(1, 40) g;"#,
    )
    .expect("tables");
    let mut compared = 0;
    unsafe {
        each_tracked_row("wo", |cfg, tuple, desc, key, snapshot| {
            let items = format!("coalesce((SELECT jsonb_agg(to_jsonb(i) ORDER BY i.id) FROM wo_items i WHERE i.order_id = {key}), '[]')");
            for extra in [None, Some((Some("pending".to_string()), Some("paid".to_string()))), Some((None, None))] {
                let built = crate::capture::row_jsonb(cfg, tuple, desc, key, snapshot, extra.as_ref()).expect("built");
                let keys = match &extra {
                    None => String::new(),
                    Some((p, s)) => format!(
                        " || jsonb_build_object('previous_status', {}::text, 'status', {}::text)",
                        p.as_deref().map_or("NULL".into(), |v| format!("'{v}'")),
                        s.as_deref().map_or("NULL".into(), |v| format!("'{v}'")),
                    ),
                };
                let sql = format!(
                    "SELECT to_jsonb(o) || jsonb_build_object('items', {items}, 'lines', {items}){keys} FROM wo o WHERE id = {key}"
                );
                assert!(same_jsonb_bytes(&built, &sql), "row {key}, keys {extra:?}");
                compared += 1;
            }
        });
    }
    assert_eq!(compared, 9);
}

/// `f` of each row of the tracked table `table`, read under the transaction's snapshot: the
/// table's configuration, the row, the table's descriptor, the row's key as text, the snapshot.
unsafe fn each_tracked_row(
    table: &str,
    mut f: impl FnMut(&crate::capture::TableConfig, pg_sys::HeapTuple, pg_sys::TupleDesc, &str, pg_sys::Snapshot),
) {
    pg_sys::CommandCounterIncrement();
    let relid = Spi::get_one::<pg_sys::Oid>(&format!("SELECT '{table}'::regclass::oid")).expect("oid").expect("oid");
    let cfg = crate::capture::config_for(relid).expect("tracked");
    let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    let snapshot = pg_sys::GetTransactionSnapshot();
    let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
    loop {
        let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
        if tuple.is_null() {
            break;
        }
        let key = std::ffi::CStr::from_ptr(pg_sys::SPI_getvalue(tuple, (*rel).rd_att, 1)).to_string_lossy().into_owned();
        f(&cfg, tuple, (*rel).rd_att, &key, snapshot);
    }
    pg_sys::heap_endscan(scan);
    pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
}

/// Capture's check that the session's output settings are already capture's (read from the
/// settings' variables) says what `SHOW` of each setting says, for every setting, in every
/// combination this walks through.
#[pg_test]
fn output_settings_check_agrees_with_show() {
    let by_name = || {
        let show = |name: &str| one::<String>(&format!("SELECT current_setting('{name}')")).unwrap_or_default();
        matches!(show("TimeZone").as_str(), "UTC" | "Etc/UTC")
            && show("DateStyle") == "ISO, MDY"
            && show("IntervalStyle") == "postgres"
            && show("extra_float_digits") == "1"
            && show("bytea_output") == "hex"
    };
    // Spelled otherwise, the same zone: in force (its canonical name is UTC).
    Spi::run("SET LOCAL TimeZone = 'utc'").expect("utc");
    assert!(crate::capture::output_settings_in_force(), "utc in lower case is UTC");
    let base = "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, MDY'; SET LOCAL IntervalStyle = 'postgres';
                SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex';";
    Spi::run(base).expect("capture's settings");
    assert!(by_name());
    assert!(crate::capture::output_settings_in_force(), "capture's own settings are in force");
    let changes = [
        "SET LOCAL TimeZone = 'Etc/UTC'",
        "SET LOCAL TimeZone = 'Asia/Tokyo'",
        "SET LOCAL TimeZone = 'UTC0'",
        "SET LOCAL TimeZone = 'GMT'",
        "SET LOCAL DateStyle = 'ISO, DMY'",
        "SET LOCAL DateStyle = 'ISO, YMD'",
        "SET LOCAL DateStyle = 'SQL, MDY'",
        "SET LOCAL DateStyle = 'German'",
        "SET LOCAL DateStyle = 'Postgres, MDY'",
        "SET LOCAL IntervalStyle = 'iso_8601'",
        "SET LOCAL IntervalStyle = 'sql_standard'",
        "SET LOCAL IntervalStyle = 'postgres_verbose'",
        "SET LOCAL extra_float_digits = 0",
        "SET LOCAL extra_float_digits = 3",
        "SET LOCAL extra_float_digits = -15",
        "SET LOCAL bytea_output = 'escape'",
    ];
    for change in changes {
        Spi::run(base).expect("capture's settings");
        Spi::run(change).expect(change);
        assert_eq!(crate::capture::output_settings_in_force(), by_name(), "after {change}");
    }
    // Several at once, and back.
    Spi::run("SET LOCAL bytea_output = 'escape'; SET LOCAL TimeZone = 'Europe/Berlin'").expect("two");
    assert!(!crate::capture::output_settings_in_force());
    Spi::run(base).expect("capture's settings");
    assert!(crate::capture::output_settings_in_force());
}

/// A status change's keys pushed into the row's jsonb as it is built (`row_jsonb` with the
/// keys) give the very bytes the text path gives for the row's jsonb with the keys merged over
/// it (`Data::Text` with `extra`, parsed by `jsonb_in`), and those of SQL's
/// `row || jsonb_build_object(...)`, columns and children named `status` and
/// `previous_status` included: jsonb keeps the last of duplicate keys either way.
#[pg_test]
fn status_keys_built_in_are_the_keys_merged_over() {
    Spi::run(
        r#"CREATE TABLE sk (id int PRIMARY KEY, status text, previous_status text, n numeric, at timestamptz);
           CREATE TABLE sk_items (id int PRIMARY KEY, order_id int REFERENCES sk, status text);
           CREATE INDEX ON sk_items (order_id);
           SELECT webhooks.track('sk', status_column => 'status',
                  children => '{"items": {"table": "sk_items", "foreign_key": "order_id"},
                                "status": {"table": "sk_items", "foreign_key": "order_id"}}');
           INSERT INTO sk VALUES (1, 'paid', 'mine', 1.50, '2026-12-04 10:00:00+00'), (2, NULL, NULL, NULL, NULL);
           INSERT INTO sk_items VALUES (1, 1, 'a'), (2, 1, 'b');"#,
    )
    .expect("tables");
    let mut compared = 0;
    unsafe {
        each_tracked_row("sk", |cfg, tuple, desc, key, snapshot| {
            for extra in [
                (Some("pending".to_string()), Some("paid".to_string())),
                (None, Some("x".to_string())),
                (Some("y".to_string()), None),
                (None, None),
            ] {
                let built = crate::capture::row_jsonb(cfg, tuple, desc, key, snapshot, Some(&extra))
                    .expect("built with the keys");
                let plain = crate::capture::row_jsonb(cfg, tuple, desc, key, snapshot, None)
                    .expect("built without");
                let plain_text = pg_sys::OidOutputFunctionCall(
                    pg_sys::Oid::from(pg_sys::F_JSONB_OUT),
                    crate::jsonb::from_bytes(&plain),
                );
                let plain_text = std::ffi::CStr::from_ptr(plain_text).to_string_lossy().into_owned();
                let merged = crate::direct::Data::Text { parts: vec![plain_text.clone()], extra: Some(extra.clone()) }.datum();
                let merged = crate::jsonb::to_bytes(merged.cast_mut_ptr());
                assert_eq!(built, merged, "key {key}, keys {extra:?}");
                let by_sql = Spi::get_one_with_args::<pgrx::JsonB>(
                    "SELECT $1::jsonb || jsonb_build_object('previous_status', $2::text, 'status', $3::text)",
                    &[plain_text.as_str().into(), extra.0.as_deref().into(), extra.1.as_deref().into()],
                )
                .expect("sql")
                .expect("a value");
                let by_sql = serde_json::to_string(&by_sql.0).expect("json");
                let built_text = pg_sys::OidOutputFunctionCall(
                    pg_sys::Oid::from(pg_sys::F_JSONB_OUT),
                    crate::jsonb::from_bytes(&built),
                );
                let built_value: serde_json::Value =
                    serde_json::from_str(&std::ffi::CStr::from_ptr(built_text).to_string_lossy()).expect("json");
                assert_eq!(serde_json::to_string(&built_value).expect("json"), by_sql, "key {key}, keys {extra:?}");
                let text = pg_sys::OidOutputFunctionCall(
                    pg_sys::Oid::from(pg_sys::F_JSONB_OUT),
                    crate::jsonb::from_bytes(&built),
                );
                let v: serde_json::Value =
                    serde_json::from_str(&std::ffi::CStr::from_ptr(text).to_string_lossy()).expect("json");
                assert_eq!(v["status"], serde_json::json!(extra.1), "the status key wins over the column and the children");
                assert_eq!(v["previous_status"], serde_json::json!(extra.0));
                assert_eq!(v["id"].as_i64(), key.parse::<i64>().ok());
                assert_eq!(v["items"].as_array().map(Vec::len), Some(if key == "1" { 2 } else { 0 }));
                compared += 1;
            }
        });
    }
    assert_eq!(compared, 8);
}
