"""Sidecar promises of docs/architecture.md ("Threads and queues", "Limits", "Failure
handling") through its Redis port: names and requests over their limits, a full window of
unacknowledged publishes that stops reading clients, the bounded waits of a stopping
sidecar and of `up`, a subscription confirmation its transmitter never gives."""

import os
import signal
import socket
import threading

import pytest
import redis
import zmq

from conftest import Subscriber, drops, mesh_yaml, metrics, until_routed, wait_for
from rawwire import FakePeer


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read_until_closed(sock, timeout=10):
    sock.settimeout(timeout)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk


def client(part, **kw):
    """A client of a sidecar started alone, kept as long as the part (redis-py closes the
    connections of a client it collects, a pub/sub one included)."""
    host, port = part.ready["resp"].rsplit(":", 1)
    part.clients.append(redis.Redis(host=host, port=int(port), socket_timeout=10, **kw))
    return part.clients[-1]


def test_names_payloads_and_requests_over_their_limits(start_mesh):
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}}}\n"
    m = start_mesh(mesh_yaml(name="limits", replicas=1, services=[("s", [])], extra=extra), cells={"s": 1})
    cell = m.cells("s")[0]
    r = m.redis(cell)
    refused = lambda what: metrics(cell["metrics"])[f'thynapse_sidecar_refused_total{{limit="{what}"}}']  # noqa: E731
    # Patterns and shard channels (whose room is their whole name here) over 16 KiB.
    p = r.pubsub()
    p.psubscribe("ok.*", "p" * 16385)
    answers = []

    def both_answered():
        try:
            m_ = p.get_message(timeout=0.1)
            if m_ is not None:
                answers.append(m_["type"])
        except redis.ResponseError as e:
            answers.append(str(e))
        return len(answers) >= 2

    wait_for(both_answered, what="PSUBSCRIBE answered")
    assert answers == ["psubscribe", "channel name of 16385 bytes exceeds the limit of 16384 bytes"], answers
    with pytest.raises(redis.ResponseError, match="exceeds the limit of 16384 bytes"):
        r.spublish("s" * 16385, b"x")
    assert refused("name_length") == 2
    # A room name (hash tag) too long to place is refused too, not silently dropped.
    with pytest.raises(redis.ResponseError):
        r.spublish("{" + "r" * 300 + "}x", b"x")
    # A payload over maxMessageBytes: refused and counted, twice over.
    with pytest.raises(redis.ResponseError, match="maxMessageBytes"):
        r.publish("big", b"x" * (limit + 1))
    assert refused("message_size") == 1
    # Each publish refused is a message dropped: the long-named SPUBLISH and this one.
    assert drops(cell["metrics"], "thynapse_sidecar_drops_total")["too_large"] == 2
    # A request over 2 × maxMessageBytes + 1 MiB: an error, then the connection is closed.
    host, port = cell["resp"].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    size = 2 * limit + (1 << 20) + 1
    raw.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$%d\r\n" % size)
    try:
        raw.sendall(b"y" * size)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = read_until_closed(raw)
    assert got.startswith(b"-ERR") and got.endswith(b"\r\n"), got[:200]
    assert r.ping(), "the sidecar serves on"


def test_a_full_window_of_unacknowledged_publishes_stops_reading_clients_and_loses_nothing(parts):
    """While its transmitter is paused, a sidecar takes publishes until 4 MiB wait for
    acknowledgement, queues at most 4 MiB more, and then stops reading the client's
    socket: the client's writes block. After SIGCONT every publish is answered and
    delivered, once, in order."""
    rv = parts("rendezvous", "--mesh", "win").ready["address"]
    t = parts("transmitter", "--mesh", "win", "--name", "win-0", "--rendezvous", rv, "--announce-interval-ms", "250",
              "--expiry-multiplier", "20")
    common = ("--mesh", "win", "--service", "s", "--rendezvous", rv, "--resp-bind", "127.0.0.1:0",
              "--announce-interval-ms", "250", "--expiry-multiplier", "20")
    publisher = parts("sidecar", "--name", "pub", *common)
    receiver = parts("sidecar", "--name", "sub", *common)
    sub = Subscriber(client(receiver), channels=["w"])
    until_routed(client(publisher), "w", 1)
    # 20 MiB of requests: more than the window, the queue and the sockets' buffers hold
    # (4 + 4 + about 6 MiB), less than the subscriber's output buffer (32 MiB).
    n, size = 20_000, 1024
    payloads = [b"w%06d" % i + b"x" * (size - 7) for i in range(n)]
    requests = b"".join(resp("PUBLISH", "w", p) for p in payloads)
    host, port = publisher.ready["resp"].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    written = threading.Event()
    taken = lambda: metrics(publisher.ready["metrics"])["thynapse_sidecar_messages_in_total"]  # noqa: E731
    before = taken()
    os.kill(t.proc.pid, signal.SIGSTOP)
    try:
        threading.Thread(target=lambda: (conn.sendall(requests), written.set()), daemon=True).start()
        # It takes up to its window (4 MiB of records, each a little over its payload),
        # then nothing more while nothing is acknowledged, whatever the client writes.
        window = (4 << 20) // (size + 64)
        wait_for(lambda: taken() - before >= window, timeout=30, what="a full window taken")
        first = taken()
        progress = lambda: taken() > first or written.is_set()  # noqa: E731
        with pytest.raises(AssertionError):
            wait_for(progress, timeout=2, what="more publishes taken")
        assert first - before <= (4 << 20) // size + 256, first - before
    finally:
        os.kill(t.proc.pid, signal.SIGCONT)
    wait_for(written.is_set, timeout=60, what="the client's writes done after SIGCONT")
    conn.settimeout(60)
    answers = b""
    while answers.count(b"\r\n") < n:
        chunk = conn.recv(1 << 20)
        assert chunk, "the connection closed before every publish was answered"
        answers += chunk
    assert answers == b":1\r\n" * n, "every publish answered, reaching the subscriber"
    try:
        sub.wait_count(n, prefix=b"w", timeout=120)
    except AssertionError:
        raise AssertionError(f"{len(sub.data(b'w'))} of {n} delivered; {drops(receiver.ready['metrics'], 'thynapse_sidecar_drops_total')}")
    assert sub.data(b"w") == payloads, "delivered once each, in order"


def test_a_stopping_sidecar_exits_after_drain_seconds_leaving_the_rest_unanswered(parts):
    rv = parts("rendezvous", "--mesh", "late").ready["address"]
    t = parts("transmitter", "--mesh", "late", "--name", "late-0", "--rendezvous", rv, "--announce-interval-ms", "250")
    sidecar = parts("sidecar", "--mesh", "late", "--service", "s", "--name", "c", "--rendezvous", rv,
                    "--resp-bind", "127.0.0.1:0", "--announce-interval-ms", "250", "--drain-seconds", "2")
    host, port = sidecar.ready["resp"].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    os.kill(t.proc.pid, signal.SIGSTOP)  # nothing will be acknowledged
    try:
        conn.sendall(resp("PUBLISH", "c", "never acknowledged"))
        wait_for(lambda: metrics(sidecar.ready["metrics"])["thynapse_sidecar_messages_in_total"] >= 1,
                 what="the publish taken")
        sidecar.proc.send_signal(signal.SIGTERM)
        # Without the bound it would wait for ever: its only transmitter is paused.
        sidecar.proc.wait(timeout=20)
        assert read_until_closed(conn) == b"", "the publish it could not get acknowledged was answered"
    finally:
        os.kill(t.proc.pid, signal.SIGCONT)


def test_up_kills_a_cell_that_does_not_stop_in_time(start_mesh):
    """A sidecar that cannot drain (its transmitter paused) would wait 25 s; `up` stopping
    waits 5 s for it, then kills it: it exits in time, leaving no process behind."""
    m = start_mesh(mesh_yaml(name="grace", replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = m.cells("s")[0]
    t = m.transmitter("grace-0")
    host, port = cell["resp"].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    os.kill(t["pid"], signal.SIGSTOP)
    conn.sendall(resp("PUBLISH", "c", "stuck"))
    wait_for(lambda: metrics(cell["metrics"])["thynapse_sidecar_messages_in_total"] >= 1, what="the publish taken")
    m.proc.send_signal(signal.SIGTERM)
    try:
        m.proc.wait(timeout=15)
    finally:
        for pid in (cell["pid"], t["pid"]):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    for pid in (cell["pid"], t["pid"]):
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or
                 open(f"/proc/{pid}/stat").read().split()[2] == "Z", what=f"process {pid} gone")


def test_a_subscription_its_transmitter_never_confirms_is_confirmed_after_two_expiries_and_counted(parts):
    rv = parts("rendezvous", "--mesh", "unsure").ready["address"]
    ctx = zmq.Context()
    fake = FakePeer(ctx, "unsure", rv, name="unsure-0")
    fake.confirm_subs = False
    try:
        sidecar = parts("sidecar", "--mesh", "unsure", "--service", "s", "--name", "c", "--rendezvous", rv,
                        "--resp-bind", "127.0.0.1:0", "--announce-interval-ms", "250", "--expiry-multiplier", "4")
        timeouts = lambda: metrics(sidecar.ready["metrics"])["thynapse_sidecar_subscribe_confirm_timeouts_total"]  # noqa: E731
        assert timeouts() == 0
        sub = Subscriber(client(sidecar), channels=["unconfirmed"])  # returns once confirmed
        assert fake.received("SUBS"), "the subscription was sent"
        assert timeouts() == 1
        sub.pubsub.close()
    finally:
        fake.stop()
        ctx.destroy(linger=0)
