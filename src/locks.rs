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

/// Takes the lock for the rest of the transaction if nobody else holds it (this transaction
/// may); false if somebody does.
fn try_for_transaction(class: u32, n: u32, m: u16) -> bool {
    let tag = tag(class, n, m);
    let got = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, true) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
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

enum Busy {
    Table(pg_sys::Oid),
    Tracking,
    /// A table whose ACCESS EXCLUSIVE lock is busy: its current holders are waited for.
    Holders(pg_sys::Oid),
}

fn relation_tag(relid: pg_sys::Oid) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: relid.to_u32(),
        locktag_field3: 0,
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_RELATION as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    }
}

/// Whether this transaction holds a lock on the table, in any mode.
fn held_by_me(relid: pg_sys::Oid) -> bool {
    let tag = relation_tag(relid);
    (pg_sys::AccessShareLock..=pg_sys::AccessExclusiveLock)
        .any(|mode| unsafe { pg_sys::LockHeldByMe(&tag, mode as pg_sys::LOCKMODE) })
}

/// Whether another transaction holds a lock on the table that conflicts with `mode` (waiters
/// are not counted).
fn has_conflicts(relid: pg_sys::Oid, mode: pg_sys::LOCKMODE) -> bool {
    let tag = relation_tag(relid);
    let mut count: std::ffi::c_int = 0;
    unsafe { pg_sys::GetLockConflicts(&tag, mode, &mut count) };
    count > 0
}

/// Whether another transaction waits for a lock on the table that conflicts with `mode`, which
/// this transaction holds.
fn has_waiters(relid: pg_sys::Oid, mode: pg_sys::LOCKMODE) -> bool {
    let tag = relation_tag(relid);
    unsafe { pg_sys::LockHasWaiters(&tag, mode, false) }
}

/// How often `tables_then_tracking` lets go of what it took before it waits for each lock in
/// turn instead.
const BACKOFFS: u32 = 8;

/// Takes `tables()` (in the order given), then the tracking lock, for `track`, `untrack` and
/// the drop handler, without waiting for one of them while holding another it took: it tries
/// each in turn without waiting, and when one is busy it lets go of all it took, waits for
/// that one alone, and starts again. So none of them waits holding a table that a writer or
/// another of them waits for (40P01, or an application held up behind a migration that holds
/// the tracking lock), whatever order anyone takes tables in.
/// - `probe` is the mode tried and given back; `mode` the one finally held. For `untrack` and
///   the handler, EXCLUSIVE then ACCESS EXCLUSIVE: an ACCESS EXCLUSIVE lock is written to the
///   WAL when granted and held on a hot standby until the transaction ends, given back or not.
///   EXCLUSIVE keeps out every writer and `track` (not plain reads); under the tracking lock
///   ACCESS EXCLUSIVE is taken on the tables still needed only if nobody else holds one of
///   them (a reader): else everything is let go and the readers are waited for, holding
///   nothing and queueing for nothing (a reader that goes on to write does not wait).
/// - `tables()` is read again under the tracking lock (what a `track` or `untrack` committed
///   meanwhile can change it): a table no longer needed is let go at once, one now needed is
///   taken as the others.
/// - Each round waits once, first, for what the round before found busy, holding only what
///   the transaction held before the call. (A try on a table the transaction held before can
///   fail on waiters that wait for this very transaction, and its wait is then granted at once:
///   with two such tables the rounds do not sleep, and the fallback below ends them.) The
///   waiters of a table held before do not stop its ACCESS EXCLUSIVE lock, taken last: they
///   wait for this transaction anyway, and it is granted ahead of them.
/// - Under a steady stream of writers or readers the tries could go on for ever: after
///   `BACKOFFS` rounds it takes the tracking lock, holding nothing, and then each table in
///   turn in `mode`, as DDL does (a cycle that then closes is PostgreSQL's to break: 40P01).
///
/// Locks this transaction took before the call stay: a release gives back only what this call
/// took. `lock_timeout` applies to each wait.
fn tables_then_tracking(probe: u32, mode: u32, tables: impl Fn() -> Vec<pg_sys::Oid>) {
    let (probe, mode) = (probe as pg_sys::LOCKMODE, mode as pg_sys::LOCKMODE);
    let lock = |relid, mode| unsafe { pg_sys::LockRelationOid(relid, mode) };
    let mut backoffs = 0;
    let mut wait_for: Option<Busy> = None;
    // The tables the transaction held before the call: noted when first tried (every lock this
    // call took is in `taken` then, or was given back).
    let mut before: Vec<pg_sys::Oid> = Vec::new();
    loop {
        pgrx::check_for_interrupts!();
        if backoffs >= BACKOFFS {
            for_transaction(CLASS, 0, 0);
            for relid in tables() {
                lock(relid, mode);
            }
            refuse_a_snapshot_older_than_tracking();
            return;
        }
        // What this round took, and in which mode: given back if it backs off.
        let mut taken: Vec<(pg_sys::Oid, pg_sys::LOCKMODE)> = Vec::new();
        let mut tracking = false;
        // The one wait of the round, holding only what the transaction held before the call.
        match wait_for.take() {
            Some(Busy::Holders(relid)) => unsafe { pg_sys::WaitForLockers(relation_tag(relid), mode, false) },
            Some(Busy::Table(relid)) => {
                lock(relid, probe);
                taken.push((relid, probe));
            }
            Some(Busy::Tracking) => {
                for_transaction(CLASS, 0, 0);
                tracking = true;
            }
            None => {}
        }
        let try_all = |want: &[pg_sys::Oid], taken: &mut Vec<(pg_sys::Oid, pg_sys::LOCKMODE)>, before: &mut Vec<pg_sys::Oid>| {
            for &relid in want {
                if taken.iter().any(|t| t.0 == relid) {
                    continue;
                }
                if !before.contains(&relid) && held_by_me(relid) {
                    before.push(relid);
                }
                if !unsafe { pg_sys::ConditionalLockRelationOid(relid, probe) } {
                    return Some(Busy::Table(relid));
                }
                taken.push((relid, probe));
            }
            None
        };
        let mut busy = try_all(&tables(), &mut taken, &mut before);
        if busy.is_none() && !tracking {
            tracking = try_for_transaction(CLASS, 0, 0);
            if !tracking {
                busy = Some(Busy::Tracking);
            }
        }
        if busy.is_none() {
            let needed = tables();
            busy = try_all(&needed, &mut taken, &mut before);
            if busy.is_none() && mode != probe {
                // Nobody else on any of them (holding, or queued behind this call's EXCLUSIVE:
                // they make a try fail), or none is taken: an ACCESS EXCLUSIVE lock taken and
                // given back would stay on a hot standby. Those waiting for a table the
                // transaction held before wait for it anyway: its ACCESS EXCLUSIVE lock is taken
                // last, and granted at once ahead of them.
                busy = needed
                    .iter()
                    .find(|relid| has_conflicts(**relid, mode) || (!before.contains(relid) && has_waiters(**relid, probe)))
                    .map(|relid| Busy::Holders(*relid));
                if busy.is_none() {
                    for &relid in needed.iter().filter(|relid| !before.contains(relid)) {
                        if !unsafe { pg_sys::ConditionalLockRelationOid(relid, mode) } {
                            busy = Some(Busy::Holders(relid));
                            break;
                        }
                        taken.push((relid, mode));
                    }
                }
                if busy.is_none() {
                    for &relid in needed.iter().filter(|relid| before.contains(relid)) {
                        lock(relid, mode);
                        taken.push((relid, mode));
                    }
                }
            }
            if busy.is_none() {
                for (relid, mode) in taken.iter().filter(|t| !needed.contains(&t.0)) {
                    unsafe { pg_sys::UnlockRelationOid(*relid, *mode) };
                }
                refuse_a_snapshot_older_than_tracking();
                return;
            }
        }
        for (relid, mode) in &taken {
            unsafe { pg_sys::UnlockRelationOid(*relid, *mode) };
        }
        if tracking {
            release_for_transaction(CLASS, 0, 0);
        }
        wait_for = busy;
        backoffs += 1;
    }
}

/// The tables `track` reads and puts triggers on (the table, then its children in OID
/// order), each checked by `api::check_lockable_for_tracking`, SHARE ROW EXCLUSIVE as its CREATE
/// TRIGGERs take them, then the tracking lock (see `tables_then_tracking`).
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _lock_tables_for_tracking(tables: Vec<Option<pg_sys::Oid>>) {
    let tables: Vec<pg_sys::Oid> = tables.into_iter().flatten().collect();
    for &relid in &tables {
        crate::api::check_lockable_for_tracking(relid);
    }
    tables_then_tracking(pg_sys::ShareRowExclusiveLock, pg_sys::ShareRowExclusiveLock, || tables.clone());
}

/// `untrack`'s locks (see `tables_then_tracking`): the tracked table, then the children whose
/// capture triggers `untrack` drops (those no other tracked table lists), in OID order,
/// ACCESS EXCLUSIVE as its DROP TRIGGERs take them. A caller who does not own one of them is
/// refused before anything is locked (not even the tracking lock), as its DROP TRIGGER would
/// refuse it (42501, in its words). A table that is not tracked gets the tracking lock alone
/// (`untrack` then says so).
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _lock_for_untracking(tbl: pg_sys::Oid) {
    const TABLES: &str = "SELECT r.relid::pg_catalog.text, pg_catalog.pg_has_role(k.relowner, 'USAGE'),
                                 k.relname::pg_catalog.text
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
         ORDER BY r.relid OPERATOR(pg_catalog.<>) $1, r.relid";
    let arg = [Some(pg_sys::Datum::from(tbl))];
    let tables = || {
        let rows = crate::plans::rows_with_snapshot_read_only(TABLES, &[pg_sys::OIDOID], &arg, unsafe {
            pg_sys::GetLatestSnapshot()
        });
        for row in &rows {
            if let [_, Some(owns), Some(name)] = row.as_slice() {
                if owns != "t" {
                    crate::error::raise(
                        pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                        &format!("must be owner of relation {name}"),
                    );
                }
            }
        }
        oids(rows)
    };
    tables_then_tracking(pg_sys::ExclusiveLock, pg_sys::AccessExclusiveLock, tables);
}

fn oids(rows: Vec<Vec<Option<String>>>) -> Vec<pg_sys::Oid> {
    rows.iter()
        .filter_map(|r| r.first().and_then(|v| v.as_deref()).and_then(|v| v.parse::<u32>().ok()))
        .map(pg_sys::Oid::from)
        .collect()
}

/// The drop handler's locks (see `tables_then_tracking`): the children of the tracked tables
/// being dropped that no tracked table left lists, whose capture triggers the handler drops
/// (the DROP holds the tables it drops), in OID order, ACCESS EXCLUSIVE. The handler's (run as
/// the extension's owner) in a `sql_drop` event trigger; no role is granted it.
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
    let tables =
        || oids(crate::plans::rows_with_snapshot_read_only(TABLES, &[], &[], unsafe { pg_sys::GetLatestSnapshot() }));
    tables_then_tracking(pg_sys::ExclusiveLock, pg_sys::AccessExclusiveLock, tables);
}
