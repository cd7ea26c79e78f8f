//! Errors raised to SQL with an explicit SQLSTATE. Messages are built by the callers from
//! values that are safe to show: never a secret, a header value or a URL password.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

fn report(code: PgSqlErrorCode, message: &str, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.to_string(), "pg_webhooks");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// Raise an ERROR with `code` and `message`; does not return.
pub fn raise(code: PgSqlErrorCode, message: &str) -> ! {
    report(code, message, None)
}

/// Raise an ERROR with `code`, `message` and a hint telling the user what to do instead.
pub fn raise_with_hint(code: PgSqlErrorCode, message: &str, hint: &str) -> ! {
    report(code, message, Some(hint))
}
