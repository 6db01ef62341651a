//! The rendezvous point of a mesh (glue's unicast rendezvous for routed networks):
//! transmitters announce themselves over UDP at a rate; an announcement lives for
//! `interval × multiplier`; every datagram is answered with the live transmitters.
//!
//! It keeps nothing that announcements cannot rebuild: after a restart it knows every
//! live transmitter again within one announce interval.

pub mod placement;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thynapse_protocol::discovery::{Datagram, TransmitterInfo, MAX_DATAGRAM};
use tokio::net::UdpSocket;

use crate::placement::{RoomPolicy, Rooms};
/// The rendezvous point's flags (the contract every launcher fills: `thynapse_process`).
pub use thynapse_process::RendezvousArgs as Args;
use thynapse_process::{Ready, RendezvousReady, Status};

/// The live transmitters of one mesh, and where each announces from. Pure: time is
/// passed in.
#[derive(Default)]
pub struct Directory {
    entries: HashMap<String, (TransmitterInfo, Instant, SocketAddr)>,
}

impl Directory {
    pub fn announce(
        &mut self,
        info: TransmitterInfo,
        from: SocketAddr,
        now: Instant,
        ttl: Duration,
    ) {
        self.entries
            .insert(info.name.clone(), (info, now + ttl, from));
    }

    /// Live transmitters by name, forgetting expired ones.
    pub fn live(&mut self, now: Instant) -> Vec<TransmitterInfo> {
        self.entries.retain(|_, (_, expires, _)| *expires > now);
        let mut out: Vec<_> = self.entries.values().map(|(i, _, _)| i.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The address a transmitter announces from: where its `hosting` datagrams go.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.entries.get(name).map(|(_, _, a)| *a)
    }
}

/// A UDP socket through socket2, so a restarted rendezvous can take its port back at once.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Sends `request` to each rendezvous point (`udp://host:port`) in turn, waiting up to
/// `wait` for each, and returns the first answer. A point that knows no transmitter yet
/// (just restarted) is not an answer: the next one is asked.
pub async fn ask(addresses: &[String], request: &Datagram, wait: Duration) -> Option<Datagram> {
    let socket = bind_udp("0.0.0.0:0".parse().expect("valid address")).ok()?;
    let bytes = request.to_bytes();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    for address in addresses {
        let target = address.trim_start_matches("udp://");
        if socket.send_to(&bytes, target).await.is_err() {
            continue;
        }
        if let Ok(Ok((n, _))) = tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
            match Datagram::parse(&buf[..n]) {
                Ok(Datagram::Peers { transmitters, .. }) if transmitters.is_empty() => {}
                Ok(answer) => return Some(answer),
                Err(e) => tracing::warn!(rendezvous = %address, "unreadable answer: {e}"),
            }
        }
    }
    None
}

struct Server {
    mesh: String,
    socket: UdpSocket,
    dir: Directory,
    rooms: Rooms,
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
                let _ = self.socket.send_to(&d.to_bytes(), addr).await;
            }
        }
    }

    async fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let mut push = Vec::new();
        let replies = match Datagram::parse(bytes) {
            Ok(Datagram::Announce {
                mesh,
                interval_ms,
                multiplier,
                transmitter,
                rooms,
            }) if mesh == self.mesh => {
                let ttl = Duration::from_millis(interval_ms.max(1) * multiplier.max(1) as u64);
                if self.dir.address(&transmitter.name).is_none() {
                    tracing::info!(name = %transmitter.name, command = %transmitter.command, "transmitter joined");
                }
                let name = transmitter.name.clone();
                self.rooms.announced(&transmitter, &rooms);
                self.dir.announce(transmitter, from, now, ttl);
                let hosting = self.rooms.hosting(&name);
                let mut replies = vec![Datagram::Peers {
                    mesh: mesh.clone(),
                    transmitters: self.dir.live(now),
                }];
                if !hosting.is_empty() || !rooms.is_empty() {
                    replies.push(Datagram::Hosting {
                        mesh,
                        rooms: hosting,
                    });
                }
                replies
            }
            Ok(Datagram::Query { mesh }) if mesh == self.mesh => vec![Datagram::Peers {
                mesh,
                transmitters: self.dir.live(now),
            }],
            Ok(Datagram::Locate { mesh, room }) if mesh == self.mesh => {
                let live = self.dir.live(now);
                match self.rooms.locate(&room, &live) {
                    Ok((located, assigned)) => {
                        if !assigned.is_empty() {
                            tracing::info!(%room, hosts = ?assigned, "room placed");
                            push = self.rooms.hosting_of(&room).unwrap_or_default();
                        }
                        let transmitters = located
                            .hosts
                            .iter()
                            .filter_map(|h| live.iter().find(|t| &t.name == h).cloned())
                            .collect();
                        vec![Datagram::Room {
                            mesh,
                            room,
                            replicas: located.replicas,
                            transmitters,
                        }]
                    }
                    Err(e) => vec![Datagram::Error {
                        error: e.to_string(),
                    }],
                }
            }
            Ok(Datagram::Announce { mesh, .. })
            | Ok(Datagram::Query { mesh })
            | Ok(Datagram::Locate { mesh, .. }) => vec![Datagram::Error {
                error: format!("this rendezvous serves mesh {:?}, not {mesh:?}", self.mesh),
            }],
            Ok(_) => vec![Datagram::Error {
                error: "expected an announce, a query or a locate".into(),
            }],
            Err(e) => {
                tracing::warn!(%from, "bad datagram: {e}");
                vec![Datagram::Error {
                    error: format!("bad datagram: {e}"),
                }]
            }
        };
        for reply in replies {
            let _ = self.socket.send_to(&reply.to_bytes(), from).await;
        }
        self.push_hosting(&push).await;
    }

    /// Forgets hosts that stopped announcing and re-places their rooms.
    async fn reconcile(&mut self) {
        let live = self.dir.live(Instant::now());
        let touched = self.rooms.reconcile(&live);
        if !touched.is_empty() {
            tracing::info!(transmitters = ?touched, "rooms re-placed");
            self.push_hosting(&touched).await;
        }
    }
}

/// Serves until the task is dropped. Prints `READY {"address": …}` on stdout once bound.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let socket = bind_udp(args.bind)?;
    let local = socket.local_addr()?;
    Status::Ready(Ready::Rendezvous(RendezvousReady {
        address: format!("udp://{local}"),
    }))
    .print();
    tracing::info!(mesh = %args.mesh, %local, rooms = args.rooms.len(), "rendezvous listening");
    let policy = RoomPolicy {
        declared: args.rooms.iter().cloned().collect(),
        default_replicas: args.default_replicas.max(1),
        allow_undeclared: !args.forbid_undeclared,
    };
    let mut server = Server {
        rooms: Rooms::new(&args.mesh, policy),
        mesh: args.mesh,
        socket,
        dir: Directory::default(),
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
            name: name.into(),
            id: Thid::random(),
            command: "tcp://127.0.0.1:1".into(),
            event: "tcp://127.0.0.1:2".into(),
            metrics: String::new(),
            cells: 0,
            rate: 0.0,
            draining: false,
            rooms: 0,
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
}
