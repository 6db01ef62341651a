"""Every message accounted for: what a publisher was answered for is delivered, once."""

import os
import signal
import socket

from conftest import Subscriber, mesh_yaml, metrics, until_every_worker_routable, until_routed, wait_for

EXPIRY_S = 0.25 * 4  # announce_ms × multiplier of mesh_yaml's defaults


def read_replies(sock, n, timeout=30):
    """Reads RESP replies (integers, errors) until `n` came or the connection closed."""
    sock.settimeout(timeout)
    buf = b""
    while buf.count(b"\r\n") < n:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        buf += chunk
    return [int(line[1:]) if line.startswith(b":") else line[1:].decode()
            for line in buf.split(b"\r\n") if line[:1] in (b":", b"-")]


def refused(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_sigterm_of_a_sidecar_waits_until_its_publishes_are_acknowledged(start_mesh):
    m = start_mesh(mesh_yaml(name="drain", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    assert a["transmitter"] != b["transmitter"]
    sub = Subscriber(m.redis(b), channels=["drain"])
    until_routed(m.redis(a), "drain", 1)
    home = m.transmitter(a["transmitter"])
    sent = [b"m%03d" % i for i in range(200)]
    taken = metrics(a["metrics"])["thynapse_sidecar_messages_in_total"]
    host, port = a["resp"].rsplit(":", 1)
    client = socket.create_connection((host, int(port)))
    # Its transmitter paused: the publishes are taken, sent, and not acknowledged yet
    # when the sidecar is told to stop.
    os.kill(home["pid"], signal.SIGSTOP)
    try:
        client.sendall(b"".join(b"*3\r\n$7\r\nPUBLISH\r\n$5\r\ndrain\r\n$4\r\n%s\r\n" % p for p in sent))
        wait_for(lambda: metrics(a["metrics"])["thynapse_sidecar_messages_in_total"] >= taken + len(sent),
                 what="the publishes taken by the sidecar")
        m.allow_restarts = True  # killed on purpose: `up` restarts it
        os.kill(a["pid"], signal.SIGTERM)
        # Stopping: no new connection, and a publish sent now is refused, not lost.
        wait_for(lambda: refused(host, int(port)), what="new connections refused")
        client.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$5\r\ndrain\r\n$4\r\nlate\r\n")
    finally:
        os.kill(home["pid"], signal.SIGCONT)
    # It stays until they are acknowledged: every publish is answered, then it exits.
    replies = read_replies(client, len(sent) + 1)
    client.close()
    assert replies[:len(sent)] == [1] * len(sent), f"{len(replies)} of {len(sent)} answered"
    assert replies[len(sent):] == ["ERR sidecar stopping: not published"], replies[len(sent):]
    sub.wait_count(len(sent), prefix=b"m")
    assert sub.data(b"m") == sent, "every answered message delivered once, in order"


WORKERS = ("workers", [{"pattern": "jobs.*", "mode": "anycatch"}])


def exactly_once(worker_subs, sent, timeout=30):
    """Waits until the workers together hold every message of `sent`; then none twice."""

    def together():
        for s in worker_subs:
            s.poll()
        return sum(len(s.data(b"m")) for s in worker_subs) >= len(sent)

    wait_for(together, timeout=timeout, what="every message at some worker")
    got = sorted(p for s in worker_subs for p in s.data(b"m"))
    assert got == sorted(sent), f"{len(got)} deliveries of {len(sent)} messages"


def total(mesh, name):
    """`name` summed over the transmitters now running (one restarted and not serving its
    metrics yet has counted nothing)."""

    def of(t):
        try:
            return metrics(t["metrics"]).get(name, 0)
        except OSError:
            return 0

    return sum(of(t) for t in mesh.refresh()["transmitters"])


def test_anycatch_messages_of_a_cell_that_dies_go_to_another_cell_of_the_service(start_mesh):
    m = start_mesh(mesh_yaml(name="redo", replicas=1, services=[WORKERS, ("p", [])]),
                   cells={"workers": 2, "p": 1})
    dying, living = m.cells("workers")
    subs = [Subscriber(m.redis(c), patterns=["jobs.*"]) for c in (dying, living)]
    publisher = m.redis(m.cell("p-0"))
    until_every_worker_routable(publisher, "jobs.a", subs)
    # Asleep, it takes nothing and credits nothing; then it dies.
    os.kill(dying["pid"], signal.SIGSTOP)
    sent = [b"m%03d" % i for i in range(100)]
    for payload in sent:
        assert publisher.publish("jobs.a", payload) == 1
    m.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(dying["pid"], signal.SIGKILL)
    subs[0].pubsub.close()
    exactly_once(subs[1:], sent)
    assert total(m, "thynapse_transmitter_anycatch_redelivered_total") > 0


def test_anycatch_messages_forwarded_to_a_transmitter_that_dies_go_to_another_cell(start_mesh):
    m = start_mesh(mesh_yaml(name="redot", replicas=2, services=[WORKERS, ("p", [])]),
                   cells={"workers": 2, "p": 1})
    pub_cell = m.cell("p-0")
    workers = m.cells("workers")
    far = [c for c in workers if c["transmitter"] != pub_cell["transmitter"]]
    assert far and len({c["transmitter"] for c in workers}) == 2, "workers on both transmitters"
    subs = [Subscriber(m.redis(c), patterns=["jobs.*"]) for c in workers]
    publisher = m.redis(pub_cell)
    until_every_worker_routable(publisher, "jobs.b", subs)
    doomed = m.transmitter(far[0]["transmitter"])
    # Forwarded to a transmitter that takes nothing, credits nothing, then dies.
    os.kill(doomed["pid"], signal.SIGSTOP)
    sent = [b"m%03d" % i for i in range(100)]
    for payload in sent:
        assert publisher.publish("jobs.b", payload) == 1
    m.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(doomed["pid"], signal.SIGKILL)
    # Each message reaches one worker: the one whose transmitter died (after it moved)
    # or the other.
    exactly_once(subs, sent)
    assert total(m, "thynapse_transmitter_anycatch_redelivered_total") > 0


def test_a_paused_anycatch_cell_does_not_deliver_what_went_to_another_cell(start_mesh):
    m = start_mesh(mesh_yaml(name="nodup", replicas=1, services=[WORKERS, ("p", [])]),
                   cells={"workers": 2, "p": 1})
    sleeper, other = m.cells("workers")
    subs = [Subscriber(m.redis(c), patterns=["jobs.*"]) for c in (sleeper, other)]
    publisher = m.redis(m.cell("p-0"))
    until_every_worker_routable(publisher, "jobs.c", subs)
    home = m.transmitter(sleeper["transmitter"])
    os.kill(sleeper["pid"], signal.SIGSTOP)
    try:
        sent = [b"m%03d" % i for i in range(100)]
        for payload in sent:
            assert publisher.publish("jobs.c", payload) == 1
        # Dropped as silent: its share goes to the other worker.
        wait_for(lambda: metrics(home["metrics"])["thynapse_transmitter_cells"] == 2,
                 timeout=10 * EXPIRY_S, what="the paused worker dropped")
        exactly_once(subs[1:], sent)
    finally:
        os.kill(sleeper["pid"], signal.SIGCONT)
    # Awake, it reads what was sent to it while it slept, and must not deliver it.
    wait_for(lambda: metrics(home["metrics"])["thynapse_transmitter_cells"] == 3,
             timeout=2 * EXPIRY_S + 5, what="the woken worker back")
    marker = b"after"
    publisher.publish("jobs.c", marker)
    wait_for(lambda: [s.poll() for s in subs] and any(s.data(marker) for s in subs),
             what="a message after the wake delivered")
    exactly_once(subs, sent)


def test_publishes_unacknowledged_when_their_transmitter_dies_are_sent_again(start_mesh):
    """A sidecar keeps what its transmitter has not acknowledged: when that transmitter
    dies, the sidecar joins another and sends it all again; every publish is answered and
    delivered once, in order."""
    m = start_mesh(mesh_yaml(name="resend", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    assert a["transmitter"] != b["transmitter"]
    sub = Subscriber(m.redis(b), channels=["again"])
    until_routed(m.redis(a), "again", 1)
    home = m.transmitter(a["transmitter"])
    taken = metrics(a["metrics"])["thynapse_sidecar_messages_in_total"]
    sent = [b"r%03d" % i for i in range(100)]
    host, port = a["resp"].rsplit(":", 1)
    client = socket.create_connection((host, int(port)))
    os.kill(home["pid"], signal.SIGSTOP)
    client.sendall(b"".join(b"*3\r\n$7\r\nPUBLISH\r\n$5\r\nagain\r\n$4\r\n%s\r\n" % p for p in sent))
    wait_for(lambda: metrics(a["metrics"])["thynapse_sidecar_messages_in_total"] >= taken + len(sent),
             what="the publishes taken by the sidecar")
    m.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(home["pid"], signal.SIGKILL)
    replies = read_replies(client, len(sent), timeout=30)
    client.close()
    assert replies == [1] * len(sent), f"{len(replies)} of {len(sent)} answered: {replies[:5]}"
    sub.wait_count(len(sent), prefix=b"r")
    assert sub.data(b"r") == sent, "each publish delivered once, in order"
