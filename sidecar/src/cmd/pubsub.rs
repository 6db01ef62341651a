//! Pub/sub commands: (P|S)SUBSCRIBE and their UNSUBSCRIBEs, PUBSUB. (S)PUBLISH is the
//! connection's fast path (`Client::try_publish`).

use std::collections::{BTreeMap, BTreeSet};
use thynapse_protocol::permissions::refusal;

use bytes::Bytes;
use thynapse_protocol::room::room_of;
use tokio::sync::oneshot;

use super::{lower, sub_kind, unknown_subcommand};
use crate::api::{HubCmd, SubKind};
use crate::client::{name_too_long, over_interest_budget, Client, Pending, Shared};
use crate::resp::Reply;

impl Client {
    pub(crate) fn set_of(&mut self, kind: SubKind) -> &mut BTreeSet<Bytes> {
        match kind {
            SubKind::Channel => &mut self.channels,
            SubKind::Pattern => &mut self.patterns,
            SubKind::Shard => &mut self.shard,
        }
    }

    pub(crate) fn subscribed(&self) -> bool {
        !self.channels.is_empty() || !self.patterns.is_empty() || !self.shard.is_empty()
    }

    /// The count in a (un)subscribe reply, as Redis 7 gives it: shard channels are counted
    /// apart from channels and patterns.
    pub(crate) fn subscription_count(&self, kind: SubKind) -> i64 {
        match kind {
            SubKind::Channel | SubKind::Pattern => {
                (self.channels.len() + self.patterns.len()) as i64
            }
            SubKind::Shard => self.shard.len() as i64,
        }
    }

    /// SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE: the confirmations wait until the mesh knows the
    /// subscriptions (one barrier per session; see `crate::confirm`).
    pub(crate) async fn subscribe(&mut self, name: &str, args: &[Bytes], shared: &Shared) {
        let kind = sub_kind(name);
        let names: Vec<Bytes> = args[1..].to_vec();
        // As Redis ACL: one channel the Service may not have refuses the whole command.
        let permitted = |n: &Bytes| match kind {
            SubKind::Pattern => shared.permissions.may_psubscribe(n),
            _ => shared.permissions.may_subscribe(n),
        };
        if let Some(n) = names.iter().find(|n| !permitted(n)) {
            shared.refused.with_label_values(&["permission"]).inc();
            self.reply(Reply::error(refusal(&shared.service, n)));
            return;
        }
        let refused = if kind == SubKind::Shard {
            // A name over the limit is refused below, without asking for its room.
            let admissible: Vec<Bytes> = names
                .iter()
                .filter(|n| name_too_long(n).is_none())
                .cloned()
                .collect();
            self.admit_rooms(&admissible, shared).await
        } else {
            BTreeMap::new()
        };
        // Subscriptions new to this client, by session (the mesh, or each room):
        // the confirmations wait behind one barrier per session.
        let mut new: BTreeMap<Option<&[u8]>, Vec<Bytes>> = BTreeMap::new();
        let mut replies = Vec::new();
        // Bytes of new subscriptions in this command, not yet counted by the hub.
        let mut asked = 0;
        for n in &names {
            if let Some(error) = refused.get(room_of(n)) {
                replies.push(Reply::error(format!("ERR {error}")));
                continue;
            }
            if let Some(error) = name_too_long(n) {
                shared.refused.with_label_values(&["name_length"]).inc();
                replies.push(Reply::error(error));
                continue;
            }
            let new_here = !self.set_of(kind).contains(n);
            if kind != SubKind::Shard && new_here {
                if let Some(error) = over_interest_budget(shared, n, asked) {
                    shared.refused.with_label_values(&["interest_bytes"]).inc();
                    replies.push(Reply::error(error));
                    continue;
                }
                asked += n.len() + 6;
            }
            if self.set_of(kind).insert(n.clone()) {
                let session = (kind == SubKind::Shard).then(|| room_of(n));
                new.entry(session).or_default().push(n.clone());
            }
            let count = self.subscription_count(kind);
            replies.push(Reply::Push(vec![
                Reply::bulk(name.to_string()),
                Reply::Bulk(n.clone()),
                Reply::Int(count),
            ]));
        }
        for names in new.into_values() {
            let token = self.open_slot(Pending::Barrier);
            let cmd = HubCmd::Subscribe {
                client: self.id,
                kind,
                names,
                token,
            };
            let _ = shared.hub.send(cmd).await;
        }
        for r in replies {
            self.reply(r);
        }
    }

    pub(crate) async fn unsubscribe(&mut self, name: &str, args: &[Bytes], shared: &Shared) {
        let kind = sub_kind(name);
        if args.len() == 1 {
            self.unsubscribe_all(kind, shared, true).await;
        } else {
            let mut gone = Vec::new();
            let mut replies = Vec::new();
            for n in &args[1..] {
                if self.set_of(kind).remove(n) {
                    gone.push(n.clone());
                }
                let count = self.subscription_count(kind);
                replies.push(Reply::Push(vec![
                    Reply::bulk(name.to_string()),
                    Reply::Bulk(n.clone()),
                    Reply::Int(count),
                ]));
            }
            self.unsubscribe_in_hub(kind, gone, shared).await;
            for r in replies {
                self.reply(r);
            }
        }
    }

    /// Asks the hub whether each room of `channels` may be used (placing new rooms);
    /// returns the refused rooms with the reason.
    pub(crate) async fn admit_rooms(
        &mut self,
        channels: &[Bytes],
        shared: &Shared,
    ) -> BTreeMap<Bytes, String> {
        let rooms: BTreeSet<Bytes> = channels
            .iter()
            .filter(|c| !self.shard.contains(*c))
            .map(|c| Bytes::copy_from_slice(room_of(c)))
            .collect();
        let mut asks = Vec::new();
        for room in rooms {
            let (tx, rx) = oneshot::channel();
            let _ = shared.hub.send(HubCmd::Admit(room.clone(), tx)).await;
            asks.push(async move { (room, rx.await) });
        }
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(room, verdict)| match verdict {
                Ok(Err(e)) => Some((room, e)),
                _ => None,
            })
            .collect()
    }

    /// Drops subscriptions in the hub. The replies that follow wait until it has: a
    /// message the hub delivered before then is written first, and none comes after the
    /// confirmation, as in Redis.
    pub(crate) async fn unsubscribe_in_hub(
        &mut self,
        kind: SubKind,
        names: Vec<Bytes>,
        shared: &Shared,
    ) {
        if names.is_empty() {
            return;
        }
        let token = self.open_slot(Pending::Barrier);
        let cmd = HubCmd::Unsubscribe {
            client: self.id,
            kind,
            names,
            token,
        };
        let _ = shared.hub.send(cmd).await;
    }

    pub(crate) async fn unsubscribe_all(&mut self, kind: SubKind, shared: &Shared, reply: bool) {
        let set = std::mem::take(self.set_of(kind));
        let verb = match kind {
            SubKind::Channel => "unsubscribe",
            SubKind::Pattern => "punsubscribe",
            SubKind::Shard => "sunsubscribe",
        };
        self.unsubscribe_in_hub(kind, set.iter().cloned().collect(), shared)
            .await;
        if reply {
            if set.is_empty() {
                let count = self.subscription_count(kind);
                self.reply(Reply::Push(vec![
                    Reply::bulk(verb),
                    Reply::Null,
                    Reply::Int(count),
                ]));
            }
            let mut remaining = self.subscription_count(kind) + set.len() as i64;
            for n in &set {
                remaining -= 1;
                self.reply(Reply::Push(vec![
                    Reply::bulk(verb),
                    Reply::Bulk(n.clone()),
                    Reply::Int(remaining),
                ]));
            }
        }
    }

    pub(crate) async fn pubsub(&mut self, args: &[Bytes], shared: &Shared) {
        let sub = lower(&args[1]);
        match sub.as_str() {
            "channels" | "shardchannels" if args.len() <= 3 => {
                let kind = if sub == "channels" {
                    SubKind::Channel
                } else {
                    SubKind::Shard
                };
                let (tx, rx) = oneshot::channel();
                let _ = shared
                    .hub
                    .send(HubCmd::Channels(kind, args.get(2).cloned(), tx))
                    .await;
                let names = rx.await.unwrap_or_default();
                self.reply(Reply::Array(names.into_iter().map(Reply::Bulk).collect()));
            }
            "numsub" | "shardnumsub" => {
                let kind = if sub == "numsub" {
                    SubKind::Channel
                } else {
                    SubKind::Shard
                };
                let names: Vec<Bytes> = args[2..].to_vec();
                let (tx, rx) = oneshot::channel();
                let _ = shared
                    .hub
                    .send(HubCmd::NumSub(kind, names.clone(), tx))
                    .await;
                let counts = rx.await.unwrap_or_default();
                let mut out = Vec::new();
                for (n, c) in names.into_iter().zip(counts) {
                    out.push(Reply::Bulk(n));
                    out.push(Reply::Int(c));
                }
                self.reply(Reply::Array(out));
            }
            "numpat" if args.len() == 2 => {
                let (tx, rx) = oneshot::channel();
                let _ = shared.hub.send(HubCmd::NumPat(tx)).await;
                self.reply(Reply::Int(rx.await.unwrap_or(0)));
            }
            "channels" | "numpat" | "shardchannels" => self.reply(Reply::error(format!(
                "ERR wrong number of arguments for 'pubsub|{sub}' command"
            ))),
            _ => self.reply(unknown_subcommand("pubsub", &args[1])),
        }
    }
}
