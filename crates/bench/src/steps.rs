//! serve's per-step profile of the message path, read from its `/metrics`: the spans of target
//! `sandwarden::steps` become `sandwarden_step_duration_seconds{step}` histograms there, and a
//! scrape before and after a phase gives that phase's share of each.

use crate::bench::fmt_us;
use std::collections::BTreeMap;

const METRIC: &str = "sandwarden_step_duration_seconds";

/// One step's histogram: cumulative counts by upper bound (seconds), the sum and the count.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl Step {
    /// Microseconds below which `q` of the observations fall, interpolated inside its bucket.
    fn quantile_us(&self, q: f64) -> u64 {
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut lower = (0.0, 0u64);
        for &(le, cumulative) in &self.buckets {
            if cumulative >= want {
                if le.is_infinite() {
                    return (lower.0 * 1e6) as u64;
                }
                let inside = (cumulative - lower.1).max(1) as f64;
                let into = (want - lower.1) as f64 / inside;
                return ((lower.0 + (le - lower.0) * into) * 1e6) as u64;
            }
            lower = (le, cumulative);
        }
        (lower.0 * 1e6) as u64
    }

    fn mean_us(&self) -> u64 {
        (self.sum / self.count.max(1) as f64 * 1e6) as u64
    }

    /// What `later` observed since `self` was scraped.
    fn since(&self, later: &Step) -> Step {
        let before: BTreeMap<u64, u64> = self
            .buckets
            .iter()
            .map(|&(le, c)| (le.to_bits(), c))
            .collect();
        Step {
            buckets: later
                .buckets
                .iter()
                .map(|&(le, c)| {
                    (
                        le,
                        c - before.get(&le.to_bits()).copied().unwrap_or(0).min(c),
                    )
                })
                .collect(),
            sum: later.sum - self.sum,
            count: later.count.saturating_sub(self.count),
        }
    }
}

/// Every step's histogram in a `/metrics` text, by step name.
pub fn parse(metrics: &str) -> BTreeMap<String, Step> {
    let mut steps: BTreeMap<String, Step> = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let Some((kind, rest)) = rest.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.strip_prefix("=\""))
                    .and_then(|v| v.strip_suffix('"'))
            })
        };
        let Some(step) = label("step") else { continue };
        let entry = steps.entry(step.to_string()).or_default();
        match kind {
            "_bucket" => {
                let le = match label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::NAN),
                    None => f64::NAN,
                };
                if let (false, Ok(count)) = (le.is_nan(), value.trim().parse()) {
                    entry.buckets.push((le, count));
                }
            }
            "_sum" => entry.sum = value.trim().parse().unwrap_or(0.0),
            "_count" => entry.count = value.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    for step in steps.values_mut() {
        step.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    steps
}

/// serve's `/metrics` now.
pub async fn scrape(http: &reqwest::Client, base: &str) -> anyhow::Result<BTreeMap<String, Step>> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse(&text))
}

/// The order the steps happen in, for the table; others follow by name.
const ORDER: [&str; 5] = [
    "message",
    "turn.begin",
    "turn.dial",
    "turn.harness",
    "turn.finish",
];

/// A table of each step's mean, p50 and p99 between two scrapes (p50 and p99 are read from
/// buckets 1.25× wide, so within a quarter of their value).
pub fn table(before: &BTreeMap<String, Step>, after: &BTreeMap<String, Step>) -> String {
    let mut names: Vec<&String> = after.keys().collect();
    names.sort_by_key(|n| (ORDER.iter().position(|o| o == n).unwrap_or(ORDER.len()), *n));
    let mut out =
        String::from("| step | mean | ≈ p50 | ≈ p99 | samples |\n|---|---|---|---|---|\n");
    for name in names {
        let step = before
            .get(name)
            .cloned()
            .unwrap_or_default()
            .since(&after[name]);
        if step.count == 0 {
            continue;
        }
        out.push_str(&format!(
            "| `{name}` | {} | {} | {} | {} |\n",
            fmt_us(step.mean_us()),
            fmt_us(step.quantile_us(0.5)),
            fmt_us(step.quantile_us(0.99)),
            step.count
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE sandwarden_step_duration_seconds histogram
sandwarden_step_duration_seconds_sum{step=\"turn.begin\"} 0.003
sandwarden_step_duration_seconds_count{step=\"turn.begin\"} 30
sandwarden_step_duration_seconds_bucket{le=\"0.0001\",step=\"turn.begin\"} 10
sandwarden_step_duration_seconds_bucket{le=\"0.0002\",step=\"turn.begin\"} 29
sandwarden_step_duration_seconds_bucket{le=\"+Inf\",step=\"turn.begin\"} 30
sandwarden_turns_total{outcome=\"completed\"} 30
";

    #[test]
    fn reads_buckets_and_interpolates_quantiles() {
        let steps = parse(TEXT);
        let begin = &steps["turn.begin"];
        assert_eq!(begin.count, 30);
        assert_eq!(begin.buckets.len(), 3);
        assert_eq!(begin.mean_us(), 100);
        // The 15th of 30 is the 5th of the 19 in (100 µs, 200 µs].
        assert_eq!(begin.quantile_us(0.5), 126);
        // The last one is above every finite bound: the highest bound is all that is known.
        assert_eq!(begin.quantile_us(1.0), 200);
        assert_eq!(steps.len(), 1);
    }

    #[test]
    fn a_phase_is_the_difference_of_two_scrapes() {
        let before = parse(TEXT);
        let after = parse(&TEXT.replace("} 30\n", "} 40\n").replace("} 29\n", "} 39\n"));
        let table = table(&before, &after);
        assert!(table.contains("| `turn.begin` | 0 µs |"), "{table}");
        assert!(table.contains("| 10 |"), "{table}");
    }
}
