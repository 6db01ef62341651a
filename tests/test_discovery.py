"""Discovery promises (docs/architecture.md "Rooms" and "Limits", docs/protocol.md
"Rendezvous datagrams"), with components started alone and datagrams written here: answers
to a membership view (whole, unchanged, or what changed), whose datagrams a transmitter reads, `hosting` sent unasked and confirmed at once, the bounds on
transmitters and rooms a rendezvous keeps, and a sidecar sent on by a full transmitter."""

import hashlib
import json
import os
import socket
import struct

import pytest
import redis

from conftest import mesh_yaml, metrics, room_hosts, wait_for
from rawwire import FakePeer, RawCell


def udp(timeout=1.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def target(address):
    host, port = address.replace("udp://", "").rsplit(":", 1)
    return host, int(port)


def read_all(sock):
    """Every datagram waiting on `sock` (until a read times out), parsed."""
    out = []
    try:
        while True:
            out.append(json.loads(sock.recvfrom(65536)[0]))
    except socket.timeout:
        return out


def announcement(mesh, name, interval_ms=60_000, multiplier=2, **fields):
    info = {"name": name, "id": "%040x" % (hash(name) & (2**160 - 1)), "command": "tcp://127.0.0.1:1",
            "event": "tcp://127.0.0.1:1"}
    return json.dumps({"type": "announce", "mesh": mesh, "interval_ms": interval_ms, "multiplier": multiplier,
                       "transmitter": info, **fields}).encode()


def in_steps(rendezvous, total, step, datagram, gauge):
    """Sends `total` datagrams `step` at a time, each step again until the rendezvous has
    them all (UDP: its receive buffer may drop some)."""
    address = target(rendezvous.ready["address"])
    sender = udp(timeout=0.01)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # answers unread: dropped
    page = lambda: metrics(rendezvous.ready["metrics"])  # noqa: E731
    for start in range(0, total, step):
        for attempt in range(20):
            for i in range(start, start + step):
                sender.sendto(datagram(i), address)
            try:
                wait_for(lambda: page()[gauge] >= start + step, timeout=1, interval=0.02)
                break
            except AssertionError:
                if attempt == 19:
                    raise
    sender.close()


def membership_digest(members):
    """The digest of docs/protocol.md: SHA-256 over each (name, instance id, command
    endpoint) in name order, each part preceded by its length as a u64 LE; 16 hex digits."""
    h = hashlib.sha256()
    for info in sorted(members, key=lambda t: t["name"]):
        for part in (info["name"].encode(), bytes.fromhex(info["id"]), info["command"].encode()):
            h.update(struct.pack("<Q", len(part)) + part)
    return h.hexdigest()[:16]


def test_a_view_the_point_remembers_is_answered_with_what_changed_since(parts):
    rendezvous = parts("rendezvous", "--mesh", "delta")
    address = target(rendezvous.ready["address"])
    sock = udp(timeout=0.3)

    def announce(name, **fields):
        sock.sendto(announcement("delta", name, **fields), address)
        return [d for d in read_all(sock) if d["type"] in ("peers", "changed", "unchanged")]

    # A first announcement: every transmitter, with the digest they add up to.
    [whole] = announce("a")
    assert whole["type"] == "peers" and [t["name"] for t in whole["transmitters"]] == ["a"]
    view = whole["digest"]
    assert view == membership_digest(whole["transmitters"])
    members = {t["name"]: t for t in whole["transmitters"]}
    assert announce("a", view=view)[0]["type"] == "unchanged"

    # b and c join, x joins to expire soon: from the view a holds, one `changed` answer.
    for name in ("b", "c"):
        announce(name)
    announce("x", interval_ms=500, multiplier=2)  # kept 1 s
    [changed] = announce("a", view=view)
    assert (changed["type"], changed["from"]) == ("changed", view)
    assert sorted(t["name"] for t in changed["joined"]) == ["b", "c", "x"] and not changed.get("left")
    members.update({t["name"]: t for t in changed["joined"]})
    assert membership_digest(members.values()) == changed["digest"], "applied, it makes the new digest"
    older, view = view, changed["digest"]

    # x expires: gone, in a change from the view just taken; and from two views back,
    # b and c joined (x came and went, and is named gone: the asker may have it).
    def x_left():
        answer = announce("a", view=view)
        return answer[0]["type"] == "changed" and answer[0].get("left") == ["x"] and answer[0]
    changed = wait_for(x_left, timeout=5, what="x gone, as a change")
    assert not changed.get("joined")
    del members["x"]
    assert membership_digest(members.values()) == changed["digest"]
    [from_older] = announce("a", view=older)
    assert from_older["type"] == "changed" and from_older["digest"] == changed["digest"]
    assert sorted(t["name"] for t in from_older["joined"]) == ["b", "c"] and from_older["left"] == ["x"]

    # A view the point never answered: every transmitter again.
    answer = announce("a", view="0123456789abcdef")
    assert answer[0]["type"] == "peers" and len(answer[0]["transmitters"]) == 3
    counted = metrics(rendezvous.ready["metrics"])
    assert counted['thynapse_rendezvous_membership_answers_total{kind="changed"}'] >= 3


def test_a_transmitter_reads_discovery_datagrams_only_from_its_rendezvous_points(parts, ctx):
    """A forged `peers` would start connections, a forged `hosting` assign rooms: from an
    address that is not one of its points, neither does anything. The same datagrams from a
    point (a socket of this test given as one) do, so the test can tell."""
    rendezvous = parts("rendezvous", "--mesh", "spoof")
    point = udp(timeout=5)
    t = parts("transmitter", "--mesh", "spoof", "--name", "spoof-0", "--rendezvous", rendezvous.ready["address"],
              "--rendezvous", f"udp://127.0.0.1:{point.getsockname()[1]}", "--announce-interval-ms", "250",
              "--expiry-multiplier", "20")
    _, transmitter = point.recvfrom(65536)  # its announcement: where it reads datagrams
    # Known only from the datagrams below: neither announces itself. The forged one is a
    # bare TCP listener, which sees a connection attempt as soon as one is made.
    forged_peer = socket.socket()
    forged_peer.bind(("127.0.0.1", 0))
    forged_peer.listen(8)
    real_peer = FakePeer(ctx, "spoof", rendezvous.ready["address"], name="listed", announcing=False)
    try:
        def datagrams(name, endpoint, room):
            info = {"name": name, "id": os.urandom(20).hex(), "command": endpoint, "event": "tcp://127.0.0.1:1"}
            return [json.dumps({"type": "peers", "mesh": "spoof", "transmitters": [info]}).encode(),
                    json.dumps({"type": "hosting", "mesh": "spoof",
                                "rooms": [{"room": room, "hosts": ["spoof-0"]}]}).encode()]

        stranger = udp()
        for d in datagrams("forged", "tcp://127.0.0.1:%d" % forged_peer.getsockname()[1], "forged"):
            stranger.sendto(d, transmitter)
        for d in datagrams("listed", real_peer.endpoint, "listed"):
            point.sendto(d, transmitter)
        # Read in order: once the point's datagrams took effect, the stranger's were read,
        # and a connection they started (before the point's) would have reached its
        # listener before the point's peer heard PEER.
        wait_for(lambda: real_peer.received("PEER"), what="a link to the transmitter the point listed")
        wait_for(lambda: metrics(t.ready["metrics"])["thynapse_transmitter_rooms"] == 1, what="the point's room hosted")
        forged_peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            forged_peer.accept()  # a forged `peers` started a connection
        forged = RawCell(ctx, t.ready["command"], room="forged")
        assert forged.hello(expect="MOVE")["reason"] == 'room "forged" is not hosted here'
    finally:
        forged_peer.close()
        real_peer.stop()


def test_the_rendezvous_tells_a_new_host_at_once_and_it_confirms_without_waiting(start_mesh, parts):
    # Unasked: a `hosting` reaches the announcer as soon as a locate places a room there.
    rendezvous = parts("rendezvous", "--mesh", "tell")
    announcer, asker = udp(), udp()
    address = target(rendezvous.ready["address"])
    announcer.sendto(announcement("tell", "tell-0"), address)
    assert all(d["type"] in ("peers", "hosting") for d in read_all(announcer))
    asker.sendto(json.dumps({"type": "locate", "mesh": "tell", "room": "news"}).encode(), address)
    answer = json.loads(asker.recvfrom(65536)[0])
    assert (answer["type"], answer["transmitters"]) == ("room", []), "not confirmed yet"
    told = json.loads(announcer.recvfrom(65536)[0])
    assert told == {"type": "hosting", "mesh": "tell", "rooms": [{"room": "news", "hosts": ["tell-0"]}]}, told
    # A real transmitter confirms at once, not at its next announcement (a minute away).
    m = start_mesh(mesh_yaml(name="quick", replicas=1, announce_ms=60_000, multiplier=2))
    hosts = wait_for(lambda: room_hosts(m, "fresh"), timeout=20, interval=0.2, what="the new room confirmed")
    assert [h["name"] for h in hosts] == ["quick-0"]


def test_a_rendezvous_keeps_at_most_2000_transmitters_and_says_so(parts):
    rendezvous = parts("rendezvous", "--mesh", "full")
    address = target(rendezvous.ready["address"])
    page = lambda: metrics(rendezvous.ready["metrics"])  # noqa: E731
    in_steps(rendezvous, 2000, 100, lambda i: announcement("full", f"full-{i:04}"), "thynapse_rendezvous_transmitters")
    one_more = udp()
    one_more.sendto(announcement("full", "full-2000"), address)
    answer = json.loads(one_more.recvfrom(65536)[0])
    assert answer["type"] == "error" and "at most 2000 transmitters" in answer["error"], answer
    assert page()['thynapse_rendezvous_refused_total{limit="transmitters"}'] == 1
    # Renewals of names it keeps go on.
    one_more.sendto(announcement("full", "full-0007"), address)
    assert json.loads(one_more.recvfrom(65536)[0])["type"] == "peers"


def test_a_rendezvous_keeps_at_most_10000_rooms_and_the_refusal_reaches_redis_clients(parts):
    rendezvous = parts("rendezvous", "--mesh", "cap")
    address = target(rendezvous.ready["address"])
    page = lambda: metrics(rendezvous.ready["metrics"])  # noqa: E731
    in_steps(rendezvous, 10_000, 200, lambda i: json.dumps({"type": "locate", "mesh": "cap", "room": f"r{i}"}).encode(),
             "thynapse_rendezvous_rooms")
    asker = udp()
    asker.sendto(json.dumps({"type": "locate", "mesh": "cap", "room": "one-too-many"}).encode(), address)
    answer = json.loads(asker.recvfrom(65536)[0])
    assert answer["type"] == "error" and "10000 rooms" in answer["error"], answer
    assert page()['thynapse_rendezvous_refused_total{limit="rooms"}'] == 1
    # Through a sidecar, SPUBLISH and SSUBSCRIBE of a new room get the refusal.
    rv = rendezvous.ready["address"]
    parts("transmitter", "--mesh", "cap", "--name", "cap-0", "--rendezvous", rv, "--announce-interval-ms", "250")
    sidecar = parts("sidecar", "--mesh", "cap", "--service", "s", "--name", "c", "--rendezvous", rv,
                    "--resp-bind", "127.0.0.1:0", "--announce-interval-ms", "250")
    host, port = sidecar.ready["resp"].rsplit(":", 1)
    r = redis.Redis(host=host, port=int(port), socket_timeout=10)
    with pytest.raises(redis.ResponseError, match="10000 rooms"):
        r.spublish("{brand-new}x", b"m")
    p = r.pubsub()
    p.ssubscribe("{brand-new}y")

    def refusal():
        try:
            p.get_message(timeout=0.1)
        except redis.ResponseError as e:
            return str(e)

    assert "10000 rooms" in wait_for(refusal, what="the refusal")
    assert page()['thynapse_rendezvous_refused_total{limit="rooms"}'] >= 3


def test_a_sidecar_told_transmitter_full_joins_another(parts):
    rendezvous = parts("rendezvous", "--mesh", "cells")
    rv = rendezvous.ready["address"]
    full = parts("transmitter", "--mesh", "cells", "--name", "cells-0", "--rendezvous", rv, "--max-cells", "1",
                 "--announce-interval-ms", "250")
    parts("transmitter", "--mesh", "cells", "--name", "cells-1", "--rendezvous", rv, "--announce-interval-ms", "250")

    def sidecar(name):
        return parts("sidecar", "--mesh", "cells", "--service", "s", "--name", name, "--rendezvous", rv,
                     "--resp-bind", "127.0.0.1:0", "--announce-interval-ms", "250", "--prefer-transmitter", "cells-0")

    assert sidecar("first").ready["transmitter"] == "cells-0"
    assert sidecar("second").ready["transmitter"] == "cells-1", "told the first is full, it joins the other"
    assert metrics(full.ready["metrics"])['thynapse_transmitter_refused_total{limit="cells"}'] >= 1, "it was not told"
