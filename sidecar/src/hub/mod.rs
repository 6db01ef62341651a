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
//! buffer per client, which its connection writes as it is (`delivery`). The sessions'
//! links are `links`; what clients and the hub say to each other is `crate::api`.

mod delivery;
mod links;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
// foldhash: a fast, seeded hasher (the per-message maps are keyed by ids and channel
// names; SipHash was a visible share of the hot path).
use foldhash::{HashMap, HashMapExt};
use thynapse_protocol::batch::{decode_publish_records, Kind};
use thynapse_protocol::dedup::Origins;
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::Op;
use thynapse_protocol::{glob, DeliveryRule, Thid};
use tokio::sync::{mpsc, Notify};
use zeromq::ZmqMessage;

pub use crate::api::{ClientHandle, ClientId, ClientPublishes, HubCmd, HubInfo, Out, SubKind};
use crate::metrics::Metrics;
use crate::session::{LinkEvent, Session, SessionKey, Via};
use delivery::{Pushes, Subscriptions};

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
    pub max_message_bytes: usize,
    /// How long SIGTERM waits for the publishes taken to be acknowledged.
    pub drain: Duration,
    pub resp: SocketAddr,
    pub metrics_url: String,
    /// The mesh session's subscription bytes, shared with the connections (`Shared`).
    pub interest_bytes: Arc<AtomicUsize>,
    /// This cell's Service key, when the mesh is authenticated: every link proves it.
    pub service_key: Option<thynapse_protocol::auth::Key>,
    /// What the key proves: the Service and its permissions
    /// (`thynapse_protocol::permissions::Permissions::identity`).
    pub identity: String,
    /// Every link asks to be encrypted (`--encrypt`).
    pub encrypt: bool,
}

/// Publishes not yet acknowledged (all sessions) beyond which the hub stops taking new ones.
/// Within the receivers' duplicate window (a resend from further back would be dropped
/// there as a copy), with room for the 256 publishes one command may add past the check.
const MAX_UNACKED: usize = thynapse_protocol::dedup::WINDOW as usize - 256;
const MAX_UNACKED_BYTES: usize = 4 << 20;
/// How long an origin's duplicate window is kept after it was last heard (one to two of
/// these, or twenty expiries if longer): resends come within a few expiries of a move.
const ORIGIN_MEMORY: Duration = Duration::from_secs(60);
/// Commands taken from the clients between two flushes at most.
const MAX_COMMANDS_PER_TURN: usize = 1024;
/// A subscription confirmation waits at most this many expiries for the mesh to know it
/// (the transmitter's own bound on a slow peer is one expiry).
pub(super) const CONFIRM_BOUND_EXPIRIES: u32 = 2;
/// A room session with no subscription and nothing to acknowledge closes after this long.
pub(super) const ROOM_IDLE: Duration = Duration::from_secs(30);

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
    /// client's confirmations are pending for it): messages for them are written after
    /// their confirmation, as Redis does.
    joining: HashMap<(ClientId, SubKind, Bytes), u32>,
    /// The subscriptions each pending confirmation (client, reply slot) covers.
    joins: HashMap<(ClientId, u64), (SubKind, Vec<Bytes>)>,
    /// Messages of joining subscriptions, per client: written once its confirmations are,
    /// so a message the mesh counted as delivered is not lost for being early.
    held_pushes: HashMap<ClientId, Pushes>,
    sessions: HashMap<SessionKey, Session>,
    unacked: usize,
    unacked_bytes: usize,
    generation: u64,
    link_tx: mpsc::Sender<LinkEvent>,
    link_rx: mpsc::Receiver<LinkEvent>,
    /// Per origin, the sequence numbers delivered (copies are dropped).
    seen: Origins,
    /// The latency histogram, observed without atomics and flushed once per frame.
    latency: prometheus::local::LocalHistogram,
    /// Reused by every delivery: the pushes being written, and which is whose.
    pushes: Vec<Pushes>,
    push_index: HashMap<ClientId, usize>,
    ready_printed: bool,
    /// Stopping until then at the latest: commands are answered but nothing new is taken
    /// (see `run`).
    drain_until: Option<Instant>,
    started: Instant,
    /// Reused by every flush: what the sessions send, and on which link.
    outbox: Vec<(Via, ZmqMessage)>,
}

impl Hub {
    pub fn new(cfg: HubConfig, metrics: Metrics) -> Self {
        let (link_tx, link_rx) = mpsc::channel(1024);
        let id = Thid::random();
        let mut sessions = HashMap::new();
        sessions.insert(None, Session::new(id, None));
        let seen = Origins::new(ORIGIN_MEMORY.max(20 * cfg.expiry), Instant::now());
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
            held_pushes: HashMap::new(),
            sessions,
            unacked: 0,
            unacked_bytes: 0,
            generation: 0,
            link_tx,
            link_rx,
            seen,
            ready_printed: false,
            started: Instant::now(),
            drain_until: None,
            outbox: Vec::new(),
        }
    }

    fn draining(&self) -> bool {
        self.drain_until.is_some()
    }

    fn window_full(&self) -> bool {
        self.unacked >= MAX_UNACKED || self.unacked_bytes >= MAX_UNACKED_BYTES
    }

    /// Whether the next command of a client is taken now: not while the publishes not
    /// acknowledged fill the window (unless stopping: then each is answered at once).
    fn takes_commands(&self) -> bool {
        self.draining() || !self.window_full()
    }

    /// Runs until `shutdown`, then drains: takes no new publishes or subscriptions (each
    /// answered at once, a publish with an error), and returns once every publish taken
    /// is acknowledged and its answer handed to its connection, or `drain` passed.
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
                Some(c) = cmds.recv(), if self.takes_commands() => {
                    self.on_cmd(c);
                    let mut n = 1;
                    while n < MAX_COMMANDS_PER_TURN && self.takes_commands() {
                        match cmds.try_recv() {
                            Ok(c) => { self.on_cmd(c); n += 1; }
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => self.housekeeping(Instant::now()).await,
                _ = shutdown.notified(), if !self.draining() => {
                    tracing::info!(unacknowledged = self.unacked, "stopping: draining publishes");
                    self.drain_until = Some(Instant::now() + self.cfg.drain);
                }
            }
            self.flush().await;
            if let Some(until) = self.drain_until {
                // Acknowledged, and every answer taken by its connection to write.
                let drained = self.unacked == 0
                    && self
                        .clients
                        .values()
                        .all(|h| h.queued.load(Ordering::Relaxed) == 0);
                if drained || Instant::now() >= until {
                    if !drained {
                        tracing::warn!(
                            unacknowledged = self.unacked,
                            "stopping with publishes not acknowledged (their clients get no reply)"
                        );
                    }
                    for s in self.sessions.values_mut() {
                        let last = s.goodbye();
                        if let Some(link) = s.sender(Via::Current) {
                            for m in last {
                                let _ = link.send(m).await;
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Queues publishes that include SPUBLISHes: each to its session (runs of one room,
    /// or of the mesh, with one session lookup).
    fn queue_each(&mut self, client: ClientId, p: &ClientPublishes) {
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
            HubCmd::Publish(client, p) if self.draining() => {
                // Stopping: not taken, and said so, so the client knows.
                for (first, n) in p.tokens {
                    for token in first..first + u64::from(n) {
                        let result = Err("sidecar stopping: not published".to_string());
                        self.send_to(client, Out::Published { token, result });
                    }
                }
            }
            HubCmd::Admit(_, reply) if self.draining() => {
                let _ = reply.send(Err("sidecar stopping".into()));
            }
            HubCmd::Subscribe { client, token, .. } if self.draining() => {
                self.send_to(client, Out::Confirmed(token));
            }
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
                        if kind != SubKind::Shard {
                            self.cfg
                                .interest_bytes
                                .fetch_add(name.len() + 6, Ordering::Relaxed);
                        }
                        let s = self.session(&key);
                        s.change_interest(Op::Add, interest, name.clone());
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
                let pending = s.interest_unsent();
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
                let mesh = self.sessions.get(&None).and_then(|s| s.transmitter());
                let _ = reply.send(HubInfo {
                    run_id: self.id.to_string(),
                    transmitter: mesh.map(str::to_owned),
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
        if !self.joining.keys().any(|(c, _, _)| *c == client) {
            if let Some(p) = self.held_pushes.remove(&client) {
                p.send(self);
            }
        }
    }

    fn unsubscribe(&mut self, client: ClientId, kind: SubKind, name: &Bytes) {
        let (map, interest) = self.subs.of(kind);
        if let Some(set) = map.get_mut(name) {
            if set.remove(&client) && set.is_empty() {
                map.remove(name);
                if kind != SubKind::Shard {
                    self.cfg
                        .interest_bytes
                        .fetch_sub(name.len() + 6, Ordering::Relaxed);
                }
                if let Some(s) = self.sessions.get_mut(&key_of(kind, name)) {
                    s.change_interest(Op::Remove, interest, name.clone());
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
        self.held_pushes.remove(&id);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    use bytes::BytesMut;
    use thynapse_protocol::batch::{decode_envelopes, put_publish, EnvelopeBatchWriter};
    use thynapse_protocol::dedup::{SeqWindow, WINDOW};
    use thynapse_protocol::wire::cmd;
    use zeromq::Socket;

    use crate::frames::bare_frame;

    fn hub(expiry: Duration, output_limit: usize) -> Hub {
        let cfg = HubConfig {
            mesh: "m".into(),
            service: "s".into(),
            name: "cell".into(),
            rules: Vec::new(),
            rendezvous: vec!["udp://127.0.0.1:9".into()],
            prefer: None,
            heartbeat: expiry / 3,
            expiry,
            client_output_buffer_bytes: output_limit,
            max_message_bytes: 1 << 20,
            drain: Duration::from_secs(1),
            resp: "127.0.0.1:6379".parse().unwrap(),
            metrics_url: String::new(),
            interest_bytes: Arc::default(),
            service_key: None,
            identity: "s".into(),
            encrypt: false,
        };
        Hub::new(cfg, Metrics::new())
    }

    /// A client of the hub: what it is handed, and whether it was disconnected.
    struct Client {
        rx: tokio::sync::mpsc::UnboundedReceiver<Out>,
        killed: Arc<AtomicBool>,
    }

    impl Client {
        fn received(&mut self) -> Vec<Out> {
            std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
        }
    }

    fn client(hub: &mut Hub, id: ClientId) -> Client {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let killed = Arc::new(AtomicBool::new(false));
        let handle = ClientHandle {
            tx,
            resp3: false,
            queued: Arc::default(),
            killed: killed.clone(),
            kill: Arc::default(),
        };
        hub.on_cmd(HubCmd::Register(id, handle));
        Client { rx, killed }
    }

    /// One read's `n` PUBLISHes of `payload` bytes on channel `c`, from reply slot `token`.
    fn publishes(n: usize, payload: usize, token: u64) -> ClientPublishes {
        let mut records = BytesMut::new();
        for _ in 0..n {
            put_publish(&mut records, Kind::Mesh, 0, b"c", &vec![7; payload]);
        }
        ClientPublishes {
            records: records.freeze(),
            count: n,
            tokens: vec![(token, n as u32)],
            shard: false,
            payload_bytes: n * payload,
            queued: None,
        }
    }

    fn subscribe(hub: &mut Hub, client: ClientId, kind: SubKind, name: &str, token: u64) {
        hub.on_cmd(HubCmd::Subscribe {
            client,
            kind,
            names: vec![Bytes::copy_from_slice(name.as_bytes())],
            token,
        });
    }

    /// A `DLVR` frame from the transmitter: `payloads` on `channel`, from a new origin.
    fn deliver(hub: &mut Hub, channel: &[u8], payloads: &[&[u8]]) {
        let origin = Thid::random();
        let mut batch = EnvelopeBatchWriter::default();
        for (i, p) in payloads.iter().enumerate() {
            batch.push(Kind::Mesh, &origin, 1 + i as u64, 0, channel, p, &[]);
        }
        let frame = batch.finish(1);
        let (_, envelopes) = decode_envelopes(&frame).unwrap();
        hub.deliver(envelopes, frame.len());
    }

    #[test]
    fn the_hub_stops_taking_publishes_at_16128_unacknowledged() {
        let mut hub = hub(Duration::from_secs(3), 32 << 20);
        // Reads of 256 publishes, the most one command carries.
        let mut token = 0;
        while hub.takes_commands() {
            hub.on_cmd(HubCmd::Publish(1, publishes(256, 10, token)));
            token += 256;
            assert!(token < 1 << 20, "never full");
        }
        assert_eq!(hub.unacked, 16_128, "taken while under 16,128");
        // Acknowledged, they leave the window: it takes publishes again.
        hub.sessions.get_mut(&None).unwrap().close();
        hub.acknowledge(&None, 1, &[1; 1024]);
        assert_eq!(hub.unacked, 16_128 - 1024);
        assert!(hub.takes_commands());

        // Just under, one more command is taken, and it may add 256.
        let mut hub = self::hub(Duration::from_secs(3), 32 << 20);
        fill_to_the_most(&mut hub);
        assert_eq!(hub.unacked, 16_127 + 256);
        assert!(
            (hub.unacked as u64) < WINDOW,
            "within the receivers' duplicate window"
        );
    }

    /// Fills the hub's window as far as it goes: one publish short of the bound, then one
    /// more command of 256.
    fn fill_to_the_most(hub: &mut Hub) {
        for token in 0..16_127 / 256 {
            hub.on_cmd(HubCmd::Publish(1, publishes(256, 10, token * 256)));
        }
        hub.on_cmd(HubCmd::Publish(1, publishes(16_127 % 256, 10, 0)));
        assert_eq!(hub.unacked, 16_127);
        assert!(hub.takes_commands());
        hub.on_cmd(HubCmd::Publish(1, publishes(256, 10, 0)));
        assert!(!hub.takes_commands());
    }

    #[test]
    fn the_hub_stops_taking_publishes_at_4_mib_unacknowledged() {
        let mut hub = hub(Duration::from_secs(3), 32 << 20);
        let mut before = 0;
        let mut token = 0;
        while hub.takes_commands() {
            before = hub.unacked_bytes;
            hub.on_cmd(HubCmd::Publish(1, publishes(64, 1000, token)));
            token += 64;
        }
        assert!(before < 4 << 20 && hub.unacked_bytes >= 4 << 20);
        assert!(hub.unacked < 16_128 / 2, "bytes, not messages, stopped it");
    }

    #[tokio::test]
    async fn a_resend_from_the_far_end_of_a_full_window_is_delivered_once() {
        let mut hub = hub(Duration::from_secs(3), 32 << 20);
        fill_to_the_most(&mut hub);
        // What it sends a new transmitter after a move: every publish not acknowledged.
        let s = hub.sessions.get_mut(&None).unwrap();
        assert!(s.begin_connect(1).is_some());
        let (sender, _) = thynapse_link::split(zeromq::DealerSocket::new(), None);
        assert!(s.linked(1, "t2".into(), sender, bare_frame(cmd::HELO), Vec::new()));
        let mut out = Vec::new();
        s.outgoing(&mut out);
        let mut seqs = Vec::new();
        for (_, m) in &out[1..] {
            let first = u64::from_le_bytes(m.get(1).unwrap()[..8].try_into().unwrap());
            let count: usize = (2..m.len())
                .map(|i| decode_publish_records(m.get(i).unwrap()).unwrap().count())
                .sum();
            seqs.extend(first..first + count as u64);
        }
        assert_eq!(seqs.len(), hub.unacked);
        let (oldest, newest) = (seqs[0], *seqs.last().unwrap());
        // A receiver saw the newest (through the new transmitter) before the oldest's resend.
        let mut receiver = SeqWindow::default();
        assert!(receiver.accept(newest));
        assert!(receiver.accept(oldest), "the oldest resend is delivered");
        assert!(!receiver.accept(oldest), "and a copy of it dropped");
    }

    #[tokio::test]
    async fn what_is_read_on_a_link_silent_past_the_expiry_is_dropped_and_counted() {
        use thynapse_protocol::batch::{EnvelopeBatchWriter, Kind};
        use thynapse_protocol::frame::{CommandFrame, Encoding};
        use thynapse_protocol::thid::Thid;
        let expiry = Duration::from_secs(3);
        let mut hub = hub(expiry, 32 << 20);
        let s = hub.session(&None);
        assert!(s.begin_connect(1).is_some());
        let (sender, _) = thynapse_link::split(zeromq::DealerSocket::new(), None);
        assert!(s.linked(1, "t1".into(), sender, bare_frame(cmd::HELO), Vec::new()));
        let dlvr = |batch| {
            let mut w = EnvelopeBatchWriter::default();
            for seq in 1..=3 {
                w.push(Kind::Mesh, &Thid([1; 20]), seq, 0, b"c", b"m", &[]);
            }
            let frame = CommandFrame::new(Encoding::Binary, cmd::DLVR, Bytes::new());
            let mut m = ZmqMessage::from(frame.to_bytes());
            m.push_back(w.finish(batch));
            m
        };
        let stale = |hub: &Hub| hub.metrics.drops.with_label_values(&["stale_link"]).get();
        let now = Instant::now();
        hub.on_message(None, 1, dlvr(1), now);
        assert_eq!(stale(&hub), 0, "read in time: delivered");
        hub.on_message(None, 1, dlvr(2), now + expiry + Duration::from_millis(1));
        assert_eq!(
            stale(&hub),
            3,
            "read past the expiry: its three messages dropped, counted"
        );
    }

    #[test]
    fn an_origins_duplicate_window_lasts_twenty_expiries_when_longer_than_60_s() {
        // Expiry 10 s: 20 expiries are 200 s.
        let mut hub = hub(Duration::from_secs(10), 32 << 20);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (a, b) = (Thid::random(), Thid::random());
        assert!(hub.seen.window(a, t0).accept(1));
        // Others are heard; `a` is silent for longer than two generations of 60 s.
        for at in [70, 130, 190] {
            hub.seen.window(b, t0 + s(at)).accept(at);
        }
        assert!(
            !hub.seen.window(a, t0 + s(195)).accept(1),
            "a copy 195 s later is still dropped"
        );
        // Forgotten after one to two generations of silence.
        for at in [400, 600] {
            hub.seen.window(b, t0 + s(at)).accept(at);
        }
        assert!(hub.seen.window(a, t0 + s(601)).accept(1));

        // Expiry 1 s: 20 expiries are 20 s, so 60 s it is.
        let mut hub = self::hub(Duration::from_secs(1), 32 << 20);
        let t0 = Instant::now();
        assert!(hub.seen.window(a, t0).accept(1));
        for at in [25, 50] {
            hub.seen.window(b, t0 + s(at)).accept(at);
        }
        assert!(!hub.seen.window(a, t0 + s(55)).accept(1));
    }

    #[tokio::test]
    async fn a_room_session_with_no_subscription_closes_after_30_s_idle() {
        let mut hub = hub(Duration::from_secs(3), 32 << 20);
        let _client = client(&mut hub, 1);
        // Room b keeps a subscription; room a's is dropped.
        subscribe(&mut hub, 1, SubKind::Shard, "{b}x", 1);
        subscribe(&mut hub, 1, SubKind::Shard, "{a}x", 2);
        hub.on_cmd(HubCmd::Unsubscribe {
            client: 1,
            kind: SubKind::Shard,
            names: vec![Bytes::from_static(b"{a}x")],
            token: 3,
        });
        let t0 = Instant::now();
        let (a, b) = (
            Some(Bytes::from_static(b"a")),
            Some(Bytes::from_static(b"b")),
        );
        hub.housekeeping(t0 + Duration::from_secs(29)).await;
        assert!(hub.sessions.contains_key(&a), "idle for 29 s only");
        hub.housekeeping(t0 + Duration::from_secs(31)).await;
        assert!(!hub.sessions.contains_key(&a), "closed");
        assert!(hub.sessions.contains_key(&b), "a subscription keeps it");
        assert!(hub.sessions.contains_key(&None), "the mesh session stays");
    }

    #[tokio::test]
    async fn a_confirmation_held_two_expiries_is_written_and_counted() {
        let expiry = Duration::from_secs(1);
        let mut hub = hub(expiry, 32 << 20);
        let mut c = client(&mut hub, 1);
        // No transmitter to confirm it (no link).
        let before = Instant::now();
        subscribe(&mut hub, 1, SubKind::Channel, "c", 5);
        let after = Instant::now();
        // A message for it arrives meanwhile: held for the client.
        deliver(&mut hub, b"c", &[b"early"]);
        assert!(c.received().is_empty());
        hub.housekeeping(before + 2 * expiry).await;
        assert!(c.received().is_empty(), "held up to two expiries");
        assert_eq!(hub.metrics.confirm_timeouts.get(), 0);
        hub.housekeeping(after + 2 * expiry + Duration::from_millis(1))
            .await;
        let got = c.received();
        assert!(
            matches!(got[..], [Out::Confirmed(5), Out::Pushes { .. }]),
            "{got:?}"
        );
        let Out::Pushes { bytes, .. } = &got[1] else {
            unreachable!()
        };
        assert!(bytes.windows(5).any(|w| w == b"early"));
        assert_eq!(hub.metrics.confirm_timeouts.get(), 1);
    }

    #[test]
    fn messages_held_for_an_unconfirmed_subscription_count_against_the_output_limit() {
        let mut hub = hub(Duration::from_secs(3), 4096);
        let mut c = client(&mut hub, 1);
        subscribe(&mut hub, 1, SubKind::Channel, "c", 5);
        deliver(&mut hub, b"c", &[&[7; 2000]]);
        assert!(!c.killed.load(Ordering::Relaxed), "within the limit: held");
        deliver(&mut hub, b"c", &[&[7; 3000]]);
        assert!(c.killed.load(Ordering::Relaxed), "past it: disconnected");
        assert!(!hub.clients.contains_key(&1));
        let slow = hub
            .metrics
            .drops
            .with_label_values(&["slow_subscriber"])
            .get();
        assert_eq!(slow, 1);
        assert!(
            c.received().is_empty(),
            "nothing written before its confirmation"
        );
    }
}
