//! Names and patterns of event types: `order.shipped` (exact), `order.*` (prefix) or `*`.

/// A dotted name of at least two lowercase words: `order.shipped`, `inventory.low_stock`.
pub fn is_event_type(s: &str) -> bool {
    s.len() <= 200 && s.contains('.') && s.split('.').all(is_word)
}

/// `*`, an event type, or an event type prefix followed by `.*`.
pub fn is_event_pattern(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let words = s.strip_suffix(".*").unwrap_or(s);
    s.len() <= 200 && words.split('.').all(is_word) && (words.contains('.') || s.ends_with(".*"))
}

/// Whether one of `patterns` matches one of `names` (an event's type, and the name its
/// subscriber's shape gives it): `*`, the name itself, or `prefix.*` for a name that starts
/// with `prefix.`. NULL patterns and names match nothing.
pub fn any_matches<'a>(patterns: impl IntoIterator<Item = Option<&'a str>>, names: &[Option<&str>]) -> bool {
    patterns.into_iter().flatten().any(|p| {
        p == "*"
            || names.iter().flatten().any(|n| {
                p == *n || p.strip_suffix('*').is_some_and(|prefix| prefix.ends_with('.') && n.starts_with(prefix))
            })
    })
}

/// `webhooks._matches(patterns, filter, event_type, data [, event_names])`: whether a
/// subscription (its event type patterns and its filter, which the data must contain) takes an
/// event; with `event_names` (a shape's renames), a pattern may name the event either way.
/// Fan-out calls it for every event and subscription: native, so that nothing is parsed or
/// planned per statement (the SQL function it replaces was, and set its search_path per call).
/// NULL where the SQL was NULL: a filter with NULL data.
fn matches(
    patterns: Option<pgrx::Array<'_, &str>>,
    filter: Option<crate::capture::RawJsonb>,
    event_type: Option<&str>,
    data: Option<crate::capture::RawJsonb>,
    event_names: Option<crate::capture::RawJsonb>,
) -> Option<bool> {
    let Some(patterns) = patterns else { return Some(false) };
    // The name the shape gives the type, looked up only when the type itself matched nothing.
    if !any_matches(patterns.iter(), &[event_type]) {
        let renamed: Option<String> = match (&event_names, event_type) {
            // `event_names ->> event_type` (NULL unless an object with that key and a value).
            (Some(names), Some(t)) => unsafe {
                pgrx::direct_function_call::<String>(
                    pgrx::pg_sys::jsonb_object_field_text,
                    &[Some(names.datum()), pgrx::IntoDatum::into_datum(t)],
                )
            },
            _ => None,
        };
        if renamed.is_none() || !any_matches(patterns.iter(), &[renamed.as_deref()]) {
            return Some(false);
        }
    }
    match (filter, data) {
        (None, _) => Some(true),
        (Some(_), None) => None,
        (Some(f), Some(d)) => unsafe {
            pgrx::direct_function_call::<bool>(pgrx::pg_sys::jsonb_contains, &[Some(d.datum()), Some(f.datum())])
        },
    }
}

#[pgrx::pg_extern(immutable, parallel_safe, name = "_matches")]
fn _matches(
    patterns: Option<pgrx::Array<'_, &str>>,
    filter: Option<crate::capture::RawJsonb>,
    event_type: Option<&str>,
    data: Option<crate::capture::RawJsonb>,
) -> Option<bool> {
    matches(patterns, filter, event_type, data, None)
}

#[pgrx::pg_extern(immutable, parallel_safe, name = "_matches")]
fn _matches_named(
    patterns: Option<pgrx::Array<'_, &str>>,
    filter: Option<crate::capture::RawJsonb>,
    event_type: Option<&str>,
    data: Option<crate::capture::RawJsonb>,
    event_names: Option<crate::capture::RawJsonb>,
) -> Option<bool> {
    matches(patterns, filter, event_type, data, event_names)
}

fn is_word(w: &str) -> bool {
    !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_dotted_lowercase_words() {
        assert!(is_event_type("order.shipped"));
        assert!(is_event_type("inventory.low_stock"));
        assert!(is_event_type("webhook.test"));
        assert!(!is_event_type("order"));
        assert!(!is_event_type("Order.Shipped"));
        assert!(!is_event_type("order..shipped"));
        assert!(!is_event_type("order.shipped "));
        assert!(!is_event_type(""));
    }

    #[test]
    fn a_pattern_matches_star_the_name_or_its_prefix() {
        let m = |ps: &[Option<&str>], names: &[Option<&str>]| any_matches(ps.iter().copied(), names);
        assert!(m(&[Some("*")], &[Some("order.created"), None]));
        assert!(m(&[Some("*")], &[None, None]));
        assert!(m(&[Some("order.*")], &[Some("order.created"), None]));
        assert!(m(&[Some("order.*")], &[Some("order.a.b"), None]));
        assert!(!m(&[Some("order.*")], &[Some("orders.created"), None]));
        assert!(!m(&[Some("order.*")], &[Some("order"), None]));
        assert!(m(&[Some("order.*")], &[Some("order."), None]));
        // Not a prefix pattern (subscribe refuses it): no prefix match.
        assert!(!m(&[Some("order*")], &[Some("orders.x"), None]));
        assert!(m(&[None, Some("order.paid")], &[Some("order.paid"), None]));
        assert!(!m(&[None], &[Some("order.paid"), None]));
        assert!(!m(&[], &[Some("order.paid"), None]));
        assert!(m(&[Some("ORDER_CREATED")], &[Some("order.created"), Some("ORDER_CREATED")]));
        assert!(m(&[Some("evt.*")], &[Some("order.created"), Some("evt.order")]));
        assert!(!m(&[Some("order.created")], &[None, None]));
    }

    #[test]
    fn patterns_are_exact_prefix_or_star() {
        for ok in [
            "*",
            "order.*",
            "order.shipped",
            "order.status_updated",
            "inventory.*",
        ] {
            assert!(is_event_pattern(ok), "{ok}");
        }
        for bad in [
            "",
            " ",
            "order",
            "order*",
            "*.shipped",
            "order.*.x",
            "ORDER.*",
            "order..*",
            ".*",
        ] {
            assert!(!is_event_pattern(bad), "{bad}");
        }
    }
}
