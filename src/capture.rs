//! Capture: order writes become events as the net effect of each transaction.
//!
//! Row triggers only take notes in backend memory: which keys of which tracked tables the
//! transaction touched, and what those rows (and their children) looked like before. At
//! pre-commit, one prepared query per tracked table reads the touched rows as they are at
//! commit, the net effect is worked out here, and the events are written straight into
//! `webhooks._events` (see `direct.rs`), tagged with the transaction's id, by which the worker
//! finds them once the transaction is visible (no bookkeeping row per transaction). Comparing "before the transaction"
//! with "at commit" is what makes savepoint rollbacks, insert-then-delete and changes that
//! are undone leave nothing behind, without any bookkeeping per subtransaction.

use crate::error::{raise, raise_with_hint};
use crate::plans::{row_json, rows_with_snapshot, rows_with_snapshot_read_only, run_kept, with_plan};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

/// One dependent table embedded in the payload, as `webhooks.track()` registered it in
/// `webhooks._tracked.children`: names are data, columns are attribute numbers.
#[derive(Clone, Debug, serde::Deserialize)]
struct ChildSpec {
    name: String,
    relid: u32,
    fk_attnum: i16,
}

/// A tracked table's configuration. It comes from `webhooks._tracked` and the catalogs only,
/// never from trigger arguments (which anyone who can create a trigger chooses), and every
/// name in its SQL is quoted here, so nothing a caller writes can become code.
pub(crate) struct TableConfig {
    relid: pg_sys::Oid,
    /// Reads of the table and its children run as its owner (who owns the children too), with
    /// a fixed search_path. Owners bypass row-level security, and tables whose owner forces it
    /// on themselves are refused, so no policy (somebody's function) runs inside capture.
    owner: pg_sys::Oid,
    entity: String,
    key_attnum: i32,
    status_attnum: Option<i32>,
    child_relids: Vec<pg_sys::Oid>,
    child_fk_attnums: Vec<i32>,
    /// Partitions of the table and of its children (their owner changes invalidate this).
    partition_relids: Vec<pg_sys::Oid>,
    /// Names of the children in the payload, in the order of `child_relids`.
    child_names: Vec<String>,
    /// Whether the columns of the table or its children are made of a type a user created
    /// (an enum, composite, domain, range...). For such a type `row_to_json` would call a
    /// cast to json if its owner made one, which is somebody's code: capture then builds the
    /// JSON with `to_jsonb` of the built-in columns and the output text of the others, in
    /// SQL of its own (`row_json_query`, the same in the trigger and at commit).
    has_user_types: bool,
    /// With `has_user_types`: the JSON of one row, `$1` being a row of the table's type.
    row_json_query: String,
    rowtype: pg_sys::Oid,
    /// Base type of the key column: keys are bound as values of it, never cast from text.
    key_type_oid: pg_sys::Oid,
    key_input: (pg_sys::Oid, pg_sys::Oid),
    key_array_type: pg_sys::Oid,
    /// Hash values (namespace syscache) of the schemas named in the SQL below.
    namespace_hashes: Vec<u32>,
    /// Where the visible row of each key is: key, tableoid, ctid.
    locate_query: String,
    /// The children of each key: key, then one array of rows per child.
    children_rows_query: String,
    /// Whether the status column's text depends on settings (dates, floats...): it is then
    /// taken under the output settings capture fixes.
    status_needs_settings: bool,
    /// Locks the parent row of a child change.
    lock_query: String,
    /// The children of one key: one array of rows per child.
    children_query: String,
    /// How to read the children without SQL (an index scan per child), when every child allows
    /// it; otherwise `children_query` / `children_rows_query` are used.
    children_direct: Option<Vec<ChildDirect>>,
}

/// A child table read by an index scan on its foreign key, in primary key order: no SQL, no
/// executor. Only for plain tables of built-in column types with a plain btree index led by
/// the foreign key, and a primary key of one integer column or none.
struct ChildDirect {
    relid: pg_sys::Oid,
    fk_attnum: i16,
    index: pg_sys::Oid,
    eq_proc: pg_sys::Oid,
    collation: pg_sys::Oid,
    fk_type: pg_sys::Oid,
    fk_input: (pg_sys::Oid, pg_sys::Oid),
    /// The primary key column (1-based) and its type, when it is one integer column.
    pk: Option<(usize, pg_sys::Oid)>,
}

/// A key's text as a value of `typid` (its input function, never a cast); None when the text
/// is out of range for an integer type (it then names no row).
fn typed_key(typid: pg_sys::Oid, input: (pg_sys::Oid, pg_sys::Oid), key: &str) -> Option<pg_sys::Datum> {
    let fits = match typid {
        t if t == pg_sys::INT2OID => key.parse::<i16>().is_ok(),
        t if t == pg_sys::INT4OID => key.parse::<i32>().is_ok(),
        t if t == pg_sys::INT8OID => key.parse::<i64>().is_ok(),
        _ => true,
    };
    if !fits {
        return None;
    }
    let c = std::ffi::CString::new(key).ok()?;
    Some(unsafe { pg_sys::OidInputFunctionCall(input.0, c.as_ptr().cast_mut(), input.1, -1) })
}

/// How to read `child` directly, if it can be: see `ChildDirect`.
unsafe fn child_direct(child: pg_sys::Oid, fk_attnum: i16) -> Option<ChildDirect> {
    let rel = pg_sys::try_relation_open(child, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return None;
    }
    let result = (|| {
        // A table others inherit from: `FROM child` reads their rows too, an index scan not.
        if (*(*rel).rd_rel).relkind as u8 != pg_sys::RELKIND_RELATION || (*(*rel).rd_rel).relhassubclass {
            return None;
        }
        let fk_type = pg_sys::getBaseType(pg_sys::get_atttype(child, fk_attnum));
        if fk_type == pg_sys::BPCHAROID || key_family(fk_type).is_none() {
            return None;
        }
        let list = pg_sys::RelationGetIndexList(rel);
        let indexes: Vec<pg_sys::Oid> = if list.is_null() {
            Vec::new()
        } else {
            (0..(*list).length)
                .map(|i| pg_sys::Oid::from((*(*list).elements.add(i as usize)).oid_value))
                .collect()
        };
        let mut found = None;
        let mut pk = None;
        // A primary key (deferrable ones too, which the relcache does not call primary) orders
        // the children; one of another shape sends the table to the SQL path.
        let mut has_pk = false;
        let column_collation = {
            let desc = (*rel).rd_att;
            (*desc).attrs.as_slice((*desc).natts as usize)[fk_attnum as usize - 1].attcollation
        };
        for oid in indexes {
            let idx = pg_sys::index_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let form = (*idx).rd_index;
            let nkeys = (*form).indnkeyatts as usize;
            let keys = (*form).indkey.values.as_slice(nkeys);
            let plain = !pg_sys::heap_attisnull((*idx).rd_indextuple, pg_sys::Anum_pg_index_indexprs as i32, std::ptr::null_mut())
                || !pg_sys::heap_attisnull((*idx).rd_indextuple, pg_sys::Anum_pg_index_indpred as i32, std::ptr::null_mut());
            let plain = !plain;
            if (*form).indisprimary {
                has_pk = true;
            }
            if (*form).indisprimary && nkeys == 1 && keys[0] > 0 {
                let t = pg_sys::get_atttype(child, keys[0]);
                if [pg_sys::INT2OID, pg_sys::INT4OID, pg_sys::INT8OID].contains(&t) {
                    pk = Some((keys[0] as usize, t));
                }
            }
            if found.is_none()
                && plain
                && (*idx).rd_rel.as_ref().is_some_and(|r| r.relam == pg_sys::BTREE_AM_OID)
                && (*form).indisvalid
                && (*form).indisready
                && nkeys >= 1
                && keys[0] == fk_attnum
            {
                let opfamily = *(*idx).rd_opfamily;
                let opcintype = *(*idx).rd_opcintype;
                let op = pg_sys::get_opfamily_member(
                    opfamily,
                    opcintype,
                    opcintype,
                    pg_sys::BTEqualStrategyNumber as i16,
                );
                if op != pg_sys::InvalidOid
                    && opcintype == fk_type
                    && *(*idx).rd_indcollation == column_collation
                {
                    found = Some((oid, pg_sys::get_opcode(op), *(*idx).rd_indcollation));
                }
            }
            pg_sys::index_close(idx, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        }
        let (index, eq_proc, collation) = found?;
        if has_pk && pk.is_none() {
            return None;
        }
        let (mut typinput, mut typioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo(fk_type, &mut typinput, &mut typioparam);
        Some(ChildDirect {
            relid: child,
            fk_attnum,
            index,
            eq_proc,
            collation,
            fk_type,
            fk_input: (typinput, typioparam),
            pk,
        })
    })();
    pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    result
}

/// The rows of `ch` whose foreign key is `key`, as a JSON array (as `array_to_json` of the
/// rows in primary key order writes it), read under `snapshot`. Called under the output
/// settings.
/// None when the index is not (any more) what the configuration found: DDL since the
/// configuration was loaded (locking the table below takes in its invalidations); the caller
/// then uses the SQL path.
unsafe fn children_array(ch: &ChildDirect, key: &str, snapshot: pg_sys::Snapshot) -> Option<String> {
    children_scan(ch, key, snapshot, |rows, desc| {
        let mut out = String::from("[");
        for (i, tuple) in rows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&row_json(pg_sys::heap_copy_tuple_as_datum(*tuple, desc)));
        }
        out.push(']');
        out
    })
}

/// `f` of the rows of `ch` whose foreign key is `key` (copies, in primary key order, and the
/// table's descriptor), read under `snapshot`; None as for `children_array`. The descriptor
/// is null when there are no rows.
unsafe fn children_scan<R>(
    ch: &ChildDirect,
    key: &str,
    snapshot: pg_sys::Snapshot,
    f: impl FnOnce(&[pg_sys::HeapTuple], pg_sys::TupleDesc) -> R,
) -> Option<R> {
    let Some(arg) = typed_key(ch.fk_type, ch.fk_input, key) else {
        return Some(f(&[], std::ptr::null_mut()));
    };
    let rel = pg_sys::try_relation_open(ch.relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return None;
    }
    let idx = pg_sys::try_index_open(ch.index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    let usable = !idx.is_null() && {
        let form = (*idx).rd_index;
        (*form).indrelid == ch.relid
            && (*form).indisvalid
            && (*form).indisready
            && (*form).indnkeyatts >= 1
            && *(*form).indkey.values.as_ptr() == ch.fk_attnum
            && !(*(*rel).rd_rel).relhassubclass
    };
    if !usable {
        if !idx.is_null() {
            pg_sys::index_close(idx, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        return None;
    }
    let mut skey: pg_sys::ScanKeyData = std::mem::zeroed();
    pg_sys::ScanKeyEntryInitialize(
        &mut skey,
        0,
        1,
        pg_sys::BTEqualStrategyNumber as u16,
        pg_sys::InvalidOid,
        ch.collation,
        ch.eq_proc,
        arg,
    );
    let scan = pg_sys::index_beginscan(rel, idx, snapshot, 1, 0);
    pg_sys::index_rescan(scan, &mut skey, 1, std::ptr::null_mut(), 0);
    let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    let mut rows: Vec<(i64, pg_sys::HeapTuple)> = Vec::new();
    while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
        let order = match ch.pk {
            Some((att, typ)) if att <= natts => {
                // The primary key's column only (a key column: never null).
                if ((*slot).tts_nvalid as usize) < att {
                    pg_sys::slot_getsomeattrs_int(slot, att as i32);
                }
                let v = (*(*slot).tts_values.add(att - 1)).value();
                match typ {
                    t if t == pg_sys::INT2OID => v as i16 as i64,
                    t if t == pg_sys::INT4OID => v as i32 as i64,
                    _ => v as i64,
                }
            }
            _ => rows.len() as i64,
        };
        // A copy of the row (the slot's is in a buffer, and moves on).
        rows.push((order, pg_sys::ExecCopySlotHeapTuple(slot)));
    }
    pg_sys::index_endscan(scan);
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    rows.sort_by_key(|r| r.0);
    let tuples: Vec<pg_sys::HeapTuple> = rows.into_iter().map(|r| r.1).collect();
    let result = f(&tuples, desc);
    pg_sys::index_close(idx, pg_sys::NoLock as pg_sys::LOCKMODE);
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    Some(result)
}

/// `{"name": [...], ...}` of `key`'s children read directly, under `snapshot`; None when the
/// table has no children. Called under the output settings.
/// The outer None: the direct path is not usable now (see `children_array`).
fn children_direct_json(cfg: &TableConfig, direct: &[ChildDirect], key: &str, snapshot: pg_sys::Snapshot) -> Option<Option<String>> {
    let mut arrays: Vec<Option<String>> = Vec::with_capacity(direct.len());
    for ch in direct {
        arrays.push(Some(unsafe { children_array(ch, key, snapshot) }?));
    }
    Some(cfg.children_json(&arrays))
}

/// The data of `key`'s event as jsonb (its bytes): the row (`tuple`, of the tracked table's
/// descriptor `desc`) and its children read directly under `snapshot`, as `to_jsonb` builds
/// the same object, and a status change's `previous_status` and `status` over them if given. None when the children cannot be read directly now (see
/// `children_array`). Called under the output settings.
pub(crate) unsafe fn row_jsonb(
    cfg: &TableConfig,
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    key: &str,
    snapshot: pg_sys::Snapshot,
    status_keys: Option<&crate::direct::Extra>,
) -> Option<Vec<u8>> {
    thread_local! {
        static SCRATCH: std::cell::Cell<pg_sys::MemoryContext> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    }
    // One row's values, copies and jsonb live in a context of their own, reset after the row:
    // a chunk of many rows holds no more of PostgreSQL's memory than one.
    crate::plans::in_scratch(&SCRATCH, c"pg_webhooks row jsonb", || {
        let mut b = crate::jsonb::Builder::object();
        b.columns(tuple, desc);
        if let Some(direct) = cfg.children_direct.as_deref() {
            for (ch, name) in direct.iter().zip(&cfg.child_names) {
                b.key(name.as_bytes());
                b.begin_array();
                children_scan(ch, key, snapshot, |rows, child_desc| {
                    for row in rows {
                        b.row_element(*row, child_desc);
                    }
                })?;
                b.end_array();
            }
        }
        // A status change's keys last: jsonb keeps the last of duplicate keys, so the object
        // is the one the text path's merge makes (`Data::Text` with `extra`).
        if let Some((previous, status)) = status_keys {
            b.key(b"previous_status");
            b.string_or_null(previous.as_deref());
            b.key(b"status");
            b.string_or_null(status.as_deref());
        }
        Some(b.finish())
    })
}

impl TableConfig {
    /// The key as a value of the key's base type (its input function, never a cast). A
    /// child's foreign key may be a wider integer than the key: out of the key's range, it
    /// names no parent (and the key type's input function would raise).
    fn key_datum(&self, key: &str) -> Option<pg_sys::Datum> {
        typed_key(self.key_type_oid, self.key_input, key)
    }

    /// Keys as an array of the key's base type.
    fn keys_datum(&self, keys: &[String]) -> pg_sys::Datum {
        unsafe {
            let mut datums: Vec<pg_sys::Datum> = keys
                .iter()
                .map(|k| {
                    self.key_datum(k)
                        .unwrap_or_else(|| not_usable("a key has a NUL byte"))
                })
                .collect();
            let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
            pg_sys::get_typlenbyvalalign(self.key_type_oid, &mut len, &mut byval, &mut align);
            let array = pg_sys::construct_array(
                datums.as_mut_ptr(),
                datums.len() as i32,
                self.key_type_oid,
                len.into(),
                byval,
                align,
            );
            pg_sys::Datum::from(array)
        }
    }

    /// `{"name": [...], ...}` from the children arrays' JSON, in declaration order.
    fn children_json(&self, arrays: &[Option<String>]) -> Option<String> {
        if self.child_names.is_empty() {
            return None;
        }
        let mut out = String::from("{");
        for (i, name) in self.child_names.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(name).unwrap_or_default());
            out.push(':');
            out.push_str(arrays.get(i).and_then(|a| a.as_deref()).unwrap_or("[]"));
        }
        out.push('}');
        Some(out)
    }
}

/// SHA-256 of a row's binary image (or of its children's JSON): enough to tell "changed"
/// from "the same" while keeping what a large transaction holds in memory small and fixed per
/// row.
type Digest = [u8; 32];

/// Digest of a row's values as stored (each column's null flag and bytes, out of line values
/// fetched and decompressed first), in the order of `desc`: equal exactly when `record_image_eq`
/// says so, as a materialized view's concurrent refresh compares rows.
unsafe fn image_digest(tuple: *mut pg_sys::HeapTupleData, desc: pg_sys::TupleDesc) -> Digest {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    crate::jsonb::with_deformed(tuple, desc, |values, nulls| {
        let attrs = (*desc).attrs.as_slice(values.len());
        for (i, att) in attrs.iter().enumerate() {
            if att.attisdropped {
                continue;
            }
            if nulls[i] {
                h.update([0u8]);
                continue;
            }
            h.update([1u8]);
            let v = values[i];
            if att.attbyval {
                let len = (att.attlen as usize).min(8);
                h.update(&v.value().to_le_bytes()[..len]);
            } else if att.attlen > 0 {
                h.update(std::slice::from_raw_parts(v.cast_mut_ptr::<u8>(), att.attlen as usize));
            } else if att.attlen == -1 {
                let raw = v.cast_mut_ptr::<pg_sys::varlena>();
                let plain = crate::jsonb::detoast_packed(raw);
                let len = pgrx::varlena::varsize_any_exhdr(plain);
                h.update((len as u64).to_le_bytes());
                h.update(std::slice::from_raw_parts(
                    pgrx::varlena::vardata_any(plain).cast::<u8>(),
                    len,
                ));
                if plain != raw {
                    pg_sys::pfree(plain.cast());
                }
            } else {
                let c = std::ffi::CStr::from_ptr(v.cast_mut_ptr::<std::ffi::c_char>());
                h.update((c.to_bytes().len() as u64).to_le_bytes());
                h.update(c.to_bytes());
            }
        }
    });
    h.finalize().into()
}

/// The JSON of a row of the tracked table (a composite datum of its row type), as capture
/// writes it: `row_to_json`, or capture's own SQL for tables with columns of users' types.
/// Called under the output settings.
fn row_json_of(cfg: &TableConfig, row: pg_sys::Datum) -> String {
    if cfg.has_user_types {
        // SQL of capture's own, which runs no user code.
        rows_with_snapshot(
            &cfg.row_json_query,
            &[cfg.rowtype],
            &[Some(row)],
            unsafe { pg_sys::GetActiveSnapshot() },
        )
        .into_iter()
        .next()
        .and_then(|mut r| r.swap_remove(0))
        .unwrap_or_default()
    } else {
        row_json(row)
    }
}

fn digest(json: &str) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(json.as_bytes()).into()
}

/// What one row looked like before the transaction touched it.
#[derive(Default, Clone)]
struct Touch {
    existed_before: bool,
    row_touched: bool,
    orig_row: Option<Digest>,
    orig_status: Option<String>,
    children_touched: bool,
    orig_children: Option<Digest>,
    /// The row as deleted (the payload of `E.deleted`); only kept for deleted rows.
    deleted_row: Option<String>,
    /// Where the transaction's newest version of the row is (relation, item pointer).
    version: Option<(pg_sys::Oid, pg_sys::ItemPointerData)>,
    /// The newest subtransaction that saved this note's earlier state in `UNDO`.
    saved_in: pg_sys::SubTransactionId,
    /// Noted by a child trigger that found no row with the key (none visible, none locked), and
    /// the row itself not changed since: a child write the foreign key will refuse, one that
    /// ON CONFLICT DO NOTHING skips, or one whose parent this transaction inserts or deletes
    /// later in the statement (its own row trigger then notes it). Nothing is known of such a
    /// key: it gives no event unless the row itself is changed, or a child change finds and
    /// locks the row later (the note then starts afresh).
    unseen: bool,
}

/// Keys read back, and events written, per statement at commit: bounds the memory a
/// transaction touching many rows needs at commit.
const COMMIT_CHUNK: usize = 1000;

struct TableTouches {
    relid: pg_sys::Oid,
    keys: Vec<String>,
    touches: HashMap<String, Touch>,
    /// A child's foreign key as the child spells it -> the key as the table spells it.
    child_keys: HashMap<String, String>,
}

impl TableTouches {
    /// The note of `key`, to change (made with `fresh` if there is none).
    fn touch(&mut self, key: &str, fresh: impl FnOnce() -> Touch) -> &mut Touch {
        let sub = current_subtransaction();
        if !self.touches.contains_key(key) {
            add_note_bytes(NOTE_BYTES_PER_KEY + 2 * key.len());
            self.keys.push(key.to_string());
            let mut t = fresh();
            t.saved_in = sub;
            self.touches.insert(key.to_string(), t);
            if sub > TOP_SUBTRANSACTION {
                push_undo(Undo::Touch {
                    sub,
                    relid: self.relid,
                    key: key.to_string(),
                    before: None,
                });
            }
        } else {
            self.save(key, sub);
        }
        self.touches.get_mut(key).expect("inserted above")
    }

    /// The note of `key`, to change, if there is one.
    fn touch_mut(&mut self, key: &str) -> Option<&mut Touch> {
        if self.touches.contains_key(key) {
            self.save(key, current_subtransaction());
        }
        self.touches.get_mut(key)
    }

    /// Keeps the note of `key` as it is before the subtransaction `sub` first changes it.
    fn save(&mut self, key: &str, sub: pg_sys::SubTransactionId) {
        if sub <= TOP_SUBTRANSACTION {
            return;
        }
        let Some(t) = self.touches.get_mut(key) else {
            return;
        };
        // Saved by this subtransaction, or by one inside it that committed into it (whose
        // saved state is this subtransaction's, as it had not changed the note before).
        if t.saved_in >= sub {
            return;
        }
        let before = t.clone();
        t.saved_in = sub;
        push_undo(Undo::Touch {
            sub,
            relid: self.relid,
            key: key.to_string(),
            before: Some(before),
        });
    }

    fn note_child_key(&mut self, fk_key: &str, key: String) {
        let cost = CHILD_KEY_BYTES + fk_key.len() + key.len();
        let before = self.child_keys.insert(fk_key.to_string(), key);
        if before.is_none() {
            add_note_bytes(cost);
        }
        let sub = current_subtransaction();
        if sub > TOP_SUBTRANSACTION {
            push_undo(Undo::ChildKey {
                sub,
                relid: self.relid,
                fk_key: fk_key.to_string(),
                before,
            });
        }
    }
}

/// `TopSubTransactionId`: changes made outside any savepoint are undone with the transaction.
const TOP_SUBTRANSACTION: pg_sys::SubTransactionId = 1;

fn current_subtransaction() -> pg_sys::SubTransactionId {
    unsafe { pg_sys::GetCurrentSubTransactionId() }
}

/// A note as it was before a subtransaction changed it. A subtransaction rolled back takes
/// its notes with it: it released the row locks it took, so another transaction may change
/// those rows and commit before this one does, and a note kept from the undone work (the row
/// as it was then, a new key, a parent locked) would describe that other transaction's work as
/// this one's, or skip a lock this one needs.
enum Undo {
    Touch {
        sub: pg_sys::SubTransactionId,
        relid: pg_sys::Oid,
        key: String,
        before: Option<Touch>,
    },
    ChildKey {
        sub: pg_sys::SubTransactionId,
        relid: pg_sys::Oid,
        fk_key: String,
        before: Option<String>,
    },
}

fn push_undo(u: Undo) {
    add_note_bytes(UNDO_BYTES);
    UNDO.with(|undo| undo.borrow_mut().push(u));
}

/// What a note costs in memory, as measured (about 440 bytes a row for a 100,000-row insert:
/// the structures, the key twice, the hash table's and the vector's room to grow); strings
/// kept in notes (status, a deleted row's JSON) are added as they are kept.
const NOTE_BYTES_PER_KEY: usize = 480;
const CHILD_KEY_BYTES: usize = 100;
const UNDO_BYTES: usize = 200;

fn add_note_bytes(n: usize) {
    NOTE_BYTES.with(|b| b.set(b.get() + n));
}

/// When the notes take more than `webhooks.capture_memory`, they are moved to a sort on disk
/// (see `Spill`), unless a subtransaction is open (its rollback needs the notes it changed,
/// and their earlier states, in memory).
fn maybe_spill() {
    if NOTE_BYTES.with(|b| b.get()) <= crate::gucs::capture_memory_bytes()
        || current_subtransaction() != TOP_SUBTRANSACTION
        || RECHECKING.with(|r| r.get())
    {
        return;
    }
    let tables = TOUCHED.with(|t| std::mem::take(&mut *t.borrow_mut()));
    // Outside any subtransaction, no rollback to a savepoint can come: the saved states of
    // released subtransactions are of no use any more.
    UNDO.with(|u| u.borrow_mut().clear());
    NOTE_BYTES.with(|b| b.set(0));
    SPILL.with(|s| {
        let mut s = s.borrow_mut();
        let spill = s.get_or_insert_with(Spill::begin);
        for tt in &tables {
            for key in &tt.keys {
                if let Some(t) = tt.touches.get(key) {
                    spill.put(tt.relid, key, t);
                }
            }
        }
    });
}

/// Notes moved out of memory: a sort (PostgreSQL's tuplesort, which keeps `work_mem`-like
/// memory and writes the rest to temporary files) of one entry per note, ordered by table, key
/// and when the note was moved. A key touched again after its note was moved gets a new note,
/// which knows nothing of the old one (its "before" is the row as this transaction left it);
/// at commit the entries of a key are folded, oldest first, into the note one kept in memory
/// all along would be (`fold`): the oldest image of the row and of its children is the
/// original, the newest version is where the row is. The net effect and every rule stay
/// exact; events of a transaction that spilled come out ordered by table and key (per key
/// order, the one that matters, is kept).
struct Spill {
    sort: *mut pg_sys::Tuplesortstate,
    next: u64,
    /// Keys with an entry of a parent a child trigger did not find (see `recheck_unseen`).
    unseen: Vec<(pg_sys::Oid, String)>,
}

/// Runs `f` with the transaction's resource owner: the sort's temporary files outlive the
/// statement that made them (a portal's resource owner closes its files when the portal is
/// dropped). On an ERROR the transaction (no subtransaction is open while notes spill) aborts
/// and restores the owner.
unsafe fn with_transaction_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = pg_sys::CurrentResourceOwner;
    pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
    let result = f();
    pg_sys::CurrentResourceOwner = owner;
    result
}

impl Spill {
    fn begin() -> Spill {
        // A quarter of the cap: the notes in memory and the sort's together stay within about
        // twice the cap, transients (a hash table growing) included.
        let work_mem_kb = (crate::gucs::capture_memory_bytes() / 4096).clamp(64, i32::MAX as usize) as i32;
        let sort = unsafe {
            // The sort's memory lives as long as the transaction.
            let cxt = pg_sys::MemoryContextSwitchTo(pg_sys::TopTransactionContext);
            let sort = with_transaction_owner(|| {
                pg_sys::tuplesort_begin_datum(
                    pg_sys::BYTEAOID,
                    pg_sys::Oid::from(pg_sys::ByteaLessOperator),
                    pg_sys::InvalidOid,
                    false,
                    work_mem_kb,
                    std::ptr::null_mut(),
                    pg_sys::TUPLESORT_NONE as i32,
                )
            });
            pg_sys::MemoryContextSwitchTo(cxt);
            sort
        };
        Spill {
            sort,
            next: 0,
            unseen: Vec::new(),
        }
    }

    /// One entry: table and key (then a NUL, which no key has, so that a key sorts before the
    /// longer keys it begins), the entry's number, then the note.
    fn put(&mut self, relid: pg_sys::Oid, key: &str, t: &Touch) {
        if t.unseen && !t.row_touched {
            self.unseen.push((relid, key.to_string()));
        }
        let mut b: Vec<u8> = Vec::with_capacity(96 + key.len());
        b.extend_from_slice(&[0u8; 4]);
        b.extend_from_slice(&relid.to_u32().to_be_bytes());
        b.extend_from_slice(key.as_bytes());
        b.push(0);
        b.extend_from_slice(&self.next.to_be_bytes());
        self.next += 1;
        encode_touch(t, &mut b);
        unsafe {
            let len = b.len() as i32;
            pgrx::varlena::set_varsize_4b(b.as_mut_ptr().cast(), len);
            let sort = self.sort;
            with_transaction_owner(|| {
                pg_sys::tuplesort_putdatum(sort, pg_sys::Datum::from(b.as_mut_ptr()), false)
            });
        }
    }
}

fn encode_touch(t: &Touch, b: &mut Vec<u8>) {
    let flags = u8::from(t.existed_before)
        | u8::from(t.row_touched) << 1
        | u8::from(t.children_touched) << 2
        | u8::from(t.unseen) << 3
        | u8::from(t.orig_row.is_some()) << 4
        | u8::from(t.orig_children.is_some()) << 5
        | u8::from(t.orig_status.is_some()) << 6
        | u8::from(t.deleted_row.is_some()) << 7;
    b.push(flags);
    b.push(u8::from(t.version.is_some()));
    if let Some(d) = &t.orig_row {
        b.extend_from_slice(d);
    }
    if let Some(d) = &t.orig_children {
        b.extend_from_slice(d);
    }
    for text in [&t.orig_status, &t.deleted_row].into_iter().flatten() {
        b.extend_from_slice(&(text.len() as u32).to_le_bytes());
        b.extend_from_slice(text.as_bytes());
    }
    if let Some((rel, tid)) = &t.version {
        b.extend_from_slice(&rel.to_u32().to_le_bytes());
        b.extend_from_slice(&tid.ip_blkid.bi_hi.to_le_bytes());
        b.extend_from_slice(&tid.ip_blkid.bi_lo.to_le_bytes());
        b.extend_from_slice(&tid.ip_posid.to_le_bytes());
    }
}

/// (table, key, note) of an entry `Spill::put` wrote.
fn decode_entry(b: &[u8]) -> Option<(pg_sys::Oid, String, Touch)> {
    let relid = pg_sys::Oid::from(u32::from_be_bytes(b.get(0..4)?.try_into().ok()?));
    let nul = 4 + b.get(4..)?.iter().position(|c| *c == 0)?;
    let key = std::str::from_utf8(&b[4..nul]).ok()?.to_string();
    let mut at = nul + 1 + 8;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let flags = take(1)?[0];
    let has_version = take(1)?[0] != 0;
    let bit = |i: u8| flags & (1 << i) != 0;
    let mut t = Touch {
        existed_before: bit(0),
        row_touched: bit(1),
        children_touched: bit(2),
        unseen: bit(3),
        saved_in: TOP_SUBTRANSACTION,
        ..Touch::default()
    };
    if bit(4) {
        t.orig_row = Some(take(32)?.try_into().ok()?);
    }
    if bit(5) {
        t.orig_children = Some(take(32)?.try_into().ok()?);
    }
    let mut text = |present: bool| -> Option<Option<String>> {
        if !present {
            return Some(None);
        }
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        Some(Some(std::str::from_utf8(take(len)?).ok()?.to_string()))
    };
    t.orig_status = text(bit(6))?;
    t.deleted_row = text(bit(7))?;
    if has_version {
        let rel = pg_sys::Oid::from(u32::from_le_bytes(take(4)?.try_into().ok()?));
        let mut tid: pg_sys::ItemPointerData = unsafe { std::mem::zeroed() };
        tid.ip_blkid.bi_hi = u16::from_le_bytes(take(2)?.try_into().ok()?);
        tid.ip_blkid.bi_lo = u16::from_le_bytes(take(2)?.try_into().ok()?);
        tid.ip_posid = u16::from_le_bytes(take(2)?.try_into().ok()?);
        t.version = Some((rel, tid));
    }
    Some((relid, key, t))
}

/// The note kept in memory all along, from the note `acc` of a key and the newer note `b`
/// started after `acc` was moved to the spill (see `Spill`): what each trigger would have
/// done to `acc` had it still been there.
fn fold(acc: &mut Touch, b: Touch) {
    // A parent not found before, found (and locked) by `b`: its notes start afresh.
    if b.children_touched && acc.unseen && !acc.row_touched && !b.unseen {
        *acc = Touch {
            existed_before: true,
            children_touched: true,
            orig_children: b.orig_children,
            saved_in: TOP_SUBTRANSACTION,
            ..Touch::default()
        };
    } else if b.children_touched {
        // The first change of an existing row's children keeps their image from then.
        if !acc.children_touched && acc.existed_before {
            acc.orig_children = b.orig_children;
        }
        acc.children_touched = true;
    }
    if b.row_touched {
        // The first own change of the row gives its image before the transaction, and
        // whether it existed; later ones only where its newest version is.
        if !acc.row_touched {
            acc.existed_before = b.existed_before;
            acc.row_touched = true;
            acc.orig_row = b.orig_row;
            acc.orig_status = b.orig_status;
        }
        acc.version = b.version;
    }
    if b.deleted_row.is_some() {
        acc.deleted_row = b.deleted_row;
    }
}

thread_local! {
    static TOUCHED: RefCell<Vec<TableTouches>> = const { RefCell::new(Vec::new()) };
    static WAKE_AT_COMMIT: Cell<Option<Wake>> = const { Cell::new(None) };
    /// Seqs of the events `emit` wrote in this transaction: they are given new seqs at
    /// pre-commit, so that their order is the order of commits, as capture's events.
    static EMITTED: RefCell<Vec<i64>> = const { RefCell::new(Vec::new()) };
    /// Configurations of tracked tables, dropped when the relcache entry of the table or of
    /// one of its children is invalidated (track, untrack, renames, drops, owner changes).
    static CONFIGS: RefCell<HashMap<pg_sys::Oid, Rc<TableConfig>>> = RefCell::new(HashMap::new());
    static CONFIGS_STALE: Cell<bool> = const { Cell::new(false) };
    /// Bumped by every invalidation: a configuration loaded while it moved may be stale and
    /// is not kept.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// Parent of each partition looked up so far (dropped with the configurations).
    static PARENTS: RefCell<HashMap<pg_sys::Oid, Option<pg_sys::Oid>>> = RefCell::new(HashMap::new());
    /// The tracked tables that list each child table among their children (dropped when the
    /// child's or one of those tables' relcache entry is invalidated: track and untrack
    /// invalidate the children too).
    static CHILD_PARENTS: RefCell<HashMap<pg_sys::Oid, Rc<Vec<pg_sys::Oid>>>> = RefCell::new(HashMap::new());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Whether a subtransaction of this transaction was rolled back: until one is, every
    /// version the trigger noted is still this transaction's newest (nothing undid it).
    static SUBXACT_ABORTED: Cell<bool> = const { Cell::new(false) };
    /// Notes as they were before the open subtransactions changed them, oldest first.
    static UNDO: RefCell<Vec<Undo>> = const { RefCell::new(Vec::new()) };
    /// What the notes in memory cost, roughly (see `maybe_spill`).
    static NOTE_BYTES: Cell<usize> = const { Cell::new(0) };
    /// Notes moved out of memory in this transaction, if any.
    static SPILL: RefCell<Option<Spill>> = const { RefCell::new(None) };
}

thread_local! {
    /// How deeply statements are nested now: ExecutorRun, ExecutorFinish and utility
    /// statements each count one (see `enter_statement`).
    static STATEMENT_LEVEL: Cell<u32> = const { Cell::new(0) };
    /// `STATEMENT_LEVEL` as each open subtransaction started: an ERROR skips the hooks' way
    /// out, and rolling back to the subtransaction restores it.
    static SUBXACT_LEVELS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Parents a child trigger did not find: (tracked table, the key as the child spells it,
    /// the statement level the trigger fired at). See `recheck_unseen`.
    static UNSEEN: RefCell<Vec<(pg_sys::Oid, String, u32)>> = const { RefCell::new(Vec::new()) };
    static RECHECKING: Cell<bool> = const { Cell::new(false) };
}

/// Entering ExecutorRun, ExecutorFinish or a utility statement: returns the level to give
/// back to `leave_statement`.
pub fn enter_statement() -> u32 {
    STATEMENT_LEVEL.with(|l| {
        let level = l.get();
        l.set(level + 1);
        level
    })
}

/// Leaving what `enter_statement` entered: whether parents that child triggers did not find
/// are waiting to be looked for again (see `statement_finished`). Raises nothing.
pub fn leave_statement(level: u32) -> bool {
    STATEMENT_LEVEL.with(|l| l.set(level));
    UNSEEN.with(|u| u.try_borrow().is_ok_and(|u| !u.is_empty()))
}

/// A statement at `level` has finished, its AFTER triggers (its foreign key checks) fired:
/// the parents its child triggers did not find are looked for again.
pub fn statement_finished(level: u32) {
    recheck_unseen(Some(level));
}

pub fn subtransaction_started() {
    let level = STATEMENT_LEVEL.with(|l| l.get());
    SUBXACT_LEVELS.with(|s| s.borrow_mut().push(level));
}

pub fn subtransaction_committed() {
    SUBXACT_LEVELS.with(|s| s.borrow_mut().pop());
}

/// A child trigger found no parent row with the key: the parent may be committed by another
/// session before the child row is written (the child's insert waits for a conflicting
/// insert of its own key, say), and the foreign key, which looks after the row is written,
/// then finds it, with a KEY SHARE lock that lets other writers of the parent through. Such
/// parents are looked for again, and locked, once the statement's foreign keys have been
/// checked (`level`: keys noted inside the statement that finished at this level), and at
/// commit (None: every parent still not found; deferred foreign keys are checked by then).
/// Their children "before" are then read as others committed them, without this
/// transaction's own changes (see `LatestSnapshot::push_without_own_changes`).
fn recheck_unseen(level: Option<u32>) {
    if RECHECKING.with(|r| r.get()) || !unsafe { pg_sys::IsTransactionState() } {
        return;
    }
    let keys: Vec<(pg_sys::Oid, String)> = match level {
        Some(level) => UNSEEN.with(|u| {
            let mut u = u.borrow_mut();
            let mut taken = Vec::new();
            u.retain(|(relid, key, at)| {
                if *at > level {
                    taken.push((*relid, key.clone()));
                    false
                } else {
                    true
                }
            });
            taken
        }),
        None => {
            UNSEEN.with(|u| u.borrow_mut().clear());
            let mut keys: Vec<(pg_sys::Oid, String)> = SPILL.with(|s| {
                s.borrow_mut()
                    .as_mut()
                    .map(|s| std::mem::take(&mut s.unseen))
                    .unwrap_or_default()
            });
            TOUCHED.with(|t| {
                for tt in t.borrow().iter() {
                    keys.extend(
                        tt.keys
                            .iter()
                            .filter(|k| tt.touches.get(*k).is_some_and(|t| t.unseen && !t.row_touched))
                            .map(|k| (tt.relid, k.clone())),
                    );
                }
            });
            keys
        }
    };
    if keys.is_empty() {
        return;
    }
    // Pre-commit runs outside any statement, and a configuration forgotten since the trigger
    // (an invalidation, or a catch-up of the invalidation queue while the session sat idle)
    // is read again through SPI, which needs an active snapshot. Only then: a commit with
    // nothing to look for again takes no snapshot.
    let _outer = (!unsafe { pg_sys::ActiveSnapshotSet() }).then(LatestSnapshot::push);
    RECHECKING.with(|r| r.set(true));
    let mut last: Option<(pg_sys::Oid, String)> = None;
    for (relid, key) in keys {
        if last.as_ref() == Some(&(relid, key.clone())) {
            continue;
        }
        last = Some((relid, key.clone()));
        // A key whose note was moved to the spill is looked for again too (an extra lock of
        // a parent found before changes nothing).
        let spilled = SPILL.with(|s| s.borrow().is_some());
        let still_unseen = with_table(relid, |tt| {
            !tt.child_keys.contains_key(&key)
                && match tt.touches.get(&key) {
                    Some(t) => t.unseen && !t.row_touched,
                    None => spilled,
                }
        });
        if !still_unseen {
            continue;
        }
        let Some(cfg) = config_for(relid) else {
            continue;
        };
        // An ERROR aborts the transaction (or the subtransaction), whose end resets the flag.
        note_child_change(&cfg, &key, true, true);
    }
    RECHECKING.with(|r| r.set(false));
}

/// SUBXACT_EVENT_ABORT_SUB: versions noted so far may have been undone, and the notes the
/// subtransaction made go with it (see `Undo`). Called while the aborting subtransaction is
/// still the current one. Every subtransaction started since it began is inside it, and has a
/// larger id: the entries to undo are those at the end of `UNDO` with an id at least its own.
pub fn subtransaction_aborted() {
    SUBXACT_ABORTED.with(|a| a.set(true));
    if let Some(level) = SUBXACT_LEVELS.with(|s| s.borrow_mut().pop()) {
        STATEMENT_LEVEL.with(|l| l.set(level));
    }
    RECHECKING.with(|r| r.set(false));
    let sub = current_subtransaction();
    loop {
        let entry = UNDO.with(|undo| {
            let mut undo = undo.borrow_mut();
            let last_sub = match undo.last() {
                Some(Undo::Touch { sub, .. } | Undo::ChildKey { sub, .. }) => *sub,
                None => return None,
            };
            if last_sub >= sub {
                undo.pop()
            } else {
                None
            }
        });
        match entry {
            None => break,
            Some(Undo::Touch {
                relid, key, before, ..
            }) => with_table(relid, |tt| match before {
                Some(t) => {
                    tt.touches.insert(key, t);
                }
                None => {
                    tt.touches.remove(&key);
                    if tt.keys.last() == Some(&key) {
                        tt.keys.pop();
                    } else {
                        tt.keys.retain(|k| *k != key);
                    }
                }
            }),
            Some(Undo::ChildKey {
                relid,
                fk_key,
                before,
                ..
            }) => with_table(relid, |tt| match before {
                Some(k) => {
                    tt.child_keys.insert(fk_key, k);
                }
                None => {
                    tt.child_keys.remove(&fk_key);
                }
            }),
        }
    }
}

/// Why the worker is to be woken at commit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// New events to fan out.
    Events,
    /// Deliveries were queued or released directly (send_test, redeliver, replay, resume):
    /// the worker must claim even if its fan-out finds nothing.
    Queue,
}

/// Ask for the delivery worker to be woken when this transaction commits.
pub fn wake_worker_at_commit(why: Wake) {
    WAKE_AT_COMMIT.with(|w| {
        if w.get() != Some(Wake::Queue) {
            w.set(Some(why));
        }
    });
}

/// Called at XACT_EVENT_COMMIT: whether (and why) this transaction enqueued anything.
pub fn take_wake_request() -> Option<Wake> {
    WAKE_AT_COMMIT.with(|w| w.replace(None))
}

/// At COMMIT: nothing may be left noted (a library whose pre-commit callback ran after ours
/// and wrote a tracked table); say so rather than lose it silently, then forget.
pub fn forget_at_commit() {
    let left = TOUCHED.with(|t| t.borrow().iter().map(|tt| tt.keys.len()).sum::<usize>())
        + EMITTED.with(|e| e.borrow().len());
    if left > 0 {
        warning!("pg_webhooks: {left} changes to tracked tables were made after capture ran at commit and have no events");
    }
    reset();
}

/// Forget everything noted by an aborted (or finished) transaction.
pub fn reset() {
    SUBXACT_ABORTED.with(|a| a.set(false));
    UNDO.with(|u| u.borrow_mut().clear());
    UNSEEN.with(|u| u.borrow_mut().clear());
    RECHECKING.with(|r| r.set(false));
    SUBXACT_LEVELS.with(|s| s.borrow_mut().clear());
    STATEMENT_LEVEL.with(|l| l.set(0));
    NOTE_BYTES.with(|b| b.set(0));
    // Its memory and files go with the transaction's (aborted: its resource owner closes them).
    SPILL.with(|s| s.borrow_mut().take());
    TOUCHED.with(|t| t.borrow_mut().clear());
    EMITTED.with(|e| e.borrow_mut().clear());
    WAKE_AT_COMMIT.with(|w| w.set(None));
}

fn quote_ident(s: &str) -> String {
    pgrx::spi::quote_identifier(s)
}

fn not_usable(what: &str) -> ! {
    raise_with_hint(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        &format!("pg_webhooks: {what}"),
        "Run webhooks.untrack() and webhooks.track() on the table again.",
    )
}

/// Schema-qualified, quoted name of a relation, looked up now (so renames are followed).
unsafe fn qualified_name(relid: pg_sys::Oid) -> Option<String> {
    let rel = pg_sys::get_rel_name(relid);
    if rel.is_null() {
        return None;
    }
    let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
    Some(format!(
        "{}.{}",
        quote_ident(&CStr::from_ptr(nsp).to_string_lossy()),
        quote_ident(&CStr::from_ptr(rel).to_string_lossy())
    ))
}

/// Quoted name of a live column.
unsafe fn column_name(relid: pg_sys::Oid, attnum: i32) -> Option<String> {
    let p = pg_sys::get_attname(relid, attnum as pg_sys::AttrNumber, true);
    (!p.is_null()).then(|| quote_ident(&CStr::from_ptr(p).to_string_lossy()))
}

/// The role capture writes events as: it may insert events and read its configuration,
/// nothing else.
pub(crate) fn capture_role() -> pg_sys::Oid {
    role_oid(c"webhooks_capture")
}

/// Run `f` with `role` as the current user and nothing else changed: for single calls into
/// PostgreSQL that check a privilege and run no SQL.
pub(crate) fn with_user<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_ctx = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_ctx
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        // An ERROR aborts the (sub)transaction, which restores the user.
        let result = f();
        pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx);
        result
    }
}

fn role_oid(name: &CStr) -> pg_sys::Oid {
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            &format!(
                "pg_webhooks: role {} does not exist",
                name.to_string_lossy()
            ),
            "Drop and create the extension again (it creates the role).",
        );
    }
    oid
}

pub(crate) fn register_invalidation_callback() {
    if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(forget_configs),
                pg_sys::Datum::from(0usize),
            );
            // Schema renames change the qualified names in the kept SQL but send no relcache
            // invalidation: forget the configurations that name the schema then.
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(forget_configs_in_namespace),
                pg_sys::Datum::from(0usize),
            );
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_configs_in_namespace(
    _arg: pg_sys::Datum,
    _cache: i32,
    hash: u32,
) {
    // (A schema renamed sends no relcache invalidation of its tables.)
    crate::direct::forget_event_relids(pg_sys::InvalidOid);
    GENERATION.with(|g| g.set(g.get() + 1));
    CONFIGS.with(|c| match c.try_borrow_mut() {
        Ok(mut configs) if hash != 0 => {
            configs.retain(|_, cfg| !cfg.namespace_hashes.contains(&hash))
        }
        Ok(mut configs) => configs.clear(),
        Err(_) => CONFIGS_STALE.with(|s| s.set(true)),
    });
}

fn namespace_hash(relid: pg_sys::Oid) -> u32 {
    unsafe {
        pg_sys::GetSysCacheHashValue(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            pg_sys::Datum::from(pg_sys::get_rel_namespace(relid)),
            pg_sys::Datum::from(0usize),
            pg_sys::Datum::from(0usize),
            pg_sys::Datum::from(0usize),
        )
    }
}

/// A plain or partitioned table that is not temporary: what capture reads. Checked whenever a
/// configuration is loaded (a table can become a view through a `_RETURN` rule).
fn check_readable_table(relid: pg_sys::Oid, name: &str) {
    let (forced, kind, persistence) = unsafe {
        with_relation(relid, |rel| {
            let c = &*(*rel).rd_rel;
            (
                c.relforcerowsecurity,
                c.relkind as u8,
                c.relpersistence as u8,
            )
        })
    }
    .unwrap_or((false, 0, 0));
    if forced {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            &format!("pg_webhooks: {name} forces row-level security on its owner"),
            "Capture reads a tracked table and its children as their owner and runs no policy: turn FORCE ROW LEVEL SECURITY off, or untrack the table.",
        );
    }
    if (kind != pg_sys::RELKIND_RELATION && kind != pg_sys::RELKIND_PARTITIONED_TABLE)
        || persistence == pg_sys::RELPERSISTENCE_TEMP
    {
        not_usable(&format!("{name} is no longer a permanent table"));
    }
}

/// `f` of the relcache entry of `relid`, if the relation exists.
unsafe fn with_relation<R>(relid: pg_sys::Oid, f: impl FnOnce(pg_sys::Relation) -> R) -> Option<R> {
    let rel = pg_sys::RelationIdGetRelation(relid);
    if rel.is_null() {
        return None;
    }
    let result = f(rel);
    pg_sys::RelationClose(rel);
    Some(result)
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_configs(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::direct::forget_event_relids(relid);
    GENERATION.with(|g| g.set(g.get() + 1));
    if relid == pg_sys::InvalidOid || relid == STATUS_EVENTS_RELID.with(|r| r.get()) {
        STATUS_EVENTS.with(|m| {
            if let Ok(mut m) = m.try_borrow_mut() {
                *m = None;
            }
        });
    }
    CONFIGS.with(|c| match c.try_borrow_mut() {
        // A configuration is cached under the tracked table and under each of its partitions.
        Ok(mut configs) if relid != pg_sys::InvalidOid => configs.retain(|key, cfg| {
            *key != relid
                && cfg.relid != relid
                && !cfg.child_relids.contains(&relid)
                && !cfg.partition_relids.contains(&relid)
        }),
        Ok(mut configs) => configs.clear(),
        // Invalidated while a configuration is being loaded: forget them all before the next use.
        Err(_) => CONFIGS_STALE.with(|s| s.set(true)),
    });
    CHILD_PARENTS.with(|m| match m.try_borrow_mut() {
        Ok(mut map) if relid != pg_sys::InvalidOid => {
            map.retain(|child, parents| *child != relid && !parents.contains(&relid))
        }
        Ok(mut map) => map.clear(),
        Err(_) => CONFIGS_STALE.with(|s| s.set(true)),
    });
    // Attaching or detaching a partition invalidates it.
    PARENTS.with(|p| match p.try_borrow_mut() {
        Ok(mut parents) if relid != pg_sys::InvalidOid => {
            parents.remove(&relid);
        }
        Ok(mut parents) => parents.clear(),
        Err(_) => CONFIGS_STALE.with(|s| s.set(true)),
    });
}

/// The partitioned table `relid` is a partition of, if it is one.
fn partition_parent(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    if !unsafe { pg_sys::get_rel_relispartition(relid) } {
        return None;
    }
    if let Some(p) = PARENTS.with(|p| p.borrow().get(&relid).copied()) {
        return p;
    }
    let parent = as_capture_role(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid = $1",
            &[relid.into()],
        )
    })
    .ok()
    .flatten();
    PARENTS.with(|p| p.borrow_mut().insert(relid, parent));
    parent
}

/// The tracked tables whose registered children include `child` (by `webhooks._tracked`, not
/// by anything the trigger was given: a restored dump's child triggers name the old cluster's
/// tables).
fn tracked_parents_of(child: pg_sys::Oid) -> Rc<Vec<pg_sys::Oid>> {
    register_invalidation_callback();
    forget_if_stale();
    if let Some(p) = CHILD_PARENTS.with(|m| m.borrow().get(&child).cloned()) {
        return p;
    }
    let generation = GENERATION.with(|g| g.get());
    let parents: Vec<pg_sys::Oid> = as_capture_role(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT t.relid::pg_catalog.oid FROM webhooks._tracked t
                  WHERE t.children OPERATOR(pg_catalog.@>)
                        pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object('relid', $1::pg_catalog.int8))
                  ORDER BY 1",
                None,
                &[i64::from(child.to_u32()).into()],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
        })
    })
    .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("pg_webhooks: {e}")));
    let parents = Rc::new(parents);
    // An invalidation that arrived meanwhile may concern what was read: use it once only.
    // (An empty list is kept too: registering a table as a child invalidates its relcache.)
    if GENERATION.with(|g| g.get()) == generation {
        CHILD_PARENTS.with(|m| m.borrow_mut().insert(child, parents.clone()));
    }
    parents
}

/// The attribute number in `rel` of the column that is `attnum` in `tracked` (a partition's
/// columns may be numbered differently from its parent's).
fn attnum_in(tracked: pg_sys::Oid, attnum: i32, rel: pg_sys::Oid) -> i32 {
    if rel == tracked {
        return attnum;
    }
    unsafe {
        let name = pg_sys::get_attname(tracked, attnum as pg_sys::AttrNumber, true);
        if name.is_null() {
            return 0;
        }
        i32::from(pg_sys::get_attnum(rel, name))
    }
}

/// An invalidation came while a cache was borrowed: forget what it might have concerned.
fn forget_if_stale() {
    if CONFIGS_STALE.with(|s| s.replace(false)) {
        CONFIGS.with(|c| c.borrow_mut().clear());
        CHILD_PARENTS.with(|m| m.borrow_mut().clear());
    }
}

/// The configuration of a tracked table, or None if `webhooks.track()` did not register it.
pub(crate) fn config_for(relid: pg_sys::Oid) -> Option<Rc<TableConfig>> {
    register_invalidation_callback();
    forget_if_stale();
    if let Some(cfg) = CONFIGS.with(|c| c.borrow().get(&relid).cloned()) {
        return Some(cfg);
    }
    let generation = GENERATION.with(|g| g.get());
    let cfg = match load_config(relid) {
        Some(cfg) => Rc::new(cfg),
        // A partition of a tracked partitioned table is captured as that table.
        None => config_for(partition_parent(relid)?)?,
    };
    // An invalidation that arrived while loading may concern what was just read: use this
    // configuration once, but load it again next time.
    if GENERATION.with(|g| g.get()) == generation {
        CONFIGS.with(|c| c.borrow_mut().insert(relid, cfg.clone()));
    }
    Some(cfg)
}

fn load_config(relid: pg_sys::Oid) -> Option<TableConfig> {
    type Row = (String, i32, Option<i32>, String, pg_sys::Oid);
    let row: Option<Row> = as_role(capture_role(), || {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT t.entity, t.key_attnum::int4, t.status_attnum::int4, t.children::text, c.relowner
                   FROM webhooks._tracked t JOIN pg_catalog.pg_class c ON c.oid = t.relid
                  WHERE t.relid = $1",
                Some(1),
                &[relid.into()],
            )?;
            let Some(r) = t.into_iter().next() else {
                return Ok::<_, pgrx::spi::Error>(None);
            };
            Ok(Some((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<i32>(2)?.unwrap_or(0),
                r.get::<i32>(3)?,
                r.get::<String>(4)?.unwrap_or_else(|| "[]".into()),
                r.get::<pg_sys::Oid>(5)?.unwrap_or(pg_sys::InvalidOid),
            )))
        })
    })
    .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("pg_webhooks: {e}")));
    let (entity, key_attnum, status_attnum, children_json, owner) = row?;
    let children: Vec<ChildSpec> = serde_json::from_str(&children_json)
        .unwrap_or_else(|e| not_usable(&format!("the tracked table's children are invalid: {e}")));
    unsafe {
        let table = qualified_name(relid)?;
        check_readable_table(relid, &table);
        let key = column_name(relid, key_attnum)
            .unwrap_or_else(|| not_usable(&format!("the key column of {table} no longer exists")));
        let key_type_oid =
            pg_sys::getBaseType(pg_sys::get_atttype(relid, key_attnum as pg_sys::AttrNumber));
        if !supported_key_type(key_type_oid) {
            not_usable(&format!(
                "the key column of {table} has a type capture does not support"
            ));
        }
        let key_array_type = pg_sys::get_array_type(key_type_oid);
        if key_array_type == pg_sys::InvalidOid {
            not_usable(&format!(
                "the key column of {table} has a type without an array type"
            ));
        }
        let (mut typinput, mut typioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo(key_type_oid, &mut typinput, &mut typioparam);
        // Status and keys come out through their types' output functions (never a cast), the
        // row and the children as values that are turned into JSON afterwards.
        if let Some(a) = status_attnum {
            if column_name(relid, a).is_none() {
                not_usable(&format!("the status column of {table} no longer exists"));
            }
        }
        let mut children_sql = Vec::new();
        let mut namespace_hashes = vec![namespace_hash(relid)];
        for ch in &children {
            let child = pg_sys::Oid::from(ch.relid);
            let child_table = qualified_name(child).unwrap_or_else(|| {
                not_usable(&format!("a child table of {table} no longer exists"))
            });
            check_readable_table(child, &child_table);
            // Read with the parent owner's rights: a child owned by someone else could run
            // its owner's row-level security policies with the parent owner's rights.
            if with_relation(child, |rel| (*(*rel).rd_rel).relowner) != Some(owner) {
                not_usable(&format!(
                    "child table {child_table} is not owned by the owner of {table}"
                ));
            }
            let fk = column_name(child, ch.fk_attnum.into()).unwrap_or_else(|| {
                not_usable(&format!(
                    "the foreign key column of {child_table} no longer exists"
                ))
            });
            let fk_type = pg_sys::getBaseType(pg_sys::get_atttype(child, ch.fk_attnum));
            if key_family(fk_type).is_none() || key_family(fk_type) != key_family(key_type_oid) {
                not_usable(&format!(
                    "the foreign key column of {child_table} cannot be compared with the key of {table} by a built-in operator"
                ));
            }
            namespace_hashes.push(namespace_hash(child));
            let order = as_capture_role(|| primary_key_order(child));
            children_sql.push((
                child,
                format!("FROM {child_table} c WHERE c.{fk} = t.{key}{order}"),
            ));
        }
        let mut rels = vec![relid];
        rels.extend(children.iter().map(|c| pg_sys::Oid::from(c.relid)));
        // Planning the reads opens every partition (and constant-folds its index
        // expressions) with the owner's rights: every partition must be the owner's (or a
        // superuser's) too.
        let partitions = as_capture_role(|| partitions_of(&rels));
        for &(part, part_owner) in &partitions {
            if part_owner != owner && !pg_sys::superuser_arg(part_owner) {
                not_usable(&format!(
                    "partition {} of a tracked table is not owned by the owner of {table}",
                    qualified_name(part).unwrap_or_default()
                ));
            }
        }
        let user_typed = as_capture_role(|| user_typed_columns(&rels));
        let has_user_types = !user_typed.is_empty();
        let row_expr = |rel: pg_sys::Oid, alias: &str| json_object_expr(rel, alias, &user_typed);
        let arrays: Vec<String> = children_sql
            .iter()
            .map(|(child, from)| {
                if has_user_types {
                    // ORDER BY inside the aggregate: the pk order comes last in `from`.
                    let (cond, order) = match from.find(" ORDER BY ") {
                        Some(i) => (&from[..i], &from[i..]),
                        None => (from.as_str(), ""),
                    };
                    format!(
                        "COALESCE((SELECT pg_catalog.jsonb_agg({}{order}) {cond}), '[]'::jsonb)",
                        row_expr(*child, "c")
                    )
                } else {
                    // `c.*` inside a call is the whole row even if a column is named c.
                    let (cond, order) = match from.find(" ORDER BY ") {
                        Some(i) => (&from[..i], &from[i..]),
                        None => (from.as_str(), ""),
                    };
                    format!(
                        "COALESCE((SELECT pg_catalog.array_to_json(pg_catalog.array_agg(c.*{order})) {cond}), '[]'::json)"
                    )
                }
            })
            .collect();
        let arrays_sql = arrays.iter().map(|a| format!(", {a}")).collect::<String>();
        let children_sql = if arrays.is_empty() {
            "NULL::text".to_string()
        } else {
            arrays.join(", ")
        };
        let rowtype = pg_sys::get_rel_type_id(relid);
        Some(TableConfig {
            relid,
            owner,
            entity,
            key_attnum,
            status_attnum,
            partition_relids: partitions.iter().map(|p| p.0).collect(),
            child_relids: children
                .iter()
                .map(|c| pg_sys::Oid::from(c.relid))
                .collect(),
            child_fk_attnums: children.iter().map(|c| i32::from(c.fk_attnum)).collect(),
            child_names: children.iter().map(|c| c.name.clone()).collect(),
            has_user_types,
            row_json_query: format!("SELECT {}", row_expr(relid, "($1)")),
            rowtype,
            key_type_oid,
            key_input: (typinput, typioparam),
            key_array_type,
            namespace_hashes,
            locate_query: format!(
                "SELECT t.{key}, t.tableoid, t.ctid FROM {table} t WHERE t.{key} = ANY ($1)"
            ),
            children_rows_query: format!(
                "SELECT t.{key}{arrays_sql} FROM {table} t WHERE t.{key} = ANY ($1)"
            ),
            status_needs_settings: status_attnum.is_some_and(|a| {
                !settings_free_type(pg_sys::getBaseType(pg_sys::get_atttype(relid, a as pg_sys::AttrNumber)))
            }),
            // Returns the key as the table writes it: a child's foreign key may spell it
            // otherwise (char(8) against char(4), say).
            lock_query: format!(
                "SELECT t.{key} FROM {table} t WHERE t.{key} = $1 FOR NO KEY UPDATE OF t"
            ),
            // The children of a key, whether or not its row is visible now.
            children_query: format!("SELECT {children_sql} FROM (SELECT $1 AS {key}) t"),
            children_direct: if has_user_types || children.is_empty() {
                None
            } else {
                children
                    .iter()
                    .map(|c| child_direct(pg_sys::Oid::from(c.relid), c.fk_attnum))
                    .collect::<Option<Vec<_>>>()
            },
        })
    }
}

/// The columns of `rels` that are made of a type that is not built in (through domains,
/// arrays, composites and ranges), as (relation, attribute number).
fn user_typed_columns(rels: &[pg_sys::Oid]) -> Vec<(pg_sys::Oid, i32)> {
    Spi::connect(|c| {
        let rows = c.select(
            "WITH RECURSIVE t(rel, att, typ) AS (
                 SELECT a.attrelid, a.attnum::int4, a.atttypid FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = ANY ($1) AND a.attnum > 0 AND NOT a.attisdropped
               UNION
                 SELECT t.rel, t.att, n.typ FROM t JOIN pg_catalog.pg_type y ON y.oid = t.typ
                  CROSS JOIN LATERAL (
                      SELECT y.typbasetype UNION ALL SELECT y.typelem
                      UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
                                 WHERE a.attrelid = y.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                      UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = y.oid
                      UNION ALL SELECT r.rngtypid FROM pg_catalog.pg_range r WHERE r.rngmultitypid = y.oid
                  ) AS n(typ)
                 WHERE n.typ <> 0
             )
             SELECT DISTINCT t.rel, t.att FROM t WHERE t.typ >= 16384",
            None,
            &[rels.to_vec().into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if let (Some(rel), Some(att)) = (r.get::<pg_sys::Oid>(1)?, r.get::<i32>(2)?) {
                out.push((rel, att));
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("pg_webhooks: {e}")))
}

/// A row of `rel` (named `alias`) as jsonb, in SQL that runs no user code: `to_jsonb` of
/// each built-in column, and for a column of a type a user made, its output text (`format`
/// calls the type's output function; a cast could be anybody's code).
fn json_object_expr(rel: pg_sys::Oid, alias: &str, user_typed: &[(pg_sys::Oid, i32)]) -> String {
    let columns: Vec<(i32, String)> = unsafe {
        with_relation(rel, |r| {
            let desc = (*r).rd_att;
            let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
            let live = attrs
                .iter()
                .filter(|a| !a.attisdropped)
                .map(|a| {
                    (
                        i32::from(a.attnum),
                        CStr::from_ptr(a.attname.data.as_ptr())
                            .to_string_lossy()
                            .into_owned(),
                    )
                })
                .collect::<Vec<_>>();
            live
        })
        .unwrap_or_default()
    };
    let mut pairs = Vec::new();
    for (att, name) in columns {
        let col = format!("{alias}.{}", quote_ident(&name));
        let value = if user_typed.contains(&(rel, att)) {
            format!("CASE WHEN pg_catalog.num_nulls({col}) = 0 THEN pg_catalog.to_jsonb(pg_catalog.format('%s', {col})) END")
        } else {
            format!("pg_catalog.to_jsonb({col})")
        };
        pairs.push(format!("{}, {value}", pgrx::spi::quote_literal(&name)));
    }
    if pairs.is_empty() {
        return "'{}'::jsonb".into();
    }
    // At most 100 arguments to a function: objects of 50 columns, concatenated.
    pairs
        .chunks(50)
        .map(|c| format!("pg_catalog.jsonb_build_object({})", c.join(", ")))
        .collect::<Vec<_>>()
        .join(" OPERATOR(pg_catalog.||) ")
}

/// Types whose text form no setting changes (unlike dates, times, floats, bytea, money).
fn settings_free_type(typid: pg_sys::Oid) -> bool {
    [
        pg_sys::TEXTOID,
        pg_sys::VARCHAROID,
        pg_sys::BPCHAROID,
        pg_sys::NAMEOID,
        pg_sys::CHAROID,
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::BOOLOID,
        pg_sys::UUIDOID,
    ]
    .contains(&typid)
        || unsafe { pg_sys::get_typtype(typid) } == pg_sys::TYPTYPE_ENUM as std::ffi::c_char
}

/// Key types are built in and have one text form whatever the session's settings (a date or a
/// timestamp would not), since keys are noted as text and bound again at commit.
pub(crate) fn supported_key_type(typid: pg_sys::Oid) -> bool {
    [
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::TEXTOID,
        pg_sys::VARCHAROID,
        pg_sys::BPCHAROID,
        pg_sys::UUIDOID,
    ]
    .contains(&typid)
}

/// Every partition below `rels` (at any depth), with its owner.
fn partitions_of(rels: &[pg_sys::Oid]) -> Vec<(pg_sys::Oid, pg_sys::Oid)> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT p.relid, k.relowner
               FROM pg_catalog.unnest($1::oid[]) AS r(oid)
              CROSS JOIN LATERAL pg_catalog.pg_partition_tree(r.oid) AS p
               JOIN pg_catalog.pg_class k ON k.oid = p.relid
              WHERE p.level > 0",
            None,
            &[rels.to_vec().into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if let (Some(p), Some(o)) = (r.get::<pg_sys::Oid>(1)?, r.get::<pg_sys::Oid>(2)?) {
                out.push((p, o));
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: {e}"),
        )
    })
}

/// The family a key type compares within: `c.fk = t.key` then resolves to a built-in
/// operator (int24eq, texteq, ...), with no implicit cast that a user could have made.
pub(crate) fn key_family(typid: pg_sys::Oid) -> Option<u8> {
    match typid {
        t if t == pg_sys::INT2OID || t == pg_sys::INT4OID || t == pg_sys::INT8OID => Some(1),
        t if t == pg_sys::TEXTOID || t == pg_sys::VARCHAROID => Some(2),
        t if t == pg_sys::BPCHAROID => Some(3),
        t if t == pg_sys::UUIDOID => Some(4),
        _ => None,
    }
}

/// ` ORDER BY c.<pk columns>` for a child table with a primary key, else nothing.
fn primary_key_order(child: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg('c.' || pg_catalog.quote_ident(a.attname), ', ' ORDER BY k.ord)
           FROM pg_catalog.pg_index i
          CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = $1 AND i.indisprimary",
        &[child.into()],
    )
    .ok()
    .flatten()
    .map(|cols| format!(" ORDER BY {cols}"))
    .unwrap_or_default()
}

/// Run `f` as `role`, in a security-restricted operation, with a fixed search_path and generic
/// plans. Capture reads a table as its owner and writes events as `webhooks_capture`, so
/// applications need no grant on the `webhooks` schema, and no caller's code runs with more
/// rights than its author already has.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    with_user(role, || unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        set_options(&[
            (c"search_path", c"pg_catalog, pg_temp"),
            // Our statements are prepared once per backend; a custom plan per commit (which
            // PostgreSQL picks for `= ANY($1)`, thinking it cheaper) costs more than it saves.
            (c"plan_cache_mode", c"force_generic_plan"),
        ]);
        set_options(OUTPUT_SETTINGS);
        // An ERROR inside `f` aborts the (sub)transaction, which restores both. Settings that
        // code run inside changed (even with a plain SET, which would outlive a function) are
        // undone, as PostgreSQL does after maintenance commands that run users' code.
        let result = f();
        pg_sys::AtEOXact_GUC(false, nest);
        result
    })
}

/// Settings that change how values are written as text: fixed while capture turns rows into
/// JSON, in the trigger and at commit alike, so that a session changing them in between
/// neither loses nor invents an event (and payloads do not depend on the writer's session).
const OUTPUT_SETTINGS: &[(&CStr, &CStr)] = &[
    (c"TimeZone", c"UTC"),
    (c"DateStyle", c"ISO, MDY"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
];

unsafe fn set_options(options: &[(&CStr, &CStr)]) {
    for (name, value) in options {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

extern "C" {
    /// `bytea_output` (utils/bytea.h, not in pgrx's bindings): 1 is `hex`. Mutable: `SET`
    /// changes it.
    static mut bytea_output: std::ffi::c_int;
}

/// Whether the session's settings already write values as `OUTPUT_SETTINGS` do (the
/// defaults do, but for the time zone's name), so that nothing needs to be set. Read from the
/// variables the settings are kept in, as their `SHOW` does (`GetConfigOption` by name, five
/// times a commit, was a percent of a tracked status update). The time zone is compared by
/// its canonical name, so `utc` spelled in lower case counts as UTC (it is the same zone;
/// the by-name check took its spelling and set UTC itself, with the same output).
pub(crate) fn output_settings_in_force() -> bool {
    unsafe {
        pg_sys::DateStyle == pg_sys::USE_ISO_DATES as i32
            && pg_sys::DateOrder == pg_sys::DATEORDER_MDY as i32
            && pg_sys::IntervalStyle == pg_sys::INTSTYLE_POSTGRES as i32
            && pg_sys::extra_float_digits == 1
            && bytea_output == 1
            && session_time_zone_is_utc()
    }
}

/// Whether the session's time zone is UTC, by its canonical name. Kept for the zone last asked
/// about: PostgreSQL loads each zone once per process and never frees it (pgtz.c's cache), so
/// one pointer is always one zone.
pub(crate) fn session_time_zone_is_utc() -> bool {
    thread_local! {
        static LAST: Cell<(*const pg_sys::pg_tz, bool)> = const { Cell::new((std::ptr::null(), false)) };
    }
    let tz = unsafe { pg_sys::session_timezone } as *const pg_sys::pg_tz;
    if tz.is_null() {
        return false;
    }
    let (last, utc) = LAST.with(|l| l.get());
    if last == tz {
        return utc;
    }
    let utc = unsafe {
        let name = pg_sys::pg_get_timezone_name(tz.cast_mut());
        !name.is_null() && matches!(CStr::from_ptr(name).to_bytes(), b"UTC" | b"Etc/UTC")
    };
    LAST.with(|l| l.set((tz, utc)));
    utc
}

/// Run `f` with `OUTPUT_SETTINGS`, restoring the session's own afterwards.
fn with_output_settings<R>(f: impl FnOnce() -> R) -> R {
    if output_settings_in_force() {
        return f();
    }
    unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        set_options(OUTPUT_SETTINGS);
        let result = f();
        pg_sys::AtEOXact_GUC(false, nest);
        result
    }
}

/// Write our own tables (events, pending, configuration) as `role_of_table`'s owner or as
/// the capture role: used by the SQL API's Rust helpers.
pub fn as_capture_role<R>(f: impl FnOnce() -> R) -> R {
    as_role(capture_role(), f)
}

unsafe fn column_text(
    tuple: *mut pg_sys::HeapTupleData,
    tupdesc: pg_sys::TupleDesc,
    attnum: i32,
) -> Option<String> {
    // Integers and text as their output functions write them, without looking the output
    // function up and calling it (a key and a status are read this way several times a row).
    if attnum > 0 && attnum <= (*tupdesc).natts {
        let typid = (*tupdesc).attrs.as_slice((*tupdesc).natts as usize)[attnum as usize - 1].atttypid;
        if matches!(typid, pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID | pg_sys::TEXTOID | pg_sys::VARCHAROID) {
            let mut isnull = false;
            let d = pg_sys::heap_getattr(tuple, attnum, tupdesc, &mut isnull);
            if isnull {
                return None;
            }
            return Some(match typid {
                pg_sys::INT2OID => (d.value() as i16).to_string(),
                pg_sys::INT4OID => (d.value() as i32).to_string(),
                pg_sys::INT8OID => (d.value() as i64).to_string(),
                _ => {
                    let t = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
                    let bytes = std::slice::from_raw_parts(
                        pgrx::varlena::vardata_any(t) as *const u8,
                        pgrx::varlena::varsize_any_exhdr(t),
                    );
                    let s = String::from_utf8_lossy(bytes).into_owned();
                    if t != d.cast_mut_ptr() {
                        pg_sys::pfree(t.cast());
                    }
                    s
                }
            });
        }
    }
    let p = pg_sys::SPI_getvalue(tuple, tupdesc, attnum);
    if p.is_null() {
        None
    } else {
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p.cast());
        Some(s)
    }
}

fn with_table<R>(relid: pg_sys::Oid, f: impl FnOnce(&mut TableTouches) -> R) -> R {
    TOUCHED.with(|t| {
        let mut tables = t.borrow_mut();
        let idx = match tables.iter().position(|tt| tt.relid == relid) {
            Some(i) => i,
            None => {
                tables.push(TableTouches {
                    relid,
                    keys: Vec::new(),
                    touches: HashMap::new(),
                    child_keys: HashMap::new(),
                });
                tables.len() - 1
            }
        };
        f(&mut tables[idx])
    })
}

/// Capture refuses to run on a table `webhooks.track()` did not register: a trigger that
/// someone attached by hand does nothing but fail.
fn registered_config(relid: pg_sys::Oid) -> Rc<TableConfig> {
    config_for(relid).unwrap_or_else(|| {
        let name = unsafe { qualified_name(relid) }.unwrap_or_else(|| relid.to_u32().to_string());
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            &format!("pg_webhooks: table {name} is not tracked"),
            "Capture triggers are created by webhooks.track(); drop this trigger or track the table.",
        )
    })
}

/// AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW on a tracked table. Its arguments, if any,
/// are ignored: the configuration comes from `webhooks._tracked`.
#[pg_trigger]
fn _capture_row<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let td = trigger.trigger_data();
    unsafe {
        let rel = td.tg_relation;
        let relid = (*rel).rd_id;
        let tupdesc = (*rel).rd_att;
        let cfg = registered_config(relid);
        if !pgrx::trigger_fired_for_row(td.tg_event) || !pgrx::trigger_fired_after(td.tg_event) {
            wrong_trigger("webhooks._capture_row() must be an AFTER ... FOR EACH ROW trigger");
        }

        // On a partition, the tracked (partitioned) table's columns by their numbers here.
        let key_att = attnum_in(cfg.relid, cfg.key_attnum, relid);
        let status_att = cfg.status_attnum.map(|a| attnum_in(cfg.relid, a, relid));
        if key_att <= 0 {
            not_usable("the key column of a tracked table is missing from one of its partitions");
        }
        // Row JSON is always in the tracked table's column order: a partition's row is
        // converted to its parent's row type first, so the before and at-commit images compare.
        let (json_desc, conversion) = if relid == cfg.relid {
            (tupdesc, std::ptr::null_mut())
        } else {
            let root_desc = with_relation(cfg.relid, |root| {
                let desc = pg_sys::CreateTupleDescCopy((*root).rd_att);
                (*desc).tdtypeid = (*(*root).rd_att).tdtypeid;
                desc
            })
            .unwrap_or_else(|| not_usable("the tracked table no longer exists"));
            (
                root_desc,
                pg_sys::convert_tuples_by_name(tupdesc, root_desc),
            )
        };
        let to_root = |tuple: *mut pg_sys::HeapTupleData| {
            let tuple = complete(tuple, tupdesc);
            if conversion.is_null() {
                tuple
            } else {
                pg_sys::execute_attr_map_tuple(tuple, conversion)
            }
        };
        let event = td.tg_event;
        let key_of = |tuple| column_text(tuple, tupdesc, key_att);
        let status_of = |tuple| {
            status_att.and_then(|a| {
                if cfg.status_needs_settings {
                    with_output_settings(|| column_text(tuple, tupdesc, a))
                } else {
                    column_text(tuple, tupdesc, a)
                }
            })
        };
        let location = |tuple: *mut pg_sys::HeapTupleData| Some((relid, (*tuple).t_self));
        let needs_before = |key: &str| {
            with_table(cfg.relid, |tt| {
                tt.touches.get(key).is_none_or(|t| !t.row_touched)
            })
        };
        // The first image of a row is kept as a digest of its binary values (compared with
        // the row at commit the same way): no JSON, no settings, no SQL per row.
        let note_before = |key: &str, tuple| {
            let b = needs_before(key)
                .then(|| (image_digest(to_root(tuple), json_desc), status_of(tuple)));
            with_table(cfg.relid, |tt| {
                let t = tt.touch(key, || Touch {
                    existed_before: true,
                    ..Touch::default()
                });
                if let (false, Some((row, status))) = (t.row_touched, b) {
                    // First own change of this row. It was not inserted by this transaction
                    // (that would have been noted), so it existed before, also when it was
                    // touched through its children first (a cascade from its own delete may
                    // have hidden it from the child trigger's lock).
                    t.existed_before = true;
                    t.row_touched = true;
                    t.orig_row = Some(row);
                    add_note_bytes(status.as_ref().map_or(0, String::len));
                    t.orig_status = status;
                }
            });
        };
        // Where the row's newest version is: at commit it is read from there, if it is
        // still the visible one (a savepoint rolled back may have undone it).
        let note_version = |key: &str, tuple| {
            with_table(cfg.relid, |tt| {
                if let Some(t) = tt.touch_mut(key) {
                    t.version = location(tuple);
                }
            });
        };
        let note_inserted = |key: &str, tuple| {
            with_table(cfg.relid, |tt| {
                let t = tt.touch(key, Touch::default);
                if !t.row_touched {
                    // The row's first own change is its insert: no row had the key before. (Its
                    // children may have been noted first, and the child trigger's lock may have
                    // found this very row: a key change's ON UPDATE CASCADE, a trigger that
                    // fires before this one, moves the children before the new key is noted.)
                    t.existed_before = false;
                }
                t.row_touched = true;
                t.version = location(tuple);
            });
        };
        // A deleted row's payload is its JSON as deleted (in the settings capture fixes).
        let json_of = |tuple| {
            let tuple = to_root(tuple);
            with_output_settings(|| row_json_of(&cfg, pg_sys::heap_copy_tuple_as_datum(tuple, json_desc)))
        };
        let note_deleted = |key: &str, json: String| {
            with_table(cfg.relid, |tt| {
                if let Some(t) = tt.touch_mut(key) {
                    add_note_bytes(json.len());
                    t.deleted_row = Some(json);
                    t.version = None;
                }
            });
        };
        if pgrx::trigger_fired_by_insert(event) {
            if let Some(key) = key_of(td.tg_trigtuple) {
                note_inserted(&key, td.tg_trigtuple);
            }
        } else if pgrx::trigger_fired_by_update(event) {
            let old_key = key_of(td.tg_trigtuple);
            let new_key = key_of(td.tg_newtuple);
            if let Some(old_key) = &old_key {
                note_before(old_key, td.tg_trigtuple);
                if new_key.as_ref() != Some(old_key) {
                    // The key itself changed: the old key is gone, the new one is born.
                    note_deleted(old_key, json_of(td.tg_trigtuple));
                } else {
                    note_version(old_key, td.tg_newtuple);
                }
            }
            if let Some(new_key) = new_key.filter(|k| Some(k) != old_key.as_ref()) {
                note_inserted(&new_key, td.tg_newtuple);
            }
        } else if pgrx::trigger_fired_by_delete(event) {
            if let Some(key) = key_of(td.tg_trigtuple) {
                note_before(&key, td.tg_trigtuple);
                note_deleted(&key, json_of(td.tg_trigtuple));
            }
        }
    }
    maybe_spill();
    Ok(None)
}

/// BEFORE INSERT OR UPDATE OR DELETE FOR EACH ROW on a child table of a tracked table. Its
/// parents are the tracked tables that list it, or any of its partitioned ancestors, among
/// their children in `webhooks._tracked`; the trigger's arguments, if any, are ignored. For
/// each parent, locks the parent row (so two transactions editing the same order's items
/// serialize) and notes the parent's children as they were before this transaction first
/// changed them. (A partition of a listed table fires its own trigger, if it is listed itself,
/// and the one cloned from its ancestor's: noting a change twice is noting it once.)
#[pg_trigger]
fn _capture_child<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let td = trigger.trigger_data();
    let event = td.tg_event;
    if !pgrx::trigger_fired_for_row(event) || !pgrx::trigger_fired_before(event) {
        wrong_trigger("webhooks._capture_child() must be a BEFORE ... FOR EACH ROW trigger");
    }
    unsafe {
        let child = (*td.tg_relation).rd_id;
        // Every registration of the child: by the tracked tables that list it, or (for a
        // partition) one of its partitioned ancestors, under each foreign key they name.
        let mut registrations: Vec<(Rc<TableConfig>, pg_sys::Oid, usize)> = Vec::new();
        let mut level = Some(child);
        for _ in 0..64 {
            let Some(rel) = level else { break };
            for parent in tracked_parents_of(rel).iter() {
                if let Some(cfg) = config_for(*parent) {
                    for idx in (0..cfg.child_relids.len()).filter(|i| cfg.child_relids[*i] == rel) {
                        registrations.push((cfg.clone(), rel, idx));
                    }
                }
            }
            level = partition_parent(rel);
        }
        // None: a trigger left behind (an untrack racing a drop, a restored 0.1.0 dump) or
        // made by hand on a table no tracked table lists. There is nothing to capture for it,
        // and the writer must not fail for it.
        let tupdesc = (*td.tg_relation).rd_att;
        for (cfg, registered, idx) in registrations {
            let fk_att = attnum_in(registered, cfg.child_fk_attnums[idx], child);
            // INSERT and DELETE: the row's parent; UPDATE: the old and the new parent. Whether
            // the row is written under it (an insert, an update's new parent): only such a
            // parent, not found, is looked for again (see `recheck_unseen`).
            let mut parent_keys: Vec<(String, bool)> = column_text(td.tg_trigtuple, tupdesc, fk_att)
                .into_iter()
                .map(|k| (k, pgrx::trigger_fired_by_insert(event)))
                .collect();
            if pgrx::trigger_fired_by_update(event) {
                if let Some(new_key) = column_text(td.tg_newtuple, tupdesc, fk_att) {
                    match parent_keys.first_mut() {
                        Some((old_key, under)) if *old_key == new_key => *under = true,
                        _ => parent_keys.push((new_key, true)),
                    }
                }
            }
            for (key, written_under) in parent_keys {
                note_child_change(&cfg, &key, false, written_under);
            }
        }
    }
    Ok(if pgrx::trigger_fired_by_delete(event) {
        trigger.old()
    } else {
        trigger.new()
    })
}

fn wrong_trigger(what: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
        &format!("pg_webhooks: {what}"),
    )
}

/// A snapshot that sees everything committed by now (plus this transaction's own work),
/// even under REPEATABLE READ: capture describes rows as they are at commit.
struct LatestSnapshot;

impl LatestSnapshot {
    fn push() -> LatestSnapshot {
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
        LatestSnapshot
    }
    /// Everything committed by now, and none of this transaction's own changes: its command
    /// id is the first, so rows it inserted are not seen yet and rows it deleted or updated
    /// still are (as a scan that started before its first command would see them).
    fn push_without_own_changes() -> LatestSnapshot {
        unsafe {
            // A copy of its own (GetLatestSnapshot's is static): changing it is ours to do.
            pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
            (*pg_sys::GetActiveSnapshot()).curcid = pg_sys::FirstCommandId;
        }
        LatestSnapshot
    }
    /// Everything committed by now and all of this transaction's own changes, those of the
    /// running command included (the plain latest snapshot does not see the rows of the
    /// current command until the command counter moves on).
    fn push_with_all_own_changes() -> LatestSnapshot {
        unsafe {
            pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
            (*pg_sys::GetActiveSnapshot()).curcid = pg_sys::GetCurrentCommandId(false).saturating_add(1);
        }
        LatestSnapshot
    }
    fn get(&self) -> pg_sys::Snapshot {
        unsafe { pg_sys::GetActiveSnapshot() }
    }
}

impl Drop for LatestSnapshot {
    fn drop(&mut self) {
        // Not popped on an ERROR: aborting the transaction pops it.
        if !std::thread::panicking() {
            unsafe { pg_sys::PopActiveSnapshot() };
        }
    }
}

/// `recheck`: called by `recheck_unseen` for a parent not found before, whose children this
/// transaction may have changed since (they are read without its own changes).
/// `written_under`: the child row is written under this parent (an insert, an update's new
/// parent); only then is a parent not found looked for again.
fn note_child_change(cfg: &TableConfig, fk_key: &str, recheck: bool, written_under: bool) {
    // Decide under the borrow, query without it (the queries may wait on a lock).
    let known = with_table(cfg.relid, |tt| tt.child_keys.get(fk_key).cloned());
    if let Some(key) = known {
        with_table(cfg.relid, |tt| {
            if let Some(t) = tt.touch_mut(&key) {
                t.children_touched = true;
            }
        });
        return;
    }
    // A parent this transaction inserted (and has not deleted): nobody else can see it, so
    // there is nothing to lock or to remember, if the child spells its key the same way (the
    // text of integers and uuids is canonical, text is compared as it is; char is padded).
    if cfg.key_type_oid != pg_sys::BPCHAROID {
        // Still there: a savepoint rollback may have undone the insert (and someone else
        // inserted the key since).
        let noted = with_table(cfg.relid, |tt| {
            tt.touches
                .get(fk_key)
                .filter(|t| !t.existed_before)
                .and_then(|t| t.version)
        });
        let undone_possible = SUBXACT_ABORTED.with(|a| a.get());
        let still_ours = noted.is_some_and(|(rel, tid)| !undone_possible || unsafe {
            // (A parent inserted by this very statement is not visible yet: the lock query
            // below then handles it, as before.)
            let latest = LatestSnapshot::push();
            let found = fetch_visible(rel, tid, latest.get())
                .is_some_and(|t| own_version_of(cfg, t, rel, fk_key));
            drop(latest);
            found
        });
        let own_new = still_ours && with_table(cfg.relid, |tt| {
            let own = tt
                .touches
                .get(fk_key)
                .is_some_and(|t| !t.existed_before && t.version.is_some());
            if own {
                tt.note_child_key(fk_key, fk_key.to_string());
                if let Some(t) = tt.touch_mut(fk_key) {
                    t.children_touched = true;
                }
            }
            own
        });
        if own_new {
            return;
        }
    }
    let Some(arg) = cfg.key_datum(fk_key) else {
        return;
    };
    // A parent not found before matters only if this transaction's own changes are among its
    // children now (a child insert that ON CONFLICT DO NOTHING skipped left none): only then is
    // it locked, so that looking again never makes a COMMIT wait (or deadlock) for nothing.
    if recheck
        && as_role(cfg.owner, || {
            children_now(cfg, fk_key, arg, Own::All) == children_now(cfg, fk_key, arg, Own::Without)
        })
    {
        return;
    }
    // The first change under this spelling locks the parent row, which also gives the key as
    // the table spells it; the first change to an existing parent's children notes them.
    let (locked_key, snapshot) = as_role(cfg.owner, || {
        let latest = LatestSnapshot::push();
        let locked_key = rows_with_snapshot(
            &cfg.lock_query,
            &[cfg.key_type_oid],
            &[Some(arg)],
            latest.get(),
        )
        .into_iter()
        .next()
        .and_then(|mut r| r.swap_remove(0));
        // Also when the parent row is hidden: this transaction deleted it (its cascade is
        // deleting these children, or a statement fails on it), and a savepoint rollback may
        // bring it back, with the children it had before.
        // A parent not found before (`unseen`) may have children this transaction changed
        // meanwhile: its children before are read without this transaction's own changes.
        let (needs_snapshot, without_own) = {
            let k = locked_key.as_deref().unwrap_or(fk_key);
            // (Once notes were moved to the spill, a key without a note may have one there.)
            let spilled = SPILL.with(|s| s.borrow().is_some());
            with_table(cfg.relid, |tt| match tt.touches.get(k) {
                None => (true, recheck || spilled),
                Some(t) => {
                    let found_now = locked_key.is_some() && t.unseen && !t.row_touched;
                    ((t.existed_before && !t.children_touched) || found_now, recheck || found_now)
                }
            })
        };
        let children = if needs_snapshot {
            let k = locked_key.as_deref().unwrap_or(fk_key);
            children_now(cfg, k, arg, if without_own { Own::Without } else { Own::Earlier })
        } else {
            None
        };
        (locked_key, children)
    });
    let key = locked_key.clone().unwrap_or_else(|| fk_key.to_string());
    if locked_key.is_none() && !recheck && written_under {
        let level = STATEMENT_LEVEL.with(|l| l.get());
        UNSEEN.with(|u| {
            let mut u = u.borrow_mut();
            if u.last().is_none_or(|(r, k, l)| *r != cfg.relid || k != fk_key || *l != level) {
                u.push((cfg.relid, fk_key.to_string(), level));
            }
        });
    }
    with_table(cfg.relid, |tt| {
        // Only a parent found and locked is remembered: the next child change of a parent not
        // found looks (and locks) again.
        if locked_key.is_some() {
            tt.note_child_key(fk_key, key.clone());
        }
        let t = tt.touch(&key, || Touch {
            existed_before: locked_key.is_some(),
            unseen: locked_key.is_none(),
            ..Touch::default()
        });
        if locked_key.is_some() && t.unseen && !t.row_touched {
            // Found and locked now, not before: what was noted of it said nothing.
            *t = Touch {
                existed_before: true,
                saved_in: t.saved_in,
                ..Touch::default()
            };
        }
        t.children_touched = true;
        if let Some(children) = snapshot {
            t.orig_children = children.as_deref().map(digest);
        }
    });
    if !recheck {
        maybe_spill();
    }
}

/// Which of this transaction's own changes a read of children sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Own {
    /// Those of earlier commands (the plain latest snapshot).
    Earlier,
    /// None.
    Without,
    /// All, the running command's included.
    All,
}

/// The children of `key` (`arg` is the key as a value, for the SQL path) as JSON, as they
/// are now, with `own` changes of this transaction (see `LatestSnapshot`). Run as the table's
/// owner.
fn children_now(cfg: &TableConfig, key: &str, arg: pg_sys::Datum, own: Own) -> Option<Option<String>> {
    let snapshot = || match own {
        Own::Earlier => LatestSnapshot::push(),
        Own::Without => LatestSnapshot::push_without_own_changes(),
        Own::All => LatestSnapshot::push_with_all_own_changes(),
    };
    if let Some(direct) = cfg.children_direct.as_deref() {
        let latest = snapshot();
        if let Some(found) = with_output_settings(|| children_direct_json(cfg, direct, key, latest.get())) {
            return Some(found);
        }
    }
    let latest = snapshot();
    // Read-only: a read-write SPI call would give the snapshot the current command id.
    rows_with_snapshot_read_only(&cfg.children_query, &[cfg.key_type_oid], &[Some(arg)], latest.get())
        .into_iter()
        .next()
        .map(|arrays| cfg.children_json(&arrays))
}

/// One event to write: `data` = row JSON || children JSON || extra JSON.
struct NewEvent {
    event_type: String,
    entity: String,
    key: String,
    data: crate::direct::Data,
    mapped_status: Option<String>,
}

/// What a row's net change is: the event it gives, if any.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Created,
    Deleted,
    StatusUpdated,
    Updated,
}

/// The rule book: what the net effect of a transaction on one row is. `now`: the row at
/// commit, if it is there (its image digest, status and children digest, see `RowAtCommit`).
fn net_kind(
    cfg: &TableConfig,
    t: &Touch,
    now: Option<(&Digest, &Option<String>, &Option<Digest>)>,
) -> Option<Kind> {
    if t.unseen && !t.row_touched {
        return None;
    }
    match (t.existed_before, now) {
        (false, None) => None,
        (false, Some(_)) => Some(Kind::Created),
        (true, None) => t.deleted_row.is_some().then_some(Kind::Deleted),
        (true, Some((image, status, children_digest))) => {
            let status_changed =
                cfg.status_attnum.is_some() && t.row_touched && t.orig_status != *status;
            let row_changed = t.row_touched && t.orig_row != Some(*image);
            let children_changed = t.children_touched && t.orig_children != *children_digest;
            if status_changed {
                Some(Kind::StatusUpdated)
            } else if row_changed || children_changed {
                Some(Kind::Updated)
            } else {
                None
            }
        }
    }
}

/// The events of one row's net change (see `net_kind`).
fn net_events(
    cfg: &TableConfig,
    key: &str,
    t: &Touch,
    now: Option<&RowAtCommit>,
    out: &mut Vec<NewEvent>,
) {
    let ev = |suffix: &str, data: crate::direct::Data, mapped: Option<&String>| NewEvent {
        event_type: [cfg.entity.as_str(), ".", suffix].concat(),
        entity: cfg.entity.clone(),
        key: key.to_string(),
        data,
        mapped_status: mapped.cloned(),
    };
    let Some(kind) = net_kind(cfg, t, now.map(|c| (&c.image, &c.status, &c.children_digest))) else {
        return;
    };
    // The row at commit has its data whenever it gives an event (see `rows_at_commit`).
    let data = || {
        now.and_then(|c| c.data.clone())
            .unwrap_or_else(|| not_usable("an event's data was not read at commit"))
    };
    match kind {
        Kind::Created => out.push(ev("created", data(), now.and_then(|c| c.status.as_ref()))),
        Kind::Deleted => {
            if let Some(old) = &t.deleted_row {
                let data = crate::direct::Data::Text { parts: vec![old.clone()], extra: None };
                out.push(ev("deleted", data, None));
            }
        }
        Kind::StatusUpdated => {
            let status = now.and_then(|c| c.status.clone());
            // Built as jsonb, the data has the keys in it already (see `rows_at_commit`).
            let data = match data() {
                crate::direct::Data::Text { parts, .. } => {
                    crate::direct::Data::Text { parts, extra: Some((t.orig_status.clone(), status.clone())) }
                }
                built => built,
            };
            out.push(ev("status_updated", data, status.as_ref()));
        }
        Kind::Updated => out.push(ev("updated", data(), None)),
    }
}

struct RowAtCommit {
    /// The event's data (the row and its children); read only for a row that gives an event.
    data: Option<crate::direct::Data>,
    /// Digest of the row's binary image, as the trigger took of the row before.
    image: Digest,
    status: Option<String>,
    /// Digest of the children's JSON, as the child trigger took of them before; only for a
    /// row that existed before and whose children this transaction changed (None otherwise,
    /// and for a table without children).
    children_digest: Option<Digest>,
}

/// XACT_EVENT_PRE_COMMIT: turn the notes into events. An error here aborts the transaction.
pub fn write_events_at_commit() {
    // Parents not found by a child trigger, maybe committed since (deferred foreign keys have
    // been checked by now): locked and noted before their events are worked out.
    recheck_unseen(None);
    // Capture runs no user code, but should anything it runs write a tracked table or emit
    // (a future change, another extension's hook), go on until nothing new is noted.
    for _ in 0..100 {
        let tables = TOUCHED.with(|t| std::mem::take(&mut *t.borrow_mut()));
        let emitted = EMITTED.with(|e| std::mem::take(&mut *e.borrow_mut()));
        if tables.is_empty() && emitted.is_empty() {
            return;
        }
        write_events(tables, emitted);
    }
    raise(
        PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        "pg_webhooks: capture at commit keeps causing new changes to tracked tables",
    );
}

fn write_events(tables: Vec<TableTouches>, emitted: Vec<i64>) {
    // The last statement's rows become visible to the snapshots below (an autocommit
    // statement is not followed by a command counter increment before its commit).
    unsafe { pg_sys::CommandCounterIncrement() };
    // Pre-commit runs outside any statement: our statements need an active snapshot.
    let _outer = LatestSnapshot::push();
    if !emitted.is_empty() {
        // New seqs in the order of the emits; events emitted by work rolled back to a
        // savepoint are gone and are not found.
        // (Kept plans, here and in emit: an emit is often its transaction's one statement,
        // and planning these each time was most of its cost and of the time to its commit.)
        as_capture_role(|| run_kept(EMIT_RESEQ, &[pg_sys::INT8ARRAYOID], &[emitted.into()]))
        .unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                &format!("pg_webhooks: emit failed at commit: {e}"),
            )
        });
        wake_worker_at_commit(Wake::Events);
    }
    let mut events = Vec::new();
    let mut wrote = false;
    if let Some(mut spill) = SPILL.with(|s| s.borrow_mut().take()) {
        for tt in &tables {
            for key in &tt.keys {
                if let Some(t) = tt.touches.get(key) {
                    spill.put(tt.relid, key, t);
                }
            }
        }
        write_spilled_events(spill, &mut events, &mut wrote);
        if !events.is_empty() {
            wrote = true;
            insert_events(std::mem::take(&mut events));
        }
        if wrote {
            wake_worker_at_commit(Wake::Events);
        }
        return;
    }
    for tt in &tables {
        // Looked up again: the transaction may have untracked, renamed or dropped it since.
        let Some(cfg) = config_for(tt.relid) else {
            continue;
        };
        for keys in tt.keys.chunks(COMMIT_CHUNK) {
            let rows = in_temp_context(|| rows_at_commit(&cfg, keys, &tt.touches));
            for key in keys {
                net_events(&cfg, key, &tt.touches[key], rows.get(key), &mut events);
            }
            if events.len() >= COMMIT_CHUNK {
                wrote = true;
                insert_events(std::mem::take(&mut events));
            }
        }
    }
    if !events.is_empty() {
        wrote = true;
        insert_events(events);
    }
    if wrote {
        wake_worker_at_commit(Wake::Events);
    }
}

/// The events of the notes in `spill` (and those put there from memory at commit): the
/// entries come out sorted by table, key and age; each key's are folded into one note, and
/// keys are read back in chunks as from memory.
fn write_spilled_events(spill: Spill, events: &mut Vec<NewEvent>, wrote: &mut bool) {
    let sort = spill.sort;
    unsafe { with_transaction_owner(|| pg_sys::tuplesort_performsort(sort)) };
    let mut relid = pg_sys::InvalidOid;
    let mut keys: Vec<String> = Vec::new();
    let mut touches: HashMap<String, Touch> = HashMap::new();
    let flush = |relid: pg_sys::Oid,
                 keys: &mut Vec<String>,
                 touches: &mut HashMap<String, Touch>,
                 events: &mut Vec<NewEvent>,
                 wrote: &mut bool| {
        if keys.is_empty() {
            return;
        }
        if let Some(cfg) = config_for(relid) {
            let rows = in_temp_context(|| rows_at_commit(&cfg, keys, touches));
            for key in keys.iter() {
                net_events(&cfg, key, &touches[key], rows.get(key), events);
            }
            if events.len() >= COMMIT_CHUNK {
                *wrote = true;
                insert_events(std::mem::take(events));
            }
        }
        keys.clear();
        touches.clear();
    };
    loop {
        let entry = in_temp_context(|| unsafe {
            let mut datum = pg_sys::Datum::from(0usize);
            let mut is_null = false;
            let found = with_transaction_owner(|| {
                pg_sys::tuplesort_getdatum(sort, true, &mut datum, &mut is_null, std::ptr::null_mut())
            });
            if !found || is_null {
                return None;
            }
            let v = datum.cast_mut_ptr::<pg_sys::varlena>();
            let bytes = std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(v).cast::<u8>(),
                pgrx::varlena::varsize_any_exhdr(v),
            );
            Some(decode_entry(bytes).unwrap_or_else(|| {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "pg_webhooks: a note capture moved to disk could not be read back",
                )
            }))
        });
        let Some((rel, key, t)) = entry else { break };
        if rel != relid || (keys.len() >= COMMIT_CHUNK && keys.last() != Some(&key)) {
            flush(relid, &mut keys, &mut touches, events, wrote);
            relid = rel;
        }
        match touches.get_mut(&key) {
            Some(acc) => fold(acc, t),
            None => {
                keys.push(key.clone());
                touches.insert(key, t);
            }
        }
    }
    flush(relid, &mut keys, &mut touches, events, wrote);
    unsafe { with_transaction_owner(|| pg_sys::tuplesort_end(sort)) };
}

/// The rows of `keys` as they are at commit. A row this transaction wrote is read where the
/// trigger saw its newest version, if that version is still the visible one (nobody else can
/// have changed a row this transaction holds locked); others (touched through their children
/// only, or whose version a savepoint rollback undid) are looked up by key. Children come from
/// one query per chunk of keys.
fn rows_at_commit(
    cfg: &TableConfig,
    keys: &[String],
    touches: &HashMap<String, Touch>,
) -> HashMap<String, RowAtCommit> {
    let latest = LatestSnapshot::push();
    let snapshot = latest.get();
    let mut located: Vec<(String, pg_sys::Oid, pg_sys::ItemPointerData)> = Vec::with_capacity(keys.len());
    let mut missing: Vec<String> = Vec::new();
    for key in keys {
        match touches.get(key).and_then(|t| t.version) {
            Some((rel, tid)) => located.push((key.clone(), rel, tid)),
            None => missing.push(key.clone()),
        }
    }
    let mut out = HashMap::with_capacity(keys.len());
    let mut fetched: Vec<(String, pg_sys::HeapTuple, pg_sys::Oid)> = Vec::with_capacity(keys.len());
    unsafe {
        let mut retry = Vec::new();
        for (key, rel, tid) in located {
            // Only a version this transaction made, of this key: the version the trigger saw
            // may have been undone by a savepoint rollback and its slot reused since by
            // another row (vacuum frees an aborted version's slot at once).
            let undone_possible = SUBXACT_ABORTED.with(|a| a.get());
            match fetch_visible(rel, tid, snapshot) {
                Some(t) if !undone_possible || own_version_of(cfg, t, rel, &key) => {
                    fetched.push((key, t, rel))
                }
                _ => retry.push(key),
            }
        }
        missing.extend(retry);
        if !missing.is_empty() {
            // Key -> (relation, ctid) of the visible row, as the owner.
            let rows = as_role(cfg.owner, || {
                rows_with_snapshot(
                    &cfg.locate_query,
                    &[cfg.key_array_type],
                    &[Some(cfg.keys_datum(&missing))],
                    snapshot,
                )
            });
            for r in rows {
                let mut it = r.into_iter();
                let (Some(key), Some(rel), Some(ctid)) = (
                    it.next().flatten(),
                    it.next().flatten().and_then(|o| o.parse::<u32>().ok()),
                    it.next().flatten().and_then(|c| parse_ctid(&c)),
                ) else {
                    continue;
                };
                let rel = pg_sys::Oid::from(rel);
                if let Some(t) = fetch_visible(rel, ctid, snapshot) {
                    fetched.push((key, t, rel));
                }
            }
        }
        if fetched.is_empty() {
            return out;
        }
        let fetched_keys: Vec<String> = fetched.iter().map(|f| f.0.clone()).collect();
        // The children as JSON text, for the text path and for comparing with the children
        // before (computed once, for every fetched key, when first needed).
        let mut children_text: Option<HashMap<String, Option<String>>> = None;
        let mut text_of_children = |key: &str| -> Option<String> {
            let map = children_text.get_or_insert_with(|| {
                if cfg.child_relids.is_empty() {
                    HashMap::new()
                } else if let Some(map) = cfg.children_direct.as_ref().and_then(|direct| {
                    with_output_settings(|| {
                        fetched_keys
                            .iter()
                            .map(|k| Some((k.clone(), children_direct_json(cfg, direct, k, snapshot)?)))
                            .collect::<Option<HashMap<_, _>>>()
                    })
                }) {
                    map
                } else {
                    as_role(cfg.owner, || {
                        rows_with_snapshot(
                            &cfg.children_rows_query,
                            &[cfg.key_array_type],
                            &[Some(cfg.keys_datum(&fetched_keys))],
                            snapshot,
                        )
                    })
                    .into_iter()
                    .filter_map(|r| {
                        let mut it = r.into_iter();
                        let key = it.next().flatten()?;
                        let arrays: Vec<Option<String>> = it.collect();
                        Some((key, cfg.children_json(&arrays)))
                    })
                    .collect::<HashMap<_, _>>()
                }
            });
            map.get(key).cloned().unwrap_or_else(|| cfg.children_json(&[]))
        };
        // The data as jsonb built from the rows directly, unless a column is of a user's type
        // (capture's own SQL writes those) or the children cannot be read directly.
        // (In a database that is not UTF-8, text goes through the text path's conversion.)
        let mut direct_jsonb = !cfg.has_user_types
            && (cfg.child_relids.is_empty() || cfg.children_direct.is_some())
            && pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32;
        // The table's own descriptor: rows stored before an ADD COLUMN ... DEFAULT read that
        // column's default through it, as the trigger's before-image did (a copy would not).
        let root = pg_sys::RelationIdGetRelation(cfg.relid);
        if root.is_null() {
            not_usable("the tracked table no longer exists");
        }
        let root_desc = (*root).rd_att;
        // Each partition's conversion map, with the partition kept open while the map is in
        // use (the map points at its descriptor, which an invalidation taken in by a lock
        // below would otherwise free).
        let mut maps: HashMap<pg_sys::Oid, (pg_sys::Relation, *mut pg_sys::TupleConversionMap)> = HashMap::new();
        let status_att = cfg.status_attnum.unwrap_or(0);
        with_output_settings(|| {
            for (key, tuple, rel) in fetched {
                let root_tuple = if rel == cfg.relid {
                    tuple
                } else {
                    let (_, map) = *maps.entry(rel).or_insert_with(|| {
                        let r = pg_sys::RelationIdGetRelation(rel);
                        if r.is_null() {
                            (r, std::ptr::null_mut())
                        } else {
                            (r, pg_sys::convert_tuples_by_name((*r).rd_att, root_desc))
                        }
                    });
                    if map.is_null() { tuple } else { pg_sys::execute_attr_map_tuple(tuple, map) }
                };
                // The key as the row spells it now (the one the notes use).
                if column_text(root_tuple, root_desc, cfg.key_attnum).as_deref() != Some(key.as_str()) {
                    continue;
                }
                let image = image_digest(root_tuple, root_desc);
                let status = (status_att > 0).then(|| column_text(root_tuple, root_desc, status_att)).flatten();
                let compare_children = touches
                    .get(&key)
                    .is_some_and(|t| t.children_touched && t.existed_before);
                let children_digest = if compare_children {
                    text_of_children(&key).as_deref().map(digest)
                } else {
                    None
                };
                // The data is read only for a row that gives an event (a row that gives none
                // costs no JSON, and a value jsonb cannot hold fails no commit for nothing).
                let touch = touches.get(&key);
                let kind = touch.and_then(|t| net_kind(cfg, t, Some((&image, &status, &children_digest))));
                let status_keys = match (kind, touch) {
                    (Some(Kind::StatusUpdated), Some(t)) => Some((t.orig_status.clone(), status.clone())),
                    _ => None,
                };
                let data = kind.is_some().then(|| {
                    let jsonb = if direct_jsonb {
                        let built = row_jsonb(cfg, root_tuple, root_desc, &key, snapshot, status_keys.as_ref());
                        // Not usable now (DDL since the configuration was read): text from here on.
                        direct_jsonb = built.is_some();
                        built
                    } else {
                        None
                    };
                    match jsonb {
                        Some(bytes) => crate::direct::Data::Jsonb { bytes: std::rc::Rc::new(bytes) },
                        None => {
                            let row = row_json_of(cfg, pg_sys::heap_copy_tuple_as_datum(root_tuple, root_desc));
                            let mut parts = vec![row];
                            parts.extend(text_of_children(&key));
                            crate::direct::Data::Text { parts, extra: None }
                        }
                    }
                });
                out.insert(key, RowAtCommit { data, image, status, children_digest });
            }
        });
        for (r, _) in maps.into_values() {
            if !r.is_null() {
                pg_sys::RelationClose(r);
            }
        }
        pg_sys::RelationClose(root);
    }
    out
}

/// Run `f` in a memory context of its own, deleted afterwards (also on an ERROR, with the
/// transaction's): PostgreSQL allocations made for rows read at commit do not pile up over a
/// transaction of many rows. `f` must return nothing allocated by PostgreSQL.
fn in_temp_context<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let cxt = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"pg_webhooks capture".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let outer = pg_sys::MemoryContextSwitchTo(cxt);
        let result = f();
        pg_sys::MemoryContextSwitchTo(outer);
        pg_sys::MemoryContextDelete(cxt);
        result
    }
}

/// `tuple` with every column of `desc` present: a row stored before an `ADD COLUMN ...
/// DEFAULT` lacks the column, whose value is then the default `desc` records. Completed, it
/// reads the same through any equivalent descriptor (a converted or copied one).
unsafe fn complete(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> pg_sys::HeapTuple {
    let natts = i32::from((*(*tuple).t_data).t_infomask2 & pg_sys::HEAP_NATTS_MASK as u16);
    if natts < (*desc).natts {
        pg_sys::heap_expand_tuple(tuple, desc)
    } else {
        tuple
    }
}

/// A copy of the tuple at `tid` in `rel` if it is visible in `snapshot`.
unsafe fn fetch_visible(
    rel: pg_sys::Oid,
    tid: pg_sys::ItemPointerData,
    snapshot: pg_sys::Snapshot,
) -> Option<pg_sys::HeapTuple> {
    let r = pg_sys::try_relation_open(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if r.is_null() {
        return None;
    }
    let kind = (*(*r).rd_rel).relkind as u8;
    let mut found = None;
    if kind == pg_sys::RELKIND_RELATION {
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        tuple.t_self = tid;
        let mut buffer: pg_sys::Buffer = 0;
        // Unless a subtransaction was rolled back (releasing its locks), this transaction
        // wrote a version in that block and holds a lock on the table since, so vacuum cannot
        // have truncated the table below it; otherwise the block is checked (a read past the
        // end would raise).
        let block = (u32::from(tid.ip_blkid.bi_hi) << 16) | u32::from(tid.ip_blkid.bi_lo);
        let exists = !SUBXACT_ABORTED.with(|a| a.get())
            || block < pg_sys::RelationGetNumberOfBlocksInFork(r, pg_sys::ForkNumber::MAIN_FORKNUM);
        if exists && pg_sys::heap_fetch(r, snapshot, &mut tuple, &mut buffer, false)
        {
            found = Some(complete(pg_sys::heap_copytuple(&mut tuple), (*r).rd_att));
            pg_sys::ReleaseBuffer(buffer);
        }
    }
    pg_sys::relation_close(r, pg_sys::NoLock as pg_sys::LOCKMODE);
    found
}

/// Whether `tuple` (of `rel`, the tracked table or one of its partitions) was written by this
/// transaction and has the key `key`.
unsafe fn own_version_of(cfg: &TableConfig, tuple: pg_sys::HeapTuple, rel: pg_sys::Oid, key: &str) -> bool {
    let xmin = (*(*tuple).t_data).t_choice.t_heap.t_xmin;
    if !pg_sys::TransactionIdIsCurrentTransactionId(xmin) {
        return false;
    }
    let key_att = attnum_in(cfg.relid, cfg.key_attnum, rel);
    key_att > 0
        && with_relation(rel, |r| column_text(tuple, (*r).rd_att, key_att))
            .flatten()
            .as_deref()
            == Some(key)
}

/// `(block,offset)` as `tid` output writes it.
fn parse_ctid(s: &str) -> Option<pg_sys::ItemPointerData> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    let (b, o) = inner.split_once(',')?;
    let (block, offset) = (b.parse::<u32>().ok()?, o.parse::<u16>().ok()?);
    let mut tid: pg_sys::ItemPointerData = unsafe { std::mem::zeroed() };
    tid.ip_blkid.bi_hi = (block >> 16) as u16;
    tid.ip_blkid.bi_lo = (block & 0xffff) as u16;
    tid.ip_posid = offset;
    Some(tid)
}

fn insert_events(events: Vec<NewEvent>) {
    let mut rows = Vec::with_capacity(events.len());
    for e in events {
        let mapped = e
            .mapped_status
            .as_deref()
            .and_then(|status| mapped_event_type(&e.entity, status));
        if let Some(event_type) = mapped {
            rows.push(crate::direct::EventRow {
                event_type: e.event_type,
                entity: e.entity.clone(),
                key: e.key.clone(),
                data: e.data.clone(),
            });
            rows.push(crate::direct::EventRow {
                event_type,
                entity: e.entity,
                key: e.key,
                data: e.data,
            });
        } else {
            rows.push(crate::direct::EventRow {
                event_type: e.event_type,
                entity: e.entity,
                key: e.key,
                data: e.data,
            });
        }
    }
    crate::direct::insert_events(&rows);
}

thread_local! {
    /// `webhooks.status_events` as (entity, status) -> event type, loaded when first needed
    /// and dropped when the table changes (its statement trigger invalidates its relcache
    /// entry, which every backend hears of).
    static STATUS_EVENTS: RefCell<Option<HashMap<(String, String), String>>> = const { RefCell::new(None) };
    static STATUS_EVENTS_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// The lifecycle event type `webhooks.status_events` maps this entity's status to.
fn mapped_event_type(entity: &str, status: &str) -> Option<String> {
    register_invalidation_callback();
    if STATUS_EVENTS.with(|m| m.borrow().is_none()) {
        let generation = GENERATION.with(|g| g.get());
        let relid = unsafe {
            pg_sys::get_relname_relid(
                c"status_events".as_ptr(),
                pg_sys::get_namespace_oid(c"webhooks".as_ptr(), false),
            )
        };
        STATUS_EVENTS_RELID.with(|r| r.set(relid));
        let map = as_capture_role(|| {
            Spi::connect(|c| {
                let mut map = HashMap::new();
                for r in c.select(
                    "SELECT s.entity, s.status, s.event_type FROM webhooks.status_events s",
                    None,
                    &[],
                )? {
                    if let (Some(e), Some(st), Some(t)) =
                        (r.get::<String>(1)?, r.get::<String>(2)?, r.get::<String>(3)?)
                    {
                        map.insert((e, st), t);
                    }
                }
                Ok::<_, pgrx::spi::Error>(map)
            })
        })
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("pg_webhooks: {e}")));
        let found = map.get(&(entity.to_string(), status.to_string())).cloned();
        // Changed while loading: use it this once, load it again next time.
        if GENERATION.with(|g| g.get()) == generation {
            STATUS_EVENTS.with(|m| *m.borrow_mut() = Some(map));
        }
        return found;
    }
    STATUS_EVENTS.with(|m| {
        m.borrow()
            .as_ref()
            .and_then(|map| map.get(&(entity.to_string(), status.to_string())).cloned())
    })
}

/// AFTER ... FOR EACH STATEMENT on `webhooks.status_events`: every backend's cached copy of
/// the table is dropped when this transaction commits.
#[pg_trigger]
fn _status_events_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    unsafe {
        pg_sys::CacheInvalidateRelcacheByRelid((*trigger.trigger_data().tg_relation).rd_id);
    }
    Ok(None)
}

/// A `jsonb` argument kept as PostgreSQL's datum and handed on as it is. pgrx's `JsonB` parses
/// the value with serde_json, whose nesting limit (128) is far below jsonb's: a deeper document
/// was an internal error (XX000) instead of an event.
pub struct RawJsonb(pg_sys::Datum);

impl RawJsonb {
    /// The datum as the caller passed it (possibly toasted).
    pub fn datum(&self) -> pg_sys::Datum {
        self.0
    }

    /// Whether the document is a JSON object (its root container's header says so).
    fn is_object(&self) -> bool {
        // SAFETY: the datum is a jsonb argument of the running call; detoasting gives a
        // palloc'd copy (or the value itself) whose header is always present.
        unsafe {
            let jb = pg_sys::pg_detoast_datum(self.0.cast_mut_ptr()) as *const pg_sys::Jsonb;
            (*jb).root.header & pg_sys::JB_FOBJECT != 0
        }
    }

    /// The document as text (jsonb's output function).
    pub fn to_text(&self) -> String {
        // SAFETY: jsonb_out takes the jsonb datum of the running call and returns a C string.
        unsafe { pgrx::direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(self.0)]) }
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl pgrx::FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<RawJsonb> {
        (!is_null).then_some(RawJsonb(datum))
    }
}

impl pgrx::IntoDatum for RawJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: unboxed through FromDatum above, which only keeps the datum of a jsonb argument.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for RawJsonb {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                "a jsonb argument must not be NULL",
            )
        })
    }
    unsafe fn unbox_nullable_arg(
        arg: pgrx::callconv::Arg<'_, 'fcx>,
    ) -> pgrx::nullable::Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

pgrx::impl_sql_translatable!(RawJsonb, arg_only = "jsonb");

/// emit's statements, and the one that gives its events their seqs at commit (kept plans).
const EMIT_TRACKED: &str = "SELECT t.relid FROM webhooks._tracked t WHERE t.entity = $1";
const EMIT_INSERT: &str =
    "INSERT INTO webhooks._events (type, entity, key, data) VALUES ($1, $2, $3, $4) RETURNING id, seq";
const EMIT_RESEQ: &str = "WITH n AS (
    SELECT o.old, pg_catalog.nextval('webhooks._events_seq_seq'::pg_catalog.regclass) AS new
      FROM pg_catalog.unnest($1::int8[]) WITH ORDINALITY AS o(old, ord)
)
UPDATE webhooks._events e SET seq = n.new FROM n WHERE e.seq = n.old";

/// Longest key `emit` takes.
const MAX_EMIT_KEY_BYTES: usize = 1024;

/// `webhooks.emit()`: an event that is not a row change (inventory, products, reviews, ...).
#[pg_extern(volatile, parallel_unsafe)]
fn emit(
    event_type: Option<&str>,
    data: Option<RawJsonb>,
    key: default!(Option<&str>, "NULL"),
) -> pgrx::Uuid {
    // Not STRICT (key may be NULL): a NULL type or data is refused here, not a NULL result.
    let (Some(event_type), Some(data)) = (event_type, data) else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "event_type and data must not be NULL",
        )
    };
    if !crate::patterns::is_event_type(event_type) {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("invalid event type \"{event_type}\""),
            "An event type is dotted lowercase words, e.g. inventory.adjusted.",
        );
    }
    // The key is part of every delivery's ordering key, which is indexed: a key of many
    // kilobytes would make fan-out (and replay) fail for every event behind it.
    if key.is_some_and(|k| k.len() > MAX_EMIT_KEY_BYTES) {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("an event key has at most {MAX_EMIT_KEY_BYTES} bytes"),
            "Events are ordered per key: use the id of the thing the event is about, e.g. a SKU.",
        );
    }
    if !data.is_object() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "event data must be a JSON object",
        );
    }
    let entity = event_type.split('.').next().unwrap_or_default().to_string();
    // Events of one key are delivered in commit order, and their order is their seq: an emit
    // for a key serializes with every other writer of that key, so the later seq always
    // belongs to the later commit. For a tracked entity whose row exists, that is the row's
    // lock (which the row's writers take too); otherwise a lock of the extension's own on the
    // key (a user lock, which no SQL but this takes: only a caller of emit can hold a key's
    // emits up).
    let row_locked = key.is_some_and(|k| lock_tracked_row(&entity, k));
    if let (Some(key), false) = (key, row_locked) {
        lock_emit_key(&entity, key);
    }
    let id = as_capture_role(|| {
        with_plan(EMIT_INSERT, &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::JSONBOID], |plan| {
            Spi::connect_mut(|c| {
                c.update(plan, Some(1), &[event_type.into(), entity.into(), key.into(), data.into()])?
                    .first()
                    .get_two::<pgrx::Uuid, i64>()
            })
        })
    })
    .ok()
    .and_then(|(id, seq)| Some((id?, seq?)))
    .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "pg_webhooks: emit failed"));
    EMITTED.with(|e| e.borrow_mut().push(id.1));
    let id = id.0;
    wake_worker_at_commit(Wake::Events);
    id
}

/// Serializes the emits of one entity's key until commit: `emit`'s user lock, numbered by 48
/// bits of the SHA-256 of `entity:key` (two keys that share them wait for each other, no more).
fn lock_emit_key(entity: &str, key: &str) {
    use sha2::Digest as _;
    let h = sha2::Sha256::new().chain_update(entity).chain_update(":").chain_update(key).finalize();
    crate::locks::for_transaction(
        crate::locks::EMIT_CLASS,
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        u16::from_le_bytes([h[4], h[5]]),
    );
}

/// Locks the row of a tracked table of `entity` with key `key` as its writers do; false if
/// no tracked table has that entity or the row does not exist.
fn lock_tracked_row(entity: &str, key: &str) -> bool {
    let relid = as_capture_role(|| {
        with_plan(EMIT_TRACKED, &[pg_sys::TEXTOID], |plan| {
            Spi::connect(|c| c.select(plan, Some(1), &[entity.into()])?.first().get_one::<pg_sys::Oid>())
        })
    })
    .ok()
    .flatten();
    let Some(cfg) = relid.and_then(config_for) else {
        return false;
    };
    // Only for a caller who may update the row (locking it is what an update does first).
    if unsafe {
        pg_sys::pg_class_aclcheck(
            cfg.relid,
            pg_sys::GetUserId(),
            pg_sys::ACL_UPDATE as pg_sys::AclMode,
        )
    } != pg_sys::AclResult::ACLCHECK_OK
    {
        return false;
    }
    // Only keys that are surely valid input for the key's type (anything else would make the
    // lock query fail): the others fall back to the key's own lock (`lock_emit_key`).
    let valid = match cfg.key_type_oid {
        t if t == pg_sys::TEXTOID || t == pg_sys::VARCHAROID => true,
        t if t == pg_sys::INT8OID => key.parse::<i64>().is_ok(),
        t if t == pg_sys::INT4OID => key.parse::<i32>().is_ok(),
        t if t == pg_sys::INT2OID => key.parse::<i16>().is_ok(),
        t if t == pg_sys::UUIDOID => {
            key.len() == 36
                && key.char_indices().all(|(i, c)| {
                    if matches!(i, 8 | 13 | 18 | 23) {
                        c == '-'
                    } else {
                        c.is_ascii_hexdigit()
                    }
                })
        }
        _ => false,
    };
    if !valid {
        return false;
    }
    let Some(arg) = cfg.key_datum(key) else {
        return false;
    };
    as_role(cfg.owner, || {
        let latest = LatestSnapshot::push();
        !rows_with_snapshot(
            &cfg.lock_query,
            &[cfg.key_type_oid],
            &[Some(arg)],
            latest.get(),
        )
        .is_empty()
    })
}

/// Lets SQL functions (send_test, redeliver, replay, resume) wake the worker at commit.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_worker_at_commit() {
    wake_worker_at_commit(Wake::Queue);
}
