//! The authentication gate on the command socket (`crate::gate` holds its state): `AUTH`
//! answered, and nothing else read from a connection before it proved a Service or the
//! mesh. Also the client side of the exchange, for this transmitter's links to its peers.

use std::sync::Arc;

use std::time::{Duration, Instant};
use thynapse_protocol::permissions::Permissions;

use std::collections::VecDeque;

use bytes::Bytes;
use thynapse_protocol::crypt::CryptError;
use thynapse_protocol::frame::CommandFrame;
use thynapse_protocol::wire::{self, cmd};

use super::{error_reply, reply_json, Transmitter};
use crate::gate::{Outcome, Party};

impl Transmitter {
    /// Whether a message from `identity` may be read: true when the mesh has no token,
    /// or the connection authenticated; `AUTH` itself is answered here.
    pub(super) fn admit(&mut self, identity: &Bytes, frame: &CommandFrame) -> bool {
        if !self.gate.enabled() {
            return true;
        }
        if &frame.cmd == cmd::AUTH {
            match frame.decode_json::<wire::Auth>() {
                Ok(auth) => self.on_auth(identity, &auth),
                Err(e) => self.refuse(identity, &format!("AUTH refused: {e}")),
            }
            return false;
        }
        if !self.gate.admit(identity, Instant::now()) {
            self.refuse(
                identity,
                "authenticate first: AUTH (docs/protocol.md, \"Authentication\")",
            );
            return false;
        }
        true
    }

    fn on_auth(&mut self, identity: &Bytes, auth: &wire::Auth) {
        match self.gate.on_auth(identity, auth, Instant::now()) {
            Outcome::Challenge(nonce) => {
                self.replies
                    .push(reply_json(identity, cmd::CHAL, &wire::Challenge { nonce }))
            }
            Outcome::Passed(_, proof, encrypt) => self.replies.push(reply_json(
                identity,
                cmd::AUTD,
                &wire::Authenticated { proof, encrypt },
            )),
            Outcome::Refused(why) => self.refuse(identity, why),
        }
    }

    /// The frames of a message from `identity`, opened when its connection is encrypted.
    /// None when it does not open: the connection is forgotten (it must authenticate
    /// again), told so in clear, and counted.
    pub(super) fn open_sealed(
        &mut self,
        identity: &Bytes,
        frames: VecDeque<Bytes>,
    ) -> Option<VecDeque<Bytes>> {
        let Some(channel) = self.gate.channel(identity) else {
            return Some(frames);
        };
        let opened = match (frames.len(), frames.front()) {
            (1, Some(sealed)) => channel.open.open(sealed),
            _ => Err(CryptError::Framing),
        };
        match opened {
            Ok(frames) => Some(frames.into()),
            Err(e) => {
                self.gate.forget(identity);
                let why = format!("{e} on an encrypted connection: authenticate again");
                self.refuse(identity, &why);
                None
            }
        }
    }

    /// Refused for authentication: `ERRR`, counted, nothing else done.
    pub(super) fn refuse(&mut self, identity: &Bytes, why: &str) {
        self.metrics.refused.with_label_values(&["auth"]).inc();
        self.replies.push(error_reply(identity, why));
    }

    /// Whether this connection may say HELO for `service` (it proved that Service, or
    /// the mesh), or PEER (it proved the mesh).
    pub(super) fn proved(&self, identity: &Bytes, service: Option<&str>) -> bool {
        if !self.gate.enabled() {
            return true;
        }
        match (self.gate.party(identity), service) {
            (Some(Party::Peer), _) => true,
            (Some(Party::Cell(s, _)), Some(service)) => s == service,
            _ => false,
        }
    }

    /// What a connection that proved a restricted Service may publish and subscribe to;
    /// None: everything.
    pub(super) fn permissions_of(&self, identity: &Bytes) -> Option<Arc<Permissions>> {
        match self.gate.party(identity) {
            Some(Party::Cell(_, p)) if !p.unrestricted() => Some(p.clone()),
            _ => None,
        }
    }

    /// Authenticated connections with no cell or peer on them for a while are forgotten.
    pub(super) fn prune_gate(&mut self, now: Instant) {
        let max_age = (self.expiry * 2).max(Duration::from_secs(30));
        let (cells, peers) = (&self.identities, &self.peer_identities);
        self.gate.prune(now, max_age, |id| {
            cells.contains_key(id) || peers.contains_key(id)
        });
    }
}
