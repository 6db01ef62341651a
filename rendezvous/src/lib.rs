//! The rendezvous point of a mesh (glue's unicast rendezvous for routed networks):
//! transmitters announce themselves over UDP at a rate; an announcement lives for
//! `interval × multiplier`; every datagram is answered with the live transmitters.
//!
//! It keeps nothing that announcements cannot rebuild: after a restart it knows every
//! live transmitter again within one announce interval.

pub mod directory;
pub mod metrics;
pub mod placement;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thynapse_protocol::discovery::{
    Datagram, TransmitterInfo, ANNOUNCE_INTERVAL_MS, EXPIRY_MULTIPLIER, MAX_BODY, MAX_DATAGRAM,
};
use thynapse_protocol::seal::{self, Opener, RequestError, Sealer};
use tokio::net::UdpSocket;

pub use crate::directory::{Directory, MAX_TRANSMITTERS};
use crate::metrics::Metrics;
use crate::placement::{RoomPolicy, Rooms};
/// The rendezvous point's flags (the contract every launcher fills: `thynapse_process`).
pub use thynapse_process::RendezvousArgs as Args;
use thynapse_process::{Ready, RendezvousReady, Status};

/// A UDP socket through socket2, so a restarted rendezvous can take its port back at once.
/// Only a given port is bound so: on Linux, sockets that all set `SO_REUSEADDR` and ask for
/// any port (0) may be given the same one, and then one of them gets every datagram sent
/// to it (a transmitter that never heard its answers, one run in ten with sixty of them).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(addr.port() != 0)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The wall clock in milliseconds since the Unix epoch: the time in datagram seals.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sends `request` to each rendezvous point (`udp://host:port`) in turn, waiting up to
/// `wait` for each, and returns the first answer. A point that knows no transmitter yet
/// (just restarted) is not an answer: the next one is asked. With a `sealer` (an
/// authenticated mesh) the request is sealed and only an answer sealed for it is read.
pub async fn ask(
    addresses: &[String],
    request: &Datagram,
    wait: Duration,
    sealer: Option<&Sealer>,
) -> Option<Datagram> {
    let socket = bind_udp("0.0.0.0:0".parse().expect("valid address")).ok()?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let body = request.to_bytes();
    for address in addresses {
        let target = address.trim_start_matches("udp://");
        let Some(target) = tokio::net::lookup_host(target)
            .await
            .ok()
            .and_then(|mut a| a.next())
        else {
            continue;
        };
        // A fresh seal for each point: a point takes a request once.
        let (bytes, mac) = match sealer {
            Some(s) => s.request(&body, wall_ms()),
            None => (body.clone(), String::new()),
        };
        if socket.send_to(&bytes, target).await.is_err() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + wait;
        // Only the point asked answers: a datagram from anywhere else (a late answer of
        // another point, or anyone guessing the port) is not read as one.
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            if from != target {
                continue;
            }
            let body = match sealer {
                None => seal::open(&buf[..n]).0,
                Some(s) => match s.answer(&buf[..n], |re| re == mac) {
                    Ok((body, _)) => body,
                    Err(e) => {
                        // A refusal is not sealed (the point could not open the request):
                        // said, not acted on, as anyone could send it.
                        match Datagram::parse(seal::open(&buf[..n]).0) {
                            Ok(Datagram::Error { error }) => {
                                tracing::warn!(rendezvous = %address, "refused (an unsealed answer): {error}")
                            }
                            _ => tracing::warn!(rendezvous = %address, "an answer not taken: {e}"),
                        }
                        continue;
                    }
                },
            };
            match Datagram::parse(body) {
                Ok(Datagram::Peers { transmitters, .. }) if transmitters.is_empty() => {}
                Ok(answer) => return Some(answer),
                Err(e) => tracing::warn!(rendezvous = %address, "unreadable answer: {e}"),
            }
            break;
        }
    }
    None
}

/// The longest name, endpoint or URL a transmitter may announce: a `peers` answer carries
/// every live transmitter's, so no field may crowd out the others.
pub const MAX_FIELD_BYTES: usize = 256;

/// How long an announcement lives, or why it is refused.
pub fn check_announce(
    interval_ms: u64,
    multiplier: u32,
    t: &TransmitterInfo,
) -> Result<Duration, String> {
    if !ANNOUNCE_INTERVAL_MS.contains(&interval_ms) || !EXPIRY_MULTIPLIER.contains(&multiplier) {
        return Err(format!(
            "announce: interval_ms must be in {ANNOUNCE_INTERVAL_MS:?} and multiplier in {EXPIRY_MULTIPLIER:?}"
        ));
    }
    let fields = [&t.name, &t.command, &t.event, &t.metrics];
    if t.name.is_empty() || fields.iter().any(|f| f.len() > MAX_FIELD_BYTES) {
        return Err(format!(
            "announce: name, command, event and metrics must be at most {MAX_FIELD_BYTES} bytes (and a name given)"
        ));
    }
    Ok(Duration::from_millis(interval_ms * u64::from(multiplier)))
}

/// The live transmitters of `mesh` as `peers` datagrams, written, that each fit in
/// [`MAX_BODY`] (one for a mesh of up to about 150 transmitters; receivers add up the
/// pages). Each transmitter is serialized once, to measure it and to send it.
pub fn peers_pages(mesh: &str, live: &[TransmitterInfo]) -> Vec<Vec<u8>> {
    membership_pages(mesh, live, None, false)
}

/// `peers_pages` in answer to an announcement: each page with the membership's digest.
pub fn membership_pages(
    mesh: &str,
    live: &[TransmitterInfo],
    digest: Option<String>,
    partial: bool,
) -> Vec<Vec<u8>> {
    // `{"type":"peers","mesh":…,"transmitters":[` … `]}`, as serde writes the datagram.
    let empty = Datagram::Peers {
        mesh: mesh.to_string(),
        digest,
        partial,
        transmitters: Vec::new(),
    }
    .to_bytes();
    let head = &empty[..empty.len() - 2];
    let start = || head.to_vec();
    let mut pages = Vec::new();
    let mut page = start();
    for t in live {
        let entry = serde_json::to_vec(t).expect("transmitter infos always serialise");
        let first = page.len() == head.len();
        if !first && page.len() + 1 + entry.len() + 2 > MAX_BODY {
            page.extend_from_slice(b"]}");
            pages.push(std::mem::replace(&mut page, start()));
        } else if !first {
            page.push(b',');
        }
        page.extend_from_slice(&entry);
    }
    page.extend_from_slice(b"]}");
    pages.push(page);
    pages
}

/// The answer to a `query`: the `live` transmitters as `peers` pages, the least busy
/// first (not draining, fewest cells), so that one who reads only the first page (a cell
/// choosing where to join) finds the best candidates there.
pub fn query_pages(mesh: &str, mut live: Vec<TransmitterInfo>) -> Vec<Vec<u8>> {
    live.sort_by_key(|t| (t.draining, t.cells));
    peers_pages(mesh, &live)
}

impl Server {
    /// The membership, answered to an announcement whose last complete view was `view`:
    /// `unchanged` while it holds, what changed since when this point remembers that
    /// view and the change fits one datagram, and every transmitter otherwise.
    fn membership_answer(
        &mut self,
        mesh: &str,
        view: Option<String>,
        digest: String,
        partial: bool,
        now: Instant,
    ) -> Vec<Vec<u8>> {
        let (kind, answer) = match view {
            Some(view) if view == digest => {
                let d = Datagram::Unchanged {
                    mesh: mesh.to_string(),
                    digest,
                    partial,
                };
                ("unchanged", vec![d.to_bytes()])
            }
            Some(view) => match self.dir.changed_since(&view).map(|(left, joined)| {
                Datagram::Changed {
                    mesh: mesh.to_string(),
                    from: view,
                    digest: digest.clone(),
                    partial,
                    left,
                    joined,
                }
                .to_bytes()
            }) {
                Some(d) if d.len() <= MAX_BODY => ("changed", vec![d]),
                _ => (
                    "full",
                    membership_pages(mesh, &self.dir.live(now), Some(digest), partial),
                ),
            },
            None => (
                "full",
                membership_pages(mesh, &self.dir.live(now), Some(digest), partial),
            ),
        };
        self.metrics.answer(kind, &answer);
        answer
    }
}

struct Server {
    mesh: String,
    socket: UdpSocket,
    /// Opens sealed requests and seals what is sent, when the mesh has a token.
    opener: Opener,
    /// Authentication refusals are logged once in 10 s at most (a flood is counted, not logged).
    refusal_said: thynapse_telemetry::Throttle,
    dir: Directory,
    rooms: Rooms,
    idle_rooms: Duration,
    metrics: Metrics,
    started: Instant,
    /// The longest expiry of the announcements taken so far.
    longest_ttl: Duration,
}

impl Server {
    /// Tells each named transmitter the rooms it must host.
    async fn push_hosting(&self, names: &[String]) {
        for name in names {
            if let Some(addr) = self.dir.address(name) {
                let d = Datagram::Hosting {
                    mesh: self.mesh.clone(),
                    rooms: self.rooms.hosting(name),
                };
                let sealed = self.opener.unasked(&d.to_bytes(), wall_ms());
                let _ = self.socket.send_to(&sealed, addr).await;
            }
        }
    }

    async fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let now_ms = wall_ms();
        let mut taken = None;
        let body = if self.opener.enabled() {
            match self.opener.take(bytes, now_ms) {
                Ok(t) => {
                    let body = t.body;
                    taken = Some(t);
                    body
                }
                Err(e) => return self.refuse_unopened(e, from, bytes.len()).await,
            }
        } else {
            seal::open(bytes).0
        };
        let role = taken.as_ref().map(|t| t.role.as_str());
        let mut push = Vec::new();
        let refused = |error: String| {
            tracing::warn!(%from, "{error}");
            vec![Datagram::Error { error }.to_bytes()]
        };
        let replies = match Datagram::parse(body) {
            Ok(Datagram::Announce { transmitter, .. }) if role == Some("cell") => {
                self.metrics.refused("auth");
                refused(format!(
                    "announce of {:?} sealed by a cell: only a transmitter (the mesh key) announces",
                    transmitter.name
                ))
            }
            Ok(Datagram::Announce {
                mesh,
                interval_ms,
                multiplier,
                transmitter,
                rooms,
                active,
                view,
            }) if mesh == self.mesh => 'announce: {
                let ttl = match check_announce(interval_ms, multiplier, &transmitter) {
                    Ok(ttl) => ttl,
                    Err(error) => {
                        self.metrics.refused("announce");
                        break 'announce refused(error);
                    }
                };
                if self.dir.address(&transmitter.name).is_none() {
                    tracing::info!(name = %transmitter.name, command = %transmitter.command, "transmitter joined");
                }
                if !self.dir.announce(transmitter.clone(), from, now, ttl) {
                    self.metrics.refused("transmitters");
                    break 'announce refused(format!(
                        "announce of {:?}: this rendezvous keeps at most {MAX_TRANSMITTERS} transmitters",
                        transmitter.name
                    ));
                }
                self.rooms.announced(&transmitter, &rooms);
                self.rooms.active(&rooms, &active, now);
                let hosting = self.rooms.hosting(&transmitter.name);
                // Until it has been up for the longest expiry announced to it, this point
                // may not have heard every live transmitter: it says so.
                self.longest_ttl = self.longest_ttl.max(ttl);
                let partial = now.duration_since(self.started) < self.longest_ttl;
                let digest = self.dir.digest(now);
                let mut replies = self.membership_answer(&mesh, view, digest, partial, now);
                if !hosting.is_empty() || !rooms.is_empty() {
                    let d = Datagram::Hosting {
                        mesh,
                        rooms: hosting,
                    };
                    replies.push(d.to_bytes());
                }
                replies
            }
            Ok(Datagram::Query { mesh }) if mesh == self.mesh => {
                query_pages(&mesh, self.dir.live(now))
            }
            Ok(Datagram::Locate { mesh, room }) if mesh == self.mesh => {
                let live = self.dir.live(now);
                match self.rooms.locate(&room, &live) {
                    Ok((located, assigned)) => {
                        self.rooms.used(&room, now);
                        if !assigned.is_empty() {
                            tracing::info!(%room, hosts = ?assigned, "room placed");
                            push = self.rooms.hosting_of(&room).unwrap_or_default();
                        }
                        let transmitters = located
                            .hosts
                            .iter()
                            .filter_map(|h| live.iter().find(|t| &t.name == h).cloned())
                            .collect();
                        let d = Datagram::Room {
                            mesh,
                            room,
                            replicas: located.replicas,
                            transmitters,
                        };
                        vec![d.to_bytes()]
                    }
                    Err(e) => {
                        self.metrics.place_error(&e);
                        vec![Datagram::Error {
                            error: e.to_string(),
                        }
                        .to_bytes()]
                    }
                }
            }
            Ok(Datagram::Announce { mesh, .. })
            | Ok(Datagram::Query { mesh })
            | Ok(Datagram::Locate { mesh, .. }) => vec![Datagram::Error {
                error: format!("this rendezvous serves mesh {:?}, not {mesh:?}", self.mesh),
            }
            .to_bytes()],
            Ok(_) => vec![Datagram::Error {
                error: "expected an announce, a query or a locate".into(),
            }
            .to_bytes()],
            Err(e) => {
                self.metrics.refused("malformed");
                refused(format!("bad datagram: {e}"))
            }
        };
        for reply in replies {
            let reply = match &taken {
                Some(t) => t.answer(&reply, now_ms),
                None => reply,
            };
            let _ = self.socket.send_to(&reply, from).await;
        }
        self.push_hosting(&push).await;
    }

    /// A datagram that is not a sealed request of this mesh: counted, and answered with
    /// the reason, unsealed (the sender may hold no key), only when the answer is no
    /// longer than the datagram (the source address may be forged: no amplification).
    async fn refuse_unopened(&mut self, e: RequestError, from: SocketAddr, asked: usize) {
        self.metrics.refused("auth");
        if self.refusal_said.ready(Duration::from_secs(10)) {
            tracing::warn!(%from, "datagram refused: {e} (more within 10 s are only counted)");
        }
        let error = Datagram::Error {
            error: e.to_string(),
        }
        .to_bytes();
        if error.len() <= asked {
            let _ = self.socket.send_to(&error, from).await;
        }
    }

    /// Forgets hosts that stopped announcing and re-places their rooms; forgets the
    /// on-demand rooms idle for `idle_rooms`.
    async fn reconcile(&mut self) {
        let now = Instant::now();
        let (forgotten, idle) = self.rooms.forget_idle(now, self.idle_rooms);
        self.metrics.rooms_forgotten.inc_by(forgotten as u64);
        self.push_hosting(&idle).await;
        let live = self.dir.live(now);
        self.metrics.transmitters.set(live.len() as i64);
        self.metrics.rooms.set(self.rooms.len() as i64);
        let touched = self.rooms.reconcile(&live);
        if !touched.is_empty() {
            tracing::info!(transmitters = ?touched, "rooms re-placed");
            self.push_hosting(&touched).await;
        }
    }
}

/// Serves until the task is dropped. Prints `READY {"address": …}` on stdout once bound.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Before READY is printed: whoever reads READY and seals at once seals after this
    // (a later start time refused the first requests of a fast client as replays).
    let started_ms = wall_ms();
    let tokens = match &args.token_file {
        Some(path) => thynapse_process::read_tokens(path).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!("no --token-file: this rendezvous answers anyone, unsealed");
            Vec::new()
        }
    };
    let socket = bind_udp(args.bind)?;
    let local = socket.local_addr()?;
    let metrics = Metrics::new();
    let metrics_addr =
        thynapse_telemetry::serve_metrics(args.metrics_bind, metrics.registry.clone()).await?;
    Status::Ready(Ready::Rendezvous(RendezvousReady {
        address: format!("udp://{local}"),
        metrics: format!("http://{metrics_addr}/metrics"),
    }))
    .print();
    tracing::info!(mesh = %args.mesh, %local, rooms = args.rooms.len(), "rendezvous listening");
    let policy = RoomPolicy {
        declared: args.rooms.iter().cloned().collect(),
        default_replicas: args.default_replicas.max(1),
        allow_undeclared: !args.forbid_undeclared,
    };
    let mut server = Server {
        opener: Opener::new(&args.mesh, tokens, started_ms),
        refusal_said: Default::default(),
        rooms: Rooms::new(&args.mesh, policy),
        mesh: args.mesh,
        socket,
        dir: Directory::default(),
        idle_rooms: Duration::from_secs(args.forget_idle_rooms_after_seconds),
        metrics,
        started: Instant::now(),
        longest_ttl: Duration::ZERO,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Frequent enough that a room is re-placed well within one announcement expiry.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            got = server.socket.recv_from(&mut buf) => {
                let (n, from) = got?;
                server.on_datagram(&buf[..n], from).await;
            }
            _ = tick.tick() => server.reconcile().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::Thid;

    fn info(name: &str) -> TransmitterInfo {
        TransmitterInfo {
            id: Thid::random(),
            command: "tcp://127.0.0.1:1".into(),
            event: "tcp://127.0.0.1:2".into(),
            ..TransmitterInfo::named(name)
        }
    }

    #[test]
    fn announcements_expire_and_renew() {
        let mut d = Directory::default();
        let t0 = Instant::now();
        let ttl = Duration::from_millis(1500);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        d.announce(info("b"), from, t0, ttl);
        d.announce(info("a"), from, t0, ttl);
        let names = |v: Vec<TransmitterInfo>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(d.live(t0)), ["a", "b"]);
        d.announce(info("a"), from, t0 + Duration::from_millis(1000), ttl);
        assert_eq!(names(d.live(t0 + Duration::from_millis(2000))), ["a"]);
        assert!(d.live(t0 + Duration::from_millis(3000)).is_empty());
    }

    #[test]
    fn announcements_with_long_fields_or_long_lives_are_refused() {
        let ok = info("t-0");
        assert_eq!(check_announce(500, 3, &ok), Ok(Duration::from_millis(1500)));
        assert!(check_announce(u64::MAX, 3, &ok).is_err(), "kept for ever");
        assert!(check_announce(500, u32::MAX, &ok).is_err());
        assert!(check_announce(10, 3, &ok).is_err());
        let mut long = info("t-1");
        long.metrics = "x".repeat(59_000);
        assert!(check_announce(500, 3, &long)
            .unwrap_err()
            .contains("256 bytes"));
        assert!(check_announce(500, 3, &info("")).is_err());
    }

    #[test]
    fn a_large_mesh_is_answered_in_pages_that_each_fit_a_datagram() {
        let mut longest = info(&"n".repeat(MAX_FIELD_BYTES));
        longest.command = "c".repeat(MAX_FIELD_BYTES);
        longest.event = "e".repeat(MAX_FIELD_BYTES);
        longest.metrics = "m".repeat(MAX_FIELD_BYTES);
        let live: Vec<TransmitterInfo> = (0..1000)
            .map(|i| TransmitterInfo {
                name: format!("{i:0>256}"),
                ..longest.clone()
            })
            .collect();
        let pages = peers_pages("mesh", &live);
        assert!(pages.len() > 1);
        let mut names = Vec::new();
        for bytes in pages {
            assert!(bytes.len() <= MAX_BODY, "{} bytes", bytes.len());
            match Datagram::parse(&bytes).unwrap() {
                Datagram::Peers { transmitters, .. } => {
                    names.extend(transmitters.into_iter().map(|t| t.name))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(names.len(), 1000, "every transmitter, once");
        assert_eq!(
            peers_pages("mesh", &[]).len(),
            1,
            "an empty answer is still one"
        );
    }

    #[test]
    fn the_directory_keeps_at_most_its_bound_of_names() {
        let mut d = Directory::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for i in 0..MAX_TRANSMITTERS {
            assert!(d.announce(info(&format!("t-{i}")), from, t0, ttl));
        }
        assert!(!d.announce(info("one-more"), from, t0, ttl));
        assert!(d.announce(info("t-7"), from, t0, ttl), "renewals go on");
        // Once the others expired, a new name is taken.
        assert!(d.announce(info("one-more"), from, t0 + ttl * 2, ttl));
    }

    /// A mesh of `n` transmitters with the longest fields, various loads, some draining.
    fn large_mesh(n: usize) -> Vec<TransmitterInfo> {
        (0..n)
            .map(|i| TransmitterInfo {
                command: "c".repeat(MAX_FIELD_BYTES),
                event: "e".repeat(MAX_FIELD_BYTES),
                metrics: "m".repeat(MAX_FIELD_BYTES),
                cells: (i * 37 % 101) as u32,
                draining: i % 7 == 0,
                ..info(&format!("{i:0>256}"))
            })
            .collect()
    }

    fn transmitters_of(page: &[u8]) -> Vec<TransmitterInfo> {
        match Datagram::parse(page).unwrap() {
            Datagram::Peers { transmitters, .. } => transmitters,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_querys_first_page_holds_the_least_busy_and_the_pages_add_up() {
        let live = large_mesh(400);
        let pages: Vec<Vec<TransmitterInfo>> = query_pages("mesh", live.clone())
            .iter()
            .map(|p| transmitters_of(p))
            .collect();
        assert!(pages.len() > 2, "{} pages", pages.len());
        let busy = |t: &TransmitterInfo| (t.draining, t.cells);
        let first = pages[0].iter().map(busy).max().unwrap();
        let later = pages[1..].iter().flatten().map(busy).min().unwrap();
        assert!(!first.0, "no draining one on the first page");
        assert!(
            first <= later,
            "{first:?} on the first page, {later:?} later"
        );
        let mut names: Vec<String> = pages.into_iter().flatten().map(|t| t.name).collect();
        names.sort();
        let mut all: Vec<String> = live.into_iter().map(|t| t.name).collect();
        all.sort();
        assert_eq!(names, all, "every live transmitter, once");
    }

    #[test]
    fn a_full_page_sealed_for_the_longest_identity_fits_a_datagram() {
        use thynapse_protocol::auth::Key;
        use thynapse_protocol::permissions::Permissions;
        // Globs of quotes and backslashes: the most escaping a seal can meet.
        let mut p = Permissions::default();
        let mut globs: Vec<String> = Vec::new();
        loop {
            globs.push("\"\\\"".into());
            p.publish = Some(globs.clone());
            if p.check().is_err() {
                globs.pop();
                p.publish = Some(globs);
                break;
            }
        }
        let identity = p.identity(&"s".repeat(253));
        let cell = Sealer::cell(Key::service(b"t", &identity), &identity);
        let mut opener = Opener::new("mesh", vec![b"t".to_vec()], 0);
        let (request, _) = cell.request(b"{}", 1_000);
        let taken = opener.take(&request, 1_000).unwrap();
        for page in peers_pages("mesh", &large_mesh(400)) {
            let sealed = taken.answer(&page, 1_000);
            assert!(sealed.len() <= MAX_DATAGRAM, "{} bytes", sealed.len());
        }
    }

    /// A directory that heard `mesh` announce from `from` at `at`.
    fn directory_of(
        mesh: &[TransmitterInfo],
        from: SocketAddr,
        at: Instant,
        ttl: Duration,
    ) -> Directory {
        let mut dir = Directory::default();
        for t in mesh {
            dir.announce(t.clone(), from, at, ttl);
        }
        dir
    }

    #[test]
    fn an_announcers_pages_add_up_to_the_digest_which_follows_the_membership_only() {
        let (t0, ttl) = (Instant::now(), Duration::from_secs(2));
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mesh = large_mesh(400);
        let mut dir = directory_of(&mesh, from, t0, ttl);
        let digest = dir.digest(t0);
        let pages = membership_pages("mesh", &dir.live(t0), Some(digest.clone()), false);
        assert!(pages.len() > 1);
        let mut view = thynapse_protocol::discovery::MembershipView::default();
        let mut complete = None;
        for page in &pages {
            let Ok(Datagram::Peers {
                transmitters,
                digest: Some(d),
                ..
            }) = Datagram::parse(page)
            else {
                panic!("a page with its digest")
            };
            complete = view.on_page(&d, &transmitters).map(|n| n.len());
        }
        assert_eq!(complete, Some(400), "the last page completes the view");
        // A renewal, or a change of load, leaves it; a new instance, or an expiry, not.
        let t1 = t0 + Duration::from_secs(1);
        let mut busy = mesh[0].clone();
        busy.cells += 10;
        dir.announce(busy.clone(), from, t1, ttl);
        assert_eq!(dir.digest(t1), digest);
        busy.id = Thid::random();
        dir.announce(busy, from, t1, ttl);
        let restarted = dir.digest(t1);
        assert_ne!(restarted, digest);
        let t2 = t0 + Duration::from_millis(2500);
        assert_ne!(dir.digest(t2), restarted, "all but one expired");
        assert_eq!(dir.live(t2).len(), 1);
    }

    #[test]
    fn a_view_a_point_remembers_is_answered_with_what_changed_since_and_makes_the_digest() {
        let (t0, ttl) = (Instant::now(), Duration::from_secs(2));
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mesh = large_mesh(300);
        let mut dir = directory_of(&mesh, from, t0, ttl);
        let first = dir.digest(t0);
        let mut view = thynapse_protocol::discovery::MembershipView::default();
        view.on_page(&first, &dir.live(t0)).unwrap();
        assert_eq!(dir.changed_since(&first), None, "nothing changed yet");
        // One joins, one restarts; at the next announcements another expires.
        let t1 = t0 + Duration::from_secs(1);
        for (i, t) in mesh.iter().enumerate().skip(1) {
            let mut t = t.clone();
            if i == 7 {
                t.id = Thid::random();
            }
            dir.announce(t, from, t1, ttl);
        }
        dir.announce(info("new"), from, t1, ttl);
        let second = dir.digest(t1);
        let t2 = t0 + Duration::from_millis(2500);
        let third = dir.digest(t2);
        assert_ne!(second, third, "the first one expired");
        // Two changes behind: both in one answer, three names instead of 300.
        let (left, joined) = dir.changed_since(&first).unwrap();
        assert_eq!(left, [mesh[0].name.clone()]);
        let mut names: Vec<&str> = joined.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(names, [mesh[7].name.as_str(), "new"]);
        assert_eq!(
            view.on_changed(&first, &third, &left, &joined)
                .map(<[String]>::len),
            Some(300)
        );
        assert_eq!(view.digest.as_deref(), Some(third.as_str()));
        // One change behind, from the second view.
        let (left, joined) = dir.changed_since(&second).unwrap();
        assert_eq!((left.len(), joined.len()), (1, 0));
        assert_eq!(dir.changed_since("never seen"), None, "answered in full");
    }

    #[tokio::test]
    async fn sockets_bound_to_any_port_each_get_their_own() {
        // With SO_REUSEADDR on each, Linux gave about 6 pairs of 600 the same port (600:
        // within the 1,024 files a process may hold by default, beside other tests).
        let sockets: Vec<UdpSocket> = (0..600)
            .map(|_| bind_udp("0.0.0.0:0".parse().unwrap()).unwrap())
            .collect();
        let ports: std::collections::HashSet<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), sockets.len());
    }

    #[tokio::test]
    async fn a_cell_asking_reads_only_the_first_page() {
        let point = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = format!("udp://{}", point.local_addr().unwrap());
        let pages = query_pages("mesh", large_mesh(400));
        let first = transmitters_of(&pages[0]);
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let (_, from) = point.recv_from(&mut buf).await.unwrap();
            for page in pages {
                point.send_to(&page, from).await.unwrap();
            }
        });
        let query = Datagram::Query {
            mesh: "mesh".into(),
        };
        let answer = ask(&[address], &query, Duration::from_secs(5), None).await;
        match answer {
            Some(Datagram::Peers { transmitters, .. }) => assert_eq!(transmitters, first),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn only_the_point_asked_is_read_as_the_answer() {
        let point = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let stranger = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = format!("udp://{}", point.local_addr().unwrap());
        let genuine = query_pages("mesh", large_mesh(3));
        let expected = transmitters_of(&genuine[0]);
        let forged = query_pages(
            "mesh",
            vec![TransmitterInfo {
                name: "forged".into(),
                ..large_mesh(1)[0].clone()
            }],
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let (_, asker) = point.recv_from(&mut buf).await.unwrap();
            // Anyone who learns the asker's port answers first; then the point.
            stranger.send_to(&forged[0], asker).await.unwrap();
            point.send_to(&genuine[0], asker).await.unwrap();
        });
        let query = Datagram::Query {
            mesh: "mesh".into(),
        };
        match ask(&[address], &query, Duration::from_secs(5), None).await {
            Some(Datagram::Peers { transmitters, .. }) => assert_eq!(transmitters, expected),
            other => panic!("{other:?}"),
        }
    }
}
