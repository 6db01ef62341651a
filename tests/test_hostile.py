"""Hostile and oversized input on the wire: a ZeroMQ peer that declares a frame over the
mesh's limit is disconnected before anything is reserved for it, and the process goes on
serving everyone else (vendor/zeromq/PATCHED.md, docs/architecture.md "Limits")."""

import json
import os
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import redis

from conftest import BINARY, Subscriber, free_udp_query, mesh_yaml, metrics, until_routed, wait_for
from rawwire import authenticate, command, dealer, mesh_key, recv_command, seal, unseal

# ZMTP 3.0 greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
# One long frame header declaring 2^40 bytes: before the fix, the reader reserved that.
HUGE_FRAME = b"\x02" + struct.pack(">Q", 1 << 40)


def hostile_bytes():
    assert len(GREETING) == 64
    return GREETING + HUGE_FRAME


def host_port(endpoint):
    host, port = endpoint.replace("tcp://", "").rsplit(":", 1)
    return host, int(port)


def closed_by_peer(sock, timeout=10):
    """Reads until the peer closes the connection; True if it did within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_frame_declared_over_the_limit_does_not_kill_a_transmitter(start_mesh):
    m = start_mesh(mesh_yaml(name="hostile", replicas=2, services=[("s", [])]), cells={"s": 2})
    target = m.endpoints["transmitters"][0]
    pid = target["pid"]
    attacker = socket.create_connection(host_port(target["command"]))
    attacker.sendall(hostile_bytes())
    assert closed_by_peer(attacker), "the transmitter keeps a peer that declared 1 TiB"
    attacker.close()
    # Alive, and still carrying messages between its cells and its peer.
    os.kill(pid, 0)
    assert metrics(target["metrics"])["thynapse_transmitter_cells"] >= 1
    a, b = m.cells("s")
    pub = m.redis(a)
    sub = Subscriber(m.redis(b), channels=["after"])
    until_routed(pub, "after", 1)
    pub.publish("after", b"still here")
    sub.wait_count(1, prefix=b"still")
    m.refresh()
    assert m.transmitter(target["name"])["pid"] == pid, "restarted: it had died"
    wait_for(lambda: metrics(target["metrics"])['thynapse_transmitter_refused_total{limit="wire_message_bytes"}'] == 1,
             what="the refused frame counted")


def test_a_legal_large_message_still_crosses_the_mesh(start_mesh):
    """The limit leaves room for the largest message the mesh allows, in a full batch."""
    extra = "  limits: {maxMessageBytes: 2097152}\n"
    m = start_mesh(mesh_yaml(name="large", replicas=2, services=[("s", [])], extra=extra), cells={"s": 2})
    a, b = m.cells("s")
    assert a["transmitter"] != b["transmitter"]
    pub = m.redis(a)
    sub = Subscriber(m.redis(b), channels=["big"])
    until_routed(pub, "big", 1)
    payload = b"x" * (2 * 1024 * 1024)
    # A burst of small ones, then the largest, so that it lands in a batch already full.
    pipe = pub.pipeline(transaction=False)
    for i in range(300):
        pipe.publish("big", b"small-%d" % i + b"." * 1000)
    pipe.publish("big", payload)
    assert all(n == 1 for n in pipe.execute())
    sub.wait_count(300, prefix=b"small-")
    sub.wait_count(1, prefix=b"xxxx")
    assert sub.data(b"xxxx") == [payload]
    # One over the limit is refused with an error, and counted.
    try:
        pub.publish("big", payload + b"y")
        raise AssertionError("accepted a message over maxMessageBytes")
    except redis.ResponseError as e:
        assert "maxMessageBytes" in str(e)
    page = metrics(a["metrics"])
    assert page['thynapse_sidecar_refused_total{limit="message_size"}'] == 1


def test_channel_names_over_the_limit_are_refused_and_counted(start_mesh):
    m = start_mesh(mesh_yaml(name="names", replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = m.cells("s")[0]
    r = m.redis(cell)
    long_name = "c" * (16 * 1024 + 1)
    try:
        r.publish(long_name, b"x")
        raise AssertionError("accepted a channel name over the limit")
    except redis.ResponseError as e:
        assert "16384" in str(e)
    # SUBSCRIBE of an allowed and a refused name: a confirmation, then an error.
    host, port = cell["resp"].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    raw.sendall(b"*3\r\n$9\r\nSUBSCRIBE\r\n$2\r\nok\r\n$%d\r\n%s\r\n" % (len(long_name), long_name.encode()))
    got = b""
    raw.settimeout(10)
    while b"-ERR" not in got or not got.endswith(b"\r\n"):
        got += raw.recv(65536)
    assert got.startswith(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nok\r\n:1\r\n"), got
    assert b"-ERR channel name of 16385 bytes exceeds the limit of 16384 bytes" in got, got
    raw.close()
    # The longest name allowed works end to end.
    longest = "d" * (16 * 1024)
    sub = Subscriber(m.redis(cell), channels=[longest])
    until_routed(r, longest, 1)
    page = metrics(cell["metrics"])
    assert page['thynapse_sidecar_refused_total{limit="name_length"}'] == 2
    sub.pubsub.close()


def test_subscriptions_past_the_cells_budget_are_refused_by_the_sidecar(start_mesh):
    """A cell subscribes to at most 512 KiB of names (each name and 6 bytes, as the wire
    carries them): the sidecar refuses the SUBSCRIBE that would go past it with an error
    the client sees, instead of the transmitter refusing it where no client hears."""
    m = start_mesh(mesh_yaml(name="budget", replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = m.cells("s")[0]
    names = [b"%02d" % i + b"n" * 14998 for i in range(40)]  # 15,000 bytes each
    host, port = cell["resp"].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    raw.sendall(b"*41\r\n$9\r\nSUBSCRIBE\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(n), n) for n in names))
    got = b""
    raw.settimeout(10)
    while got.count(b"\r\n:") + got.count(b"-ERR") < 40:
        got += raw.recv(1 << 20)
    fits = (512 * 1024) // 15006
    assert got.count(b"\r\n:") == fits, f"{fits} subscriptions fit"
    assert got.count(b"-ERR subscriptions of this cell over the limit of 524288 bytes of names") == 40 - fits
    page = metrics(cell["metrics"])
    assert page['thynapse_sidecar_refused_total{limit="interest_bytes"}'] == 40 - fits
    # The transmitter was never asked for more than the budget.
    home = m.transmitter(cell["transmitter"])
    until_routed(m.redis(cell), names[0].decode(), 1)
    assert metrics(home["metrics"])['thynapse_transmitter_refused_total{limit="interest_bytes"}'] == 0
    # Unsubscribing frees the budget.
    raw.sendall(b"*2\r\n$11\r\nUNSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(names[0]), names[0]))
    late = names[-1]
    raw.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(late), late))
    got = b""
    while b"subscribe\r\n$15000\r\n" + late[:10] not in got:
        got += raw.recv(1 << 20)
    raw.close()


class FakeTransmitter:
    """A TCP server posing as a transmitter: greets every connection with ZMTP and one
    frame header declaring 1 TiB, and counts the connections."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            try:
                conn.sendall(hostile_bytes())
                closed_by_peer(conn, timeout=5)
            except OSError:
                pass
            conn.close()


def test_a_sidecar_survives_a_transmitter_that_declares_a_huge_frame():
    tmp = Path(tempfile.mkdtemp(prefix="thynapse-hostile-"))
    rendezvous = subprocess.Popen(
        [str(BINARY), "rendezvous", "--mesh", "m"], stdout=subprocess.PIPE, stderr=open(tmp / "rv.log", "w"), text=True
    )
    sidecar = None
    fake = FakeTransmitter()
    try:
        line = rendezvous.stdout.readline()
        address = json.loads(line.split(" ", 1)[1])["address"]
        host, port = address.replace("udp://", "").rsplit(":", 1)
        announce = {
            "type": "announce",
            "mesh": "m",
            "interval_ms": 250,
            "multiplier": 20,
            "transmitter": {
                "name": "fake",
                "id": "ab" * 20,
                "command": f"tcp://127.0.0.1:{fake.port}",
                "event": "tcp://127.0.0.1:1",
            },
        }
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(json.dumps(announce).encode(), (host, int(port)))
        s.close()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
        probe.close()
        sidecar = subprocess.Popen(
            [str(BINARY), "sidecar", "--mesh", "m", "--service", "s", "--name", "c", "--rendezvous", address,
             "--resp-bind", "127.0.0.1:0", "--announce-interval-ms", "250",
             "--metrics-bind", f"127.0.0.1:{metrics_port}"],
            stdout=open(tmp / "sidecar.out", "w"), stderr=open(tmp / "sidecar.log", "w"),
        )
        # It connects, is refused a frame, and tries again: alive all along.
        wait_for(lambda: fake.connections >= 2, timeout=20, what="the sidecar's second connection")
        assert sidecar.poll() is None, (tmp / "sidecar.log").read_text()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: metrics(url)['thynapse_sidecar_refused_total{limit="wire_message_bytes"}'] >= 1,
                 what="the refused frames counted")
    finally:
        fake.stop = True
        fake.server.close()
        for p in (sidecar, rendezvous):
            if p is not None:
                p.terminate()
                p.wait(timeout=10)


def test_one_poisoned_announcement_does_not_stop_discovery(start_mesh):
    """The measured attack: an announcement of ~59.7 KB (one long field) asking to be kept
    for ever used to make every `peers` answer too large to read; after a kill -9 of its
    transmitter, a cell then never joined another one."""
    m = start_mesh(mesh_yaml(name="poison", replicas=2, services=[("s", [])]), cells={"s": 2})
    address = m.endpoints["rendezvous"][0]["address"]
    host, port = address.replace("udp://", "").rsplit(":", 1)
    poison = {
        "type": "announce",
        "mesh": "poison",
        "interval_ms": 10**12,
        "multiplier": 1000,
        "transmitter": {
            "name": "poison",
            "id": "cd" * 20,
            "command": "tcp://127.0.0.1:1",
            "event": "tcp://127.0.0.1:2",
            "metrics": "x" * 59_000,
        },
    }
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    # Sealed: whoever sends it holds the mesh key (a broken transmitter, say).
    s.sendto(seal(json.dumps(poison).encode(), mesh_key(m.token), "peer", "poison")[0], (host, int(port)))
    answer, _ = unseal(s.recvfrom(65536)[0])
    s.close()
    assert answer["type"] == "error", answer
    rv = metrics(m.endpoints["rendezvous"][0]["metrics"])
    assert rv['thynapse_rendezvous_refused_total{limit="announce"}'] == 1
    # Answers stay readable, and list only the real transmitters.
    live = wait_for(lambda: free_udp_query(address, "poison"), what="a readable answer")
    assert sorted(t["name"] for t in live["transmitters"]) == ["poison-0", "poison-1"]
    # A transmitter dies hard: its cell joins again and publishes.
    cell = m.cells("s")[0]
    victim = m.transmitter(cell["transmitter"])
    m.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(victim["pid"], 9)
    r = m.redis(cell)
    wait_for(lambda: r.publish("after-kill", b"x") >= 0, timeout=30, what="a publish after the kill")


def test_a_rendezvous_answers_a_thousand_transmitters_in_pages():
    """A rendezvous answers for far more transmitters than the CRD allows (240): a
    thousand of them (announced by anyone holding the key) all reach whoever asks, each
    datagram, seal included, within the 60,000 bytes receivers read."""
    tmp = Path(tempfile.mkdtemp(prefix="thynapse-pages-"))
    (tmp / "token").write_text("pages-token\n")
    key = mesh_key(b"pages-token")
    rendezvous = subprocess.Popen(
        [str(BINARY), "rendezvous", "--mesh", "big", "--token-file", str(tmp / "token")], stdout=subprocess.PIPE,
        stderr=open(tmp / "rv.log", "w"), text=True
    )
    announcer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        address = json.loads(rendezvous.stdout.readline().split(" ", 1)[1])["address"]
        host, port = address.replace("udp://", "").rsplit(":", 1)
        target = (host, int(port))

        def announce(i):
            ip = f"10.0.{i // 250}.{i % 250}"
            announcer.sendto(seal(json.dumps({
                "type": "announce", "mesh": "big", "interval_ms": 60000, "multiplier": 20,
                "transmitter": {
                    "name": f"big-{i:04}", "id": "%040x" % i, "command": f"tcp://{ip}:7000",
                    "event": f"tcp://{ip}:7001", "metrics": f"http://{ip}:9090/metrics",
                },
            }).encode(), key, "peer", "big")[0], target)

        def known(wanted):
            """One query, read page by page until every name of `wanted` came (or none
            comes for a while); announces again whatever the rendezvous lacks (UDP may
            drop)."""
            q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # Room for every page at once (1,000 transmitters: over the default 208 KiB
            # receive buffer, so a reader slower than the sender would lose the last).
            q.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 4 << 20)
            q.settimeout(1)
            query, mac = seal(json.dumps({"type": "query", "mesh": "big"}).encode(), key, "peer", "big")
            q.sendto(query, target)
            names = []
            try:
                while set(names) != wanted:
                    data = q.recvfrom(65536)[0]
                    assert len(data) <= 60_000, len(data)
                    page, sealed = unseal(data, key)
                    assert page["type"] == "peers" and sealed["re"] == mac, page
                    names += [t["name"] for t in page["transmitters"]]
            except socket.timeout:
                pass
            finally:
                q.close()
            for name in wanted - set(names):
                announce(int(name[4:]))
            return sorted(names) == sorted(wanted) and len(names) == len(wanted)

        # A hundred at a time, so that the rendezvous' receive buffer is not what drops.
        for start in range(0, 1000, 100):
            for i in range(start, start + 100):
                announce(i)
            so_far = {f"big-{i:04}" for i in range(start + 100)}
            wait_for(lambda: known(so_far), timeout=60, interval=0.1, what=f"{len(so_far)} transmitters in the answer")
    finally:
        announcer.close()
        rendezvous.terminate()
        rendezvous.wait(timeout=10)


def test_a_full_transmitter_sends_new_cells_elsewhere():
    """Cells per transmitter are bounded (--max-cells): a HELO past the bound is answered
    MOVE, counted, and the cells already there keep their place."""
    import zmq

    tmp = Path(tempfile.mkdtemp(prefix="thynapse-full-"))
    procs = []
    ctx = zmq.Context()
    try:
        rendezvous = subprocess.Popen([str(BINARY), "rendezvous", "--mesh", "m"], stdout=subprocess.PIPE, stderr=open(tmp / "rv.log", "w"), text=True)
        procs.append(rendezvous)
        address = json.loads(rendezvous.stdout.readline().split(" ", 1)[1])["address"]
        transmitter = subprocess.Popen(
            [str(BINARY), "transmitter", "--mesh", "m", "--name", "m-0", "--rendezvous", address, "--max-cells", "2"],
            stdout=subprocess.PIPE, stderr=open(tmp / "t.log", "w"), text=True,
        )
        procs.append(transmitter)
        ready = json.loads(transmitter.stdout.readline().split(" ", 1)[1])

        def hello(cell_id):
            """HELO on a new DEALER: the socket, and the answer's first frame as text."""
            s = dealer(ctx, ready["command"])
            s.send(command("HELO", {"id": cell_id, "service": "s"}))
            return s, s.recv_multipart()[0].decode()

        ids = [os.urandom(20).hex() for _ in range(3)]
        first, reply = hello(ids[0])
        assert reply.startswith("J WLCM"), reply
        _, reply = hello(ids[1])
        assert reply.startswith("J WLCM"), reply
        _, reply = hello(ids[2])
        assert reply.startswith("J MOVE") and "transmitter full" in reply, reply
        # A cell already there says HELO again (a new link): still welcome.
        _, reply = hello(ids[0])
        assert reply.startswith("J WLCM"), reply
        page = metrics(ready["metrics"])
        assert page['thynapse_transmitter_refused_total{limit="cells"}'] == 1
        assert page["thynapse_transmitter_cells"] == 2
    finally:
        ctx.destroy(linger=0)
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_a_flood_of_peer_names_is_bounded_and_the_mesh_keeps_routing(start_mesh):
    """Only a connection that proved the mesh key may say PEER; even one that did can hold
    at most 1,024 peer places (MAX_PEERS): past that a PEER is refused and counted, and the
    real peers keep their links."""
    import zmq

    m = start_mesh(mesh_yaml(name="flood", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    assert a["transmitter"] != b["transmitter"]
    target = m.transmitter(a["transmitter"])
    ctx = zmq.Context()
    try:
        stranger = dealer(ctx, target["command"])
        stranger.send(command("PEER", {"id": os.urandom(20).hex(), "name": "stranger", "mesh": "flood"}))
        _, cmd, body, _ = recv_command(stranger)
        assert cmd == "ERRR" and "authenticate first" in body["error"], (cmd, body)
        assert metrics(target["metrics"])['thynapse_transmitter_refused_total{limit="auth"}'] == 1
        s = dealer(ctx, target["command"], timeout_ms=10000)
        authenticate(s, mesh_key(m.token), "peer", "flood", target["command"])
        n = 1100
        for i in range(n):
            s.send(command("PEER", {"id": os.urandom(20).hex(), "name": f"fake-{i}", "mesh": "flood"}))
        replies = [s.recv_multipart()[0] for _ in range(n)]
    finally:
        ctx.destroy(linger=0)
    welcomed = sum(r.startswith(b"J PWLC") for r in replies)
    refused = [r for r in replies if r.startswith(b"J ERRR")]
    assert welcomed + len(refused) == n
    assert welcomed <= 1024 - 1, "the real peer keeps its place among the 1,024"
    assert len(refused) >= n - 1023 and b"PEER refused" in refused[0], refused[:1]
    assert metrics(target["metrics"])['thynapse_transmitter_refused_total{limit="peers"}'] == len(refused)
    # The real peer is still linked: messages cross between the two.
    sub = Subscriber(m.redis(b), channels=["still"])
    until_routed(m.redis(a), "still", 1)
    assert metrics(target["metrics"])["thynapse_transmitter_peers"] >= 1
    sub.pubsub.close()
