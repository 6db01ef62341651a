//! The hub: one task per sidecar that owns the cell's sessions (see `session`), its
//! subscriptions (reference-counted over its Redis clients) and delivery to the clients.
//! Client connections talk to it through a bounded channel, so a flood of PUBLISHes
//! pushes back on the clients' sockets instead of growing memory.
//!
//! Publishing: every message gets the next sequence number of its session; the batches
//! (`PUBS`, kept as sent) wait until the transmitter acknowledges them (with the number of
//! cells each message reached, the PUBLISH reply). When a session moves to another
//! transmitter, what was not acknowledged is sent again; receivers drop the copies by
//! (origin, sequence).
//!
//! Delivering: the messages of a `DLVR` frame are written as RESP pushes here, into one
//! buffer per client, which its connection writes as it is.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
// foldhash: a fast, seeded hasher (the per-message maps are keyed by ids and channel
// names; SipHash was a visible share of the hot path).
use foldhash::{HashMap, HashMapExt, HashSet};
use futures::FutureExt;
use thynapse_protocol::batch::{
    decode_acks, decode_envelopes, decode_publish_records, Envelopes, Kind,
};
use thynapse_protocol::dedup::SeqWindow;
use thynapse_protocol::frame::{CommandFrame, Encoding};
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::{self, cmd, Interest, Op};
use thynapse_protocol::{glob, DeliveryRule, Thid};
use tokio::sync::{mpsc, oneshot, Notify};
use zeromq::{SocketSend, ZmqMessage};

use crate::metrics::Metrics;
use crate::resp::write_push;
use crate::session::{self, ConnectPlan, Link, LinkEvent, Session, SessionKey};

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
pub struct Publishes {
    pub records: Bytes,
    pub count: usize,
    /// The tokens (reply slots on the client's connection) of the messages, in order, as
    /// runs (first, how many).
    pub tokens: Vec<(u64, u32)>,
    /// Whether any is an SPUBLISH (those go to their room's session).
    pub shard: bool,
    pub payload_bytes: usize,
}

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
    Publish(ClientId, Publishes),
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

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub mesh: String,
    pub service: String,
    pub name: String,
    pub rules: Vec<DeliveryRule>,
    pub rendezvous: Vec<String>,
    pub prefer: Option<String>,
    pub heartbeat: Duration,
    pub expiry: Duration,
    pub client_output_buffer_bytes: usize,
    pub resp: SocketAddr,
    pub metrics_url: String,
}

/// Publishes not yet acknowledged (all sessions) beyond which the hub stops taking new ones.
const MAX_UNACKED: usize = 16_384;
const MAX_UNACKED_BYTES: usize = 4 << 20;
/// Commands taken from the clients between two flushes at most.
const MAX_COMMANDS_PER_TURN: usize = 1024;
/// A subscription confirmation waits at most this many expiries for the mesh to know it
/// (the transmitter's own bound on a slow peer is one expiry).
const CONFIRM_BOUND_EXPIRIES: u32 = 2;
/// A room session with no subscription and nothing to acknowledge closes after this long.
const ROOM_IDLE: Duration = Duration::from_secs(30);

/// The cell's subscriptions, each with the clients that hold it.
#[derive(Default)]
struct Subscriptions {
    channels: HashMap<Bytes, HashSet<ClientId>>,
    patterns: HashMap<Bytes, HashSet<ClientId>>,
    shard: HashMap<Bytes, HashSet<ClientId>>,
}

impl Subscriptions {
    /// The subscriptions of one kind, and what the transmitter calls that kind.
    fn of(&mut self, kind: SubKind) -> (&mut HashMap<Bytes, HashSet<ClientId>>, Interest) {
        match kind {
            SubKind::Channel => (&mut self.channels, Interest::Channel),
            SubKind::Pattern => (&mut self.patterns, Interest::Pattern),
            SubKind::Shard => (&mut self.shard, Interest::ShardChannel),
        }
    }

    /// The clients a message on `channel` goes to, and as what.
    fn targets_of<'a>(
        &'a self,
        kind: Kind,
        channel: &[u8],
        targets: &mut Vec<(ClientId, Target<'a>)>,
    ) {
        match kind {
            Kind::Shard => {
                if let Some(set) = self.shard.get(channel) {
                    targets.extend(set.iter().map(|c| (*c, Target::Shard)));
                }
            }
            Kind::Mesh => {
                if let Some(set) = self.channels.get(channel) {
                    targets.extend(set.iter().map(|c| (*c, Target::Channel)));
                }
                for (pattern, set) in &self.patterns {
                    if glob::matches(pattern, channel) {
                        targets.extend(set.iter().map(|c| (*c, Target::Pattern(pattern))));
                    }
                }
            }
        }
    }
}

/// The session a subscription or publish of `kind` on `name` belongs to.
fn key_of(kind: SubKind, name: &[u8]) -> SessionKey {
    match kind {
        SubKind::Shard => Some(Bytes::copy_from_slice(room_of(name))),
        SubKind::Channel | SubKind::Pattern => None,
    }
}

pub struct Hub {
    cfg: HubConfig,
    id: Thid,
    metrics: Metrics,
    clients: HashMap<ClientId, ClientHandle>,
    subs: Subscriptions,
    /// Subscriptions not confirmed yet, by client, kind and name (how many of that
    /// client's confirmations are pending for it): messages for them are not written
    /// before their confirmation, as Redis never does.
    joining: HashMap<(ClientId, SubKind, Bytes), u32>,
    /// The subscriptions each pending confirmation (client, reply slot) covers.
    joins: HashMap<(ClientId, u64), (SubKind, Vec<Bytes>)>,
    sessions: HashMap<SessionKey, Session>,
    unacked: usize,
    unacked_bytes: usize,
    generation: u64,
    link_tx: mpsc::Sender<LinkEvent>,
    link_rx: mpsc::Receiver<LinkEvent>,
    seen: HashMap<Thid, SeqWindow>,
    /// The latency histogram, observed without atomics and flushed once per frame.
    latency: prometheus::local::LocalHistogram,
    /// Reused by every delivery: the pushes being written, and which is whose.
    pushes: Vec<Pushes>,
    push_index: HashMap<ClientId, usize>,
    ready_printed: bool,
    started: Instant,
}

/// Which kind of message a client gets for a delivery.
enum Target<'a> {
    Channel,
    Shard,
    Pattern(&'a Bytes),
}

/// The pushes being written for one client during a delivery.
struct Pushes {
    client: ClientId,
    resp3: bool,
    bytes: BytesMut,
    messages: u64,
    payload_bytes: u64,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn json_frame<T: serde::Serialize>(command: &[u8; 4], value: &T) -> ZmqMessage {
    ZmqMessage::from(CommandFrame::json(command, value).to_bytes())
}

fn binary_frame(command: &[u8; 4], body: Bytes) -> ZmqMessage {
    let mut m =
        ZmqMessage::from(CommandFrame::new(Encoding::Binary, command, Bytes::new()).to_bytes());
    m.push_back(body);
    m
}

/// A binary command with a JSON header in its command frame.
fn binary_frame_with<T: serde::Serialize>(
    command: &[u8; 4],
    header: &T,
    body: Bytes,
) -> ZmqMessage {
    let header = serde_json::to_vec(header).expect("protocol headers always serialise");
    let mut m = ZmqMessage::from(CommandFrame::new(Encoding::Binary, command, header).to_bytes());
    m.push_back(body);
    m
}

impl Hub {
    pub fn new(cfg: HubConfig, metrics: Metrics) -> Self {
        let (link_tx, link_rx) = mpsc::channel(1024);
        let id = Thid::random();
        let mut sessions = HashMap::new();
        sessions.insert(None, Session::new(id, None));
        Hub {
            cfg,
            id,
            latency: metrics.latency.local(),
            pushes: Vec::new(),
            push_index: HashMap::new(),
            metrics,
            clients: HashMap::new(),
            subs: Subscriptions::default(),
            joining: HashMap::new(),
            joins: HashMap::new(),
            sessions,
            unacked: 0,
            unacked_bytes: 0,
            generation: 0,
            link_tx,
            link_rx,
            seen: HashMap::new(),
            ready_printed: false,
            started: Instant::now(),
        }
    }

    fn window_full(&self) -> bool {
        self.unacked >= MAX_UNACKED || self.unacked_bytes >= MAX_UNACKED_BYTES
    }

    pub async fn run(mut self, mut cmds: mpsc::Receiver<HubCmd>, shutdown: Arc<Notify>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(ev) = self.link_rx.recv() => {
                    self.on_link(ev);
                    while let Ok(ev) = self.link_rx.try_recv() {
                        self.on_link(ev);
                    }
                }
                Some(c) = cmds.recv(), if !self.window_full() => {
                    self.on_cmd(c);
                    let mut n = 1;
                    while n < MAX_COMMANDS_PER_TURN && !self.window_full() {
                        match cmds.try_recv() {
                            Ok(c) => { self.on_cmd(c); n += 1; }
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => self.housekeeping().await,
                _ = shutdown.notified() => {
                    for s in self.sessions.values_mut() {
                        if let Some(link) = s.link.as_mut() {
                            let _ = link.sender.send(json_frame(cmd::QUIT, &serde_json::json!({}))).await;
                        }
                    }
                    return;
                }
            }
            self.flush().await;
        }
    }

    /// Queues publishes that include SPUBLISHes: each to its session (runs of one room,
    /// or of the mesh, with one session lookup).
    fn queue_each(&mut self, client: ClientId, p: &Publishes) {
        let messages = match decode_publish_records(&p.records) {
            Ok(m) => m,
            Err(e) => {
                // Written by this sidecar's own connection code: cannot happen.
                tracing::error!("unreadable publish records: {e}");
                return;
            }
        };
        let now = Instant::now();
        let mut tokens = p.tokens.iter().flat_map(|(t, n)| *t..*t + u64::from(*n));
        let mut current: Option<(SessionKey, &mut Session)> = None;
        for m in messages {
            let Some(token) = tokens.next() else { break };
            let room = (m.kind == Kind::Shard).then(|| room_of(m.channel));
            let same = current
                .as_ref()
                .is_some_and(|(key, _)| key.as_deref() == room);
            if !same {
                let key = room.map(Bytes::copy_from_slice);
                // The session is looked up again only when the run changes.
                self.session(&key);
                let s = self.sessions.get_mut(&key).expect("opened above");
                s.last_used = now;
                current = Some((key, s));
            }
            let (_, s) = current.as_mut().expect("set above");
            self.unacked_bytes += s.queue(client, token, &m);
        }
    }

    /// The session for `key`, opened (and its link sought) when it is new.
    fn session(&mut self, key: &SessionKey) -> &mut Session {
        if !self.sessions.contains_key(key) {
            let room = key
                .as_ref()
                .map(|r| String::from_utf8_lossy(r).into_owned());
            tracing::debug!(?room, "opening a room session");
            self.sessions
                .insert(key.clone(), Session::new(Thid::random(), room));
            self.metrics.rooms.set(self.sessions.len() as i64 - 1);
            self.start_connect(key.clone());
        }
        self.sessions.get_mut(key).expect("inserted above")
    }

    fn on_cmd(&mut self, c: HubCmd) {
        match c {
            HubCmd::Register(id, handle) => {
                self.clients.insert(id, handle);
                self.metrics.clients.set(self.clients.len() as i64);
            }
            HubCmd::Unregister(id) => self.remove_client(id),
            HubCmd::Admit(room, reply) => {
                let s = self.session(&Some(room));
                s.last_used = Instant::now();
                if s.admitted {
                    let _ = reply.send(Ok(()));
                } else {
                    s.waiting.push(reply);
                }
            }
            HubCmd::Subscribe {
                client,
                kind,
                names,
                token,
            } => {
                let Some(first) = names.first() else {
                    self.send_to(client, Out::Confirmed(token));
                    return;
                };
                let key = key_of(kind, first);
                for name in &names {
                    let (map, interest) = self.subs.of(kind);
                    let set = map.entry(name.clone()).or_default();
                    let first = set.is_empty();
                    set.insert(client);
                    if first {
                        let s = self.session(&key);
                        s.interest.push((Op::Add, interest, name.clone()));
                    }
                    *self
                        .joining
                        .entry((client, kind, name.clone()))
                        .or_default() += 1;
                }
                self.joins.insert((client, token), (kind, names));
                self.update_subscription_gauge();
                let s = self.session(&key);
                // With no link, the next one's snapshot is what makes them known.
                let pending = !s.interest.is_empty() || s.link.is_none();
                if s.confirm.wait(client, token, pending, Instant::now()) {
                    self.confirmed(client, token);
                }
            }
            HubCmd::Unsubscribe {
                client,
                kind,
                names,
                token,
            } => {
                for name in names {
                    self.unsubscribe(client, kind, &name);
                }
                self.update_subscription_gauge();
                self.send_to(client, Out::Confirmed(token));
            }
            HubCmd::Publish(client, p) => {
                let now = Instant::now();
                if p.shard {
                    self.queue_each(client, &p);
                } else {
                    // All for the mesh session: one copy of all the records.
                    let s = self.session(&None);
                    s.last_used = now;
                    s.queue_records(client, &p.records, p.count, &p.tokens);
                    self.unacked_bytes += p.records.len();
                }
                self.unacked += p.count;
                self.metrics.messages_in.inc_by(p.count as u64);
                self.metrics.bytes_in.inc_by(p.payload_bytes as u64);
            }
            HubCmd::Channels(kind, pattern, reply) => {
                let mut names: Vec<Bytes> = self
                    .subs
                    .of(kind)
                    .0
                    .keys()
                    .filter(|c| pattern.as_ref().is_none_or(|p| glob::matches(p, c)))
                    .cloned()
                    .collect();
                names.sort();
                let _ = reply.send(names);
            }
            HubCmd::NumSub(kind, names, reply) => {
                let map = self.subs.of(kind).0;
                let counts = names
                    .iter()
                    .map(|n| map.get(n).map_or(0, |s| s.len() as i64))
                    .collect();
                let _ = reply.send(counts);
            }
            HubCmd::NumPat(reply) => {
                let _ = reply.send(self.subs.patterns.values().map(|s| s.len() as i64).sum());
            }
            HubCmd::Info(reply) => {
                let mesh = self.sessions.get(&None).and_then(|s| s.link.as_ref());
                let _ = reply.send(HubInfo {
                    run_id: self.id.to_string(),
                    transmitter: mesh.map(|l| l.name.clone()),
                    channels: self.subs.channels.len(),
                    patterns: self.subs.patterns.len(),
                    shard_channels: self.subs.shard.len(),
                });
            }
            HubCmd::Protocol(client, resp3) => {
                if let Some(h) = self.clients.get_mut(&client) {
                    h.resp3 = resp3;
                }
            }
        }
    }

    /// A client's subscriptions in slot `token` are known mesh-wide (or given up on):
    /// its confirmations go out, and from then on its messages.
    fn confirmed(&mut self, client: ClientId, token: u64) {
        if let Some((kind, names)) = self.joins.remove(&(client, token)) {
            for name in names {
                let key = (client, kind, name);
                if let Some(n) = self.joining.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.joining.remove(&key);
                    }
                }
            }
        }
        self.send_to(client, Out::Confirmed(token));
    }

    fn unsubscribe(&mut self, client: ClientId, kind: SubKind, name: &Bytes) {
        let (map, interest) = self.subs.of(kind);
        if let Some(set) = map.get_mut(name) {
            if set.remove(&client) && set.is_empty() {
                map.remove(name);
                if let Some(s) = self.sessions.get_mut(&key_of(kind, name)) {
                    s.interest.push((Op::Remove, interest, name.clone()));
                    s.last_used = Instant::now();
                }
            }
        }
    }

    fn update_subscription_gauge(&self) {
        let s = &self.subs;
        self.metrics
            .subscriptions
            .set((s.channels.len() + s.patterns.len() + s.shard.len()) as i64);
    }

    fn remove_client(&mut self, id: ClientId) {
        if self.clients.remove(&id).is_none() {
            return;
        }
        self.joins.retain(|(client, _), _| *client != id);
        self.joining.retain(|(client, _, _), _| *client != id);
        for kind in [SubKind::Channel, SubKind::Pattern, SubKind::Shard] {
            let names: Vec<Bytes> = self
                .subs
                .of(kind)
                .0
                .iter()
                .filter(|(_, s)| s.contains(&id))
                .map(|(n, _)| n.clone())
                .collect();
            for name in names {
                self.unsubscribe(id, kind, &name);
            }
        }
        self.metrics.clients.set(self.clients.len() as i64);
        self.update_subscription_gauge();
    }

    /// Queues `out` for a client, or disconnects it when its queue is over the limit
    /// (Redis' `client-output-buffer-limit pubsub` policy): a slow subscriber loses its
    /// connection, never the other clients their messages.
    fn send_to(&mut self, client: ClientId, out: Out) -> bool {
        let Some(h) = self.clients.get(&client) else {
            return false;
        };
        let size = out.size();
        if h.queued.load(Ordering::Relaxed) + size > self.cfg.client_output_buffer_bytes {
            self.metrics
                .drops
                .with_label_values(&["slow_subscriber"])
                .inc();
            self.metrics
                .disconnects
                .with_label_values(&["slow_subscriber"])
                .inc();
            tracing::warn!(
                client,
                "client output buffer over {} bytes: disconnecting it",
                self.cfg.client_output_buffer_bytes
            );
            h.killed.store(true, Ordering::Relaxed);
            h.kill.notify_one();
            self.remove_client(client);
            return false;
        }
        h.queued.fetch_add(size, Ordering::Relaxed);
        h.tx.send(out).is_ok()
    }

    /// Starts a task that finds a transmitter for the session and links to it.
    fn start_connect(&mut self, key: SessionKey) {
        self.generation += 1;
        let generation = self.generation;
        let wait_for_preferred = !self.ready_printed && self.started.elapsed() < self.cfg.expiry;
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        if s.connecting.is_some() {
            return;
        }
        s.connecting = Some(generation);
        let plan = ConnectPlan {
            key: key.clone(),
            generation,
            mesh: self.cfg.mesh.clone(),
            rendezvous: self.cfg.rendezvous.clone(),
            heartbeat: self.cfg.heartbeat,
            expiry: self.cfg.expiry,
            avoid: s.avoid.clone(),
            prefer: if key.is_none() {
                self.cfg.prefer.clone()
            } else {
                None
            },
            wait_for_preferred,
            spread: {
                let mix = Thid::of_parts(&[&self.id.0, key.as_deref().unwrap_or_default()]);
                u64::from_le_bytes(mix.0[..8].try_into().expect("8 bytes"))
            },
        };
        tokio::spawn(session::connect(plan, self.link_tx.clone()));
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Admitted(key, generation) => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    if s.connecting == Some(generation) {
                        s.admit(Ok(()));
                    }
                }
            }
            LinkEvent::Failed {
                key,
                generation,
                refused,
                avoid,
            } => self.on_failed(key, generation, refused, avoid),
            LinkEvent::Connected {
                key,
                generation,
                name,
                sender,
            } => self.on_connected(key, generation, name, sender),
            LinkEvent::Closed(key, generation) => {
                let Some(s) = self.sessions.get_mut(&key) else {
                    return;
                };
                if s.link.as_ref().is_some_and(|l| l.generation == generation) {
                    let name = s.link.take().map(|l| l.name).unwrap_or_default();
                    tracing::warn!(transmitter = %name, room = ?s.room, "link to transmitter closed");
                    s.avoid = vec![name];
                    self.start_connect(key);
                }
            }
            LinkEvent::Message(key, generation, msg) => self.on_message(key, generation, msg),
        }
    }

    fn on_failed(
        &mut self,
        key: SessionKey,
        generation: u64,
        refused: Option<String>,
        avoid: Option<String>,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        if s.connecting != Some(generation) {
            return;
        }
        s.connecting = None;
        if let Some(name) = avoid {
            s.avoid = vec![name];
        }
        match refused {
            Some(error) if key.is_some() => {
                tracing::warn!(room = ?s.room, "room refused: {error}");
                let mut s = self.sessions.remove(&key).expect("present");
                s.admit(Err(error.clone()));
                let mut released = Vec::new();
                s.confirm.release_all(&mut released);
                for (client, token) in released {
                    self.confirmed(client, token);
                }
                let (replies, messages, bytes) = s.abandon();
                self.unacked -= messages;
                self.unacked_bytes -= bytes;
                for (client, first, n) in replies {
                    for token in first..first + u64::from(n) {
                        let result = Err(error.clone());
                        self.send_to(client, Out::Published { token, result });
                    }
                }
                self.metrics.rooms.set(self.sessions.len() as i64 - 1);
            }
            // The rendezvous did not answer in time: subscribers go ahead (as Redis
            // subscriptions always do) and the session attaches as soon as it can.
            _ => s.admit(Ok(())),
        }
    }

    /// A new link: HELO, every subscription of the session, then (at the next flush)
    /// every publish not yet acknowledged.
    fn on_connected(
        &mut self,
        key: SessionKey,
        generation: u64,
        name: String,
        sender: zeromq::DealerSendHalf,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        if s.connecting != Some(generation) {
            return;
        }
        s.connecting = None;
        let hello = wire::Hello {
            id: s.id,
            service: self.cfg.service.clone(),
            rules: self.cfg.rules.clone(),
            events: wire::Events::Dealer,
            token: None,
            room: s.room.clone(),
        };
        let mut msgs = vec![json_frame(cmd::HELO, &hello)];
        let subs: Vec<(Op, Interest, &[u8])> = match &key {
            None => self
                .subs
                .channels
                .keys()
                .map(|c| (Op::Add, Interest::Channel, &c[..]))
                .chain(
                    self.subs
                        .patterns
                        .keys()
                        .map(|p| (Op::Add, Interest::Pattern, &p[..])),
                )
                .collect(),
            Some(room) => self
                .subs
                .shard
                .keys()
                .filter(|c| room_of(c) == &room[..])
                .map(|c| (Op::Add, Interest::ShardChannel, &c[..]))
                .collect(),
        };
        // The snapshot confirms every subscription held so far on this new link.
        if !subs.is_empty() || s.confirm.any_waiting() {
            let sync = wire::SubsSync {
                sync: Some(s.confirm.next_number()),
            };
            msgs.push(binary_frame_with(
                cmd::SUBS,
                &sync,
                wire::encode_interest(subs),
            ));
        }
        // Changes queued for the old link are part of the snapshot just sent.
        s.interest.clear();
        s.unsent_from = 0;
        if key.is_none() && self.ready_printed {
            self.metrics.reconnects.inc();
        }
        s.link = Some(Link {
            generation,
            name,
            sender,
            last_heard: Instant::now(),
            credit: Default::default(),
            greeting: msgs,
        });
    }

    fn on_message(&mut self, key: SessionKey, generation: u64, msg: ZmqMessage) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let is_current = s.link.as_ref().is_some_and(|l| l.generation == generation);
        let link = if is_current {
            s.link.as_mut()
        } else {
            s.old_link
                .as_mut()
                .filter(|(l, _)| l.generation == generation)
                .map(|(l, _)| l)
        };
        let Some(link) = link else { return };
        link.last_heard = Instant::now();
        let Some(frame) = msg.get(0).and_then(|f| CommandFrame::parse(f).ok()) else {
            tracing::warn!("unreadable frame from the transmitter");
            return;
        };
        match &frame.cmd {
            cmd::DLVR => {
                let Some(body) = msg.get(1).cloned() else {
                    return;
                };
                match decode_envelopes(&body) {
                    Ok((batch, envelopes)) => {
                        link.credit.received(batch, body.len());
                        self.deliver(envelopes, body.len());
                    }
                    Err(e) => tracing::warn!("bad DLVR batch: {e}"),
                }
            }
            cmd::ACKS => {
                let Some(body) = msg.get(1).cloned() else {
                    return;
                };
                if let Ok((first, counts)) = decode_acks(&body) {
                    self.acknowledge(&key, first, &counts);
                }
            }
            cmd::WLCM => {
                if let Ok(w) = frame.decode_json::<wire::Welcome>() {
                    if key.is_some() {
                        tracing::debug!(transmitter = %w.name, room = ?s.room, "room session linked");
                        return;
                    }
                    tracing::info!(transmitter = %w.name, "connected to transmitter");
                    let info = serde_json::json!({"transmitter": w.name, "resp": self.cfg.resp.to_string(), "metrics": self.cfg.metrics_url, "id": self.id});
                    if !self.ready_printed {
                        self.ready_printed = true;
                        println!("READY {info}");
                    } else {
                        println!("MOVED {info}");
                    }
                }
            }
            cmd::MOVE if is_current => {
                tracing::info!(room = ?s.room, "transmitter asks this session to move");
                if let Some(link) = s.link.take() {
                    s.avoid = vec![link.name.clone()];
                    // Keep reading the old link for one expiry: peers learn where this
                    // session went before the old transmitter stops delivering to it.
                    s.old_link = Some((link, Instant::now() + self.cfg.expiry));
                }
                self.start_connect(key);
            }
            cmd::SUBD if is_current => {
                if let Ok(wire::SubsSync { sync: Some(n) }) = frame.decode_json() {
                    let mut released = Vec::new();
                    s.confirm.confirm(n, &mut released);
                    for (client, token) in released {
                        self.confirmed(client, token);
                    }
                }
            }
            cmd::ERRR => tracing::warn!(
                "transmitter error: {}",
                String::from_utf8_lossy(&frame.payload)
            ),
            _ => {}
        }
    }

    fn acknowledge(&mut self, key: &SessionKey, first: u64, counts: &[u32]) {
        let mut done = Vec::new();
        if let Some(s) = self.sessions.get_mut(key) {
            let (messages, bytes) = s.acknowledge(first, counts, &mut done);
            self.unacked -= messages;
            self.unacked_bytes -= bytes;
        }
        // One hand-over per client and acknowledgement frame, not one per publish.
        let mut i = 0;
        while i < done.len() {
            let client = done[i].0;
            let mut acks = Vec::new();
            while i < done.len() && done[i].0 == client {
                acks.push((done[i].1, done[i].2 as i64));
                i += 1;
            }
            self.send_to(client, Out::Acked(acks));
        }
    }

    /// Hands the messages of one DLVR frame to the clients subscribed to them, written
    /// straight from the frame into each client's pushes.
    fn deliver(&mut self, envelopes: Envelopes, frame_len: usize) {
        let now = now_us();
        if self.seen.len() > 100_000 {
            self.seen.clear();
        }
        // Each client's pushes in one buffer, handed over once per frame.
        let mut pushes = std::mem::take(&mut self.pushes);
        let mut index = std::mem::take(&mut self.push_index);
        let mut last: Option<(Thid, &mut SeqWindow)> = None;
        let mut targets: Vec<(ClientId, Target)> = Vec::new();
        let mut routed_for: Option<(Kind, &[u8])> = None;
        for e in envelopes {
            // Frames mostly carry runs from one origin: look its window up once per run.
            if last.as_ref().is_none_or(|(origin, _)| *origin != e.origin) {
                last = Some((e.origin, self.seen.entry(e.origin).or_default()));
            }
            let (_, window) = last.as_mut().expect("set above");
            if !window.accept(e.seq) {
                self.metrics.duplicates.inc();
                continue;
            }
            self.latency.observe(now.saturating_sub(e.ts) as f64 / 1e6);
            // Frames mostly carry runs of one channel: its clients are found once per run.
            let same_channel = routed_for
                .as_ref()
                .is_some_and(|(kind, channel)| *kind == e.kind && *channel == e.channel);
            if !same_channel {
                routed_for = Some((e.kind, e.channel));
                targets.clear();
                self.subs.targets_of(e.kind, e.channel, &mut targets);
                if !self.joining.is_empty() {
                    let joining = &self.joining;
                    targets.retain(|(client, target)| {
                        let (kind, name) = match target {
                            Target::Channel => (SubKind::Channel, e.channel),
                            Target::Shard => (SubKind::Shard, e.channel),
                            Target::Pattern(p) => (SubKind::Pattern, &p[..]),
                        };
                        !joining.contains_key(&(*client, kind, Bytes::copy_from_slice(name)))
                    });
                }
            }
            for (client, target) in &targets {
                let i = match index.get(client) {
                    Some(&i) => i,
                    None => {
                        let Some(h) = self.clients.get(client) else {
                            continue;
                        };
                        index.insert(*client, pushes.len());
                        pushes.push(Pushes {
                            client: *client,
                            resp3: h.resp3,
                            // Pushes take about as much room as the frame's records.
                            bytes: BytesMut::with_capacity(frame_len),
                            messages: 0,
                            payload_bytes: 0,
                        });
                        pushes.len() - 1
                    }
                };
                let p = &mut pushes[i];
                match target {
                    Target::Channel => {
                        write_push(&mut p.bytes, p.resp3, &[b"message", e.channel, e.payload])
                    }
                    Target::Shard => {
                        write_push(&mut p.bytes, p.resp3, &[b"smessage", e.channel, e.payload])
                    }
                    Target::Pattern(pattern) => write_push(
                        &mut p.bytes,
                        p.resp3,
                        &[b"pmessage", pattern, e.channel, e.payload],
                    ),
                }
                p.messages += 1;
                p.payload_bytes += e.payload.len() as u64;
            }
        }
        self.latency.flush();
        index.clear();
        self.push_index = index;
        for p in pushes.drain(..) {
            let out = Out::Pushes {
                resp3: p.resp3,
                bytes: p.bytes.freeze(),
            };
            if self.send_to(p.client, out) {
                self.metrics.messages_out.inc_by(p.messages);
                self.metrics.bytes_out.inc_by(p.payload_bytes);
            }
        }
        self.pushes = pushes;
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        let mut reconnect = Vec::new();
        let mut idle = Vec::new();
        let mut released = Vec::new();
        for (key, s) in self.sessions.iter_mut() {
            let expired =
                s.confirm
                    .expire(now, CONFIRM_BOUND_EXPIRIES * self.cfg.expiry, &mut released);
            if expired > 0 {
                tracing::warn!(room = ?s.room, expired, "subscriptions confirmed before the mesh knew them (transmitter unreachable or slow)");
                self.metrics.confirm_timeouts.inc_by(expired as u64);
            }
            if let Some((old, until)) = s.old_link.as_mut() {
                if now >= *until {
                    let _ = old
                        .sender
                        .send(json_frame(cmd::QUIT, &serde_json::json!({})))
                        .await;
                    s.old_link = None;
                }
            }
            if let Some(link) = s.link.as_mut() {
                if now.duration_since(link.last_heard) > self.cfg.expiry {
                    tracing::warn!(transmitter = %link.name, room = ?s.room, "transmitter silent; moving");
                    s.avoid = vec![link.name.clone()];
                    s.link = None;
                } else {
                    credit(link, true).await;
                    let _ = link
                        .sender
                        .send(json_frame(cmd::PING, &serde_json::json!({})))
                        .now_or_never();
                }
            }
            if let Some(room) = key {
                let unused = s.settled()
                    && s.waiting.is_empty()
                    && !s.confirm.any_waiting()
                    && !self.subs.shard.keys().any(|c| room_of(c) == &room[..]);
                if unused && now.duration_since(s.last_used) > ROOM_IDLE {
                    idle.push(key.clone());
                    continue;
                }
            }
            if s.link.is_none() && s.connecting.is_none() {
                reconnect.push(key.clone());
            }
        }
        for (client, token) in released {
            self.confirmed(client, token);
        }
        for key in idle {
            if let Some(mut s) = self.sessions.remove(&key) {
                tracing::debug!(room = ?s.room, "closing an idle room session");
                if let Some(link) = s.link.as_mut() {
                    let _ = link
                        .sender
                        .send(json_frame(cmd::QUIT, &serde_json::json!({})))
                        .await;
                }
            }
            self.metrics.rooms.set(self.sessions.len() as i64 - 1);
        }
        for key in reconnect {
            self.start_connect(key);
        }
    }

    async fn flush(&mut self) {
        for s in self.sessions.values_mut() {
            if let Some((old, _)) = s.old_link.as_mut() {
                credit(old, true).await;
            }
            if s.link.is_some() {
                s.close();
            }
            let Some(link) = s.link.as_mut() else {
                continue;
            };
            for m in std::mem::take(&mut link.greeting) {
                let _ = link.sender.send(m).await;
            }
            if !s.interest.is_empty() {
                let body =
                    wire::encode_interest(s.interest.iter().map(|(op, k, n)| (*op, *k, &n[..])));
                s.interest.clear();
                let sync = wire::SubsSync {
                    sync: Some(s.confirm.next_number()),
                };
                let _ = link
                    .sender
                    .send(binary_frame_with(cmd::SUBS, &sync, body))
                    .await;
            }
            while s.unsent_from < s.unacked.len() {
                let batch = &s.unacked[s.unsent_from];
                let mut m = binary_frame(
                    cmd::PUBS,
                    Bytes::copy_from_slice(&batch.first_seq.to_le_bytes()),
                );
                for part in &batch.parts {
                    m.push_back(part.clone());
                }
                if link.sender.send(m).await.is_err() {
                    break;
                }
                s.unsent_from += 1;
            }
            credit(link, false).await;
        }
    }
}

/// Sends the credit owed on `link` if enough is (or anything is, when `all`).
async fn credit(link: &mut Link, all: bool) {
    if let Some(batch) = link.credit.take(all) {
        let _ = link
            .sender
            .send(json_frame(cmd::CRED, &wire::Credit { batch }))
            .await;
    }
}
