//! redis-rs (the `redis` crate) through the client-matrix scenario of `tests/test_clients.py`.
//!
//! RESP2, the crate's default: the dedicated `aio::PubSub` connection. It has no SSUBSCRIBE and
//! drops smessage frames, so the sharded third is left out (NOSHARD), and it does not
//! reconnect: after a lost connection this program reconnects and resubscribes itself.
//!
//! RESP3: a `ConnectionManager` with a push sender and automatic resubscription, the crate's
//! way to pub/sub across reconnections. It reconnects by itself and replays every
//! subscription whose confirmation it saw, shard channels included; SSUBSCRIBE has no method
//! of its own there and goes as a plain command.

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Client, Msg, PushInfo, PushKind, RedisResult};
use thynapse_client_matrix::{fail, run, Event, Kind, Publish, Reconnect, Scenario, PHASE1, ROUND};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// The publisher is a `ConnectionManager` in both modes: the crate's connection that
/// reconnects after an error.
struct Publisher(ConnectionManager);

impl Publish for Publisher {
    async fn publish(
        &mut self,
        command: &'static str,
        channel: &str,
        payload: &str,
    ) -> Result<i64, String> {
        redis::cmd(command)
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.0)
            .await
            .map_err(|e| e.to_string())
    }
}

fn message(kind: Kind, msg: &Msg) -> Event {
    Event::Message {
        kind,
        channel: msg.get_channel_name().to_string(),
        pattern: msg
            .get_pattern()
            .unwrap_or_else(|e| fail(format!("pattern: {e}"))),
        data: msg
            .get_payload()
            .unwrap_or_else(|e| fail(format!("payload: {e}"))),
    }
}

#[tokio::main]
async fn main() {
    let mut s = Scenario::from_args();
    let resp3 = s.protocol == Some(3);
    let url = |addr: &str| {
        format!(
            "redis://{addr}/{}",
            if resp3 { "?protocol=resp3" } else { "" }
        )
    };
    let sub = Client::open(url(&s.sub)).unwrap_or_else(|e| fail(e));
    let publ = Client::open(url(&s.publ)).unwrap_or_else(|e| fail(e));
    let mut publisher = Publisher(
        publ.get_connection_manager()
            .await
            .unwrap_or_else(|e| fail(format!("connect: {e}"))),
    );
    let pong: String = redis::cmd("PING")
        .query_async(&mut publisher.0)
        .await
        .unwrap_or_else(|e| fail(e));
    if pong != "PONG" {
        fail("PING");
    }
    let (events, rx) = unbounded_channel();
    if resp3 {
        subscribe_resp3(&s, sub, events).await;
        run(s, rx, publisher, Reconnect::Library).await;
    } else {
        s.no_shards("redis-rs has no sharded pub/sub over RESP2");
        subscribe_resp2(&s, sub, events).await;
        run(s, rx, publisher, Reconnect::App).await;
    }
}

/// A RESP2 pub/sub connection, PINGed, with both subscriptions confirmed by the server.
async fn pubsub_resp2(sub: &Client, ch: &str, pat: &str) -> RedisResult<PubSub> {
    let mut pubsub = sub.get_async_pubsub().await?;
    let pong: String = pubsub.ping().await?;
    if pong != "PONG" {
        fail("PING");
    }
    pubsub.subscribe(ch).await?;
    pubsub.psubscribe(pat).await?;
    Ok(pubsub)
}

async fn subscribe_resp2(s: &Scenario, sub: Client, events: UnboundedSender<Event>) {
    let (ch, pat) = (s.ch.clone(), s.pat.clone());
    let mut pubsub = pubsub_resp2(&sub, &ch, &pat)
        .await
        .unwrap_or_else(|e| fail(format!("subscribe: {e}")));
    tokio::spawn(async move {
        loop {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let kind = if msg.from_pattern() {
                    Kind::PMessage
                } else {
                    Kind::Message
                };
                let _ = events.send(message(kind, &msg));
            }
            // The stream ended: the connection is gone. Reconnect and resubscribe.
            pubsub = loop {
                tokio::time::sleep(ROUND).await;
                if let Ok(p) = pubsub_resp2(&sub, &ch, &pat).await {
                    break p;
                }
            };
            let _ = events.send(Event::Resubscribed);
        }
    });
}

async fn subscribe_resp3(s: &Scenario, sub: Client, events: UnboundedSender<Event>) {
    let (tx, mut pushes) = unbounded_channel::<PushInfo>();
    let config = ConnectionManagerConfig::new()
        .set_push_sender(tx)
        .set_automatic_resubscription();
    let mut con = sub
        .get_connection_manager_with_config(config)
        .await
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .unwrap_or_else(|e| fail(e));
    if pong != "PONG" {
        fail("PING");
    }
    let subscribed = async {
        con.subscribe(&s.ch).await?;
        con.psubscribe(&s.pat).await?;
        redis::cmd("SSUBSCRIBE")
            .arg(&s.sh)
            .exec_async(&mut con)
            .await
    };
    subscribed
        .await
        .unwrap_or_else(|e| fail(format!("subscribe: {e}")));
    // The confirmations are pushes too: wait for all three.
    let mut confirmed = Vec::new();
    let deadline = tokio::time::Instant::now() + PHASE1;
    while confirmed.len() < 3 {
        match tokio::time::timeout_at(deadline, pushes.recv()).await {
            Ok(Some(p))
                if matches!(
                    p.kind,
                    PushKind::Subscribe | PushKind::PSubscribe | PushKind::SSubscribe
                ) =>
            {
                confirmed.push(p.kind)
            }
            Ok(Some(p)) => fail(format!("before the confirmations: {p:?}")),
            _ => fail(format!("confirmations: only {confirmed:?}")),
        }
    }
    tokio::spawn(async move {
        let _con = con; // the manager lives as long as the subscription
        while let Some(push) = pushes.recv().await {
            let kind = match push.kind {
                PushKind::Message => Kind::Message,
                PushKind::PMessage => Kind::PMessage,
                PushKind::SMessage => Kind::SMessage,
                _ => continue, // confirmations again after a reconnection, disconnections
            };
            let msg = Msg::from_push_info(push).unwrap_or_else(|| fail("malformed push"));
            let _ = events.send(message(kind, &msg));
        }
    });
}
