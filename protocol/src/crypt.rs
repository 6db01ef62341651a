//! Encryption in transit (docs/protocol.md, "Encryption"): a connection that asked for it
//! in `AUTH` carries every later message as one sealed frame, ChaCha20-Poly1305 (`ring`)
//! under keys of its own.
//!
//! Each end brings an ephemeral X25519 key; both public keys are covered by the AUTH
//! proofs, so nobody in between can swap them. The two direction keys are derived from the
//! Diffie–Hellman secret *and* the key that was proved (Service or mesh) over the whole
//! exchange: recording a connection and later learning the token does not decrypt it, and
//! another cell of the same Service cannot read this one's traffic.
//!
//! A sealed message is `counter (u64 LE) ‖ AEAD(frames)`, the frames each preceded by
//! their length (u32 LE), the nonce being the counter. Counters only grow: a replayed or
//! reordered message is refused; a gap (a message dropped by the sender's socket) is not.

use bytes::{BufMut, Bytes, BytesMut};
use hmac::Mac;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;

use crate::auth::Key;

/// Bytes a sealed message adds: the counter and the tag (and 4 per frame).
pub const OVERHEAD: usize = 8 + 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptError {
    #[error("not an X25519 public key (64 hex digits)")]
    PublicKey,
    #[error("a sealed message too short to hold its counter and tag")]
    Short,
    #[error("a sealed message whose counter does not grow (replayed or reordered)")]
    Replayed,
    #[error("a sealed message that does not open with this connection's key")]
    Forged,
    #[error("a sealed message whose frames do not add up")]
    Framing,
    #[error("this connection's counter is exhausted")]
    Exhausted,
}

/// Which end of the connection we are (each end seals with its own direction's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The end that dialed and sent `AUTH`.
    Client,
    /// The transmitter that answered.
    Server,
}

/// One end's ephemeral X25519 key, for one connection.
pub struct Ephemeral {
    private: EphemeralPrivateKey,
    public: String,
}

impl Ephemeral {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Ephemeral {
        let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
            .expect("the system's random source works");
        let public = hex::encode(
            private
                .compute_public_key()
                .expect("a fresh X25519 key has a public key"),
        );
        Ephemeral { private, public }
    }

    /// The public key, as 64 hex digits (what `AUTH` and `AUTD` carry).
    pub fn public(&self) -> &str {
        &self.public
    }

    /// The connection's channel, from the other end's public key, the key that was
    /// proved, and the exchange both proofs covered (`transcript`).
    pub fn agree(
        self,
        theirs: &str,
        side: Side,
        key: &Key,
        transcript: &[&[u8]],
    ) -> Result<Channel, CryptError> {
        let theirs = hex::decode(theirs).map_err(|_| CryptError::PublicKey)?;
        if theirs.len() != 32 {
            return Err(CryptError::PublicKey);
        }
        let peer = UnparsedPublicKey::new(&X25519, theirs);
        // ring refuses a low-order point (an all-zero secret) here.
        let secret = agree_ephemeral(self.private, &peer, |s| s.to_vec())
            .map_err(|_| CryptError::PublicKey)?;
        let direction = |label: &[u8]| {
            let mut parts: Vec<&[u8]> = vec![b"thynapse encrypt", label, &secret];
            parts.extend_from_slice(transcript);
            let bytes: [u8; 32] = key.mac_over(&parts).finalize().into_bytes().into();
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("32 bytes"))
        };
        let (to_server, to_client) = (
            direction(b"client to server"),
            direction(b"server to client"),
        );
        let (seal, open) = match side {
            Side::Client => (to_server, to_client),
            Side::Server => (to_client, to_server),
        };
        Ok(Channel {
            seal: Encrypt { key: seal, next: 0 },
            open: Decrypt {
                key: open,
                last: None,
            },
        })
    }
}

/// Both directions of one encrypted connection.
pub struct Channel {
    pub seal: Encrypt,
    pub open: Decrypt,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel(…)") // never the keys
    }
}

/// What this end sends.
pub struct Encrypt {
    key: LessSafeKey,
    next: u64,
}

/// What this end reads.
pub struct Decrypt {
    key: LessSafeKey,
    last: Option<u64>,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Encrypt {
    /// `frames` as one sealed frame.
    pub fn seal<'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a [u8]> + Clone,
    ) -> Result<Bytes, CryptError> {
        let counter = self.next;
        self.next = counter.checked_add(1).ok_or(CryptError::Exhausted)?;
        let plain: usize = frames.clone().into_iter().map(|f| 4 + f.len()).sum();
        let mut buf = BytesMut::with_capacity(OVERHEAD + plain);
        buf.put_u64_le(counter);
        for f in frames {
            buf.put_u32_le(u32::try_from(f.len()).map_err(|_| CryptError::Framing)?);
            buf.put_slice(f);
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut buf[8..])
            .map_err(|_| CryptError::Exhausted)?;
        buf.put_slice(tag.as_ref());
        Ok(buf.freeze())
    }
}

impl Decrypt {
    /// The frames of a sealed frame; nothing changes when it is refused.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<Bytes>, CryptError> {
        if sealed.len() < OVERHEAD {
            return Err(CryptError::Short);
        }
        let counter = u64::from_le_bytes(sealed[..8].try_into().expect("8 bytes"));
        if self.last.is_some_and(|last| counter <= last) {
            return Err(CryptError::Replayed);
        }
        let mut buf = sealed[8..].to_vec();
        let len = self
            .key
            .open_in_place(nonce(counter), Aad::empty(), &mut buf)
            .map_err(|_| CryptError::Forged)?
            .len();
        buf.truncate(len);
        self.last = Some(counter);
        let plain = Bytes::from(buf);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < plain.len() {
            let Some(head) = plain.get(at..at + 4) else {
                return Err(CryptError::Framing);
            };
            let n = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
            let end = (at + 4).checked_add(n).filter(|&e| e <= plain.len());
            let end = end.ok_or(CryptError::Framing)?;
            frames.push(plain.slice(at + 4..end));
            at = end;
        }
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, Channel) {
        let key = Key::service(b"token", "orders");
        let (c, s) = (Ephemeral::new(), Ephemeral::new());
        let (cp, sp) = (c.public().to_string(), s.public().to_string());
        let t: [&[u8]; 2] = [b"nonce", b"challenge"];
        let client = c.agree(&sp, Side::Client, &key, &t).unwrap();
        let server = s.agree(&cp, Side::Server, &key, &t).unwrap();
        (client, server)
    }

    #[test]
    fn what_one_end_seals_the_other_opens_in_order_and_once() {
        let (mut client, mut server) = pair();
        let frames: [&[u8]; 3] = [b"B PUBS", b"", b"payload"];
        let sealed = client.seal.seal(frames).unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"payload"), "encrypted");
        let opened = server.open.open(&sealed).unwrap();
        assert_eq!(opened, frames.map(Bytes::copy_from_slice));
        assert_eq!(server.open.open(&sealed), Err(CryptError::Replayed));
        // The other direction has its own key: a client's message does not open there.
        let back = client.seal.seal([&b"x"[..]]).unwrap();
        assert_eq!(client.open.open(&back), Err(CryptError::Forged));
        let reply = server.seal.seal([&b"J PONG {}"[..]]).unwrap();
        assert_eq!(
            client.open.open(&reply).unwrap(),
            [Bytes::from("J PONG {}")]
        );
        // A gap (a message the sender's socket dropped) is no reason to refuse.
        let _lost = client.seal.seal([&b"lost"[..]]).unwrap();
        assert_eq!(server.open.open(&back).unwrap(), [Bytes::from("x")]);
    }

    #[test]
    fn a_changed_byte_or_another_connection_refuses_and_changes_nothing() {
        let (mut client, mut server) = pair();
        let sealed = client.seal.seal([&b"hello"[..], &b"world"[..]]).unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.to_vec();
            bad[i] ^= 1;
            assert!(server.open.open(&bad).is_err(), "byte {i}");
        }
        assert_eq!(server.open.open(&sealed[..10]), Err(CryptError::Short));
        let (_, mut other) = pair();
        assert_eq!(other.open.open(&sealed), Err(CryptError::Forged));
        // Refusals moved no counter: the real message still opens.
        assert_eq!(server.open.open(&sealed).unwrap().len(), 2);
    }

    #[test]
    fn the_keys_depend_on_the_proved_key_and_the_transcript() {
        let opens = |ck: &Key, ct: &[u8], sk: &Key, st: &[u8]| {
            let (c, s) = (Ephemeral::new(), Ephemeral::new());
            let (cp, sp) = (c.public().to_string(), s.public().to_string());
            let mut client = c.agree(&sp, Side::Client, ck, &[ct]).unwrap();
            let mut server = s.agree(&cp, Side::Server, sk, &[st]).unwrap();
            server
                .open
                .open(&client.seal.seal([&b"m"[..]]).unwrap())
                .is_ok()
        };
        let (orders, billing) = (Key::service(b"t", "orders"), Key::service(b"t", "billing"));
        assert!(opens(&orders, b"x", &orders, b"x"));
        assert!(!opens(&orders, b"x", &billing, b"x"), "another key");
        assert!(!opens(&orders, b"x", &orders, b"y"), "another transcript");
        let key = &orders;
        assert!(Ephemeral::new()
            .agree("zz", Side::Client, key, &[])
            .is_err());
        let low_order = "00".repeat(32);
        assert!(Ephemeral::new()
            .agree(&low_order, Side::Client, key, &[])
            .is_err());
    }
}
