//! Every `webhooks.*` setting, registered once from `_PG_init` and read through accessors.
//! The README has the same table; keep them in step.

use crate::schedule;
use pgrx::{pg_guard, pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

/// Databases the delivery workers serve, comma-separated (each is waited for until it and the
/// extension in it exist).
static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// HTTP requests in flight at once, over all endpoints (the worker's thread pool size).
static CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(32);
/// Delivery workers serving the database (0: one per four cores, at least 1, at most 8).
static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Requests in flight at once to a single subscription endpoint.
static MAX_IN_FLIGHT_PER_ENDPOINT: GucSetting<i32> = GucSetting::<i32>::new(8);
/// Events fanned out, and deliveries claimed, per database round trip.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
/// Waits between attempts, e.g. `5s,10s,20s,40s,80s` (units ms, s, m, h; `immediate` = 0).
static RETRY_SCHEDULE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"5s,10s,20s,40s,80s"));
/// Deadline of one attempt, from DNS to the end of the capped response body.
static TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// Bytes of a response body read and kept in `webhooks.attempts`.
static MAX_RESPONSE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(4096);
/// Largest request body sent: a delivery whose body would be larger ends `dead` unsent.
static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_PAYLOAD_BYTES);
/// Upper bound on a `Retry-After` wait honoured on 429/503.
static MAX_RETRY_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(3600);
/// A subscription failing continuously for this long is disabled (an interval).
static DISABLE_AFTER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"5 days"));
/// Finished deliveries, their attempts and events older than this are deleted (an interval).
static RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"30 days"));
/// Slow safety poll of the worker; new events wake it at commit anyway.
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
/// Memory (kB) a transaction's capture notes may take before they move to temporary files.
static CAPTURE_MEMORY_KB: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_CAPTURE_MEMORY_KB);
/// Allow plain-http endpoint URLs (superuser or config file only).
static ALLOW_HTTP: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Allow endpoints on loopback, private, link-local and similar networks (superuser only).
static ALLOW_PRIVATE_NETWORK: GucSetting<bool> = GucSetting::<bool>::new(false);

pub fn init() {
    // SAFETY: the hook only reads the proposed value and sets the error detail.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"webhooks.database",
            c"Databases served by the pg_webhooks delivery workers (comma-separated).",
            c"Each listed database gets webhooks.workers delivery workers once it and the extension in it exist. Requires a restart.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
            Some(check_databases),
            None,
            None,
        )
    };
    GucRegistry::define_int_guc(
        c"webhooks.concurrency",
        c"HTTP requests in flight at once.",
        c"Size of the delivery worker's HTTP thread pool. Requires a restart.",
        &CONCURRENCY,
        1,
        1024,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"webhooks.workers",
        c"Delivery workers serving webhooks.database.",
        c"They share the queue (claims skip each other's rows) and webhooks.concurrency; 0 = one per four cores, at least 1, at most 8. Requires a restart.",
        &WORKERS,
        0,
        MAX_WORKERS as i32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"webhooks.max_in_flight_per_endpoint",
        c"HTTP requests in flight at once to one subscription.",
        c"Keeps a slow or dead endpoint from taking the worker's whole capacity.",
        &MAX_IN_FLIGHT_PER_ENDPOINT,
        1,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"webhooks.batch_size",
        c"Events fanned out and deliveries claimed per round trip.",
        c"",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    define_checked_string(
        c"webhooks.retry_schedule",
        c"Waits between delivery attempts, e.g. 5s,10s,20s,40s,80s.",
        c"Units ms, s, m, h; 'immediate' means no wait. Attempts = 1 + number of waits. Jittered by 10%.",
        &RETRY_SCHEDULE,
        check_retry_schedule,
    );
    GucRegistry::define_int_guc(
        c"webhooks.timeout",
        c"Deadline of one delivery attempt.",
        c"Covers DNS, connect, TLS, sending and reading the capped response.",
        &TIMEOUT_MS,
        1,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"webhooks.max_response_bytes",
        c"Bytes of a response body read and kept in webhooks.attempts.",
        c"",
        &MAX_RESPONSE_BYTES,
        0,
        1_048_576,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"webhooks.max_payload_bytes",
        c"Largest request body a delivery sends.",
        c"A delivery whose body would be larger is not sent: it ends dead with the sizes in webhooks.attempts. Events are captured whatever their size.",
        &MAX_PAYLOAD_BYTES,
        1024,
        MAX_MAX_PAYLOAD_BYTES,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"webhooks.capture_memory",
        c"Memory a transaction's capture notes may take in its backend.",
        c"Capture notes each row a transaction changes (about 250 bytes a row); beyond this, the notes move to temporary files and are merged at commit, with the same events.",
        &CAPTURE_MEMORY_KB,
        64,
        i32::MAX / 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"webhooks.max_retry_after",
        c"Upper bound on a Retry-After wait honoured on 429 and 503.",
        c"",
        &MAX_RETRY_AFTER_S,
        0,
        7 * 24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    define_checked_string(
        c"webhooks.disable_after",
        c"Disable a subscription whose endpoint has failed continuously this long.",
        c"An interval, e.g. '5 days'.",
        &DISABLE_AFTER,
        check_interval,
    );
    define_checked_string(
        c"webhooks.retention",
        c"Delete finished deliveries, attempts and events older than this.",
        c"An interval, e.g. '30 days'.",
        &RETENTION,
        check_interval,
    );
    GucRegistry::define_int_guc(
        c"webhooks.poll_interval",
        c"Safety poll of the delivery worker.",
        c"New events wake the worker at commit; this only bounds how long it sleeps.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"webhooks.allow_http",
        c"Allow plain http:// endpoint URLs.",
        c"",
        &ALLOW_HTTP,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"webhooks.allow_private_network",
        c"Allow endpoints on loopback, private, link-local, CGNAT, unique-local and metadata addresses.",
        c"",
        &ALLOW_PRIVATE_NETWORK,
        GucContext::Suset,
        GucFlags::default(),
    );
}

type CheckHook = unsafe extern "C-unwind" fn(
    *mut *mut c_char,
    *mut *mut c_void,
    pg_sys::GucSource::Type,
) -> bool;

/// A reloadable string setting whose value is checked when it is set: a bad value is refused
/// (`SET`/`ALTER SYSTEM` fail; a bad config file line is logged and the old value kept).
fn define_checked_string(
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    setting: &'static GucSetting<Option<CString>>,
    check: CheckHook,
) {
    // SAFETY: the hook only reads the proposed value and sets the error detail.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            short,
            long,
            setting,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check),
            None,
            None,
        )
    }
}

unsafe fn proposed(newval: *mut *mut c_char) -> Option<String> {
    if newval.is_null() || (*newval).is_null() {
        None
    } else {
        Some(CStr::from_ptr(*newval).to_string_lossy().into_owned())
    }
}

unsafe fn refuse(detail: &str) -> bool {
    let detail = CString::new(detail).unwrap_or_default();
    pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn check_retry_schedule(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    match proposed(newval).map(|v| schedule::parse_retry_schedule(&v)) {
        Some(Err(e)) => refuse(&format!("{e}. Example: 5s,10s,20s,40s,80s")),
        _ => true,
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_interval(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    match proposed(newval) {
        Some(v) if !schedule::is_plain_interval(&v) => {
            refuse("Give a count and a unit, e.g. '5 days', '12 hours' or '30 min'.")
        }
        _ => true,
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_databases(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // The postmaster reading the configuration at start-up keeps the value as written: had it
    // refused it, the default would be served instead, quietly. The launcher then says what is
    // wrong and serves nothing. ALTER SYSTEM and SET (in a backend) are refused at once.
    if !pg_sys::IsUnderPostmaster {
        return true;
    }
    match proposed(newval).map(|v| parse_databases(&v)) {
        Some(Err(e)) => refuse(&e),
        _ => true,
    }
}

/// Most databases `webhooks.database` may list.
pub const MAX_DATABASES: usize = 16;

/// The database names of `webhooks.database`: comma-separated, white space around each name
/// ignored, each name at most 63 bytes, no name twice, at most MAX_DATABASES.
pub fn parse_databases(list: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for part in list.split(',') {
        let name = part.trim();
        if name.is_empty() {
            return Err("List database names separated by commas, e.g. 'shop, billing'; an empty name is not one.".into());
        }
        if name.len() >= pg_sys::NAMEDATALEN as usize {
            return Err(format!("A database name has at most {} bytes.", pg_sys::NAMEDATALEN - 1));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("Database \"{name}\" is listed twice."));
        }
        names.push(name.to_string());
    }
    if names.len() > MAX_DATABASES {
        return Err(format!("At most {MAX_DATABASES} databases can be served."));
    }
    Ok(names)
}

fn string_of(setting: &GucSetting<Option<CString>>, default: &str) -> String {
    setting
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_else(|| default.to_string())
}

/// The databases served, in the order listed, or why the setting is not a list of them.
pub fn databases() -> Result<Vec<String>, String> {
    parse_databases(&string_of(&DATABASE, "postgres"))
}
pub fn concurrency() -> usize {
    CONCURRENCY.get().max(1) as usize
}
/// Most delivery workers per database.
pub const MAX_WORKERS: usize = 32;
/// Delivery workers to run (webhooks.workers, 0 resolved by the number of cores).
pub fn workers() -> usize {
    match WORKERS.get() {
        n if n > 0 => (n as usize).min(MAX_WORKERS),
        _ => {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            (cores / 4).clamp(1, 8)
        }
    }
}
pub fn max_in_flight_per_endpoint() -> i32 {
    MAX_IN_FLIGHT_PER_ENDPOINT.get().max(1)
}
pub fn batch_size() -> i32 {
    BATCH_SIZE.get().max(1)
}
pub fn retry_schedule() -> String {
    string_of(&RETRY_SCHEDULE, "5s,10s,20s,40s,80s")
}
pub fn timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.get().max(1) as u64)
}
pub fn max_response_bytes() -> usize {
    MAX_RESPONSE_BYTES.get().max(0) as usize
}
/// Default of `webhooks.max_payload_bytes`: 256 KiB, the cap of common event transports
/// (Amazon SQS, SNS and EventBridge, Bitbucket webhooks) and well below the 1 MiB request body
/// limit receivers often sit behind (nginx's default `client_max_body_size`).
pub const DEFAULT_MAX_PAYLOAD_BYTES: i32 = 256 * 1024;
/// Upper bound of `webhooks.max_payload_bytes` (64 MiB).
pub const MAX_MAX_PAYLOAD_BYTES: i32 = 64 * 1024 * 1024;
/// Default of `webhooks.capture_memory`: 16 MB, notes for about 60,000 rows.
pub const DEFAULT_CAPTURE_MEMORY_KB: i32 = 16 * 1024;
pub fn capture_memory_bytes() -> usize {
    CAPTURE_MEMORY_KB.get().max(64) as usize * 1024
}
pub fn max_payload_bytes() -> usize {
    MAX_PAYLOAD_BYTES.get().max(1024) as usize
}
pub fn max_retry_after() -> Duration {
    Duration::from_secs(MAX_RETRY_AFTER_S.get().max(0) as u64)
}
pub fn disable_after() -> String {
    string_of(&DISABLE_AFTER, "5 days")
}
pub fn retention() -> String {
    string_of(&RETENTION, "30 days")
}
pub fn poll_interval() -> Duration {
    Duration::from_millis(POLL_INTERVAL_MS.get().max(10) as u64)
}
pub fn allow_http() -> bool {
    ALLOW_HTTP.get()
}
pub fn allow_private_network() -> bool {
    ALLOW_PRIVATE_NETWORK.get()
}

#[cfg(test)]
mod tests {
    use super::parse_databases;

    #[test]
    fn a_database_list_is_comma_separated_and_trimmed() {
        assert_eq!(parse_databases("shop").expect("one name"), ["shop"]);
        assert_eq!(parse_databases(" shop ,billing,  Other Db ").expect("three names"), ["shop", "billing", "Other Db"]);
    }

    #[test]
    fn empty_duplicate_long_or_too_many_names_are_refused() {
        for bad in ["", " ", "shop,", ",shop", "shop,,billing", "shop, shop"] {
            assert!(parse_databases(bad).is_err(), "{bad:?}");
        }
        assert!(parse_databases(&"d".repeat(64)).is_err());
        assert!(parse_databases(&"d".repeat(63)).is_ok());
        let many: Vec<String> = (0..17).map(|i| format!("db{i}")).collect();
        assert!(parse_databases(&many.join(",")).is_err());
        assert!(parse_databases(&many[..16].join(",")).is_ok());
    }
}
