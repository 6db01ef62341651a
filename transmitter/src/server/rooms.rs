//! Rooms this transmitter hosts (placed by the rendezvous), and the announcements that
//! tell the rendezvous about this transmitter.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::HashSet;
use thynapse_protocol::wire::{self, cmd};

use foldhash::HashMap;
use thynapse_protocol::discovery::{
    Datagram, MembershipView, Placement, TransmitterInfo, MAX_DATAGRAM,
};
use thynapse_protocol::room::room_of;
use thynapse_protocol::seal::{self, Sealer};
use thynapse_rendezvous::wall_ms;
use thynapse_telemetry::Throttle;
use tokio::sync::{mpsc, watch};

use super::{reply_json, Report, Transmitter};
use crate::Args;

/// A room this transmitter hosts.
pub(super) struct HostedRoom {
    /// Every host of the room, this one included.
    pub(super) hosts: Vec<String>,
    pub(super) messages: prometheus::IntCounter,
}

/// What the announce task says of this transmitter.
#[derive(Clone)]
pub(super) struct Announcement {
    pub(super) info: TransmitterInfo,
    pub(super) rooms: Vec<String>,
    /// Indices into `rooms` of those with a session here.
    pub(super) active: Vec<u32>,
}

/// What one rendezvous point last said this transmitter hosts, and when: each `hosting`
/// is its whole list (at most one datagram). A room none of the points has listed within
/// one expiry is given up (forgotten as idle).
pub(super) struct HostingFrom {
    pub(super) rooms: HashSet<String>,
    pub(super) at: Instant,
}

/// Announces this transmitter to every rendezvous at the configured rate and passes what
/// they answer (live transmitters, rooms to host) to the event loop. A change worth
/// telling at once (a room taken, draining) is announced without waiting for the next
/// interval, so that the rendezvous can hand a new room out quickly. With a `sealer`
/// (an authenticated mesh) announcements are sealed and only answers sealed for them, or
/// fresh `hosting` datagrams sealed with the mesh key, are read.
pub(super) async fn announce(
    args: Args,
    sealer: Option<Sealer>,
    mut info: watch::Receiver<Announcement>,
    events: mpsc::Sender<Report>,
) {
    let socket = match thynapse_rendezvous::bind_udp("0.0.0.0:0".parse().expect("valid address")) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot open a UDP socket for discovery: {e}");
            return;
        }
    };
    let targets: Vec<String> = args
        .rendezvous
        .iter()
        .map(|r| r.trim_start_matches("udp://").to_string())
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(args.announce_interval_ms));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Where the rendezvous points were last found: only their datagrams are read (a
    // forged `hosting` would assign rooms, a forged `peers` start connections).
    let mut points: Vec<SocketAddr> = Vec::new();
    let mut check = Answers::new(sealer);
    let mut error_said = Throttle::default();
    // Each point's membership as its last complete answer gave it: announced back as
    // `view`, so that while nothing changes a point answers `unchanged`, not everyone.
    let mut views: HashMap<SocketAddr, MembershipView> = HashMap::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = info.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            got = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                if !points.contains(&from) {
                    tracing::debug!(%from, "a datagram not from a rendezvous point: ignored");
                    continue;
                }
                let mut listed = None;
                let event = match check.read(&buf[..n], from) {
                    Err(()) => Report::RefusedDatagram,
                    Ok(Datagram::Peers { transmitters, digest, partial, .. }) => {
                        if let Some(digest) = digest {
                            let view = views.entry(from).or_default();
                            if let Some(names) = view.on_page(&digest, &transmitters) {
                                let names = Some(names.to_vec());
                                listed = Some(Report::Listed { from, names, partial });
                            }
                        }
                        Report::Discovered(transmitters)
                    }
                    Ok(Datagram::Unchanged { digest, partial, .. }) => {
                        match views.get(&from).and_then(|v| v.on_unchanged(&digest)) {
                            Some(_) => Report::Listed { from, names: None, partial },
                            None => {
                                // Not the view we hold (a late answer): ask for all of it.
                                views.remove(&from);
                                continue;
                            }
                        }
                    }
                    Ok(Datagram::Changed { from: was, digest, partial, left, joined, .. }) => {
                        // Only what changed since our view: the transmitters in it that
                        // joined (linked like any listed), and the whole membership now.
                        let view = views.entry(from).or_default();
                        match view.on_changed(&was, &digest, &left, &joined) {
                            Some(names) => {
                                let names = Some(names.to_vec());
                                listed = Some(Report::Listed { from, names, partial });
                                Report::Discovered(joined)
                            }
                            // Late, or not adding up (the view is dropped: all of it next).
                            None => continue,
                        }
                    }
                    Ok(Datagram::Hosting { rooms, .. }) => Report::Hosting { from, rooms },
                    Ok(Datagram::Error { error }) => {
                        // Said once a minute: it comes back with every announcement.
                        if error_said.ready(Duration::from_secs(60)) {
                            tracing::warn!("rendezvous: {error} (said once a minute)");
                        }
                        continue;
                    }
                    _ => {
                        tracing::warn!("unexpected datagram from the rendezvous");
                        continue;
                    }
                };
                for event in std::iter::once(event).chain(listed) {
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        }
        let announcement = info.borrow_and_update().clone();
        let body = |view: Option<String>| {
            Datagram::Announce {
                mesh: args.mesh.clone(),
                interval_ms: args.announce_interval_ms,
                multiplier: args.expiry_multiplier,
                transmitter: announcement.info.clone(),
                rooms: announcement.rooms.clone(),
                active: announcement.active.clone(),
                view,
            }
            .to_bytes()
        };
        points.clear();
        for target in &targets {
            let Some(point) = tokio::net::lookup_host(target.as_str())
                .await
                .ok()
                .and_then(|mut a| a.next())
            else {
                tracing::debug!(%target, "rendezvous point not resolved");
                continue;
            };
            points.push(point);
            // Sealed for each point: a point takes a request once.
            let view = views.get(&point).and_then(|v| v.digest.clone());
            let datagram = check.request(&body(view));
            if let Err(e) = socket.send_to(&datagram, point).await {
                tracing::debug!(%target, "announce failed: {e}");
            }
        }
    }
}

/// Announcements whose answers are still read (a point answers within milliseconds;
/// several announcements may be out at once, one per point and a change told early).
const ANSWERED: usize = 16;

/// Which datagrams from the rendezvous points are read, in an authenticated mesh: answers
/// sealed for one of our recent announcements, and `hosting` sent unasked that is fresh and
/// newer than the last from the same point (a replayed one would take rooms back).
struct Answers {
    sealer: Option<Sealer>,
    asked: std::collections::VecDeque<String>,
    newest_hosting: Vec<(SocketAddr, u64)>,
    /// A datagram not taken is logged once a minute at most.
    refusal_said: Throttle,
}

impl Answers {
    fn new(sealer: Option<Sealer>) -> Answers {
        Answers {
            sealer,
            asked: Default::default(),
            newest_hosting: Vec::new(),
            refusal_said: Throttle::default(),
        }
    }

    fn request(&mut self, body: &[u8]) -> Vec<u8> {
        let Some(sealer) = &self.sealer else {
            return body.to_vec();
        };
        let (datagram, mac) = sealer.request(body, wall_ms());
        if self.asked.len() == ANSWERED {
            self.asked.pop_front();
        }
        self.asked.push_back(mac);
        datagram
    }

    /// The datagram, if it is to be read; Err for one that does not open.
    fn read(&mut self, datagram: &[u8], from: SocketAddr) -> Result<Datagram, ()> {
        let Some(sealer) = &self.sealer else {
            return Datagram::parse(seal::open(datagram).0).map_err(|_| ());
        };
        let asked = &self.asked;
        let (body, ts, unasked) = match sealer.answer(datagram, |re| asked.iter().any(|m| m == re))
        {
            Ok((body, ts)) => (body, ts, false),
            Err(seal::AnswerError::NotOurs) => {
                let (body, ts) = sealer.unasked(datagram, wall_ms()).map_err(|_| ())?;
                (body, ts, true)
            }
            Err(e) => {
                if self.refusal_said.ready(Duration::from_secs(60)) {
                    let body = Datagram::parse(seal::open(datagram).0);
                    tracing::warn!(%from, "a datagram from the rendezvous not taken ({e}): {body:?}");
                }
                return Err(());
            }
        };
        let d = Datagram::parse(body).map_err(|_| ())?;
        if matches!(d, Datagram::Hosting { .. }) {
            // An answer is bound to our announcement; a datagram sent unasked is read only
            // if no later one (asked or not) came from that point.
            match self.newest_hosting.iter_mut().find(|(p, _)| *p == from) {
                Some((_, newest)) if unasked && *newest > ts => return Err(()),
                Some((_, newest)) => *newest = (*newest).max(ts),
                None => self.newest_hosting.push((from, ts)),
            }
        }
        Ok(d)
    }
}

/// Rooms not hosted here that are counted under their own name, at most; the rest under
/// `OTHER_ROOMS` (with parentheses and a space, an unlikely room name).
const MAX_UNHOSTED_ROOM_LABELS: usize = 256;
const OTHER_ROOMS: &str = "(other rooms)";

impl Transmitter {
    /// Room messages routed here, by room. A room not hosted here (a peer forwarded its
    /// message) gets its own label only while fewer than `MAX_UNHOSTED_ROOM_LABELS` have:
    /// a peer cannot grow the metric's series without bound.
    pub(super) fn count_room_message(&mut self, channel: &[u8]) {
        let room = room_of(channel);
        if let Some(hosted) = std::str::from_utf8(room)
            .ok()
            .and_then(|r| self.rooms.get(r))
        {
            hosted.messages.inc();
            return;
        }
        let room = String::from_utf8_lossy(room);
        let labelled = self.unhosted_labels.contains(&*room)
            || (self.unhosted_labels.len() < MAX_UNHOSTED_ROOM_LABELS
                && self.unhosted_labels.insert(room.to_string()));
        let label = if labelled { &*room } else { OTHER_ROOMS };
        self.metrics.room_messages.with_label_values(&[label]).inc();
    }

    /// Rendezvous point `from` says which rooms to host (and with whom): rooms are taken
    /// at once; a room is given up once no point has listed it for an expiry (the
    /// rendezvous forgot it as idle), and its sessions, if one joined meanwhile, are sent
    /// to locate it again.
    pub(super) fn on_hosting(&mut self, from: SocketAddr, placements: Vec<Placement>) {
        if self.draining.is_some() {
            return;
        }
        let now = Instant::now();
        let listed = placements.iter().map(|p| p.room.clone()).collect();
        self.hosting_from.insert(
            from,
            HostingFrom {
                rooms: listed,
                at: now,
            },
        );
        let mut changed = false;
        for p in placements {
            match self.rooms.get_mut(&p.room) {
                Some(hosted) => hosted.hosts = p.hosts,
                None => {
                    tracing::info!(room = %p.room, hosts = ?p.hosts, "hosting room");
                    let messages = self.metrics.room_messages.with_label_values(&[&p.room]);
                    self.rooms.insert(
                        p.room,
                        HostedRoom {
                            hosts: p.hosts,
                            messages,
                        },
                    );
                    changed = true;
                }
            }
        }
        let expiry = self.expiry;
        self.hosting_from
            .retain(|_, h| now.duration_since(h.at) <= expiry);
        let given_up: Vec<String> = self
            .rooms
            .keys()
            .filter(|r| !self.hosting_from.values().any(|h| h.rooms.contains(*r)))
            .cloned()
            .collect();
        for room in given_up {
            tracing::info!(%room, "room no longer hosted here (forgotten as idle)");
            self.rooms.remove(&room);
            let _ = self.metrics.room_messages.remove_label_values(&[&room]);
            let sessions: Vec<Bytes> = self
                .cells
                .values()
                .filter(|c| c.room.as_deref() == Some(room.as_str()))
                .map(|c| c.identity.clone())
                .collect();
            for identity in sessions {
                let reason = format!("room {room:?} is not hosted here");
                self.replies
                    .push(reply_json(&identity, cmd::MOVE, &wire::Reason { reason }));
            }
            changed = true;
        }
        if changed {
            self.metrics.rooms.set(self.rooms.len() as i64);
            self.update_announcement();
        }
    }

    /// What the next announcement says. Rooms and draining are sent at once; the rest
    /// goes with the next interval.
    pub(super) fn update_announcement(&self) {
        let mut rooms: Vec<String> = self.rooms.keys().cloned().collect();
        rooms.sort();
        let in_use: HashSet<&str> = self
            .cells
            .values()
            .filter_map(|c| c.room.as_deref())
            .collect();
        let active: Vec<u32> = (0..rooms.len() as u32)
            .filter(|&i| in_use.contains(rooms[i as usize].as_str()))
            .collect();
        let cells = self.cells.len() as u32;
        let draining = self.draining.is_some();
        let rate = self.rate;
        self.announcement.send_if_modified(|a| {
            let urgent = a.rooms != rooms || a.info.draining != draining;
            a.info.cells = cells;
            a.info.rate = rate;
            a.info.draining = draining;
            a.info.rooms = rooms.len() as u32;
            a.rooms = rooms;
            a.active = active;
            urgent
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use thynapse_protocol::frame::CommandFrame;
    use thynapse_protocol::Thid;

    fn placement(room: &str) -> Placement {
        Placement {
            room: room.into(),
            hosts: vec!["t-0".into(), "t-1".into()],
        }
    }

    #[tokio::test]
    async fn a_transmitter_giving_up_a_room_sends_its_sessions_to_locate_it_again() {
        let mut t = transmitter(args());
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:7".parse().unwrap(),
            "127.0.0.1:8".parse().unwrap(),
        );
        t.on_hosting(a, vec![placement("lobby"), placement("hall")]);
        t.on_hosting(b, vec![placement("lobby"), placement("hall")]);
        let (lobby, hall, mesh) = (conn(1), conn(2), conn(3));
        hello(&mut t, &lobby, Thid::random(), Some("lobby"));
        hello(&mut t, &hall, Thid::random(), Some("hall"));
        hello(&mut t, &mesh, Thid::random(), None);
        assert!(replies(&t).iter().all(|(_, c)| c == "WLCM"));
        t.replies.clear();
        // One point lists it no more, the other still does: kept.
        t.on_hosting(a, vec![placement("hall")]);
        assert!(t.replies.is_empty() && t.rooms.contains_key("lobby"));
        // No point lists it (forgotten as idle): given up, its session told to move.
        t.on_hosting(b, vec![placement("hall")]);
        assert_eq!(replies(&t), [(lobby.clone(), "MOVE".to_string())]);
        let reason: wire::Reason = CommandFrame::parse(t.replies[0].get(1).unwrap())
            .unwrap()
            .decode_json()
            .unwrap();
        assert!(reason.reason.contains("lobby"), "{}", reason.reason);
        assert!(!t.rooms.contains_key("lobby") && t.rooms.contains_key("hall"));
        assert_eq!(t.announcement.borrow().rooms, ["hall"]);
        // Coming back here, it is sent away again.
        t.replies.clear();
        hello(&mut t, &lobby, Thid::random(), Some("lobby"));
        assert_eq!(replies(&t), [(lobby, "MOVE".to_string())]);
    }

    #[tokio::test]
    async fn room_labels_are_the_hosted_rooms_and_256_others_then_other_rooms() {
        let mut t = transmitter(args());
        let point: SocketAddr = "127.0.0.1:7".parse().unwrap();
        t.on_hosting(point, vec![placement("home")]);
        // Room messages forwarded by peers, for 300 rooms not hosted here.
        for i in 0..300 {
            t.count_room_message(format!("{{r{i}}}chat").as_bytes());
        }
        t.count_room_message(b"{r0}chat");
        t.count_room_message(b"{home}chat");
        let counts: std::collections::HashMap<String, u64> = t
            .metrics
            .registry
            .gather()
            .iter()
            .filter(|f| f.name() == "thynapse_transmitter_room_messages_total")
            .flat_map(|f| f.get_metric())
            .map(|m| {
                let label = m.get_label()[0].value().to_string();
                (label, m.get_counter().get_value() as u64)
            })
            .collect();
        assert_eq!(counts.len(), 1 + 256 + 1, "home, 256 others, (other rooms)");
        assert_eq!(counts["home"], 1);
        assert_eq!(counts["r0"], 2, "a labelled room keeps its label");
        assert_eq!(counts["r255"], 1);
        assert!(!counts.contains_key("r256"));
        assert_eq!(counts[OTHER_ROOMS], 300 - 256);
    }

    #[test]
    fn only_answers_to_recent_announcements_and_newer_hosting_are_read() {
        use thynapse_protocol::seal::Opener;
        let tokens = vec![b"token".to_vec()];
        let mut answers = Answers::new(Sealer::peer(&tokens, "m"));
        let mut rv = Opener::new("m", tokens, 0);
        let point: SocketAddr = "127.0.0.1:7".parse().unwrap();
        let peers = Datagram::Peers {
            mesh: "m".into(),
            digest: None,
            partial: false,
            transmitters: Vec::new(),
        }
        .to_bytes();
        let hosting = |room: &str| {
            Datagram::Hosting {
                mesh: "m".into(),
                rooms: vec![placement(room)],
            }
            .to_bytes()
        };
        let first = answers.request(b"{}");
        let answer_to_first = rv
            .take(&first, wall_ms())
            .unwrap()
            .answer(&peers, wall_ms());
        assert!(answers.read(&answer_to_first, point).is_ok());
        // Once ANSWERED more announcements went out, the first one's answers are not read.
        for _ in 0..ANSWERED {
            answers.request(b"{}");
        }
        assert!(answers.read(&answer_to_first, point).is_err());
        // Unasked hosting: a later one is read, an older one after it is not.
        let now = wall_ms();
        let older = rv.unasked(&hosting("a"), now - 10);
        let newer = rv.unasked(&hosting("b"), now);
        assert!(answers.read(&newer, point).is_ok());
        assert!(answers.read(&older, point).is_err(), "older than the last");
        let other_point: SocketAddr = "127.0.0.1:8".parse().unwrap();
        assert!(
            answers.read(&older, other_point).is_ok(),
            "each point on its own"
        );
        // Unsealed, or sealed by somebody else: not read.
        assert!(answers.read(&peers, point).is_err());
        let guess = Opener::new("m", vec![b"guess".to_vec()], 0);
        assert!(answers
            .read(&guess.unasked(&hosting("c"), now + 1), point)
            .is_err());
    }
}
