//! What clients and tools ask about the server: INFO, CONFIG, TIME, DBSIZE, LASTSAVE,
//! ROLE, and the cluster-only commands (answered as a standalone Redis answers them). The
//! text is built in `crate::introspection`.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{lower, unknown_subcommand, NO_CLUSTER};
use crate::api::HubCmd;
use crate::client::{lock, Client, Shared};
use crate::introspection::{self, ServerFacts};
use crate::resp::Reply;

impl Client {
    pub(crate) async fn introspect(&mut self, name: &str, args: &[Bytes], shared: &Shared) {
        match name {
            "info" => self.info_command(args, shared).await,
            "config" => self.config_command(args, shared),
            "time" => {
                let (secs, micros) = introspection::time();
                self.reply(Reply::Array(vec![
                    Reply::bulk(secs.to_string()),
                    Reply::bulk(micros.to_string()),
                ]));
            }
            // No keys live here: an empty server's answers.
            "dbsize" => self.reply(Reply::Int(0)),
            "lastsave" => self.reply(Reply::Int(shared.started_unix as i64)),
            "role" => self.reply(Reply::Array(vec![
                Reply::bulk("master"),
                Reply::Int(0),
                Reply::Array(vec![]),
            ])),
            "cluster" | "readonly" | "readwrite" => self.reply(Reply::error(NO_CLUSTER)),
            _ => self.reply(super::unknown_command(args)),
        }
    }

    pub(crate) async fn info_command(&mut self, args: &[Bytes], shared: &Shared) {
        let (tx, rx) = oneshot::channel();
        let _ = shared.hub.send(HubCmd::Info(tx)).await;
        let Ok(hub) = rx.await else {
            self.reply(Reply::error("ERR the sidecar is shutting down"));
            return;
        };
        let facts = ServerFacts {
            run_id: hub.run_id,
            port: shared.bind.port(),
            uptime: shared.started.elapsed(),
            connected_clients: lock(&shared.clients).len(),
            total_connections: shared.total_connections.load(Ordering::Relaxed),
            total_commands: shared.total_commands.load(Ordering::Relaxed),
            pubsub_channels: hub.channels,
            pubsub_patterns: hub.patterns,
            pubsub_shard_channels: hub.shard_channels,
            mesh: shared.mesh.clone(),
            service: shared.service.clone(),
            cell: shared.cell.clone(),
            transmitter: hub.transmitter,
            started_unix: shared.started_unix,
        };
        let text = introspection::info(&facts, &introspection::info_sections(&args[1..]));
        self.reply(Reply::Verbatim(text.into()));
    }

    pub(crate) fn config_command(&mut self, args: &[Bytes], shared: &Shared) {
        let sub = lower(&args[1]);
        let reply = match sub.as_str() {
            "get" if args.len() >= 3 => Reply::Map(
                introspection::config_get(shared.bind, &args[2..], shared.client_output_buffer_bytes)
                    .into_iter()
                    .map(|(k, v)| (Reply::bulk(k), Reply::bulk(v)))
                    .collect(),
            ),
            "resetstat" if args.len() == 2 => Reply::Simple("OK"),
            "set" if args.len() >= 4 && args.len().is_multiple_of(2) => Reply::error(format!(
                "ERR CONFIG SET failed (possibly related to argument '{}') - the Thynapse sidecar's settings come from its mesh",
                String::from_utf8_lossy(&args[2])
            )),
            "get" | "set" | "resetstat" => Reply::error(format!(
                "ERR wrong number of arguments for 'config|{sub}' command"
            )),
            _ => unknown_subcommand("config", &args[1]),
        };
        self.reply(reply);
    }
}
