//! The transmitter: a ZeroMQ ROUTER "command" socket that cells (sidecars) and peer
//! transmitters connect to, a PUB "event" socket for seed-protocol clients, and the
//! routing between them (see `routing`). One single-threaded runtime per transmitter:
//! it measured the lowest latency, and nothing inside may block it.
//!
//! Pure logic lives in `routing` and `outbox`; `server` is the event loop and its I/O.

pub mod backpressure;
pub mod gate;
pub mod interest_sync;
pub mod metrics;
pub mod outbox;
pub mod routing;
mod server;

pub use server::run;
/// The transmitter's flags (the contract every launcher fills: `thynapse_process`).
pub use thynapse_process::TransmitterArgs as Args;
