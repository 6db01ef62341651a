//! Links to the other transmitters. Each transmitter connects one DEALER to every peer it
//! discovers, introduces itself (`PEER`), sends its cells' interest (`CELL`, `CGON`),
//! pings, and confirms interest changes (`SYNC`/`SYND`, see `crate::interest_sync`); what
//! a peer sends us arrives on our ROUTER from its own DEALER.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use thynapse_link::LinkSender;
use thynapse_protocol::auth::ClientAuth;
use thynapse_protocol::batch::decode_envelopes;
use thynapse_protocol::credit::CreditOwed;
use thynapse_protocol::frame::{CommandFrame, Encoding, FrameError};
use thynapse_protocol::wire::{self, cmd};
use thynapse_protocol::Thid;
use tokio::sync::mpsc;
use zeromq::{DealerSocket, Socket, SocketEvent, SocketOptions, ZmqMessage};

use super::dispatch::{Forwarded, HeldBatch};
use super::redeliver::Gone;
use super::{error_reply, reply_json, Report, Transmitter};
use crate::backpressure::{Link, Progress};
use crate::metrics::{DropReason, Forgotten};
use crate::outbox::Outbox;
use crate::routing::{Location, PeerId};

/// Our DEALER to a peer.
pub(super) struct PeerOut {
    pub(super) sender: LinkSender,
    pub(super) last_heard: Instant,
    /// Introduced and sent the interest snapshot: ready for updates and batches.
    pub(super) synced: bool,
    /// Something on this link waits for the peer (batches to credit, a SYNC round): it
    /// is pinged, and given up when silent for an expiry. An idle link costs nothing.
    pub(super) active: bool,
    pub(super) ping_due: bool,
}

pub(super) struct Peer {
    pub(super) name: String,
    /// Instance id of the peer as last announced or introduced.
    pub(super) instance: Option<Thid>,
    pub(super) command: Option<String>,
    /// Messages for the peer; kept while a link is (re)built, sent once it is synced.
    pub(super) outbox: Outbox,
    pub(super) out: Option<PeerOut>,
    /// Which link is current: reports from an older one are ignored.
    pub(super) generation: u64,
    pub(super) connecting: bool,
    /// Their DEALER on our ROUTER, and when we last heard from it.
    pub(super) inbound: Option<(Bytes, Instant)>,
    /// FWRD batches taken on that connection and not yet acknowledged (FACK).
    pub(super) fack: CreditOwed,
    /// They said LEAV; ignore announcements of this instance.
    pub(super) left: Option<Thid>,
    /// Its last instances replaced by newer ones: a lagging rendezvous point's listing of
    /// one of them is ignored.
    pub(super) retired: Vec<Thid>,
    /// Forgotten since no rendezvous point lists it (until it is listed or heard again).
    pub(super) unlisted: bool,
    /// When a rendezvous point last named it (a page, or a complete membership): it is
    /// forgotten only once unnamed for an expiry (`forget_unlisted`).
    pub(super) seen: Instant,
    /// No point names it any more: its link is pinged, and it is forgotten if that gets
    /// no answer (a point that lost its announcements is a hint, not a proof).
    pub(super) suspect: bool,
    /// Its link to us closed while ours stayed: when it links again it may have
    /// forgotten our cells, and is sent them again.
    pub(super) inbound_closed: bool,
}

/// Replaced instances remembered per peer.
const RETIRED_KEPT: usize = 4;

impl Peer {
    pub(super) fn new(name: &str) -> Self {
        Peer {
            name: name.to_string(),
            instance: None,
            command: None,
            outbox: Outbox::default(),
            out: None,
            generation: 0,
            connecting: false,
            inbound: None,
            fack: CreditOwed::default(),
            left: None,
            retired: Vec::new(),
            unlisted: false,
            seen: Instant::now(),
            suspect: false,
            inbound_closed: false,
        }
    }

    /// Drops our link to the peer; the next discovery builds a new one (the zeromq crate's
    /// DEALER never reconnects by itself).
    pub(super) fn drop_link(&mut self) {
        self.out = None;
        self.generation += 1;
        self.connecting = false;
    }

    /// Ready for interest updates and batches.
    pub(super) fn synced_out(&mut self) -> Option<&mut PeerOut> {
        self.out.as_mut().filter(|o| o.synced)
    }

    /// Linked, being linked, or linked to us: a peer that may route to our cells.
    pub(super) fn is_live(&self) -> bool {
        self.out.is_some() || self.connecting || self.inbound.is_some()
    }
}

/// Peers a transmitter knows at most: far above the 240 transmitters a mesh may have (the
/// CRD's `replicas` maximum), so every other one fits, and strangers' names are bounded.
pub(super) const MAX_PEERS: usize = 1_024;

impl Transmitter {
    /// The `FWRD` batches each linked peer is owed.
    pub(super) async fn send_peer_batches(&mut self) {
        for p in self.peers.values_mut() {
            if !p.out.as_ref().is_some_and(|o| o.synced) {
                continue;
            }
            while let Some((_, frame, _)) = p.outbox.take_batch() {
                let out = p.out.as_mut().expect("checked above");
                let mut m = ZmqMessage::from(
                    CommandFrame::new(Encoding::Binary, cmd::FWRD, Bytes::new()).to_bytes(),
                );
                m.push_back(frame);
                if out.sender.send(m).await.is_err() {
                    tracing::info!(peer = %p.name, "send to peer failed; dropping the link");
                    p.drop_link();
                    break;
                }
            }
        }
    }

    /// Messages from a peer's DEALER, on our ROUTER.
    pub(super) fn on_peer_inbound(
        &mut self,
        peer: PeerId,
        identity: &Bytes,
        frame: CommandFrame,
        body: Option<Bytes>,
    ) -> Result<(), FrameError> {
        let now = Instant::now();
        // Silence on a link is no sign of death any more (idle links are not pinged):
        // a peer that gave up on us forgot our link's identity (its messages are
        // answered UNKNOWN_CELL there), and one of us paused forgets every peer on
        // waking (`woke`).
        if let Some(p) = self.peers.get_mut(&peer) {
            p.suspect = false;
            if let Some((_, heard)) = p.inbound.as_mut() {
                *heard = now;
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
                let source = Link::Peer(peer);
                let mut progress = Progress::default();
                let forwarded = Forwarded {
                    batch,
                    size: body.len(),
                    envelopes,
                };
                let routed = !self.held.is_holding(source)
                    && self
                        .route_forwards(peer, identity, forwarded, &mut progress, false)
                        .is_ok();
                if !routed {
                    self.hold(source, identity, HeldBatch::Forward(body), progress);
                }
            }
            cmd::LEAV => {
                tracing::info!(peer = %self.peers[&peer].name, "peer left");
                self.forget_peer(peer, Forgotten::Left);
            }
            cmd::PEER => {
                // A re-introduction on the same connection: handled like a new one.
                self.peer_identities.remove(identity);
                return self.on_peer_hello(identity, frame.decode_json()?);
            }
            _ => return Err(FrameError::UnknownCommand(frame.cmd_str().to_string())),
        }
        Ok(())
    }

    /// A transmitter introduces itself on our ROUTER (its DEALER to us).
    pub(super) fn on_peer_hello(
        &mut self,
        identity: &Bytes,
        hello: wire::PeerHello,
    ) -> Result<(), FrameError> {
        if !self.proved(identity, None) {
            self.refuse(
                identity,
                "PEER refused: this connection did not prove the mesh key (AUTH)",
            );
            return Ok(());
        }
        if hello.mesh != self.args.mesh {
            let error = format!("this transmitter is in mesh {:?}", self.args.mesh);
            self.replies.push(error_reply(identity, &error));
            return Ok(());
        }
        let Some(peer) = self.peer_id(&hello.name) else {
            self.metrics.refused.with_label_values(&["peers"]).inc();
            let error = format!("PEER refused: this transmitter knows {MAX_PEERS} peers, all live");
            self.replies.push(error_reply(identity, &error));
            return Ok(());
        };
        let p = self.peers.get_mut(&peer).expect("peer_id creates");
        if p.instance.is_some_and(|i| i != hello.id) {
            self.peer_restarted(peer);
        }
        let p = self.peers.get_mut(&peer).expect("peer_id creates");
        p.instance = Some(hello.id);
        p.left = None;
        p.unlisted = false;
        let linked_again = match p.inbound.replace((identity.clone(), Instant::now())) {
            Some((old, _)) => {
                self.peer_identities.remove(&old);
                old != identity
            }
            None => std::mem::take(&mut p.inbound_closed),
        };
        if linked_again {
            // It may have forgotten our cells (it thought us gone, or was paused): it
            // hears them again, on our link to it.
            if let Some(out) = p.out.as_mut() {
                out.synced = false;
            }
        }
        p.fack = CreditOwed::default();
        self.peer_identities.insert(identity.clone(), peer);
        self.replies
            .push(reply_json(identity, cmd::PWLC, &self.peer_hello()));
        Ok(())
    }

    /// The number of the peer called `name`, known from now on; `None` when `MAX_PEERS`
    /// are known and none of them can be let go (every one linked or linking).
    pub(super) fn peer_id(&mut self, name: &str) -> Option<PeerId> {
        if let Some(&id) = self.peer_ids.get(name) {
            return Some(id);
        }
        if self.peers.len() >= MAX_PEERS {
            // Names come from the rendezvous and from anyone who says PEER: a known peer
            // that is neither linked nor linking (forgotten, gone) makes room.
            let idle = self
                .peers
                .iter()
                .find(|(_, p)| !p.is_live() && p.outbox.idle())
                .map(|(id, _)| *id)?;
            let gone = self.peers.remove(&idle).expect("found above");
            self.peer_ids.remove(&gone.name);
            self.table.remove_location(Location::Peer(idle));
        }
        let id = self.next_peer;
        self.next_peer += 1;
        self.peer_ids.insert(name.to_string(), id);
        self.peers.insert(id, Peer::new(name));
        Some(id)
    }

    /// Drops everything about a peer: its cells, our link to it. With `left`, the same
    /// instance is not reconnected even while the rendezvous still lists it.
    pub(super) fn forget_peer(&mut self, peer: PeerId, why: Forgotten) {
        let known = self.table.cell_count(Location::Peer(peer)) > 0
            || self
                .peers
                .get(&peer)
                .is_some_and(|p| p.out.is_some() || p.inbound.is_some());
        if known {
            // Not one only being linked again (to a process that may be gone already).
            self.metrics
                .peers_forgotten
                .with_label_values(&[why.label()])
                .inc();
        }
        self.forget_held(Link::Peer(peer));
        let unconfirmed = match self.peers.get_mut(&peer) {
            Some(p) => p.outbox.take_unconfirmed(),
            None => Vec::new(),
        };
        let redelivery = self.plan_redelivery(Gone::Peer(peer), unconfirmed);
        let removed = self.table.remove_location(Location::Peer(peer));
        self.redeliver(redelivery, DropReason::PeerLost);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.drop_link();
        p.inbound_closed = false;
        if let Some((identity, _)) = p.inbound.take() {
            self.peer_identities.remove(&identity);
        }
        p.fack = CreditOwed::default();
        self.interest_sync.forget(peer);
        if why == Forgotten::Left {
            p.left = p.instance;
        }
        tracing::debug!(peer = %p.name, removed, "peer forgotten");
        self.update_peer_gauge();
    }

    /// A new instance of a peer: the old one's cells are gone (its anycatch messages go to
    /// other cells) and our link to it is dead even if it says nothing.
    pub(super) fn peer_restarted(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(old) = p.instance {
            if p.retired.len() == RETIRED_KEPT {
                p.retired.remove(0);
            }
            p.retired.push(old);
        }
        p.drop_link();
        let unconfirmed = p.outbox.take_unconfirmed();
        let redelivery = self.plan_redelivery(Gone::Peer(peer), unconfirmed);
        self.table.remove_location(Location::Peer(peer));
        self.redeliver(redelivery, DropReason::PeerLost);
    }

    /// A connection on our ROUTER closed. When it was a peer's link to us and ours to it
    /// is closed too, the peer is gone; otherwise it links again by itself (and a cell's
    /// sidecar, pinging, notices on its own).
    pub(super) fn on_disconnected(&mut self, identity: &Bytes) {
        let Some(peer) = self.peer_identities.remove(identity) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.inbound.as_ref().is_none_or(|(i, _)| i != identity) {
            return;
        }
        if p.out.is_none() && !p.connecting {
            tracing::info!(peer = %p.name, "both links to the peer closed; forgetting its cells");
            self.forget_peer(peer, Forgotten::Closed);
        } else {
            p.inbound = None;
            p.inbound_closed = true;
        }
    }

    pub(super) fn update_peer_gauge(&self) {
        let n = self.peers.values().filter(|p| p.out.is_some()).count();
        self.metrics.peers.set(n as i64);
    }

    pub(super) fn on_report(&mut self, report: Report) {
        // Peers' credits (FACK) and links coming and going arrive here: any may make
        // room for held batches.
        self.held.room_freed();
        match report {
            Report::Discovered(list) => self.on_discovered(list),
            Report::Hosting { from, rooms } => self.on_hosting(from, rooms),
            Report::RefusedDatagram => self.metrics.refused.with_label_values(&["auth"]).inc(),
            Report::Listed {
                from,
                names,
                partial,
            } => self.on_listed(from, names, partial),
            Report::PeerConnected {
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
                tracing::debug!(peer = %p.name, "linked");
                p.connecting = false;
                // The same instance (a restarted one was forgotten on the way): it
                // gets again what it never credited, and its cells drop what they had.
                p.outbox.resend_unconfirmed();
                p.out = Some(PeerOut {
                    sender,
                    last_heard: Instant::now(),
                    synced: false,
                    active: false,
                    ping_due: false,
                });
                self.update_peer_gauge();
            }
            Report::PeerConnectFailed { peer, generation } => {
                if let Some(p) = self
                    .peers
                    .get_mut(&peer)
                    .filter(|p| p.generation == generation)
                {
                    p.connecting = false;
                    if p.inbound_closed && p.inbound.is_none() {
                        // Both its links closed, ours while the other was still open,
                        // and it cannot be reached again: gone.
                        tracing::info!(peer = %p.name, "both links to the peer closed and it cannot be reached; forgetting its cells");
                        self.forget_peer(peer, Forgotten::Closed);
                    }
                }
            }
            Report::PeerClosed { peer, generation } => {
                if let Some(p) = self
                    .peers
                    .get_mut(&peer)
                    .filter(|p| p.generation == generation)
                {
                    if p.inbound.is_none() {
                        // Its link to us closed as well: the process is gone (a kill
                        // closes both at once). Waiting for the rendezvous to stop
                        // listing it would only delay its cells' messages.
                        tracing::info!(peer = %p.name, "both links to the peer closed; forgetting its cells");
                        self.forget_peer(peer, Forgotten::Closed);
                    } else {
                        tracing::info!(peer = %p.name, "link to peer closed");
                        p.drop_link();
                    }
                    self.update_peer_gauge();
                }
            }
            Report::PeerReply {
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
                p.suspect = false;
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
                        let unknown = frame
                            .decode_json::<wire::ErrorReply>()
                            .is_ok_and(|e| e.error.starts_with("unknown cell"));
                        if unknown {
                            // It forgot us (we were silent too long) while this link
                            // stayed up: rebuild it, so it hears PEER and our cells again.
                            tracing::warn!(peer = %p.name, "peer does not know us: relinking");
                            p.drop_link();
                        } else {
                            tracing::warn!(peer = %p.name, "peer error: {}", String::from_utf8_lossy(&frame.payload))
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub(super) async fn leave(&mut self) {
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

    pub(super) fn peer_hello(&self) -> wire::PeerHello {
        wire::PeerHello {
            id: self.id,
            name: self.args.name.clone(),
            mesh: self.args.mesh.clone(),
        }
    }
}

/// Connects a DEALER to a peer's command socket and relays what it answers to the loop.
/// A zeromq-crate DEALER never reconnects after its peer restarts, so a lost link ends
/// this task and the next discovery builds a new socket.
pub(super) async fn connect_peer(
    peer: PeerId,
    generation: u64,
    endpoint: String,
    mut options: SocketOptions,
    auth: Option<ClientAuth>,
    events: mpsc::Sender<Report>,
) {
    options.connect_timeout(Duration::from_secs(2));
    let mut socket = DealerSocket::with_options(options);
    let mut connected = socket
        .connect(&endpoint)
        .await
        .map(|()| None)
        .map_err(anyhow::Error::from);
    if let (Ok(_), Some(auth)) = (&connected, auth) {
        let wait = Duration::from_secs(2);
        connected = thynapse_link::authenticate(&mut socket, auth, wait).await;
        if let Err(e) = &connected {
            tracing::warn!(%endpoint, "peer not authenticated: {e:#}");
        }
    }
    let channel = match connected {
        Ok(channel) => channel,
        Err(e) => {
            tracing::debug!(%endpoint, "connecting to peer failed: {e:#}");
            let _ = events
                .send(Report::PeerConnectFailed { peer, generation })
                .await;
            return;
        }
    };
    // The crate's DEALER never ends a read when its peer goes (it waits for another):
    // its monitor says so.
    let mut events_of_socket = socket.monitor();
    let (sender, mut receiver) = thynapse_link::split(socket, channel);
    if events
        .send(Report::PeerConnected {
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
        let received = tokio::select! {
            received = receiver.recv() => received,
            event = events_of_socket.next() => match event {
                Some(SocketEvent::Disconnected(_)) | None => Err(anyhow::anyhow!("disconnected")),
                Some(_) => continue,
            },
        };
        match received {
            Ok(msg) => {
                if events
                    .send(Report::PeerReply {
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
            Err(e) => {
                tracing::debug!(%endpoint, "peer link closed: {e:#}");
                let _ = events.send(Report::PeerClosed { peer, generation }).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::membership::Listing;
    use super::super::test_support::*;
    use super::*;
    use std::time::Instant;
    use thynapse_protocol::batch::{decode_acks, Kind};
    use thynapse_protocol::discovery::{Datagram, TransmitterInfo};
    use thynapse_protocol::wire::{Interest, Op};

    fn info(name: &str, id: Thid) -> TransmitterInfo {
        TransmitterInfo {
            id,
            command: "tcp://127.0.0.1:1".into(),
            event: "tcp://127.0.0.1:2".into(),
            ..TransmitterInfo::named(name)
        }
    }

    /// Peer `name` (instance `id`) introduces itself on its DEALER to our ROUTER.
    fn peer_hello(t: &mut Transmitter, conn: &Bytes, name: &str, id: Thid) {
        let hello = wire::PeerHello {
            id,
            name: name.into(),
            mesh: t.args.mesh.clone(),
        };
        t.on_router(inbound(
            conn,
            [CommandFrame::json(cmd::PEER, &hello).to_bytes()],
        ));
    }

    /// A cell of service "s" behind the peer on `conn`, subscribed to `channel` (CELL).
    fn remote_cell(t: &mut Transmitter, conn: &Bytes, channel: &[u8]) {
        let header = serde_json::to_vec(&wire::CellInfo {
            id: Thid::random(),
            service: "s".into(),
            rules: Vec::new(),
        })
        .unwrap();
        let cell = CommandFrame::new(Encoding::Binary, cmd::CELL, header).to_bytes();
        let interest = wire::encode_interest([(Op::Add, Interest::Channel, channel)]);
        t.on_router(inbound(conn, [cell, interest]));
    }

    /// Our link to `peer` comes up (a DEALER connected to nothing: nothing is sent on it
    /// here).
    fn link_up(t: &mut Transmitter, peer: PeerId) {
        let generation = t.peers[&peer].generation;
        let (sender, _) = thynapse_link::split(DealerSocket::new(), None);
        t.on_report(Report::PeerConnected {
            peer,
            generation,
            sender,
        });
    }

    /// Our link to `peer` closes (its connection task says so).
    fn our_link_closed(t: &mut Transmitter, peer: PeerId) {
        let generation = t.peers[&peer].generation;
        t.on_report(Report::PeerClosed { peer, generation });
    }

    fn synd(t: &mut Transmitter, peer: PeerId, round: u64) {
        let generation = t.peers[&peer].generation;
        let msg =
            ZmqMessage::from(CommandFrame::json(cmd::SYND, &wire::SyncRound { round }).to_bytes());
        t.on_report(Report::PeerReply {
            peer,
            generation,
            msg,
        });
    }

    fn subd_sent(t: &Transmitter, cell: &Bytes) -> bool {
        replies(t).contains(&(cell.clone(), "SUBD".to_string()))
    }

    /// A rendezvous point's complete membership, as heard `at`.
    fn listed_at(t: &mut Transmitter, names: &[&str], partial: bool, at: Instant) {
        let names = names.iter().map(|n| n.to_string()).collect();
        let from = "127.0.0.1:7400".parse().unwrap();
        t.listings.insert(from, Listing { names, at, partial });
    }

    fn ping_due(t: &Transmitter, peer: PeerId) -> bool {
        t.peers[&peer].out.as_ref().is_some_and(|o| o.ping_due)
    }

    #[tokio::test]
    async fn only_links_that_wait_on_their_peer_are_pinged_and_given_up() {
        let mut t = transmitter(args());
        t.on_discovered(vec![info("x", Thid::random())]);
        let x = t.peer_ids["x"];
        link_up(&mut t, x);
        t.send_interest().await;
        let t0 = Instant::now();
        t.peer_housekeeping(t0);
        assert!(!ping_due(&t, x), "an idle link is not pinged");
        t.peer_housekeeping(t0 + t.expiry * 3);
        assert!(t.peers[&x].out.is_some(), "nor given up, however long idle");
        // A confirmation round waits for x: pinged, and given up after an expiry of
        // silence counted from then.
        let cell = conn(1);
        hello(&mut t, &cell, Thid::random(), None);
        subscribe(&mut t, &cell, Interest::Channel, b"c", Some(7));
        t.sync_interest().await;
        assert!(t.interest_sync.waiting_on(x));
        let t1 = t0 + t.expiry * 4;
        t.peer_housekeeping(t1);
        assert!(ping_due(&t, x), "waited on: pinged");
        t.peer_housekeeping(t1 + t.expiry / 2);
        assert!(t.peers[&x].out.is_some());
        t.peer_housekeeping(t1 + t.expiry * 2);
        assert!(
            t.peers[&x].out.is_none(),
            "silent while waited on: forgotten"
        );
    }

    #[tokio::test]
    async fn a_peer_no_rendezvous_point_lists_is_forgotten_once_silent_for_an_expiry() {
        let mut t = transmitter(args());
        peer_hello(&mut t, &conn(9), "x", Thid::random());
        remote_cell(&mut t, &conn(9), b"c");
        let x = t.peer_ids["x"];
        let known = |t: &Transmitter| t.table.cell_count(Location::Peer(x));
        let later = Instant::now() + t.expiry * 3;
        // A point just started (partial) is no evidence; one that lists x keeps it.
        listed_at(&mut t, &[], true, later);
        t.peer_housekeeping(later);
        assert_eq!(known(&t), 1);
        listed_at(&mut t, &["x"], false, later);
        t.peer_housekeeping(later);
        assert_eq!(known(&t), 1);
        // Not listed, but heard within the expiry: kept.
        listed_at(&mut t, &[], false, Instant::now());
        t.peer_housekeeping(Instant::now());
        assert_eq!(known(&t), 1);
        // With no fresh listing (the points unreachable), nobody is forgotten.
        t.peer_housekeeping(later);
        assert_eq!(known(&t), 1);
        // Not listed, and silent for an expiry: gone, with its cells.
        listed_at(&mut t, &[], false, later);
        t.peer_housekeeping(later);
        assert_eq!(known(&t), 0);
        assert!(t.peers[&x].inbound.is_none() && t.peers[&x].unlisted);
        // Heard again (it links again): known again.
        let instance = t.peers[&x].instance.unwrap();
        peer_hello(&mut t, &conn(10), "x", instance);
        remote_cell(&mut t, &conn(10), b"c");
        assert_eq!(known(&t), 1);
        assert!(!t.peers[&x].unlisted);
    }

    #[tokio::test]
    async fn a_peer_whose_links_both_close_is_forgotten_at_once_and_one_closed_link_is_rebuilt() {
        let mut t = transmitter(args());
        let closed = |t: &Transmitter| {
            t.metrics
                .peers_forgotten
                .with_label_values(&[Forgotten::Closed.label()])
                .get()
        };
        peer_hello(&mut t, &conn(9), "x", Thid::random());
        remote_cell(&mut t, &conn(9), b"c");
        let x = t.peer_ids["x"];
        let known = |t: &Transmitter| t.table.cell_count(Location::Peer(x));
        link_up(&mut t, x);
        // Our link closes while its link to us lives (it dropped ours, a reset): only
        // ours is rebuilt.
        our_link_closed(&mut t, x);
        assert!(t.peers[&x].out.is_none());
        assert_eq!((known(&t), closed(&t)), (1, 0));
        // A connection closing that is not a peer's (a cell's) changes nothing.
        t.on_disconnected(&conn(3));
        assert_eq!(known(&t), 1);
        // Its link to us closes too: the process is gone, with its cells; no
        // rendezvous point had to stop listing it first.
        t.on_disconnected(&conn(9));
        assert_eq!((known(&t), closed(&t)), (0, 1));
        // The other order: its link to us closes first, then ours.
        let instance = t.peers[&x].instance.unwrap();
        peer_hello(&mut t, &conn(10), "x", instance);
        remote_cell(&mut t, &conn(10), b"c");
        link_up(&mut t, x);
        t.on_disconnected(&conn(10));
        assert_eq!(known(&t), 1, "our link still up: not yet");
        our_link_closed(&mut t, x);
        assert_eq!((known(&t), closed(&t)), (0, 2));

        // Its link to us closes while ours lives (it rebuilds its link): linking again,
        // it hears our cells again.
        peer_hello(&mut t, &conn(11), "x", instance);
        remote_cell(&mut t, &conn(11), b"c");
        link_up(&mut t, x);
        t.send_interest().await;
        let synced = |t: &Transmitter| t.peers[&x].out.as_ref().is_some_and(|o| o.synced);
        assert!(synced(&t));
        t.on_disconnected(&conn(11));
        assert_eq!(known(&t), 1);
        peer_hello(&mut t, &conn(12), "x", instance);
        assert!(!synced(&t), "our cells are sent to it again");

        // Ours closes first and is being rebuilt when its link to us closes: once ours
        // cannot be rebuilt, it is gone.
        our_link_closed(&mut t, x);
        t.peers.get_mut(&x).unwrap().connecting = true;
        t.on_disconnected(&conn(12));
        assert_eq!(known(&t), 1, "still being linked");
        let generation = t.peers[&x].generation;
        t.on_report(Report::PeerConnectFailed {
            peer: x,
            generation,
        });
        assert_eq!((known(&t), closed(&t)), (0, 3));
    }

    #[tokio::test]
    async fn after_a_pause_past_the_expiry_every_peer_is_forgotten_and_what_it_sent_is_not_delivered(
    ) {
        let mut t = transmitter(args());
        peer_hello(&mut t, &conn(9), "x", Thid::random());
        remote_cell(&mut t, &conn(9), b"c");
        let x = t.peer_ids["x"];
        let now = Instant::now();
        t.woke(now);
        assert_eq!(t.table.cell_count(Location::Peer(x)), 1, "no pause");
        t.woke(now + t.expiry * 2);
        assert_eq!(t.table.cell_count(Location::Peer(x)), 0);
        assert!(t.peers[&x].inbound.is_none());
        // What it sent before hearing of it is not taken: it is told, and links again.
        t.replies.clear();
        remote_cell(&mut t, &conn(9), b"d");
        assert_eq!(t.table.cell_count(Location::Peer(x)), 0);
        assert_eq!(replies(&t), [(conn(9), "ERRR".to_string())]);
    }

    #[tokio::test]
    async fn a_peer_that_links_again_hears_our_cells_again() {
        let mut t = transmitter(args());
        let id = Thid::random();
        peer_hello(&mut t, &conn(9), "x", id);
        let x = t.peer_ids["x"];
        link_up(&mut t, x);
        t.send_interest().await;
        let synced = |t: &Transmitter| t.peers[&x].out.as_ref().unwrap().synced;
        assert!(synced(&t));
        peer_hello(&mut t, &conn(9), "x", id);
        assert!(synced(&t), "the same connection: nothing to send again");
        peer_hello(&mut t, &conn(10), "x", id);
        assert!(
            !synced(&t),
            "a new connection (it may have forgotten us): the snapshot again"
        );
    }

    #[tokio::test]
    async fn a_confirmation_waits_for_a_peer_being_linked_and_one_linked_only_to_us() {
        // Each is seen to be waited for by the other answering first.
        for x_first in [true, false] {
            let mut t = transmitter(args());
            // x: discovered, our link to it being built; y: linked only to us (its PEER
            // on our ROUTER); z: known, but neither (our attempt failed, and it has no
            // link to us).
            t.on_discovered(vec![info("x", Thid::random()), info("z", Thid::random())]);
            let (x, z) = (t.peer_ids["x"], t.peer_ids["z"]);
            let generation = t.peers[&z].generation;
            t.on_report(Report::PeerConnectFailed {
                peer: z,
                generation,
            });
            peer_hello(&mut t, &conn(9), "y", Thid::random());
            let y = t.peer_ids["y"];
            assert!(t.peers[&x].connecting && t.peers[&x].out.is_none());
            assert!(t.peers[&y].inbound.is_some() && t.peers[&y].out.is_none());

            let cell = conn(1);
            hello(&mut t, &cell, Thid::random(), None);
            subscribe(&mut t, &cell, Interest::Channel, b"c", Some(7));
            t.sync_interest().await;
            assert!(!subd_sent(&t, &cell), "x and y are waited for");
            let round = t.interest_sync.round();
            // Each answers once our link to it is up (the snapshot asks it).
            let (first, second) = if x_first { (x, y) } else { (y, x) };
            link_up(&mut t, first);
            synd(&mut t, first, round);
            t.sync_interest().await;
            assert!(!subd_sent(&t, &cell), "the other is still waited for");
            link_up(&mut t, second);
            synd(&mut t, second, round);
            t.sync_interest().await;
            assert!(
                subd_sent(&t, &cell),
                "z, neither linked nor linking, is not"
            );
            let gave_up = |reason: &str| t.metrics.sync_gave_up.with_label_values(&[reason]).get();
            assert_eq!(gave_up("peer_lost") + gave_up("timeout"), 0);
        }
    }

    #[tokio::test]
    async fn a_peer_neither_linked_nor_linking_makes_room_and_names_past_the_bound_are_skipped() {
        let mut t = transmitter(args());
        let known: Vec<TransmitterInfo> = (0..MAX_PEERS)
            .map(|i| info(&format!("p-{i}"), Thid::random()))
            .collect();
        t.on_discovered(known);
        assert_eq!(t.peers.len(), MAX_PEERS);
        let refused = |t: &Transmitter| t.metrics.refused.with_label_values(&["peers"]).get();
        // Every one is being linked: a new name is skipped, and its PEER refused.
        t.on_discovered(vec![info("late", Thid::random())]);
        assert!(!t.peer_ids.contains_key("late"));
        assert_eq!(refused(&t), 1);
        t.replies.clear();
        peer_hello(&mut t, &conn(9), "late", Thid::random());
        assert_eq!(replies(&t), [(conn(9), "ERRR".to_string())]);
        assert!(!t.peer_ids.contains_key("late"));
        assert_eq!(refused(&t), 2);
        assert_eq!(t.peers.len(), MAX_PEERS);
        // One attempt fails: that peer, neither linked nor linking, makes room.
        let gone = t.peer_ids["p-7"];
        let generation = t.peers[&gone].generation;
        t.on_report(Report::PeerConnectFailed {
            peer: gone,
            generation,
        });
        t.on_discovered(vec![info("late", Thid::random())]);
        assert!(t.peer_ids.contains_key("late"));
        assert!(!t.peer_ids.contains_key("p-7") && !t.peers.contains_key(&gone));
        assert_eq!(t.peers.len(), MAX_PEERS);
    }

    #[tokio::test]
    async fn messages_for_a_peer_wait_in_its_outbox_while_its_link_is_rebuilt() {
        let mut t = transmitter(args());
        let instance = Thid::random();
        t.on_discovered(vec![info("p", instance)]);
        let p = t.peer_ids["p"];
        link_up(&mut t, p);
        // The peer has a cell subscribed to `c`.
        let from_peer = conn(9);
        peer_hello(&mut t, &from_peer, "p", instance);
        remote_cell(&mut t, &from_peer, b"c");
        // A local cell publishes for it; then our link to it closes, and the cell
        // publishes again meanwhile.
        let publisher = conn(1);
        hello(&mut t, &publisher, Thid::random(), None);
        publish(&mut t, &publisher, 1, Kind::Mesh, b"c", &[b"m1"]);
        let generation = t.peers[&p].generation;
        t.on_report(Report::PeerClosed {
            peer: p,
            generation,
        });
        assert!(t.peers[&p].out.is_none());
        t.replies.clear();
        publish(&mut t, &publisher, 2, Kind::Mesh, b"c", &[b"m2", b"m3"]);
        let acks = t.replies[0].get(2).unwrap().clone();
        assert_eq!(
            decode_acks(&acks).unwrap(),
            (2, vec![1, 1]),
            "both reach its cell"
        );
        for reason in [DropReason::PeerLost, DropReason::PeerBacklog] {
            assert_eq!(
                t.metrics.drops.with_label_values(&[reason.label()]).get(),
                0
            );
        }
        assert_eq!(t.peers[&p].outbox.unconfirmed_messages(), 3, "waiting");
        // The next discovery rebuilds the link; the messages go on it, in order.
        t.on_discovered(vec![info("p", instance)]);
        assert!(t.peers[&p].connecting);
        link_up(&mut t, p);
        let mut payloads = Vec::new();
        while let Some((_, frame, _)) = t.peers.get_mut(&p).unwrap().outbox.take_batch() {
            let (_, envelopes) = decode_envelopes(&frame).unwrap();
            payloads.extend(envelopes.map(|e| e.payload.to_vec()));
        }
        assert_eq!(payloads, [b"m1", b"m2", b"m3"]);
    }

    #[tokio::test]
    async fn a_lost_peer_counts_one_drop_per_cell_that_loses_a_message() {
        let mut t = transmitter(args());
        let instance = Thid::random();
        t.on_discovered(vec![info("p", instance)]);
        let p = t.peer_ids["p"];
        link_up(&mut t, p);
        let from_peer = conn(9);
        peer_hello(&mut t, &from_peer, "p", instance);
        // Two multicatch cells behind the peer take `c`.
        for _ in 0..2 {
            remote_cell(&mut t, &from_peer, b"c");
        }
        let publisher = conn(1);
        hello(&mut t, &publisher, Thid::random(), None);
        t.replies.clear();
        publish(
            &mut t,
            &publisher,
            1,
            Kind::Mesh,
            b"c",
            &[b"m1", b"m2", b"m3"],
        );
        let acks = t.replies[0].get(2).unwrap().clone();
        assert_eq!(
            decode_acks(&acks).unwrap(),
            (1, vec![2, 2, 2]),
            "two cells each"
        );
        // The peer is lost before crediting: three messages, six deliveries lost.
        t.forget_peer(p, Forgotten::Silent);
        let lost = t
            .metrics
            .drops
            .with_label_values(&[DropReason::PeerLost.label()]);
        assert_eq!(
            lost.get(),
            6,
            "counted in deliveries, as the PUBLISH count is"
        );
    }

    #[tokio::test]
    async fn a_transmitter_adds_up_every_peers_page() {
        let mut t = transmitter(args());
        let long = "x".repeat(200);
        let live: Vec<TransmitterInfo> = (0..300)
            .map(|i| TransmitterInfo {
                command: format!("tcp://{long}:1"),
                event: format!("tcp://{long}:2"),
                metrics: format!("http://{long}/metrics"),
                ..info(&format!("p-{i:0>200}"), Thid::random())
            })
            .collect();
        let pages = thynapse_rendezvous::peers_pages("m", &live);
        assert!(pages.len() > 2, "{} pages", pages.len());
        for page in pages {
            let Ok(Datagram::Peers { transmitters, .. }) = Datagram::parse(&page) else {
                panic!("a peers page");
            };
            t.on_report(Report::Discovered(transmitters));
        }
        assert_eq!(t.peers.len(), 300);
        assert!(live.iter().all(|i| t.peer_ids.contains_key(&i.name)));
    }
}
