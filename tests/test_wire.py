"""The transmitter wire protocol from a libzmq client (pyzmq), and garbage on its socket."""

import hashlib
import os
import struct
import threading

import redis
import zmq

from conftest import Subscriber, mesh_yaml, metrics, until_routed, wait_for
from rawwire import RawCell, authenticate, command, dealer, interest, mesh_key, recv_command


def test_helo_wlcm_and_events_on_pub(start_mesh, parts):
    # An authenticated mesh refuses `events: "pub"`: its PUB socket cannot authenticate
    # who subscribes.
    mesh = start_mesh(mesh_yaml(replicas=1), cells={})
    ctx = zmq.Context()
    try:
        cell = RawCell(ctx, mesh.transmitter("demo-0")["command"], events="pub")
        assert 'events \"pub\" is not available' in cell.hello(expect="ERRR")["error"]
    finally:
        ctx.destroy(linger=0)
    # Without a token (a transmitter started alone), the PUB socket delivers.
    rv = parts("rendezvous", "--mesh", "pub").ready["address"]
    ready = parts("transmitter", "--mesh", "pub", "--name", "pub-0", "--rendezvous", rv,
                  "--announce-interval-ms", "250").ready
    t = {"command": ready["command"], "id": ready["id"], "event": ready["event"]}
    sidecar = parts("sidecar", "--mesh", "pub", "--service", "s", "--name", "s-0", "--rendezvous", rv,
                    "--resp-bind", "127.0.0.1:0", "--announce-interval-ms", "250")
    host, port = sidecar.ready["resp"].rsplit(":", 1)
    clients = [redis.Redis(host=host, port=int(port), socket_timeout=10) for _ in range(2)]
    sidecar.clients.extend(clients)
    ctx = zmq.Context()
    try:
        cell = RawCell(ctx, t["command"])
        # HELO by hand (not `hello()`): the answer's encoding is checked too.
        cell.authenticate()
        cell.send("HELO", {"id": cell.id, "service": "raw", "events": "pub"})
        enc, cmd, body, _ = cell.recv()
        assert (enc, cmd) == ("J", "WLCM")
        assert body["id"] == t["id"], "WLCM carries the transmitter's instance id"
        assert body["pub"] == t["event"]
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        sub.connect(body["pub"])  # the pub endpoint is connectable
        sub.setsockopt(zmq.SUBSCRIBE, cell.id.encode())
        # Subscribe through the binary interest list: op 0 (add), kind 0 (channel).
        cell.subscribe(["raw.events"])
        publisher = clients[0]
        until_routed(publisher, "raw.events", 1)
        publisher.publish("raw.events", b"hello raw")
        frames = wait_for(lambda: _recv_until(sub, b"hello raw"), what="event on the PUB socket")
        assert frames[0] == cell.id.encode() and frames[1] == b"raw.events"
        # A JSON event from the raw client reaches a Redis subscriber, and is acknowledged
        # with its THID (SHA-1 of the contents) and the cells it reached.
        redis_sub = Subscriber(clients[1], channels=["from.raw"])
        def sent():
            cell.send("EVNT", {"channel": "from.raw", "data": "hi there"})
            _, cmd, ack, _ = cell.recv()
            assert cmd == "ACKD", cmd
            return ack["receivers"] >= 1 and ack
        ack = wait_for(sent, what="EVNT routed")
        # SHA-1 over each part preceded by its length as a little-endian u64 (protocol.md),
        # computed here independently of the code under test.
        digest = hashlib.sha1()
        for part in (b"from.raw", b"hi there"):
            digest.update(struct.pack("<Q", len(part)) + part)
        assert ack == {"thid": digest.hexdigest(), "receivers": 1}, ack
        redis_sub.wait_count(1, prefix=b"hi there")
    finally:
        ctx.destroy(linger=0)


def _recv_until(sub, payload):
    frames = sub.recv_multipart()
    return frames if frames[-1] == payload else None


def test_garbage_frames_get_errors_and_the_transmitter_serves_on(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("s", [])]), cells={"s": 2})
    t = mesh.transmitter("demo-0")
    before = metrics(t["metrics"])["thynapse_transmitter_malformed_frames_total"]
    ctx = zmq.Context()
    try:
        cell = RawCell(ctx, t["command"])
        cell.authenticate()  # so that what follows is read as frames, not refused unread
        garbage = [b"", b"\xff\xfe\x00\x01", b"J HE", b"X HELO {}", b"J helo {}", b"J HELO {not json", b"J HELO {\"id\": \"zz\"}"]
        for g in garbage:
            cell.sock.send(g)
            enc, cmd, body, _ = cell.recv()
            assert cmd == "ERRR" and body["error"], (g, cmd, body)
        cell.hello()
        # A truncated binary batch, an unknown command, a batch with no payload frame
        # (written by hand: malformed on purpose).
        cell.sock.send_multipart([b"B PUBS", b"\x01\x00\x00"])
        assert cell.recv()[1] == "ERRR"
        cell.sock.send(b"J ABCD {}")
        assert "unknown command" in cell.recv()[2]["error"]
        cell.sock.send(b"B PUBS")
        assert cell.recv()[1] == "ERRR"
        after = metrics(t["metrics"])["thynapse_transmitter_malformed_frames_total"]
        assert after - before >= len(garbage) + 3
    finally:
        ctx.destroy(linger=0)
    # Everyone else is served as before.
    sub = Subscriber(mesh.redis(mesh.cell("s-0")), channels=["after"])
    publisher = mesh.redis(mesh.cell("s-1"))
    until_routed(publisher, "after", 1)
    publisher.publish("after", b"still fine")
    sub.wait_count(1, prefix=b"still fine")


def test_a_cell_that_never_credits_is_bounded_and_the_rest_counted(start_mesh):
    """A libzmq cell that takes DLVR batches without crediting them (CRED) is sent at
    most its link buffer; every other message for it is dropped and counted, the publisher
    is answered, and crediting lets messages flow again."""
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}, linkBufferBytes: {limit}}}\n"
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])], extra=extra), cells={"s": 1})
    t = mesh.transmitter("demo-0")
    drops = 'thynapse_transmitter_drops_total{reason="cell_backlog"}'
    ctx = zmq.Context()
    try:
        cell = RawCell(ctx, t["command"])
        cell.hello()
        cell.subscribe(["flow"])

        def take():
            # Keeps the cell alive (the transmitter drops silent cells) and takes what came
            # (RawCell keeps the DLVR batches).
            cell.send("PING")
            while cell.sock.poll(20):
                cell.recv()

        def flow():
            return [m["payload"] for m in cell.delivered() if m["payload"] != b"probe"]

        publisher = mesh.redis(mesh.cell("s-0"))
        until_routed(publisher, "flow", 1)
        n = 200
        sent = [b"%04d" % i + b"x" * 1020 for i in range(n)]
        replies = []

        def publish():
            pipe = publisher.pipeline(transaction=False)
            for p in sent:
                pipe.publish("flow", p)
            replies.extend(pipe.execute())

        publishing = threading.Thread(target=publish)
        publishing.start()

        def accounted():
            take()
            return len(flow()) + metrics(t["metrics"]).get(drops, 0) >= n and not publishing.is_alive()

        wait_for(accounted, timeout=30, what="every message delivered or counted")
        publishing.join()
        got = flow()
        dropped = metrics(t["metrics"])[drops]
        assert len(got) + dropped == n, "each message delivered once or counted as dropped"
        assert dropped > 0 and sum(len(p) for p in got) <= limit, "the cell got at most its link buffer"
        assert got == sent[: len(got)], "what the cell got came in order, from the start"
        assert len(replies) == n, "the publisher was answered"
        # Crediting everything taken lets messages flow again.
        cell.credit()
        wait_for(lambda: publisher.publish("flow", b"after") and (take() or b"after" in flow()), what="flow after CRED")
    finally:
        ctx.destroy(linger=0)


def test_a_burst_sixteen_times_the_link_buffer_waits_for_credit_and_loses_nothing(start_mesh):
    """A burst far larger than the link buffers waits at each transmitter for the
    receivers' credit (CRED, FACK) instead of being dropped: it crosses two transmitters
    whole and in order."""
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}, linkBufferBytes: {limit}}}\n"
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("s", [])], extra=extra), cells={"s": 2})
    a, b = mesh.cell("s-0"), mesh.cell("s-1")
    assert a["transmitter"] != b["transmitter"], "publisher and subscriber on different transmitters"
    sub = Subscriber(mesh.redis(b), channels=["burst"])
    publisher = mesh.redis(a)
    until_routed(publisher, "burst", 1)
    sent = [b"m%04d" % i + b"x" * 1019 for i in range(1024)]
    pipe = publisher.pipeline(transaction=False)
    for p in sent:
        pipe.publish("burst", p)
    assert pipe.execute() == [1] * len(sent)
    sub.wait_count(len(sent), prefix=b"m", timeout=60)
    assert sub.data(b"m") == sent, "every message, once, in order"
    for t in mesh.endpoints["transmitters"]:
        dropped = {k: v for k, v in metrics(t["metrics"]).items() if k.startswith("thynapse_transmitter_drops_total") and v}
        assert not dropped, f"{t['name']} dropped {dropped}"


def test_subs_with_sync_is_confirmed_once_every_peer_applied_it(start_mesh):
    """`B SUBS {"sync": n}` is answered `J SUBD {"sync": n}` once every linked transmitter
    has applied the change: an event sent on another transmitter right after reaches the
    cell. Between transmitters, `J SYNC` is answered `J SYND` with the same round."""
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("s", [])]), cells={"s": 1})
    t0, t1 = mesh.transmitter("demo-0"), mesh.transmitter("demo-1")
    wait_for(lambda: all(metrics(t["metrics"])["thynapse_transmitter_peers"] == 1 for t in (t0, t1)), what="peers linked")
    ctx = zmq.Context()
    try:
        cell = RawCell(ctx, t0["command"])
        cell.hello()

        def answer():
            """The next message that is not a delivery (those are kept in `cell.batches`)."""
            while True:
                m = cell.recv()
                if m[1] != "DLVR":
                    return m

        publisher = RawCell(ctx, t1["command"])
        publisher.hello()
        for i in range(50):
            name = f"raw.sync.{i}"
            # The very next answer must be the SUBD (not `subscribe(sync=…)`, which skips others).
            cell.send_binary("SUBS", interest([name]), header={"sync": i + 1})
            assert answer()[:3] == ("J", "SUBD", {"sync": i + 1})
            publisher.send("EVNT", {"channel": name, "data": "x"})
            _, cmd, ack, _ = publisher.recv()
            assert (cmd, ack["receivers"]) == ("ACKD", 1), f"round {i}: {ack}"
        # A SUBS without a header asks for nothing and gets nothing back.
        cell.subscribe([name], op=1)
        cell.send("PING")
        assert answer()[1] == "PONG"
        # The peer-side half, from a libzmq client introduced as a transmitter.
        peer = dealer(ctx, t0["command"])
        authenticate(peer, mesh_key(mesh.token), "peer", "demo", t0["command"])
        peer.send(command("PEER", {"id": os.urandom(20).hex(), "name": "raw-peer", "mesh": "demo"}))
        assert recv_command(peer)[1] == "PWLC"
        peer.send(command("SYNC", {"round": 17}))
        assert recv_command(peer)[1:3] == ("SYND", {"round": 17})
        m = metrics(t0["metrics"])
        assert [m[f'thynapse_transmitter_interest_sync_gave_up_total{{reason="{r}"}}'] for r in ("timeout", "peer_lost")] == [0, 0]
    finally:
        ctx.destroy(linger=0)
