//! Finding and opening a session's link, in a task of its own (a rendezvous round trip,
//! perhaps a room placement, a TCP connect), so the hub keeps delivering meanwhile. The
//! task reports back as a [`LinkEvent`]; the reader it starts relays every message.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use thynapse_link::LinkSender;
use thynapse_protocol::auth::{ClientAuth, Key};
use thynapse_protocol::discovery::{Datagram, TransmitterInfo};
use thynapse_protocol::limits::wire_limit;
use thynapse_protocol::seal::Sealer;
use thynapse_protocol::Thid;
use tokio::sync::mpsc;
use zeromq::{DealerSocket, Socket, SocketOptions, ZmqMessage};

use super::SessionKey;

/// What link tasks tell the hub.
pub enum LinkEvent {
    /// The rendezvous placed the room (hosts confirmed); a connect follows.
    Admitted(SessionKey, u64),
    Connected {
        key: SessionKey,
        generation: u64,
        name: String,
        sender: LinkSender,
    },
    /// No link this time. `refused` is the rendezvous' reason when it will not place the
    /// room; `avoid` a transmitter that did not answer.
    Failed {
        key: SessionKey,
        generation: u64,
        refused: Option<String>,
        avoid: Option<String>,
    },
    Message(SessionKey, u64, ZmqMessage),
    Closed(SessionKey, u64),
}

/// Everything a connect task needs, copied out of the hub.
pub struct ConnectPlan {
    pub key: SessionKey,
    pub generation: u64,
    pub mesh: String,
    pub rendezvous: Vec<String>,
    pub heartbeat: Duration,
    pub expiry: Duration,
    pub avoid: Vec<String>,
    /// Mesh session only: the transmitter to join, and whether to wait for it.
    pub prefer: Option<String>,
    pub wait_for_preferred: bool,
    /// Spreads the cells of a room over its hosts.
    pub spread: u64,
    pub max_message_bytes: usize,
    /// The Service key and the identity (Service and permissions) every link proves, when
    /// the mesh is authenticated.
    pub auth: Option<(Key, String)>,
    /// Whether the link asks to be encrypted (with `auth` only).
    pub encrypt: bool,
}

/// Finds a transmitter for the session and opens a DEALER to it; the reader it starts
/// relays every message to the hub until the link closes.
pub async fn connect(plan: ConnectPlan, events: mpsc::Sender<LinkEvent>) {
    let key = plan.key.clone();
    let generation = plan.generation;
    let target = match &plan.key {
        None => choose_for_mesh(&plan).await,
        Some(room) => choose_for_room(&plan, room, &events).await,
    };
    let target = match target {
        Ok(t) => t,
        Err(refused) => {
            let _ = events
                .send(LinkEvent::Failed {
                    key,
                    generation,
                    refused,
                    avoid: None,
                })
                .await;
            return;
        }
    };
    let mut options = SocketOptions::default();
    options.connect_timeout(plan.heartbeat);
    // A transmitter (or anything posing as one) sending more is disconnected before
    // anything is reserved for it (vendor/zeromq/PATCHED.md).
    options
        .max_message_size(wire_limit(plan.max_message_bytes))
        .count_oversized(WIRE_OVERSIZED.clone());
    let mut socket = DealerSocket::with_options(options);
    let mut connected = socket
        .connect(&target.command)
        .await
        .map(|()| None)
        .map_err(anyhow::Error::from);
    if let (Ok(_), Some((key, identity))) = (&connected, &plan.auth) {
        let wait = plan.heartbeat * 4;
        let auth = ClientAuth::cell(key.clone(), identity, &target.command).encrypted(plan.encrypt);
        connected = thynapse_link::authenticate(&mut socket, auth, wait).await;
    }
    let channel = match connected {
        Ok(channel) => channel,
        Err(e) => {
            tracing::warn!(transmitter = %target.name, "connect failed: {e:#}");
            let _ = events
                .send(LinkEvent::Failed {
                    key,
                    generation,
                    refused: None,
                    avoid: Some(target.name),
                })
                .await;
            return;
        }
    };
    let (sender, mut receiver) = thynapse_link::split(socket, channel);
    let reader_events = events.clone();
    let reader_key = key.clone();
    tokio::spawn(async move {
        loop {
            match receiver.recv().await {
                Ok(m) => {
                    let ev = LinkEvent::Message(reader_key.clone(), generation, m);
                    if reader_events.send(ev).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(room = ?reader_key, "link closed: {e:#}");
                    let _ = reader_events
                        .send(LinkEvent::Closed(reader_key, generation))
                        .await;
                    return;
                }
            }
        }
    });
    let _ = events
        .send(LinkEvent::Connected {
            key,
            generation,
            name: target.name,
            sender,
        })
        .await;
}

/// The mesh session joins the preferred transmitter when it is live, else the one with
/// the fewest cells, avoiding the one it just left when it can.
async fn choose_for_mesh(plan: &ConnectPlan) -> Result<TransmitterInfo, Option<String>> {
    let Some(Datagram::Peers { transmitters, .. }) = ask_rendezvous(
        plan,
        &Datagram::Query {
            mesh: plan.mesh.clone(),
        },
    )
    .await
    else {
        return Err(None);
    };
    if let Some(prefer) = &plan.prefer {
        // At start-up, give the preferred transmitter one expiry to show up, so cells
        // spread as planned instead of all joining the first one announced.
        if plan.wait_for_preferred && !transmitters.iter().any(|t| &t.name == prefer) {
            return Err(None);
        }
    }
    let candidates: Vec<&TransmitterInfo> = transmitters.iter().filter(|t| !t.draining).collect();
    let fresh: Vec<&TransmitterInfo> = candidates
        .iter()
        .copied()
        .filter(|t| !plan.avoid.contains(&t.name))
        .collect();
    let pool = if fresh.is_empty() { candidates } else { fresh };
    plan.prefer
        .as_ref()
        .and_then(|p| pool.iter().find(|t| &t.name == p))
        .or_else(|| pool.iter().min_by_key(|t| (t.cells, t.name.clone())))
        .map(|t| (*t).clone())
        .ok_or(None)
}

/// A room session asks the rendezvous where the room lives (placing it when new), waits
/// for confirmed hosts, and picks one of them by this cell's spread value.
async fn choose_for_room(
    plan: &ConnectPlan,
    room: &Bytes,
    events: &mpsc::Sender<LinkEvent>,
) -> Result<TransmitterInfo, Option<String>> {
    let Ok(room) = std::str::from_utf8(room) else {
        return Err(Some("room names must be UTF-8".into()));
    };
    let locate = Datagram::Locate {
        mesh: plan.mesh.clone(),
        room: room.to_string(),
    };
    let deadline = Instant::now() + plan.expiry * 2;
    let mut pauses = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(5))
        .with_max_delay(plan.heartbeat / 2)
        .without_max_times()
        .build();
    loop {
        match ask_rendezvous(plan, &locate).await {
            Some(Datagram::Room { transmitters, .. }) if !transmitters.is_empty() => {
                let _ = events
                    .send(LinkEvent::Admitted(plan.key.clone(), plan.generation))
                    .await;
                return Ok(room_host(&transmitters, &plan.avoid, plan.spread).clone());
            }
            Some(Datagram::Error { error }) => return Err(Some(error)),
            // Being placed: the chosen hosts have not confirmed yet.
            _ => {}
        }
        let pause = pauses.next().unwrap_or(plan.heartbeat / 2);
        if Instant::now() + pause > deadline {
            return Err(None);
        }
        tokio::time::sleep(pause).await;
    }
}

/// This cell's spread value for session `key`: a hash of the cell and the room, so that a
/// room's cells spread over its hosts, and a cell keeps to the same one.
pub fn spread(cell: &Thid, key: &SessionKey) -> u64 {
    let mix = Thid::of_parts(&[&cell.0, key.as_deref().unwrap_or_default()]);
    u64::from_le_bytes(mix.0[..8].try_into().expect("8 bytes"))
}

/// The host of a room a session links to, by its `spread`: among those not to `avoid`
/// (all of them when every one is). `hosts` is not empty.
fn room_host<'a>(
    hosts: &'a [TransmitterInfo],
    avoid: &[String],
    spread: u64,
) -> &'a TransmitterInfo {
    let fresh: Vec<&TransmitterInfo> = hosts.iter().filter(|t| !avoid.contains(&t.name)).collect();
    let pool: Vec<&TransmitterInfo> = if fresh.is_empty() {
        hosts.iter().collect()
    } else {
        fresh
    };
    pool[(spread % pool.len() as u64) as usize]
}

async fn ask_rendezvous(plan: &ConnectPlan, request: &Datagram) -> Option<Datagram> {
    let sealer = plan
        .auth
        .as_ref()
        .map(|(key, identity)| Sealer::cell(key.clone(), identity));
    thynapse_rendezvous::ask(&plan.rendezvous, request, plan.heartbeat, sealer.as_ref()).await
}

/// Messages from transmitters refused for the wire limit (each disconnects its link),
/// moved to `refused_total{limit="wire_message_bytes"}` at each heartbeat.
pub(crate) static WIRE_OVERSIZED: std::sync::LazyLock<
    std::sync::Arc<std::sync::atomic::AtomicU64>,
> = std::sync::LazyLock::new(Default::default);

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> TransmitterInfo {
        TransmitterInfo::named(name)
    }

    #[test]
    fn a_rooms_cells_spread_over_its_hosts_and_each_keeps_to_one() {
        let hosts = ["a", "b", "c"].map(host);
        let lobby: SessionKey = Some(Bytes::from_static(b"lobby"));
        let mut per_host = std::collections::HashMap::new();
        for i in 0..60 {
            let cell = Thid::of(format!("cell-{i}").as_bytes());
            let pick = &room_host(&hosts, &[], spread(&cell, &lobby)).name;
            *per_host.entry(pick.clone()).or_insert(0) += 1;
            // Whenever it links again (a restart of the link, not of the cell).
            for _ in 0..3 {
                assert_eq!(&room_host(&hosts, &[], spread(&cell, &lobby)).name, pick);
            }
        }
        assert_eq!(per_host.len(), 3, "{per_host:?}");
        assert!(per_host.values().all(|&n| n >= 10), "{per_host:?}");
        // One cell's rooms spread too: the room is part of the hash.
        let cell = Thid::of(b"one cell");
        let picks: std::collections::HashSet<String> = (0..30)
            .map(|i| {
                let room: SessionKey = Some(Bytes::from(format!("room-{i}")));
                room_host(&hosts, &[], spread(&cell, &room)).name.clone()
            })
            .collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn a_room_host_to_avoid_is_avoided_unless_it_is_the_only_one() {
        let hosts = ["a", "b"].map(host);
        for i in 0..20u64 {
            assert_eq!(room_host(&hosts, &["a".into()], i).name, "b");
            assert_eq!(room_host(&hosts[..1], &["a".into()], i).name, "a");
        }
    }
}
