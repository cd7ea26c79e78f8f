//! pg_webhooks: order lifecycle changes become signed, reliably delivered webhooks.
//!
//! capture (triggers, at commit) -> webhooks._events -> worker (fan out, sign, POST, retry)
//! -> webhooks._deliveries / _attempts. DDL lives in `sql/`; this crate holds the logic.

use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

mod api;
mod capture;
mod direct;
mod jsonb;
mod error;
mod locks;
mod gucs;
mod http;
mod netcheck;
mod patterns;
mod plans;
mod poll;
mod queue;
mod request;
mod schedule;
mod shape;
mod shmem;
mod signing;
mod stats;
mod tls;
mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", bootstrap);
extension_sql_file!("../sql/api.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    unsafe {
        if pg_sys::IsBinaryUpgrade {
            return;
        }
        if !pg_sys::process_shared_preload_libraries_in_progress {
            error::raise_with_hint(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_webhooks must be loaded via shared_preload_libraries",
                "Add pg_webhooks to shared_preload_libraries in postgresql.conf and restart the server.",
            );
        }
    }
    gucs::init();
    shmem::init();
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction_event), std::ptr::null_mut());
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
    }
    worker::register();
}

/// Capture at pre-commit, wake the worker at commit, forget everything on abort.
#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => capture::write_events_at_commit(),
        XACT_EVENT_COMMIT => {
            if let Some(why) = capture::take_wake_request() {
                shmem::wake(why == capture::Wake::Queue);
            }
            // Nothing noted in this transaction may reach the next one.
            capture::forget_at_commit();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => capture::reset(),
        _ => {}
    }
}

/// A rolled-back subtransaction may have undone versions capture noted.
#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_event(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_START_SUB => capture::subtransaction_started(),
        SUBXACT_EVENT_COMMIT_SUB => capture::subtransaction_committed(),
        SUBXACT_EVENT_ABORT_SUB => capture::subtransaction_aborted(),
        _ => {}
    }
}

static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;

extern "C-unwind" {
    // PostgreSQL's own, called without pgrx's guard: an ERROR passes through the hooks below
    // as it would without them (the guard would catch and raise it again, losing fields such
    // as the constraint name that applications read).
    #[link_name = "standard_ExecutorRun"]
    fn raw_standard_executor_run(
        query_desc: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    #[link_name = "standard_ExecutorFinish"]
    fn raw_standard_executor_finish(query_desc: *mut pg_sys::QueryDesc);
}

/// Counts the executor's nesting (see `capture::enter_statement`): a child row's trigger fires
/// inside ExecutorRun of the statement that writes it. No pgrx guard, and nothing here to drop:
/// an ERROR jumps over this frame untouched (the level is restored by the (sub)transaction's
/// abort).
unsafe extern "C-unwind" fn executor_run(
    query_desc: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    let level = capture::enter_statement();
    match PREV_EXECUTOR_RUN {
        Some(prev) => prev(query_desc, direction, count, execute_once),
        None => raw_standard_executor_run(query_desc, direction, count, execute_once),
    }
    capture::leave_statement(level);
}

/// A statement's AFTER triggers (its foreign key checks among them) fire in ExecutorFinish:
/// once they have, capture looks again for the parents its child triggers did not find.
unsafe extern "C-unwind" fn executor_finish(query_desc: *mut pg_sys::QueryDesc) {
    let level = capture::enter_statement();
    match PREV_EXECUTOR_FINISH {
        Some(prev) => prev(query_desc),
        None => raw_standard_executor_finish(query_desc),
    }
    if capture::leave_statement(level) {
        statement_finished(level);
    }
}

/// Rust that may raise: behind pgrx's guard.
#[pg_guard]
unsafe extern "C-unwind" fn statement_finished(level: u32) {
    capture::statement_finished(level);
}

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// COMMIT PREPARED runs no commit callback of the transaction it commits (that one was
/// prepared, and forgot its wake request, in another session maybe): it wakes the worker
/// itself, as any commit that wrote events would. A wake too many costs one empty fan-out.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let stmt = (*pstmt).utilityStmt;
    let commit_prepared = !stmt.is_null()
        && (*stmt).type_ == pg_sys::NodeTag::T_TransactionStmt
        && (*(stmt as *mut pg_sys::TransactionStmt)).kind
            == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED;
    // COPY fires its AFTER triggers itself, without ExecutorFinish.
    let level = capture::enter_statement();
    match PREV_PROCESS_UTILITY {
        Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => pg_sys::standard_ProcessUtility(
            pstmt,
            query_string,
            read_only_tree,
            context,
            params,
            query_env,
            dest,
            qc,
        ),
    }
    if capture::leave_statement(level) {
        capture::statement_finished(level);
    }
    if commit_prepared {
        // The prepared transaction is committed and visible now. It may have queued
        // deliveries directly (send_test, replay, resume...): claim too.
        shmem::wake(true);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_webhooks'",
            "webhooks.database = 'pgrx_tests'",
            "webhooks.allow_http = on",
            "webhooks.allow_private_network = on",
        ]
    }
}
