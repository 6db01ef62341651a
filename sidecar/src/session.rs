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

use bytes::{Bytes, BytesMut};
use thynapse_protocol::batch::{put_publish, Publish};
use thynapse_protocol::discovery::{Datagram, TransmitterInfo};
use thynapse_protocol::wire::{Interest, Op};
use thynapse_protocol::Thid;
use tokio::sync::{mpsc, oneshot};
use zeromq::{DealerSendHalf, DealerSocket, Socket, SocketOptions, SocketRecv, ZmqMessage};

use crate::api::ClientId;
use crate::confirm::Confirmations;

/// Which session: the mesh (`None`) or a room.
pub type SessionKey = Option<Bytes>;

/// Who to answer for a run of consecutive publishes: a client, the token (reply slot) of
/// the first, and how many.
pub type Replies = (ClientId, u64, u32);

fn push_reply(replies: &mut Vec<Replies>, client: ClientId, token: u64, n: u32) {
    match replies.last_mut() {
        Some((c, first, count)) if *c == client && *first + u64::from(*count) == token => {
            *count += n
        }
        _ => replies.push((client, token, n)),
    }
}

/// Publishes not sent yet, gathered for the session's next `PUBS` batch: the records as
/// the clients' connections encoded them (no copy here), and those queued one by one.
#[derive(Default)]
struct Open {
    parts: Vec<Bytes>,
    tail: BytesMut,
    count: usize,
    bytes: usize,
    replies: Vec<Replies>,
}

impl Open {
    /// Ends the part being written one by one, if any.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.parts.push(self.tail.split().freeze());
        }
    }

    fn push_part(&mut self, records: Bytes) {
        self.seal_tail();
        self.parts.push(records);
    }
}

/// One `PUBS` batch, kept as sent until the transmitter acknowledges it: a session that
/// moves sends its unacknowledged batches again as they are (receivers drop the copies by
/// origin and sequence). On the wire it is a multipart body: `first_seq`, then the parts.
pub struct Unacked {
    pub first_seq: u64,
    pub count: usize,
    /// The records' bytes, as counted against the hub's window.
    pub bytes: usize,
    pub parts: Vec<Bytes>,
    pub replies: Vec<Replies>,
    /// Answered; it leaves the window when every earlier batch has too.
    pub acked: bool,
}

/// Frames beyond this many messages are closed and a new one started.
const MAX_PUBS_BATCH: usize = 1024;

pub struct Link {
    pub generation: u64,
    pub name: String,
    pub sender: DealerSendHalf,
    pub last_heard: Instant,
    /// DLVR batches received and not yet credited.
    pub credit: thynapse_protocol::credit::Credit,
    /// HELO and the subscription snapshot, sent first at the next flush.
    pub greeting: Vec<ZmqMessage>,
}

pub struct Session {
    /// The HELO id, and the origin receivers deduplicate this session's messages by.
    pub id: Thid,
    pub room: Option<String>,
    pub next_seq: u64,
    open: Option<Open>,
    /// Closed frames, sent or not, oldest first.
    pub unacked: VecDeque<Unacked>,
    /// Index into `unacked` of the first frame not yet sent on the current link.
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
    /// Subscription confirmations waiting for the mesh to know the subscriptions.
    pub confirm: Confirmations,
}

impl Session {
    pub fn new(id: Thid, room: Option<String>) -> Self {
        Session {
            id,
            admitted: room.is_none(),
            room,
            next_seq: 1,
            open: None,
            unacked: VecDeque::new(),
            unsent_from: 0,
            interest: Vec::new(),
            link: None,
            old_link: None,
            connecting: None,
            avoid: Vec::new(),
            waiting: Vec::new(),
            last_used: Instant::now(),
            confirm: Confirmations::default(),
        }
    }

    /// The frame being filled, started (at the next sequence number) if there is none or
    /// the current one is full.
    fn open(&mut self) -> &mut Open {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.count >= MAX_PUBS_BATCH)
        {
            self.close();
        }
        self.open.get_or_insert_with(Open::default)
    }

    /// Queues `count` publish records (as `put_publish` writes them) from `client`, whose
    /// tokens are the runs `tokens`.
    pub fn queue_records(
        &mut self,
        client: ClientId,
        records: &Bytes,
        count: usize,
        tokens: &[(u64, u32)],
    ) {
        let open = self.open();
        open.push_part(records.clone());
        open.count += count;
        open.bytes += records.len();
        for (token, n) in tokens {
            push_reply(&mut open.replies, client, *token, *n);
        }
        self.next_seq += count as u64;
    }

    /// Queues one publish; returns the bytes of its record.
    pub fn queue(&mut self, client: ClientId, token: u64, p: &Publish) -> usize {
        let open = self.open();
        let before = open.tail.len();
        put_publish(&mut open.tail, p.kind, p.ts, p.channel, p.payload);
        let added = open.tail.len() - before;
        open.count += 1;
        open.bytes += added;
        push_reply(&mut open.replies, client, token, 1);
        self.next_seq += 1;
        added
    }

    /// Closes the batch being gathered, so that it can be sent.
    pub fn close(&mut self) {
        if let Some(mut open) = self.open.take() {
            open.seal_tail();
            self.unacked.push_back(Unacked {
                first_seq: self.next_seq - open.count as u64,
                count: open.count,
                bytes: open.bytes,
                parts: open.parts,
                replies: open.replies,
                acked: false,
            });
        }
    }

    /// Whether nothing waits for an acknowledgement.
    pub fn settled(&self) -> bool {
        self.open.is_none() && self.unacked.is_empty()
    }

    /// Takes the batch the acknowledgement of `first..first + counts.len()` is for: the
    /// answers (client, token, cells reached), and the messages and bytes freed once no
    /// earlier batch is waiting. A batch already acknowledged (a resent copy, or the old
    /// link while moving) is skipped.
    pub fn acknowledge(
        &mut self,
        first: u64,
        counts: &[u32],
        answers: &mut Vec<(ClientId, u64, u32)>,
    ) -> (usize, usize) {
        let Some(f) = self
            .unacked
            .iter_mut()
            .find(|f| f.first_seq == first && f.count == counts.len() && !f.acked)
        else {
            return (0, 0);
        };
        f.acked = true;
        let mut i = 0;
        for (client, token, n) in std::mem::take(&mut f.replies) {
            for k in 0..u64::from(n) {
                answers.push((client, token + k, counts[i]));
                i += 1;
            }
        }
        // Batches leave the window in order.
        let (mut messages, mut bytes) = (0, 0);
        while self.unacked.front().is_some_and(|f| f.acked) {
            let f = self.unacked.pop_front().expect("front exists");
            self.unsent_from = self.unsent_from.saturating_sub(1);
            messages += f.count;
            bytes += f.bytes;
        }
        (messages, bytes)
    }

    /// Gives up every publish not acknowledged: who to answer, and the messages and bytes
    /// freed.
    pub fn abandon(&mut self) -> (Vec<Replies>, usize, usize) {
        self.close();
        let (mut replies, mut messages, mut bytes) = (Vec::new(), 0, 0);
        for f in self.unacked.drain(..) {
            messages += f.count;
            bytes += f.bytes;
            replies.extend(f.replies);
        }
        self.unsent_from = 0;
        (replies, messages, bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    use thynapse_protocol::batch::{decode_publish_records, Kind};

    fn records(n: usize) -> Bytes {
        let mut b = BytesMut::new();
        for i in 0..n {
            put_publish(&mut b, Kind::Mesh, 7, b"ch", format!("m{i}").as_bytes());
        }
        b.freeze()
    }

    #[test]
    fn frames_are_acknowledged_whole_once_and_answer_every_token() {
        let mut s = Session::new(Thid::random(), None);
        // Client 1 publishes tokens 10..13, then client 2 token 4: one frame.
        s.queue_records(1, &records(3), 3, &[(10, 3)]);
        s.queue_records(2, &records(1), 1, &[(4, 1)]);
        s.close();
        // Two more from client 1 in a second frame.
        s.queue_records(1, &records(2), 2, &[(13, 2)]);
        s.close();
        assert_eq!(s.unacked.len(), 2);
        let f = &s.unacked[0];
        let messages: usize = f
            .parts
            .iter()
            .map(|p| decode_publish_records(p).unwrap().count())
            .sum();
        assert_eq!((f.first_seq, f.count, messages), (1, 4, 4));
        s.unsent_from = 2;

        let mut answers = Vec::new();
        // The second batch acknowledged first: answered, but it stays in the window
        // behind the first.
        assert_eq!(s.acknowledge(5, &[3, 3], &mut answers), (0, 0));
        assert_eq!(answers, vec![(1, 13, 3), (1, 14, 3)]);
        answers.clear();
        let (messages, _) = s.acknowledge(1, &[1, 0, 2, 5], &mut answers);
        assert_eq!(messages, 6);
        assert_eq!(answers, vec![(1, 10, 1), (1, 11, 0), (1, 12, 2), (2, 4, 5)]);
        // The same acknowledgements again (resent copies) answer nothing.
        answers.clear();
        assert_eq!(s.acknowledge(1, &[1, 0, 2, 5], &mut answers), (0, 0));
        assert_eq!(s.acknowledge(5, &[3, 3], &mut answers), (0, 0));
        assert!(answers.is_empty());
        assert!(s.settled());
        assert_eq!(s.unsent_from, 0);
    }

    #[test]
    fn a_full_frame_is_closed_and_abandoning_answers_all() {
        let mut s = Session::new(Thid::random(), Some("r".into()));
        for t in 0..(MAX_PUBS_BATCH as u64 + 1) {
            s.queue_records(9, &records(1), 1, &[(t, 1)]);
        }
        assert_eq!(s.unacked.len(), 1, "the full frame was closed");
        let (replies, messages, bytes) = s.abandon();
        let n = MAX_PUBS_BATCH as u64;
        assert_eq!(replies, vec![(9, 0, n as u32), (9, n, 1)]);
        assert_eq!(messages, MAX_PUBS_BATCH + 1);
        assert_eq!(bytes, records(1).len() * (MAX_PUBS_BATCH + 1));
        assert!(s.settled());
    }
}
