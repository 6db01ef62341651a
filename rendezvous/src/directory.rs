//! The live transmitters of a mesh as its rendezvous point hears them, the digest of their
//! membership, and the changes of it the point remembers (docs/architecture.md, "Scale").
//! Pure: time is passed in.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thynapse_protocol::discovery::{Membership, TransmitterInfo};

/// The live transmitters of one mesh, and where each announces from. Pure: time is
/// passed in.
#[derive(Default)]
pub struct Directory {
    entries: HashMap<String, (TransmitterInfo, Instant, SocketAddr)>,
    /// The membership as last computed, its digest (empty before the first), and until
    /// when they hold (the first expiry then; `None` once a member came or changed):
    /// every announcement asks for the digest, and it changes rarely.
    members: Membership,
    digest: String,
    valid_until: Option<Instant>,
    /// The last changes of membership, oldest first: the digest before each and the
    /// names it touched. A transmitter whose view is one of those digests is answered
    /// with what changed since (`changed`) rather than every transmitter.
    history: VecDeque<(String, Vec<String>)>,
}

/// Changes of membership a point remembers, and names they may touch in all: an asker
/// further behind is answered in full.
const HISTORY: usize = 64;
const HISTORY_NAMES: usize = 4_096;

/// Transmitters a rendezvous keeps at most (the CRD allows 240 per mesh): a flood of
/// announcements under made-up names cannot grow it further.
pub const MAX_TRANSMITTERS: usize = 2_000;

impl Directory {
    /// Keeps (or renews) an announcement; false when the directory is full of others.
    pub fn announce(
        &mut self,
        info: TransmitterInfo,
        from: SocketAddr,
        now: Instant,
        ttl: Duration,
    ) -> bool {
        if self.entries.len() >= MAX_TRANSMITTERS && !self.entries.contains_key(&info.name) {
            self.entries.retain(|_, (_, expires, _)| *expires > now);
            if self.entries.len() >= MAX_TRANSMITTERS {
                return false;
            }
        }
        let member = |i: &TransmitterInfo| (i.id, i.command.clone());
        let changed = self
            .entries
            .get(&info.name)
            .is_none_or(|(known, expires, _)| *expires <= now || member(known) != member(&info));
        if changed {
            self.valid_until = None;
        }
        self.entries
            .insert(info.name.clone(), (info, now + ttl, from));
        true
    }

    /// The digest of the live membership (`membership_digest`), computed again only
    /// when a member came, changed or expired.
    pub fn digest(&mut self, now: Instant) -> String {
        if self.valid_until.is_some_and(|until| now < until) {
            return self.digest.clone();
        }
        let live = self.live(now);
        let members = Membership::of(&live);
        let digest = members.digest();
        if digest != self.digest {
            let before = std::mem::replace(&mut self.digest, digest.clone());
            // Empty before the first membership, which no view can precede.
            if !before.is_empty() {
                let touched = self.members.touched(&members);
                self.remember_change(before, touched);
            }
            self.members = members;
        }
        let until = self.entries.values().map(|(_, e, _)| *e).min();
        self.valid_until = Some(until.unwrap_or(now + Duration::from_secs(3600)));
        digest
    }

    /// Notes that the membership of digest `before` changed `touched` names.
    fn remember_change(&mut self, before: String, touched: Vec<String>) {
        self.history.push_back((before, touched));
        let mut names: usize = self.history.iter().map(|(_, t)| t.len()).sum();
        while self.history.len() > HISTORY || names > HISTORY_NAMES {
            let (_, dropped) = self.history.pop_front().expect("not empty");
            names -= dropped.len();
        }
    }

    /// What changed since the membership of digest `view`, when it is one remembered:
    /// the names gone, and the transmitters that joined or changed. Call after `digest`.
    pub fn changed_since(&self, view: &str) -> Option<(Vec<String>, Vec<TransmitterInfo>)> {
        let since = self.history.iter().rposition(|(d, _)| d == view)?;
        let touched: std::collections::BTreeSet<&String> = self
            .history
            .range(since..)
            .flat_map(|(_, names)| names)
            .collect();
        let (mut left, mut joined) = (Vec::new(), Vec::new());
        for name in touched {
            match self
                .entries
                .get(name)
                .filter(|_| self.members.contains(name))
            {
                Some((info, _, _)) => joined.push(info.clone()),
                None => left.push(name.clone()),
            }
        }
        Some((left, joined))
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
