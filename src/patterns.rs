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
