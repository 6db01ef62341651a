//! Building the command messages a sidecar sends its transmitter (see docs/protocol.md).

use bytes::Bytes;
use thynapse_protocol::frame::{CommandFrame, Encoding};
use thynapse_protocol::limits::BATCH_BYTES;
use thynapse_protocol::wire::{self, cmd, Interest, Op};
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

/// Subscription changes as `SUBS` frames of about `BATCH_BYTES` at most, in order; the
/// last carries the confirmation number `sync` (the transmitter reads them in order, so
/// its barrier covers them all).
pub fn interest_frames<'a>(
    entries: impl IntoIterator<Item = (Op, Interest, &'a [u8])>,
    sync: u64,
    out: &mut Vec<ZmqMessage>,
) {
    let mut chunks = vec![Vec::new()];
    let mut bytes = 0;
    for (op, kind, name) in entries {
        if bytes >= BATCH_BYTES {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += name.len() + 6;
        chunks
            .last_mut()
            .expect("one at least")
            .push((op, kind, name));
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let header = wire::SubsSync {
            sync: (i == last).then_some(sync),
        };
        out.push(binary_frame_with(
            cmd::SUBS,
            &header,
            wire::encode_interest(chunk),
        ));
    }
}
