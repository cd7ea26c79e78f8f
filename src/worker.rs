//! The background workers.
//!
//! A launcher, started from `shared_preload_libraries`, connects to no database (only the
//! shared catalogs), waits until `webhooks.database` exists and keeps one delivery worker
//! running in it. The delivery worker waits for the extension, then loops: fan out new
//! events, claim due deliveries, hand them to HTTP threads, record outcomes in batches.
//! It is woken by its latch (set at the commit of any enqueuing transaction) or by the HTTP
//! threads' pipe, and otherwise sleeps until the next retry is due or the safety poll.
//! Registered to start after recovery, so it never runs on a standby.

use crate::gucs::MAX_WORKERS;
use crate::shmem::{self, State};
use crate::{gucs, http, queue, schedule};
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const APPLICATION_NAME: &std::ffi::CStr = c"pg_webhooks worker";

pub fn register() {
    BackgroundWorkerBuilder::new("pg_webhooks launcher")
        .set_type("pg_webhooks launcher")
        .set_library("pg_webhooks")
        .set_function("pg_webhooks_launcher_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Runs however the worker exits (SIGTERM, ERROR, FATAL): its latch is withdrawn first.
#[pg_guard]
unsafe extern "C-unwind" fn withdraw_latch_at_exit(_code: i32, arg: pg_sys::Datum) {
    let (d, i) = slot_of(arg.value());
    shmem::Me::leave(d, i);
}

/// A worker's argument: its database's place in `webhooks.database` and its index there.
fn slot_of(arg: usize) -> (usize, usize) {
    (arg / MAX_WORKERS, arg % MAX_WORKERS)
}

/// The running fan-out worker's pid (worker 0 of this database), or NULL: what backends would
/// wake at commit.
#[pg_extern(volatile, parallel_safe)]
fn _worker_pid() -> Option<i32> {
    shmem::fan_out_worker_pid()
}


/// A delivery worker's transaction: `f` after a share lock on the extension (its `pg_extension`
/// object), which `DROP EXTENSION` locks exclusively before any of its tables. Without it a
/// DROP, locking the extension's tables one by one, and a worker transaction holding one of
/// them and waiting for another deadlocked (and either could be the one to fail); now the DROP
/// waits for the worker's transaction, or the worker for the DROP, holding nothing another
/// session can ask for (its one-per-number key is a user lock, see pg_webhooks_worker_main).
///
/// Waiting, the worker is queued for the lock as any session is (a stream of refused DROPs
/// does not starve it), and SIGTERM ends the wait: PostgreSQL's own handler is in place for
/// it. Once it has the lock the extension is looked up again (as Citus does): a DROP that
/// committed meanwhile, or a DROP and CREATE in one transaction, is seen now, not as missing
/// relations later.
fn transaction<R, F: FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe>(f: F) -> R {
    BackgroundWorker::transaction(move || {
        unsafe { lock_extension() };
        f()
    })
}

thread_local! {
    /// The extension's OID locked by this worker's latest transaction (0: none).
    static LOCKED_EXTENSION: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// The extension's OID when this worker became ready to deliver (0: not ready yet): a
    /// worker transaction that finds another one (the extension dropped, or dropped and
    /// created again) restarts the worker rather than go on with what it holds of the old one.
    static READY_EXTENSION: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

unsafe extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends (postgres.c): sets ProcDiePending and the
    /// latch, so the next CHECK_FOR_INTERRUPTS ends the process with FATAL. A signal handler,
    /// called by the kernel: it must be the C function itself, not pgrx's guarded wrapper.
    #[link_name = "die"]
    fn postgres_die(signo: std::ffi::c_int);
}

unsafe fn lock_extension() {
    let mode = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    LOCKED_EXTENSION.with(|l| l.set(0));
    loop {
        let ext = pg_sys::get_extension_oid(c"pg_webhooks".as_ptr(), true);
        let ready = READY_EXTENSION.with(|r| r.get());
        if ext == pg_sys::InvalidOid {
            if ready != 0 {
                restart("the extension was dropped");
            }
            return;
        }
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: pg_sys::ExtensionRelationId.to_u32(),
            locktag_field3: ext.to_u32(),
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        let before = pg_sys::SharedInvalidMessageCounter;
        if pg_sys::LockAcquire(&tag, mode, false, true) == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            // A DROP EXTENSION (or ALTER ... DEPENDS ON EXTENSION, DROP OWNED) holds it or
            // waits for it. pgrx's SIGTERM handler only raises a flag, which a lock wait never
            // looks at: PostgreSQL's `die` is the handler for the wait, so that SIGTERM ends
            // it (with FATAL, as it ends a backend's).
            let stopping = || -> ! {
                log!("pg_webhooks: delivery worker stopping while it waited for the extension's lock");
                pg_sys::proc_exit(0)
            };
            // (Reading pgrx's flag clears it: each read that finds it set stops here.)
            if BackgroundWorker::sigterm_received() {
                stopping();
            }
            /// pgrx's handler back however the wait ends (an ERROR unwinds through here).
            struct Restore(pg_sys::pqsigfunc);
            impl Drop for Restore {
                fn drop(&mut self) {
                    unsafe { pg_sys::pqsignal(libc::SIGTERM, self.0) };
                }
            }
            let restore = Restore(pg_sys::pqsignal(libc::SIGTERM, Some(postgres_die)));
            // One that came just before the swap raised pgrx's flag.
            if BackgroundWorker::sigterm_received() {
                drop(restore);
                stopping();
            }
            let started = std::time::Instant::now();
            pg_sys::LockAcquire(&tag, mode, false, false);
            drop(restore);
            // The wait reset the latch: a wake that came meanwhile (a commit's, worker 0's
            // call to the others) is set again for the main loop.
            pg_sys::SetLatch(pg_sys::MyLatch);
            // A SIGTERM taken by `die` after the lock was granted ends the worker here.
            pgrx::check_for_interrupts!();
            let waited = started.elapsed();
            if waited >= Duration::from_secs(1) {
                log!(
                    "pg_webhooks: the delivery worker waited {:.1} s for the extension's lock",
                    waited.as_secs_f64()
                );
            }
        }
        // Invalidations up to the lock: the catalog as a DROP that held it left it. Looked up
        // again only if some came in (a committed DROP sends them).
        pg_sys::AcceptInvalidationMessages();
        if pg_sys::SharedInvalidMessageCounter != before
            && pg_sys::get_extension_oid(c"pg_webhooks".as_ptr(), true) != ext
        {
            pg_sys::LockRelease(&tag, mode, false);
            continue;
        }
        if ready != 0 && ready != ext.to_u32() {
            restart("the extension was dropped and created again");
        }
        LOCKED_EXTENSION.with(|l| l.set(ext.to_u32()));
        return;
    }
}

/// Leave for the postmaster to start this worker again (after its restart interval): it then
/// waits for the extension as at start.
fn restart(why: &str) -> ! {
    log!("pg_webhooks: {why}; the delivery worker restarts");
    unsafe { pg_sys::proc_exit(1) }
}

/// Whether the database exists. The launcher is connected to no database, so it cannot use
/// the syscache; like PostgreSQL's autovacuum launcher it scans the shared pg_database.
fn database_exists(name: &str) -> bool {
    BackgroundWorker::transaction(|| unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = false;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let form = (header as *const u8).add((*header).t_hoff as usize)
                as *const pg_sys::FormData_pg_database;
            if std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()).to_bytes() == name.as_bytes()
            {
                found = true;
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, lock);
        found
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_webhooks_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let databases = match gucs::databases() {
        Ok(names) => names,
        Err(why) => {
            // Serve nothing rather than a database nobody named; say so until restarted.
            loop {
                warning!("pg_webhooks: webhooks.database is not a list of databases, so none is served: {why}");
                if !BackgroundWorker::wait_latch(Some(Duration::from_secs(60))) {
                    break;
                }
            }
            unsafe { pg_sys::proc_exit(1) };
        }
    };
    let workers = gucs::workers();
    // One slot per database and worker index; each database independently waited for.
    let mut slots: Vec<Vec<Slot>> = databases
        .iter()
        .map(|_| (0..workers).map(|_| Slot::default()).collect())
        .collect();
    let mut said_waiting = vec![false; databases.len()];
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        for (d, database) in databases.iter().enumerate() {
            let mut exists = None;
            for (i, slot) in slots[d].iter_mut().enumerate() {
                let running = slot.worker.as_ref().map(|w| w.pid().is_ok()).unwrap_or(false);
                if running {
                    continue;
                }
                if slot.worker.take().is_some() {
                    // A worker that keeps failing right after its start is restarted ever more
                    // slowly (up to a minute apart), so a persistent error does not flood the log.
                    slot.failures = if slot.started.elapsed() < Duration::from_secs(30) {
                        slot.failures + 1
                    } else {
                        0
                    };
                    slot.not_before = Instant::now()
                        + Duration::from_secs(1u64 << slot.failures.saturating_sub(1).min(6));
                }
                if Instant::now() < slot.not_before {
                    continue;
                }
                if !*exists.get_or_insert_with(|| database_exists(database)) {
                    if !said_waiting[d] {
                        log!(
                            "pg_webhooks: waiting for database \"{database}\" (webhooks.database) to exist"
                        );
                        said_waiting[d] = true;
                    }
                    (i..workers).for_each(|i| shmem::set_launcher_state(d, i, State::WaitingForDatabase));
                    break;
                }
                said_waiting[d] = false;
                shmem::set_launcher_state(d, i, State::NotRunning);
                slot.worker = BackgroundWorkerBuilder::new(&format!("pg_webhooks worker {i} ({database})"))
                    .set_type("pg_webhooks worker")
                    .set_library("pg_webhooks")
                    .set_function("pg_webhooks_worker_main")
                    .set_argument(Some(pg_sys::Datum::from(d * MAX_WORKERS + i)))
                    .enable_shmem_access(None)
                    .enable_spi_access()
                    .set_start_time(BgWorkerStartTime::RecoveryFinished)
                    .set_restart_time(None)
                    .set_notify_pid(unsafe { pg_sys::MyProcPid })
                    .load_dynamic()
                    .ok();
                match &slot.worker {
                    Some(w) => {
                        let _ = w.wait_for_startup();
                        slot.started = Instant::now();
                    }
                    None => {
                        // No free background worker slot (max_worker_processes): say so once
                        // a minute at most, and try again.
                        if slot.warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            warning!(
                                "pg_webhooks: could not start delivery worker {i} for database \"{database}\"; raise max_worker_processes (needs 1 + databases x webhooks.workers, plus what else runs)"
                            );
                            slot.warned_at = Some(Instant::now());
                        }
                        slot.not_before = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
        }
    }
    // Terminated (not by a shutdown, which restarts nothing anyway): exit with 1, so that the
    // postmaster starts the launcher again; with 0 it would be gone for good.
    unsafe { pg_sys::proc_exit(1) };
}

/// One delivery worker the launcher keeps running, and its restart back-off.
struct Slot {
    worker: Option<DynamicBackgroundWorker>,
    failures: u32,
    started: Instant,
    not_before: Instant,
    warned_at: Option<Instant>,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            worker: None,
            failures: 0,
            started: Instant::now(),
            not_before: Instant::now(),
            warned_at: None,
        }
    }
}

/// What the delivery worker's main thread carries from one turn to the next.
struct LoopState {
    /// This worker's slot in shared memory (its state and counters), and when worker 0 counts
    /// the queue next.
    me: shmem::Me,
    queue_depth_at: Instant,
    /// Which worker this is, of how many. Worker 0 also fans out and applies retention.
    index: usize,
    workers: usize,
    in_flight: InFlight,
    retention: Retention,
    /// When the next claim is due even if nothing wakes the worker (retry timer, safety poll).
    next_claim_at: Instant,
    /// Fan-out: when it runs even if no commit wakes the worker (safety poll), the earliest it
    /// runs again after a round (the batch window), whether the last round left work, and the
    /// transactions of the batch in progress.
    next_fan_out_at: Instant,
    fan_out_not_before: Instant,
    fan_out_more: bool,
    batch: Option<queue::Batch>,
    /// Whether a subscription existed at the last fan-out, and when the stream is next moved
    /// on while none does.
    subscribed: bool,
    advance_at: Instant,
    /// When fan-out tries again for the heads lock, which records held when it tried.
    fan_out_retry_at: Option<Instant>,
}

/// In-flight bookkeeping of the delivery worker's main thread: per delivery what is needed to
/// judge its outcome, and per subscription its jobs in flight (a job holds one HTTP thread and
/// sends one request at a time: it counts once against the per-endpoint cap).
struct InFlight {
    by_delivery: HashMap<i64, Pending>,
    by_subscription: HashMap<i64, i32>,
    jobs: usize,
    /// Subscriptions whose last job failed.
    failing: std::collections::HashSet<i64>,
    /// Chains of one key that grow while they are sent, by tail id; and the next id.
    growing: HashMap<u64, Growing>,
    next_tail: u64,
}

/// A chain in flight that may be given the next deliveries of its key (see http::Tail).
struct Growing {
    tail: std::sync::Arc<http::Tail>,
    subscription_id: i64,
    ordering_key: String,
    /// The chain's id (its first head's delivery) and the seq of the last delivery it holds.
    head: i64,
    last_seq: i64,
    /// Deliveries that may still be appended to it, and until when: a hot key gives others of
    /// its subscription a turn now and then (with a cap of one, they wait for it to end).
    budget: usize,
    grow_until: Instant,
    /// It reported successes while it went on (its end alone does not say how it went).
    reported: bool,
}

/// A claimed delivery being attempted: what judging and recording its outcome needs.
struct Pending {
    attempts_before: i32,
    retry_schedule: Option<String>,
    event_type: String,
}

impl InFlight {
    fn total(&self) -> usize {
        self.jobs
    }
    /// Deliveries handed to an HTTP thread (a job's, or a growing chain's next ones).
    fn add_deliveries(&mut self, jobs: &[queue::Claimed]) {
        for claimed in jobs {
            self.by_delivery.insert(
                claimed.job.delivery_id,
                Pending {
                    attempts_before: claimed.attempts_before,
                    retry_schedule: claimed.retry_schedule.clone(),
                    event_type: claimed.job.event_type.clone(),
                },
            );
        }
    }
    fn add(&mut self, job: &[queue::Claimed]) {
        let Some(first) = job.first() else { return };
        self.add_deliveries(job);
        *self
            .by_subscription
            .entry(first.job.subscription_id)
            .or_default() += 1;
        self.jobs += 1;
    }
    /// A growing chain reported outcomes (all succeeded) and goes on: its endpoint answers.
    fn reported(&mut self, done: &http::JobOutcome) {
        self.failing.remove(&done.subscription_id);
        if let Some(g) = done.tail.and_then(|t| self.growing.get_mut(&t)) {
            g.reported = true;
        }
    }
    /// A job came back: its deliveries leave, its slot is free.
    fn finish(&mut self, done: &http::JobOutcome) {
        let reported = done.tail.and_then(|t| self.growing.remove(&t)).is_some_and(|g| g.reported);
        if let Some(n) = self.by_subscription.get_mut(&done.subscription_id) {
            *n -= 1;
            if *n <= 0 {
                self.by_subscription.remove(&done.subscription_id);
            }
        }
        self.jobs = self.jobs.saturating_sub(1);
        for id in &done.skipped {
            self.by_delivery.remove(id);
        }
        // A job none of whose requests succeeded marks its endpoint failing: until one of its
        // requests succeeds, this worker gives it one request in flight and one delivery at a
        // time, not a batch that would mostly be handed back (a failing endpoint costs a
        // claim per attempt, no more) nor threads that would wait for its timeouts. One that
        // answers some requests (an endpoint refusing a few event types, a rare error) is not
        // failing. (A chain stops at its first failure, so a failed first request is a job
        // without a success; what a growing chain was handed as it ended comes back skipped.)
        let failed = !reported
            && !done.outcomes.iter().any(|o| o.succeeded())
            && done.outcomes.iter().any(|o| o.oversized.is_none());
        if failed {
            self.failing.insert(done.subscription_id);
        } else {
            self.failing.remove(&done.subscription_id);
        }
    }
    fn take(&mut self, delivery_id: i64) -> Option<Pending> {
        self.by_delivery.remove(&delivery_id)
    }
}

/// This library's version: the extension's objects must be of it before the worker delivers.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version of the extension created in this database, if it is.
fn extension_version() -> Option<String> {
    transaction(|| {
        Spi::get_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_webhooks'",
        )
        .ok()
        .flatten()
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Decide what happens to a delivery after an attempt.
fn judge(outcome: &http::Outcome, attempt: i32, retry_schedule: Option<&str>) -> queue::Verdict {
    let status = outcome.status.unwrap_or(0);
    let gone = status == 410;
    if outcome.oversized.is_some() {
        // Never sent, and it cannot get smaller: no retry.
        return queue::Verdict {
            outcome: "dead",
            next_at: None,
            gone: false,
        };
    }
    if (200..300).contains(&status) {
        return queue::Verdict {
            outcome: "succeeded",
            next_at: None,
            gone: false,
        };
    }
    let waits = retry_schedule
        .and_then(|s| schedule::parse_retry_schedule(s).ok())
        .or_else(|| schedule::parse_retry_schedule(&gucs::retry_schedule()).ok())
        .unwrap_or_default();
    let Some(wait) = waits.get((attempt - 1).max(0) as usize) else {
        return queue::Verdict {
            outcome: "dead",
            next_at: None,
            gone,
        };
    };
    let mut wait = schedule::jittered(*wait, schedule::unit_random());
    if matches!(status, 429 | 503) {
        if let Some(asked) = outcome
            .retry_after
            .as_deref()
            .and_then(|v| schedule::parse_retry_after(v, SystemTime::now()))
        {
            wait = asked.min(gucs::max_retry_after());
        }
    }
    queue::Verdict {
        outcome: "retry",
        next_at: Some(unix_now() + wait.as_secs_f64()),
        gone,
    }
}

fn to_record(o: http::Outcome, pending: Pending) -> queue::Recorded {
    let attempt = pending.attempts_before + 1;
    let verdict = judge(&o, attempt, pending.retry_schedule.as_deref());
    queue::Recorded {
        delivery_id: o.delivery_id,
        subscription_id: o.subscription_id,
        attempt,
        started: o
            .started_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        duration_ms: o.duration_ms,
        status_code: o.status.map(i32::from),
        body: o.response_body,
        error: o.error,
        verdict,
        event_type: pending.event_type,
    }
}

/// Wait for the latch, an HTTP outcome, postmaster death or the timeout. Returns false on SIGTERM.
fn wait(pool: &http::Pool, timeout: Duration) -> bool {
    let flags = pg_sys::WL_LATCH_SET
        | pg_sys::WL_SOCKET_READABLE
        | pg_sys::WL_TIMEOUT
        | pg_sys::WL_EXIT_ON_PM_DEATH;
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            flags as i32,
            pool.wake_fd(),
            timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    !BackgroundWorker::sigterm_received()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_webhooks_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let (d, index) = slot_of(arg.value());
    let workers = gucs::workers();
    let Some(database) = gucs::databases().ok().and_then(|names| names.get(d).cloned()) else { return };
    if index >= workers.min(MAX_WORKERS) {
        return;
    }
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // One delivery worker per database and index: two with one index would release each
    // other's claims (and two worker 0s fan out the same keys concurrently). A session lock,
    // gone with the process however it ends. A user lock, not an advisory one: no SQL can
    // take it, so no role can hold the key to keep the worker from starting, nor wait for it
    // while it holds a lock the worker waits for (a deadlock the worker could lose).
    let alone = transaction(|| crate::locks::try_for_session(crate::locks::CLASS, 1 + index as u32, 0));
    if !alone {
        log!("pg_webhooks: another delivery worker {index} is running for database \"{database}\"; this one exits");
        return;
    }
    let name = if index == 0 {
        APPLICATION_NAME.to_owned()
    } else {
        // The index is a number: no NUL can be in it.
        std::ffi::CString::new(format!("pg_webhooks worker {index}")).unwrap_or_default()
    };
    unsafe {
        pg_sys::pgstat_report_appname(name.as_ptr());
        // Every statement of the worker is built to touch a batch's rows through indexes.
        // The planner, seeing a batch of hundreds of rows and a small table, would rather
        // hash the whole table; as the queue and the history grow that turns each round into
        // a scan of them. Nested loops over index probes cost the same at any size.
        // Its statements are kept plans run thousands of times a second under load and once
        // per commit when idle; with custom plans each run was planned again (most of an idle
        // wake's time, from commit to request: 2.8 ms p50 against 2.0 with generic plans,
        // measured with one event every 20 ms), and the plans above do not depend on the
        // values.
        for (name, value) in [
            (c"application_name", name.as_c_str()),
            (c"enable_hashjoin", c"off"),
            (c"enable_mergejoin", c"off"),
            (c"enable_bitmapscan", c"off"),
            (c"plan_cache_mode", c"force_generic_plan"),
            (c"jit", c"off"),
            // The wait for the extension's lock must not fail on a lock_timeout set for the
            // database or role: it waits, and SIGTERM ends it.
            (c"lock_timeout", c"0"),
        ] {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
            );
        }
    }
    // webhooks.concurrency is shared out over the workers.
    let threads = share(gucs::concurrency(), workers, index).max(1);
    let pool = match http::Pool::start(threads, gucs::allow_private_network()) {
        Ok(pool) => pool,
        Err(e) => {
            warning!("pg_webhooks: could not start HTTP threads: {e}");
            return;
        }
    };
    unsafe {
        pg_sys::before_shmem_exit(Some(withdraw_latch_at_exit), arg);
    }
    let me = shmem::Me::enter(d, index);
    if index == 0 {
        // A previous fan-out worker may have left it set.
        me.set_fan_out_waiting(false);
    }
    log!("pg_webhooks: delivery worker started for database \"{database}\"");

    let mut said_version = false;
    let mut state = LoopState {
        me,
        queue_depth_at: Instant::now(),
        index,
        workers,
        in_flight: InFlight {
            by_delivery: HashMap::new(),
            by_subscription: HashMap::new(),
            jobs: 0,
            failing: std::collections::HashSet::new(),
            growing: HashMap::new(),
            next_tail: 0,
        },
        retention: Retention {
            next_at: Instant::now(),
            delivery_cursor: 0,
            event_cursor: 0,
            rewind_at: Instant::now() + RETENTION_REWIND,
        },
        next_claim_at: Instant::now(),
        next_fan_out_at: Instant::now(),
        fan_out_not_before: Instant::now(),
        fan_out_more: true,
        batch: None,
        subscribed: true,
        advance_at: Instant::now(),
        fan_out_retry_at: None,
    };
    let mut sleep = Duration::ZERO;
    while wait(&pool, sleep) {
        pgrx::check_for_interrupts!();
        me.woke();
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            pool.set_allow_private(gucs::allow_private_network());
        }
        let ready = || READY_EXTENSION.with(|r| r.get()) != 0;
        if !ready() {
            match extension_version() {
                // The OID that transaction locked (its query's snapshot may be older).
                Some(v) if v == LIBRARY_VERSION => READY_EXTENSION.with(|r| r.set(LOCKED_EXTENSION.with(|l| l.get()))),
                Some(v) => {
                    // The library was upgraded and the extension's objects are not yet: the
                    // new library may need what the update adds. Capture goes on meanwhile
                    // (its tables are the same); what it writes is delivered after the update.
                    if !said_version {
                        warning!(
                            "pg_webhooks: the extension in database \"{database}\" is version {v} and the library is {LIBRARY_VERSION}: run ALTER EXTENSION pg_webhooks UPDATE there; deliveries wait until then"
                        );
                        said_version = true;
                    }
                    me.set_state(State::WaitingForUpdate);
                }
                None => me.set_state(State::WaitingForExtension),
            }
            if !ready() {
                // Nothing wakes a worker when the extension is created or updated: look again
                // soon (one catalog probe a second costs nothing).
                sleep = gucs::poll_interval().min(Duration::from_secs(1));
                continue;
            }
            transaction(|| queue::release_claims(index, workers)).unwrap_or_else(|e| {
                error!("pg_webhooks: could not release claimed deliveries: {e}")
            });
        }
        sleep = run_once(&pool, &mut state);
        let in_flight = state.in_flight.total();
        me.set_requests_in_flight(in_flight);
        me.set_state(if in_flight > 0 || sleep.is_zero() { State::Delivering } else { State::Idle });
        if index == 0 && Instant::now() >= state.queue_depth_at {
            state.queue_depth_at = count_queue(me);
        }
        // Our inserts and deletes reach the statistics autovacuum works from; before a long
        // sleep, whatever is still pending is flushed now rather than at the next wake.
        unsafe { pg_sys::pgstat_report_stat(sleep >= Duration::from_secs(1)) };
    }
    shmem::Me::leave(d, index);
    log!(
        "pg_webhooks: delivery worker stopping ({} requests in flight will be retried)",
        state.in_flight.total()
    );
}

/// Count the queued deliveries for `worker_status()`; returns when to count again: at most
/// once a second, and never more than 1% of the worker's time (a count of a million-row queue
/// takes tens of milliseconds).
fn count_queue(me: shmem::Me) -> Instant {
    let started = Instant::now();
    let depth = transaction(|| {
        Spi::get_one::<i64>("SELECT count(*) FROM webhooks._queue")
    });
    match depth {
        Ok(Some(n)) => me.set_queue_depth(n),
        Ok(None) => {}
        Err(e) => warning!("pg_webhooks: counting the queue failed: {e}"),
    }
    let took = started.elapsed();
    Instant::now() + (took * 100).max(Duration::from_secs(1))
}

/// One turn of the loop; returns how long to sleep before the next one.
fn run_once(pool: &http::Pool, state: &mut LoopState) -> Duration {
    let outcomes = pool.ready();
    let recorded = !outcomes.is_empty();
    if recorded {
        let in_flight = &mut state.in_flight;
        let mut batch: Vec<queue::Recorded> = Vec::new();
        let mut released: Vec<i64> = Vec::new();
        let mut counts = shmem::Counts::default();
        // Growing chains that go on: the delivery each sends next (claimed as its key's head
        // in the record's transaction), and those that asked for more.
        let mut continuing: HashMap<u64, i64> = HashMap::new();
        let mut wants_more: Vec<u64> = Vec::new();
        for done in outcomes {
            match (done.tail, done.continues_with) {
                (Some(t), Some(next)) => {
                    in_flight.reported(&done);
                    continuing.insert(t, next);
                    if done.wants_more {
                        wants_more.push(t);
                    }
                }
                _ => {
                    // Ended: whatever it reported before needs no claim any more.
                    if let Some(t) = done.tail {
                        continuing.remove(&t);
                    }
                    in_flight.finish(&done);
                }
            }
            released.extend_from_slice(&done.skipped);
            for o in done.outcomes {
                counts.attempts += 1;
                counts.bytes_sent += o.bytes_sent;
                if let Some(pending) = in_flight.take(o.delivery_id) {
                    if let Some((size, cap)) = o.oversized {
                        warning!(
                            "pg_webhooks: delivery {} not sent and dead: its payload of {size} bytes exceeds webhooks.max_payload_bytes ({cap})",
                            o.delivery_id
                        );
                    }
                    let r = to_record(o, pending);
                    match r.verdict.outcome {
                        "succeeded" => counts.succeeded += 1,
                        "dead" => {
                            counts.failed += 1;
                            counts.dead += 1;
                        }
                        _ => counts.failed += 1,
                    }
                    batch.push(r);
                }
            }
        }
        state.me.add(counts);
        let disable_after = gucs::disable_after();
        let worker = state.index as i16;
        let continuing: Vec<i64> = continuing.into_values().collect();
        // The next deliveries of the chains that asked, read in the same transaction.
        let asks: Vec<(u64, i64, String, i64, i64, usize)> = wants_more
            .iter()
            .filter_map(|t| in_flight.growing.get(t).map(|g| (*t, g)))
            .filter(|(_, g)| g.budget > 0 && Instant::now() < g.grow_until)
            .map(|(t, g)| {
                let n = g.budget.min(CHAIN_MAX as usize - http::LOW_WATER);
                (t, g.subscription_id, g.ordering_key.clone(), g.last_seq, g.head, n)
            })
            .collect();
        if state.index > 0 {
            state.me.yield_to_fan_out(RECORD_YIELD);
        }
        let more = transaction(move || {
            queue::record(batch, released, &disable_after, worker, continuing)?;
            let mut more = Vec::new();
            for (t, sub, key, after, head, n) in asks {
                let next = queue::continuation(
                    sub,
                    &key,
                    after,
                    n as i64,
                    head,
                    gucs::timeout(),
                    gucs::max_response_bytes(),
                )?;
                more.push((t, next));
            }
            Ok::<_, pgrx::spi::Error>(more)
        })
        .unwrap_or_else(|e| error!("pg_webhooks: recording delivery outcomes failed: {e}"));
        for (t, next) in more {
            let n = grow(in_flight, t, next);
            state.me.add(shmem::Counts { claimed: n as u64, ..Default::default() });
        }
    }

    let batch = gucs::batch_size();
    let mut created = 0;
    let now = Instant::now();
    // Fan out when a commit asked for it (at most once per batch window: commits that come
    // meanwhile are taken together), while the last round left work, or on the safety poll.
    let asked = state.me.events_pending();
    let fans_out = state.index == 0;
    let due = fans_out
        && (state.fan_out_more
            || now >= state.next_fan_out_at
            || (asked && now >= state.fan_out_not_before)
            || state.fan_out_retry_at.is_some_and(|t| now >= t));
    let mut window = None;
    if due {
        // Cleared before the snapshot is taken: a commit after this wakes the worker again.
        state.me.clear_events_pending();
        state.fan_out_more = false;
        // A bounded number of steps per turn, so outcomes are recorded and claims made while
        // a large backlog is fanned out; the next turn comes at once while there is more.
        // (The claim comes after, in a transaction of its own: claimed in the fan-out's
        // transaction, one idle wake was no faster, measured, and the fan-out's check of which
        // keys are queued would stand longer before its commit, see queue_heads.)
        for _ in 0..FAN_OUT_BATCHES_PER_TURN {
            pgrx::check_for_interrupts!();
            let cache = std::panic::AssertUnwindSafe(&mut state.batch);
            let advance = now >= state.advance_at;
            let step = transaction(move || {
                let cache = cache;
                queue::fan_out(batch, cache.0, advance)
            })
                .unwrap_or_else(|e| error!("pg_webhooks: fan-out failed: {e}"));
            // Records of the other workers held the heads lock: tried again shortly, never
            // waited for (see queue::fan_out); meanwhile new records hold back a moment.
            state.me.set_fan_out_waiting(step.busy);
            if step.busy {
                state.fan_out_retry_at = Some(Instant::now() + FAN_OUT_RETRY);
                break;
            }
            state.fan_out_retry_at = None;
            created += step.deliveries;
            state.fan_out_more = step.more;
            state.subscribed = step.subscribed;
            if advance && !step.subscribed {
                state.advance_at = now + UNSUBSCRIBED_ADVANCE;
            }
            if !step.more {
                break;
            }
        }
        let now = Instant::now();
        state.next_fan_out_at = now + gucs::poll_interval();
        // With nothing subscribed, a longer window: there is nothing to deliver soon.
        state.fan_out_not_before = now
            + if state.subscribed { FAN_OUT_WINDOW } else { UNSUBSCRIBED_WINDOW };
    } else if asked && fans_out {
        window = Some(state.fan_out_not_before.saturating_duration_since(now));
    }
    let more_pending = fans_out && state.fan_out_more;

    let retention_busy = fans_out && state.retention.run();

    // Claim only when something could have become claimable: new deliveries, a finished
    // attempt (a freed slot, a released key), deliveries queued directly, or a timer.
    // Worker 0 takes the database's "queue changed"; the others, worker 0's "claim too" (it
    // queued deliveries, or a queue change reached it): without it they would claim only on
    // their own outcomes and timer, up to webhooks.poll_interval late.
    let queue_changed = if fans_out { state.me.take_queue_changed() } else { state.me.take_claim_asked() };
    // New deliveries or a queue change: the other workers claim too, at once, beside worker 0;
    // except when worker 0 has nothing in flight and fanned out fewer deliveries than it has
    // slots for any endpoint and HTTP threads: it claims them all itself, each sent at once
    // by a thread of its own (and wakes the others after all, should its claim say otherwise).
    // An idle commit's delivery is then sent by worker 0 alone: woken for nothing, the others'
    // claims took the CPU worker 0's HTTP thread was waiting for (on two cores, a good part of
    // an idle delivery's latency).
    let solo = fans_out
        && !queue_changed
        && sends_alone(
            created,
            state.in_flight.total(),
            state.in_flight.failing.is_empty(),
            share(gucs::max_in_flight_per_endpoint() as usize, state.workers, 0).min(pool.threads()),
        );
    if fans_out && (queue_changed || created > 0) && !solo {
        state.me.wake_others(state.workers);
    }
    let sleep = if created > 0 || recorded || queue_changed || Instant::now() >= state.next_claim_at
    {
        let claim = claim_and_dispatch(pool, &mut state.in_flight, batch, state.index, state.workers, state.me, solo);
        if solo && claim.saturated {
            state.me.wake_others(state.workers);
        }
        state.next_claim_at = Instant::now() + claim.sleep;
        claim.sleep
    } else {
        state
            .next_claim_at
            .saturating_duration_since(Instant::now())
    };
    let sleep = sleep
        .min(window.unwrap_or(Duration::MAX))
        .min(if fans_out {
            state.next_fan_out_at.saturating_duration_since(Instant::now())
        } else {
            Duration::MAX
        })
        .min(
            state
                .fan_out_retry_at
                .map_or(Duration::MAX, |t| t.saturating_duration_since(Instant::now())),
        );
    if more_pending {
        Duration::ZERO
    } else if retention_busy {
        sleep.min(Duration::from_millis(10))
    } else if fans_out {
        sleep.min(
            state
                .retention
                .next_at
                .saturating_duration_since(Instant::now()),
        )
    } else {
        // Retention is worker 0's: its timer (never moved on by the others) is none of theirs.
        sleep
    }
}

/// Deliveries of one ordering key claimed together and sent in order by one HTTP thread, at
/// most (fewer when many heads are claimed at once: CLAIM_ROWS bounds them all).
const CHAIN_MAX: i32 = 2_000;
/// Heads claimed per free slot (one request in flight) of a subscription, at most: sent one
/// after the other by one HTTP thread, so that a backlog is claimed and handed over in batches.
const PER_SLOT: i32 = 16;
/// Rows claimed at once (heads and their chains), at most: bounds the worker's memory.
const CLAIM_ROWS: i32 = 2_000;
/// A chain of one key this long or longer grows while it is sent (see `grow`), by at most
/// GROW_MAX deliveries, CHAIN_MAX - LOW_WATER at a time: a growing chain holds CHAIN_MAX
/// deliveries at most.
const GROW_FROM: usize = 500;
const GROW_MAX: usize = 20_000;
/// A chain asks for more only this long after it was claimed (a slow endpoint's hot key would
/// hold its slot for GROW_MAX requests otherwise).
const GROW_FOR: Duration = Duration::from_secs(2);
/// A fan-out step that found the heads lock taken (see queue::fan_out) is tried again this much
/// later; meanwhile the other workers' records wait up to RECORD_YIELD before they take it.
const FAN_OUT_RETRY: Duration = Duration::from_millis(1);
const RECORD_YIELD: Duration = Duration::from_millis(5);
/// Fan-out steps per turn of the loop, at most.
const FAN_OUT_BATCHES_PER_TURN: usize = 16;
/// After a fan-out round, the next waits this long for more commits, so that under load one
/// round (and one wake) serves many commits. An idle worker fans out at once.
const FAN_OUT_WINDOW: Duration = Duration::from_millis(2);
/// With nothing subscribed: the batch window, and how often the stream is moved on.
const UNSUBSCRIBED_WINDOW: Duration = Duration::from_millis(100);
const UNSUBSCRIBED_ADVANCE: Duration = Duration::from_secs(1);
/// How often retention looks for history to delete, once it has caught up.
const RETENTION_EVERY: Duration = Duration::from_secs(10);
/// How long one turn may spend deleting history before delivering again.
const RETENTION_BUDGET: Duration = Duration::from_millis(250);
/// Rows looked at per retention statement.
const RETENTION_BATCH: i64 = 10_000;
/// Retention steps over held deliveries; this often it starts again from the oldest row, to
/// delete those that have finished since.
const RETENTION_REWIND: Duration = Duration::from_secs(600);

/// One retention statement: deliveries or events, from a cursor.
type RetentionStep = fn(&str, i64, i64) -> pgrx::spi::SpiResult<queue::RetentionStep>;

/// Deletes finished history older than `webhooks.retention` in steps of bounded size and
/// time, as fast as history is made: while it is behind it runs every turn, for a bounded
/// time, between deliveries. Held deliveries (and their events) are stepped over, never waited
/// for.
struct Retention {
    next_at: Instant,
    delivery_cursor: i64,
    event_cursor: i64,
    rewind_at: Instant,
}

impl Retention {
    /// One turn's share of retention; returns whether it is still behind.
    fn run(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_at {
            return false;
        }
        if now >= self.rewind_at {
            self.delivery_cursor = 0;
            self.event_cursor = 0;
            self.rewind_at = now + RETENTION_REWIND;
        }
        transaction(queue::end_orphans)
            .unwrap_or_else(|e| error!("pg_webhooks: ending orphaned deliveries failed: {e}"));
        let retention = gucs::retention();
        // The rollups are small (rows per subscription and minute or hour): one statement.
        let r = retention.clone();
        transaction(move || queue::retain_stats(&r))
            .unwrap_or_else(|e| error!("pg_webhooks: trimming the rollups failed: {e}"));
        let deadline = now + RETENTION_BUDGET;
        // Deliveries (with their attempts) first, then the events they no longer refer to.
        let steps: [(RetentionStep, &mut i64); 2] = [
            (queue::retain_deliveries, &mut self.delivery_cursor),
            (queue::retain_events, &mut self.event_cursor),
        ];
        let mut caught_up = 0;
        let mut deleted = 0;
        for (step_fn, cursor) in steps {
            while Instant::now() < deadline {
                pgrx::check_for_interrupts!();
                let (r, after) = (retention.clone(), *cursor);
                let step =
                    transaction(move || step_fn(&r, after, RETENTION_BATCH))
                        .unwrap_or_else(|e| error!("pg_webhooks: retention failed: {e}"));
                *cursor = step.cursor;
                deleted += step.deleted;
                if step.caught_up {
                    caught_up += 1;
                    break;
                }
            }
        }
        let behind = caught_up < 2;
        if deleted > 0 {
            debug1!("pg_webhooks: retention deleted {deleted} rows (behind: {behind})");
        }
        if behind {
            self.next_at = Instant::now();
        } else {
            // Caught up: the next round starts again where history is not old enough yet.
            self.next_at = Instant::now() + RETENTION_EVERY;
        }
        behind
    }
}

/// Append a growing chain's next deliveries (read after its last one) to its tail; returns how
/// many it took. An empty answer lets the chain ask again later (more of its key may be fanned
/// out meanwhile). A chain that ended meanwhile takes nothing: they stay queued as they were,
/// behind its key's head.
fn grow(in_flight: &mut InFlight, tail: u64, next: Vec<queue::Claimed>) -> usize {
    let Some(g) = in_flight.growing.get_mut(&tail) else { return 0 };
    let t = g.tail.clone();
    let Some(last_seq) = next.last().map(|c| c.event_seq) else {
        let _ = t.extend(Vec::new());
        return 0;
    };
    let n = next.len();
    in_flight.add_deliveries(&next);
    let ids: Vec<i64> = next.iter().map(|c| c.job.delivery_id).collect();
    match t.extend(next.into_iter().map(|c| c.job).collect()) {
        Ok(()) => {
            if let Some(g) = in_flight.growing.get_mut(&tail) {
                g.last_seq = last_seq;
                g.budget = g.budget.saturating_sub(n);
            }
            n
        }
        Err(_) => {
            for id in ids {
                in_flight.by_delivery.remove(&id);
            }
            0
        }
    }
}

/// Whether worker 0 sends the `created` deliveries it just fanned out alone, without waking the
/// other workers first: only when it has nothing in flight (every endpoint's share and every
/// HTTP thread free), no endpoint is failing (one request each), and they are fewer than
/// `slots` (its share of one endpoint's cap, at most its HTTP threads), so that each is a job
/// of its own, sent at once.
fn sends_alone(created: i64, in_flight: usize, none_failing: bool, slots: usize) -> bool {
    created > 0 && in_flight == 0 && none_failing && (created as usize) < slots
}

/// Worker `index`'s share of `total` among `workers`: shares differ by one at most and add up
/// to `total`.
fn share(total: usize, workers: usize, index: usize) -> usize {
    let workers = workers.max(1);
    total / workers + usize::from(index < total % workers)
}

/// What one claim asks for, fixed before its transaction: how many heads, each endpoint's
/// share of the cap, and what this worker already has in flight.
struct ClaimArgs {
    limit: i32,
    /// Heads per free slot of a subscription.
    per_slot: i32,
    per_endpoint: i32,
    index: usize,
    counts: Vec<(i64, i32)>,
    failing: Vec<i64>,
}

/// What a claim's transaction returns: the chains claimed, and when the next retry is due.
type ClaimResult = (Vec<Vec<queue::Claimed>>, Option<f64>);

/// The claim's arguments, or (when no HTTP thread or no share of the cap is free) how long to
/// sleep instead.
fn claim_args(
    pool: &http::Pool,
    in_flight: &mut InFlight,
    batch: i32,
    index: usize,
    workers: usize,
    solo: bool,
) -> Result<ClaimArgs, Duration> {
    let poll = gucs::poll_interval();
    let capacity = pool.threads().saturating_sub(in_flight.total());
    if capacity == 0 {
        // Every thread is busy: the next outcome wakes us.
        return Err(poll);
    }
    // Alone (worker 0, the others not woken): no more than its free threads send at once, a
    // head each, so that whatever else is due (a retry, a key its record released) is left to
    // the others, woken after all (the claim is then full: Claim::saturated), instead of
    // waiting in this worker's jobs behind other requests.
    let per_slot = if solo { 1 } else { PER_SLOT };
    let limit = (capacity * per_slot as usize).min(batch as usize) as i32;
    // Each worker has its share of every endpoint's cap: together never more than the cap.
    let per_endpoint = share(gucs::max_in_flight_per_endpoint() as usize, workers, index) as i32;
    if per_endpoint == 0 {
        return Err(poll);
    }
    let counts: Vec<(i64, i32)> = in_flight
        .by_subscription
        .iter()
        .map(|(s, n)| (*s, *n))
        .collect();
    if in_flight.failing.len() > 4096 {
        // Removed subscriptions are never seen succeeding: forgetting them all costs at most
        // one batch per failing endpoint.
        in_flight.failing.clear();
    }
    let failing: Vec<i64> = in_flight.failing.iter().copied().collect();
    Ok(ClaimArgs { limit, per_slot, per_endpoint, index, counts, failing })
}

/// The claim, in the caller's transaction; the next retry is looked up in it too (both see the
/// same now()).
fn claim_in_transaction(args: &ClaimArgs) -> pgrx::spi::SpiResult<ClaimResult> {
    let claimed = queue::claim(
        args.limit,
        args.per_endpoint,
        args.index as i32,
        &args.counts,
        gucs::timeout(),
        gucs::max_response_bytes(),
        CHAIN_MAX,
        args.per_slot,
        &args.failing,
        CLAIM_ROWS,
    )?;
    // A full claim comes back at once: the timer is not needed then.
    let next_due = if claimed.len() as i32 == args.limit { None } else { queue::seconds_until_next_due()? };
    Ok((claimed, next_due))
}

/// What a claim did.
struct Claim {
    /// How long to sleep.
    sleep: Duration,
    /// Whether more may be left that another worker could claim: the claim took all it could
    /// (its limit), could take nothing (no free HTTP thread), or filled an endpoint's slots.
    saturated: bool,
}

/// Claim what is due and hand it to the HTTP threads.
fn claim_and_dispatch(
    pool: &http::Pool,
    in_flight: &mut InFlight,
    batch: i32,
    index: usize,
    workers: usize,
    me: shmem::Me,
    solo: bool,
) -> Claim {
    let args = match claim_args(pool, in_flight, batch, index, workers, solo) {
        Ok(args) => args,
        Err(sleep) => return Claim { sleep, saturated: true },
    };
    let a = &args;
    let result = transaction(move || claim_in_transaction(a))
        .unwrap_or_else(|e| error!("pg_webhooks: claiming deliveries failed: {e}"));
    let (sleep, saturated) = dispatch(pool, in_flight, me, &args, result);
    Claim { sleep, saturated }
}

/// Hand a committed claim to the HTTP threads; returns how long to sleep, and whether more may
/// be left that another worker could claim (see Claim::saturated).
fn dispatch(
    pool: &http::Pool,
    in_flight: &mut InFlight,
    me: shmem::Me,
    args: &ClaimArgs,
    (claimed, next_due): ClaimResult,
) -> (Duration, bool) {
    let poll = gucs::poll_interval();
    let per_endpoint = args.per_endpoint;
    let more_due = claimed.len() as i32 == args.limit;
    me.add(shmem::Counts { claimed: claimed.iter().map(|s| s.len() as u64).sum(), ..Default::default() });
    // Per subscription, its claimed heads (each with its chain) are shared out over as many
    // jobs as it has free slots, in order; a job is sent by one HTTP thread.
    let mut by_sub: Vec<(i64, Vec<Vec<queue::Claimed>>)> = Vec::new();
    for segment in claimed {
        let Some(sub) = segment.first().map(|c| c.job.subscription_id) else { continue };
        match by_sub.iter_mut().find(|(s, _)| *s == sub) {
            Some((_, segments)) => segments.push(segment),
            None => by_sub.push((sub, vec![segment])),
        }
    }
    // Whether a subscription got as many heads as it had free slots (one if failing).
    let mut filled = false;
    for (sub, segments) in by_sub {
        let busy = in_flight.by_subscription.get(&sub).copied().unwrap_or(0);
        let cap = if in_flight.failing.contains(&sub) { 1 } else { per_endpoint };
        filled |= segments.len() as i32 >= cap - busy;
        let slots = (per_endpoint - busy).max(1) as usize;
        let mut jobs: Vec<Vec<queue::Claimed>> = (0..slots.min(segments.len())).map(|_| Vec::new()).collect();
        let n = jobs.len();
        for (i, segment) in segments.into_iter().enumerate() {
            jobs[i % n].extend(segment);
        }
        for job in jobs {
            in_flight.add(&job);
            // One key's long chain (its key has more queued, likely) grows while it is sent:
            // its next deliveries are read and appended before it runs out, so a hot key's
            // requests follow each other without a record and a claim in between.
            let growing = match (job.first(), job.last()) {
                (Some(first), Some(last))
                    if job.len() >= GROW_FROM
                        && first.ordering_key.is_some()
                        // (One head per key: a job of one key is one chain.)
                        && first.ordering_key == last.ordering_key =>
                {
                    Some(Growing {
                        tail: http::Tail::new(in_flight.next_tail),
                        subscription_id: sub,
                        ordering_key: first.ordering_key.clone().unwrap_or_default(),
                        head: first.job.delivery_id,
                        last_seq: last.event_seq,
                        budget: GROW_MAX,
                        grow_until: Instant::now() + GROW_FOR,
                        reported: false,
                    })
                }
                _ => None,
            };
            let jobs: Vec<http::Job> = job.into_iter().map(|c| c.job).collect();
            match growing {
                Some(g) => {
                    in_flight.next_tail += 1;
                    let tail = g.tail.clone();
                    in_flight.growing.insert(tail.id(), g);
                    pool.submit_growing(jobs, tail);
                }
                None => {
                    pool.submit(jobs);
                }
            }
        }
    }
    let sleep = match next_due {
        _ if more_due => Duration::ZERO,
        // Round up, so the worker never wakes a hair before the retry is due.
        Some(s) => (Duration::from_secs_f64(s.max(0.0)) + Duration::from_millis(1)).min(poll),
        None => poll,
    };
    (sleep, more_due || filled)
}

#[cfg(test)]
mod tests {
    use super::{sends_alone, share, Growing, InFlight, GROW_FOR};
    use std::collections::HashMap;
    use std::time::{Instant, SystemTime};

    fn in_flight() -> InFlight {
        InFlight {
            by_delivery: HashMap::new(),
            by_subscription: HashMap::from([(7, 1)]),
            jobs: 1,
            failing: std::collections::HashSet::new(),
            growing: HashMap::new(),
            next_tail: 0,
        }
    }

    fn outcome(id: i64, status: u16) -> crate::http::Outcome {
        crate::http::Outcome {
            delivery_id: id,
            subscription_id: 7,
            started_at: SystemTime::now(),
            duration_ms: 1.0,
            status: Some(status),
            response_body: None,
            error: None,
            retry_after: None,
            bytes_sent: 10,
            oversized: None,
        }
    }

    fn job(outcomes: Vec<crate::http::Outcome>, tail: Option<u64>, goes_on: bool) -> crate::http::JobOutcome {
        crate::http::JobOutcome {
            subscription_id: 7,
            outcomes,
            skipped: Vec::new(),
            tail,
            continues_with: goes_on.then_some(99),
            wants_more: false,
        }
    }

    fn growing(f: &mut InFlight, tail: u64) {
        f.growing.insert(
            tail,
            Growing {
                tail: crate::http::Tail::new(tail),
                subscription_id: 7,
                ordering_key: "k".into(),
                head: 1,
                last_seq: 1,
                budget: 10,
                grow_until: Instant::now() + GROW_FOR,
                reported: false,
            },
        );
    }

    #[test]
    fn an_endpoint_is_failing_when_none_of_a_jobs_requests_succeeded() {
        let mut f = in_flight();
        f.finish(&job(vec![outcome(1, 500)], None, false));
        assert!(f.failing.contains(&7), "its only request failed");
        f.by_subscription.insert(7, 1);
        f.finish(&job(vec![outcome(2, 200), outcome(3, 200), outcome(4, 400)], None, false));
        assert!(!f.failing.contains(&7), "it answered two of three: not failing");
    }

    #[test]
    fn a_growing_chain_that_reported_successes_and_ends_on_a_failure_is_not_failing() {
        let mut f = in_flight();
        growing(&mut f, 1);
        f.reported(&job(vec![outcome(1, 200)], Some(1), true));
        f.finish(&job(vec![outcome(2, 503)], Some(1), false));
        assert!(!f.failing.contains(&7), "it delivered what it reported");
        assert!(f.growing.is_empty(), "the chain is gone");
        // One that ends on a failure without having reported anything is.
        f.by_subscription.insert(7, 1);
        growing(&mut f, 2);
        f.finish(&job(vec![outcome(3, 503)], Some(2), false));
        assert!(f.failing.contains(&7));
    }

    #[test]
    fn worker_0_sends_alone_only_what_it_can_send_at_once() {
        // One commit's delivery, nothing in flight: alone.
        assert!(sends_alone(1, 0, true, 4));
        assert!(sends_alone(3, 0, true, 4));
        // As many as its slots, or more: some would wait in a job behind others.
        assert!(!sends_alone(4, 0, true, 4));
        assert!(!sends_alone(1, 0, true, 1));
        // Something in flight (a share of some endpoint may be taken), or a failing endpoint.
        assert!(!sends_alone(1, 1, true, 4));
        assert!(!sends_alone(1, 0, false, 4));
        assert!(!sends_alone(0, 0, true, 4));
    }

    #[test]
    fn shares_add_up_to_the_total_and_differ_by_one_at_most() {
        for total in 0..40 {
            for workers in 1..9 {
                let shares: Vec<usize> = (0..workers).map(|i| share(total, workers, i)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {workers}");
                let lo = shares.iter().min().expect("one worker at least");
                let hi = shares.iter().max().expect("one worker at least");
                assert!(hi - lo <= 1, "{shares:?}");
            }
        }
    }
}
