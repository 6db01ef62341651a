//! The Thynapse wire protocol as pure data: command frames (`<enc> <CMD4> <payload>`),
//! binary batches of messages, THIDs, Redis-compatible glob patterns, delivery rules,
//! duplicate suppression and the rendezvous datagrams.
//!
//! This crate must not do I/O: no sockets, no clocks, no threads. Everything here is
//! testable as plain values; the transmitter, sidecar and rendezvous crates put it on
//! the wire.

pub mod auth;
pub mod batch;
pub mod credit;
pub mod crypt;
pub mod dedup;
pub mod delivery;
pub mod discovery;
pub mod frame;
pub mod glob;
pub mod limits;
pub mod permissions;
pub mod room;
pub mod seal;
pub mod thid;
pub mod wire;

pub use delivery::{DeliveryRule, Mode};
pub use frame::{CommandFrame, Encoding, FrameError};
pub use thid::Thid;

/// Default largest message payload (bytes) a transmitter accepts; a mesh can raise it.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
