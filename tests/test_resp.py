"""The sidecar's RESP surface: byte-compatible with Redis 7, and robust to bad input."""

import shutil
import socket
import subprocess
import threading
import time

import pytest
import redis

from conftest import Subscriber, mesh_yaml, metrics, until_routed, wait_for

END = b"*2\r\n$4\r\nPING\r\n$7\r\n__end__\r\n"


def encode(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def converse(port, commands):
    """Sends each command on one connection and returns the raw bytes of each reply."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    replies = []
    try:
        for cmd in commands:
            s.sendall(encode(*cmd) + END)
            buf = b""
            while not buf.endswith(b"$7\r\n__end__\r\n"):
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {cmd}"
                buf += chunk
            replies.append(buf[: -len(b"$7\r\n__end__\r\n")])
    finally:
        s.close()
    return replies


def redis_server_replies(commands):
    """The raw replies of a fresh Debian redis-server (7.0) to `commands`, on one connection."""
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(redis.Redis(port=port).ping, what="redis-server")
        return converse(port, commands)
    finally:
        server.terminate()
        server.wait()


SESSION = [
    ("PING",),
    ("PING", "hi"),
    ("ECHO", "x y"),
    ("ping", "a", "b"),
    ("SELECT", "0"),
    ("SELECT", "1"),
    ("SELECT", "x"),
    ("CLIENT", "SETNAME", "cell"),
    ("CLIENT", "GETNAME"),
    ("CLIENT", "NOSUCH"),
    ("FOO", "bar", "baz"),
    ("PUBLISH", "only-one-arg"),
    ("PUBLISH", "nobody.listens", "x"),
    ("UNSUBSCRIBE",),
    ("PUNSUBSCRIBE",),
    ("PUBSUB", "NUMSUB", "a", "b"),
    ("PUBSUB", "NUMPAT"),
    ("PUBSUB", "NOPE"),
    ("HELLO", "4"),
    ("SUBSCRIBE", "a", "b"),
    ("PSUBSCRIBE", "p*"),
    ("PING",),
    ("PUBLISH", "x", "y"),
    ("PUBSUB", "NUMSUB", "a"),
    ("UNSUBSCRIBE", "b", "zzz"),
    ("PUNSUBSCRIBE",),
    ("UNSUBSCRIBE",),
    ("PUBSUB", "CHANNELS"),
    ("RESET",),
    ("PING",),
    # Sharded pub/sub (rooms): counts apart from channels and patterns, as in Redis 7.
    ("SPUBLISH", "{r}x", "m"),
    ("SPUBLISH", "{r}x"),
    ("SSUBSCRIBE", "{r}x", "y"),
    ("SUBSCRIBE", "a"),
    ("SSUBSCRIBE", "{r}x"),
    ("SPUBLISH", "{r}x", "m"),
    ("PUBSUB", "SHARDCHANNELS"),
    ("SUNSUBSCRIBE", "y", "never"),
    ("UNSUBSCRIBE",),
    ("SUNSUBSCRIBE",),
    ("SUNSUBSCRIBE",),
    ("PUBSUB", "SHARDCHANNELS"),
    ("PUBSUB", "SHARDNUMSUB", "{r}x", "q"),
    ("SSUBSCRIBE", "{r}x"),
    ("RESET",),
    ("PUBSUB", "SHARDNUMSUB", "{r}x"),
    # What clients and tools ask on their own: an empty standalone server's answers.
    ("DBSIZE",),
    ("CONFIG", "GET", "maxmemory"),
    ("CONFIG", "GET", "databases"),
    ("CONFIG", "GET", "save"),
    ("CONFIG", "GET", "appendonly"),
    ("CONFIG", "GET", "bind"),
    ("CONFIG", "GET", "nosuch"),
    ("CONFIG",),
    ("CONFIG", "GET"),
    ("ROLE",),
    ("CLIENT", "NO-EVICT", "on"),
    ("CLIENT", "NO-EVICT", "maybe"),
    ("CLIENT", "GETREDIR"),
    ("AUTH", "x"),
    ("AUTH", "u", "p"),
    ("CLUSTER", "INFO"),
    ("READONLY",),
    ("INFO", "nosuch"),
    ("INFO", "keyspace"),
    ("SUBSCRIBE", "a"),
    ("INFO",),
    ("RESET",),
]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to compare with")
def test_replies_are_byte_compatible_with_redis(start_mesh):
    """The same session against Debian's redis-server (7.0) and a sidecar. CLIENT SETINFO
    is left out: it arrived in Redis 7.2, and the sidecar answers it as 7.2 does (+OK)."""
    expected = redis_server_replies(SESSION)
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])]), cells={"s": 1})
    got = converse(int(mesh.cell("s-0")["resp"].rsplit(":", 1)[1]), SESSION)
    diffs = [f"{cmd}: redis {want!r}, sidecar {have!r}" for cmd, want, have in zip(SESSION, expected, got) if want != have]
    assert not diffs, "\n".join(diffs)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to compare with")
def test_info_reads_like_redis_and_tells_the_truth(start_mesh):
    """INFO has Redis 7.0's sections and key names (a client's parser finds what it looks
    for under the same names), plus the sidecar's own `thynapse_*` keys, and its figures
    follow the cell: clients, subscriptions, the transmitter it is linked to."""
    redis_text = _bulk_text(redis_server_replies([("INFO", "everything")])[0])
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = mesh.cell("s-0")
    client = mesh.redis(cell)
    sub = Subscriber(mesh.redis(cell), channels=["one", "two"], patterns=["p.*"])
    text = _bulk_text(converse(int(cell["resp"].rsplit(":", 1)[1]), [("INFO", "everything")])[0])

    def parse(t):
        sections, keys = [], set()
        for line in t.split("\r\n"):
            if line.startswith("# "):
                sections.append(line[2:])
            elif line:
                keys.add(line.split(":", 1)[0])
        return sections, keys

    redis_sections, redis_keys = parse(redis_text)
    sections, keys = parse(text)
    assert [s for s in redis_sections if s != "Keyspace"] == [s for s in sections if s != "Keyspace"]
    unknown = {k for k in keys if not k.startswith("thynapse_")} - redis_keys
    assert not unknown, f"keys Redis 7.0 does not have: {unknown}"
    info = client.info()  # redis-py's own parser
    assert info["redis_mode"] == "standalone" and info["role"] == "master" and info["loading"] == 0
    assert info["tcp_port"] == int(cell["resp"].rsplit(":", 1)[1])
    assert len(info["run_id"]) == 40 and info["uptime_in_seconds"] >= 0
    assert info["connected_clients"] == 2
    assert (info["pubsub_channels"], info["pubsub_patterns"]) == (2, 1)
    assert info["thynapse_transmitter"] == cell["transmitter"] and info["thynapse_cell"] == "s-0"
    assert client.info("server").keys() >= {"redis_version", "run_id"} and "connected_clients" not in client.info("server")
    # CLIENT LIST and CLIENT INFO, parsed by redis-py.
    listed = client.client_list()
    assert len(listed) == 2 and {c["sub"] for c in listed} == {"0", "2"}
    mine = client.client_info()
    assert mine["cmd"] == "client|info" and str(mine["id"]) in {str(c["id"]) for c in listed}
    assert [c["psub"] for c in client.client_list(_type="pubsub")] == ["1"]
    sub.pubsub.close()
    wait_for(lambda: client.info("clients")["connected_clients"] == 1, what="the closed client gone")
    assert client.info("stats")["pubsub_channels"] == 0
    # RESP3: INFO is a verbatim string, CONFIG GET a map (as Redis 7 answers).
    r3 = mesh.redis(cell, protocol=3)
    assert r3.info()["redis_mode"] == "standalone"
    assert r3.config_get("maxmemory*") == {"maxmemory": "0", "maxmemory-policy": "noeviction"}
    seconds, micros = client.time()
    assert abs(seconds - time.time()) < 60 and 0 <= micros < 1_000_000


def test_resp3_hello_and_pushes(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = mesh.cell("s-0")
    r3 = mesh.redis(cell, protocol=3)
    hello = r3.execute_command("HELLO", "3")
    assert hello[b"proto"] == 3 and hello[b"server"] == b"redis"
    p = r3.pubsub()
    p.subscribe("c3")
    wait_for(lambda: p.get_message(timeout=0.1), what="subscribe push")
    publisher = mesh.redis(cell)
    assert publisher.publish("c3", b"pushed") == 1
    msg = wait_for(lambda: p.get_message(timeout=0.1), what="message push")
    assert msg["type"] == "message" and msg["data"] == b"pushed"
    # RESP3 clients may run any command while subscribed.
    assert r3.ping() is True


def test_bad_input_gets_errors_and_loses_nothing_else(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = mesh.cell("s-0")
    port = int(cell["resp"].rsplit(":", 1)[1])
    sub = Subscriber(mesh.redis(cell), channels=["keep"])
    publisher = mesh.redis(cell)
    until_routed(publisher, "keep", 1)

    # Malformed RESP: a protocol error, then that connection (only) is closed, as Redis does.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"*1\r\n:notanumber\r\n")
    reply = s.recv(1024)
    assert reply.startswith(b"-ERR Protocol error"), reply
    assert s.recv(1024) == b""
    s.close()

    # Unknown commands: an error, and the connection stays usable.
    other = mesh.redis(cell)
    with pytest.raises(redis.ResponseError, match="unknown command 'NOSUCH'"):
        other.execute_command("NOSUCH", "x")
    assert other.ping()

    # Oversized messages: refused with a clear error; nothing is published.
    with pytest.raises(redis.ResponseError, match="exceeds the mesh limit"):
        other.publish("keep", b"x" * (1024 * 1024 + 1))
    assert other.publish("keep", b"after") == 1
    sub.wait_count(1, prefix=b"after")
    assert not sub.data(b"xxx")
    assert sub.data(b"after") == [b"after"]


def test_slow_subscriber_is_bounded_counted_and_alone(start_mesh):
    extra = "  limits: {clientOutputBufferBytes: 4194304}\n"
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("s", [])], extra=extra), cells={"s": 2})
    slow_cell, fast_cell = mesh.cell("s-0"), mesh.cell("s-1")
    # The slow subscriber subscribes and then never reads.
    slow = socket.create_connection(("127.0.0.1", int(slow_cell["resp"].rsplit(":", 1)[1])))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(encode("SUBSCRIBE", "firehose"))
    fast = Subscriber(mesh.redis(slow_cell), channels=["firehose"])
    fast_elsewhere = Subscriber(mesh.redis(fast_cell), channels=["firehose"])
    publisher = mesh.redis(fast_cell)
    until_routed(publisher, "firehose", 2)
    # 16 MB for a 4 MiB limit: well past what loopback socket buffers can absorb.
    n = 8000
    payload = b"m:" + b"x" * 2000
    for i in range(0, n, 100):
        p = publisher.pipeline(transaction=False)
        for _ in range(100):
            p.publish("firehose", payload)
        p.execute()
        # The others read as they go: their queues stay far below the limit.
        fast.poll(timeout=0.01)
        fast_elsewhere.poll(timeout=0.01)
    fast.wait_count(n, prefix=b"m:", timeout=60)
    fast_elsewhere.wait_count(n, prefix=b"m:", timeout=60)
    m = wait_for(
        lambda: (lambda m: m if m['thynapse_sidecar_drops_total{reason="slow_subscriber"}'] >= 1 else None)(metrics(slow_cell["metrics"])),
        what="slow subscriber drop counted",
    )
    assert m['thynapse_sidecar_client_disconnects_total{reason="slow_subscriber"}'] == 1, "only the slow one"
    # The sidecar let go of it (its queue is gone); the fast client on the same cell stays.
    wait_for(lambda: metrics(slow_cell["metrics"])["thynapse_sidecar_clients"] == 1, what="slow client dropped")
    slow.close()


def _bulk_text(reply):
    """The text of a raw RESP2 bulk string reply."""
    header, rest = reply.split(b"\r\n", 1)
    assert header.startswith(b"$"), reply[:40]
    return rest[: int(header[1:])].decode()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RespReader:
    """Reads RESP2/RESP3 values off a raw socket: (type byte, value)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def next(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            return kind, None if int(rest) < 0 else self._exact(int(rest))
        if kind in (b"*", b">"):
            return kind, [self.next()[1] for _ in range(int(rest))]
        if kind == b"%":
            return kind, [self.next()[1] for _ in range(2 * int(rest))]
        return kind, rest


def test_pushes_follow_a_protocol_switch_mid_stream(start_mesh):
    """A RESP3 subscriber goes back to RESP2 (HELLO 2) while messages stream in: every
    message before the HELLO reply is a RESP3 push, every one after it a RESP2 array, and
    none is lost or mangled. (The hub writes pushes ahead in the version it last heard of;
    the connection retypes any written in the old one.)"""
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = mesh.cell("s-0")
    port = int(cell["resp"].rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(encode("HELLO", "3") + encode("SUBSCRIBE", "flip"))
    r = RespReader(s)
    assert r.next()[0] == b"%"
    assert r.next() == (b">", [b"subscribe", b"flip", b"1"])
    publisher = mesh.redis(cell)
    until_routed(publisher, "flip", 1)

    total = 20_000
    done = threading.Event()

    def publish():
        pipe = publisher.pipeline(transaction=False)
        for i in range(total):
            pipe.publish("flip", b"m%d" % i)
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    kinds, got, switched = [], [], False
    while len(got) < total:
        kind, value = r.next()
        if kind == b"*" and value and value[0] == b"server":
            switched = True  # the HELLO 2 reply, a flat array in RESP2
            kinds.append(b"hello")
            continue
        assert value[0] == b"message", value
        if value[2].startswith(b"m"):
            kinds.append(kind)
            got.append(int(value[2][1:]))
            if len(got) == 100:
                s.sendall(encode("HELLO", "2"))
    assert switched and done.wait(10)
    assert sorted(got) == list(range(total)), "lost or duplicated messages"
    at = kinds.index(b"hello")
    assert set(kinds[:at]) == {b">"} and set(kinds[at + 1 :]) == {b"*"}, "a push in the wrong version"
    s.close()


def test_no_message_comes_before_its_subscription_confirmation(start_mesh):
    """As in Redis, a client reads its SUBSCRIBE confirmation before any message of that
    subscription, while messages stream to the cell (for another client of it, and from a
    publisher on another transmitter)."""
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("a", []), ("b", [])]), cells={"a": 1, "b": 1})
    sub_cell, pub_cell = mesh.cell("a-0"), mesh.cell("b-0")
    held = Subscriber(mesh.redis(sub_cell), channels=["flood"])  # the cell already receives them
    until_routed(mesh.redis(pub_cell), "flood", 1)
    stop = threading.Event()

    def flood():
        r = mesh.redis(pub_cell)
        while not stop.is_set():
            r.publish("flood", b"x")

    publisher = threading.Thread(target=flood)
    publisher.start()
    port = int(sub_cell["resp"].rsplit(":", 1)[1])
    try:
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                names = ["flood", f"fresh.{i}"] if i % 2 else ["flood"]
                s.sendall(encode("SUBSCRIBE", *names))
                reader = RespReader(s)
                for n, name in enumerate(names, 1):
                    assert reader.next() == (b"*", [b"subscribe", name.encode(), b"%d" % n])
                assert reader.next()[1][0] == b"message"
            finally:
                s.close()
    finally:
        stop.set()
        publisher.join()
    held.poll()
    assert held.data(b"x"), "the other client of the cell got the stream throughout"


def test_auth_takes_the_default_user_as_redis_without_a_password(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=1, services=[("s", [])]), cells={"s": 1})
    cell = mesh.cell("s-0")
    host, port = cell["resp"].rsplit(":", 1)
    # A client configured with redis://default:secret@… connects, as to a Redis without one.
    assert redis.Redis(host=host, port=int(port), username="default", password="secret").ping()
    assert redis.Redis(host=host, port=int(port), username="default", password="x", protocol=3).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=host, port=int(port), username="alice", password="x").ping()
