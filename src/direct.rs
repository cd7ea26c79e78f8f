//! Writing events without the executor: capture's commit path inserts its events straight into
//! `webhooks._events` (heap and indexes), as logical replication's apply does, instead of
//! planning and starting a query for every commit. The table is the extension's own and has
//! no triggers, rules or policies of anybody's; nothing but the insert and its index entries
//! happens, under the same WAL and locking as an `INSERT`.

use crate::error::raise;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::ffi::CString;
use std::rc::Rc;

/// One row of `webhooks._events` to write.
pub struct EventRow {
    pub event_type: String,
    pub entity: String,
    pub key: String,
    pub data: Data,
}

/// A status change's two keys: `previous_status` and `status` (text, or null).
pub type Extra = (Option<String>, Option<String>);

/// An event's data, an object: JSON object texts merged in order (a key that appears again
/// takes its later value), then the status change's keys, if any, over them; or a jsonb built
/// from the rows (`crate::jsonb`, its bytes), a status change's keys built in (see
/// `capture::row_jsonb`).
#[derive(Clone)]
pub enum Data {
    Text { parts: Vec<String>, extra: Option<Extra> },
    Jsonb { bytes: Rc<Vec<u8>> },
}

impl Data {

    /// The same value as `other` (a status change and its mapped event share theirs).
    fn same(&self, other: &Data) -> bool {
        match (self, other) {
            (Data::Text { parts: a, extra: x }, Data::Text { parts: b, extra: y }) => a == b && x == y,
            (Data::Jsonb { bytes: a }, Data::Jsonb { bytes: b }) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The value as a jsonb Datum, palloc'd in the current memory context.
    pub(crate) unsafe fn datum(&self) -> pg_sys::Datum {
        match self {
            Data::Text { parts, extra } => {
                let extra = extra.as_ref().map(|(previous, status)| {
                    serde_json::json!({"previous_status": previous, "status": status}).to_string()
                });
                let mut all: Vec<Option<&str>> = parts.iter().map(|p| Some(p.as_str())).collect();
                all.push(extra.as_deref());
                let json = CString::new(merge_objects(&all)).unwrap_or_else(|_| {
                    raise(
                        PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
                        "pg_webhooks: event data has a NUL byte",
                    )
                });
                pg_sys::OidInputFunctionCall(
                    pg_sys::Oid::from(pg_sys::F_JSONB_IN),
                    json.as_ptr().cast_mut(),
                    pg_sys::JSONBOID,
                    -1,
                )
            }
            Data::Jsonb { bytes } => crate::jsonb::from_bytes(bytes),
        }
    }
}

/// One JSON object from several (each valid JSON object text), in order: a key that appears
/// again takes its later value (jsonb keeps the last of duplicate keys), as `a || b || c`.
pub fn merge_objects(parts: &[Option<&str>]) -> String {
    let mut out = String::from("{");
    for part in parts.iter().flatten() {
        let inner = part.trim();
        let inner = inner
            .strip_prefix('{')
            .and_then(|p| p.strip_suffix('}'))
            .unwrap_or("")
            .trim();
        if inner.is_empty() {
            continue;
        }
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(inner);
    }
    out.push('}');
    out
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

unsafe extern "C-unwind" {
    /// commands/sequence.h: `nextval()` without its privilege check (the sequence is the
    /// extension's own, written only here and by emit, as the table is). Called through
    /// pgrx's guard (`nextval_unchecked`): it may raise.
    #[link_name = "nextval_internal"]
    fn raw_nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

unsafe fn nextval_unchecked(relid: pg_sys::Oid) -> i64 {
    pg_sys::ffi::pg_guard_ffi_boundary(|| raw_nextval_internal(relid, false))
}

unsafe extern "C-unwind" {
    /// access/toast_internals.h (not in pgrx's bindings): the value compressed with `cmethod`
    /// (or `default_toast_compression` when that is not a method), or NULL when that saves
    /// nothing. Called through pgrx's guard: it may raise (out of memory).
    #[link_name = "toast_compress_datum"]
    fn raw_toast_compress_datum(value: pg_sys::Datum, cmethod: std::ffi::c_char) -> pg_sys::Datum;
}

/// An event's data of at least this many bytes is stored compressed even though PostgreSQL
/// compresses a value only in a row of over 2 kB (`TOAST_TUPLE_THRESHOLD`). An order with its
/// items is some 550 bytes of jsonb and about 330 compressed (lz4): every event row, and the
/// WAL a commit must flush, is that much smaller, and a durable commit's flush takes longer the
/// more it writes. Below it, what compression would save is small next to what it costs.
const COMPRESS_DATA_FROM: usize = 256;

/// Data this long or longer makes a row PostgreSQL's toaster compresses (and, if need be, moves
/// out of line) in `heap_insert` itself, by the same column's method: it is left to it, so that
/// a large value that does not compress is not tried twice (only data within the other
/// columns' ~100 bytes of this may be). `TOAST_TUPLE_THRESHOLD`: `MaximumBytesPerTuple(4)`,
/// 2032 for 8 kB pages.
const TOAST_TUPLE_THRESHOLD: usize = ((pg_sys::BLCKSZ as usize - 40) / 4) & !7;

/// `data` compressed inline by `_events.data`'s column compression method (the extension sets
/// it to lz4 where the server has lz4), if the column has one, when it is a plain
/// value of `COMPRESS_DATA_FROM` to `TOAST_TUPLE_THRESHOLD` bytes and compression makes it
/// smaller; otherwise `data` itself. Reading it back (any SQL, `::text`, the worker)
/// decompresses it as it does any compressed value. Allocated in the current memory context.
unsafe fn compressed_data(data: pg_sys::Datum, cmethod: std::ffi::c_char) -> pg_sys::Datum {
    // No method on the column (a server without lz4, or an update that could not set it):
    // stored as PostgreSQL would, not with default_toast_compression's pglz (slower, and not
    // measured here). A DBA may set either method on the column.
    if cmethod == 0 {
        return data;
    }
    // Only an uncompressed value with a 4-byte header (as the jsonb writer makes); never one
    // already compressed, stored out of line or with a short header.
    let v = data.cast_mut_ptr::<pg_sys::varlena>();
    if !pgrx::varlena::varatt_is_4b_u(v) {
        return data;
    }
    let size = pgrx::varlena::varsize_4b(v);
    if !(COMPRESS_DATA_FROM..TOAST_TUPLE_THRESHOLD).contains(&size) {
        return data;
    }
    let compressed = pg_sys::ffi::pg_guard_ffi_boundary(|| raw_toast_compress_datum(data, cmethod));
    if compressed.is_null() {
        data
    } else {
        compressed
    }
}

thread_local! {
    /// `webhooks._events` and its sequence, looked up by name once per backend and forgotten on
    /// a relcache invalidation of either (`forget_event_relids`, from capture's callback): a
    /// dropped and recreated extension has new ones.
    static EVENT_RELIDS: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { std::cell::Cell::new(None) };
}

/// Called for every relcache invalidation (InvalidOid: all of them).
pub(crate) fn forget_event_relids(relid: pg_sys::Oid) {
    EVENT_RELIDS.with(|c| {
        if let Some((table, seq)) = c.get() {
            if relid == pg_sys::InvalidOid || relid == table || relid == seq {
                c.set(None);
            }
        }
    });
}

/// `webhooks._events` opened with RowExclusiveLock, and its sequence. The kept relids are used
/// only while no invalidation of either has come in, the lock taken (which takes invalidations
/// in) included. Otherwise the name is resolved as PostgreSQL resolves a table's name for a
/// statement (as `RangeVarGetRelidExtended` does: looked up and locked until no invalidation
/// came in between), so that a table renamed or replaced while this waited for its lock is not used,
/// and the result kept if the sequence's lookup took in no invalidation either. (That last
/// check has no test: it needs an invalidation to arrive during a catalog lookup.)
unsafe fn open_events() -> (pg_sys::Relation, pg_sys::Oid) {
    crate::capture::register_invalidation_callback();
    let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    let counter = || pg_sys::SharedInvalidMessageCounter;
    if let Some(kept) = EVENT_RELIDS.with(|c| c.get()) {
        let rel = pg_sys::try_relation_open(kept.0, mode);
        if !rel.is_null() {
            if EVENT_RELIDS.with(|c| c.get()) == Some(kept) {
                return (usable(rel), kept.1);
            }
            // An invalidation of one of them (autovacuum's statistics send them too) came in
            // with the lock: if the name still names the locked table, the lock is kept.
            let before = counter();
            let found = (relid_of(c"webhooks", c"_events"), relid_of(c"webhooks", c"_events_seq_seq"));
            if found.0 == kept.0 {
                // Kept again only if the lookups themselves took in nothing.
                let undisturbed = counter() == before;
                EVENT_RELIDS.with(|c| c.set(undisturbed.then_some(found)));
                return (usable(rel), found.1);
            }
            pg_sys::relation_close(rel, mode);
        }
    }
    // RangeVarGetRelidExtended's loop, without its check of USAGE on the schema (the writing
    // role has none): looked up, locked, and looked up again until no invalidation came in
    // between or the name still gives the locked table.
    let mut locked = pg_sys::InvalidOid;
    loop {
        let before = counter();
        let table = relid_of(c"webhooks", c"_events");
        if locked != pg_sys::InvalidOid {
            if table == locked {
                break;
            }
            pg_sys::UnlockRelationOid(locked, mode);
        }
        pg_sys::LockRelationOid(table, mode);
        locked = table;
        if counter() == before {
            break;
        }
    }
    let table = locked;
    // From the lock on: opening the relation may take in invalidations too (catalog locks).
    let before = counter();
    let rel = pg_sys::relation_open(table, pg_sys::NoLock as pg_sys::LOCKMODE);
    let seq = relid_of(c"webhooks", c"_events_seq_seq");
    let undisturbed = counter() == before;
    EVENT_RELIDS.with(|c| c.set(undisturbed.then_some((table, seq))));
    (usable(rel), seq)
}

/// `rel` if it is a plain table (what the direct insert writes); an error otherwise (a view or
/// a partitioned table put in its place has no storage of its own to insert into).
unsafe fn usable(rel: pg_sys::Relation) -> pg_sys::Relation {
    if (*(*rel).rd_rel).relkind as u8 != pg_sys::RELKIND_RELATION {
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        EVENT_RELIDS.with(|c| c.set(None));
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "pg_webhooks: webhooks._events is not a plain table",
        );
    }
    rel
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

thread_local! {
    /// This process's key for event ids and how many it has made: (pid, key, counter).
    static UUID_KEY: std::cell::Cell<Option<(u32, [u8; 32], u64)>> = const { std::cell::Cell::new(None) };
}

/// A version 4 (random) UUID, as `gen_random_uuid()` makes it, from a keyed hash: SHA-256 of
/// a 256-bit key of this process's (from the operating system's random source, taken again in
/// a new process) and a counter. OpenSSL's generator, which `gen_random_uuid()` calls, took
/// 3 to 7 µs a call here, a few percent of a tracked transaction; this takes a fraction of one.
fn random_uuid() -> pg_sys::Datum {
    use sha2::Digest as _;
    // PostgreSQL's own copy of the pid (std's asks the kernel each time).
    let pid = unsafe { pg_sys::MyProcPid } as u32;
    let (key, n) = UUID_KEY.with(|k| {
        let (key, n) = match k.get() {
            Some((p, key, n)) if p == pid => (key, n),
            _ => {
                let mut key = [0u8; 32];
                if getrandom::getrandom(&mut key).is_err() {
                    raise(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        "pg_webhooks: could not generate random values",
                    );
                }
                (key, 0)
            }
        };
        k.set(Some((pid, key, n + 1)));
        (key, n)
    });
    let mut h = sha2::Sha256::new();
    h.update(key);
    h.update(n.to_le_bytes());
    let out = h.finalize();
    unsafe {
        let p = pg_sys::palloc(16) as *mut u8;
        let bytes = std::slice::from_raw_parts_mut(p, 16);
        bytes.copy_from_slice(&out[..16]);
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
        let (rel, seq_relid) = open_events();
        let desc = (*rel).rd_att;
        let cols = columns(desc);
        let natts = (*desc).natts as usize;
        let cmethod = (*desc).attrs.as_slice(natts)[cols.data].attcompression;
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let xid = pg_sys::GetTopFullTransactionId().value;
        let now = pg_sys::GetCurrentTimestamp();
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
        let mut last_data: Option<(&Data, pg_sys::Datum)> = None;
        for row in rows {
            let outer = pg_sys::MemoryContextSwitchTo(per_row);
            // No privilege check (the extension's own sequence; it checked USAGE as the capture
            // role before, which had it): a percent of a tracked status update.
            let seq = pg_sys::Datum::from(nextval_unchecked(seq_relid));
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
                Some((same, datum)) if same.same(&row.data) => datum,
                _ => {
                    pg_sys::MemoryContextReset(per_data);
                    pg_sys::MemoryContextSwitchTo(per_data);
                    let datum = compressed_data(row.data.datum(), cmethod);
                    pg_sys::MemoryContextSwitchTo(per_row);
                    last_data = Some((&row.data, datum));
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
