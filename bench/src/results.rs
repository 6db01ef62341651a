//! What a run measured: samples by scenario and system, and the table they make.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum System {
    Redis,
    Nats,
    Thynapse,
}

pub const SYSTEMS: [System; 3] = [System::Redis, System::Nats, System::Thynapse];

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub value: f64,
    pub lost: u64,
    pub duplicates: u64,
}

#[derive(Default, Serialize)]
pub struct Row {
    pub unit: &'static str,
    /// Higher is better (throughput) or lower is (latency, memory).
    pub higher_is_better: bool,
    pub samples: BTreeMap<String, Vec<Sample>>,
}

#[derive(Default)]
pub struct Results {
    pub rows: Vec<(String, Row)>,
    pub notes: Vec<String>,
    pub filter: Option<String>,
}

impl Results {
    pub fn wants(&self, scenario: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| scenario.contains(f.as_str()))
    }

    pub fn add(
        &mut self,
        scenario: &str,
        unit: &'static str,
        higher: bool,
        system: System,
        s: Sample,
    ) {
        if self
            .filter
            .as_ref()
            .is_some_and(|f| !scenario.contains(f.as_str()))
        {
            return;
        }
        let i = match self.rows.iter().position(|(n, _)| n == scenario) {
            Some(i) => i,
            None => {
                self.rows.push((
                    scenario.to_string(),
                    Row {
                        unit,
                        higher_is_better: higher,
                        ..Row::default()
                    },
                ));
                self.rows.len() - 1
            }
        };
        self.rows[i]
            .1
            .samples
            .entry(format!("{system:?}"))
            .or_default()
            .push(s);
    }
    /// The Markdown table: median [min–max] of every system, ratios of Thynapse to Redis
    /// and NATS, and losses.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| scenario | unit | Redis | NATS | Thynapse | Thynapse / Redis | Thynapse / NATS | lost (R/N/T) |\n|---|---|---|---|---|---|---|---|\n");
        for (name, row) in &self.rows {
            let cell = |sys: &str| -> (String, Option<f64>, String) {
                match row.samples.get(sys) {
                    Some(samples) if !samples.is_empty() => {
                        let values: Vec<f64> = samples.iter().map(|s| s.value).collect();
                        let m = median(&values);
                        let lo = values.iter().cloned().fold(f64::MAX, f64::min);
                        let hi = values.iter().cloned().fold(f64::MIN, f64::max);
                        let lost: u64 = samples.iter().map(|s| s.lost + s.duplicates).sum();
                        let spread = if samples.len() > 1 {
                            format!(" [{}–{}]", fmt_value(lo, row.unit), fmt_value(hi, row.unit))
                        } else {
                            String::new()
                        };
                        (
                            format!("{}{spread}", fmt_value(m, row.unit)),
                            Some(m),
                            lost.to_string(),
                        )
                    }
                    _ => ("n/a".into(), None, "-".into()),
                }
            };
            let (r, rv, rl) = cell("Redis");
            let (n, nv, nl) = cell("Nats");
            let (t, tv, tl) = cell("Thynapse");
            let ratio = |other: Option<f64>| match (tv, other) {
                (Some(t), Some(o)) if o > 0.0 => format!("{:.2}×", t / o),
                _ => "n/a".into(),
            };
            out.push_str(&format!(
                "| {name} | {} | {r} | {n} | {t} | {} | {} | {rl}/{nl}/{tl} |\n",
                row.unit,
                ratio(rv),
                ratio(nv)
            ));
        }
        out
    }
}

pub fn percentile_sample(h: &Histogram<u64>, q: f64, lost: u64, duplicates: u64) -> Sample {
    Sample {
        value: h.value_at_quantile(q) as f64,
        lost,
        duplicates,
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "msg/s" => format!("{:.0}k", v / 1000.0),
        "µs" => format!("{v:.0}"),
        "MiB" => format!("{:.1}", v / (1024.0 * 1024.0)),
        _ => format!("{v:.1}"),
    }
}
