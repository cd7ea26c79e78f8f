//! Statements prepared once per backend and kept: the capture runs at every commit and the
//! worker loops many times a second, so neither should parse and plan the same SQL again.
//! Kept plans follow DDL by themselves (PostgreSQL's plan cache invalidates them).

use crate::error::raise;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static PLANS: RefCell<HashMap<String, pgrx::spi::OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Run `f` with the kept plan of `query` (prepared now if it is new).
pub fn with_plan<R>(
    query: &str,
    arg_types: &[pg_sys::Oid],
    f: impl FnOnce(&pgrx::spi::OwnedPreparedStatement) -> R,
) -> R {
    PLANS.with(|plans| {
        if !plans.borrow().contains_key(query) {
            let types: Vec<pgrx::PgOid> = arg_types.iter().map(|o| pgrx::PgOid::from(*o)).collect();
            let plan = Spi::connect(|client| client.prepare_mut(query, &types).map(|p| p.keep()))
                .unwrap_or_else(|e| {
                    raise(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        &format!("pg_webhooks: {e}"),
                    )
                });
            plans.borrow_mut().insert(query.to_string(), plan);
        }
        let plans = plans.borrow();
        f(plans.get(query).expect("prepared above"))
    })
}

/// Run `query` (a write, its rows not wanted) from its kept plan.
pub fn run_kept(query: &str, types: &[pg_sys::Oid], args: &[pgrx::datum::DatumWithOid]) -> pgrx::spi::SpiResult<()> {
    with_plan(query, types, |plan| Spi::connect_mut(|c| c.update(plan, None, args).map(|_| ())))
}

thread_local! {
    static RAW_PLANS: RefCell<HashMap<String, std::ptr::NonNull<pg_sys::_SPI_plan>>> = RefCell::new(HashMap::new());
}

/// Run `query` (prepared once per backend and kept) with `args` under `snapshot`, and return
/// its rows as text. Unlike an ordinary SPI call, which takes the transaction snapshot under
/// REPEATABLE READ, this reads with exactly the snapshot given (capture reads "as at commit").
pub fn rows_with_snapshot(
    query: &str,
    arg_types: &[pg_sys::Oid],
    args: &[Option<pg_sys::Datum>],
    snapshot: pg_sys::Snapshot,
) -> Vec<Vec<Option<String>>> {
    rows_with_snapshot_as(query, arg_types, args, snapshot, false)
}

/// `rows_with_snapshot` of a read-only query, run with the snapshot exactly as given: a
/// read-write call advances the command counter and gives the snapshot the current command id.
pub fn rows_with_snapshot_read_only(
    query: &str,
    arg_types: &[pg_sys::Oid],
    args: &[Option<pg_sys::Datum>],
    snapshot: pg_sys::Snapshot,
) -> Vec<Vec<Option<String>>> {
    rows_with_snapshot_as(query, arg_types, args, snapshot, true)
}

fn rows_with_snapshot_as(
    query: &str,
    arg_types: &[pg_sys::Oid],
    args: &[Option<pg_sys::Datum>],
    snapshot: pg_sys::Snapshot,
    read_only: bool,
) -> Vec<Vec<Option<String>>> {
    Spi::connect(|_client| unsafe {
        // Kept per query and argument types: one text may be prepared for several row types.
        let cache_key = format!("{query}\u{0}{arg_types:?}");
        let plan = RAW_PLANS.with(|plans| {
            if let Some(p) = plans.borrow().get(&cache_key) {
                return *p;
            }
            let cquery = std::ffi::CString::new(query).expect("no NUL in our SQL");
            let mut types = arg_types.to_vec();
            let plan = pg_sys::SPI_prepare(cquery.as_ptr(), types.len() as i32, types.as_mut_ptr());
            let Some(plan) = std::ptr::NonNull::new(plan) else {
                let code = pg_sys::SPI_result;
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    &format!("pg_webhooks: could not prepare a statement (SPI code {code})"),
                )
            };
            pg_sys::SPI_keepplan(plan.as_ptr());
            plans.borrow_mut().insert(cache_key.clone(), plan);
            plan
        });
        let mut values: Vec<pg_sys::Datum> = args
            .iter()
            .map(|a| a.unwrap_or(pg_sys::Datum::from(0usize)))
            .collect();
        let nulls: Vec<std::ffi::c_char> = args
            .iter()
            .map(|a| if a.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
            .collect();
        let rc = pg_sys::SPI_execute_snapshot(
            plan.as_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            snapshot,
            std::ptr::null_mut(),
            read_only,
            true,
            0,
        );
        if rc < 0 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                &format!("pg_webhooks: a capture query failed (SPI code {rc})"),
            );
        }
        let table = pg_sys::SPI_tuptable;
        let mut rows = Vec::new();
        if table.is_null() {
            return rows;
        }
        let tupdesc = (*table).tupdesc;
        let natts = (*tupdesc).natts;
        for i in 0..pg_sys::SPI_processed as usize {
            let tuple = *(*table).vals.add(i);
            let mut row = Vec::with_capacity(natts as usize);
            for col in 1..=natts {
                let p = pg_sys::SPI_getvalue(tuple, tupdesc, col);
                row.push(if p.is_null() {
                    None
                } else {
                    Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
                });
            }
            rows.push(row);
        }
        rows
    })
}

/// `row_to_json` of a row (a composite datum). Only for rows of built-in types: for those it
/// never looks up a cast, so no user code runs.
/// Runs in a memory context of its own, reset after each row: `row_to_json` leaves its
/// buffer (a kilobyte or more) behind, which over the rows a commit reads at once (thousands of
/// orders and their items) added up to tens of megabytes.
pub fn row_json(row: pg_sys::Datum) -> String {
    thread_local! {
        static SCRATCH: std::cell::Cell<pg_sys::MemoryContext> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    }
    unsafe {
        in_scratch(&SCRATCH, c"pg_webhooks row json", || {
            let json = pg_sys::OidFunctionCall1Coll(
                pg_sys::Oid::from(pg_sys::F_ROW_TO_JSON_RECORD),
                pg_sys::InvalidOid,
                row,
            );
            let text = json.cast_mut_ptr::<pg_sys::varlena>();
            let bytes = std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(text).cast::<u8>(),
                pgrx::varlena::varsize_any_exhdr(text),
            );
            String::from_utf8_lossy(bytes).into_owned()
        })
    }
}

/// `f` run in the memory context kept in `slot` (made under TopMemoryContext at first use,
/// named `name`), which is reset afterwards: what PostgreSQL allocates for one row does not
/// pile up over the many rows of a commit. An ERROR in `f` (which pgrx unwinds as a panic)
/// resets it too: a value too large to capture leaves none of its copies in the backend.
/// `f` must return nothing allocated by PostgreSQL.
pub unsafe fn in_scratch<R>(
    slot: &'static std::thread::LocalKey<std::cell::Cell<pg_sys::MemoryContext>>,
    name: &'static std::ffi::CStr,
    f: impl FnOnce() -> R,
) -> R {
    let mut scratch = slot.with(|s| s.get());
    if scratch.is_null() {
        scratch = pg_sys::AllocSetContextCreateExtended(
            pg_sys::TopMemoryContext,
            name.as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        slot.with(|s| s.set(scratch));
    }
    struct Reset(pg_sys::MemoryContext, pg_sys::MemoryContext);
    impl Drop for Reset {
        fn drop(&mut self) {
            unsafe {
                pg_sys::MemoryContextSwitchTo(self.1);
                pg_sys::MemoryContextReset(self.0);
            }
        }
    }
    let _reset = Reset(scratch, pg_sys::MemoryContextSwitchTo(scratch));
    f()
}
