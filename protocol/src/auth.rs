//! Mesh authentication (docs/protocol.md, "Authentication"): a challenge–response with
//! HMAC-SHA-256 (RustCrypto's `hmac` and `sha2`), keys derived from the mesh token.
//!
//! A connection's first exchange proves who is on each end before anything else is read:
//! the client asks (`AUTH`), the server answers a fresh nonce (`CHAL`), the client proves it
//! knows the key with an HMAC over that nonce and sends a nonce of its own, and the server
//! proves the same over that one (`AUTD`). A proof is good for one nonce only, so a
//! recorded one is worth nothing; no clock is involved.
//!
//! Cells prove their Service with that Service's key, `HMAC(token, "thynapse service " +
//! name)`, which is all a cell's pod needs to hold; transmitters and rendezvous points use
//! the mesh key, `HMAC(token, "thynapse mesh")`, and derive any Service's key from the
//! token. During a rotation a server holds two tokens and accepts a proof by either.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::crypt::{Channel, CryptError, Ephemeral, Side};

/// An HMAC-SHA-256 computation, finished by the caller (`finalize` or `verify_slice`).
pub type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce (hex on the wire).
pub const NONCE_BYTES: usize = 16;

/// A 32-byte key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)") // never logged
    }
}

impl Key {
    fn derive(secret: &[u8], label: &[u8]) -> Key {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(label);
        Key(mac.finalize().into_bytes().into())
    }

    /// The key of the mesh itself (transmitters, rendezvous points) from its token.
    pub fn mesh(token: &[u8]) -> Key {
        Key::derive(token, b"thynapse mesh")
    }

    /// The key of one Service's cells, from the mesh token.
    pub fn service(token: &[u8], service: &str) -> Key {
        Key::derive(token, format!("thynapse service {service}").as_bytes())
    }

    /// A key written as 64 hex digits (a Service key file), or None.
    pub fn from_hex(text: &str) -> Option<Key> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(Key(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The proof of `role` ("cell", "peer", "server") over `nonce` and `context` (the
    /// Service or mesh name), as hex.
    pub fn prove(&self, role: &str, nonce: &str, context: &str) -> String {
        hex::encode(self.mac(role, nonce, context).finalize().into_bytes())
    }

    /// Whether `proof` is this key's proof of `role` over `nonce` and `context`, compared
    /// in constant time.
    pub fn verify(&self, role: &str, nonce: &str, context: &str, proof: &str) -> bool {
        match hex::decode(proof) {
            Ok(bytes) => self.mac(role, nonce, context).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    fn mac(&self, role: &str, nonce: &str, context: &str) -> HmacSha256 {
        self.mac_over(&[role.as_bytes(), nonce.as_bytes(), context.as_bytes()])
    }

    /// The HMAC over `parts`, each preceded by its length (a u64, little-endian), so that
    /// no two lists of parts give the same input.
    pub fn mac_over(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

/// A fresh random nonce, as hex.
pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; NONCE_BYTES]>())
}

/// What a proof is over: the Service (or mesh) and the command endpoint the client dialed,
/// so that a proof made for one server is worth nothing at another (a relay: someone
/// posing as a transmitter passes a real one's nonce to a cell, then its proof back).
pub fn bound_to(context: &str, server: &str) -> String {
    format!("{context}@{server}")
}

/// What the proofs of an encrypted connection are over: the bound and the ephemeral
/// public keys (the client's in its proof, both in the server's), so that nobody in
/// between can swap them or strip the request for encryption.
pub fn bound_with_keys(bound: &str, public_keys: &[&str]) -> String {
    public_keys
        .iter()
        .fold(bound.to_string(), |b, k| format!("{b} encrypt {k}"))
}

/// What an encrypted connection's keys are derived over, besides the Diffie–Hellman
/// secret: the whole exchange, as both ends saw it.
pub fn transcript<'a>(
    server_nonce: &'a str,
    challenge: &'a str,
    bound: &'a str,
    client_key: &'a str,
    server_key: &'a str,
) -> [&'a [u8]; 5] {
    [server_nonce, challenge, bound, client_key, server_key].map(str::as_bytes)
}

/// The tokens of a mesh from a token file: one per non-empty line (two during a
/// rotation; the first is the one this process proves with).
pub fn tokens_from(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// What a server checks proofs against: every token it holds.
#[derive(Clone, Default)]
pub struct Verifier {
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({} tokens)", self.tokens.len()) // never the tokens
    }
}

impl Verifier {
    pub fn new(tokens: Vec<Vec<u8>>) -> Verifier {
        Verifier { tokens }
    }

    /// Whether authentication is on (some token configured).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The key that verifies a client's proof (`role` "cell" with its Service, or
    /// "peer" with the mesh name), if any of the tokens does. The server proves itself
    /// back with the same key.
    pub fn check(&self, role: &str, context: &str, nonce: &str, proof: &str) -> Option<Key> {
        self.check_bound(role, context, nonce, context, proof)
    }

    /// `check`, for a proof over `bound` (the context and the server it was meant for,
    /// `bound_to`) with the key of `context`.
    pub fn check_bound(
        &self,
        role: &str,
        context: &str,
        nonce: &str,
        bound: &str,
        proof: &str,
    ) -> Option<Key> {
        self.tokens.iter().find_map(|t| {
            let key = match role {
                "cell" => Key::service(t, context),
                _ => Key::mesh(t),
            };
            key.verify(role, nonce, bound, proof).then_some(key)
        })
    }

    /// The key this process proves itself with as a peer (the first token's).
    pub fn mesh_key(&self) -> Option<Key> {
        self.tokens.first().map(|t| Key::mesh(t))
    }
}

/// The client's side of the exchange, without I/O: `hello` is sent first; the answer to
/// it goes to `on_challenge`, whose result is sent; the answer to that goes to `on_done`.
pub struct ClientAuth {
    key: Key,
    role: &'static str,
    context: String,
    /// The context and the server dialed: what the proofs are over.
    bound: String,
    challenge: String,
    /// Our ephemeral key, when we ask for encryption.
    ephemeral: Option<Ephemeral>,
    /// The server's nonce, once `CHAL` came.
    server_nonce: String,
}

/// Why a server was not accepted (or refused us).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("unexpected answer {0:?}")]
    Unexpected(String),
    #[error("the server's proof is wrong: it does not hold the mesh token")]
    BadServerProof,
    #[error("the server did not agree to encrypt the connection")]
    NotEncrypted,
    #[error("encryption: {0}")]
    Crypt(#[from] CryptError),
}

impl ClientAuth {
    /// A cell of `service` proving it with the Service's key to the transmitter whose
    /// command endpoint is `server`.
    pub fn cell(key: Key, service: &str, server: &str) -> ClientAuth {
        ClientAuth::new(key, "cell", service, server)
    }

    /// A transmitter of mesh `mesh` proving it with the mesh key to the peer at `server`.
    pub fn peer(key: Key, mesh: &str, server: &str) -> ClientAuth {
        ClientAuth::new(key, "peer", mesh, server)
    }

    fn new(key: Key, role: &'static str, context: &str, server: &str) -> ClientAuth {
        ClientAuth {
            key,
            role,
            context: context.to_string(),
            bound: bound_to(context, server),
            challenge: nonce(),
            ephemeral: None,
            server_nonce: String::new(),
        }
    }

    /// With `on`, asks that the connection be encrypted: `on_done` then gives its channel.
    pub fn encrypted(mut self, on: bool) -> ClientAuth {
        self.ephemeral = on.then(Ephemeral::new);
        self
    }

    /// `J AUTH` asking for a challenge.
    pub fn hello(&self) -> Vec<u8> {
        let auth = crate::wire::Auth {
            role: self.role.into(),
            context: self.context.clone(),
            nonce: None,
            proof: None,
            challenge: None,
            encrypt: None,
        };
        json_frame(crate::wire::cmd::AUTH, &auth)
    }

    fn public_key(&self) -> Option<&str> {
        self.ephemeral.as_ref().map(Ephemeral::public)
    }

    /// The answer to `CHAL`: the proof over its nonce, and our own challenge.
    pub fn on_challenge(&mut self, frame: &[u8]) -> Result<Vec<u8>, AuthError> {
        let chal: crate::wire::Challenge = expect(frame, crate::wire::cmd::CHAL)?;
        let mine: Vec<&str> = self.public_key().into_iter().collect();
        let over = bound_with_keys(&self.bound, &mine);
        let auth = crate::wire::Auth {
            role: self.role.into(),
            context: self.context.clone(),
            proof: Some(self.key.prove(self.role, &chal.nonce, &over)),
            nonce: Some(chal.nonce.clone()),
            challenge: Some(self.challenge.clone()),
            encrypt: self.public_key().map(str::to_string),
        };
        self.server_nonce = chal.nonce;
        Ok(json_frame(crate::wire::cmd::AUTH, &auth))
    }

    /// Checks `AUTD`: the server proved it holds the same key. When we asked for
    /// encryption, the connection's channel (and a server that did not agree is refused).
    pub fn on_done(&mut self, frame: &[u8]) -> Result<Option<Channel>, AuthError> {
        let done: crate::wire::Authenticated = expect(frame, crate::wire::cmd::AUTD)?;
        let keys: Vec<&str> = self
            .public_key()
            .into_iter()
            .chain(done.encrypt.as_deref())
            .collect();
        let over = bound_with_keys(&self.bound, &keys);
        if !self
            .key
            .verify("server", &self.challenge, &over, &done.proof)
        {
            return Err(AuthError::BadServerProof);
        }
        let Some(ephemeral) = self.ephemeral.take() else {
            return Ok(None);
        };
        let theirs = done.encrypt.as_deref().ok_or(AuthError::NotEncrypted)?;
        let mine = ephemeral.public().to_string();
        let t = transcript(
            &self.server_nonce,
            &self.challenge,
            &self.bound,
            &mine,
            theirs,
        );
        let channel = ephemeral.agree(theirs, Side::Client, &self.key, &t)?;
        Ok(Some(channel))
    }
}

fn json_frame<T: serde::Serialize>(cmd: &[u8; 4], body: &T) -> Vec<u8> {
    crate::frame::CommandFrame::json(cmd, body)
        .to_bytes()
        .to_vec()
}

fn expect<T: serde::de::DeserializeOwned>(frame: &[u8], cmd: &[u8; 4]) -> Result<T, AuthError> {
    let unexpected = || {
        let shown = &frame[..frame.len().min(200)];
        AuthError::Unexpected(String::from_utf8_lossy(shown).into_owned())
    };
    let bytes = bytes::Bytes::copy_from_slice(frame);
    let parsed = crate::frame::CommandFrame::parse(&bytes).map_err(|_| unexpected())?;
    if &parsed.cmd == crate::wire::cmd::ERRR {
        let error: crate::wire::ErrorReply = parsed.decode_json().map_err(|_| unexpected())?;
        return Err(AuthError::Refused(error.error));
    }
    if &parsed.cmd != cmd {
        return Err(unexpected());
    }
    parsed.decode_json().map_err(|_| unexpected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_its_key_role_nonce_and_context_only() {
        let key = Key::service(b"token", "orders");
        let n = nonce();
        let proof = key.prove("cell", &n, "orders");
        assert!(key.verify("cell", &n, "orders", &proof));
        assert!(
            !key.verify("cell", &nonce(), "orders", &proof),
            "another nonce"
        );
        assert!(
            !key.verify("cell", &n, "billing", &proof),
            "another Service"
        );
        assert!(!key.verify("peer", &n, "orders", &proof), "another role");
        assert!(!Key::service(b"other", "orders").verify("cell", &n, "orders", &proof));
        assert!(!key.verify("cell", &n, "orders", "zz"), "not hex");
        assert!(!key.verify("cell", &n, "orders", &proof[..10]), "cut short");
    }

    #[test]
    fn service_keys_differ_by_service_and_from_the_mesh_key() {
        let (a, b) = (Key::service(b"t", "a"), Key::service(b"t", "b"));
        assert_ne!(a, b);
        assert_ne!(a, Key::mesh(b"t"));
        assert_eq!(Key::from_hex(&a.to_hex()), Some(a));
        assert_eq!(Key::from_hex("abc"), None);
    }

    #[test]
    fn a_verifier_takes_either_token_during_a_rotation() {
        let v = Verifier::new(tokens_from("new\nold\n\n"));
        let n = nonce();
        let old = Key::service(b"old", "s").prove("cell", &n, "s");
        assert_eq!(
            v.check("cell", "s", &n, &old),
            Some(Key::service(b"old", "s"))
        );
        let peer = Key::mesh(b"new").prove("peer", &n, "mesh");
        assert!(v.check("peer", "mesh", &n, &peer).is_some());
        assert!(v
            .check(
                "cell",
                "s",
                &n,
                &Key::service(b"x", "s").prove("cell", &n, "s")
            )
            .is_none());
        assert_eq!(v.mesh_key(), Some(Key::mesh(b"new")));
        assert!(!Verifier::default().enabled());
    }

    #[test]
    fn a_client_and_a_server_prove_themselves_to_each_other() {
        let token = b"token".to_vec();
        let server_at = "tcp://10.0.0.1:7000";
        let mut client = ClientAuth::cell(Key::service(&token, "orders"), "orders", server_at);
        let asked: crate::wire::Auth = decode(&client.hello());
        assert_eq!((asked.role.as_str(), asked.proof), ("cell", None));
        // The server's side, as the transmitter does it.
        let n = nonce();
        let answer = client
            .on_challenge(&json_frame(
                crate::wire::cmd::CHAL,
                &crate::wire::Challenge { nonce: n.clone() },
            ))
            .unwrap();
        let auth: crate::wire::Auth = decode(&answer);
        let server = Verifier::new(vec![token]);
        let proof = auth.proof.as_deref().unwrap();
        let bound = bound_to("orders", server_at);
        assert!(
            server
                .check_bound(
                    "cell",
                    "orders",
                    &n,
                    &bound_to("orders", "tcp://10.0.0.9:7000"),
                    proof
                )
                .is_none(),
            "a proof made for one server is refused by another (a relay)"
        );
        let key = server
            .check_bound("cell", "orders", &n, &bound, proof)
            .expect("a good proof");
        let proof = key.prove("server", auth.challenge.as_deref().unwrap(), &bound);
        let done = json_frame(
            crate::wire::cmd::AUTD,
            &crate::wire::Authenticated {
                proof,
                encrypt: None,
            },
        );
        assert!(client.on_done(&done).unwrap().is_none(), "not encrypted");
        // A server without the token cannot prove itself; a refusal reads as one.
        let forged = Key::service(b"guess", "orders").prove(
            "server",
            auth.challenge.as_deref().unwrap(),
            "orders",
        );
        let done = json_frame(
            crate::wire::cmd::AUTD,
            &crate::wire::Authenticated {
                proof: forged,
                encrypt: None,
            },
        );
        assert!(matches!(
            client.on_done(&done),
            Err(AuthError::BadServerProof)
        ));
        let refused = json_frame(crate::wire::cmd::ERRR, &serde_json::json!({"error": "no"}));
        assert!(matches!(client.on_challenge(&refused), Err(AuthError::Refused(e)) if e == "no"));
    }

    fn decode<T: serde::de::DeserializeOwned>(frame: &[u8]) -> T {
        let bytes = bytes::Bytes::copy_from_slice(frame);
        crate::frame::CommandFrame::parse(&bytes)
            .unwrap()
            .decode_json()
            .unwrap()
    }

    #[test]
    fn known_answer() {
        // HMAC-SHA-256(key = HMAC-SHA-256("token", "thynapse mesh"),
        //   u64le(4) "peer" u64le(2) "n1" u64le(4) "demo"), checked with Python's hmac.
        let proof = Key::mesh(b"token").prove("peer", "n1", "demo");
        assert_eq!(proof.len(), 64);
        assert_eq!(proof, KNOWN_PEER_PROOF);
    }

    const KNOWN_PEER_PROOF: &str =
        "779769ae1d4eac356cf634037cef77cfdf5c5191cd873e28f13b1ed10f8e107f";
}
