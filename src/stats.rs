//! Rollups for `webhooks.subscription_health` and `webhooks.event_stats`.
//!
//! Polling health from `_attempts` would aggregate the history of the last day on every poll:
//! with millions of attempts, a scan of millions of rows every 10 s. Instead the worker keeps
//! small rollups as it records outcomes: the batch it already has in memory is summed up here
//! (per subscription and minute and hour, per event type and hour) and written by the same
//! statement that records the batch (`queue::record`), so the hot path gains no statement and
//! no per-row work in SQL. Reading health then costs a few hundred rollup rows whatever the
//! size of the history.
//!
//! Every rollup row carries the number of the worker that wrote it: two workers never update
//! the same row, so they never wait for each other's row locks and never deadlock on them,
//! and an upsert of a worker's own row is always a plain read-modify-write under its lock. The
//! views add the workers' rows up.
//!
//! Response times are kept as a histogram of log-spaced buckets, four per doubling from
//! 0.1 ms: bucket 0 is [0, 0.1 ms), bucket b ≥ 1 is [0.1·2^((b-1)/4), 0.1·2^(b/4)) ms, the
//! last one open-ended (it starts at about 11.7 minutes, beyond the longest timeout). A
//! percentile is estimated as the geometric middle of the bucket that holds it (nearest
//! rank), so the estimate is within a factor 2^(1/8), about ±9%, of the exact value (within
//! 0.05 ms below 0.1 ms).

use pgrx::prelude::*;
use std::collections::BTreeMap;

/// Buckets of a latency histogram (see the module comment).
pub const HIST_BUCKETS: usize = 93;
/// Lower bound of bucket 1, in milliseconds.
const HIST_FIRST_MS: f64 = 0.1;
/// Buckets per doubling of the response time.
const PER_DOUBLING: f64 = 4.0;

/// The bucket of a response time in milliseconds.
pub fn latency_bucket(ms: f64) -> usize {
    if ms.is_nan() || ms < HIST_FIRST_MS {
        return 0;
    }
    let b = (PER_DOUBLING * (ms / HIST_FIRST_MS).log2()).floor() + 1.0;
    if b >= (HIST_BUCKETS - 1) as f64 {
        HIST_BUCKETS - 1
    } else {
        b.max(1.0) as usize
    }
}

/// The lower and upper bound of bucket `b`, in milliseconds (the last one has no upper bound:
/// its lower bound is given for both).
fn bucket_bounds(b: usize) -> (f64, f64) {
    let bound = |i: usize| HIST_FIRST_MS * 2f64.powf(i as f64 / PER_DOUBLING);
    match b {
        0 => (0.0, HIST_FIRST_MS),
        b if b >= HIST_BUCKETS - 1 => (bound(b - 1), bound(b - 1)),
        b => (bound(b - 1), bound(b)),
    }
}

/// The estimated `q`-quantile (0..1) of a histogram: the geometric middle of the bucket that
/// holds the nearest-rank value. None when the histogram is empty.
pub fn quantile(hist: &[i64], q: f64) -> Option<f64> {
    // Saturating: the SQL functions take any array a reader passes.
    let total: i64 = hist.iter().fold(0i64, |t, n| t.saturating_add((*n).max(0)));
    if total <= 0 || q.is_nan() {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as i64).max(1);
    let mut seen = 0i64;
    for (b, n) in hist.iter().enumerate() {
        seen = seen.saturating_add((*n).max(0));
        if seen >= rank {
            let (lo, hi) = bucket_bounds(b);
            return Some(if b == 0 { hi / 2.0 } else { (lo * hi).sqrt() });
        }
    }
    None
}

/// Element-wise sum of two histograms (of any lengths; missing or NULL elements count 0).
pub fn add(a: &[Option<i64>], b: &[Option<i64>]) -> Vec<i64> {
    (0..a.len().max(b.len()))
        .map(|i| {
            let (x, y) = (a.get(i).copied().flatten(), b.get(i).copied().flatten());
            x.unwrap_or(0).saturating_add(y.unwrap_or(0))
        })
        .collect()
}

/// `_hist_add(a, b)`: element-wise sum; the merge of two rollup rows and the step of
/// `_hist_sum`.
#[pg_extern(immutable, strict, parallel_safe)]
fn _hist_add(a: Vec<Option<i64>>, b: Vec<Option<i64>>) -> Vec<i64> {
    add(&a, &b)
}

/// `_hist_quantile(hist, q)`: the estimated q-quantile in milliseconds (module comment).
#[pg_extern(immutable, strict, parallel_safe)]
fn _hist_quantile(hist: Vec<Option<i64>>, q: f64) -> Option<f64> {
    let counts: Vec<i64> = hist.into_iter().map(|n| n.unwrap_or(0)).collect();
    quantile(&counts, q).map(|v| (v * 1000.0).round() / 1000.0)
}

/// One recorded attempt, as far as the rollups need it.
pub struct Attempt<'a> {
    pub subscription_id: i64,
    pub event_type: &'a str,
    /// Unix seconds.
    pub started: f64,
    pub duration_ms: f64,
    /// succeeded | retry | dead
    pub outcome: &'a str,
    pub status_code: Option<i32>,
    pub error: Option<&'a str>,
}

#[derive(Default)]
struct Counts {
    attempts: i64,
    succeeded: i64,
    failed: i64,
    dead: i64,
    hist: Vec<i64>,
}

#[derive(Default)]
struct EventCounts {
    delivered: i64,
    retried: i64,
    dead: i64,
}

/// What a batch of attempts tells about a subscription's streak of failures.
#[derive(Default)]
struct Streak {
    last_ok: Option<f64>,
    failures: Vec<f64>,
    last_error: Option<(f64, Option<i32>, Option<String>)>,
}

/// A batch of outcomes summed up, as the arrays the record statement unnests. Rows come out
/// in key order.
#[derive(Default, Debug, PartialEq)]
pub struct BatchStats {
    // _delivery_stats: one row per (subscription, width, bucket).
    pub ds_sub: Vec<i64>,
    /// Seconds: 60 (a minute row) or 3600 (an hour row).
    pub ds_width: Vec<i32>,
    /// Unix seconds of the bucket's start (UTC-aligned).
    pub ds_bucket: Vec<i64>,
    pub ds_attempts: Vec<i64>,
    pub ds_succeeded: Vec<i64>,
    pub ds_failed: Vec<i64>,
    pub ds_dead: Vec<i64>,
    /// The latency histogram as an array literal, trailing empty buckets left out.
    pub ds_hist: Vec<String>,
    // _event_stats: one row per (event type, hour).
    pub es_type: Vec<String>,
    pub es_bucket: Vec<i64>,
    pub es_delivered: Vec<i64>,
    pub es_retried: Vec<i64>,
    pub es_dead: Vec<i64>,
    // Per subscription: its latest success in the batch, the failures after it (all of them
    // without a success), and its latest failure.
    pub h_sub: Vec<i64>,
    pub h_last_ok: Vec<Option<f64>>,
    pub h_failures: Vec<i32>,
    pub h_error_at: Vec<Option<f64>>,
    pub h_error: Vec<Option<String>>,
    pub h_status_code: Vec<Option<i32>>,
}

fn bucket_start(t: f64, width: i64) -> i64 {
    (t.floor() as i64).div_euclid(width) * width
}

impl BatchStats {
    pub fn of<'a>(attempts: impl IntoIterator<Item = Attempt<'a>>) -> BatchStats {
        let mut ds: BTreeMap<(i64, i32, i64), Counts> = BTreeMap::new();
        let mut es: BTreeMap<(String, i64), EventCounts> = BTreeMap::new();
        let mut streaks: BTreeMap<i64, Streak> = BTreeMap::new();
        for a in attempts {
            let ok = a.outcome == "succeeded";
            for width in [60i64, 3600] {
                let c = ds
                    .entry((
                        a.subscription_id,
                        width as i32,
                        bucket_start(a.started, width),
                    ))
                    .or_default();
                c.attempts += 1;
                c.succeeded += i64::from(ok);
                c.failed += i64::from(!ok);
                c.dead += i64::from(a.outcome == "dead");
                let b = latency_bucket(a.duration_ms);
                if c.hist.len() <= b {
                    c.hist.resize(b + 1, 0);
                }
                c.hist[b] += 1;
            }
            let e = es
                .entry((a.event_type.to_string(), bucket_start(a.started, 3600)))
                .or_default();
            e.delivered += i64::from(ok);
            e.retried += i64::from(a.outcome == "retry");
            e.dead += i64::from(a.outcome == "dead");
            let s = streaks.entry(a.subscription_id).or_default();
            if ok {
                s.last_ok = Some(s.last_ok.map_or(a.started, |t| t.max(a.started)));
            } else {
                s.failures.push(a.started);
                if s.last_error
                    .as_ref()
                    .is_none_or(|(t, _, _)| a.started >= *t)
                {
                    s.last_error = Some((a.started, a.status_code, a.error.map(str::to_string)));
                }
            }
        }
        let mut out = BatchStats::default();
        for ((sub, width, bucket), c) in ds {
            out.ds_sub.push(sub);
            out.ds_width.push(width);
            out.ds_bucket.push(bucket);
            out.ds_attempts.push(c.attempts);
            out.ds_succeeded.push(c.succeeded);
            out.ds_failed.push(c.failed);
            out.ds_dead.push(c.dead);
            let items: Vec<String> = c.hist.iter().map(i64::to_string).collect();
            out.ds_hist.push(format!("{{{}}}", items.join(",")));
        }
        for ((event_type, bucket), e) in es {
            out.es_type.push(event_type);
            out.es_bucket.push(bucket);
            out.es_delivered.push(e.delivered);
            out.es_retried.push(e.retried);
            out.es_dead.push(e.dead);
        }
        for (sub, s) in streaks {
            out.h_sub.push(sub);
            out.h_last_ok.push(s.last_ok);
            let after = s
                .failures
                .iter()
                .filter(|t| s.last_ok.is_none_or(|ok| **t > ok))
                .count();
            out.h_failures.push(after.min(i32::MAX as usize) as i32);
            let (at, code, error) = match s.last_error {
                Some((at, code, error)) => (Some(at), code, error),
                None => (None, None, None),
            };
            out.h_error_at.push(at);
            out.h_status_code.push(code);
            out.h_error.push(error);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_four_per_doubling_from_a_tenth_of_a_millisecond() {
        assert_eq!(latency_bucket(0.0), 0);
        assert_eq!(latency_bucket(0.099), 0);
        assert_eq!(latency_bucket(0.1), 1);
        assert_eq!(latency_bucket(0.2), 5);
        assert_eq!(latency_bucket(f64::NAN), 0);
        assert_eq!(latency_bucket(1e12), HIST_BUCKETS - 1);
        // The longest timeout (10 minutes) still has a bucket of its own.
        assert!(latency_bucket(600_000.0) < HIST_BUCKETS - 1);
        for ms in [0.15, 0.7, 3.0, 42.0, 999.0, 12_345.0, 599_999.0] {
            let (lo, hi) = bucket_bounds(latency_bucket(ms));
            assert!(lo <= ms && ms < hi, "{ms} in [{lo}, {hi})");
        }
    }

    #[test]
    fn quantiles_are_within_nine_percent_of_the_exact_nearest_rank() {
        let samples: Vec<f64> = (1..=1000)
            .map(|i| 0.3 + (i as f64).powf(1.7) / 10.0)
            .collect();
        let mut hist = vec![0i64; HIST_BUCKETS];
        for s in &samples {
            hist[latency_bucket(*s)] += 1;
        }
        for q in [0.5, 0.95, 0.99, 0.0, 1.0] {
            let rank = ((q * 1000f64).ceil() as usize).max(1);
            let exact = samples[rank - 1];
            let est = quantile(&hist, q).expect("not empty");
            let ratio = est / exact;
            assert!(
                (1.0 / 1.0906..=1.0906).contains(&ratio),
                "q {q}: {est} vs {exact}"
            );
        }
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[0, 0], 0.5), None);
        assert_eq!(quantile(&[3], 0.5), Some(0.05));
    }

    #[test]
    fn add_sums_histograms_of_any_length() {
        assert_eq!(add(&[Some(1), None, Some(2)], &[Some(5)]), vec![6, 0, 2]);
        assert_eq!(add(&[], &[]), Vec::<i64>::new());
        assert_eq!(add(&[Some(i64::MAX)], &[Some(1)]), vec![i64::MAX]);
        assert!(quantile(&[i64::MAX, i64::MAX, -5], 0.99).is_some());
    }

    fn at(sub: i64, started: f64, outcome: &'static str) -> Attempt<'static> {
        Attempt {
            subscription_id: sub,
            event_type: if sub == 1 {
                "order.paid"
            } else {
                "order.shipped"
            },
            started,
            duration_ms: 2.0,
            outcome,
            status_code: Some(if outcome == "succeeded" { 200 } else { 500 }),
            error: (outcome != "succeeded").then_some("HTTP 500"),
        }
    }

    #[test]
    fn a_batch_is_summed_per_subscription_minute_and_hour_and_per_type_and_hour() {
        let t = 1_764_619_200.0; // a whole hour
        let s = BatchStats::of([
            at(1, t + 59.5, "succeeded"),
            at(1, t + 60.0, "retry"),
            at(1, t + 61.0, "dead"),
            at(2, t - 1.0, "succeeded"),
        ]);
        let t = t as i64;
        assert_eq!(s.ds_sub, [1, 1, 1, 2, 2]);
        assert_eq!(s.ds_width, [60, 60, 3600, 60, 3600]);
        assert_eq!(s.ds_bucket, [t, t + 60, t, t - 60, t - 3600]);
        assert_eq!(s.ds_attempts, [1, 2, 3, 1, 1]);
        assert_eq!(s.ds_succeeded, [1, 0, 1, 1, 1]);
        assert_eq!(s.ds_failed, [0, 2, 2, 0, 0]);
        assert_eq!(s.ds_dead, [0, 1, 1, 0, 0]);
        assert_eq!(s.ds_hist[2], "{0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,3}");
        assert_eq!(s.es_type, ["order.paid", "order.shipped"]);
        assert_eq!(s.es_bucket, [t, t - 3600]);
        assert_eq!(
            (
                s.es_delivered.clone(),
                s.es_retried.clone(),
                s.es_dead.clone()
            ),
            (vec![1, 1], vec![1, 0], vec![1, 0])
        );
        assert_eq!(s.h_sub, [1, 2]);
        assert_eq!(s.h_last_ok, [Some(t as f64 + 59.5), Some(t as f64 - 1.0)]);
        assert_eq!(s.h_failures, [2, 0]);
        assert_eq!(s.h_error_at, [Some(t as f64 + 61.0), None]);
        assert_eq!(s.h_status_code, [Some(500), None]);
    }

    #[test]
    fn only_failures_after_the_batch_last_success_continue_the_streak() {
        let s = BatchStats::of([
            at(1, 10.0, "retry"),
            at(1, 11.0, "succeeded"),
            at(1, 12.0, "retry"),
            at(1, 9.0, "retry"),
        ]);
        assert_eq!(s.h_failures, [1]);
        assert_eq!(s.h_error_at, [Some(12.0)]);
        let s = BatchStats::of([at(1, 10.0, "retry"), at(1, 12.0, "dead")]);
        assert_eq!(s.h_failures, [2]);
        assert_eq!(s.h_last_ok, [None]);
    }
}
