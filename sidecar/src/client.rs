//! What the connection loop (`connection`) and the commands (`cmd`) both work on: one
//! client's state, its reply slots, and what every connection of the sidecar shares.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use thynapse_protocol::limits::{MAX_INTEREST_BYTES, MAX_NAME_BYTES};
use tokio::sync::mpsc;

use crate::api::{ClientId, ClientPublishes, HubCmd};
use crate::introspection::ClientSummary;
use crate::resp::Reply;

pub struct Shared {
    pub hub: mpsc::Sender<HubCmd>,
    /// `PUBLISH_QUEUE_BYTES` of publishes on their way to the hub.
    pub publish_queue: Arc<tokio::sync::Semaphore>,
    pub max_message_bytes: usize,
    /// `thynapse_sidecar_refused_total` and `_drops_total`, counted where a command is refused.
    pub refused: prometheus::IntCounterVec,
    pub drops: prometheus::IntCounterVec,
    pub client_output_buffer_bytes: usize,
    /// Who this sidecar is, for INFO.
    pub mesh: String,
    pub service: String,
    pub cell: String,
    /// Where the sidecar serves its clients.
    pub bind: SocketAddr,
    pub started: Instant,
    pub started_unix: u64,
    /// Every connected client as CLIENT LIST shows it, updated after each command that is
    /// not a (S)PUBLISH (those stay off the lock).
    pub clients: Mutex<HashMap<ClientId, ClientSummary>>,
    pub total_connections: AtomicU64,
    pub total_commands: AtomicU64,
    /// The mesh session's subscriptions as the transmitter counts them (each name and 6
    /// bytes), kept by the hub: a SUBSCRIBE past `MAX_INTEREST_BYTES` is refused here
    /// with an error rather than by the transmitter, which the client would never see.
    pub interest_bytes: Arc<AtomicUsize>,
    /// What this cell's Service may publish and subscribe to: refused here with
    /// `-NOPERM` (the transmitter enforces it too, for anyone bypassing the sidecar).
    pub permissions: thynapse_protocol::permissions::Permissions,
}

pub(crate) enum Pending {
    Ready(Reply),
    /// A (S)PUBLISH waiting for its acknowledgement; its token is its number in
    /// `pending` (see `pending_base`).
    Publish,
    /// Holds the (P|S)SUBSCRIBE confirmations behind it until the mesh knows the
    /// subscriptions (`Out::Confirmed`); writes nothing itself.
    Barrier,
    /// A barrier passed.
    Passed,
}

pub(crate) struct Client {
    pub(crate) id: ClientId,
    pub(crate) resp3: bool,
    /// The version the hub was last told (it writes this client's pushes).
    pub(crate) hub_resp3: bool,
    /// What CLIENT INFO / LIST say of this client (its name among them).
    pub(crate) info: ClientSummary,
    pub(crate) channels: BTreeSet<Bytes>,
    pub(crate) patterns: BTreeSet<Bytes>,
    pub(crate) shard: BTreeSet<Bytes>,
    /// Replies in request order. Every entry is numbered (`pending_base` is the number of
    /// the front one), so an acknowledgement finds its (S)PUBLISH's slot by subtraction.
    pub(crate) pending: VecDeque<Pending>,
    pub(crate) pending_base: u64,
    /// (S)PUBLISHes read but not yet handed to the hub, encoded as `PUBS` records: one
    /// hand-over per read, not per message.
    pub(crate) batch: BytesMut,
    pub(crate) publishes: ClientPublishes,
    /// When the publishes of the batch were taken (their `ts`).
    pub(crate) batch_ts: u64,
    pub(crate) out: BytesMut,
    /// What goes out before `out`, in order: earlier replies and the hub's pushes.
    pub(crate) chunks: VecDeque<Bytes>,
    pub(crate) close: bool,
    /// The hub's kill switch (a slow subscriber), also heard while waiting to hand over.
    pub(crate) kill: Arc<tokio::sync::Notify>,
}

/// The error for a subscription that would take the mesh session past
/// `MAX_INTEREST_BYTES`, given the bytes already asked for in the same command.
pub fn over_interest_budget(shared: &Shared, name: &[u8], asked: usize) -> Option<String> {
    let total = shared.interest_bytes.load(Ordering::Relaxed) + asked + name.len() + 6;
    (total > MAX_INTEREST_BYTES).then(|| {
        format!(
            "ERR subscriptions of this cell over the limit of {MAX_INTEREST_BYTES} bytes of names"
        )
    })
}

/// The error for a channel, pattern or room name over `MAX_NAME_BYTES`, if it is.
pub(crate) fn name_too_long(name: &[u8]) -> Option<String> {
    (name.len() > MAX_NAME_BYTES).then(|| {
        format!(
            "ERR channel name of {} bytes exceeds the limit of {MAX_NAME_BYTES} bytes",
            name.len()
        )
    })
}

/// The client registry's lock; a panic while it was held leaves nothing half-written
/// worth refusing (each entry is replaced whole).
pub(crate) fn lock(
    m: &Mutex<HashMap<ClientId, ClientSummary>>,
) -> std::sync::MutexGuard<'_, HashMap<ClientId, ClientSummary>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
