"""Every message accounted for: what a publisher was answered for is delivered, once."""

import os
import signal
import socket

from conftest import Subscriber, mesh_yaml, metrics, until_routed, wait_for


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
