//! The worker's SQL: fan out committed events, claim due deliveries, record outcomes.
//! Each is one statement per batch (a round trip per batch, not per delivery), run in a
//! short transaction of its own by the worker's main thread.

use crate::http::{Job, Signature};
use crate::shape::Shape;
use std::sync::Arc;
use crate::plans::{run_kept, with_plan};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use std::time::Duration;

/// An event's `created_at` as the body carries it (RFC 3339, UTC, microseconds), of the event
/// row `e`: one spelling for what the worker sends (CLAIM) and what `webhooks.request()`
/// shows.
macro_rules! event_time {
    () => {
        "pg_catalog.to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    };
}
pub(crate) use event_time;

/// The queue rows of new deliveries `k` (id, subscription, event seq, ordering key): each is
/// a head if unordered, or the first of its key among them with nothing of its key queued.
macro_rules! queue_heads {
    () => {
        "q AS (
    INSERT INTO webhooks._queue (delivery_id, subscription_id, event_seq, ordering_key, head)
    SELECT k.id, k.subscription_id, k.event_seq, k.ordering_key,
           k.ordering_key IS NULL
           OR (pg_catalog.row_number() OVER (PARTITION BY k.subscription_id, k.ordering_key ORDER BY k.event_seq) = 1
               AND NOT EXISTS (SELECT 1 FROM webhooks._queue h
                                WHERE h.subscription_id = k.subscription_id AND h.ordering_key = k.ordering_key))
      FROM k
    RETURNING 1
)"
    };
}

/// Fan out the events of the transactions `$1` (xid8 as text), those after seq `$2`, at most
/// `$3` of them, in seq order: deliveries for every subscription that matches them and was
/// created before they committed. Returns how many events were taken and the last one's seq.
/// `$extra`: more statements on the events taken (`e`), for the schema's version.
macro_rules! fan_out {
    ($extra:literal) => { concat!("\
WITH e AS (
    SELECT ev.seq, ev.type, ev.entity, ev.key, ev.data, ev.xid, ev.created_at
      FROM webhooks._events ev
     WHERE ev.xid = ANY ($1::text[]::xid8[]) AND ev.seq > $2
     ORDER BY ev.xid, ev.seq
     LIMIT $3
), d AS (
    INSERT INTO webhooks._deliveries (event_seq, subscription_id, next_attempt_at)
    SELECT e.seq, s.id, now()
      FROM e JOIN webhooks._subscriptions s
        ON s.fanned_out
       AND webhooks._matches(s.event_types, s.filter, e.type, e.data, s.shape -> 'event_names')
       AND NOT pg_catalog.pg_visible_in_snapshot(e.xid, s.created_snapshot)
     ORDER BY e.seq, s.id
    RETURNING id, event_seq, subscription_id
), k AS (
    -- The event of each delivery by its primary key, not from `e`: a CTE has no index, and
    -- with hash and merge joins off the join would read all of `e` once per delivery (a
    -- batch of 500 events to 200 subscriptions took seconds).
    SELECT d.id, d.subscription_id, d.event_seq,
           CASE WHEN ev.key IS NOT NULL THEN ev.entity || ':' || ev.key END AS ordering_key
      FROM d JOIN webhooks._events ev ON ev.seq = d.event_seq
), ", queue_heads!(), $extra, "
SELECT (SELECT pg_catalog.count(*) FROM e)::int8, (SELECT pg_catalog.max(e.seq) FROM e)::int8,
       (SELECT pg_catalog.count(*) FROM q)::int8") };
}

/// Fan-out for a schema without the rollups (0.1.0, before `ALTER EXTENSION ... UPDATE`).
const FAN_OUT: &str = fan_out!("");

/// Fan-out that also counts the events taken per type and hour (UTC) for
/// `webhooks.event_stats`: every committed event is fanned out exactly once, in the
/// transaction that records how far fan-out got, so each is counted once, and fan-out reads
/// them anyway. One row per type and hour in the batch, of worker 0's own (only worker 0 fans
/// out), so nothing else ever waits for its lock.
/// (`_event_stats` keeps an event type's first 200 characters: its key is indexed, an index
/// entry holds at most 2704 bytes, and a type from `status_events` has no length limit. A
/// type that long must not stop fan-out or recording; types sharing 200 characters share a
/// row.)
const FAN_OUT_COUNTED: &str = fan_out!(", es AS (
    INSERT INTO webhooks._event_stats AS t (bucket, event_type, worker, emitted)
    SELECT pg_catalog.date_trunc('hour', e.created_at, 'UTC'), pg_catalog.left(e.type, 200), 0,
           pg_catalog.count(*)
      FROM e GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (bucket, event_type, worker) DO UPDATE SET emitted = t.emitted + excluded.emitted
)");

/// Subscriptions the worker sees for the first time get, before the next batch, the events they
/// are owed (committed after their `created_snapshot`) among those fanned out already (visible
/// in `$1`, the snapshot done): their creating transaction may have been open while those were
/// fanned out. Then they are fanned out to like the others.
const BACKFILL: &str = concat!("\
WITH s AS (
    -- One that a transaction holds (an unsubscribe, a pause still open) is left for a later
    -- batch, which gives it all it is owed then (everything fanned out by then): fan-out
    -- never waits for a subscriber's transaction.
    UPDATE webhooks._subscriptions s SET fanned_out = true
     WHERE s.id IN (SELECT n.id FROM webhooks._subscriptions n WHERE NOT n.fanned_out
                      FOR NO KEY UPDATE SKIP LOCKED)
    RETURNING s.id, s.event_types, s.filter, s.created_snapshot, s.shape
), e AS (
    SELECT ev.seq, ev.type, ev.entity, ev.key, s.id AS sub
      FROM s CROSS JOIN LATERAL (
           SELECT ev.seq, ev.type, ev.entity, ev.key FROM webhooks._events ev
            -- Bounded on both sides (what is visible in $1 is below its xmax), so that the
            -- planner probes the xid index instead of scanning every event.
            WHERE ev.xid >= pg_catalog.pg_snapshot_xmin(s.created_snapshot)
              AND ev.xid < pg_catalog.pg_snapshot_xmax($1::pg_snapshot)
              AND NOT pg_catalog.pg_visible_in_snapshot(ev.xid, s.created_snapshot)
              AND pg_catalog.pg_visible_in_snapshot(ev.xid, $1::pg_snapshot)
              AND webhooks._matches(s.event_types, s.filter, ev.type, ev.data, s.shape -> 'event_names')) ev
), d AS (
    INSERT INTO webhooks._deliveries (event_seq, subscription_id, next_attempt_at)
    SELECT e.seq, e.sub, now() FROM e ORDER BY e.seq, e.sub
    RETURNING id, event_seq, subscription_id
), k AS (
    -- By the event's primary key, not from `e` (see FAN_OUT).
    SELECT d.id, d.subscription_id, d.event_seq,
           CASE WHEN ev.key IS NOT NULL THEN ev.entity || ':' || ev.key END AS ordering_key
      FROM d JOIN webhooks._events ev ON ev.seq = d.event_seq
), ", queue_heads!(), "
SELECT pg_catalog.count(*)::int8 FROM q");

/// The lock between fan-out's choice of heads and the records that release keys (see fan_out):
/// a lock on the table `_fanout`, EXCLUSIVE for fan-out, ROW SHARE for records (which do not
/// conflict with each other, nor with readers of `_fanout`). Not an advisory lock: any role can
/// take those, and DDL already takes one of the extension's for the tracked tables' triggers.
/// A table lock in these modes needs UPDATE, DELETE or TRUNCATE on `_fanout`: its owner's.
const HEADS_LOCK_SHARED: &str = "LOCK TABLE webhooks._fanout IN ROW SHARE MODE";

/// The transactions of the batch in progress: visible in `$2` (the batch) and not in `$1` (the
/// last batch done), with their first event's seq and their number of events, in the order of
/// their first event. Found through `_events_xid_idx`: transactions that were running at `$1`
/// one probe each, the others a range of xids (two index scans, not one OR that the planner
/// could only answer with a scan of the whole table).
const BATCH_TRANSACTIONS: &str = "\
SELECT ev.xid::text, pg_catalog.min(ev.seq), pg_catalog.count(*)
  FROM (SELECT ev.xid, ev.seq FROM webhooks._events ev
         WHERE ev.xid >= pg_catalog.pg_snapshot_xmax($1::pg_snapshot)
           AND ev.xid < pg_catalog.pg_snapshot_xmax($2::pg_snapshot)
        UNION ALL
        SELECT ev.xid, ev.seq
          FROM pg_catalog.pg_snapshot_xip($1::pg_snapshot) AS r(xid)
         CROSS JOIN LATERAL (SELECT ev.xid, ev.seq FROM webhooks._events ev WHERE ev.xid = r.xid) ev) ev
 WHERE pg_catalog.pg_visible_in_snapshot(ev.xid, $2::pg_snapshot)
 GROUP BY ev.xid
 ORDER BY 2";

/// Fan-out's other statements (see fan_out). First, without a lock: where the stream is.
const FANOUT_QUIET: &str =
    "SELECT f.done::text, f.batch IS NULL, 'webhooks._fanout'::regclass::oid FROM webhooks._fanout f";
/// A new batch's snapshot, and whether anything subscribes (and anything is new).
const FANOUT_SNAPSHOT: &str = "SELECT pg_catalog.pg_current_snapshot()::text,
       EXISTS (SELECT 1 FROM webhooks._subscriptions),
       EXISTS (SELECT 1 FROM webhooks._subscriptions s WHERE NOT s.fanned_out)";
/// The stream's row, locked.
const FANOUT_LOCK: &str = "SELECT f.done::text, f.batch::text, f.batch_first_seq, f.batch_seq
  FROM webhooks._fanout f FOR UPDATE";
/// A batch done (`$1`: the snapshot it began with, if this step began it).
const FANOUT_DONE: &str = "UPDATE webhooks._fanout SET done = COALESCE($1::pg_snapshot, batch), batch = NULL,
       batch_first_seq = 0, batch_seq = 0";
/// How far a batch got.
const FANOUT_STEP: &str =
    "UPDATE webhooks._fanout SET batch = COALESCE($3::pg_snapshot, batch), batch_first_seq = $1, batch_seq = $2";

/// The transactions with events visible in `batch` and not in `done` (see BATCH_TRANSACTIONS).
fn batch_transactions(done: &str, batch: &str) -> SpiResult<Vec<(String, i64, i64)>> {
    with_plan(BATCH_TRANSACTIONS, &[pg_sys::TEXTOID, pg_sys::TEXTOID], |plan| {
        Spi::connect(|c| {
            let mut out = Vec::new();
            for r in c.select(plan, None, &[done.into(), batch.into()])? {
                if let (Some(x), Some(first), Some(n)) =
                    (r.get::<String>(1)?, r.get::<i64>(2)?, r.get::<i64>(3)?)
                {
                    out.push((x, first, n));
                }
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
}

/// A batch being fanned out: its transactions in order, and how far it has got.
pub struct Batch {
    snapshot: String,
    done_snapshot: String,
    /// (xid, first seq, events), in the order of their first event.
    transactions: Vec<(String, i64, i64)>,
}

/// What one fan-out step did.
pub struct FanOutStep {
    /// Whether any subscription exists.
    pub subscribed: bool,
    /// Deliveries created.
    pub deliveries: i64,
    /// Whether committed events may be left for another step.
    pub more: bool,
    /// Records held the heads lock (see fan_out): nothing was done, try again soon.
    pub busy: bool,
}

/// One fan-out step, in the caller's transaction: up to about `limit` events of committed
/// transactions become deliveries, and `_fanout` records how far the stream has been taken.
/// `cache` keeps the transactions of the batch in progress between steps (a batch of a huge
/// transaction is taken in many steps; its transactions are listed once).
/// With nothing subscribed, the stream is only moved on when `advance` (the worker does it now
/// and then: it is a write).
pub fn fan_out(limit: i32, cache: &mut Option<Batch>, advance: bool) -> SpiResult<FanOutStep> {
    let idle = FanOutStep { subscribed: true, deliveries: 0, more: false, busy: false };
    // First without a lock, and without writing: when nothing new has committed, the step
    // ends here. Taking the row lock or moving `done` would use a transaction id, so that
    // the next snapshot would differ again, and an idle worker would fan out for ever.
    // (Its statements are kept plans, as the claim's are: an idle worker runs them at every
    // commit, and parsing and planning them each time was a good part of an idle wake.)
    let quiet = with_plan(FANOUT_QUIET, &[], |plan| {
        Spi::connect(|c| {
            let row = c.select(plan, Some(1), &[])?.first();
            Ok::<_, pgrx::spi::Error>((row.get::<String>(1)?, row.get::<bool>(2)?, row.get::<pg_sys::Oid>(3)?))
        })
    })?;
    // A new batch: everything committed by now, with what it holds (see below).
    let mut fresh: Option<(String, bool, bool, Vec<(String, i64, i64)>)> = None;
    if let (Some(done), Some(true)) = (&quiet.0, quiet.1) {
        let (snapshot, subscribed, new) = with_plan(FANOUT_SNAPSHOT, &[], |plan| {
            Spi::connect(|c| {
                let row = c.select(plan, Some(1), &[])?.first();
                Ok::<_, pgrx::spi::Error>((row.get::<String>(1)?, row.get::<bool>(2)?, row.get::<bool>(3)?))
            })
        })?;
        let snapshot = snapshot.unwrap_or_default();
        let subscribed = subscribed.unwrap_or(false);
        let new = new.unwrap_or(false);
        if !subscribed && !advance {
            *cache = None;
            return Ok(FanOutStep { subscribed, ..idle });
        }
        let transactions = if subscribed { batch_transactions(done, &snapshot)? } else { Vec::new() };
        if subscribed && !new && transactions.is_empty() {
            return Ok(idle);
        }
        fresh = Some((snapshot, subscribed, new, transactions));
    }
    // Fan-out decides which new deliveries are their key's head from the key's queued rows
    // (queue_heads); a record in another worker's transaction can meanwhile release the key
    // (delete its rows, find no next head: the new one is not committed yet). Both sides take
    // a lock (HEADS_LOCK_SHARED) before their statements, fan-out alone, records together:
    // each then sees what the other committed, and no key is left without a head. Fan-out
    // never queues for it: a fan-out waiting for it would make every later record wait too,
    // behind one record that waits for a row lock (an open unsubscribe, say). The worker tries
    // again a millisecond later, and the other workers' records hold back a moment meanwhile
    // (shmem::Me::yield_to_fan_out), so that their records one after the other cannot keep it.
    if let Some(oid) = quiet.2 {
        if !unsafe { pg_sys::ConditionalLockRelationOid(oid, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) } {
            return Ok(FanOutStep { busy: true, ..idle });
        }
    }
    // Deliveries made for subscriptions seen for the first time (they need a claim too).
    let mut backfilled = 0i64;
    // The snapshot of a batch this step begins, not yet written to `_fanout`.
    let mut begun: Option<String> = None;
    let (done, batch, first_seq, last_seq) = with_plan(FANOUT_LOCK, &[], |plan| {
        Spi::connect_mut(|c| {
            let row = c.update(plan, Some(1), &[])?.first();
            Ok::<_, pgrx::spi::Error>((
                row.get::<String>(1)?,
                row.get::<String>(2)?,
                row.get::<i64>(3)?.unwrap_or(0),
                row.get::<i64>(4)?.unwrap_or(0),
            ))
        })
    })?;
    let Some(done) = done else {
        // The row is gone (someone deleted it): start again from now.
        Spi::run("INSERT INTO webhooks._fanout DEFAULT VALUES ON CONFLICT DO NOTHING")?;
        return Ok(idle);
    };
    if batch.is_some() != fresh.is_none() || quiet.0.as_deref() != Some(done.as_str()) {
        // Moved on while it was not locked (by hand): look again.
        *cache = None;
        return Ok(FanOutStep { more: true, ..idle });
    }
    // Whether this step took the batch's snapshot (after the worker cleared its wake flag).
    let started_here = fresh.is_some();
    let batch = match (batch, fresh) {
        (Some(b), _) => b,
        (None, Some((snapshot, subscribed, new, transactions))) => {
            // With no subscription at all, nothing is owed to anybody (a subscription receives
            // what commits after it was created): the stream is taken as it is.
            if !subscribed {
                Spi::run_with_args(
                    "UPDATE webhooks._fanout SET done = $1::pg_snapshot",
                    &[snapshot.into()],
                )?;
                *cache = None;
                return Ok(FanOutStep { subscribed, ..idle });
            }
            // (Only when a subscription is new: the statement locks and writes otherwise.)
            if new {
                backfilled = with_plan(BACKFILL, &[pg_sys::TEXTOID], |plan| {
                    Spi::connect_mut(|c| {
                        c.update(plan, None, &[done.clone().into()])?.first().get::<i64>(1)
                    })
                })?
                .unwrap_or(0);
            }
            if transactions.is_empty() {
                *cache = None;
                return Ok(FanOutStep { deliveries: backfilled, ..idle });
            }
            // `_fanout.batch` is set below, with how far this step gets (one write, not two).
            begun = Some(snapshot.clone());
            *cache = Some(Batch {
                snapshot: snapshot.clone(),
                done_snapshot: done.clone(),
                transactions,
            });
            snapshot
        }
        (None, None) => unreachable!("checked above"),
    };
    if cache.as_ref().is_none_or(|c| c.snapshot != batch || c.done_snapshot != done) {
        let transactions = batch_transactions(&done, &batch)?;
        *cache = Some(Batch { snapshot: batch.clone(), done_snapshot: done.clone(), transactions });
    }
    let txns = &cache.as_ref().expect("set above").transactions;
    // The transactions still to take: after the one in progress (by first seq), or from it.
    let start = txns.partition_point(|t| t.1 < first_seq);
    let mut todo = &txns[start..];
    let mut after = 0i64;
    if let Some(t) = todo.first() {
        if t.1 == first_seq {
            if last_seq == i64::MAX {
                todo = &todo[1..];
            } else {
                after = last_seq;
            }
        }
    }
    if todo.is_empty() {
        run_kept(FANOUT_DONE, &[pg_sys::TEXTOID], &[begun.into()])?;
        *cache = None;
        return Ok(FanOutStep { deliveries: backfilled, more: true, ..idle });
    }
    // Whole transactions while they fit in `limit` (at least one), or part of a large one. A
    // transaction already taken in part goes on alone: its remaining events are those after
    // `after`, which says nothing of other transactions' seqs (the limit may have grown since).
    let mut take = 0;
    let mut events = 0i64;
    for t in todo {
        if take > 0 && (after > 0 || events + t.2 > limit as i64) {
            break;
        }
        take += 1;
        events += t.2;
    }
    let partial = take == 1 && (after > 0 || events > limit as i64);
    let xids: Vec<String> = todo[..take].iter().map(|t| t.0.clone()).collect();
    let step_limit = if partial { limit as i64 } else { events.max(1) };
    let types = [pg_sys::TEXTARRAYOID, pg_sys::INT8OID, pg_sys::INT8OID];
    let query = if stats_schema()? { FAN_OUT_COUNTED } else { FAN_OUT };
    let (taken, max_seq, deliveries) = with_plan(query, &types, |plan| {
        Spi::connect_mut(|c| {
            let row = c
                .update(plan, None, &[xids.into(), after.into(), step_limit.into()])?
                .first();
            Ok::<_, pgrx::spi::Error>((
                row.get::<i64>(1)?.unwrap_or(0),
                row.get::<i64>(2)?,
                row.get::<i64>(3)?.unwrap_or(0),
            ))
        })
    })?;
    let last = todo[take - 1].1;
    // A partial step that took a full `limit` may have left some of the transaction.
    let seq = if partial && taken >= step_limit { max_seq.unwrap_or(after) } else { i64::MAX };
    if seq == i64::MAX && take == todo.len() {
        // The batch's last transactions, whole: the batch is done in this same step. If this
        // step took its snapshot, what committed since woke the worker again (the flag is
        // cleared before the snapshot is taken): nothing more to do now, the deliveries can be
        // claimed at once. An older batch's end is followed by a look for newer commits.
        run_kept(FANOUT_DONE, &[pg_sys::TEXTOID], &[begun.into()])?;
        *cache = None;
        return Ok(FanOutStep { deliveries: deliveries + backfilled, more: !started_here, ..idle });
    }
    run_kept(
        FANOUT_STEP,
        &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTOID],
        &[last.into(), seq.into(), begun.into()],
    )?;
    Ok(FanOutStep { deliveries: deliveries + backfilled, more: true, ..idle })
}

/// Claim up to `$1` due deliveries of active subscriptions, at most `$2` in flight per
/// subscription, one for those failing (`$9`) (`$3`/`$4`: subscriptions and what they already
/// have in flight). Each active
/// subscription with room is looked at on its own (an index probe each), so a slow endpoint's
/// backlog can never fill the window and starve the others. Only heads are claimed: a delivery
/// with an ordering key waits while an earlier one of its key is queued. Up to `$6` heads per
/// free slot (one request in flight) of a subscription are claimed, one for the failing
/// subscriptions `$9`, to be sent one after the other by one HTTP thread. A claimed head brings
/// the next deliveries of its key with it, in order (a chain of at most `$5`, and at most `$7`
/// rows in all), sent one after the other by the same thread, which stops at the first that
/// fails: one hot key is delivered at the speed of its endpoint, not of a claim and a record
/// per delivery. Only the head is marked claimed (by worker `$8`): the others are not heads,
/// so nobody else can claim them, and a chain that stops leaves them as they were.
macro_rules! claim {
    ($pushed:literal) => { concat!("\
WITH room AS (
    -- A failing subscription (in `$9`) has one request in flight at most, whatever its cap: an
    -- endpoint that times out holds one HTTP thread of this worker, not its share of them.
    SELECT s.id, CASE WHEN s.id = ANY ($9::int8[]) THEN 1 ELSE $2 END - COALESCE(f.n, 0) AS free
      FROM webhooks._subscriptions s
      LEFT JOIN unnest($3::int8[], $4::int4[]) AS f(sub, n) ON f.sub = s.id
     WHERE s.state = 'active' AND CASE WHEN s.id = ANY ($9::int8[]) THEN 1 ELSE $2 END - COALESCE(f.n, 0) > 0", $pushed, "
), cand AS (
    SELECT c.delivery_id, c.next_attempt_at, c.event_seq
      FROM room CROSS JOIN LATERAL (
           SELECT q.delivery_id, q.next_attempt_at, q.event_seq
             FROM webhooks._queue q
            WHERE q.subscription_id = room.id AND q.head AND q.claimed_at IS NULL
              AND q.next_attempt_at <= now()
            ORDER BY q.next_attempt_at, q.event_seq
            LIMIT LEAST(room.free * CASE WHEN room.id = ANY ($9::int8[]) THEN 1 ELSE $6 END, $1)
              FOR UPDATE OF q SKIP LOCKED) c
), pick AS (
    SELECT cand.delivery_id FROM cand ORDER BY cand.next_attempt_at, cand.event_seq LIMIT $1
), heads AS (
    UPDATE webhooks._queue q SET claimed_at = now(), claimed_by = $8
      FROM pick WHERE q.delivery_id = pick.delivery_id
    RETURNING q.delivery_id, q.subscription_id, q.event_seq, q.ordering_key, q.attempts
), chain AS (
    SELECT h.delivery_id AS head, h.delivery_id, h.subscription_id, h.event_seq, h.attempts, h.ordering_key FROM heads h
    UNION ALL
    SELECT h.delivery_id, n.delivery_id, h.subscription_id, n.event_seq, n.attempts, h.ordering_key
      FROM heads h CROSS JOIN LATERAL (
           SELECT q.delivery_id, q.event_seq, q.attempts FROM webhooks._queue q
            WHERE q.subscription_id = h.subscription_id AND q.ordering_key = h.ordering_key
              AND q.event_seq > h.event_seq
            ORDER BY q.event_seq
            LIMIT GREATEST(LEAST($5, $7 / (SELECT pg_catalog.count(*) FROM heads)), 1) - 1) n
     WHERE h.ordering_key IS NOT NULL
)
SELECT c.delivery_id, c.subscription_id, c.attempts, e.id::text, e.type, ", event_time!(), ",
       e.data::text, s.url, s.signature, s.signature_header,
       (EXTRACT(epoch FROM s.timeout) * 1000)::int8, s.retry_schedule, k.secret,
       CASE WHEN k.previous_expires_at > now() THEN k.previous_secret END,
       k.headers::text, c.head, s.shape::text, s.signature_options::text, k.tls::text,
       c.event_seq, c.ordering_key
  FROM chain c
  JOIN webhooks._events e ON e.seq = c.event_seq
  JOIN webhooks._subscriptions s ON s.id = c.subscription_id
  JOIN webhooks._secrets k ON k.subscription_id = s.id
 ORDER BY c.head, c.event_seq") };
}

/// The deliveries of key `$2` of subscription `$1` queued after seq `$3`, up to `$4`, in order,
/// as CLAIM returns them: the continuation of a chain in flight (its head is claimed). They are
/// not heads, so nobody else can claim them, and reading them changes nothing: a chain that
/// stops before them leaves them as they were. Nothing for a subscription no longer active.
/// (A head or a claimed row after `$3` would belong to another claim: the continuation stops
/// before it, among the rows read; every key has one head, so there is none.)
const CONTINUATION: &str = concat!("WITH next AS (
    SELECT q.delivery_id, q.subscription_id, q.event_seq, q.attempts, q.ordering_key,
           q.head OR q.claimed_at IS NOT NULL AS taken
      FROM webhooks._queue q
     WHERE q.subscription_id = $1 AND q.ordering_key = $2 AND q.event_seq > $3
     ORDER BY q.event_seq
     LIMIT $4
), chain AS (
    SELECT n.delivery_id AS head, n.delivery_id, n.subscription_id, n.event_seq, n.attempts, n.ordering_key
      FROM (SELECT next.*, pg_catalog.bool_or(next.taken) OVER (ORDER BY next.event_seq) AS stop FROM next) n
     WHERE NOT n.stop
)
SELECT c.delivery_id, c.subscription_id, c.attempts, e.id::text, e.type, ", event_time!(), ",
       e.data::text, s.url, s.signature, s.signature_header,
       (EXTRACT(epoch FROM s.timeout) * 1000)::int8, s.retry_schedule, k.secret,
       CASE WHEN k.previous_expires_at > now() THEN k.previous_secret END,
       k.headers::text, $5::int8, s.shape::text, s.signature_options::text, k.tls::text,
       c.event_seq, c.ordering_key
  FROM chain c
  JOIN webhooks._events e ON e.seq = c.event_seq
  JOIN webhooks._subscriptions s ON s.id = c.subscription_id AND s.state = 'active' AND s.delivery = 'push'
  JOIN webhooks._secrets k ON k.subscription_id = s.id
 ORDER BY c.event_seq");

/// Claims for a schema without poll subscriptions (0.1.0, before `ALTER EXTENSION ... UPDATE`).
const CLAIM: &str = claim!("");
/// Claims that leave poll subscriptions alone: their deliveries wait for `webhooks.poll()`.
/// (The update that added `delivery` is the one that added the rollups: see stats_schema.)
const CLAIM_PUSHED: &str = claim!(" AND s.delivery = 'push'");

/// Record a batch of outcomes: attempts rows, delivery state, queue, subscription health.
/// `$13`: claimed deliveries handed back unattempted (their job stopped at an earlier failure).
macro_rules! record_prefix {
    ($continuing:literal) => {
        concat!("\
WITH released AS (
    UPDATE webhooks._queue q SET claimed_at = NULL
     WHERE q.delivery_id = ANY ($13::int8[]) AND q.claimed_at IS NOT NULL
), r AS (
    SELECT * FROM unnest($1::int8[], $2::int8[], $3::int4[], $4::float8[], $5::float8[], $6::int4[],
                         $7::text[], $8::text[], $9::text[], $10::float8[], $11::bool[])
        AS r(delivery_id, sub, attempt, started, duration_ms, status_code, body, error, outcome, next_at, gone)
), a AS (
    INSERT INTO webhooks._attempts (delivery_id, attempt, started_at, duration_ms, status_code, response_body, error)
    SELECT r.delivery_id, r.attempt, pg_catalog.to_timestamp(r.started), r.duration_ms, r.status_code, r.body, r.error
      FROM r
), d AS (
    UPDATE webhooks._deliveries d
       SET status = CASE r.outcome WHEN 'retry' THEN 'retrying' ELSE r.outcome END,
           attempts = r.attempt,
           last_status_code = r.status_code,
           last_error = r.error,
           next_attempt_at = CASE WHEN r.outcome = 'retry' THEN pg_catalog.to_timestamp(r.next_at) END,
           delivered_at = CASE WHEN r.outcome = 'succeeded'
                               THEN pg_catalog.to_timestamp(r.started + r.duration_ms / 1000) END
      FROM r WHERE d.id = r.delivery_id
       -- Ended meanwhile (unsubscribe): it stays ended; its queue row is gone already.
       AND d.status NOT IN ('succeeded', 'dead')
), qd AS (
    DELETE FROM webhooks._queue q USING r WHERE q.delivery_id = r.delivery_id AND r.outcome <> 'retry'
    RETURNING q.delivery_id, q.subscription_id, q.ordering_key, q.head
), keep AS (
    -- The keys of the chains that go on and of the deliveries retried (by id: a key's rows are
    -- never scanned here, its backlog may be long).
    SELECT o.subscription_id, o.ordering_key FROM webhooks._queue o
     WHERE o.delivery_id = ANY (", $continuing, "::int8[])
    UNION ALL
    SELECT o.subscription_id, o.ordering_key FROM r JOIN webhooks._queue o ON o.delivery_id = r.delivery_id
     WHERE r.outcome = 'retry'
), next_head AS (
    -- A head that leaves releases its key: the earliest delivery left of that key becomes the
    -- head (one index probe per key). The deliveries of a key that leave are always its
    -- earliest (a head, or a chain's first ones), so the key has no other head; a delivery of
    -- the chain that is retried is that earliest one, and becomes the head below. Every queued
    -- key always has a head, so no delivery can wait forever, whatever order deliveries were
    -- queued in.
    --
    -- A key that keeps a head otherwise gets none here, so that it never has two: one with a
    -- delivery retried (it is the head again, below), or with another head or claimed delivery
    -- left (a growing chain's next one, made its head and claimed before this statement). A
    -- delivery fanned out after later ones of its key (its seq was taken first and it
    -- committed last: two writers of a key that took different locks, as an emit by a role
    -- that may not update the key's row and the row's own writers do) waits behind the chain
    -- in flight, and becomes the head after it.
    UPDATE webhooks._queue q SET head = true
      FROM (SELECT DISTINCT qd.subscription_id, qd.ordering_key FROM qd
             WHERE qd.ordering_key IS NOT NULL AND qd.head) k
     CROSS JOIN LATERAL (
           SELECT n.delivery_id FROM webhooks._queue n
            WHERE n.subscription_id = k.subscription_id AND n.ordering_key = k.ordering_key
              AND n.delivery_id NOT IN (SELECT qd.delivery_id FROM qd)
            ORDER BY n.event_seq LIMIT 1) nh
     WHERE q.delivery_id = nh.delivery_id
       AND NOT EXISTS (
           SELECT 1 FROM keep WHERE keep.subscription_id = k.subscription_id AND keep.ordering_key = k.ordering_key)
), qu AS (
    UPDATE webhooks._queue q
       SET attempts = r.attempt, next_attempt_at = pg_catalog.to_timestamp(r.next_at), claimed_at = NULL,
           head = true
      FROM r WHERE q.delivery_id = r.delivery_id AND r.outcome = 'retry'
), health AS (
    SELECT r.sub, pg_catalog.bool_or(r.outcome = 'succeeded') AS ok, pg_catalog.bool_or(r.gone) AS gone,
           pg_catalog.to_timestamp(pg_catalog.min(r.started)) AS first_failure
      FROM r GROUP BY r.sub
)
")
    };
}

/// Recording for a schema without the rollups (0.1.0, before `ALTER EXTENSION ... UPDATE`).
const RECORD: &str = concat!(record_prefix!("$14"), "UPDATE webhooks._subscriptions s
   SET failing_since = CASE WHEN h.ok AND NOT h.gone THEN NULL ELSE COALESCE(s.failing_since, h.first_failure) END,
       state = CASE WHEN h.gone THEN 'disabled'
                    WHEN NOT h.ok AND COALESCE(s.failing_since, h.first_failure) < now() - $12::interval THEN 'disabled'
                    ELSE s.state END,
       disabled_reason = CASE WHEN h.gone THEN 'endpoint answered 410 Gone'
                    WHEN NOT h.ok AND COALESCE(s.failing_since, h.first_failure) < now() - $12::interval
                    THEN 'endpoint failing continuously since ' || COALESCE(s.failing_since, h.first_failure)::text
                    ELSE s.disabled_reason END,
       updated_at = CASE WHEN h.gone OR NOT h.ok THEN now() ELSE s.updated_at END
  FROM health h
 WHERE s.id = h.sub AND (h.gone OR NOT h.ok OR s.failing_since IS NOT NULL)");

/// Recording that also keeps the rollups (see stats.rs), in the same statement: one row per
/// subscription, width and bucket in `_delivery_stats` and per event type and hour in
/// `_event_stats`, of this worker's own (`$14`), so no two workers ever update one rollup row;
/// and on the subscription row, its streak of failures and its last error. That row is
/// updated only when the batch has a failure or ends a streak, as `failing_since` was already:
/// a healthy endpoint's batches write no subscription row. Two workers that record at once for
/// one subscription are serialized by its row lock and each applies its batch to the row as
/// the other left it (READ COMMITTED rechecks the newest version), so no count is lost. A
/// success resets the streak unless it started before the last failure recorded (another
/// worker's later failure came first), and the streak then goes on with the batch's failures
/// after its last success; `last_error` is the failure that started last. One case is not
/// seen: a failure recorded before a later success of another worker's batch is recorded
/// after it would be counted; the row does not keep its last success's time (that would be a
/// write per healthy batch), so it cannot tell. Workers record within milliseconds of the
/// attempts, so that takes a success and a failure that overlapped in time.
const RECORD_WITH_STATS: &str = concat!(record_prefix!("$34"), ", ds AS (
    INSERT INTO webhooks._delivery_stats AS t
           (width, bucket, subscription_id, worker, attempts, succeeded, failed, dead, latency_hist)
    SELECT pg_catalog.make_interval(secs => u.width), pg_catalog.to_timestamp(u.bucket), u.sub, $14,
           u.attempts, u.succeeded, u.failed, u.dead, u.hist::int8[]
      FROM unnest($15::int8[], $16::int4[], $17::int8[], $18::int8[], $19::int8[], $20::int8[], $21::int8[],
                  $22::text[]) AS u(sub, width, bucket, attempts, succeeded, failed, dead, hist)
    ON CONFLICT (width, bucket, subscription_id, worker) DO UPDATE
       SET attempts = t.attempts + excluded.attempts, succeeded = t.succeeded + excluded.succeeded,
           failed = t.failed + excluded.failed, dead = t.dead + excluded.dead,
           latency_hist = webhooks._hist_add(t.latency_hist, excluded.latency_hist)
), es AS (
    INSERT INTO webhooks._event_stats AS t (bucket, event_type, worker, delivered, retried, dead)
    SELECT pg_catalog.to_timestamp(u.bucket), pg_catalog.left(u.type, 200), $14,
           pg_catalog.sum(u.delivered), pg_catalog.sum(u.retried), pg_catalog.sum(u.dead)
      FROM unnest($23::text[], $24::int8[], $25::int8[], $26::int8[], $27::int8[])
           AS u(type, bucket, delivered, retried, dead)
     GROUP BY 1, 2
    ON CONFLICT (bucket, event_type, worker) DO UPDATE
       SET delivered = t.delivered + excluded.delivered, retried = t.retried + excluded.retried,
           dead = t.dead + excluded.dead
), f AS (
    SELECT * FROM unnest($28::int8[], $29::float8[], $30::int4[], $31::float8[], $32::text[], $33::int4[])
        AS f(sub, last_ok, failures, error_at, error, status_code)
)
UPDATE webhooks._subscriptions s
   SET failing_since = CASE WHEN h.ok AND NOT h.gone THEN NULL ELSE COALESCE(s.failing_since, h.first_failure) END,
       state = CASE WHEN h.gone THEN 'disabled'
                    WHEN NOT h.ok AND COALESCE(s.failing_since, h.first_failure) < now() - $12::interval THEN 'disabled'
                    ELSE s.state END,
       disabled_reason = CASE WHEN h.gone THEN 'endpoint answered 410 Gone'
                    WHEN NOT h.ok AND COALESCE(s.failing_since, h.first_failure) < now() - $12::interval
                    THEN 'endpoint failing continuously since ' || COALESCE(s.failing_since, h.first_failure)::text
                    ELSE s.disabled_reason END,
       updated_at = CASE WHEN h.gone OR NOT h.ok THEN now() ELSE s.updated_at END,
       consecutive_failures = CASE WHEN f.last_ok IS NOT NULL
                                    AND (s.last_error_at IS NULL OR pg_catalog.to_timestamp(f.last_ok) > s.last_error_at)
                                   THEN 0 ELSE s.consecutive_failures END + f.failures,
       last_error = CASE WHEN f.error_at IS NOT NULL
                          AND (s.last_error_at IS NULL OR pg_catalog.to_timestamp(f.error_at) >= s.last_error_at)
                         THEN f.error ELSE s.last_error END,
       last_status_code = CASE WHEN f.error_at IS NOT NULL
                                AND (s.last_error_at IS NULL OR pg_catalog.to_timestamp(f.error_at) >= s.last_error_at)
                               THEN f.status_code ELSE s.last_status_code END,
       last_error_at = CASE WHEN f.error_at IS NOT NULL
                             AND (s.last_error_at IS NULL OR pg_catalog.to_timestamp(f.error_at) >= s.last_error_at)
                            THEN pg_catalog.to_timestamp(f.error_at) ELSE s.last_error_at END
  FROM health h JOIN f ON f.sub = h.sub
 WHERE s.id = h.sub
   AND (h.gone OR NOT h.ok OR s.failing_since IS NOT NULL OR f.error_at IS NOT NULL OR s.consecutive_failures > 0)");

/// A claimed delivery: the job to send, plus what is needed to judge its outcome.
pub struct Claimed {
    pub job: Job,
    pub attempts_before: i32,
    /// Its event's seq and its ordering key (a chain's continuation starts after the last).
    pub event_seq: i64,
    pub ordering_key: Option<String>,
    pub retry_schedule: Option<String>,
}

/// What to do with a delivery after an attempt.
pub struct Verdict {
    pub outcome: &'static str, // succeeded | retry | dead
    pub next_at: Option<f64>,  // unix seconds, for retry
    pub gone: bool,
}

pub struct Recorded {
    pub delivery_id: i64,
    pub subscription_id: i64,
    pub attempt: i32,
    pub started: f64,
    pub duration_ms: f64,
    pub status_code: Option<i32>,
    pub body: Option<String>,
    pub error: Option<String>,
    pub verdict: Verdict,
    /// The event's type, for `webhooks.event_stats`.
    pub event_type: String,
}

pub fn claim(
    limit: i32,
    per_endpoint: i32,
    worker: i32,
    in_flight: &[(i64, i32)],
    default_timeout: Duration,
    max_response_bytes: usize,
    chain: i32,
    per_slot: i32,
    failing: &[i64],
    max_rows: i32,
) -> SpiResult<Vec<Vec<Claimed>>> {
    let subs: Vec<i64> = in_flight.iter().map(|(s, _)| *s).collect();
    let counts: Vec<i32> = in_flight.iter().map(|(_, n)| *n).collect();
    let types = [
        pg_sys::INT4OID,
        pg_sys::INT4OID,
        pg_sys::INT8ARRAYOID,
        pg_sys::INT4ARRAYOID,
        pg_sys::INT4OID,
        pg_sys::INT4OID,
        pg_sys::INT4OID,
        pg_sys::INT2OID,
        pg_sys::INT8ARRAYOID,
    ];
    let query = if stats_schema()? { CLAIM_PUSHED } else { CLAIM };
    with_plan(query, &types, |plan| {
        Spi::connect_mut(|c| {
            let rows = c.update(
                plan,
                None,
                &[
                    limit.into(),
                    per_endpoint.into(),
                    subs.into(),
                    counts.into(),
                    chain.max(1).into(),
                    per_slot.max(1).into(),
                    max_rows.max(1).into(),
                    (worker as i16).into(),
                    failing.to_vec().into(),
                ],
            )?;
            chains(rows, default_timeout, max_response_bytes)
        })
    })
}

/// The claimed rows (CLAIM's columns) as chains, each in order: the rows come grouped by their
/// head.
fn chains(
    rows: pgrx::spi::SpiTupleTable,
    default_timeout: Duration,
    max_response_bytes: usize,
) -> SpiResult<Vec<Vec<Claimed>>> {
    // Chains, each in order: the rows come grouped by their head.
    let mut out: Vec<Vec<Claimed>> = Vec::new();
    let mut last_head = None;
    // One parse per distinct shape of the claim.
    let mut shapes: std::collections::HashMap<String, Result<Arc<Shape>, String>> =
        std::collections::HashMap::new();
    for row in rows {
        let head = row.get::<i64>(16)?;
        if head != last_head || out.is_empty() {
            out.push(Vec::new());
            last_head = head;
        }
        let signature = Signature::from_columns(
            row.get::<String>(9)?.as_deref(),
            row.get::<String>(10)?,
            row.get::<String>(18)?.as_deref(),
        );
        let mut secrets: Vec<String> = row.get::<String>(13)?.into_iter().collect();
        secrets.extend(row.get::<String>(14)?);
        let headers: Vec<(String, String)> = row
            .get::<String>(15)?
            .and_then(|h| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&h).ok()
            })
            .map(|m| {
                m.into_iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let timeout = row
            .get::<i64>(11)?
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64))
            .unwrap_or(default_timeout);
        let shape = row.get::<String>(17)?.map(|text| {
            shapes
                .entry(text)
                .or_insert_with_key(|text| {
                    crate::shape::parse(text)
                        .map(Arc::new)
                        .map_err(|e| format!("the subscription's shape cannot be used: {e}"))
                })
                .clone()
        });
        let attempts_before = row.get::<i32>(3)?.unwrap_or(0);
        out.last_mut().expect("pushed above").push(Claimed {
            attempts_before,
            event_seq: row.get::<i64>(20)?.unwrap_or(0),
            ordering_key: row.get::<String>(21)?,
            retry_schedule: row.get::<String>(12)?,
            job: Job {
                delivery_id: row.get::<i64>(1)?.unwrap_or(0),
                subscription_id: row.get::<i64>(2)?.unwrap_or(0),
                event_id: row.get::<String>(4)?.unwrap_or_default(),
                event_type: row.get::<String>(5)?.unwrap_or_default(),
                created_at: row.get::<String>(6)?.unwrap_or_default(),
                data: row.get::<String>(7)?.unwrap_or_else(|| "{}".into()),
                url: row.get::<String>(8)?.unwrap_or_default(),
                signature,
                secrets,
                headers,
                tls: row.get::<String>(19)?,
                timeout,
                max_response_bytes,
                max_payload_bytes: crate::gucs::max_payload_bytes(),
                shape,
                attempt: attempts_before + 1,
            },
        });
    }
    Ok(out)
}

/// The next deliveries of a chain in flight (see CONTINUATION), in the caller's transaction:
/// those of key `ordering_key` of `subscription` after `after_seq`, at most `limit`. `head`:
/// the chain's id, as its claim returned it. Empty for a schema without poll subscriptions.
pub fn continuation(
    subscription: i64,
    ordering_key: &str,
    after_seq: i64,
    limit: i64,
    head: i64,
    default_timeout: Duration,
    max_response_bytes: usize,
) -> SpiResult<Vec<Claimed>> {
    if !stats_schema()? {
        return Ok(Vec::new());
    }
    let types = [pg_sys::INT8OID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID];
    with_plan(CONTINUATION, &types, |plan| {
        Spi::connect(|c| {
            let rows = c.select(
                plan,
                None,
                &[subscription.into(), ordering_key.into(), after_seq.into(), limit.into(), head.into()],
            )?;
            Ok(chains(rows, default_timeout, max_response_bytes)?.into_iter().flatten().collect())
        })
    })
}

/// Whether the schema has the rollups (the update to 0.2.0 added them; a library newer than
/// the schema keeps working without them until `ALTER EXTENSION pg_webhooks UPDATE`). Looked
/// up in the caller's transaction at most every 10 s: an update is seen that much later, and
/// the outcomes recorded meanwhile are not in the rollups.
pub fn stats_schema() -> SpiResult<bool> {
    thread_local! {
        static KNOWN: std::cell::Cell<Option<(bool, std::time::Instant)>> = const { std::cell::Cell::new(None) };
    }
    if let Some((known, at)) = KNOWN.get() {
        if at.elapsed() < Duration::from_secs(10) {
            return Ok(known);
        }
    }
    let known = Spi::get_one::<bool>(
        "SELECT pg_catalog.to_regclass('webhooks._delivery_stats') IS NOT NULL
            AND pg_catalog.to_regclass('webhooks._event_stats') IS NOT NULL",
    )?
    .unwrap_or(false);
    KNOWN.set(Some((known, std::time::Instant::now())));
    Ok(known)
}

/// Record a batch of outcomes of worker `worker` (see RECORD and RECORD_WITH_STATS).
pub fn record(
    batch: Vec<Recorded>,
    released: Vec<i64>,
    disable_after: &str,
    worker: i16,
    continuing: Vec<i64>,
) -> SpiResult<()> {
    // Before the record's snapshot: a fan-out in progress commits first (see fan_out).
    Spi::run(HEADS_LOCK_SHARED)?;
    let stats = if stats_schema()? {
        Some(crate::stats::BatchStats::of(batch.iter().map(|r| {
            crate::stats::Attempt {
                subscription_id: r.subscription_id,
                event_type: &r.event_type,
                started: r.started,
                duration_ms: r.duration_ms,
                outcome: r.verdict.outcome,
                status_code: r.status_code,
                error: r.error.as_deref(),
            }
        })))
    } else {
        None
    };
    let mut ids = Vec::new();
    let mut subs = Vec::new();
    let mut attempts = Vec::new();
    let mut started = Vec::new();
    let mut durations = Vec::new();
    let mut codes = Vec::new();
    let mut bodies = Vec::new();
    let mut errors = Vec::new();
    let mut outcomes = Vec::new();
    let mut next_at = Vec::new();
    let mut gone = Vec::new();
    for r in batch {
        ids.push(r.delivery_id);
        subs.push(r.subscription_id);
        attempts.push(r.attempt);
        started.push(r.started);
        durations.push(r.duration_ms);
        codes.push(r.status_code);
        bodies.push(r.body);
        errors.push(r.error);
        outcomes.push(r.verdict.outcome.to_string());
        next_at.push(r.verdict.next_at);
        gone.push(r.verdict.gone);
    }
    // The subscriptions first, in id order, before any queue row: an `unsubscribe` takes its
    // subscription's row (FOR UPDATE) before its queue rows, so whichever of the two comes
    // second waits for the other instead of deadlocking with it. That is the subscriptions of
    // the outcomes and those of the deliveries handed back or continuing (whose queue rows the
    // statements below update too). KEY SHARE conflicts with nothing but a delete or a key
    // change: other records, pause and resume go on beside it.
    let mut touched = released.clone();
    touched.extend_from_slice(&continuing);
    run_kept(
        RECORD_LOCK_SUBSCRIPTIONS,
        &[pg_sys::INT8ARRAYOID, pg_sys::INT8ARRAYOID],
        &[subs.clone().into(), touched.into()],
    )?;
    let mut types = vec![
        pg_sys::INT8ARRAYOID,
        pg_sys::INT8ARRAYOID,
        pg_sys::INT4ARRAYOID,
        pg_sys::FLOAT8ARRAYOID,
        pg_sys::FLOAT8ARRAYOID,
        pg_sys::INT4ARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::FLOAT8ARRAYOID,
        pg_sys::BOOLARRAYOID,
        pg_sys::TEXTOID,
        pg_sys::INT8ARRAYOID,
    ];
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
        ids.into(),
        subs.into(),
        attempts.into(),
        started.into(),
        durations.into(),
        codes.into(),
        bodies.into(),
        errors.into(),
        outcomes.into(),
        next_at.into(),
        gone.into(),
        disable_after.into(),
        released.into(),
    ];
    // Chains that go on: the delivery each sends next becomes its key's head and is claimed by
    // this worker first, in this transaction, so that nobody else ever sees it claimable while
    // it is in flight; the record below then gives those keys no other head.
    if !continuing.is_empty() {
        with_plan(CLAIM_CONTINUING, &[pg_sys::INT8ARRAYOID, pg_sys::INT2OID], |plan| {
            Spi::connect_mut(|c| c.update(plan, None, &[continuing.clone().into(), worker.into()]).map(|_| ()))
        })?;
    }
    let query = match stats {
        None => RECORD,
        Some(s) => {
            types.extend([
                pg_sys::INT2OID,
                // _delivery_stats
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::TEXTARRAYOID,
                // _event_stats
                pg_sys::TEXTARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT8ARRAYOID,
                // the subscriptions' streaks
                pg_sys::INT8ARRAYOID,
                pg_sys::FLOAT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::FLOAT8ARRAYOID,
                pg_sys::TEXTARRAYOID,
                pg_sys::INT4ARRAYOID,
            ]);
            args.extend([
                worker.into(),
                s.ds_sub.into(),
                s.ds_width.into(),
                s.ds_bucket.into(),
                s.ds_attempts.into(),
                s.ds_succeeded.into(),
                s.ds_failed.into(),
                s.ds_dead.into(),
                s.ds_hist.into(),
                s.es_type.into(),
                s.es_bucket.into(),
                s.es_delivered.into(),
                s.es_retried.into(),
                s.es_dead.into(),
                s.h_sub.into(),
                s.h_last_ok.into(),
                s.h_failures.into(),
                s.h_error_at.into(),
                s.h_error.into(),
                s.h_status_code.into(),
            ]);
            RECORD_WITH_STATS
        }
    };
    // The chains that go on, last (`$14` or `$34`): their keys get no other head.
    types.push(pg_sys::INT8ARRAYOID);
    args.push(continuing.into());
    with_plan(query, &types, |plan| {
        Spi::connect_mut(|c| c.update(plan, None, &args).map(|_| ()))
    })
}

/// The subscriptions a record touches, locked in id order (see record): those of its outcomes
/// (`$1`) and of the deliveries it hands back or continues (`$2`).
/// (One array, so that the plan is a lookup of the primary key, not a scan of it.)
const RECORD_LOCK_SUBSCRIPTIONS: &str = "SELECT 1 FROM webhooks._subscriptions s
 WHERE s.id = ANY ($1::int8[]
                   || ARRAY(SELECT q.subscription_id FROM webhooks._queue q WHERE q.delivery_id = ANY ($2::int8[])))
 ORDER BY s.id FOR KEY SHARE OF s";

/// The next delivery of each chain still in flight (`$1`) becomes its key's head, claimed by
/// worker `$2`. It is a delivery of the chain, not a head (nobody else can claim it), and not
/// claimed; the head it follows leaves in the record after this statement.
const CLAIM_CONTINUING: &str = "UPDATE webhooks._queue q SET head = true, claimed_at = now(), claimed_by = $2
 WHERE q.delivery_id = ANY ($1::int8[]) AND q.claimed_at IS NULL";

/// At start-up: whatever the worker's previous run had claimed is due again (at-least-once).
/// Worker `index` releases its own claims, and worker 0 those of workers that no longer exist
/// (`webhooks.workers` was lowered).
pub fn release_claims(index: usize, workers: usize) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE webhooks._queue SET claimed_at = NULL, claimed_by = NULL
          WHERE claimed_at IS NOT NULL
            AND (claimed_by = $1 OR ($1 = 0 AND (claimed_by IS NULL OR claimed_by >= $2)))",
        &[(index as i16).into(), (workers as i16).into()],
    )
}

/// Seconds until the next scheduled retry of an active subscription, run in the claim's
/// transaction: deliveries due by its now() that it did not claim wait for an in-flight one
/// to finish (which wakes the worker anyway); later ones set the timer. One index probe per
/// active subscription, whatever the size of the queue.
pub fn seconds_until_next_due() -> SpiResult<Option<f64>> {
    with_plan(NEXT_DUE, &[], |plan| {
        Spi::connect(|c| c.select(plan, Some(1), &[])?.first().get::<f64>(1))
    })
}

const NEXT_DUE: &str = "\
SELECT EXTRACT(epoch FROM pg_catalog.min(n.next_attempt_at) - pg_catalog.clock_timestamp())::float8
  FROM webhooks._subscriptions s CROSS JOIN LATERAL (
       SELECT q.next_attempt_at FROM webhooks._queue q
        WHERE q.subscription_id = s.id AND q.head AND q.claimed_at IS NULL AND q.next_attempt_at > now()
        ORDER BY q.next_attempt_at LIMIT 1) n
 WHERE s.state = 'active'";

/// One step of retention: how far it got.
pub struct RetentionStep {
    pub deleted: i64,
    /// Where the next step starts (ids, or seqs, up to here were looked at).
    pub cursor: i64,
    /// Reached history that is not old enough yet (or still pending): nothing more to do now.
    pub caught_up: bool,
}

/// Delete up to `$3` finished deliveries (and their attempts) older than the retention, among
/// the next `$3` by id after `$2`. Held deliveries are stepped over, not waited for.
const RETAIN_DELIVERIES: &str = "\
WITH scan AS (
    SELECT d.id, d.status, d.created_at < now() - $1::interval AS old
      FROM webhooks._deliveries d WHERE d.id > $2 ORDER BY d.id LIMIT $3
), gone AS (
    SELECT scan.id FROM scan WHERE scan.old AND scan.status IN ('succeeded', 'dead')
), a AS (
    DELETE FROM webhooks._attempts a USING gone WHERE a.delivery_id = gone.id
), d AS (
    DELETE FROM webhooks._deliveries d USING gone WHERE d.id = gone.id RETURNING 1
)
SELECT (SELECT pg_catalog.count(*) FROM d)::int8,
       COALESCE((SELECT pg_catalog.max(scan.id) FROM scan WHERE scan.old), $2)::int8,
       (SELECT pg_catalog.count(*) FROM scan) < $3 OR EXISTS (SELECT 1 FROM scan WHERE NOT scan.old)";

/// Delete up to `$3` events older than the retention that no delivery refers to any more,
/// among the next `$3` by seq after `$2`, stepping over events still waiting for fan-out.
const RETAIN_EVENTS: &str = "\
WITH scan AS (
    -- Not fanned out yet: its transaction is not visible in the snapshot fan-out has done.
    SELECT e.seq, e.created_at < now() - $1::interval
                  AND pg_catalog.pg_visible_in_snapshot(e.xid, (SELECT f.done FROM webhooks._fanout f)) AS old
      FROM webhooks._events e WHERE e.seq > $2 ORDER BY e.seq LIMIT $3
       -- An event that replay or redeliver is about to refer to (they lock it) is left alone.
       FOR UPDATE OF e SKIP LOCKED
), gone AS (
    SELECT scan.seq FROM scan
     WHERE scan.old AND NOT EXISTS (SELECT 1 FROM webhooks._deliveries d WHERE d.event_seq = scan.seq)
), e AS (
    DELETE FROM webhooks._events e USING gone WHERE e.seq = gone.seq RETURNING 1
)
SELECT (SELECT pg_catalog.count(*) FROM e)::int8,
       COALESCE((SELECT pg_catalog.max(scan.seq) FROM scan WHERE scan.old), $2)::int8,
       (SELECT pg_catalog.count(*) FROM scan) < $3 OR EXISTS (SELECT 1 FROM scan WHERE NOT scan.old)";

fn retention_step(
    query: &str,
    retention: &str,
    after: i64,
    batch: i64,
) -> SpiResult<RetentionStep> {
    let types = [pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID];
    with_plan(query, &types, |plan| {
        Spi::connect_mut(|c| {
            let row = c
                .update(plan, None, &[retention.into(), after.into(), batch.into()])?
                .first();
            Ok(RetentionStep {
                deleted: row.get::<i64>(1)?.unwrap_or(0),
                cursor: row.get::<i64>(2)?.unwrap_or(after),
                caught_up: row.get::<bool>(3)?.unwrap_or(true),
            })
        })
    })
}

/// Delete up to `batch` finished deliveries older than `retention`, after delivery id `after`.
pub fn retain_deliveries(retention: &str, after: i64, batch: i64) -> SpiResult<RetentionStep> {
    retention_step(RETAIN_DELIVERIES, retention, after, batch)
}

/// Delete up to `batch` unreferenced events older than `retention`, after seq `after`.
pub fn retain_events(retention: &str, after: i64, batch: i64) -> SpiResult<RetentionStep> {
    retention_step(RETAIN_EVENTS, retention, after, batch)
}

/// Trim the rollups: minute rows serve only the last hour's figures and go after two hours;
/// hour rows are kept as long as the history they sum up (`$1`, `webhooks.retention`). Both
/// are found through the rollups' primary keys, which lead with the width and the bucket.
const RETAIN_STATS: &str = "\
WITH m AS (
    DELETE FROM webhooks._delivery_stats t
     WHERE t.width = '1 minute' AND t.bucket < now() - interval '2 hours'
), h AS (
    DELETE FROM webhooks._delivery_stats t
     WHERE t.width = '1 hour' AND t.bucket < now() - $1::interval
)
DELETE FROM webhooks._event_stats t WHERE t.bucket < now() - $1::interval";

/// Trim the rollups (see RETAIN_STATS); nothing on a schema without them.
pub fn retain_stats(retention: &str) -> SpiResult<()> {
    if !stats_schema()? {
        return Ok(());
    }
    with_plan(RETAIN_STATS, &[pg_sys::TEXTOID], |plan| {
        Spi::connect_mut(|c| c.update(plan, None, &[retention.into()]).map(|_| ()))
    })
}

/// Deliveries still queued for a subscription that no longer exists (an unsubscribe that
/// raced a fan-out, a replay or a test delivery) end as dead. Finds the subscriptions of the
/// queue with one index probe each.
const END_ORPHANS: &str = "\
WITH RECURSIVE subs(id) AS (
    SELECT pg_catalog.min(q.subscription_id) FROM webhooks._queue q
  UNION ALL
    SELECT (SELECT pg_catalog.min(q.subscription_id) FROM webhooks._queue q WHERE q.subscription_id > subs.id)
      FROM subs WHERE subs.id IS NOT NULL
), gone AS (
    SELECT subs.id FROM subs
     WHERE subs.id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM webhooks._subscriptions s WHERE s.id = subs.id)
), q AS (
    DELETE FROM webhooks._queue q USING gone WHERE q.subscription_id = gone.id
    RETURNING q.delivery_id
)
UPDATE webhooks._deliveries d
   SET status = 'dead', last_error = 'subscription removed', next_attempt_at = NULL
  FROM q WHERE d.id = q.delivery_id AND d.status NOT IN ('succeeded', 'dead')";

pub fn end_orphans() -> SpiResult<()> {
    with_plan(END_ORPHANS, &[], |plan| {
        Spi::connect_mut(|c| c.update(plan, None, &[]).map(|_| ()))
    })
}
