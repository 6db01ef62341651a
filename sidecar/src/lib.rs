//! The sidecar: a Redis server on localhost that any stock Redis client can use for
//! pub/sub, bridged to the mesh through one transmitter at a time. It finds transmitters
//! through the rendezvous, moves to another when its own dies or drains, and restores
//! every subscription there.
//!
//! Rooms (SSUBSCRIBE/SPUBLISH) go through one extra session per room, linked to a
//! transmitter that hosts it.
//!
//! `resp` is the wire codec, `connection` one client, `hub` the cell's state, `session`
//! one stream (mesh or room) and its link.

pub mod api;
pub mod client;
pub mod cmd;
pub mod confirm;
pub mod connection;
pub mod frames;
pub mod hub;
pub mod introspection;
pub mod metrics;
pub mod resp;
pub mod session;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use thynapse_protocol::auth::Key;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

use crate::client::Shared;
use crate::hub::{Hub, HubConfig};
/// The sidecar's flags (the contract every launcher fills: `thynapse_process`).
pub use thynapse_process::SidecarArgs as Args;

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if !args.resp_bind.ip().is_loopback() {
        anyhow::bail!(
            "--resp-bind {} is not a loopback address: the sidecar serves only its own pod",
            args.resp_bind
        );
    }
    let metrics = metrics::Metrics::new();
    let listener = TcpListener::bind(args.resp_bind)
        .await
        .with_context(|| format!("binding {}", args.resp_bind))?;
    let resp = listener.local_addr()?;
    let metrics_addr =
        thynapse_telemetry::serve_metrics(args.metrics_bind, metrics.registry.clone()).await?;
    let heartbeat = Duration::from_millis(args.announce_interval_ms);
    let interest_bytes = Arc::new(AtomicUsize::new(0));
    let identity = args.permissions.0.identity(&args.service);
    let service_key = service_key(&args, &identity)?;
    if args.encrypt && service_key.is_none() {
        anyhow::bail!(
            "--encrypt needs --service-key-file or --token-file: the keys are derived from it"
        );
    }
    let cfg = HubConfig {
        mesh: args.mesh.clone(),
        service: args.service.clone(),
        name: args.name.clone(),
        rules: args.rules.0.clone(),
        rendezvous: args.rendezvous.clone(),
        prefer: args.prefer_transmitter.clone(),
        heartbeat,
        expiry: heartbeat * args.expiry_multiplier,
        client_output_buffer_bytes: args.client_output_buffer_bytes,
        max_message_bytes: args.max_message_bytes,
        drain: Duration::from_secs(args.drain_seconds),
        resp,
        metrics_url: format!("http://{metrics_addr}/metrics"),
        interest_bytes: interest_bytes.clone(),
        service_key,
        identity,
        encrypt: args.encrypt,
    };
    let (hub_tx, hub_rx) = mpsc::channel(1024);
    let shutdown = Arc::new(Notify::new());
    let hub = tokio::spawn(Hub::new(cfg, metrics.clone()).run(hub_rx, shutdown.clone()));
    let shared = Arc::new(Shared {
        hub: hub_tx,
        publish_queue: Arc::new(tokio::sync::Semaphore::new(api::PUBLISH_QUEUE_BYTES)),
        max_message_bytes: args.max_message_bytes,
        refused: metrics.refused.clone(),
        drops: metrics.drops.clone(),
        client_output_buffer_bytes: args.client_output_buffer_bytes,
        mesh: args.mesh.clone(),
        service: args.service.clone(),
        cell: args.name.clone(),
        bind: resp,
        started: std::time::Instant::now(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        clients: Default::default(),
        total_connections: AtomicU64::new(0),
        total_commands: AtomicU64::new(0),
        interest_bytes,
        permissions: args.permissions.0.clone(),
    });
    tracing::info!(%resp, service = %args.service, "sidecar listening");

    let next_id = AtomicU64::new(1);
    let mut stop_signals = thynapse_telemetry::StopSignals::new()?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection::serve(socket, id, shared.clone()));
            }
            _ = stop_signals.recv() => break,
        }
    }
    // New connections are refused from now on.
    drop(listener);
    shutdown.notify_one();
    // The hub drains (bounded by --drain-seconds) while the connections write its replies.
    let drain = Duration::from_secs(args.drain_seconds);
    let _ = tokio::time::timeout(drain + Duration::from_secs(1), hub).await;
    // Let the connections write what they took last (a few turns of this one thread).
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// The Service key this cell proves itself with: given (`--service-key-file`, what the
/// operator mounts), or derived from the mesh token (`--token-file`, what `thynapse up`
/// gives). None: the mesh is not authenticated.
fn service_key(args: &Args, identity: &str) -> anyhow::Result<Option<Key>> {
    if let Some(path) = &args.service_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the Service key from {path}"))?;
        let key = Key::from_hex(&text)
            .with_context(|| format!("{path}: a Service key is 64 hex digits"))?;
        return Ok(Some(key));
    }
    if let Some(path) = &args.token_file {
        let tokens = thynapse_process::read_tokens(path).map_err(anyhow::Error::msg)?;
        return Ok(Some(Key::service(&tokens[0], identity)));
    }
    tracing::warn!("no --service-key-file or --token-file: joining an unauthenticated mesh");
    Ok(None)
}
