//! The operator's Prometheus metrics (`thynapse_operator_*`).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Registry};
use thynapse_telemetry::{counter_vec, gauge};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub durations: HistogramVec,
    pub leader: IntGauge,
    pub admissions: IntCounterVec,
    pub admission_latency: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "thynapse_operator_reconcile_duration_seconds",
                "Time one reconcile took, by controller.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )
        .expect("valid histogram");
        r.register(Box::new(durations.clone()))
            .expect("registered once");
        let admission_latency = Histogram::with_opts(
            HistogramOpts::new(
                "thynapse_operator_admission_duration_seconds",
                "Time the sidecar-injection webhook took per request.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
        )
        .expect("valid histogram");
        r.register(Box::new(admission_latency.clone()))
            .expect("registered once");
        let reconciles = IntCounterVec::new(
            prometheus::Opts::new(
                "thynapse_operator_reconciles_total",
                "Reconciles, by controller and result (ok or error).",
            ),
            &["controller", "result"],
        )
        .expect("valid counter");
        r.register(Box::new(reconciles.clone()))
            .expect("registered once");
        Metrics {
            reconciles,
            durations,
            leader: gauge(
                &r,
                "thynapse_operator_leader",
                "1 while this replica holds the leader lease.",
            ),
            admissions: counter_vec(
                &r,
                "thynapse_operator_admissions_total",
                "Pods seen by the injection webhook, by outcome (injected, skipped, error).",
                "outcome",
            ),
            admission_latency,
            registry: r,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
