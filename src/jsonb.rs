//! Event data built as `jsonb` straight from the rows read at commit, as `to_jsonb` builds it,
//! instead of JSON text from `row_to_json` that `jsonb_in` then parses again (the two were a
//! tenth of a tracked status update's CPU). The result is the same `jsonb` value: every column
//! goes through `to_jsonb`'s own rules, with a short path for the types whose conversion
//! `to_jsonb` does in one step (booleans, integers, numerics, text, dates and timestamps).
//!
//! Strings handed to the builder are referenced, not copied, until `finish`: they must live
//! in a memory context that outlives it (the caller's current one).

use pgrx::pg_sys;
use pgrx::pg_sys::JsonbIteratorToken::*;
use std::cell::RefCell;
use std::collections::HashMap;

pub struct Builder {
    state: *mut pg_sys::JsonbParseState,
}

/// The longest string a jsonb holds (JENTRY_OFFLENMASK): past it, the same error as
/// `to_jsonb` and `jsonb_in` raise.
const MAX_STRING: usize = 0x0FFF_FFFF;

fn string_value(ptr: *const u8, len: usize) -> pg_sys::JsonbValue {
    if len > MAX_STRING {
        crate::error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            &format!("string too long to represent as jsonb string ({len} bytes)"),
        );
    }
    let mut v = pg_sys::JsonbValue {
        type_: pg_sys::jbvType::jbvString,
        ..Default::default()
    };
    v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
        len: len as i32,
        val: ptr as *mut std::ffi::c_char,
    };
    v
}

fn null_value() -> pg_sys::JsonbValue {
    pg_sys::JsonbValue {
        type_: pg_sys::jbvType::jbvNull,
        ..Default::default()
    }
}

impl Builder {
    pub unsafe fn object() -> Builder {
        let mut b = Builder {
            state: std::ptr::null_mut(),
        };
        pg_sys::pushJsonbValue(&mut b.state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
        b
    }

    /// A key, copied into the current memory context.
    pub unsafe fn key(&mut self, key: &[u8]) {
        let mut v = string_value(key.as_ptr(), key.len());
        let p = pg_sys::palloc(key.len().max(1)) as *mut u8;
        std::ptr::copy_nonoverlapping(key.as_ptr(), p, key.len());
        v.val.string.val = p.cast();
        pg_sys::pushJsonbValue(&mut self.state, WJB_KEY, &mut v);
    }

    /// A string value (or null), copied into the current memory context.
    pub unsafe fn string_or_null(&mut self, s: Option<&str>) {
        let mut v = match s {
            Some(s) => {
                let mut v = string_value(s.as_ptr(), s.len());
                let p = pg_sys::palloc(s.len().max(1)) as *mut u8;
                std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
                v.val.string.val = p.cast();
                v
            }
            None => null_value(),
        };
        pg_sys::pushJsonbValue(&mut self.state, WJB_VALUE, &mut v);
    }

    pub unsafe fn begin_array(&mut self) {
        pg_sys::pushJsonbValue(&mut self.state, WJB_BEGIN_ARRAY, std::ptr::null_mut());
    }

    pub unsafe fn end_array(&mut self) {
        pg_sys::pushJsonbValue(&mut self.state, WJB_END_ARRAY, std::ptr::null_mut());
    }

    /// A row as an object (an array element): `to_jsonb` of the row.
    pub unsafe fn row_element(&mut self, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) {
        pg_sys::pushJsonbValue(&mut self.state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
        self.columns(tuple, desc);
        pg_sys::pushJsonbValue(&mut self.state, WJB_END_OBJECT, std::ptr::null_mut());
    }

    /// The row's columns as keys of the object being built (`to_jsonb` of the row, inlined).
    pub unsafe fn columns(&mut self, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let attrs = (*desc).attrs.as_slice(natts);
        for (i, att) in attrs.iter().enumerate() {
            if att.attisdropped {
                continue;
            }
            // Copied: a relation's descriptor may be rebuilt before `finish`.
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr());
            self.key(name.to_bytes());
            self.value(values[i], nulls[i], att.atttypid);
        }
    }

    /// One column's value, as `to_jsonb` converts a value of type `typid`.
    unsafe fn value(&mut self, d: pg_sys::Datum, isnull: bool, typid: pg_sys::Oid) {
        let mut v = null_value();
        if !isnull {
            match typid {
                pg_sys::BOOLOID => {
                    v.type_ = pg_sys::jbvType::jbvBool;
                    v.val.boolean = d.value() != 0;
                }
                pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => {
                    let n = match typid {
                        pg_sys::INT2OID => d.value() as i16 as i64,
                        pg_sys::INT4OID => d.value() as i32 as i64,
                        _ => d.value() as i64,
                    };
                    v.type_ = pg_sys::jbvType::jbvNumeric;
                    v.val.numeric = pg_sys::int64_to_numeric(n);
                }
                pg_sys::NUMERICOID => {
                    let n = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as pg_sys::Numeric;
                    if pg_sys::numeric_is_nan(n) || pg_sys::numeric_is_inf(n) {
                        return self.generic(d, typid);
                    }
                    v.type_ = pg_sys::jbvType::jbvNumeric;
                    v.val.numeric = n;
                }
                pg_sys::TEXTOID | pg_sys::VARCHAROID => {
                    let t = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
                    v = string_value(
                        pgrx::varlena::vardata_any(t).cast(),
                        pgrx::varlena::varsize_any_exhdr(t),
                    );
                }
                pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => {
                    let s = pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), d, typid, std::ptr::null());
                    v = string_value(s.cast(), std::ffi::CStr::from_ptr(s).to_bytes().len());
                }
                _ => return self.generic(d, typid),
            }
        }
        pg_sys::pushJsonbValue(&mut self.state, WJB_VALUE, &mut v);
    }

    /// Any other type: `to_jsonb` itself, its result taken in.
    unsafe fn generic(&mut self, d: pg_sys::Datum, typid: pg_sys::Oid) {
        let jb = to_jsonb(d, typid) as *mut pg_sys::Jsonb;
        let root = std::ptr::addr_of_mut!((*jb).root);
        let mut v = null_value();
        if !pg_sys::JsonbExtractScalar(root, &mut v) {
            v.type_ = pg_sys::jbvType::jbvBinary;
            v.val.binary = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_4 {
                len: (pgrx::varlena::varsize_any(jb.cast()) - pg_sys::VARHDRSZ) as i32,
                data: root,
            };
        }
        pg_sys::pushJsonbValue(&mut self.state, WJB_VALUE, &mut v);
    }

    /// The object as a `jsonb` (palloc'd in the current memory context).
    pub unsafe fn finish(mut self) -> *mut pg_sys::Jsonb {
        let res = pg_sys::pushJsonbValue(&mut self.state, WJB_END_OBJECT, std::ptr::null_mut());
        pg_sys::JsonbValueToJsonb(res)
    }
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
