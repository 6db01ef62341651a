//! The scenarios: each drives one system (or the mesh alone) through the load generator
//! and returns what it measured.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::cpu::CpuSnapshot;
use crate::load::{self, Endpoint, Publisher};
use crate::results::{Sample, System};
use crate::servers;

pub struct Setup {
    pub redis: std::net::SocketAddr,
    pub nats: String,
    pub mesh: servers::Mesh,
    pub redis_pid: u32,
    pub nats_pid: u32,
}

/// Publisher and subscriber endpoints for one system in a 1→n scenario.
pub fn endpoints(
    setup: &Setup,
    system: System,
    subscribers: usize,
    same_transmitter: bool,
    service: &str,
) -> (Endpoint, Vec<Endpoint>) {
    endpoints_on(
        setup,
        &setup.mesh,
        system,
        subscribers,
        same_transmitter,
        service,
    )
}

/// `endpoints`, Thynapse's on `mesh` (the encrypted one, say).
pub fn endpoints_on(
    setup: &Setup,
    mesh: &servers::Mesh,
    system: System,
    subscribers: usize,
    same_transmitter: bool,
    service: &str,
) -> (Endpoint, Vec<Endpoint>) {
    match system {
        System::Redis => (
            Endpoint::Resp(setup.redis),
            vec![Endpoint::Resp(setup.redis); subscribers],
        ),
        System::Nats => (
            Endpoint::Nats(setup.nats.clone()),
            vec![Endpoint::Nats(setup.nats.clone()); subscribers],
        ),
        System::Thynapse => {
            let publisher = mesh.cells("bench")[0].clone();
            let candidates: Vec<_> = if service == "bench" {
                mesh.cells("bench")
                    .into_iter()
                    .skip(1)
                    .filter(|c| (c.1 == publisher.1) == same_transmitter)
                    .collect()
            } else {
                mesh.cells(service)
            };
            let subs = (0..subscribers)
                .map(|i| Endpoint::Resp(candidates[i % candidates.len()].0))
                .collect();
            (Endpoint::Resp(publisher.0), subs)
        }
    }
}

/// Receivers a probe must reach before measuring (cells for Thynapse, clients for Redis).
fn probe_receivers(system: System, subs: &[Endpoint], anycatch: bool) -> i64 {
    match system {
        System::Thynapse if anycatch => 1,
        System::Thynapse => {
            let mut cells: Vec<String> = subs.iter().map(|e| format!("{e:?}")).collect();
            cells.sort();
            cells.dedup();
            cells.len() as i64
        }
        _ => subs.len() as i64,
    }
}

/// Publishes `count` messages as fast as the system takes them; returns deliveries per
/// second (from the first send to the last delivery), loss and duplicates.
pub async fn throughput(
    system: System,
    publisher: &Endpoint,
    subs: &[Endpoint],
    channel: &str,
    size: usize,
    count: u64,
    anycatch: bool,
) -> anyhow::Result<Sample> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let queue = anycatch && system == System::Nats;
    let mut subscribers = Vec::new();
    for s in subs {
        subscribers.push(load::subscribe(s, channel, false, queue, count, stop_rx.clone()).await?);
    }
    let mut p = Publisher::connect(publisher).await?;
    p.until_routed(channel, false, probe_receivers(system, subs, anycatch))
        .await?;
    let expected = if anycatch {
        count
    } else {
        count * subs.len() as u64
    };
    let start = Instant::now();
    p.send(channel, false, 0, count, size).await?;
    wait_for_deliveries(&subscribers, expected).await;
    let _ = stop_tx.send(true);
    let mut received = 0;
    let mut duplicates = 0;
    let mut last = start;
    let mut union = vec![false; count as usize];
    for s in subscribers {
        let r = s.task.await??;
        received += r.messages;
        duplicates += r.duplicates;
        last = last.max(r.last.unwrap_or(start));
        for (u, g) in union.iter_mut().zip(&r.got) {
            *u |= *g;
        }
    }
    if anycatch {
        // Each message once, at one subscriber: a copy at a second one is a duplicate,
        // and cannot make up for a message lost elsewhere.
        let unique = union.iter().filter(|g| **g).count() as u64;
        duplicates += received - unique;
        received = unique;
    }
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-6);
    Ok(Sample {
        value: received as f64 / elapsed,
        lost: expected.saturating_sub(received),
        duplicates,
    })
}

/// Waits until the subscribers got `expected` messages in all, or made no progress for 3 s.
async fn wait_for_deliveries(subs: &[load::Subscriber], expected: u64) {
    use std::sync::atomic::Ordering;
    let mut last_total = 0;
    let mut last_change = Instant::now();
    loop {
        let total: u64 = subs.iter().map(|s| s.count.load(Ordering::Relaxed)).sum();
        if total >= expected {
            return;
        }
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(3) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One-way latency at a fixed rate: returns the histogram (µs), loss and duplicates.
pub async fn latency(
    system: System,
    publisher: &Endpoint,
    sub: &Endpoint,
    size: usize,
    rate: u64,
    secs: f64,
) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let total = (rate as f64 * secs) as u64;
    let s = load::subscribe(sub, "lat", false, false, total, stop_rx).await?;
    let mut p = Publisher::connect(publisher).await?;
    p.until_routed(
        "lat",
        false,
        probe_receivers(system, std::slice::from_ref(sub), false),
    )
    .await?;
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(
        Duration::from_millis(1).mul_f64(per_tick as f64 * 1000.0 / rate as f64),
    );
    let mut seq = 0;
    while seq < total {
        tick.tick().await;
        let n = per_tick.min(total - seq);
        p.send("lat", false, seq, n, size).await?;
        seq += n;
    }
    wait_for_deliveries(std::slice::from_ref(&s), total).await;
    let _ = stop_tx.send(true);
    let r = s.task.await??;
    let lost = total.saturating_sub(r.messages);
    Ok((r.latency_us, lost, r.duplicates))
}

/// SUBSCRIBE until its confirmation, `count` times on fresh channels (each unsubscribed
/// before the next): what a subscriber waits before a publish anywhere is sure to reach
/// it. In the mesh the confirmation waits for every transmitter to know the subscription;
/// for NATS the equivalent is SUB followed by a flush (the server has the interest).
/// Returns the round trips in µs.
pub async fn subscribe_round_trips(
    endpoint: &Endpoint,
    count: u64,
) -> anyhow::Result<Histogram<u64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Histogram::<u64>::new(3)?;
    match endpoint {
        Endpoint::Resp(addr) => {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(256);
            for i in 0..count {
                let channel = format!("subrt.{i}");
                for (verb, remaining) in [("SUBSCRIBE", ":1\r\n"), ("UNSUBSCRIBE", ":0\r\n")] {
                    let request = format!(
                        "*2\r\n${}\r\n{verb}\r\n${}\r\n{channel}\r\n",
                        verb.len(),
                        channel.len()
                    );
                    let start = Instant::now();
                    s.write_all(request.as_bytes()).await?;
                    // The one reply: [verb, channel, count]; nothing else flows here.
                    buf.clear();
                    while !buf.ends_with(remaining.as_bytes()) {
                        if s.read_buf(&mut buf).await? == 0 {
                            anyhow::bail!("{addr} closed the connection");
                        }
                    }
                    if verb == "SUBSCRIBE" {
                        h.record(start.elapsed().as_micros() as u64)?;
                    }
                }
            }
        }
        Endpoint::Nats(url) => {
            let client = async_nats::connect(url.as_str()).await?;
            for i in 0..count {
                let start = Instant::now();
                let mut sub = client.subscribe(format!("subrt.{i}")).await?;
                client.flush().await?;
                h.record(start.elapsed().as_micros() as u64)?;
                sub.unsubscribe().await?;
            }
        }
    }
    Ok(h)
}

/// What one rooms run measured.
pub struct RoomsRun {
    pub sample: Sample,
    pub transmitters: Vec<RoomShare>,
    /// CPU seconds each mesh process and the load generator used while the messages flowed.
    pub cpu_used: Vec<(String, f64)>,
}

/// One transmitter's part in a rooms run.
pub struct RoomShare {
    pub name: String,
    pub hosted: usize,
    pub carried: f64,
    /// CPU seconds while the messages flowed.
    pub cpu: f64,
    /// CPU time over wall time while the messages flowed: 1.0 is one CPU used up.
    pub busy: f64,
}

impl RoomsRun {
    /// The aggregate rate the transmitters could carry before the busiest of them runs out
    /// of its CPU, from the rate measured and that transmitter's share of a CPU. On one
    /// machine the clients (load generator, sidecars) share the CPUs with the transmitters
    /// and cap the measured rate; this is what the transmitters themselves would allow.
    /// None when the busiest used under 10 ms of CPU (a quick run): too little to scale up.
    pub fn transmitter_capacity(&self) -> Option<f64> {
        let busiest = self
            .transmitters
            .iter()
            .max_by(|a, b| a.busy.total_cmp(&b.busy))?;
        (busiest.cpu >= 0.01).then(|| self.sample.value / busiest.busy)
    }
}

/// Rooms: `rooms` rooms, a subscriber each and publishers on every cell, the publishers
/// driven in `groups` groups that run in parallel.
pub async fn rooms(
    setup: &Setup,
    rooms: usize,
    per_room: u64,
    groups: usize,
) -> anyhow::Result<RoomsRun> {
    let cells = setup.mesh.cells("bench");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subs = Vec::new();
    for i in 0..rooms {
        let ep = Endpoint::Resp(cells[i % cells.len()].0);
        subs.push(
            load::subscribe(
                &ep,
                &format!("{{room-{i}}}x"),
                true,
                false,
                per_room,
                stop_rx.clone(),
            )
            .await?,
        );
    }
    let mut publishers = Vec::new();
    for i in 0..rooms {
        let ep = Endpoint::Resp(cells[(i + 1) % cells.len()].0);
        let mut p = Publisher::connect(&ep).await?;
        p.until_routed(&format!("{{room-{i}}}x"), true, 1).await?;
        publishers.push(p);
    }
    // (name, room messages carried, rooms hosted) for every transmitter.
    let carried = |setup: &Setup| -> Vec<(String, f64, usize)> {
        setup
            .mesh
            .transmitters()
            .into_iter()
            .map(|(name, _, metrics, _)| {
                let counts =
                    servers::counter_by_label(&metrics, "thynapse_transmitter_room_messages_total");
                let ours = counts.iter().filter(|(room, _)| room.starts_with("room-"));
                (name, ours.clone().map(|(_, v)| v).sum(), ours.count())
            })
            .collect()
    };
    let before = carried(setup);
    let cpu_before = CpuSnapshot::take(setup, System::Thynapse);
    let start = Instant::now();
    // The publishers in `groups` groups, each driving its share. The first runs here, on the
    // thread that drives this future (as every other scenario's publisher does); the rest
    // are tasks on the load threads. All in one group, one thread builds every publish,
    // which capped the aggregate on 16 cores.
    let mut shares: Vec<Vec<(usize, Publisher)>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, p) in publishers.into_iter().enumerate() {
        shares[i % groups].push((i, p));
    }
    let drive = |share: Vec<(usize, Publisher)>| {
        futures::future::try_join_all(share.into_iter().map(|(i, mut p)| async move {
            p.send(&format!("{{room-{i}}}x"), true, 0, per_room, 64)
                .await
        }))
    };
    let mut shares = shares.into_iter();
    let here = shares.next().unwrap_or_default();
    let spawned: Vec<_> = shares.map(|share| tokio::spawn(drive(share))).collect();
    drive(here).await?;
    for share in spawned {
        share.await??;
    }
    let expected = per_room * rooms as u64;
    wait_for_deliveries(&subs, expected).await;
    let cpu_used = CpuSnapshot::take(setup, System::Thynapse).since(&cpu_before);
    let wall = start.elapsed().as_secs_f64().max(1e-6);
    let _ = stop_tx.send(true);
    let (mut received, mut duplicates, mut last) = (0, 0, start);
    for s in subs {
        let r = s.task.await??;
        received += r.messages;
        duplicates += r.duplicates;
        last = last.max(r.last.unwrap_or(start));
    }
    let transmitters = carried(setup)
        .into_iter()
        .map(|(name, v, hosted)| {
            let was = before.iter().find(|b| b.0 == name).map_or(0.0, |b| b.1);
            let used = cpu_used
                .iter()
                .find(|(n, _)| *n == format!("transmitter {name}"))
                .map_or(0.0, |c| c.1);
            RoomShare {
                cpu: used,
                busy: used / wall,
                name,
                hosted,
                carried: v - was,
            }
        })
        .collect();
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-6);
    Ok(RoomsRun {
        sample: Sample {
            value: received as f64 / elapsed,
            lost: expected.saturating_sub(received),
            duplicates,
        },
        transmitters,
        cpu_used,
    })
}

/// Waits (up to 15 s) until every transmitter announces a message rate under 50/s.
pub async fn settle(setup: &Setup) {
    use thynapse_protocol::discovery::Datagram;
    let Some(address) = setup.mesh.endpoints["rendezvous"][0]["address"].as_str() else {
        return;
    };
    let addresses = [address.to_string()];
    let query = Datagram::Query {
        mesh: "bench".into(),
    };
    let sealer = setup
        .mesh
        .tokens()
        .and_then(|t| thynapse_protocol::seal::Sealer::peer(&t, "bench"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let answer = thynapse_rendezvous::ask(
            &addresses,
            &query,
            Duration::from_millis(500),
            sealer.as_ref(),
        )
        .await;
        if let Some(Datagram::Peers { transmitters, .. }) = answer {
            if transmitters.iter().all(|t| t.rate < 50.0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens `n` cells (raw DEALERs saying HELO, after AUTH with the `token` when the mesh
/// has one) on one transmitter; returns its RSS then.
pub async fn transmitter_rss_with_cells(
    command: &str,
    pid: u32,
    n: usize,
    token: Option<&[u8]>,
) -> anyhow::Result<u64> {
    use thynapse_protocol::frame::CommandFrame;
    use thynapse_protocol::wire::{cmd, Events, Hello};
    use thynapse_protocol::Thid;
    use zeromq::{Socket, SocketRecv, SocketSend};
    let mut sockets = Vec::new();
    for i in 0..n {
        let mut s = zeromq::DealerSocket::new();
        s.connect(command).await?;
        if let Some(token) = token {
            let key = thynapse_protocol::auth::Key::service(token, "idle");
            let auth = thynapse_protocol::auth::ClientAuth::cell(key, "idle", command);
            thynapse_link::authenticate(&mut s, auth, Duration::from_secs(5)).await?;
        }
        let hello = Hello {
            id: Thid::random(),
            service: "idle".into(),
            rules: vec![],
            events: Events::Dealer,
            token: None,
            room: None,
        };
        s.send(CommandFrame::json(cmd::HELO, &hello).to_bytes().into())
            .await?;
        let welcome = tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .context("no WLCM")??;
        let first = welcome.get(0).map(|f| f.to_vec()).unwrap_or_default();
        anyhow::ensure!(
            first.get(2..6) == Some(&b"WLCM"[..]),
            "HELO answered {:?}",
            String::from_utf8_lossy(&first)
        );
        let mut subs = zeromq::ZmqMessage::from(
            CommandFrame::new(
                thynapse_protocol::Encoding::Binary,
                cmd::SUBS,
                bytes::Bytes::new(),
            )
            .to_bytes(),
        );
        let channel = format!("idle.{i}");
        subs.push_back(thynapse_protocol::wire::encode_interest([(
            thynapse_protocol::wire::Op::Add,
            thynapse_protocol::wire::Interest::Channel,
            channel.as_bytes(),
        )]));
        s.send(subs).await?;
        sockets.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = servers::rss(pid).unwrap_or(0);
    for mut s in sockets {
        let _ = s
            .send(
                CommandFrame::json(cmd::QUIT, &serde_json::json!({}))
                    .to_bytes()
                    .into(),
            )
            .await;
    }
    Ok(rss)
}
