//! Every decoder of bytes from outside, on arbitrary input: it never panics, and what the
//! matching encoder writes reads back as it was (proptest; CI runs the default 256 cases
//! of each).

use bytes::Bytes;
use proptest::prelude::*;
use thynapse_protocol::auth::Key;
use thynapse_protocol::batch::{
    decode_acks, decode_envelopes, decode_publish_records, decode_publishes, encode_acks,
    EnvelopeBatchWriter, Kind, PublishBatchWriter,
};
use thynapse_protocol::crypt::{Ephemeral, Side};
use thynapse_protocol::discovery::Datagram;
use thynapse_protocol::frame::{CommandFrame, Encoding};
use thynapse_protocol::seal::{Opener, Sealer};
use thynapse_protocol::wire::{decode_interest, encode_interest, Interest, Op};
use thynapse_protocol::Thid;

/// A time for seals (ms since the epoch).
const NOW: u64 = 1_800_000_000_000;

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Mesh), Just(Kind::Shard)]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn thid() -> impl Strategy<Value = Thid> {
    any::<[u8; 20]>().prop_map(Thid)
}

proptest! {
    #[test]
    fn command_frames_never_panic(input in bytes(64)) {
        let _ = CommandFrame::parse(&Bytes::from(input));
    }

    #[test]
    fn command_frames_round_trip(
        binary in any::<bool>(),
        cmd in "[A-Z_]{4}",
        payload in bytes(64),
    ) {
        let enc = if binary { Encoding::Binary } else { Encoding::Json };
        let cmd: [u8; 4] = cmd.as_bytes().try_into().unwrap();
        let frame = CommandFrame::new(enc, &cmd, payload.clone());
        let back = CommandFrame::parse(&frame.to_bytes()).unwrap();
        prop_assert_eq!(back.cmd, cmd);
        prop_assert_eq!(&back.payload[..], &payload[..]);
    }

    #[test]
    fn publish_batches_never_panic(input in bytes(256)) {
        if let Ok((_, records)) = decode_publishes(&input) {
            records.for_each(drop);
        }
        if let Ok(records) = decode_publish_records(&input) {
            records.for_each(drop);
        }
    }

    #[test]
    fn publish_batches_round_trip(
        first in any::<u64>(),
        messages in prop::collection::vec((kind(), any::<u64>(), bytes(32), bytes(64)), 0..20),
    ) {
        let mut w = PublishBatchWriter::new(first);
        for (k, ts, channel, payload) in &messages {
            w.push(*k, *ts, channel, payload);
        }
        let frame = w.finish();
        let (got_first, records) = decode_publishes(&frame).unwrap();
        prop_assert_eq!(got_first, first);
        let got: Vec<_> = records
            .map(|p| (p.kind, p.ts, p.channel.to_vec(), p.payload.to_vec()))
            .collect();
        prop_assert_eq!(got, messages);
    }

    #[test]
    fn envelope_batches_never_panic(input in bytes(512)) {
        if let Ok((_, envelopes)) = decode_envelopes(&input) {
            for e in envelopes {
                e.targets().for_each(drop);
            }
        }
    }

    #[test]
    fn envelope_batches_round_trip(
        batch in any::<u64>(),
        messages in prop::collection::vec(
            (kind(), thid(), any::<u64>(), any::<u64>(), bytes(32), bytes(64), prop::collection::vec(thid(), 0..4)),
            0..12,
        ),
    ) {
        let mut w = EnvelopeBatchWriter::default();
        for (k, origin, seq, ts, channel, payload, targets) in &messages {
            w.push(*k, origin, *seq, *ts, channel, payload, targets);
        }
        let frame = w.finish(batch);
        let (got_batch, envelopes) = decode_envelopes(&frame).unwrap();
        prop_assert_eq!(got_batch, batch);
        let got: Vec<_> = envelopes
            .map(|e| (e.kind, e.origin, e.seq, e.ts, e.channel.to_vec(), e.payload.to_vec(), e.targets().collect::<Vec<_>>()))
            .collect();
        prop_assert_eq!(got, messages);
    }

    #[test]
    fn interest_lists_never_panic(input in bytes(128)) {
        let _ = decode_interest(Bytes::from(input));
    }

    #[test]
    fn interest_lists_round_trip(
        entries in prop::collection::vec(
            (any::<bool>(), 0u8..3, bytes(40)),
            0..20,
        ),
    ) {
        let entries: Vec<(Op, Interest, Vec<u8>)> = entries
            .into_iter()
            .map(|(add, k, name)| {
                let op = if add { Op::Add } else { Op::Remove };
                let k = [Interest::Channel, Interest::Pattern, Interest::ShardChannel][k as usize];
                (op, k, name)
            })
            .collect();
        let frame = encode_interest(entries.iter().map(|(o, k, n)| (*o, *k, &n[..])));
        let back = decode_interest(frame).unwrap();
        let back: Vec<_> = back.into_iter().map(|(o, k, n)| (o, k, n.to_vec())).collect();
        prop_assert_eq!(back, entries);
    }

    #[test]
    fn ack_frames_never_panic(input in bytes(64)) {
        let _ = decode_acks(&input);
    }

    #[test]
    fn ack_frames_round_trip(first in any::<u64>(), counts in prop::collection::vec(any::<u32>(), 0..50)) {
        let frame = encode_acks(first, &counts);
        prop_assert_eq!(decode_acks(&frame).unwrap(), (first, counts));
    }

    #[test]
    fn datagrams_never_panic(input in bytes(256)) {
        let _ = Datagram::parse(&input);
    }

    #[test]
    fn seals_open_once_and_not_after_any_change(body in bytes(256), flip in any::<prop::sample::Index>()) {
        let body: Vec<u8> = body.into_iter().filter(|b| *b != b'\n').collect();
        let mut rv = Opener::new("m", vec![b"t".to_vec()], 0);
        prop_assert!(rv.take(&body, NOW).is_err(), "unsealed");
        let sealer = Sealer::peer(&[b"t".to_vec()], "m").unwrap();
        let (sealed, _) = sealer.request(&body, NOW);
        let mut changed = sealed.clone();
        let at = flip.index(changed.len());
        changed[at] ^= 0x01;
        prop_assert!(rv.take(&changed, NOW).is_err(), "a changed byte at {}", at);
        prop_assert_eq!(rv.take(&sealed, NOW).unwrap().body, &body[..]);
        prop_assert!(rv.take(&sealed, NOW).is_err(), "taken once");
    }

    #[test]
    fn sealed_messages_carry_any_frames_and_nothing_else(
        frames in prop::collection::vec(bytes(300), 0..5),
        garbage in bytes(200),
        flip in any::<prop::sample::Index>(),
    ) {
        let key = Key::mesh(b"t");
        let (c, s) = (Ephemeral::new(), Ephemeral::new());
        let (cp, sp) = (c.public().to_string(), s.public().to_string());
        let mut client = c.agree(&sp, Side::Client, &key, &[b"x"]).unwrap();
        let mut server = s.agree(&cp, Side::Server, &key, &[b"x"]).unwrap();
        prop_assert!(server.open.open(&garbage).is_err(), "anything not sealed");
        let sealed = client.seal.seal(frames.iter().map(|f| &f[..])).unwrap();
        let mut changed = sealed.to_vec();
        let at = flip.index(changed.len());
        changed[at] ^= 0x01;
        prop_assert!(server.open.open(&changed).is_err(), "a changed byte at {}", at);
        let opened = server.open.open(&sealed).unwrap();
        prop_assert_eq!(opened.iter().map(|f| f.to_vec()).collect::<Vec<_>>(), frames);
        prop_assert!(server.open.open(&sealed).is_err(), "opened once");
    }

    #[test]
    fn datagrams_round_trip(mesh in ".{0,20}", room in ".{0,40}") {
        for d in [
            Datagram::Query { mesh: mesh.clone() },
            Datagram::Locate { mesh: mesh.clone(), room: room.clone() },
            Datagram::Error { error: room.clone() },
        ] {
            prop_assert_eq!(Datagram::parse(&d.to_bytes()).unwrap(), d);
        }
    }
}
