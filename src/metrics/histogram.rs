//! The per-unit latency histogram (`pgvigil_unit_duration_seconds`), kept as one atomic count
//! per bucket and rendered by pgvigil itself.
//!
//! The exporter's histogram appends every sample to a lock-free list (with an epoch pin) until
//! the next scrape: measured with callgrind through pgbench `-S`, that was about 165
//! instructions of the ~19,000 pgvigil spends per transaction, the largest part of the
//! metrics' cost. Here a sample is a search over 14 bounds and one atomic add; the count and sum
//! are the per-node totals SHOW STATS already keeps.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::LATENCY_BUCKETS;

/// [`LATENCY_BUCKETS`] in microseconds, the unit samples are counted in.
const BOUNDS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Samples per bucket: at index `i` those at most `BOUNDS_US[i]` and above the bound before it;
/// the last, those above every bound.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
}

impl LatencyHistogram {
    /// Counts one sample of `micros` microseconds.
    pub fn record(&self, micros: u64) {
        let bucket = BOUNDS_US.partition_point(|&bound| bound < micros);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the histogram's sample lines in Prometheus' text format, labelled `node`:
    /// cumulative buckets, then `_sum` (`sum_us` microseconds) and `_count` (what the buckets
    /// hold, so that it matches them though samples land while this reads).
    pub fn render(&self, name: &str, node: &str, sum_us: u64, out: &mut String) {
        let node = escape(node);
        let mut count = 0;
        let les = LATENCY_BUCKETS.iter().map(f64::to_string);
        for (bucket, le) in self.buckets.iter().zip(les.chain(["+Inf".to_owned()])) {
            count += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{node=\"{node}\",le=\"{le}\"}} {count}");
        }
        let sum = Duration::from_micros(sum_us).as_secs_f64();
        let _ = writeln!(out, "{name}_sum{{node=\"{node}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{node=\"{node}\"}} {count}");
    }
}

/// `text` as a Prometheus label value (backslash, double quote and newline escaped).
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_the_exported_buckets_in_microseconds() {
        for (us, seconds) in BOUNDS_US.iter().zip(LATENCY_BUCKETS) {
            assert_eq!(Duration::from_micros(*us).as_secs_f64(), seconds);
        }
    }

    #[test]
    fn samples_land_in_cumulative_buckets_with_a_bound_inclusive() {
        let histogram = LatencyHistogram::default();
        for micros in [0, 500, 501, 20_000, 60_000_000] {
            histogram.record(micros);
        }
        let mut out = String::new();
        histogram.render("x", "pg\"1", 1_500_000, &mut out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], r#"x_bucket{node="pg\"1",le="0.0005"} 2"#);
        assert_eq!(lines[1], r#"x_bucket{node="pg\"1",le="0.001"} 3"#);
        assert_eq!(lines[5], r#"x_bucket{node="pg\"1",le="0.025"} 4"#);
        assert_eq!(lines[13], r#"x_bucket{node="pg\"1",le="10"} 4"#);
        assert_eq!(lines[14], r#"x_bucket{node="pg\"1",le="+Inf"} 5"#);
        assert_eq!(lines[15], r#"x_sum{node="pg\"1"} 1.5"#);
        assert_eq!(lines[16], r#"x_count{node="pg\"1"} 5"#);
    }
}
