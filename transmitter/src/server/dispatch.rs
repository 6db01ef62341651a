//! Routing one message: to local cells (a `DLVR` batch each, or their PUB topic) and to
//! peers (a `FWRD` batch each, with the anycatch targets); inbound batches routed as far
//! as the links have room, the rest held (see `crate::backpressure`), and the
//! acknowledgements that wait on congested links.

use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use thynapse_protocol::batch::{
    decode_envelopes, decode_publish_records, decode_publishes, encode_acks, Envelope, Envelopes,
    Kind, Publish,
};
use thynapse_protocol::frame::{CommandFrame, Encoding, FrameError};
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::{self, cmd, Events};
use thynapse_protocol::Thid;
use zeromq::{SocketSend, ZmqMessage};

use super::{error_reply, reply_json, Transmitter};
use crate::backpressure::{Held, Link, NoRoom, Progress};
use crate::metrics::DropReason;
use crate::routing::{Dispatch, PeerId};

/// One message on its way through this transmitter, borrowed from the batch it came in.
pub(super) struct Message<'a> {
    pub(super) kind: Kind,
    /// The publishing session, and its sequence number: `(origin, seq)` names the message
    /// mesh-wide (receivers drop a second copy).
    pub(super) origin: &'a Thid,
    pub(super) seq: u64,
    pub(super) ts: u64,
    pub(super) channel: &'a [u8],
    pub(super) payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// A message as a peer forwarded it (or as it was queued for a receiver).
    pub(super) fn of(e: &'a Envelope<'a>) -> Self {
        Message {
            kind: e.kind,
            origin: &e.origin,
            seq: e.seq,
            ts: e.ts,
            channel: e.channel,
            payload: e.payload,
        }
    }

    /// Room a message takes in a cell's `DLVR` batch (a little over its bytes).
    pub(super) fn size(&self) -> usize {
        self.channel.len() + self.payload.len() + 64
    }
}

/// An inbound batch held for room (all of it checked on arrival).
pub(super) enum HeldBatch {
    /// The `PUBS` frames.
    Publish(Vec<Bytes>),
    /// The `FWRD` body.
    Forward(Bytes),
}

/// A peer's `FWRD` batch: its number (what `FACK` credits), its size, its messages.
pub(super) struct Forwarded<'a> {
    pub(super) batch: u64,
    pub(super) size: usize,
    pub(super) envelopes: Envelopes<'a>,
}

impl Transmitter {
    /// Routes one message published by a local cell; returns the cells it reaches. With
    /// `hold`, a message that a link it goes to has no room for is not routed (`NoRoom`);
    /// without, it is dropped for that link (and counted).
    pub(super) fn publish(
        &mut self,
        m: &Message,
        dests: &mut Vec<Link>,
        hold: bool,
    ) -> Result<u32, NoRoom> {
        if m.payload.len() > self.args.max_message_bytes {
            self.count_from_cell(m.payload.len());
            self.metrics.drop(DropReason::TooLarge, 1);
            if let Some(cell) = self.cells.get(m.origin) {
                let error = FrameError::TooLarge {
                    size: m.payload.len(),
                    limit: self.args.max_message_bytes,
                };
                self.replies
                    .push(error_reply(&cell.identity, &error.to_string()));
            }
            return Ok(0);
        }
        // A room message comes from a session of its room, which this transmitter hosts;
        // every other host of the room gets it too, so a cell that moves to another host
        // of the room receives at once.
        let cohosts = if m.kind == Kind::Shard {
            let session_room = self.cells.get(m.origin).and_then(|c| c.room.as_deref());
            let hosted = std::str::from_utf8(room_of(m.channel))
                .ok()
                .filter(|r| Some(*r) == session_room)
                .and_then(|r| self.rooms.get(r));
            let Some(room) = hosted else {
                self.count_from_cell(m.payload.len());
                self.metrics.drop(DropReason::RoomNotHosted, 1);
                return Ok(0);
            };
            Some(room)
        } else {
            None
        };
        let mut dispatch = std::mem::take(&mut self.dispatch);
        self.table.dispatch(m.kind, m.channel, &mut dispatch);
        for host in cohosts.iter().flat_map(|r| &r.hosts) {
            if let Some(&peer) = self.peer_ids.get(host) {
                if self.peers[&peer].out.as_ref().is_some_and(|o| o.synced) {
                    dispatch.peer_entry(peer);
                }
            }
        }
        if hold && !self.dispatch_has_room(&dispatch, m.channel.len() + m.payload.len()) {
            self.dispatch = dispatch;
            return Err(NoRoom);
        }
        if let Some(room) = cohosts {
            room.messages.inc();
        }
        self.count_from_cell(m.payload.len());
        self.routed += 1;
        for cell in &dispatch.local {
            self.deliver_local(*cell, m, dests);
        }
        for (peer, targets) in dispatch.peers() {
            self.forward(*peer, m, targets, true, dests);
        }
        let receivers = dispatch.receivers;
        self.dispatch = dispatch;
        Ok(receivers)
    }

    /// Counts a message from a cell once it is settled (routed or dropped); one held for
    /// room is counted when it is routed.
    pub(super) fn count_from_cell(&mut self, payload_bytes: usize) {
        self.hot.in_cell.inc();
        self.hot.bytes_in_cell.inc_by(payload_bytes as u64);
    }

    /// Whether every link `dispatch` goes to has room for a message of `size` bytes.
    /// A stuck link (see `Outbox::stuck`) does not hold a message back: it is dropped
    /// for that link only, and the others wait for room as usual.
    ///
    /// Stuck: nothing credited for two heartbeats or half an expiry, whichever is longer
    /// (a live receiver credits at every heartbeat), so before a held batch's expiry
    /// routes it whatever the room, which would drop for healthy links too.
    pub(super) fn stuck_after(&self) -> std::time::Duration {
        (2 * self.heartbeat).max(self.expiry / 2)
    }

    pub(super) fn dispatch_has_room(&self, dispatch: &Dispatch, size: usize) -> bool {
        let limit = self.args.link_buffer_bytes;
        self.cells_have_room(&dispatch.local, size)
            && dispatch.peers().iter().all(|(peer, targets)| {
                self.peers.get(peer).is_none_or(|p| {
                    p.outbox.has_room(size + 64 + 20 * targets.len(), limit)
                        || p.outbox.stuck(Instant::now(), self.stuck_after())
                })
            })
    }

    pub(super) fn cells_have_room(&self, cells: &[Thid], size: usize) -> bool {
        let limit = self.args.link_buffer_bytes;
        cells.iter().all(|id| {
            self.cells.get(id).is_none_or(|c| {
                c.events == Events::Pub
                    || c.outbox.has_room(size + 64, limit)
                    || c.outbox.stuck(Instant::now(), self.stuck_after())
            })
        })
    }

    /// Holds a batch its source cannot route now (or must not, behind a batch it already
    /// has held: its messages keep their order).
    pub(super) fn hold(
        &mut self,
        source: Link,
        identity: &Bytes,
        batch: HeldBatch,
        progress: Progress,
    ) {
        let bytes = match &batch {
            HeldBatch::Publish(parts) => parts.iter().map(Bytes::len).sum(),
            HeldBatch::Forward(body) => body.len(),
        };
        // More than a sidecar keeps unacknowledged: only a sender that ignores
        // acknowledgements gets there, and its batches are routed at once.
        let limit = self.args.link_buffer_bytes.max(8 << 20);
        let now = Instant::now();
        if self
            .held
            .hold(source, identity, batch, bytes, progress, now, limit)
        {
            self.resume_held(Some(source));
        }
    }

    /// Routes held batches whose links have room again, in order per source. A batch held
    /// past the expiry, and every batch of `force`, is routed whatever the room.
    pub(super) fn resume_held(&mut self, force: Option<Link>) {
        let mut held = std::mem::take(&mut self.held);
        held.resume(Instant::now(), self.expiry, force, |h, forced| {
            self.route_held(h, forced)
        });
        self.held = held;
    }

    /// Forgets the batches held from `source` (its connection is gone).
    /// Drops the batches held from a source that is gone. A cell's sidecar sends its
    /// publishes again (they were not acknowledged); a peer counts what it forwarded and
    /// we never credited as `peer_lost` on its side, so it is not counted here again.
    pub(super) fn forget_held(&mut self, source: Link) {
        self.held.forget(source);
    }

    /// Routes the rest of a held batch (see `route_publishes`, `route_forwards`).
    pub(super) fn route_held(
        &mut self,
        h: &mut Held<HeldBatch>,
        force: bool,
    ) -> Result<(), NoRoom> {
        match (&h.batch, h.source) {
            (HeldBatch::Publish(parts), Link::Cell(id)) => {
                let (first, head) = decode_publishes(&parts[0]).expect("checked on arrival");
                let rest = parts[1..]
                    .iter()
                    .map(|p| decode_publish_records(p).expect("checked on arrival"));
                let records = std::iter::once(head).chain(rest).flatten();
                self.route_publishes(id, &h.identity, first, records, &mut h.progress, force)
            }
            (HeldBatch::Forward(body), Link::Peer(peer)) => {
                let (batch, envelopes) = decode_envelopes(&body[..]).expect("checked on arrival");
                let forwarded = Forwarded {
                    batch,
                    size: body.len(),
                    envelopes,
                };
                self.route_forwards(peer, &h.identity, forwarded, &mut h.progress, force)
            }
            _ => unreachable!("a cell's batch is a PUBS, a peer's a FWRD"),
        }
    }

    /// Routes the publishes of cell `id`'s batch from `p.done` on and acknowledges the
    /// batch; stops where a link has no room for the next message, unless `force`.
    pub(super) fn route_publishes<'a>(
        &mut self,
        id: Thid,
        identity: &Bytes,
        first: u64,
        records: impl Iterator<Item = Publish<'a>>,
        p: &mut Progress,
        force: bool,
    ) -> Result<(), NoRoom> {
        self.table.start_batch();
        for (i, record) in records.enumerate().skip(p.done) {
            let message = Message {
                kind: record.kind,
                origin: &id,
                seq: first + i as u64,
                ts: record.ts,
                channel: record.channel,
                payload: record.payload,
            };
            let n = self.publish(&message, &mut p.dests, !force)?;
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

    /// Delivers the messages of `peer`'s `FWRD` batch from `p.done` on and acknowledges
    /// the batch; stops where a cell has no room for the next message, unless `force`.
    pub(super) fn route_forwards(
        &mut self,
        peer: PeerId,
        identity: &Bytes,
        forwarded: Forwarded,
        p: &mut Progress,
        force: bool,
    ) -> Result<(), NoRoom> {
        let mut local = std::mem::take(&mut self.scratch);
        let mut stopped = None;
        for e in forwarded.envelopes.skip(p.done) {
            self.table
                .deliver_forwarded(e.kind, e.channel, e.targets(), &mut local);
            if !force && !self.cells_have_room(&local, e.channel.len() + e.payload.len()) {
                stopped = Some(NoRoom);
                break;
            }
            // The peer routed by what it knew: cells that left here since are counted.
            // (A room message comes to every host of its room, wanted here or not.)
            let gone = e.targets().filter(|t| !local.contains(t)).count()
                + usize::from(e.kind == Kind::Mesh && e.targets().len() == 0 && local.is_empty());
            if gone > 0 {
                self.metrics.drop(DropReason::CellGone, gone as u64);
            }
            self.hot.in_peer.inc();
            self.hot.bytes_in_peer.inc_by(e.payload.len() as u64);
            if e.kind == Kind::Shard {
                self.count_room_message(e.channel);
            }
            let message = Message::of(&e);
            for cell in &local {
                self.deliver_local(*cell, &message, &mut p.dests);
            }
            p.done += 1;
        }
        self.scratch = local;
        if let Some(no_room) = stopped {
            return Err(no_room);
        }
        let batch = forwarded.batch;
        if self.ack_must_wait(identity, &p.dests) {
            let reply = reply_json(identity, cmd::FACK, &wire::Credit { batch });
            self.deferred.defer(
                identity,
                reply,
                std::mem::take(&mut p.dests),
                Instant::now(),
            );
        } else if let Some(peer) = self.peers.get_mut(&peer) {
            // Nothing to hold it back: acknowledged with the next ones, or at the next
            // tick (a FACK credits every batch before it too).
            peer.fack.received(batch, forwarded.size);
            if let Some(batch) = peer.fack.take(false) {
                self.replies
                    .push(reply_json(identity, cmd::FACK, &wire::Credit { batch }));
            }
        }
        Ok(())
    }

    /// Queues `m` for local cell `id`; false when it was not (dropped and counted, or
    /// no such cell).
    pub(super) fn deliver_local(&mut self, id: Thid, m: &Message, dests: &mut Vec<Link>) -> bool {
        let limit = self.args.link_buffer_bytes;
        let Some(cell) = self.cells.get_mut(&id) else {
            return false;
        };
        if cell.events == Events::Pub {
            let mut frames = ZmqMessage::from(Bytes::from(id.to_hex()));
            frames.push_back(Bytes::copy_from_slice(m.channel));
            frames.push_back(Bytes::copy_from_slice(m.payload));
            // Best effort, as PUB is: the zeromq crate drops when a subscriber lags.
            let _ = self.publisher.send(frames).now_or_never();
            self.hot.out_pub.inc();
            self.hot.bytes_out_pub.inc_by(m.payload.len() as u64);
            return true;
        }
        if !cell.outbox.has_room(m.size(), limit) {
            self.metrics.drop(DropReason::CellBacklog, 1);
            return false;
        }
        cell.outbox
            .open()
            .push(m.kind, m.origin, m.seq, m.ts, m.channel, m.payload, &[]);
        self.hot.out_cell.inc();
        self.hot.bytes_out_cell.inc_by(m.payload.len() as u64);
        if !dests.contains(&Link::Cell(id)) {
            dests.push(Link::Cell(id));
        }
        true
    }

    /// Queues `m` for `peer` (with its anycatch `targets` there, and `for_multicatch`:
    /// for its multicatch cells too); false when it was not (dropped and counted once per
    /// cell that loses it).
    pub(super) fn forward(
        &mut self,
        peer: PeerId,
        m: &Message,
        targets: &[Thid],
        for_multicatch: bool,
        dests: &mut Vec<Link>,
    ) -> bool {
        let limit = self.args.link_buffer_bytes;
        let refused = match self.peers.get_mut(&peer) {
            Some(p) if p.outbox.has_room(m.size() + 20 * targets.len(), limit) => {
                p.outbox
                    .open()
                    .push(m.kind, m.origin, m.seq, m.ts, m.channel, m.payload, targets);
                None
            }
            Some(_) => Some(DropReason::PeerBacklog),
            None => Some(DropReason::PeerLost),
        };
        if let Some(reason) = refused {
            // Counted once per cell there that loses it, as the PUBLISH count has them.
            let multicatch = if for_multicatch {
                u64::from(self.table.multicatch_at(m.kind, m.channel, peer))
            } else {
                0
            };
            let cells = multicatch + targets.len() as u64;
            self.metrics.drop(reason, cells.max(1));
            return false;
        }
        self.hot.out_peer.inc();
        self.hot.bytes_out_peer.inc_by(m.payload.len() as u64);
        if !dests.contains(&Link::Peer(peer)) {
            dests.push(Link::Peer(peer));
        }
        true
    }

    /// Sends an acknowledgement now, or defers it while a link the work it answers fed is
    /// congested (that is what slows a publisher to its slowest receiver).
    pub(super) fn ack_when_clear(&mut self, identity: &Bytes, reply: ZmqMessage, dests: Vec<Link>) {
        if self.ack_must_wait(identity, &dests) {
            self.deferred.defer(identity, reply, dests, Instant::now());
        } else {
            self.replies.push(reply);
        }
    }

    pub(super) fn ack_must_wait(&self, identity: &Bytes, dests: &[Link]) -> bool {
        self.deferred.must_wait(identity, self.any_congested(dests))
    }

    pub(super) fn any_congested(&self, dests: &[Link]) -> bool {
        let hw = self.high_water();
        dests.iter().any(|d| match d {
            Link::Cell(id) => self.cells.get(id).is_some_and(|c| c.outbox.congested(hw)),
            Link::Peer(p) => self.peers.get(p).is_some_and(|p| p.outbox.congested(hw)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use thynapse_protocol::batch::decode_acks;
    use thynapse_protocol::wire::Interest;

    /// A publisher and a subscriber of channel `c` on one transmitter.
    fn publisher_and_subscriber(t: &mut Transmitter) -> (Bytes, Thid, Bytes, Thid) {
        let (publisher, subscriber) = (conn(1), conn(2));
        let (p, s) = (Thid::random(), Thid::random());
        hello(t, &subscriber, s, None);
        subscribe(t, &subscriber, Interest::Channel, b"c", None);
        hello(t, &publisher, p, None);
        t.replies.clear();
        (publisher, p, subscriber, s)
    }

    #[tokio::test]
    async fn acknowledgements_wait_while_a_link_they_fed_is_above_a_quarter_of_its_limit() {
        let mut args = args();
        args.link_buffer_bytes = 64 * 1024;
        let quarter = args.link_buffer_bytes / 4;
        let mut t = transmitter(args);
        let (publisher, _, subscriber, s) = publisher_and_subscriber(&mut t);
        let payload = [7u8; 1000];
        let (mut at_once, mut held) = (0, 0);
        for seq in 1..=30 {
            publish(&mut t, &publisher, seq, Kind::Mesh, b"c", &[&payload]);
            let acked = replies(&t) == [(publisher.clone(), "ACKS".to_string())];
            t.replies.clear();
            let pending = t.cells[&s].outbox.unsent_bytes();
            assert!(
                pending <= t.args.link_buffer_bytes,
                "within the link buffer: routed"
            );
            assert_eq!(
                acked,
                pending <= quarter,
                "publish {seq}: {pending} bytes wait for the subscriber"
            );
            if acked {
                at_once += 1;
            } else {
                held += 1;
            }
        }
        assert!(at_once > 0 && held > 0, "{at_once} answered, {held} held");
        // The subscriber takes and credits everything: the answers go, in order.
        t.release_acks();
        assert!(t.replies.is_empty(), "still congested");
        let mut last = 0;
        while let Some((batch, ..)) = t.cells.get_mut(&s).unwrap().outbox.take_batch() {
            last = batch;
        }
        let credit = CommandFrame::json(cmd::CRED, &wire::Credit { batch: last }).to_bytes();
        t.on_router(inbound(&subscriber, [credit]));
        t.release_acks();
        let acks: Vec<u64> = t
            .replies
            .iter()
            .map(|m| decode_acks(m.get(2).unwrap()).unwrap().0)
            .collect();
        let expected: Vec<u64> = (31 - held..=30).collect();
        assert_eq!(acks, expected);
    }

    #[tokio::test]
    async fn a_source_over_its_held_bytes_bound_is_routed_at_once() {
        // The bound is max(linkBufferBytes, 8 MiB), from the transmitter's flags.
        for (link_buffer, bound) in [(64 << 10, 8 << 20), (16 << 20, 16 << 20)] {
            let mut args = args();
            args.link_buffer_bytes = link_buffer;
            let mut t = transmitter(args);
            let (publisher, p, _, _) = publisher_and_subscriber(&mut t);
            let payload = vec![7u8; 16 * 1024];
            let payloads = vec![&payload[..]; 16];
            let source = Link::Cell(p);
            let mut most_held = 0;
            let mut seq = 1;
            let batch = loop {
                let bytes = publish(&mut t, &publisher, seq, Kind::Mesh, b"c", &payloads);
                seq += payloads.len() as u64;
                if t.held.is_holding(source) {
                    most_held = most_held.max(t.held.bytes());
                } else if most_held > 0 {
                    break bytes;
                }
                assert!(seq < 1 << 20, "never routed");
            };
            assert!(
                most_held <= bound && most_held + batch > bound,
                "link buffer {link_buffer}: held up to {most_held} bytes, routed past {bound}"
            );
            assert!(t.held.is_empty());
            let backlog = t
                .metrics
                .drops
                .with_label_values(&[DropReason::CellBacklog.label()])
                .get();
            assert!(backlog > 0, "what did not fit the full link was dropped");
        }
    }
}
