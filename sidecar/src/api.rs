//! What the client connections and the hub say to each other: the connection's commands
//! (`HubCmd`) over a bounded channel, the hub's answers and pushed messages (`Out`) over
//! each client's queue.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

pub type ClientId = u64;

/// What the hub sends a client connection.
#[derive(Debug)]
pub enum Out {
    /// Messages for the client, already written as RESP pushes (`resp3` says which
    /// version): one hand-over per frame from the transmitter, and no copy per message
    /// beyond writing it.
    Pushes { resp3: bool, bytes: Bytes },
    /// The reply to the client's (S)PUBLISH numbered `token`: cells reached, or why not.
    Published {
        token: u64,
        result: Result<i64, String>,
    },
    /// Replies to several of the client's publishes at once: (token, cells reached).
    Acked(Vec<(u64, i64)>),
    /// The barrier in reply slot `token` is passed: for a (P|S)SUBSCRIBE, every
    /// transmitter linked to the cell's knows the subscriptions (see `confirm`); for an
    /// unsubscribe, the hub has dropped them, and every message it delivered before is
    /// ahead of this in the client's queue.
    Confirmed(u64),
}

impl Out {
    pub fn size(&self) -> usize {
        match self {
            Out::Pushes { bytes, .. } => bytes.len(),
            Out::Published { .. } | Out::Confirmed(_) => 16,
            Out::Acked(acks) => 16 * acks.len(),
        }
    }
}

/// The hub's handle on one client: its queue, how many bytes wait in it, and the switch
/// that disconnects it.
pub struct ClientHandle {
    pub tx: mpsc::UnboundedSender<Out>,
    /// Whether the client speaks RESP3 (pushes are written for it in the hub).
    pub resp3: bool,
    pub queued: Arc<AtomicUsize>,
    pub killed: Arc<AtomicBool>,
    pub kill: Arc<Notify>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubKind {
    Channel,
    Pattern,
    Shard,
}

/// The (S)PUBLISHes a client sent in one read, already encoded as `PUBS` records
/// (`put_publish`), so the hub queues them with one copy.
#[derive(Debug, Default)]
pub struct ClientPublishes {
    pub records: Bytes,
    pub count: usize,
    /// The tokens (reply slots on the client's connection) of the messages, in order, as
    /// runs (first, how many).
    pub tokens: Vec<(u64, u32)>,
    /// Whether any is an SPUBLISH (those go to their room's session).
    pub shard: bool,
    pub payload_bytes: usize,
    /// Its share of `PUBLISH_QUEUE_BYTES`, held until the hub takes it: a client whose
    /// publishes cannot be queued waits, and its socket is not read.
    pub queued: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Bytes of publishes read from all clients and not yet taken by the hub. The hub takes
/// none while its window of unacknowledged publishes is full; then the connections wait
/// and stop reading their sockets, so a client cannot make the sidecar buffer more.
pub const PUBLISH_QUEUE_BYTES: usize = 4 << 20;

pub enum HubCmd {
    Register(ClientId, ClientHandle),
    Unregister(ClientId),
    /// May this room be used? Answered once the rendezvous has placed it (or refused).
    Admit(Bytes, oneshot::Sender<Result<(), String>>),
    /// New subscriptions of one client, all of one session (the mesh, or one room); the
    /// confirmations wait in the client's reply slot `token` until the mesh knows them.
    Subscribe {
        client: ClientId,
        kind: SubKind,
        names: Vec<Bytes>,
        token: u64,
    },
    /// Dropped subscriptions of one client; slot `token` is answered once they are gone.
    Unsubscribe {
        client: ClientId,
        kind: SubKind,
        names: Vec<Bytes>,
        token: u64,
    },
    /// The (S)PUBLISHes a client sent in one read, in order.
    Publish(ClientId, ClientPublishes),
    Channels(SubKind, Option<Bytes>, oneshot::Sender<Vec<Bytes>>),
    NumSub(SubKind, Vec<Bytes>, oneshot::Sender<Vec<i64>>),
    NumPat(oneshot::Sender<i64>),
    /// The client switched protocol version (HELLO, RESET).
    Protocol(ClientId, bool),
    /// What INFO reports of the cell.
    Info(oneshot::Sender<HubInfo>),
}

/// The hub's part of INFO.
#[derive(Debug)]
pub struct HubInfo {
    pub run_id: String,
    pub transmitter: Option<String>,
    pub channels: usize,
    pub patterns: usize,
    pub shard_channels: usize,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
