"""Mesh authentication (docs/protocol.md "Authentication", docs/security.md), from raw
pyzmq clients with no proof, a replayed one, another Service's key, posing as a peer, and
a sidecar holding the wrong token: each is refused and counted, and nothing reaches it or
comes from it."""

import json
import re
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import pytest
import redis
import zmq

from conftest import Subscriber, free_udp_query, mesh_yaml, metrics, until_routed, wait_for
from rawwire import (FakePeer, RawCell, command, dealer, interest, mesh_key, parse_command, prove,
                     publish_records, recv_command, seal, service_key, unseal)


def refused(t):
    return metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="auth"}']


def test_up_runs_an_authenticated_mesh_with_a_private_token(start_mesh):
    m = start_mesh(mesh_yaml(name="tok", replicas=1), cells={})
    path = Path(m.endpoints["token_file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "only its user may read the token"
    assert len(m.token) == 64, "256 random bits, as hex"


def test_without_a_proof_a_connection_gets_errors_and_nothing_else(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="noauth", replicas=1, services=[("s", [])]), cells={"s": 1})
    t = m.transmitter("noauth-0")
    sub = Subscriber(m.redis(m.cells("s")[0]), channels=["open"])
    s = dealer(ctx, t["command"])
    s.send(command("HELO", {"id": os.urandom(20).hex(), "service": "raw"}))
    s.send_multipart([b"B SUBS", interest(["open"])])
    s.send_multipart([b"B PUBS", (1).to_bytes(8, "little") + publish_records([("open", "forged")])])
    s.send(command("EVNT", {"channel": "open", "data": "forged"}))
    for _ in range(4):
        _, cmd, body, _ = recv_command(s)
        assert cmd == "ERRR" and "authenticate first" in body["error"], (cmd, body)
    assert refused(t) == 4
    # It got nothing routed to it, and nobody got what it sent.
    pub = m.redis(m.cells("s")[0])
    assert pub.publish("open", b"real") == 1, "only the real subscriber"
    sub.wait_count(1)
    assert sub.data() == [b"real"]
    s.setsockopt(zmq.RCVTIMEO, 200)
    with pytest.raises(zmq.Again):
        s.recv_multipart()


def test_replayed_stale_and_foreign_proofs_are_refused(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="replay", replicas=1), cells={})
    t = m.transmitter("replay-0")
    key = service_key(m.token, "orders")

    def ask(sock, role="cell", context="orders"):
        sock.send(command("AUTH", {"role": role, "context": context}))
        _, cmd, body, _ = recv_command(sock)
        assert cmd == "CHAL", (cmd, body)
        return body["nonce"]

    def answer(sock, nonce, proof, role="cell", context="orders"):
        sock.send(command("AUTH", {"role": role, "context": context, "nonce": nonce, "proof": proof,
                                   "challenge": os.urandom(16).hex()}))
        return recv_command(sock)[1:3]

    bound = "orders@" + t["command"]  # proofs are over the Service and the endpoint dialed
    first = dealer(ctx, t["command"])
    nonce = ask(first)
    proof = prove(key, "cell", nonce, bound)
    assert answer(first, nonce, proof)[0] == "AUTD"
    # Replayed on another connection, which was given a nonce of its own: refused.
    second = dealer(ctx, t["command"])
    ask(second)
    cmd, body = answer(second, nonce, proof)
    assert cmd == "ERRR" and "not the nonce" in body["error"], body
    # Replayed on the same connection: the nonce answered once already.
    cmd, body = answer(first, nonce, proof)
    assert cmd == "ERRR" and "no challenge pending" in body["error"], body
    # A proof made without asking (a stale one from elsewhere): no challenge pending.
    third = dealer(ctx, t["command"])
    cmd, body = answer(third, "00" * 16, prove(key, "cell", "00" * 16, bound))
    assert cmd == "ERRR", body
    # Another Service's key, for this Service: refused.
    fourth = dealer(ctx, t["command"])
    n = ask(fourth)
    cmd, body = answer(fourth, n, prove(service_key(m.token, "billing"), "cell", n, bound))
    assert cmd == "ERRR" and "wrong proof" in body["error"], body
    # Another mesh's token: refused.
    n = ask(fourth)
    cmd, body = answer(fourth, n, prove(service_key(b"guess", "orders"), "cell", n, bound))
    assert cmd == "ERRR" and "wrong proof" in body["error"], body
    # A good proof made for another transmitter's endpoint (relayed by one posing as it).
    n = ask(fourth)
    cmd, body = answer(fourth, n, prove(key, "cell", n, "orders@tcp://10.9.9.9:7000"))
    assert cmd == "ERRR" and "another transmitter" in body["error"], body
    assert refused(t) == 6
    # A refused connection stays refused.
    fourth.send(command("HELO", {"id": os.urandom(20).hex(), "service": "orders"}))
    assert "authenticate first" in recv_command(fourth)[2]["error"]


def test_a_cell_may_act_only_as_its_service_and_never_as_a_peer(start_mesh, ctx):
    rules = [{"pattern": "jobs", "mode": "anycatch"}]
    m = start_mesh(mesh_yaml(name="roles", replicas=1, services=[("workers", rules), ("p", [])]),
                   cells={"workers": 1, "p": 1})
    t = m.transmitter("roles-0")
    worker = Subscriber(m.redis(m.cell("workers-0")), channels=["jobs"])
    # Proved "billing": cannot say HELO as a worker (and take its anycatch work).
    billing = RawCell(ctx, t["command"], service="billing")
    billing.authenticate()
    billing.send("HELO", {"id": billing.id, "service": "workers", "rules": rules})
    _, cmd, body, _ = billing.recv()
    assert cmd == "ERRR" and "another Service" in body["error"], body
    # Nor introduce itself as a transmitter.
    billing.send("PEER", {"id": os.urandom(20).hex(), "name": "roles-9", "mesh": "roles"})
    _, cmd, body, _ = billing.recv()
    assert cmd == "ERRR" and "did not prove the mesh key" in body["error"], body
    assert refused(t) == 2
    # The real worker takes every job.
    pub = m.redis(m.cell("p-0"))
    until_routed(pub, "jobs", 1)
    for i in range(20):
        assert pub.publish("jobs", b"j%d" % i) == 1
    worker.wait_count(20, prefix=b"j")


def test_a_sidecar_with_the_wrong_token_does_not_join_and_is_counted(parts, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("a-good-token\n")
    bad.write_text("not-the-token\n")
    point = parts("rendezvous", "--mesh", "creds", "--token-file", good)
    rv = point.ready["address"]
    t = parts("transmitter", "--mesh", "creds", "--name", "creds-0", "--rendezvous", rv,
              "--announce-interval-ms", "250", "--token-file", good)
    common = ("--mesh", "creds", "--service", "s", "--rendezvous", rv, "--resp-bind", "127.0.0.1:0",
              "--announce-interval-ms", "250")
    with pytest.raises(AssertionError, match="no READY"):
        parts("sidecar", "--name", "intruder", "--token-file", bad, *common, timeout=5)
    # Its first question, where is a transmitter, is refused: its seal does not open.
    assert metrics(point.ready["metrics"])['thynapse_rendezvous_refused_total{limit="auth"}'] >= 1
    assert metrics(t.ready["metrics"])["thynapse_transmitter_cells"] == 0
    # The same with the right token joins; so does one given only its Service's key.
    parts("sidecar", "--name", "member", "--token-file", good, *common)
    key = tmp_path / "s.key"
    key.write_text(service_key(b"a-good-token", "s").hex() + "\n")
    parts("sidecar", "--name", "keyed", "--service-key-file", key, *common)
    wait_for(lambda: metrics(t.ready["metrics"])["thynapse_transmitter_cells"] == 2, what="two cells")


def test_a_transmitter_with_another_token_is_not_linked(parts, tmp_path):
    """Two transmitters of one mesh name, with different tokens, and a rendezvous that
    holds both (as during a rotation, or by mistake): neither links to the other (each
    refuses the other's proof), so neither can read the other's traffic."""
    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    a.write_text("token-a\n")
    b.write_text("token-b\n")
    both.write_text("token-a\ntoken-b\n")
    rv = parts("rendezvous", "--mesh", "split", "--token-file", both).ready["address"]
    ta = parts("transmitter", "--mesh", "split", "--name", "split-0", "--rendezvous", rv,
               "--announce-interval-ms", "250", "--token-file", a)
    tb = parts("transmitter", "--mesh", "split", "--name", "split-1", "--rendezvous", rv,
               "--announce-interval-ms", "250", "--token-file", b)
    wait_for(lambda: all(metrics(t.ready["metrics"])['thynapse_transmitter_refused_total{limit="auth"}'] >= 1
                         for t in (ta, tb)), what="each refused the other")
    assert all(metrics(t.ready["metrics"])["thynapse_transmitter_peers"] == 0 for t in (ta, tb))


def test_a_cell_id_belongs_to_its_live_connection(start_mesh, ctx):
    """Another connection, even one proving the same Service, cannot take over a live
    cell's id (and with it its deliveries); once the cell has left, the id is free."""
    m = start_mesh(mesh_yaml(name="bind", replicas=1), cells={})
    t = m.transmitter("bind-0")
    owner = RawCell(ctx, t["command"], service="orders")
    owner.hello()
    thief = RawCell(ctx, t["command"], service="orders", cell_id=owner.id)
    body = thief.hello(expect="ERRR")
    assert "in use on another live connection" in body["error"], body
    # Another Service may never have it (ids are not secret: deliveries carry them).
    other = RawCell(ctx, t["command"], service="billing", cell_id=owner.id)
    assert "belongs to another Service" in other.hello(expect="ERRR")["error"]
    owner.send("QUIT")
    wait_for(lambda: metrics(t["metrics"])["thynapse_transmitter_cells"] == 0, what="the owner gone")
    thief.send("HELO", {"id": owner.id, "service": "orders"})
    assert thief.recv()[1] == "WLCM"


def rendezvous_refused(address_metrics):
    return metrics(address_metrics)['thynapse_rendezvous_refused_total{limit="auth"}']


def test_a_spoofed_announce_or_a_replayed_request_changes_nothing(start_mesh):
    """Announcements not sealed with the mesh key (none, a guessed token, a cell's Service
    key, out of the time window) and a request sent twice are refused with an unsealed
    error and counted; the intruder never appears among the live transmitters."""
    m = start_mesh(mesh_yaml(name="rv", replicas=1, services=[("s", [])]), cells={})
    point = m.endpoints["rendezvous"][0]
    host, port = point["address"].replace("udp://", "").rsplit(":", 1)
    before = rendezvous_refused(point["metrics"])
    info = {"name": "intruder", "id": "ab" * 20, "command": "tcp://127.0.0.1:1", "event": "tcp://127.0.0.1:1"}
    body = json.dumps({"type": "announce", "mesh": "rv", "interval_ms": 60_000, "multiplier": 2,
                       "transmitter": info}).encode()
    key = mesh_key(m.token)
    forged = {
        "unsealed": body,
        "guessed token": seal(body, mesh_key(b"a-guess"), "peer", "rv")[0],
        "a cell's key": seal(body, service_key(m.token, "s"), "cell", "s")[0],
        "stale": seal(body, key, "peer", "rv", ts_ms=int(time.time() * 1000) - 31_000)[0],
        "another mesh": seal(body.replace(b'"rv"', b'"vr"'), key, "peer", "vr")[0],
    }
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    for what, datagram in forged.items():
        s.sendto(datagram, (host, int(port)))
        answer, sealed = unseal(s.recvfrom(65536)[0])
        assert answer["type"] == "error", (what, answer)
        # Unsealed, as the point could not open it; a cell's is opened, and refused.
        assert (sealed is None) == (what != "a cell's key"), (what, sealed)
    # A genuine request is answered once: sent again (a replay), it is refused.
    query, mac = seal(json.dumps({"type": "query", "mesh": "rv"}).encode(), key, "peer", "rv")
    s.sendto(query, (host, int(port)))
    answer, sealed = unseal(s.recvfrom(65536)[0], key)
    assert answer["type"] == "peers" and sealed["re"] == mac and sealed["role"] == "rendezvous"
    s.sendto(query, (host, int(port)))
    answer, sealed = unseal(s.recvfrom(65536)[0])
    assert answer["type"] == "error" and answer["error"].startswith("a replayed request") and sealed is None
    assert rendezvous_refused(point["metrics"]) == before + len(forged) + 1
    live = [t["name"] for t in free_udp_query(point["address"], "rv")["transmitters"]]
    assert live == ["rv-0"], live


def test_a_transmitter_takes_only_answers_sealed_for_its_announcements(parts, ctx, tmp_path):
    """Datagrams from its rendezvous point's own address that are not sealed for one of its
    announcements (unsealed, a guessed token, a Service's key, an answer to somebody else's
    request, a stale `hosting`) are counted and change nothing; the same content sealed
    for its last announcement starts a link and hosts a room, so the test can tell."""
    token = tmp_path / "token"
    token.write_text("datagram-token\n")
    key = mesh_key(b"datagram-token")
    point = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    point.bind(("127.0.0.1", 0))
    point.settimeout(5)
    address = f"udp://127.0.0.1:{point.getsockname()[1]}"
    t = parts("transmitter", "--mesh", "seal", "--name", "seal-0", "--rendezvous", address,
              "--announce-interval-ms", "250", "--expiry-multiplier", "20", "--token-file", token)
    raw, transmitter = point.recvfrom(65536)
    announced, sealed = unseal(raw, key)  # its announcements are sealed with the mesh key
    assert announced["type"] == "announce" and sealed["role"] == "peer" and sealed["context"] == "seal"
    peer = FakePeer(ctx, "seal", address, name="listed", announcing=False, token=b"datagram-token")
    try:
        info = {"name": "listed", "id": peer.id, "command": peer.endpoint, "event": "tcp://127.0.0.1:1"}
        peers = json.dumps({"type": "peers", "mesh": "seal", "transmitters": [info]}).encode()
        hosting = json.dumps({"type": "hosting", "mesh": "seal",
                              "rooms": [{"room": "lobby", "hosts": ["seal-0"]}]}).encode()
        now = int(time.time() * 1000)
        forged = []
        for body in (peers, hosting):
            forged += [
                body,
                seal(body, mesh_key(b"a-guess"), "rendezvous", "seal", re=sealed["mac"])[0],
                seal(body, service_key(b"datagram-token", "s"), "rendezvous", "seal", re=sealed["mac"])[0],
                seal(body, key, "rendezvous", "seal", re="00" * 32)[0],
                seal(body, key, "peer", "seal", re=sealed["mac"])[0],
            ]
        forged.append(seal(hosting, key, "rendezvous", "seal", ts_ms=now - 31_000)[0])
        before = refused({"metrics": t.ready["metrics"]})
        for d in forged:
            point.sendto(d, transmitter)
        wait_for(lambda: refused({"metrics": t.ready["metrics"]}) >= before + len(forged),
                 what="every forged datagram counted")
        assert not peer.received("PEER"), "a forged peers list started a link"
        assert metrics(t.ready["metrics"])["thynapse_transmitter_rooms"] == 0, "a forged hosting took a room"
        # Sealed for its latest announcement, the same content is taken.
        point.settimeout(0.05)
        latest = None
        try:
            while True:
                latest = point.recvfrom(65536)[0]
        except socket.timeout:
            pass
        mac = unseal(latest or raw, key)[1]["mac"]
        for body in (peers, hosting):
            point.sendto(seal(body, key, "rendezvous", "seal", re=mac)[0], transmitter)
        wait_for(lambda: peer.received("PEER"), what="a link to the peer the sealed answer listed")
        wait_for(lambda: metrics(t.ready["metrics"])["thynapse_transmitter_rooms"] == 1, what="the room hosted")
    finally:
        peer.stop()


READER = '{"publish":["open.*"],"subscribe":["news.*","open.*"]}'


def permissions_yaml():
    """Service `writer` may do anything; `reader` publish only `open.*`, subscribe to
    `news.*` and `open.*` (and PSUBSCRIBE exactly those)."""
    return mesh_yaml(name="perm", replicas=2, services=[("writer", [])]) + """---
apiVersion: thynapse.io/v1alpha1
kind: Service
metadata: {name: reader}
spec: {mesh: perm, permissions: {publish: ["open.*"], subscribe: ["news.*", "open.*"]}}
"""


def test_a_service_gets_noperm_for_what_it_may_not_do_and_nobody_receives_it(start_mesh):
    m = start_mesh(permissions_yaml(), cells={"writer": 1, "reader": 1})
    writer, reader = m.redis(m.cells("writer")[0]), m.redis(m.cells("reader")[0])
    sidecar = m.cells("reader")[0]["metrics"]
    at_writer = Subscriber(writer, channels=["secret", "open.x"])
    # Publishing where it may not: refused as Redis ACL refuses it (redis-py reads the
    # NOPERM code as NoPermissionError), never routed.
    with pytest.raises(redis.exceptions.NoPermissionError,
                       match="User reader has no permissions to access the 'secret' channel"):
        reader.publish("secret", b"leak")
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.spublish("{lobby}secret", b"leak")
    # Where it may: delivered; what was refused before it would have come first.
    until_routed(reader, "open.x", 1)
    reader.publish("open.x", b"after")
    at_writer.wait_count(1, prefix=b"after")
    assert not at_writer.data(b"leak"), "a refused publish was delivered"
    # Subscribing: channels by glob; patterns only as granted, literally.
    p = reader.pubsub()
    p.subscribe("news.sport")
    p.psubscribe("news.*")
    # One channel it may not have refuses the whole command, as in Redis.
    for names in (("open.b", "secret"), ("news.s*",)):
        with pytest.raises(redis.exceptions.NoPermissionError, match=re.escape(f"'{names[-1]}' channel")):
            (p.psubscribe if "*" in names[0] else p.subscribe)(*names)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # (wait_for would take the error as "not yet")
                p.get_message(timeout=0.1)
    until_routed(writer, "news.sport", 1)
    assert writer.publish("open.b", b"x") == 0, "a refused SUBSCRIBE subscribed nothing"
    p.close()
    assert metrics(sidecar)['thynapse_sidecar_refused_total{limit="permission"}'] == 4


def test_a_cell_bypassing_its_sidecar_is_held_to_its_permissions_and_cannot_widen_them(start_mesh, ctx):
    m = start_mesh(permissions_yaml(), cells={"writer": 1})
    writer = m.redis(m.cells("writer")[0])
    at_writer = Subscriber(writer, channels=["secret"])
    t = m.transmitter(m.cells("writer")[0]["transmitter"])
    identity = "reader " + READER
    raw = RawCell(ctx, t["command"], service="reader", identity=identity)
    raw.hello()
    before = metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="permission"}']
    raw.subscribe([b"secret", b"news.a"])
    assert raw.expect("ERRR")[2]["error"].startswith("NOPERM 1 subscriptions refused")
    raw.subscribe([b"news.s*"], kind=1)  # a pattern not granted literally
    assert raw.expect("ERRR")[2]["error"].startswith("NOPERM 1 subscriptions refused")
    raw.send_binary("PUBS", struct.pack("<Q", 1) + publish_records([("secret", b"leak"), ("open.y", b"ok")]))
    assert raw.expect("ERRR")[2]["error"].startswith("NOPERM 1 publishes refused")
    raw.send("EVNT", {"channel": "secret", "data": "leak"})  # the seed protocol's single event
    assert raw.expect("ERRR")[2]["error"].startswith("NOPERM 1 publishes refused")
    after = metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="permission"}']
    assert after == before + 4
    # Allowed: its publish reaches the writer's subscriber of open.y, so the refused one
    # would have been seen by now.
    sub_open = Subscriber(writer, channels=["open.y"])
    until_routed(writer, "open.y", 1)
    assert raw.publish(2, [("open.y", b"ok")]) == [1]
    sub_open.wait_count(1, prefix=b"ok")
    assert not at_writer.data(b"leak")
    # Its key proves only these permissions: claiming none (everything) is refused.
    key = service_key(m.token, identity)
    wider = RawCell(ctx, t["command"], service="reader", key=key)
    with pytest.raises(AssertionError, match="wrong proof"):
        wider.hello()


def test_a_restricted_cell_taking_over_an_id_keeps_only_the_subscriptions_it_may_have(start_mesh, ctx):
    """A cell id taken over (its first connection silent for two heartbeats) keeps its
    subscriptions: a connection proving narrower permissions (say, after they were
    narrowed) keeps only those its permissions allow."""
    m = start_mesh(permissions_yaml().replace("expiryMultiplier: 4", "expiryMultiplier: 20"), cells={"writer": 1})
    writer = m.redis(m.cells("writer")[0])
    t = m.transmitter(m.cells("writer")[0]["transmitter"])
    # The key of "reader" before it was restricted: everything allowed.
    wide = RawCell(ctx, t["command"], service="reader")
    wide.hello()
    wide.subscribe([b"secret", b"news.a"], sync=1)
    assert writer.publish("secret", b"x") == 1 and writer.publish("news.a", b"x") == 1
    # Silent now (the expiry is 5 s); the same id proves the restricted identity from
    # another connection, taking it over once two heartbeats passed.
    narrow = RawCell(ctx, t["command"], service="reader", identity="reader " + READER, cell_id=wide.id)
    wait_for(lambda: "error" not in narrow.hello(expect=None), timeout=4, interval=0.1, what="the id taken over")
    assert writer.publish("secret", b"x") == 0, "a subscription it may not have was kept"
    assert writer.publish("news.a", b"x") == 1, "one it may have stays"


class Relay:
    """A TCP relay that keeps every byte it passes, both ways: what someone on the network
    path between a cell and its transmitter sees."""

    def __init__(self, target):
        host, port = target.replace("tcp://", "").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.bytes = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self):
        return f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"

    def seen(self):
        with self.lock:
            return bytes(self.bytes)

    def _accept(self):
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(self.target)
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.bytes += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def close(self):
        self.listener.close()


ENCRYPTED = "  security: {encryption: true}\n"
SECRET = b"the launch code is 0000"


def test_an_encrypted_mesh_hides_messages_on_the_wire_and_refuses_plain_connections(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="enc", replicas=2, services=[("s", [])], extra=ENCRYPTED), cells={"s": 2})
    t0, t1 = m.transmitter("enc-0"), m.transmitter("enc-1")
    # Stock Redis clients, through sidecars whose links are encrypted (or refused).
    a, b = (m.redis(c) for c in m.cells("s"))
    sub = Subscriber(a, channels=["news"])
    until_routed(b, "news", 1)
    b.publish("news", b"through sidecars")
    sub.wait_count(1, prefix=b"through")
    # A cell that does not ask for encryption is refused, and counted.
    before = refused(t0)
    with pytest.raises(AssertionError, match="encrypts every connection"):
        RawCell(ctx, t0["command"], service="s").authenticate()
    assert refused(t0) == before + 1
    # A cell written from docs/protocol.md, behind a relay that keeps every byte,
    # subscribes on enc-1; another publishes on enc-0: across the peer link (encrypted,
    # or the transmitters would not have linked), and back to the reader sealed.
    relay = Relay(t1["command"])
    try:
        reader = RawCell(ctx, t1["command"], service="s", encrypt=True, dial=relay.endpoint)
        reader.hello()
        reader.subscribe(["secret"], sync=1)
        writer = RawCell(ctx, t0["command"], service="s", encrypt=True)
        writer.hello()
        assert writer.publish(1, [("secret", SECRET)]) == [1]
        [got] = reader.read_deliveries(1)
        assert (got["channel"], got["payload"]) == (b"secret", SECRET)
        seen = relay.seen()
        assert b"AUTH" in seen, "the relay saw the exchange"
        assert SECRET not in seen and b"secret" not in seen, "the message crossed the wire in clear"
    finally:
        relay.close()
    # A sealed message changed on the way does not open: refused in clear, counted, and
    # the connection has to authenticate again.
    before = refused(t0)
    sealed = bytearray(writer.sock.seal([command("PING")]))
    sealed[-1] ^= 1
    writer.sock.sock.send(bytes(sealed))
    _, cmd, body, _ = parse_command(writer.sock.sock.recv_multipart())
    assert cmd == "ERRR" and "authenticate again" in body["error"], body
    assert refused(t0) == before + 1
