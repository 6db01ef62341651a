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
use thynapse_protocol::auth::{bound_to, nonce, Verifier};
use thynapse_protocol::wire::Auth;

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

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send `CHAL` with this nonce.
    Challenge(String),
    /// Send `AUTD` with this proof of our own: the connection may speak as `Party`.
    Passed(Party, String),
    /// Send `ERRR` with this; counted.
    Refused(&'static str),
}

#[derive(Default)]
pub struct Gate {
    verifier: Verifier,
    mesh: String,
    /// This transmitter's command endpoint, as announced: proofs are bound to it.
    endpoint: String,
    pending: HashMap<Bytes, (String, Instant)>,
    passed: HashMap<Bytes, (Party, Instant)>,
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
        self.passed.get(identity).map(|(p, _)| p)
    }

    /// Whether a connection proved something, noting that it was heard now (it is pruned
    /// only after a silence, never while in use).
    pub fn admit(&mut self, identity: &Bytes, now: Instant) -> bool {
        match self.passed.get_mut(identity) {
            Some((_, heard)) => {
                *heard = now;
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
        let bound = bound_to(&auth.context, &self.endpoint);
        let Some(key) = self
            .verifier
            .check_bound(&auth.role, &auth.context, &n, &bound, proof)
        else {
            return Outcome::Refused(
                "AUTH refused: wrong proof (another token, another Service's key, or made for another transmitter's endpoint)",
            );
        };
        if self.passed.len() >= MAX_PASSED && !self.passed.contains_key(identity) {
            return Outcome::Refused("AUTH refused: too many connections");
        }
        let ours = key.prove("server", auth.challenge.as_deref().unwrap_or(""), &bound);
        self.passed.insert(identity.clone(), (party.clone(), now));
        Outcome::Passed(party, ours)
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
            .retain(|id, (_, at)| now.duration_since(*at) <= max_age || in_use(id));
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
        let Outcome::Passed(party, proof) = passed else {
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
