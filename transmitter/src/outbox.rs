//! Per-link flow control. Every batch sent on a link (to a cell, or to a peer) stays "in
//! flight" until the receiver credits it (CRED / FACK). A link holding more than
//! `high_water` bytes in flight is congested: acknowledgements of work routed to it wait,
//! which slows the publishers feeding it. Past `limit` bytes, messages for that link are
//! dropped and counted. This is what bounds memory: the zeromq crate's own per-peer queue
//! holds 100,000 frames whatever their size.

use std::collections::VecDeque;

use thynapse_protocol::batch::EnvelopeBatchWriter;

pub struct Outbox {
    pub writer: EnvelopeBatchWriter,
    inflight: VecDeque<(u64, usize, usize)>,
    inflight_bytes: usize,
    inflight_messages: usize,
    next_batch: u64,
}

/// Frames in flight beyond which a link is treated as full whatever their size.
const MAX_FRAMES_IN_FLIGHT: usize = 10_000;

impl Default for Outbox {
    fn default() -> Self {
        Self {
            writer: EnvelopeBatchWriter::default(),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            inflight_messages: 0,
            next_batch: 1,
        }
    }
}

impl Outbox {
    /// Whether one more message of `size` bytes fits under `limit`.
    pub fn has_room(&self, size: usize, limit: usize) -> bool {
        self.inflight.len() < MAX_FRAMES_IN_FLIGHT
            && self.inflight_bytes + self.writer.byte_len() + size <= limit
    }

    pub fn congested(&self, high_water: usize) -> bool {
        self.inflight_bytes + self.writer.byte_len() > high_water
            || self.inflight.len() > MAX_FRAMES_IN_FLIGHT / 2
    }

    /// Closes the pending batch, if any: its bytes and batch number.
    pub fn take_batch(&mut self) -> Option<(u64, bytes::Bytes, usize)> {
        if self.writer.is_empty() {
            return None;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        let messages = self.writer.len();
        let frame = self.writer.finish(batch);
        self.inflight.push_back((batch, frame.len(), messages));
        self.inflight_bytes += frame.len();
        self.inflight_messages += messages;
        Some((batch, frame, messages))
    }

    /// The receiver took everything up to and including `batch`.
    pub fn credit(&mut self, batch: u64) {
        while let Some(&(b, bytes, messages)) = self.inflight.front() {
            if b > batch {
                break;
            }
            self.inflight.pop_front();
            self.inflight_bytes -= bytes;
            self.inflight_messages -= messages;
        }
    }

    pub fn idle(&self) -> bool {
        self.inflight.is_empty() && self.writer.is_empty()
    }

    /// Forgets what was sent on a link that is gone (it will never be credited); what is
    /// still pending stays for the next link. Returns the messages lost.
    pub fn reset_inflight(&mut self) -> usize {
        let lost = self.inflight_messages;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.inflight_messages = 0;
        lost
    }

    /// Messages sent or pending but never credited (lost when the link is).
    pub fn unconfirmed_messages(&self) -> usize {
        self.inflight_messages + self.writer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::batch::Kind;
    use thynapse_protocol::Thid;

    #[test]
    fn credits_free_room() {
        let mut o = Outbox::default();
        let id = Thid::random();
        o.writer.push(Kind::Mesh, &id, 1, 0, b"c", &[0; 100], &[]);
        let (b1, _, n) = o.take_batch().unwrap();
        assert_eq!((b1, n), (1, 1));
        assert!(o.congested(50));
        assert!(!o.has_room(1000, 1000));
        o.writer.push(Kind::Mesh, &id, 2, 0, b"c", &[0; 100], &[]);
        let (b2, _, _) = o.take_batch().unwrap();
        o.credit(b1);
        assert_eq!(o.unconfirmed_messages(), 1);
        o.credit(b2);
        assert!(o.idle());
        assert!(o.has_room(900, 1000));
        assert!(o.take_batch().is_none());
    }
}
