//! THIDs: 160-bit identifiers written as 40 lowercase hex digits. A message's THID is the
//! SHA-1 of its contents; cells and transmitters get random ones.

use std::fmt;
use std::str::FromStr;

use sha1::{Digest, Sha1};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Thid(pub [u8; 20]);

impl Thid {
    pub const LEN: usize = 20;

    /// The THID of some contents: their SHA-1.
    pub fn of(contents: &[u8]) -> Thid {
        Thid(Sha1::digest(contents).into())
    }

    /// The THID of several parts hashed in order (each prefixed by its length, so that
    /// `["ab", "c"]` and `["a", "bc"]` differ).
    pub fn of_parts(parts: &[&[u8]]) -> Thid {
        let mut hasher = Sha1::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        Thid(hasher.finalize().into())
    }

    pub fn random() -> Thid {
        Thid(rand::random())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Thid> {
        bytes.try_into().ok().map(Thid)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a THID is 40 hex digits")]
pub struct ThidParseError;

impl FromStr for Thid {
    type Err = ThidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 40 {
            return Err(ThidParseError);
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(s, &mut out).map_err(|_| ThidParseError)?;
        Ok(Thid(out))
    }
}

impl fmt::Display for Thid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Thid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thid({})", &self.to_hex()[..8])
    }
}

impl serde::Serialize for Thid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Thid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_event_thid_is_the_sha1_of_its_length_prefixed_parts() {
        // Known answer, from Python: sha1(pack('<Q', 10) + b'jobs.build' + pack('<Q', 5) + b'hello').
        assert_eq!(
            Thid::of_parts(&[b"jobs.build", b"hello"]).to_hex(),
            "9c99cfcbb4299b5944426f2ca4630ecdfb696019"
        );
    }

    use super::*;

    #[test]
    fn sha1_of_contents() {
        // SHA-1("abc") from FIPS 180-1.
        assert_eq!(
            Thid::of(b"abc").to_hex(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(
            Thid::of_parts(&[b"ab", b"c"]),
            Thid::of_parts(&[b"a", b"bc"])
        );
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let t = Thid::random();
        assert_eq!(t.to_hex().parse::<Thid>().unwrap(), t);
        assert!("xyz".parse::<Thid>().is_err());
        assert!("zz".repeat(20).parse::<Thid>().is_err());
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Thid>(&json).unwrap(), t);
    }
}
