//! The transmitter's event loop: reads the ROUTER socket, peer replies and discovery
//! updates; routes; then flushes every pending batch at once. Messages arriving while a
//! batch is being built join it, so frames grow under load and stay single when idle.
//!
//! One concern a file: `cells` (the cell sessions: HELO, SUBS, PUBS, EVNT, CRED, QUIT),
//! `peers` (links to the other transmitters, interest sync, discovery), `dispatch`
//! (routing a message to local cells and peers, and holding what has no room), `interest`
//! (what peers must hear of our cells, and the confirmations of interest changes), `rooms`
//! (hosted rooms and announcements). The back-pressure bookkeeping is pure, in
//! `crate::backpressure`.

mod auth;
mod cells;
mod dispatch;
mod interest;
mod membership;
mod peers;
mod redeliver;
mod rooms;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
// foldhash: a fast, seeded hasher (the per-message maps are keyed by ids and channel
// names; SipHash was a visible share of the hot path).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use futures::{FutureExt, StreamExt};
use thynapse_protocol::auth::Verifier;
use thynapse_protocol::discovery::TransmitterInfo;
use thynapse_protocol::frame::{CommandFrame, Encoding, FrameError};
use thynapse_protocol::limits;
use thynapse_protocol::seal::Sealer;
use thynapse_protocol::wire::{self, cmd};
use thynapse_protocol::Thid;
use tokio::sync::{mpsc, watch};
use zeromq::{
    PubSocket, RouterSendHalf, RouterSocket, Socket, SocketOptions, SocketRecv, ZmqError,
    ZmqMessage,
};

use crate::backpressure::{DeferredAcks, HeldBatches};
use crate::gate::Gate;
use crate::interest_sync::InterestSync;
use crate::metrics::{Hot, Metrics};
use crate::routing::{Dispatch, PeerId, Table};
use crate::Args;
use cells::{Leaving, LocalCell};
use dispatch::HeldBatch;
use peers::Peer;
use rooms::{Announcement, HostedRoom, HostingFrom};
use thynapse_process::{Ready, Status, TransmitterReady};

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
    // Every line this process logs names it (`thynapse up` interleaves all its children's
    // logs); one thread runs every task, so the span entered here covers them all.
    let span = tracing::info_span!("transmitter", name = %args.name);
    let _named = span.enter();
    rt.block_on(serve(args))
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
    /// Acknowledgements waiting for congested links to drain.
    deferred: DeferredAcks<ZmqMessage>,
    /// Inbound batches waiting for room on the links they go to.
    held: HeldBatches<HeldBatch>,
    reports_tx: mpsc::Sender<Report>,
    metrics: Metrics,
    /// The per-message counters, flushed to `metrics` once per loop turn.
    hot: Hot,
    draining: Option<Instant>,
    expiry: Duration,
    heartbeat: Duration,
    dispatch: Dispatch,
    scratch: Vec<Thid>,
    /// Each rendezvous point's last complete membership: whether an idle peer lives.
    listings: HashMap<std::net::SocketAddr, membership::Listing>,
    /// When the event loop last turned: a longer pause than an expiry (SIGSTOP, a
    /// frozen VM) means peers waiting on us may have given up (`Transmitter::woke`).
    last_turn: Instant,
    routed: u64,
    rate: f64,
    rooms: HashMap<String, HostedRoom>,
    /// What each rendezvous point last said this transmitter hosts.
    hosting_from: HashMap<std::net::SocketAddr, HostingFrom>,
    /// Rooms not hosted here that got their own `room` label so far (bounded).
    unhosted_labels: HashSet<String>,
    announcement: watch::Sender<Announcement>,
    /// Cells waiting to hear that their interest reached every linked peer.
    interest_sync: InterestSync,
    /// Peers with a ready link, as last printed (`LINKED`, which `thynapse up` waits on).
    linked_reported: Option<usize>,
    /// Who proved what on each connection (when the mesh has a token).
    gate: Gate,
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

/// What the background tasks (peer links, discovery) report to the event loop.
pub(super) enum Report {
    PeerConnected {
        peer: PeerId,
        generation: u64,
        sender: thynapse_link::LinkSender,
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
    /// A rendezvous point's whole membership, complete: its names (None: the same as
    /// the last time). `partial`: the point may not have heard everyone yet.
    Listed {
        from: std::net::SocketAddr,
        names: Option<Vec<String>>,
        partial: bool,
    },
    /// A rendezvous point's whole list of the rooms this transmitter hosts.
    Hosting {
        from: std::net::SocketAddr,
        rooms: Vec<thynapse_protocol::discovery::Placement>,
    },
    /// A datagram from a rendezvous point's address that did not open (forged, replayed,
    /// or from a point without the token): counted as `refused_total{limit="auth"}`.
    RefusedDatagram,
}

/// Options of every socket of the transmitter: a peer that sends a message over the wire
/// limit is disconnected before anything is reserved for it (vendor/zeromq/PATCHED.md).
/// Those refusals are counted into `WIRE_OVERSIZED` (one process, one count), and
/// moved to `refused_total{limit="wire_message_bytes"}` at each heartbeat.
pub(super) fn socket_options(max_message_bytes: usize) -> SocketOptions {
    let mut options = SocketOptions::default();
    options
        .max_message_size(limits::wire_limit(max_message_bytes))
        .count_oversized(WIRE_OVERSIZED.clone());
    options
}

static WIRE_OVERSIZED: std::sync::LazyLock<std::sync::Arc<std::sync::atomic::AtomicU64>> =
    std::sync::LazyLock::new(Default::default);

async fn serve(args: Args) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let mut router = RouterSocket::with_options(socket_options(args.max_message_bytes));
    let command_ep = router
        .bind(&args.command_bind)
        .await
        .with_context(|| format!("binding the command socket to {}", args.command_bind))?;
    let mut publisher = PubSocket::with_options(socket_options(args.max_message_bytes));
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
        active: Vec::new(),
    });
    let tokens = match &args.token_file {
        Some(path) => thynapse_process::read_tokens(path).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!("no --token-file: this transmitter admits anyone who reaches it");
            Vec::new()
        }
    };
    let (reports_tx, mut reports_rx) = mpsc::channel(4096);
    let sealer = Sealer::peer(&tokens, &args.mesh);
    tokio::spawn(rooms::announce(
        args.clone(),
        sealer,
        info_rx,
        reports_tx.clone(),
    ));
    let verifier = Verifier::new(tokens);
    let gate = Gate::new(verifier, &args.mesh, &command).requiring_encryption(args.encrypt);
    // Connections closing: a peer killed closes both of its links at once.
    let mut router_events = router.monitor();
    let (router_tx, mut router_rx) = router.split();
    let mut t = Transmitter::new(
        args,
        id,
        event.clone(),
        router_tx,
        publisher,
        metrics,
        reports_tx,
        info_tx,
    );
    t.gate = gate;
    let heartbeat = t.heartbeat;
    Status::Ready(Ready::Transmitter(TransmitterReady {
        name: t.args.name.clone(),
        id,
        command: command.clone(),
        event: event.clone(),
        metrics: metrics_url.clone(),
    }))
    .print();
    tracing::info!(name = %t.args.name, %command, %event, "transmitter ready");

    let mut stop_signals = thynapse_telemetry::StopSignals::new()?;
    let mut tick = tokio::time::interval(heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();

    loop {
        let mut more_waiting = false;
        tokio::select! {
            biased;
            msg = router_rx.recv() => {
                let msg = msg.context("command socket closed")?;
                t.woke(Instant::now());
                let mut bytes = t.on_router(msg);
                let mut n = 1;
                while n < MAX_BURST && bytes < MAX_BURST_BYTES {
                    match router_rx.recv().now_or_never() {
                        Some(Ok(msg)) => { bytes += t.on_router(msg); n += 1; }
                        _ => break,
                    }
                }
                more_waiting = n == MAX_BURST || bytes >= MAX_BURST_BYTES;
                while let Ok(report) = reports_rx.try_recv() {
                    t.on_report(report);
                }
            }
            Some(event) = router_events.next() => {
                if let zeromq::SocketEvent::Disconnected(identity) = event {
                    t.on_disconnected(&Bytes::from(identity));
                }
            }
            Some(report) = reports_rx.recv() => {
                t.woke(Instant::now());
                t.on_report(report);
                while let Ok(report) = reports_rx.try_recv() {
                    t.on_report(report);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                t.woke(now);
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
            _ = stop_signals.recv() => t.start_drain(),
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

impl Transmitter {
    /// A transmitter with no cell, peer or room yet, on sockets already set up.
    #[allow(clippy::too_many_arguments)]
    fn new(
        args: Args,
        id: Thid,
        pub_endpoint: String,
        router: RouterSendHalf,
        publisher: PubSocket,
        metrics: Metrics,
        reports_tx: mpsc::Sender<Report>,
        announcement: watch::Sender<Announcement>,
    ) -> Self {
        let heartbeat = Duration::from_millis(args.announce_interval_ms);
        let expiry = heartbeat * args.expiry_multiplier;
        Transmitter {
            id,
            pub_endpoint,
            router,
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
            deferred: DeferredAcks::default(),
            held: HeldBatches::default(),
            reports_tx,
            hot: Hot::new(&metrics),
            metrics,
            draining: None,
            expiry,
            heartbeat,
            dispatch: Dispatch::default(),
            scratch: Vec::new(),
            listings: HashMap::new(),
            last_turn: Instant::now(),
            routed: 0,
            rate: 0.0,
            rooms: HashMap::new(),
            hosting_from: HashMap::new(),
            unhosted_labels: HashSet::new(),
            announcement,
            interest_sync: InterestSync::default(),
            linked_reported: None,
            gate: Gate::default(),
            args,
        }
    }

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
        let Some(mut frames) = self.open_sealed(&identity, frames) else {
            return size;
        };
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
        if !self.admit(&identity, &frame) {
            return size;
        }
        // Anything but data may make room for held batches (credits, receivers leaving,
        // interest changes); trying them again is cheap next to routing.
        if ![cmd::PUBS, cmd::FWRD, cmd::EVNT].contains(&&frame.cmd) {
            self.held.room_freed();
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

    /// Once per half heartbeat: liveness of cells and peers, credits owed, acknowledgements
    /// that waited long enough, heartbeats, and MOVE again to cells that have not left a
    /// draining transmitter.
    fn housekeeping(&mut self, now: Instant) {
        self.expire_cells(now);
        self.prune_gate(now);
        self.peer_housekeeping(now);
        let oversized = WIRE_OVERSIZED.swap(0, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .refused
            .with_label_values(&["wire_message_bytes"])
            .inc_by(oversized);
        // Acknowledgements cannot wait for ever: past the expiry a congested link is
        // left to its drop limit.
        self.deferred.expire(now, self.expiry, &mut self.replies);
        // A link may have become stuck since: held batches are tried again.
        self.held.room_freed();
        if self.draining.is_some() {
            self.ask_cells_to_move();
        }
    }

    fn ask_cells_to_move(&mut self) {
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
        self.ask_cells_to_move();
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

    /// Sends everything that accumulated: interest changes, batches, replies.
    async fn flush(&mut self) {
        self.resume_held(None);
        self.metrics.held_bytes.set(self.held.bytes() as i64);
        self.hot.flush();
        // Interest first, so a peer knows a cell before messages for it could arrive.
        self.send_interest().await;
        // Acknowledgements are what publishers wait on: behind large batches they would
        // wait for those to be written, so under load they go first. Light batches go
        // first, as delivering them is then what a message waits on.
        let batched: usize = self
            .cells
            .values()
            .map(|c| c.outbox.unsent_bytes())
            .chain(self.peers.values().map(|p| p.outbox.unsent_bytes()))
            .sum();
        let replies_first = batched > REPLIES_FIRST_BYTES;
        if replies_first {
            self.send_replies().await;
        }
        // Batches to cells.
        let mut failed = Vec::new();
        for (id, cell) in self.cells.iter_mut() {
            while let Some((_, frame, _)) = cell.outbox.take_batch() {
                let mut m = ZmqMessage::from(cell.identity.clone());
                m.push_back(
                    CommandFrame::new(Encoding::Binary, cmd::DLVR, Bytes::new()).to_bytes(),
                );
                m.push_back(frame);
                let Some(m) = self.gate.seal(m) else {
                    failed.push(*id);
                    break;
                };
                if let Err(e) = self.router.try_send(m).await {
                    if matches!(e, ZmqError::BufferFull(_)) {
                        self.metrics
                            .refused
                            .with_label_values(&["send_queue"])
                            .inc();
                    }
                    failed.push(*id);
                    break;
                }
            }
        }
        for id in failed {
            self.drop_cell(id, Leaving::Unreachable);
        }
        self.send_peer_batches().await;
        if !replies_first {
            self.send_replies().await;
        }
    }

    /// Acknowledgements whose links have room again, then all replies, in order.
    async fn send_replies(&mut self) {
        self.release_acks();
        for m in std::mem::take(&mut self.replies) {
            let identity = m.get(0).cloned();
            let Some(m) = self.gate.seal(m) else {
                continue;
            };
            if let Err(ZmqError::BufferFull(_)) = self.router.try_send(m).await {
                // It asked for replies and read none: disconnected by the socket, and
                // forgotten here (its sidecar, if it has one, joins again).
                self.metrics
                    .refused
                    .with_label_values(&["send_queue"])
                    .inc();
                let cell = identity.and_then(|i| self.identities.get(&i).copied());
                if let Some(id) = cell {
                    self.drop_cell(id, Leaving::Unreachable);
                }
            }
        }
    }

    /// Moves the deferred acknowledgements whose links are no longer congested to the
    /// replies, in order.
    fn release_acks(&mut self) {
        let mut deferred = std::mem::take(&mut self.deferred);
        let mut released = Vec::new();
        deferred.release(|dests| self.any_congested(dests), &mut released);
        self.deferred = deferred;
        self.replies.extend(released);
    }
}

/// A transmitter without its event loop, for the tests of each job: what cells and peers
/// send goes in through `on_router` and `on_report`; what it would send is read from
/// `replies` and the outboxes (nothing is connected to its sockets). Needs a tokio runtime
/// (the PUB socket starts a task).
#[cfg(test)]
mod test_support {
    use super::*;
    use thynapse_protocol::batch::{Kind, PublishBatchWriter};
    use thynapse_protocol::wire::{Events, Interest, Op};

    /// The flags a transmitter gets by default (`link_buffer_bytes` 32 MiB, 500 ms
    /// heartbeat, expiry of three).
    pub(super) fn args() -> Args {
        Args::new("m", "t-0", &["udp://127.0.0.1:9".to_string()])
    }

    pub(super) fn transmitter(args: Args) -> Transmitter {
        let (router, _) = RouterSocket::new().split();
        let (reports_tx, _) = mpsc::channel(4096);
        let info = TransmitterInfo {
            name: args.name.clone(),
            id: Thid::random(),
            command: "tcp://127.0.0.1:1".into(),
            event: "tcp://127.0.0.1:2".into(),
            metrics: String::new(),
            cells: 0,
            rate: 0.0,
            draining: false,
            rooms: 0,
        };
        let (announcement, _) = watch::channel(Announcement {
            info,
            rooms: Vec::new(),
            active: Vec::new(),
        });
        Transmitter::new(
            args,
            Thid::random(),
            "tcp://127.0.0.1:2".into(),
            router,
            PubSocket::new(),
            Metrics::new(),
            reports_tx,
            announcement,
        )
    }

    /// A connection's identity on the ROUTER.
    pub(super) fn conn(n: u8) -> Bytes {
        Bytes::from(vec![0, n])
    }

    /// A message from connection `conn`.
    pub(super) fn inbound(conn: &Bytes, frames: impl IntoIterator<Item = Bytes>) -> ZmqMessage {
        let mut m = ZmqMessage::from(conn.clone());
        for f in frames {
            m.push_back(f);
        }
        m
    }

    /// Cell `id` says HELO on `conn` (a room session when `room` is given).
    pub(super) fn hello(t: &mut Transmitter, conn: &Bytes, id: Thid, room: Option<&str>) {
        let hello = wire::Hello {
            id,
            service: "s".into(),
            rules: Vec::new(),
            events: Events::Dealer,
            token: None,
            room: room.map(str::to_string),
        };
        t.on_router(inbound(
            conn,
            [CommandFrame::json(cmd::HELO, &hello).to_bytes()],
        ));
    }

    /// The cell on `conn` subscribes to `name` (with a confirmation number, `sync`).
    pub(super) fn subscribe(
        t: &mut Transmitter,
        conn: &Bytes,
        kind: Interest,
        name: &[u8],
        sync: Option<u64>,
    ) {
        let header = serde_json::to_vec(&wire::SubsSync { sync }).unwrap();
        let command = CommandFrame::new(Encoding::Binary, cmd::SUBS, header).to_bytes();
        let body = wire::encode_interest([(Op::Add, kind, name)]);
        t.on_router(inbound(conn, [command, body]));
    }

    /// The cell on `conn` publishes `payloads` on `channel`, numbered from `first_seq`,
    /// as one `PUBS` batch; returns the batch's bytes.
    pub(super) fn publish(
        t: &mut Transmitter,
        conn: &Bytes,
        first_seq: u64,
        kind: Kind,
        channel: &[u8],
        payloads: &[&[u8]],
    ) -> usize {
        let mut batch = PublishBatchWriter::new(first_seq);
        for p in payloads {
            batch.push(kind, 0, channel, p);
        }
        let body = batch.finish();
        let bytes = body.len();
        let command = CommandFrame::new(Encoding::Binary, cmd::PUBS, Bytes::new()).to_bytes();
        t.on_router(inbound(conn, [command, body]));
        bytes
    }

    /// The replies queued so far: to which connection, and the command.
    pub(super) fn replies(t: &Transmitter) -> Vec<(Bytes, String)> {
        t.replies
            .iter()
            .map(|m| {
                let f = CommandFrame::parse(m.get(1).unwrap()).unwrap();
                (m.get(0).unwrap().clone(), f.cmd_str().to_string())
            })
            .collect()
    }
}
