//! The rendezvous point of a mesh (glue's unicast rendezvous for routed networks):
//! transmitters announce themselves over UDP at a rate; an announcement lives for
//! `interval × multiplier`; every datagram is answered with the live transmitters.
//!
//! It keeps nothing that announcements cannot rebuild: after a restart it knows every
//! live transmitter again within one announce interval.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thynapse_protocol::discovery::{Datagram, TransmitterInfo, MAX_DATAGRAM};
use tokio::net::UdpSocket;

/// The live transmitters of one mesh. Pure: time is passed in.
#[derive(Default)]
pub struct Directory {
    entries: HashMap<String, (TransmitterInfo, Instant)>,
}

impl Directory {
    pub fn announce(&mut self, info: TransmitterInfo, now: Instant, ttl: Duration) {
        self.entries.insert(info.name.clone(), (info, now + ttl));
    }

    /// Live transmitters by name, forgetting expired ones.
    pub fn live(&mut self, now: Instant) -> Vec<TransmitterInfo> {
        self.entries.retain(|_, (_, expires)| *expires > now);
        let mut out: Vec<_> = self.entries.values().map(|(i, _)| i.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Mesh served; datagrams for other meshes get an error.
    #[arg(long)]
    pub mesh: String,
    /// UDP address to bind (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind: SocketAddr,
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

/// Serves until the task is dropped. Prints `READY {"address": …}` on stdout once bound.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let socket = bind_udp(args.bind)?;
    let local = socket.local_addr()?;
    println!(
        "READY {}",
        serde_json::json!({ "address": format!("udp://{local}") })
    );
    tracing::info!(mesh = %args.mesh, %local, "rendezvous listening");
    let mut dir = Directory::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let now = Instant::now();
        let reply = match Datagram::parse(&buf[..n]) {
            Ok(Datagram::Announce {
                mesh,
                interval_ms,
                multiplier,
                transmitter,
            }) if mesh == args.mesh => {
                let ttl = Duration::from_millis(interval_ms.max(1) * multiplier.max(1) as u64);
                if !dir.entries.contains_key(&transmitter.name) {
                    tracing::info!(name = %transmitter.name, command = %transmitter.command, "transmitter joined");
                }
                dir.announce(transmitter, now, ttl);
                Datagram::Peers {
                    mesh,
                    transmitters: dir.live(now),
                }
            }
            Ok(Datagram::Query { mesh }) if mesh == args.mesh => Datagram::Peers {
                mesh,
                transmitters: dir.live(now),
            },
            Ok(Datagram::Announce { mesh, .. }) | Ok(Datagram::Query { mesh }) => Datagram::Error {
                error: format!("this rendezvous serves mesh {:?}, not {mesh:?}", args.mesh),
            },
            Ok(_) => Datagram::Error {
                error: "expected an announce or a query".into(),
            },
            Err(e) => {
                tracing::warn!(%from, "bad datagram: {e}");
                Datagram::Error {
                    error: format!("bad datagram: {e}"),
                }
            }
        };
        let _ = socket.send_to(&reply.to_bytes(), from).await;
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
        }
    }

    #[test]
    fn announcements_expire_and_renew() {
        let mut d = Directory::default();
        let t0 = Instant::now();
        let ttl = Duration::from_millis(1500);
        d.announce(info("b"), t0, ttl);
        d.announce(info("a"), t0, ttl);
        let names = |v: Vec<TransmitterInfo>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(d.live(t0)), ["a", "b"]);
        d.announce(info("a"), t0 + Duration::from_millis(1000), ttl);
        assert_eq!(names(d.live(t0 + Duration::from_millis(2000))), ["a"]);
        assert!(d.live(t0 + Duration::from_millis(3000)).is_empty());
    }
}
