"""Mesh authentication (docs/protocol.md "Authentication", docs/security.md), from raw
pyzmq clients with no proof, a replayed one, another Service's key, posing as a peer, and
a sidecar holding the wrong token: each is refused and counted, and nothing reaches it or
comes from it."""

import os
import stat
from pathlib import Path

import pytest
import zmq

from conftest import Subscriber, mesh_yaml, metrics, until_routed, wait_for
from rawwire import (RawCell, command, dealer, interest, prove, publish_records, recv_command,
                     service_key)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


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
    rv = parts("rendezvous", "--mesh", "creds").ready["address"]
    t = parts("transmitter", "--mesh", "creds", "--name", "creds-0", "--rendezvous", rv,
              "--announce-interval-ms", "250", "--token-file", good)
    common = ("--mesh", "creds", "--service", "s", "--rendezvous", rv, "--resp-bind", "127.0.0.1:0",
              "--announce-interval-ms", "250")
    with pytest.raises(AssertionError, match="no READY"):
        parts("sidecar", "--name", "intruder", "--token-file", bad, *common, timeout=5)
    assert metrics(t.ready["metrics"])['thynapse_transmitter_refused_total{limit="auth"}'] >= 1
    assert metrics(t.ready["metrics"])["thynapse_transmitter_cells"] == 0
    # The same with the right token joins; so does one given only its Service's key.
    parts("sidecar", "--name", "member", "--token-file", good, *common)
    key = tmp_path / "s.key"
    key.write_text(service_key(b"a-good-token", "s").hex() + "\n")
    parts("sidecar", "--name", "keyed", "--service-key-file", key, *common)
    wait_for(lambda: metrics(t.ready["metrics"])["thynapse_transmitter_cells"] == 2, what="two cells")


def test_a_transmitter_with_another_token_is_not_linked(parts, tmp_path):
    """Two transmitters of one mesh name, with different tokens: neither links to the
    other (each refuses the other's proof), so neither can read the other's traffic."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("token-a\n")
    b.write_text("token-b\n")
    rv = parts("rendezvous", "--mesh", "split").ready["address"]
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
