//! One load generator for all three systems: RESP (redis-rs) for Redis and Thynapse's
//! sidecars, async-nats for NATS. Every payload carries a sequence number and its send
//! time, so receivers count loss and duplicates and measure one-way latency (sender and
//! receivers share this machine's clock).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::watch;

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Resp(SocketAddr),
    Nats(String),
}

/// Payloads whose sequence number is this are readiness probes, not counted.
const PROBE: u64 = u64::MAX;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(16)];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&now_ns().to_le_bytes());
    p
}

/// What one subscriber saw.
pub struct Received {
    /// Which sequence numbers arrived (for anycatch, several subscribers' are added up:
    /// a copy at two of them is a duplicate, not two deliveries).
    pub got: Vec<bool>,
    pub messages: u64,
    pub duplicates: u64,
    pub last: Option<Instant>,
    pub latency_us: Histogram<u64>,
}

struct Seen {
    r: Received,
}

impl Seen {
    fn new(expected: u64) -> Self {
        Seen {
            r: Received {
                got: vec![false; expected as usize],
                messages: 0,
                duplicates: 0,
                last: None,
                latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            },
        }
    }

    fn on(&mut self, p: &[u8]) {
        if p.len() < 16 {
            return;
        }
        let seq = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
        if seq == PROBE {
            return;
        }
        let sent = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
        let now = now_ns();
        match self.r.got.get_mut(seq as usize) {
            Some(true) => self.r.duplicates += 1,
            Some(slot) => {
                *slot = true;
                self.r.messages += 1;
            }
            None => {}
        }
        self.r.last = Some(Instant::now());
        let _ = self
            .r
            .latency_us
            .record((now.saturating_sub(sent) / 1000).max(1));
    }
}

/// A subscriber task; `stop` ends it and its JoinHandle gives what it received.
pub struct Subscriber {
    pub task: tokio::task::JoinHandle<anyhow::Result<Received>>,
    pub count: Arc<std::sync::atomic::AtomicU64>,
}

/// Subscribes to `channel` (or the shard channel, or as a queue-group member).
pub async fn subscribe(
    endpoint: &Endpoint,
    channel: &str,
    shard: bool,
    queue_group: bool,
    expected: u64,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Subscriber> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let mut stop = stop;
    let task = match endpoint {
        Endpoint::Resp(addr) => {
            // A plain RESP2 reader (redis-protocol's decoder): the same code for Redis and
            // the sidecars, and SSUBSCRIBE, which redis-rs' async PubSub lacks.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut socket = tokio::net::TcpStream::connect(addr).await?;
            socket.set_nodelay(true)?;
            let verb = if shard { "SSUBSCRIBE" } else { "SUBSCRIBE" };
            let request = format!(
                "*2\r\n${}\r\n{verb}\r\n${}\r\n{channel}\r\n",
                verb.len(),
                channel.len()
            );
            socket.write_all(request.as_bytes()).await?;
            let mut buf = bytes::BytesMut::with_capacity(1 << 16);
            // The confirmation first: then the subscription is in place at the sidecar.
            loop {
                if socket.read_buf(&mut buf).await? == 0 {
                    anyhow::bail!("{addr} closed the connection");
                }
                if redis_protocol::resp2::decode::decode_bytes_mut(&mut buf)?.is_some() {
                    break;
                }
            }
            tokio::spawn(async move {
                use redis_protocol::resp2::types::BytesFrame;
                let mut seen = Seen::new(expected);
                loop {
                    while let Some((frame, _, _)) =
                        redis_protocol::resp2::decode::decode_bytes_mut(&mut buf)?
                    {
                        if let BytesFrame::Array(items) = frame {
                            if let Some(BytesFrame::BulkString(p)) = items.last() {
                                seen.on(p);
                            }
                        }
                    }
                    counter.store(seen.r.messages, Ordering::Relaxed);
                    tokio::select! {
                        n = socket.read_buf(&mut buf) => if n? == 0 { break },
                        _ = stop.changed() => break,
                    }
                }
                Ok(seen.r)
            })
        }
        Endpoint::Nats(url) => {
            let client = async_nats::connect(url.as_str()).await?;
            let mut sub = if queue_group {
                client
                    .queue_subscribe(channel.to_string(), "bench".to_string())
                    .await?
            } else {
                client.subscribe(channel.to_string()).await?
            };
            // The server has the subscription once the connection is flushed.
            client.flush().await?;
            tokio::spawn(async move {
                let _client = client;
                let mut seen = Seen::new(expected);
                loop {
                    tokio::select! {
                        m = sub.next() => match m {
                            Some(m) => {
                                seen.on(&m.payload);
                                counter.store(seen.r.messages, Ordering::Relaxed);
                            }
                            None => break,
                        },
                        _ = stop.changed() => break,
                    }
                }
                Ok(seen.r)
            })
        }
    };
    Ok(Subscriber { task, count })
}

/// A publisher on one connection.
pub enum Publisher {
    Resp(redis::aio::MultiplexedConnection),
    Nats(async_nats::Client),
}

impl Publisher {
    pub async fn connect(endpoint: &Endpoint) -> anyhow::Result<Publisher> {
        Ok(match endpoint {
            Endpoint::Resp(addr) => {
                let client = redis::Client::open(format!("redis://{addr}/"))?;
                Publisher::Resp(client.get_multiplexed_async_connection().await?)
            }
            Endpoint::Nats(url) => Publisher::Nats(async_nats::connect(url.as_str()).await?),
        })
    }

    /// Publishes probes until one reaches `receivers` (RESP answers how many it reached;
    /// NATS subscriptions are in place once flushed, so one probe suffices).
    pub async fn until_routed(
        &mut self,
        channel: &str,
        shard: bool,
        receivers: i64,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = payload(PROBE, 16);
            match self {
                Publisher::Resp(conn) => {
                    let cmd = if shard { "SPUBLISH" } else { "PUBLISH" };
                    let n: i64 = redis::cmd(cmd)
                        .arg(channel)
                        .arg(probe)
                        .query_async(conn)
                        .await?;
                    if n >= receivers {
                        return Ok(());
                    }
                }
                Publisher::Nats(c) => {
                    c.publish(channel.to_string(), probe.into()).await?;
                    c.flush().await?;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("{channel} never reached {receivers} receivers");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends messages `first..first+n` of `size` bytes; pipelines of `batch` with up to 4
    /// in flight for RESP, buffered publishes for NATS.
    pub async fn send(
        &mut self,
        channel: &str,
        shard: bool,
        first: u64,
        n: u64,
        size: usize,
    ) -> anyhow::Result<()> {
        const BATCH: u64 = 256;
        match self {
            Publisher::Resp(conn) => {
                let cmd = if shard { "SPUBLISH" } else { "PUBLISH" };
                let mut inflight = FuturesUnordered::new();
                let mut seq = first;
                while seq < first + n {
                    let end = (seq + BATCH).min(first + n);
                    let mut pipe = redis::pipe();
                    for s in seq..end {
                        pipe.cmd(cmd).arg(channel).arg(payload(s, size)).ignore();
                    }
                    let mut c = conn.clone();
                    inflight.push(async move { pipe.query_async::<()>(&mut c).await });
                    if inflight.len() >= 4 {
                        inflight.next().await.transpose()?;
                    }
                    seq = end;
                }
                while let Some(r) = inflight.next().await {
                    r?;
                }
            }
            Publisher::Nats(c) => {
                for s in first..first + n {
                    c.publish(channel.to_string(), payload(s, size).into())
                        .await?;
                }
                c.flush().await?;
            }
        }
        Ok(())
    }
}
