// Thynapse patch: SocketOptions::max_message_size.
use super::*;

fn limited(max: usize) -> ZmqCodec {
    let mut options = SocketOptions::default();
    options.max_message_size(max);
    let mut codec = ZmqCodec::with_options(&options);
    codec.state = DecoderState::FrameHeader;
    codec.waiting_for = 1;
    codec
}

#[test]
fn a_declared_frame_over_the_limit_is_refused_before_anything_is_reserved() {
    let mut codec = limited(1024);
    let mut input = BytesMut::from(&[2][..]);
    input.extend_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(codec.decode(&mut input).is_err());
    assert!(input.capacity() < 1024);
}

#[test]
fn empty_frames_count_too() {
    // Each frame costs FRAME_COST: an endless run of empty frames is refused.
    let mut codec = limited(10 * FRAME_COST);
    let mut input = BytesMut::new();
    for _ in 0..11 {
        input.extend_from_slice(&[1, 0]);
    }
    assert!(codec.decode(&mut input).is_err());
}

#[test]
fn the_frames_of_one_message_count_together() {
    let mut codec = limited(10 + 2 * FRAME_COST);
    // Two frames of 5 bytes: exactly at the limit.
    let mut input = BytesMut::from(&[1, 5, b'a', b'b', b'c', b'd', b'e', 0, 5][..]);
    input.extend_from_slice(b"fghij");
    match codec.decode(&mut input).unwrap() {
        Some(Message::Message(m)) => assert_eq!(m.len(), 2),
        other => panic!("{other:?}"),
    }
    // The next message starts from zero, and a third frame would go over.
    let mut input = BytesMut::from(&[1, 5, b'a', b'b', b'c', b'd', b'e', 1, 5][..]);
    input.extend_from_slice(b"fghij");
    input.extend_from_slice(&[0, 1]);
    assert!(codec.decode(&mut input).is_err());
}

#[test]
fn without_a_limit_any_length_is_taken() {
    let mut codec = ZmqCodec::new();
    codec.state = DecoderState::FrameHeader;
    codec.waiting_for = 1;
    let mut input = BytesMut::from(&[0, 200][..]);
    input.resize(202, 1);
    assert!(matches!(
        codec.decode(&mut input).unwrap(),
        Some(Message::Message(_))
    ));
}

#[test]
fn refusals_are_counted_when_asked() {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut options = SocketOptions::default();
    options.max_message_size(1024).count_oversized(counter.clone());
    let mut codec = ZmqCodec::with_options(&options);
    codec.state = DecoderState::FrameHeader;
    codec.waiting_for = 1;
    let mut input = BytesMut::from(&[2][..]);
    input.extend_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(codec.decode(&mut input).is_err());
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 1);
}
