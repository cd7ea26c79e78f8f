//! Retry timing: parsing retry schedules such as `5s,10s,1m`, spreading waits with jitter so
//! failed deliveries do not retry in lockstep, and honouring a receiver's `Retry-After` header.

use std::time::{Duration, SystemTime};

/// Longest single wait a schedule may contain.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Most retries a schedule may contain.
const MAX_RETRIES: usize = 50;

/// Parses one wait: `immediate` or `0` for none, else a whole number with a unit `ms`, `s`, `m`
/// or `h` (`250ms`, `5s`, `1m`, `2h`). Surrounding whitespace is ignored; at most 7 days.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let item = s.trim();
    if item == "immediate" || item == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid =
        || format!("{item:?} is not a duration (use e.g. 250ms, 5s, 1m, 2h or immediate)");
    let unit_start = item
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = item.split_at(unit_start);
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(invalid()),
    };
    let number: u64 = number.parse().map_err(|_| invalid())?;
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|wait| *wait <= MAX_WAIT)
        .ok_or_else(|| format!("{item:?} is longer than 7 days"))
}

/// Parses a comma-separated list of waits, one per retry (at most 50). An empty or all-whitespace
/// string means no retries.
pub fn parse_retry_schedule(s: &str) -> Result<Vec<Duration>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = s.split(',').collect();
    if items.len() > MAX_RETRIES {
        return Err(format!(
            "{} retries given, at most {MAX_RETRIES} are allowed",
            items.len()
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            if item.trim().is_empty() {
                Err(format!("item {} is empty", i + 1))
            } else {
                parse_duration(item)
            }
        })
        .collect()
}

/// Spreads `wait` by ±10%: `wait * (0.9 + 0.2 * unit_random)`. `unit_random` should be in [0, 1);
/// values outside are clamped and NaN counts as 0.5 (no change).
pub fn jittered(wait: Duration, unit_random: f64) -> Duration {
    let r = if unit_random.is_nan() {
        0.5
    } else {
        unit_random.clamp(0.0, 1.0)
    };
    Duration::try_from_secs_f64(wait.as_secs_f64() * (0.9 + 0.2 * r)).unwrap_or(Duration::MAX)
}

/// A uniform random number in [0, 1) from the OS random source, or 0.5 if that fails.
pub fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    match getrandom::getrandom(&mut bytes) {
        // The top 53 bits fill an f64 mantissa exactly.
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// How long a `Retry-After` header value asks us to wait, from `now`: delta-seconds or an
/// HTTP-date (a date already past means no wait). `None` if the value is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether `s` is an interval of the plain form `<count> <unit> [<count> <unit> ...]`
/// (units from microseconds to weeks, singular or plural or abbreviated), which PostgreSQL
/// always accepts. Interval settings are checked with this so that a typo is refused when it
/// is set rather than breaking the worker's SQL later.
pub fn is_plain_interval(s: &str) -> bool {
    const UNITS: &[&str] = &[
        "us",
        "usec",
        "usecs",
        "microsecond",
        "microseconds",
        "ms",
        "msec",
        "msecs",
        "millisecond",
        "milliseconds",
        "s",
        "sec",
        "secs",
        "second",
        "seconds",
        "m",
        "min",
        "mins",
        "minute",
        "minutes",
        "h",
        "hour",
        "hours",
        "d",
        "day",
        "days",
        "w",
        "week",
        "weeks",
    ];
    let words: Vec<&str> = s.split_whitespace().collect();
    let mut parts = Vec::new();
    for w in &words {
        // Allow both "5 days" and "5days".
        let split = w.find(|c: char| !c.is_ascii_digit()).unwrap_or(w.len());
        let (n, u) = w.split_at(split);
        if !n.is_empty() {
            parts.push(n);
        }
        if !u.is_empty() {
            parts.push(u);
        }
    }
    !parts.is_empty()
        && parts.len() % 2 == 0
        && parts.chunks(2).all(|p| {
            p[0].len() <= 9
                && p[0].chars().all(|c| c.is_ascii_digit())
                && UNITS.contains(&p[1].to_ascii_lowercase().as_str())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn durations_take_a_whole_number_and_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(secs(5)));
        assert_eq!(parse_duration("1m"), Ok(secs(60)));
        assert_eq!(parse_duration("2h"), Ok(secs(7200)));
        assert_eq!(parse_duration(" 30s\t"), Ok(secs(30)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn immediate_and_bare_zero_mean_no_wait() {
        assert_eq!(parse_duration("immediate"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" immediate "), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_are_rejected_quoting_the_item() {
        for bad in [
            "", "5", "s", "5x", "5 s", "-5s", "+5s", "1.5s", "5S", "5sec", "1d", "ms5", "soon",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("\"{bad}\"")), "{err}");
        }
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn durations_longer_than_7_days_are_rejected() {
        assert_eq!(parse_duration("168h"), Ok(secs(7 * 24 * 3600)));
        assert!(parse_duration("169h")
            .expect_err("too long")
            .contains("7 days"));
        assert!(parse_duration("604801s").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn schedules_are_comma_separated_durations() {
        assert_eq!(
            parse_retry_schedule("immediate,1m,5m,30m,2h"),
            Ok(vec![
                Duration::ZERO,
                secs(60),
                secs(300),
                secs(1800),
                secs(7200)
            ])
        );
        assert_eq!(
            parse_retry_schedule("5s,10s,20s,40s,80s"),
            Ok(vec![secs(5), secs(10), secs(20), secs(40), secs(80)])
        );
        assert_eq!(
            parse_retry_schedule(" 5s , 1m "),
            Ok(vec![secs(5), secs(60)])
        );
    }

    #[test]
    fn empty_schedule_means_no_retries() {
        assert_eq!(parse_retry_schedule(""), Ok(vec![]));
        assert_eq!(parse_retry_schedule("  \t "), Ok(vec![]));
    }

    #[test]
    fn schedule_with_an_empty_item_is_rejected() {
        assert_eq!(
            parse_retry_schedule("5s,,10s"),
            Err("item 2 is empty".to_string())
        );
        assert!(parse_retry_schedule("5s,").is_err());
        assert!(parse_retry_schedule(",5s").is_err());
    }

    #[test]
    fn schedule_with_a_bad_item_reports_that_item() {
        let err = parse_retry_schedule("5s,10x,20s").expect_err("bad item");
        assert!(err.contains("\"10x\""), "{err}");
    }

    #[test]
    fn schedule_allows_at_most_50_retries() {
        assert_eq!(
            parse_retry_schedule(&vec!["1s"; 50].join(",")).map(|s| s.len()),
            Ok(50)
        );
        assert!(parse_retry_schedule(&vec!["1s"; 51].join(",")).is_err());
    }

    #[test]
    fn jitter_spreads_waits_by_ten_percent_either_way() {
        assert_eq!(jittered(secs(100), 0.0), secs(90));
        assert_eq!(jittered(secs(100), 0.5), secs(100));
        assert_eq!(jittered(secs(100), 0.75), secs(105));
        assert!(jittered(secs(100), 0.999_999) < secs(110));
    }

    #[test]
    fn jitter_clamps_out_of_range_randoms() {
        assert_eq!(jittered(secs(100), -3.0), secs(90));
        assert_eq!(jittered(secs(100), 7.0), secs(110));
        assert_eq!(jittered(secs(100), f64::NAN), secs(100));
    }

    #[test]
    fn jitter_keeps_zero_at_zero() {
        assert_eq!(jittered(Duration::ZERO, 0.0), Duration::ZERO);
        assert_eq!(jittered(Duration::ZERO, 0.99), Duration::ZERO);
    }

    #[test]
    fn unit_random_is_in_the_unit_interval() {
        let draws: Vec<f64> = (0..1000).map(|_| unit_random()).collect();
        assert!(draws.iter().all(|r| (0.0..1.0).contains(r)));
        assert!(draws.iter().any(|r| *r != draws[0]));
    }

    #[test]
    fn retry_after_accepts_delta_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("120", now), Some(secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_accepts_an_http_date() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        let date = SystemTime::UNIX_EPOCH + secs(784_111_777);
        let now = date - secs(90);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(secs(90))
        );
    }

    #[test]
    fn retry_after_in_the_past_means_no_wait() {
        let now = SystemTime::UNIX_EPOCH + secs(784_111_777 + 3600);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = SystemTime::now();
        for bad in ["", "soon", "-5", "1.5", "5s", "Someday, 99 Nov 1994"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn plain_intervals_are_recognised() {
        for ok in [
            "5 days",
            "30 days",
            "1s",
            "1 hour 30 minutes",
            "90 min",
            "2h",
            "12 HOURS",
            "1 week",
        ] {
            assert!(is_plain_interval(ok), "{ok}");
        }
        for bad in [
            "",
            "5",
            "days",
            "5 dayz",
            "-1 day",
            "1.5 days",
            "5 days ago",
            "P1D",
            "1 month",
        ] {
            assert!(!is_plain_interval(bad), "{bad}");
        }
    }
}
