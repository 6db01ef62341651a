"""The transmitter wire protocol from a libzmq client (pyzmq), and garbage on its socket."""

import hashlib
import json
import os
import struct
import threading

import zmq

from conftest import Subscriber, mesh_yaml, metrics, until_routed, wait_for


def dealer(ctx, endpoint):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(endpoint)
    return s


def recv_command(sock):
    frames = sock.recv_multipart()
    text = frames[0].decode()
    enc, cmd, payload = text[0], text[2:6], text[7:]
    return enc, cmd, (json.loads(payload) if payload else {}), frames[1:]


def test_helo_wlcm_and_events_on_pub(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("s", [])]), cells={"s": 1})
    t = mesh.transmitter("demo-1")
    ctx = zmq.Context()
    try:
        sock = dealer(ctx, t["command"])
        cell_id = os.urandom(20).hex()
        sock.send(f'J HELO {{"id": "{cell_id}", "service": "raw", "events": "pub"}}'.encode())
        enc, cmd, body, _ = recv_command(sock)
        assert (enc, cmd) == ("J", "WLCM")
        assert body["id"] == t["id"], "WLCM carries the transmitter's instance id"
        assert body["pub"] == t["event"]
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        sub.connect(body["pub"])  # the pub endpoint is connectable
        sub.setsockopt(zmq.SUBSCRIBE, cell_id.encode())
        # Subscribe through the binary interest list: op 0 (add), kind 0 (channel).
        name = b"raw.events"
        sock.send_multipart([b"B SUBS", bytes([0, 0]) + len(name).to_bytes(4, "little") + name])
        publisher = mesh.redis(mesh.cell("s-0"))
        until_routed(publisher, "raw.events", 1)
        publisher.publish("raw.events", b"hello raw")
        frames = wait_for(lambda: _recv_until(sub, b"hello raw"), what="event on the PUB socket")
        assert frames[0] == cell_id.encode() and frames[1] == b"raw.events"
        # A JSON event from the raw client reaches a Redis subscriber, and is acknowledged
        # with its THID (SHA-1 of the contents) and the cells it reached.
        redis_sub = Subscriber(mesh.redis(mesh.cell("s-0")), channels=["from.raw"])
        def sent():
            sock.send(b'J EVNT {"channel": "from.raw", "data": "hi there"}')
            _, cmd, ack, _ = recv_command(sock)
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
        sock = dealer(ctx, t["command"])
        garbage = [b"", b"\xff\xfe\x00\x01", b"J HE", b"X HELO {}", b"J helo {}", b"J HELO {not json", b"J HELO {\"id\": \"zz\"}"]
        for g in garbage:
            sock.send(g)
            enc, cmd, body, _ = recv_command(sock)
            assert cmd == "ERRR" and body["error"], (g, cmd, body)
        cell_id = os.urandom(20).hex()
        sock.send(f'J HELO {{"id": "{cell_id}", "service": "raw"}}'.encode())
        assert recv_command(sock)[1] == "WLCM"
        # A truncated binary batch, an unknown command, a batch with no payload frame.
        sock.send_multipart([b"B PUBS", b"\x01\x00\x00"])
        assert recv_command(sock)[1] == "ERRR"
        sock.send(b"J ABCD {}")
        assert "unknown command" in recv_command(sock)[2]["error"]
        sock.send(b"B PUBS")
        assert recv_command(sock)[1] == "ERRR"
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


def _envelopes(body):
    """Decodes a DLVR envelope batch: (batch number, [payload, ...])."""
    batch = int.from_bytes(body[:8], "little")
    at, payloads = 8, []
    while at < len(body):
        at += 1 + 20 + 8 + 8  # kind, origin, seq, ts
        n = int.from_bytes(body[at : at + 4], "little")
        at += 4 + n  # channel
        n = int.from_bytes(body[at : at + 4], "little")
        payloads.append(body[at + 4 : at + 4 + n])
        at += 4 + n
        targets = int.from_bytes(body[at : at + 2], "little")
        at += 2 + 20 * targets
    return batch, payloads


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
        sock = dealer(ctx, t["command"])
        sock.send(f'J HELO {{"id": "{os.urandom(20).hex()}", "service": "raw"}}'.encode())
        assert recv_command(sock)[1] == "WLCM"
        name = b"flow"
        sock.send_multipart([b"B SUBS", bytes([0, 0]) + len(name).to_bytes(4, "little") + name])
        got, last_batch = [], 0

        def take():
            # Keeps the cell alive (the transmitter drops silent cells) and takes what came.
            sock.send(b"J PING {}")
            while sock.poll(20):
                _, cmd, _, frames = recv_command(sock)
                if cmd == "DLVR":
                    nonlocal last_batch
                    last_batch, payloads = _envelopes(frames[0])
                    got.extend(p for p in payloads if p != b"probe")

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
            return len(got) + metrics(t["metrics"]).get(drops, 0) >= n and not publishing.is_alive()

        wait_for(accounted, timeout=30, what="every message delivered or counted")
        publishing.join()
        dropped = metrics(t["metrics"])[drops]
        assert len(got) + dropped == n, "each message delivered once or counted as dropped"
        assert dropped > 0 and sum(len(p) for p in got) <= limit, "the cell got at most its link buffer"
        assert got == sent[: len(got)], "what the cell got came in order, from the start"
        assert len(replies) == n, "the publisher was answered"
        # Crediting everything taken lets messages flow again.
        sock.send(f'J CRED {{"batch": {last_batch}}}'.encode())
        wait_for(lambda: publisher.publish("flow", b"after") and (take() or b"after" in got), what="flow after CRED")
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
        cell = dealer(ctx, t0["command"])
        # Deliveries on the PUB socket (not read here): the DEALER carries only answers.
        cell.send(f'J HELO {{"id": "{os.urandom(20).hex()}", "service": "raw", "events": "pub"}}'.encode())
        assert recv_command(cell)[1] == "WLCM"
        publisher = dealer(ctx, t1["command"])
        publisher.send(f'J HELO {{"id": "{os.urandom(20).hex()}", "service": "raw"}}'.encode())
        assert recv_command(publisher)[1] == "WLCM"
        for i in range(50):
            name = b"raw.sync.%d" % i
            cell.send_multipart([b'B SUBS {"sync": %d}' % (i + 1), bytes([0, 0]) + len(name).to_bytes(4, "little") + name])
            assert recv_command(cell)[:3] == ("J", "SUBD", {"sync": i + 1})
            publisher.send(b'J EVNT {"channel": "%s", "data": "x"}' % name)
            _, cmd, ack, _ = recv_command(publisher)
            assert (cmd, ack["receivers"]) == ("ACKD", 1), f"round {i}: {ack}"
        # A SUBS without a header asks for nothing and gets nothing back.
        cell.send_multipart([b"B SUBS", bytes([1, 0]) + len(name).to_bytes(4, "little") + name])
        cell.send(b"J PING {}")
        assert recv_command(cell)[1] == "PONG"
        # The peer-side half, from a libzmq client introduced as a transmitter.
        peer = dealer(ctx, t0["command"])
        peer.send(f'J PEER {{"id": "{os.urandom(20).hex()}", "name": "raw-peer", "mesh": "demo"}}'.encode())
        assert recv_command(peer)[1] == "PWLC"
        peer.send(b'J SYNC {"round": 17}')
        assert recv_command(peer)[1:3] == ("SYND", {"round": 17})
        m = metrics(t0["metrics"])
        assert [m[f'thynapse_transmitter_interest_sync_gave_up_total{{reason="{r}"}}'] for r in ("timeout", "peer_lost")] == [0, 0]
    finally:
        ctx.destroy(linger=0)
