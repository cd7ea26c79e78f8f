//! `webhooks.poll()`: the pull fallback, for consumers that cannot receive a POST (behind a
//! firewall, no public endpoint). A poll subscription is fanned out to like any other (same
//! deliveries, same order, same event ids) but the worker never sends its deliveries; the
//! consumer takes them with `poll()`, which acknowledges everything up to its cursor first.
//!
//! Who may poll is checked here, with the caller's own identity (`GetUserId`): a member of
//! `webhooks_admin` may poll every subscription, another role only those that
//! `webhooks.grant_poll()` gave it (or a role it has the privileges of). A SECURITY DEFINER SQL
//! function could not tell who called it. The work itself is `webhooks._poll` (sql/api.sql),
//! run as the extension's owner and executable by nobody else.

use crate::error::{raise, raise_with_hint};
use crate::shape::{self, Envelope, Shape};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

/// The event type and body a push of this event to the subscription would send (its shape
/// applied: renamed type, body template, JSON spelling; without a shape the Standard Webhooks
/// envelope `{"id","type","created_at","data"}`), byte for byte as the worker builds them
/// (`shape::render`), with this delivery's id, attempt 1 and `timestamp` (now).
fn shaped(
    shape: Option<&Shape>,
    subscription_id: i64,
    cursor: i64,
    event_id: &str,
    event_type: &str,
    created_at: &str,
    data: &str,
    timestamp: i64,
) -> (String, String) {
    let envelope = Envelope {
        event_id,
        event_type,
        created_at,
        data,
        delivery_id: cursor,
        attempt: 1,
        timestamp,
        subscription_id,
    };
    let rendered = shape::render(shape, &envelope, usize::MAX).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            &format!("the event of delivery {cursor} cannot be shaped: {e}"),
        )
    });
    let body = String::from_utf8(rendered.body).unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            &format!("the body of delivery {cursor} is not UTF-8"),
        )
    });
    (rendered.event_type, body)
}

/// The subscription's shape, parsed (None: none).
fn shape_of(subscription: i64) -> Option<Shape> {
    let text = crate::api::as_extension_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT shape::text FROM webhooks._subscriptions WHERE id = $1",
            &[subscription.into()],
        )
    })
    .unwrap_or(None)?;
    Some(shape::parse(&text).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            &format!("the shape of subscription {subscription} cannot be used: {e}"),
        )
    }))
}

/// Whether `user` may poll `subscription`: superuser, a member of webhooks_admin, or granted
/// it (`_poll_grants`, read as the extension's owner).
fn may_poll(user: pg_sys::Oid, subscription: i64) -> bool {
    if unsafe { pg_sys::superuser_arg(user) } {
        return true;
    }
    let admin = unsafe { pg_sys::get_role_oid(c"webhooks_admin".as_ptr(), true) };
    if admin != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(user, admin) } {
        return true;
    }
    let roles: Vec<pg_sys::Oid> = crate::api::as_extension_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT g.role::pg_catalog.oid FROM webhooks._poll_grants g WHERE g.subscription_id = $1",
                None,
                &[subscription.into()],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
        })
    })
    .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("pg_webhooks: {e}")));
    roles
        .into_iter()
        .any(|r| r != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(user, r) })
}

type PollRow = (i64, pgrx::Uuid, String, TimestampWithTimeZone, String);

/// `webhooks.poll(subscription, after, limit)`: acknowledge the deliveries handed out up to
/// cursor `after` (they end succeeded), then hand out the next `limit` in commit order.
#[pg_extern(volatile, parallel_unsafe)]
fn poll(
    subscription: Option<i64>,
    after: default!(Option<i64>, "NULL"),
    limit: default!(Option<i32>, 100),
) -> TableIterator<
    'static,
    (
        name!(cursor, i64),
        name!(event_id, pgrx::Uuid),
        name!(event_type, String),
        name!(created_at, TimestampWithTimeZone),
        name!(body, String),
    ),
> {
    let Some(subscription) = subscription else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "subscription must not be NULL",
        )
    };
    let limit = limit.unwrap_or(0);
    if !(1..=10_000).contains(&limit) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "limit must be between 1 and 10000",
        );
    }
    let user = unsafe { pg_sys::GetUserId() };
    if !may_poll(user, subscription) {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!("permission denied to poll subscription {subscription}"),
            "A member of webhooks_admin can allow a role with webhooks.grant_poll(subscription, role); the role also needs webhooks_consumer.",
        );
    }
    let rows: Vec<(i64, pgrx::Uuid, String, TimestampWithTimeZone, String, String, String)> =
        crate::api::as_extension_owner(|| {
            Spi::connect_mut(|c| {
                c.update(
                    "SELECT p.cursor, p.event_id, p.event_type, p.created_at, p.created_at_text, p.data,
                            p.event_id::text
                       FROM webhooks._poll($1, $2, $3) AS p",
                    None,
                    &[subscription.into(), after.into(), limit.into()],
                )?
                .map(|r| {
                    Ok((
                        r.get::<i64>(1)?.unwrap_or_default(),
                        r.get::<pgrx::Uuid>(2)?.unwrap_or_else(|| pgrx::Uuid::from_bytes([0; 16])),
                        r.get::<String>(3)?.unwrap_or_default(),
                        r.get::<TimestampWithTimeZone>(4)?
                            .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "event without a time")),
                        r.get::<String>(5)?.unwrap_or_default(),
                        r.get::<String>(6)?.unwrap_or_else(|| "{}".into()),
                        r.get::<String>(7)?.unwrap_or_default(),
                    ))
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
            })
        })
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("pg_webhooks: {e}")));
    let shape = shape_of(subscription);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let out: Vec<PollRow> = rows
        .into_iter()
        .map(|(cursor, id, event_type, at, at_text, data, id_text)| {
            let (event_type, body) = shaped(
                shape.as_ref(),
                subscription,
                cursor,
                &id_text,
                &event_type,
                &at_text,
                &data,
                now,
            );
            (cursor, id, event_type, at, body)
        })
        .collect();
    TableIterator::new(out)
}
