//! Per-link flow control. Every batch sent on a link (to a cell, or to a peer) stays "in
//! flight" until the receiver credits it (CRED / FACK). A link holding more than
//! `high_water` bytes in flight is congested: acknowledgements of work routed to it wait,
//! which slows the publishers feeding it. Past `limit` bytes, messages for that link are
//! dropped and counted. This is what bounds memory: the zeromq crate's own per-peer queue
//! holds 100,000 frames whatever their size.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thynapse_protocol::batch::{decode_envelopes, EnvelopeBatchWriter};
use thynapse_protocol::limits::BATCH_BYTES;

pub struct Outbox {
    writer: EnvelopeBatchWriter,
    /// Batches closed because they were full, not sent yet (oldest first), and their
    /// bytes and messages.
    ready: VecDeque<(u64, Bytes, usize)>,
    ready_bytes: usize,
    ready_messages: usize,
    /// Batches sent and not credited: their number, frame and messages. The frames are
    /// kept (they are the bytes already written, shared, and bounded with the rest) so
    /// that what a receiver that is gone never took can be routed again.
    inflight: VecDeque<(u64, Bytes, usize, Instant)>,
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
            ready: VecDeque::new(),
            ready_bytes: 0,
            ready_messages: 0,
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
        // The open batch is a frame too; a message starts a new one when it has none yet
        // or is full (`open` closes a full one first).
        let open = !self.writer.is_empty();
        let frames = self.inflight.len() + self.ready.len() + usize::from(open);
        let new_frame = !open || self.writer.byte_len() >= BATCH_BYTES;
        frames + usize::from(new_frame) <= MAX_FRAMES_IN_FLIGHT
            && self.pending_bytes() + size <= limit
    }

    /// The receiver has not credited its oldest batch for `expiry`: it is stuck (or
    /// gone), and messages for it are dropped rather than held for room it will not make.
    pub fn stuck(&self, now: Instant, expiry: Duration) -> bool {
        self.inflight
            .front()
            .is_some_and(|(.., sent)| now.duration_since(*sent) > expiry)
    }

    pub fn congested(&self, high_water: usize) -> bool {
        self.pending_bytes() > high_water || self.inflight.len() > MAX_FRAMES_IN_FLIGHT / 2
    }

    /// Bytes sent and not credited, or waiting to be sent.
    fn pending_bytes(&self) -> usize {
        self.inflight_bytes + self.ready_bytes + self.writer.byte_len()
    }

    /// Bytes waiting to be sent at the next flush.
    pub fn unsent_bytes(&self) -> usize {
        self.ready_bytes + self.writer.byte_len()
    }

    /// The batch to write the next message into: a new one once the current holds
    /// `BATCH_BYTES`, so that no frame is over the peers' message size limit.
    pub fn open(&mut self) -> &mut EnvelopeBatchWriter {
        if self.writer.byte_len() >= BATCH_BYTES {
            let (batch, frame, messages) = self.close();
            self.ready_bytes += frame.len();
            self.ready_messages += messages;
            self.ready.push_back((batch, frame, messages));
        }
        &mut self.writer
    }

    fn close(&mut self) -> (u64, Bytes, usize) {
        let batch = self.next_batch;
        self.next_batch += 1;
        let messages = self.writer.len();
        (batch, self.writer.finish(batch), messages)
    }

    /// The next batch to send, oldest first (the one being written last), if any: its
    /// number, bytes and messages. From now on it is in flight until credited.
    pub fn take_batch(&mut self) -> Option<(u64, Bytes, usize)> {
        let (batch, frame, messages) = match self.ready.pop_front() {
            Some(ready) => {
                self.ready_bytes -= ready.1.len();
                self.ready_messages -= ready.2;
                ready
            }
            None if self.writer.is_empty() => return None,
            None => self.close(),
        };
        self.inflight_bytes += frame.len();
        self.inflight
            .push_back((batch, frame.clone(), messages, Instant::now()));
        self.inflight_messages += messages;
        Some((batch, frame, messages))
    }

    /// The receiver took everything up to and including `batch`.
    pub fn credit(&mut self, batch: u64) {
        while let Some((b, ..)) = self.inflight.front() {
            if *b > batch {
                break;
            }
            let (_, frame, messages, _) = self.inflight.pop_front().expect("front exists");
            self.inflight_bytes -= frame.len();
            self.inflight_messages -= messages;
        }
    }

    pub fn idle(&self) -> bool {
        self.inflight.is_empty() && self.ready.is_empty() && self.writer.is_empty()
    }

    /// Takes every batch sent or pending and never credited, oldest first, leaving the
    /// outbox empty (its receiver is gone; what they hold is routed again or counted).
    pub fn take_unconfirmed(&mut self) -> Vec<Bytes> {
        let mut frames: Vec<Bytes> = self.inflight.drain(..).map(|(_, f, ..)| f).collect();
        frames.extend(self.ready.drain(..).map(|(_, f, _)| f));
        if !self.writer.is_empty() {
            frames.push(self.close().1);
        }
        let next_batch = self.next_batch;
        *self = Outbox {
            next_batch,
            ..Outbox::default()
        };
        frames
    }

    /// Puts everything never credited back to be sent again, in order, on a new link to
    /// the same receiver (which drops what it already had: receivers drop copies).
    /// Returns the messages to be sent again.
    pub fn resend_unconfirmed(&mut self) -> usize {
        let frames = self.take_unconfirmed();
        for frame in &frames {
            let Ok((_, envelopes)) = decode_envelopes(frame) else {
                continue; // Written by us; cannot happen.
            };
            for e in envelopes {
                let targets: Vec<_> = e.targets().collect();
                self.open().push(
                    e.kind, &e.origin, e.seq, e.ts, e.channel, e.payload, &targets,
                );
            }
        }
        self.unconfirmed_messages()
    }

    /// Messages sent or pending but never credited (lost when the link is).
    pub fn unconfirmed_messages(&self) -> usize {
        self.inflight_messages + self.ready_messages + self.writer.len()
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
        o.open().push(Kind::Mesh, &id, 1, 0, b"c", &[0; 100], &[]);
        let (b1, _, n) = o.take_batch().unwrap();
        assert_eq!((b1, n), (1, 1));
        assert!(o.congested(50));
        assert!(!o.has_room(1000, 1000));
        o.open().push(Kind::Mesh, &id, 2, 0, b"c", &[0; 100], &[]);
        let (b2, _, _) = o.take_batch().unwrap();
        o.credit(b1);
        assert_eq!(o.unconfirmed_messages(), 1);
        o.credit(b2);
        assert!(o.idle());
        assert!(o.has_room(900, 1000));
        assert!(o.take_batch().is_none());
    }

    #[test]
    fn a_full_batch_is_closed_and_batches_go_out_in_order() {
        let mut o = Outbox::default();
        let id = Thid::random();
        let payload = vec![7u8; 64 * 1024];
        for seq in 1..=6 {
            o.open().push(Kind::Mesh, &id, seq, 0, b"c", &payload, &[]);
        }
        assert_eq!(o.unconfirmed_messages(), 6);
        let mut sent = Vec::new();
        while let Some((batch, frame, messages)) = o.take_batch() {
            assert!(frame.len() <= BATCH_BYTES + payload.len() + 128);
            sent.push((batch, messages));
        }
        assert_eq!(sent, [(1, 4), (2, 2)], "closed at BATCH_BYTES, in order");
        // A new link to the same receiver gets it all again, in order.
        assert_eq!(o.resend_unconfirmed(), 6);
        let again: Vec<usize> = std::iter::from_fn(|| o.take_batch().map(|b| b.2)).collect();
        assert_eq!(again, [4, 2]);
    }

    #[test]
    fn what_was_never_credited_can_be_taken_back_in_order() {
        let mut o = Outbox::default();
        let id = Thid::random();
        for seq in 1..=3 {
            o.open().push(Kind::Mesh, &id, seq, 0, b"c", b"x", &[]);
            o.take_batch();
        }
        o.open().push(Kind::Mesh, &id, 4, 0, b"c", b"x", &[]);
        o.credit(1);
        let seqs: Vec<u64> = o
            .take_unconfirmed()
            .iter()
            .flat_map(|f| {
                let (_, envelopes) = decode_envelopes(f).unwrap();
                envelopes.map(|e| e.seq).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            seqs,
            [2, 3, 4],
            "the credited batch is not taken, the open one is"
        );
        assert!(o.idle());
        assert_eq!(o.unconfirmed_messages(), 0);
    }

    #[test]
    fn a_link_holds_at_most_ten_thousand_uncredited_frames() {
        let mut o = Outbox::default();
        let id = Thid::random();
        // Bytes are never the bound here: frames of one small message each.
        let limit = 1 << 40;
        let mut frames = 0;
        while o.has_room(100, limit) {
            frames += 1;
            o.open().push(Kind::Mesh, &id, frames, 0, b"c", b"x", &[]);
            // Flushed at once: one frame per message.
            assert!(o.take_batch().is_some());
            assert!(frames <= 20_000, "never full");
        }
        assert_eq!(frames, 10_000, "the 10,001st frame is refused");
        assert_eq!(o.unconfirmed_messages(), 10_000);
        o.credit(1);
        assert!(o.has_room(100, limit), "a credit makes room for one more");
    }

    #[test]
    fn a_full_open_batch_does_not_take_a_link_past_ten_thousand_frames() {
        let mut o = Outbox::default();
        let id = Thid::random();
        let limit = 1 << 40;
        for seq in 1..MAX_FRAMES_IN_FLIGHT as u64 {
            o.open().push(Kind::Mesh, &id, seq, 0, b"c", b"x", &[]);
            o.take_batch();
        }
        // 9,999 frames uncredited; messages gather in the open batch, as within one turn
        // of the transmitter's loop, each checked for room first as the server does.
        let payload = vec![7u8; 64 * 1024];
        let mut seq = MAX_FRAMES_IN_FLIGHT as u64;
        while o.has_room(payload.len() + 64, limit) {
            o.open().push(Kind::Mesh, &id, seq, 0, b"c", &payload, &[]);
            seq += 1;
        }
        let mut frames = MAX_FRAMES_IN_FLIGHT - 1;
        while o.take_batch().is_some() {
            frames += 1;
        }
        assert!(frames <= MAX_FRAMES_IN_FLIGHT, "{frames} frames uncredited");
    }
}
