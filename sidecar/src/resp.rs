//! RESP on the wire. Requests are RESP2 arrays of bulk strings (what every client sends, in
//! RESP2 and RESP3 alike), parsed here into slices of the read buffer, or inline commands
//! (what a person types into telnet); replies are encoded as RESP2 or RESP3 by the
//! `redis-protocol` crate's encoders, except the two written once per message (a pushed
//! message and a (S)PUBLISH's count), which are written directly.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2;
use redis_protocol::resp3::types::BytesFrame as Resp3;
use smallvec::SmallVec;

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
    /// Text for people (INFO): a verbatim string in RESP3, a bulk string in RESP2.
    Verbatim(Bytes),
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
            Reply::Bulk(b) | Reply::Verbatim(b) => Resp2::BulkString(b.clone()),
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
            Reply::Verbatim(b) => Resp3::VerbatimString {
                data: b.clone(),
                format: redis_protocol::resp3::types::VerbatimStringFormat::Text,
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

/// Writes a pushed message (a RESP2 array, or a RESP3 push) of bulk strings straight into
/// the output buffer: deliveries are most of what a subscriber reads, so they skip
/// building frames. Every other reply goes through redis-protocol (`Reply::encode`).
pub fn write_push(out: &mut BytesMut, resp3: bool, parts: &[&[u8]]) {
    let mut n = itoa::Buffer::new();
    out.reserve(16 + parts.iter().map(|p| p.len() + 16).sum::<usize>());
    out.extend_from_slice(if resp3 { b">" } else { b"*" });
    out.extend_from_slice(n.format(parts.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for p in parts {
        out.extend_from_slice(b"$");
        out.extend_from_slice(n.format(p.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
}

/// Turns pushes written by `write_push` for one protocol version into the other's (they
/// differ only in each message's first byte): for the rare deliveries encoded just before
/// the client's HELLO changed its version.
pub fn retype_pushes(pushes: &mut [u8], resp3: bool) {
    let mut at = 0;
    while at < pushes.len() {
        pushes[at] = if resp3 { b'>' } else { b'*' };
        let Some(nl) = memchr::memchr(b'\n', &pushes[at..]) else {
            return;
        };
        let count = parse_length(pushes[at + 1..at + nl].strip_suffix(b"\r").unwrap_or(&[]));
        at += nl + 1;
        for _ in 0..count.unwrap_or(0) {
            let Some(nl) = memchr::memchr(b'\n', &pushes[at..]) else {
                return;
            };
            let len = parse_length(pushes[at + 1..at + nl].strip_suffix(b"\r").unwrap_or(&[]));
            at += nl + 1 + usize::try_from(len.unwrap_or(0)).unwrap_or(0) + 2;
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("Protocol error: {0}")]
    Protocol(String),
}

/// One request: where each of its arguments lies in the buffer it was parsed from. Most
/// requests have at most three arguments ((S)PUBLISH channel message), kept inline.
pub type Request = SmallVec<[Range<usize>; 3]>;

/// Parses the complete request that starts at `at` in `buf`: its arguments and where the
/// next request starts, or None when more bytes are needed. An empty inline line or array
/// yields an empty request (ignored, as Redis does).
///
/// Requests are parsed in place and their arguments later sliced out of the buffer, so a
/// read of many pipelined publishes costs one hand-over of the buffer, not one per request.
pub fn parse_request(buf: &[u8], at: usize) -> Result<Option<(Request, usize)>, RequestError> {
    match buf.get(at) {
        None => Ok(None),
        Some(b'*') => multibulk_request(buf, at),
        Some(_) => inline_request(buf, at),
    }
}

/// Redis's limits on a request: the number of arguments and the length of one.
const MAX_MULTIBULK: usize = 1024 * 1024;
const MAX_BULK: usize = 512 * 1024 * 1024;

/// A request as every client sends it: `*N` then N `$len` bulk strings. This is the hot
/// path of every publish, so it is parsed here rather than by redis-protocol's decoder
/// (which accepts any frame type and builds a frame tree per request); it takes only what
/// Redis takes, with Redis's error messages.
fn multibulk_request(buf: &[u8], at: usize) -> Result<Option<(Request, usize)>, RequestError> {
    let Some((count, mut at)) = header(buf, at, b'*')? else {
        return Ok(None);
    };
    let count = usize::try_from(count).unwrap_or(0);
    if count > MAX_MULTIBULK {
        return Err(RequestError::Protocol("invalid multibulk length".into()));
    }
    let mut args = Request::new();
    for _ in 0..count {
        let Some(&first) = buf.get(at) else {
            return Ok(None);
        };
        if first != b'$' {
            return Err(RequestError::Protocol(format!(
                "expected '$', got '{}'",
                first as char
            )));
        }
        let Some((len, start)) = header(buf, at, b'$')? else {
            return Ok(None);
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_BULK)
            .ok_or_else(|| RequestError::Protocol("invalid bulk length".into()))?;
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(RequestError::Protocol(
                "bulk string not ended by CRLF".into(),
            ));
        }
        args.push(start..end);
        at = end + 2;
    }
    Ok(Some((args, at)))
}

/// Reads the `<prefix><integer>\r\n` line at `at`: the integer and where the next line
/// starts, or None when the line is not complete yet.
fn header(buf: &[u8], at: usize, prefix: u8) -> Result<Option<(i64, usize)>, RequestError> {
    debug_assert_eq!(buf[at], prefix);
    let Some(nl) = memchr::memchr(b'\n', &buf[at..]) else {
        if buf.len() - at > 64 * 1024 {
            return Err(RequestError::Protocol("too big count in request".into()));
        }
        return Ok(None);
    };
    let line = &buf[at + 1..at + nl];
    let what = if prefix == b'*' { "multibulk" } else { "bulk" };
    let digits = line
        .strip_suffix(b"\r")
        .ok_or_else(|| RequestError::Protocol(format!("invalid {what} length")))?;
    let n = parse_length(digits)
        .ok_or_else(|| RequestError::Protocol(format!("invalid {what} length")))?;
    Ok(Some((n, at + nl + 1)))
}

/// A decimal integer as Redis reads lengths (an optional '-', then 1 to 18 digits).
fn parse_length(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if negative { -n } else { n })
}

/// A line typed by a person: arguments separated by whitespace.
fn inline_request(buf: &[u8], at: usize) -> Result<Option<(Request, usize)>, RequestError> {
    let Some(nl) = memchr::memchr(b'\n', &buf[at..]) else {
        if buf.len() - at > 64 * 1024 {
            return Err(RequestError::Protocol("too big inline request".into()));
        }
        return Ok(None);
    };
    let end = at + nl;
    let mut args = Request::new();
    let mut start = None;
    for (i, b) in buf.iter().enumerate().take(end).skip(at) {
        match (b.is_ascii_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                args.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(s..end);
    }
    Ok(Some((args, end + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes one request off the front of `buf`, as the connection does.
    fn next_request(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, RequestError> {
        let Some((args, end)) = parse_request(buf, 0)? else {
            return Ok(None);
        };
        let chunk = buf.split_to(end).freeze();
        Ok(Some(args.into_iter().map(|r| chunk.slice(r)).collect()))
    }

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
        let mut b = BytesMut::from(&b"*1\r\n$2\r\nabc\r\n"[..]);
        assert!(next_request(&mut b).is_err());
        let mut b = BytesMut::from(&b"*1\r\n$-2\r\n"[..]);
        assert!(next_request(&mut b).is_err());
        let mut b = BytesMut::from(&b"*9999999999\r\n"[..]);
        assert!(next_request(&mut b).is_err());
    }

    #[test]
    fn pushes_written_directly_match_the_codec() {
        for resp3 in [false, true] {
            let mut direct = BytesMut::new();
            write_push(&mut direct, resp3, &[b"pmessage", b"p*", b"", b"x\r\ny"]);
            let mut framed = BytesMut::new();
            Reply::Push(vec![
                Reply::bulk("pmessage"),
                Reply::bulk("p*"),
                Reply::bulk(""),
                Reply::bulk("x\r\ny"),
            ])
            .encode(resp3, &mut framed);
            assert_eq!(direct, framed, "resp3={resp3}");
        }
    }

    #[test]
    fn pushes_change_protocol_version_in_place() {
        let mut two = BytesMut::new();
        write_push(&mut two, false, &[b"message", b"ch", b"hi\r\n*2"]);
        write_push(&mut two, false, &[b"pmessage", b"c*", b"ch", b""]);
        let mut three = BytesMut::new();
        write_push(&mut three, true, &[b"message", b"ch", b"hi\r\n*2"]);
        write_push(&mut three, true, &[b"pmessage", b"c*", b"ch", b""]);
        let mut converted = two.clone();
        retype_pushes(&mut converted, true);
        assert_eq!(converted, three);
        retype_pushes(&mut converted, false);
        assert_eq!(converted, two);
    }

    #[test]
    fn requests_are_taken_whole_or_not_at_all() {
        let whole = b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        for cut in 0..whole.len() {
            let mut b = BytesMut::from(&whole[..cut]);
            assert_eq!(next_request(&mut b).unwrap(), None, "cut at {cut}");
            assert_eq!(b.len(), cut);
            b.extend_from_slice(&whole[cut..]);
            assert_eq!(
                next_request(&mut b).unwrap().unwrap(),
                vec![
                    Bytes::from("PUBLISH"),
                    Bytes::from("ch"),
                    Bytes::from("hello")
                ]
            );
            assert!(b.is_empty());
        }
        // An empty array is an empty request, skipped as Redis skips it.
        let mut b = BytesMut::from(&b"*0\r\n"[..]);
        assert_eq!(next_request(&mut b).unwrap(), Some(vec![]));
        assert!(b.is_empty());
    }
}
