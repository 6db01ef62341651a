//! What a component prints on stdout once it is up, one line each: `READY {json}` with
//! its endpoints, `MOVED {json}` when a sidecar joined another transmitter, and
//! `LINKED {"peers": n}` when a transmitter's count of linked peers changed.

use serde::{Deserialize, Serialize};
use thynapse_protocol::Thid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransmitterReady {
    pub name: String,
    pub id: Thid,
    /// ZeroMQ endpoints, as advertised.
    pub command: String,
    pub event: String,
    /// `http://host:port/metrics`.
    pub metrics: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SidecarReady {
    /// The transmitter the cell joined.
    pub transmitter: String,
    /// The Redis endpoint, `host:port`.
    pub resp: String,
    pub metrics: String,
    pub id: Thid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RendezvousReady {
    /// `udp://host:port`.
    pub address: String,
    /// `http://host:port/metrics`.
    pub metrics: String,
}

/// Any component's `READY` line; each kind has fields the others lack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ready {
    Transmitter(TransmitterReady),
    Sidecar(SidecarReady),
    Rendezvous(RendezvousReady),
}

impl Ready {
    pub fn transmitter(&self) -> Option<&TransmitterReady> {
        match self {
            Ready::Transmitter(t) => Some(t),
            _ => None,
        }
    }

    pub fn sidecar(&self) -> Option<&SidecarReady> {
        match self {
            Ready::Sidecar(s) => Some(s),
            _ => None,
        }
    }

    pub fn rendezvous(&self) -> Option<&RendezvousReady> {
        match self {
            Ready::Rendezvous(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Linked {
    pub peers: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Ready(Ready),
    Moved(SidecarReady),
    Linked(Linked),
}

impl Status {
    /// The line as printed.
    pub fn line(&self) -> String {
        let (word, json) = match self {
            Status::Ready(r) => ("READY", serde_json::to_string(r)),
            Status::Moved(r) => ("MOVED", serde_json::to_string(r)),
            Status::Linked(l) => ("LINKED", serde_json::to_string(l)),
        };
        format!("{word} {}", json.expect("status lines serialise"))
    }

    /// Prints the line on stdout (flushed: whoever reads it waits for it).
    pub fn print(&self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", self.line());
        let _ = out.flush();
    }

    /// A status line, or `None` for any other output (or a line that does not parse).
    pub fn parse(line: &str) -> Option<Status> {
        let (word, json) = line.split_once(' ')?;
        match word {
            "READY" => serde_json::from_str(json).ok().map(Status::Ready),
            "MOVED" => serde_json::from_str(json).ok().map(Status::Moved),
            "LINKED" => serde_json::from_str(json).ok().map(Status::Linked),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_line_reads_back_as_itself() {
        let sidecar = SidecarReady {
            transmitter: "m-0".into(),
            resp: "127.0.0.1:6379".into(),
            metrics: "http://127.0.0.1:9/metrics".into(),
            id: Thid::random(),
        };
        let lines = [
            Status::Ready(Ready::Transmitter(TransmitterReady {
                name: "m-0".into(),
                id: Thid::random(),
                command: "tcp://127.0.0.1:1".into(),
                event: "tcp://127.0.0.1:2".into(),
                metrics: "http://127.0.0.1:3/metrics".into(),
            })),
            Status::Ready(Ready::Sidecar(sidecar.clone())),
            Status::Ready(Ready::Rendezvous(RendezvousReady {
                address: "udp://127.0.0.1:4".into(),
                metrics: "http://127.0.0.1:5/metrics".into(),
            })),
            Status::Moved(sidecar),
            Status::Linked(Linked { peers: 3 }),
        ];
        for s in lines {
            assert_eq!(Status::parse(&s.line()), Some(s));
        }
    }

    #[test]
    fn other_output_is_not_a_status() {
        assert_eq!(Status::parse("hello"), None);
        assert_eq!(Status::parse("READY {\"unknown\": 1}"), None);
        assert_eq!(Status::parse("LINKED nonsense"), None);
        assert_eq!(
            Status::parse(r#"READY {"address": "udp://a:1", "metrics": "http://a:2/metrics"}"#),
            Some(Status::Ready(Ready::Rendezvous(RendezvousReady {
                address: "udp://a:1".into(),
                metrics: "http://a:2/metrics".into(),
            })))
        );
    }
}
