//! One link of a session to a transmitter, and the last messages it is owed.

use std::time::{Duration, Instant};

use thynapse_protocol::credit::CreditOwed;
use thynapse_protocol::wire::{self, cmd};
use zeromq::ZmqMessage;

use crate::frames::{bare_frame, json_frame};

/// A link to a transmitter; `S` sends on it (a DEALER's send half; anything in tests).
pub(super) struct Link<S> {
    pub(super) generation: u64,
    pub(super) name: String,
    pub(super) sender: S,
    pub(super) last_heard: Instant,
    /// The last time anything was sent on it (a heartbeat at least): the transmitter
    /// drops a session it has not heard from for an expiry, so past that this link may be
    /// dead on its side.
    pub(super) last_ping: Instant,
    /// DLVR batches received and not yet credited.
    pub(super) credit: CreditOwed,
    /// HELO and the subscription snapshot, sent first at the next flush.
    pub(super) greeting: Vec<ZmqMessage>,
    /// Greeting again after an "unknown cell" answer, until `WLCM`.
    pub(super) rejoining: bool,
}

impl<S> Link<S> {
    /// Silent for an expiry, or not pinged for one (this process was paused, or its
    /// heartbeat held up): either way the transmitter may have dropped the session.
    pub(super) fn expired(&self, now: Instant, expiry: Duration) -> bool {
        now.duration_since(self.last_heard) > expiry || now.duration_since(self.last_ping) > expiry
    }
}

/// The last messages for a link before it is let go: the credit still owed, then QUIT.
pub(super) fn goodbye<S>(link: &mut Link<S>) -> Vec<ZmqMessage> {
    let mut last: Vec<ZmqMessage> = credit(link, true).into_iter().collect();
    last.push(bare_frame(cmd::QUIT));
    last
}

/// The credit owed on `link`, if enough is (or anything is, when `all`).
pub(super) fn credit<S>(link: &mut Link<S>, all: bool) -> Option<ZmqMessage> {
    let batch = link.credit.take(all)?;
    Some(json_frame(cmd::CRED, &wire::Credit { batch }))
}
