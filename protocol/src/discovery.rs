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

impl TransmitterInfo {
    /// A transmitter known by its name only: the instance id derived from the name, no
    /// endpoints, no load (listings built by hand: tests, tools).
    pub fn named(name: &str) -> TransmitterInfo {
        TransmitterInfo {
            name: name.into(),
            id: Thid::of(name.as_bytes()),
            command: String::new(),
            event: String::new(),
            metrics: String::new(),
            cells: 0,
            rate: 0.0,
            draining: false,
            rooms: 0,
        }
    }
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
        /// The membership digest of this point's last complete answer: when the mesh
        /// is still that, the answer is `unchanged` rather than every transmitter again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        view: Option<String>,
    },
    /// Cell → rendezvous: who is live?
    Query { mesh: String },
    /// Rendezvous → anyone: the live transmitters of a mesh.
    Peers {
        mesh: String,
        /// In answers to announcements: the digest of the whole membership these pages
        /// list (`membership_digest`), so the asker knows when it has them all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
        /// The rendezvous started less than an expiry ago: it may not have heard every
        /// live transmitter yet, so an absence means nothing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
        /// Last, so that pages can be written around it (`peers_pages`).
        transmitters: Vec<TransmitterInfo>,
    },
    /// Rendezvous → transmitter: the membership is still the `view` its announcement
    /// gave (every transmitter listed then is live, and no other).
    Unchanged {
        mesh: String,
        digest: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
    },
    /// Rendezvous → transmitter: what changed since the `view` its announcement gave
    /// (`from`): transmitters that joined or changed instance or endpoint, with all they
    /// announce, and the names of those gone. Applied to that view it makes `digest`;
    /// when it does not, the asker drops its view and is answered in full next time.
    Changed {
        mesh: String,
        from: String,
        digest: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        left: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        joined: Vec<TransmitterInfo>,
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

/// The digest of a mesh's membership: each live transmitter's name, instance and command
/// endpoint, in name order, through SHA-256 (16 hex digits kept). Both ends compute it,
/// so a transmitter can tell when the pages of an answer add up to the whole mesh.
pub fn membership_digest<'a>(live: impl IntoIterator<Item = &'a TransmitterInfo>) -> String {
    Membership::of(live).digest()
}

/// A mesh's membership as its digest covers it: each transmitter's instance and command
/// endpoint, by name (load is not membership). The rendezvous tells changes of it, and a
/// transmitter applies them, with this one type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Membership(std::collections::BTreeMap<String, (Thid, String)>);

impl Membership {
    pub fn of<'a>(live: impl IntoIterator<Item = &'a TransmitterInfo>) -> Membership {
        let mut members = std::collections::BTreeMap::new();
        for t in live {
            // The first of a name counts (a rendezvous lists each name once).
            members
                .entry(t.name.clone())
                .or_insert_with(|| (t.id, t.command.clone()));
        }
        Membership(members)
    }

    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, (id, command)) in &self.0 {
            for part in [name.as_bytes(), &id.0[..], command.as_bytes()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
        hex::encode(&h.finalize()[..8])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Names in name order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// The names whose entry differs between this membership and `other`: joined, gone,
    /// or with another instance or endpoint.
    pub fn touched(&self, other: &Membership) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> =
            self.0.keys().chain(other.0.keys()).collect();
        names
            .into_iter()
            .filter(|name| self.0.get(*name) != other.0.get(*name))
            .cloned()
            .collect()
    }

    /// A `changed` answer applied: `left` gone, `joined` as they announce now.
    pub fn apply(&mut self, left: &[String], joined: &[TransmitterInfo]) {
        for name in left {
            self.0.remove(name);
        }
        for t in joined {
            self.0.insert(t.name.clone(), (t.id, t.command.clone()));
        }
    }
}

/// A transmitter's view of one rendezvous point's membership: the pages of its answers
/// assembled until they add up to the digest they carry, then kept up to date by the
/// point's `changed` answers.
#[derive(Debug, Default)]
pub struct MembershipView {
    /// The last complete membership: its digest and names.
    pub digest: Option<String>,
    pub names: Vec<String>,
    /// What a `changed` answer is applied to.
    members: Membership,
    assembling: Option<(String, Vec<TransmitterInfo>)>,
}

/// Past this many entries an answer being assembled is dropped (a rendezvous keeps 2,000
/// at most; pages of older answers do not pile up).
const MAX_ASSEMBLED: usize = 2_048;

impl MembershipView {
    /// One page of an answer; the whole membership's names once the pages add up.
    pub fn on_page(&mut self, digest: &str, page: &[TransmitterInfo]) -> Option<&[String]> {
        let fresh = !matches!(&self.assembling, Some((d, _)) if d == digest);
        if fresh {
            self.assembling = Some((digest.to_string(), Vec::new()));
        }
        let (_, members) = self.assembling.as_mut().expect("set above");
        members.extend(page.iter().cloned());
        if members.len() > MAX_ASSEMBLED {
            self.assembling = None;
            return None;
        }
        let members = Membership::of(members.iter());
        if members.digest() != digest {
            return None;
        }
        self.assembling = None;
        Some(self.hold(members, digest.to_string()))
    }

    /// `unchanged` with `digest`: the names, when it is the view we hold.
    pub fn on_unchanged(&self, digest: &str) -> Option<&[String]> {
        (self.digest.as_deref() == Some(digest)).then_some(&self.names[..])
    }

    /// `changed` from the view `from` to `digest`: the names then, when `from` is the view
    /// we hold and the change makes `digest` of it. One that does not (a point that lost
    /// its history, a change lost on the way) drops the view: the next announcement asks
    /// for all of it. One from another view (late) is ignored.
    pub fn on_changed(
        &mut self,
        from: &str,
        digest: &str,
        left: &[String],
        joined: &[TransmitterInfo],
    ) -> Option<&[String]> {
        if self.digest.as_deref() != Some(from) {
            return None;
        }
        let mut members = self.members.clone();
        members.apply(left, joined);
        if members.digest() != digest {
            self.digest = None;
            return None;
        }
        Some(self.hold(members, digest.to_string()))
    }

    fn hold(&mut self, members: Membership, digest: String) -> &[String] {
        self.names = members.names().cloned().collect();
        self.members = members;
        self.digest = Some(digest);
        &self.names
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

    fn info(name: &str, id: u8) -> TransmitterInfo {
        TransmitterInfo {
            id: Thid([id; 20]),
            command: format!("tcp://{name}:7000"),
            ..TransmitterInfo::named(name)
        }
    }

    #[test]
    fn a_view_completes_when_its_pages_add_up_to_the_digest() {
        let mesh = [info("a", 1), info("b", 2), info("c", 3)];
        let digest = membership_digest(&mesh);
        let mut load = mesh.clone();
        load[0].cells = 7;
        load[1].rate = 3.5;
        assert_eq!(
            membership_digest(load.iter().rev()),
            digest,
            "order and load do not count"
        );
        let mut restarted = mesh.clone();
        restarted[2].id = Thid([9; 20]);
        assert_ne!(membership_digest(&restarted), digest, "a new instance does");
        assert_ne!(membership_digest(&mesh[..2]), digest, "a member gone does");

        let mut view = MembershipView::default();
        assert!(view.on_unchanged(&digest).is_none(), "nothing held yet");
        assert!(
            view.on_page(&digest, &mesh[..2]).is_none(),
            "one page of two"
        );
        assert_eq!(view.on_page(&digest, &mesh[2..]).unwrap(), ["a", "b", "c"]);
        assert_eq!(view.on_unchanged(&digest).unwrap(), ["a", "b", "c"]);
        // A page of a newer answer starts over; the older view holds until it completes.
        let newer = membership_digest(&mesh[..2]);
        assert!(view.on_unchanged(&newer).is_none());
        assert_eq!(view.on_page(&newer, &mesh[..2]).unwrap(), ["a", "b"]);
        assert!(view.on_unchanged(&digest).is_none(), "the old view is gone");
    }

    #[test]
    fn a_view_follows_changes_that_make_their_digest_and_drops_itself_on_one_that_does_not() {
        let mesh = [info("a", 1), info("b", 2), info("c", 3)];
        let first = membership_digest(&mesh);
        let mut view = MembershipView::default();
        view.on_page(&first, &mesh).unwrap();
        // b gone, c restarted, d joined.
        let now = [info("a", 1), info("c", 9), info("d", 4)];
        let second = membership_digest(&now);
        let left = ["b".to_string()];
        let joined = [info("c", 9), info("d", 4)];
        assert!(
            view.on_changed("elsewhere", &second, &left, &joined)
                .is_none(),
            "a change from another view is not ours"
        );
        assert_eq!(
            view.digest.as_deref(),
            Some(first.as_str()),
            "and keeps ours"
        );
        assert_eq!(
            view.on_changed(&first, &second, &left, &joined).unwrap(),
            ["a", "c", "d"]
        );
        assert_eq!(view.on_unchanged(&second).unwrap(), ["a", "c", "d"]);
        // A change that does not make its digest (one lost on the way): the view is
        // dropped, so that the next announcement asks for all of it.
        let third = membership_digest(&now[..1]);
        assert!(view
            .on_changed(&second, &third, &["c".to_string()], &[])
            .is_none());
        assert_eq!(view.digest, None);
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
