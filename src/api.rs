//! Rust helpers behind the SQL API in `sql/api.sql`: validation that is easier to get right
//! here than in PL/pgSQL, and secret generation from the OS CSPRNG.

use crate::error::{raise, raise_with_hint};
use crate::{gucs, netcheck, patterns, schedule, signing};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

/// Validates a subscription URL; returns it normalized. Raises 22023 on a bad one.
#[pg_extern(stable, strict, parallel_safe)]
fn _check_url(url: &str) -> String {
    let parsed = netcheck::validate_url(url, gucs::allow_http()).unwrap_or_else(|e| {
        let hint = match e {
            netcheck::UrlError::HttpNotAllowed => {
                "Use https://, or have a superuser set webhooks.allow_http = on (for local testing)."
            }
            _ => "A subscription URL looks like https://example.com/webhooks.",
        };
        raise_with_hint(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, &format!("invalid webhook URL: {e}"), hint)
    });
    if !gucs::allow_private_network() {
        let literal_ip = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(reason) = literal_ip.and_then(netcheck::forbidden_reason) {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                &format!("invalid webhook URL: the address is {reason}"),
                "Endpoints on private networks need webhooks.allow_private_network = on (superuser).",
            );
        }
    }
    parsed.to_string()
}

/// The URL with any password or credential-looking query value replaced by `***`.
#[pg_extern(immutable, strict, parallel_safe)]
fn _mask_url(url: &str) -> String {
    netcheck::mask_url(url)
}

/// A new signing secret: `whsec_` + base64 of 24 bytes from the OS CSPRNG.
#[pg_extern(volatile, parallel_safe)]
fn _generate_secret() -> String {
    signing::generate_secret().unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            "could not read random bytes for a secret",
        )
    })
}

/// Raises 22023 unless `schedule` is a valid retry schedule such as `5s,10s,1m`.
#[pg_extern(immutable, strict, parallel_safe)]
fn _check_retry_schedule(schedule: &str) {
    if let Err(e) = schedule::parse_retry_schedule(schedule) {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("invalid retry schedule: {e}"),
            "Give comma-separated waits with a unit, e.g. '5s,10s,20s,40s,80s' or 'immediate,1m,5m,30m,2h'.",
        );
    }
}

/// Raises 22023 unless every pattern is `*`, `prefix.*` or an exact event type.
#[pg_extern(immutable, strict, parallel_safe)]
fn _check_event_patterns(patterns: Vec<Option<String>>) {
    if patterns.is_empty() {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "event_types must not be empty",
            "Use '{*}' for every event, or patterns such as '{order.*}' or '{order.shipped}'.",
        );
    }
    for p in patterns {
        let p = p.unwrap_or_default();
        if !patterns::is_event_pattern(&p) {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                &format!("invalid event type pattern \"{p}\""),
                "A pattern is '*', a prefix such as 'order.*', or an exact type such as 'order.shipped'.",
            );
        }
    }
}

/// A child table as `webhooks.track()` hands it to `_register_tracked`.
#[derive(serde::Deserialize)]
struct ChildArg {
    name: String,
    relid: u32,
    fk_attnum: i16,
}

fn relation_name(relid: pg_sys::Oid) -> String {
    unsafe {
        let p = pg_sys::get_rel_name(relid);
        if p.is_null() {
            relid.to_u32().to_string()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Run a catalog lookup with the caller's own rights but a fixed search_path, so no operator
/// or function of the caller's can stand in for pg_catalog's.
fn as_caller<R>(f: impl FnOnce() -> R) -> R {
    crate::capture::as_role(unsafe { pg_sys::GetUserId() }, f)
}

fn owner_of(relid: pg_sys::Oid) -> pg_sys::Oid {
    as_caller(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = $1",
            &[relid.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            &format!("relation with OID {} does not exist", relid.to_u32()),
        )
    })
}

/// A plain or partitioned table on which `user` holds SELECT and TRIGGER: what creating the
/// capture triggers and reading the rows into events both need.
fn check_trackable(relid: pg_sys::Oid, user: pg_sys::Oid) {
    let kind = unsafe { pg_sys::get_rel_relkind(relid) } as u8;
    let temporary = as_caller(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT c.relpersistence = 't' FROM pg_catalog.pg_class c WHERE c.oid = $1",
            &[relid.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(true);
    if temporary || (kind != pg_sys::RELKIND_RELATION && kind != pg_sys::RELKIND_PARTITIONED_TABLE)
    {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            &format!("\"{}\" is not a permanent table", relation_name(relid)),
        );
    }
    for (mode, name) in [
        (pg_sys::ACL_SELECT, "SELECT"),
        (pg_sys::ACL_TRIGGER, "TRIGGER"),
    ] {
        if unsafe { pg_sys::pg_class_aclcheck(relid, user, mode as pg_sys::AclMode) }
            != pg_sys::AclResult::ACLCHECK_OK
        {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                &format!("permission denied to track table {}", relation_name(relid)),
                &format!("Tracking needs SELECT and TRIGGER on the table and its children; {name} is missing."),
            );
        }
    }
}

fn column_exists(relid: pg_sys::Oid, attnum: i16) -> bool {
    attnum > 0 && !unsafe { pg_sys::get_attname(relid, attnum, true) }.is_null()
}

/// Run `f` as the owner of the extension's tables (who alone may write `_tracked`).
pub(crate) fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = as_caller(|| {
        Spi::get_one::<pg_sys::Oid>(
            "SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = 'webhooks._tracked'::pg_catalog.regclass",
        )
    })
    .ok()
    .flatten()
    .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "webhooks._tracked is missing"));
    crate::capture::as_role(owner, f)
}

/// Raises unless `track` may lock the table (`locks::_lock_tables_for_tracking`, which locks
/// the tables `track` is about to read and put triggers on, as its CREATE TRIGGERs would, SHARE
/// ROW EXCLUSIVE, before `track` reads their columns): a DROP of the table or of one of
/// its columns has then either committed before (`track` sees it gone) or waits for `track`
/// to commit (and its drop handler sees the table tracked). Without it, a child that already
/// had a capture trigger (made by hand, or restored) was never locked by `track`, and a DROP of
/// it or of its foreign key column could commit between the two and leave `_tracked` naming
/// what is gone. Only for a table `track` would take: a permanent table (not a system
/// catalog) the caller may read and put triggers on, in a schema it may use (as looking the
/// table up by name for CREATE TRIGGER needs), so that it locks nothing CREATE TRIGGER would
/// not.
pub(crate) fn check_lockable_for_tracking(tbl: pg_sys::Oid) {
    let user = unsafe { pg_sys::GetUserId() };
    if unsafe { pg_sys::IsCatalogRelationOid(tbl) } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!("permission denied to track table {}: it is a system catalog", relation_name(tbl)),
        );
    }
    check_trackable(tbl, user);
    let schema = unsafe { pg_sys::get_rel_namespace(tbl) };
    if unsafe { pg_sys::pg_namespace_aclcheck(schema, user, pg_sys::ACL_USAGE as pg_sys::AclMode) }
        != pg_sys::AclResult::ACLCHECK_OK
    {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!("permission denied for the schema of table {}", relation_name(tbl)),
        );
    }
}

/// Registers a table for capture: called by `webhooks.track()` after it created the triggers,
/// with the caller's rights, which are checked here again (the table and every child must be
/// tables the caller may read and put triggers on, and the table's owner, whose rights
/// capture reads with, must be able to read the children). `_tracked` holds only names as
/// data and attribute numbers, so what it holds can never become code.
#[pg_extern(volatile, parallel_unsafe)]
fn _register_tracked(
    tbl: Option<pg_sys::Oid>,
    entity: Option<&str>,
    key_attnum: Option<i16>,
    status_attnum: Option<i16>,
    children: Option<crate::capture::RawJsonb>,
) {
    // Not STRICT (status_attnum may be NULL): the others must not be.
    let (Some(tbl), Some(entity), Some(key_attnum), Some(children)) =
        (tbl, entity, key_attnum, children)
    else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "tbl, entity, key_attnum and children must not be NULL",
        )
    };
    let user = unsafe { pg_sys::GetUserId() };
    check_trackable(tbl, user);
    if entity.is_empty()
        || entity.len() > 63
        || !entity
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("invalid entity name \"{entity}\""),
        );
    }
    if column_exists(tbl, key_attnum)
        && !crate::capture::supported_key_type(unsafe {
            pg_sys::getBaseType(pg_sys::get_atttype(tbl, key_attnum))
        })
    {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "the key column's type cannot be an event key",
        );
    }
    if !column_exists(tbl, key_attnum) || status_attnum.is_some_and(|a| !column_exists(tbl, a)) {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            "the key or status column does not exist",
        );
    }
    let specs: Vec<ChildArg> = serde_json::from_str(&children.to_text()).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("invalid children: {e}"),
        )
    });
    let owner = owner_of(tbl);
    for c in &specs {
        let child = pg_sys::Oid::from(c.relid);
        owner_of(child);
        check_trackable(child, user);
        if c.name.is_empty() || !column_exists(child, c.fk_attnum) {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                &format!("invalid children entry \"{}\"", c.name),
            );
        }
        if owner_of(child) != owner {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                &format!(
                    "child table {} is not owned by the owner of {}",
                    relation_name(child),
                    relation_name(tbl)
                ),
                "Capture reads a table and its children with the rights of their one owner.",
            );
        }
        if unsafe { pg_sys::pg_class_aclcheck(child, owner, pg_sys::ACL_SELECT as pg_sys::AclMode) }
            != pg_sys::AclResult::ACLCHECK_OK
        {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                &format!(
                    "the owner of {} cannot read its child table {}",
                    relation_name(tbl),
                    relation_name(child)
                ),
                "Capture reads the children with the rights of the tracked table's owner: GRANT SELECT on the child table to that owner.",
            );
        }
    }
    let child_oids: Vec<pg_sys::Oid> = specs.iter().map(|c| pg_sys::Oid::from(c.relid)).collect();
    // A database not yet updated to this library's version (ALTER EXTENSION ... UPDATE) has
    // no child_tables: tracking works there as it did.
    let by_name = as_extension_owner(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = 'webhooks._tracked'::pg_catalog.regclass
                               AND a.attname = 'child_tables' AND NOT a.attisdropped)",
        )
    })
    .ok()
    .flatten()
    .unwrap_or(false);
    let insert = if by_name {
        // child_tables given: a registration (see webhooks._tracked_by_name).
        "INSERT INTO webhooks._tracked (relid, entity, key_attnum, status_attnum, children, child_tables)
         VALUES ($1, $2, $3, $4, $5, $6::pg_catalog.oid[]::pg_catalog.regclass[])"
    } else {
        "INSERT INTO webhooks._tracked (relid, entity, key_attnum, status_attnum, children)
         SELECT $1, $2, $3, $4, $5 WHERE $6::pg_catalog.oid[] IS NOT NULL"
    };
    as_extension_owner(|| {
        Spi::run_with_args(
            insert,
            &[
                tbl.into(),
                entity.into(),
                key_attnum.into(),
                status_attnum.into(),
                children.into(),
                child_oids.into(),
            ],
        )
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: {e}"),
        )
    });
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(tbl) };
    // Capture finds a child's parents through the children's relcache entries too.
    for c in &specs {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(pg_sys::Oid::from(c.relid)) };
    }
}

/// Forgets a tracked table: called by `webhooks.untrack()`, for the table's owner only (who
/// alone can drop its triggers).
#[pg_extern(volatile, parallel_unsafe)]
fn _unregister_tracked(tbl: pg_sys::Oid) {
    let user = unsafe { pg_sys::GetUserId() };
    if !unsafe { pg_sys::pg_class_ownercheck(tbl, user) } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!(
                "must be owner of table {} to untrack it",
                relation_name(tbl)
            ),
        );
    }
    let children: Vec<pg_sys::Oid> = as_extension_owner(|| {
        Spi::connect_mut(|c| {
            c.update(
                "WITH gone AS (DELETE FROM webhooks._tracked WHERE relid = $1 RETURNING children)
                 SELECT (e.value ->> 'relid')::pg_catalog.oid
                   FROM gone, pg_catalog.jsonb_array_elements(gone.children) e",
                None,
                &[tbl.into()],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
        })
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: {e}"),
        )
    });
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(tbl) };
    for child in children {
        // (A child dropped meanwhile has left the configuration and the caches already.)
        if unsafe { !pg_sys::get_rel_name(child).is_null() } {
            unsafe { pg_sys::CacheInvalidateRelcacheByRelid(child) };
        }
    }
}

/// Raises 22023 unless `shape` (jsonb text) is a valid request shape (src/shape.rs) whose
/// headers are none of `reserved_headers` (the subscription's custom header names and
/// signature header), and every pattern of `event_types` is a pattern or one of the shape's
/// renamed event names. NULL `event_types`: the patterns are not checked.
#[pg_extern(immutable, parallel_safe)]
fn _check_shape(
    shape: Option<&str>,
    event_types: Option<Vec<Option<String>>>,
    reserved_headers: Option<Vec<Option<String>>>,
) {
    let bad = |message: &str| -> ! {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            message,
            "See \"Request shapes\" in the README: shape => '{\"event_names\": {...}, \"body\": {...}, \"event_type_header\": \"X-Event-Type\", \"json\": \"javascript\"}'.",
        )
    };
    let parsed = shape.map(|text| crate::shape::parse(text).unwrap_or_else(|e| bad(&e)));
    if let Some(patterns) = event_types {
        crate::shape::check_patterns(&patterns, parsed.as_ref()).unwrap_or_else(|e| bad(&e));
    }
    let Some(parsed) = parsed else { return };
    for name in parsed.header_names() {
        if reserved_headers
            .iter()
            .flatten()
            .flatten()
            .any(|r| r.eq_ignore_ascii_case(name))
        {
            bad(&format!(
                "shape header \"{name}\" is already one of this subscription's headers (custom or signature)"
            ));
        }
    }
}

/// A signature style and its settings, validated and normalized for storing: returns
/// `{"signature_header": …, "signature_options": …}` (each may be null). Raises 22023 naming
/// the argument or key at fault.
#[pg_extern(immutable, parallel_safe)]
fn _check_signature(
    signature: Option<&str>,
    signature_header: Option<&str>,
    signature_options: Option<&str>,
) -> pgrx::JsonB {
    let bad = |message: &str| -> ! {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            message,
            "signature is 'standard' (Standard Webhooks), 'hex', 'hmac' (with signature_options) or 'stripe'.",
        )
    };
    let style = match signature {
        Some(s @ ("standard" | "hex" | "hmac" | "stripe")) => s,
        _ => bad("signature must be 'standard', 'hex', 'hmac' or 'stripe'"),
    };
    if signature_options.is_some() && style != "hmac" {
        bad("signature_options applies to signature => 'hmac' only");
    }
    let (header, options) = match style {
        "standard" => {
            if signature_header.is_some() {
                bad("signature_header applies to signature => 'hex', 'hmac' or 'stripe' only");
            }
            (None, None)
        }
        "hmac" => {
            let o = signing::HmacOptions::parse(signature_header, signature_options)
                .unwrap_or_else(|e| bad(&e));
            (Some(o.header.clone()), Some(o.to_json()))
        }
        _ => {
            let default = if style == "hex" {
                "X-Webhook-Signature"
            } else {
                "Stripe-Signature"
            };
            let header = signature_header.unwrap_or(default);
            signing::check_header_name("signature_header", header).unwrap_or_else(|e| bad(&e));
            (Some(header.to_string()), None)
        }
    };
    pgrx::JsonB(serde_json::json!({"signature_header": header, "signature_options": options}))
}

/// Raises 22023 unless a secret the subscriber brings can sign in `signature`'s style. The
/// message never contains the secret.
#[pg_extern(immutable, parallel_safe)]
fn _check_secret(signature: Option<&str>, secret: Option<&str>) {
    let Some(secret) = secret else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "secret must not be NULL here",
        )
    };
    if let Err(e) = signing::check_secret(signature.unwrap_or("standard"), secret) {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &e,
            "For 'hex', 'hmac' and 'stripe' a secret is 8 to 1024 bytes without control characters; for 'standard' it is whsec_ + base64 of 24 to 64 bytes.",
        );
    }
}

/// Checks TLS settings (JSON text) for a subscription to `url`; returns what may be shown
/// about them (subject, issuer and expiry of the client certificate, the CA bundle's size).
/// Raises 22023 naming the key at fault, never showing key material.
#[pg_extern(immutable, parallel_safe)]
fn _check_tls(tls: Option<&str>, url: Option<&str>) -> pgrx::JsonB {
    let bad = |message: &str| -> ! {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            message,
            "tls is '{\"client_certificate\": PEM, \"client_key\": PEM, \"ca_bundle\": PEM}' (certificate and key together, the bundle optional).",
        )
    };
    let settings =
        crate::tls::TlsSettings::parse(tls.unwrap_or("null")).unwrap_or_else(|e| bad(&e));
    if !url
        .unwrap_or_default()
        .to_ascii_lowercase()
        .starts_with("https:")
    {
        bad("tls applies to https:// URLs only");
    }
    pgrx::JsonB(settings.check().unwrap_or_else(|e| bad(&e)))
}
