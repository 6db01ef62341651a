//! Who may speak on each connection of an authenticated mesh (`thynapse_protocol::auth`):
//! the challenges handed out and not answered yet, and the connections that proved a
//! Service (cells) or the mesh (peers). Pure state: the server loop feeds it `AUTH`
//! messages and asks it before routing anything else. Both maps are bounded, since anyone
//! who reaches the port can open connections.

use std::sync::Arc;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use thynapse_protocol::permissions::Permissions;

use bytes::Bytes;
use thynapse_protocol::auth::{bound_to, bound_with_keys, nonce, transcript, Verifier};
use thynapse_protocol::crypt::{Channel, Ephemeral, Side};
use thynapse_protocol::wire::Auth;
use zeromq::ZmqMessage;

/// Challenges waiting for an answer; past this the oldest is dropped.
pub const MAX_PENDING: usize = 4096;
/// Connections authenticated at once: every cell and peer a transmitter may have, twice.
pub const MAX_PASSED: usize = 2 * (10_000 + 1024);

/// What a connection proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    /// A cell of this Service, with what the Service may publish and subscribe to (its
    /// key was derived with them: `thynapse_protocol::permissions`).
    Cell(String, Arc<Permissions>),
    /// A transmitter of this mesh.
    Peer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send `CHAL` with this nonce.
    Challenge(String),
    /// Send `AUTD` with this proof of our own (and our public key when the connection
    /// is encrypted from now on): the connection may speak as `Party`.
    Passed(Party, String, Option<String>),
    /// Send `ERRR` with this; counted.
    Refused(&'static str),
}

#[derive(Default)]
pub struct Gate {
    verifier: Verifier,
    mesh: String,
    /// This transmitter's command endpoint, as announced: proofs are bound to it.
    endpoint: String,
    /// Whether a connection that does not ask for encryption is refused.
    require_encryption: bool,
    pending: HashMap<Bytes, (String, Instant)>,
    passed: HashMap<Bytes, Passed>,
}

/// An authenticated connection.
struct Passed {
    party: Party,
    heard: Instant,
    /// Boxed: two key schedules, which plain connections do not pay for.
    channel: Option<Box<Channel>>,
}

impl Gate {
    pub fn new(verifier: Verifier, mesh: &str, endpoint: &str) -> Gate {
        Gate {
            verifier,
            mesh: mesh.to_string(),
            endpoint: endpoint.to_string(),
            ..Gate::default()
        }
    }

    /// Refuses connections that do not ask for encryption (`--encrypt`).
    pub fn requiring_encryption(mut self, required: bool) -> Gate {
        self.require_encryption = required;
        self
    }

    /// Whether connections must authenticate (the mesh has a token).
    pub fn enabled(&self) -> bool {
        self.verifier.enabled()
    }

    /// The key this transmitter proves itself to its peers with, when the mesh has one.
    pub fn mesh_key(&self) -> Option<thynapse_protocol::auth::Key> {
        self.verifier.mesh_key()
    }

    /// What a connection proved, if it did.
    pub fn party(&self, identity: &Bytes) -> Option<&Party> {
        self.passed.get(identity).map(|p| &p.party)
    }

    /// The channel of a connection that asked for encryption.
    pub fn channel(&mut self, identity: &Bytes) -> Option<&mut Channel> {
        self.passed.get_mut(identity)?.channel.as_deref_mut()
    }

    /// Whether a connection proved something, noting that it was heard now (it is pruned
    /// only after a silence, never while in use).
    pub fn admit(&mut self, identity: &Bytes, now: Instant) -> bool {
        match self.passed.get_mut(identity) {
            Some(p) => {
                p.heard = now;
                true
            }
            None => false,
        }
    }

    pub fn on_auth(&mut self, identity: &Bytes, auth: &Auth, now: Instant) -> Outcome {
        let Some(proof) = &auth.proof else {
            if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(identity) {
                let oldest = self
                    .pending
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.pending.remove(&oldest);
                }
            }
            let n = nonce();
            self.pending.insert(identity.clone(), (n.clone(), now));
            return Outcome::Challenge(n);
        };
        // A challenge answers once: a proof cannot be replayed, here or elsewhere.
        let Some((n, _)) = self.pending.remove(identity) else {
            return Outcome::Refused(
                "AUTH refused: no challenge pending on this connection (ask first)",
            );
        };
        if auth.nonce.as_deref() != Some(n.as_str()) {
            return Outcome::Refused("AUTH refused: not the nonce this connection was given");
        }
        let party = match auth.role.as_str() {
            "cell" => match Permissions::of_identity(&auth.context) {
                Ok((service, p)) => Party::Cell(service.to_string(), Arc::new(p)),
                Err(_) => {
                    return Outcome::Refused("AUTH refused: unreadable permissions in the context")
                }
            },
            "peer" if auth.context == self.mesh => Party::Peer,
            "peer" => return Outcome::Refused("AUTH refused: another mesh"),
            _ => return Outcome::Refused("AUTH refused: role is \"cell\" or \"peer\""),
        };
        let client_key = auth.encrypt.as_deref();
        if self.require_encryption && client_key.is_none() {
            return Outcome::Refused(
                "AUTH refused: this mesh encrypts every connection; ask with \"encrypt\" (docs/protocol.md, \"Encryption\")",
            );
        }
        let bound = bound_to(&auth.context, &self.endpoint);
        let over = bound_with_keys(&bound, &Vec::from_iter(client_key));
        let Some(key) = self
            .verifier
            .check_bound(&auth.role, &auth.context, &n, &over, proof)
        else {
            return Outcome::Refused(
                "AUTH refused: wrong proof (another token, another Service's key, or made for another transmitter's endpoint)",
            );
        };
        if self.passed.len() >= MAX_PASSED && !self.passed.contains_key(identity) {
            return Outcome::Refused("AUTH refused: too many connections");
        }
        let challenge = auth.challenge.as_deref().unwrap_or("");
        let (channel, server_key) =
            match client_key {
                None => (None, None),
                Some(theirs) => {
                    let ephemeral = Ephemeral::new();
                    let mine = ephemeral.public().to_string();
                    let t = transcript(&n, challenge, &bound, theirs, &mine);
                    match ephemeral.agree(theirs, Side::Server, &key, &t) {
                        Ok(c) => (Some(Box::new(c)), Some(mine)),
                        Err(_) => return Outcome::Refused(
                            "AUTH refused: \"encrypt\" is not an X25519 public key (64 hex digits)",
                        ),
                    }
                }
            };
        let keys: Vec<&str> = client_key
            .into_iter()
            .chain(server_key.as_deref())
            .collect();
        let ours = key.prove("server", challenge, &bound_with_keys(&bound, &keys));
        let heard = now;
        let passed = Passed {
            party: party.clone(),
            heard,
            channel,
        };
        self.passed.insert(identity.clone(), passed);
        Outcome::Passed(party, ours, server_key)
    }

    /// `m` (to the connection its first frame names) as that connection carries it:
    /// sealed when it is encrypted. None when it cannot be (a counter run out: never in
    /// practice; the connection is forgotten).
    pub fn seal(&mut self, m: ZmqMessage) -> Option<ZmqMessage> {
        let identity = m.get(0)?.clone();
        let Some(channel) = self.channel(&identity) else {
            return Some(m);
        };
        // AUTD goes in clear: it carries the key the client derives the channel from.
        if m.get(1).is_some_and(|f| f.starts_with(b"J AUTD")) {
            return Some(m);
        }
        match channel.seal.seal(m.iter().skip(1).map(|f| &f[..])) {
            Ok(sealed) => {
                let mut out = ZmqMessage::from(identity);
                out.push_back(sealed);
                Some(out)
            }
            Err(e) => {
                tracing::warn!("not sent: {e}");
                self.forget(&identity);
                None
            }
        }
    }

    /// Forgets a connection that is gone.
    pub fn forget(&mut self, identity: &Bytes) {
        self.passed.remove(identity);
        self.pending.remove(identity);
    }

    /// Drops challenges older than `max_age`, and authenticated connections silent for
    /// longer that `in_use` does not claim (a cell or peer on them).
    pub fn prune(&mut self, now: Instant, max_age: Duration, in_use: impl Fn(&Bytes) -> bool) {
        self.pending
            .retain(|_, (_, at)| now.duration_since(*at) <= max_age);
        self.passed
            .retain(|id, p| now.duration_since(p.heard) <= max_age || in_use(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::auth::Key;

    const AT: &str = "tcp://10.0.0.1:7000";

    fn gate() -> Gate {
        Gate::new(Verifier::new(vec![b"token".to_vec()]), "demo", AT)
    }

    fn ask(role: &str, context: &str) -> Auth {
        Auth {
            role: role.into(),
            context: context.into(),
            nonce: None,
            proof: None,
            challenge: None,
            encrypt: None,
        }
    }

    fn answer(key: &Key, role: &str, context: &str, n: &str) -> Auth {
        Auth {
            proof: Some(key.prove(role, n, &bound_to(context, AT))),
            nonce: Some(n.into()),
            challenge: Some("c1".into()),
            ..ask(role, context)
        }
    }

    #[test]
    fn a_cell_proves_its_service_once_per_challenge() {
        let mut g = gate();
        let conn = Bytes::from_static(b"a");
        let now = Instant::now();
        let Outcome::Challenge(n) = g.on_auth(&conn, &ask("cell", "orders"), now) else {
            panic!()
        };
        let key = Key::service(b"token", "orders");
        let passed = g.on_auth(&conn, &answer(&key, "cell", "orders", &n), now);
        let Outcome::Passed(party, proof, None) = passed else {
            panic!("{passed:?}")
        };
        assert_eq!(party, Party::Cell("orders".into(), Default::default()));
        assert!(
            key.verify("server", "c1", &bound_to("orders", AT), &proof),
            "the server proves itself"
        );
        assert_eq!(
            g.party(&conn),
            Some(&Party::Cell("orders".into(), Default::default()))
        );
        // A proof made for another transmitter (relayed through one posing as it).
        let other = Bytes::from_static(b"b");
        let Outcome::Challenge(n2) = g.on_auth(&other, &ask("cell", "orders"), now) else {
            panic!()
        };
        let relayed = Auth {
            proof: Some(key.prove("cell", &n2, &bound_to("orders", "tcp://10.9.9.9:7000"))),
            nonce: Some(n2),
            ..ask("cell", "orders")
        };
        assert!(matches!(
            g.on_auth(&other, &relayed, now),
            Outcome::Refused(_)
        ));
        // The same proof again (a replay): no challenge pending.
        assert!(matches!(
            g.on_auth(&conn, &answer(&key, "cell", "orders", &n), now),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn wrong_keys_services_nonces_and_meshes_are_refused() {
        let mut g = gate();
        let now = Instant::now();
        let cases: [(&str, &str, Key, bool); 4] = [
            ("cell", "orders", Key::service(b"guess", "orders"), false),
            ("cell", "orders", Key::service(b"token", "billing"), false),
            ("peer", "other", Key::mesh(b"token"), false),
            ("peer", "demo", Key::mesh(b"token"), true),
        ];
        for (i, (role, context, key, good)) in cases.into_iter().enumerate() {
            let conn = Bytes::from(vec![i as u8]);
            let Outcome::Challenge(n) = g.on_auth(&conn, &ask(role, context), now) else {
                panic!()
            };
            let outcome = g.on_auth(&conn, &answer(&key, role, context, &n), now);
            assert_eq!(
                matches!(outcome, Outcome::Passed(..)),
                good,
                "{role} {context}: {outcome:?}"
            );
        }
        // A nonce given to another connection does not do.
        let (a, b) = (Bytes::from_static(b"x"), Bytes::from_static(b"y"));
        let Outcome::Challenge(n) = g.on_auth(&a, &ask("peer", "demo"), now) else {
            panic!()
        };
        g.on_auth(&b, &ask("peer", "demo"), now);
        let outcome = g.on_auth(&b, &answer(&Key::mesh(b"token"), "peer", "demo", &n), now);
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    }

    /// The client's side as sidecars run it, against the gate: `(gate's outcome of the
    /// proof, what the client made of AUTD)`.
    fn exchange(
        g: &mut Gate,
        conn: &Bytes,
        encrypted: bool,
        tamper: impl FnOnce(&mut Auth),
    ) -> (
        Outcome,
        Option<Result<Option<Channel>, thynapse_protocol::auth::AuthError>>,
    ) {
        use thynapse_protocol::auth::ClientAuth;
        use thynapse_protocol::frame::CommandFrame;
        use thynapse_protocol::wire::{cmd, Authenticated, Challenge};
        let now = Instant::now();
        let key = Key::service(b"token", "orders");
        let mut client = ClientAuth::cell(key, "orders", AT).encrypted(encrypted);
        let Outcome::Challenge(nonce) = g.on_auth(conn, &ask("cell", "orders"), now) else {
            panic!()
        };
        let chal = CommandFrame::json(cmd::CHAL, &Challenge { nonce }).to_bytes();
        let answer = Bytes::from(client.on_challenge(&chal).unwrap());
        let mut auth: Auth = CommandFrame::parse(&answer).unwrap().decode_json().unwrap();
        tamper(&mut auth);
        let outcome = g.on_auth(conn, &auth, now);
        let Outcome::Passed(_, proof, encrypt) = outcome.clone() else {
            return (outcome, None);
        };
        let done = CommandFrame::json(cmd::AUTD, &Authenticated { proof, encrypt }).to_bytes();
        (outcome, Some(client.on_done(&done)))
    }

    #[test]
    fn an_encrypted_connection_seals_everything_after_autd_both_ways() {
        let mut g = gate().requiring_encryption(true);
        let conn = Bytes::from_static(b"cell");
        let (outcome, done) = exchange(&mut g, &conn, true, |_| {});
        assert!(
            matches!(outcome, Outcome::Passed(_, _, Some(_))),
            "{outcome:?}"
        );
        let mut client = done.unwrap().unwrap().expect("a channel");
        // Server to client: AUTD itself in clear, then sealed.
        let autd = ZmqMessage::try_from(vec![conn.clone(), Bytes::from("J AUTD {}")]).unwrap();
        assert_eq!(g.seal(autd.clone()).unwrap().into_vec(), autd.into_vec());
        let pong = ZmqMessage::try_from(vec![conn.clone(), Bytes::from("J PONG {}")]).unwrap();
        let sealed = g.seal(pong).unwrap();
        assert_eq!(sealed.len(), 2);
        assert_eq!(
            client.open.open(&sealed.get(1).unwrap()[..]).unwrap(),
            [Bytes::from("J PONG {}")]
        );
        // Client to server.
        let ping = client.seal.seal([&b"J PING {}"[..]]).unwrap();
        let opened = g.channel(&conn).unwrap().open.open(&ping).unwrap();
        assert_eq!(opened, [Bytes::from("J PING {}")]);
        // Another connection's messages are not sealed.
        let other = ZmqMessage::try_from(vec![Bytes::from("x"), Bytes::from("J PONG {}")]).unwrap();
        assert_eq!(g.seal(other.clone()).unwrap().into_vec(), other.into_vec());
    }

    #[test]
    fn encryption_cannot_be_stripped_swapped_or_skipped() {
        let conn = Bytes::from_static(b"cell");
        // Required, not asked.
        let (outcome, _) = exchange(&mut gate().requiring_encryption(true), &conn, false, |_| {});
        assert!(
            matches!(outcome, Outcome::Refused(why) if why.contains("encrypts")),
            "{outcome:?}"
        );
        // Asked, the request stripped in between: the proof covered it.
        let (outcome, _) = exchange(&mut gate(), &conn, true, |a| a.encrypt = None);
        assert!(
            matches!(outcome, Outcome::Refused(why) if why.contains("wrong proof")),
            "{outcome:?}"
        );
        // Asked, the client's key swapped for one in between's: the proof covered it.
        let theirs = Ephemeral::new().public().to_string();
        let (outcome, _) = exchange(&mut gate(), &conn, true, |a| a.encrypt = Some(theirs));
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
        // Not required and not asked: a plain connection, no channel.
        let mut g = gate();
        let (outcome, done) = exchange(&mut g, &conn, false, |_| {});
        assert!(matches!(outcome, Outcome::Passed(_, _, None)));
        assert!(done.unwrap().unwrap().is_none() && g.channel(&conn).is_none());
        // Not required, asked: encrypted.
        let (_, done) = exchange(&mut g, &Bytes::from_static(b"b"), true, |_| {});
        assert!(done.unwrap().unwrap().is_some());
    }

    #[test]
    fn challenges_and_connections_are_bounded_and_pruned() {
        let mut g = gate();
        let t0 = Instant::now();
        for i in 0..MAX_PENDING + 10 {
            g.on_auth(
                &Bytes::from(i.to_le_bytes().to_vec()),
                &ask("cell", "s"),
                t0,
            );
        }
        assert_eq!(g.pending.len(), MAX_PENDING);
        let conn = Bytes::from_static(b"cell");
        let Outcome::Challenge(n) = g.on_auth(&conn, &ask("cell", "s"), t0) else {
            panic!()
        };
        g.on_auth(
            &conn,
            &answer(&Key::service(b"token", "s"), "cell", "s", &n),
            t0,
        );
        let later = t0 + Duration::from_secs(10);
        g.prune(later, Duration::from_secs(5), |_| false);
        assert!(g.pending.is_empty() && g.passed.is_empty());
        let Outcome::Challenge(n) = g.on_auth(&conn, &ask("cell", "s"), later) else {
            panic!()
        };
        g.on_auth(
            &conn,
            &answer(&Key::service(b"token", "s"), "cell", "s", &n),
            later,
        );
        g.prune(
            later + Duration::from_secs(10),
            Duration::from_secs(5),
            |id| id == &conn,
        );
        assert!(g.party(&conn).is_some(), "a connection in use is kept");
    }
}
