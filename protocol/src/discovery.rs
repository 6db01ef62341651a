//! Rendezvous datagrams (JSON over UDP). Transmitters announce themselves at a fixed
//! rate; an announcement expires after `rate × multiplier`. The rendezvous answers every
//! datagram with the live transmitters of the mesh, so its whole state can be rebuilt
//! from announcements after a restart.
//!
//! Rooms are placed here too (hubsub's central server): a cell asks where a room lives
//! (`locate`); the rendezvous places a new room on the least busy live transmitters, tells
//! them (`hosting`), and hands the room out once they confirm it in their announcements.
//! Placements are rebuilt from those announcements after a restart as well.

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
    /// A draining transmitter takes no new cells and no new rooms.
    #[serde(default)]
    pub draining: bool,
    /// Rooms hosted now.
    #[serde(default)]
    pub rooms: u32,
}

/// One room and every transmitter that hosts it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub room: String,
    pub hosts: Vec<String>,
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
        /// Rooms this transmitter hosts: its confirmation of `hosting`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rooms: Vec<String>,
        /// Which of `rooms` (indices) have a session here now: on-demand rooms that none
        /// of their hosts reports for a while are forgotten.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        active: Vec<u32>,
    },
    /// Cell → rendezvous: who is live?
    Query { mesh: String },
    /// Rendezvous → anyone: the live transmitters of a mesh.
    Peers {
        mesh: String,
        transmitters: Vec<TransmitterInfo>,
    },
    /// Rendezvous → transmitter, after each announcement and whenever a placement changes:
    /// the rooms it must host, each with all of its hosts.
    Hosting { mesh: String, rooms: Vec<Placement> },
    /// Cell → rendezvous: where does `room` live? Places it when it is new.
    Locate { mesh: String, room: String },
    /// Rendezvous → cell: the live transmitters that host `room` and confirmed it; none
    /// while a new placement waits for confirmation (ask again).
    Room {
        mesh: String,
        room: String,
        replicas: u32,
        transmitters: Vec<TransmitterInfo>,
    },
    /// Rendezvous → anyone: the datagram could not be read, or its request is refused
    /// (for example an undeclared room in a mesh that forbids them).
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

/// Largest datagram body: the rest is kept for its seal (`seal::MAX_SEAL_BYTES`).
pub const MAX_BODY: usize = MAX_DATAGRAM - crate::seal::MAX_SEAL_BYTES;

/// The announcement intervals and expiry multipliers a mesh may have: the CRD's ranges
/// (`spec.rendezvous`), which `thynapse up` checks manifests against and the rendezvous
/// checks every announcement against (so none asks to be kept past 20 minutes).
pub const ANNOUNCE_INTERVAL_MS: std::ops::RangeInclusive<u64> = 50..=60_000;
pub const EXPIRY_MULTIPLIER: std::ops::RangeInclusive<u32> = 2..=20;

/// Room names (UTF-8) longer than this are refused, so placements fit in datagrams.
pub const MAX_ROOM_NAME: usize = 200;

/// Bytes of room placements one transmitter may be given, so that its announcement and
/// its `hosting` datagram stay within [`MAX_BODY`].
pub const MAX_HOSTING_BYTES: usize = 40_000;

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

    #[test]
    fn the_fuzzers_long_decimal_reads_back_the_same_after_it_is_written() {
        // Found by the fuzzer (fuzz/corpus/datagram/float-roundtrip-long-decimal): a rate
        // of 300 digits read back one unit in the last place off after being written, so
        // the datagram did not round-trip; serde_json's exact float parsing fixes it.
        let found = include_bytes!("../../fuzz/corpus/datagram/float-roundtrip-long-decimal");
        let written = Datagram::parse(found).unwrap().to_bytes();
        let again = Datagram::parse(&written).expect("a written datagram parses");
        assert_eq!(again.to_bytes(), written);
    }
}
