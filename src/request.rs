//! `webhooks.request(delivery_id)`: the request that was (or will be) sent for a delivery,
//! built by the code the worker sends with (`http::body`, `http::headers`) from the rows the
//! worker builds its job from (the same SQL spelling of the event time as the claim), so the
//! body is the one sent byte for byte. Secrets never leave: signature values and custom
//! header values are masked, URL credentials too.
//!
//! `_request` reads `_secrets` (for the custom header names and how many secrets sign): it is
//! called by the SQL function `webhooks.request`, SECURITY DEFINER, which is what
//! `webhooks_reader` is granted; `_request` itself is executable by nobody else.

use crate::error::raise;
use crate::http::{self, Job, Signature};
use crate::queue::event_time;
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};
use std::time::Duration;

/// The delivery, its event and subscription, and the second its request is (was) signed at:
/// its last attempt's start, or now if it has none yet. Outer joins, so that what is missing
/// can be said.
const REQUEST: &str = concat!(
    "\
SELECT e.id::text, e.type, ",
    event_time!(),
    ", e.data::text, s.url, s.signature, s.signature_header,
       1 + (k.previous_secret IS NOT NULL AND k.previous_expires_at > t.at)::int,
       k.headers::text, pg_catalog.floor(EXTRACT(epoch FROM t.at))::int8,
       e.seq IS NOT NULL, s.id IS NOT NULL, d.subscription_id, s.shape::text, t.attempt,
       s.signature_options::text
  FROM webhooks._deliveries d
  LEFT JOIN webhooks._events e ON e.seq = d.event_seq
  LEFT JOIN webhooks._subscriptions s ON s.id = d.subscription_id
  LEFT JOIN webhooks._secrets k ON k.subscription_id = d.subscription_id
 CROSS JOIN LATERAL (
       SELECT COALESCE(l.started_at, now()) AS at, COALESCE(l.attempt, 1) AS attempt
         FROM (SELECT 1) one
         LEFT JOIN LATERAL (SELECT a.started_at, a.attempt FROM webhooks._attempts a
                             WHERE a.delivery_id = d.id ORDER BY a.attempt DESC LIMIT 1) l ON true) t
 WHERE d.id = $1"
);

fn missing(what: String) -> ! {
    raise(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND, &what)
}

#[pg_extern(stable, parallel_safe)]
fn _request(
    delivery_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(method, String),
        name!(url, String),
        name!(headers, JsonB),
        name!(body, String),
    ),
> {
    let Some(id) = delivery_id else {
        missing("delivery NULL does not exist".into())
    };
    let row = Spi::connect(|c| {
        let rows = c.select(REQUEST, Some(1), &[id.into()])?;
        if rows.is_empty() {
            return Ok(None);
        }
        let r = rows.first();
        Ok::<_, pgrx::spi::Error>(Some((
            (
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<String>(4)?,
            ),
            (
                r.get::<String>(5)?,
                r.get::<String>(6)?,
                r.get::<String>(7)?,
            ),
            (r.get::<i32>(8)?, r.get::<String>(9)?, r.get::<i64>(10)?),
            (r.get::<bool>(11)?, r.get::<bool>(12)?, r.get::<i64>(13)?),
            (r.get::<String>(14)?, r.get::<i32>(15)?),
            r.get::<String>(16)?,
        )))
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: {e}"),
        )
    });
    let Some((event, sub, keys, found, (shape, attempt), options)) = row else {
        missing(format!("delivery {id} does not exist"))
    };
    let (has_event, has_sub, sub_id) = found;
    if has_event != Some(true) {
        missing(format!("the event of delivery {id} is no longer retained"));
    }
    if has_sub != Some(true) {
        missing(format!(
            "subscription {} of delivery {id} no longer exists",
            sub_id.unwrap_or(0)
        ));
    }
    let (event_id, event_type, created_at, data) = event;
    let (url, signature, signature_header) = sub;
    let (secrets, custom, timestamp) = keys;
    // The job as the claim builds it (queue::claim), with placeholders for the secrets: a
    // masked request signs nothing, it only shows how many signatures there are.
    let headers: Vec<(String, String)> = custom
        .and_then(|h| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&h).ok())
        .map(|m| {
            m.into_iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let job = Job {
        delivery_id: id,
        subscription_id: sub_id.unwrap_or(0),
        event_id: event_id.unwrap_or_default(),
        event_type: event_type.unwrap_or_default(),
        created_at: created_at.unwrap_or_default(),
        data: data.unwrap_or_else(|| "{}".into()),
        url: url.unwrap_or_default(),
        signature: Signature::from_columns(
            signature.as_deref(),
            signature_header,
            options.as_deref(),
        ),
        secrets: vec![String::new(); secrets.unwrap_or(1).max(1) as usize],
        headers,
        tls: None,
        timeout: Duration::ZERO,
        max_response_bytes: 0,
        // Shown whatever its size (the worker would not send one over the cap).
        max_payload_bytes: usize::MAX,
        shape: shape.map(|text| crate::shape::parse(&text).map(std::sync::Arc::new)),
        attempt: attempt.unwrap_or(1),
    };
    let timestamp = timestamp.unwrap_or(0);
    let request = http::shaped(&job, timestamp, usize::MAX).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            &format!("the event of delivery {id} cannot be sent: {e}"),
        )
    });
    let body = request.body;
    let mut sent = http::headers(&job, timestamp, &body, &request.headers, true)
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, &e));
    // No custom header names a user-agent: the HTTP client then sends its own.
    if !sent.iter().any(|(name, _)| name == "user-agent") {
        sent.push(("user-agent".into(), http::USER_AGENT.into()));
    }
    // One JSON member per header name; a name sent twice (a custom header named like the hex
    // signature header, or two spellings of one name) shows its values joined by ", ", as a
    // receiver reads them.
    let mut object = serde_json::Map::new();
    for (name, value) in sent {
        match object.get_mut(&name) {
            Some(serde_json::Value::String(v)) => {
                v.push_str(", ");
                v.push_str(&value);
            }
            _ => {
                object.insert(name, serde_json::Value::String(value));
            }
        }
    }
    let body = String::from_utf8(body).unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            &format!("the body of delivery {id} is not UTF-8"),
        )
    });
    TableIterator::once((
        "POST".to_string(),
        crate::netcheck::mask_url(&job.url),
        JsonB(serde_json::Value::Object(object)),
        body,
    ))
}

/// The event `event_seq` as subscription `subscription_id` receives it: the (renamed) event
/// type, the body exactly as a push would send it (shape applied; attempt 1, timestamp now,
/// `delivery_id` if given), and the shape's headers. For `webhooks.poll()`: polled events have
/// the shape and ids of pushed ones. Executable by the extension's owner only (called from
/// SECURITY DEFINER functions). Unknown subscription or event: P0002.
#[pg_extern(stable, parallel_safe)]
fn _render(
    subscription_id: Option<i64>,
    event_seq: Option<i64>,
    delivery_id: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(event_type, String),
        name!(body, String),
        name!(headers, JsonB),
    ),
> {
    let (Some(sub), Some(seq)) = (subscription_id, event_seq) else {
        missing("subscription and event must not be NULL".into())
    };
    let row = Spi::connect(|c| {
        let rows = c.select(RENDER, Some(1), &[sub.into(), seq.into()])?;
        if rows.is_empty() {
            return Ok(None);
        }
        let r = rows.first();
        Ok::<_, pgrx::spi::Error>(Some((
            r.get::<bool>(1)?,
            r.get::<bool>(2)?,
            r.get::<String>(3)?,
            r.get::<String>(4)?,
            r.get::<String>(5)?,
            r.get::<String>(6)?,
            r.get::<String>(7)?,
            r.get::<i64>(8)?,
        )))
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: {e}"),
        )
    });
    let Some((has_sub, has_event, event_id, event_type, created_at, data, shape, now)) = row else {
        unreachable!("one row always")
    };
    if has_sub != Some(true) {
        missing(format!("subscription {sub} does not exist"));
    }
    if has_event != Some(true) {
        missing(format!("event {seq} does not exist (or is no longer retained)"));
    }
    let shape = shape.map(|text| {
        crate::shape::parse(&text).unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                &format!("the shape of subscription {sub} cannot be used: {e}"),
            )
        })
    });
    let envelope = crate::shape::Envelope {
        event_id: event_id.as_deref().unwrap_or_default(),
        event_type: event_type.as_deref().unwrap_or_default(),
        created_at: created_at.as_deref().unwrap_or_default(),
        data: data.as_deref().unwrap_or("{}"),
        delivery_id: delivery_id.unwrap_or(0),
        attempt: 1,
        timestamp: now.unwrap_or(0),
        subscription_id: sub,
    };
    let rendered = crate::shape::render(shape.as_ref(), &envelope, usize::MAX).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            &format!("event {seq} cannot be shaped for subscription {sub}: {e}"),
        )
    });
    let headers: serde_json::Map<String, serde_json::Value> = rendered
        .headers
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let body = String::from_utf8(rendered.body).unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            &format!("the body of event {seq} is not UTF-8"),
        )
    });
    TableIterator::once((
        rendered.event_type,
        body,
        JsonB(serde_json::Value::Object(headers)),
    ))
}

/// The subscription and the event for `_render`, as the claim reads them.
const RENDER: &str = concat!(
    "\
SELECT s.id IS NOT NULL, e.seq IS NOT NULL, e.id::text, e.type, ",
    event_time!(),
    ", e.data::text, s.shape::text, pg_catalog.floor(EXTRACT(epoch FROM now()))::int8
  FROM (SELECT 1) one
  LEFT JOIN webhooks._subscriptions s ON s.id = $1
  LEFT JOIN webhooks._events e ON e.seq = $2"
);
