//! The transmitter: a ZeroMQ ROUTER "command" socket that cells (sidecars) and peer
//! transmitters connect to, a PUB "event" socket for seed-protocol clients, and the
//! routing between them (see `routing`). One single-threaded runtime per transmitter:
//! it measured the lowest latency, and nothing inside may block it.
//!
//! Pure logic lives in `routing` and `outbox`; `server` is the event loop and its I/O.

pub mod backpressure;
pub mod interest_sync;
pub mod metrics;
pub mod outbox;
pub mod routing;
mod server;

use std::net::SocketAddr;

pub use server::run;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Mesh this transmitter belongs to.
    #[arg(long)]
    pub mesh: String,
    /// Unique name within the mesh (a StatefulSet pod name in a cluster).
    #[arg(long)]
    pub name: String,
    /// ZeroMQ endpoint of the ROUTER command socket.
    #[arg(long, default_value = "tcp://127.0.0.1:0")]
    pub command_bind: String,
    /// ZeroMQ endpoint of the PUB event socket.
    #[arg(long, default_value = "tcp://127.0.0.1:0")]
    pub event_bind: String,
    /// Host that others use to reach the bound endpoints (the pod IP in a cluster).
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_bind: SocketAddr,
    /// Rendezvous points, `udp://host:port` (repeat for several).
    #[arg(long = "rendezvous", required = true)]
    pub rendezvous: Vec<String>,
    #[arg(long, default_value_t = 500)]
    pub announce_interval_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub expiry_multiplier: u32,
    #[arg(long, default_value_t = thynapse_protocol::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Bytes in flight per cell or peer link beyond which its messages are dropped.
    #[arg(long, default_value_t = 32 << 20)]
    pub link_buffer_bytes: usize,
}
