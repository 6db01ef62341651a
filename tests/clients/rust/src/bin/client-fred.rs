//! fred through the client-matrix scenario of `tests/test_clients.py`.
//!
//! A `SubscriberClient` with `manage_subscriptions()`, fred's way to keep subscriptions across
//! reconnections. fred reconnects only with a reconnect policy, which its defaults leave
//! unset, so both clients get `ReconnectPolicy::default()` (forever, every second); nothing
//! else is changed.

use fred::prelude::*;
use fred::types::{MessageKind, RespVersion};
use thynapse_client_matrix::{fail, run, Event, Kind, Publish, Reconnect, Scenario};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc::unbounded_channel;

struct Publisher(fred::clients::Client);

impl Publish for Publisher {
    async fn publish(
        &mut self,
        command: &'static str,
        channel: &str,
        payload: &str,
    ) -> Result<i64, String> {
        let answer = match command {
            "PUBLISH" => self.0.publish(channel, payload).await,
            _ => self.0.spublish(channel, payload).await,
        };
        answer.map_err(|e| e.to_string())
    }
}

fn builder(s: &Scenario, addr: &str) -> Builder {
    let mut config = Config::from_url(&format!("redis://{addr}")).unwrap_or_else(|e| fail(e));
    if s.protocol == Some(3) {
        config.version = RespVersion::RESP3;
    }
    let mut builder = Builder::from_config(config);
    builder.set_policy(ReconnectPolicy::default());
    // fred hands messages out through a broadcast channel of 32 by default: a reader
    // slowed by a loaded machine (CI) lags behind the 60 messages of phase 1 and fred
    // drops them on its side. Room for all of them; the test is about the mesh.
    builder.with_performance_config(|p| p.broadcast_channel_capacity = 4096);
    builder
}

#[tokio::main]
async fn main() {
    let s = Scenario::from_args();
    let sub = builder(&s, &s.sub)
        .build_subscriber_client()
        .unwrap_or_else(|e| fail(e));
    let publ = builder(&s, &s.publ).build().unwrap_or_else(|e| fail(e));
    sub.init()
        .await
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    publ.init()
        .await
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    let pongs: (String, String) = (
        sub.ping(None).await.unwrap_or_else(|e| fail(e)),
        publ.ping(None).await.unwrap_or_else(|e| fail(e)),
    );
    if pongs != ("PONG".into(), "PONG".into()) {
        fail("PING");
    }

    let _manager = sub.manage_subscriptions();
    let mut messages = sub.message_rx();
    // Each call returns once the server confirmed.
    let subscribed = async {
        sub.subscribe(&s.ch).await?;
        sub.psubscribe(&s.pat).await?;
        sub.ssubscribe(&s.sh).await
    };
    subscribed
        .await
        .unwrap_or_else(|e| fail(format!("subscribe: {e}")));

    let (events, rx) = unbounded_channel();
    let pat = s.pat.clone();
    tokio::spawn(async move {
        loop {
            let msg = match messages.recv().await {
                Ok(msg) => msg,
                Err(RecvError::Lagged(n)) => fail(format!("fred dropped {n} messages")),
                Err(RecvError::Closed) => return,
            };
            // fred's Message carries the channel only: a pmessage's pattern is the one subscribed.
            let (kind, pattern) = match msg.kind {
                MessageKind::Message => (Kind::Message, None),
                MessageKind::PMessage => (Kind::PMessage, Some(pat.clone())),
                MessageKind::SMessage => (Kind::SMessage, None),
            };
            let data = msg
                .value
                .convert()
                .unwrap_or_else(|e| fail(format!("payload: {e}")));
            let _ = events.send(Event::Message {
                kind,
                channel: msg.channel.to_string(),
                pattern,
                data,
            });
        }
    });
    run(s, rx, Publisher(publ), Reconnect::Library).await;
}
