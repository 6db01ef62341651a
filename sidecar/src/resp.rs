//! RESP on the wire, through the `redis-protocol` crate: requests are RESP2 arrays of bulk
//! strings (what every client sends, in RESP2 and RESP3 alike) or inline commands (what a
//! person types into telnet); replies are encoded as RESP2 or RESP3 by the crate's encoders.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2;
use redis_protocol::resp3::types::BytesFrame as Resp3;

/// A reply, independent of the protocol version it will be written in.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Simple(&'static str),
    Error(String),
    Int(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Reply>),
    /// Out-of-band data: a push in RESP3, an array in RESP2.
    Push(Vec<Reply>),
    /// A map in RESP3, a flat array in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn bulk(b: impl Into<Bytes>) -> Reply {
        Reply::Bulk(b.into())
    }

    pub fn error(msg: impl Into<String>) -> Reply {
        Reply::Error(msg.into())
    }

    pub fn encode(&self, resp3: bool, out: &mut BytesMut) {
        // The (S)PUBLISH reply, once per message: written directly (the same in RESP2 and 3).
        if let Reply::Int(n) = self {
            out.extend_from_slice(b":");
            out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
            out.extend_from_slice(b"\r\n");
            return;
        }
        if resp3 {
            let _ = redis_protocol::resp3::encode::complete::extend_encode(
                out,
                &self.to_resp3(),
                false,
            );
        } else {
            let _ = redis_protocol::resp2::encode::extend_encode(out, &self.to_resp2(), false);
        }
    }

    fn to_resp2(&self) -> Resp2 {
        match self {
            Reply::Simple(s) => Resp2::SimpleString(Bytes::from_static(s.as_bytes())),
            Reply::Error(e) => Resp2::Error(e.as_str().into()),
            Reply::Int(i) => Resp2::Integer(*i),
            Reply::Bulk(b) => Resp2::BulkString(b.clone()),
            Reply::Null => Resp2::Null,
            Reply::Array(v) | Reply::Push(v) => {
                Resp2::Array(v.iter().map(Reply::to_resp2).collect())
            }
            Reply::Map(kv) => Resp2::Array(
                kv.iter()
                    .flat_map(|(k, v)| [k.to_resp2(), v.to_resp2()])
                    .collect(),
            ),
        }
    }

    fn to_resp3(&self) -> Resp3 {
        match self {
            Reply::Simple(s) => Resp3::SimpleString {
                data: Bytes::from_static(s.as_bytes()),
                attributes: None,
            },
            Reply::Error(e) => Resp3::SimpleError {
                data: e.as_str().into(),
                attributes: None,
            },
            Reply::Int(i) => Resp3::Number {
                data: *i,
                attributes: None,
            },
            Reply::Bulk(b) => Resp3::BlobString {
                data: b.clone(),
                attributes: None,
            },
            Reply::Null => Resp3::Null,
            Reply::Array(v) => Resp3::Array {
                data: v.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
            Reply::Push(v) => Resp3::Push {
                data: v.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
            Reply::Map(kv) => Resp3::Map {
                data: kv
                    .iter()
                    .map(|(k, v)| (k.to_resp3(), v.to_resp3()))
                    .collect(),
                attributes: None,
            },
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("Protocol error: {0}")]
    Protocol(String),
}

/// Takes one complete request off the front of `buf`: its arguments, or None when more
/// bytes are needed. An empty inline line yields an empty request (ignored, as Redis does).
pub fn next_request(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, RequestError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return inline_request(buf);
    }
    match redis_protocol::resp2::decode::decode_bytes_mut(buf) {
        Ok(Some((Resp2::Array(items), _, _))) => items
            .into_iter()
            .map(|item| match item {
                Resp2::BulkString(b) | Resp2::SimpleString(b) => Ok(b),
                Resp2::Integer(i) => Ok(Bytes::from(i.to_string())),
                _ => Err(RequestError::Protocol(
                    "expected '$', got something else".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Ok(Some(_)) => Err(RequestError::Protocol(
            "expected an array of bulk strings".into(),
        )),
        Ok(None) => Ok(None),
        Err(e) => Err(RequestError::Protocol(e.details().to_string())),
    }
}

fn inline_request(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, RequestError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > 64 * 1024 {
            return Err(RequestError::Protocol("too big inline request".into()));
        }
        return Ok(None);
    };
    let line = buf.split_to(end + 1).freeze();
    let line = line.slice(..end);
    let line = line
        .strip_suffix(b"\r")
        .map_or(line.clone(), |l| line.slice(..l.len()));
    let mut args = Vec::new();
    let mut start = None;
    for (i, b) in line.iter().enumerate() {
        match (b.is_ascii_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                args.push(line.slice(s..i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(line.slice(s..));
    }
    Ok(Some(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: &Reply, resp3: bool) -> String {
        let mut b = BytesMut::new();
        r.encode(resp3, &mut b);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn encodes_like_redis() {
        let msg = Reply::Push(vec![
            Reply::bulk("message"),
            Reply::bulk("ch"),
            Reply::bulk("hi"),
        ]);
        assert_eq!(
            enc(&msg, false),
            "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
        );
        assert_eq!(
            enc(&msg, true),
            ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
        );
        assert_eq!(enc(&Reply::Null, false), "$-1\r\n");
        assert_eq!(enc(&Reply::Null, true), "_\r\n");
        assert_eq!(enc(&Reply::Int(3), false), ":3\r\n");
        assert_eq!(enc(&Reply::error("ERR x"), false), "-ERR x\r\n");
        let map = Reply::Map(vec![
            (Reply::bulk("a"), Reply::Int(1)),
            (Reply::bulk("b"), Reply::Int(2)),
        ]);
        assert_eq!(enc(&map, false), "*4\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n:2\r\n");
        assert_eq!(enc(&map, true), "%2\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n:2\r\n");
    }

    #[test]
    fn parses_pipelined_partial_and_inline_requests() {
        let mut b =
            BytesMut::from(&b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\nPING  x\r\n*1\r\n$4\r\nPI"[..]);
        assert_eq!(
            next_request(&mut b).unwrap().unwrap(),
            vec![Bytes::from("ECHO"), Bytes::from("hi")]
        );
        assert_eq!(
            next_request(&mut b).unwrap().unwrap(),
            vec![Bytes::from("PING"), Bytes::from("x")]
        );
        assert_eq!(next_request(&mut b).unwrap(), None);
        b.extend_from_slice(b"NG\r\n");
        assert_eq!(
            next_request(&mut b).unwrap().unwrap(),
            vec![Bytes::from("PING")]
        );
        assert!(b.is_empty());
    }

    #[test]
    fn malformed_requests_are_protocol_errors() {
        let mut b = BytesMut::from(&b"*1\r\n:x\r\n"[..]);
        assert!(next_request(&mut b).is_err());
        let mut b = BytesMut::from(&b"*-x\r\n"[..]);
        assert!(next_request(&mut b).is_err());
    }
}
