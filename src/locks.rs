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
    refuse_a_snapshot_older_than_tracking();
}

/// Releases one hold of a lock `for_transaction` took (a hold taken earlier in the
/// transaction stays).
fn release_for_transaction(class: u32, n: u32, m: u16) {
    let tag = tag(class, n, m);
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false) };
}

fn refuse_a_snapshot_older_than_tracking() {
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
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND (d.objid OPERATOR(pg_catalog.=) ANY (SELECT t.relid::pg_catalog.oid FROM webhooks._tracked t)
                OR d.objid OPERATOR(pg_catalog.=) ANY (SELECT (c.value OPERATOR(pg_catalog.->>) 'relid')::pg_catalog.oid
                                 FROM webhooks._tracked t, pg_catalog.jsonb_array_elements(t.children) c)))";
    let rows = crate::plans::rows_with_snapshot_read_only(CONCERNS, &[], &[], unsafe { pg_sys::GetLatestSnapshot() });
    rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()) == Some("t")
}

/// The tracking lock for `untrack` and the drop handler, taken after the tables whose capture
/// triggers they drop (ACCESS EXCLUSIVE, as DROP TRIGGER takes them), as `track` takes its
/// tables before it: none of them waits for the tracking lock holding a table another one,
/// holding the tracking lock, waits for (40P01). `tables` reads them under the latest
/// snapshot, in the order to lock them (a tracked table before its children, the children in
/// OID order, as `track` takes them); read again under the tracking lock, the set may have
/// changed (a `track` or `untrack` sharing a child committed meanwhile):
/// - a table no longer needed is let go again (a child trigger kept: nothing is done to it);
/// - a table now needed is taken if it is free; if it is not, the tracking lock is let go, the
///   table waited for without it, and everything read again.
fn tracking_after_tables(tables: impl Fn() -> Vec<pg_sys::Oid>) {
    let lock = |relid, mode| unsafe { pg_sys::LockRelationOid(relid, mode as pg_sys::LOCKMODE) };
    let mut held: Vec<pg_sys::Oid> = Vec::new();
    loop {
        for relid in tables() {
            if !held.contains(&relid) {
                lock(relid, pg_sys::AccessExclusiveLock);
                held.push(relid);
            }
        }
        for_transaction(CLASS, 0, 0);
        let needed = tables();
        let all_taken = needed.iter().all(|relid| {
            held.contains(relid) || {
                let got = unsafe {
                    pg_sys::ConditionalLockRelationOid(*relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)
                };
                if got {
                    held.push(*relid);
                }
                got
            }
        });
        if all_taken {
            for relid in held.iter().filter(|relid| !needed.contains(relid)) {
                unsafe { pg_sys::UnlockRelationOid(*relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
            }
            refuse_a_snapshot_older_than_tracking();
            return;
        }
        release_for_transaction(CLASS, 0, 0);
    }
}

fn oids(rows: Vec<Vec<Option<String>>>) -> Vec<pg_sys::Oid> {
    rows.iter()
        .filter_map(|r| r.first().and_then(|v| v.as_deref()).and_then(|v| v.parse::<u32>().ok()))
        .map(pg_sys::Oid::from)
        .collect()
}

/// `untrack`'s locks (see `tracking_after_tables`): a tracked table the caller owns, then the
/// children whose capture triggers `untrack` drops (those no other tracked table lists) that
/// the caller owns: nothing `untrack`'s own DROP TRIGGERs would not lock. A caller who does not
/// own the tracked table is refused before anything is locked (not even the tracking lock), as
/// its DROP TRIGGER would refuse it (42501, in its words). A table that is not tracked gets
/// the tracking lock alone (`untrack` then says so).
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _lock_for_untracking(tbl: pg_sys::Oid) {
    const OWNER: &str = "SELECT pg_catalog.pg_has_role(k.relowner, 'USAGE'), k.relname::pg_catalog.text
          FROM webhooks._tracked t JOIN pg_catalog.pg_class k ON k.oid OPERATOR(pg_catalog.=) t.relid
         WHERE t.relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1";
    const TABLES: &str = "SELECT r.relid::pg_catalog.text
          FROM webhooks._tracked t,
               LATERAL (SELECT t.relid::pg_catalog.oid AS relid
                        UNION
                        SELECT (c.value OPERATOR(pg_catalog.->>) 'relid')::pg_catalog.oid
                          FROM pg_catalog.jsonb_array_elements(t.children) c
                         WHERE NOT EXISTS (SELECT 1 FROM webhooks._tracked o, pg_catalog.jsonb_array_elements(o.children) oc
                                            WHERE o.relid OPERATOR(pg_catalog.<>) t.relid
                                              AND (oc.value OPERATOR(pg_catalog.->>) 'relid') OPERATOR(pg_catalog.=) (c.value OPERATOR(pg_catalog.->>) 'relid'))) r
          JOIN pg_catalog.pg_class k ON k.oid OPERATOR(pg_catalog.=) r.relid
         WHERE t.relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
           AND pg_catalog.pg_has_role((SELECT x.relowner FROM pg_catalog.pg_class x WHERE x.oid OPERATOR(pg_catalog.=) $1), 'USAGE')
           AND pg_catalog.pg_has_role(k.relowner, 'USAGE')
         ORDER BY r.relid OPERATOR(pg_catalog.<>) $1, r.relid";
    let latest = || unsafe { pg_sys::GetLatestSnapshot() };
    let arg = [Some(pg_sys::Datum::from(tbl))];
    let owner = crate::plans::rows_with_snapshot_read_only(OWNER, &[pg_sys::OIDOID], &arg, latest());
    if let Some([Some(owns), Some(name)]) = owner.first().map(|r| r.as_slice()) {
        if owns != "t" {
            crate::error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                &format!("must be owner of relation {name}"),
            );
        }
    }
    tracking_after_tables(|| oids(crate::plans::rows_with_snapshot_read_only(TABLES, &[pg_sys::OIDOID], &arg, latest())));
}

/// The drop handler's locks (see `tracking_after_tables`): the children of the tracked tables
/// being dropped that no tracked table left lists, whose capture triggers the handler drops
/// (the DROP holds the tables it drops). The handler's (run as the extension's owner) in a
/// `sql_drop` event trigger; no role is granted it.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _lock_tracking_for_dropping() {
    const TABLES: &str = "WITH d AS (SELECT d.objid FROM pg_catalog.pg_event_trigger_dropped_objects() d
                                WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                  AND d.objsubid OPERATOR(pg_catalog.=) 0)
        SELECT DISTINCT (c.value OPERATOR(pg_catalog.->>) 'relid')::pg_catalog.oid::pg_catalog.text,
                        (c.value OPERATOR(pg_catalog.->>) 'relid')::pg_catalog.oid
          FROM webhooks._tracked t, pg_catalog.jsonb_array_elements(t.children) c
         WHERE t.relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (SELECT d.objid FROM d)
           AND NOT EXISTS (SELECT 1 FROM webhooks._tracked o, pg_catalog.jsonb_array_elements(o.children) oc
                            WHERE NOT o.relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (SELECT d.objid FROM d)
                              AND (oc.value OPERATOR(pg_catalog.->>) 'relid') OPERATOR(pg_catalog.=) (c.value OPERATOR(pg_catalog.->>) 'relid'))
         ORDER BY 2";
    let latest = || unsafe { pg_sys::GetLatestSnapshot() };
    tracking_after_tables(|| oids(crate::plans::rows_with_snapshot_read_only(TABLES, &[], &[], latest())));
}
