//! Capture: order writes become events as the net effect of each transaction.
//!
//! Row triggers only take notes in backend memory: which keys of which tracked tables the
//! transaction touched, and what those rows (and their children) looked like before. At
//! pre-commit, one prepared query per tracked table reads the touched rows as they are at
//! commit, the net effect is worked out here, and one INSERT writes every event of the
//! transaction plus one `_pending` row for the worker. Comparing "before the transaction"
//! with "at commit" is what makes savepoint rollbacks, insert-then-delete and changes that
//! are undone leave nothing behind, without any bookkeeping per subtransaction.

use crate::error::{raise, raise_with_hint};
use crate::plans::with_plan;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};

/// One dependent table embedded in the payload, as written by `webhooks.track()`.
#[derive(Clone, Debug, serde::Deserialize)]
struct ChildSpec {
    name: String,
    relid: u32,
    fk: String,
    order_by: Option<String>,
}

/// A tracked table's configuration, carried by its trigger arguments.
struct TableConfig {
    relid: pg_sys::Oid,
    entity: String,
    key_col: String,
    key_type: String,
    status_col: Option<String>,
    /// `FROM <table> t` plus the `jsonb_build_object(...)` of the children of row `t`.
    from_table: String,
    children_expr: Option<String>,
}

/// SHA-256 of a row's (or its children's) JSON: enough to tell "changed" from "the same"
/// while keeping what a large transaction holds in memory small and fixed per row.
type Digest = [u8; 32];

fn digest(json: &str) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(json.as_bytes()).into()
}

/// What one row looked like before the transaction touched it.
#[derive(Default)]
struct Touch {
    existed_before: bool,
    row_touched: bool,
    orig_row: Option<Digest>,
    orig_status: Option<String>,
    children_touched: bool,
    orig_children: Option<Digest>,
    /// The row as deleted (the payload of `E.deleted`); only kept for deleted rows.
    deleted_row: Option<String>,
}

/// Keys read back, and events written, per statement at commit: bounds the memory a
/// transaction touching many rows needs at commit.
const COMMIT_CHUNK: usize = 5000;

struct TableTouches {
    cfg: TableConfig,
    keys: Vec<String>,
    touches: HashMap<String, Touch>,
}

impl TableTouches {
    fn touch(&mut self, key: &str, fresh: impl FnOnce() -> Touch) -> &mut Touch {
        if !self.touches.contains_key(key) {
            self.keys.push(key.to_string());
            self.touches.insert(key.to_string(), fresh());
        }
        self.touches.get_mut(key).expect("inserted above")
    }
}

thread_local! {
    static TOUCHED: RefCell<Vec<TableTouches>> = const { RefCell::new(Vec::new()) };
    static WAKE_AT_COMMIT: Cell<Option<Wake>> = const { Cell::new(None) };
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

/// Forget everything noted by an aborted (or finished) transaction.
pub fn reset() {
    TOUCHED.with(|t| t.borrow_mut().clear());
    WAKE_AT_COMMIT.with(|w| w.set(None));
}

fn quote_ident(s: &str) -> String {
    pgrx::spi::quote_identifier(s)
}

fn quote_literal(s: &str) -> String {
    pgrx::spi::quote_literal(s)
}

/// Schema-qualified, quoted name of a relation, looked up now (so renames are followed).
unsafe fn qualified_name(relid: pg_sys::Oid) -> String {
    let rel = pg_sys::get_rel_name(relid);
    if rel.is_null() {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            &format!(
                "pg_webhooks: table with oid {} no longer exists",
                relid.to_u32()
            ),
        );
    }
    let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
    format!(
        "{}.{}",
        quote_ident(&CStr::from_ptr(nsp).to_string_lossy()),
        quote_ident(&CStr::from_ptr(rel).to_string_lossy())
    )
}

impl TableConfig {
    /// Trigger arguments: entity, key column, key type, status column ('' = none), children JSON.
    unsafe fn from_trigger_args(relid: pg_sys::Oid, args: &[String]) -> TableConfig {
        if args.len() < 5 {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
                "pg_webhooks: capture trigger has the wrong arguments",
                "Run webhooks.untrack() and webhooks.track() on the table again.",
            );
        }
        let children: Vec<ChildSpec> = serde_json::from_str(&args[4]).unwrap_or_else(|e| {
            raise_with_hint(
                PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
                &format!("pg_webhooks: capture trigger has invalid children: {e}"),
                "Run webhooks.untrack() and webhooks.track() on the table again.",
            )
        });
        let from_table = format!("FROM {} t", qualified_name(relid));
        let key_ref = format!("t.{}", quote_ident(&args[1]));
        let children_expr = if children.is_empty() {
            None
        } else {
            let parts: Vec<String> = children
                .iter()
                .map(|c| {
                    let order = c.order_by.as_deref().map(|o| format!(" ORDER BY {o}")).unwrap_or_default();
                    format!(
                        "{}, (SELECT COALESCE(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(c){order}), '[]'::jsonb) FROM {} c WHERE c.{} = {key_ref})",
                        quote_literal(&c.name),
                        qualified_name(pg_sys::Oid::from(c.relid)),
                        quote_ident(&c.fk),
                    )
                })
                .collect();
            Some(format!(
                "pg_catalog.jsonb_build_object({})",
                parts.join(", ")
            ))
        };
        TableConfig {
            relid,
            entity: args[0].clone(),
            key_col: args[1].clone(),
            key_type: args[2].clone(),
            status_col: Some(args[3].clone()).filter(|s| !s.is_empty()),
            from_table,
            children_expr,
        }
    }

    fn key_filter(&self) -> String {
        format!(
            "t.{} = $1::text::{}",
            quote_ident(&self.key_col),
            self.key_type
        )
    }

    /// Rows at commit: key, row JSON, status, children JSON.
    fn rows_at_commit_query(&self) -> String {
        let status = self
            .status_col
            .as_deref()
            .map(|s| format!("t.{}::text", quote_ident(s)))
            .unwrap_or_else(|| "NULL::text".into());
        let children = self.children_expr.as_deref().unwrap_or("NULL::jsonb");
        format!(
            "SELECT t.{key}::text, pg_catalog.row_to_json(t)::text, {status}, ({children})::text {from} \
             WHERE t.{key} = ANY ($1::text[]::{ktype}[])",
            key = quote_ident(&self.key_col),
            from = self.from_table,
            ktype = self.key_type,
        )
    }
}

/// Run `f` with the extension's privileges, a safe search_path and generic plans, whoever the caller is:
/// applications need no grant on the `webhooks` schema for their writes to be captured.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_ctx = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            saved_ctx
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        for (name, value) in [
            (c"search_path", c"pg_catalog, pg_temp"),
            // Our statements are prepared once per backend; a custom plan per commit (which
            // PostgreSQL picks for `= ANY($1)`, thinking it cheaper) costs more than it saves.
            (c"plan_cache_mode", c"force_generic_plan"),
        ] {
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
        // An ERROR inside `f` aborts the (sub)transaction, which restores both.
        let result = f();
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx);
        result
    }
}

unsafe fn column_number(tupdesc: pg_sys::TupleDesc, name: &str) -> i32 {
    let cname = CString::new(name).unwrap_or_default();
    let n = pg_sys::SPI_fnumber(tupdesc, cname.as_ptr());
    if n <= 0 {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            &format!("pg_webhooks: column \"{name}\" of a tracked table no longer exists"),
            "Run webhooks.untrack() and webhooks.track() on the table again.",
        );
    }
    n
}

unsafe fn column_text(
    tuple: *mut pg_sys::HeapTupleData,
    tupdesc: pg_sys::TupleDesc,
    attnum: i32,
) -> Option<String> {
    let p = pg_sys::SPI_getvalue(tuple, tupdesc, attnum);
    if p.is_null() {
        None
    } else {
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p.cast());
        Some(s)
    }
}

/// `row_to_json(row)::text`, the same text the commit-time query produces for an equal row.
unsafe fn row_json(tuple: *mut pg_sys::HeapTupleData, tupdesc: pg_sys::TupleDesc) -> String {
    let composite = pg_sys::heap_copy_tuple_as_datum(tuple, tupdesc);
    let json = pg_sys::OidFunctionCall1Coll(
        pg_sys::Oid::from(pg_sys::F_ROW_TO_JSON_RECORD),
        pg_sys::InvalidOid,
        composite,
    );
    let c = pg_sys::text_to_cstring(json.cast_mut_ptr());
    let s = CStr::from_ptr(c).to_string_lossy().into_owned();
    pg_sys::pfree(c.cast());
    s
}

fn with_table<R>(relid: pg_sys::Oid, args: &[String], f: impl FnOnce(&mut TableTouches) -> R) -> R {
    TOUCHED.with(|t| {
        let mut tables = t.borrow_mut();
        let idx = match tables.iter().position(|tt| tt.cfg.relid == relid) {
            Some(i) => i,
            None => {
                let cfg = unsafe { TableConfig::from_trigger_args(relid, args) };
                tables.push(TableTouches {
                    cfg,
                    keys: Vec::new(),
                    touches: HashMap::new(),
                });
                tables.len() - 1
            }
        };
        f(&mut tables[idx])
    })
}

/// AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW on a tracked table.
#[pg_trigger]
fn _capture_row<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let args = trigger.extra_args()?;
    let td = trigger.trigger_data();
    unsafe {
        let rel = td.tg_relation;
        let relid = (*rel).rd_id;
        let tupdesc = (*rel).rd_att;
        let key_att = column_number(tupdesc, args.get(1).map(String::as_str).unwrap_or("id"));
        let status_att = args
            .get(3)
            .filter(|s| !s.is_empty())
            .map(|s| column_number(tupdesc, s));
        let event = td.tg_event;
        let key_of = |tuple| column_text(tuple, tupdesc, key_att);
        let status_of = |tuple| status_att.and_then(|a| column_text(tuple, tupdesc, a));
        let before = |tuple| Touch {
            existed_before: true,
            row_touched: true,
            orig_row: Some(digest(&row_json(tuple, tupdesc))),
            orig_status: status_of(tuple),
            ..Touch::default()
        };
        let note_inserted = |tt: &mut TableTouches, key: &str| {
            tt.touch(key, || Touch {
                row_touched: true,
                ..Touch::default()
            });
        };
        let note_before = |tt: &mut TableTouches, key: &str, tuple| {
            let t = tt.touch(key, || before(tuple));
            if !t.row_touched {
                // Touched through its children only so far: this is its first own change.
                let b = before(tuple);
                t.row_touched = true;
                t.orig_row = b.orig_row;
                t.orig_status = b.orig_status;
            }
        };
        with_table(relid, &args, |tt| {
            if pgrx::trigger_fired_by_insert(event) {
                if let Some(key) = key_of(td.tg_trigtuple) {
                    note_inserted(tt, &key);
                }
            } else if pgrx::trigger_fired_by_update(event) {
                let old_key = key_of(td.tg_trigtuple);
                let new_key = key_of(td.tg_newtuple);
                if let Some(old_key) = &old_key {
                    note_before(tt, old_key, td.tg_trigtuple);
                    if new_key.as_ref() != Some(old_key) {
                        // The key itself changed: the old key is gone, the new one is born.
                        tt.touches.get_mut(old_key).expect("noted").deleted_row =
                            Some(row_json(td.tg_trigtuple, tupdesc));
                    }
                }
                if let Some(new_key) = new_key.filter(|k| Some(k) != old_key.as_ref()) {
                    note_inserted(tt, &new_key);
                }
            } else if pgrx::trigger_fired_by_delete(event) {
                if let Some(key) = key_of(td.tg_trigtuple) {
                    note_before(tt, &key, td.tg_trigtuple);
                    tt.touches.get_mut(&key).expect("noted").deleted_row =
                        Some(row_json(td.tg_trigtuple, tupdesc));
                }
            }
        });
    }
    Ok(None)
}

/// BEFORE INSERT OR UPDATE OR DELETE FOR EACH ROW on a child table of a tracked table.
/// Locks the parent row (so two transactions editing the same order's items serialize) and
/// notes the parent's children as they were before this transaction first changed them.
#[pg_trigger]
fn _capture_child<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let args = trigger.extra_args()?;
    let td = trigger.trigger_data();
    let event = td.tg_event;
    if args.len() < 7 {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            "pg_webhooks: child capture trigger has the wrong arguments",
            "Run webhooks.untrack() and webhooks.track() on the parent table again.",
        );
    }
    let parent = pg_sys::Oid::from(args[5].parse::<u32>().unwrap_or(0));
    unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let fk_att = column_number(tupdesc, &args[6]);
        // INSERT and DELETE: the row's parent; UPDATE: the old and the new parent.
        let mut parent_keys: Vec<String> = column_text(td.tg_trigtuple, tupdesc, fk_att)
            .into_iter()
            .collect();
        if pgrx::trigger_fired_by_update(event) {
            parent_keys.extend(column_text(td.tg_newtuple, tupdesc, fk_att));
        }
        parent_keys.dedup();
        for key in parent_keys {
            note_child_change(parent, &args, &key);
        }
    }
    Ok(if pgrx::trigger_fired_by_delete(event) {
        trigger.old()
    } else {
        trigger.new()
    })
}

fn note_child_change(parent: pg_sys::Oid, args: &[String], key: &str) {
    // Decide under the borrow, query without it (the queries may wait on a lock).
    // The queries are built only for the first change of an existing parent's children.
    let queries = with_table(parent, args, |tt| {
        let t = tt.touch(key, || Touch {
            existed_before: true,
            ..Touch::default()
        });
        let needs_snapshot = t.existed_before && !t.children_touched;
        t.children_touched = true;
        needs_snapshot.then(|| {
            let filter = tt.cfg.key_filter();
            (
                format!(
                    "SELECT 1 {} WHERE {filter} FOR NO KEY UPDATE OF t",
                    tt.cfg.from_table
                ),
                format!(
                    "SELECT ({})::text {} WHERE {filter}",
                    tt.cfg.children_expr.as_deref().unwrap_or("NULL::jsonb"),
                    tt.cfg.from_table
                ),
            )
        })
    });
    let Some((lock_query, snapshot_query)) = queries else {
        return;
    };
    let snapshot = as_extension_owner(|| {
        let arg = || -> pgrx::datum::DatumWithOid { key.to_string().into() };
        with_plan(&lock_query, &[pg_sys::TEXTOID], |plan| {
            Spi::connect_mut(|c| c.update(plan, None, &[arg()]).map(|_| ()))
        })
        .unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                &format!("pg_webhooks: {e}"),
            )
        });
        with_plan(&snapshot_query, &[pg_sys::TEXTOID], |plan| {
            Spi::connect(|c| {
                let table = c.select(plan, Some(1), &[arg()])?;
                match table.into_iter().next() {
                    Some(row) => row.get::<String>(1),
                    None => Ok(None),
                }
            })
        })
        .unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                &format!("pg_webhooks: {e}"),
            )
        })
    });
    with_table(parent, args, |tt| {
        if let Some(t) = tt.touches.get_mut(key) {
            t.orig_children = snapshot.as_deref().map(digest);
        }
    });
}

/// One event to write: `data` = row JSON || children JSON || extra JSON.
struct NewEvent {
    event_type: String,
    entity: String,
    key: String,
    row: String,
    children: Option<String>,
    extra: Option<String>,
    mapped_status: Option<String>,
}

const INSERT_EVENTS: &str = "\
WITH ev AS (
    SELECT u.ord, u.type, u.entity, u.key, u.mapped_status,
           u.rowj::jsonb || COALESCE(u.childj::jsonb, '{}'::jsonb) || COALESCE(u.extra::jsonb, '{}'::jsonb) AS data
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
           WITH ORDINALITY AS u(type, entity, key, rowj, childj, extra, mapped_status, ord)
), all_ev AS (
    SELECT ev.ord * 2 AS o, ev.type, ev.entity, ev.key, ev.data FROM ev
    UNION ALL
    SELECT ev.ord * 2 + 1, se.event_type, ev.entity, ev.key, ev.data
      FROM ev JOIN webhooks.status_events se ON se.entity = ev.entity AND se.status = ev.mapped_status
), ins AS (
    INSERT INTO webhooks._events (type, entity, key, data)
    SELECT type, entity, key, data FROM all_ev ORDER BY o
    RETURNING seq
)
INSERT INTO webhooks._pending (seqs)
SELECT pg_catalog.array_agg(seq ORDER BY seq) FROM ins HAVING pg_catalog.count(*) > 0";

/// The rule book: what the net effect of a transaction on one row is.
fn net_events(
    cfg: &TableConfig,
    key: &str,
    t: &Touch,
    now: Option<&RowAtCommit>,
    out: &mut Vec<NewEvent>,
) {
    let ev = |suffix: &str,
              row: &str,
              children: Option<&String>,
              extra: Option<String>,
              mapped: Option<&String>| NewEvent {
        event_type: format!("{}.{suffix}", cfg.entity),
        entity: cfg.entity.clone(),
        key: key.to_string(),
        row: row.to_string(),
        children: children.cloned(),
        extra,
        mapped_status: mapped.cloned(),
    };
    match (t.existed_before, now) {
        (false, None) => {}
        (false, Some(cur)) => out.push(ev(
            "created",
            &cur.row,
            cur.children.as_ref(),
            None,
            cur.status.as_ref(),
        )),
        (true, None) => {
            if let Some(old) = &t.deleted_row {
                out.push(ev("deleted", old, None, None, None));
            }
        }
        (true, Some(cur)) => {
            let status_changed =
                cfg.status_col.is_some() && t.row_touched && t.orig_status != cur.status;
            let row_changed = t.row_touched && t.orig_row != Some(digest(&cur.row));
            let children_changed =
                t.children_touched && t.orig_children != cur.children.as_deref().map(digest);
            if status_changed {
                let extra =
                    serde_json::json!({"previous_status": t.orig_status, "status": cur.status})
                        .to_string();
                out.push(ev(
                    "status_updated",
                    &cur.row,
                    cur.children.as_ref(),
                    Some(extra),
                    cur.status.as_ref(),
                ));
            } else if row_changed || children_changed {
                out.push(ev("updated", &cur.row, cur.children.as_ref(), None, None));
            }
        }
    }
}

struct RowAtCommit {
    row: String,
    status: Option<String>,
    children: Option<String>,
}

/// XACT_EVENT_PRE_COMMIT: turn the notes into events. An error here aborts the transaction.
pub fn write_events_at_commit() {
    let tables = TOUCHED.with(|t| std::mem::take(&mut *t.borrow_mut()));
    if tables.is_empty() {
        return;
    }
    let wrote = as_extension_owner(|| unsafe {
        // Pre-commit runs outside any statement: read the rows with a fresh snapshot.
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let mut events = Vec::new();
        let mut wrote = false;
        for tt in &tables {
            for keys in tt.keys.chunks(COMMIT_CHUNK) {
                let rows = rows_at_commit(tt, keys);
                for key in keys {
                    net_events(&tt.cfg, key, &tt.touches[key], rows.get(key), &mut events);
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
        pg_sys::PopActiveSnapshot();
        wrote
    });
    if wrote {
        wake_worker_at_commit(Wake::Events);
    }
}

fn rows_at_commit(tt: &TableTouches, keys: &[String]) -> HashMap<String, RowAtCommit> {
    let keys: pgrx::datum::DatumWithOid = keys.to_vec().into();
    with_plan(
        &tt.cfg.rows_at_commit_query(),
        &[pg_sys::TEXTARRAYOID],
        |plan| {
            Spi::connect(|c| {
                let mut out = HashMap::new();
                for row in c.select(plan, None, &[keys])? {
                    if let Some(key) = row.get::<String>(1)? {
                        out.insert(
                            key,
                            RowAtCommit {
                                row: row.get::<String>(2)?.unwrap_or_default(),
                                status: row.get::<String>(3)?,
                                children: row.get::<String>(4)?,
                            },
                        );
                    }
                }
                Ok::<_, pgrx::spi::Error>(out)
            })
        },
    )
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: capture failed: {e}"),
        )
    })
}

fn insert_events(events: Vec<NewEvent>) {
    let mut cols: [Vec<Option<String>>; 7] = Default::default();
    for e in events {
        cols[0].push(Some(e.event_type));
        cols[1].push(Some(e.entity));
        cols[2].push(Some(e.key));
        cols[3].push(Some(e.row));
        cols[4].push(e.children);
        cols[5].push(e.extra);
        cols[6].push(e.mapped_status);
    }
    let args: Vec<pgrx::datum::DatumWithOid> = cols.into_iter().map(Into::into).collect();
    with_plan(INSERT_EVENTS, &[pg_sys::TEXTARRAYOID; 7], |plan| {
        Spi::connect_mut(|c| c.update(plan, None, &args).map(|_| ()))
    })
    .unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            &format!("pg_webhooks: capture failed: {e}"),
        )
    });
}

/// `webhooks.emit()`: an event that is not a row change (inventory, products, reviews, ...).
#[pg_extern(volatile, parallel_unsafe)]
fn emit(event_type: &str, data: pgrx::JsonB, key: default!(Option<&str>, "NULL")) -> pgrx::Uuid {
    if !crate::patterns::is_event_type(event_type) {
        raise_with_hint(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("invalid event type \"{event_type}\""),
            "An event type is dotted lowercase words, e.g. inventory.adjusted.",
        );
    }
    if !data.0.is_object() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "event data must be a JSON object",
        );
    }
    let entity = event_type.split('.').next().unwrap_or_default().to_string();
    let id = as_extension_owner(|| {
        Spi::get_one_with_args::<pgrx::Uuid>(
            "WITH ins AS (INSERT INTO webhooks._events (type, entity, key, data) VALUES ($1, $2, $3, $4) RETURNING id, seq),
                  p AS (INSERT INTO webhooks._pending (seqs) SELECT ARRAY[seq] FROM ins)
             SELECT id FROM ins",
            &[event_type.into(), entity.into(), key.into(), data.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "pg_webhooks: emit failed"));
    wake_worker_at_commit(Wake::Events);
    id
}

/// Lets SQL functions (send_test, redeliver, replay, resume) wake the worker at commit.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_worker_at_commit() {
    wake_worker_at_commit(Wake::Queue);
}
