//! The commands other than (S)PUBLISH, by family, each an `impl Client` block: `pubsub`,
//! `server` (connection and server commands), `info` (what clients ask about the server).
//! This module holds what they share: the command table and Redis' error texts.

pub mod info;
pub mod pubsub;
pub mod server;

use bytes::Bytes;

use crate::api::SubKind;
use crate::resp::Reply;

pub(crate) fn sub_kind(command: &str) -> SubKind {
    match command {
        "subscribe" | "unsubscribe" => SubKind::Channel,
        "psubscribe" | "punsubscribe" => SubKind::Pattern,
        _ => SubKind::Shard,
    }
}

pub(crate) fn arity_error(name: &str) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

pub(crate) fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

/// Redis 7's reply to an unknown command, argument list included.
pub(crate) fn unknown_command(args: &[Bytes]) -> Reply {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&args[0])
    );
    for a in &args[1..] {
        if msg.len() >= 128 {
            break;
        }
        msg.push_str(&format!("'{}' ", String::from_utf8_lossy(a)));
    }
    Reply::error(msg)
}

pub(crate) fn unknown_subcommand(cmd: &str, sub: &[u8]) -> Reply {
    Reply::error(format!(
        "ERR unknown subcommand '{}'. Try {} HELP.",
        String::from_utf8_lossy(sub),
        cmd.to_ascii_uppercase()
    ))
}

/// Redis' flags of the connection commands (HELLO, QUIT, RESET, AUTH).
const CONNECTION_FLAGS: &[&str] = &[
    "noscript",
    "loading",
    "stale",
    "fast",
    "no_auth",
    "allow_busy",
];
/// Redis' flags of the (un)subscribe commands.
const SUBSCRIBE_FLAGS: &[&str] = &["pubsub", "noscript", "loading", "stale"];

/// Commands this sidecar serves, for COMMAND: name, arity, flags.
pub(crate) const COMMANDS: &[(&str, i64, &[&str])] = &[
    ("ping", -1, &["fast", "pubsub"]),
    ("echo", 2, &["fast"]),
    ("hello", -1, CONNECTION_FLAGS),
    ("client", -2, &[]),
    ("select", 2, &["loading", "stale", "fast"]),
    ("quit", -1, CONNECTION_FLAGS),
    ("reset", 1, CONNECTION_FLAGS),
    ("command", -1, &["loading", "stale"]),
    ("subscribe", -2, SUBSCRIBE_FLAGS),
    ("unsubscribe", -1, SUBSCRIBE_FLAGS),
    ("psubscribe", -2, SUBSCRIBE_FLAGS),
    ("punsubscribe", -1, SUBSCRIBE_FLAGS),
    ("publish", 3, &["pubsub", "loading", "stale", "fast"]),
    ("ssubscribe", -2, SUBSCRIBE_FLAGS),
    ("sunsubscribe", -1, SUBSCRIBE_FLAGS),
    ("spublish", 3, &["pubsub", "loading", "stale", "fast"]),
    ("pubsub", -2, &[]),
    // Asked by clients and tools on their own (see `introspection`).
    ("info", -1, &["loading", "stale"]),
    ("config", -2, &[]),
    ("time", 1, &["loading", "stale", "fast"]),
    ("dbsize", 1, &["readonly", "fast"]),
    ("lastsave", 1, &["loading", "stale", "fast"]),
    ("role", 1, &["noscript", "loading", "stale", "fast"]),
    ("auth", -2, CONNECTION_FLAGS),
    ("cluster", -2, &[]),
    ("readonly", 1, &["loading", "stale", "fast"]),
    ("readwrite", 1, &["loading", "stale", "fast"]),
];

/// Redis' answer to credentials of a user other than `default`, the only one here.
pub(crate) const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// Redis' answer, without cluster mode, to the commands only Redis Cluster serves.
pub(crate) const NO_CLUSTER: &str = "ERR This instance has cluster support disabled";

pub(crate) fn command_info(name: &str, arity: i64, flags: &[&'static str]) -> Reply {
    Reply::Array(vec![
        Reply::bulk(name.to_string()),
        Reply::Int(arity),
        Reply::Array(flags.iter().map(|f| Reply::Simple(f)).collect()),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
    ])
}
