"""Every message accounted for: what a publisher was answered for is delivered, once."""

import os
import signal
import socket

from conftest import Subscriber, mesh_yaml, metrics, until_routed, wait_for


def read_replies(sock, n, timeout=30):
    """Reads RESP integer replies until `n` came or the connection closed."""
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
    return [int(line[1:]) for line in buf.split(b"\r\n") if line.startswith(b":")]


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
        os.kill(a["pid"], signal.SIGTERM)
    finally:
        os.kill(home["pid"], signal.SIGCONT)
    # It stays until they are acknowledged: every publish is answered, then it exits.
    replies = read_replies(client, len(sent))
    client.close()
    assert replies == [1] * len(sent), f"{len(replies)} of {len(sent)} answered"
    sub.wait_count(len(sent), prefix=b"m")
    assert sub.data(b"m") == sent, "every answered message delivered once, in order"
