//! Duplicate suppression per origin: a sliding window over sequence numbers, as in
//! IPsec's anti-replay window. A message may reach a cell twice only while the cell moves
//! between transmitters (it is briefly registered on both, and a publisher resends what
//! its old transmitter had not acknowledged); the window drops the second copy even when
//! the two paths reorder messages.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Thid;

/// How many sequence numbers behind the highest one seen are still remembered: as many
/// as a sidecar keeps unacknowledged (and may resend after a move), so a resend from the
/// far end of its window is still told apart from a copy (2 KiB per origin).
pub const WINDOW: u64 = 16_384;
const WORDS: usize = (WINDOW / 64) as usize;

#[derive(Clone, Debug)]
pub struct SeqWindow {
    highest: u64,
    seen_any: bool,
    bits: [u64; WORDS],
}

impl Default for SeqWindow {
    fn default() -> Self {
        Self {
            highest: 0,
            seen_any: false,
            bits: [0; WORDS],
        }
    }
}

impl SeqWindow {
    /// Records `seq`; true when it is new, false for a duplicate or a number too old to
    /// judge (more than WINDOW behind the highest seen).
    pub fn accept(&mut self, seq: u64) -> bool {
        if !self.seen_any {
            self.seen_any = true;
            self.highest = seq;
            self.set(seq);
            return true;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            if shift >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for s in self.highest + 1..=seq {
                    self.clear(s);
                }
            }
            self.highest = seq;
            self.set(seq);
            return true;
        }
        if self.highest - seq >= WINDOW {
            return false;
        }
        if self.get(seq) {
            return false;
        }
        self.set(seq);
        true
    }

    fn pos(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }
    fn set(&mut self, seq: u64) {
        let (w, b) = Self::pos(seq);
        self.bits[w] |= b;
    }
    fn clear(&mut self, seq: u64) {
        let (w, b) = Self::pos(seq);
        self.bits[w] &= !b;
    }
    fn get(&self, seq: u64) -> bool {
        let (w, b) = Self::pos(seq);
        self.bits[w] & b != 0
    }
}

/// Origins remembered per generation (each window is 2 KiB: two generations hold at most
/// 16 MiB, whatever the number of publishers that ever sent to a cell).
pub const MAX_ORIGINS: usize = 4_096;

/// Every origin's window, forgotten once the origin has been silent for one to two
/// generations: a copy can only come from a resend after a move, within a few expiries,
/// and publishers' sessions come and go (each restart is a new origin). A generation
/// ends after `every`, or sooner once it holds `MAX_ORIGINS`.
pub struct Origins {
    current: HashMap<Thid, SeqWindow>,
    previous: HashMap<Thid, SeqWindow>,
    since: Instant,
    every: Duration,
}

impl Origins {
    pub fn new(every: Duration, now: Instant) -> Self {
        Origins {
            current: HashMap::new(),
            previous: HashMap::new(),
            since: now,
            every,
        }
    }

    /// The window of `origin`, kept for another generation.
    pub fn window(&mut self, origin: Thid, now: Instant) -> &mut SeqWindow {
        if !self.current.contains_key(&origin) {
            // Taken out of the older generation before a rotation can forget it.
            let window = self.previous.remove(&origin).unwrap_or_default();
            if self.current.len() >= MAX_ORIGINS {
                self.rotate(now);
            }
            self.current.insert(origin, window);
        }
        if now.duration_since(self.since) >= self.every {
            self.rotate(now);
            let window = self.previous.remove(&origin).expect("inserted above");
            self.current.insert(origin, window);
        }
        self.current.get_mut(&origin).expect("inserted above")
    }

    fn rotate(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.since = now;
    }

    /// Origins remembered.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_remembered_while_heard_and_bounded() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let mut o = Origins::new(every, t0);
        let (a, b) = (Thid::random(), Thid::random());
        assert!(o.window(a, t0).accept(1));
        assert!(o.window(b, t0).accept(1));
        // a is heard in the next generation, b is not.
        assert!(
            !o.window(a, t0 + every).accept(1),
            "a copy after one generation"
        );
        assert!(o.window(a, t0 + 2 * every).accept(2));
        assert!(o.window(a, t0 + 3 * every).accept(3));
        assert!(
            o.window(b, t0 + 3 * every).accept(1),
            "b forgotten after two"
        );
        // However many publishers: at most two generations of MAX_ORIGINS.
        for _ in 0..3 * MAX_ORIGINS {
            o.window(Thid::random(), t0 + 3 * every);
        }
        assert!(o.len() <= 2 * MAX_ORIGINS);
        assert!(o.window(Thid::random(), t0 + 3 * every).accept(1));
    }

    #[test]
    fn in_order_then_duplicates() {
        let mut w = SeqWindow::default();
        for s in 1..=100 {
            assert!(w.accept(s));
        }
        for s in 50..=100 {
            assert!(!w.accept(s), "duplicate {s} accepted");
        }
        assert!(w.accept(101));
    }

    #[test]
    fn reordered_paths_lose_nothing() {
        let mut w = SeqWindow::default();
        // The new path delivers 10..20 before the old one delivers 5..15.
        for s in 10..20 {
            assert!(w.accept(s));
        }
        for s in 5..10 {
            assert!(w.accept(s), "late {s} dropped");
        }
        for s in 10..15 {
            assert!(!w.accept(s));
        }
    }

    #[test]
    fn large_jumps_and_ancient_numbers() {
        let mut w = SeqWindow::default();
        assert!(w.accept(1));
        assert!(w.accept(1 + WINDOW * 3));
        assert!(!w.accept(1));
        assert!(w.accept(2 + WINDOW * 3));
        assert!(w.accept(WINDOW * 3)); // within the window, unseen
    }

    #[test]
    fn a_resend_from_the_far_end_of_a_sidecars_window_is_delivered_once() {
        // A sidecar holds up to WINDOW unacknowledged publishes; after a move it resends
        // them all. The receiver saw the newest on the new path, never the oldest.
        let mut w = SeqWindow::default();
        assert!(w.accept(WINDOW));
        assert!(
            w.accept(1),
            "the oldest resend is new here, not too old to judge"
        );
        assert!(!w.accept(1), "and its copy is one");
        assert_eq!(WINDOW, 16_384);
    }
}
