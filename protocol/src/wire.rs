//! The JSON payloads of command frames and the binary interest list. docs/protocol.md
//! describes every command with examples; the names here follow it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::delivery::DeliveryRule;
use crate::frame::FrameError;
use crate::thid::Thid;

/// Command names, as they appear after the encoding letter.
pub mod cmd {
    pub const HELO: &[u8; 4] = b"HELO";
    pub const WLCM: &[u8; 4] = b"WLCM";
    pub const SUBS: &[u8; 4] = b"SUBS";
    pub const EVNT: &[u8; 4] = b"EVNT";
    pub const ACKD: &[u8; 4] = b"ACKD";
    pub const PUBS: &[u8; 4] = b"PUBS";
    pub const ACKS: &[u8; 4] = b"ACKS";
    pub const DLVR: &[u8; 4] = b"DLVR";
    pub const CRED: &[u8; 4] = b"CRED";
    pub const PING: &[u8; 4] = b"PING";
    pub const PONG: &[u8; 4] = b"PONG";
    pub const MOVE: &[u8; 4] = b"MOVE";
    pub const QUIT: &[u8; 4] = b"QUIT";
    pub const ERRR: &[u8; 4] = b"ERRR";
    pub const PEER: &[u8; 4] = b"PEER";
    pub const PWLC: &[u8; 4] = b"PWLC";
    pub const CELL: &[u8; 4] = b"CELL";
    pub const CGON: &[u8; 4] = b"CGON";
    pub const FWRD: &[u8; 4] = b"FWRD";
    pub const FACK: &[u8; 4] = b"FACK";
    pub const LEAV: &[u8; 4] = b"LEAV";
    pub const SUBD: &[u8; 4] = b"SUBD";
    pub const SYNC: &[u8; 4] = b"SYNC";
    pub const SYND: &[u8; 4] = b"SYND";
    pub const AUTH: &[u8; 4] = b"AUTH";
    pub const CHAL: &[u8; 4] = b"CHAL";
    pub const AUTD: &[u8; 4] = b"AUTD";
}

/// `J AUTH`: the first message of a connection to an authenticated mesh (see
/// `crate::auth`). Without `proof` it asks for a challenge; with it, it answers one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    /// "cell" (proving a Service) or "peer" (proving the mesh).
    pub role: String,
    /// The Service (role "cell") or the mesh (role "peer").
    pub context: String,
    /// The server's nonce (from `CHAL`) the proof is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// The client's nonce, for the server to prove itself over in `AUTD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    /// With the proof: the client's ephemeral X25519 public key (64 hex), asking that
    /// the connection be encrypted (`crate::crypt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<String>,
}

/// `J CHAL`: the server's nonce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    pub nonce: String,
}

/// `J AUTD`: the client is authenticated; the server's own proof over its challenge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Authenticated {
    pub proof: String,
    /// The server's ephemeral X25519 public key, when the client asked for encryption:
    /// every later message is sealed (`crate::crypt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<String>,
}

/// Where a cell wants its messages: on its own command connection (reliable, batched,
/// flow-controlled; what sidecars use) or on the transmitter's PUB socket under the topic
/// of its id (the seed protocol's way; best effort).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Events {
    #[default]
    Dealer,
    Pub,
}

/// `J HELO`: a cell introduces itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub id: Thid,
    pub service: String,
    #[serde(default)]
    pub rules: Vec<DeliveryRule>,
    #[serde(default)]
    pub events: Events,
    /// Reserved for mesh authentication (the zeromq crate has no CURVE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Set on a room session: the connection carries shard channels of this room only,
    /// and the transmitter must host it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

/// `J WLCM`: the transmitter's answer to HELO.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub id: Thid,
    pub name: String,
    #[serde(rename = "pub")]
    pub pub_endpoint: String,
    pub max_message_bytes: usize,
    pub heartbeat_ms: u64,
}

/// `J EVNT` (text payload in `data`) or `B EVNT` (header only; payload in the next frame).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// `J ACKD`: an EVNT was accepted; its THID and how many cells it was routed to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventAck {
    pub thid: Thid,
    pub receivers: u32,
}

/// `J CRED` / `J FACK`: everything up to and including `batch` has been taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub batch: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// `B SUBS` header (optional) / `J SUBD`: with `sync`, the cell asks to hear `J SUBD`
/// with the same number once every transmitter linked to its own knows the change, so a
/// SUBSCRIBE confirmation means what it means in Redis: any later PUBLISH reaches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsSync {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<u64>,
}

/// `J SYNC` / `J SYND` between transmitters: "answer once you have applied everything I
/// sent before this" (a peer handles its inbound connection in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRound {
    pub round: u64,
}

/// `J PEER` / `J PWLC`: a transmitter introduces itself to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerHello {
    pub id: Thid,
    pub name: String,
    pub mesh: String,
}

/// `B CELL` header: the whole interest of one cell of the sender (the frame after it is
/// an interest list); replaces what the receiver knew of that cell there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellInfo {
    pub id: Thid,
    pub service: String,
    #[serde(default)]
    pub rules: Vec<DeliveryRule>,
}

/// `J CGON`: a cell left the sender.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellGone {
    pub id: Thid,
}

/// One entry of an interest list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Interest {
    Channel,
    Pattern,
    ShardChannel,
}

/// Whether a `SUBS` entry adds or removes interest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Remove,
}

/// The interest list of `B SUBS` (deltas: op, kind, name) and `B CELL` (op always Add).
pub fn encode_interest<'a>(entries: impl IntoIterator<Item = (Op, Interest, &'a [u8])>) -> Bytes {
    let mut buf = BytesMut::new();
    for (op, kind, name) in entries {
        buf.put_u8(match op {
            Op::Add => 0,
            Op::Remove => 1,
        });
        buf.put_u8(match kind {
            Interest::Channel => 0,
            Interest::Pattern => 1,
            Interest::ShardChannel => 2,
        });
        buf.put_u32_le(name.len() as u32);
        buf.put_slice(name);
    }
    buf.freeze()
}

pub fn decode_interest(mut frame: Bytes) -> Result<Vec<(Op, Interest, Bytes)>, FrameError> {
    let mut out = Vec::new();
    while frame.has_remaining() {
        if frame.remaining() < 6 {
            return Err(FrameError::BadBatch("truncated interest"));
        }
        let op = match frame.get_u8() {
            0 => Op::Add,
            1 => Op::Remove,
            _ => return Err(FrameError::BadBatch("unknown interest op")),
        };
        let kind = match frame.get_u8() {
            0 => Interest::Channel,
            1 => Interest::Pattern,
            2 => Interest::ShardChannel,
            _ => return Err(FrameError::BadBatch("unknown interest kind")),
        };
        let len = frame.get_u32_le() as usize;
        if frame.remaining() < len {
            return Err(FrameError::BadBatch("truncated interest"));
        }
        out.push((op, kind, frame.split_to(len)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::CommandFrame;

    #[test]
    fn hello_accepts_the_seed_form() {
        let id = Thid::random();
        let text = format!(r#"J HELO {{"id": "{id}", "service": "orders"}}"#);
        let f = CommandFrame::parse(&Bytes::from(text)).unwrap();
        let h: Hello = f.decode_json().unwrap();
        assert_eq!(h.id, id);
        assert_eq!(h.service, "orders");
        assert!(h.rules.is_empty());
        assert_eq!(h.events, Events::Dealer);
    }

    #[test]
    fn welcome_uses_pub_key() {
        let w = Welcome {
            id: Thid::random(),
            name: "demo-0".into(),
            pub_endpoint: "tcp://127.0.0.1:1".into(),
            max_message_bytes: 10,
            heartbeat_ms: 500,
        };
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!(v["pub"], "tcp://127.0.0.1:1");
    }

    #[test]
    fn interest_round_trip() {
        let f = encode_interest([
            (Op::Add, Interest::Channel, &b"a"[..]),
            (Op::Remove, Interest::Pattern, &b"b.*"[..]),
        ]);
        let d = decode_interest(f.clone()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[1],
            (Op::Remove, Interest::Pattern, Bytes::from_static(b"b.*"))
        );
        assert!(decode_interest(f.slice(..f.len() - 1)).is_err());
        assert!(decode_interest(Bytes::from_static(&[9, 0, 0, 0, 0, 0])).is_err());
    }
}
