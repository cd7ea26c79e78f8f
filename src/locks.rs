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
/// that one is.
pub fn for_transaction(class: u32, n: u32, m: u16) {
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
/// `webhooks_admin` (who may call `track` and `untrack`) and run by the drop handler as the
/// extension's owner; no other role can take it or hold it up.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _lock_tracking() {
    for_transaction(CLASS, 0, 0);
}
