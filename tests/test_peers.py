"""Transmitter ↔ transmitter promises (docs/protocol.md, docs/architecture.md), checked
against a transmitter written in Python from protocol.md (`rawwire.FakePeer`): the snapshot
a new link starts with, LEAV, a peer that never credits or vanishes, messages waiting
while a link is rebuilt, forwarded messages for cells that left, a peer's oversized frame."""

import json
import os
import signal
import threading

import pytest
import zmq
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import Subscriber, drops, mesh_yaml, metrics, until_an_expiry_passed, wait_for
from rawwire import FakePeer, RawCell, command, envelope_batch, interest

EXPIRY_S = 0.25 * 4  # announce_ms × multiplier of mesh_yaml's defaults


FAKES = []


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    while FAKES:
        FAKES.pop().stop()
    c.destroy(linger=0)


def fake_peer(ctx, mesh, **kw):
    fake = FakePeer(ctx, mesh.endpoints["mesh"], mesh.endpoints["rendezvous"][0]["address"], token=mesh.token, **kw)
    FAKES.append(fake)
    return fake


def fake_cell(fake, transmitter, channels, service="fake"):
    """A cell of the fake peer, told to `transmitter` (CELL) and known there once it
    answers the SYNC sent after it."""
    cell = os.urandom(20).hex()
    header = json.dumps({"id": cell, "service": service, "rules": []})
    fake.send(transmitter["command"], [f"B CELL {header}".encode(), interest(channels)])
    rounds = len(fake.answered("SYND"))
    fake.send(transmitter["command"], [command("SYNC", {"round": rounds + 1})])
    wait_for(lambda: len(fake.answered("SYND")) > rounds, what="the CELL applied")
    return cell


def interest_names(body):
    names, at = [], 0
    while at < len(body):
        n = int.from_bytes(body[at + 2 : at + 6], "little")
        names.append(body[at + 6 : at + 6 + n].decode())
        at += 6 + n
    return names


def test_a_new_peer_gets_a_snapshot_of_every_cell_and_a_drained_transmitter_says_leav(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="snap", replicas=2, services=[("s", [])]), cells={"s": 1})
    cell = m.cells("s")[0]
    sub = Subscriber(m.redis(cell), channels=["snap.ch"])
    fake = fake_peer(ctx, m)
    # Each transmitter links to the newcomer it discovers and starts with a snapshot: the
    # subscription made before the fake existed reaches it as a CELL after the PEER.
    wait_for(lambda: len(fake.received("PEER")) == 2, what="both transmitters linked to the fake peer")
    snapshot = wait_for(lambda: [c for c in fake.received("CELL") if "snap.ch" in interest_names(c[2][0])],
                        what="the cell's interest in a snapshot")
    assert snapshot[0][1]["service"] == "s"
    # A transmitter that drains says LEAV on its link before it exits.
    host = m.transmitter(cell["transmitter"])
    m.allow_restarts = True  # stopped on purpose: `up` restarts it
    os.kill(host["pid"], signal.SIGTERM)
    wait_for(lambda: fake.received("LEAV"), timeout=30, what="LEAV from the drained transmitter")
    sub.pubsub.close()


def test_a_peer_that_never_credits_loses_only_its_own_messages_each_counted_once(start_mesh, ctx):
    """The fake peer takes FWRD batches and never credits them: the link is stuck, and what
    does not fit is dropped for it alone (`peer_backlog`), while a healthy subscriber on
    another transmitter gets everything. Then it vanishes: what it had taken uncredited is
    counted `peer_lost`. Each message to it is delivered or counted, once."""
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}, linkBufferBytes: {limit}}}\n"
    m = start_mesh(mesh_yaml(name="nofack", replicas=2, services=[("s", [])], extra=extra, multiplier=20),
                   cells={"s": 2})
    pub_cell, sub_cell = m.cells("s")
    t_pub, t_sub = m.transmitter(pub_cell["transmitter"]), m.transmitter(sub_cell["transmitter"])
    assert t_pub != t_sub
    fake = fake_peer(ctx, m, multiplier=20)
    fake.credit = False
    fake.link(t_pub["command"])
    fake_cell(fake, t_pub, ["hot"])
    healthy = Subscriber(m.redis(sub_cell), channels=["hot"])
    before = drops(t_pub["metrics"])
    publisher = m.redis(pub_cell, retry=Retry(NoBackoff(), 0))
    sent = [b"h%04d" % i + b"x" * 1020 for i in range(300)]  # over four link buffers
    answered = []
    done = threading.Event()

    def publish():
        pipe = publisher.pipeline(transaction=False)
        for p in sent:
            pipe.publish("hot", p)
        answered.extend(pipe.execute())
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    wait_for(done.is_set, timeout=60, what="every publish answered")
    assert answered == [2] * len(sent), "each publish reached the healthy cell and the fake peer's"
    healthy.wait_count(len(sent), prefix=b"h")
    assert healthy.data(b"h") == sent, "the healthy subscriber got everything, in order"
    # Every message to it was forwarded (and read here, perhaps a little later) or dropped.
    def accounted():
        got = set(fake.seen)
        backlog = drops(t_pub["metrics"])["peer_backlog"] - before["peer_backlog"]
        return len(got) + backlog == len(sent) and (got, backlog)

    got, backlog = wait_for(accounted, what="each message to the fake forwarded or dropped")
    assert backlog > 0, "nothing was dropped: the link was never stuck"
    # It vanishes: the sender counts what it had sent and never got credit for.
    fake.stop()
    wait_for(lambda: drops(t_pub["metrics"])["peer_lost"] - before["peer_lost"] == len(got), timeout=30,
             what=f"{len(got)} uncredited messages counted peer_lost")
    after = drops(t_pub["metrics"])
    assert sum(after.values()) - sum(before.values()) == len(sent), ("a message counted twice", before, after)
    assert sum(drops(t_sub["metrics"]).values()) == 0, "the receiving side counted a loss too"


def test_messages_for_a_peer_wait_while_its_link_is_rebuilt(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="rebuild", replicas=1, services=[("s", [])]), cells={"s": 1})
    t = m.transmitter("rebuild-0")
    fake = fake_peer(ctx, m)
    fake.link(t["command"])
    wait_for(lambda: fake.received("PEER"), what="the transmitter linked to the fake peer")
    fake_cell(fake, t, ["wait.ch"])
    pub = m.redis(m.cells("s")[0], retry=Retry(NoBackoff(), 0))
    sent = [b"w%03d" % i for i in range(40)]
    for p in sent[:20]:
        assert pub.publish("wait.ch", p) == 1
    wait_for(lambda: len(fake.seen) == 20, what="the first messages forwarded")
    # The fake stops answering on the link the transmitter opened to it (no PONG, no PWLC,
    # no FACK): once something on it waits (a batch to credit), the transmitter drops
    # that link and tries again, while the fake's own link keeps it known, and its cell
    # with it.
    reconnects = lambda: metrics(t["metrics"])["thynapse_transmitter_peer_reconnects_total"]  # noqa: E731
    first = reconnects()
    fake.deaf = True
    for p in sent[20:30]:
        assert pub.publish("wait.ch", p) == 1
    wait_for(lambda: reconnects() > first, timeout=10 * EXPIRY_S, what="the silent link dropped")
    for p in sent[30:]:
        assert pub.publish("wait.ch", p) == 1, "the fake's cell was forgotten with the link"
    fake.deaf = False
    wait_for(lambda: len(fake.seen) == len(sent), timeout=10 * EXPIRY_S,
             what="every message forwarded once the link is back")
    got = [f["payload"] for f in fake.forwarded()]
    assert sorted(set(got)) == sent, "what waited arrived"
    assert sum(drops(t["metrics"]).values()) == 0


def test_forwarded_messages_for_cells_that_left_and_publishes_from_strangers_are_counted(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="gone", replicas=1), cells={})
    t = m.transmitter("gone-0")
    # A PUBS from a connection that authenticated but never said HELO: refused, counted
    # `unknown_sender`.
    stranger = RawCell(ctx, t["command"])
    stranger.authenticate()
    stranger.send_binary("PUBS", (1).to_bytes(8, "little"))
    _, cmd, body, _ = stranger.recv()
    assert cmd == "ERRR" and "unknown cell" in body["error"], (cmd, body)
    assert drops(t["metrics"])["unknown_sender"] == 1
    # A peer forwards what it routed by an older view: an anycatch message for a cell that
    # is not here (any more), and a multicatch one nobody here wants. Both `cell_gone`.
    fake = fake_peer(ctx, m)
    fake.link(t["command"])
    origin = os.urandom(20).hex()
    batch = envelope_batch(1, [
        {"origin": origin, "seq": 1, "channel": b"jobs", "payload": b"a", "targets": [os.urandom(20).hex()]},
        {"origin": origin, "seq": 2, "channel": b"nobody", "payload": b"b"},
    ])
    fake.send(t["command"], [b"B FWRD", batch])
    wait_for(lambda: fake.answered("FACK"), what="the FWRD credited")
    assert fake.answered("FACK")[0][1] == {"batch": 1}
    assert drops(t["metrics"])["cell_gone"] == 2


def test_a_peer_link_is_rebuilt_after_an_oversized_frame(start_mesh, ctx):
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}}}\n"
    m = start_mesh(mesh_yaml(name="huge", replicas=1, services=[("s", [])], extra=extra), cells={"s": 1})
    t = m.transmitter("huge-0")
    fake = fake_peer(ctx, m)
    # The first PEER on the transmitter's link to it is answered with ~2 MiB, over the
    # 64 KiB + 1 MiB the transmitter reads.
    fake.reply_once["PEER"] = [command("PWLC", fake.hello()), b"x" * (2 << 20)]
    wait_for(lambda: len(fake.received("PEER")) >= 2, timeout=10 * EXPIRY_S, what="a second PEER: the link rebuilt")
    assert metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="wire_message_bytes"}'] >= 1
    # The rebuilt link carries traffic.
    fake.link(t["command"])
    fake_cell(fake, t, ["after.huge"])
    assert m.redis(m.cells("s")[0]).publish("after.huge", b"x") == 1
    wait_for(lambda: fake.forwarded(), what="a message over the rebuilt link")


def test_a_transmitter_does_not_route_what_it_reads_late_from_a_peer_it_forgot(start_mesh, ctx):
    """The transmitter is paused past the expiry while the fake peer forwards a message to
    its cell: on waking, the peer is forgotten (it has forgotten us too, and sent its
    anycatch messages elsewhere), the message is not delivered, and the peer is told."""
    m = start_mesh(mesh_yaml(name="latepeer", replicas=1, services=[("s", [])]), cells={"s": 1})
    t = m.transmitter("latepeer-0")
    cell = m.cells("s")[0]
    sub = Subscriber(m.redis(cell), channels=["lp"])
    fake = fake_peer(ctx, m)
    fake.link(t["command"])
    origin = os.urandom(20).hex()
    fake.send(t["command"], [b"B FWRD", envelope_batch(1, [{"origin": origin, "seq": 1, "channel": b"lp", "payload": b"on time"}])])
    sub.wait_count(1)
    os.kill(t["pid"], signal.SIGSTOP)
    try:
        fake.send(t["command"], [b"B FWRD", envelope_batch(2, [{"origin": origin, "seq": 2, "channel": b"lp", "payload": b"read late"}])])
        # Past the expiry, as a clock outside says.
        until_an_expiry_passed(m, timeout=10 * EXPIRY_S)
    finally:
        os.kill(t["pid"], signal.SIGCONT)
    wait_for(lambda: [a for a in fake.answered("ERRR") if "unknown cell" in a[1]["error"]], what="the peer told")
    # A later message from elsewhere arrives; the late one never does.
    pub = m.redis(cell)
    wait_for(lambda: pub.publish("lp", b"after") == 1, what="the cell routable")
    sub.wait_count(2)
    assert b"read late" not in sub.data()
