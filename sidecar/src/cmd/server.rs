//! Connection and server commands: PING, ECHO, HELLO, CLIENT, SELECT, QUIT, RESET,
//! COMMAND, AUTH, and the answer to anything unknown.

use std::time::Instant;

use bytes::Bytes;

use super::{
    arity_error, command_info, lower, unknown_command, unknown_subcommand, COMMANDS, WRONGPASS,
};
use crate::api::SubKind;
use crate::client::{lock, Client, Shared};
use crate::introspection::{ClientSummary, REDIS_VERSION};
use crate::resp::Reply;

impl Client {
    /// The commands of this family, and the answer to an unknown one.
    pub(crate) async fn server_command(&mut self, name: &str, args: &[Bytes], shared: &Shared) {
        match name {
            "ping" => {
                let reply = match (args.len(), self.subscribed() && !self.resp3) {
                    (1, false) => Reply::Simple("PONG"),
                    (2, false) => Reply::Bulk(args[1].clone()),
                    (1, true) => Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]),
                    (2, true) => {
                        Reply::Array(vec![Reply::bulk("pong"), Reply::Bulk(args[1].clone())])
                    }
                    _ => arity_error("ping"),
                };
                self.reply(reply);
            }
            "echo" => self.reply(Reply::Bulk(args[1].clone())),
            "hello" => self.hello(args),
            "client" => self.client_command(args, shared),
            // Pub/sub ignores databases in Redis; accept the 16 a default Redis has.
            "select" => self.reply(
                match std::str::from_utf8(&args[1])
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(0..=15) => Reply::Simple("OK"),
                    Some(_) => Reply::error("ERR DB index is out of range"),
                    None => Reply::error("ERR value is not an integer or out of range"),
                },
            ),
            "quit" => {
                self.reply(Reply::Simple("OK"));
                self.close = true;
            }
            "reset" => {
                for kind in [SubKind::Channel, SubKind::Pattern, SubKind::Shard] {
                    self.unsubscribe_all(kind, shared, false).await;
                }
                self.resp3 = false;
                self.info.name = None;
                self.reply(Reply::Simple("RESET"));
            }
            "command" => self.command_command(args),
            // The sidecar has no password (it serves its own pod on loopback): Redis'
            // answers when none is set, where the `default` user takes any password.
            "auth" if args.len() == 2 => self.reply(Reply::error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            )),
            "auth" if args.len() == 3 => self.reply(if args[1][..] == *b"default" {
                Reply::Simple("OK")
            } else {
                Reply::error(WRONGPASS)
            }),
            "auth" => self.reply(Reply::error("ERR syntax error")),
            _ => self.reply(unknown_command(args)),
        }
    }

    pub(crate) fn hello(&mut self, args: &[Bytes]) {
        let mut i = 1;
        if args.len() > 1 {
            match std::str::from_utf8(&args[1])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(2) => self.resp3 = false,
                Some(3) => self.resp3 = true,
                Some(_) => {
                    self.reply(Reply::error("NOPROTO unsupported protocol version"));
                    return;
                }
                None => {
                    self.reply(Reply::error(
                        "ERR Protocol version is not an integer or out of range",
                    ));
                    return;
                }
            }
            i = 2;
        }
        while i < args.len() {
            match lower(&args[i]).as_str() {
                "auth" if i + 2 < args.len() => {
                    if args[i + 1][..] != *b"default" {
                        self.reply(Reply::error(WRONGPASS));
                        return;
                    }
                    i += 3;
                }
                "setname" if i + 1 < args.len() => {
                    self.info.name = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => {
                    self.reply(Reply::error(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    )));
                    return;
                }
            }
        }
        self.reply(Reply::Map(vec![
            (Reply::bulk("server"), Reply::bulk("redis")),
            (Reply::bulk("version"), Reply::bulk(REDIS_VERSION)),
            (
                Reply::bulk("proto"),
                Reply::Int(if self.resp3 { 3 } else { 2 }),
            ),
            (Reply::bulk("id"), Reply::Int(self.id as i64)),
            (Reply::bulk("mode"), Reply::bulk("standalone")),
            (Reply::bulk("role"), Reply::bulk("master")),
            (Reply::bulk("modules"), Reply::Array(vec![])),
        ]));
    }

    pub(crate) fn client_command(&mut self, args: &[Bytes], shared: &Shared) {
        let sub = lower(&args[1]);
        let reply = match (sub.as_str(), args.len()) {
            ("setname", 3) => {
                if args[2].iter().any(|b| *b <= b' ' || *b > b'~') {
                    Reply::error(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    )
                } else {
                    self.info.name = (!args[2].is_empty()).then(|| args[2].clone());
                    Reply::Simple("OK")
                }
            }
            ("getname", 2) => self.info.name.clone().map_or(Reply::Null, Reply::Bulk),
            ("setinfo", 4) => {
                let value = (!args[3].is_empty()).then(|| args[3].clone());
                match lower(&args[2]).as_str() {
                    "lib-name" => self.info.lib_name = value,
                    "lib-ver" => self.info.lib_ver = value,
                    _ => {}
                }
                Reply::Simple("OK")
            }
            ("id", 2) => Reply::Int(self.id as i64),
            ("info", 2) => {
                self.publish_summary(shared);
                Reply::Verbatim(format!("{}\n", self.info.line(Instant::now())).into())
            }
            ("list", _) => self.client_list(&args[2..], shared),
            // Eviction and LRU touches concern keys; there are none here.
            ("no-evict" | "no-touch", 3) => match lower(&args[2]).as_str() {
                "on" | "off" => Reply::Simple("OK"),
                _ => Reply::error("ERR syntax error"),
            },
            ("getredir", 2) => Reply::Int(-1),
            (
                "setname" | "getname" | "setinfo" | "id" | "info" | "no-evict" | "no-touch"
                | "getredir",
                _,
            ) => Reply::error(format!(
                "ERR wrong number of arguments for 'client|{sub}' command"
            )),
            _ => unknown_subcommand("client", &args[1]),
        };
        self.reply(reply);
    }

    /// CLIENT LIST [TYPE normal|pubsub] [ID id …], as Redis 7 filters it.
    pub(crate) fn client_list(&mut self, filters: &[Bytes], shared: &Shared) -> Reply {
        self.publish_summary(shared);
        let mut kind = None;
        let mut ids: Option<Vec<u64>> = None;
        let mut i = 0;
        while i < filters.len() {
            match (lower(&filters[i]).as_str(), filters.get(i + 1)) {
                ("type", Some(t)) => {
                    let t = lower(t);
                    if !matches!(
                        t.as_str(),
                        "normal" | "pubsub" | "master" | "replica" | "slave"
                    ) {
                        return Reply::error(format!("ERR Unknown client type '{t}'"));
                    }
                    kind = Some(t);
                    i += 2;
                }
                ("id", Some(_)) => {
                    let mut list = Vec::new();
                    i += 1;
                    while let Some(id) = filters.get(i) {
                        match std::str::from_utf8(id)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            Some(id) => list.push(id),
                            None => return Reply::error("ERR Invalid client ID"),
                        }
                        i += 1;
                    }
                    ids = Some(list);
                }
                _ => return Reply::error("ERR syntax error"),
            }
        }
        let now = Instant::now();
        let clients = lock(&shared.clients);
        let mut listed: Vec<&ClientSummary> = clients
            .values()
            .filter(|c| ids.as_ref().is_none_or(|ids| ids.contains(&c.id)))
            .filter(|c| {
                let pubsub = c.sub + c.psub + c.ssub > 0;
                match kind.as_deref() {
                    None => true,
                    Some("normal") => !pubsub,
                    Some("pubsub") => pubsub,
                    Some(_) => false,
                }
            })
            .collect();
        listed.sort_by_key(|c| c.id);
        let text: String = listed.iter().map(|c| c.line(now) + "\n").collect();
        Reply::Verbatim(text.into())
    }

    pub(crate) fn command_command(&mut self, args: &[Bytes]) {
        let reply = match args.get(1).map(|a| lower(a)).as_deref() {
            None => Reply::Array(
                COMMANDS
                    .iter()
                    .map(|(n, a, f)| command_info(n, *a, f))
                    .collect(),
            ),
            Some("count") => Reply::Int(COMMANDS.len() as i64),
            Some("info") => Reply::Array(
                args[2..]
                    .iter()
                    .map(|n| {
                        let n = lower(n);
                        COMMANDS
                            .iter()
                            .find(|(c, _, _)| *c == n)
                            .map_or(Reply::Null, |(c, a, f)| command_info(c, *a, f))
                    })
                    .collect(),
            ),
            // Clients ask for docs to show hints; there are none to give.
            Some("docs") => Reply::Map(vec![]),
            Some(_) => unknown_subcommand("command", &args[1]),
        };
        self.reply(reply);
    }
}
