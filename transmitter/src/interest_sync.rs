//! Interest barriers: a cell's `SUBS` that carries a sync number is answered `SUBD` once
//! every peer linked at the time has applied the change, so that a SUBSCRIBE confirmed to
//! a client is one that a PUBLISH on any transmitter will honour (Redis' promise).
//!
//! After the interest updates of a loop turn go out, one `SYNC` round is sent to every
//! linked peer; a peer answers `SYND` once it has handled everything before it on that
//! connection (it reads it in order). Every live peer is waited for, one whose link is
//! being (re)built too: it is asked right after the snapshot that starts the link. A peer
//! that is forgotten (silent past the expiry) no longer counts, and one slower than the
//! bound is given up on; both are counted.
//!
//! Pure bookkeeping: the event loop sends the rounds and the answers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::HashMap;

use crate::routing::PeerId;

/// A cell waiting for its confirmation: its connection, the highest number it asked for,
/// the round that covers it and the peers still to answer.
struct Barrier {
    identity: Bytes,
    sync: u64,
    round: u64,
    peers: Vec<PeerId>,
    since: Instant,
    /// A peer it waited for was forgotten before answering.
    lost: bool,
}

/// Why a confirmation went out without every peer's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// A peer did not answer within the bound.
    Timeout,
    /// A peer was forgotten (silent past the expiry) before it answered.
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
    /// One per connection and round, oldest first; each is answered as its round
    /// completes (a later number confirms the earlier ones too, so the order of the
    /// answers does not matter).
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
        peers: Vec<PeerId>,
        now: Instant,
        done: &mut Vec<(Bytes, u64)>,
    ) -> Option<u64> {
        let requested = std::mem::take(&mut self.requested);
        if peers.is_empty() {
            // The interest reached nobody else: known wherever it can be.
            done.extend(requested);
            return None;
        }
        self.round += 1;
        for (identity, sync) in requested {
            self.waiting.push(Barrier {
                identity,
                sync,
                round: self.round,
                peers: peers.clone(),
                since: now,
                lost: false,
            });
        }
        Some(self.round)
    }

    /// A peer answered `round` (and so every round before it).
    pub fn answered(&mut self, peer: PeerId, round: u64) {
        // A round never sent confirms nothing beyond the last one that was.
        let round = round.min(self.round);
        let a = self.answered.entry(peer).or_default();
        *a = (*a).max(round);
    }

    /// Whether a round waits for `peer`'s answer (its link is then pinged, so that its
    /// silence is noticed).
    pub fn waiting_on(&self, peer: PeerId) -> bool {
        let answered = self.answered.get(&peer).copied().unwrap_or(0);
        self.waiting
            .iter()
            .any(|b| b.round > answered && b.peers.contains(&peer))
    }

    /// A peer is forgotten: its answers go with it.
    pub fn forget(&mut self, peer: PeerId) {
        self.answered.remove(&peer);
    }

    /// Moves the barriers that are through into `done`: each peer answered the round or
    /// is no longer live (`live` says which are), or the bound passed. Those that went
    /// without every answer are added to `gave_up`.
    pub fn complete(
        &mut self,
        live: impl Fn(PeerId) -> bool,
        now: Instant,
        bound: Duration,
        done: &mut Vec<(Bytes, u64)>,
        gave_up: &mut Vec<GaveUp>,
    ) {
        let answered = &self.answered;
        self.waiting.retain_mut(|b| {
            b.peers.retain(|&peer| {
                if answered.get(&peer).is_some_and(|&r| r >= b.round) {
                    return false;
                }
                let still = live(peer);
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
        let round = s.start_round(vec![1, 2], now, &mut done).unwrap();
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
        assert_eq!(done, [(id(1), 4)], "requests of one turn are one");
    }

    #[test]
    fn each_round_is_answered_as_it_completes() {
        let now = Instant::now();
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        let mut gave_up: Vec<GaveUp> = Vec::new();
        s.request(&id(1), 1);
        let first = s.start_round(vec![1], now, &mut done).unwrap();
        s.request(&id(1), 2);
        let second = s.start_round(vec![1], now, &mut done).unwrap();
        s.answered(1, first);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert_eq!(
            done,
            [(id(1), 1)],
            "the first change is answered on its own"
        );
        s.answered(1, second);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert_eq!(done, [(id(1), 1), (id(1), 2)]);
    }

    #[test]
    fn a_forgotten_peer_no_longer_counts_and_a_slow_one_is_bounded() {
        let t0 = Instant::now();
        let mut s = InterestSync::default();
        let mut done = Vec::new();
        let mut gave_up: Vec<GaveUp> = Vec::new();
        s.request(&id(1), 1);
        s.request(&id(2), 1);
        s.start_round(vec![1, 2], t0, &mut done);
        s.answered(2, 1);
        // Peer 1 was forgotten: it is not waited for.
        s.complete(|p| p != 1, t0, BOUND, &mut done, &mut gave_up);
        assert_eq!(done.len(), 2);
        assert_eq!(
            gave_up,
            [GaveUp::PeerLost; 2],
            "both went without peer 1's answer"
        );

        done.clear();
        s.request(&id(3), 9);
        s.start_round(vec![1], t0, &mut done);
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
        s.start_round(vec![1], now, &mut done);
        s.complete(|_| true, now, BOUND, &mut done, &mut gave_up);
        assert!(done.is_empty());
    }
}
