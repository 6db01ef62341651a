//! Command frames: the first frame of every ZeroMQ message between cells and transmitters
//! and between transmitters, written `<enc> <CMD4> <payload>`, for example
//! `J HELO {"id": "…", "service": "orders"}`.
//!
//! `enc` says how to read what follows: `J` is a JSON payload in the same frame; `B` means
//! the payload is binary and travels in the next frame (the text after CMD4, if any, is a
//! JSON header).

use bytes::Bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// JSON payload inside the command frame.
    Json,
    /// Binary payload in the following frame.
    Binary,
}

impl Encoding {
    fn tag(self) -> u8 {
        match self {
            Encoding::Json => b'J',
            Encoding::Binary => b'B',
        }
    }
}

/// A parsed command frame. `payload` is what follows `<enc> <CMD4> ` (possibly empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandFrame {
    pub enc: Encoding,
    pub cmd: [u8; 4],
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("empty message")]
    Empty,
    #[error("command frame too short: expected `<enc> <CMD4> <payload>`")]
    TooShort,
    #[error("unknown encoding {0:?}: expected J or B")]
    BadEncoding(char),
    #[error("expected a space after the encoding and after the command")]
    MissingSpace,
    #[error("command must be 4 characters A-Z or _")]
    BadCommand,
    #[error("unknown command {0}")]
    UnknownCommand(String),
    #[error("invalid JSON payload for {cmd}: {error}")]
    BadJson { cmd: String, error: String },
    #[error("{0} needs a binary payload frame after the command frame")]
    MissingPayload(String),
    #[error("malformed binary batch: {0}")]
    BadBatch(&'static str),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl CommandFrame {
    pub fn new(enc: Encoding, cmd: &[u8; 4], payload: impl Into<Bytes>) -> Self {
        Self {
            enc,
            cmd: *cmd,
            payload: payload.into(),
        }
    }

    /// A JSON command frame from any serialisable value.
    pub fn json<T: serde::Serialize>(cmd: &[u8; 4], value: &T) -> Self {
        let payload = serde_json::to_vec(value).expect("protocol payloads always serialise");
        Self::new(Encoding::Json, cmd, payload)
    }

    pub fn parse(frame: &Bytes) -> Result<Self, FrameError> {
        if frame.is_empty() {
            return Err(FrameError::Empty);
        }
        if frame.len() < 6 {
            return Err(FrameError::TooShort);
        }
        let enc = match frame[0] {
            b'J' => Encoding::Json,
            b'B' => Encoding::Binary,
            other => return Err(FrameError::BadEncoding(other as char)),
        };
        if frame[1] != b' ' {
            return Err(FrameError::MissingSpace);
        }
        let cmd: [u8; 4] = frame[2..6].try_into().expect("length checked");
        if !cmd.iter().all(|c| c.is_ascii_uppercase() || *c == b'_') {
            return Err(FrameError::BadCommand);
        }
        let payload = match frame.len() {
            6 => Bytes::new(),
            _ if frame[6] == b' ' => frame.slice(7..),
            _ => return Err(FrameError::MissingSpace),
        };
        Ok(Self { enc, cmd, payload })
    }

    pub fn cmd_str(&self) -> &str {
        std::str::from_utf8(&self.cmd).unwrap_or("????")
    }

    /// Decodes the JSON payload (or the JSON header of a binary command).
    pub fn decode_json<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, FrameError> {
        let body: &[u8] = if self.payload.is_empty() {
            b"{}"
        } else {
            &self.payload
        };
        serde_json::from_slice(body).map_err(|e| FrameError::BadJson {
            cmd: self.cmd_str().to_string(),
            error: e.to_string(),
        })
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(7 + self.payload.len());
        out.push(self.enc.tag());
        out.push(b' ');
        out.extend_from_slice(&self.cmd);
        if !self.payload.is_empty() {
            out.push(b' ');
            out.extend_from_slice(&self.payload);
        }
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seed_format() {
        let f = CommandFrame::parse(&Bytes::from_static(
            br#"J HELO {"id": "00", "service": "orders"}"#,
        ))
        .unwrap();
        assert_eq!(f.enc, Encoding::Json);
        assert_eq!(&f.cmd, b"HELO");
        assert_eq!(&f.payload[..], br#"{"id": "00", "service": "orders"}"#);
        assert_eq!(
            f.to_bytes(),
            Bytes::from_static(br#"J HELO {"id": "00", "service": "orders"}"#)
        );
    }

    #[test]
    fn bare_command_has_empty_payload() {
        let f = CommandFrame::parse(&Bytes::from_static(b"B PUBS")).unwrap();
        assert_eq!(f.enc, Encoding::Binary);
        assert!(f.payload.is_empty());
        assert_eq!(f.to_bytes(), Bytes::from_static(b"B PUBS"));
        let v: serde_json::Value = f.decode_json().unwrap();
        assert!(v.is_object());
    }

    #[test]
    fn rejects_garbage_clearly() {
        let p = |b: &'static [u8]| CommandFrame::parse(&Bytes::from_static(b));
        assert_eq!(p(b""), Err(FrameError::Empty));
        assert_eq!(p(b"J HE"), Err(FrameError::TooShort));
        assert_eq!(p(b"X HELO {}"), Err(FrameError::BadEncoding('X')));
        assert_eq!(p(b"JxHELO {}"), Err(FrameError::MissingSpace));
        assert_eq!(p(b"J helo {}"), Err(FrameError::BadCommand));
        assert_eq!(p(b"J HELO{}"), Err(FrameError::MissingSpace));
        assert_eq!(
            p(b"\xff\xfe\x00garbage"),
            Err(FrameError::BadEncoding('\u{ff}'))
        );
        let f = p(b"J HELO {not json").unwrap();
        assert!(matches!(
            f.decode_json::<serde_json::Value>(),
            Err(FrameError::BadJson { .. })
        ));
    }
}
