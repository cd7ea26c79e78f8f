//! Writing events without the executor: capture's commit path inserts its events straight into
//! `webhooks._events` (heap and indexes), as logical replication's apply does, instead of
//! planning and starting a query for every commit. The table is the extension's own and has
//! no triggers, rules or policies of anybody's; nothing but the insert and its index entries
//! happens, under the same WAL and locking as an `INSERT`.

use crate::error::raise;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::ffi::CString;

/// One row of `webhooks._events` to write. `data` is JSON text (valid JSON, an object).
pub struct EventRow {
    pub event_type: String,
    pub entity: String,
    pub key: String,
    pub data: String,
}

/// Attribute numbers (0-based) of `_events`' columns, looked up by name.
struct Columns {
    seq: usize,
    id: usize,
    event_type: usize,
    entity: usize,
    key: usize,
    data: usize,
    xid: usize,
    created_at: usize,
}

unsafe fn relid_of(schema: &std::ffi::CStr, name: &std::ffi::CStr) -> pg_sys::Oid {
    let nsp = pg_sys::get_namespace_oid(schema.as_ptr(), false);
    let relid = pg_sys::get_relname_relid(name.as_ptr(), nsp);
    if relid == pg_sys::InvalidOid {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            &format!("pg_webhooks: webhooks.{} does not exist", name.to_string_lossy()),
        );
    }
    relid
}

unsafe fn columns(desc: pg_sys::TupleDesc) -> Columns {
    let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
    let find = |name: &str| {
        attrs
            .iter()
            .position(|a| {
                !a.attisdropped
                    && std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes()
            })
            .unwrap_or_else(|| {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    &format!("pg_webhooks: webhooks._events has no column {name}"),
                )
            })
    };
    Columns {
        seq: find("seq"),
        id: find("id"),
        event_type: find("type"),
        entity: find("entity"),
        key: find("key"),
        data: find("data"),
        xid: find("xid"),
        created_at: find("created_at"),
    }
}

fn text_datum(s: &str) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            s.as_ptr().cast(),
            s.len() as i32,
        ))
    }
}

/// A version 4 (random) UUID, as `gen_random_uuid()` makes it.
fn random_uuid() -> pg_sys::Datum {
    unsafe {
        let p = pg_sys::palloc(16) as *mut u8;
        let bytes = std::slice::from_raw_parts_mut(p, 16);
        if !pg_sys::pg_strong_random(p.cast(), 16) {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "pg_webhooks: could not generate random values",
            );
        }
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        pg_sys::Datum::from(p)
    }
}

/// Insert `rows` into `webhooks._events`, in order, with seqs from its sequence (taken now:
/// capture calls this at pre-commit), the transaction's id and the clock.
pub fn insert_events(rows: &[EventRow]) {
    if rows.is_empty() {
        return;
    }
    unsafe {
        let relid = relid_of(c"webhooks", c"_events");
        let seq_relid = relid_of(c"webhooks", c"_events_seq_seq");
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let cols = columns(desc);
        let natts = (*desc).natts as usize;
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let xid = pg_sys::GetTopFullTransactionId().value;
        let now = pg_sys::GetCurrentTimestamp();
        let role = crate::capture::capture_role();
        // Each row's values and index tuples live in the per-tuple context, reset after the row:
        // a commit writing many events needs no more memory than one.
        let per_row = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
        // The data of consecutive events that share it (a status change and its mapped event)
        // is parsed once.
        let per_data = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"pg_webhooks event data".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let mut last_data: Option<(&str, pg_sys::Datum)> = None;
        for row in rows {
            let outer = pg_sys::MemoryContextSwitchTo(per_row);
            // nextval checks USAGE on the sequence: as the capture role, which has it.
            let seq = crate::capture::with_user(role, || {
                pg_sys::OidFunctionCall1Coll(
                    pg_sys::Oid::from(pg_sys::F_NEXTVAL),
                    pg_sys::InvalidOid,
                    pg_sys::Datum::from(seq_relid),
                )
            });
            pg_sys::ExecClearTuple(slot);
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true);
            let mut set = |i: usize, d: pg_sys::Datum| {
                values[i] = d;
                nulls[i] = false;
            };
            set(cols.seq, seq);
            set(cols.id, random_uuid());
            set(cols.event_type, text_datum(&row.event_type));
            set(cols.entity, text_datum(&row.entity));
            set(cols.key, text_datum(&row.key));
            let data = match last_data {
                Some((text, datum)) if text == row.data.as_str() => datum,
                _ => {
                    let json = CString::new(row.data.as_str()).unwrap_or_else(|_| {
                        raise(
                            PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
                            "pg_webhooks: event data has a NUL byte",
                        )
                    });
                    pg_sys::MemoryContextReset(per_data);
                    pg_sys::MemoryContextSwitchTo(per_data);
                    let datum = pg_sys::OidInputFunctionCall(
                        pg_sys::Oid::from(pg_sys::F_JSONB_IN),
                        json.as_ptr().cast_mut(),
                        pg_sys::JSONBOID,
                        -1,
                    );
                    pg_sys::MemoryContextSwitchTo(per_row);
                    last_data = Some((row.data.as_str(), datum));
                    datum
                }
            };
            set(cols.data, data);
            set(cols.xid, pg_sys::Datum::from(xid));
            set(cols.created_at, pg_sys::Datum::from(now));
            pg_sys::ExecStoreVirtualTuple(slot);
            pg_sys::simple_table_tuple_insert(rel, slot);
            if (*rri).ri_NumIndices > 0 {
                pg_sys::ExecInsertIndexTuples(
                    rri,
                    slot,
                    estate,
                    false,
                    false,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
            }
            pg_sys::MemoryContextSwitchTo(outer);
            pg_sys::ExecClearTuple(slot);
            pg_sys::MemoryContextReset(per_row);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::MemoryContextDelete(per_data);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}
