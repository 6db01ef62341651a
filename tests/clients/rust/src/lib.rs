//! The client-matrix scenario (spec at the top of `tests/test_clients.py`) for the Rust
//! programs: argv, channel names, the output lines and the check of what the subscriber gets.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{interval, timeout_at, Instant};

pub const N: usize = 20;
/// Phase 1's deadline for all messages, and phase 2's for one of each after the restart.
pub const PHASE1: Duration = Duration::from_secs(10);
pub const PHASE2: Duration = Duration::from_secs(30);
/// Phase 2 publishes a round this often.
pub const ROUND: Duration = Duration::from_millis(100);

pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn fail(why: impl std::fmt::Display) -> ! {
    say(&format!("FAIL {why}"));
    std::process::exit(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Message,
    PMessage,
    SMessage,
}

const KINDS: [Kind; 3] = [Kind::Message, Kind::PMessage, Kind::SMessage];

pub struct Scenario {
    pub sub: String,
    pub publ: String,
    /// `Some(3)` or `Some(2)` when argv forces a protocol; `None` keeps the library's default.
    pub protocol: Option<u8>,
    pub ch: String,
    pub pat: String,
    pub px: String,
    pub sh: String,
    /// False where the library has no sharded pub/sub in this mode (see `no_shards`).
    pub shards: bool,
    phase: u8,
    got: [Vec<String>; 3],
}

impl Scenario {
    pub fn from_args() -> Scenario {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let protocol = match args.get(3).map(String::as_str) {
            None => None,
            Some("resp2") => Some(2),
            Some("resp3") => Some(3),
            Some(other) => fail(format!("unknown protocol {other}")),
        };
        if !(3..=4).contains(&args.len()) {
            fail("usage: <sub host:port> <pub host:port> <tag> [resp2|resp3]");
        }
        let tag = &args[2];
        Scenario {
            sub: args[0].clone(),
            publ: args[1].clone(),
            protocol,
            ch: format!("t.{tag}.ch"),
            pat: format!("t.{tag}.p*"),
            px: format!("t.{tag}.px"),
            sh: format!("{{t{tag}}}sh"),
            shards: true,
            phase: 1,
            got: Default::default(),
        }
    }

    /// Says the library cannot take part in the sharded third of the scenario in this mode;
    /// the test knows which programs may say so.
    pub fn no_shards(&mut self, why: &str) {
        say(&format!("NOSHARD {why}"));
        self.shards = false;
    }

    fn kinds(&self) -> impl Iterator<Item = Kind> + '_ {
        KINDS
            .into_iter()
            .filter(|k| self.shards || *k != Kind::SMessage)
    }

    /// Checks one message as it arrives: right kind and names, in order, never twice.
    pub fn received(&mut self, kind: Kind, channel: &str, pattern: Option<&str>, data: &str) {
        let (ch, pat, prefix) = match kind {
            Kind::Message => (&self.ch, None, 'c'),
            Kind::PMessage => (&self.px, Some(self.pat.as_str()), 'p'),
            Kind::SMessage => (&self.sh, None, 's'),
        };
        if channel != ch || pattern != pat {
            fail(format!(
                "{kind:?} on {channel} pattern {pattern:?}, expected {ch} {pat:?}"
            ));
        }
        let got = &mut self.got[kind as usize];
        let ok = if self.phase == 1 {
            data == format!("{prefix}{}", got.len() + 1)
        } else {
            data.starts_with("after")
        };
        if !ok {
            fail(format!(
                "{kind:?} {data} after {:?}",
                &got[got.len().saturating_sub(3)..]
            ));
        }
        got.push(data.to_string());
    }

    pub fn phase1_done(&self) -> bool {
        self.kinds().all(|k| self.got[k as usize].len() == N)
    }

    pub fn phase2_done(&self) -> bool {
        self.kinds().all(|k| !self.got[k as usize].is_empty())
    }

    pub fn counts(&self) -> String {
        format!("{:?}", self.got.iter().map(Vec::len).collect::<Vec<_>>())
    }

    /// (command, channel, payload) of round i: c<i>/p<i>/s<i> in phase 1, after<i> in phase 2.
    pub fn publishes(&self, i: usize) -> Vec<(&'static str, String, String)> {
        let p = |prefix: char| match self.phase {
            1 => format!("{prefix}{i}"),
            _ => format!("after{i}"),
        };
        let mut out = vec![
            ("PUBLISH", self.ch.clone(), p('c')),
            ("PUBLISH", self.px.clone(), p('p')),
        ];
        if self.shards {
            out.push(("SPUBLISH", self.sh.clone(), p('s')));
        }
        out
    }

    /// PHASE1 OK, KILL, then waits for the test's `go`; phase 2 counts afresh.
    async fn await_restart(&mut self) {
        say("PHASE1 OK");
        say("KILL");
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        if stdin.read_line(&mut line).await.is_err() || line.trim() != "go" {
            fail("expected `go` on stdin");
        }
        self.phase = 2;
        self.got = Default::default();
    }
}

/// What the subscriber side reports to `run`.
pub enum Event {
    Message {
        kind: Kind,
        channel: String,
        pattern: Option<String>,
        data: String,
    },
    /// The program itself reconnected and resubscribed (app-level reconnection).
    Resubscribed,
}

/// Who restores the subscriptions after the restart.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    Library,
    App,
}

/// The publisher side: one PUBLISH or SPUBLISH, answering the receiver count.
pub trait Publish {
    fn publish(
        &mut self,
        command: &'static str,
        channel: &str,
        payload: &str,
    ) -> impl Future<Output = Result<i64, String>>;
}

/// Steps 3 to 5 of the scenario, once the subscriber has its three confirmations and
/// forwards what it receives to `events`.
pub async fn run(
    mut s: Scenario,
    mut events: UnboundedReceiver<Event>,
    mut publisher: impl Publish,
    reconnect: Reconnect,
) {
    for i in 1..=N {
        for (command, channel, payload) in s.publishes(i) {
            match publisher.publish(command, &channel, &payload).await {
                Ok(n) if n >= 1 => {}
                answer => fail(format!("{command} {channel} {payload} answered {answer:?}")),
            }
        }
    }
    let deadline = Instant::now() + PHASE1;
    while !s.phase1_done() {
        match timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Message {
                kind,
                channel,
                pattern,
                data,
            })) => s.received(kind, &channel, pattern.as_deref(), &data),
            Ok(Some(Event::Resubscribed) | None) => fail("the subscriber lost its connection"),
            Err(_) => fail(format!("phase 1 timed out, got {}", s.counts())),
        }
    }

    s.await_restart().await;
    let deadline = Instant::now() + PHASE2;
    let mut rounds = interval(ROUND);
    let (mut k, mut resubscribed) = (0, false);
    while !s.phase2_done() {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Message { kind, channel, pattern, data }) => s.received(kind, &channel, pattern.as_deref(), &data),
                Some(Event::Resubscribed) => resubscribed = true,
                None => fail("the subscriber gave up"),
            },
            _ = rounds.tick() => {
                k += 1;
                for (command, channel, payload) in s.publishes(k) {
                    // An error, if the library raises one during the restart: the next round retries.
                    if publisher.publish(command, &channel, &payload).await.is_err() {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => fail(format!("phase 2 timed out, got {}", s.counts())),
        }
    }
    match reconnect {
        Reconnect::Library => say("RECONNECT library"),
        Reconnect::App if resubscribed => say("RECONNECT app"),
        Reconnect::App => fail("the subscriber never lost its connection"),
    }
    say("PHASE2 OK");
}
