"""Promises of docs/architecture.md checked across the mesh, each where a broken one
would show: reference-counted subscriptions and cells that leave (remote PUBLISH counts),
a restarted peer carrying traffic again, a stuck receiver slowing only its publishers,
the room-session rules on the wire, and several rendezvous points."""

import hashlib
import os
import signal
import struct
import threading

import zmq
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import Subscriber, free_udp_query, mesh_yaml, metrics, rendezvous_request, room_hosts, until_routed, wait_for
from rawwire import RawCell, publish_records

EXPIRY_S = 0.25 * 4  # announce_ms × multiplier of mesh_yaml's defaults


def settled(mesh, cell, name):
    """A subscription confirmed on `cell`: every interest change it sent before is
    applied by every transmitter (confirmations wait for all of them, and changes are
    applied in order)."""
    s = Subscriber(mesh.redis(cell), channels=[name])
    s.pubsub.close()


def test_remote_publish_counts_follow_references_unsubscribes_and_leaving_cells(start_mesh):
    m = start_mesh(mesh_yaml(name="refs", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    assert a["transmitter"] != b["transmitter"]
    pub = m.redis(a)
    first, second = (Subscriber(m.redis(b), channels=["rc"]) for _ in range(2))
    until_routed(pub, "rc", 1)
    # Two clients of one cell: the cell keeps its interest until the last goes.
    first.pubsub.close()
    settled(m, b, "sync-1")
    assert pub.publish("rc", b"x") == 1, "one client's close removed the other's subscription"
    second.pubsub.unsubscribe("rc")
    settled(m, b, "sync-2")
    assert pub.publish("rc", b"x") == 0, "UNSUBSCRIBE of the last client did not reach the peer"
    third = Subscriber(m.redis(b), channels=["rc"])
    until_routed(pub, "rc", 1)
    third.pubsub.close()  # a client that goes away without unsubscribing
    settled(m, b, "sync-3")
    assert pub.publish("rc", b"x") == 0, "a closed client's subscription outlived it"
    # A cell silent past the expiry: its transmitter drops it and tells its peer (CGON).
    fourth = Subscriber(m.redis(b), channels=["rc"])
    until_routed(pub, "rc", 1)
    os.kill(b["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: pub.publish("rc", b"x") == 0, timeout=10 * EXPIRY_S, interval=0.05,
                 what="the silent cell gone from its peer's routes")
    finally:
        os.kill(b["pid"], signal.SIGCONT)
    # Back by itself, with its subscription.
    wait_for(lambda: pub.publish("rc", b"y") == 1, timeout=2 * EXPIRY_S + 5, interval=0.05,
             what="the woken cell routed again")
    fourth.pubsub.close()


def test_a_restarted_peer_carries_traffic_again(start_mesh):
    m = start_mesh(mesh_yaml(name="rpeer", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    t1 = m.transmitter(b["transmitter"])
    m.allow_restarts = True  # killed on purpose: `up` restarts them
    os.kill(t1["pid"], signal.SIGKILL)
    wait_for(lambda: m.refresh() and m.transmitter(t1["name"])["pid"] not in (None, t1["pid"]),
             timeout=20, what="the transmitter restarted")
    # A sidecar restarted goes back to its planned transmitter: the new instance.
    os.kill(b["pid"], signal.SIGKILL)
    wait_for(lambda: m.refresh() and m.cell(b["name"])["pid"] not in (None, b["pid"])
             and m.cell(b["name"])["transmitter"] == t1["name"], timeout=20,
             what="the cell on the restarted transmitter")
    sub = Subscriber(m.redis(m.cell(b["name"])), channels=["again"])
    pub = m.redis(a)
    until_routed(pub, "again", 1, timeout=2 * EXPIRY_S + 10)
    sent = [b"g%d" % i for i in range(100)]
    for p in sent:
        assert pub.publish("again", p) == 1
    sub.wait_count(len(sent), prefix=b"g")
    assert sub.data(b"g") == sent


def test_a_stuck_receiver_slows_only_its_own_publishers(start_mesh):
    """A cell that never credits holds the acknowledgements of what is routed to it (up to
    one expiry): its publisher waits. A healthy subscriber of the same channel gets every
    message, and a publisher on another channel is answered meanwhile."""
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}, linkBufferBytes: {limit}}}\n"
    m = start_mesh(mesh_yaml(name="stuck", replicas=1, services=[("s", [])], extra=extra, multiplier=20),
                   cells={"s": 3})
    t = m.transmitter("stuck-0")
    slow_pub, other_pub, healthy = m.cells("s")
    ctx = zmq.Context()
    try:
        stuck = RawCell(ctx, t["command"])  # never reads, never credits
        stuck.hello()
        stuck.subscribe(["hot"])
        good = Subscriber(m.redis(healthy), channels=["hot"])
        cold = Subscriber(m.redis(healthy), channels=["cold"])
        # No retry: redis-py 6+ resends a command that timed out, a second message.
        publisher = m.redis(slow_pub, retry=Retry(NoBackoff(), 0))
        until_routed(publisher, "hot", 2)
        sent = [b"h%04d" % i + b"x" * 1020 for i in range(200)]  # three link buffers
        done = threading.Event()

        def publish():
            pipe = publisher.pipeline(transaction=False)
            for p in sent:
                pipe.publish("hot", p)
            pipe.execute()
            done.set()

        threading.Thread(target=publish, daemon=True).start()
        # The stuck cell's link fills; until the expiry (5 s here), the publisher waits.
        wait_for(lambda: metrics(t["metrics"])["thynapse_transmitter_held_bytes"] > 0 or done.is_set(),
                 what="the hot publisher held back")
        assert not done.is_set(), "the publisher of the stuck cell's channel was not held back"
        other = m.redis(other_pub)
        for i in range(50):
            assert other.publish("cold", b"c%d" % i) == 1
        cold.wait_count(50, prefix=b"c")
        assert not done.is_set(), "the unrelated publisher waited for the stuck receiver"
        wait_for(done.is_set, timeout=60, what="the held publisher answered after the expiry")
        try:
            good.wait_count(len(sent), prefix=b"h")
        except AssertionError:
            raise AssertionError(f"got {len(good.data(b'h'))}; {metrics(t['metrics'])}")
        assert good.data(b"h") == sent, "the healthy subscriber got everything, in order"
    finally:
        ctx.destroy(linger=0)


def test_room_session_rules_on_the_wire(start_mesh):
    """A room session is HELO with "room": refused with MOVE where the room is not
    hosted; it may subscribe to its own room's shard channels only, and a shard message
    of a room this transmitter does not host is dropped and counted."""
    rooms = """---
apiVersion: thynapse.io/v1alpha1
kind: Room
metadata: {name: lobby}
spec: {mesh: wire, replicas: 1}
"""
    m = start_mesh(mesh_yaml(name="wire", replicas=2) + rooms, cells={})
    host = wait_for(lambda: room_hosts(m, "lobby"), what="lobby placed")[0]
    other = next(t for t in m.endpoints["transmitters"] if t["name"] != host["name"])
    ctx = zmq.Context()
    try:
        body = RawCell(ctx, other["command"], service="s", room="lobby").hello(expect="MOVE")
        assert "not hosted here" in body["reason"], body
        session = RawCell(ctx, host["command"], service="s", room="lobby")
        session.hello()
        foreign = "{den}x"
        session.subscribe([foreign], kind=2)
        _, cmd, body, _ = session.recv()
        assert cmd == "ERRR" and "belong on the session of their room" in body["error"], (cmd, body)
        # A shard message of a room not hosted here: dropped, counted, acknowledged as 0.
        before = metrics(host["metrics"])['thynapse_transmitter_drops_total{reason="room_not_hosted"}']
        session.send_binary("PUBS", struct.pack("<Q", 1) + publish_records([(foreign, "m", 1)]))
        _, cmd, _, frames = session.recv()
        # The exact ACKS frame: first seq 1, one message, 0 receivers.
        assert cmd == "ACKS" and frames[0] == struct.pack("<QII", 1, 1, 0)
        after = metrics(host["metrics"])['thynapse_transmitter_drops_total{reason="room_not_hosted"}']
        assert after == before + 1
        # The mesh session (no room) may not take shard channels either.
        mesh_session = RawCell(ctx, host["command"], service="s")
        mesh_session.hello()
        mesh_session.subscribe(["{lobby}x"], kind=2)
        assert mesh_session.recv()[1] == "ERRR"
    finally:
        ctx.destroy(linger=0)


def test_several_rendezvous_points_each_know_the_mesh_and_one_can_die(start_mesh):
    m = start_mesh(mesh_yaml(name="tworv", replicas=2, services=[("s", [])], extra="").replace(
        "rendezvous: {", "rendezvous: {replicas: 2, "), cells={"s": 2})
    points = m.endpoints["rendezvous"]
    assert len(points) == 2
    for p in points:
        wait_for(lambda p=p: sorted(t["name"] for t in free_udp_query(p["address"], "tworv")["transmitters"])
                 == ["tworv-0", "tworv-1"], what=f"{p['name']} knows every transmitter")
    # Each point places a room on its own view: a room may get more hosts than its
    # replicas, never fewer, whichever point is asked.
    for p in points:
        answer = wait_for(lambda p=p: (lambda a: len(a["transmitters"]) >= a["replicas"] and a)(rendezvous_request(
            p["address"], {"type": "locate", "mesh": "tworv", "room": "both"})), what="the room placed and confirmed")
        assert answer["replicas"] == 2, answer
    # One point stops answering (paused): a cell that restarts joins through the other.
    os.kill(points[0]["pid"], signal.SIGSTOP)
    try:
        a, b = m.cells("s")
        m.allow_restarts = True  # killed on purpose: `up` restarts it
        os.kill(b["pid"], signal.SIGKILL)
        wait_for(lambda: m.refresh() and m.cell(b["name"])["pid"] not in (None, b["pid"]), timeout=30,
                 what="the cell joined again with one rendezvous point paused")
        sub = Subscriber(m.redis(m.cell(b["name"])), channels=["rv2"])
        until_routed(m.redis(a), "rv2", 1)
        sub.pubsub.close()
    finally:
        os.kill(points[0]["pid"], signal.SIGCONT)


def test_raw_cell_limits_and_the_binary_event(start_mesh):
    """protocol.md on the wire: a HELO past its bounds is refused and counted; a payload
    over maxMessageBytes is answered as reaching nobody, told to the cell, and counted;
    `B EVNT` carries its payload in a frame and is acknowledged with its THID."""
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}}}\n"
    m = start_mesh(mesh_yaml(name="rawlim", replicas=1, services=[("s", [])], extra=extra), cells={"s": 1})
    t = m.transmitter("rawlim-0")
    ctx = zmq.Context()
    try:
        long_name = RawCell(ctx, t["command"], service="x" * 300)
        long_name.authenticate()  # its Service's key proves a name of any length
        long_name.send("HELO", {"id": os.urandom(20).hex(), "service": "x" * 300})
        _, cmd, body, _ = long_name.recv()
        assert cmd == "ERRR" and "HELO refused" in body["error"], (cmd, body)
        assert metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="hello"}'] == 1
        s = RawCell(ctx, t["command"])
        s.hello()
        sub = Subscriber(m.redis(m.cells("s")[0]), channels=["bin"])
        # B EVNT: the payload is the next frame, bytes of any value.
        payload = bytes(range(256))

        def sent():
            s.send_binary("EVNT", payload, header={"channel": "bin"})
            _, cmd, ack, _ = s.recv()
            return cmd == "ACKD" and ack["receivers"] == 1 and ack

        ack = wait_for(sent, what="B EVNT routed")
        digest = hashlib.sha1()
        for part in (b"bin", payload):
            digest.update(struct.pack("<Q", len(part)) + part)
        assert ack["thid"] == digest.hexdigest()
        sub.wait_count(1, prefix=payload[:8])
        # Over maxMessageBytes: ACKS 0 for it, an ERRR to the cell, a drop counted.
        big = b"x" * (limit + 1)
        s.send_binary("PUBS", struct.pack("<Q", 1) + publish_records([("bin", big)]))
        seen = {}
        while "ACKS" not in seen or "ERRR" not in seen:
            _, cmd, body, frames = s.recv()
            seen[cmd] = (body, frames)
        assert seen["ACKS"][1][0] == struct.pack("<QII", 1, 1, 0)
        assert str(limit) in seen["ERRR"][0]["error"]
        assert metrics(t["metrics"])['thynapse_transmitter_drops_total{reason="too_large"}'] == 1
        sub.pubsub.close()
    finally:
        ctx.destroy(linger=0)


def test_quit_and_drain_on_the_wire(start_mesh):
    """QUIT takes a cell out at once (not at its expiry); a draining transmitter tells its
    cells to MOVE and answers a new HELO with MOVE."""
    m = start_mesh(mesh_yaml(name="quit", replicas=1, multiplier=20), cells={})  # 5 s expiry
    t = m.transmitter("quit-0")
    cells = lambda: metrics(t["metrics"])["thynapse_transmitter_cells"]  # noqa: E731
    ctx = zmq.Context()
    try:
        a, b = RawCell(ctx, t["command"]), RawCell(ctx, t["command"])
        a.hello()
        b.hello()
        wait_for(lambda: cells() == 2, what="two cells")
        b.send("QUIT")
        wait_for(lambda: cells() == 1, timeout=2.5, what="the cell gone at QUIT, well before its 5 s expiry")
        m.allow_restarts = True  # stopped on purpose: `up` restarts it
        os.kill(t["pid"], signal.SIGTERM)
        _, cmd, body, _ = a.recv()
        assert (cmd, body.get("reason")) == ("MOVE", "draining"), (cmd, body)
        body = RawCell(ctx, t["command"]).hello(expect="MOVE")
        assert body.get("reason") == "draining", body
    finally:
        ctx.destroy(linger=0)
