//! Event data built as `jsonb` straight from the rows read at commit, as `to_jsonb` builds it,
//! instead of JSON text from `row_to_json` that `jsonb_in` then parses again (the two were a
//! tenth of a tracked status update's CPU). The result is the same `jsonb` value: every column
//! goes through `to_jsonb`'s own rules, with a short path for the types whose conversion
//! `to_jsonb` does in one step (booleans, integers, numerics, text, dates and timestamps).
//!
//! The value is written in jsonb's binary format by this module (`Builder`), byte for byte
//! what PostgreSQL's `convertToJsonb` writes (unit tests compare the bytes with `to_jsonb`'s).
//! Column values are referenced, not copied, until `finish`: they, and what the conversions
//! palloc, must live in a memory context that outlives it (the caller's current one). Keys and
//! `string_or_null`'s strings are copied.

use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;

/// A value of the container being built. Strings and numerics point into PostgreSQL's memory
/// (see the module's comment); a finished nested container is bytes in `Builder::blob`.
#[derive(Clone, Copy)]
enum Val {
    Null,
    Bool(bool),
    /// UTF-8 bytes.
    Str(*const u8, usize),
    /// A numeric varlena with its 4-byte header, `VARSIZE` bytes long.
    Num(*const u8, usize),
    /// A container's bytes (header, entries, data), serialized from a 4-byte aligned start:
    /// in `Builder::blob` (start, length), or elsewhere (a jsonb's root).
    Built(usize, usize),
    Raw(*const u8, usize),
    /// A string copied into `Builder::keys` (start, length).
    Copied(usize, usize),
    /// An integer, written as the numeric `int64_to_numeric` makes of it.
    Int(i64),
}

/// An open object or array: its keys (offsets and lengths into `Builder::keys`) and values.
struct Frame {
    object: bool,
    keys: Vec<(usize, usize)>,
    vals: Vec<Val>,
    /// Where in the blob this container's nested containers begin (4-byte aligned): once it
    /// is written, it is moved down to here over them (it holds copies of them).
    blob_start: usize,
}

/// A `jsonb` object written in jsonb's binary format directly (as `convertToJsonb` in
/// PostgreSQL's jsonb_util.c writes it: object keys sorted by length then bytes, the last of
/// duplicate keys kept, every 32nd entry an offset, numerics and containers 4-byte aligned),
/// without building PostgreSQL's in-memory tree first (`pushJsonbValue`, which sorts every
/// object again and copies every key), a few microseconds of every tracked commit.
pub struct Builder {
    stack: Vec<Frame>,
    keys: Vec<u8>,
    blob: Vec<u8>,
    /// Whether the session's time zone is UTC (see `utc_timestamptz`), once a timestamptz
    /// asked.
    utc: Option<bool>,
}

/// The longest string a jsonb holds (JENTRY_OFFLENMASK): past it, the same error as
/// `to_jsonb` and `jsonb_in` raise.
const MAX_STRING: usize = pg_sys::JENTRY_OFFLENMASK as usize;

fn too_long(what: &str) -> ! {
    crate::error::raise(
        pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        &format!("total size of jsonb {what} elements exceeds the maximum of {MAX_STRING} bytes"),
    )
}

fn string_value(ptr: *const u8, len: usize) -> Val {
    if len > MAX_STRING {
        crate::error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            &format!("string too long to represent as jsonb string ({len} bytes)"),
        );
    }
    Val::Str(ptr, len)
}

/// A row's values and null flags (`heap_deform_tuple`), handed to `f`: on the stack for rows
/// of up to 64 columns (two allocations fewer for each row read, in the trigger and at commit).
pub(crate) unsafe fn with_deformed<R>(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    f: impl FnOnce(&[pg_sys::Datum], &[bool]) -> R,
) -> R {
    const ON_STACK: usize = 64;
    let natts = (*desc).natts as usize;
    if natts <= ON_STACK {
        let mut values = [pg_sys::Datum::from(0usize); ON_STACK];
        let mut nulls = [false; ON_STACK];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        f(&values[..natts], &nulls[..natts])
    } else {
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        f(&values, &nulls)
    }
}

/// `pg_detoast_datum_packed` without calling it for a value stored plainly, as most are (it
/// returns those as they are): only a compressed or out-of-line value needs it.
pub(crate) unsafe fn detoast_packed(v: *mut pg_sys::varlena) -> *mut pg_sys::varlena {
    if pgrx::varlena::varatt_is_4b_c(v) || pgrx::varlena::varatt_is_1b_e(v) {
        pg_sys::pg_detoast_datum_packed(v)
    } else {
        v
    }
}

/// The Julian day numbers of 0001-01-01 and 9999-12-31.
const FIRST_FOUR_DIGIT_JDATE: i64 = 1_721_426;
const LAST_FOUR_DIGIT_JDATE: i64 = 5_373_484;

/// PostgreSQL's `j2date` (datetime.c): year, month, day of a Julian day number.
fn j2date(jd: u32) -> (u32, u32, u32) {
    let mut julian = jd + 32044;
    let mut quad = julian / 146_097;
    let extra = (julian - quad * 146_097) * 4 + 3;
    julian += 60 + quad * 3 + extra / 146_097;
    quad = julian / 1461;
    julian -= quad * 1461;
    let mut y = julian * 4 / 1461;
    julian = if y != 0 { (julian + 305) % 365 } else { (julian + 306) % 366 } + 123;
    y += quad * 4;
    let quad = julian * 2141 / 65536;
    (y - 4800, (quad + 10) % 12 + 1, julian - 7834 * quad / 256)
}

/// A timestamptz (microseconds since 2000-01-01 UTC) as `to_jsonb` writes it in a session whose
/// time zone is UTC (`JsonEncodeDateTime`: `2026-12-07T16:53:07.25+00:00`, the fraction without
/// trailing zeros), appended to `out`, for the years 1 to 9999; false for any other (the
/// infinities, BC, five-digit years), which PostgreSQL's own function writes. Converting the
/// time zone took most of a microsecond a timestamp; in UTC there is nothing to convert.
pub(crate) fn utc_timestamptz(ts: i64, out: &mut Vec<u8>) -> bool {
    const USECS_PER_DAY: i64 = 86_400_000_000;
    const POSTGRES_EPOCH_JDATE: i64 = 2_451_545;
    let date = ts.div_euclid(USECS_PER_DAY) + POSTGRES_EPOCH_JDATE;
    if !(FIRST_FOUR_DIGIT_JDATE..=LAST_FOUR_DIGIT_JDATE).contains(&date) {
        return false;
    }
    let time = ts.rem_euclid(USECS_PER_DAY);
    let (year, month, day) = j2date(date as u32);
    let (hour, minute) = (time / 3_600_000_000, time / 60_000_000 % 60);
    let (sec, fsec) = (time / 1_000_000 % 60, time % 1_000_000);
    let two = |out: &mut Vec<u8>, n: i64| out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]);
    two(out, i64::from(year / 100));
    two(out, i64::from(year % 100));
    out.push(b'-');
    two(out, i64::from(month));
    out.push(b'-');
    two(out, i64::from(day));
    out.push(b'T');
    two(out, hour);
    out.push(b':');
    two(out, minute);
    out.push(b':');
    two(out, sec);
    if fsec != 0 {
        out.push(b'.');
        let digits = [100_000, 10_000, 1_000, 100, 10, 1].map(|p| b'0' + (fsec / p % 10) as u8);
        let keep = 6 - digits.iter().rev().take_while(|d| **d == b'0').count();
        out.extend_from_slice(&digits[..keep]);
    }
    out.extend_from_slice(b"+00:00");
    true
}

fn pad_to_int(b: &mut Vec<u8>) {
    while b.len() % 4 != 0 {
        b.push(0);
    }
}

impl Builder {
    pub unsafe fn object() -> Builder {
        // The blob begins with the varlena header's 4 bytes, set by `finish`.
        Builder {
            stack: vec![Frame { object: true, keys: Vec::with_capacity(16), vals: Vec::with_capacity(16), blob_start: 4 }],
            keys: Vec::with_capacity(256),
            // Room for an order with a few items without growing (each growth a copy).
            blob: {
                let mut b = Vec::with_capacity(1024);
                b.extend_from_slice(&[0; 4]);
                b
            },
            utc: None,
        }
    }

    fn open(&mut self, object: bool) {
        pad_to_int(&mut self.blob);
        let blob_start = self.blob.len();
        self.stack.push(Frame { object, keys: Vec::with_capacity(8), vals: Vec::with_capacity(8), blob_start });
    }

    fn top(&mut self) -> &mut Frame {
        self.stack.last_mut().expect("an open container")
    }

    fn push(&mut self, v: Val) {
        self.top().vals.push(v);
    }

    /// A key, copied.
    pub unsafe fn key(&mut self, key: &[u8]) {
        if key.len() > MAX_STRING {
            string_value(key.as_ptr(), key.len());
        }
        let at = self.keys.len();
        self.keys.extend_from_slice(key);
        self.top().keys.push((at, key.len()));
    }

    /// A string value (or null), copied.
    pub unsafe fn string_or_null(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                string_value(s.as_ptr(), s.len());
                if self.keys.try_reserve(s.len()).is_err() {
                    crate::error::raise(pgrx::PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY, "out of memory");
                }
                let at = self.keys.len();
                self.keys.extend_from_slice(s.as_bytes());
                self.push(Val::Copied(at, s.len()));
            }
            None => self.push(Val::Null),
        }
    }

    pub unsafe fn begin_array(&mut self) {
        self.open(false);
    }

    pub unsafe fn end_array(&mut self) {
        self.close();
    }

    /// The innermost open container, written to the blob (in place of its nested containers,
    /// which it has copied) and added to its parent's values.
    fn close(&mut self) {
        let frame = self.stack.pop().expect("an open container");
        let len = self.write_down(&frame);
        self.push(Val::Built(frame.blob_start, len));
    }

    /// `frame` written at the blob's end, then moved down to its `blob_start` over what it
    /// copied; its length.
    fn write_down(&mut self, frame: &Frame) -> usize {
        let at = self.write(frame);
        let len = self.blob.len() - at;
        if at != frame.blob_start {
            self.blob.copy_within(at.., frame.blob_start);
        }
        self.blob.truncate(frame.blob_start + len);
        len
    }

    /// Room for `more` bytes in the blob, or an ERROR (not the abort a failed allocation is).
    fn reserve(&mut self, more: usize) {
        if self.blob.try_reserve(more).is_err() && self.blob.try_reserve_exact(more).is_err() {
            crate::error::raise(pgrx::PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY, "out of memory");
        }
    }

    /// A nested container copied to `copy` (its padding from `before`): PostgreSQL checks its
    /// length with the padding in front of it (`convertJsonbObject`'s base offset is taken
    /// before it pads), which only its place in the parent tells.
    fn nested_fits(&self, copy: usize, before: usize) {
        if self.blob.len() - before > MAX_STRING {
            let header = u32::from_ne_bytes(self.blob[copy..copy + 4].try_into().expect("a header"));
            too_long(if header & pg_sys::JB_FOBJECT != 0 { "object" } else { "array" });
        }
    }

    /// A row as an object (an array element): `to_jsonb` of the row.
    pub unsafe fn row_element(&mut self, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) {
        self.open(true);
        self.columns(tuple, desc);
        self.close();
    }

    /// The row's columns as keys of the object being built (`to_jsonb` of the row, inlined).
    pub unsafe fn columns(&mut self, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) {
        with_deformed(tuple, desc, |values, nulls| {
            let attrs = (*desc).attrs.as_slice(values.len());
            for (i, att) in attrs.iter().enumerate() {
                if att.attisdropped {
                    continue;
                }
                // Copied: a relation's descriptor may be rebuilt before `finish`.
                let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr());
                self.key(name.to_bytes());
                let v = self.value(values[i], nulls[i], att.atttypid);
                self.push(v);
            }
        })
    }

    /// One column's value, as `to_jsonb` converts a value of type `typid`.
    unsafe fn value(&mut self, d: pg_sys::Datum, isnull: bool, typid: pg_sys::Oid) -> Val {
        if isnull {
            return Val::Null;
        }
        match typid {
            pg_sys::BOOLOID => Val::Bool(d.value() != 0),
            pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => {
                let n = match typid {
                    pg_sys::INT2OID => d.value() as i16 as i64,
                    pg_sys::INT4OID => d.value() as i32 as i64,
                    _ => d.value() as i64,
                };
                Val::Int(n)
            }
            pg_sys::NUMERICOID => {
                let n = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as pg_sys::Numeric;
                if pg_sys::numeric_is_nan(n) || pg_sys::numeric_is_inf(n) {
                    return self.generic(d, typid);
                }
                numeric_value(n)
            }
            pg_sys::TEXTOID | pg_sys::VARCHAROID => {
                let t = detoast_packed(d.cast_mut_ptr());
                string_value(pgrx::varlena::vardata_any(t).cast(), pgrx::varlena::varsize_any_exhdr(t))
            }
            pg_sys::TIMESTAMPTZOID if self.utc() => {
                let at = self.keys.len();
                if utc_timestamptz(d.value() as i64, &mut self.keys) {
                    return Val::Copied(at, self.keys.len() - at);
                }
                let s = pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), d, typid, std::ptr::null());
                string_value(s.cast(), std::ffi::CStr::from_ptr(s).to_bytes().len())
            }
            pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => {
                let s = pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), d, typid, std::ptr::null());
                string_value(s.cast(), std::ffi::CStr::from_ptr(s).to_bytes().len())
            }
            _ => self.generic(d, typid),
        }
    }

    fn utc(&mut self) -> bool {
        *self.utc.get_or_insert_with(crate::capture::session_time_zone_is_utc)
    }

    /// Any other type: `to_jsonb` itself, its result taken in (a scalar as that scalar).
    unsafe fn generic(&mut self, d: pg_sys::Datum, typid: pg_sys::Oid) -> Val {
        let jb = to_jsonb(d, typid) as *mut pg_sys::Jsonb;
        let root = std::ptr::addr_of_mut!((*jb).root);
        let mut v = pg_sys::JsonbValue::default();
        if !pg_sys::JsonbExtractScalar(root, &mut v) {
            let len = pgrx::varlena::varsize_any(jb.cast()) - pg_sys::VARHDRSZ;
            return Val::Raw(root as *const u8, len);
        }
        match v.type_ {
            pg_sys::jbvType::jbvNull => Val::Null,
            pg_sys::jbvType::jbvBool => Val::Bool(v.val.boolean),
            pg_sys::jbvType::jbvNumeric => numeric_value(v.val.numeric),
            pg_sys::jbvType::jbvString => string_value(v.val.string.val.cast(), v.val.string.len as usize),
            _ => crate::error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "pg_webhooks: to_jsonb gave a scalar of an unexpected kind",
            ),
        }
    }

    /// `frame` in jsonb's container format at the end of the blob (from a 4-byte aligned
    /// start, which is returned), as `convertJsonbObject` and `convertJsonbArray` write it.
    fn write(&mut self, frame: &Frame) -> usize {
        pad_to_int(&mut self.blob);
        let start = self.blob.len();
        // An object's pairs in key order (length first, then bytes), the last of equal keys.
        let order: Vec<usize> = if frame.object {
            let keys = &self.keys;
            let key = |i: usize| {
                let (at, len) = frame.keys[i];
                &keys[at..at + len]
            };
            let mut idx: Vec<usize> = (0..frame.vals.len()).collect();
            idx.sort_by(|&a, &b| key(a).len().cmp(&key(b).len()).then_with(|| key(a).cmp(key(b))));
            let mut kept: Vec<usize> = Vec::with_capacity(idx.len());
            for i in idx {
                match kept.last_mut() {
                    Some(last) if key(*last) == key(i) => *last = i,
                    _ => kept.push(i),
                }
            }
            kept
        } else {
            (0..frame.vals.len()).collect()
        };
        let n = order.len();
        let what = if frame.object { "object" } else { "array" };
        if n > pg_sys::JB_CMASK as usize {
            too_long(what);
        }
        // All of it at once: header, entries, keys, values and their padding (the `3 +` is
        // slack for the padding before `start`, already done: `open` and `write` pad with no
        // room reserved).
        let size = |v: &Val| match *v {
            Val::Null | Val::Bool(_) => 0,
            Val::Str(_, len) | Val::Copied(_, len) => len,
            Val::Num(_, len) | Val::Built(_, len) | Val::Raw(_, len) => len + 3,
            Val::Int(_) => 3 + 6 + 10,
        };
        let keys_len: usize = if frame.object { order.iter().map(|&i| frame.keys[i].1).sum() } else { 0 };
        let vals_len: usize = order.iter().map(|&i| size(&frame.vals[i])).sum();
        self.reserve(3 + 4 + 8 * n + keys_len + vals_len);
        let header = n as u32 | if frame.object { pg_sys::JB_FOBJECT } else { pg_sys::JB_FARRAY };
        self.blob.extend_from_slice(&header.to_ne_bytes());
        let entries = self.blob.len();
        let nentries = if frame.object { 2 * n } else { n };
        self.blob.resize(entries + 4 * nentries, 0);
        let data = self.blob.len();
        let mut k = 0usize;
        let mut entry = |b: &mut Vec<u8>, kind: u32, before: usize| {
            let total = b.len() - data;
            if total > MAX_STRING {
                too_long(what);
            }
            let meta = if k % pg_sys::JB_OFFSET_STRIDE as usize == 0 {
                kind | total as u32 | pg_sys::JENTRY_HAS_OFF
            } else {
                kind | (b.len() - before) as u32
            };
            let at = entries + 4 * k;
            b[at..at + 4].copy_from_slice(&meta.to_ne_bytes());
            k += 1;
        };
        if frame.object {
            for &i in &order {
                let (at, len) = frame.keys[i];
                let before = self.blob.len();
                let (blob, keys) = (&mut self.blob, &self.keys);
                blob.extend_from_slice(&keys[at..at + len]);
                entry(blob, pg_sys::JENTRY_ISSTRING, before);
            }
        }
        for &i in &order {
            let before = self.blob.len();
            let kind = match frame.vals[i] {
                Val::Null => pg_sys::JENTRY_ISNULL,
                Val::Bool(true) => pg_sys::JENTRY_ISBOOL_TRUE,
                Val::Bool(false) => pg_sys::JENTRY_ISBOOL_FALSE,
                Val::Str(p, len) => {
                    self.blob.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len) });
                    pg_sys::JENTRY_ISSTRING
                }
                Val::Num(p, len) => {
                    pad_to_int(&mut self.blob);
                    self.blob.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len) });
                    pg_sys::JENTRY_ISNUMERIC
                }
                Val::Copied(at, len) => {
                    let (blob, keys) = (&mut self.blob, &self.keys);
                    blob.extend_from_slice(&keys[at..at + len]);
                    pg_sys::JENTRY_ISSTRING
                }
                Val::Built(at, len) => {
                    pad_to_int(&mut self.blob);
                    let copy = self.blob.len();
                    self.blob.extend_from_within(at..at + len);
                    self.nested_fits(copy, before);
                    pg_sys::JENTRY_ISCONTAINER
                }
                Val::Int(n) => {
                    pad_to_int(&mut self.blob);
                    write_int_numeric(&mut self.blob, n);
                    pg_sys::JENTRY_ISNUMERIC
                }
                Val::Raw(p, len) => {
                    pad_to_int(&mut self.blob);
                    let copy = self.blob.len();
                    self.blob.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len) });
                    self.nested_fits(copy, before);
                    pg_sys::JENTRY_ISCONTAINER
                }
            };
            entry(&mut self.blob, kind, before);
        }
        // The whole container (header and entries too) must fit a length field as well.
        if self.blob.len() - start > MAX_STRING {
            too_long(what);
        }
        start
    }

    /// The object as a `jsonb` varlena (its bytes, header included: see `from_bytes`).
    pub unsafe fn finish(mut self) -> Vec<u8> {
        let frame = self.stack.pop().expect("the object");
        assert!(self.stack.is_empty(), "pg_webhooks: a jsonb container left open");
        let len = self.write_down(&frame);
        let total = len + pg_sys::VARHDRSZ;
        // SET_VARSIZE of a 4-byte header (little- or big-endian as PostgreSQL lays it out).
        let header = if cfg!(target_endian = "little") { (total as u32) << 2 } else { total as u32 & 0x3FFF_FFFF };
        self.blob[..4].copy_from_slice(&header.to_ne_bytes());
        if self.blob.capacity() > 2 * self.blob.len() {
            self.blob.shrink_to_fit();
        }
        self.blob
    }
}

/// `n` as the numeric varlena `int64_to_numeric` makes (numeric.c's `make_result` of it): the
/// short format, base-10000 digits without leading or trailing zero digits, the weight of the
/// first, scale 0, and zero as no digits at weight 0.
fn write_int_numeric(b: &mut Vec<u8>, n: i64) {
    let mut digits = [0u16; 5];
    let mut count = 0;
    let mut rest = n.unsigned_abs();
    while rest > 0 {
        digits[count] = (rest % 10_000) as u16;
        rest /= 10_000;
        count += 1;
    }
    // digits[..count], least significant first; the weight is that of the most significant.
    let weight = count.saturating_sub(1);
    let trailing = digits[..count].iter().take_while(|&&d| d == 0).count();
    let kept = &digits[trailing..count];
    const NUMERIC_SHORT: u16 = 0x8000;
    const NUMERIC_SHORT_SIGN_MASK: u16 = 0x2000;
    const NUMERIC_SHORT_WEIGHT_MASK: u16 = 0x003F;
    let header = if n < 0 { NUMERIC_SHORT | NUMERIC_SHORT_SIGN_MASK } else { NUMERIC_SHORT }
        | (weight as u16 & NUMERIC_SHORT_WEIGHT_MASK);
    let len = pg_sys::VARHDRSZ + 2 + 2 * kept.len();
    let varlena = if cfg!(target_endian = "little") { (len as u32) << 2 } else { len as u32 & 0x3FFF_FFFF };
    b.extend_from_slice(&varlena.to_ne_bytes());
    b.extend_from_slice(&header.to_ne_bytes());
    for d in kept.iter().rev() {
        b.extend_from_slice(&d.to_ne_bytes());
    }
}

/// A numeric (with its 4-byte header) as a value.
unsafe fn numeric_value(n: pg_sys::Numeric) -> Val {
    Val::Num(n as *const u8, pgrx::varlena::varsize_any(n.cast()))
}

thread_local! {
    /// `to_jsonb` called for a value of each type: its FmgrInfo, whose expression names the
    /// argument's type (`to_jsonb` takes it from there), kept in TopMemoryContext.
    static TO_JSONB: RefCell<HashMap<pg_sys::Oid, *mut pg_sys::FmgrInfo>> = RefCell::new(HashMap::new());
}

/// `to_jsonb(d)`, `d` being of type `typid`.
unsafe fn to_jsonb(d: pg_sys::Datum, typid: pg_sys::Oid) -> *mut pg_sys::varlena {
    let finfo = TO_JSONB.with(|m| {
        *m.borrow_mut().entry(typid).or_insert_with(|| {
            let outer = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let finfo = pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
            pg_sys::fmgr_info_cxt(
                pg_sys::Oid::from(pg_sys::F_TO_JSONB),
                finfo,
                pg_sys::TopMemoryContext,
            );
            let arg = pg_sys::makeNullConst(typid, -1, pg_sys::InvalidOid);
            let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
            (*finfo).fn_expr = pg_sys::makeFuncExpr(
                pg_sys::Oid::from(pg_sys::F_TO_JSONB),
                pg_sys::JSONBOID,
                args,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            )
            .cast();
            pg_sys::MemoryContextSwitchTo(outer);
            finfo
        })
    });
    pg_sys::FunctionCall1Coll(finfo, pg_sys::InvalidOid, d).cast_mut_ptr()
}

/// A jsonb's bytes (its varlena, header included), to keep outside PostgreSQL's memory.
#[cfg(any(test, feature = "pg_test"))]
pub unsafe fn to_bytes(jb: *mut pg_sys::Jsonb) -> Vec<u8> {
    let len = pgrx::varlena::varsize_any(jb.cast());
    std::slice::from_raw_parts(jb as *const u8, len).to_vec()
}

/// A palloc'd copy of bytes made by `to_bytes`, as a Datum.
pub unsafe fn from_bytes(bytes: &[u8]) -> pg_sys::Datum {
    let p = pg_sys::palloc(bytes.len()) as *mut u8;
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
    pg_sys::Datum::from(p)
}
