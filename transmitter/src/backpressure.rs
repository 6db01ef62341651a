//! The back-pressure core: how a slow receiver slows the publishers that feed it, and only
//! them, without losing their messages.
//!
//! - **Held batches**: an inbound batch (a cell's `PUBS`, a peer's `FWRD`) whose next
//!   message a link has no room for waits, in order per source, until credit makes room.
//!   Past the expiry the rest is routed whatever the room (what does not fit is dropped
//!   there, and counted), so a receiver that never credits cannot stall its senders.
//! - **Deferred acknowledgements**: the answer to work that fed a congested link waits
//!   until the link drains (or the expiry passes); that is what holds a publisher back.
//!   Acknowledgements to one connection keep their order.
//!
//! Pure bookkeeping, generic over what a batch and a reply are; the event loop routes and
//! sends.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashMap, HashSet};
use thynapse_protocol::Thid;

use crate::routing::PeerId;

/// A connection work comes from or goes to: a local cell's, or a peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    Cell(Thid),
    Peer(PeerId),
}

/// Routing stopped: a link the next message goes to has no room.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoom;

/// How far routing a batch got: the messages already routed, what each reached, and the
/// links they went to (which its acknowledgement waits on).
#[derive(Debug, Default)]
pub struct Progress {
    pub done: usize,
    pub counts: Vec<u32>,
    pub dests: Vec<Link>,
}

/// A batch waiting for room, with the connection to answer on.
pub struct Held<B> {
    pub source: Link,
    pub identity: Bytes,
    pub batch: B,
    pub bytes: usize,
    pub progress: Progress,
    since: Instant,
}

/// Inbound batches waiting for room, oldest first.
pub struct HeldBatches<B> {
    queue: VecDeque<Held<B>>,
    /// Bytes held per source (every source with a batch in the queue).
    by_source: HashMap<Link, usize>,
    /// Something may have made room since the batches were last tried (a credit, a
    /// receiver gone, an interest change): they are tried again only then, or at expiry.
    room_freed: bool,
}

impl<B> Default for HeldBatches<B> {
    fn default() -> Self {
        HeldBatches {
            queue: VecDeque::new(),
            by_source: HashMap::default(),
            room_freed: false,
        }
    }
}

impl<B> HeldBatches<B> {
    /// Whether `source` has a batch waiting (its next one must wait behind it).
    pub fn is_holding(&self, source: Link) -> bool {
        self.by_source.contains_key(&source)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.by_source.values().sum()
    }

    pub fn room_freed(&mut self) {
        self.room_freed = true;
    }

    /// Holds a batch. Returns true when its source, holding more than `limit` bytes with
    /// it, must have its batches routed now whatever the room (`resume` with `force`):
    /// only a sender that ignores acknowledgements gets there.
    #[allow(clippy::too_many_arguments)]
    pub fn hold(
        &mut self,
        source: Link,
        identity: &Bytes,
        batch: B,
        bytes: usize,
        progress: Progress,
        now: Instant,
        limit: usize,
    ) -> bool {
        let already = self.by_source.get(&source).copied();
        let held = already.unwrap_or(0) + bytes;
        self.by_source.insert(source, held);
        self.queue.push_back(Held {
            source,
            identity: identity.clone(),
            batch,
            bytes,
            progress,
            since: now,
        });
        already.is_some() && held > limit
    }

    /// Tries the held batches again, in order per source, with `route` (told whether to
    /// route whatever the room); a source stops at its first batch that meets no room.
    /// Does nothing unless room may have been freed, the oldest expired, or `force` names
    /// a source (whose batches, like expired ones, are routed whatever the room).
    pub fn resume(
        &mut self,
        now: Instant,
        expiry: Duration,
        force: Option<Link>,
        mut route: impl FnMut(&mut Held<B>, bool) -> Result<(), NoRoom>,
    ) {
        let expired = |h: &Held<B>| now.duration_since(h.since) > expiry;
        match self.queue.front() {
            None => return,
            Some(front) if force.is_none() && !self.room_freed && !expired(front) => return,
            _ => {}
        }
        self.room_freed = false;
        let mut blocked: Vec<Link> = Vec::new();
        let mut keep = VecDeque::new();
        for mut h in std::mem::take(&mut self.queue) {
            if blocked.contains(&h.source) {
                keep.push_back(h);
                continue;
            }
            let forced = force == Some(h.source) || expired(&h);
            if route(&mut h, forced).is_err() {
                blocked.push(h.source);
                keep.push_back(h);
            }
        }
        self.queue = keep;
        self.by_source.clear();
        for h in &self.queue {
            *self.by_source.entry(h.source).or_default() += h.bytes;
        }
    }

    /// Forgets the batches held from `source` (its connection is gone), and returns them.
    pub fn forget(&mut self, source: Link) -> VecDeque<Held<B>> {
        let (gone, kept) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|h| h.source == source);
        self.queue = kept;
        self.by_source.remove(&source);
        self.room_freed = true;
        gone
    }
}

/// An acknowledgement waiting for congested links to drain.
struct Deferred<R> {
    identity: Bytes,
    reply: R,
    dests: Vec<Link>,
    since: Instant,
}

/// Acknowledgements held back by congestion, oldest first.
pub struct DeferredAcks<R> {
    waiting: Vec<Deferred<R>>,
}

impl<R> Default for DeferredAcks<R> {
    fn default() -> Self {
        DeferredAcks {
            waiting: Vec::new(),
        }
    }
}

impl<R> DeferredAcks<R> {
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Whether an acknowledgement for `identity` must wait: the work it answers fed a
    /// congested link (`congested`), or one for the same connection already waits.
    pub fn must_wait(&self, identity: &Bytes, congested: bool) -> bool {
        congested || self.waiting.iter().any(|d| d.identity == *identity)
    }

    pub fn defer(&mut self, identity: &Bytes, reply: R, dests: Vec<Link>, now: Instant) {
        self.waiting.push(Deferred {
            identity: identity.clone(),
            reply,
            dests,
            since: now,
        });
    }

    /// The acknowledgements whose links are no longer `congested`, in order; one whose
    /// connection still has another waiting stays, so none overtakes an earlier one.
    pub fn release(&mut self, congested: impl Fn(&[Link]) -> bool, out: &mut Vec<R>) {
        if self.waiting.is_empty() {
            return;
        }
        let (ready, mut waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|d| !congested(&d.dests));
        let blocked: HashSet<Bytes> = waiting.iter().map(|d| d.identity.clone()).collect();
        for d in ready {
            if blocked.contains(&d.identity) {
                waiting.push(d);
            } else {
                out.push(d.reply);
            }
        }
        waiting.sort_by_key(|d| d.since);
        self.waiting = waiting;
    }

    /// The acknowledgements older than `expiry`, whatever their links: a congested link
    /// is then left to its drop limit rather than stall a publisher for ever.
    pub fn expire(&mut self, now: Instant, expiry: Duration, out: &mut Vec<R>) {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|d| now.duration_since(d.since) > expiry);
        self.waiting = waiting;
        out.extend(ready.into_iter().map(|d| d.reply));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: Duration = Duration::from_secs(1);

    fn cell(n: u8) -> Link {
        Link::Cell(Thid([n; 20]))
    }

    fn conn(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    /// A batch here: its messages, each the link it needs room on and a name.
    type Batch = Vec<(Link, &'static str)>;

    /// Routes held batches against the room each link has, as the transmitter does.
    fn route_into<'a>(
        room: &'a mut HashMap<Link, usize>,
        routed: &'a mut Vec<&'static str>,
    ) -> impl FnMut(&mut Held<Batch>, bool) -> Result<(), NoRoom> + 'a {
        move |h, force| {
            for (i, (link, name)) in h.batch.iter().enumerate().skip(h.progress.done) {
                let r = room.entry(*link).or_default();
                if *r == 0 && !force {
                    return Err(NoRoom);
                }
                *r = r.saturating_sub(1);
                routed.push(name);
                h.progress.done = i + 1;
            }
            Ok(())
        }
    }

    #[test]
    fn a_held_batch_resumes_where_it_stopped_once_room_is_freed() {
        let t0 = Instant::now();
        let mut held = HeldBatches::default();
        let (a, b) = (cell(1), cell(2));
        let progress = Progress {
            done: 1,
            ..Progress::default()
        };
        let batch = vec![(b, "m1"), (b, "m2"), (b, "m3")];
        assert!(!held.hold(a, &conn(1), batch, 30, progress, t0, 100));
        assert!(held.is_holding(a) && held.bytes() == 30);
        let mut room = HashMap::default();
        let mut routed = Vec::new();
        // Nothing freed, nothing expired: not even tried.
        held.resume(t0, EXPIRY, None, route_into(&mut room, &mut routed));
        assert!(routed.is_empty());
        room.insert(b, 1);
        held.room_freed();
        held.resume(t0, EXPIRY, None, route_into(&mut room, &mut routed));
        assert_eq!(routed, ["m2"], "m1 was routed before it was held");
        room.insert(b, 5);
        held.room_freed();
        held.resume(t0, EXPIRY, None, route_into(&mut room, &mut routed));
        assert_eq!(routed, ["m2", "m3"]);
        assert!(held.is_empty() && !held.is_holding(a) && held.bytes() == 0);
    }

    #[test]
    fn a_source_keeps_its_order_and_others_go_ahead() {
        let t0 = Instant::now();
        let mut held = HeldBatches::default();
        let (a, b, stuck, free) = (cell(1), cell(2), cell(3), cell(4));
        held.hold(
            a,
            &conn(1),
            vec![(stuck, "a1")],
            10,
            Progress::default(),
            t0,
            100,
        );
        held.hold(
            a,
            &conn(1),
            vec![(free, "a2")],
            10,
            Progress::default(),
            t0,
            100,
        );
        held.hold(
            b,
            &conn(2),
            vec![(free, "b1")],
            10,
            Progress::default(),
            t0,
            100,
        );
        let mut room = HashMap::from_iter([(free, 10)]);
        let mut routed = Vec::new();
        held.room_freed();
        held.resume(t0, EXPIRY, None, route_into(&mut room, &mut routed));
        assert_eq!(
            routed,
            ["b1"],
            "a2 waits behind a1; b is not held back by a"
        );
        assert_eq!(held.bytes(), 20);
        // Past the expiry everything goes, whatever the room.
        held.resume(
            t0 + EXPIRY * 2,
            EXPIRY,
            None,
            route_into(&mut room, &mut routed),
        );
        assert_eq!(routed, ["b1", "a1", "a2"]);
    }

    #[test]
    fn a_source_over_its_limit_is_forced_and_a_gone_one_forgotten() {
        let t0 = Instant::now();
        let mut held = HeldBatches::default();
        let (a, stuck) = (cell(1), cell(3));
        assert!(!held.hold(
            a,
            &conn(1),
            vec![(stuck, "1")],
            60,
            Progress::default(),
            t0,
            100
        ));
        assert!(held.hold(
            a,
            &conn(1),
            vec![(stuck, "2")],
            60,
            Progress::default(),
            t0,
            100
        ));
        let mut room = HashMap::default();
        let mut routed = Vec::new();
        held.resume(t0, EXPIRY, Some(a), route_into(&mut room, &mut routed));
        assert_eq!(routed, ["1", "2"]);

        held.hold(
            a,
            &conn(1),
            vec![(stuck, "3")],
            60,
            Progress::default(),
            t0,
            100,
        );
        held.forget(a);
        assert!(held.is_empty() && held.bytes() == 0);
    }

    #[test]
    fn deferred_acks_keep_their_order_per_connection() {
        let t0 = Instant::now();
        let mut acks = DeferredAcks::default();
        let (slow, fast) = (cell(1), cell(2));
        assert!(!acks.must_wait(&conn(1), false));
        acks.defer(&conn(1), "x1", vec![slow], t0);
        // A later ack to the same connection waits behind it even with no congestion.
        assert!(acks.must_wait(&conn(1), false));
        acks.defer(&conn(1), "x2", vec![fast], t0);
        acks.defer(&conn(2), "y1", vec![fast], t0);
        let mut out = Vec::new();
        acks.release(|dests| dests.contains(&slow), &mut out);
        assert_eq!(out, ["y1"]);
        acks.release(|_| false, &mut out);
        assert_eq!(out, ["y1", "x1", "x2"]);
        assert!(acks.is_empty());
    }

    #[test]
    fn deferred_acks_go_at_the_expiry_whatever_the_congestion() {
        let t0 = Instant::now();
        let mut acks = DeferredAcks::default();
        acks.defer(&conn(1), "old", vec![cell(1)], t0);
        acks.defer(&conn(2), "new", vec![cell(1)], t0 + EXPIRY);
        let mut out = Vec::new();
        acks.expire(t0 + EXPIRY + Duration::from_millis(1), EXPIRY, &mut out);
        assert_eq!(out, ["old"]);
        assert!(!acks.is_empty());
    }
}
