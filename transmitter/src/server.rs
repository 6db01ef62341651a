//! The transmitter's event loop: reads the ROUTER socket, peer replies and discovery
//! updates; routes; then flushes every pending batch at once. Messages arriving while a
//! batch is being built join it, so frames grow under load and stay single when idle.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
// foldhash: a fast, seeded hasher (the per-message maps are keyed by ids and channel
// names; SipHash was a visible share of the hot path).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use futures::FutureExt;
use thynapse_protocol::batch::{
    decode_envelopes, decode_publish_records, decode_publishes, encode_acks, Envelopes, Kind,
    Publish,
};
use thynapse_protocol::credit::Credit;
use thynapse_protocol::discovery::{Datagram, Placement, TransmitterInfo, MAX_DATAGRAM};
use thynapse_protocol::frame::{CommandFrame, Encoding, FrameError};
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::{self, cmd, Events, Interest};
use thynapse_protocol::Thid;
use tokio::sync::{mpsc, watch};
use zeromq::{
    DealerSendHalf, DealerSocket, PubSocket, RouterSendHalf, RouterSocket, Socket, SocketOptions,
    SocketRecv, SocketSend, ZmqMessage,
};

use crate::interest_sync::InterestSync;
use crate::metrics::{Hot, Metrics};
use crate::outbox::Outbox;
use crate::routing::{Dispatch, Location, PeerId, Table};
use crate::Args;

/// Most inbound messages (and bytes) handled before a flush, so one busy sender cannot
/// delay batches for everyone, and publishers get their acknowledgements while the rest
/// of a backlog is routed.
const MAX_BURST: usize = 256;
const MAX_BURST_BYTES: usize = 64 * 1024;
/// Batched bytes beyond which a flush sends its replies before its batches.
const REPLIES_FIRST_BYTES: usize = 64 * 1024;

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

struct LocalCell {
    identity: Bytes,
    events: Events,
    outbox: Outbox,
    last_seen: Instant,
    /// Highest sequence number this cell used, so EVNT numbers continue after PUBS ones.
    last_seq: u64,
    /// A room session carries the shard channels of this room only.
    room: Option<String>,
}

/// A room this transmitter hosts.
struct HostedRoom {
    /// Every host of the room, this one included.
    hosts: Vec<String>,
    messages: prometheus::IntCounter,
}

/// What the announce task says of this transmitter.
#[derive(Clone)]
struct Announcement {
    info: TransmitterInfo,
    rooms: Vec<String>,
}

struct PeerOut {
    sender: DealerSendHalf,
    last_heard: Instant,
    synced: bool,
}

struct Peer {
    name: String,
    /// Instance id of the peer as last announced or introduced.
    instance: Option<Thid>,
    command: Option<String>,
    /// Messages for the peer; kept while a link is (re)built, sent once it is synced.
    outbox: Outbox,
    out: Option<PeerOut>,
    generation: u64,
    connecting: bool,
    /// Their DEALER on our ROUTER, and when we last heard from it.
    inbound: Option<(Bytes, Instant)>,
    /// FWRD batches taken on that connection and not yet acknowledged (FACK).
    fack: Credit,
    /// They said LEAV; ignore announcements of this instance.
    left: Option<Thid>,
}

impl Peer {
    /// Linked, being linked, or linked to us: a peer that may route to our cells.
    fn is_live(&self) -> bool {
        self.out.is_some() || self.connecting || self.inbound.is_some()
    }
}

enum Event {
    PeerConnected {
        peer: PeerId,
        generation: u64,
        sender: DealerSendHalf,
    },
    PeerConnectFailed {
        peer: PeerId,
        generation: u64,
    },
    PeerReply {
        peer: PeerId,
        generation: u64,
        msg: ZmqMessage,
    },
    PeerClosed {
        peer: PeerId,
        generation: u64,
    },
    Discovered(Vec<TransmitterInfo>),
    Hosting(Vec<Placement>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dest {
    Cell(Thid),
    Peer(PeerId),
}

/// Where inbound work came from: its batches are routed in the order they came.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Cell(Thid),
    Peer(PeerId),
}

/// An inbound batch (a cell's PUBS, a peer's FWRD) waiting for room on the links its next
/// message goes to. A burst larger than a link buffer waits for the receivers' credit
/// instead of being dropped; only past the expiry is the rest routed and what does not
/// fit dropped (and counted), so a receiver that never credits cannot stall its senders.
struct Held {
    source: Source,
    identity: Bytes,
    batch: HeldBatch,
    progress: Progress,
    since: Instant,
}

enum HeldBatch {
    /// The `PUBS` frames (all checked on arrival).
    Publish(Vec<Bytes>),
    /// The `FWRD` body (checked on arrival).
    Forward(Bytes),
}

impl HeldBatch {
    fn bytes(&self) -> usize {
        match self {
            HeldBatch::Publish(parts) => parts.iter().map(Bytes::len).sum(),
            HeldBatch::Forward(body) => body.len(),
        }
    }
}

/// How far routing a batch got: the messages already routed, and what they reached.
#[derive(Default)]
struct Progress {
    done: usize,
    counts: Vec<u32>,
    dests: Vec<Dest>,
}

/// The message routing stopped at: a link it goes to has no room.
struct NoRoom;

/// An acknowledgement waiting for congested links to drain.
struct Deferred {
    identity: Bytes,
    reply: ZmqMessage,
    dests: Vec<Dest>,
    since: Instant,
}

struct Transmitter {
    args: Args,
    id: Thid,
    pub_endpoint: String,
    router: RouterSendHalf,
    publisher: PubSocket,
    table: Table,
    cells: HashMap<Thid, LocalCell>,
    identities: HashMap<Bytes, Thid>,
    peers: HashMap<PeerId, Peer>,
    peer_ids: HashMap<String, PeerId>,
    peer_identities: HashMap<Bytes, PeerId>,
    next_peer: PeerId,
    /// Local cells whose interest changed since the last flush (CELL / CGON to peers).
    dirty: HashSet<Thid>,
    replies: Vec<ZmqMessage>,
    deferred: Vec<Deferred>,
    held: VecDeque<Held>,
    /// Bytes held per source (every source with a batch in `held`).
    held_sources: HashMap<Source, usize>,
    /// Something may have made room since held batches were last tried (a credit, a
    /// receiver gone, an interest change): they are tried again only then, or at expiry.
    room_freed: bool,
    events_tx: mpsc::Sender<Event>,
    metrics: Metrics,
    /// The per-message counters, flushed to `metrics` once per loop turn.
    hot: Hot,
    draining: Option<Instant>,
    expiry: Duration,
    heartbeat: Duration,
    dispatch: Dispatch,
    scratch: Vec<Thid>,
    ping_peers: bool,
    routed: u64,
    rate: f64,
    rooms: HashMap<String, HostedRoom>,
    announcement: watch::Sender<Announcement>,
    /// Cells waiting to hear that their interest reached every linked peer.
    interest_sync: InterestSync,
    /// Peers with a ready link, as last printed (`LINKED`, which `thynapse up` waits on).
    linked_reported: Option<usize>,
}

fn reply_json<T: serde::Serialize>(identity: &Bytes, command: &[u8; 4], value: &T) -> ZmqMessage {
    let mut m = ZmqMessage::from(identity.clone());
    m.push_back(CommandFrame::json(command, value).to_bytes());
    m
}

fn error_reply(identity: &Bytes, error: &str) -> ZmqMessage {
    reply_json(
        identity,
        cmd::ERRR,
        &wire::ErrorReply {
            error: error.to_string(),
        },
    )
}

fn endpoint_port(endpoint: &zeromq::Endpoint) -> anyhow::Result<u16> {
    match endpoint {
        zeromq::Endpoint::Tcp(_, port) => Ok(*port),
        other => anyhow::bail!("unsupported endpoint {other}"),
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let mut router = RouterSocket::new();
    let command_ep = router
        .bind(&args.command_bind)
        .await
        .with_context(|| format!("binding the command socket to {}", args.command_bind))?;
    let mut publisher = PubSocket::new();
    let event_ep = publisher
        .bind(&args.event_bind)
        .await
        .with_context(|| format!("binding the event socket to {}", args.event_bind))?;
    let command = format!(
        "tcp://{}:{}",
        args.advertise_host,
        endpoint_port(&command_ep)?
    );
    let event = format!(
        "tcp://{}:{}",
        args.advertise_host,
        endpoint_port(&event_ep)?
    );
    let metrics_addr =
        thynapse_telemetry::serve_metrics(args.metrics_bind, metrics.registry.clone()).await?;
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let id = Thid::random();

    let info = TransmitterInfo {
        name: args.name.clone(),
        id,
        command: command.clone(),
        event: event.clone(),
        metrics: metrics_url.clone(),
        cells: 0,
        rate: 0.0,
        draining: false,
        rooms: 0,
    };
    let (info_tx, info_rx) = watch::channel(Announcement {
        info,
        rooms: Vec::new(),
    });
    let (events_tx, mut events_rx) = mpsc::channel(4096);
    tokio::spawn(announce(args.clone(), info_rx, events_tx.clone()));

    let (router_tx, mut router_rx) = router.split();
    let heartbeat = Duration::from_millis(args.announce_interval_ms);
    let expiry = heartbeat * args.expiry_multiplier;
    let mut t = Transmitter {
        id,
        pub_endpoint: event.clone(),
        router: router_tx,
        publisher,
        table: Table::default(),
        cells: HashMap::new(),
        identities: HashMap::new(),
        peers: HashMap::new(),
        peer_ids: HashMap::new(),
        peer_identities: HashMap::new(),
        next_peer: 1,
        dirty: HashSet::new(),
        replies: Vec::new(),
        deferred: Vec::new(),
        held: VecDeque::new(),
        held_sources: HashMap::default(),
        room_freed: false,
        events_tx,
        hot: Hot::new(&metrics),
        metrics,
        draining: None,
        expiry,
        heartbeat,
        dispatch: Dispatch::default(),
        scratch: Vec::new(),
        ping_peers: false,
        routed: 0,
        rate: 0.0,
        rooms: HashMap::new(),
        announcement: info_tx,
        interest_sync: InterestSync::default(),
        linked_reported: None,
        args,
    };
    println!(
        "READY {}",
        serde_json::json!({"name": t.args.name, "id": id, "command": command, "event": event, "metrics": metrics_url})
    );
    tracing::info!(name = %t.args.name, %command, %event, "transmitter ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();

    loop {
        let mut more_waiting = false;
        tokio::select! {
            biased;
            msg = router_rx.recv() => {
                let msg = msg.context("command socket closed")?;
                let mut bytes = t.on_router(msg);
                let mut n = 1;
                while n < MAX_BURST && bytes < MAX_BURST_BYTES {
                    match router_rx.recv().now_or_never() {
                        Some(Ok(msg)) => { bytes += t.on_router(msg); n += 1; }
                        _ => break,
                    }
                }
                more_waiting = n == MAX_BURST || bytes >= MAX_BURST_BYTES;
                while let Ok(ev) = events_rx.try_recv() {
                    t.on_event(ev);
                }
            }
            Some(ev) = events_rx.recv() => {
                t.on_event(ev);
                while let Ok(ev) = events_rx.try_recv() {
                    t.on_event(ev);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let dt = now.duration_since(last_tick).as_secs_f64().max(1e-3);
                last_tick = now;
                t.rate = 0.7 * t.rate + 0.3 * (t.routed as f64 / dt);
                t.routed = 0;
                t.housekeeping(now);
                t.update_announcement();
                if t.drained(now) {
                    t.flush().await;
                    t.leave().await;
                    tracing::info!("drained; exiting");
                    return Ok(());
                }
            }
            _ = sigterm.recv() => t.start_drain(),
            _ = sigint.recv() => t.start_drain(),
        }
        t.flush().await;
        if more_waiting {
            // The zeromq crate writes from its own tasks on this thread: let them put
            // what was just flushed (the acknowledgements publishers wait on) on the wire
            // before the next burst.
            tokio::task::yield_now().await;
        }
    }
}

/// Announces this transmitter to every rendezvous at the configured rate and passes what
/// they answer (live transmitters, rooms to host) to the event loop. A change worth
/// telling at once (a room taken, draining) is announced without waiting for the next
/// interval, so that the rendezvous can hand a new room out quickly.
async fn announce(
    args: Args,
    mut info: watch::Receiver<Announcement>,
    events: mpsc::Sender<Event>,
) {
    let socket = match thynapse_rendezvous::bind_udp("0.0.0.0:0".parse().expect("valid address")) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot open a UDP socket for discovery: {e}");
            return;
        }
    };
    let targets: Vec<String> = args
        .rendezvous
        .iter()
        .map(|r| r.trim_start_matches("udp://").to_string())
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(args.announce_interval_ms));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = info.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            got = socket.recv_from(&mut buf) => {
                let Ok((n, _)) = got else { continue };
                let event = match Datagram::parse(&buf[..n]) {
                    Ok(Datagram::Peers { transmitters, .. }) => Event::Discovered(transmitters),
                    Ok(Datagram::Hosting { rooms, .. }) => Event::Hosting(rooms),
                    Ok(Datagram::Error { error }) => {
                        tracing::warn!("rendezvous: {error}");
                        continue;
                    }
                    _ => {
                        tracing::warn!("unexpected datagram from the rendezvous");
                        continue;
                    }
                };
                if events.send(event).await.is_err() {
                    return;
                }
                continue;
            }
        }
        let datagram = {
            let a = info.borrow_and_update();
            Datagram::Announce {
                mesh: args.mesh.clone(),
                interval_ms: args.announce_interval_ms,
                multiplier: args.expiry_multiplier,
                transmitter: a.info.clone(),
                rooms: a.rooms.clone(),
            }
            .to_bytes()
        };
        for target in &targets {
            if let Err(e) = socket.send_to(&datagram, target.as_str()).await {
                tracing::debug!(%target, "announce failed: {e}");
            }
        }
    }
}

impl Transmitter {
    fn high_water(&self) -> usize {
        self.args.link_buffer_bytes / 4
    }

    /// Handles one message from the ROUTER socket; returns its size for burst accounting.
    fn on_router(&mut self, msg: ZmqMessage) -> usize {
        let mut frames = msg.into_vecdeque();
        let Some(identity) = frames.pop_front() else {
            return 0;
        };
        let size: usize = frames.iter().map(|f| f.len()).sum();
        let Some(first) = frames.pop_front() else {
            self.malformed(&identity, FrameError::Empty);
            return size;
        };
        let frame = match CommandFrame::parse(&first) {
            Ok(f) => f,
            Err(e) => {
                self.malformed(&identity, e);
                return size;
            }
        };
        // Anything but data may make room for held batches (credits, receivers leaving,
        // interest changes); trying them again is cheap next to routing.
        if ![cmd::PUBS, cmd::FWRD, cmd::EVNT].contains(&&frame.cmd) {
            self.room_freed = true;
        }
        let body = frames.pop_front();
        let result = if let Some(&peer) = self.peer_identities.get(&identity) {
            self.on_peer_inbound(peer, &identity, frame, body)
        } else {
            self.on_cell(&identity, frame, body, frames)
        };
        if let Err(e) = result {
            self.malformed(&identity, e);
        }
        size
    }

    fn malformed(&mut self, identity: &Bytes, e: FrameError) {
        self.metrics.malformed.inc();
        tracing::debug!("malformed frame: {e}");
        self.replies.push(error_reply(identity, &e.to_string()));
    }

    /// A cell's command; `more` holds the frames after the body (the further parts of a
    /// multipart `PUBS`).
    fn on_cell(
        &mut self,
        identity: &Bytes,
        frame: CommandFrame,
        body: Option<Bytes>,
        more: VecDeque<Bytes>,
    ) -> Result<(), FrameError> {
        let now = Instant::now();
        match &frame.cmd {
            cmd::HELO => {
                let hello: wire::Hello = frame.decode_json()?;
                if self.draining.is_some() {
                    self.replies.push(reply_json(
                        identity,
                        cmd::MOVE,
                        &wire::Reason {
                            reason: "draining".into(),
                        },
                    ));
                    return Ok(());
                }
                if let Some(room) = &hello.room {
                    if !self.rooms.contains_key(room) {
                        // Placement moved on (or this is a new instance): ask again.
                        self.replies.push(reply_json(
                            identity,
                            cmd::MOVE,
                            &wire::Reason {
                                reason: format!("room {room:?} is not hosted here"),
                            },
                        ));
                        return Ok(());
                    }
                }
                if let Some(old) = self.identities.insert(identity.clone(), hello.id) {
                    if old != hello.id {
                        self.drop_cell(old, "replaced");
                    }
                }
                let cell = self.cells.entry(hello.id).or_insert_with(|| LocalCell {
                    identity: identity.clone(),
                    events: hello.events,
                    outbox: Outbox::default(),
                    last_seen: now,
                    last_seq: 0,
                    room: hello.room.clone(),
                });
                if cell.identity != *identity {
                    // The same cell on a new connection: what was in flight on the old one is gone.
                    self.identities.remove(&cell.identity);
                    cell.identity = identity.clone();
                    cell.outbox = Outbox::default();
                }
                cell.events = hello.events;
                cell.last_seen = now;
                cell.room = hello.room.clone();
                self.table
                    .upsert_cell(Location::Local, hello.id, &hello.service, &hello.rules);
                self.dirty.insert(hello.id);
                self.metrics.cells.set(self.cells.len() as i64);
                tracing::info!(cell = %hello.id, service = %hello.service, "cell joined");
                self.replies.push(reply_json(
                    identity,
                    cmd::WLCM,
                    &wire::Welcome {
                        id: self.id,
                        name: self.args.name.clone(),
                        pub_endpoint: self.pub_endpoint.clone(),
                        max_message_bytes: self.args.max_message_bytes,
                        heartbeat_ms: self.heartbeat.as_millis() as u64,
                    },
                ));
                return Ok(());
            }
            cmd::PEER => {
                let hello: wire::PeerHello = frame.decode_json()?;
                if hello.mesh != self.args.mesh {
                    self.replies.push(error_reply(
                        identity,
                        &format!("this transmitter is in mesh {:?}", self.args.mesh),
                    ));
                    return Ok(());
                }
                let peer = self.peer_id(&hello.name);
                let p = self.peers.get_mut(&peer).expect("peer_id creates");
                if p.instance.is_some_and(|i| i != hello.id) {
                    // A restarted peer: what we knew of its cells is stale.
                    self.table.remove_location(Location::Peer(peer));
                }
                p.instance = Some(hello.id);
                p.left = None;
                if let Some((old, _)) = p.inbound.replace((identity.clone(), now)) {
                    self.peer_identities.remove(&old);
                }
                p.fack = Credit::default();
                self.peer_identities.insert(identity.clone(), peer);
                self.replies
                    .push(reply_json(identity, cmd::PWLC, &self.peer_hello()));
                return Ok(());
            }
            _ => {}
        }
        let Some(&id) = self.identities.get(identity) else {
            if &frame.cmd == cmd::PUBS || &frame.cmd == cmd::EVNT {
                self.metrics
                    .drops
                    .with_label_values(&["unknown_sender"])
                    .inc();
            }
            self.replies
                .push(error_reply(identity, "unknown cell: send J HELO first"));
            return Ok(());
        };
        if let Some(cell) = self.cells.get_mut(&id) {
            cell.last_seen = now;
        }
        match &frame.cmd {
            cmd::PING => self
                .replies
                .push(reply_json(identity, cmd::PONG, &serde_json::json!({}))),
            cmd::SUBS => {
                let body = body.ok_or_else(|| FrameError::MissingPayload("SUBS".into()))?;
                let sync: wire::SubsSync = frame.decode_json()?;
                let mut changes = wire::decode_interest(body)?;
                let room = self.cells.get(&id).and_then(|c| c.room.clone());
                let before = changes.len();
                changes.retain(|(_, kind, name)| {
                    *kind != Interest::ShardChannel
                        || room
                            .as_deref()
                            .is_some_and(|r| room_of(name) == r.as_bytes())
                });
                if changes.len() != before {
                    self.replies.push(error_reply(
                        identity,
                        "shard channels belong on the session of their room (HELO with \"room\")",
                    ));
                }
                self.table.apply(Location::Local, id, &changes);
                self.dirty.insert(id);
                if let Some(n) = sync.sync {
                    self.interest_sync.request(identity, n);
                }
            }
            cmd::PUBS => {
                let body = body.ok_or_else(|| FrameError::MissingPayload("PUBS".into()))?;
                // The batch may come in parts (each of whole records): all are checked
                // before any message is routed.
                let (first, head) = decode_publishes(&body)?;
                let mut records = vec![head];
                for part in &more {
                    records.push(decode_publish_records(part)?);
                }
                let source = Source::Cell(id);
                let mut progress = Progress::default();
                if self.held_sources.contains_key(&source)
                    || self
                        .route_publishes(
                            id,
                            identity,
                            first,
                            records.into_iter().flatten(),
                            &mut progress,
                            false,
                        )
                        .is_err()
                {
                    let mut parts = Vec::with_capacity(1 + more.len());
                    parts.push(body);
                    parts.extend(more);
                    self.hold(source, identity, HeldBatch::Publish(parts), progress);
                }
            }
            cmd::EVNT => {
                let event: wire::Event = frame.decode_json()?;
                let payload = match (frame.enc, event.data, body) {
                    (Encoding::Json, Some(data), _) => Bytes::from(data),
                    (Encoding::Binary, _, Some(body)) => body,
                    (Encoding::Binary, _, None) => {
                        return Err(FrameError::MissingPayload("B EVNT".into()))
                    }
                    (Encoding::Json, None, _) => Bytes::new(),
                };
                let channel = Bytes::from(event.channel);
                let seq = self.cells.get_mut(&id).map_or(0, |c| {
                    c.last_seq += 1;
                    c.last_seq
                });
                let mut dests = Vec::new();
                self.table.start_batch();
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                let receivers = self
                    .publish(
                        id,
                        seq,
                        ts,
                        Kind::Mesh,
                        &channel,
                        &payload,
                        &mut dests,
                        false,
                    )
                    .unwrap_or(0);
                let ack = wire::EventAck {
                    thid: Thid::of_parts(&[&channel, &payload]),
                    receivers,
                };
                self.ack_when_clear(identity, reply_json(identity, cmd::ACKD, &ack), dests);
            }
            cmd::CRED => {
                let credit: wire::Credit = frame.decode_json()?;
                if let Some(cell) = self.cells.get_mut(&id) {
                    cell.outbox.credit(credit.batch);
                }
            }
            cmd::QUIT => self.drop_cell(id, "quit"),
            _ => return Err(FrameError::UnknownCommand(frame.cmd_str().to_string())),
        }
        Ok(())
    }

    /// Routes one message published by local cell `origin`; returns the cells it reaches.
    /// With `hold`, a message that a link it goes to has no room for is not routed
    /// (`NoRoom`); without, it is dropped for that link (and counted).
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        origin: Thid,
        seq: u64,
        ts: u64,
        kind: Kind,
        channel: &[u8],
        payload: &[u8],
        dests: &mut Vec<Dest>,
        hold: bool,
    ) -> Result<u32, NoRoom> {
        if payload.len() > self.args.max_message_bytes {
            self.count_from_cell(payload.len());
            self.metrics.drops.with_label_values(&["too_large"]).inc();
            let identity = self.cells.get(&origin).map(|c| c.identity.clone());
            if let Some(identity) = identity {
                self.replies.push(error_reply(
                    &identity,
                    &FrameError::TooLarge {
                        size: payload.len(),
                        limit: self.args.max_message_bytes,
                    }
                    .to_string(),
                ));
            }
            return Ok(0);
        }
        // A room message comes from a session of its room, which this transmitter hosts;
        // every other host of the room gets it too, so a cell that moves to another host
        // of the room receives at once.
        let cohosts = if kind == Kind::Shard {
            let session_room = self.cells.get(&origin).and_then(|c| c.room.as_deref());
            let hosted = std::str::from_utf8(room_of(channel))
                .ok()
                .filter(|r| Some(*r) == session_room)
                .and_then(|r| self.rooms.get(r));
            let Some(room) = hosted else {
                self.count_from_cell(payload.len());
                self.metrics
                    .drops
                    .with_label_values(&["room_not_hosted"])
                    .inc();
                return Ok(0);
            };
            Some(room)
        } else {
            None
        };
        let mut dispatch = std::mem::take(&mut self.dispatch);
        self.table.dispatch(kind, channel, &mut dispatch);
        for host in cohosts.iter().flat_map(|r| &r.hosts) {
            if let Some(&peer) = self.peer_ids.get(host) {
                if self.peers[&peer].out.as_ref().is_some_and(|o| o.synced) {
                    dispatch.peer_entry(peer);
                }
            }
        }
        if hold && !self.dispatch_has_room(&dispatch, channel.len() + payload.len()) {
            self.dispatch = dispatch;
            return Err(NoRoom);
        }
        if let Some(room) = cohosts {
            room.messages.inc();
        }
        self.count_from_cell(payload.len());
        self.routed += 1;
        for cell in &dispatch.local {
            self.deliver_local(*cell, kind, &origin, seq, ts, channel, payload, dests);
        }
        for (peer, targets) in dispatch.peers() {
            self.forward(
                *peer, kind, &origin, seq, ts, channel, payload, targets, dests,
            );
        }
        let receivers = dispatch.receivers;
        self.dispatch = dispatch;
        Ok(receivers)
    }

    /// Counts a message from a cell once it is settled (routed or dropped); one held for
    /// room is counted when it is routed.
    fn count_from_cell(&mut self, payload_bytes: usize) {
        self.hot.in_cell.inc();
        self.hot.bytes_in_cell.inc_by(payload_bytes as u64);
    }

    /// Whether every link `dispatch` goes to has room for a message of `size` bytes.
    fn dispatch_has_room(&self, dispatch: &Dispatch, size: usize) -> bool {
        let limit = self.args.link_buffer_bytes;
        self.cells_have_room(&dispatch.local, size)
            && dispatch.peers().iter().all(|(peer, targets)| {
                self.peers
                    .get(peer)
                    .is_none_or(|p| p.outbox.has_room(size + 64 + 20 * targets.len(), limit))
            })
    }

    fn cells_have_room(&self, cells: &[Thid], size: usize) -> bool {
        let limit = self.args.link_buffer_bytes;
        cells.iter().all(|id| {
            self.cells
                .get(id)
                .is_none_or(|c| c.events == Events::Pub || c.outbox.has_room(size + 64, limit))
        })
    }

    /// Most bytes of batches one source may have held: more than a sidecar keeps
    /// unacknowledged, so only a sender that ignores acknowledgements reaches it.
    fn held_limit(&self) -> usize {
        self.args.link_buffer_bytes.max(8 << 20)
    }

    /// Holds a batch its source cannot route now (or must not, behind a batch it already
    /// has held: its messages keep their order).
    fn hold(&mut self, source: Source, identity: &Bytes, batch: HeldBatch, progress: Progress) {
        let already = self.held_sources.get(&source).copied();
        let held = already.unwrap_or(0) + batch.bytes();
        self.held_sources.insert(source, held);
        self.held.push_back(Held {
            source,
            identity: identity.clone(),
            batch,
            progress,
            since: Instant::now(),
        });
        if already.is_some() && held > self.held_limit() {
            self.resume_held(Some(source));
        }
    }

    /// Routes held batches whose links have room again, in order per source. A batch held
    /// past the expiry, and every batch of `force`, is routed whatever the room.
    fn resume_held(&mut self, force: Option<Source>) {
        let now = Instant::now();
        let expired = |h: &Held| now.duration_since(h.since) > self.expiry;
        // The front is the oldest: nothing to do unless room was freed or it expired.
        match self.held.front() {
            None => return,
            Some(front) if force.is_none() && !self.room_freed && !expired(front) => return,
            _ => {}
        }
        self.room_freed = false;
        let mut blocked: Vec<Source> = Vec::new();
        let mut keep = VecDeque::new();
        for mut h in std::mem::take(&mut self.held) {
            if blocked.contains(&h.source) {
                keep.push_back(h);
                continue;
            }
            let forced = force == Some(h.source) || now.duration_since(h.since) > self.expiry;
            if self.route_held(&mut h, forced).is_err() {
                blocked.push(h.source);
                keep.push_back(h);
            }
        }
        self.held = keep;
        self.held_sources.clear();
        for h in &self.held {
            *self.held_sources.entry(h.source).or_default() += h.batch.bytes();
        }
    }

    /// Forgets the batches held from `source` (its connection is gone).
    fn forget_held(&mut self, source: Source) {
        self.held.retain(|h| h.source != source);
        self.held_sources.remove(&source);
        self.room_freed = true;
    }

    /// Routes the rest of a held batch (see `route_publishes`, `route_forwards`).
    fn route_held(&mut self, h: &mut Held, force: bool) -> Result<(), NoRoom> {
        match (&h.batch, h.source) {
            (HeldBatch::Publish(parts), Source::Cell(id)) => {
                let (first, head) = decode_publishes(&parts[0]).expect("checked on arrival");
                let rest = parts[1..]
                    .iter()
                    .map(|p| decode_publish_records(p).expect("checked on arrival"));
                let records = std::iter::once(head).chain(rest).flatten();
                self.route_publishes(id, &h.identity, first, records, &mut h.progress, force)
            }
            (HeldBatch::Forward(body), Source::Peer(peer)) => {
                let (batch, envelopes) = decode_envelopes(body).expect("checked on arrival");
                let size = body.len();
                self.route_forwards(
                    peer,
                    &h.identity,
                    batch,
                    size,
                    envelopes,
                    &mut h.progress,
                    force,
                )
            }
            _ => unreachable!("a cell's batch is a PUBS, a peer's a FWRD"),
        }
    }

    /// Routes the publishes of cell `id`'s batch from `p.done` on and acknowledges the
    /// batch; stops where a link has no room for the next message, unless `force`.
    fn route_publishes<'a>(
        &mut self,
        id: Thid,
        identity: &Bytes,
        first: u64,
        records: impl Iterator<Item = Publish<'a>>,
        p: &mut Progress,
        force: bool,
    ) -> Result<(), NoRoom> {
        self.table.start_batch();
        for (i, m) in records.enumerate().skip(p.done) {
            let seq = first + i as u64;
            let n = self.publish(
                id,
                seq,
                m.ts,
                m.kind,
                m.channel,
                m.payload,
                &mut p.dests,
                !force,
            )?;
            p.counts.push(n);
            p.done += 1;
        }
        if let Some(cell) = self.cells.get_mut(&id) {
            cell.last_seq = cell.last_seq.max(first + p.done as u64);
        }
        let mut reply = ZmqMessage::from(identity.clone());
        reply.push_back(CommandFrame::new(Encoding::Binary, cmd::ACKS, Bytes::new()).to_bytes());
        reply.push_back(encode_acks(first, &p.counts));
        self.ack_when_clear(identity, reply, std::mem::take(&mut p.dests));
        Ok(())
    }

    /// Delivers the messages of `peer`'s `FWRD` batch (`size` bytes) from `p.done` on and
    /// acknowledges the batch; stops where a cell has no room for the next message, unless
    /// `force`.
    #[allow(clippy::too_many_arguments)]
    fn route_forwards(
        &mut self,
        peer: PeerId,
        identity: &Bytes,
        batch: u64,
        size: usize,
        envelopes: Envelopes<'_>,
        p: &mut Progress,
        force: bool,
    ) -> Result<(), NoRoom> {
        let mut local = std::mem::take(&mut self.scratch);
        let mut stopped = None;
        for e in envelopes.skip(p.done) {
            self.table
                .deliver_forwarded(e.kind, e.channel, e.targets(), &mut local);
            if !force && !self.cells_have_room(&local, e.channel.len() + e.payload.len()) {
                stopped = Some(NoRoom);
                break;
            }
            self.hot.in_peer.inc();
            self.hot.bytes_in_peer.inc_by(e.payload.len() as u64);
            if e.kind == Kind::Shard {
                self.count_room_message(e.channel);
            }
            for cell in &local {
                self.deliver_local(
                    *cell,
                    e.kind,
                    &e.origin,
                    e.seq,
                    e.ts,
                    e.channel,
                    e.payload,
                    &mut p.dests,
                );
            }
            p.done += 1;
        }
        self.scratch = local;
        if let Some(no_room) = stopped {
            return Err(no_room);
        }
        if self.ack_must_wait(identity, &p.dests) {
            let reply = reply_json(identity, cmd::FACK, &wire::Credit { batch });
            self.defer_ack(identity, reply, std::mem::take(&mut p.dests));
        } else if let Some(peer) = self.peers.get_mut(&peer) {
            // Nothing to hold it back: acknowledged with the next ones, or at the next
            // tick (a FACK credits every batch before it too).
            peer.fack.received(batch, size);
            if let Some(batch) = peer.fack.take(false) {
                self.replies
                    .push(reply_json(identity, cmd::FACK, &wire::Credit { batch }));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver_local(
        &mut self,
        id: Thid,
        kind: Kind,
        origin: &Thid,
        seq: u64,
        ts: u64,
        channel: &[u8],
        payload: &[u8],
        dests: &mut Vec<Dest>,
    ) {
        let limit = self.args.link_buffer_bytes;
        let Some(cell) = self.cells.get_mut(&id) else {
            return;
        };
        if cell.events == Events::Pub {
            let mut m = ZmqMessage::from(Bytes::from(id.to_hex()));
            m.push_back(Bytes::copy_from_slice(channel));
            m.push_back(Bytes::copy_from_slice(payload));
            // Best effort, as PUB is: the zeromq crate drops when a subscriber lags.
            let _ = self.publisher.send(m).now_or_never();
            self.hot.out_pub.inc();
            self.hot.bytes_out_pub.inc_by(payload.len() as u64);
            return;
        }
        if !cell
            .outbox
            .has_room(payload.len() + channel.len() + 64, limit)
        {
            self.metrics
                .drops
                .with_label_values(&["cell_backlog"])
                .inc();
            return;
        }
        cell.outbox
            .writer
            .push(kind, origin, seq, ts, channel, payload, &[]);
        self.hot.out_cell.inc();
        self.hot.bytes_out_cell.inc_by(payload.len() as u64);
        if !dests.contains(&Dest::Cell(id)) {
            dests.push(Dest::Cell(id));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        peer: PeerId,
        kind: Kind,
        origin: &Thid,
        seq: u64,
        ts: u64,
        channel: &[u8],
        payload: &[u8],
        targets: &[Thid],
        dests: &mut Vec<Dest>,
    ) {
        let limit = self.args.link_buffer_bytes;
        let Some(p) = self.peers.get_mut(&peer) else {
            self.metrics.drops.with_label_values(&["peer_lost"]).inc();
            return;
        };
        if !p.outbox.has_room(
            payload.len() + channel.len() + 64 + 20 * targets.len(),
            limit,
        ) {
            self.metrics
                .drops
                .with_label_values(&["peer_backlog"])
                .inc();
            return;
        }
        p.outbox
            .writer
            .push(kind, origin, seq, ts, channel, payload, targets);
        self.hot.out_peer.inc();
        self.hot.bytes_out_peer.inc_by(payload.len() as u64);
        if !dests.contains(&Dest::Peer(peer)) {
            dests.push(Dest::Peer(peer));
        }
    }

    fn ack_when_clear(&mut self, identity: &Bytes, reply: ZmqMessage, dests: Vec<Dest>) {
        if self.ack_must_wait(identity, &dests) {
            self.defer_ack(identity, reply, dests);
        } else {
            self.replies.push(reply);
        }
    }

    /// Whether an acknowledgement for `identity` must wait: a link the work it answers
    /// fed is congested, or one for the same connection already waits (acknowledgements
    /// keep their order).
    fn ack_must_wait(&self, identity: &Bytes, dests: &[Dest]) -> bool {
        self.any_congested(dests) || self.deferred.iter().any(|d| d.identity == *identity)
    }

    fn defer_ack(&mut self, identity: &Bytes, reply: ZmqMessage, dests: Vec<Dest>) {
        self.deferred.push(Deferred {
            identity: identity.clone(),
            reply,
            dests,
            since: Instant::now(),
        });
    }

    fn any_congested(&self, dests: &[Dest]) -> bool {
        let hw = self.high_water();
        dests.iter().any(|d| match d {
            Dest::Cell(id) => self.cells.get(id).is_some_and(|c| c.outbox.congested(hw)),
            Dest::Peer(p) => self.peers.get(p).is_some_and(|p| p.outbox.congested(hw)),
        })
    }

    /// Messages from a peer's DEALER, on our ROUTER.
    fn on_peer_inbound(
        &mut self,
        peer: PeerId,
        identity: &Bytes,
        frame: CommandFrame,
        body: Option<Bytes>,
    ) -> Result<(), FrameError> {
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some((_, heard)) = p.inbound.as_mut() {
                *heard = Instant::now();
            }
        }
        let at = Location::Peer(peer);
        match &frame.cmd {
            cmd::PING => self
                .replies
                .push(reply_json(identity, cmd::PONG, &serde_json::json!({}))),
            cmd::CELL => {
                let info: wire::CellInfo = frame.decode_json()?;
                let body = body.ok_or_else(|| FrameError::MissingPayload("CELL".into()))?;
                let subs = wire::decode_interest(body)?;
                self.table
                    .replace(at, info.id, &info.service, &info.rules, &subs);
            }
            cmd::CGON => {
                let gone: wire::CellGone = frame.decode_json()?;
                self.table.remove_cell(at, gone.id);
            }
            cmd::SYNC => {
                // Everything before it on this connection has been applied.
                let round: wire::SyncRound = frame.decode_json()?;
                self.replies.push(reply_json(identity, cmd::SYND, &round));
            }
            cmd::FWRD => {
                let body = body.ok_or_else(|| FrameError::MissingPayload("FWRD".into()))?;
                let (batch, envelopes) = decode_envelopes(&body)?;
                let source = Source::Peer(peer);
                let mut progress = Progress::default();
                if self.held_sources.contains_key(&source)
                    || self
                        .route_forwards(
                            peer,
                            identity,
                            batch,
                            body.len(),
                            envelopes,
                            &mut progress,
                            false,
                        )
                        .is_err()
                {
                    self.hold(source, identity, HeldBatch::Forward(body), progress);
                }
            }
            cmd::LEAV => {
                tracing::info!(peer = %self.peers[&peer].name, "peer left");
                self.forget_peer(peer, true);
            }
            cmd::PEER => {
                // A re-introduction on the same connection: handled like a new one.
                self.peer_identities.remove(identity);
                return self.on_cell(identity, frame, body, VecDeque::new());
            }
            _ => return Err(FrameError::UnknownCommand(frame.cmd_str().to_string())),
        }
        Ok(())
    }

    fn peer_id(&mut self, name: &str) -> PeerId {
        if let Some(&id) = self.peer_ids.get(name) {
            return id;
        }
        let id = self.next_peer;
        self.next_peer += 1;
        self.peer_ids.insert(name.to_string(), id);
        self.peers.insert(
            id,
            Peer {
                name: name.to_string(),
                instance: None,
                command: None,
                outbox: Outbox::default(),
                out: None,
                generation: 0,
                connecting: false,
                inbound: None,
                fack: Credit::default(),
                left: None,
            },
        );
        id
    }

    /// Drops everything about a peer: its cells, our link to it. With `left`, the same
    /// instance is not reconnected even while the rendezvous still lists it.
    fn forget_peer(&mut self, peer: PeerId, left: bool) {
        self.forget_held(Source::Peer(peer));
        let removed = self.table.remove_location(Location::Peer(peer));
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.out = None;
        let lost = p.outbox.unconfirmed_messages();
        p.outbox = Outbox::default();
        if lost > 0 {
            self.metrics
                .drops
                .with_label_values(&["peer_lost"])
                .inc_by(lost as u64);
        }
        if let Some((identity, _)) = p.inbound.take() {
            self.peer_identities.remove(&identity);
        }
        p.fack = Credit::default();
        self.interest_sync.forget(peer);
        if left {
            p.left = p.instance;
        }
        p.generation += 1;
        p.connecting = false;
        tracing::debug!(peer = %p.name, removed, "peer forgotten");
        self.update_peer_gauge();
    }

    fn update_peer_gauge(&self) {
        let n = self.peers.values().filter(|p| p.out.is_some()).count();
        self.metrics.peers.set(n as i64);
    }

    fn drop_cell(&mut self, id: Thid, why: &str) {
        // Its held batches go too: its sidecar sends what was not acknowledged again.
        self.forget_held(Source::Cell(id));
        if let Some(cell) = self.cells.remove(&id) {
            self.identities.remove(&cell.identity);
            let lost = cell.outbox.unconfirmed_messages();
            if lost > 0 && why != "quit" {
                self.metrics
                    .drops
                    .with_label_values(&["cell_lost"])
                    .inc_by(lost as u64);
            }
            tracing::info!(cell = %id, why, "cell left");
        }
        self.table.remove_cell(Location::Local, id);
        self.dirty.insert(id);
        self.metrics.cells.set(self.cells.len() as i64);
    }

    fn on_event(&mut self, ev: Event) {
        // Peers' credits (FACK) and links coming and going arrive here: any may make
        // room for held batches.
        self.room_freed = true;
        match ev {
            Event::Discovered(list) => self.on_discovered(list),
            Event::Hosting(rooms) => self.on_hosting(rooms),
            Event::PeerConnected {
                peer,
                generation,
                sender,
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.generation != generation {
                    return;
                }
                p.connecting = false;
                let lost = p.outbox.reset_inflight();
                self.metrics
                    .drops
                    .with_label_values(&["peer_lost"])
                    .inc_by(lost as u64);
                p.out = Some(PeerOut {
                    sender,
                    last_heard: Instant::now(),
                    synced: false,
                });
                self.update_peer_gauge();
            }
            Event::PeerConnectFailed { peer, generation } => {
                if let Some(p) = self
                    .peers
                    .get_mut(&peer)
                    .filter(|p| p.generation == generation)
                {
                    p.connecting = false;
                }
            }
            Event::PeerClosed { peer, generation } => {
                if let Some(p) = self
                    .peers
                    .get_mut(&peer)
                    .filter(|p| p.generation == generation)
                {
                    tracing::info!(peer = %p.name, "link to peer closed");
                    p.out = None;
                    p.generation += 1;
                    self.update_peer_gauge();
                }
            }
            Event::PeerReply {
                peer,
                generation,
                msg,
            } => {
                let Some(p) = self
                    .peers
                    .get_mut(&peer)
                    .filter(|p| p.generation == generation)
                else {
                    return;
                };
                let Some(out) = p.out.as_mut() else { return };
                out.last_heard = Instant::now();
                let Some(frame) = msg.get(0).and_then(|f| CommandFrame::parse(f).ok()) else {
                    self.metrics.malformed.inc();
                    return;
                };
                match &frame.cmd {
                    cmd::FACK => {
                        if let Ok(credit) = frame.decode_json::<wire::Credit>() {
                            p.outbox.credit(credit.batch);
                        }
                    }
                    cmd::PWLC => {
                        if let Ok(hello) = frame.decode_json::<wire::PeerHello>() {
                            p.instance.get_or_insert(hello.id);
                        }
                    }
                    cmd::SYND => {
                        if let Ok(r) = frame.decode_json::<wire::SyncRound>() {
                            self.interest_sync.answered(peer, r.round);
                        }
                    }
                    cmd::PONG => {}
                    cmd::ERRR => {
                        tracing::warn!(peer = %p.name, "peer error: {}", String::from_utf8_lossy(&frame.payload))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Room messages routed here, by room.
    fn count_room_message(&self, channel: &[u8]) {
        let room = room_of(channel);
        match std::str::from_utf8(room)
            .ok()
            .and_then(|r| self.rooms.get(r))
        {
            Some(hosted) => hosted.messages.inc(),
            None => self
                .metrics
                .room_messages
                .with_label_values(&[&*String::from_utf8_lossy(room)])
                .inc(),
        }
    }

    /// The rendezvous says which rooms to host (and with whom). Rooms are only ever added
    /// here: a host gives its rooms up by draining or stopping, when its cells move.
    fn on_hosting(&mut self, placements: Vec<Placement>) {
        if self.draining.is_some() {
            return;
        }
        let mut added = false;
        for p in placements {
            match self.rooms.get_mut(&p.room) {
                Some(hosted) => hosted.hosts = p.hosts,
                None => {
                    tracing::info!(room = %p.room, hosts = ?p.hosts, "hosting room");
                    let messages = self.metrics.room_messages.with_label_values(&[&p.room]);
                    self.rooms.insert(
                        p.room,
                        HostedRoom {
                            hosts: p.hosts,
                            messages,
                        },
                    );
                    added = true;
                }
            }
        }
        if added {
            self.metrics.rooms.set(self.rooms.len() as i64);
            self.update_announcement();
        }
    }

    /// What the next announcement says. Rooms and draining are sent at once; the rest
    /// goes with the next interval.
    fn update_announcement(&self) {
        let mut rooms: Vec<String> = self.rooms.keys().cloned().collect();
        rooms.sort();
        let cells = self.cells.len() as u32;
        let draining = self.draining.is_some();
        let rate = self.rate;
        self.announcement.send_if_modified(|a| {
            let urgent = a.rooms != rooms || a.info.draining != draining;
            a.info.cells = cells;
            a.info.rate = rate;
            a.info.draining = draining;
            a.info.rooms = rooms.len() as u32;
            a.rooms = rooms;
            urgent
        });
    }

    fn on_discovered(&mut self, list: Vec<TransmitterInfo>) {
        for info in list {
            if info.name == self.args.name {
                continue;
            }
            let peer = self.peer_id(&info.name);
            let p = self.peers.get_mut(&peer).expect("peer_id creates");
            if p.left == Some(info.id) {
                continue;
            }
            if p.out.is_some() && p.instance.is_some_and(|i| i != info.id) {
                // Restarted since we connected: the old link is dead even if it says nothing.
                tracing::info!(peer = %p.name, "peer restarted; reconnecting");
                self.metrics.peer_reconnects.inc();
                p.out = None;
                p.generation += 1;
                p.connecting = false;
            }
            p.instance = Some(info.id);
            p.command = Some(info.command.clone());
            if p.out.is_none() && !p.connecting {
                p.connecting = true;
                let generation = p.generation;
                let events = self.events_tx.clone();
                tokio::spawn(connect_peer(peer, generation, info.command, events));
            }
        }
        self.update_peer_gauge();
    }

    fn housekeeping(&mut self, now: Instant) {
        // What peers are owed.
        for p in self.peers.values_mut() {
            if let (Some((identity, _)), Some(batch)) = (&p.inbound, p.fack.take(true)) {
                self.replies
                    .push(reply_json(identity, cmd::FACK, &wire::Credit { batch }));
            }
        }
        // Cells that went silent.
        let silent: Vec<Thid> = self
            .cells
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_seen) > self.expiry)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            self.drop_cell(id, "expired");
        }
        // Peers whose DEALER to us went silent: their cells are unreachable.
        let silent: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.inbound
                    .as_ref()
                    .is_some_and(|(_, heard)| now.duration_since(*heard) > self.expiry)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in silent {
            tracing::info!(peer = %self.peers[&peer].name, "peer silent; forgetting its cells");
            self.forget_peer(peer, false);
        }
        // Our links to peers that stopped answering get rebuilt by the next discovery.
        for p in self.peers.values_mut() {
            if p.out
                .as_ref()
                .is_some_and(|o| now.duration_since(o.last_heard) > self.expiry)
            {
                tracing::info!(peer = %p.name, "peer not answering; dropping the link");
                p.out = None;
                self.metrics.peer_reconnects.inc();
                p.generation += 1;
                p.connecting = false;
            }
        }
        // Acknowledgements cannot wait for ever: past the expiry a congested link is
        // left to its drop limit.
        let expiry = self.expiry;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|d| now.duration_since(d.since) > expiry);
        self.deferred = waiting;
        self.replies.extend(ready.into_iter().map(|d| d.reply));
        // Heartbeats to peers (sent at the next flush); MOVE again to cells that have not
        // left a draining transmitter.
        self.ping_peers = true;
        if self.draining.is_some() {
            for cell in self.cells.values() {
                self.replies.push(reply_json(
                    &cell.identity,
                    cmd::MOVE,
                    &wire::Reason {
                        reason: "draining".into(),
                    },
                ));
            }
        }
        self.update_peer_gauge();
    }

    fn start_drain(&mut self) {
        if self.draining.is_some() {
            return;
        }
        tracing::info!(
            cells = self.cells.len(),
            "draining: moving cells to other transmitters"
        );
        self.draining = Some(Instant::now());
        self.update_announcement();
        for cell in self.cells.values() {
            self.replies.push(reply_json(
                &cell.identity,
                cmd::MOVE,
                &wire::Reason {
                    reason: "draining".into(),
                },
            ));
        }
    }

    /// Done draining: every cell moved, everything sent was taken (or time is up).
    fn drained(&self, now: Instant) -> bool {
        let Some(since) = self.draining else {
            return false;
        };
        if now.duration_since(since) > self.expiry * 4 {
            tracing::warn!(cells = self.cells.len(), "drain timed out");
            return true;
        }
        self.cells.is_empty()
            && self.deferred.is_empty()
            && self.held.is_empty()
            && self
                .peers
                .values()
                .all(|p| p.out.is_none() || p.outbox.idle())
    }

    async fn leave(&mut self) {
        for p in self.peers.values_mut() {
            if let Some(out) = p.out.as_mut() {
                let leav = ZmqMessage::from(
                    CommandFrame::json(cmd::LEAV, &serde_json::json!({})).to_bytes(),
                );
                let _ = out.sender.send(leav).await;
            }
        }
        // The zeromq crate writes from background tasks and has no linger option: give
        // them a moment to put LEAV on the wire before the process exits.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn peer_hello(&self) -> wire::PeerHello {
        wire::PeerHello {
            id: self.id,
            name: self.args.name.clone(),
            mesh: self.args.mesh.clone(),
        }
    }

    /// What peers must hear of local cell `id`: its whole interest (CELL), or that it is
    /// gone (CGON).
    fn interest_message(&self, id: Thid) -> ZmqMessage {
        match self.table.interest_of(&id) {
            Some((service, rules, subs)) => {
                let info = wire::CellInfo {
                    id,
                    service: service.to_string(),
                    rules: rules.to_vec(),
                };
                let mut m = ZmqMessage::from(CommandFrame::json(cmd::CELL, &info).to_bytes());
                m.push_back(wire::encode_interest(
                    subs.iter().map(|(op, k, n)| (*op, *k, &n[..])),
                ));
                m
            }
            None => {
                ZmqMessage::from(CommandFrame::json(cmd::CGON, &wire::CellGone { id }).to_bytes())
            }
        }
    }

    /// Sends everything that accumulated: interest changes, batches, replies.
    async fn flush(&mut self) {
        self.resume_held(None);
        self.metrics
            .held_bytes
            .set(self.held_sources.values().sum::<usize>() as i64);
        self.hot.flush();
        // Interest first, so a peer knows a cell before messages for it could arrive.
        if !self.dirty.is_empty() {
            let dirty: Vec<Thid> = self.dirty.drain().collect();
            let mut updates = Vec::with_capacity(dirty.len());
            for id in dirty {
                updates.push(self.interest_message(id));
            }
            for p in self.peers.values_mut() {
                if let Some(out) = p.out.as_mut().filter(|o| o.synced) {
                    for m in &updates {
                        let _ = out.sender.send(m.clone()).await;
                    }
                }
            }
        }
        // Peers connected since the last flush: introduce ourselves and send a snapshot.
        let unsynced: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.out.as_ref().is_some_and(|o| !o.synced))
            .map(|(id, _)| *id)
            .collect();
        for peer in unsynced {
            let hello = CommandFrame::json(cmd::PEER, &self.peer_hello());
            let mut msgs = vec![ZmqMessage::from(hello.to_bytes())];
            msgs.extend(
                self.table
                    .local_cells()
                    .map(|id| self.interest_message(*id)),
            );
            let out = self
                .peers
                .get_mut(&peer)
                .and_then(|p| p.out.as_mut())
                .expect("listed above");
            // Confirmations waiting for this peer are answered by the snapshot.
            let round = self.interest_sync.round();
            if !self.interest_sync.is_idle() && round > 0 {
                msgs.push(ZmqMessage::from(
                    CommandFrame::json(cmd::SYNC, &wire::SyncRound { round }).to_bytes(),
                ));
            }
            for m in msgs {
                let _ = out.sender.send(m).await;
            }
            out.synced = true;
        }
        self.sync_interest().await;
        self.report_linked();
        if std::mem::take(&mut self.ping_peers) {
            for p in self.peers.values_mut() {
                if let Some(out) = p.out.as_mut().filter(|o| o.synced) {
                    let ping = ZmqMessage::from(
                        CommandFrame::json(cmd::PING, &serde_json::json!({})).to_bytes(),
                    );
                    let _ = out.sender.send(ping).await;
                }
            }
        }
        // Acknowledgements are what publishers wait on: behind large batches they would
        // wait for those to be written, so under load they go first. Light batches go
        // first, as delivering them is then what a message waits on.
        let batched: usize = self
            .cells
            .values()
            .map(|c| c.outbox.writer.byte_len())
            .chain(self.peers.values().map(|p| p.outbox.writer.byte_len()))
            .sum();
        let replies_first = batched > REPLIES_FIRST_BYTES;
        if replies_first {
            self.send_replies().await;
        }
        // Batches to cells.
        let mut failed = Vec::new();
        for (id, cell) in self.cells.iter_mut() {
            if let Some((_, frame, _)) = cell.outbox.take_batch() {
                let mut m = ZmqMessage::from(cell.identity.clone());
                m.push_back(
                    CommandFrame::new(Encoding::Binary, cmd::DLVR, Bytes::new()).to_bytes(),
                );
                m.push_back(frame);
                if self.router.send(m).await.is_err() {
                    failed.push(*id);
                }
            }
        }
        for id in failed {
            self.drop_cell(id, "unreachable");
        }
        // Batches to peers.
        for p in self.peers.values_mut() {
            if let Some(out) = p.out.as_mut().filter(|o| o.synced) {
                if let Some((_, frame, _)) = p.outbox.take_batch() {
                    let mut m = ZmqMessage::from(
                        CommandFrame::new(Encoding::Binary, cmd::FWRD, Bytes::new()).to_bytes(),
                    );
                    m.push_back(frame);
                    if out.sender.send(m).await.is_err() {
                        tracing::info!(peer = %p.name, "send to peer failed; dropping the link");
                        p.out = None;
                        p.generation += 1;
                    }
                }
            }
        }
        if !replies_first {
            self.send_replies().await;
        }
    }

    /// Prints `LINKED {"peers": n}` when the number of peers with a ready link changes:
    /// `thynapse up` calls the mesh up once every transmitter is linked to every other.
    fn report_linked(&mut self) {
        let n = self
            .peers
            .values()
            .filter(|p| p.out.as_ref().is_some_and(|o| o.synced))
            .count();
        if self.linked_reported != Some(n) {
            self.linked_reported = Some(n);
            println!("LINKED {}", serde_json::json!({ "peers": n }));
        }
    }

    /// Asks every linked peer to confirm this turn's interest updates (they went out just
    /// before), and answers the cells whose updates every live peer has confirmed.
    async fn sync_interest(&mut self) {
        if self.interest_sync.is_idle() {
            return;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        if self.interest_sync.has_requests() {
            // Every live peer: one whose link is still being built can already route to
            // this cell (over its own link to us) and learns the change from the snapshot.
            let live: Vec<(PeerId, u64)> = self
                .peers
                .iter()
                .filter(|(_, p)| p.is_live())
                .map(|(id, p)| (*id, p.generation))
                .collect();
            if let Some(round) = self.interest_sync.start_round(live, now, &mut done) {
                let ask = ZmqMessage::from(
                    CommandFrame::json(cmd::SYNC, &wire::SyncRound { round }).to_bytes(),
                );
                for p in self.peers.values_mut() {
                    if let Some(out) = p.out.as_mut().filter(|o| o.synced) {
                        let _ = out.sender.send(ask.clone()).await;
                    }
                }
            }
        }
        let peers = &self.peers;
        let mut gave_up = Vec::new();
        self.interest_sync.complete(
            |(peer, generation)| {
                peers
                    .get(&peer)
                    .is_some_and(|p| p.generation == generation && p.is_live())
            },
            now,
            self.expiry,
            &mut done,
            &mut gave_up,
        );
        for why in gave_up {
            tracing::warn!(
                reason = why.label(),
                "subscription confirmed without every peer's answer"
            );
            self.metrics
                .sync_gave_up
                .with_label_values(&[why.label()])
                .inc();
        }
        for (identity, sync) in done {
            let answer = wire::SubsSync { sync: Some(sync) };
            self.replies.push(reply_json(&identity, cmd::SUBD, &answer));
        }
    }

    /// Acknowledgements whose links have room again, then all replies, in order.
    async fn send_replies(&mut self) {
        if !self.deferred.is_empty() {
            let deferred = std::mem::take(&mut self.deferred);
            let (ready, waiting): (Vec<_>, Vec<_>) = deferred
                .into_iter()
                .partition(|d| !self.any_congested(&d.dests));
            self.deferred = waiting;
            // Keep per-connection order: a later ack never overtakes a waiting one.
            let blocked: HashSet<Bytes> =
                self.deferred.iter().map(|d| d.identity.clone()).collect();
            for d in ready {
                if blocked.contains(&d.identity) {
                    self.deferred.push(d);
                } else {
                    self.replies.push(d.reply);
                }
            }
            self.deferred.sort_by_key(|d| d.since);
        }
        for m in std::mem::take(&mut self.replies) {
            let _ = self.router.send(m).await;
        }
    }
}

/// Connects a DEALER to a peer's command socket and relays what it answers to the loop.
/// A zeromq-crate DEALER never reconnects after its peer restarts, so a lost link ends
/// this task and the next discovery builds a new socket.
async fn connect_peer(
    peer: PeerId,
    generation: u64,
    endpoint: String,
    events: mpsc::Sender<Event>,
) {
    let mut options = SocketOptions::default();
    options.connect_timeout(Duration::from_secs(2));
    let mut socket = DealerSocket::with_options(options);
    if let Err(e) = socket.connect(&endpoint).await {
        tracing::debug!(%endpoint, "connecting to peer failed: {e}");
        let _ = events
            .send(Event::PeerConnectFailed { peer, generation })
            .await;
        return;
    }
    let (sender, mut receiver) = socket.split();
    if events
        .send(Event::PeerConnected {
            peer,
            generation,
            sender,
        })
        .await
        .is_err()
    {
        return;
    }
    loop {
        match receiver.recv().await {
            Ok(msg) => {
                if events
                    .send(Event::PeerReply {
                        peer,
                        generation,
                        msg,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(_) => {
                let _ = events.send(Event::PeerClosed { peer, generation }).await;
                return;
            }
        }
    }
}
