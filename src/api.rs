//! Rust helpers behind the SQL API in `sql/api.sql`: validation that is easier to get right
//! here than in PL/pgSQL, and secret generation from the OS CSPRNG.

use crate::error::{raise, raise_with_hint};
use crate::{gucs, netcheck, patterns, schedule, signing};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

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
