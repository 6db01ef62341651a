"""Raw parties of the transmitter wire protocol, written here from docs/protocol.md alone
(not from the Rust code), with pyzmq over libzmq: a cell (`RawCell`) and a transmitter
posing as a peer (`FakePeer`). Tests use them to do what the sidecar and the transmitter
never do on their own: withhold credit, vanish, forge, say QUIT at a chosen moment."""

import hashlib
import hmac
import json
import os
import queue
import socket
import struct
import threading
import time

import zmq
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from conftest import wait_for


# The mesh token of each transmitter's command endpoint, as the meshes under test
# registered it (`conftest.Mesh`): RawCell and FakePeer authenticate with it by default.
TOKENS = {}
AUTO = object()


def mesh_key(token):
    return hmac.new(token, b"thynapse mesh", hashlib.sha256).digest()


def service_key(token, service):
    return hmac.new(token, b"thynapse service " + service.encode(), hashlib.sha256).digest()


def prove(key, role, nonce, context):
    """HMAC-SHA-256 over each part preceded by its length as a little-endian u64."""
    parts = b"".join(struct.pack("<Q", len(p)) + p for p in (role.encode(), nonce.encode(), context.encode()))
    return hmac.new(key, parts, hashlib.sha256).hexdigest()


def parts_mac(key, parts):
    """HMAC-SHA-256 over each part after its length as a little-endian u64."""
    return hmac.new(key, b"".join(struct.pack("<Q", len(p)) + p for p in parts), hashlib.sha256).digest()


def datagram_mac(key, role, context, ts, nonce, re, body):
    """A seal's MAC: over "thynapse datagram", its fields and the body, each part after
    its length as a little-endian u64 (as `prove` does for AUTH)."""
    parts = [b"thynapse datagram", role.encode(), context.encode(), str(ts).encode(), nonce.encode(), re.encode(), body]
    return hmac.new(key, b"".join(struct.pack("<Q", len(p)) + p for p in parts), hashlib.sha256).hexdigest()


def seal(body, key, role, context, re="", ts_ms=None):
    """A rendezvous datagram sealed (docs/protocol.md, "Sealed datagrams"): the body, a
    newline, the seal. Returns (datagram, mac)."""
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    nonce = os.urandom(16).hex()
    mac = datagram_mac(key, role, context, ts, nonce, re, body)
    line = {"role": role, "context": context, "ts": ts, "nonce": nonce, **({"re": re} if re else {}), "mac": mac}
    return body + b"\n" + json.dumps(line, separators=(",", ":")).encode(), mac


def unseal(datagram, key=None):
    """(body as JSON, seal or None); with `key`, fails unless the seal is that key's."""
    body, _, line = datagram.partition(b"\n")
    if not line:
        assert key is None, f"an unsealed datagram: {body[:200]}"
        return json.loads(body), None
    s = json.loads(line)
    if key is not None:
        mac = datagram_mac(key, s["role"], s["context"], s["ts"], s["nonce"], s.get("re", ""), body)
        assert hmac.compare_digest(mac, s["mac"]), "a seal that does not open with the key"
    return json.loads(body), s


def authenticate(sock, key, role, context, endpoint):
    """The client side of AUTH (docs/protocol.md): proofs over `context@endpoint`, the
    endpoint dialed. Returns the server's AUTD (checked), or fails with the refusal."""
    bound = f"{context}@{endpoint}"
    sock.send(command("AUTH", {"role": role, "context": context}))
    _, cmd, body, _ = recv_command(sock)
    assert cmd == "CHAL", (cmd, body)
    mine = os.urandom(16).hex()
    sock.send(command("AUTH", {"role": role, "context": context, "nonce": body["nonce"],
                               "proof": prove(key, role, body["nonce"], bound), "challenge": mine}))
    _, cmd, body, _ = recv_command(sock)
    assert cmd == "AUTD", (cmd, body)
    assert hmac.compare_digest(body["proof"], prove(key, "server", mine, bound)), "the server's proof is wrong"
    return body


class Sealed:
    """A DEALER on an encrypted connection (docs/protocol.md, "Encryption"): every message
    one frame, `counter u64le ‖ ChaCha20-Poly1305(frames, each after its u32le length)`,
    the nonce four zero bytes and the counter."""

    def __init__(self, sock, send_key, recv_key):
        self.sock, self.tx, self.rx = sock, ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self.next, self.last = 0, -1

    def seal(self, frames):
        counter = struct.pack("<Q", self.next)
        self.next += 1
        plain = b"".join(struct.pack("<I", len(f)) + f for f in frames)
        return counter + self.tx.encrypt(b"\0" * 4 + counter, plain, None)

    def send_multipart(self, frames):
        self.sock.send(self.seal(frames))

    def send(self, frame):
        self.send_multipart([frame])

    def recv_multipart(self):
        frames = self.sock.recv_multipart()
        assert len(frames) == 1, f"not sealed: {frames[0][:200]}"
        (counter,) = struct.unpack_from("<Q", frames[0])
        assert counter > self.last, "a counter that does not grow"
        self.last = counter
        plain = self.rx.decrypt(b"\0" * 4 + frames[0][:8], frames[0][8:], None)
        out, at = [], 0
        while at < len(plain):
            (n,) = struct.unpack_from("<I", plain, at)
            out.append(plain[at + 4:at + 4 + n])
            at += 4 + n
        return out

    def __getattr__(self, name):
        return getattr(self.sock, name)


def authenticate_encrypted(sock, key, role, context, endpoint):
    """AUTH asking for encryption: an ephemeral X25519 key in the proof's answer, covered
    by both proofs; the keys from the shared secret and the exchange. Returns the socket
    wrapped (`Sealed`)."""
    bound = f"{context}@{endpoint}"
    private = X25519PrivateKey.generate()
    mine = private.public_key().public_bytes_raw().hex()
    sock.send(command("AUTH", {"role": role, "context": context}))
    _, cmd, body, _ = recv_command(sock)
    assert cmd == "CHAL", (cmd, body)
    nonce, challenge = body["nonce"], os.urandom(16).hex()
    sock.send(command("AUTH", {"role": role, "context": context, "nonce": nonce, "challenge": challenge,
                               "proof": prove(key, role, nonce, f"{bound} encrypt {mine}"), "encrypt": mine}))
    _, cmd, body, _ = recv_command(sock)
    assert cmd == "AUTD", (cmd, body)
    theirs = body["encrypt"]
    expected = prove(key, "server", challenge, f"{bound} encrypt {mine} encrypt {theirs}")
    assert hmac.compare_digest(body["proof"], expected), "the server's proof is wrong"
    secret = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(theirs)))
    transcript = [x.encode() for x in (nonce, challenge, bound, mine, theirs)]

    def direction(label):
        return parts_mac(key, [b"thynapse encrypt", label, secret, *transcript])

    return Sealed(sock, direction(b"client to server"), direction(b"server to client"))


def dealer(ctx, endpoint, timeout_ms=5000):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.connect(endpoint)
    return s


def recv_command(sock):
    """One message: (enc, CMD4, JSON payload or header, the frames after the first)."""
    frames = sock.recv_multipart()
    return parse_command(frames)


def parse_command(frames):
    text = frames[0].decode()
    enc, cmd, payload = text[0], text[2:6], text[7:]
    return enc, cmd, (json.loads(payload) if payload else {}), frames[1:]


def command(cmd, body=None):
    return f"J {cmd} {json.dumps(body if body is not None else {})}".encode()


def name_bytes(b):
    return struct.pack("<I", len(b)) + b


def interest(names, kind=0, op=0):
    """An interest list: op 0 add / 1 remove; kind 0 channel, 1 pattern, 2 shard channel."""
    return b"".join(bytes([op, kind]) + name_bytes(n if isinstance(n, bytes) else n.encode()) for n in names)


def publish_records(messages):
    """(channel, payload[, kind]) → the records of a publish batch (after `first_seq`)."""
    out = b""
    for m in messages:
        channel, payload = (x if isinstance(x, bytes) else x.encode() for x in m[:2])
        kind = m[2] if len(m) > 2 else 0
        out += bytes([kind]) + struct.pack("<Q", 0) + name_bytes(channel) + name_bytes(payload)
    return out


def acks(frame):
    first, n = struct.unpack_from("<QI", frame)
    return first, list(struct.unpack_from(f"<{n}I", frame, 12))


def envelopes(frame):
    """An envelope batch (DLVR, FWRD) → (batch number, [message dicts])."""
    (batch,) = struct.unpack_from("<Q", frame)
    at, out = 8, []
    while at < len(frame):
        kind = frame[at]
        origin = frame[at + 1 : at + 21].hex()
        seq, ts = struct.unpack_from("<QQ", frame, at + 21)
        at += 37
        fields = []
        for _ in range(2):
            (n,) = struct.unpack_from("<I", frame, at)
            fields.append(frame[at + 4 : at + 4 + n])
            at += 4 + n
        (t,) = struct.unpack_from("<H", frame, at)
        at += 2
        targets = [frame[at + 20 * i : at + 20 * (i + 1)].hex() for i in range(t)]
        at += 20 * t
        out.append({"kind": kind, "origin": origin, "seq": seq, "ts": ts, "channel": fields[0],
                    "payload": fields[1], "targets": targets})
    return batch, out


def envelope_batch(batch, messages):
    """Messages as dicts with origin (hex), seq, channel, payload and optional targets, kind."""
    out = struct.pack("<Q", batch)
    for m in messages:
        targets = m.get("targets", [])
        out += bytes([m.get("kind", 0)]) + bytes.fromhex(m["origin"]) + struct.pack("<QQ", m["seq"], 0)
        out += name_bytes(m["channel"]) + name_bytes(m["payload"])
        out += struct.pack("<H", len(targets)) + b"".join(bytes.fromhex(t) for t in targets)
    return out


class RawCell:
    """A cell on one DEALER: greets with HELO, then sends and reads what a test says."""

    def __init__(self, ctx, endpoint, service="raw", cell_id=None, token=AUTO, identity=None, key=None,
                 encrypt=False, dial=None, **hello):
        # `dial`: where to connect instead of `endpoint` (a relay); proofs stay bound to
        # `endpoint`, the transmitter's.
        self.endpoint = endpoint
        self.encrypt = encrypt
        self.sock = dealer(ctx, dial or endpoint)
        self.id = cell_id or os.urandom(20).hex()
        self.service = service
        # What AUTH proves: the Service, with its permissions when restricted (its key is
        # derived from the token and this identity, unless `key` is given).
        self.identity = identity or service
        self.key = key
        # The mesh's token by default (none for a transmitter started without one).
        self.token = TOKENS.get(endpoint) if token is AUTO else token
        self.authenticated = False
        self.hello_fields = hello
        self.pending = []  # messages read while waiting for another command
        self.batches = []  # DLVR: (batch, [message dicts]), in arrival order

    def hello(self, expect="WLCM"):
        """HELO (after AUTH with the Service key when the mesh has a token); returns the
        answer's body, asserting its command when `expect` is set."""
        self.authenticate()
        self.send("HELO", {"id": self.id, "service": self.service, **self.hello_fields})
        _, cmd, body, _ = self.recv()
        if expect:
            assert cmd == expect, (cmd, body)
        return body

    def authenticate(self):
        """AUTH with the Service key, once, when the mesh has a token."""
        if (self.token or self.key) and not self.authenticated:
            key = self.key or service_key(self.token, self.identity)
            if self.encrypt:
                self.sock = authenticate_encrypted(self.sock, key, "cell", self.identity, self.endpoint)
            else:
                authenticate(self.sock, key, "cell", self.identity, self.endpoint)
            self.authenticated = True

    def send(self, cmd, body=None):
        self.sock.send(command(cmd, body))

    def send_binary(self, cmd, *frames, header=None):
        first = f"B {cmd}" + (f" {json.dumps(header)}" if header is not None else "")
        self.sock.send_multipart([first.encode(), *frames])

    def recv(self):
        """The next message, DLVR batches included (they are also kept in `batches`)."""
        if self.pending:
            return self.pending.pop(0)
        message = recv_command(self.sock)
        if message[1] == "DLVR":
            self.batches.append(envelopes(message[3][0]))
        return message

    def expect(self, cmd):
        """Reads until `cmd` comes, keeping what came before it for later `recv`s."""
        skipped = []
        while True:
            message = recv_command(self.sock)
            if message[1] == "DLVR":
                self.batches.append(envelopes(message[3][0]))
            if message[1] == cmd:
                self.pending = skipped + self.pending
                return message
            skipped.append(message)

    def subscribe(self, names, kind=0, op=0, sync=None):
        self.send_binary("SUBS", interest(names, kind, op), header={"sync": sync} if sync is not None else None)
        if sync is not None:
            assert self.expect("SUBD")[2] == {"sync": sync}

    def publish(self, first_seq, messages):
        """One PUBS; returns receivers per message from its ACKS."""
        self.send_binary("PUBS", struct.pack("<Q", first_seq) + publish_records(messages))
        first, receivers = acks(self.expect("ACKS")[3][0])
        assert first == first_seq
        return receivers

    def delivered(self):
        """Every message delivered so far (DLVR), in order."""
        return [m for _, batch in self.batches for m in batch]

    def read_deliveries(self, n, timeout=15):
        """Reads until `n` messages were delivered in all."""

        def enough():
            while len(self.delivered()) < n:
                try:
                    self.pending.append(recv_command(self.sock))
                except zmq.Again:
                    return False
                if self.pending[-1][1] == "DLVR":
                    self.batches.append(envelopes(self.pending.pop()[3][0]))
            return True

        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        try:
            wait_for(enough, timeout=timeout, what=f"{n} messages delivered to the raw cell")
        finally:
            self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        return self.delivered()

    def credit(self):
        """Credits every batch delivered so far."""
        if self.batches:
            self.send("CRED", {"batch": self.batches[-1][0]})

    def close(self):
        self.sock.close(linger=0)


class FakePeer:
    """A transmitter written from protocol.md, in a thread: it binds a ROUTER and announces
    it to a rendezvous point, so that the real transmitters link to it (and sidecars join
    it); it answers their PEER, SYNC and PING (and a cell's HELO, and SUBS while
    `confirm_subs`), and credits their FWRD batches while `credit` is set. `link(endpoint)`
    opens its own DEALER to a real transmitter (PEER, then pings); `send(endpoint, frames)`
    sends on it. Everything it reads is kept in `inbound` (on the ROUTER) and `answers`
    (on its DEALERs), as (cmd, body, frames)."""

    def __init__(self, ctx, mesh, rendezvous, name="fake-peer", interval_ms=250, multiplier=4, announcing=True,
                 token=None):
        self.ctx, self.mesh, self.name = ctx, mesh, name
        self.key = mesh_key(token) if token else None
        self.challenges = {}  # identity → the nonce given it
        self.id = os.urandom(20).hex()
        self.interval = interval_ms / 1000
        self.announcement = {"type": "announce", "mesh": mesh, "interval_ms": interval_ms, "multiplier": multiplier}
        host, port = rendezvous.replace("udp://", "").rsplit(":", 1)
        self.rendezvous = (host, int(port))
        self.credit = True
        self.deaf = False  # reads, answers nothing
        self.confirm_subs = True  # answers a cell's SUBS with SUBD
        self.reply_once = {}  # cmd → frames to answer it with, once
        self.announcing = announcing
        self.inbound, self.answers = [], []
        self.seen = set()  # (origin, seq) of every FWRD message read
        self.lock = threading.Lock()
        self.outgoing = queue.Queue()
        self.stopped = threading.Event()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dealers = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def endpoint(self):
        return f"tcp://127.0.0.1:{self.port}"

    def hello(self):
        return {"id": self.id, "name": self.name, "mesh": self.mesh}

    def link(self, endpoint):
        """A DEALER to a real transmitter, introduced with PEER; waits for PWLC."""
        before = len(self.answered("PWLC"))
        self.outgoing.put(("link", endpoint, None))
        wait_for(lambda: len(self.answered("PWLC")) > before, what=f"PWLC from {endpoint}")

    def send(self, endpoint, frames):
        self.outgoing.put(("send", endpoint, frames))

    def answered(self, cmd):
        with self.lock:
            return [a for a in self.answers if a[0] == cmd]

    def received(self, cmd):
        with self.lock:
            return [m for m in self.inbound if m[0] == cmd]

    def forwarded(self):
        """The FWRD messages read, in order, copies included."""
        return [m for _, _, frames in self.received("FWRD") for m in envelopes(frames[0])[1]]

    def stop(self):
        """Vanishes: no more announcements, its sockets closed."""
        self.stopped.set()
        self.thread.join(timeout=5)

    close = stop

    def _announce(self):
        if not self.announcing:
            return
        info = {"name": self.name, "id": self.id, "command": self.endpoint, "event": "tcp://127.0.0.1:1"}
        body = json.dumps({**self.announcement, "transmitter": info}).encode()
        if self.key:
            body, _ = seal(body, self.key, "peer", self.mesh)
        self.udp.sendto(body, self.rendezvous)

    def _run(self):
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self.stopped.is_set():
                while not self.outgoing.empty():
                    what, endpoint, frames = self.outgoing.get()
                    if what == "link":
                        d = dealer(self.ctx, endpoint)
                        if self.key:
                            authenticate(d, self.key, "peer", self.mesh, endpoint)
                        self.dealers[endpoint] = d
                        poller.register(d, zmq.POLLIN)
                        d.send(command("PEER", self.hello()))
                    else:
                        self.dealers[endpoint].send_multipart(frames)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    self._announce()
                    for d in self.dealers.values():
                        d.send(command("PING"))
                for sock, _ in poller.poll(timeout=10):
                    if sock is self.router:
                        self._inbound(self.router.recv_multipart())
                    else:
                        _, cmd, body, frames = parse_command(sock.recv_multipart())
                        with self.lock:
                            self.answers.append((cmd, body, frames))
        finally:
            for d in self.dealers.values():
                d.close(linger=0)
            self.router.close(linger=0)
            self.udp.close()

    def _auth(self, identity, body):
        """The server side of AUTH, for a transmitter linking to this fake."""
        if "proof" not in body:
            self.challenges[identity] = os.urandom(16).hex()
            self.router.send_multipart([identity, command("CHAL", {"nonce": self.challenges[identity]})])
            return
        nonce = self.challenges.pop(identity, None)
        bound = f"{self.mesh}@{self.endpoint}"
        good = nonce and hmac.compare_digest(body["proof"], prove(self.key, "peer", nonce, bound))
        reply = (command("AUTD", {"proof": prove(self.key, "server", body["challenge"], bound)}) if good
                 else command("ERRR", {"error": "AUTH refused"}))
        self.router.send_multipart([identity, reply])

    def _inbound(self, frames):
        identity, rest = frames[0], frames[1:]
        _, cmd, body, more = parse_command(rest)
        with self.lock:
            self.inbound.append((cmd, body, more))
        reply = None
        if cmd == "FWRD":
            with self.lock:
                self.seen.update((m["origin"], m["seq"]) for m in envelopes(more[0])[1])
        if self.deaf:
            return
        if cmd == "AUTH" and self.key:
            self._auth(identity, body)
            return
        if cmd in self.reply_once:
            self.router.send_multipart([identity, *self.reply_once.pop(cmd)])
            return
        if cmd == "PEER":
            reply = command("PWLC", self.hello())
        elif cmd == "HELO":  # a cell (a sidecar, in tests of the sidecar)
            reply = command("WLCM", {"id": self.id, "name": self.name, "pub": "tcp://127.0.0.1:1",
                                     "max_message_bytes": 1 << 20, "heartbeat_ms": int(self.interval * 1000)})
        elif cmd == "SUBS" and self.confirm_subs and "sync" in body:
            reply = command("SUBD", {"sync": body["sync"]})
        elif cmd == "SYNC":
            reply = command("SYND", body)
        elif cmd == "PING":
            reply = command("PONG")
        elif cmd == "FWRD" and self.credit:
            reply = command("FACK", {"batch": envelopes(more[0])[0]})
        if reply is not None:
            self.router.send_multipart([identity, reply])
