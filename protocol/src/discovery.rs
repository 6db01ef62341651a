//! Rendezvous datagrams (JSON over UDP). Transmitters announce themselves at a fixed
//! rate; an announcement expires after `rate × multiplier`. The rendezvous answers every
//! datagram with the live transmitters of the mesh, so its whole state can be rebuilt
//! from announcements after a restart.

use serde::{Deserialize, Serialize};

use crate::thid::Thid;

/// What a transmitter says of itself in each announcement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransmitterInfo {
    pub name: String,
    /// Changes on every start, so peers can tell a restart from a long pause.
    pub id: Thid,
    pub command: String,
    pub event: String,
    #[serde(default)]
    pub metrics: String,
    /// Cells connected now.
    #[serde(default)]
    pub cells: u32,
    /// Messages routed per second, smoothed.
    #[serde(default)]
    pub rate: f64,
    /// A draining transmitter takes no new cells.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Datagram {
    /// Transmitter → rendezvous, every `interval_ms`; expires after `interval_ms × multiplier`.
    Announce {
        mesh: String,
        interval_ms: u64,
        multiplier: u32,
        transmitter: TransmitterInfo,
    },
    /// Cell → rendezvous: who is live?
    Query { mesh: String },
    /// Rendezvous → anyone: the live transmitters of a mesh.
    Peers {
        mesh: String,
        transmitters: Vec<TransmitterInfo>,
    },
    /// Rendezvous → anyone: the datagram could not be read.
    Error { error: String },
}

impl Datagram {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("datagrams always serialise")
    }

    pub fn parse(bytes: &[u8]) -> Result<Datagram, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Largest datagram we send or accept; a Peers answer lists ~150 transmitters within it.
pub const MAX_DATAGRAM: usize = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_round_trip() {
        let d = Datagram::Query {
            mesh: "demo".into(),
        };
        let s = String::from_utf8(d.to_bytes()).unwrap();
        assert_eq!(s, r#"{"type":"query","mesh":"demo"}"#);
        assert_eq!(Datagram::parse(s.as_bytes()).unwrap(), d);
        assert!(Datagram::parse(b"{\"type\":\"nope\"}").is_err());
    }
}
