//! The hub: one task per sidecar that owns the link to the transmitter, the cell's
//! subscriptions (reference-counted over its Redis clients) and delivery to the clients.
//! Client connections talk to it through a bounded channel, so a flood of PUBLISHes
//! pushes back on the clients' sockets instead of growing memory.
//!
//! Publishing: every message gets the next sequence number of this cell and is kept until
//! the transmitter acknowledges it (with the number of cells it reached, the PUBLISH
//! reply). When the cell moves to another transmitter, what was not acknowledged is sent
//! again; receivers drop the copies by (origin, sequence).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::FutureExt;
use thynapse_protocol::batch::{decode_acks, decode_envelopes, Kind, PublishBatchWriter};
use thynapse_protocol::dedup::SeqWindow;
use thynapse_protocol::discovery::{Datagram, TransmitterInfo, MAX_DATAGRAM};
use thynapse_protocol::frame::{CommandFrame, Encoding};
use thynapse_protocol::wire::{self, cmd, Interest, Op};
use thynapse_protocol::{glob, DeliveryRule, Thid};
use tokio::sync::{mpsc, oneshot, Notify};
use zeromq::{
    DealerSendHalf, DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage,
};

use crate::metrics::Metrics;

pub type ClientId = u64;

/// What the hub sends a client connection.
#[derive(Debug)]
pub enum Out {
    Message {
        channel: Bytes,
        payload: Bytes,
    },
    PMessage {
        pattern: Bytes,
        channel: Bytes,
        payload: Bytes,
    },
    /// The reply to the client's oldest unanswered PUBLISH.
    Published(i64),
}

impl Out {
    pub fn size(&self) -> usize {
        match self {
            Out::Message { channel, payload } => channel.len() + payload.len() + 32,
            Out::PMessage {
                pattern,
                channel,
                payload,
            } => pattern.len() + channel.len() + payload.len() + 40,
            Out::Published(_) => 16,
        }
    }
}

/// The hub's handle on one client: its queue, how many bytes wait in it, and the switch
/// that disconnects it.
pub struct ClientHandle {
    pub tx: mpsc::UnboundedSender<Out>,
    pub queued: Arc<AtomicUsize>,
    pub killed: Arc<AtomicBool>,
    pub kill: Arc<Notify>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubKind {
    Channel,
    Pattern,
}

pub enum HubCmd {
    Register(ClientId, ClientHandle),
    Unregister(ClientId),
    Subscribe(ClientId, SubKind, Vec<Bytes>),
    Unsubscribe(ClientId, SubKind, Vec<Bytes>),
    Publish {
        client: ClientId,
        channel: Bytes,
        payload: Bytes,
    },
    Channels(Option<Bytes>, oneshot::Sender<Vec<Bytes>>),
    NumSub(Vec<Bytes>, oneshot::Sender<Vec<i64>>),
    NumPat(oneshot::Sender<i64>),
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

/// Publishes not yet acknowledged beyond which the hub stops taking new ones.
const MAX_UNACKED: usize = 16_384;
const MAX_UNACKED_BYTES: usize = 4 << 20;
/// Messages per PUBS frame at most.
const MAX_PUBS_BATCH: usize = 1024;

struct Unacked {
    seq: u64,
    client: ClientId,
    ts: u64,
    channel: Bytes,
    payload: Bytes,
}

struct Link {
    generation: u64,
    name: String,
    sender: DealerSendHalf,
    last_heard: Instant,
    /// Highest DLVR batch received and not yet credited.
    credit: Option<u64>,
}

enum LinkEvent {
    Message(u64, ZmqMessage),
    Closed(u64),
}

/// The cell's subscriptions, each with the clients that hold it.
#[derive(Default)]
struct Subscriptions {
    channels: HashMap<Bytes, HashSet<ClientId>>,
    patterns: HashMap<Bytes, HashSet<ClientId>>,
}

impl Subscriptions {
    /// The subscriptions of one kind, and what the transmitter calls that kind.
    fn of(&mut self, kind: SubKind) -> (&mut HashMap<Bytes, HashSet<ClientId>>, Interest) {
        match kind {
            SubKind::Channel => (&mut self.channels, Interest::Channel),
            SubKind::Pattern => (&mut self.patterns, Interest::Pattern),
        }
    }
}

pub struct Hub {
    cfg: HubConfig,
    id: Thid,
    metrics: Metrics,
    clients: HashMap<ClientId, ClientHandle>,
    subs: Subscriptions,
    /// Subscription changes for the transmitter, sent at the next flush.
    interest: Vec<(Op, Interest, Bytes)>,
    next_seq: u64,
    unacked: VecDeque<Unacked>,
    unacked_bytes: usize,
    /// Index into `unacked` of the first message not yet sent on the current link.
    unsent_from: usize,
    link: Option<Link>,
    /// The previous link while moving: still read for a while, then closed.
    old_link: Option<(Link, Instant)>,
    generation: u64,
    link_tx: mpsc::Sender<LinkEvent>,
    link_rx: mpsc::Receiver<LinkEvent>,
    seen: HashMap<Thid, SeqWindow>,
    ready_printed: bool,
    avoid: Vec<String>,
    started: Instant,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn json_frame<T: serde::Serialize>(command: &[u8; 4], value: &T) -> ZmqMessage {
    ZmqMessage::from(CommandFrame::json(command, value).to_bytes())
}

impl Hub {
    pub fn new(cfg: HubConfig, metrics: Metrics) -> Self {
        let (link_tx, link_rx) = mpsc::channel(1024);
        Hub {
            cfg,
            id: Thid::random(),
            metrics,
            clients: HashMap::new(),
            subs: Subscriptions::default(),
            interest: Vec::new(),
            next_seq: 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            unsent_from: 0,
            link: None,
            old_link: None,
            generation: 0,
            link_tx,
            link_rx,
            seen: HashMap::new(),
            ready_printed: false,
            avoid: Vec::new(),
            started: Instant::now(),
        }
    }

    fn window_full(&self) -> bool {
        self.unacked.len() >= MAX_UNACKED || self.unacked_bytes >= MAX_UNACKED_BYTES
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
                    while n < MAX_PUBS_BATCH && !self.window_full() {
                        match cmds.try_recv() {
                            Ok(c) => { self.on_cmd(c); n += 1; }
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => self.housekeeping().await,
                _ = shutdown.notified() => {
                    if let Some(link) = self.link.as_mut() {
                        let _ = link.sender.send(json_frame(cmd::QUIT, &serde_json::json!({}))).await;
                    }
                    return;
                }
            }
            self.flush().await;
        }
    }

    fn on_cmd(&mut self, c: HubCmd) {
        match c {
            HubCmd::Register(id, handle) => {
                self.clients.insert(id, handle);
                self.metrics.clients.set(self.clients.len() as i64);
            }
            HubCmd::Unregister(id) => self.remove_client(id),
            HubCmd::Subscribe(client, kind, names) => {
                for name in names {
                    let (map, interest) = self.subs.of(kind);
                    let set = map.entry(name.clone()).or_default();
                    if set.is_empty() {
                        self.interest.push((Op::Add, interest, name));
                    }
                    set.insert(client);
                }
                self.update_subscription_gauge();
            }
            HubCmd::Unsubscribe(client, kind, names) => {
                for name in names {
                    self.unsubscribe(client, kind, &name);
                }
                self.update_subscription_gauge();
            }
            HubCmd::Publish {
                client,
                channel,
                payload,
            } => {
                self.metrics.messages_in.inc();
                self.metrics.bytes_in.inc_by(payload.len() as u64);
                let seq = self.next_seq;
                self.next_seq += 1;
                self.unacked_bytes += channel.len() + payload.len();
                self.unacked.push_back(Unacked {
                    seq,
                    client,
                    ts: now_us(),
                    channel,
                    payload,
                });
            }
            HubCmd::Channels(pattern, reply) => {
                let mut names: Vec<Bytes> = self
                    .subs
                    .channels
                    .keys()
                    .filter(|c| pattern.as_ref().is_none_or(|p| glob::matches(p, c)))
                    .cloned()
                    .collect();
                names.sort();
                let _ = reply.send(names);
            }
            HubCmd::NumSub(names, reply) => {
                let counts = names
                    .iter()
                    .map(|n| self.subs.channels.get(n).map_or(0, |s| s.len() as i64))
                    .collect();
                let _ = reply.send(counts);
            }
            HubCmd::NumPat(reply) => {
                let _ = reply.send(self.subs.patterns.values().map(|s| s.len() as i64).sum());
            }
        }
    }

    fn unsubscribe(&mut self, client: ClientId, kind: SubKind, name: &Bytes) {
        let (map, interest) = self.subs.of(kind);
        if let Some(set) = map.get_mut(name) {
            if set.remove(&client) && set.is_empty() {
                map.remove(name);
                self.interest.push((Op::Remove, interest, name.clone()));
            }
        }
    }

    fn update_subscription_gauge(&self) {
        self.metrics
            .subscriptions
            .set((self.subs.channels.len() + self.subs.patterns.len()) as i64);
    }

    fn remove_client(&mut self, id: ClientId) {
        if self.clients.remove(&id).is_none() {
            return;
        }
        for kind in [SubKind::Channel, SubKind::Pattern] {
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

    fn on_link(&mut self, ev: LinkEvent) {
        let (generation, msg) = match ev {
            LinkEvent::Message(g, m) => (g, m),
            LinkEvent::Closed(g) => {
                if self.link.as_ref().is_some_and(|l| l.generation == g) {
                    tracing::warn!("link to transmitter closed");
                    let name = self.link.take().map(|l| l.name).unwrap_or_default();
                    self.avoid = vec![name];
                }
                return;
            }
        };
        let is_current = self
            .link
            .as_ref()
            .is_some_and(|l| l.generation == generation);
        let link = if is_current {
            self.link.as_mut()
        } else {
            self.old_link
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
                match decode_envelopes(body) {
                    Ok((batch, envelopes)) => {
                        link.credit = Some(batch);
                        self.deliver(envelopes);
                    }
                    Err(e) => tracing::warn!("bad DLVR batch: {e}"),
                }
            }
            cmd::ACKS => {
                let Some(body) = msg.get(1).cloned() else {
                    return;
                };
                if let Ok((first, counts)) = decode_acks(body) {
                    self.acknowledge(first, &counts);
                }
            }
            cmd::WLCM => {
                if let Ok(w) = frame.decode_json::<wire::Welcome>() {
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
                tracing::info!("transmitter asks this cell to move");
                if let Some(link) = self.link.take() {
                    self.avoid = vec![link.name.clone()];
                    // Keep reading the old link for one expiry: peers learn where this
                    // cell went before the old transmitter stops delivering to it.
                    self.old_link = Some((link, Instant::now() + self.cfg.expiry));
                }
            }
            cmd::ERRR => tracing::warn!(
                "transmitter error: {}",
                String::from_utf8_lossy(&frame.payload)
            ),
            _ => {}
        }
    }

    fn acknowledge(&mut self, first: u64, counts: &[u32]) {
        for (i, count) in counts.iter().enumerate() {
            let seq = first + i as u64;
            match self.unacked.front() {
                Some(front) if front.seq == seq => {
                    let u = self.unacked.pop_front().expect("front exists");
                    self.unacked_bytes -= u.channel.len() + u.payload.len();
                    self.unsent_from = self.unsent_from.saturating_sub(1);
                    self.send_to(u.client, Out::Published(*count as i64));
                }
                // Already acknowledged (a resent copy, or the old link while moving).
                _ => {}
            }
        }
    }

    fn deliver(&mut self, envelopes: Vec<thynapse_protocol::batch::Envelope>) {
        let now = now_us();
        if self.seen.len() > 100_000 {
            self.seen.clear();
        }
        for e in envelopes {
            if !self.seen.entry(e.origin).or_default().accept(e.seq) {
                self.metrics.duplicates.inc();
                continue;
            }
            if e.kind != Kind::Mesh {
                continue;
            }
            self.metrics
                .latency
                .observe(now.saturating_sub(e.ts) as f64 / 1e6);
            let subscribers: Vec<ClientId> = self
                .subs
                .channels
                .get(&e.channel)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for client in subscribers {
                if self.send_to(
                    client,
                    Out::Message {
                        channel: e.channel.clone(),
                        payload: e.payload.clone(),
                    },
                ) {
                    self.metrics.messages_out.inc();
                    self.metrics.bytes_out.inc_by(e.payload.len() as u64);
                }
            }
            let matches: Vec<(Bytes, Vec<ClientId>)> = self
                .subs
                .patterns
                .iter()
                .filter(|(p, _)| glob::matches(p, &e.channel))
                .map(|(p, s)| (p.clone(), s.iter().copied().collect()))
                .collect();
            for (pattern, clients) in matches {
                for client in clients {
                    let out = Out::PMessage {
                        pattern: pattern.clone(),
                        channel: e.channel.clone(),
                        payload: e.payload.clone(),
                    };
                    if self.send_to(client, out) {
                        self.metrics.messages_out.inc();
                        self.metrics.bytes_out.inc_by(e.payload.len() as u64);
                    }
                }
            }
        }
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        if let Some((old, until)) = self.old_link.as_mut() {
            if now >= *until {
                let _ = old
                    .sender
                    .send(json_frame(cmd::QUIT, &serde_json::json!({})))
                    .await;
                self.old_link = None;
            }
        }
        if let Some(link) = self.link.as_mut() {
            if now.duration_since(link.last_heard) > self.cfg.expiry {
                tracing::warn!(transmitter = %link.name, "transmitter silent; moving");
                self.avoid = vec![link.name.clone()];
                self.link = None;
            } else {
                let _ = link
                    .sender
                    .send(json_frame(cmd::PING, &serde_json::json!({})))
                    .now_or_never();
            }
        }
        if self.link.is_none() {
            self.connect().await;
        }
    }

    /// Finds a live transmitter through the rendezvous and opens a link to it: HELO, all
    /// subscriptions, and every publish not yet acknowledged.
    async fn connect(&mut self) {
        let Some(list) = self.query_rendezvous().await else {
            return;
        };
        if let Some(prefer) = &self.cfg.prefer {
            // At start-up, give the preferred transmitter one expiry to show up, so
            // cells spread as planned instead of all joining the first one announced.
            if !self.ready_printed
                && self.started.elapsed() < self.cfg.expiry
                && !list.iter().any(|t| &t.name == prefer)
            {
                return;
            }
        }
        let candidates: Vec<&TransmitterInfo> = list.iter().filter(|t| !t.draining).collect();
        let fresh: Vec<&TransmitterInfo> = candidates
            .iter()
            .copied()
            .filter(|t| !self.avoid.contains(&t.name))
            .collect();
        let pool = if fresh.is_empty() { candidates } else { fresh };
        let choice = self
            .cfg
            .prefer
            .as_ref()
            .and_then(|p| pool.iter().find(|t| &t.name == p))
            .or_else(|| pool.iter().min_by_key(|t| (t.cells, t.name.clone())));
        let Some(target) = choice.map(|t| (*t).clone()) else {
            return;
        };
        let mut options = SocketOptions::default();
        options.connect_timeout(self.cfg.heartbeat);
        let mut socket = DealerSocket::with_options(options);
        if let Err(e) = socket.connect(&target.command).await {
            tracing::warn!(transmitter = %target.name, "connect failed: {e}");
            self.avoid = vec![target.name];
            return;
        }
        let (mut sender, mut receiver) = socket.split();
        self.generation += 1;
        let generation = self.generation;
        let events = self.link_tx.clone();
        tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(m) => {
                        if events
                            .send(LinkEvent::Message(generation, m))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = events.send(LinkEvent::Closed(generation)).await;
                        return;
                    }
                }
            }
        });
        let hello = wire::Hello {
            id: self.id,
            service: self.cfg.service.clone(),
            rules: self.cfg.rules.clone(),
            events: wire::Events::Dealer,
            token: None,
        };
        let mut msgs = vec![json_frame(cmd::HELO, &hello)];
        let subs: Vec<(Op, Interest, &[u8])> = self
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
            .collect();
        if !subs.is_empty() {
            let mut m = ZmqMessage::from(
                CommandFrame::new(Encoding::Binary, cmd::SUBS, Bytes::new()).to_bytes(),
            );
            m.push_back(wire::encode_interest(subs));
            msgs.push(m);
        }
        for m in msgs {
            if sender.send(m).await.is_err() {
                return;
            }
        }
        // Changes queued for the old link are part of the snapshot just sent.
        self.interest.clear();
        if self.ready_printed {
            self.metrics.reconnects.inc();
        }
        self.unsent_from = 0;
        self.link = Some(Link {
            generation,
            name: target.name,
            sender,
            last_heard: Instant::now(),
            credit: None,
        });
    }

    async fn query_rendezvous(&self) -> Option<Vec<TransmitterInfo>> {
        let socket = thynapse_rendezvous_socket().ok()?;
        let query = Datagram::Query {
            mesh: self.cfg.mesh.clone(),
        }
        .to_bytes();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for r in &self.cfg.rendezvous {
            let addr = r.trim_start_matches("udp://");
            if socket.send_to(&query, addr).await.is_err() {
                continue;
            }
            let got = tokio::time::timeout(self.cfg.heartbeat, socket.recv_from(&mut buf)).await;
            if let Ok(Ok((n, _))) = got {
                match Datagram::parse(&buf[..n]) {
                    Ok(Datagram::Peers { transmitters, .. }) if !transmitters.is_empty() => {
                        return Some(transmitters)
                    }
                    Ok(Datagram::Error { error }) => {
                        tracing::warn!(rendezvous = %r, "rendezvous: {error}")
                    }
                    _ => {}
                }
            }
        }
        None
    }

    async fn flush(&mut self) {
        let Some(link) = self.link.as_mut() else {
            if let Some((old, _)) = self.old_link.as_mut() {
                credit(old).await;
            }
            return;
        };
        if !self.interest.is_empty() {
            let mut m = ZmqMessage::from(
                CommandFrame::new(Encoding::Binary, cmd::SUBS, Bytes::new()).to_bytes(),
            );
            m.push_back(wire::encode_interest(
                self.interest.iter().map(|(op, k, n)| (*op, *k, &n[..])),
            ));
            self.interest.clear();
            let _ = link.sender.send(m).await;
        }
        while self.unsent_from < self.unacked.len() {
            let first = &self.unacked[self.unsent_from];
            let mut w = PublishBatchWriter::new(first.seq);
            let end = (self.unsent_from + MAX_PUBS_BATCH).min(self.unacked.len());
            for u in self.unacked.range(self.unsent_from..end) {
                w.push(Kind::Mesh, u.ts, &u.channel, &u.payload);
            }
            let mut m = ZmqMessage::from(
                CommandFrame::new(Encoding::Binary, cmd::PUBS, Bytes::new()).to_bytes(),
            );
            m.push_back(w.finish());
            if link.sender.send(m).await.is_err() {
                break;
            }
            self.unsent_from = end;
        }
        credit(link).await;
        if let Some((old, _)) = self.old_link.as_mut() {
            credit(old).await;
        }
    }
}

async fn credit(link: &mut Link) {
    if let Some(batch) = link.credit.take() {
        let _ = link
            .sender
            .send(json_frame(cmd::CRED, &wire::Credit { batch }))
            .await;
    }
}

fn thynapse_rendezvous_socket() -> std::io::Result<tokio::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket)
}
