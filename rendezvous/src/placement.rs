//! Room placement (pure: the live transmitters are passed in).
//!
//! A room is placed on the `replicas` least busy live transmitters that are not draining.
//! **Busy** is the number of rooms a transmitter hosts plus its recent message rate in
//! units of [`RATE_PER_ROOM`] (so 2,000 msg/s weigh as much as two more rooms); ties go
//! to the name, so every rendezvous point with the same view places the same way.
//!
//! A host is first *assigned*, then *confirmed* when its announcement lists the room;
//! cells are only given confirmed hosts. A host that stops announcing, or comes back as
//! a new instance, loses its rooms, and each room below its replicas is topped up from
//! the live transmitters. A transmitter that joins later is the least busy one, so it
//! takes new rooms first; rooms already placed stay where they are.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use thynapse_protocol::discovery::{Placement, TransmitterInfo, MAX_HOSTING_BYTES, MAX_ROOM_NAME};
use thynapse_protocol::Thid;

/// Rooms a mesh has at most: locating a new on-demand room past it is refused, so made-up
/// room names cannot grow the rendezvous' state without bound (declared rooms are
/// placed whatever the count; on-demand rooms are forgotten once idle, `forget_idle`).
pub const MAX_ROOMS: usize = 10_000;

/// Messages per second that weigh as much as hosting one more room.
pub const RATE_PER_ROOM: f64 = 1000.0;

/// What the mesh allows: its declared rooms and what to do with the others.
#[derive(Clone, Debug)]
pub struct RoomPolicy {
    pub declared: BTreeMap<String, u32>,
    pub default_replicas: u32,
    pub allow_undeclared: bool,
}

impl Default for RoomPolicy {
    fn default() -> Self {
        RoomPolicy {
            declared: BTreeMap::new(),
            default_replicas: 2,
            allow_undeclared: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Host {
    name: String,
    instance: Thid,
    confirmed: bool,
}

#[derive(Clone, Debug)]
struct Room {
    replicas: u32,
    hosts: Vec<Host>,
    /// When a cell last asked for it or a host last reported a session in it.
    used: Instant,
}

/// Why a room cannot be handed out.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PlaceError {
    #[error("room {0:?} is not declared and mesh {1:?} does not allow undeclared rooms (spec.rooms.allowUndeclared: false)")]
    Undeclared(String, String),
    #[error("room name must be 1 to {MAX_ROOM_NAME} bytes of UTF-8")]
    BadName,
    #[error("mesh {0:?} has {MAX_ROOMS} rooms, the most a mesh may have")]
    Full(String),
}

/// The answer to a `locate`.
#[derive(Debug, PartialEq)]
pub struct Located {
    pub replicas: u32,
    /// Live, confirmed, not draining; empty while a placement waits for confirmation.
    pub hosts: Vec<String>,
}

pub struct Rooms {
    mesh: String,
    policy: RoomPolicy,
    rooms: BTreeMap<String, Room>,
    /// Rooms forgotten as idle, and when: not adopted again from announcements (their
    /// hosts drop them once told), until a cell asks for one.
    forgotten: HashMap<String, Instant>,
}

impl Rooms {
    pub fn new(mesh: &str, policy: RoomPolicy) -> Self {
        Rooms {
            mesh: mesh.to_string(),
            policy,
            rooms: BTreeMap::new(),
            forgotten: HashMap::new(),
        }
    }

    /// Whether `room` is a new on-demand room past `MAX_ROOMS`: declared rooms are
    /// always placed.
    fn is_full_for(&self, room: &str) -> bool {
        self.rooms.len() >= MAX_ROOMS
            && !self.rooms.contains_key(room)
            && !self.policy.declared.contains_key(room)
    }

    fn replicas_for(&self, room: &str) -> Result<u32, PlaceError> {
        if room.is_empty() || room.len() > MAX_ROOM_NAME {
            return Err(PlaceError::BadName);
        }
        match self.policy.declared.get(room) {
            Some(r) => Ok((*r).max(1)),
            None if self.policy.allow_undeclared => Ok(self.policy.default_replicas.max(1)),
            None => Err(PlaceError::Undeclared(room.to_string(), self.mesh.clone())),
        }
    }

    /// Where `room` lives, placing it first when it is new. Returns the answer and the
    /// transmitters that were just given the room (to be told at once).
    pub fn locate(
        &mut self,
        room: &str,
        live: &[TransmitterInfo],
    ) -> Result<(Located, Vec<String>), PlaceError> {
        let replicas = self.replicas_for(room)?;
        if self.is_full_for(room) {
            return Err(PlaceError::Full(self.mesh.clone()));
        }
        self.rooms.entry(room.to_string()).or_insert_with(|| Room {
            replicas,
            hosts: Vec::new(),
            used: Instant::now(),
        });
        self.forgotten.remove(room);
        let mut view = View::of(live);
        let assigned = self.top_up(room, &mut view);
        let r = &self.rooms[room];
        let hosts = r
            .hosts
            .iter()
            .filter(|h| h.confirmed && view.serving(h))
            .map(|h| h.name.clone())
            .collect();
        Ok((
            Located {
                replicas: r.replicas,
                hosts,
            },
            assigned,
        ))
    }

    /// Takes a transmitter's announcement: a new instance under a known name loses what
    /// the old one hosted; every room it lists is confirmed (or adopted, after a restart
    /// of this rendezvous). Returns true when a placement changed.
    pub fn announced(&mut self, info: &TransmitterInfo, hosted: &[String]) -> bool {
        let mut changed = false;
        for r in self.rooms.values_mut() {
            let before = r.hosts.len();
            r.hosts
                .retain(|h| h.name != info.name || h.instance == info.id);
            changed |= r.hosts.len() != before;
        }
        for room in hosted {
            let replicas = match self.replicas_for(room) {
                Ok(r) => r,
                // A room it hosts but the policy no longer allows: its cells will move.
                Err(_) => continue,
            };
            if self.is_full_for(room) || self.forgotten.contains_key(room) {
                // Forgotten as idle: its hosts are told and drop it.
                continue;
            }
            let r = self.rooms.entry(room.clone()).or_insert_with(|| Room {
                replicas,
                hosts: Vec::new(),
                used: Instant::now(),
            });
            match r.hosts.iter_mut().find(|h| h.name == info.name) {
                Some(h) if h.confirmed => {}
                Some(h) => {
                    h.confirmed = true;
                    changed = true;
                }
                None => {
                    r.hosts.push(Host {
                        name: info.name.clone(),
                        instance: info.id,
                        confirmed: true,
                    });
                    changed = true;
                }
            }
        }
        changed
    }

    /// Forgets hosts that are gone and tops every room up to its replicas. Returns the
    /// transmitters whose placements changed: new rooms, or new co-hosts.
    /// O(rooms × replicas) when nothing changed: the live transmitters and every host's
    /// load are indexed once per pass.
    pub fn reconcile(&mut self, live: &[TransmitterInfo]) -> Vec<String> {
        let mut touched = Vec::new();
        let mut view = View::of(live);
        let mut lost_any = Vec::new();
        for (name, r) in self.rooms.iter_mut() {
            let before = r.hosts.len();
            r.hosts.retain(|h| view.live(h));
            if r.hosts.len() != before {
                lost_any.push(name.clone());
            }
        }
        let names: Vec<String> = self.rooms.keys().cloned().collect();
        for name in names {
            let lost = lost_any.binary_search(&name).is_ok();
            let assigned = self.top_up(&name, &mut view);
            if lost || !assigned.is_empty() {
                touched.extend(self.rooms[&name].hosts.iter().map(|h| h.name.clone()));
            }
        }
        touched.sort();
        touched.dedup();
        touched
    }

    /// Adds hosts to `room` until it has its replicas of serving transmitters, least busy
    /// first. Returns the names of the new hosts.
    fn top_up(&mut self, room: &str, view: &mut View) -> Vec<String> {
        let r = &self.rooms[room];
        let serving = r.hosts.iter().filter(|h| view.serving(h)).count() as u32;
        if serving >= r.replicas {
            return Vec::new();
        }
        let mut need = r.replicas - serving;
        // The hosts it will have (more than `replicas` while a draining one stays).
        let hosts = (r.replicas as usize).max(r.hosts.len() + need as usize);
        let cost = hosting_bytes(room, hosts, view.longest_name);
        view.count(&self.rooms);
        let mut candidates: Vec<(f64, &TransmitterInfo)> = view
            .transmitters
            .iter()
            .filter(|t| !t.draining && !r.hosts.iter().any(|h| h.name == t.name))
            .filter(|t| {
                let bytes = view.load.get(t.name.as_str()).map_or(0, |l| l.1);
                bytes + cost <= MAX_HOSTING_BYTES
            })
            .map(|t| {
                let rooms = view.load.get(t.name.as_str()).map_or(0, |l| l.0);
                (rooms as f64 + t.rate.max(0.0) / RATE_PER_ROOM, t)
            })
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.name.cmp(&b.1.name)));
        let chosen: Vec<(String, Thid)> = candidates
            .into_iter()
            .take_while(|_| {
                let more = need > 0;
                need = need.saturating_sub(1);
                more
            })
            .map(|(_, t)| (t.name.clone(), t.id))
            .collect();
        let r = self.rooms.get_mut(room).expect("exists");
        for (name, instance) in &chosen {
            let load = view.load.entry(name.clone()).or_default();
            load.0 += 1;
            load.1 += cost;
            r.hosts.push(Host {
                name: name.clone(),
                instance: *instance,
                confirmed: false,
            });
        }
        chosen.into_iter().map(|(n, _)| n).collect()
    }

    /// A room was asked for (a cell's `locate`).
    pub fn used(&mut self, room: &str, now: Instant) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.used = now;
        }
    }

    /// A host reports sessions in `active` (indices into the `rooms` it announced).
    pub fn active(&mut self, rooms: &[String], active: &[u32], now: Instant) {
        for &i in active {
            if let Some(r) = rooms
                .get(i as usize)
                .and_then(|name| self.rooms.get_mut(name))
            {
                r.used = now;
            }
        }
    }

    /// Forgets the on-demand rooms nobody used for `after` (no `locate`, no host with a
    /// session in them); declared rooms are kept whatever happens. Their hosts' next
    /// announcements are not taken as hosting them. Returns how many were forgotten, and
    /// the hosts to tell.
    pub fn forget_idle(&mut self, now: Instant, after: Duration) -> (usize, Vec<String>) {
        self.forgotten
            .retain(|_, when| now.duration_since(*when) <= after);
        let idle: Vec<String> = self
            .rooms
            .iter()
            .filter(|(name, r)| {
                !self.policy.declared.contains_key(*name) && now.duration_since(r.used) > after
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut hosts = Vec::new();
        let forgotten = idle.len();
        for name in idle {
            let r = self.rooms.remove(&name).expect("listed above");
            tracing::info!(room = %name, "idle room forgotten");
            hosts.extend(r.hosts.into_iter().map(|h| h.name));
            self.forgotten.insert(name, now);
        }
        hosts.sort();
        hosts.dedup();
        (forgotten, hosts)
    }

    /// Rooms placed.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// The rooms `transmitter` must host, each with all of its hosts.
    pub fn hosting(&self, transmitter: &str) -> Vec<Placement> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.hosts.iter().any(|h| h.name == transmitter))
            .map(|(name, r)| Placement {
                room: name.clone(),
                hosts: r.hosts.iter().map(|h| h.name.clone()).collect(),
            })
            .collect()
    }

    /// The hosts of one room, by name.
    pub fn hosting_of(&self, room: &str) -> Option<Vec<String>> {
        self.rooms
            .get(room)
            .map(|r| r.hosts.iter().map(|h| h.name.clone()).collect())
    }

    /// Rooms each transmitter hosts, for its announced load.
    pub fn count(&self, transmitter: &str) -> usize {
        self.rooms
            .values()
            .filter(|r| r.hosts.iter().any(|h| h.name == transmitter))
            .count()
    }
}

/// The bytes a room adds to its hosts' `hosting` datagrams, `{"room":…,"hosts":[…]},`,
/// at most: each host's name is counted as long as the longest live one (names may have
/// up to 256 bytes), so that the datagram stays within `MAX_DATAGRAM`.
fn hosting_bytes(room: &str, hosts: usize, host_name_bytes: usize) -> usize {
    // As JSON writes it: a control character in a name takes six bytes.
    let room = serde_json::to_string(room).map_or(room.len() * 6, |j| j.len());
    room + 24 + hosts * (host_name_bytes + 3)
}

/// The live transmitters indexed by name, and the rooms (and hosting bytes) each hosts:
/// built once per placement pass, kept up to date as it assigns.
struct View<'a> {
    transmitters: &'a [TransmitterInfo],
    by_name: HashMap<&'a str, &'a TransmitterInfo>,
    load: HashMap<String, (u32, usize)>,
    counted: bool,
    /// The longest live transmitter name, in bytes.
    longest_name: usize,
}

impl<'a> View<'a> {
    fn of(live: &'a [TransmitterInfo]) -> Self {
        View {
            transmitters: live,
            by_name: live.iter().map(|t| (t.name.as_str(), t)).collect(),
            load: HashMap::new(),
            counted: false,
            longest_name: live.iter().map(|t| t.name.len()).max().unwrap_or(0),
        }
    }

    /// Counts every host's rooms and hosting bytes, once per view (a pass over the rooms:
    /// only when one needs hosts).
    fn count(&mut self, rooms: &BTreeMap<String, Room>) {
        if self.counted {
            return;
        }
        self.counted = true;
        for (name, room) in rooms {
            for h in &room.hosts {
                let e = self.load.entry(h.name.clone()).or_default();
                e.0 += 1;
                let hosts = (room.replicas as usize).max(room.hosts.len());
                e.1 += hosting_bytes(name, hosts, self.longest_name);
            }
        }
    }

    fn live(&self, h: &Host) -> bool {
        self.by_name
            .get(h.name.as_str())
            .is_some_and(|t| t.id == h.instance)
    }

    /// Live and not draining: a host that counts toward the room's replicas.
    fn serving(&self, h: &Host) -> bool {
        self.by_name
            .get(h.name.as_str())
            .is_some_and(|t| t.id == h.instance && !t.draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TransmitterInfo {
        TransmitterInfo::named(name)
    }

    fn confirm_all(rooms: &mut Rooms, live: &[TransmitterInfo]) {
        for info in live {
            let hosted: Vec<String> = rooms
                .hosting(&info.name)
                .into_iter()
                .map(|p| p.room)
                .collect();
            rooms.announced(info, &hosted);
        }
    }

    fn policy(declared: &[(&str, u32)], allow: bool) -> RoomPolicy {
        RoomPolicy {
            declared: declared.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
            default_replicas: 2,
            allow_undeclared: allow,
        }
    }

    #[test]
    fn a_mesh_has_at_most_max_rooms() {
        let live: Vec<_> = ["a"].map(t).to_vec();
        let one = RoomPolicy {
            default_replicas: 1,
            declared: BTreeMap::from([("vip".to_string(), 1)]),
            ..RoomPolicy::default()
        };
        let mut rooms = Rooms::new("m", one);
        for i in 0..MAX_ROOMS {
            rooms.locate(&format!("r{i}"), &live).unwrap();
        }
        assert!(matches!(
            rooms.locate("one-more", &live),
            Err(PlaceError::Full(_))
        ));
        assert!(
            rooms.locate("r7", &live).is_ok(),
            "known rooms are still located"
        );
        assert!(
            rooms.locate("vip", &live).is_ok(),
            "declared rooms are always placed"
        );
        // A pass over all of them with nothing to do stays cheap and changes nothing.
        confirm_all(&mut rooms, &live);
        assert!(rooms.reconcile(&live).is_empty());
        // Nor can an announcement add rooms past the bound.
        rooms.announced(&live[0], &["adopted".to_string()]);
        assert!(rooms.hosting_of("adopted").is_none());
    }

    #[test]
    fn idle_on_demand_rooms_are_forgotten_declared_ones_never() {
        let live = vec![t("a"), t("b")];
        let mut rooms = Rooms::new("m", policy(&[("keep", 1)], true));
        for room in ["keep", "busy", "idle"] {
            rooms.locate(room, &live).unwrap();
        }
        confirm_all(&mut rooms, &live);
        let after = Duration::from_secs(60);
        let t0 = Instant::now();
        let later = t0 + after + Duration::from_secs(1);
        // A host reports a session in "busy" (by its index in what it announced).
        let announced = rooms
            .hosting("a")
            .into_iter()
            .map(|p| p.room)
            .collect::<Vec<_>>();
        let busy = announced.iter().position(|r| r == "busy").map(|i| i as u32);
        if let Some(i) = busy {
            rooms.active(&announced, &[i], later);
        } else {
            rooms.used("busy", later);
        }
        let (forgotten, told) = rooms.forget_idle(later, after);
        assert_eq!(forgotten, 1);
        assert!(!told.is_empty(), "the hosts of the idle room are told");
        assert!(rooms.hosting_of("idle").is_none());
        assert!(rooms.hosting_of("busy").is_some());
        assert!(
            rooms.hosting_of("keep").is_some(),
            "declared: never forgotten"
        );
        // Its hosts still announce it until told: not adopted again.
        let host = told[0].clone();
        let info = live.iter().find(|i| i.name == host).unwrap();
        rooms.announced(info, &["idle".to_string()]);
        assert!(rooms.hosting_of("idle").is_none());
        // A cell asking for it places it again.
        rooms.locate("idle", &live).unwrap();
        assert!(rooms.hosting_of("idle").is_some());
    }

    #[test]
    fn twelve_rooms_spread_evenly_over_four() {
        let live: Vec<_> = ["a", "b", "c", "d"].map(t).to_vec();
        let mut rooms = Rooms::new("m", RoomPolicy::default());
        for i in 0..12 {
            let (located, assigned) = rooms.locate(&format!("room{i}"), &live).unwrap();
            assert_eq!(assigned.len(), 2);
            assert!(located.hosts.is_empty(), "handed out before confirmation");
        }
        for info in &live {
            assert_eq!(rooms.count(&info.name), 6);
        }
        confirm_all(&mut rooms, &live);
        let (located, assigned) = rooms.locate("room0", &live).unwrap();
        assert!(assigned.is_empty());
        assert_eq!(located.hosts.len(), 2);
    }

    #[test]
    fn busy_counts_message_rate() {
        let mut live: Vec<_> = ["a", "b", "c"].map(t).to_vec();
        live[0].rate = 5000.0;
        let mut rooms = Rooms::new("m", policy(&[("x", 1)], true));
        rooms.locate("one", &live).unwrap(); // b, c
        let (_, assigned) = rooms.locate("x", &live).unwrap();
        // b and c host one room each (busy 1); a is idle of rooms but busy 5.
        assert_eq!(assigned, ["b"]);
    }

    #[test]
    fn undeclared_rooms_follow_the_policy() {
        let live: Vec<_> = ["a", "b", "c"].map(t).to_vec();
        let mut rooms = Rooms::new("m", policy(&[("lobby", 3)], false));
        let (located, assigned) = rooms.locate("lobby", &live).unwrap();
        assert_eq!((located.replicas, assigned.len()), (3, 3));
        assert!(matches!(
            rooms.locate("other", &live),
            Err(PlaceError::Undeclared(..))
        ));
        assert_eq!(rooms.locate("", &live), Err(PlaceError::BadName));
        let mut open = Rooms::new("m", RoomPolicy::default());
        let (located, _) = open.locate("other", &live).unwrap();
        assert_eq!(located.replicas, 2);
    }

    #[test]
    fn dead_or_restarted_hosts_are_replaced() {
        let mut live: Vec<_> = ["a", "b", "c"].map(t).to_vec();
        let mut rooms = Rooms::new("m", RoomPolicy::default());
        rooms.locate("r", &live).unwrap(); // a, b
        confirm_all(&mut rooms, &live);
        // b dies.
        live.remove(1);
        let touched = rooms.reconcile(&live);
        assert_eq!(touched, ["a", "c"]);
        let (located, _) = rooms.locate("r", &live).unwrap();
        assert_eq!(located.hosts, ["a"], "c must confirm first");
        confirm_all(&mut rooms, &live);
        assert_eq!(rooms.locate("r", &live).unwrap().0.hosts, ["a", "c"]);
        // a restarts: a new instance does not host what the old one did.
        live[0].id = Thid::random();
        assert!(rooms.announced(&live[0], &[]));
        assert_eq!(rooms.locate("r", &live).unwrap().0.hosts, ["c"]);
    }

    #[test]
    fn a_late_joiner_takes_new_rooms_first() {
        let mut live: Vec<_> = ["a", "b"].map(t).to_vec();
        let mut rooms = Rooms::new("m", RoomPolicy::default());
        for i in 0..4 {
            rooms.locate(&format!("r{i}"), &live).unwrap();
        }
        live.push(t("c"));
        assert!(rooms.reconcile(&live).is_empty(), "placed rooms stay");
        for i in 4..8 {
            let (_, assigned) = rooms.locate(&format!("r{i}"), &live).unwrap();
            assert!(assigned.contains(&"c".to_string()), "{assigned:?}");
        }
    }

    #[test]
    fn draining_hosts_are_topped_up_and_not_handed_out() {
        let mut live: Vec<_> = ["a", "b", "c"].map(t).to_vec();
        let mut rooms = Rooms::new("m", RoomPolicy::default());
        rooms.locate("r", &live).unwrap();
        confirm_all(&mut rooms, &live);
        live[0].draining = true;
        assert_eq!(rooms.reconcile(&live), ["a", "b", "c"]);
        confirm_all(&mut rooms, &live);
        assert_eq!(rooms.locate("r", &live).unwrap().0.hosts, ["b", "c"]);
    }

    #[test]
    fn a_restarted_rendezvous_adopts_announced_rooms() {
        let live: Vec<_> = ["a", "b"].map(t).to_vec();
        let mut rooms = Rooms::new("m", RoomPolicy::default());
        assert!(rooms.announced(&live[0], &["r".to_string()]));
        let (located, assigned) = rooms.locate("r", &live).unwrap();
        assert_eq!(assigned, ["b"]);
        assert_eq!(located.hosts, ["a"]);
    }

    /// Places rooms of `replicas` named `{i:0>len}` while every one goes to `a` (the
    /// others are far busier); returns how many `a` was given before one went elsewhere.
    fn fill_one_host(rooms: &mut Rooms, live: &[TransmitterInfo], len: usize) -> usize {
        fill_one_host_with(rooms, live, |i| format!("{i:0>len$}"))
    }

    fn fill_one_host_with(
        rooms: &mut Rooms,
        live: &[TransmitterInfo],
        name: impl Fn(usize) -> String,
    ) -> usize {
        for i in 0..10_000 {
            let (_, assigned) = rooms.locate(&name(i), live).unwrap();
            if !assigned.contains(&live[0].name) {
                assert!(!assigned.is_empty(), "placed elsewhere");
                return i;
            }
        }
        panic!("every room went to {}", live[0].name);
    }

    /// The datagrams that carry `host`'s placements: the rendezvous' `hosting`, and its
    /// own announcement listing them (every one with a session), with the longest fields.
    fn datagrams_of(rooms: &Rooms, host: &TransmitterInfo) -> (usize, usize) {
        use thynapse_protocol::discovery::Datagram;
        let placements = rooms.hosting(&host.name);
        let names: Vec<String> = placements.iter().map(|p| p.room.clone()).collect();
        let hosting = Datagram::Hosting {
            mesh: "m".into(),
            rooms: placements,
        };
        let long = "x".repeat(256);
        let announce = Datagram::Announce {
            mesh: "m".into(),
            interval_ms: 500,
            multiplier: 3,
            transmitter: TransmitterInfo {
                command: long.clone(),
                event: long.clone(),
                metrics: long,
                ..host.clone()
            },
            active: (0..names.len() as u32).collect(),
            rooms: names,
            // The longest view there is.
            view: Some("f".repeat(16)),
        };
        (hosting.to_bytes().len(), announce.to_bytes().len())
    }

    #[test]
    fn a_transmitter_is_given_at_most_40_kb_of_placements_then_rooms_go_elsewhere() {
        use thynapse_protocol::discovery::MAX_DATAGRAM;
        for (replicas, name_len) in [(1, MAX_ROOM_NAME), (1, 8), (3, 8)] {
            let mut live: Vec<_> = ["a", "b", "c", "d"].map(t).to_vec();
            for other in &mut live[1..] {
                other.rate = 1e9;
            }
            let one = RoomPolicy {
                default_replicas: replicas,
                ..RoomPolicy::default()
            };
            let mut rooms = Rooms::new("m", one);
            let given = fill_one_host(&mut rooms, &live, name_len);
            let (hosting, announce) = datagrams_of(&rooms, &live[0]);
            assert!(
                hosting <= MAX_DATAGRAM && announce <= MAX_DATAGRAM,
                "{given} rooms: hosting {hosting} bytes, announcement {announce}"
            );
            let placed: usize = rooms
                .hosting("a")
                .iter()
                .map(|p| hosting_bytes(&p.room, p.hosts.len(), 1))
                .sum();
            assert!(placed <= MAX_HOSTING_BYTES, "{placed} bytes of placements");
            let one_more = hosting_bytes(&format!("{given:0>name_len$}"), replicas as usize, 1);
            assert!(
                placed + one_more > MAX_HOSTING_BYTES,
                "given up early: {placed}"
            );
            if name_len == 8 && replicas == 1 {
                assert!(given > 500, "over 500 rooms with short names: {given}");
            }
        }
    }

    #[test]
    fn placements_with_long_transmitter_names_fit_a_hosting_datagram() {
        use thynapse_protocol::discovery::MAX_DATAGRAM;
        // StatefulSet pod names of 63 characters (a DNS label); the rendezvous takes 256.
        let names: Vec<String> = (0..4).map(|i| format!("{i}{}", "t".repeat(62))).collect();
        let mut live: Vec<_> = names.iter().map(|n| t(n)).collect();
        for other in &mut live[3..] {
            other.rate = 1e9;
        }
        let three = RoomPolicy {
            default_replicas: 3,
            ..RoomPolicy::default()
        };
        let mut rooms = Rooms::new("m", three);
        let given = fill_one_host(&mut rooms, &live, 8);
        let (hosting, _) = datagrams_of(&rooms, &live[0]);
        assert!(
            hosting <= MAX_DATAGRAM,
            "{given} rooms: hosting {hosting} bytes"
        );
    }

    #[test]
    fn room_names_json_must_escape_still_fit_a_hosting_datagram() {
        use thynapse_protocol::discovery::MAX_DATAGRAM;
        // A client picks the hash tag: control characters take six bytes each in JSON.
        let mut live: Vec<_> = ["a", "b"].map(t).to_vec();
        live[1].rate = 1e9;
        let one = RoomPolicy {
            default_replicas: 1,
            ..RoomPolicy::default()
        };
        let mut rooms = Rooms::new("m", one);
        let given = fill_one_host_with(&mut rooms, &live, |i| {
            format!("{i:04}{}", "\u{1}".repeat(MAX_ROOM_NAME - 4))
        });
        let (hosting, announce) = datagrams_of(&rooms, &live[0]);
        assert!(
            hosting <= MAX_DATAGRAM && announce <= MAX_DATAGRAM,
            "{given} rooms: hosting {hosting} bytes, announcement {announce}"
        );
    }
}
