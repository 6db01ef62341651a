//! Duplicate suppression per origin: a sliding window over sequence numbers, as in
//! IPsec's anti-replay window. A message may reach a cell twice only while the cell moves
//! between transmitters (it is briefly registered on both, and a publisher resends what
//! its old transmitter had not acknowledged); the window drops the second copy even when
//! the two paths reorder messages.

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

#[cfg(test)]
mod tests {
    use super::*;

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
