"""A bounded chaos run: steady multicatch, anycatch and room traffic on a `thynapse up`
mesh while transmitters, sidecars and the rendezvous are killed (SIGKILL), paused
(SIGSTOP, then SIGCONT) and restarted (SIGTERM; `up` starts them again), then the
invariants, from the clients and /metrics:

- no subscriber connection gets a message twice;
- an anycatch message reaches one worker, or two only where the first was sent it and
  left before crediting it (killed, or paused past the expiry), which is counted as a
  redelivery (the worker may have taken it: at least once);
- every acknowledged message is delivered, or counted where it was dropped;
- the mesh is back to full service.

Two kinds of loss and duplicate are documented rather than prevented (docs/architecture.md,
"Known limits") and allowed only for messages published within two expiries before a
transmitter's SIGKILL: what it had acknowledged or taken and not yet passed on dies with
it, uncounted, and an anycatch message it had written to a cell without crediting its
sender is sent to another cell as well. Subscribers' sidecars are paused, never killed:
a killed one takes its clients' subscriptions with it, which a client sees (its
connection closes) and which no mesh can account for.

CHAOS_SECONDS sets the length (40 by default), CHAOS_SEED the random choices (printed)."""

import os
import random
import signal
import threading
import time
from collections import Counter

from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import ShardSubscriber, Subscriber, mesh_yaml, metrics, until_routed, wait_for

EXPIRY_S = 0.25 * 4  # announce_ms × multiplier of mesh_yaml's defaults
WORKERS = ("workers", [{"pattern": "jobs.*", "mode": "anycatch"}])
ROOM = "{lobby}chat"

# Drops that a transmitter or sidecar counts, by metric.
DROP_METRICS = ("thynapse_transmitter_drops_total", "thynapse_sidecar_drops_total")


class Publisher(threading.Thread):
    """Publishes numbered messages on the three kinds of channel, one of each per round,
    and records which were acknowledged, with what count and when they were sent."""

    def __init__(self, mesh, cell, stop):
        super().__init__(daemon=True)
        self.mesh, self.name_, self.stop = mesh, cell["name"], stop
        # No retry: a retried PUBLISH is a second message (redis-py 6+ retries 3 times).
        self.client = mesh.redis(cell, retry=Retry(NoBackoff(), 0))
        self.acked = {"news": {}, "jobs": {}, "room": {}}  # payload -> (count, sent at)
        self.failed = 0

    def run(self):
        seq = 0
        while not self.stop.is_set():
            seq += 1
            for kind, send in (("news", lambda p: self.client.publish("news", p)),
                               ("jobs", lambda p: self.client.publish("jobs.x", p)),
                               ("room", lambda p: self.client.spublish(ROOM, p))):
                payload = b"%s:%s:%d" % (kind.encode(), self.name_.encode(), seq)
                sent = time.monotonic()
                try:
                    self.acked[kind][payload] = (send(payload), sent)
                except Exception:  # its sidecar killed or paused: not acknowledged
                    self.failed += 1
            time.sleep(0.01)


class Poller(threading.Thread):
    """Reads every subscriber and scrapes every process's drop counters while the chaos
    runs (a killed process takes its counters with it: the last scrape is kept)."""

    def __init__(self, mesh, subs, stop):
        super().__init__(daemon=True)
        self.mesh, self.subs, self.stop = mesh, subs, stop
        self.drops = {}  # metrics url + pid -> last total seen
        self.redelivered = {}
        self.lock = threading.Lock()

    def scrape(self):
        try:
            e = self.mesh.refresh()
        except Exception:
            return
        for p in e["transmitters"] + e["cells"]:
            try:
                page = metrics(p["metrics"])
            except Exception:
                continue
            drops = Counter({k: v for k, v in page.items() if k.startswith(DROP_METRICS) and v})
            again = page.get("thynapse_transmitter_anycatch_redelivered_total", 0)
            with self.lock:
                self.drops[(p["metrics"], p.get("pid"))] = drops
                self.redelivered[(p["metrics"], p.get("pid"))] = again

    def run(self):
        last = 0.0
        while not self.stop.is_set():
            for s in self.subs:
                s.poll(timeout=0.01)
            if time.monotonic() - last > 0.3:
                self.scrape()
                last = time.monotonic()

    def counted(self):
        self.scrape()
        with self.lock:
            return sum(sum(d.values()) for d in self.drops.values()), sum(self.redelivered.values())

    def by_reason(self):
        """The drops counted, by metric and reason, over every process seen."""
        with self.lock:
            return sum(self.drops.values(), Counter())


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def pause(pid, seconds):
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the fault itself, not a synchronisation
    finally:
        os.kill(pid, signal.SIGCONT)


def test_chaos_every_acknowledged_message_delivered_once_or_counted(start_mesh):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    seconds = float(os.environ.get("CHAOS_SECONDS", 40))
    print(f"chaos: seed {seed}, {seconds} s")
    rng = random.Random(seed)
    m = start_mesh(mesh_yaml(name="chaos", replicas=3, services=[WORKERS, ("audit", []), ("pub", [])]),
                   cells={"workers": 3, "audit": 2, "pub": 2})
    audits = m.cells("audit")
    workers = m.cells("workers")
    news = [Subscriber(m.redis(c), channels=["news"]) for c in audits]
    rooms = [ShardSubscriber(m.redis(c), [ROOM]) for c in audits]
    jobs = [Subscriber(m.redis(c), patterns=["jobs.*"]) for c in workers]
    probe = m.redis(m.cell("pub-0"))
    until_routed(probe, "news", 2)
    wait_for(lambda: probe.spublish(ROOM, b"probe") == 2, what="the room routed")

    def every_worker_probed():
        probe.publish("jobs.x", b"probe")
        for s in jobs:
            s.poll()
        return all(s.data(b"probe") for s in jobs)

    wait_for(every_worker_probed, what="every worker routable")

    stop_publishing, stop_polling = threading.Event(), threading.Event()
    publishers = [Publisher(m, c, stop_publishing) for c in m.cells("pub")]
    poller = Poller(m, news + rooms + jobs, stop_polling)
    for t in publishers + [poller]:
        t.start()

    m.allow_restarts = True  # its faults kill and stop children: `up` restarts them
    kills = []  # monotonic times of transmitter SIGKILLs
    log = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(rng.uniform(1.0, 2.5))  # time between faults, not a synchronisation
        e = m.refresh()
        live = lambda ps: [p for p in ps if p.get("pid") and alive(p["pid"])]  # noqa: E731
        transmitters, sidecars = live(e["transmitters"]), live(e["cells"])
        publisher_sidecars = [c for c in sidecars if c["service"] == "pub"]
        rendezvous = live(e["rendezvous"])
        action = rng.choice(["kill transmitter", "pause transmitter", "pause transmitter",
                             "restart transmitter", "pause sidecar", "pause sidecar",
                             "kill publisher sidecar", "kill rendezvous", "pause rendezvous"])
        target = {"transmitter": transmitters, "sidecar": sidecars,
                  "publisher sidecar": publisher_sidecars, "rendezvous": rendezvous}[action.split(" ", 1)[1]]
        if not target:
            continue
        victim = rng.choice(target)
        log.append(f"{time.monotonic() - end + seconds:5.1f}s {action} {victim['name']}")
        if action.startswith("kill"):
            if action == "kill transmitter":
                kills.append(time.monotonic())
            os.kill(victim["pid"], signal.SIGKILL)
        elif action.startswith("pause"):
            pause(victim["pid"], rng.uniform(0.2, 2.5 * EXPIRY_S))
        else:
            os.kill(victim["pid"], signal.SIGTERM)
    stop_publishing.set()
    for t in publishers:
        t.join(timeout=30)
    print("chaos:", *log, sep="\n  ")

    # Back to full service: every process running, every subscriber and worker reached.
    def full_service():
        e = m.refresh()
        procs = e["transmitters"] + e["cells"] + e["rendezvous"]
        return all(p.get("pid") and alive(p["pid"]) for p in procs) and len(e["transmitters"]) == 3

    wait_for(full_service, timeout=30, what="every process running again")
    until_routed(probe, "news", 2, timeout=30)
    wait_for(lambda: probe.spublish(ROOM, b"probe") == 2, timeout=30, what="the room routed again")
    stop_polling.set()
    poller.join(timeout=10)
    wait_for(every_worker_probed, timeout=30, what="every worker routable again")

    def near_kill(sent_at):
        return any(k - 2 * EXPIRY_S <= sent_at <= k + 0.2 for k in kills)

    acked = {kind: {p: v for pub in publishers for p, v in pub.acked[kind].items()} for kind in ("news", "jobs", "room")}
    assert sum(len(a) for a in acked.values()) > 1000, f"too little traffic: { {k: len(v) for k, v in acked.items()} }"

    # Whatever was still on its way arrives: wait until the deliveries stop growing.
    subs = news + rooms + jobs
    last = [-1]

    def settled():
        for s in subs:
            s.poll(timeout=0.01)
        n = sum(len(s.messages) for s in subs)
        done, last[0] = n == last[0], n
        return done

    wait_for(settled, timeout=30, interval=2 * EXPIRY_S, what="deliveries settled")

    # No subscriber connection got a message twice.
    for s in subs:
        dups = [p for p, n in Counter(s.data(b"")).items() if n > 1 and not p.startswith(b"probe")]
        assert not dups, f"delivered twice to one subscriber: {dups[:5]}"

    # Anycatch: one worker, or two where the first was sent it and left (killed, paused
    # past the expiry) without crediting it, which is counted as a redelivery; and for
    # what a killed transmitter had in hand.
    counted, redelivered = poller.counted()
    at_workers = Counter(p for s in jobs for p in s.data(b"jobs:"))
    twice = [p for p, n in at_workers.items() if n > 1 and not near_kill(acked["jobs"].get(p, (0, 0))[1])]
    assert not [p for p, n in at_workers.items() if n > 2], "an anycatch message at three workers"
    start = end - seconds
    where = {p: [workers[i]["name"] for i, s in enumerate(jobs) if p in s.data(b"jobs:")] for p in twice[:5]}
    when = {p: round(acked["jobs"].get(p, (0, start))[1] - start, 2) for p in twice[:5]}
    assert len(twice) <= redelivered, (
        f"{len(twice)} anycatch messages at two workers, {redelivered} redeliveries counted: "
        f"{where}, sent at {when}; faults: {log}")

    # Every acknowledged message delivered or counted, outside the SIGKILL windows.
    delivered = {
        "news": Counter(p for s in news for p in set(s.data(b"news:"))),
        "room": Counter(p for s in rooms for p in set(s.data(b"room:"))),
        "jobs": Counter(p for p in at_workers),
    }
    short = 0
    buckets = Counter()
    for kind, messages in acked.items():
        for payload, (count, sent_at) in messages.items():
            if not near_kill(sent_at):
                miss = max(0, count - delivered[kind][payload])
                short += miss
                if miss:
                    buckets[(kind, int(sent_at - end + seconds))] += miss
    print(f"chaos: {sum(len(a) for a in acked.values())} acknowledged, {short} deliveries short, "
          f"{counted} drops counted, {len(twice)} at two workers of {redelivered} redelivered, "
          f"{len(kills)} transmitter kills")
    assert short <= counted, (
        f"{short} acknowledged deliveries neither made nor counted ({counted} counted); "
        f"short by (kind, second): {sorted(buckets.items(), key=lambda kv: kv[0][1])}; "
        f"counted: {dict(poller.by_reason())}; faults: {log}")
