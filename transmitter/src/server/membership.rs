//! Which peers there are and which live: what the rendezvous points list (peers to link,
//! `on_discovered`; whole memberships, `on_listed`), links pinged only while something
//! waits on them, and peers forgotten once gone (docs/architecture.md, "Scale"). The links
//! themselves, and what travels on them, are `super::peers`.

use std::collections::HashSet;
use std::time::Instant;

use thynapse_protocol::auth::ClientAuth;
use thynapse_protocol::discovery::TransmitterInfo;
use thynapse_protocol::wire::{self, cmd};

use super::peers::connect_peer;
use super::{reply_json, Transmitter};
use crate::metrics::Forgotten;
use crate::routing::PeerId;

/// A rendezvous point's last complete membership (`Report::Listed`).
pub(super) struct Listing {
    pub(super) names: HashSet<String>,
    pub(super) at: Instant,
    /// The point may not have heard every live transmitter yet.
    pub(super) partial: bool,
}

impl Transmitter {
    /// Peer liveness and what peers are owed, once per half heartbeat. A peer is known
    /// alive by the rendezvous points, which hear every transmitter anyway: links are
    /// pinged only while something on them waits for the peer, so that an idle mesh
    /// costs each transmitter its announcements, not a ping per peer (issue 18).
    pub(super) fn peer_housekeeping(&mut self, now: Instant) {
        // Credit owed on their links to us.
        for p in self.peers.values_mut() {
            if let (Some((identity, _)), Some(batch)) = (&p.inbound, p.fack.take(true)) {
                self.replies
                    .push(reply_json(identity, cmd::FACK, &wire::Credit { batch }));
            }
        }
        // Links waiting on their peer are pinged; one silent for an expiry since it
        // started waiting has a dead or paused peer: its cells are unreachable.
        let mut unanswered = Vec::new();
        for (&id, p) in self.peers.iter_mut() {
            let waiting = p.suspect || !p.outbox.idle() || self.interest_sync.waiting_on(id);
            let Some(out) = p.out.as_mut() else { continue };
            if !waiting {
                out.active = false;
                continue;
            }
            if !out.active {
                // Idle until now: silence is counted from here.
                out.active = true;
                out.last_heard = now;
            }
            if now.duration_since(out.last_heard) > self.expiry {
                unanswered.push(id);
            } else {
                out.ping_due = true;
            }
        }
        for peer in unanswered {
            self.metrics.peer_reconnects.inc();
            let p = self.peers.get_mut(&peer).expect("listed above");
            let heard = p.inbound.as_ref().map(|(_, at)| *at);
            if heard.is_some_and(|at| now.duration_since(at) <= self.expiry) {
                // It speaks on its own link to us: only ours is broken. Its cells stay
                // known; what waits for them is sent again on the next link.
                tracing::info!(peer = %p.name, "peer not answering on our link; linking again");
                p.drop_link();
            } else {
                tracing::info!(peer = %p.name, "peer not answering; forgetting its cells");
                self.forget_peer(peer, Forgotten::Silent);
            }
        }
        self.forget_unlisted(now);
        self.update_peer_gauge();
    }

    /// Peers that no rendezvous point lists any more, and that said nothing for an
    /// expiry, are gone (killed, paused, cut off): their cells are forgotten. A point
    /// that just started (partial) or stopped answering is no evidence; with no point
    /// answering at all, nobody is forgotten for it.
    fn forget_unlisted(&mut self, now: Instant) {
        let fresh: Vec<&Listing> = self
            .listings
            .values()
            .filter(|l| !l.partial && now.duration_since(l.at) <= self.expiry)
            .collect();
        if fresh.is_empty() {
            return;
        }
        let expiry = self.expiry;
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.unlisted && (p.is_live() || p.left.is_none()))
            .filter(|(_, p)| !fresh.iter().any(|l| l.names.contains(&p.name)))
            .filter(|(_, p)| {
                let heard = p.inbound.as_ref().map(|(_, at)| *at);
                let answered = p.out.as_ref().map(|o| o.last_heard);
                heard
                    .into_iter()
                    .chain(answered)
                    .chain([p.seen])
                    .all(|at| now.duration_since(at) > expiry)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in gone {
            let p = self.peers.get_mut(&peer).expect("listed above");
            if p.out.is_some() {
                // Asked on its link first (`peer_housekeeping` pings a suspect).
                if !p.suspect {
                    tracing::debug!(peer = %p.name, "peer no longer listed by the rendezvous; asking it");
                    p.suspect = true;
                }
                continue;
            }
            tracing::info!(peer = %p.name, "peer no longer listed by the rendezvous, and no link to it; forgetting its cells");
            self.forget_peer(peer, Forgotten::Unlisted);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.unlisted = true;
                p.suspect = false;
            }
        }
    }

    /// A rendezvous point's whole membership: who lives, for `forget_unlisted`; and a
    /// listed peer without a link is linked (an `unchanged` answer lists no addresses:
    /// they are known from the first).
    pub(super) fn on_listed(
        &mut self,
        from: std::net::SocketAddr,
        names: Option<Vec<String>>,
        partial: bool,
    ) {
        let now = Instant::now();
        match (names, self.listings.get_mut(&from)) {
            (Some(names), _) => {
                let names = names.into_iter().collect();
                self.listings.insert(
                    from,
                    Listing {
                        names,
                        at: now,
                        partial,
                    },
                );
            }
            (None, Some(l)) => {
                l.at = now;
                l.partial = partial;
            }
            (None, None) => return,
        }
        // Named by a point now: a point that lost a few of its announcements (and so
        // lists it a moment later again) is no reason to forget it.
        for name in &self.listings[&from].names {
            if let Some(p) = self
                .peer_ids
                .get(name)
                .and_then(|id| self.peers.get_mut(id))
            {
                p.seen = now;
                p.suspect = false;
            }
        }
        let unlinked: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.out.is_none() && !p.connecting && p.command.is_some())
            .filter(|(_, p)| p.left.is_none() || p.left != p.instance)
            .filter(|(_, p)| self.listings[&from].names.contains(&p.name))
            .map(|(id, _)| *id)
            .collect();
        for peer in unlinked {
            self.link(peer);
        }
    }

    /// After a pause of this process longer than an expiry, every peer that waited on
    /// us may have given up: forwarded our anycatch messages elsewhere, forgotten our
    /// cells. What they sent before that must not be delivered now (duplicates), and
    /// they must hear our cells again: every peer is forgotten, and links again.
    pub(super) fn woke(&mut self, now: Instant) {
        let paused = now.duration_since(self.last_turn);
        self.last_turn = now;
        if paused <= self.expiry {
            return;
        }
        tracing::warn!(
            ?paused,
            "this transmitter was paused past the expiry; linking every peer again"
        );
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.forget_peer(peer, Forgotten::Paused);
        }
    }

    pub(super) fn on_discovered(&mut self, list: Vec<TransmitterInfo>) {
        tracing::debug!(listed = list.len(), "discovered");
        for info in list {
            if info.name == self.args.name {
                continue;
            }
            let Some(peer) = self.peer_id(&info.name) else {
                self.metrics.refused.with_label_values(&["peers"]).inc();
                continue;
            };
            let p = self.peers.get_mut(&peer).expect("peer_id creates");
            if p.left == Some(info.id) || p.retired.contains(&info.id) {
                // A rendezvous point that lags behind lists an instance already replaced.
                continue;
            }
            let told_by_itself = p
                .inbound
                .as_ref()
                .is_some_and(|(_, heard)| heard.elapsed() <= self.expiry);
            if told_by_itself && p.instance.is_some_and(|i| i != info.id) {
                // Its live connection to us said which instance it is (PEER); a listing
                // that disagrees is either late or about to be confirmed by a new PEER.
                continue;
            }
            if p.instance.is_some_and(|i| i != info.id) {
                tracing::info!(peer = %p.name, "peer restarted; reconnecting");
                self.metrics.peer_reconnects.inc();
                self.peer_restarted(peer);
            }
            let p = self.peers.get_mut(&peer).expect("peer_id creates");
            p.instance = Some(info.id);
            p.command = Some(info.command);
            p.unlisted = false;
            p.seen = Instant::now();
            if p.out.is_none() && !p.connecting {
                self.link(peer);
            }
        }
        self.update_peer_gauge();
    }

    /// Opens our link to a peer whose command endpoint is known.
    fn link(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(command) = p.command.clone() else {
            return;
        };
        tracing::debug!(peer = %p.name, %command, "linking");
        p.connecting = true;
        p.unlisted = false;
        let generation = p.generation;
        let events = self.reports_tx.clone();
        let options = super::socket_options(self.args.max_message_bytes);
        let auth = self
            .gate
            .mesh_key()
            .map(|k| ClientAuth::peer(k, &self.args.mesh, &command).encrypted(self.args.encrypt));
        tokio::spawn(connect_peer(
            peer, generation, command, options, auth, events,
        ));
    }
}
