//! What every Thynapse process shares at its edge: tracing to stderr, a Prometheus
//! `/metrics` endpoint served over HTTP from a registry the process fills, and the
//! signals that ask it to stop.

use std::net::SocketAddr;

use axum::{routing::get, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// SIGTERM and SIGINT, the two ways a process here is asked to stop (Kubernetes, and
/// Ctrl-C or `thynapse up`).
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Whether a log line that a peer can make repeat (a refusal, an error answered on every
/// announcement) may be written now: at most once per period, so a flood is counted in a
/// metric rather than logged.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<std::time::Instant>,
}

impl Throttle {
    pub fn ready(&mut self, every: std::time::Duration) -> bool {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|at| now.duration_since(at) < every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Stdout stays free for the
/// machine-readable `READY` line that `thynapse up` reads.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Binds `addr` and serves `GET /metrics` (text exposition format) from `registry` on the
/// current runtime. Returns the bound address (port 0 picks a free one).
pub async fn serve_metrics(addr: SocketAddr, registry: Registry) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut buf = Vec::new();
                let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
                ([("content-type", "text/plain; version=0.0.4")], buf)
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(bound)
}

/// Creates a counter and registers it; names are fixed at compile time, so a failure is
/// a programming error.
pub fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let c = prometheus::IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::IntGauge {
    let g = prometheus::IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> prometheus::IntCounterVec {
    let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), &[label])
        .expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}
