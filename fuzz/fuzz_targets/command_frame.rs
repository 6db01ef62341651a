//! A command frame (`J HELO {...}`, `B PUBS`), then its JSON body read as every message
//! type a transmitter or sidecar reads from a socket: never a panic; a frame that parses
//! writes back the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use thynapse_protocol::frame::CommandFrame;
use thynapse_protocol::wire;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let Ok(frame) = CommandFrame::parse(&input) else {
        return;
    };
    let again = CommandFrame::parse(&frame.to_bytes()).expect("a parsed frame reads back");
    assert_eq!(again, frame);
    let _ = frame.decode_json::<wire::Hello>();
    let _ = frame.decode_json::<wire::Welcome>();
    let _ = frame.decode_json::<wire::Event>();
    let _ = frame.decode_json::<wire::EventAck>();
    let _ = frame.decode_json::<wire::Credit>();
    let _ = frame.decode_json::<wire::Reason>();
    let _ = frame.decode_json::<wire::ErrorReply>();
    let _ = frame.decode_json::<wire::SubsSync>();
    let _ = frame.decode_json::<wire::SyncRound>();
    let _ = frame.decode_json::<wire::PeerHello>();
    let _ = frame.decode_json::<wire::CellInfo>();
    let _ = frame.decode_json::<wire::CellGone>();
});
