//! Binary batches: many messages in one ZeroMQ frame. Coalescing under load is what lets
//! the mesh move millions of messages a second over the zeromq crate (one message per
//! frame tops out near 1M/s), while an idle sender flushes a batch of one at once.
//!
//! Layout (all integers little-endian, byte strings prefixed by a u32 length):
//! - `PUBS` (cell → transmitter): `u64 first_seq`, then per message
//!   `kind u8, ts u64, channel, payload`; message i has sequence `first_seq + i`. It may be
//!   split over several frames at message boundaries (`decode_publishes` reads the first,
//!   `decode_publish_records` the others).
//! - `ACKS` (transmitter → cell): `u64 first_seq, u32 n`, then n × `u32 receivers`.
//! - `DLVR` (transmitter → cell) and `FWRD` (transmitter → transmitter): `u64 batch`, then per
//!   message `kind u8, origin [20], seq u64, ts u64, channel, payload, u16 n_targets, n × [20]`.
//!   `targets` name the cells chosen for anycatch; it is empty in `DLVR`.
//!
//! `ts` is when the publishing sidecar took the message (microseconds since the Unix
//! epoch), for the delivery-latency histogram.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::FrameError;
use crate::thid::Thid;

/// What kind of channel a message was published on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// PUBLISH / SUBSCRIBE: mesh-wide.
    Mesh,
    /// SPUBLISH / SSUBSCRIBE: scoped to the channel's room.
    Shard,
}

impl Kind {
    fn to_u8(self) -> u8 {
        match self {
            Kind::Mesh => 0,
            Kind::Shard => 1,
        }
    }

    fn from_u8(b: u8) -> Result<Kind, FrameError> {
        match b {
            0 => Ok(Kind::Mesh),
            1 => Ok(Kind::Shard),
            _ => Err(FrameError::BadBatch("unknown message kind")),
        }
    }
}

/// A message as a cell publishes it, borrowed from the frame it was decoded from: the
/// hot paths read messages and copy them into the next batch, so decoding does not take a
/// reference-counted slice per field (those counts were a tenth of the mesh's CPU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    pub kind: Kind,
    pub ts: u64,
    pub channel: &'a [u8],
    pub payload: &'a [u8],
}

/// A message as it travels through the mesh: who published it, with which per-origin
/// sequence number (the pair identifies it, for duplicate suppression), and for anycatch
/// the cells chosen to receive it. Borrowed from its frame, like `Publish`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub kind: Kind,
    pub origin: Thid,
    pub seq: u64,
    pub ts: u64,
    pub channel: &'a [u8],
    pub payload: &'a [u8],
    /// The anycatch targets: `n × 20` bytes of ids, read with `targets()`.
    targets: &'a [u8],
}

impl Envelope<'_> {
    pub fn targets(&self) -> impl ExactSizeIterator<Item = Thid> + '_ {
        self.targets
            .chunks_exact(Thid::LEN)
            .map(|t| Thid(t.try_into().expect("chunks of a THID's length")))
    }
}

#[derive(Clone)]
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::BadBatch("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("length taken"))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn thid(&mut self) -> Result<Thid, FrameError> {
        Ok(Thid(self.array()?))
    }
    fn done(&self) -> bool {
        self.buf.is_empty()
    }
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u32_le(b.len() as u32);
    buf.put_slice(b);
}

/// Appends one `PUBS` message record (everything after the batch's `first_seq`).
pub fn put_publish(buf: &mut BytesMut, kind: Kind, ts: u64, channel: &[u8], payload: &[u8]) {
    buf.reserve(17 + channel.len() + payload.len());
    buf.put_u8(kind.to_u8());
    buf.put_u64_le(ts);
    put_bytes(buf, channel);
    put_bytes(buf, payload);
}

/// Builds a `PUBS` batch in one frame (the sidecar sends its clients' records as further
/// frames instead; see `put_publish`).
#[derive(Default)]
pub struct PublishBatchWriter {
    buf: BytesMut,
    count: usize,
}

impl PublishBatchWriter {
    pub fn new(first_seq: u64) -> Self {
        let mut buf = BytesMut::with_capacity(4096);
        buf.put_u64_le(first_seq);
        Self { buf, count: 0 }
    }
    pub fn push(&mut self, kind: Kind, ts: u64, channel: &[u8], payload: &[u8]) {
        put_publish(&mut self.buf, kind, ts, channel, payload);
        self.count += 1;
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Decodes a `PUBS` batch into its first sequence number and messages. The whole frame is
/// checked first, so a malformed batch is refused before any of it is used.
pub fn decode_publishes(frame: &[u8]) -> Result<(u64, PublishRecords<'_>), FrameError> {
    let mut r = Reader { buf: frame };
    let first = r.u64()?;
    Ok((first, decode_publish_records(r.buf)?))
}

/// Decodes records written by `put_publish` (a `PUBS` batch without its `first_seq`),
/// checking them all first.
pub fn decode_publish_records(records: &[u8]) -> Result<PublishRecords<'_>, FrameError> {
    let mut r = Reader { buf: records };
    let mut count = 0;
    while !r.done() {
        read_publish(&mut r)?;
        count += 1;
    }
    Ok(PublishRecords {
        r: Reader { buf: records },
        count,
    })
}

fn read_publish<'a>(r: &mut Reader<'a>) -> Result<Publish<'a>, FrameError> {
    Ok(Publish {
        kind: Kind::from_u8(r.u8()?)?,
        ts: r.u64()?,
        channel: r.bytes()?,
        payload: r.bytes()?,
    })
}

/// The messages of a checked `PUBS` batch, in order, without allocating.
#[derive(Clone)]
pub struct PublishRecords<'a> {
    r: Reader<'a>,
    count: usize,
}

impl<'a> Iterator for PublishRecords<'a> {
    type Item = Publish<'a>;
    fn next(&mut self) -> Option<Publish<'a>> {
        if self.r.done() {
            return None;
        }
        self.count -= 1;
        Some(read_publish(&mut self.r).expect("checked by decode_publishes"))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.count, Some(self.count))
    }
}

impl ExactSizeIterator for PublishRecords<'_> {}

pub fn encode_acks(first_seq: u64, receivers: &[u32]) -> Bytes {
    let mut buf = BytesMut::with_capacity(12 + 4 * receivers.len());
    buf.put_u64_le(first_seq);
    buf.put_u32_le(receivers.len() as u32);
    for r in receivers {
        buf.put_u32_le(*r);
    }
    buf.freeze()
}

pub fn decode_acks(frame: &[u8]) -> Result<(u64, Vec<u32>), FrameError> {
    let mut r = Reader { buf: frame };
    let first = r.u64()?;
    let n = r.u32()? as usize;
    let counts = r
        .take(n.saturating_mul(4))?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4")))
        .collect();
    if !r.done() {
        return Err(FrameError::BadBatch("trailing bytes"));
    }
    Ok((first, counts))
}

/// Builds a `DLVR` or `FWRD` batch. The batch number is written at `finish`, so a writer
/// can be filled before its sequence is known.
pub struct EnvelopeBatchWriter {
    buf: BytesMut,
    count: usize,
    /// The size of the last batch: the next is likely about as large, so its first
    /// message reserves that much at once rather than growing (and copying) the batch by
    /// doubling. Reserved only while a batch is filled, as every link has a writer.
    expect: usize,
}

/// The most a writer reserves ahead.
const MAX_RESERVE: usize = 4 << 20;

impl Default for EnvelopeBatchWriter {
    fn default() -> Self {
        let mut buf = BytesMut::new();
        buf.put_u64_le(0);
        Self {
            buf,
            count: 0,
            expect: 4096,
        }
    }
}

impl EnvelopeBatchWriter {
    // The fields of an Envelope, borrowed: the hot path must not build one per message.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        kind: Kind,
        origin: &Thid,
        seq: u64,
        ts: u64,
        channel: &[u8],
        payload: &[u8],
        targets: &[Thid],
    ) {
        let size = 53 + channel.len() + payload.len() + 20 * targets.len();
        if self.count == 0 {
            self.buf.reserve(size.max(self.expect));
        } else {
            self.buf.reserve(size);
        }
        self.buf.put_u8(kind.to_u8());
        self.buf.put_slice(&origin.0);
        self.buf.put_u64_le(seq);
        self.buf.put_u64_le(ts);
        put_bytes(&mut self.buf, channel);
        put_bytes(&mut self.buf, payload);
        self.buf.put_u16_le(targets.len() as u16);
        for t in targets {
            self.buf.put_slice(&t.0);
        }
        self.count += 1;
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }
    /// Finishes the batch, leaving the writer empty and ready for reuse.
    pub fn finish(&mut self, batch: u64) -> Bytes {
        self.buf[..8].copy_from_slice(&batch.to_le_bytes());
        let out = self.buf.split().freeze();
        self.expect = out.len().min(MAX_RESERVE);
        self.buf = BytesMut::new();
        self.buf.put_u64_le(0);
        self.count = 0;
        out
    }
}

/// Decodes a `DLVR` or `FWRD` batch into its batch number and messages, checking the whole
/// frame first like `decode_publishes`.
pub fn decode_envelopes(frame: &[u8]) -> Result<(u64, Envelopes<'_>), FrameError> {
    let mut r = Reader { buf: frame };
    let batch = r.u64()?;
    let messages = Reader { buf: r.buf };
    while !r.done() {
        read_envelope(&mut r)?;
    }
    Ok((batch, Envelopes { r: messages }))
}

fn read_envelope<'a>(r: &mut Reader<'a>) -> Result<Envelope<'a>, FrameError> {
    Ok(Envelope {
        kind: Kind::from_u8(r.u8()?)?,
        origin: r.thid()?,
        seq: r.u64()?,
        ts: r.u64()?,
        channel: r.bytes()?,
        payload: r.bytes()?,
        targets: {
            let n = r.u16()? as usize;
            r.take(n * Thid::LEN)?
        },
    })
}

/// The messages of a checked `DLVR` or `FWRD` batch, in order, without allocating.
pub struct Envelopes<'a> {
    r: Reader<'a>,
}

impl<'a> Iterator for Envelopes<'a> {
    type Item = Envelope<'a>;
    fn next(&mut self) -> Option<Envelope<'a>> {
        if self.r.done() {
            return None;
        }
        Some(read_envelope(&mut self.r).expect("checked by decode_envelopes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_round_trip() {
        let mut w = PublishBatchWriter::new(41);
        w.push(Kind::Mesh, 5, b"a", b"one");
        w.push(Kind::Shard, 6, b"{r}b", b"");
        assert_eq!(w.len(), 2);
        let frame = w.finish();
        let (first, msgs) = decode_publishes(&frame).unwrap();
        let msgs: Vec<_> = msgs.collect();
        assert_eq!(first, 41);
        assert_eq!(msgs[0].channel, b"a");
        assert_eq!(msgs[0].payload, b"one");
        assert_eq!((msgs[1].kind, msgs[1].ts), (Kind::Shard, 6));
        assert!(msgs[1].payload.is_empty());
    }

    #[test]
    fn envelopes_round_trip_and_writer_reuse() {
        let origin = Thid::random();
        let target = Thid::random();
        let mut w = EnvelopeBatchWriter::default();
        w.push(Kind::Mesh, &origin, 7, 99, b"ch", b"data", &[target]);
        let frame = w.finish(3);
        let (batch, env) = decode_envelopes(&frame).unwrap();
        let env: Vec<_> = env.collect();
        assert_eq!(batch, 3);
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].origin, origin);
        assert_eq!((env[0].seq, env[0].ts), (7, 99));
        assert_eq!(env[0].targets().collect::<Vec<_>>(), vec![target]);
        assert!(w.is_empty());
        w.push(Kind::Mesh, &origin, 8, 0, b"ch", b"x", &[]);
        let frame = w.finish(4);
        let (batch, env) = decode_envelopes(&frame).unwrap();
        let env: Vec<_> = env.collect();
        assert_eq!((batch, env.len(), env[0].seq), (4, 1, 8));
    }

    #[test]
    fn acks_round_trip() {
        let (first, counts) = decode_acks(&encode_acks(9, &[1, 0, 3])).unwrap();
        assert_eq!((first, counts), (9, vec![1, 0, 3]));
    }

    #[test]
    fn truncated_and_garbage_batches_are_errors() {
        let mut w = PublishBatchWriter::new(1);
        w.push(Kind::Mesh, 1, b"channel", b"payload");
        let full = w.finish();
        for cut in 1..full.len() {
            let r = decode_publishes(&full[..cut]);
            if cut != 8 {
                assert!(r.is_err(), "cut at {cut} decoded");
            }
        }
        assert!(decode_envelopes(&[0xff; 40]).is_err());
        assert!(decode_acks(&[0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]).is_err());
    }
}
