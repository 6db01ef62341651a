//! A session is one stream of this cell into the mesh, with its own link to a
//! transmitter, its own sequence numbers and its own publishes awaiting acknowledgement:
//! the mesh session (SUBSCRIBE, PSUBSCRIBE, PUBLISH) on the transmitter the cell joined,
//! and one session per room in use (SSUBSCRIBE, SPUBLISH) on a transmitter hosting that
//! room, as hubsub clients talk to a room's servers directly.
//!
//! A `Session` owns its link's lifecycle as plain state, with no I/O: a connect attempt
//! (numbered by a generation, so a late report of an old attempt is ignored), the link,
//! the previous link while moving, silence, and what it owes the transmitter at each
//! flush ([`Session::outgoing`]). The hub does the sending; finding and opening a link
//! runs in a task of its own (`connect`), which reports back as a [`LinkEvent`].

mod connect;
mod link;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thynapse_protocol::batch::{put_publish, Publish};
use thynapse_protocol::credit::CreditOwed;
use thynapse_protocol::limits::BATCH_BYTES;
use thynapse_protocol::wire::{cmd, Interest, Op};
use thynapse_protocol::Thid;
use tokio::sync::oneshot;
use zeromq::ZmqMessage;

use crate::api::ClientId;
use crate::confirm::Confirmations;
use crate::frames::{bare_frame, binary_frame, interest_frames};
pub(crate) use connect::WIRE_OVERSIZED;
pub use connect::{connect, spread, ConnectPlan, LinkEvent};
use link::{credit, goodbye, Link};

/// Which session: the mesh (`None`) or a room.
pub type SessionKey = Option<Bytes>;

/// Who to answer for a run of consecutive publishes: a client, the token (reply slot) of
/// the first, and how many.
pub type Replies = (ClientId, u64, u32);

fn push_reply(replies: &mut Vec<Replies>, client: ClientId, token: u64, n: u32) {
    match replies.last_mut() {
        Some((c, first, count)) if *c == client && *first + u64::from(*count) == token => {
            *count += n
        }
        _ => replies.push((client, token, n)),
    }
}

/// Publishes not sent yet, gathered for the session's next `PUBS` batch: the records as
/// the clients' connections encoded them (no copy here), and those queued one by one.
#[derive(Default)]
struct Open {
    parts: Vec<Bytes>,
    tail: BytesMut,
    count: usize,
    bytes: usize,
    replies: Vec<Replies>,
}

impl Open {
    /// Ends the part being written one by one, if any.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.parts.push(self.tail.split().freeze());
        }
    }

    fn push_part(&mut self, records: Bytes) {
        self.seal_tail();
        self.parts.push(records);
    }
}

/// One `PUBS` batch, kept as sent until the transmitter acknowledges it: a session that
/// moves sends its unacknowledged batches again as they are (receivers drop the copies by
/// origin and sequence). On the wire it is a multipart body: `first_seq`, then the parts.
struct Unacked {
    first_seq: u64,
    count: usize,
    /// The records' bytes, as counted against the hub's window.
    bytes: usize,
    parts: Vec<Bytes>,
    replies: Vec<Replies>,
    /// Answered; it leaves the window when every earlier batch has too.
    acked: bool,
}

/// Batches beyond this many messages, or `BATCH_BYTES`, are closed and a new one
/// started: the transmitter refuses a message over `limits::wire_limit`.
const MAX_PUBS_BATCH: usize = 1024;

/// Which of a session's links a message came by, or goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Current,
    /// The link the session moved away from, read for one more expiry.
    Previous,
}

/// What a heartbeat decided for a session's links.
pub struct Tick<S> {
    /// The previous link has been read for its last expiry: send it these (the credit
    /// still owed, then QUIT) and drop it.
    pub farewell: Option<(S, Vec<ZmqMessage>)>,
    /// The current link was silent for an expiry and is let go: its transmitter.
    pub silent: Option<String>,
    /// On a live current link: the credit owed (sent on every heartbeat), then a PING.
    pub credit: Option<ZmqMessage>,
    pub ping: Option<ZmqMessage>,
}

/// Where a message from a transmitter came from (see [`Session::heard`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    Via(Via),
    /// A link silent past the expiry, now let go: the message is dropped.
    Stale(String),
    /// A link this session no longer has.
    NotOurs,
}

pub struct Session<S = thynapse_link::LinkSender> {
    /// The HELO id, and the origin receivers deduplicate this session's messages by.
    pub id: Thid,
    pub room: Option<String>,
    next_seq: u64,
    open: Option<Open>,
    /// Closed frames, sent or not, oldest first.
    unacked: VecDeque<Unacked>,
    /// Index into `unacked` of the first frame not yet sent on the current link.
    unsent_from: usize,
    /// Subscription changes for the transmitter, sent at the next flush.
    interest: Vec<(Op, Interest, Bytes)>,
    link: Option<Link<S>>,
    /// The previous link while moving: still read until the instant, then closed.
    previous: Option<(Link<S>, Instant)>,
    /// Generation of the connect attempt in flight, if any.
    connecting: Option<u64>,
    /// The transmitter the session last left or failed to reach, avoided next time.
    avoid: Vec<String>,
    /// The rendezvous has placed the room (always true for the mesh session).
    pub admitted: bool,
    /// SSUBSCRIBEs waiting to hear whether the room may be used.
    pub waiting: Vec<oneshot::Sender<Result<(), String>>>,
    pub last_used: Instant,
    /// Subscription confirmations waiting for the mesh to know the subscriptions.
    pub confirm: Confirmations,
}

impl<S> Session<S> {
    pub fn new(id: Thid, room: Option<String>) -> Self {
        Session {
            id,
            admitted: room.is_none(),
            room,
            next_seq: 1,
            open: None,
            unacked: VecDeque::new(),
            unsent_from: 0,
            interest: Vec::new(),
            link: None,
            previous: None,
            connecting: None,
            avoid: Vec::new(),
            waiting: Vec::new(),
            last_used: Instant::now(),
            confirm: Confirmations::default(),
        }
    }

    /// The frame being filled, started (at the next sequence number) if there is none or
    /// the current one is full.
    fn open(&mut self) -> &mut Open {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.count >= MAX_PUBS_BATCH || o.bytes >= BATCH_BYTES)
        {
            self.close();
        }
        self.open.get_or_insert_with(Open::default)
    }

    /// Queues `count` publish records (as `put_publish` writes them) from `client`, whose
    /// tokens are the runs `tokens`.
    pub fn queue_records(
        &mut self,
        client: ClientId,
        records: &Bytes,
        count: usize,
        tokens: &[(u64, u32)],
    ) {
        let open = self.open();
        open.push_part(records.clone());
        open.count += count;
        open.bytes += records.len();
        for (token, n) in tokens {
            push_reply(&mut open.replies, client, *token, *n);
        }
        self.next_seq += count as u64;
    }

    /// Queues one publish; returns the bytes of its record.
    pub fn queue(&mut self, client: ClientId, token: u64, p: &Publish) -> usize {
        let open = self.open();
        let before = open.tail.len();
        put_publish(&mut open.tail, p.kind, p.ts, p.channel, p.payload);
        let added = open.tail.len() - before;
        open.count += 1;
        open.bytes += added;
        push_reply(&mut open.replies, client, token, 1);
        self.next_seq += 1;
        added
    }

    /// Closes the batch being gathered, so that it can be sent.
    pub fn close(&mut self) {
        if let Some(mut open) = self.open.take() {
            open.seal_tail();
            self.unacked.push_back(Unacked {
                first_seq: self.next_seq - open.count as u64,
                count: open.count,
                bytes: open.bytes,
                parts: open.parts,
                replies: open.replies,
                acked: false,
            });
        }
    }

    /// Whether nothing waits for an acknowledgement.
    pub fn settled(&self) -> bool {
        self.open.is_none() && self.unacked.is_empty()
    }

    /// Takes the batch the acknowledgement of `first..first + counts.len()` is for: the
    /// answers (client, token, cells reached), and the messages and bytes freed once no
    /// earlier batch is waiting. A batch already acknowledged (a resent copy, or the old
    /// link while moving) is skipped.
    pub fn acknowledge(
        &mut self,
        first: u64,
        counts: &[u32],
        answers: &mut Vec<(ClientId, u64, u32)>,
    ) -> (usize, usize) {
        let Some(f) = self
            .unacked
            .iter_mut()
            .find(|f| f.first_seq == first && f.count == counts.len() && !f.acked)
        else {
            return (0, 0);
        };
        f.acked = true;
        let mut i = 0;
        for (client, token, n) in std::mem::take(&mut f.replies) {
            for k in 0..u64::from(n) {
                answers.push((client, token + k, counts[i]));
                i += 1;
            }
        }
        // Batches leave the window in order.
        let (mut messages, mut bytes) = (0, 0);
        while self.unacked.front().is_some_and(|f| f.acked) {
            let f = self.unacked.pop_front().expect("front exists");
            self.unsent_from = self.unsent_from.saturating_sub(1);
            messages += f.count;
            bytes += f.bytes;
        }
        (messages, bytes)
    }

    /// Gives up every publish not acknowledged: who to answer, and the messages and bytes
    /// freed.
    pub fn abandon(&mut self) -> (Vec<Replies>, usize, usize) {
        self.close();
        let (mut replies, mut messages, mut bytes) = (Vec::new(), 0, 0);
        for f in self.unacked.drain(..) {
            messages += f.count;
            bytes += f.bytes;
            replies.extend(f.replies);
        }
        self.unsent_from = 0;
        (replies, messages, bytes)
    }

    /// Tells the SSUBSCRIBEs waiting on this room whether they may go ahead.
    pub fn admit(&mut self, verdict: Result<(), String>) {
        if verdict.is_ok() {
            self.admitted = true;
        }
        for w in self.waiting.drain(..) {
            let _ = w.send(verdict.clone());
        }
    }

    /// Queues a subscription change for the transmitter.
    pub fn change_interest(&mut self, op: Op, interest: Interest, name: Bytes) {
        self.interest.push((op, interest, name));
    }

    /// Whether the transmitter has yet to hear of some subscription: a change not sent,
    /// or no link (the next link's snapshot will carry them).
    pub fn interest_unsent(&self) -> bool {
        !self.interest.is_empty() || self.link.is_none()
    }

    /// The transmitter linked now, if any.
    pub fn transmitter(&self) -> Option<&str> {
        self.link.as_ref().map(|l| l.name.as_str())
    }

    /// Whether the session has no link and no attempt at one.
    pub fn needs_link(&self) -> bool {
        self.link.is_none() && self.connecting.is_none()
    }

    /// Starts connect attempt `generation`: the transmitters to avoid, or `None` when an
    /// attempt is in flight already.
    pub fn begin_connect(&mut self, generation: u64) -> Option<Vec<String>> {
        if self.connecting.is_some() {
            return None;
        }
        self.connecting = Some(generation);
        Some(self.avoid.clone())
    }

    /// The rendezvous placed the room for attempt `generation`: waiting SSUBSCRIBEs go on.
    pub fn placed(&mut self, generation: u64) {
        if self.connecting == Some(generation) {
            self.admit(Ok(()));
        }
    }

    /// Attempt `generation` found no link (`avoid`: a transmitter that did not answer).
    /// False when that attempt is no longer the one in flight.
    pub fn connect_failed(&mut self, generation: u64, avoid: Option<String>) -> bool {
        if self.connecting != Some(generation) {
            return false;
        }
        self.connecting = None;
        if let Some(name) = avoid {
            self.avoid = vec![name];
        }
        true
    }

    /// Attempt `generation` linked to transmitter `name`. The next flush greets it with
    /// `hello` and `snapshot`, every subscription of the session (which confirms those
    /// waiting), then sends every batch not acknowledged again. False when stale.
    pub fn linked(
        &mut self,
        generation: u64,
        name: String,
        sender: S,
        hello: ZmqMessage,
        snapshot: Vec<(Op, Interest, &[u8])>,
    ) -> bool {
        if self.connecting != Some(generation) {
            return false;
        }
        self.connecting = None;
        let greeting = self.greeting(hello, snapshot);
        self.link = Some(Link {
            generation,
            name,
            sender,
            last_heard: Instant::now(),
            last_ping: Instant::now(),
            credit: CreditOwed::default(),
            greeting,
            rejoining: false,
        });
        true
    }

    /// HELO, the subscription snapshot, and every batch not acknowledged sent again (from
    /// the next flush on): what a transmitter that does not know the session needs.
    fn greeting(
        &mut self,
        hello: ZmqMessage,
        snapshot: Vec<(Op, Interest, &[u8])>,
    ) -> Vec<ZmqMessage> {
        let mut greeting = vec![hello];
        if !snapshot.is_empty() || self.confirm.any_waiting() {
            let sync = self.confirm.next_number();
            interest_frames(snapshot, sync, &mut greeting);
        }
        // Changes queued before are part of the snapshot.
        self.interest.clear();
        self.unsent_from = 0;
        greeting
    }

    /// The transmitter answered "unknown cell": it dropped the session (silent too long,
    /// e.g. paused) while the link stayed up. Greets it again on the same link, once until
    /// it welcomes the session: false when already doing so, or with no current link.
    pub fn rejoin(&mut self, hello: ZmqMessage, snapshot: Vec<(Op, Interest, &[u8])>) -> bool {
        if self.link.as_ref().is_none_or(|l| l.rejoining) {
            return false;
        }
        let greeting = self.greeting(hello, snapshot);
        let link = self.link.as_mut().expect("checked above");
        link.greeting = greeting;
        // Its batches to the session start again from 1: credit what comes from now on.
        link.credit = CreditOwed::default();
        link.rejoining = true;
        true
    }

    /// The transmitter welcomed the session (`WLCM`).
    pub fn welcomed(&mut self) {
        if let Some(link) = self.link.as_mut() {
            link.rejoining = false;
        }
    }

    /// The reader of link `generation` ended. When that was the current link, the session
    /// lets it go, will avoid its transmitter, and needs another: the transmitter's name.
    pub fn link_closed(&mut self, generation: u64) -> Option<String> {
        if self.link.as_ref()?.generation != generation {
            return None;
        }
        let name = self.link.take().expect("checked above").name;
        self.avoid = vec![name.clone()];
        Some(name)
    }

    /// A message came on link `generation` at `now`: by which link, if it is still one of
    /// this session's and was not silent (or unpinged) for `expiry` before it. A link
    /// silent that long (this process was paused, or the transmitter was) is let go with
    /// what it carried:
    /// its transmitter has dropped the session or is about to, and has sent its anycatch
    /// messages to other cells; delivering them too would deliver them twice.
    pub fn heard(&mut self, generation: u64, now: Instant, expiry: Duration) -> Heard {
        let via = match (&self.link, &self.previous) {
            (Some(l), _) if l.generation == generation => Via::Current,
            (_, Some((l, _))) if l.generation == generation => Via::Previous,
            _ => return Heard::NotOurs,
        };
        let link = self.link_mut(via).expect("matched above");
        let stale = match via {
            Via::Current => link.expired(now, expiry),
            // Not pinged any more: read for one expiry after the move, then let go.
            Via::Previous => now.duration_since(link.last_heard) > expiry,
        };
        if stale {
            let name = link.name.clone();
            match via {
                Via::Current => {
                    self.link = None;
                    self.avoid = vec![name.clone()];
                }
                Via::Previous => self.previous = None,
            }
            return Heard::Stale(name);
        }
        link.last_heard = now;
        Heard::Via(via)
    }

    /// A DLVR batch of `bytes` came by `via`: credit is owed for it.
    pub fn received(&mut self, via: Via, batch: u64, bytes: usize) {
        if let Some(l) = self.link_mut(via) {
            l.credit.received(batch, bytes);
        }
    }

    /// The transmitter asked the session to move: its link becomes the previous one, read
    /// until `until` (peers learn where the session went before the old transmitter stops
    /// delivering to it), and the next attempt avoids it.
    pub fn move_away(&mut self, until: Instant) {
        if let Some(link) = self.link.take() {
            self.avoid = vec![link.name.clone()];
            self.previous = Some((link, until));
        }
    }

    /// The heartbeat at `now`: lets go of a previous link read long enough and of a
    /// current one silent for `expiry`; keeps a live one credited and pinged.
    pub fn tick(&mut self, now: Instant, expiry: Duration) -> Tick<S> {
        let mut tick = Tick {
            farewell: None,
            silent: None,
            credit: None,
            ping: None,
        };
        if self
            .previous
            .as_ref()
            .is_some_and(|(_, until)| now >= *until)
        {
            tick.farewell = self.previous.take().map(|(mut l, _)| {
                let last = goodbye(&mut l);
                (l.sender, last)
            });
        }
        if let Some(link) = self.link.as_mut() {
            if link.expired(now, expiry) {
                self.avoid = vec![link.name.clone()];
                tick.silent = self.link.take().map(|l| l.name);
            } else {
                tick.credit = credit(link, true);
                tick.ping = Some(bare_frame(cmd::PING));
                link.last_ping = now;
            }
        }
        tick
    }

    /// What to send now, in order, into `out`: on the previous link the credit it is owed;
    /// on the current one its greeting, the subscription changes, every batch not sent on
    /// it yet, and the credit due. With no link, publishes wait in the open batch.
    pub fn outgoing(&mut self, out: &mut Vec<(Via, ZmqMessage)>) {
        if let Some((previous, _)) = self.previous.as_mut() {
            out.extend(credit(previous, true).map(|m| (Via::Previous, m)));
        }
        if self.link.is_none() {
            return;
        }
        self.close();
        let link = self.link.as_mut().expect("checked above");
        out.extend(link.greeting.drain(..).map(|m| (Via::Current, m)));
        if !self.interest.is_empty() {
            let changes = self.interest.iter().map(|(op, k, n)| (*op, *k, &n[..]));
            let mut frames = Vec::new();
            interest_frames(changes, self.confirm.next_number(), &mut frames);
            self.interest.clear();
            out.extend(frames.into_iter().map(|m| (Via::Current, m)));
        }
        for batch in self.unacked.range(self.unsent_from..) {
            let mut m = binary_frame(
                cmd::PUBS,
                Bytes::copy_from_slice(&batch.first_seq.to_le_bytes()),
            );
            for part in &batch.parts {
                m.push_back(part.clone());
            }
            out.push((Via::Current, m));
        }
        self.unsent_from = self.unacked.len();
        out.extend(credit(link, false).map(|m| (Via::Current, m)));
        if out.iter().any(|(via, _)| *via == Via::Current) {
            // Busy links are alive to the transmitter whether or not the heartbeat ran.
            link.last_ping = Instant::now();
        }
    }

    /// The last messages for the current link before the session closes: the credit
    /// still owed, then QUIT. Credit first: what the transmitter sent and was never
    /// credited counts as not delivered (anycatch messages go to another cell).
    pub fn goodbye(&mut self) -> Vec<ZmqMessage> {
        self.link.as_mut().map(goodbye).unwrap_or_default()
    }

    /// What sends on the link `via`, if the session has it.
    pub fn sender(&mut self, via: Via) -> Option<&mut S> {
        self.link_mut(via).map(|l| &mut l.sender)
    }

    fn link_mut(&mut self, via: Via) -> Option<&mut Link<S>> {
        match via {
            Via::Current => self.link.as_mut(),
            Via::Previous => self.previous.as_mut().map(|(l, _)| l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::json_frame;
    use thynapse_protocol::wire;

    use thynapse_protocol::batch::{decode_publish_records, Kind};

    fn records(n: usize) -> Bytes {
        let mut b = BytesMut::new();
        for i in 0..n {
            put_publish(&mut b, Kind::Mesh, 7, b"ch", format!("m{i}").as_bytes());
        }
        b.freeze()
    }

    #[test]
    fn frames_are_acknowledged_whole_once_and_answer_every_token() {
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        // Client 1 publishes tokens 10..13, then client 2 token 4: one frame.
        s.queue_records(1, &records(3), 3, &[(10, 3)]);
        s.queue_records(2, &records(1), 1, &[(4, 1)]);
        s.close();
        // Two more from client 1 in a second frame.
        s.queue_records(1, &records(2), 2, &[(13, 2)]);
        s.close();
        assert_eq!(s.unacked.len(), 2);
        let f = &s.unacked[0];
        let messages: usize = f
            .parts
            .iter()
            .map(|p| decode_publish_records(p).unwrap().count())
            .sum();
        assert_eq!((f.first_seq, f.count, messages), (1, 4, 4));
        s.unsent_from = 2;

        let mut answers = Vec::new();
        // The second batch acknowledged first: answered, but it stays in the window
        // behind the first.
        assert_eq!(s.acknowledge(5, &[3, 3], &mut answers), (0, 0));
        assert_eq!(answers, vec![(1, 13, 3), (1, 14, 3)]);
        answers.clear();
        let (messages, _) = s.acknowledge(1, &[1, 0, 2, 5], &mut answers);
        assert_eq!(messages, 6);
        assert_eq!(answers, vec![(1, 10, 1), (1, 11, 0), (1, 12, 2), (2, 4, 5)]);
        // The same acknowledgements again (resent copies) answer nothing.
        answers.clear();
        assert_eq!(s.acknowledge(1, &[1, 0, 2, 5], &mut answers), (0, 0));
        assert_eq!(s.acknowledge(5, &[3, 3], &mut answers), (0, 0));
        assert!(answers.is_empty());
        assert!(s.settled());
        assert_eq!(s.unsent_from, 0);
    }

    #[test]
    fn a_full_frame_is_closed_and_abandoning_answers_all() {
        let mut s: Session<u8> = Session::new(Thid::random(), Some("r".into()));
        for t in 0..(MAX_PUBS_BATCH as u64 + 1) {
            s.queue_records(9, &records(1), 1, &[(t, 1)]);
        }
        assert_eq!(s.unacked.len(), 1, "the full frame was closed");
        let (replies, messages, bytes) = s.abandon();
        let n = MAX_PUBS_BATCH as u64;
        assert_eq!(replies, vec![(9, 0, n as u32), (9, n, 1)]);
        assert_eq!(messages, MAX_PUBS_BATCH + 1);
        assert_eq!(bytes, records(1).len() * (MAX_PUBS_BATCH + 1));
        assert!(s.settled());
    }

    #[test]
    fn a_batch_is_closed_once_it_holds_256_kib() {
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        let payload = vec![7u8; 100 * 1024];
        let mut one = BytesMut::new();
        put_publish(&mut one, Kind::Mesh, 7, b"ch", &payload);
        let one = one.freeze();
        // Client 1's reads, one publish each, then client 2's publishes one by one.
        for t in 0..5 {
            s.queue_records(1, &one, 1, &[(t, 1)]);
        }
        for t in 0..4 {
            let p = Publish {
                kind: Kind::Mesh,
                ts: 7,
                channel: b"ch",
                payload: &payload,
            };
            s.queue(2, t, &p);
        }
        s.close();
        let counts: Vec<usize> = s.unacked.iter().map(|f| f.count).collect();
        assert_eq!(
            counts,
            [3, 3, 3],
            "far fewer than {MAX_PUBS_BATCH} messages"
        );
        for f in &s.unacked {
            assert!(f.bytes >= BATCH_BYTES, "closed before 256 KiB: {}", f.bytes);
            assert!(
                f.bytes - one.len() < BATCH_BYTES,
                "closed late: {}",
                f.bytes
            );
        }
    }

    #[test]
    fn a_session_credits_what_it_took_before_it_says_quit() {
        let expiry = Duration::from_secs(3);
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        link(&mut s, "t1", 1, vec![]);
        flush(&mut s);
        // Moving: the old link delivers a batch after the last flush, then its expiry ends.
        let t0 = Instant::now();
        s.move_away(t0 + expiry);
        assert_eq!(s.heard(1, t0, expiry), Heard::Via(Via::Previous));
        s.received(Via::Previous, 7, 10);
        link(&mut s, "t2", 2, vec![]);
        let (old, last) = s.tick(t0 + expiry, expiry).farewell.expect("farewell");
        assert_eq!(old, 1);
        let credit = |m: &ZmqMessage| {
            let f = CommandFrame::parse(m.get(0).unwrap()).unwrap();
            (
                f.cmd_str().to_string(),
                f.decode_json::<wire::Credit>().ok().map(|c| c.batch),
            )
        };
        let last: Vec<_> = last.iter().map(credit).collect();
        assert_eq!(
            last,
            [("CRED".to_string(), Some(7)), ("QUIT".to_string(), None)]
        );
        // Stopping (or closing an idle room session): the current link's last messages.
        assert_eq!(s.heard(2, t0, expiry), Heard::Via(Via::Current));
        s.received(Via::Current, 4, 10);
        let last: Vec<_> = s.goodbye().iter().map(credit).collect();
        assert_eq!(
            last,
            [("CRED".to_string(), Some(4)), ("QUIT".to_string(), None)]
        );
    }

    // The link lifecycle, driven without sockets: links are numbered tags.

    use thynapse_protocol::frame::CommandFrame;

    /// The command of each message, with the link it goes on.
    fn commands(out: &[(Via, ZmqMessage)]) -> Vec<(Via, String)> {
        out.iter()
            .map(|(via, m)| {
                let f = CommandFrame::parse(m.get(0).unwrap()).unwrap();
                (*via, f.cmd_str().to_string())
            })
            .collect()
    }

    fn flush(s: &mut Session<u8>) -> Vec<(Via, ZmqMessage)> {
        let mut out = Vec::new();
        s.outgoing(&mut out);
        out
    }

    fn hello() -> ZmqMessage {
        json_frame(cmd::HELO, &serde_json::json!({}))
    }

    fn link(s: &mut Session<u8>, name: &str, tag: u8, snapshot: Vec<(Op, Interest, &[u8])>) {
        let generation = u64::from(tag);
        assert!(s.begin_connect(generation).is_some());
        assert!(s.linked(generation, name.into(), tag, hello(), snapshot));
    }

    #[test]
    fn one_attempt_at_a_time_and_stale_reports_are_ignored() {
        let mut s: Session<u8> = Session::new(Thid::random(), Some("r".into()));
        let (tx, mut rx) = oneshot::channel();
        s.waiting.push(tx);
        assert!(s.needs_link());
        assert_eq!(s.begin_connect(1), Some(vec![]));
        assert_eq!(s.begin_connect(2), None, "one attempt in flight");
        assert!(!s.needs_link());
        // Reports of another attempt change nothing.
        s.placed(7);
        assert!(!s.admitted);
        assert!(!s.connect_failed(7, Some("x".into())));
        assert!(!s.linked(7, "x".into(), 7, hello(), vec![]));
        s.placed(1);
        assert!(s.admitted);
        assert_eq!(rx.try_recv().unwrap(), Ok(()));
        // The attempt fails at t1: the next avoids it.
        assert!(s.connect_failed(1, Some("t1".into())));
        assert!(s.needs_link());
        assert_eq!(s.begin_connect(2), Some(vec!["t1".to_string()]));
        assert!(s.linked(2, "t2".into(), 2, hello(), vec![]));
        assert_eq!(s.transmitter(), Some("t2"));
        assert!(!s.needs_link());
        // A reader of another link closing does not touch this one.
        assert_eq!(s.link_closed(1), None);
        assert_eq!(s.link_closed(2), Some("t2".into()));
        assert!(s.needs_link());
        assert_eq!(s.begin_connect(3), Some(vec!["t2".to_string()]));
    }

    #[test]
    fn a_new_link_is_greeted_then_sent_everything_not_acknowledged() {
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        s.queue_records(1, &records(2), 2, &[(0, 2)]);
        s.change_interest(Op::Add, Interest::Channel, Bytes::from_static(b"a"));
        assert!(s.interest_unsent());
        let confirmed_at_once = s.confirm.wait(1, 0, true, Instant::now());
        assert!(!confirmed_at_once, "waits for the link");
        assert!(flush(&mut s).is_empty(), "no link: everything waits");

        link(&mut s, "t1", 1, vec![(Op::Add, Interest::Channel, b"a")]);
        let out = flush(&mut s);
        let expect = |names: &[&str]| {
            names
                .iter()
                .map(|n| (Via::Current, n.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(commands(&out), expect(&["HELO", "SUBS", "PUBS"]));
        // The snapshot replaces the change queued before the link, and confirms it.
        let subs = CommandFrame::parse(out[1].1.get(0).unwrap()).unwrap();
        let sync: wire::SubsSync = subs.decode_json().unwrap();
        let entries = wire::decode_interest(out[1].1.get(1).unwrap().clone()).unwrap();
        assert_eq!(entries.len(), 1);
        let mut released = Vec::new();
        s.confirm.confirm(sync.sync.unwrap(), &mut released);
        assert_eq!(released, vec![(1, 0)]);
        assert!(!s.interest_unsent());
        assert!(flush(&mut s).is_empty(), "nothing sent twice on one link");

        s.queue_records(1, &records(1), 1, &[(2, 1)]);
        s.change_interest(Op::Remove, Interest::Channel, Bytes::from_static(b"a"));
        assert_eq!(commands(&flush(&mut s)), expect(&["SUBS", "PUBS"]));

        // The link is lost: the next one gets both batches again, in order.
        assert_eq!(s.link_closed(1), Some("t1".into()));
        link(&mut s, "t2", 2, vec![]);
        let out = flush(&mut s);
        assert_eq!(commands(&out), expect(&["HELO", "PUBS", "PUBS"]));
        let first_seqs: Vec<u64> = out[1..]
            .iter()
            .map(|(_, m)| u64::from_le_bytes(m.get(1).unwrap()[..8].try_into().unwrap()))
            .collect();
        assert_eq!(first_seqs, vec![1, 3]);
        let mut answers = Vec::new();
        s.acknowledge(1, &[1, 1], &mut answers);
        s.acknowledge(3, &[1], &mut answers);
        assert!(s.settled());
    }

    #[test]
    fn a_moved_session_reads_and_credits_its_old_link_for_one_expiry() {
        let expiry = Duration::from_secs(3);
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        link(&mut s, "t1", 1, vec![]);
        flush(&mut s);
        let t0 = Instant::now();
        s.move_away(t0 + expiry);
        assert!(s.needs_link());
        assert_eq!(s.begin_connect(2), Some(vec!["t1".to_string()]));
        // Still delivering on the old link while the new one is sought.
        assert_eq!(s.heard(1, t0, expiry), Heard::Via(Via::Previous));
        for batch in 1..=CREDIT_BATCHES_FOR_TEST {
            s.received(Via::Previous, batch, 10);
        }
        assert_eq!(
            commands(&flush(&mut s)),
            vec![(Via::Previous, "CRED".to_string())]
        );
        assert!(s.linked(2, "t2".into(), 2, hello(), vec![]));
        assert_eq!(s.heard(2, t0, expiry), Heard::Via(Via::Current));
        assert_eq!(s.heard(1, t0, expiry), Heard::Via(Via::Previous));
        assert_eq!(s.sender(Via::Previous).copied(), Some(1));
        let tick = s.tick(t0 + expiry / 2, expiry);
        assert!(tick.farewell.is_none() && tick.silent.is_none());
        let tick = s.tick(t0 + expiry, expiry);
        let (old, last) = tick.farewell.expect("QUIT goes on the old link");
        assert_eq!(old, 1);
        assert_eq!(last.len(), 1, "nothing owed: QUIT only");
        assert_eq!(
            s.heard(1, t0 + expiry, expiry),
            Heard::NotOurs,
            "the old link is gone"
        );
        assert_eq!(s.transmitter(), Some("t2"));
    }

    #[test]
    fn a_silent_link_is_let_go_after_one_expiry_and_a_live_one_pinged() {
        let expiry = Duration::from_secs(3);
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        link(&mut s, "t1", 1, vec![]);
        let t0 = Instant::now();
        assert_eq!(s.heard(1, t0, expiry), Heard::Via(Via::Current));
        s.received(Via::Current, 5, 10);
        let tick = s.tick(t0 + expiry / 2, expiry);
        assert!(tick.ping.is_some() && tick.silent.is_none());
        assert!(
            tick.credit.is_some(),
            "the heartbeat credits whatever is owed"
        );
        assert!(
            s.tick(t0 + expiry, expiry).credit.is_none(),
            "credited once"
        );
        let tick = s.tick(t0 + expiry + Duration::from_millis(1), expiry);
        assert_eq!(tick.silent.as_deref(), Some("t1"));
        assert!(tick.ping.is_none());
        assert!(s.needs_link());
        assert_eq!(s.begin_connect(2), Some(vec!["t1".to_string()]));
    }

    #[test]
    fn a_message_on_a_link_silent_past_the_expiry_is_dropped_with_the_link() {
        // A paused process wakes to what its transmitter sent meanwhile: the transmitter
        // has dropped it and given its anycatch messages to other cells.
        let expiry = Duration::from_secs(3);
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        link(&mut s, "t1", 1, vec![]);
        let t0 = Instant::now();
        s.tick(t0, expiry);
        assert_eq!(s.heard(1, t0, expiry), Heard::Via(Via::Current));
        assert_eq!(
            s.heard(1, t0 + expiry, expiry),
            Heard::Via(Via::Current),
            "just in time"
        );
        let late = t0 + 2 * expiry + Duration::from_millis(1);
        assert_eq!(s.heard(1, late, expiry), Heard::Stale("t1".into()));
        assert!(s.needs_link());
        assert_eq!(s.begin_connect(2), Some(vec!["t1".to_string()]));
        assert_eq!(s.heard(1, late, expiry), Heard::NotOurs);
        // Heard all along but not pinged for an expiry (its heartbeat held up): the
        // transmitter may have dropped it all the same.
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        link(&mut s, "t2", 1, vec![]);
        let t1 = Instant::now();
        s.tick(t1, expiry);
        for i in 1..=4 {
            let heard = s.heard(1, t1 + expiry / 2 * i, expiry);
            assert_eq!(
                heard == Heard::Via(Via::Current),
                i <= 2,
                "at {i} half expiries"
            );
        }
    }

    #[test]
    fn a_session_its_transmitter_forgot_greets_it_again_once() {
        let mut s: Session<u8> = Session::new(Thid::random(), None);
        assert!(!s.rejoin(hello(), vec![]), "no link, nothing to greet");
        link(&mut s, "t1", 1, vec![(Op::Add, Interest::Channel, b"a")]);
        s.queue_records(1, &records(1), 1, &[(0, 1)]);
        flush(&mut s);
        s.received(Via::Current, 9, 10);
        // "unknown cell": HELO, the snapshot and the unacknowledged batch again, on the
        // same link; the old incarnation's credit is not owed any more.
        assert!(s.rejoin(hello(), vec![(Op::Add, Interest::Channel, b"a")]));
        let out = flush(&mut s);
        let names: Vec<String> = commands(&out).into_iter().map(|(_, c)| c).collect();
        assert_eq!(names, ["HELO", "SUBS", "PUBS"]);
        assert!(!s.rejoin(hello(), vec![]), "once until welcomed");
        s.welcomed();
        assert!(s.rejoin(hello(), vec![]), "and again if it forgets again");
        assert_eq!(s.transmitter(), Some("t1"));
    }

    #[test]
    fn many_subscriptions_go_in_several_subs_frames_the_last_confirming_them() {
        let names: Vec<Vec<u8>> = (0..100)
            .map(|i| vec![b'a' + (i % 26) as u8; 10_000])
            .collect();
        let entries = names.iter().map(|n| (Op::Add, Interest::Channel, &n[..]));
        let mut frames = Vec::new();
        interest_frames(entries, 7, &mut frames);
        assert!(frames.len() >= 4, "{} frames", frames.len());
        let mut total = 0;
        for (i, m) in frames.iter().enumerate() {
            let body = m.get(1).unwrap();
            assert!(body.len() <= BATCH_BYTES + 10_006);
            total += wire::decode_interest(body.clone()).unwrap().len();
            let header: wire::SubsSync = CommandFrame::parse(m.get(0).unwrap())
                .unwrap()
                .decode_json()
                .unwrap();
            let last = i == frames.len() - 1;
            assert_eq!(header.sync, last.then_some(7));
        }
        assert_eq!(total, 100);
    }

    const CREDIT_BATCHES_FOR_TEST: u64 = thynapse_protocol::credit::CREDIT_BATCHES as u64;
}
