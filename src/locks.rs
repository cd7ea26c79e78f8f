//! Locks of the extension's own: user locks (`pg_locks.locktype = 'userlock'`), a kind that
//! only C code can take. An advisory lock is anybody's: any role can take any key with
//! `pg_advisory_lock` and hold it as long as it likes, and whatever waits for that key waits
//! for that role. Fields: the database, a class, two numbers.

use pgrx::pg_sys;

/// The class of the worker keys (numbers 1 + the worker's) and of the tracking lock (0).
pub const CLASS: u32 = 1885828969;

/// The class of `emit`'s per-key locks ("pgwh").
pub const EMIT_CLASS: u32 = 0x7067_7768;

fn tag(class: u32, n: u32, m: u16) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: class,
        locktag_field3: n,
        locktag_field4: m,
        locktag_type: pg_sys::LockTagType::LOCKTAG_USERLOCK as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes the lock for the rest of the transaction, waiting for it as `pg_advisory_xact_lock`
/// does (deadlock detection, `lock_timeout` and cancel apply), and kept across `PREPARE` as
/// that one is. Refused in a parallel operation, as advisory locks are.
pub fn for_transaction(class: u32, n: u32, m: u16) {
    unsafe {
        if pg_sys::IsInParallelMode() {
            crate::error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
                "pg_webhooks: cannot take its locks during a parallel operation",
            );
        }
        // Without a resource owner the lock would be the session's.
        debug_assert!(!pg_sys::CurrentResourceOwner.is_null(), "a transaction's lock needs a resource owner");
    }
    let tag = tag(class, n, m);
    unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, false) };
}

/// Takes the lock for the rest of the session if nobody holds it; false if somebody does.
pub fn try_for_session(class: u32, n: u32, m: u16) -> bool {
    let tag = tag(class, n, m);
    let got = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true, true) };
    got == pg_sys::LockAcquireResult::LOCKACQUIRE_OK
}

/// `track`, `untrack` and the drop handler decide from `_tracked` which child triggers to
/// keep: one at a time, each seeing what the one before committed. Granted to
/// `webhooks_admin` (who may call `track` and `untrack`); the drop handler takes it as the
/// extension's owner, and only for a DROP of (a column of) a tracked table or a child: run by
/// that table's owner, or by the owner of something it depends on, with CASCADE. (A `track`
/// that waits for a table it tracks, locked by a writer, waits before it takes this lock.)
///
/// At REPEATABLE READ or SERIALIZABLE the transaction's snapshot may be older than what the
/// lock's previous holder committed, and the caller would decide from a `_tracked` that is no
/// more (dropping the child triggers a table tracked since needs): refused with 40001 then, as
/// PostgreSQL refuses an update of a row changed since the snapshot.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _lock_tracking() {
    for_transaction(CLASS, 0, 0);
    if unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32 {
        return;
    }
    const VERSIONS: &str = "SELECT pg_catalog.string_agg(t.ctid::text || ':' || t.xmin::text, ',' ORDER BY t.ctid)
                              FROM webhooks._tracked t";
    let versions = |snapshot| crate::plans::rows_with_snapshot_read_only(VERSIONS, &[], &[], snapshot);
    let mine = versions(unsafe { pg_sys::GetTransactionSnapshot() });
    let now = versions(unsafe { pg_sys::GetLatestSnapshot() });
    if mine != now {
        crate::error::raise_with_hint(
            pgrx::PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "could not serialize access due to a concurrent change of what pg_webhooks tracks",
            "Retry the transaction. track, untrack and DDL of tracked tables see every change at READ COMMITTED.",
        );
    }
}

/// Whether what the running `sql_drop` event trigger reports as dropped is (a column of) a
/// tracked table or a child of one: then the drop handler takes the tracking lock. Read under
/// the latest snapshot: at REPEATABLE READ the transaction's may predate a track of what is
/// dropped (the lock's check then refuses the stale snapshot with 40001). The drop handler's
/// (run as the extension's owner); no role is granted it.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _drop_concerns_tracking() -> bool {
    const CONCERNS: &str = "SELECT EXISTS (
        SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND (d.objid IN (SELECT t.relid FROM webhooks._tracked t)
                OR d.objid IN (SELECT (c.value OPERATOR(pg_catalog.->>) 'relid')::pg_catalog.oid
                                 FROM webhooks._tracked t, pg_catalog.jsonb_array_elements(t.children) c)))";
    let rows = crate::plans::rows_with_snapshot_read_only(CONCERNS, &[], &[], unsafe { pg_sys::GetLatestSnapshot() });
    rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()) == Some("t")
}
