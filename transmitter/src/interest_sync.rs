//! Interest barriers: a cell's `SUBS` that carries a sync number is answered `SUBD` once
//! every peer linked at the time has applied the change, so that a SUBSCRIBE confirmed to
//! a client is one that a PUBLISH on any transmitter will honour (Redis' promise).
//!
//! After the interest updates of a loop turn go out, one `SYNC` round is sent to every
//! linked peer; a peer answers `SYND` once it has handled everything before it on that
//! connection (it reads it in order). A peer whose link is lost no longer counts (it
//! cannot route to the cell through that link; its next link starts with a snapshot),
//! and a peer slower than the bound is given up on and counted.
//!
//! Pure bookkeeping: the event loop sends the rounds and the answers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::HashMap;

use crate::routing::PeerId;

/// A peer asked in a round, with the generation of the link it was asked on.
pub type Asked = (PeerId, u64);

/// A cell waiting for its confirmation: its connection, the highest number it asked for,
/// the round that covers it and the peers still to answer.
struct Barrier {
    identity: Bytes,
    sync: u64,
    round: u64,
    peers: Vec<Asked>,
    since: Instant,
    /// A peer it waited for lost its link before answering.
    lost: bool,
}

/// Why a confirmation went out without every peer's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// A peer did not answer within the bound.
    Timeout,
    /// A peer's link was lost before it answered (its next link starts with a snapshot).
    PeerLost,
}

impl GaveUp {
    pub fn label(self) -> &'static str {
        match self {
            GaveUp::Timeout => "timeout",
            GaveUp::PeerLost => "peer_lost",
        }
    }
}

#[derive(Default)]
pub struct InterestSync {
    round: u64,
    /// Asked since the last round was sent: (connection, number), one per connection.
    requested: Vec<(Bytes, u64)>,
    /// At most one per connection: a later request supersedes an earlier one (answering
    /// the later number confirms both).
    waiting: Vec<Barrier>,
    /// The highest round each peer answered.
    answered: HashMap<PeerId, u64>,
}

impl InterestSync {
    /// A cell asked to hear `SUBD sync` once its interest is known.
    pub fn request(&mut self, identity: &Bytes, sync: u64) {
        match self.requested.iter_mut().find(|(i, _)| i == identity) {
            Some((_, n)) => *n = (*n).max(sync),
            None => self.requested.push((identity.clone(), sync)),
        }
    }

    pub fn has_requests(&self) -> bool {
        !self.requested.is_empty()
    }

    /// The last round started (0 before the first).
    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn is_idle(&self) -> bool {
        self.requested.is_empty() && self.waiting.is_empty()
    }

    /// Starts a round for the requests so far, covering `peers`: every live peer, whether
    /// its link is ready to be asked now (after this turn's interest updates) or is still
    /// being built (it is asked right after the snapshot that starts the link). Returns
    /// the round's number when there is a peer to hear from; with none, every request is
    /// answered at once into `done`.
    pub fn start_round(
        &mut self,
        peers: Vec<Asked>,
        now: Instant,
        done: &mut Vec<(Bytes, u64)>,
    ) -> Option<u64> {
        let requested = std::mem::take(&mut self.requested);
        if peers.is_empty() {
            for (identity, sync) in requested {
                // Anything that waited is covered too: the interest reached nobody else.
                let older = self.take_waiting(&identity).map_or(0, |b| b.sync);
                done.push((identity, sync.max(older)));
            }
            return None;
        }
        self.round += 1;
        for (identity, sync) in requested {
            let (sync, since) = match self.take_waiting(&identity) {
                Some(b) => (sync.max(b.sync), b.since),
                None => (sync, now),
            };
            self.waiting.push(Barrier {
                identity,
                sync,
                round: self.round,
                peers: peers.clone(),
                since,
                lost: false,
            });
        }
        Some(self.round)
    }

    fn take_waiting(&mut self, identity: &Bytes) -> Option<Barrier> {
        let i = self.waiting.iter().position(|b| b.identity == identity)?;
        Some(self.waiting.swap_remove(i))
    }

    /// A peer answered `round` (and so every round before it).
    pub fn answered(&mut self, peer: PeerId, round: u64) {
        // A round never sent confirms nothing beyond the last one that was.
        let round = round.min(self.round);
        let a = self.answered.entry(peer).or_default();
        *a = (*a).max(round);
    }

    /// A peer is forgotten: its answers go with it.
    pub fn forget(&mut self, peer: PeerId) {
        self.answered.remove(&peer);
    }

    /// Moves the barriers that are through into `done`: each peer answered the round or
    /// is no longer on the link it was asked on (`linked` says which are), or the bound
    /// passed. Those that went without every answer are added to `gave_up`.
    pub fn complete(
        &mut self,
        linked: impl Fn(Asked) -> bool,
        now: Instant,
        bound: Duration,
        done: &mut Vec<(Bytes, u64)>,
        gave_up: &mut Vec<GaveUp>,
    ) {
        let answered = &self.answered;
        self.waiting.retain_mut(|b| {
            b.peers.retain(|&(peer, generation)| {
                if answered.get(&peer).is_some_and(|&r| r >= b.round) {
                    return false;
                }
                let still = linked((peer, generation));
                b.lost |= !still;
                still
            });
            let late = now.duration_since(b.since) > bound;
            if !b.peers.is_empty() && !late {
                return true;
            }
            if !b.peers.is_empty() {
                gave_up.push(GaveUp::Timeout);
            } else if b.lost {
                gave_up.push(GaveUp::PeerLost);
            }
            done.push((b.identity.clone(), b.sync));
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    const BOUND: Duration = Duration::from_secs(2);

    #[test]
    fn answered_once_every_peer_answered_the_round() {
        let now = Instant::now();
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        let mut gave_up: Vec<GaveUp> = Vec::new();
        s.request(&id(1), 7);
        let round = s.start_round(vec![(1, 0), (2, 0)], now, &mut done).unwrap();
        assert!(done.is_empty());
        s.answered(1, round);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert!(gave_up.is_empty());
        assert!(done.is_empty());
        s.answered(2, round);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert_eq!(done, [(id(1), 7)]);
        assert!(s.is_idle());
    }

    #[test]
    fn with_no_peer_the_answer_is_immediate() {
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        s.request(&id(1), 3);
        s.request(&id(1), 4);
        assert_eq!(s.start_round(Vec::new(), Instant::now(), &mut done), None);
        assert_eq!(done, [(id(1), 4)]);
    }

    #[test]
    fn an_earlier_round_does_not_answer_a_later_request() {
        let now = Instant::now();
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        let mut gave_up: Vec<GaveUp> = Vec::new();
        s.request(&id(1), 1);
        let first = s.start_round(vec![(1, 0)], now, &mut done).unwrap();
        s.request(&id(1), 2);
        let second = s.start_round(vec![(1, 0)], now, &mut done).unwrap();
        s.answered(1, first);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert!(
            done.is_empty(),
            "the peer has not applied the second change yet"
        );
        s.answered(1, second);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert_eq!(done, [(id(1), 2)], "one answer covers both numbers");
    }

    #[test]
    fn a_lost_link_no_longer_counts_and_a_slow_peer_is_bounded() {
        let t0 = Instant::now();
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        let mut gave_up: Vec<GaveUp> = Vec::new();
        s.request(&id(1), 1);
        s.request(&id(2), 1);
        s.start_round(vec![(1, 5), (2, 0)], t0, &mut done);
        s.answered(2, 1);
        // Peer 1's link was rebuilt (generation 6): it is not waited for.
        s.complete(
            |(p, g)| p != 1 || g == 6,
            t0,
            BOUND,
            &mut done,
            &mut gave_up,
        );
        assert_eq!(done.len(), 2);
        assert_eq!(
            gave_up,
            [GaveUp::PeerLost; 2],
            "both went without peer 1's answer"
        );

        done.clear();
        s.request(&id(3), 9);
        s.start_round(vec![(1, 6)], t0, &mut done);
        gave_up.clear();
        s.complete(|_| true, t0 + BOUND, BOUND, &mut done, &mut gave_up);
        assert!(done.is_empty() && gave_up.is_empty());
        let late = t0 + BOUND + Duration::from_millis(1);
        s.complete(|_| true, late, BOUND, &mut done, &mut gave_up);
        assert_eq!(gave_up, [GaveUp::Timeout]);
        assert_eq!(done, [(id(3), 9)]);
    }

    #[test]
    fn rounds_never_sent_confirm_nothing() {
        let now = Instant::now();
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        let mut gave_up: Vec<GaveUp> = Vec::new();
        s.answered(1, u64::MAX);
        s.request(&id(1), 1);
        s.start_round(vec![(1, 0)], now, &mut done);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert!(done.is_empty());
    }
}
