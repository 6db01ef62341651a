//! Building the command messages a sidecar sends its transmitter (see docs/protocol.md).

use bytes::Bytes;
use thynapse_protocol::frame::{CommandFrame, Encoding};
use zeromq::ZmqMessage;

pub fn json_frame<T: serde::Serialize>(command: &[u8; 4], value: &T) -> ZmqMessage {
    ZmqMessage::from(CommandFrame::json(command, value).to_bytes())
}

/// An empty JSON command (`QUIT`, `PING`).
pub fn bare_frame(command: &[u8; 4]) -> ZmqMessage {
    json_frame(command, &serde_json::json!({}))
}

pub fn binary_frame(command: &[u8; 4], body: Bytes) -> ZmqMessage {
    let mut m =
        ZmqMessage::from(CommandFrame::new(Encoding::Binary, command, Bytes::new()).to_bytes());
    m.push_back(body);
    m
}

/// A binary command with a JSON header in its command frame.
pub fn binary_frame_with<T: serde::Serialize>(
    command: &[u8; 4],
    header: &T,
    body: Bytes,
) -> ZmqMessage {
    let header = serde_json::to_vec(header).expect("protocol headers always serialise");
    let mut m = ZmqMessage::from(CommandFrame::new(Encoding::Binary, command, header).to_bytes());
    m.push_back(body);
    m
}
