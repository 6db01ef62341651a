//! Sealed rendezvous datagrams (docs/protocol.md, "Sealed datagrams"): in an authenticated
//! mesh every datagram is its JSON body, a newline, and a seal, one JSON line that names
//! who sealed it and carries an HMAC-SHA-256 over the body with the sender's key.
//!
//! UDP has no connection to run a challenge over, so a request is fresh by its time
//! (within [`WINDOW_MS`] of the rendezvous' clock) and used once (the rendezvous remembers
//! every seal it took within the window); an answer is bound to the request it answers
//! (`re`, the request's MAC), so an old answer, or one for somebody else, is worth nothing.
//! Only the `hosting` datagrams a rendezvous sends unasked are not answers: they are
//! fresh by time and newer than the last one from the same point.
//!
//! Transmitters seal with the mesh key (role `peer`, context the mesh), cells with their
//! Service's key (role `cell`, context the Service); the rendezvous, which holds the token,
//! answers with the key that opened the request (role `rendezvous`).

use std::collections::{BTreeSet, HashSet};

use hmac::Mac;
use serde::{Deserialize, Serialize};

use crate::auth::{nonce, HmacSha256, Key};

/// How far a request's time may be from the rendezvous' clock, either way: the clocks of
/// a mesh must agree within it (NTP does far better).
pub const WINDOW_MS: u64 = 30_000;

/// Room kept for the seal in every datagram: bodies are built within
/// `MAX_DATAGRAM - MAX_SEAL_BYTES`.
pub const MAX_SEAL_BYTES: usize = 2_400;

/// The longest context (a mesh name, or a cell's identity: its Service's name and
/// permissions, `permissions::Permissions::identity`) a seal may carry, so a seal fits in
/// [`MAX_SEAL_BYTES`].
pub const MAX_CONTEXT_BYTES: usize = 2_048;

/// A datagram's seal: the line after its body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// `peer` (a transmitter, or anyone holding the mesh key), `cell`, or `rendezvous`.
    pub role: String,
    /// The mesh (role `peer`) or Service (role `cell`) whose key sealed it; an answer
    /// repeats its request's.
    pub context: String,
    /// Milliseconds since the Unix epoch, the sender's clock.
    pub ts: u64,
    pub nonce: String,
    /// An answer's request: that request's `mac`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub re: String,
    /// HMAC-SHA-256 (hex) with the sender's key over every field above and the body.
    pub mac: String,
}

impl Seal {
    fn compute(
        key: &Key,
        role: &str,
        context: &str,
        ts: u64,
        nonce: &str,
        re: &str,
        body: &[u8],
    ) -> HmacSha256 {
        let ts = ts.to_string();
        key.mac_over(&[
            b"thynapse datagram",
            role.as_bytes(),
            context.as_bytes(),
            ts.as_bytes(),
            nonce.as_bytes(),
            re.as_bytes(),
            body,
        ])
    }

    /// Whether `key` sealed `body` with this seal (constant-time comparison).
    pub fn opens_with(&self, key: &Key, body: &[u8]) -> bool {
        match hex::decode(&self.mac) {
            Ok(mac) => Seal::compute(
                key,
                &self.role,
                &self.context,
                self.ts,
                &self.nonce,
                &self.re,
                body,
            )
            .verify_slice(&mac)
            .is_ok(),
            Err(_) => false,
        }
    }
}

/// `body` followed by its seal; and the seal's MAC, which answers refer to.
pub fn seal(
    body: &[u8],
    key: &Key,
    role: &str,
    context: &str,
    now_ms: u64,
    re: &str,
) -> (Vec<u8>, String) {
    let nonce = nonce();
    let mac = hex::encode(
        Seal::compute(key, role, context, now_ms, &nonce, re, body)
            .finalize()
            .into_bytes(),
    );
    let s = Seal {
        role: role.into(),
        context: context.into(),
        ts: now_ms,
        nonce,
        re: re.into(),
        mac: mac.clone(),
    };
    let mut out = Vec::with_capacity(body.len() + MAX_SEAL_BYTES);
    out.extend_from_slice(body);
    out.push(b'\n');
    serde_json::to_writer(&mut out, &s).expect("seals always serialise");
    (out, mac)
}

/// A datagram's body, and its seal when it has one (JSON bodies as written never hold a
/// raw newline, so the first one ends the body).
pub fn open(datagram: &[u8]) -> (&[u8], Option<Result<Seal, String>>) {
    match datagram.iter().position(|&b| b == b'\n') {
        None => (datagram, None),
        Some(at) => {
            let seal = serde_json::from_slice::<Seal>(&datagram[at + 1..])
                .map_err(|e| format!("unreadable seal: {e}"));
            (&datagram[..at], Some(seal))
        }
    }
}

/// What a party that asks the rendezvous (a transmitter, a sidecar, the operator, `up`)
/// seals with and accepts answers by.
#[derive(Clone)]
pub struct Sealer {
    role: &'static str,
    context: String,
    /// Seals with the first; answers open with any (two during a token rotation).
    keys: Vec<Key>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({} of {:?})", self.role, self.context) // never the keys
    }
}

/// Why an answer was not taken.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AnswerError {
    #[error("not sealed")]
    Unsealed,
    #[error("{0}")]
    Unreadable(String),
    #[error("not sealed by the rendezvous with our key")]
    BadSeal,
    #[error("not an answer to a request of ours")]
    NotOurs,
    #[error("stale or replayed")]
    Stale,
}

impl Sealer {
    /// A transmitter (or the operator, or `up`) of `mesh`, holding the mesh `tokens`.
    pub fn peer(tokens: &[Vec<u8>], mesh: &str) -> Option<Sealer> {
        (!tokens.is_empty()).then(|| Sealer {
            role: "peer",
            context: mesh.into(),
            keys: tokens.iter().map(|t| Key::mesh(t)).collect(),
        })
    }

    /// A cell of `service`, holding only its Service's key.
    pub fn cell(key: Key, service: &str) -> Sealer {
        Sealer {
            role: "cell",
            context: service.into(),
            keys: vec![key],
        }
    }

    /// A request: the datagram to send, and its MAC (what its answers carry as `re`).
    pub fn request(&self, body: &[u8], now_ms: u64) -> (Vec<u8>, String) {
        seal(body, &self.keys[0], self.role, &self.context, now_ms, "")
    }

    /// The body and time of an answer to one of our requests (`asked` tells whether a
    /// MAC is one of ours).
    pub fn answer<'a>(
        &self,
        datagram: &'a [u8],
        asked: impl Fn(&str) -> bool,
    ) -> Result<(&'a [u8], u64), AnswerError> {
        let (body, seal) = self.opened(datagram)?;
        if seal.re.is_empty() || !asked(&seal.re) {
            return Err(AnswerError::NotOurs);
        }
        Ok((body, seal.ts))
    }

    /// A datagram the rendezvous sent unasked (`hosting`): its body and time, once it is
    /// within the window of `now_ms`. The caller keeps only those newer than the last.
    pub fn unasked<'a>(
        &self,
        datagram: &'a [u8],
        now_ms: u64,
    ) -> Result<(&'a [u8], u64), AnswerError> {
        let (body, seal) = self.opened(datagram)?;
        if !seal.re.is_empty() {
            return Err(AnswerError::NotOurs);
        }
        if seal.ts.abs_diff(now_ms) > WINDOW_MS {
            return Err(AnswerError::Stale);
        }
        Ok((body, seal.ts))
    }

    fn opened<'a>(&self, datagram: &'a [u8]) -> Result<(&'a [u8], Seal), AnswerError> {
        let (body, seal) = open(datagram);
        let seal = seal
            .ok_or(AnswerError::Unsealed)?
            .map_err(AnswerError::Unreadable)?;
        let ours = seal.role == "rendezvous" && seal.context == self.context;
        if !ours || !self.keys.iter().any(|k| seal.opens_with(k, body)) {
            return Err(AnswerError::BadSeal);
        }
        Ok((body, seal))
    }
}

/// Requests a rendezvous remembers at most (about 100 bytes each) to refuse replays; when
/// full, the oldest goes and nothing older than it is taken any more.
pub const MAX_REMEMBERED: usize = 131_072;

/// Why a request was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("authenticate: datagrams to this rendezvous must be sealed (docs/protocol.md, \"Sealed datagrams\")")]
    Unsealed,
    #[error("{0}")]
    Unreadable(String),
    #[error("a seal must be by role \"peer\" of this mesh or \"cell\" of a Service")]
    Role,
    #[error("the seal does not open with a key of this mesh's token (another token, or a cell's key derived for other permissions than it names)")]
    BadSeal,
    #[error(
        "the seal's time is more than 30 s from this rendezvous' clock (are the clocks right?)"
    )]
    Stale,
    #[error("a replayed request (or one sealed before this rendezvous started, or older than what it had to forget)")]
    Replayed,
}

/// A request the rendezvous took: its body, and what its answers are sealed with.
#[derive(Debug)]
pub struct Taken<'a> {
    pub body: &'a [u8],
    pub role: String,
    pub context: String,
    pub key: Key,
    /// The request's MAC: the answers' `re`.
    pub mac: String,
}

impl Taken<'_> {
    /// An answer to this request.
    pub fn answer(&self, body: &[u8], now_ms: u64) -> Vec<u8> {
        seal(
            body,
            &self.key,
            "rendezvous",
            &self.context,
            now_ms,
            &self.mac,
        )
        .0
    }
}

/// The rendezvous' side: opens requests with the token(s) and refuses replays. Pure: the
/// time is passed in.
pub struct Opener {
    mesh: String,
    tokens: Vec<Vec<u8>>,
    /// Seals taken within the window, one memory per role: what cells send (any Service's
    /// key) can crowd out only other cells' requests, never the transmitters'.
    peers: Memory,
    cells: Memory,
}

/// The seals one role had taken, by time: full, it forgets the oldest time first, and
/// takes nothing at or before a time it forgot, so forgetting never lets a replay in.
struct Memory {
    seen: HashSet<[u8; 32]>,
    by_time: BTreeSet<(u64, [u8; 32])>,
    floor: u64,
    capacity: usize,
}

impl Memory {
    fn new(capacity: usize, started_ms: u64) -> Memory {
        Memory {
            seen: HashSet::new(),
            by_time: BTreeSet::new(),
            // A request sealed before this process started was meant for another (a
            // previous instance took it, perhaps): not taken.
            floor: started_ms.saturating_sub(1),
            capacity,
        }
    }

    /// Whether `(ts, mac)` is new; remembers it.
    fn take(&mut self, ts: u64, mac: [u8; 32], now_ms: u64) -> bool {
        let horizon = now_ms.saturating_sub(WINDOW_MS);
        while let Some(&(t, m)) = self.by_time.first() {
            if t >= horizon {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&m);
        }
        if ts <= self.floor || !self.seen.insert(mac) {
            return false;
        }
        self.by_time.insert((ts, mac));
        if self.by_time.len() > self.capacity {
            if let Some((t, m)) = self.by_time.pop_first() {
                self.seen.remove(&m);
                self.floor = self.floor.max(t);
            }
        }
        true
    }
}

impl Opener {
    /// `started_ms`: when this process started (its clock).
    pub fn new(mesh: &str, tokens: Vec<Vec<u8>>, started_ms: u64) -> Opener {
        Opener::remembering(mesh, tokens, MAX_REMEMBERED, started_ms)
    }

    fn remembering(mesh: &str, tokens: Vec<Vec<u8>>, capacity: usize, started_ms: u64) -> Opener {
        Opener {
            mesh: mesh.into(),
            tokens,
            peers: Memory::new(capacity, started_ms),
            cells: Memory::new(capacity, started_ms),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// A `hosting` datagram sent unasked to a transmitter of this mesh.
    pub fn unasked(&self, body: &[u8], now_ms: u64) -> Vec<u8> {
        match self.tokens.first() {
            Some(t) => seal(body, &Key::mesh(t), "rendezvous", &self.mesh, now_ms, "").0,
            None => body.to_vec(),
        }
    }

    /// Opens a sealed request, once.
    pub fn take<'a>(&mut self, datagram: &'a [u8], now_ms: u64) -> Result<Taken<'a>, RequestError> {
        let (body, seal) = open(datagram);
        let seal = seal
            .ok_or(RequestError::Unsealed)?
            .map_err(RequestError::Unreadable)?;
        // Bounded as written in a seal (JSON escapes), so every answer's seal fits.
        let fits =
            || serde_json::to_string(&seal.context).map_or(0, |c| c.len()) <= MAX_CONTEXT_BYTES;
        let key_of = |t: &[u8]| match seal.role.as_str() {
            "peer" if seal.context == self.mesh => Some(Key::mesh(t)),
            "cell" if fits() => Some(Key::service(t, &seal.context)),
            _ => None,
        };
        if self.tokens.first().and_then(|t| key_of(t)).is_none() {
            return Err(RequestError::Role);
        }
        let key = self
            .tokens
            .iter()
            .filter_map(|t| key_of(t))
            .find(|k| seal.opens_with(k, body))
            .ok_or(RequestError::BadSeal)?;
        if seal.ts.abs_diff(now_ms) > WINDOW_MS {
            return Err(RequestError::Stale);
        }
        let mac: [u8; 32] = hex::decode(&seal.mac)
            .ok()
            .and_then(|m| m.try_into().ok())
            .ok_or(RequestError::BadSeal)?;
        let memory = if seal.role == "peer" {
            &mut self.peers
        } else {
            &mut self.cells
        };
        if !memory.take(seal.ts, mac, now_ms) {
            return Err(RequestError::Replayed);
        }
        Ok(Taken {
            body,
            role: seal.role,
            context: seal.context,
            key,
            mac: seal.mac,
        })
    }

    /// Seals remembered, both roles.
    pub fn remembered(&self) -> usize {
        self.peers.by_time.len() + self.cells.by_time.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn transmitter() -> Sealer {
        Sealer::peer(&[b"token".to_vec()], "demo").unwrap()
    }

    #[test]
    fn a_sealed_request_is_taken_once_and_its_answer_opens_for_the_asker_only() {
        let mut rv = Opener::new("demo", vec![b"token".to_vec()], 0);
        let t = transmitter();
        let (request, mac) = t.request(br#"{"type":"query","mesh":"demo"}"#, NOW);
        let taken = rv.take(&request, NOW + 5).unwrap();
        assert_eq!(taken.body, br#"{"type":"query","mesh":"demo"}"#);
        assert_eq!(
            (taken.role.as_str(), taken.context.as_str()),
            ("peer", "demo")
        );
        assert_eq!(
            rv.take(&request, NOW + 6).unwrap_err(),
            RequestError::Replayed
        );
        let answer = taken.answer(b"{\"type\":\"peers\"}", NOW + 7);
        assert_eq!(
            t.answer(&answer, |re| re == mac).unwrap(),
            (&b"{\"type\":\"peers\"}"[..], NOW + 7)
        );
        assert_eq!(
            t.answer(&answer, |_| false).unwrap_err(),
            AnswerError::NotOurs
        );
        // A cell's key does not open the mesh's answers, nor another Service's.
        let cell = Sealer::cell(Key::service(b"token", "orders"), "orders");
        assert_eq!(
            cell.answer(&answer, |_| true).unwrap_err(),
            AnswerError::BadSeal
        );
        let (request, mac) = cell.request(b"{}", NOW);
        let answer = rv.take(&request, NOW).unwrap().answer(b"[]", NOW);
        assert_eq!(cell.answer(&answer, |re| re == mac).unwrap().0, b"[]");
        let other = Sealer::cell(Key::service(b"token", "billing"), "billing");
        assert_eq!(
            other.answer(&answer, |_| true).unwrap_err(),
            AnswerError::BadSeal
        );
    }

    #[test]
    fn unsealed_forged_stale_or_foreign_requests_are_refused() {
        let mut rv = Opener::new("demo", vec![b"token".to_vec()], 0);
        assert_eq!(rv.take(b"{}", NOW).unwrap_err(), RequestError::Unsealed);
        assert!(matches!(
            rv.take(b"{}\nnope", NOW),
            Err(RequestError::Unreadable(_))
        ));
        let guess = Sealer::peer(&[b"guess".to_vec()], "demo").unwrap();
        assert_eq!(
            rv.take(&guess.request(b"{}", NOW).0, NOW).unwrap_err(),
            RequestError::BadSeal
        );
        let other_mesh = Sealer::peer(&[b"token".to_vec()], "other").unwrap();
        assert_eq!(
            rv.take(&other_mesh.request(b"{}", NOW).0, NOW).unwrap_err(),
            RequestError::Role
        );
        let (old, _) = transmitter().request(b"{}", NOW - WINDOW_MS - 1);
        assert_eq!(rv.take(&old, NOW).unwrap_err(), RequestError::Stale);
        let (ahead, _) = transmitter().request(b"{}", NOW + WINDOW_MS + 1);
        assert_eq!(rv.take(&ahead, NOW).unwrap_err(), RequestError::Stale);
        // The body cannot be changed under its seal.
        let (mut request, _) = transmitter().request(b"{\"a\":1}", NOW);
        request[5] = b'2';
        assert_eq!(rv.take(&request, NOW).unwrap_err(), RequestError::BadSeal);
        // Nor can the seal's time be moved.
        let (request, _) = transmitter().request(b"{}", NOW - 20_000);
        let moved = String::from_utf8(request)
            .unwrap()
            .replace(&(NOW - 20_000).to_string(), &NOW.to_string());
        assert_eq!(
            rv.take(moved.as_bytes(), NOW).unwrap_err(),
            RequestError::BadSeal
        );
    }

    #[test]
    fn either_token_opens_during_a_rotation_and_answers_use_the_askers() {
        let mut rv = Opener::new("demo", vec![b"new".to_vec(), b"old".to_vec()], 0);
        let old = Sealer::peer(&[b"old".to_vec()], "demo").unwrap();
        let (request, mac) = old.request(b"{}", NOW);
        let answer = rv.take(&request, NOW).unwrap().answer(b"{}", NOW);
        assert!(old.answer(&answer, |re| re == mac).is_ok());
        // A transmitter holding both opens what the rendezvous sends unasked with the new.
        let both = Sealer::peer(&[b"old".to_vec(), b"new".to_vec()], "demo").unwrap();
        let hosting = rv.unasked(b"{\"type\":\"hosting\"}", NOW);
        assert_eq!(
            both.unasked(&hosting, NOW + 10).unwrap(),
            (&b"{\"type\":\"hosting\"}"[..], NOW)
        );
        assert_eq!(
            old.unasked(&hosting, NOW).unwrap_err(),
            AnswerError::BadSeal
        );
        assert_eq!(
            both.unasked(&hosting, NOW + WINDOW_MS + 1).unwrap_err(),
            AnswerError::Stale
        );
        assert_eq!(
            both.unasked(&answer, NOW).unwrap_err(),
            AnswerError::NotOurs,
            "an answer is not unasked"
        );
    }

    #[test]
    fn replays_stay_refused_when_the_memory_is_full() {
        let mut rv = Opener::remembering("demo", vec![b"token".to_vec()], 100, 0);
        let t = transmitter();
        let first = t.request(b"{}", NOW).0;
        rv.take(&first, NOW).unwrap();
        for i in 0..100 {
            rv.take(&t.request(b"{}", NOW + 1 + i / 50).0, NOW).unwrap();
        }
        assert_eq!(rv.remembered(), 100);
        assert_eq!(
            rv.take(&first, NOW).unwrap_err(),
            RequestError::Replayed,
            "forgotten, yet refused"
        );
        // Past the window everything old is forgotten, and new requests are taken.
        let later = NOW + WINDOW_MS + 10;
        rv.take(&t.request(b"{}", later).0, later).unwrap();
        assert_eq!(rv.remembered(), 1);
    }

    #[test]
    fn cells_flooding_future_seals_cannot_lock_the_transmitters_out() {
        let mut rv = Opener::remembering("demo", vec![b"token".to_vec()], 100, 0);
        // A cell (any Service's key will do) floods seals 29 s ahead: once its memory is
        // full, cells' requests older than the flood are refused (a limit, documented)...
        let cell = Sealer::cell(Key::service(b"token", "s"), "s");
        for _ in 0..300 {
            let _ = rv.take(&cell.request(b"{}", NOW + 29_000).0, NOW);
        }
        assert_eq!(
            rv.take(&cell.request(b"{}", NOW).0, NOW).unwrap_err(),
            RequestError::Replayed
        );
        // ...but transmitters keep their own memory: their announcements are taken.
        for i in 0..10 {
            rv.take(&transmitter().request(b"{}", NOW + i).0, NOW)
                .unwrap();
        }
    }

    #[test]
    fn a_request_sealed_before_the_rendezvous_started_is_not_taken() {
        let mut rv = Opener::new("demo", vec![b"token".to_vec()], NOW);
        let early = transmitter().request(b"{}", NOW - 5).0;
        assert_eq!(rv.take(&early, NOW).unwrap_err(), RequestError::Replayed);
        rv.take(&transmitter().request(b"{}", NOW).0, NOW).unwrap();
    }

    #[test]
    fn known_answer() {
        // HMAC-SHA-256(HMAC-SHA-256("token", "thynapse mesh"), each part after its length
        // as a u64le: "thynapse datagram", "peer", "demo", "1800000000000", "n1", "",
        // the body), checked with Python's hmac.
        let key = Key::mesh(b"token");
        let mac = Seal::compute(&key, "peer", "demo", NOW, "n1", "", b"{}")
            .finalize()
            .into_bytes();
        assert_eq!(hex::encode(mac), KNOWN_MAC);
    }

    const KNOWN_MAC: &str = "570b70e9d848849b3c78bce9afb1548ce20342e11835bfeaedd49700043f8eb6";
}
