"""Fixtures that run real meshes with `thynapse up` and talk to them with real clients.

Every wait here is a condition polled against a deadline, never a bare sleep.
"""

import json
import re
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import redis
import zmq

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("THYNAPSE_BIN", ROOT / "target" / "release" / "thynapse"))


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip_in_ci: a test that needs what CI cannot have (a real cluster)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI set) every test dependency is installed by scripts/install-test-deps: a
    test that skips there is a failure (a missing install step), unless it is marked
    `may_skip_in_ci`."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not item.get_closest_marker("may_skip_in_ci"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (a missing test dependency?): {report.longrepr}"


def wait_for(condition, timeout=15.0, interval=0.02, what="condition"):
    """Polls `condition` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except (OSError, redis.RedisError, ValueError, KeyError) as e:  # not up yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def mesh_yaml(name="demo", replicas=3, services=(), extra="", announce_ms=250, multiplier=4):
    docs = [
        f"""apiVersion: thynapse.io/v1alpha1
kind: TransmitterMesh
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  rendezvous: {{announceIntervalMs: {announce_ms}, expiryMultiplier: {multiplier}}}
{extra}"""
    ]
    for svc, rules in services:
        delivery = json.dumps(rules)
        docs.append(
            f"""apiVersion: thynapse.io/v1alpha1
kind: Service
metadata: {{name: {svc}}}
spec: {{mesh: {name}, delivery: {delivery}}}
"""
        )
    return "---\n".join(docs)


class Mesh:
    """A running `thynapse up` and its endpoints."""

    def __init__(self, manifests: str, cells: dict, tmp: Path):
        self.dir = tmp
        (tmp / "mesh.yaml").write_text(manifests)
        self.endpoints_path = tmp / "endpoints.json"
        args = [str(BINARY), "up", "-f", str(tmp), "--endpoints", str(self.endpoints_path)]
        for svc, n in cells.items():
            args += ["--cells", f"{svc}={n}"]
        self.log = open(tmp / "up.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoints = wait_for(self._read_endpoints, timeout=30, what="endpoints file")
        self.token = Path(self.endpoints["token_file"]).read_text().strip().encode()
        self._register_token()
        self.clients = []
        # A test that kills or stops children sets this; otherwise a restart (a child
        # that crashed, which `up` would hide) fails the test.
        self.allow_restarts = False

    def restarts(self):
        """The children `up` restarted so far, as its log says: [(name, why)]."""
        log = (self.dir / "up.log").read_text(errors="replace")
        return re.findall(r"thynapse up: (\S+) exited \((.*?)\); restarting it", log)

    def _read_endpoints(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"thynapse up exited: {(self.dir / 'up.log').read_text()}")
        if self.endpoints_path.exists():
            return json.loads(self.endpoints_path.read_text())
        return None

    def refresh(self):
        self.endpoints = json.loads(self.endpoints_path.read_text())
        self._register_token()
        return self.endpoints

    def _register_token(self):
        """Raw wire clients of the tests (rawwire) authenticate with the mesh's token."""
        import rawwire

        for t in self.endpoints["transmitters"]:
            if t.get("command"):
                rawwire.TOKENS[t["command"]] = self.token
        for r in self.endpoints["rendezvous"]:
            rawwire.TOKENS[r["address"]] = self.token

    def cells(self, service=None):
        return [c for c in self.endpoints["cells"] if service is None or c["service"] == service]

    def cell(self, name):
        return next(c for c in self.endpoints["cells"] if c["name"] == name)

    def transmitter(self, name):
        return next(t for t in self.endpoints["transmitters"] if t["name"] == name)

    def redis(self, cell, **kw):
        host, port = cell["resp"].rsplit(":", 1)
        r = redis.Redis(host=host, port=int(port), socket_timeout=10, **kw)
        self.clients.append(r)
        return r

    def children(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self):
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def start_mesh():
    meshes = []

    def start(manifests, cells=None):
        tmp = Path(tempfile.mkdtemp(prefix="thynapse-test-"))
        m = Mesh(manifests, cells or {}, tmp)
        meshes.append(m)
        return m

    yield start
    for m in meshes:
        m.stop()
    for m in meshes:
        restarted = m.restarts()
        assert m.allow_restarts or not restarted, f"children restarted unexpectedly: {restarted} (see {m.dir / 'up.log'})"


@pytest.fixture
def ctx():
    """A ZeroMQ context for raw clients (tests/rawwire.py), closed after the test."""
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def metrics(url):
    """Parses a Prometheus text page into {name{labels}: value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


class Subscriber:
    """A redis-py pub/sub connection collecting messages in order."""

    def __init__(self, client, channels=(), patterns=()):
        self.pubsub = client.pubsub()
        self.messages = []
        if channels:
            self.pubsub.subscribe(*channels)
        if patterns:
            self.pubsub.psubscribe(*patterns)
        self.confirmed(len(channels) + len(patterns))

    def confirmed(self, n, timeout=20):
        """Reads until the server has confirmed `n` subscriptions (redis-py's own
        `subscribed` only says the command was sent), keeping any message before them."""
        confirmations = 0
        if n == 0:
            return

        def all_confirmed():
            nonlocal confirmations
            m = self.pubsub.get_message(timeout=0.1)
            if m is not None:
                if m["type"] in ("subscribe", "psubscribe", "ssubscribe"):
                    confirmations += 1
                elif m["type"] in ("message", "pmessage", "smessage"):
                    self.messages.append(m)
            return confirmations >= n

        wait_for(all_confirmed, timeout=timeout, interval=0, what=f"{n} subscriptions confirmed")

    def poll(self, timeout=0.05):
        while True:
            m = self.pubsub.get_message(timeout=timeout)
            if m is None:
                return
            if m["type"] in ("message", "pmessage", "smessage"):
                self.messages.append(m)

    def data(self, prefix=b""):
        return [m["data"] for m in self.messages if m["data"].startswith(prefix)]

    def wait_count(self, n, prefix=b"", timeout=20):
        def enough():
            self.poll()
            return len(self.data(prefix)) >= n

        wait_for(enough, timeout=timeout, what=f"{n} messages")


def every_one_from_its_first(sub, sent, prefix):
    """What `sub` got of the numbered messages `sent` (in publishing order): none twice,
    and from the first it got on, every one, in order: after a failure a subscriber may
    miss what was published before it was reached again, never a message after that.
    Returns the index in `sent` of its first message."""
    got = sub.data(prefix)
    assert len(got) == len(set(got)), f"a message twice: {[g for g in got if got.count(g) > 1][:3]}"
    assert got, "nothing arrived"
    first = sent.index(got[0])
    missing = [p for p in sent[first:] if p not in set(got)]
    assert got == sent[first : first + len(got)] and not missing, f"a gap after its first message: {missing[:5]}"
    return first


def until_every_worker_routable(publisher, channel, worker_subs):
    """Publishes probes until each anycatch worker has taken one: then every worker is
    known at the publisher's transmitter (a PUBLISH count cannot tell, it is 1 for any)."""

    def every_worker_probed():
        publisher.publish(channel, b"probe")
        for s in worker_subs:
            s.poll()
        return all(s.data(b"probe") for s in worker_subs)

    wait_for(every_worker_probed, what="every worker routable")


def until_routed(publisher, channel, receivers, timeout=15):
    """Publishes probes until the mesh routes `channel` to `receivers` cells: then every
    subscription involved has reached the publisher's transmitter."""
    return wait_for(
        lambda: publisher.publish(channel, b"probe") >= receivers,
        timeout=timeout,
        interval=0.05,
        what=f"{channel} routed to {receivers} cells",
    )


def rendezvous_request(address, request, token=None):
    """Sends one JSON datagram to a rendezvous point and returns its answer. Sealed as a
    transmitter of the mesh (the mesh key) when the point's mesh has a token (`token`, or
    the one a running `Mesh` registered for it); then only an answer sealed for this
    request is read, and checked."""
    import rawwire

    token = token or rawwire.TOKENS.get(address)
    host, port = address.replace("udp://", "").rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    try:
        body = json.dumps(request).encode()
        if not token:
            s.sendto(body, (host, int(port)))
            return json.loads(s.recvfrom(65536)[0])
        key = rawwire.mesh_key(token)
        datagram, mac = rawwire.seal(body, key, "peer", request["mesh"])
        s.sendto(datagram, (host, int(port)))
        while True:
            raw = s.recvfrom(65536)[0]
            answer, sealed = rawwire.unseal(raw)
            if sealed is None:
                return answer  # a refusal: the point could not open the request
            if sealed.get("re") == mac:
                rawwire.unseal(raw, key)  # checks the seal
                return answer
    finally:
        s.close()


def until_an_expiry_passed(mesh, timeout=10):
    """Waits, with the mesh's transmitters perhaps paused, until a little more than one
    expiry (250 ms × 4) has passed since now, as a clock outside them says: the mesh's
    rendezvous forgets an announcement made now (250 ms × 5) once it has."""
    address, name = mesh.endpoints["rendezvous"][0]["address"], mesh.endpoints["mesh"]
    clock = {"name": "clock", "id": "00" * 20, "command": "tcp://127.0.0.1:1", "event": "tcp://127.0.0.1:1"}
    rendezvous_request(address, {"type": "announce", "mesh": name, "interval_ms": 250, "multiplier": 5,
                                 "transmitter": clock})
    wait_for(lambda: "clock" not in [t["name"] for t in free_udp_query(address, name)["transmitters"]],
             timeout=timeout, what="an expiry passed")


def free_udp_query(address, mesh):
    """Asks a rendezvous which transmitters are live."""
    return rendezvous_request(address, {"type": "query", "mesh": mesh})


def room_hosts(mesh, room):
    """The live transmitters hosting `room` (placing it when new), as the rendezvous of a
    running `Mesh` says; [] while a placement waits for confirmation."""
    answer = rendezvous_request(mesh.endpoints["rendezvous"][0]["address"], {"type": "locate", "mesh": mesh.endpoints["mesh"], "room": room})
    assert answer["type"] == "room", answer
    return answer["transmitters"]


class ShardSubscriber(Subscriber):
    """A redis-py connection subscribed to shard channels (SSUBSCRIBE)."""

    def __init__(self, client, channels):
        self.pubsub = client.pubsub()
        self.messages = []
        self.pubsub.ssubscribe(*channels)
        self.confirmed(len(channels))


def until_sharded(publisher, channel, receivers, timeout=15):
    """SPUBLISHes probes until `channel` reaches `receivers` cells."""
    return wait_for(
        lambda: publisher.spublish(channel, b"probe") >= receivers,
        timeout=timeout,
        interval=0.05,
        what=f"{channel} routed to {receivers} cells",
    )


def drops(url, prefix="thynapse_transmitter_drops_total", label="reason"):
    """{reason: count} of a process's drop counter (or another counter by one label)."""
    pattern = re.compile(label + r'="([^"]+)"')
    return {pattern.search(k).group(1): v for k, v in metrics(url).items() if k.startswith(prefix + "{")}


class Part:
    """One component started alone (not by `up`), with the status line it printed."""

    def __init__(self, args, tmp, timeout=30):
        self.log = tmp / f"{args[0]}-{len(list(tmp.iterdir()))}.log"
        self.stderr = open(self.log, "w")
        self.proc = subprocess.Popen([str(BINARY), *args], stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.clients = []
        # A sidecar prints READY once it joined a transmitter: never, when it cannot.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.stop()
            raise AssertionError(f"{args}: no READY within {timeout}s ({line!r}); {self.log.read_text()[-2000:]}")
        self.ready = json.loads(line.split(" ", 1)[1])

    def stop(self):
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture
def parts():
    """Starts components alone: `parts("rendezvous", "--mesh", "m")` → a `Part`."""
    tmp = Path(tempfile.mkdtemp(prefix="thynapse-test-parts-"))
    started = []

    def start(*args, timeout=30):
        started.append(Part([str(a) for a in args], tmp, timeout=timeout))
        return started[-1]

    yield start
    for p in reversed(started):
        p.stop()
