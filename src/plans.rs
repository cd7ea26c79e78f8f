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
