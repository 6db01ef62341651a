//! A session is one stream of this cell into the mesh, with its own link to a
//! transmitter, its own sequence numbers and its own publishes awaiting acknowledgement:
//! the mesh session (SUBSCRIBE, PSUBSCRIBE, PUBLISH) on the transmitter the cell joined,
//! and one session per room in use (SSUBSCRIBE, SPUBLISH) on a transmitter hosting that
//! room, as hubsub clients talk to a room's servers directly.
//!
//! Finding and opening a link runs in its own task (a rendezvous round trip, perhaps a
//! room placement, a TCP connect), so the hub keeps delivering meanwhile; the task
//! reports back as a [`LinkEvent`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thynapse_protocol::discovery::{Datagram, TransmitterInfo};
use thynapse_protocol::wire::{Interest, Op};
use thynapse_protocol::Thid;
use tokio::sync::{mpsc, oneshot};
use zeromq::{DealerSendHalf, DealerSocket, Socket, SocketOptions, SocketRecv, ZmqMessage};

use crate::hub::ClientId;

/// Which session: the mesh (`None`) or a room.
pub type SessionKey = Option<Bytes>;

pub struct Unacked {
    pub seq: u64,
    pub client: ClientId,
    pub token: u64,
    pub ts: u64,
    pub channel: Bytes,
    pub payload: Bytes,
}

pub struct Link {
    pub generation: u64,
    pub name: String,
    pub sender: DealerSendHalf,
    pub last_heard: Instant,
    /// Highest DLVR batch received and not yet credited.
    pub credit: Option<u64>,
    /// HELO and the subscription snapshot, sent first at the next flush.
    pub greeting: Vec<ZmqMessage>,
}

pub struct Session {
    /// The HELO id, and the origin receivers deduplicate this session's messages by.
    pub id: Thid,
    pub room: Option<String>,
    pub next_seq: u64,
    pub unacked: VecDeque<Unacked>,
    pub unacked_bytes: usize,
    /// Index into `unacked` of the first message not yet sent on the current link.
    pub unsent_from: usize,
    /// Subscription changes for the transmitter, sent at the next flush.
    pub interest: Vec<(Op, Interest, Bytes)>,
    pub link: Option<Link>,
    /// The previous link while moving: still read for a while, then closed.
    pub old_link: Option<(Link, Instant)>,
    /// Generation of the connect task in flight, if any.
    pub connecting: Option<u64>,
    pub avoid: Vec<String>,
    /// The rendezvous has placed the room (always true for the mesh session).
    pub admitted: bool,
    /// SSUBSCRIBEs waiting to hear whether the room may be used.
    pub waiting: Vec<oneshot::Sender<Result<(), String>>>,
    pub last_used: Instant,
}

impl Session {
    pub fn new(id: Thid, room: Option<String>) -> Self {
        Session {
            id,
            admitted: room.is_none(),
            room,
            next_seq: 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            unsent_from: 0,
            interest: Vec::new(),
            link: None,
            old_link: None,
            connecting: None,
            avoid: Vec::new(),
            waiting: Vec::new(),
            last_used: Instant::now(),
        }
    }

    /// Tells the SSUBSCRIBEs waiting on this room whether they may go ahead.
    pub fn admit(&mut self, verdict: Result<(), String>) {
        if verdict.is_ok() {
            self.admitted = true;
        }
        for w in self.waiting.drain(..) {
            let _ = w.send(verdict.clone());
        }
    }
}

/// What link tasks tell the hub.
pub enum LinkEvent {
    /// The rendezvous placed the room (hosts confirmed); a connect follows.
    Admitted(SessionKey, u64),
    Connected {
        key: SessionKey,
        generation: u64,
        name: String,
        sender: DealerSendHalf,
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
    let mut socket = DealerSocket::with_options(options);
    if let Err(e) = socket.connect(&target.command).await {
        tracing::warn!(transmitter = %target.name, "connect failed: {e}");
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
    let (sender, mut receiver) = socket.split();
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
                Err(_) => {
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
    let mut pause = Duration::from_millis(5);
    loop {
        match ask_rendezvous(plan, &locate).await {
            Some(Datagram::Room { transmitters, .. }) if !transmitters.is_empty() => {
                let _ = events
                    .send(LinkEvent::Admitted(plan.key.clone(), plan.generation))
                    .await;
                let fresh: Vec<&TransmitterInfo> = transmitters
                    .iter()
                    .filter(|t| !plan.avoid.contains(&t.name))
                    .collect();
                let pool: Vec<&TransmitterInfo> = if fresh.is_empty() {
                    transmitters.iter().collect()
                } else {
                    fresh
                };
                let pick = pool[(plan.spread % pool.len() as u64) as usize];
                return Ok(pick.clone());
            }
            Some(Datagram::Error { error }) => return Err(Some(error)),
            // Being placed: the chosen hosts have not confirmed yet.
            _ => {}
        }
        if Instant::now() + pause > deadline {
            return Err(None);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(plan.heartbeat / 2);
    }
}

async fn ask_rendezvous(plan: &ConnectPlan, request: &Datagram) -> Option<Datagram> {
    thynapse_rendezvous::ask(&plan.rendezvous, request, plan.heartbeat).await
}
