//! Per-subscription request shape: event names, a body template, extra headers and the JSON
//! spelling of the body, applied to each delivery when it is sent (the stored event stays one).
//!
//! The body template is declarative JSON (in the spirit of Hasura's Kriti): literals are sent
//! as they are, `"{{ path | filter }}"` takes a value from the envelope, text around `{{ }}`
//! makes a string, and three operator objects (`$each`, `$merge`, `$literal`) map arrays,
//! merge objects and escape. No SQL and no user code runs; a template is parsed and bounded
//! (size, depth) at subscribe time and evaluated here, in the worker's HTTP thread, against the
//! event's stored JSON text, which is navigated without being parsed into a tree (so numbers
//! stay exactly as stored and no nesting limit applies). The output is capped as it is built.
//!
//! `json: "javascript"` re-spells the finished body as JavaScript's
//! `JSON.stringify(JSON.parse(body))` would: numbers as ECMAScript's Number-to-String, strings
//! escaped as `JSON.stringify` escapes them, integer-like keys first, duplicate keys merged.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Limits checked when a shape is set.
pub const MAX_SHAPE_BYTES: usize = 65_536;
pub const MAX_TEMPLATE_DEPTH: usize = 32;
pub const MAX_EVENT_NAMES: usize = 1_000;
pub const MAX_NAME_LEN: usize = 200;
const MAX_FILTERS: usize = 16;
/// Nesting accepted by the javascript re-spelling (JSON.parse itself has a limit of its own).
const MAX_JS_DEPTH: usize = 200;

/// Headers pg_webhooks sets itself (or the HTTP client does): a shape's header may not be one.
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "user-agent",
];

/// A subscription's shape, parsed and validated.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Stored type -> the name this subscription's receiver knows it by.
    pub event_names: Vec<(String, String)>,
    pub body: Option<Node>,
    pub event_type_header: Option<String>,
    pub delivery_id_header: Option<String>,
    pub javascript: bool,
}

/// What a delivery's body is made from.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub event_id: &'a str,
    /// The type as stored.
    pub event_type: &'a str,
    /// RFC 3339, UTC, microseconds (`queue::event_time!`).
    pub created_at: &'a str,
    /// The stored jsonb as text.
    pub data: &'a str,
    pub delivery_id: i64,
    pub attempt: i32,
    /// Unix seconds of the attempt (the `webhook-timestamp` sent).
    pub timestamp: i64,
    pub subscription_id: i64,
}

/// A shaped request's parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The event type the receiver is told (renamed, or as stored).
    pub event_type: String,
    pub body: Vec<u8>,
    /// The shape's headers (event type, delivery id), in that order, names as configured.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RenderError {
    /// The body grew past the cap: nothing is sent. `.0` bytes had been made when it stopped.
    Oversized(usize),
    /// A data-dependent failure (a timestamp that is not one, `$each` over a non-array...).
    Failed(String),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Oversized(n) => write!(f, "the shaped body exceeds {n} bytes"),
            RenderError::Failed(e) => write!(f, "shaping the body failed: {e}"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The template
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub enum Node {
    /// Compact JSON text, sent as it is.
    Literal(String),
    /// `"{{ expr }}"`: the value, whatever its type.
    Expr(Expr),
    /// Text with `{{ expr }}` parts: a string.
    Concat(Vec<Part>),
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    Each {
        source: Expr,
        var: String,
        to: Box<Node>,
    },
    Merge(Vec<Node>),
}

#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Expr(Expr),
}

#[derive(Debug, Clone)]
pub struct Expr {
    root: Root,
    steps: Vec<Step>,
    filters: Vec<Filter>,
}

#[derive(Debug, Clone)]
enum Root {
    Id,
    Type,
    StoredType,
    CreatedAt,
    Data,
    DeliveryId,
    Attempt,
    Timestamp,
    SubscriptionId,
    /// A `$each` variable, by its depth among the enclosing `$each`es (0 = outermost).
    Var(usize),
    /// A quoted string or a number written in the expression: JSON text.
    Const(String),
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(i64),
}

#[derive(Debug, Clone)]
enum Filter {
    /// Offset in minutes, None = `Z`; fraction digits 0, 3 or 6.
    Iso8601(Option<i32>, u8),
    Unix,
    UnixMs,
    Datetime(i32),
    Date(i32),
    String,
    Default(String),
    CamelCase,
    Upper,
    Lower,
}

const ROOTS: &str =
    "id, type, stored_type, created_at, data, delivery_id, attempt, timestamp, subscription_id";

// ------------------------------------------------------------------------------------------
// A JSON tree of the shape itself (keys in the order written, numbers as text)
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum T {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<T>),
    Obj(Vec<(String, T)>),
}

impl T {
    fn kind(&self) -> &'static str {
        match self {
            T::Null => "null",
            T::Bool(_) => "a boolean",
            T::Num(_) => "a number",
            T::Str(_) => "a string",
            T::Arr(_) => "an array",
            T::Obj(_) => "an object",
        }
    }
    fn to_json(&self, out: &mut String) {
        match self {
            T::Null => out.push_str("null"),
            T::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            T::Num(n) => out.push_str(n),
            T::Str(s) => push_json_string(s, out),
            T::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.to_json(out);
                }
                out.push(']');
            }
            T::Obj(o) => {
                out.push('{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    push_json_string(k, out);
                    out.push(':');
                    v.to_json(out);
                }
                out.push('}');
            }
        }
    }
}

/// A small recursive JSON parser for the shape (bounded by `depth`).
struct TreeParser<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> TreeParser<'a> {
    fn ws(&mut self) {
        while self.at < self.s.len() && matches!(self.s[self.at], b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }
    fn value(&mut self, depth: usize) -> Result<T, String> {
        if depth > MAX_TEMPLATE_DEPTH + 8 {
            return Err(format!(
                "shape is nested deeper than {MAX_TEMPLATE_DEPTH} levels"
            ));
        }
        self.ws();
        let Some(&c) = self.s.get(self.at) else {
            return Err("shape is not valid JSON".into());
        };
        match c {
            b'{' => {
                self.at += 1;
                let mut members: Vec<(String, T)> = Vec::new();
                self.ws();
                if self.s.get(self.at) == Some(&b'}') {
                    self.at += 1;
                    return Ok(T::Obj(members));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    if self.s.get(self.at) != Some(&b':') {
                        return Err("shape is not valid JSON".into());
                    }
                    self.at += 1;
                    let v = self.value(depth + 1)?;
                    // As JSON.parse and jsonb do: the last of a duplicate key wins.
                    if let Some(m) = members.iter_mut().find(|(k, _)| *k == key) {
                        m.1 = v;
                    } else {
                        members.push((key, v));
                    }
                    self.ws();
                    match self.s.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(T::Obj(members));
                        }
                        _ => return Err("shape is not valid JSON".into()),
                    }
                }
            }
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.at) == Some(&b']') {
                    self.at += 1;
                    return Ok(T::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(T::Arr(items));
                        }
                        _ => return Err("shape is not valid JSON".into()),
                    }
                }
            }
            b'"' => Ok(T::Str(self.string()?)),
            b't' if self.s[self.at..].starts_with(b"true") => {
                self.at += 4;
                Ok(T::Bool(true))
            }
            b'f' if self.s[self.at..].starts_with(b"false") => {
                self.at += 5;
                Ok(T::Bool(false))
            }
            b'n' if self.s[self.at..].starts_with(b"null") => {
                self.at += 4;
                Ok(T::Null)
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(self.s, self.at).ok_or("shape is not valid JSON")?;
                let text = std::str::from_utf8(&self.s[self.at..end]).map_err(|e| e.to_string())?;
                self.at = end;
                Ok(T::Num(text.to_string()))
            }
            _ => Err("shape is not valid JSON".into()),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        let end = string_end(self.s, self.at).ok_or("shape is not valid JSON")?;
        let raw = std::str::from_utf8(&self.s[self.at..end]).map_err(|e| e.to_string())?;
        self.at = end;
        decode_json_string(raw).ok_or_else(|| "shape is not valid JSON".into())
    }
}

// ------------------------------------------------------------------------------------------
// Parsing and validating a shape
// ------------------------------------------------------------------------------------------

/// Parse a shape (jsonb text). Every error names what is wrong.
pub fn parse(text: &str) -> Result<Shape, String> {
    if text.len() > MAX_SHAPE_BYTES {
        return Err(format!(
            "shape is {} bytes; at most {MAX_SHAPE_BYTES} are allowed",
            text.len()
        ));
    }
    let mut p = TreeParser {
        s: text.as_bytes(),
        at: 0,
    };
    let tree = p.value(0)?;
    p.ws();
    if p.at != text.len() {
        return Err("shape is not valid JSON".into());
    }
    let T::Obj(members) = tree else {
        return Err(format!("shape must be a JSON object, not {}", tree.kind()));
    };
    let mut shape = Shape::default();
    for (key, value) in members {
        match key.as_str() {
            "event_names" => {
                let T::Obj(names) = value else {
                    return Err(format!(
                        "shape.event_names must be an object of event type -> name, not {}",
                        value.kind()
                    ));
                };
                if names.len() > MAX_EVENT_NAMES {
                    return Err(format!(
                        "shape.event_names has {} entries; at most {MAX_EVENT_NAMES} are allowed",
                        names.len()
                    ));
                }
                for (from, to) in names {
                    check_name(&from).map_err(|e| format!("shape.event_names key \"{}\" {e}", shown(&from)))?;
                    let T::Str(to) = to else {
                        return Err(format!(
                            "shape.event_names[\"{}\"] must be a string, not {}",
                            shown(&from),
                            to.kind()
                        ));
                    };
                    check_name(&to).map_err(|e| format!("shape.event_names[\"{}\"] \"{}\" {e}", shown(&from), shown(&to)))?;
                    shape.event_names.push((from, to));
                }
            }
            "body" => {
                let mut vars = Vec::new();
                shape.body = Some(compile(&value, 0, &mut vars, "body")?);
            }
            "event_type_header" | "delivery_id_header" => {
                let T::Str(name) = value else {
                    return Err(format!("shape.{key} must be a string (a header name), not {}", value.kind()));
                };
                check_header_name(&name).map_err(|e| format!("shape.{key}: {e}"))?;
                if key == "event_type_header" {
                    shape.event_type_header = Some(name);
                } else {
                    shape.delivery_id_header = Some(name);
                }
            }
            "json" => match value {
                T::Str(s) if s == "as_stored" => shape.javascript = false,
                T::Str(s) if s == "javascript" => shape.javascript = true,
                other => {
                    let mut t = String::new();
                    other.to_json(&mut t);
                    return Err(format!(
                        "shape.json must be \"as_stored\" or \"javascript\", not {}",
                        shown(&t)
                    ));
                }
            },
            other => {
                return Err(format!(
                    "shape has an unknown key \"{}\" (known: event_names, body, event_type_header, delivery_id_header, json)",
                    shown(other)
                ))
            }
        }
    }
    if let (Some(a), Some(b)) = (&shape.event_type_header, &shape.delivery_id_header) {
        if a.eq_ignore_ascii_case(b) {
            return Err(format!(
                "shape.event_type_header and shape.delivery_id_header are the same header \"{a}\""
            ));
        }
    }
    Ok(shape)
}

/// At most 80 characters of a caller's text, control characters escaped, for an error.
fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 80 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// An event name (stored or renamed): printable ASCII, 1 to 200 characters (it may be sent in
/// a header).
fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("may only have printable ASCII characters without spaces".into());
    }
    Ok(())
}

/// A header name as custom headers' are checked (`_check_headers`), not one pg_webhooks sets.
pub fn check_header_name(name: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b);
    if name.is_empty() || name.len() > 256 || !name.bytes().all(token) {
        return Err(format!("invalid header name \"{}\"", shown(name)));
    }
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "header \"{name}\" is set by pg_webhooks and cannot be used"
        ));
    }
    Ok(())
}

impl Shape {
    /// The shape's headers, by their configured names.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.event_type_header
            .as_deref()
            .into_iter()
            .chain(self.delivery_id_header.as_deref())
    }

    /// The name this subscription's receiver knows `stored` by.
    pub fn event_name<'a>(&'a self, stored: &'a str) -> &'a str {
        self.event_names
            .iter()
            .find(|(from, _)| from == stored)
            .map(|(_, to)| to.as_str())
            .unwrap_or(stored)
    }

    /// Whether `pattern` names one of the renamed types exactly (a subscription may list those
    /// among its event_types).
    pub fn is_renamed(&self, pattern: &str) -> bool {
        self.event_names.iter().any(|(_, to)| to == pattern)
    }
}

/// Where in the template an error is, for messages: `body.order.created_at`.
fn at(path: &str, key: &str) -> String {
    if key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && !key.is_empty()
    {
        format!("{path}.{key}")
    } else {
        format!("{path}[\"{}\"]", shown(key))
    }
}

fn compile(t: &T, depth: usize, vars: &mut Vec<String>, path: &str) -> Result<Node, String> {
    if depth >= MAX_TEMPLATE_DEPTH {
        return Err(format!(
            "shape.{path}: the template is nested deeper than {MAX_TEMPLATE_DEPTH} levels"
        ));
    }
    match t {
        T::Null | T::Bool(_) | T::Num(_) => {
            let mut s = String::new();
            t.to_json(&mut s);
            Ok(Node::Literal(s))
        }
        T::Str(s) => compile_string(s, vars).map_err(|e| format!("shape.{path}: {e}")),
        T::Arr(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| compile(v, depth + 1, vars, &format!("{path}[{i}]")))
            .collect::<Result<_, _>>()
            .map(Node::Array),
        T::Obj(members) if members.iter().any(|(k, _)| k.starts_with('$')) => {
            compile_operator(members, depth, vars, path)
        }
        T::Obj(members) => members
            .iter()
            .map(|(k, v)| Ok((k.clone(), compile(v, depth + 1, vars, &at(path, k))?)))
            .collect::<Result<_, String>>()
            .map(Node::Object),
    }
}

fn compile_operator(
    members: &[(String, T)],
    depth: usize,
    vars: &mut Vec<String>,
    path: &str,
) -> Result<Node, String> {
    let get = |name: &str| members.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let only = |allowed: &[&str]| -> Result<(), String> {
        match members.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(format!(
                "shape.{path}: \"{}\" does not belong with {} (allowed: {})",
                shown(k),
                allowed[0],
                allowed.join(", ")
            )),
            None => Ok(()),
        }
    };
    if let Some(v) = get("$literal") {
        only(&["$literal"])?;
        let mut s = String::new();
        v.to_json(&mut s);
        return Ok(Node::Literal(s));
    }
    if let Some(v) = get("$merge") {
        only(&["$merge"])?;
        let T::Arr(parts) = v else {
            return Err(format!(
                "shape.{path}.$merge must be an array of templates of objects, not {}",
                v.kind()
            ));
        };
        return parts
            .iter()
            .enumerate()
            .map(|(i, p)| compile(p, depth + 1, vars, &format!("{path}.$merge[{i}]")))
            .collect::<Result<_, _>>()
            .map(Node::Merge);
    }
    if let Some(v) = get("$each") {
        only(&["$each", "to", "as"])?;
        let T::Str(src) = v else {
            return Err(format!(
                "shape.{path}.$each must be a string \"{{{{ path }}}}\", not {}",
                v.kind()
            ));
        };
        let source =
            match compile_string(src, vars).map_err(|e| format!("shape.{path}.$each: {e}"))? {
                Node::Expr(e) => e,
                _ => {
                    return Err(format!(
                    "shape.{path}.$each must be one expression such as \"{{{{ data.items }}}}\""
                ))
                }
            };
        let var = match get("as") {
            None => "item".to_string(),
            Some(T::Str(name)) => {
                if !is_ident(name) || ROOTS.split(", ").any(|r| r == name) {
                    return Err(format!(
                        "shape.{path}.as must be a name of letters, digits and _ that is not one of {ROOTS}"
                    ));
                }
                name.clone()
            }
            Some(other) => {
                return Err(format!(
                    "shape.{path}.as must be a string, not {}",
                    other.kind()
                ))
            }
        };
        let Some(to) = get("to") else {
            return Err(format!(
                "shape.{path}: $each needs \"to\", the template of each element"
            ));
        };
        vars.push(var.clone());
        let to = compile(to, depth + 1, vars, &format!("{path}.to"));
        vars.pop();
        return Ok(Node::Each {
            source,
            var,
            to: Box::new(to?),
        });
    }
    let (k, _) = members
        .iter()
        .find(|(k, _)| k.starts_with('$'))
        .expect("checked by the caller");
    Err(format!(
        "shape.{path}: unknown operator \"{}\" (operators: $each, $merge, $literal; a key starting with $ is written inside {{\"$literal\": ...}})",
        shown(k)
    ))
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && s.len() <= 64
}

/// A string of the template: literal text, one whole `{{ expr }}`, or text with expressions.
fn compile_string(s: &str, vars: &[String]) -> Result<Node, String> {
    if !s.contains("{{") {
        if s.contains("}}") {
            return Err(format!("\"}}}}\" without \"{{{{\" in \"{}\"", shown(s)));
        }
        let mut lit = String::new();
        push_json_string(s, &mut lit);
        return Ok(Node::Literal(lit));
    }
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find("{{") {
        let text = &rest[..open];
        if text.contains("}}") {
            return Err(format!("\"}}}}\" without \"{{{{\" in \"{}\"", shown(s)));
        }
        if !text.is_empty() {
            parts.push(Part::Text(text.to_string()));
        }
        let after = &rest[open + 2..];
        let close = find_close(after)
            .ok_or_else(|| format!("\"{{{{\" without \"}}}}\" in \"{}\"", shown(s)))?;
        let expr =
            parse_expr(&after[..close], vars).map_err(|e| format!("{e} in \"{}\"", shown(s)))?;
        parts.push(Part::Expr(expr));
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("\"}}}}\" without \"{{{{\" in \"{}\"", shown(s)));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    if parts.len() == 1 {
        if let Part::Expr(_) = &parts[0] {
            let Some(Part::Expr(e)) = parts.pop() else {
                unreachable!()
            };
            return Ok(Node::Expr(e));
        }
    }
    Ok(Node::Concat(parts))
}

/// The `}}` closing an expression, skipping quoted strings.
fn find_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut quote = false;
    while i < b.len() {
        if quote {
            if b[i] == b'\\' {
                i += 1;
            } else if b[i] == b'\'' {
                quote = false;
            }
        } else if b[i] == b'\'' {
            quote = true;
        } else if b[i] == b'}' && b.get(i + 1) == Some(&b'}') {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The tokens of an expression.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Num(String),
    Dot,
    LBracket,
    RBracket,
    Pipe,
    LParen,
    RParen,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let single = match b[i] {
            b'.' => Some(Tok::Dot),
            b'[' => Some(Tok::LBracket),
            b']' => Some(Tok::RBracket),
            b'|' => Some(Tok::Pipe),
            b'(' => Some(Tok::LParen),
            b')' => Some(Tok::RParen),
            b',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(t) = single {
            out.push(t);
            i += 1;
            continue;
        }
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'\'' => {
                let mut v = String::new();
                let mut chars = s[i + 1..].char_indices();
                loop {
                    match chars.next() {
                        None => return Err("unterminated '...' string".into()),
                        Some((_, '\\')) => match chars.next() {
                            Some((_, n @ ('\'' | '\\'))) => v.push(n),
                            _ => return Err("in '...' only \\' and \\\\ are escapes".into()),
                        },
                        Some((at, '\'')) => {
                            i = i + 1 + at + 1;
                            break;
                        }
                        Some((_, ch)) => v.push(ch),
                    }
                }
                out.push(Tok::Str(v));
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(b, i).ok_or("'-' must start a number")?;
                let text = &s[i..end];
                i = end;
                match text.parse::<i64>() {
                    Ok(n) => out.push(Tok::Int(n)),
                    Err(_) => out.push(Tok::Num(text.to_string())),
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Tok::Ident(s[start..i].to_string()));
            }
            _ => {
                let ch = s[i..].chars().next().unwrap_or('?');
                return Err(format!("unexpected character '{}'", shown(&ch.to_string())));
            }
        }
    }
    Ok(out)
}

fn parse_expr(s: &str, vars: &[String]) -> Result<Expr, String> {
    let toks = tokenize(s)?;
    let mut i;
    let root = match toks.first() {
        None => return Err("empty {{ }}".into()),
        Some(Tok::Ident(name)) => {
            i = 1;
            if let Some(v) = vars.iter().rposition(|v| v == name) {
                Root::Var(v)
            } else {
                match name.as_str() {
                    "id" => Root::Id,
                    "type" => Root::Type,
                    "stored_type" => Root::StoredType,
                    "created_at" => Root::CreatedAt,
                    "data" => Root::Data,
                    "delivery_id" => Root::DeliveryId,
                    "attempt" => Root::Attempt,
                    "timestamp" => Root::Timestamp,
                    "subscription_id" => Root::SubscriptionId,
                    "null" | "true" | "false" => Root::Const(name.clone()),
                    other => {
                        let each = if vars.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", vars.join(", "))
                        };
                        return Err(format!(
                            "unknown name \"{}\" (a path starts with {ROOTS}{each})",
                            shown(other)
                        ));
                    }
                }
            }
        }
        Some(Tok::Str(v)) => {
            i = 1;
            let mut j = String::new();
            push_json_string(v, &mut j);
            Root::Const(j)
        }
        Some(Tok::Int(n)) => {
            i = 1;
            Root::Const(n.to_string())
        }
        Some(Tok::Num(n)) => {
            i = 1;
            Root::Const(n.clone())
        }
        Some(_) => return Err("an expression starts with a name, a 'string' or a number".into()),
    };
    let mut steps = Vec::new();
    while i < toks.len() && toks[i] != Tok::Pipe {
        if matches!(root, Root::Const(_)) {
            return Err("a constant has no fields".into());
        }
        match (&toks[i], toks.get(i + 1), toks.get(i + 2)) {
            (Tok::Dot, Some(Tok::Ident(k)), _) => {
                steps.push(Step::Key(k.clone()));
                i += 2;
            }
            (Tok::LBracket, Some(Tok::Int(n)), Some(Tok::RBracket)) => {
                steps.push(Step::Index(*n));
                i += 3;
            }
            (Tok::LBracket, Some(Tok::Str(k)), Some(Tok::RBracket)) => {
                steps.push(Step::Key(k.clone()));
                i += 3;
            }
            _ => {
                return Err(
                    "a path goes on with .name, [0] (an index, [-1] the last) or ['key']".into(),
                )
            }
        }
        if steps.len() > 64 {
            return Err("a path has more than 64 steps".into());
        }
    }
    let mut filters = Vec::new();
    while i < toks.len() {
        // toks[i] is a pipe
        i += 1;
        let Some(Tok::Ident(name)) = toks.get(i) else {
            return Err("a filter name must follow |".into());
        };
        i += 1;
        let mut args: Vec<Tok> = Vec::new();
        if toks.get(i) == Some(&Tok::LParen) {
            i += 1;
            loop {
                match toks.get(i) {
                    Some(Tok::RParen) if args.is_empty() => {
                        i += 1;
                        break;
                    }
                    Some(t @ (Tok::Str(_) | Tok::Int(_) | Tok::Num(_) | Tok::Ident(_))) => {
                        args.push(t.clone());
                        i += 1;
                    }
                    _ => return Err(format!("bad arguments of {name}(...)")),
                }
                match toks.get(i) {
                    Some(Tok::Comma) => i += 1,
                    Some(Tok::RParen) => {
                        i += 1;
                        break;
                    }
                    _ => return Err(format!("bad arguments of {name}(...)")),
                }
            }
        }
        if !(i == toks.len() || toks[i] == Tok::Pipe) {
            return Err(format!("unexpected text after the filter {name}"));
        }
        filters.push(filter(name, &args)?);
        if filters.len() > MAX_FILTERS {
            return Err(format!("more than {MAX_FILTERS} filters"));
        }
    }
    Ok(Expr {
        root,
        steps,
        filters,
    })
}

fn offset_arg(name: &str, t: Option<&Tok>, default: Option<i32>) -> Result<Option<i32>, String> {
    match t {
        None => Ok(default),
        Some(Tok::Str(s)) => parse_offset(s).map_err(|_| {
            format!(
                "{name}: the offset must be 'Z' or like '+02:00' or '-05:30', not '{}'",
                shown(s)
            )
        }),
        Some(_) => Err(format!("{name}: the offset is a string such as '+02:00'")),
    }
}

/// `Z` -> None; `+HH:MM` / `-HH:MM` -> minutes.
fn parse_offset(s: &str) -> Result<Option<i32>, ()> {
    if s == "Z" {
        return Ok(None);
    }
    let b = s.as_bytes();
    if b.len() != 6 || !matches!(b[0], b'+' | b'-') || b[3] != b':' {
        return Err(());
    }
    let h: i32 = s[1..3].parse().map_err(|_| ())?;
    let m: i32 = s[4..6].parse().map_err(|_| ())?;
    if !s[1..3].bytes().all(|c| c.is_ascii_digit())
        || !s[4..6].bytes().all(|c| c.is_ascii_digit())
        || h > 23
        || m > 59
    {
        return Err(());
    }
    let v = h * 60 + m;
    Ok(Some(if b[0] == b'-' { -v } else { v }))
}

fn filter(name: &str, args: &[Tok]) -> Result<Filter, String> {
    let max_args = |n: usize| -> Result<(), String> {
        if args.len() > n {
            Err(format!("{name} takes at most {n} argument(s)"))
        } else {
            Ok(())
        }
    };
    Ok(match name {
        "iso8601" => {
            max_args(2)?;
            let offset = offset_arg(name, args.first(), None)?;
            let digits = match args.get(1) {
                None => 0,
                Some(Tok::Int(d @ (0 | 3 | 6))) => *d as u8,
                Some(_) => return Err("iso8601: the second argument (fraction digits) is 0, 3 or 6".into()),
            };
            Filter::Iso8601(offset, digits)
        }
        "unix" => {
            max_args(0)?;
            Filter::Unix
        }
        "unix_ms" => {
            max_args(0)?;
            Filter::UnixMs
        }
        "datetime" | "date" => {
            max_args(1)?;
            let offset = offset_arg(name, args.first(), Some(0))?.unwrap_or(0);
            if name == "date" {
                Filter::Date(offset)
            } else {
                Filter::Datetime(offset)
            }
        }
        "string" => {
            max_args(0)?;
            Filter::String
        }
        "camel_case" => {
            max_args(0)?;
            Filter::CamelCase
        }
        "upper" => {
            max_args(0)?;
            Filter::Upper
        }
        "lower" => {
            max_args(0)?;
            Filter::Lower
        }
        "default" => {
            if args.len() != 1 {
                return Err("default takes one argument: default('none'), default(0), default(null)".into());
            }
            Filter::Default(match &args[0] {
                Tok::Str(s) => {
                    let mut j = String::new();
                    push_json_string(s, &mut j);
                    j
                }
                Tok::Int(n) => n.to_string(),
                Tok::Num(n) => n.clone(),
                Tok::Ident(w) if matches!(w.as_str(), "null" | "true" | "false") => w.clone(),
                _ => return Err("default's argument is a 'string', a number, true, false or null".into()),
            })
        }
        other => {
            return Err(format!(
                "unknown filter \"{}\" (filters: iso8601, unix, unix_ms, datetime, date, string, default, camel_case, upper, lower)",
                shown(other)
            ))
        }
    })
}

// ------------------------------------------------------------------------------------------
// JSON text helpers (the stored data is navigated as text)
// ------------------------------------------------------------------------------------------

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ws(s[i]) {
        i += 1;
    }
    i
}

/// End of the JSON string starting at `i` (a quote), after its closing quote.
fn string_end(s: &[u8], i: usize) -> Option<usize> {
    if s.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

fn number_end(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    if s.get(j) == Some(&b'-') {
        j += 1;
    }
    let digits = |j: &mut usize| {
        let start = *j;
        while *j < s.len() && s[*j].is_ascii_digit() {
            *j += 1;
        }
        *j > start
    };
    if !digits(&mut j) {
        return None;
    }
    if s.get(j) == Some(&b'.') {
        j += 1;
        if !digits(&mut j) {
            return None;
        }
    }
    if matches!(s.get(j), Some(b'e' | b'E')) {
        j += 1;
        if matches!(s.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if !digits(&mut j) {
            return None;
        }
    }
    Some(j)
}

/// End of the JSON value starting at `i` (no leading white space). Iterative: any depth.
fn value_end(s: &[u8], i: usize) -> Option<usize> {
    match s.get(i)? {
        b'"' => string_end(s, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < s.len() {
                match s[j] {
                    b'"' => {
                        j = string_end(s, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        b't' => Some(i + 4).filter(|e| s.get(i..*e) == Some(b"true")),
        b'f' => Some(i + 5).filter(|e| s.get(i..*e) == Some(b"false")),
        b'n' => Some(i + 4).filter(|e| s.get(i..*e) == Some(b"null")),
        _ => number_end(s, i),
    }
}

/// The members of a JSON object text, as (raw key text with quotes, value text).
fn object_members(text: &str) -> Option<Vec<(&str, &str)>> {
    let s = text.as_bytes();
    let mut i = skip_ws(s, 0);
    if s.get(i) != Some(&b'{') {
        return None;
    }
    let mut out = Vec::new();
    i = skip_ws(s, i + 1);
    if s.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let kend = string_end(s, i)?;
        let key = &text[i..kend];
        i = skip_ws(s, kend);
        if s.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(s, i + 1);
        let vend = value_end(s, i)?;
        out.push((key, &text[i..vend]));
        i = skip_ws(s, vend);
        match s.get(i) {
            Some(b',') => i = skip_ws(s, i + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

fn array_items(text: &str) -> Option<Vec<&str>> {
    let s = text.as_bytes();
    let mut i = skip_ws(s, 0);
    if s.get(i) != Some(&b'[') {
        return None;
    }
    let mut out = Vec::new();
    i = skip_ws(s, i + 1);
    if s.get(i) == Some(&b']') {
        return Some(out);
    }
    loop {
        let vend = value_end(s, i)?;
        out.push(&text[i..vend]);
        i = skip_ws(s, vend);
        match s.get(i) {
            Some(b',') => i = skip_ws(s, i + 1),
            Some(b']') => return Some(out),
            _ => return None,
        }
    }
}

fn kind_of(text: &str) -> &'static str {
    match text.as_bytes().get(skip_ws(text.as_bytes(), 0)) {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') | None => "null",
        _ => "a number",
    }
}

/// The content of a JSON string literal (with its quotes), or None if it is not one.
fn decode_json_string(raw: &str) -> Option<String> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(inner.to_string());
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            '/' => out.push('/'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let hex = |chars: &mut std::str::Chars| -> Option<u32> {
                    let h: String = chars.by_ref().take(4).collect();
                    if h.len() != 4 {
                        return None;
                    }
                    u32::from_str_radix(&h, 16).ok()
                };
                let u = hex(&mut chars)?;
                let code = if (0xd800..0xdc00).contains(&u) {
                    // A high surrogate: its low half must follow.
                    if chars.next()? != '\\' || chars.next()? != 'u' {
                        return None;
                    }
                    let lo = hex(&mut chars)?;
                    if !(0xdc00..0xe000).contains(&lo) {
                        return None;
                    }
                    0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00)
                } else {
                    u
                };
                out.push(char::from_u32(code)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A string as JSON, escaped as PostgreSQL's jsonb output and JavaScript's JSON.stringify
/// both escape: `"` `\` and the control characters below U+0020 (`\b \f \n \r \t`, the others
/// as `\u00xx`); everything else as it is (U+2028 and DEL included).
pub fn push_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// JSON text without the white space between tokens (strings kept byte for byte).
pub fn compact_json_into(json: &str, out: &mut String) {
    let mut in_string = false;
    let mut escaped = false;
    for ch in json.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if !ch.is_ascii_whitespace() {
            in_string = ch == '"';
            out.push(ch);
        }
    }
}

/// Every object key of a JSON text in camelCase (`order_id` -> `orderId`), at any depth;
/// streaming, so any depth is fine.
fn camel_case_keys(json: &str, out: &mut String) {
    let s = json.as_bytes();
    let mut i = 0;
    // Whether the next string is an object key: after `{` or after `,` inside an object.
    let mut stack: Vec<u8> = Vec::new();
    let mut expect_key = false;
    while i < s.len() {
        let b = s[i];
        match b {
            b'"' => {
                let end = string_end(s, i).unwrap_or(s.len());
                let raw = &json[i..end];
                if expect_key {
                    match decode_json_string(raw) {
                        Some(k) => push_json_string(&camel(&k), out),
                        None => out.push_str(raw),
                    }
                    expect_key = false;
                } else {
                    out.push_str(raw);
                }
                i = end;
                continue;
            }
            b'{' => {
                stack.push(b'{');
                expect_key = true;
                out.push('{');
            }
            b'[' => {
                stack.push(b'[');
                out.push('[');
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
                out.push(b as char);
            }
            b',' => {
                expect_key = stack.last() == Some(&b'{');
                out.push(',');
            }
            b if is_ws(b) => {}
            _ => {
                // Numbers, literals, ':' - ASCII, copied.
                out.push(b as char);
            }
        }
        i += 1;
    }
}

/// `order_id` -> `orderId`, `product_name2` -> `productName2`; leading underscores stay.
fn camel(k: &str) -> String {
    let mut out = String::with_capacity(k.len());
    let mut up = false;
    let mut seen = false;
    for c in k.chars() {
        if c == '_' && seen {
            up = true;
            continue;
        }
        if c != '_' {
            seen = true;
        }
        if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    if up {
        out.push('_');
    }
    out
}

// ------------------------------------------------------------------------------------------
// Timestamps
// ------------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A timestamp: unix seconds and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Instant {
    secs: i64,
    nanos: u32,
}

/// `YYYY-MM-DD`, optionally `T` or space and `HH:MM[:SS[.fraction]]`, optionally `Z` or an
/// offset `±HH[:MM]` / `±HHMM`. Without an offset the time is UTC.
fn parse_timestamp(s: &str) -> Option<Instant> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !(1..=12).contains(&mo) {
        return None;
    }
    let month_days = [
        31,
        if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
            29
        } else {
            28
        },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d < 1 || d > month_days[(mo - 1) as usize] {
        return None;
    }
    let mut i = 10;
    let (mut h, mut mi, mut sec, mut nanos) = (0, 0, 0, 0u32);
    if matches!(b.get(i), Some(b'T' | b't' | b' ')) {
        h = num(i + 1, 2)?;
        if b.get(i + 3) != Some(&b':') {
            return None;
        }
        mi = num(i + 4, 2)?;
        i += 6;
        if b.get(i) == Some(&b':') {
            sec = num(i + 1, 2)?;
            i += 3;
            if b.get(i) == Some(&b'.') {
                i += 1;
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let digits = &s[start..i];
                if digits.is_empty() || digits.len() > 9 {
                    return None;
                }
                nanos = format!("{digits:0<9}").parse().ok()?;
            }
        }
        if h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        sec = sec.min(59);
    }
    let offset_min: i64 = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) => {
            let oh = num(i + 1, 2)?;
            let om = match b.len() - (i + 3) {
                0 => 0,
                3 if b[i + 3] == b':' => num(i + 4, 2)?,
                2 => num(i + 3, 2)?,
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let v = oh * 60 + om;
            if *sign == b'-' {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(Instant { secs, nanos })
}

/// A value as a timestamp: a string as above, or a number of unix seconds.
fn instant_of(value: &str, filter: &str) -> Result<Option<Instant>, RenderError> {
    let v = value.trim();
    if v == "null" {
        return Ok(None);
    }
    if v.starts_with('"') {
        let s = decode_json_string(v).unwrap_or_default();
        return parse_timestamp(&s).map(Some).ok_or_else(|| {
            RenderError::Failed(format!(
                "{filter}: \"{}\" is not a timestamp (YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|±HH:MM])",
                shown(&s)
            ))
        });
    }
    if matches!(v.as_bytes().first(), Some(b'-' | b'0'..=b'9')) {
        if let Ok(f) = v.parse::<f64>() {
            if f.is_finite() && f.abs() < 253_402_300_800.0 {
                let secs = f.floor();
                let nanos = ((f - secs) * 1e9).round().min(999_999_999.0) as u32;
                return Ok(Some(Instant {
                    secs: secs as i64,
                    nanos,
                }));
            }
        }
    }
    Err(RenderError::Failed(format!(
        "{filter}: {} is not a timestamp (a string or unix seconds)",
        kind_of(v)
    )))
}

fn civil(
    t: Instant,
    offset_min: i32,
    filter: &str,
) -> Result<(i64, i64, i64, i64, i64, i64), RenderError> {
    let local = t.secs + offset_min as i64 * 60;
    let days = local.div_euclid(86_400);
    let rem = local.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return Err(RenderError::Failed(format!(
            "{filter}: the year {y} is out of range 0000-9999"
        )));
    }
    Ok((y, m, d, rem / 3600, rem % 3600 / 60, rem % 60))
}

fn offset_text(offset_min: i32) -> String {
    let sign = if offset_min < 0 { '-' } else { '+' };
    let a = offset_min.abs();
    format!("{sign}{:02}:{:02}", a / 60, a % 60)
}

// ------------------------------------------------------------------------------------------
// Evaluation
// ------------------------------------------------------------------------------------------

/// The output under construction, with its cap.
struct Out {
    buf: String,
    limit: usize,
}

impl Out {
    fn check(&self) -> Result<(), RenderError> {
        if self.buf.len() > self.limit {
            Err(RenderError::Oversized(self.buf.len()))
        } else {
            Ok(())
        }
    }
}

struct Scope<'a> {
    env: &'a Envelope<'a>,
    event_type: &'a str,
    vars: Vec<Cow<'a, str>>,
    /// Values of expressions that use no `$each` variable, by the expression's address: one
    /// inside a `$each` (`{{ data.id }}` per item) is evaluated once, not once per element
    /// (each evaluation scans the data).
    memo: std::cell::RefCell<std::collections::HashMap<usize, Cow<'a, str>>>,
}

fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    push_json_string(s, &mut o);
    o
}

/// Follow one step into a JSON text; missing gives null.
fn step_into<'v>(value: Cow<'v, str>, step: &Step) -> Cow<'v, str> {
    let found = |v: &str| -> Option<(usize, usize)> {
        match step {
            Step::Key(k) => {
                let members = object_members(v)?;
                // The last of a duplicate key, as a JSON parser would take it.
                let (_, val) = members.into_iter().rev().find(|(raw, _)| {
                    let raw_inner = &raw[1..raw.len() - 1];
                    if raw_inner.contains('\\') {
                        decode_json_string(raw).as_deref() == Some(k.as_str())
                    } else {
                        raw_inner == k
                    }
                })?;
                let start = val.as_ptr() as usize - v.as_ptr() as usize;
                Some((start, start + val.len()))
            }
            Step::Index(n) => {
                let items = array_items(v)?;
                let idx = if *n < 0 { items.len() as i64 + n } else { *n };
                let val = items.get(usize::try_from(idx).ok()?)?;
                let start = val.as_ptr() as usize - v.as_ptr() as usize;
                Some((start, start + val.len()))
            }
        }
    };
    match value {
        Cow::Borrowed(v) => match found(v) {
            Some((a, b)) => Cow::Borrowed(&v[a..b]),
            None => Cow::Borrowed("null"),
        },
        Cow::Owned(v) => match found(&v) {
            Some((a, b)) => Cow::Owned(v[a..b].to_string()),
            None => Cow::Borrowed("null"),
        },
    }
}

fn eval_expr<'a>(e: &Expr, scope: &Scope<'a>) -> Result<Cow<'a, str>, RenderError> {
    let constant = !matches!(e.root, Root::Var(_));
    let key = e as *const Expr as usize;
    if constant {
        if let Some(v) = scope.memo.borrow().get(&key) {
            return Ok(v.clone());
        }
    }
    let v = eval_expr_uncached(e, scope)?;
    if constant {
        scope.memo.borrow_mut().insert(key, v.clone());
    }
    Ok(v)
}

fn eval_expr_uncached<'a>(e: &Expr, scope: &Scope<'a>) -> Result<Cow<'a, str>, RenderError> {
    let env = scope.env;
    let mut v: Cow<'a, str> = match &e.root {
        Root::Id => Cow::Owned(json_string(env.event_id)),
        Root::Type => Cow::Owned(json_string(scope.event_type)),
        Root::StoredType => Cow::Owned(json_string(env.event_type)),
        Root::CreatedAt => Cow::Owned(json_string(env.created_at)),
        Root::Data => Cow::Borrowed(env.data),
        Root::DeliveryId => Cow::Owned(env.delivery_id.to_string()),
        Root::Attempt => Cow::Owned(env.attempt.to_string()),
        Root::Timestamp => Cow::Owned(env.timestamp.to_string()),
        Root::SubscriptionId => Cow::Owned(env.subscription_id.to_string()),
        Root::Var(i) => scope.vars.get(*i).cloned().unwrap_or(Cow::Borrowed("null")),
        Root::Const(c) => Cow::Owned(c.clone()),
    };
    for step in &e.steps {
        v = step_into(v, step);
    }
    for f in &e.filters {
        v = apply(f, v)?;
    }
    Ok(v)
}

fn apply<'a>(f: &Filter, v: Cow<'a, str>) -> Result<Cow<'a, str>, RenderError> {
    let is_null = v.trim() == "null";
    Ok(match f {
        Filter::Default(d) => {
            if is_null {
                Cow::Owned(d.clone())
            } else {
                v
            }
        }
        Filter::String => {
            if is_null || v.trim_start().starts_with('"') {
                v
            } else {
                let mut c = String::new();
                compact_json_into(&v, &mut c);
                Cow::Owned(json_string(&c))
            }
        }
        Filter::CamelCase => {
            let mut out = String::with_capacity(v.len());
            camel_case_keys(&v, &mut out);
            Cow::Owned(out)
        }
        Filter::Upper | Filter::Lower => {
            if is_null {
                return Ok(v);
            }
            let name = if matches!(f, Filter::Upper) {
                "upper"
            } else {
                "lower"
            };
            let s = decode_json_string(v.trim()).ok_or_else(|| {
                RenderError::Failed(format!("{name}: {} is not a string", kind_of(&v)))
            })?;
            Cow::Owned(json_string(&if matches!(f, Filter::Upper) {
                s.to_uppercase()
            } else {
                s.to_lowercase()
            }))
        }
        Filter::Iso8601(offset, digits) => {
            let Some(t) = instant_of(&v, "iso8601")? else {
                return Ok(v);
            };
            let (y, m, d, h, mi, s) = civil(t, offset.unwrap_or(0), "iso8601")?;
            let mut o = format!("\"{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
            match digits {
                3 => {
                    let _ = write!(o, ".{:03}", t.nanos / 1_000_000);
                }
                6 => {
                    let _ = write!(o, ".{:06}", t.nanos / 1_000);
                }
                _ => {}
            }
            match offset {
                None => o.push('Z'),
                Some(off) => o.push_str(&offset_text(*off)),
            }
            o.push('"');
            Cow::Owned(o)
        }
        Filter::Datetime(offset) | Filter::Date(offset) => {
            let name = if matches!(f, Filter::Date(_)) {
                "date"
            } else {
                "datetime"
            };
            let Some(t) = instant_of(&v, name)? else {
                return Ok(v);
            };
            let (y, m, d, h, mi, s) = civil(t, *offset, name)?;
            Cow::Owned(if matches!(f, Filter::Date(_)) {
                format!("\"{y:04}-{m:02}-{d:02}\"")
            } else {
                format!("\"{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}\"")
            })
        }
        Filter::Unix => {
            let Some(t) = instant_of(&v, "unix")? else {
                return Ok(v);
            };
            Cow::Owned(t.secs.to_string())
        }
        Filter::UnixMs => {
            let Some(t) = instant_of(&v, "unix_ms")? else {
                return Ok(v);
            };
            Cow::Owned((t.secs * 1000 + (t.nanos / 1_000_000) as i64).to_string())
        }
    })
}

/// A value as text inside a string: a string's content, null as nothing, anything else as
/// its compact JSON.
fn push_as_text(v: &str, out: &mut String) {
    let t = v.trim();
    if t == "null" {
        return;
    }
    if t.starts_with('"') {
        out.push_str(&decode_json_string(t).unwrap_or_default());
    } else {
        compact_json_into(t, out);
    }
}

fn eval(node: &Node, scope: &mut Scope, out: &mut Out) -> Result<(), RenderError> {
    match node {
        Node::Literal(s) => out.buf.push_str(s),
        Node::Expr(e) => {
            let v = eval_expr(e, scope)?;
            compact_json_into(&v, &mut out.buf);
        }
        Node::Concat(parts) => {
            let mut s = String::new();
            for p in parts {
                match p {
                    Part::Text(t) => s.push_str(t),
                    Part::Expr(e) => push_as_text(&eval_expr(e, scope)?, &mut s),
                }
                if s.len() > out.limit {
                    return Err(RenderError::Oversized(out.buf.len() + s.len()));
                }
            }
            push_json_string(&s, &mut out.buf);
        }
        Node::Object(members) => {
            out.buf.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.buf.push(',');
                }
                push_json_string(k, &mut out.buf);
                out.buf.push(':');
                eval(v, scope, out)?;
                out.check()?;
            }
            out.buf.push('}');
        }
        Node::Array(items) => {
            out.buf.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.buf.push(',');
                }
                eval(v, scope, out)?;
                out.check()?;
            }
            out.buf.push(']');
        }
        Node::Each { source, var, to } => {
            let v = eval_expr(source, scope)?;
            if v.trim() == "null" {
                out.buf.push_str("null");
                return Ok(());
            }
            let Some(items) = array_items(&v) else {
                return Err(RenderError::Failed(format!(
                    "$each: {} is not an array (the elements of \"{var}\" come from an array)",
                    kind_of(&v)
                )));
            };
            out.buf.push('[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.buf.push(',');
                }
                // The element is bound for the sub-template (owned: it outlives nothing here).
                scope.vars.push(Cow::Owned(item.to_string()));
                let r = eval(to, scope, out);
                scope.vars.pop();
                r?;
                out.check()?;
            }
            out.buf.push(']');
        }
        Node::Merge(parts) => {
            let mut merged: Vec<(String, String)> = Vec::new();
            let mut size = 0;
            for p in parts {
                let mut part = Out {
                    buf: String::new(),
                    limit: out.limit,
                };
                eval(p, scope, &mut part)?;
                if part.buf == "null" {
                    continue;
                }
                let Some(members) = object_members(&part.buf) else {
                    return Err(RenderError::Failed(format!(
                        "$merge: {} is not an object",
                        kind_of(&part.buf)
                    )));
                };
                for (k, v) in members {
                    let key = decode_json_string(k).unwrap_or_default();
                    size += k.len() + v.len() + 2;
                    match merged.iter_mut().find(|(mk, _)| *mk == key) {
                        Some(m) => m.1 = v.to_string(),
                        None => merged.push((key, v.to_string())),
                    }
                }
                if size > out.limit {
                    return Err(RenderError::Oversized(out.buf.len() + size));
                }
            }
            out.buf.push('{');
            for (i, (k, v)) in merged.iter().enumerate() {
                if i > 0 {
                    out.buf.push(',');
                }
                push_json_string(k, &mut out.buf);
                out.buf.push(':');
                out.buf.push_str(v);
            }
            out.buf.push('}');
        }
    }
    out.check()
}

/// The standard envelope `{"id","type","created_at","data"}`, `data` as stored (compacted).
pub fn envelope_body(event_id: &str, event_type: &str, created_at: &str, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 160);
    out.push_str("{\"id\":");
    push_json_string(event_id, &mut out);
    out.push_str(",\"type\":");
    push_json_string(event_type, &mut out);
    out.push_str(",\"created_at\":");
    push_json_string(created_at, &mut out);
    out.push_str(",\"data\":");
    compact_json_into(data, &mut out);
    out.push('}');
    out
}

/// A delivery's event type, body and extra headers under `shape` (None: as today). The body
/// is capped at `max_bytes` (a larger one is `Oversized`).
pub fn render(
    shape: Option<&Shape>,
    env: &Envelope,
    max_bytes: usize,
) -> Result<Rendered, RenderError> {
    let Some(shape) = shape else {
        let body = envelope_body(env.event_id, env.event_type, env.created_at, env.data);
        if body.len() > max_bytes {
            return Err(RenderError::Oversized(body.len()));
        }
        return Ok(Rendered {
            event_type: env.event_type.to_string(),
            body: body.into_bytes(),
            headers: Vec::new(),
        });
    };
    let event_type = shape.event_name(env.event_type).to_string();
    let body = match &shape.body {
        None => envelope_body(env.event_id, &event_type, env.created_at, env.data),
        Some(template) => {
            let mut scope = Scope {
                env,
                event_type: &event_type,
                vars: Vec::new(),
                memo: Default::default(),
            };
            let mut out = Out {
                buf: String::new(),
                limit: max_bytes,
            };
            eval(template, &mut scope, &mut out)?;
            out.buf
        }
    };
    let body = if shape.javascript {
        let mut js = String::with_capacity(body.len());
        javascript_json(&body, &mut js).map_err(RenderError::Failed)?;
        js
    } else {
        body
    };
    if body.len() > max_bytes {
        return Err(RenderError::Oversized(body.len()));
    }
    let mut headers = Vec::new();
    if let Some(h) = &shape.event_type_header {
        headers.push((h.clone(), event_type.clone()));
    }
    if let Some(h) = &shape.delivery_id_header {
        headers.push((h.clone(), env.event_id.to_string()));
    }
    Ok(Rendered {
        event_type,
        body: body.into_bytes(),
        headers,
    })
}

// ------------------------------------------------------------------------------------------
// JSON as JavaScript re-spells it: JSON.stringify(JSON.parse(text))
// ------------------------------------------------------------------------------------------

enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn js_parse(s: &str, i: &mut usize, depth: usize) -> Result<J, String> {
    if depth > MAX_JS_DEPTH {
        return Err(format!(
            "the body is nested deeper than {MAX_JS_DEPTH} levels, too deep for json: \"javascript\""
        ));
    }
    let b = s.as_bytes();
    *i = skip_ws(b, *i);
    let bad = || "the body is not valid JSON".to_string();
    match b.get(*i) {
        Some(b'{') => {
            *i += 1;
            let mut members: Vec<(String, J)> = Vec::new();
            *i = skip_ws(b, *i);
            if b.get(*i) == Some(&b'}') {
                *i += 1;
                return Ok(J::Obj(members));
            }
            loop {
                *i = skip_ws(b, *i);
                let end = string_end(b, *i).ok_or_else(bad)?;
                let key = decode_json_string(&s[*i..end]).ok_or_else(bad)?;
                *i = skip_ws(b, end);
                if b.get(*i) != Some(&b':') {
                    return Err(bad());
                }
                *i += 1;
                let v = js_parse(s, i, depth + 1)?;
                // JSON.parse: a repeated key keeps its first place and takes the last value.
                match members.iter_mut().find(|(k, _)| *k == key) {
                    Some(m) => m.1 = v,
                    None => members.push((key, v)),
                }
                *i = skip_ws(b, *i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        return Ok(J::Obj(members));
                    }
                    _ => return Err(bad()),
                }
            }
        }
        Some(b'[') => {
            *i += 1;
            let mut items = Vec::new();
            *i = skip_ws(b, *i);
            if b.get(*i) == Some(&b']') {
                *i += 1;
                return Ok(J::Arr(items));
            }
            loop {
                items.push(js_parse(s, i, depth + 1)?);
                *i = skip_ws(b, *i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b']') => {
                        *i += 1;
                        return Ok(J::Arr(items));
                    }
                    _ => return Err(bad()),
                }
            }
        }
        Some(b'"') => {
            let end = string_end(b, *i).ok_or_else(bad)?;
            let v = decode_json_string(&s[*i..end]).ok_or_else(bad)?;
            *i = end;
            Ok(J::Str(v))
        }
        Some(_) => {
            let end = value_end(b, *i).ok_or_else(bad)?;
            let t = &s[*i..end];
            *i = end;
            Ok(match t {
                "true" => J::Bool(true),
                "false" => J::Bool(false),
                "null" => J::Null,
                // Correctly rounded, as JavaScript's Number parsing is.
                n => J::Num(n.parse::<f64>().map_err(|_| bad())?),
            })
        }
        None => Err(bad()),
    }
}

/// ECMAScript's Number::toString(x) for a finite x (Number.prototype.toString, radix 10).
pub fn js_number(x: f64) -> String {
    if !x.is_finite() {
        // JSON.stringify writes Infinity (1e400 parsed) as null.
        return "null".into();
    }
    if x == 0.0 {
        return "0".into(); // -0 too
    }
    // Rust's {:e} is the shortest representation that round-trips, as ECMAScript requires.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    let n = exp + 1;
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if n - 1 < 0 { '-' } else { '+' });
        let _ = write!(out, "{}", (n - 1).abs());
    }
    out
}

/// An array index in ECMAScript's sense: the canonical form of an integer 0 .. 2^32 - 2.
fn array_index(k: &str) -> Option<u32> {
    if k.is_empty()
        || k.len() > 10
        || (k.len() > 1 && k.starts_with('0'))
        || !k.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u64 = k.parse().ok()?;
    (n < u32::MAX as u64).then_some(n as u32)
}

fn js_write(v: &J, out: &mut String) {
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Num(n) => out.push_str(&js_number(*n)),
        J::Str(s) => push_json_string(s, out),
        J::Arr(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                js_write(x, out);
            }
            out.push(']');
        }
        J::Obj(members) => {
            // Own property order: array indices ascending, then the other keys as inserted.
            let mut order: Vec<usize> = (0..members.len()).collect();
            order.sort_by_key(|&i| match array_index(&members[i].0) {
                Some(n) => (0, n as u64, 0),
                None => (1, 0, i as u64),
            });
            out.push('{');
            for (j, &i) in order.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                push_json_string(&members[i].0, out);
                out.push(':');
                js_write(&members[i].1, out);
            }
            out.push('}');
        }
    }
}

/// `JSON.stringify(JSON.parse(text))`.
pub fn javascript_json(text: &str, out: &mut String) -> Result<(), String> {
    let mut i = 0;
    let v = js_parse(text, &mut i, 0)?;
    if skip_ws(text.as_bytes(), i) != text.len() {
        return Err("the body is not valid JSON".into());
    }
    js_write(&v, out);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Validation of event_types against a shape
// ------------------------------------------------------------------------------------------

/// The patterns of a subscription: each is a pattern (`*`, `order.*`, `order.shipped`) or
/// exactly one of the shape's renamed names.
pub fn check_patterns(patterns: &[Option<String>], shape: Option<&Shape>) -> Result<(), String> {
    if patterns.is_empty() {
        return Err("event_types must not be empty".into());
    }
    for p in patterns {
        let p = p.as_deref().unwrap_or_default();
        if !crate::patterns::is_event_pattern(p) && !shape.is_some_and(|s| s.is_renamed(p)) {
            return Err(format!("invalid event type pattern \"{}\"", shown(p)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(data: &str) -> Envelope<'_> {
        Envelope {
            event_id: "0b4e0a55-0000-4000-8000-000000000001",
            event_type: "order.shipped",
            created_at: "2026-11-23T10:00:00.123456Z",
            data,
            delivery_id: 42,
            attempt: 2,
            timestamp: 1_795_000_000,
            subscription_id: 7,
        }
    }

    const DATA: &str = r#"{"id": 1, "items": [{"id": 1, "qty": 2, "sku": "A-1", "order_id": 1}, {"id": 2, "qty": 1, "sku": "B-7", "order_id": 1}], "total": 59.90, "status": "shipped", "customer": "Ada \"the\" Countess", "placed_at": "2026-05-08T12:25:44.5+01:00", "previous_status": "paid"}"#;

    fn body(shape: &str, data: &str) -> Result<String, RenderError> {
        let s = parse(shape).unwrap_or_else(|e| panic!("{shape}: {e}"));
        render(Some(&s), &env(data), 1 << 20).map(|r| String::from_utf8(r.body).expect("utf8"))
    }

    #[test]
    fn no_shape_is_the_envelope_exactly_as_stored() {
        let r = render(None, &env(DATA), 1 << 20).expect("renders");
        let b = String::from_utf8(r.body).expect("utf8");
        assert!(b.starts_with(r#"{"id":"0b4e0a55-0000-4000-8000-000000000001","type":"order.shipped","created_at":"2026-11-23T10:00:00.123456Z","data":{"id":1,"items":[{"id":1,"#), "{b}");
        assert!(b.contains(r#""total":59.90"#), "{b}");
        assert!(r.headers.is_empty());
        assert_eq!(r.event_type, "order.shipped");
    }

    #[test]
    fn renames_apply_to_the_envelope_and_headers() {
        let s = parse(r#"{"event_names": {"order.shipped": "ORDER_SHIPPED"}, "event_type_header": "X-Event-Type", "delivery_id_header": "X-Delivery-Id"}"#).expect("valid");
        let r = render(Some(&s), &env(DATA), 1 << 20).expect("renders");
        assert_eq!(r.event_type, "ORDER_SHIPPED");
        assert!(String::from_utf8(r.body)
            .expect("utf8")
            .contains(r#""type":"ORDER_SHIPPED""#));
        assert_eq!(
            r.headers,
            vec![
                ("X-Event-Type".to_string(), "ORDER_SHIPPED".to_string()),
                (
                    "X-Delivery-Id".to_string(),
                    "0b4e0a55-0000-4000-8000-000000000001".to_string()
                )
            ]
        );
        assert!(s.is_renamed("ORDER_SHIPPED"));
        assert_eq!(s.event_name("order.created"), "order.created");
    }

    #[test]
    fn paths_literals_nesting_and_concatenation() {
        let b = body(
            r#"{"body": {"event": "{{ type }}", "n": 3, "ok": true, "none": null, "order": {"ref": "ORD-{{ data.id }}", "total": "{{ data.total }}", "who": "{{ data.customer }}", "missing": "{{ data.nope.deeper }}"}, "evt": "evt_{{ id }}", "first": "{{ data.items[0].sku }}", "last": "{{ data.items[-1] }}", "sub": "{{ subscription_id }}", "try": "{{ attempt }}", "d": "{{ delivery_id }}", "keyed": "{{ data['previous_status'] }}"}}"#,
            DATA,
        )
        .expect("renders");
        let v: serde_json::Value = serde_json::from_str(&b).expect("valid JSON");
        assert_eq!(v["event"], "order.shipped");
        assert_eq!(v["n"], 3);
        assert_eq!(v["ok"], true);
        assert!(v["none"].is_null());
        assert_eq!(v["order"]["ref"], "ORD-1");
        assert!(
            b.contains(r#""total":59.90"#),
            "numbers exactly as stored: {b}"
        );
        assert_eq!(v["order"]["who"], "Ada \"the\" Countess");
        assert!(v["order"]["missing"].is_null());
        assert_eq!(v["evt"], "evt_0b4e0a55-0000-4000-8000-000000000001");
        assert_eq!(v["first"], "A-1");
        assert_eq!(v["last"]["sku"], "B-7");
        assert_eq!(v["sub"], 7);
        assert_eq!(v["try"], 2);
        assert_eq!(v["d"], 42);
        assert_eq!(v["keyed"], "paid");
    }

    #[test]
    fn each_maps_an_arrays_objects_and_camel_case_renames_keys() {
        let b = body(
            r#"{"body": {"items": {"$each": "{{ data.items }}", "to": {"productSku": "{{ item.sku }}", "quantity": "{{ item.qty }}", "order": "{{ data.id }}"}}, "camel": "{{ data.items | camel_case }}", "named": {"$each": "{{ data.items }}", "as": "line", "to": "{{ line.sku | lower }}"}, "none": {"$each": "{{ data.nothing }}", "to": 1}}}"#,
            DATA,
        )
        .expect("renders");
        let v: serde_json::Value = serde_json::from_str(&b).expect("valid JSON");
        assert_eq!(v["items"][0]["productSku"], "A-1");
        assert_eq!(v["items"][1]["quantity"], 1);
        assert_eq!(v["items"][1]["order"], 1);
        assert_eq!(v["camel"][0]["orderId"], 1);
        assert_eq!(v["named"][1], "b-7");
        assert!(v["none"].is_null());
        assert_eq!(camel("_private_key_"), "_privateKey_");
        assert_eq!(camel("address1"), "address1");
        assert_eq!(camel("a__b"), "aB");
    }

    #[test]
    fn outer_paths_inside_each_see_the_whole_envelope() {
        // 20,000 items, each mapped with a path into the (large) data outside the element
        // (evaluated once, not once per item: a scan of the data each).
        let items: Vec<String> = (0..20_000)
            .map(|i| format!("{{\"sku\": \"S{i}\"}}"))
            .collect();
        let data = format!("{{\"items\": [{}], \"id\": 9}}", items.join(", "));
        let s = parse(
            r#"{"body": {"$each": "{{ data.items }}", "to": ["{{ item.sku }}", "{{ data.id }}"]}}"#,
        )
        .expect("valid");
        let r = render(Some(&s), &env(&data), 1 << 24).expect("renders");
        let b = String::from_utf8(r.body).expect("utf8");
        assert!(b.starts_with(r#"[["S0",9],["S1",9],"#), "{}", &b[..40]);
        assert!(b.ends_with(r#"["S19999",9]]"#));
    }

    #[test]
    fn the_readme_example_is_a_valid_shape_and_renders() {
        let readme = include_str!("../README.md");
        let start = readme.find("shape => $${").expect("the README's example") + "shape => $$".len();
        let end = start + readme[start..].find("}$$").expect("its end") + 1;
        let s = parse(&readme[start..end]).expect("the README's shape is valid");
        let r = render(Some(&s), &env(DATA), 1 << 20).expect("renders");
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(v["event"], "ORDER_SHIPPED");
        assert_eq!(v["order"]["amount"], 59.9);
        assert_eq!(v["items"][1]["sku"], "B-7");
        assert_eq!(r.headers[0], ("X-Event-Type".to_string(), "ORDER_SHIPPED".to_string()));
    }

    #[test]
    fn merge_and_literal() {
        let b = body(
            r#"{"body": {"$merge": ["{{ data }}", {"event": "{{ type }}", "status": "SHIPPED"}, {"$literal": {"$ref": "{{ not a template }}"}}]}}"#,
            DATA,
        )
        .expect("renders");
        let v: serde_json::Value = serde_json::from_str(&b).expect("valid JSON");
        assert_eq!(v["event"], "order.shipped");
        assert_eq!(v["status"], "SHIPPED", "later parts win");
        assert_eq!(v["$ref"], "{{ not a template }}");
        assert_eq!(v["id"], 1);
    }

    #[test]
    fn timestamp_formats() {
        let b = body(
            r#"{"body": {"iso": "{{ created_at | iso8601 }}", "iso_ms": "{{ created_at | iso8601('Z', 3) }}", "off": "{{ created_at | iso8601('+02:00') }}", "neg": "{{ created_at | iso8601('-05:30', 6) }}", "unix": "{{ created_at | unix }}", "ms": "{{ created_at | unix_ms }}", "sql": "{{ created_at | datetime }}", "sql2": "{{ created_at | datetime('+02:00') }}", "day": "{{ created_at | date }}", "placed": "{{ data.placed_at | iso8601('+00:00') }}", "sent": "{{ timestamp | iso8601 }}", "none": "{{ data.nope | unix }}"}}"#,
            DATA,
        )
        .expect("renders");
        let v: serde_json::Value = serde_json::from_str(&b).expect("valid JSON");
        assert_eq!(v["iso"], "2026-11-23T10:00:00Z");
        assert_eq!(v["iso_ms"], "2026-11-23T10:00:00.123Z");
        assert_eq!(v["off"], "2026-11-23T12:00:00+02:00");
        assert_eq!(v["neg"], "2026-11-23T04:30:00.123456-05:30");
        assert_eq!(v["unix"], 1_795_428_000);
        assert_eq!(v["ms"], 1_795_428_000_123i64);
        assert_eq!(v["sql"], "2026-11-23 10:00:00");
        assert_eq!(v["sql2"], "2026-11-23 12:00:00");
        assert_eq!(v["day"], "2026-11-23");
        assert_eq!(v["placed"], "2026-05-08T11:25:44+00:00");
        assert_eq!(v["sent"], "2026-11-18T11:06:40Z");
        assert!(v["none"].is_null());
        for (s, secs) in [
            ("1970-01-01", 0),
            ("1970-01-01T00:00:01Z", 1),
            ("2000-02-29 23:59:59", 951_868_799),
            ("1969-12-31T23:00:00-01:00", 0),
            ("2024-01-15T10:30:00+0130", 1_705_309_200),
            ("2024-01-15T10:30+01", 1_705_311_000),
        ] {
            assert_eq!(parse_timestamp(s).map(|t| t.secs), Some(secs), "{s}");
        }
        for bad in [
            "2024-02-30",
            "2024-13-01",
            "24-01-01",
            "2024-01-01T25:00",
            "2024-01-01X",
            "2024-01-01T10:00+1",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn data_dependent_failures_are_errors_at_delivery() {
        let e =
            body(r#"{"body": "{{ data.customer | unix }}"}"#, DATA).expect_err("not a timestamp");
        assert!(
            matches!(&e, RenderError::Failed(m) if m.contains("unix") && m.contains("is not a timestamp")),
            "{e:?}"
        );
        let e = body(r#"{"body": {"$each": "{{ data.total }}", "to": 1}}"#, DATA)
            .expect_err("not an array");
        assert!(
            matches!(&e, RenderError::Failed(m) if m.contains("not an array")),
            "{e:?}"
        );
        let e =
            body(r#"{"body": {"$merge": ["{{ data.items }}"]}}"#, DATA).expect_err("not an object");
        assert!(
            matches!(&e, RenderError::Failed(m) if m.contains("not an object")),
            "{e:?}"
        );
        let e = body(r#"{"body": "{{ data.total | upper }}"}"#, DATA).expect_err("not a string");
        assert!(
            matches!(&e, RenderError::Failed(m) if m.contains("upper")),
            "{e:?}"
        );
    }

    #[test]
    fn the_output_is_capped_while_it_is_built() {
        // Each element repeats the whole data: quadratic growth stops at the cap.
        let s = parse(r#"{"body": {"$each": "{{ data.items }}", "to": ["{{ data }}", "{{ data }}", "{{ data }}"]}}"#).expect("valid");
        let items: Vec<String> = (0..2000)
            .map(|i| format!("{{\"sku\": \"S{i}\"}}"))
            .collect();
        let data = format!("{{\"items\": [{}]}}", items.join(", "));
        let e = render(Some(&s), &env(&data), 100_000).expect_err("capped");
        assert!(
            matches!(e, RenderError::Oversized(n) if n > 100_000 && n < 400_000),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_shapes_are_refused_with_what_is_wrong() {
        for (shape, says) in [
            ("[]", "must be a JSON object"),
            (r#"{"bodyy": 1}"#, "unknown key \"bodyy\""),
            (r#"{"event_names": []}"#, "event_names must be an object"),
            (
                r#"{"event_names": {"order.created": 1}}"#,
                "must be a string",
            ),
            (r#"{"event_names": {"order.created": ""}}"#, "is empty"),
            (
                r#"{"event_names": {"order.created": "A B"}}"#,
                "printable ASCII",
            ),
            (
                r#"{"event_names": {"order.created": "a\r\nX: y"}}"#,
                "printable ASCII",
            ),
            (
                r#"{"event_type_header": "Webhook-Signature"}"#,
                "set by pg_webhooks",
            ),
            (r#"{"event_type_header": "X Bad"}"#, "invalid header name"),
            (r#"{"event_type_header": 3}"#, "must be a string"),
            (
                r#"{"event_type_header": "X-A", "delivery_id_header": "x-a"}"#,
                "the same header",
            ),
            (r#"{"json": "python"}"#, "as_stored\" or \"javascript"),
            (r#"{"body": "{{ nope }}"}"#, "unknown name \"nope\""),
            (
                r#"{"body": "{{ data.x | nope }}"}"#,
                "unknown filter \"nope\"",
            ),
            (r#"{"body": "{{ data.x "}"#, "without \"}}\""),
            (r#"{"body": "x }}"}"#, "without \"{{\""),
            (r#"{"body": "{{ }}"}"#, "empty"),
            (r#"{"body": "{{ data..x }}"}"#, "a path goes on"),
            (r#"{"body": "{{ data.x | iso8601('+2') }}"}"#, "offset"),
            (r#"{"body": "{{ data.x | iso8601('Z', 2) }}"}"#, "0, 3 or 6"),
            (
                r#"{"body": "{{ data.x | default }}"}"#,
                "default takes one argument",
            ),
            (
                r#"{"body": {"$each": "data.items", "to": 1}}"#,
                "one expression",
            ),
            (r#"{"body": {"$each": "{{ data.items }}"}}"#, "needs \"to\""),
            (
                r#"{"body": {"$each": "{{ data.items }}", "to": 1, "as": "data"}}"#,
                ".as must be",
            ),
            (
                r#"{"body": {"$each": "{{ data.items }}", "to": 1, "extra": 2}}"#,
                "does not belong",
            ),
            (
                r#"{"body": {"$script": "x"}}"#,
                "unknown operator \"$script\"",
            ),
            (r#"{"body": {"$merge": {}}}"#, "$merge must be an array"),
            (
                r#"{"body": {"a": "{{ item.sku }}"}}"#,
                "unknown name \"item\"",
            ),
            (r#"{"body": "{{ 'unterminated }}"}"#, "without \"}}\""),
        ] {
            let e = parse(shape).expect_err(shape);
            assert!(e.contains(says), "{shape}: {e}");
        }
        let deep = format!("{{\"body\": {}1{}}}", "[".repeat(40), "]".repeat(40));
        assert!(
            parse(&deep).expect_err("deep").contains("deeper than"),
            "deep"
        );
        let big = format!("{{\"body\": \"{}\"}}", "x".repeat(MAX_SHAPE_BYTES));
        assert!(parse(&big).expect_err("big").contains("at most"), "big");
        assert!(parse(r#"{"body": "{{ '{{' }} literal"}"#).is_ok());
    }

    #[test]
    fn javascript_numbers_are_ecmascript_number_to_string() {
        for (input, js) in [
            ("59.90", "59.9"),
            ("1.0", "1"),
            ("1e21", "1e+21"),
            ("1000000000000000000000", "1e+21"),
            ("100000000000000000000", "100000000000000000000"),
            ("0.1", "0.1"),
            ("-0", "0"),
            ("12345678901234567890", "12345678901234567000"),
            ("1.5e-7", "1.5e-7"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("123e-20", "1.23e-18"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("1e400", "null"),
            ("-12.5", "-12.5"),
            ("0.30000000000000004", "0.30000000000000004"),
        ] {
            let mut out = String::new();
            javascript_json(input, &mut out).expect(input);
            assert_eq!(out, js, "{input}");
        }
    }

    #[test]
    fn javascript_strings_and_keys() {
        let mut out = String::new();
        javascript_json(r#"{"b": "\u00e9\u2028\/\u0001\u001f\u007f", "2": 1, "a": [1, {"10": 0, "9": 0, "x": 0}], "b": "last", "01": 2}"#, &mut out)
            .expect("valid");
        assert_eq!(
            out,
            "{\"2\":1,\"b\":\"last\",\"a\":[1,{\"9\":0,\"10\":0,\"x\":0}],\"01\":2}"
        );
        let mut out = String::new();
        javascript_json(
            r#""\u00e9\u2028\/\u0001\u001f\u007f\ud83d\ude00""#,
            &mut out,
        )
        .expect("valid");
        assert_eq!(out, "\"é\u{2028}/\\u0001\\u001f\u{7f}😀\"");
        let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
        assert!(javascript_json(&deep, &mut String::new()).is_err());
    }

    #[test]
    fn patterns_may_name_renamed_types() {
        let s = parse(r#"{"event_names": {"order.shipped": "orders/shipped_v2"}}"#).expect("valid");
        let ok = |p: &[&str], s: Option<&Shape>| {
            check_patterns(
                &p.iter().map(|x| Some(x.to_string())).collect::<Vec<_>>(),
                s,
            )
        };
        assert!(ok(&["orders/shipped_v2", "order.*"], Some(&s)).is_ok());
        assert!(ok(&["orders/shipped_v2"], None).is_err());
        assert!(ok(&["ORDERS"], Some(&s)).is_err());
        assert!(ok(&[], Some(&s)).is_err());
    }
}
