//! What the delivery workers share with every backend: per served database, how a commit wakes
//! its fan-out worker, and per worker what `webhooks.worker_status()` shows.
//!
//! One row per database listed in `webhooks.database`, in the order listed (the list needs a
//! restart to change, so every process agrees on the rows). A row is bound to its database's
//! OID by its workers once they are connected; a backend finds its database's row by
//! `MyDatabaseId`, so a commit in a database that no worker serves wakes nobody. Everything is
//! an atomic: a commit never takes a lock to wake a worker, and reading the status never stops
//! the workers.

use crate::gucs::{MAX_DATABASES, MAX_WORKERS};
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, pg_sys, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

/// A delivery worker's life, as `worker_status()` names it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum State {
    NotRunning = 0,
    WaitingForDatabase = 1,
    Starting = 2,
    WaitingForExtension = 3,
    WaitingForUpdate = 4,
    Idle = 5,
    Delivering = 6,
}

impl State {
    fn from_u32(v: u32) -> State {
        match v {
            1 => State::WaitingForDatabase,
            2 => State::Starting,
            3 => State::WaitingForExtension,
            4 => State::WaitingForUpdate,
            5 => State::Idle,
            6 => State::Delivering,
            _ => State::NotRunning,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            State::NotRunning => "not running",
            State::WaitingForDatabase => "waiting for the database",
            State::Starting => "starting",
            State::WaitingForExtension => "waiting for the extension",
            State::WaitingForUpdate => "waiting for ALTER EXTENSION UPDATE",
            State::Idle => "idle",
            State::Delivering => "delivering",
        }
    }
}

/// Counters a worker adds to as it records outcomes (since it started).
#[derive(Default, Clone, Copy, Debug)]
pub struct Counts {
    pub claimed: u64,
    pub attempts: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub dead: u64,
    pub bytes_sent: u64,
}

/// One delivery worker.
pub struct WorkerSlot {
    /// Its pid (0 while it is not running) and the address of its latch: a latch is set only
    /// while its PGPROC still belongs to this pid, so a worker that died without clearing it
    /// can never make a backend set the latch of whatever process reused its PGPROC.
    pid: AtomicI32,
    latch: AtomicU64,
    state: AtomicU32,
    /// PostgreSQL timestamps (microseconds since 2000), 0 = never.
    started_at: AtomicI64,
    last_wake_at: AtomicI64,
    requests_in_flight: AtomicU32,
    /// Set by worker 0 when it queued deliveries (the others claim too), taken by this worker.
    claim_asked: AtomicBool,
    claimed: AtomicU64,
    attempts: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    bytes_sent: AtomicU64,
}

/// One served database.
pub struct DatabaseSlot {
    /// The database's OID once a worker has connected to it (0 before).
    oid: AtomicU32,
    /// Set by the commit of a transaction that wrote events, cleared by the fan-out worker
    /// before it fans out. Only the commit that sets it wakes the worker: under load, one wake
    /// per fan-out round, not one signal per commit; an idle worker is woken by the first
    /// commit at once.
    events_pending: AtomicBool,
    /// Set when deliveries were queued directly (not through new events): claim next turn.
    queue_changed: AtomicBool,
    /// Set by the fan-out worker while the heads lock (see queue::fan_out) was taken when it
    /// tried: the other workers' records hold back a moment before they take it.
    fan_out_waiting: AtomicBool,
    /// Queued deliveries, as last counted by the fan-out worker (-1: not yet), and when.
    queue_depth: AtomicI64,
    queue_depth_at: AtomicI64,
    workers: [WorkerSlot; MAX_WORKERS],
}

// SAFETY: made of atomics only, valid when zeroed, and never pointing into process memory
// (the latch address is into shared memory, the PGPROC array).
unsafe impl PGRXSharedMemory for DatabaseSlot {}

fn new_worker() -> WorkerSlot {
    WorkerSlot {
        pid: AtomicI32::new(0),
        latch: AtomicU64::new(0),
        state: AtomicU32::new(State::NotRunning as u32),
        started_at: AtomicI64::new(0),
        last_wake_at: AtomicI64::new(0),
        requests_in_flight: AtomicU32::new(0),
        claim_asked: AtomicBool::new(false),
        claimed: AtomicU64::new(0),
        attempts: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dead: AtomicU64::new(0),
        bytes_sent: AtomicU64::new(0),
    }
}

fn new_database() -> DatabaseSlot {
    DatabaseSlot {
        oid: AtomicU32::new(0),
        events_pending: AtomicBool::new(false),
        queue_changed: AtomicBool::new(false),
        fan_out_waiting: AtomicBool::new(false),
        queue_depth: AtomicI64::new(-1),
        queue_depth_at: AtomicI64::new(0),
        workers: std::array::from_fn(|_| new_worker()),
    }
}

static DATABASES: PgAtomic<[DatabaseSlot; MAX_DATABASES]> =
    unsafe { PgAtomic::new(c"pg_webhooks_databases") };

pub fn init() {
    pg_shmem_init!(DATABASES = std::array::from_fn(|_| new_database()));
}

fn database(d: usize) -> &'static DatabaseSlot {
    &DATABASES.get()[d.min(MAX_DATABASES - 1)]
}

/// The row of the database this backend is connected to, if a worker serves it.
fn this_database() -> Option<&'static DatabaseSlot> {
    let me = unsafe { pg_sys::MyDatabaseId }.to_u32();
    if me == 0 {
        return None;
    }
    // A row whose fan-out worker runs, if one is bound to this database: a row bound earlier
    // (a database renamed, its worker gone) must not hide it.
    let rows = DATABASES.get().iter().filter(|db| db.oid.load(Ordering::Acquire) == me);
    let mut first = None;
    for db in rows {
        if db.workers[0].pid.load(Ordering::Acquire) != 0 {
            return Some(db);
        }
        first.get_or_insert(db);
    }
    first
}

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Wake this database's fan-out worker (at the commit of an enqueuing transaction, after it
/// became visible to new snapshots).
pub fn wake(queue_changed: bool) {
    let Some(db) = this_database() else { return };
    if queue_changed {
        db.queue_changed.store(true, Ordering::SeqCst);
    }
    if db.events_pending.swap(true, Ordering::SeqCst) && !queue_changed {
        // The worker has not fanned out since the last wake: it will see this commit too.
        return;
    }
    set_latch(db, 0);
}

/// The running fan-out worker's pid in this backend's database (what a commit would wake).
pub fn fan_out_worker_pid() -> Option<i32> {
    this_database()
        .map(|db| db.workers[0].pid.load(Ordering::Acquire))
        .filter(|p| *p != 0)
}

fn set_latch(db: &DatabaseSlot, i: usize) {
    let w = &db.workers[i];
    let pid = w.pid.load(Ordering::Acquire);
    let latch = w.latch.load(Ordering::Acquire) as *mut pg_sys::Latch;
    // The latch lives in the worker's PGPROC (shared memory, always mapped); it is ours to set
    // only while that PGPROC still belongs to the worker.
    if pid != 0 && !latch.is_null() && unsafe { (*latch).owner_pid } == pid {
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// The launcher's view of a worker it does not run (yet).
pub fn set_launcher_state(d: usize, i: usize, state: State) {
    let w = &database(d).workers[i.min(MAX_WORKERS - 1)];
    if w.pid.load(Ordering::Acquire) == 0 {
        w.state.store(state as u32, Ordering::Release);
    }
}

/// A running delivery worker's handle on its own slot.
#[derive(Clone, Copy)]
pub struct Me {
    d: usize,
    i: usize,
}

impl Me {
    /// Claim slot (d, i) for this process, connected to its database: publish its latch and
    /// bind the row to the database. Withdrawn at exit by `leave`.
    pub fn enter(d: usize, i: usize) -> Me {
        let me = Me { d: d.min(MAX_DATABASES - 1), i: i.min(MAX_WORKERS - 1) };
        let db = me.db();
        let oid = unsafe { pg_sys::MyDatabaseId }.to_u32();
        db.oid.store(oid, Ordering::Release);
        // Another row bound to this database (it was listed under another name that it had
        // then) is not its row any more.
        for (d, other) in DATABASES.get().iter().enumerate() {
            if d != me.d {
                let _ = other.oid.compare_exchange(oid, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        let w = me.slot();
        for c in [&w.claimed, &w.attempts, &w.succeeded, &w.failed, &w.dead, &w.bytes_sent] {
            c.store(0, Ordering::Relaxed);
        }
        w.requests_in_flight.store(0, Ordering::Relaxed);
        w.started_at.store(now(), Ordering::Relaxed);
        w.last_wake_at.store(0, Ordering::Relaxed);
        w.state.store(State::Starting as u32, Ordering::Release);
        w.latch.store(unsafe { pg_sys::MyLatch } as u64, Ordering::Release);
        w.pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
        me
    }

    /// Withdraw this process's latch (only its own: a newer worker may have taken the slot).
    pub fn leave(d: usize, i: usize) {
        let w = &database(d).workers[i.min(MAX_WORKERS - 1)];
        let me = unsafe { pg_sys::MyProcPid };
        if w.pid.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            w.latch.store(0, Ordering::Release);
            w.requests_in_flight.store(0, Ordering::Relaxed);
            w.state.store(State::NotRunning as u32, Ordering::Release);
        }
    }

    fn db(&self) -> &'static DatabaseSlot {
        database(self.d)
    }
    fn slot(&self) -> &'static WorkerSlot {
        &self.db().workers[self.i]
    }

    pub fn set_state(&self, state: State) {
        self.slot().state.store(state as u32, Ordering::Release);
    }
    pub fn woke(&self) {
        self.slot().last_wake_at.store(now(), Ordering::Relaxed);
    }
    pub fn set_requests_in_flight(&self, n: usize) {
        self.slot().requests_in_flight.store(n.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    }
    pub fn add(&self, c: Counts) {
        let w = self.slot();
        w.claimed.fetch_add(c.claimed, Ordering::Relaxed);
        w.attempts.fetch_add(c.attempts, Ordering::Relaxed);
        w.succeeded.fetch_add(c.succeeded, Ordering::Relaxed);
        w.failed.fetch_add(c.failed, Ordering::Relaxed);
        w.dead.fetch_add(c.dead, Ordering::Relaxed);
        w.bytes_sent.fetch_add(c.bytes_sent, Ordering::Relaxed);
    }
    pub fn set_queue_depth(&self, depth: i64) {
        let db = self.db();
        db.queue_depth.store(depth, Ordering::Relaxed);
        db.queue_depth_at.store(now(), Ordering::Release);
    }

    /// Take "a commit wrote events" (cleared before the fan-out's snapshot is taken: a commit
    /// after this wakes the worker again).
    pub fn events_pending(&self) -> bool {
        self.db().events_pending.load(Ordering::SeqCst)
    }
    pub fn clear_events_pending(&self) {
        self.db().events_pending.store(false, Ordering::SeqCst);
    }
    /// Fan-out found the heads lock taken (true), or got it (false).
    pub fn set_fan_out_waiting(&self, waiting: bool) {
        self.db().fan_out_waiting.store(waiting, Ordering::SeqCst);
    }
    /// Before a record takes the heads lock: while fan-out waits for it, wait up to `most`, so
    /// that the records of many workers, one after the other, cannot keep it from fan-out.
    /// Bounded: a fan-out that cannot get it (a record holds it while it waits for a row lock)
    /// holds nobody else up.
    pub fn yield_to_fan_out(&self, most: std::time::Duration) {
        let until = std::time::Instant::now() + most;
        while self.db().fan_out_waiting.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    pub fn take_queue_changed(&self) -> bool {
        self.db().queue_changed.swap(false, Ordering::AcqRel)
    }
    /// Wake the database's other workers (1..workers) to claim.
    pub fn wake_others(&self, workers: usize) {
        let db = self.db();
        (1..workers.min(MAX_WORKERS)).for_each(|i| {
            db.workers[i].claim_asked.store(true, Ordering::SeqCst);
            set_latch(db, i)
        });
    }
    /// Take "worker 0 asked this worker to claim" (see wake_others).
    pub fn take_claim_asked(&self) -> bool {
        self.db().workers[self.i].claim_asked.swap(false, Ordering::AcqRel)
    }
}

/// One row of `worker_status()`.
pub struct Status {
    pub database: usize,
    pub worker: usize,
    pub pid: Option<i32>,
    pub state: State,
    pub started_at: Option<i64>,
    pub last_wake_at: Option<i64>,
    pub requests_in_flight: u32,
    pub queue_depth: Option<i64>,
    pub queue_depth_at: Option<i64>,
    pub counts: Counts,
}

/// Every configured worker of every served database (`databases` × `workers` rows).
pub fn statuses(databases: usize, workers: usize) -> Vec<Status> {
    let mut out = Vec::new();
    for d in 0..databases.min(MAX_DATABASES) {
        let db = database(d);
        let depth = db.queue_depth.load(Ordering::Relaxed);
        let depth_at = db.queue_depth_at.load(Ordering::Acquire);
        for i in 0..workers.min(MAX_WORKERS) {
            let w = &db.workers[i];
            let pid = w.pid.load(Ordering::Acquire);
            let running = pid != 0;
            let state = State::from_u32(w.state.load(Ordering::Acquire));
            let nonzero = |t: i64| Some(t).filter(|t| *t != 0);
            out.push(Status {
                database: d,
                worker: i,
                pid: running.then_some(pid),
                // A slot whose worker is gone says so, whatever it said last.
                state: if running || state == State::WaitingForDatabase { state } else { State::NotRunning },
                started_at: if running { nonzero(w.started_at.load(Ordering::Relaxed)) } else { None },
                last_wake_at: if running { nonzero(w.last_wake_at.load(Ordering::Relaxed)) } else { None },
                requests_in_flight: if running { w.requests_in_flight.load(Ordering::Relaxed) } else { 0 },
                queue_depth: (depth >= 0).then_some(depth),
                queue_depth_at: nonzero(depth_at),
                counts: Counts {
                    claimed: w.claimed.load(Ordering::Relaxed),
                    attempts: w.attempts.load(Ordering::Relaxed),
                    succeeded: w.succeeded.load(Ordering::Relaxed),
                    failed: w.failed.load(Ordering::Relaxed),
                    dead: w.dead.load(Ordering::Relaxed),
                    bytes_sent: w.bytes_sent.load(Ordering::Relaxed),
                },
            });
        }
    }
    out
}

type Ts = Option<pgrx::datum::TimestampWithTimeZone>;

fn ts(t: Option<i64>) -> Ts {
    t.and_then(|t| pgrx::datum::TimestampWithTimeZone::try_from(t).ok())
}

/// Every delivery worker of every served database, from shared memory (no table is read: cheap
/// to call, and it answers from any database while a worker is busy or stuck).
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(worker, i32),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(started_at, Ts),
        name!(last_wake_at, Ts),
        name!(requests_in_flight, i32),
        name!(queue_depth, Option<i64>),
        name!(queue_depth_at, Ts),
        name!(claimed, i64),
        name!(attempts, i64),
        name!(succeeded, i64),
        name!(failed, i64),
        name!(dead, i64),
        name!(bytes_sent, i64),
    ),
> {
    let names = crate::gucs::databases().unwrap_or_default();
    let rows = statuses(names.len(), crate::gucs::workers());
    let big = |v: u64| v.min(i64::MAX as u64) as i64;
    TableIterator::new(rows.into_iter().map(move |s| {
        (
            names.get(s.database).cloned().unwrap_or_default(),
            s.worker as i32,
            s.pid,
            s.state.name().to_string(),
            ts(s.started_at),
            ts(s.last_wake_at),
            s.requests_in_flight.min(i32::MAX as u32) as i32,
            s.queue_depth,
            ts(s.queue_depth_at),
            big(s.counts.claimed),
            big(s.counts.attempts),
            big(s.counts.succeeded),
            big(s.counts.failed),
            big(s.counts.dead),
            big(s.counts.bytes_sent),
        )
    }))
}
