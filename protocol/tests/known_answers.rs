//! Known answers: each encoder's output for a fixed input, written out byte by byte from
//! docs/protocol.md (and the THIDs computed with Python's hashlib), so that a change of
//! format or hash fails here rather than passing as a consistent round trip.

use bytes::Bytes;
use thynapse_protocol::batch::{
    decode_acks, decode_envelopes, decode_publishes, encode_acks, EnvelopeBatchWriter, Kind,
    PublishBatchWriter,
};
use thynapse_protocol::discovery::Datagram;
use thynapse_protocol::frame::{CommandFrame, Encoding};
use thynapse_protocol::wire::{self, encode_interest, Interest, Op};
use thynapse_protocol::Thid;

fn le64(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}
fn le32(n: u32) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

#[test]
fn thids_are_sha1() {
    // FIPS 180 test vector.
    assert_eq!(
        Thid::of(b"abc").to_hex(),
        "a9993e364706816aba3e25717850c26c9cd0d89d"
    );
    // An event's THID (ACKD): each part preceded by its length, a little-endian u64.
    assert_eq!(
        Thid::of_parts(&[b"c", b"text"]).to_hex(),
        "3d502b98f4271bf0bff388e3764735975047277d"
    );
    assert_eq!(
        Thid::of_parts(&[b"ab", b"c"]).to_hex(),
        "c35848f85e6e96b7b7853f66c7b925166315bc18"
    );
    assert_eq!(
        Thid::of_parts(&[b"a", b"bc"]).to_hex(),
        "afbd418c7c14fa1e8c68b826bb689a4deddc2ac4"
    );
}

#[test]
fn command_frames() {
    let f = CommandFrame::json(b"CRED", &wire::Credit { batch: 7 });
    assert_eq!(&f.to_bytes()[..], b"J CRED {\"batch\":7}");
    let f = CommandFrame::new(Encoding::Binary, b"PUBS", Bytes::new());
    assert_eq!(&f.to_bytes()[..], b"B PUBS");
    let parsed = CommandFrame::parse(&Bytes::from_static(b"J HELO {\"id\":\"00\"}")).unwrap();
    assert_eq!((parsed.enc, &parsed.cmd), (Encoding::Json, b"HELO"));
    assert_eq!(&parsed.payload[..], b"{\"id\":\"00\"}");
}

#[test]
fn a_publish_batch() {
    let mut w = PublishBatchWriter::new(41);
    w.push(Kind::Mesh, 5, b"a", b"one");
    w.push(Kind::Shard, 6, b"{r}b", b"");
    let want = [
        le64(41),
        vec![0],
        le64(5),
        le32(1),
        b"a".to_vec(),
        le32(3),
        b"one".to_vec(),
        vec![1],
        le64(6),
        le32(4),
        b"{r}b".to_vec(),
        le32(0),
    ]
    .concat();
    assert_eq!(&w.finish()[..], &want[..]);
    let (first, records) = decode_publishes(&want).unwrap();
    assert_eq!((first, records.count()), (41, 2));
}

#[test]
fn an_envelope_batch() {
    let origin = Thid([1; 20]);
    let target = Thid([2; 20]);
    let mut w = EnvelopeBatchWriter::default();
    w.push(Kind::Mesh, &origin, 7, 99, b"ch", b"data", &[target]);
    let want = [
        le64(3),
        vec![0],
        vec![1; 20],
        le64(7),
        le64(99),
        le32(2),
        b"ch".to_vec(),
        le32(4),
        b"data".to_vec(),
        1u16.to_le_bytes().to_vec(),
        vec![2; 20],
    ]
    .concat();
    assert_eq!(&w.finish(3)[..], &want[..]);
    let (batch, mut envelopes) = decode_envelopes(&want).unwrap();
    let e = envelopes.next().unwrap();
    assert_eq!((batch, e.origin, e.seq, e.ts), (3, origin, 7, 99));
    assert_eq!(e.targets().collect::<Vec<_>>(), [target]);
}

#[test]
fn an_ack_frame() {
    let want = [le64(9), le32(3), le32(1), le32(0), le32(3)].concat();
    assert_eq!(&encode_acks(9, &[1, 0, 3])[..], &want[..]);
    assert_eq!(decode_acks(&want).unwrap(), (9, vec![1, 0, 3]));
}

#[test]
fn an_interest_list() {
    let got = encode_interest([
        (Op::Add, Interest::Channel, &b"a"[..]),
        (Op::Remove, Interest::Pattern, &b"b.*"[..]),
        (Op::Add, Interest::ShardChannel, &b"{r}c"[..]),
    ]);
    let want = [
        vec![0, 0],
        le32(1),
        b"a".to_vec(),
        vec![1, 1],
        le32(3),
        b"b.*".to_vec(),
        vec![0, 2],
        le32(4),
        b"{r}c".to_vec(),
    ]
    .concat();
    assert_eq!(&got[..], &want[..]);
}

#[test]
fn datagrams() {
    let q = Datagram::Query {
        mesh: "demo".into(),
    };
    assert_eq!(q.to_bytes(), br#"{"type":"query","mesh":"demo"}"#);
    let l = Datagram::Locate {
        mesh: "demo".into(),
        room: "lobby".into(),
    };
    assert_eq!(
        l.to_bytes(),
        br#"{"type":"locate","mesh":"demo","room":"lobby"}"#
    );
    let text = br#"{"type":"announce","mesh":"demo","interval_ms":500,"multiplier":3,"transmitter":{"name":"demo-0","id":"0101010101010101010101010101010101010101","command":"tcp://h:1","event":"tcp://h:2"},"rooms":["lobby"],"active":[0]}"#;
    match Datagram::parse(text).unwrap() {
        Datagram::Announce {
            transmitter,
            rooms,
            active,
            interval_ms,
            multiplier,
            ..
        } => {
            assert_eq!(transmitter.id, Thid([1; 20]));
            assert_eq!((interval_ms, multiplier), (500, 3));
            assert_eq!((rooms, active), (vec!["lobby".to_string()], vec![0]));
        }
        other => panic!("not an announce: {other:?}"),
    }
}
